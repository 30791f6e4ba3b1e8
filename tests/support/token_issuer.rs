//! Tokens for fault tests that drive a token source by hand (a mock identity endpoint, a token
//! file), and a client that watches one long-lived connection through rotations.
//!
//! [`Issuer`] plays Azure's side of a token: [`Issuer::grant`] mints a JWT-shaped token for an
//! object id, registers it with the stand-in server as ACL user `<oid>` with the token as
//! password, and deletes that user when the token expires, which makes Redis close every
//! connection still authenticated with it, as Azure Managed Redis does. [`Pinger`] holds one
//! client connection and asks `ACL WHOAMI` (answered by Redis for the upstream connection: the
//! generation it is authenticated with) and `INCR` every few milliseconds, recording whom the
//! connection was authenticated as and how it ended.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis_entra_proxy::devenv::{mint_token, DevError, RedisServer, Reply, RespConn};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::mock_identity::Answer;

/// One token and its expiry (whole unix seconds, as identity endpoints give it).
#[derive(Debug, Clone)]
pub struct Tok {
    pub oid: String,
    pub token: String,
    pub exp: u64,
}

impl Tok {
    /// A token for `oid` expiring `lifetime` from now (rounded down to a whole second).
    pub fn mint(oid: &str, lifetime: Duration) -> Tok {
        let exp = unix_now() + lifetime.as_secs();
        Tok::expiring_at(oid, exp)
    }

    pub fn expiring_at(oid: &str, exp: u64) -> Tok {
        Tok {
            oid: oid.to_owned(),
            token: mint_token(oid, exp),
            exp,
        }
    }

    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.exp)
    }

    /// The managed-identity endpoint's answer carrying this token.
    pub fn answer(&self) -> Answer {
        Answer::Token {
            token: self.token.clone(),
            expires_on: self.exp,
        }
    }

    /// The document of the `file` source: token and expiry, the username from the `oid`.
    pub fn file_json(&self) -> String {
        serde_json::json!({"access_token": self.token, "expires_on": self.exp}).to_string()
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Azure's side of tokens on the stand-in server. Dropping it cancels pending deletions.
pub struct Issuer {
    redis: Arc<RedisServer>,
    /// Cancelled on drop: ends the tasks that delete users at expiry.
    done: CancellationToken,
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

impl Issuer {
    pub fn new(redis: Arc<RedisServer>) -> Issuer {
        Issuer {
            redis,
            done: CancellationToken::new(),
        }
    }

    /// A token Redis accepts until it expires, when its user is deleted.
    pub async fn grant(&self, oid: &str, lifetime: Duration) -> Tok {
        let tok = Tok::mint(oid, lifetime);
        self.redis
            .acl_setuser(oid, &tok.token)
            .await
            .expect("ACL SETUSER");
        let (redis, done, name) = (self.redis.clone(), self.done.clone(), oid.to_owned());
        let left = tok
            .expires_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(left) => {
                    let _ = redis.acl_deluser(&name).await;
                }
                _ = done.cancelled() => {}
            }
        });
        tok
    }

    /// Registers `tok` as its `oid`'s password without deleting it at expiry: for tokens that
    /// must never be applied, so that applying one would show in `ACL WHOAMI`.
    pub async fn register_forever(&self, tok: &Tok) {
        self.redis
            .acl_setuser(&tok.oid, &tok.token)
            .await
            .expect("ACL SETUSER");
    }
}

/// How a [`Pinger`]'s connection ended, if it did.
#[derive(Debug, Clone)]
pub enum PingEnd {
    /// Closed between replies, at this time.
    Closed(SystemTime),
    /// Reset (RST) between replies, at this time.
    Reset(SystemTime),
    /// An error reply, a broken reply, or no reply in time.
    Failed(String),
}

#[derive(Debug, Clone, Default)]
pub struct PingState {
    /// Rounds (`ACL WHOAMI` + `INCR`) answered.
    pub rounds: u64,
    /// Users the upstream connection was authenticated as, in order, without repeats.
    pub users: Vec<String>,
    pub end: Option<PingEnd>,
}

/// One long-lived client connection, exercised every [`Pinger::PERIOD`].
pub struct Pinger {
    state: Arc<Mutex<PingState>>,
    /// Cancelled to stop the loop.
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Pinger {
    const PERIOD: Duration = Duration::from_millis(50);
    /// A reply slower than this counts as a failure: the proxy answers in milliseconds.
    const REPLY_BOUND: Duration = Duration::from_secs(5);

    /// Connects and completes a first round before returning.
    pub async fn start(addr: SocketAddr) -> Pinger {
        Self::start_keyed(addr, "pinger").await
    }

    /// Like [`Pinger::start`], counting in `key` (in a cluster: a key the node owns).
    pub async fn start_keyed(addr: SocketAddr, key: &str) -> Pinger {
        let key = key.to_owned();
        let mut conn = RespConn::connect_plain(addr)
            .await
            .expect("connect to the proxy");
        let state = Arc::new(Mutex::new(PingState::default()));
        if let Err(end) = round(&mut conn, &state, &key).await {
            panic!("the first round through the proxy failed: {end:?}");
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (state, stop) = (state.clone(), stop.clone());
            async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Self::PERIOD) => {}
                        _ = stop.cancelled() => return,
                    }
                    if let Err(end) = round(&mut conn, &state, &key).await {
                        lock(&state).end = Some(end);
                        return;
                    }
                }
            }
        });
        Pinger { state, stop, task }
    }

    pub fn state(&self) -> PingState {
        lock(&self.state).clone()
    }

    /// The user the connection is authenticated as now; panics if the connection ended.
    pub fn user(&self) -> String {
        let s = self.state();
        assert!(s.end.is_none(), "the long-lived connection ended: {s:?}");
        s.users.last().cloned().unwrap_or_default()
    }

    /// Waits until the connection is authenticated as `user` (bounded by `within`).
    pub async fn wait_user(&self, user: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.user() != user {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the long-lived connection was not re-authenticated as {user} within \
                 {within:?}: {:?}",
                self.state()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the connection ends (bounded by `within`).
    pub async fn wait_end(&self, within: Duration) -> (PingEnd, PingState) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let s = self.state();
            if let Some(end) = s.end.clone() {
                return (end, s);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the long-lived connection did not end within {within:?}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the loop; the connection must still be working.
    pub async fn stop(self) -> PingState {
        self.stop.cancel();
        let s = self.state();
        assert!(s.end.is_none(), "the long-lived connection ended: {s:?}");
        s
    }
}

fn lock(state: &Mutex<PingState>) -> std::sync::MutexGuard<'_, PingState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// `ACL WHOAMI` and `INCR pinger`; the counter must go up by exactly one per round, or a
/// command was lost or replayed.
async fn round(conn: &mut RespConn, state: &Mutex<PingState>, key: &str) -> Result<(), PingEnd> {
    let who = ask(conn, &[b"ACL", b"WHOAMI"]).await?;
    let Reply::Bulk(Some(user)) = who else {
        return Err(PingEnd::Failed(format!("ACL WHOAMI answered {who:?}")));
    };
    let user = String::from_utf8_lossy(&user).into_owned();
    let n = ask(conn, &[b"INCR", key.as_bytes()]).await?;
    let mut s = lock(state);
    if n != Reply::Integer(s.rounds as i64 + 1) {
        return Err(PingEnd::Failed(format!(
            "INCR answered {n:?} after {} rounds",
            s.rounds
        )));
    }
    s.rounds += 1;
    if s.users.last() != Some(&user) {
        s.users.push(user);
    }
    Ok(())
}

async fn ask(conn: &mut RespConn, args: &[&[u8]]) -> Result<Reply, PingEnd> {
    match tokio::time::timeout(Pinger::REPLY_BOUND, conn.command(args)).await {
        Err(_) => Err(PingEnd::Failed(format!(
            "no reply within {:?}",
            Pinger::REPLY_BOUND
        ))),
        Ok(Err(DevError::Closed)) => Err(PingEnd::Closed(SystemTime::now())),
        Ok(Err(DevError::Io(e))) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            Err(PingEnd::Reset(SystemTime::now()))
        }
        Ok(Err(e)) => Err(PingEnd::Failed(e.to_string())),
        Ok(Ok(Reply::Error(e))) => Err(PingEnd::Failed(format!("error reply: {e}"))),
        Ok(Ok(reply)) => Ok(reply),
    }
}
