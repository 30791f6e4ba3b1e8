//! The warm pool: upstream connections opened and authenticated before any client asks, so
//! that a new client is served at once instead of after a TCP connect, a TLS handshake and an
//! AUTH round trip (what makes applications that connect per request slow through a proxy).
//!
//! A pooled connection is handed to one client and never comes back: Azure Managed Redis has
//! no `RESET`, so nothing could prove a used connection clean. The pool refills in the
//! background. While idle in the pool a connection is re-authenticated at every token
//! rotation (in place, with the session core's own AUTH injection), checked for closure by
//! the server, and replaced after [`MAX_AGE`].
//!
//! It owns the pool's lifecycle; what is said on a connection is the session core's.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Notify;

use crate::metrics;
use crate::session::{self, Core, Shared};
use crate::upstream::Upstream;

/// How often idle pooled connections are checked.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// A pooled connection older than this is replaced (well under the idle timeouts of Azure
/// load balancers and of the cache itself).
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// A pooled connection this close to its close deadline is not handed out. (Pooled
/// connections follow every rotation at once, so this only catches a token source that
/// stopped delivering.)
const NEAR_DEADLINE: Duration = Duration::from_secs(1);
/// Longest wait between attempts to open a pooled connection after failures.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// An authenticated upstream connection with its session core, ready for a client.
pub struct Warm {
    pub upstream: Upstream,
    pub core: Core,
    born: Instant,
}

pub struct Pool {
    size: usize,
    idle: Mutex<Vec<Warm>>,
    /// Wakes the refill task when a connection was taken.
    taken: Notify,
}

impl Pool {
    pub fn new(size: usize) -> Arc<Pool> {
        Arc::new(Pool {
            size,
            idle: Mutex::new(Vec::with_capacity(size)),
            taken: Notify::new(),
        })
    }

    /// A live, authenticated connection, if one is ready.
    pub fn take(&self) -> Option<Warm> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(mut warm) = idle.pop() {
            metrics::handles().warm_idle.decrement(1.0);
            self.taken.notify_one();
            if usable(&mut warm) {
                metrics::handles().warm_handed_out.increment(1);
                return Some(warm);
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.idle.lock().map_or(0, |idle| idle.len())
    }

    fn put(&self, warm: Warm) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(warm);
            metrics::handles().warm_idle.increment(1.0);
        }
    }

    fn take_all(&self) -> Vec<Warm> {
        let all = self
            .idle
            .lock()
            .map(|mut idle| std::mem::take(&mut *idle))
            .unwrap_or_default();
        metrics::handles().warm_idle.decrement(all.len() as f64);
        all
    }
}

/// Whether a pooled connection can serve a client: authenticated with the newest token
/// held, not near its close deadline, not too old, and not closed by the server.
fn usable(warm: &mut Warm) -> bool {
    let fresh = warm.born.elapsed() < MAX_AGE
        && warm.core.current()
        && warm
            .core
            .close_deadline()
            .is_none_or(|d| d > SystemTime::now() + NEAR_DEADLINE);
    fresh && open(&mut warm.upstream)
}

/// Polls the connection once without waiting: an idle connection has nothing to read, so
/// anything but `Pending` (end of stream, an error, unexpected bytes) means it is unusable.
fn open(upstream: &mut Upstream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(
        Pin::new(upstream).poll_read(&mut cx, &mut buf),
        Poll::Pending
    )
}

/// Keeps the pool full until shutdown.
pub async fn run(pool: Arc<Pool>, shared: Arc<Shared>) {
    let mut creds = shared.credentials.clone();
    let mut backoff = Duration::from_secs(1);
    loop {
        if shared.shutdown.is_cancelled() {
            break;
        }
        let current = creds
            .borrow_and_update()
            .clone()
            .filter(|c| !c.is_expired(SystemTime::now()));
        if let Some(c) = current.filter(|_| pool.len() < pool.size) {
            match open_one(&shared, c).await {
                Ok(warm) => {
                    pool.put(warm);
                    backoff = Duration::from_secs(1);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "warm pool: cannot open an upstream connection");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shared.shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        tokio::select! {
            _ = pool.taken.notified() => {}
            changed = creds.changed() => {
                if changed.is_err() {
                    break;
                }
                reauthenticate(&pool, &shared).await;
            }
            _ = tokio::time::sleep(CHECK_EVERY) => {
                for mut warm in pool.take_all() {
                    if usable(&mut warm) {
                        pool.put(warm);
                    }
                }
            }
            _ = shared.shutdown.cancelled() => break,
        }
    }
    drop(pool.take_all());
}

/// Opens a connection and waits for its first AUTH to be accepted.
async fn open_one(
    shared: &Shared,
    creds: Arc<crate::credentials::Credentials>,
) -> Result<Warm, String> {
    let mut upstream = session::connect(&shared.connector).await.map_err(|e| {
        shared.health.upstream_failed();
        e.to_string()
    })?;
    let mut core = Core::new(creds, shared.local_password.clone());
    settle(&mut upstream, &mut core, shared).await?;
    Ok(Warm {
        upstream,
        core,
        born: Instant::now(),
    })
}

/// New credentials: every pooled connection re-authenticates in place; one that cannot is
/// dropped (the refill replaces it).
async fn reauthenticate(pool: &Pool, shared: &Shared) {
    let Some(creds) = shared.credentials.borrow().clone() else {
        return;
    };
    for mut warm in pool.take_all() {
        warm.core.set_credentials(creds.clone());
        match settle(&mut warm.upstream, &mut warm.core, shared).await {
            Ok(()) if usable(&mut warm) => pool.put(warm),
            Ok(()) => {}
            Err(e) => tracing::debug!(error = %e, "warm pool: dropped a connection"),
        }
    }
}

/// Writes what the core queued (AUTH) and reads every reply; fails unless the connection
/// ends up authenticated with the newest credentials.
async fn settle(upstream: &mut Upstream, core: &mut Core, shared: &Shared) -> Result<(), String> {
    session::exchange(upstream, core, shared).await?;
    if core.current() {
        Ok(())
    } else {
        Err("upstream refused AUTH".to_owned())
    }
}
