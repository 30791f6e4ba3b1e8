//! systemd's service notifications, for a unit of `Type=notify` (see
//! `config/redis-entra-proxy.service`): the proxy tells the service manager when it has
//! started (its first token arrived: what `/startupz` says), what it is doing (`STATUS=`, the
//! line `systemctl status` shows: serving, or why tokens fail), when it is stopping
//! (`STOPPING=1`), and keeps the watchdog fed when the unit sets `WatchdogSec=`.
//!
//! When stderr goes to the journal ([`stderr_is_journal`]), text log lines carry their
//! level as a syslog priority (`<3>` for an error…) and no timestamp of their own: the journal
//! keeps both, and `journalctl -p warning` then filters on the level.
//!
//! The protocol (`sd_notify(3)`): one datagram per notification, newline-separated
//! `KEY=VALUE` assignments, sent to the unix socket that `NOTIFY_SOCKET` names (a path, or an
//! abstract name after `@`). Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Longest `STATUS=` text sent ([`status`]).
const MAX_STATUS: usize = 200;

/// Sends `assignments` (`KEY=VALUE` lines) to the service manager, if there is one. Never
/// blocks: a notification the manager's queue has no room for is dropped.
pub fn send(assignments: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_to(&path, assignments) {
        tracing::debug!(error = %e, "cannot notify the service manager");
    }
}

/// `STATUS=` with `text` on one line, at most 200 bytes (one line of `systemctl status`).
pub fn status(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > MAX_STATUS {
        let mut end = MAX_STATUS - '…'.len_utf8();
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    format!("STATUS={line}")
}

/// `t`'s time of day, `HH:MM:SS UTC` (tokens live an hour or so: the day goes without saying).
pub fn clock(t: std::time::SystemTime) -> String {
    let s = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02} UTC", s / 3600 % 24, s / 60 % 60, s % 60)
}

fn send_to(path: &OsStr, assignments: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    match path.as_bytes() {
        [b'@', name @ ..] => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(assignments.as_bytes(), &addr)?;
        }
        [b'/', ..] => {
            socket.send_to(assignments.as_bytes(), path)?;
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither an absolute path nor an abstract name",
            ))
        }
    }
    Ok(())
}

/// How often to feed the watchdog, if the service manager set one for this process
/// (`WATCHDOG_USEC`, and `WATCHDOG_PID` naming this process when set): half its timeout, as
/// `sd_watchdog_enabled(3)` advises.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog(usec: Option<&str>, pid: Option<&str>, own: u32) -> Option<Duration> {
    if pid.is_some_and(|pid| pid.parse::<u32>().ok() != Some(own)) {
        return None;
    }
    let usec: u64 = usec?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec) / 2)
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM` to its
/// `device:inode` for a service whose output goes to the journal, and stderr is still that
/// stream (not redirected by a wrapper).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(stderr)
        .metadata()
        .is_ok_and(|m| stream.to_str() == Some(&format!("{}:{}", m.dev(), m.ino())))
}

/// The syslog priority of a log level, as `sd-daemon(3)`'s `<N>` line prefixes give it.
pub fn priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let at_path = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), "READY=1\nSTATUS=serving").unwrap();
        assert_eq!(received(&at_path), "READY=1\nSTATUS=serving");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("redis-entra-proxy-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_socket = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        assert_eq!(received(&abstract_socket), "STOPPING=1");
    }

    #[test]
    fn a_relative_path_is_refused_and_a_missing_socket_is_an_error_not_a_hang() {
        assert!(send_to(OsStr::new("notify"), "READY=1").is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(send_to(dir.path().join("none").as_os_str(), "READY=1").is_err());
    }

    #[test]
    fn clock_is_the_utc_time_of_day() {
        let t =
            std::time::UNIX_EPOCH + Duration::from_secs(86_400 * 20_000 + 13 * 3600 + 5 * 60 + 9);
        assert_eq!(clock(t), "13:05:09 UTC");
    }

    #[test]
    fn status_is_one_line_and_cut() {
        assert_eq!(status("a\nb\tc"), "STATUS=a b c");
        let long = status(&"é".repeat(300));
        assert!(long.len() <= "STATUS=".len() + MAX_STATUS, "{}", long.len());
        assert!(long.ends_with('…'));
    }

    #[test]
    fn the_watchdog_is_fed_at_half_its_timeout_and_only_by_the_process_it_names() {
        assert_eq!(
            watchdog(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog(Some("0"), None, 7), None);
        assert_eq!(watchdog(Some("soon"), None, 7), None);
        assert_eq!(watchdog(None, None, 7), None);
    }
}
