//! Admin operations on a running `RedisServer`: the cached admin connection, ACL users standing
//! in for tokens, and `CLIENT LIST`. Process lifecycle stays in `server.rs`.

use std::collections::HashMap;
use std::time::Duration;

use super::{RedisServer, ADMIN_USER};
use crate::devenv::{DevError, Reply, RespConn};

/// Bound on one admin command round trip, reconnection included, so a wedged server fails a
/// test instead of hanging it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

impl RedisServer {
    /// Runs one command as the admin user over the cached admin connection (reconnecting once
    /// if it has broken) and returns the reply, error replies included.
    pub async fn command(&self, args: &[&[u8]]) -> Result<Reply, DevError> {
        if self.child.is_none() {
            return Err(DevError::NotRunning);
        }
        let mut cached = self.admin.lock().await;
        let outcome = tokio::time::timeout(COMMAND_TIMEOUT, async {
            for retry in [true, false] {
                let conn = match cached.take() {
                    Some(conn) => conn,
                    None => self.admin_connect().await?,
                };
                let conn = cached.insert(conn);
                match conn.command(args).await {
                    Ok(reply) => return Ok(reply),
                    // A stale connection (server restarted, idle close) gets one fresh try.
                    Err(DevError::Io(_) | DevError::Closed) if retry => *cached = None,
                    Err(e) => {
                        *cached = None;
                        return Err(e);
                    }
                }
            }
            Err(DevError::Closed)
        })
        .await;
        outcome.unwrap_or_else(|_| {
            // The stream may hold half a reply; never reuse it.
            *cached = None;
            Err(DevError::Timeout("admin command"))
        })
    }

    /// `ACL SETUSER <name> on >password ~* &* +@all`, remembered so `restart` re-creates it.
    pub async fn acl_setuser(&self, name: &str, password: &str) -> Result<(), DevError> {
        self.setuser(name, password).await?;
        lock(&self.users).push((name.to_owned(), password.to_owned()));
        Ok(())
    }

    pub(super) async fn setuser(&self, name: &str, password: &str) -> Result<(), DevError> {
        let pass = format!(">{password}");
        let args: [&[u8]; 8] = [
            b"ACL",
            b"SETUSER",
            name.as_bytes(),
            b"on",
            pass.as_bytes(),
            b"~*",
            b"&*",
            b"+@all",
        ];
        // Redis may quote a rejected argument in its error; never let it carry the password.
        expect_ok(self.command(&args).await?).map_err(|e| redact(e, &[password]))
    }

    /// `ACL DELUSER <name>`: Redis disconnects every connection authenticated as that user,
    /// which is how the tests emulate a token expiring on Azure Managed Redis.
    pub async fn acl_deluser(&self, name: &str) -> Result<(), DevError> {
        match self.command(&[b"ACL", b"DELUSER", name.as_bytes()]).await? {
            Reply::Integer(_) => {}
            Reply::Error(e) => return Err(DevError::Reply(e)),
            other => return Err(DevError::Protocol(format!("ACL DELUSER replied {other:?}"))),
        }
        lock(&self.users).retain(|(user, _)| user != name);
        Ok(())
    }

    /// `CLIENT LIST` parsed into one map (field -> value) per connection.
    pub async fn client_list(&self) -> Result<Vec<HashMap<String, String>>, DevError> {
        let text = match self.command(&[b"CLIENT", b"LIST"]).await? {
            Reply::Bulk(Some(text)) => String::from_utf8_lossy(&text).into_owned(),
            Reply::Error(e) => return Err(DevError::Reply(e)),
            other => return Err(DevError::Protocol(format!("CLIENT LIST replied {other:?}"))),
        };
        Ok(text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                line.split_whitespace()
                    .filter_map(|field| field.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .collect())
    }

    pub(super) async fn admin_connect(&self) -> Result<RespConn, DevError> {
        let mut conn = self.connect().await?;
        let pw = self.admin_password.as_bytes();
        expect_simple(
            conn.command(&[b"AUTH", ADMIN_USER.as_bytes(), pw]).await?,
            "OK",
        )?;
        expect_simple(conn.command(&[b"PING"]).await?, "PONG")?;
        Ok(conn)
    }
}

pub(super) fn redact(err: DevError, secrets: &[&str]) -> DevError {
    let scrub = |text: String| {
        secrets
            .iter()
            .filter(|s| !s.is_empty())
            .fold(text, |t, s| t.replace(s, "<redacted>"))
    };
    match err {
        DevError::Reply(text) => DevError::Reply(scrub(text)),
        DevError::NotReady { reason, log_tail } => DevError::NotReady {
            reason: scrub(reason),
            log_tail: scrub(log_tail),
        },
        other => other,
    }
}

fn expect_ok(reply: Reply) -> Result<(), DevError> {
    expect_simple(reply, "OK")
}

fn expect_simple(reply: Reply, want: &str) -> Result<(), DevError> {
    match reply {
        Reply::Simple(s) if s == want => Ok(()),
        Reply::Error(e) => Err(DevError::Reply(e)),
        other => Err(DevError::Protocol(format!(
            "expected +{want}, got {other:?}"
        ))),
    }
}

/// The users list stays consistent even if a holder panicked, so poisoning is ignored.
pub(super) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
