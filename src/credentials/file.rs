//! The `file` source: a JSON token document written by an external job (for example a
//! Kubernetes secret volume kept fresh by a token-fetching CronJob), shaped
//! `{"username": "<object id>", "access_token": "<token>", "expires_on": "<expiry>"}`.
//!
//! This module owns reading that document ([`parse_token_json`], shared with the `exec`
//! source), the field locations ([`FieldPaths`], a small JSON path dialect in
//! `file/json_path.rs`), expiry formats (`file/expiry.rs`), and noticing that the file changed
//! ([`TokenSource::changed`]). It does not own retrying: on an error the refresher keeps the
//! current credentials and tries again with backoff.
//!
//! Error messages never contain token text: values are described by kind and position, and
//! `serde_json`'s own messages (which can quote input) are not passed on.

mod expiry;
mod json_path;
#[cfg(test)]
mod tests;

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::io::AsyncReadExt;
use zeroize::Zeroizing;

use super::{ChangedFuture, CredentialError, Token, TokenFuture, TokenSource};
use crate::secret::Secret;
use json_path::{kind, JsonPath};

/// How often [`FileSource::changed`] looks at the file. Polling rather than inotify: Kubernetes
/// updates secret volumes by atomically swapping the `..data` symlink, which inotify watches
/// on the file itself do not see, and polling works on every filesystem (network mounts,
/// FUSE) without platform code. One `stat` a second is negligible, and a token that is
/// refreshed minutes before expiry loses nothing by being noticed a second late.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Largest token document read (from the file or from a command's output). Tokens are a few
/// kilobytes; anything near this size is the wrong file, and reading it whole must not
/// exhaust memory.
pub const MAX_TOKEN_JSON_BYTES: usize = 1 << 20;

/// A file modified less than this long ago may be rewritten again within the same timestamp
/// tick without its size changing ("racy git"), so its content is compared too. Twice the
/// poll interval, so that a poll always falls inside the window after any write.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Where the three fields are in the document, as JSON paths (`$.a.b`, `$['a-b']`, `$.a[0]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPaths {
    /// Optional: when absent, the username comes from configuration or the token's `oid`.
    pub username: String,
    pub access_token: String,
    /// Unix seconds (number or numeric string) or an RFC 3339 timestamp.
    pub expires_on: String,
}

impl Default for FieldPaths {
    fn default() -> Self {
        FieldPaths {
            username: "$.username".to_owned(),
            access_token: "$.access_token".to_owned(),
            expires_on: "$.expires_on".to_owned(),
        }
    }
}

impl FieldPaths {
    /// Checks that every path parses, so that configuration can fail at start-up rather than
    /// at every fetch.
    pub fn validate(&self) -> Result<(), CredentialError> {
        self.parsed().map(|_| ())
    }

    fn parsed(&self) -> Result<[JsonPath; 3], CredentialError> {
        let parse = |name: &str, text: &str| {
            JsonPath::parse(text).map_err(|why| {
                CredentialError::Config(format!("the {name} field path `{text}` {why}"))
            })
        };
        Ok([
            parse("username", &self.username)?,
            parse("access token", &self.access_token)?,
            parse("expiry", &self.expires_on)?,
        ])
    }
}

/// Reads a token document: the token (required, a non-empty string), its expiry (required,
/// in the future) and the username (optional; missing, null or empty means none).
pub fn parse_token_json(bytes: &[u8], fields: &FieldPaths) -> Result<Token, CredentialError> {
    parse_token_at(bytes, fields, SystemTime::now())
}

fn parse_token_at(
    bytes: &[u8],
    fields: &FieldPaths,
    now: SystemTime,
) -> Result<Token, CredentialError> {
    let [username_path, token_path, expires_path] = fields.parsed()?;
    let fail = |msg: String| CredentialError::Source(msg);
    // Editors on Windows write a byte-order mark that serde_json rejects.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(fail("is empty".to_owned()));
    }
    let mut doc: Value = serde_json::from_slice(bytes).map_err(|e| fail(describe(&e)))?;

    // The token is moved out of the document (leaving null), not copied, so that its only
    // copy lives in a `Secret` that is wiped on drop.
    let at = &fields.access_token;
    let token = match token_path.lookup_mut(&mut doc).map(std::mem::take) {
        Ok(Value::String(s)) => Secret::new(s),
        Ok(other) => return Err(fail(format!("`{at}` is {}, not a string", kind(&other)))),
        Err(miss) => return Err(fail(format!("`{at}` not found: {miss}"))),
    };
    if token.expose().trim().is_empty() {
        return Err(fail(format!("`{at}` is empty")));
    }

    let ex = &fields.expires_on;
    let expires_at = match expires_path.lookup_mut(&mut doc) {
        Ok(v) => expiry::parse(v).map_err(|why| fail(format!("`{ex}` {why}")))?,
        Err(miss) => return Err(fail(format!("`{ex}` not found: {miss}"))),
    };
    if let Ok(ago) = now.duration_since(expires_at) {
        return Err(fail(format!(
            "`{ex}` is in the past: the token expired {} s ago",
            ago.as_secs()
        )));
    }

    let un = &fields.username;
    let username = match username_path.lookup_mut(&mut doc) {
        Err(_) | Ok(Value::Null) => None,
        Ok(Value::String(s)) if s.is_empty() => None,
        Ok(Value::String(s)) => Some(std::mem::take(s)),
        Ok(other) => return Err(fail(format!("`{un}` is {}, not a string", kind(other)))),
    };
    // The username is logged; a path pointing at the token must not put it in the logs.
    if username.as_deref() == Some(token.expose()) {
        return Err(fail(format!(
            "`{un}` holds the access token, not a username"
        )));
    }

    Ok(Token {
        token,
        expires_at: Some(expires_at),
        username,
    })
}

/// Describes a JSON syntax error by position only: serde_json's messages can quote the input,
/// and the input holds the token.
fn describe(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let (line, column) = (e.line(), e.column());
    match e.classify() {
        Category::Eof => format!(
            "is not complete JSON: it ends at line {line} column {column} (still being written?)"
        ),
        Category::Syntax => {
            format!("is not valid JSON: syntax error at line {line} column {column}")
        }
        Category::Data | Category::Io => {
            format!("could not be read as JSON at line {line} column {column}")
        }
    }
}

/// Adds where a token document came from to a parse error.
pub(super) fn in_context(err: CredentialError, origin: &dyn fmt::Display) -> CredentialError {
    match err {
        CredentialError::Source(msg) => CredentialError::Source(format!("{origin}: {msg}")),
        other => other,
    }
}

/// Reads a token document from a file, and notices when the file changes.
pub struct FileSource {
    path: PathBuf,
    fields: FieldPaths,
    /// What `fetch` last read (or `changed` last looked at); `None` until either has run.
    /// Kept here rather than in the `changed` future because the refresher drops that future
    /// and asks for a new one on every turn of its loop. Never held across an await.
    seen: Mutex<Option<Seen>>,
    /// Keys the content digests; random per process so a digest says nothing about the token.
    hasher: RandomState,
    /// Set once the world-readable warning has been considered, so it is logged at most once.
    warned: AtomicBool,
    poll_interval: Duration,
}

/// The file's identity and version as `stat` (following symlinks) reports them: a new inode
/// or device means the file was replaced (rename, Kubernetes symlink swap); size and times
/// mean it was rewritten in place or had its permissions changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    /// `None`: the file did not exist.
    stamp: Option<Stamp>,
    /// Digest of the content last fetched; `None`: it could not be read.
    digest: Option<u64>,
}

impl FileSource {
    pub fn new(path: PathBuf, fields: FieldPaths) -> FileSource {
        FileSource {
            path,
            fields,
            seen: Mutex::new(None),
            hasher: RandomState::new(),
            warned: AtomicBool::new(false),
            poll_interval: FILE_POLL_INTERVAL,
        }
    }

    /// Tests poll faster than production so that they finish quickly.
    #[cfg(test)]
    fn with_poll_interval(mut self, interval: Duration) -> FileSource {
        self.poll_interval = interval;
        self
    }

    fn seen(&self) -> MutexGuard<'_, Option<Seen>> {
        // The guarded data is two plain values; a panic elsewhere cannot leave it torn.
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn digest(&self, bytes: &[u8]) -> u64 {
        self.hasher.hash_one(bytes)
    }

    async fn stamp(&self) -> Option<Stamp> {
        tokio::fs::metadata(&self.path)
            .await
            .ok()
            .map(|m| Stamp::of(&m))
    }

    /// The whole file, in a buffer wiped on drop.
    async fn read(&self) -> Result<Zeroizing<Vec<u8>>, CredentialError> {
        let io = |source| CredentialError::Io {
            path: self.path.display().to_string(),
            source,
        };
        crate::secret::check_regular_file_async(&self.path)
            .await
            .map_err(io)?;
        let file = tokio::fs::File::open(&self.path).await.map_err(io)?;
        // Reserved up front so that the buffer is not reallocated, which would leave an
        // unwiped copy of the token behind, for any document of ordinary size.
        let mut buf = Zeroizing::new(Vec::with_capacity(16 * 1024));
        file.take(MAX_TOKEN_JSON_BYTES as u64 + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(io)?;
        if buf.len() > MAX_TOKEN_JSON_BYTES {
            return Err(CredentialError::Source(format!(
                "token file {} is larger than {MAX_TOKEN_JSON_BYTES} bytes; is it the right file?",
                self.path.display()
            )));
        }
        Ok(buf)
    }

    async fn fetch_now(&self) -> Result<Token, CredentialError> {
        // Stat before reading: if the file changes in between, the next poll sees a newer
        // stamp and compares contents, so no change is missed.
        let stamp = self.stamp().await;
        let read = self.read().await;
        let digest = read.as_ref().ok().map(|b| self.digest(b));
        // Recorded whether or not the content parses: `changed` should wake for content that
        // differs from this attempt's, not for the same broken file again.
        *self.seen() = Some(Seen { stamp, digest });
        let bytes = read?;
        if !self.warned.swap(true, Ordering::Relaxed) {
            crate::config::warn_if_readable_by_others(&self.path);
        }
        let origin = format!("token file {}", self.path.display());
        parse_token_json(&bytes, &self.fields).map_err(|e| in_context(e, &origin))
    }

    /// One look at the file: true when its content differs from what `fetch` last read.
    async fn poll(&self) -> bool {
        let meta = tokio::fs::metadata(&self.path).await.ok();
        let stamp = meta.as_ref().map(Stamp::of);
        let previous = *self.seen();
        let Some(previous) = previous else {
            // Nothing fetched yet: this look is the baseline.
            let digest = match stamp {
                Some(_) => self.read().await.ok().map(|b| self.digest(&b)),
                None => None,
            };
            *self.seen() = Some(Seen { stamp, digest });
            return false;
        };
        let racy = meta.as_ref().is_some_and(|m| {
            m.modified()
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_none_or(|age| age < RACY_WINDOW)
        });
        if stamp == previous.stamp && !racy {
            return false;
        }
        // A file that vanished or cannot be read has nothing new to fetch; remember its stamp
        // so it is looked at again only when it changes.
        let digest = match stamp {
            Some(_) => self.read().await.ok().map(|b| self.digest(&b)),
            None => None,
        };
        if digest.is_some() && digest != previous.digest {
            return true;
        }
        let mut seen = self.seen();
        if let Some(s) = seen.as_mut().filter(|s| s.digest == previous.digest) {
            s.stamp = stamp;
        }
        false
    }
}

impl fmt::Debug for FileSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .field("fields", &self.fields)
            .finish_non_exhaustive()
    }
}

impl TokenSource for FileSource {
    fn name(&self) -> &'static str {
        "file"
    }

    fn fetch(&self) -> TokenFuture<'_> {
        Box::pin(self.fetch_now())
    }

    /// Resolves once the file's content differs from what `fetch` last read: rewritten in
    /// place, replaced by rename, or swapped behind a symlink. Touching the file without
    /// changing its content does not wake the refresher, which would otherwise take the same
    /// token for a failed refresh.
    fn changed(&self) -> ChangedFuture<'_> {
        Box::pin(async move {
            loop {
                if self.poll().await {
                    return;
                }
                tokio::time::sleep(self.poll_interval).await;
            }
        })
    }
}
