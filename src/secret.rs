//! [`Secret`]: a string that cannot be printed. Tokens, client secrets and the local password
//! live in it; its `Debug` and `Display` say `[redacted]` and its memory is wiped on drop.

use std::fmt;
use std::io;
use std::path::Path;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Zeroizing::new(value.into()))
    }

    /// The secret text. Call sites are few and reviewed: the AUTH encoder, the local password
    /// check, and the JWT claim decoder.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares with `candidate` in time that depends only on the candidate's length, which
    /// the one who sent it knows: neither the secret's bytes nor its length show.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let secret = self.0.as_bytes();
        if secret.is_empty() {
            return candidate.is_empty();
        }
        let mut equal = candidate.len().ct_eq(&secret.len());
        for (i, byte) in candidate.iter().enumerate() {
            equal &= byte.ct_eq(&secret[i % secret.len()]);
        }
        equal.into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Most bytes of a file holding one secret (a password, a client secret, a token): far more
/// than any of them, far less than memory.
pub const MAX_SECRET_FILE: usize = 64 * 1024;

/// The error for a path that is not a regular file: a FIFO would block its reader until
/// something writes to it, a device (`/dev/zero`) would never end.
fn not_regular() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")
}

/// Keeps the process's memory to itself: it holds access tokens, and maybe a client secret or
/// the local password, that live an hour and work from anywhere. A non-dumpable process
/// writes no core file, and other processes of the same user can neither attach to it
/// (`ptrace`, a debugger) nor read its memory or environment (`/proc/PID/mem`,
/// `/proc/PID/environ`, where `REDIS_ENTRA_PROXY_TOKEN` may be); root still can. Helpers it
/// runs (`--credential exec`, `az`) are dumpable again once they exec, as usual.
pub fn keep_memory_private() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    Ok(())
}

/// Checks, through links, that `path` is a regular file, before it is opened.
pub fn check_regular_file(path: &Path) -> io::Result<()> {
    if std::fs::metadata(path)?.is_file() {
        Ok(())
    } else {
        Err(not_regular())
    }
}

/// [`check_regular_file`] for async code.
pub async fn check_regular_file_async(path: &Path) -> io::Result<()> {
    if tokio::fs::metadata(path).await?.is_file() {
        Ok(())
    } else {
        Err(not_regular())
    }
}

/// The contents of a regular file of at most `max` bytes, in a buffer wiped on drop.
pub fn read_small_file(path: &Path, max: usize) -> io::Result<Zeroizing<Vec<u8>>> {
    use std::io::Read;
    check_regular_file(path)?;
    let mut buf = Zeroizing::new(Vec::with_capacity(max.min(16 * 1024)));
    std::fs::File::open(path)?
        .take(max as u64 + 1)
        .read_to_end(&mut buf)?;
    if buf.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes; is it the right file?"),
        ));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a regular file of the allowed size is read: a FIFO is refused without blocking,
    /// a device without reading it.
    #[test]
    fn secret_files_are_small_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "pw\n").unwrap();
        assert_eq!(&read_small_file(&ok, 16).unwrap()[..], b"pw\n");
        let big = dir.path().join("big");
        std::fs::write(&big, "x".repeat(17)).unwrap();
        let e = read_small_file(&big, 16).unwrap_err();
        assert!(e.to_string().contains("larger than 16 bytes"), "{e}");
        let fifo = dir.path().join("fifo");
        crate::testing::mkfifo(&fifo);
        for path in [fifo.as_path(), Path::new("/dev/zero")] {
            let e = read_small_file(path, MAX_SECRET_FILE).unwrap_err();
            assert_eq!(e.to_string(), "not a regular file", "{}", path.display());
        }
        // Through a link, the target counts.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        assert!(read_small_file(&link, 16).is_ok());
    }

    #[test]
    fn never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(
            format!("{s:?} {s} {:?}", Some(&s)),
            "[redacted] [redacted] Some([redacted])"
        );
        assert!(s.matches(b"hunter2"));
        assert!(!s.matches(b"hunter"));
        assert!(!s.matches(b"hunter23"));
        // Compared over the candidate's length, which may be any.
        assert!(!s.matches(b"hunter2hunter2"));
        assert!(!s.matches(b""));
        assert!(Secret::new("").matches(b""));
        assert!(!Secret::new("").matches(b"x"));
    }
}
