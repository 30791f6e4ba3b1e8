//! Accept loops: take client connections from the TCP and unix listeners, enforce the
//! connection limit, and run one session task per connection. On shutdown, stop accepting,
//! let sessions finish what is in flight for up to the drain timeout, then return.
//!
//! Per-connection errors end in the session task, logged once with the side that failed; they
//! never reach the accept loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::NodeListener;
use crate::log_budget::LogBudget;
use crate::metrics::CLOSE_LABELS;
use crate::mux::Served;
use crate::session::{self, Outcome, Shared, Target};
use crate::workers::{Placement, Portable, Workers};

/// Redis's own reply when `maxclients` is reached, so clients recognise it.
const MAX_CLIENTS: &[u8] = b"-ERR max number of clients reached\r\n";
/// Pause after an accept error (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Listeners bound by the caller (`main`, or a test on port 0).
#[derive(Default)]
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<UnixListener>,
    /// The admin HTTP endpoint (`/metrics`, `/readyz`…).
    pub admin: Option<TcpListener>,
}

/// What the accept loops share.
#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    /// Each session holds a permit; dropping it at session end frees the slot.
    limit: Arc<Semaphore>,
    ids: Arc<AtomicU64>,
    /// The session threads connections are spread over.
    workers: Arc<Workers>,
}

/// How long the drain may last, and what ends it sooner (the second signal).
pub struct Drain {
    pub timeout: Duration,
    pub cut: CancellationToken,
}

/// Serves until `shared.shutdown` is cancelled, then drains until the sessions are done, the
/// drain times out or it is cut short.
/// Clients of the TCP and unix listeners go to `main`; in cluster mode, listeners for cluster
/// nodes arrive on `nodes` as the topology is learnt, each with its own target. Sessions run
/// on `workers`.
pub async fn serve(
    listeners: Listeners,
    shared: Arc<Shared>,
    main: Arc<Target>,
    nodes: Option<mpsc::UnboundedReceiver<NodeListener>>,
    workers: Arc<Workers>,
    max_connections: usize,
    drain: Drain,
) {
    let ctx = Ctx {
        shared: shared.clone(),
        tracker: TaskTracker::new(),
        limit: Arc::new(Semaphore::new(max_connections)),
        ids: Arc::new(AtomicU64::new(0)),
        workers,
    };
    let shutdown = shared.shutdown.clone();
    let tcp = async {
        match listeners.tcp {
            Some(listener) => accept_tcp(&ctx, &listener, &main).await,
            None => std::future::pending().await,
        }
    };
    let unix = async {
        let Some(listener) = listeners.unix else {
            return std::future::pending().await;
        };
        loop {
            match listener.accept().await {
                Ok((stream, _)) => spawn(&ctx, &main, stream, "unix".into()),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on unix listener");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    };
    let nodes = async {
        let Some(mut nodes) = nodes else {
            return std::future::pending().await;
        };
        while let Some(node) = nodes.recv().await {
            let ctx = ctx.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = accept_tcp(&ctx, &node.listener, &node.target) => {}
                    _ = node.stop.cancelled() => {}
                    _ = shutdown.cancelled() => {}
                }
            });
        }
        std::future::pending().await
    };
    tokio::select! {
        _ = tcp => {}
        _ = unix => {}
        _ = nodes => {}
        _ = shutdown.cancelled() => {}
    }
    let tracker = ctx.tracker;
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        tracing::info!(
            sessions = open,
            timeout_ms = drain.timeout.as_millis() as u64,
            "draining"
        );
    }
    tokio::select! {
        _ = tracker.wait() => {}
        _ = tokio::time::sleep(drain.timeout) => tracing::warn!(
            sessions = tracker.len(),
            "drain timeout reached; closing remaining connections"
        ),
        _ = drain.cut.cancelled() => if !tracker.is_empty() {
            tracing::warn!(sessions = tracker.len(), "drain cut short; closing remaining connections");
        },
    }
}

async fn accept_tcp(ctx: &Ctx, listener: &TcpListener, target: &Arc<Target>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                spawn(ctx, target, stream, peer.to_string());
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on tcp listener");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Counts a target's sessions for as long as it lives.
struct Counted(Arc<Target>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

fn spawn<S>(ctx: &Ctx, target: &Arc<Target>, mut stream: S, peer: String)
where
    S: Portable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = ctx.ids.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("conn", id, %peer);
    let Ok(permit) = ctx.limit.clone().try_acquire_owned() else {
        metrics::counter!(crate::metrics::CLIENT_CONNECTIONS_TOTAL, "outcome" => "refused_max_connections")
            .increment(1);
        ctx.tracker.spawn(
            async move {
                static REFUSED: LogBudget = LogBudget::new("refused: max connections reached");
                if let Some(suppressed) = REFUSED.take() {
                    tracing::warn!(suppressed, "refused: max connections reached");
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(MAX_CLIENTS))
                    .await;
            }
            .instrument(span),
        );
        return;
    };
    // Multiplexed clients start where the shared ones are gathered, if they are.
    let placement = match &target.mux {
        Some(routers) if routers.gathering() => ctx.workers.at(Workers::HOME),
        _ => ctx.workers.place(),
    };
    let handoff = if placement.local {
        Handoff::Here(stream)
    } else {
        match stream.into_std() {
            Ok(std) => Handoff::Moved(std),
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "closed: cannot hand the connection to a session thread"));
                return;
            }
        }
    };
    target.clients.fetch_add(1, Ordering::Relaxed);
    let conn = Conn {
        shared: ctx.shared.clone(),
        counted: Counted(target.clone()),
        _permit: permit,
        tracker: ctx.tracker.clone(),
        workers: ctx.workers.clone(),
        span,
    };
    run(conn, placement, handoff, None);
}

/// What a client connection holds for its whole life, across the session threads it may be
/// served on.
struct Conn {
    shared: Arc<Shared>,
    counted: Counted,
    /// The connection's slot under `--max-connections`.
    _permit: tokio::sync::OwnedSemaphorePermit,
    tracker: TaskTracker,
    workers: Arc<Workers>,
    span: tracing::Span,
}

/// Serves a connection on `placement`'s worker, from its start or, with `carry`, from where
/// a multiplexed client left off on another worker; a client that moves again goes on in a
/// new task on its new worker.
fn run<S>(
    conn: Conn,
    placement: Placement<'_>,
    handoff: Handoff<S>,
    carry: Option<crate::mux::Carry>,
) where
    S: Portable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let worker = placement.index;
    let tracker = conn.tracker.clone();
    let span = conn.span.clone();
    placement.spawn(move |live| tracker.track_future(async move {
        let _live = live;
        let first = carry.is_none();
        let stream = match handoff.open() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "closed: cannot register the connection on its session thread");
                return;
            }
        };
        let m = crate::metrics::handles();
        if first {
            tracing::debug!("accepted");
            metrics::counter!(crate::metrics::CLIENT_CONNECTIONS_TOTAL, "outcome" => "served")
                .increment(1);
        }
        // A bug that panics in one session unwinds only that connection's task (tokio
        // contains it; its sockets close): the guard keeps the gauge right and logs and
        // counts that close too.
        let active = crate::metrics::Active::new(&m.client_active, true);
        let (shared, target) = (&conn.shared, &conn.counted.0);
        match crate::mux::serve(stream, shared, target, worker, &conn.workers, carry).await {
            Served::Done(outcome) => log_outcome(&outcome, target),
            Served::Move { client, to, carry } => {
                drop(active);
                match client.into_std() {
                    Ok(std) => {
                        tracing::trace!(from = worker, to, "moved to another session thread");
                        m.mux_moves.increment(1);
                        let workers = conn.workers.clone();
                        return run(conn, workers.at(to), Handoff::<S>::Moved(std), Some(carry));
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "closed: cannot move the connection to another session thread"
                    ),
                }
            }
        }
        drop(conn);
    }.instrument(span)));
}

/// A client socket on its way to the session thread that serves it.
enum Handoff<S: Portable> {
    /// Served on the accepting runtime.
    Here(S),
    /// Served on another thread: registered with that thread's runtime on arrival.
    Moved(S::Std),
}

impl<S: Portable> Handoff<S> {
    fn open(self) -> std::io::Result<S> {
        match self {
            Handoff::Here(stream) => Ok(stream),
            Handoff::Moved(std) => S::from_std(std),
        }
    }
}

/// One [`LogBudget`] per close label, each named after its reason.
const fn close_budgets() -> [LogBudget; CLOSE_LABELS.len()] {
    let mut budgets = [const { LogBudget::new("closed") }; CLOSE_LABELS.len()];
    let mut i = 0;
    while i < CLOSE_LABELS.len() {
        budgets[i] = LogBudget::new(CLOSE_LABELS[i].1);
        i += 1;
    }
    budgets
}

fn log_outcome(outcome: &Outcome, target: &Target) {
    let side = outcome.side();
    metrics::counter!(crate::metrics::CONNECTIONS_CLOSED_TOTAL, "side" => side, "reason" => outcome.label())
        .increment(1);
    if let Outcome::Closed(session::CloseReason::ClientProtocol(e)) = outcome {
        metrics::counter!(crate::metrics::PROTOCOL_ERRORS_TOTAL, "kind" => e.kind()).increment(1);
    }
    // `reason`: the metric's label, for log collectors to filter on.
    let reason = outcome.label();
    match outcome {
        // The ordinary ends of a connection; an idle timeout too: a connection pool whose
        // connections outlive it would write a line per connection at each of its cycles.
        Outcome::ClientClosed
        | Outcome::Drained
        | Outcome::Closed(session::CloseReason::ClientQuit | session::CloseReason::ClientIdle(_)) =>
        {
            tracing::debug!(side, reason, "closed: {outcome}")
        }
        _ => {
            // A budget per reason: a flood of one (failed connects in an outage) leaves the
            // lines of a rarer one (a refused AUTH) in.
            static CLOSED: [LogBudget; CLOSE_LABELS.len()] = close_budgets();
            let which = CLOSE_LABELS
                .iter()
                .position(|&(s, r)| (s, r) == (side, reason))
                .unwrap_or(0);
            if let Some(suppressed) = CLOSED[which].take() {
                // Which server, for an upstream end (in cluster mode, which node).
                let upstream = (side == "upstream").then(|| target.connector.addr());
                tracing::warn!(side, reason, upstream, suppressed, "closed: {outcome}");
            }
        }
    }
}
