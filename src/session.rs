//! The async driver of one client connection: connects the upstream, then moves bytes between
//! the two sockets and the sans-IO [`Core`], follows credential changes, and closes with a
//! reason that names the side that caused it. All protocol decisions live in the core.
//!
//! One task owns both sockets and polls them in one `poll_fn`, so the core needs no lock and
//! every read is followed by the writes it caused, batched into one write per socket. That
//! poll and the buffers it fills are `session/relay.rs`; this file connects, serves, and runs
//! the loop of timers around it.

mod commands;
pub mod core;
mod framing;
mod ledger;
mod no_token;
mod relay;
mod state;

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(crate) use self::commands::{valid_client_name, MAINT};
pub use self::core::{CloseReason, Core};
pub use self::framing::Framing;
use self::relay::Io;
use crate::admin::Health;
use crate::credentials::refresh::CredentialsRx;
use crate::gated::Gated;
use crate::metrics;
use crate::secret::Secret;
use crate::upstream::Connector;

/// Most bytes requested per read. Matches Redis's own read size (`PROTO_IOBUF_LEN`).
const READ_CHUNK: usize = 16 * 1024;
/// Most bytes requested per read from a shared connection's client, which carries the
/// requests of many clients: each read becomes one write to the server (a TLS record of 16 KiB
/// or more, a system call), and one shared connection per thread can afford the buffer.
const SHARED_READ_CHUNK: usize = 64 * 1024;
/// Bytes requested by a connection's first read, doubled after every read that fills its
/// room up to [`READ_CHUNK`]: a connection that only ever sends small commands never holds a
/// large buffer (memory per idle connection), a busy one reaches full-size reads at once.
const READ_CHUNK_MIN: usize = 2 * 1024;
/// A session that has read this many bytes from the upstream in one poll lets the other tasks
/// of its thread run before it goes on: a big reply streaming through one connection would
/// otherwise keep the thread for as long as both sockets keep up (up to tokio's budget of 128
/// reads and writes, 2 MiB), and every other connection of the thread would wait for it; the
/// shared session would hand out a whole batch of big replies before any of its clients could
/// write one. Measured on the `dev` setup (`benches/ab.sh`, medians of 3 or 5 interleaved
/// rounds, without → with):
/// - 50 clients GETting 16 KiB values, `--multiplex --multiplex-max-batches 1`: 26.7k → 31.8k/s;
/// - 20 clients GETting 200 KB values: 2.81k → 3.54k/s multiplexed, 3.32k → 3.39k with a
///   connection each;
/// - 20 clients GETting a small value beside 3 reading 4 MB values: 8.5k → 9.1k/s, p99 8.9 →
///   7.9 ms (multiplexed 5.2k → 5.7k, p99 14.7 → 11.0 ms), the 4 MB readers no slower;
/// - pipelined small GETs: unchanged.
///
/// Counting the bytes read from the client too cost multiplexed 16 KiB SETs 6 %: the shared
/// session reads its clients' requests 64 KiB at a time. Yielding as `yield_now` does (polled
/// again after the runtime has polled for I/O, rather than woken at once, when the others'
/// readiness is looked at only every 61 polls) served the small GETs beside the 4 MB readers
/// better again: 8.6k → 9.8k/s with a connection each (the 4 MB readers 122 → 137/s),
/// 5.8k → 7.6k/s multiplexed (174 → 152/s); the other cases the same.
const YIELD_AFTER: usize = 64 * 1024;
/// After the client half-closes, replies already owed to it are still delivered for this
/// long (what `printf 'PING\r\n' | nc` expects), then the connection closes; at once when
/// the next one owed is that of a command that may be waiting for other clients (`BLPOP`…),
/// which Redis does not keep running for a client that closed.
const HALF_CLOSE_GRACE: Duration = Duration::from_secs(5);
/// First wait before retrying a re-AUTH the server refused; doubles up to the maximum.
const REAUTH_RETRY_INITIAL: Duration = Duration::from_secs(1);
const REAUTH_RETRY_MAX: Duration = Duration::from_secs(30);
/// While draining, a connection counts as idle only after the client sent nothing for this
/// long: a pipeline written just before shutdown may still be in flight on the network.
pub(crate) const DRAIN_QUIET: Duration = Duration::from_millis(100);
/// After a drained connection's write side is shut, its input is read and dropped for at
/// most this long, so that closing with unread input does not reset the connection and
/// destroy replies the client has not read yet.
const LINGER: Duration = Duration::from_secs(1);
/// A connection with no traffic for this long gives its buffers back to the allocator, so
/// that thousands of idle pooled connections cost little memory; a busy one keeps them and
/// allocates nothing per command.
pub(crate) const IDLE_SHRINK: Duration = Duration::from_secs(2);

/// What every session shares.
pub struct Shared {
    pub connector: Connector,
    pub credentials: CredentialsRx,
    /// The same changes, handed to groups of sessions a millisecond apart, which each session
    /// follows one of: thousands of sessions do not all wake at once at each rotation.
    pub fanout: crate::credentials::fanout::Fanout,
    pub local_password: Option<Arc<Secret>>,
    /// Cancelled when the proxy shuts down: sessions stop reading and finish what is in flight.
    pub shutdown: CancellationToken,
    /// New credentials reach each session after a random delay within this window (capped
    /// to a quarter of the old token's remaining life), so that thousands of connections do
    /// not send AUTH in the same millisecond.
    pub reauth_window: Duration,
    /// Close a client that sent nothing for this long while nothing was owed to it.
    pub client_idle_timeout: Option<Duration>,
    /// Close a client that keeps one request incomplete for this long.
    pub partial_request_timeout: Option<Duration>,
    /// Where sessions report that the upstream answered (for `/readyz`).
    pub health: Arc<Health>,
}

/// Where a listener's clients are proxied to: the configured upstream, or one node of a
/// cluster (`cluster.rs`).
pub struct Target {
    pub connector: Connector,
    /// Authenticated upstream connections ready for new clients (`--warm-connections`).
    pub pool: Option<Arc<crate::pool::Pool>>,
    /// Rewrites node addresses in replies (cluster mode).
    pub rewriter: Option<crate::cluster::Rewriter>,
    /// Sessions open now (a retired node's listener closes once none is left).
    pub clients: std::sync::atomic::AtomicUsize,
    /// With `--multiplex`: the shared connections' routers, one per session thread.
    pub mux: Option<crate::mux::Routers>,
    /// Cluster mode, a node's listener: whether the proxy's own topology read lists the node.
    /// A node that only a redirection named gets no connection (and no token) until a read
    /// lists it (see `connect_node`).
    pub in_topology: Option<tokio::sync::watch::Receiver<bool>>,
}

/// How long a client sent to a node that only a redirection named waits for the topology
/// read that redirection asked for (about a second apart) to list it.
const TOPOLOGY_WAIT: Duration = Duration::from_secs(5);

/// How a session ended.
#[derive(Debug)]
pub enum Outcome {
    /// The core decided (QUIT, protocol error, upstream refused AUTH…).
    Closed(CloseReason),
    ClientClosed,
    ClientError(io::Error),
    UpstreamClosed,
    UpstreamError(io::Error),
    /// Shutdown: every reply owed was delivered.
    Drained,
    /// No valid token when the client connected.
    NoCredentials(&'static str),
    UpstreamConnect(crate::upstream::ConnectError),
}

impl Outcome {
    /// A short stable label, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Closed(r) => r.label(),
            Outcome::ClientClosed => "client_closed",
            Outcome::ClientError(_) => "client_error",
            Outcome::UpstreamClosed => "upstream_closed",
            Outcome::UpstreamError(_) => "upstream_error",
            Outcome::Drained => "drained",
            Outcome::NoCredentials(_) => "no_valid_token",
            Outcome::UpstreamConnect(_) => "upstream_connect_failed",
        }
    }

    /// The upstream connection broke under the session (closed, reset, garbage, a stalled
    /// AUTH): the server may be gone, so `/readyz` asks it again.
    pub fn upstream_broke(&self) -> bool {
        matches!(
            self,
            Outcome::UpstreamClosed
                | Outcome::UpstreamError(_)
                | Outcome::Closed(
                    CloseReason::UpstreamAuthTimeout(_)
                        | CloseReason::UpstreamProtocol(_)
                        | CloseReason::UpstreamDesync
                )
        )
    }

    pub fn side(&self) -> &'static str {
        match self {
            Outcome::Closed(r) => r.side(),
            Outcome::ClientClosed | Outcome::ClientError(_) => "client",
            Outcome::UpstreamClosed | Outcome::UpstreamError(_) | Outcome::UpstreamConnect(_) => {
                "upstream"
            }
            Outcome::Drained | Outcome::NoCredentials(_) => "proxy",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Closed(r) => write!(f, "{r}"),
            Outcome::ClientClosed => f.write_str("client closed the connection"),
            Outcome::ClientError(e) => write!(f, "client connection failed: {e}"),
            Outcome::UpstreamClosed => f.write_str("upstream closed the connection"),
            // rustls's text for it ends in a link to its manual: what a server that crashed
            // or was reset looks like, said plainly.
            Outcome::UpstreamError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                f.write_str("upstream closed the connection (without a TLS close_notify)")
            }
            Outcome::UpstreamError(e) => write!(f, "upstream connection failed: {e}"),
            Outcome::Drained => f.write_str("proxy shutting down; in-flight replies delivered"),
            Outcome::NoCredentials(why) => write!(f, "no valid token: {why}"),
            Outcome::UpstreamConnect(e) => write!(f, "{e}"),
        }
    }
}

/// Serves one client connection to the end.
pub async fn serve<C>(client: C, shared: &Shared, target: &Target) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    serve_with(client, shared, target, 2, None, false).await
}

/// Serves one client connection to the end, its upstream connection switched to protocol
/// `proto` (2 or 3) and named `name` before the client's first command: what a client that
/// already said `HELLO 3` or `CLIENT SETNAME` elsewhere (a multiplexed client, pinned)
/// expects, and what a RESP3 shared connection speaks. The replies of the injected `HELLO`
/// and `CLIENT SETNAME` are swallowed. `authenticated`: the client already gave the local
/// password (`--local-password`) where it was served before.
pub async fn serve_with<C>(
    client: C,
    shared: &Shared,
    target: &Target,
    proto: u8,
    name: Option<&[u8]>,
    authenticated: bool,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let client_is = Client {
        proto,
        name,
        authenticated,
    };
    serve_inner(client, shared, target, client_is, READ_CHUNK, None).await
}

/// What the proxy already knows of a client when its session starts.
struct Client<'a> {
    /// The protocol it speaks (2 or 3).
    proto: u8,
    /// The name it gave itself.
    name: Option<&'a [u8]>,
    /// It gave the local password.
    authenticated: bool,
}

/// Serves the in-memory client of a shared connection (`--multiplex`), which speaks
/// `proto`: like [`serve_with`], but reading up to `SHARED_READ_CHUNK` of its requests at
/// once, so that the requests of many clients go to the server in few, large writes.
/// `framing`: the client's word on which of its bytes are plain requests, kept in step by
/// both sides (see [`Framing`]).
pub async fn serve_shared<C>(
    client: C,
    shared: &Shared,
    target: &Target,
    proto: u8,
    framing: Framing,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    // The router checked the local password of every client it serves.
    let client_is = Client {
        proto,
        name: None,
        authenticated: true,
    };
    serve_inner(
        client,
        shared,
        target,
        client_is,
        SHARED_READ_CHUNK,
        Some(framing),
    )
    .await
}

/// `read_max`: the most bytes read from the client at once.
async fn serve_inner<C>(
    mut client: C,
    shared: &Shared,
    target: &Target,
    client_is: Client<'_>,
    read_max: usize,
    framing: Option<Framing>,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    // The futures of the phases before the byte pump are boxed: they are large (the TLS
    // handshake holds a whole TLS connection) and short-lived, and unboxed they would size
    // every session's task for its whole life.
    let owes_password = shared.local_password.is_some() && !client_is.authenticated;
    let creds = match Box::pin(no_token::current(&shared.credentials)).await {
        Ok(c) => c,
        Err(why) => {
            Box::pin(no_token::serve(
                &mut client,
                &shared.credentials,
                why,
                owes_password,
            ))
            .await;
            return Outcome::NoCredentials(why);
        }
    };
    let m = metrics::handles();
    if let Some(framing) = &framing {
        framing.lock().start();
    }
    let mut io = Io::new(shared, read_max, framing);
    // A client that owes the local password is served without an upstream until it gives it
    // (or leaves): a peer without the password costs the cache no connection and no AUTH.
    // One `Option` holds the core of either kind, so that the session's future holds one.
    let mut core =
        owes_password.then(|| Core::unconnected(creds.clone(), shared.local_password.clone()));
    if let Some(unconnected) = &mut core {
        // Boxed, as the phases above: only clients that owe a password run it.
        match Box::pin(pump(
            &mut client,
            &mut NotConnected,
            unconnected,
            shared,
            &mut io,
        ))
        .await
        {
            Outcome::UpstreamError(e) if NotConnected::asked(&e) => {}
            outcome => {
                if matches!(outcome, Outcome::Drained | Outcome::Closed(_)) {
                    linger(&mut client).await;
                }
                return outcome;
            }
        }
    }
    let mut upstream = match target.pool.as_ref().and_then(|p| p.take()) {
        Some(warm) => {
            match &mut core {
                // The pooled connection is authenticated already: the unconnected core's
                // first AUTH is not needed (unless the token rotated meanwhile).
                Some(unconnected) => {
                    unconnected.adopt_authentication(&warm.core);
                }
                None => core = Some(warm.core),
            }
            warm.upstream
        }
        None => match Box::pin(connect_node(target)).await {
            Ok(u) => u,
            Err(e) => {
                if !matches!(e, crate::upstream::ConnectError::NotInTopology { .. }) {
                    shared.health.upstream_failed();
                }
                // The router of a shared session answers each client owed a reply itself.
                // A server that is down closes the client's connection without a word, as
                // it would close a connection of the client's own: client libraries retry
                // that, not an error reply. A configuration to fix is said.
                if io.framing.is_none() {
                    if e.transient() {
                        linger(&mut client).await;
                    } else {
                        refuse(&mut client, &format!("ERR redis-entra-proxy: {e}")).await;
                    }
                }
                return Outcome::UpstreamConnect(e);
            }
        },
    };
    let core = core.get_or_insert_with(|| Core::new(creds, shared.local_password.clone()));
    core.set_rewriter(target.rewriter.clone());
    if client_is.proto == 3 {
        core.speak_resp3();
    }
    if let Some(name) = client_is.name {
        core.name_connection(name);
    }
    if client_is.authenticated {
        core.client_gave_password();
    }
    let active = metrics::Active::new(&m.upstream_active, false);
    let outcome = pump(&mut client, &mut upstream, core, shared, &mut io).await;
    drop(active);
    if outcome.upstream_broke() {
        shared.health.upstream_failed();
    }
    // The proxy closes: FIN, then unread input is drained, so that the close does not turn
    // into a reset that destroys replies the client has not read yet.
    if matches!(outcome, Outcome::Drained | Outcome::Closed(_)) {
        drop(upstream);
        linger(&mut client).await;
    }
    outcome
}

/// Opens an upstream connection for a client (now or, for the warm pool, ahead of one),
/// recording its latency or counting its failure.
pub(crate) async fn connect(
    connector: &Connector,
) -> Result<crate::upstream::Upstream, crate::upstream::ConnectError> {
    let started = std::time::Instant::now();
    match connector.connect().await {
        Ok(u) => {
            metrics::handles()
                .connect_seconds
                .record(started.elapsed().as_secs_f64());
            Ok(u)
        }
        Err(e) => {
            ::metrics::counter!(metrics::UPSTREAM_CONNECT_ERRORS_TOTAL, "kind" => e.label())
                .increment(1);
            Err(e)
        }
    }
}

/// Opens the upstream connection of a client of `target`. A cluster node that only a
/// redirection named must first appear in the proxy's own reading of the topology, within
/// [`TOPOLOGY_WAIT`]: a client can make a script answer `MOVED` to any address, and the proxy
/// would otherwise connect there, and send it the token over a plain upstream.
async fn connect_node(
    target: &Target,
) -> Result<crate::upstream::Upstream, crate::upstream::ConnectError> {
    if let Some(listed) = &target.in_topology {
        let mut listed = listed.clone();
        let found = tokio::time::timeout(TOPOLOGY_WAIT, listed.wait_for(|listed| *listed)).await;
        if !matches!(found, Ok(Ok(_))) {
            let e = crate::upstream::ConnectError::NotInTopology {
                addr: target.connector.addr().to_owned(),
            };
            ::metrics::counter!(metrics::UPSTREAM_CONNECT_ERRORS_TOTAL, "kind" => e.label())
                .increment(1);
            return Err(e);
        }
    }
    connect(&target.connector).await
}

/// A short exchange on a connection of the proxy's own (the warm pool, the cluster topology
/// refresh): writes what the core queued and reads until every reply is in, within the
/// connect timeout. The caller then looks at the core (authenticated? what was answered?).
pub(crate) async fn exchange(
    upstream: &mut crate::upstream::Upstream,
    core: &mut Core,
    shared: &Shared,
) -> Result<(), String> {
    let exchange = async {
        let mut buf = BytesMut::with_capacity(512);
        loop {
            if !core.to_upstream.is_empty() {
                upstream
                    .write_all(&core.to_upstream)
                    .await
                    .map_err(|e| e.to_string())?;
                core.to_upstream.clear();
                upstream.flush().await.map_err(|e| e.to_string())?;
            }
            record_auth(core, &shared.health);
            if let Some(reason) = core.close_reason() {
                return Err(reason.to_string());
            }
            if core.in_flight() == 0 {
                return Ok(());
            }
            match upstream.read_buf(&mut buf).await {
                Ok(0) => return Err("upstream closed the connection".to_owned()),
                Ok(_) => core.upstream_input(&mut buf),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let timeout = shared.connector.timeout();
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(format!("upstream did not answer within {timeout:?}")),
    }
}

/// Closes gracefully: FIN first, then input is read and dropped until the client closes too
/// (bounded by [`LINGER`]).
pub(crate) async fn linger<C: AsyncRead + AsyncWrite + Unpin>(client: &mut C) {
    let _ = client.shutdown().await;
    // On the heap: an array here would be part of every session's future for its whole life.
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = client.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// The upstream of a session whose client has not given the local password yet
/// ([`Core::unconnected`]): nothing to read, and the first write (the core's first AUTH, once
/// the password came) fails with the error that says: connect now.
struct NotConnected;

#[derive(Debug)]
struct ConnectNow;

impl std::fmt::Display for ConnectNow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client gave the password: the upstream is needed")
    }
}

impl std::error::Error for ConnectNow {}

impl NotConnected {
    /// Whether the pump ended on the write that asks for the upstream.
    fn asked(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<ConnectNow>())
    }
}

impl AsyncRead for NotConnected {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Pending
    }
}

impl AsyncWrite for NotConnected {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::task::Poll::Ready(Err(io::Error::other(ConnectNow)))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Sends one error reply to a client the proxy cannot serve, then lets it go.
async fn refuse<C: AsyncWrite + Unpin>(client: &mut C, msg: &str) {
    let mut reply = BytesMut::new();
    crate::resp::encode::error(&mut reply, msg);
    // Best effort: the client may already be gone, and the close says the rest.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(&reply)).await;
    let _ = client.shutdown().await;
}

async fn pump<C, U>(
    client: &mut C,
    upstream: &mut U,
    core: &mut Core,
    shared: &Shared,
    io: &mut Io,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    // Later changes come through this session's group, at most `fanout::GROUPS` ms late.
    let mut creds = shared.fanout.subscribe();
    creds.borrow_and_update();
    // The core started with the credentials current when the client connected; catch up with
    // any change since (a no-op for the same generation).
    if let Some(c) = shared.credentials.borrow().clone() {
        core.set_credentials(c);
    }
    let mut creds_open = true;
    let mut grace: Option<Instant> = None;
    // New credentials waiting for this session's jittered moment.
    let mut pending: Option<(Arc<crate::credentials::Credentials>, Instant)> = None;
    let mut retry_at: Option<Instant> = None;
    let mut retry_delay = REAUTH_RETRY_INITIAL;
    // A server that accepts the connection and then never answers the first AUTH must not
    // hold the client forever: the connect timeout covers the AUTH too.
    let auth_timeout = shared.connector.timeout();
    let mut auth_deadline =
        (!core.authenticated() && core.auth_written()).then(|| Instant::now() + auth_timeout);
    loop {
        if auth_deadline.is_some() && core.authenticated() {
            auth_deadline = None;
        }
        record_auth(core, &shared.health);
        if core.reauth_failed() && retry_at.is_none() {
            retry_at = Some(Instant::now() + retry_delay);
            retry_delay = (retry_delay * 2).min(REAUTH_RETRY_MAX);
        } else if core.current() {
            retry_delay = REAUTH_RETRY_INITIAL;
        }
        let close_at = core.close_deadline().map(instant_of);
        let timers = io.timers(core);
        // Only ahead: a connection quiet long enough but still busy (a blocked BLPOP) closes
        // when what keeps it busy ends, which wakes the poll; a deadline in the past would
        // fire again at once, spinning.
        let quiet_at = (io.draining)
            .then(|| io.last_client_input + DRAIN_QUIET)
            .filter(|at| *at > Instant::now());
        let shrink_at = (!io.shrunk).then(|| io.last_activity + IDLE_SHRINK);
        // Redis's `timeout`: only a client owed nothing, not subscribed and not monitoring.
        let idle_at = shared
            .client_idle_timeout
            .filter(|_| timers.idle)
            .map(|t| io.last_activity + t);
        let partial_at = shared
            .partial_request_timeout
            .zip(io.partial_since)
            .map(|(t, since)| since + t);
        let next = [
            pending.as_ref().map(|p| p.1),
            retry_at,
            close_at,
            grace,
            auth_deadline,
            quiet_at,
            idle_at,
            partial_at,
            shrink_at,
        ]
        .into_iter()
        .flatten()
        .min();
        tokio::select! {
            outcome = poll_fn(|cx| io.poll(cx, client, upstream, core, timers, &shared.health)) => match outcome {
                // The core's timers changed: recompute them.
                None => {}
                Some(Outcome::ClientClosed)
                    if core.in_flight() > 0 && grace.is_none() && !core.next_reply_blocks() =>
                {
                    // Half-close: finish what is owed, within the grace period, up to a
                    // command that may be waiting for other clients (`Io::poll`).
                    io.reading_client = false;
                    grace = Some(tokio::time::Instant::now() + HALF_CLOSE_GRACE);
                }
                Some(other) => return other,
            },
            changed = Gated::new(Box::pin(creds.changed())), if creds_open => match changed {
                Ok(()) => {
                    if let Some(c) = creds.borrow_and_update().clone() {
                        // Spread over the window, but finish within a quarter of the old
                        // token's remaining life; a connection whose first AUTH is still in
                        // flight takes the new token at once.
                        let window = match core.authed_remaining(SystemTime::now()) {
                            Some(left) => shared.reauth_window.min(left / 4),
                            None => Duration::ZERO,
                        };
                        let at = Instant::now() + window.mul_f64(fastrand::f64());
                        let at = pending.as_ref().map_or(at, |p| p.1.min(at));
                        pending = Some((c, at));
                    }
                }
                Err(_) => creds_open = false,
            },
            _ = Gated::new(Box::pin(shared.shutdown.cancelled())), if !io.draining => {
                io.draining = true;
            }
            // One timer for all deadlines (a sleep each would make every session's task
            // larger); whichever are due are handled, the rest are recomputed.
            _ = sleep_opt(next) => {
                let now = Instant::now();
                let due = |at: Option<Instant>| at.is_some_and(|at| at <= now);
                if grace.is_some_and(|at| at <= now) {
                    return Outcome::ClientClosed;
                }
                if pending.as_ref().is_some_and(|p| p.1 <= now) {
                    if let Some((c, _)) = pending.take() {
                        core.set_credentials(c);
                    }
                }
                if due(auth_deadline) && !core.authenticated() {
                    auth_deadline = None;
                    core.auth_timed_out(auth_timeout);
                }
                if due(retry_at) {
                    retry_at = None;
                    core.retry_reauth();
                }
                if due(close_at) && core.close_deadline().is_some_and(|d| d <= SystemTime::now()) {
                    core.expire();
                }
                if due(idle_at) {
                    let timeout = shared.client_idle_timeout.unwrap_or_default();
                    if io.timers(core).idle && io.last_activity.elapsed() >= timeout {
                        core.close_after_replies(CloseReason::ClientIdle(timeout));
                    }
                }
                if due(partial_at) {
                    let timeout = shared.partial_request_timeout.unwrap_or_default();
                    if !core.wants_client_input() {
                        // The wait is the upstream's, not the client's: start the clock again.
                        io.partial_since = io.partial_since.map(|_| Instant::now());
                    } else if io.partial_since.is_some_and(|since| since.elapsed() >= timeout) {
                        io.cin.clear();
                        if let Some(framing) = &io.framing {
                            framing.lock().clear();
                        }
                        io.partial_since = None;
                        core.close_after_replies(CloseReason::PartialRequest(timeout));
                    }
                }
                if due(shrink_at) && io.last_activity.elapsed() >= IDLE_SHRINK {
                    io.shrink(core);
                }
                // `quiet_at`: while draining, the poll looks again once the client has been
                // quiet long enough.
            }
        }
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The monotonic instant of a wall-clock time (token expiries are wall-clock).
fn instant_of(t: SystemTime) -> Instant {
    let now = SystemTime::now();
    match t.duration_since(now) {
        Ok(ahead) => Instant::now() + ahead,
        Err(_) => Instant::now(),
    }
}

/// Turns the core's AUTH results into metrics and readiness.
pub(crate) fn record_auth(core: &mut Core, health: &Health) {
    for e in core.auth_events.drain(..) {
        let m = metrics::handles();
        let kind = metrics::auth_kind(e.initial);
        if e.ok {
            m.auth_ok[kind].increment(1);
            health.upstream_ok(e.generation);
        } else {
            m.auth_error[kind].increment(1);
            health.upstream_failed();
        }
        m.auth_seconds[kind].record(e.latency.as_secs_f64());
    }
}

#[cfg(test)]
mod tests;
