//! The admin HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` (the process
//! works), `/readyz` (a valid token and an upstream that answered recently; the body says why
//! not), `/startupz` (the first token has arrived).
//!
//! A deliberately small HTTP/1.1 server: GET only, one request per connection, bounded
//! request size, time and number of connections. It serves probes and scrapers, not
//! browsers, and keeps the proxy free of an HTTP server framework.
//!
//! It keeps serving while the proxy drains on shutdown (`/readyz` then says so), so that
//! liveness probes pass and the last metrics can be read until the process exits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::credentials::refresh::CredentialsRx;
use crate::metrics;
use crate::upstream::Connector;

/// The upstream counts as reachable if it answered within this window; otherwise `/readyz`
/// probes it (connect, AUTH, PING) before answering. Short, so that a server gone while no
/// connection was open to notice is seen within a probe or two; a probe costs the server one
/// short connection, at most every this often (kubelet probes every 10 s by default).
pub const UPSTREAM_FRESH: Duration = Duration::from_secs(15);
/// Bound on a readiness probe of the upstream: shorter than Kubernetes' default probe
/// timeout would allow for two attempts.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request accepted, and how long a client may take to send it.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once. Probes and scrapers need a handful, and the descriptors
/// come from the reserve beside the clients' (`open_files`). When all are taken, a new
/// connection takes the slot of the oldest one that has not sent its request yet, or is
/// closed if every one has; the accept loop waits at most [`EVICTION_WAIT`] for that slot.
const MAX_CONNECTIONS: usize = 32;
const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// How long a readiness probe's result answers `/readyz` before the upstream is asked
/// again: many probes at once, or in a tight loop, cost the upstream one connection and AUTH.
const PROBE_REUSE: Duration = Duration::from_secs(2);

/// State the health endpoints read; written by sessions and the refresher.
#[derive(Debug, Default)]
pub struct Health {
    /// Unix milliseconds of the last successful upstream exchange (AUTH answered), and the
    /// token generation it authenticated with: only the current generation counts, so a
    /// token the server refuses is not hidden by connections still on the previous one.
    last_upstream_ok_ms: AtomicU64,
    last_upstream_ok_generation: AtomicU64,
    /// Unix milliseconds of the last failed connect, refused AUTH or broken connection: after
    /// it, the last success no longer vouches for the upstream, and `/readyz` asks it again.
    last_upstream_failure_ms: AtomicU64,
    /// Why the last token fetch failed; cleared by a success.
    refresh_error: Mutex<Option<String>>,
}

impl Health {
    /// The upstream accepted an AUTH with credentials of `generation`.
    pub fn upstream_ok(&self, generation: u64) {
        self.last_upstream_ok_generation
            .store(generation, Ordering::Relaxed);
        self.last_upstream_ok_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// A connect to the upstream failed, it refused an AUTH, or a connection to it broke.
    pub fn upstream_failed(&self) {
        self.last_upstream_failure_ms
            .store(now_ms(), Ordering::Relaxed);
    }

    /// The upstream recently accepted credentials of `generation`, and nothing failed since.
    fn upstream_fresh(&self, generation: u64) -> bool {
        if self.last_upstream_ok_generation.load(Ordering::Relaxed) != generation {
            return false;
        }
        let last = self.last_upstream_ok_ms.load(Ordering::Relaxed);
        let failed = self.last_upstream_failure_ms.load(Ordering::Relaxed);
        last != 0
            && failed < last
            && now_ms().saturating_sub(last) <= UPSTREAM_FRESH.as_millis() as u64
    }

    pub fn set_refresh_error(&self, error: Option<String>) {
        if let Ok(mut e) = self.refresh_error.lock() {
            *e = error;
        }
    }

    pub(crate) fn refresh_error(&self) -> Option<String> {
        self.refresh_error.lock().ok().and_then(|e| e.clone())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

pub struct Admin {
    pub handle: PrometheusHandle,
    pub health: Arc<Health>,
    pub credentials: CredentialsRx,
    pub connector: Connector,
    /// Cancelled when the proxy starts draining.
    pub draining: CancellationToken,
    /// The last readiness probe of the upstream: when, and what it found. Held while a probe
    /// runs, so that concurrent requests wait for its answer instead of probing too.
    probed: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
    /// What `/readyz` answered last (ready or not), to log its changes.
    was_ready: Mutex<Option<bool>>,
}

impl Admin {
    pub fn new(
        handle: PrometheusHandle,
        health: Arc<Health>,
        credentials: CredentialsRx,
        connector: Connector,
        draining: CancellationToken,
    ) -> Admin {
        Admin {
            handle,
            health,
            credentials,
            connector,
            draining,
            probed: tokio::sync::Mutex::new(None),
            was_ready: Mutex::new(None),
        }
    }
}

/// Serves until `stop`.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let waiting = Arc::new(Waiting::default());
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            // Every slot is taken: the oldest connection that has not sent its request yet
            // gives up its own, so that sockets that send nothing cannot keep probes out.
            Err(_) if waiting.evict_oldest() => {
                match tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned()).await {
                    Ok(Ok(slot)) => slot,
                    _ => continue,
                }
            }
            Err(_) => {
                tracing::debug!("admin connection closed: {MAX_CONNECTIONS} requests in progress");
                continue;
            }
        };
        let admin = admin.clone();
        let waiting = waiting.clone();
        // Listed before its task runs, so that the next accept can already evict it.
        let (id, evicted) = waiting.add();
        tokio::spawn(async move {
            tokio::select! {
                r = tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, &admin, || waiting.remove(id))) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "admin request timed out");
                    }
                }
                _ = evicted.cancelled() => {
                    tracing::debug!("admin connection closed: no request yet, and its slot was needed");
                }
            }
            waiting.remove(id);
            drop(slot);
        });
    }
}

/// The admin connections that have not sent a whole request yet, oldest first.
#[derive(Default)]
struct Waiting {
    list: Mutex<std::collections::VecDeque<(u64, CancellationToken)>>,
    next: AtomicU64,
}

impl Waiting {
    /// Registers a new connection: its id, and the token cancelled if it is evicted.
    fn add(&self) -> (u64, CancellationToken) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = CancellationToken::new();
        self.lock().push_back((id, evicted.clone()));
        (id, evicted)
    }

    /// The connection sent its request (or ended): it can no longer be evicted.
    fn remove(&self, id: u64) {
        self.lock().retain(|(other, _)| *other != id);
    }

    /// Evicts the oldest connection still waiting for its request; false if there is none.
    fn evict_oldest(&self) -> bool {
        let oldest = self.lock().pop_front();
        oldest.map(|(_, evicted)| evicted.cancel()).is_some()
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(u64, CancellationToken)>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads one request and answers it; `got_request` is called once the request is whole.
async fn handle(mut stream: TcpStream, admin: &Admin, got_request: impl FnOnce()) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > MAX_REQUEST {
            return respond(&mut stream, 431, "text/plain", "request too large\n").await;
        }
    }
    got_request();
    let line =
        String::from_utf8_lossy(buf.split(|&b| b == b'\r').next().unwrap_or_default()).into_owned();
    let mut parts = line.split(' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = path.split('?').next().unwrap_or_default();
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    let (status, kind, body) = match path {
        "/metrics" => (200, "text/plain; version=0.0.4", render_metrics(admin)),
        "/healthz" => (200, "text/plain", "ok\n".to_owned()),
        "/startupz" => match admin.credentials.borrow().as_ref() {
            Some(_) => (200, "text/plain", "started\n".to_owned()),
            None => (
                503,
                "text/plain",
                format!("waiting for the first token{}\n", why(admin)),
            ),
        },
        "/readyz" => match readiness(admin).await {
            Ok(()) => (200, "text/plain", "ready\n".to_owned()),
            Err(reason) => (503, "text/plain", format!("not ready: {reason}\n")),
        },
        _ => (
            404,
            "text/plain",
            "not found; try /metrics /healthz /readyz /startupz\n".to_owned(),
        ),
    };
    respond(&mut stream, status, kind, &body).await
}

fn why(admin: &Admin) -> String {
    admin
        .health
        .refresh_error()
        .map(|e| format!(": last token fetch failed: {e}"))
        .unwrap_or_default()
}

fn render_metrics(admin: &Admin) -> String {
    if let Some(c) = admin.credentials.borrow().as_ref() {
        let left = match c.expires_at {
            Some(t) => match t.duration_since(SystemTime::now()) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            },
            None => f64::INFINITY,
        };
        ::metrics::gauge!(metrics::TOKEN_EXPIRES_IN_SECONDS).set(left);
        ::metrics::gauge!(metrics::TOKEN_GENERATION).set(c.generation as f64);
    } else {
        // No token yet: nothing left, so that an alert on a short time left fires.
        ::metrics::gauge!(metrics::TOKEN_EXPIRES_IN_SECONDS).set(0.0);
    }
    admin.handle.run_upkeep();
    let mut text = admin.handle.render();
    text.push_str(&metrics::render_process());
    text
}

/// Ready when the proxy is not shutting down, a valid token is held and the upstream accepts
/// it. A change of answer is logged, once: a probe's failure alone shows only in the
/// kubelet's events, without the reason.
async fn readiness(admin: &Admin) -> Result<(), String> {
    let result = check_readiness(admin).await;
    let ready = result.is_ok();
    let was = admin
        .was_ready
        .lock()
        .map(|mut was| was.replace(ready))
        .unwrap_or(None);
    if was != Some(ready) {
        match &result {
            Ok(()) => tracing::info!("ready"),
            Err(reason) => tracing::warn!("not ready: {reason}"),
        }
    }
    result
}

async fn check_readiness(admin: &Admin) -> Result<(), String> {
    if admin.draining.is_cancelled() {
        return Err("shutting down: draining the connections".into());
    }
    let creds = admin.credentials.borrow().clone();
    let creds = match creds {
        None => return Err(format!("no token yet{}", why(admin))),
        Some(c) if c.is_expired(SystemTime::now()) => {
            return Err(format!("the token expired{}", why(admin)))
        }
        Some(c) => c,
    };
    if admin.health.upstream_fresh(creds.generation) {
        return Ok(());
    }
    let mut probed = admin.probed.lock().await;
    if let Some((at, result)) = &*probed {
        if at.elapsed() < PROBE_REUSE {
            return result.clone();
        }
    }
    let result = match tokio::time::timeout(PROBE_TIMEOUT, probe(admin, &creds)).await {
        Ok(Ok(())) => {
            admin.health.upstream_ok(creds.generation);
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "upstream {} did not answer within {PROBE_TIMEOUT:?}",
            admin.connector.addr()
        )),
    };
    *probed = Some((Instant::now(), result.clone()));
    result
}

/// Connects, authenticates and PINGs once.
async fn probe(admin: &Admin, creds: &crate::credentials::Credentials) -> Result<(), String> {
    let mut up = admin.connector.connect().await.map_err(|e| e.to_string())?;
    let mut req = bytes::BytesMut::new();
    creds.write_auth(&mut req);
    req.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
    up.write_all(&req)
        .await
        .map_err(|e| format!("upstream write: {e}"))?;
    up.flush()
        .await
        .map_err(|e| format!("upstream write: {e}"))?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 512];
    while !(got.ends_with(b"\r\n") && got.windows(2).filter(|w| w == b"\r\n").count() >= 2) {
        let n = up
            .read(&mut chunk)
            .await
            .map_err(|e| format!("upstream read: {e}"))?;
        if n == 0 {
            return Err("upstream closed the probe connection".into());
        }
        got.extend_from_slice(&chunk[..n]);
        if got.first() == Some(&b'-') {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got);
    let first = text.lines().next().unwrap_or_default();
    if let Some(error) = first.strip_prefix('-') {
        return Err(format!("upstream refused the token: {error}"));
    }
    Ok(())
}

async fn respond(stream: &mut TcpStream, status: u16, kind: &str, body: &str) {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}
