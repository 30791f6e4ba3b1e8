//! Moving slots between primaries with the real `redis-cli --cluster reshard`, the tool an
//! operator (or Azure, for its own scaling) would use, so a test sees the genuine sequence of
//! `CLUSTER SETSLOT IMPORTING/MIGRATING`, `MIGRATE` and `SETSLOT NODE` with its `-ASK` and
//! `-MOVED` windows.
//!
//! Checked with redis-cli 7.0.15: hiredis verifies the certificate chain against `--cacert`
//! but not the host name, so the hostname-only certificate works when redis-cli dials
//! 127.0.0.1; `--sni` is still passed so it presents the name a real client would. The admin
//! password travels in `REDISCLI_AUTH` (honoured together with `--user`), never in argv where
//! `ps` shows it; redis-cli hands it on to `MIGRATE ... AUTH2`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::RedisCluster;
use crate::devenv::DevError;

/// Where Debian's redis-tools installs it; `REDIS_CLI` overrides it.
const DEFAULT_REDIS_CLI: &str = "/usr/bin/redis-cli";
/// Bound on one reshard. Moving 100 slots with a few keys takes well under a second; a minute
/// only runs out when redis-cli is stuck (on a prompt, or a node that stopped answering).
const RESHARD_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of redis-cli's output quoted in an error: its last lines say what failed.
const OUTPUT_TAIL_LINES: usize = 40;

impl RedisCluster {
    /// Moves `slots` slots from primary `from` to primary `to` with
    /// `redis-cli --cluster reshard ... --cluster-yes` (keys included), then waits until every
    /// node agrees on the new slot map. redis-cli picks which of `from`'s slots move (with
    /// 7.0, its lowest-numbered ones); compare `slot_owners` before and after to see which.
    pub async fn reshard(&self, from: usize, to: usize, slots: usize) -> Result<(), DevError> {
        let (from_node, from_id) = (self.node(from)?, self.node_id(from)?);
        let to_id = self.node_id(to)?;
        if from == to || slots == 0 || slots > usize::from(super::CLUSTER_SLOTS) {
            // redis-cli would prompt (slots 0) or refuse; say why here instead.
            return Err(DevError::Cluster(format!(
                "cannot reshard {slots} slots from node {from} to node {to}"
            )));
        }
        let program = std::env::var_os("REDIS_CLI")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_REDIS_CLI));
        let ca = self.ca_file().display().to_string();
        let entry = from_node.addr().to_string();
        let slots = slots.to_string();
        let mut cmd = Command::new(&program);
        cmd.args(["--cluster", "reshard", &entry])
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
            .args(["--cluster-slots", &slots, "--cluster-yes"])
            .args(["--tls", "--cacert", &ca, "--sni", self.server_name()])
            .args(["--user", super::ADMIN_USER])
            .env("REDISCLI_AUTH", self.admin_password())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| {
            DevError::Cluster(format!(
                "cannot run {}: {e} (install it with `apt-get install -y redis-tools`)",
                program.display()
            ))
        })?;
        // On timeout the future, and with it the child (kill_on_drop), is dropped.
        let output = tokio::time::timeout(RESHARD_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| DevError::Timeout("redis-cli --cluster reshard"))??;
        // redis-cli 7.0 exits 0 after some failures it reports in its output, so both count.
        let text = self.scrub(&output.stdout, &output.stderr);
        if !output.status.success() || text.contains("[ERR]") {
            return Err(DevError::Cluster(format!(
                "redis-cli --cluster reshard failed ({}):\n{}",
                output.status,
                tail(&text)
            )));
        }
        self.wait_settled("after reshard").await
    }

    /// redis-cli's stdout and stderr as text, colour codes stripped and the admin password
    /// redacted (redis-cli does not print it, but an error could quote a command).
    fn scrub(&self, stdout: &[u8], stderr: &[u8]) -> String {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(stdout),
            String::from_utf8_lossy(stderr)
        );
        strip_ansi(&text).replace(self.admin_password(), "<redacted>")
    }
}

/// The last `OUTPUT_TAIL_LINES` lines of `text`.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(OUTPUT_TAIL_LINES)..].join("\n")
}

/// Removes the `ESC [ ... letter` sequences redis-cli colours its cluster output with.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // Skip `[`, parameters, and the final letter; a lone ESC is dropped.
        for c in chars.by_ref() {
            if c.is_ascii_alphabetic() {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_codes_are_stripped_and_tail_keeps_the_end() {
        let text = "\u{1b}[29;1m>>> Performing Cluster Check\n\u{1b}[0m[OK] done\n";
        assert_eq!(
            strip_ansi(text),
            ">>> Performing Cluster Check\n[OK] done\n"
        );
        let many: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let kept = tail(&many);
        assert!(
            kept.starts_with("line 60\n") && kept.ends_with("line 99"),
            "{kept}"
        );
    }
}
