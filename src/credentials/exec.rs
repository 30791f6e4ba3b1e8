//! The `exec` source: runs a command (through `/bin/sh -c`) that prints a token document on
//! stdout, in the shape and with the field paths of the `file` source, whose parser
//! ([`parse_token_json`]) it shares. Useful for tools that print tokens (a vault CLI, a
//! company helper) without writing them to disk.
//!
//! This module owns running the command: its timeout, exit status and output limits. Stdout
//! holds the token and never appears in an error or a log; stderr, which tools use for
//! diagnostics, is quoted in errors (its first [`STDERR_EXCERPT_BYTES`] bytes; the refresher
//! redacts what looks like a credential). It does not own retrying: the refresher retries
//! failed fetches with backoff. The command runs as [`child`] says: in a process group of its
//! own, ended whole when abandoned, without the proxy's secrets in its environment.

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use zeroize::Zeroizing;

use super::child;
use super::file::{in_context, parse_token_json, FieldPaths, MAX_TOKEN_JSON_BYTES};
use super::{CredentialError, Token, TokenFuture, TokenSource};

/// Default time a token command may run before it is killed. Token helpers that call an
/// identity endpoint answer in a second or two when healthy, but CLIs such as `az` take
/// several seconds to start; 25 s stays under the refresher's own per-attempt limit
/// (`refresh::ATTEMPT_TIMEOUT`, 30 s), so this clearer error is the one logged (and the
/// command killed, with whatever it started).
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(25);

/// How much of a failed command's stderr is quoted in the error: enough for the usual one-line
/// diagnostic, short enough for a log line.
pub const STDERR_EXCERPT_BYTES: usize = 200;

/// Runs a command that prints a token document.
#[derive(Debug)]
pub struct ExecSource {
    /// Shell text run with `/bin/sh -c`.
    command: String,
    fields: FieldPaths,
    timeout: Duration,
}

impl ExecSource {
    pub fn new(command: String, fields: FieldPaths, timeout: Duration) -> ExecSource {
        ExecSource {
            command,
            fields,
            timeout,
        }
    }

    async fn run(&self) -> Result<Token, CredentialError> {
        let fail = |msg: String| CredentialError::Source(msg);
        // Dropping the fetch future (refresher timeout, shutdown) must not leave the command,
        // or anything it started, running: `group` kills them all unless it finished.
        let (mut child, group) = child::spawn(
            child::command("/bin/sh")
                .arg("-c")
                .arg(&self.command)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .map_err(|e| {
            fail(format!(
                "could not start the token command with /bin/sh: {e}"
            ))
        })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(fail(
                "the token command's output pipes were not set up".to_owned(),
            ));
        };

        // Stdout is wiped on drop; it is reserved up front so that growth does not leave
        // unwiped copies behind for output of ordinary size.
        let mut out = Zeroizing::new(Vec::with_capacity(16 * 1024));
        let mut err = Vec::with_capacity(STDERR_EXCERPT_BYTES);
        // Both pipes are drained to the end while waiting, so that a command writing more
        // than a pipe buffer never blocks; only the first bytes of each are kept.
        let outcome = tokio::time::timeout(self.timeout, async {
            tokio::join!(
                drain(stdout, &mut out, MAX_TOKEN_JSON_BYTES),
                drain(stderr, &mut err, STDERR_EXCERPT_BYTES),
                child.wait(),
            )
        })
        .await;
        let (out_read, err_read, status) = match outcome {
            Ok(done) => done,
            Err(_) => {
                // Killed with its group when `group` drops; reaped in the background.
                return Err(fail(format!(
                    "the token command timed out after {:?} and was killed",
                    self.timeout
                )));
            }
        };
        group.finished();
        let status =
            status.map_err(|e| fail(format!("waiting for the token command failed: {e}")))?;
        if !status.success() {
            let excerpt = match err_read {
                Ok(truncated) => StderrExcerpt {
                    bytes: &err,
                    truncated,
                }
                .to_string(),
                Err(_) => String::new(),
            };
            let sep = if excerpt.is_empty() { "" } else { "; stderr: " };
            return Err(fail(format!(
                "the token command exited with {status}{sep}{excerpt}"
            )));
        }
        match out_read {
            Err(e) => Err(fail(format!(
                "reading the token command's output failed: {e}"
            ))),
            Ok(true) => Err(fail(format!(
                "the token command printed more than {MAX_TOKEN_JSON_BYTES} bytes"
            ))),
            Ok(false) => parse_token_json(&out, &self.fields)
                .map_err(|e| in_context(e, &"the token command's output")),
        }
    }
}

/// Reads `r` to its end, keeping at most `cap` bytes in `keep`; true if any were dropped.
async fn drain(
    mut r: impl AsyncRead + Unpin,
    keep: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<bool> {
    // The read buffer holds token bytes too; wiped on drop.
    let mut chunk = Zeroizing::new([0u8; 8192]);
    let mut truncated = false;
    loop {
        let n = r.read(&mut chunk[..]).await?;
        if n == 0 {
            return Ok(truncated);
        }
        let room = cap.saturating_sub(keep.len());
        let kept = chunk.get(..n.min(room)).unwrap_or_default();
        keep.extend_from_slice(kept);
        truncated |= kept.len() < n;
    }
}

/// A stderr excerpt fit for one log line: lossy UTF-8, trimmed, control characters (newlines
/// included) shown as spaces, `…` when cut short.
struct StderrExcerpt<'a> {
    bytes: &'a [u8],
    truncated: bool,
}

impl fmt::Display for StderrExcerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = String::from_utf8_lossy(self.bytes);
        for c in text.trim().chars() {
            let c = if c.is_control() { ' ' } else { c };
            write!(f, "{c}")?;
        }
        if self.truncated {
            f.write_str("…")?;
        }
        Ok(())
    }
}

impl TokenSource for ExecSource {
    fn name(&self) -> &'static str {
        "exec"
    }

    fn fetch(&self) -> TokenFuture<'_> {
        Box::pin(self.run())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    use super::*;

    /// Every command in these tests prints this token; no error may contain any of it.
    const TOKEN: &str = "s3cr3t-T0KEN-xyzzy";
    /// Bounds every fetch, well past the command timeouts used here.
    const WAIT: Duration = Duration::from_secs(10);

    fn exec(command: &str, timeout: Duration) -> ExecSource {
        ExecSource::new(command.to_owned(), FieldPaths::default(), timeout)
    }

    async fn fetch(src: &ExecSource) -> Result<Token, CredentialError> {
        tokio::time::timeout(WAIT, src.fetch())
            .await
            .expect("fetch finished in time")
    }

    fn assert_no_token(msg: &str, case: &str) {
        assert!(
            !msg.contains(TOKEN) && !msg.contains("s3cr3t") && !msg.contains("xyzzy"),
            "{case}: message leaks the token: {msg}"
        );
    }

    #[tokio::test]
    async fn prints_a_token() {
        let cmd = format!(
            r#"printf '{{"username":"oid-1","access_token":"%s","expires_on":"3000-01-01T00:00:00Z"}}' {TOKEN}"#
        );
        let t = fetch(&exec(&cmd, EXEC_TIMEOUT)).await.expect("token");
        assert_eq!(t.token.expose(), TOKEN);
        assert_eq!(t.username.as_deref(), Some("oid-1"));
        assert_eq!(
            t.expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(32_503_680_000))
        );
        assert!(t.expires_at > Some(SystemTime::now()));
    }

    #[tokio::test]
    async fn custom_fields_and_relative_expiry() {
        let cmd = format!(
            r#"printf '{{"data":{{"tok":"%s","exp":%d}}}}' {TOKEN} $(( $(date +%s) + 3600 ))"#
        );
        let fields = FieldPaths {
            access_token: "$.data.tok".to_owned(),
            expires_on: "$.data.exp".to_owned(),
            ..FieldPaths::default()
        };
        let src = ExecSource::new(cmd, fields, EXEC_TIMEOUT);
        let t = fetch(&src).await.expect("token");
        assert_eq!(t.token.expose(), TOKEN);
        assert_eq!(t.username, None);
        let left = t
            .expires_at
            .and_then(|e| e.duration_since(SystemTime::now()).ok())
            .expect("in the future");
        assert!(left > Duration::from_secs(3500), "{left:?}");
    }

    #[tokio::test]
    async fn failures_quote_stderr_but_never_stdout() {
        let cut = "e".repeat(STDERR_EXCERPT_BYTES) + "…";
        let cases = [
            (
                "non-zero exit",
                format!("echo {TOKEN}; echo 'login required' >&2; exit 3"),
                vec!["exited with exit status: 3", "stderr: login required"],
            ),
            (
                "non-zero exit after valid output",
                format!(
                    r#"printf '{{"access_token":"%s","expires_on":32503680000}}' {TOKEN}; exit 1"#
                ),
                vec!["exit status: 1"],
            ),
            (
                "killed by a signal",
                format!("echo {TOKEN}; kill -9 $$"),
                vec!["signal: 9"],
            ),
            (
                "multi-line stderr",
                "printf 'first\\nsecond\\n' >&2; exit 2".to_owned(),
                vec!["stderr: first second"],
            ),
            (
                "long stderr is cut",
                "head -c 5000 /dev/zero | tr '\\0' e >&2; exit 1".to_owned(),
                vec![cut.as_str()],
            ),
            (
                "garbage output",
                format!("echo 'here is your token: {TOKEN}'"),
                vec!["the token command's output: is not valid JSON: syntax error"],
            ),
            (
                "half a document",
                format!(r#"printf '{{"access_token":"%s' {TOKEN}"#),
                vec!["the token command's output: is not complete JSON"],
            ),
            (
                "no output",
                "true".to_owned(),
                vec!["the token command's output: is empty"],
            ),
            (
                "wrong field",
                format!(r#"printf '{{"token":"%s","expires_on":32503680000}}' {TOKEN}"#),
                vec!["`$.access_token` not found"],
            ),
            (
                "expired",
                format!(r#"printf '{{"access_token":"%s","expires_on":1000}}' {TOKEN}"#),
                vec!["`$.expires_on` is in the past"],
            ),
            (
                "no such program",
                "/nonexistent/token-helper".to_owned(),
                vec!["exit status: 127", "token-helper"],
            ),
        ];
        for (name, cmd, wants) in cases {
            let err = fetch(&exec(&cmd, EXEC_TIMEOUT)).await.expect_err(name);
            let msg = err.to_string();
            for want in wants {
                assert!(msg.contains(want), "{name}: {msg}");
            }
            assert!(
                msg.len() < 400 + STDERR_EXCERPT_BYTES,
                "{name}: {} bytes",
                msg.len()
            );
            assert_no_token(&msg, name);
        }
    }

    #[tokio::test]
    async fn a_hanging_command_times_out() {
        let cases = [
            ("silent", "sleep 5".to_owned()),
            (
                "after partial output",
                format!("printf '%s' {TOKEN}; sleep 5"),
            ),
            (
                "holding stdout in a background child",
                format!("echo {TOKEN}; sleep 5 &"),
            ),
        ];
        for (name, cmd) in cases {
            let started = Instant::now();
            let err = fetch(&exec(&cmd, Duration::from_millis(200)))
                .await
                .expect_err(name);
            let msg = err.to_string();
            assert!(msg.contains("timed out after 200ms"), "{name}: {msg}");
            assert!(started.elapsed() < Duration::from_secs(1), "{name}");
            assert_no_token(&msg, name);
        }
    }

    /// What a command that timed out started is killed with it: a helper hung in a child of
    /// the shell would otherwise live on, one more at every retry.
    #[tokio::test]
    async fn a_command_that_times_out_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let cmd = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let err = fetch(&exec(&cmd, Duration::from_millis(300)))
            .await
            .expect_err("times out");
        assert!(err.to_string().contains("timed out"), "{err}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("the command wrote its child's pid")
            .trim()
            .parse()
            .unwrap();
        // Killed at once; gone once its parent (or init) reaps it: bounded wait.
        let gone = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |stat| stat.contains(") Z "))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gone() {
            assert!(
                Instant::now() < deadline,
                "the command's child {pid} still runs"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn output_over_the_limit_is_refused() {
        let cmd = format!("head -c {} /dev/zero", MAX_TOKEN_JSON_BYTES + 1);
        let err = fetch(&exec(&cmd, EXEC_TIMEOUT))
            .await
            .expect_err("too much");
        assert!(err.to_string().contains("printed more than"), "{err}");
    }

    #[test]
    fn is_refreshable_and_named() {
        let src = exec("true", EXEC_TIMEOUT);
        assert_eq!(src.name(), "exec");
        assert!(src.refreshable());
    }
}
