//! Multiplexing (`--multiplex`): plain commands of many clients share one upstream connection
//! per session thread and protocol, so the server reads and answers them in batches.
//!
//! A client starts *shared*. Each complete request it sends is classified by its command name
//! ([`shareable`]): commands that get exactly one reply, change no connection state and never
//! block go to its thread's *router*, which writes them, in the order they arrived, to one
//! shared upstream session and hands each reply frame back to the client that sent the
//! request. RESP2 and RESP3 clients have a router each: `HELLO 2|3` moves a client to the
//! other one once every reply it is owed on the first has come. The first other command (or a
//! malformed request) *pins* the client: once every reply it is owed has been delivered, it
//! gets an upstream connection of its own, exactly as without multiplexing, and keeps it. The
//! unread bytes go to that session first, so nothing is lost or reordered, and the client's
//! own connection state starts clean, in the protocol it chose.
//!
//! With a local password (`--local-password`), a client shares only once it has given the
//! right one (see `credentials`): anything it sends before, and any wrong password, pins it, and
//! its own session answers as Redis does (NOAUTH, WRONGPASS). A client pinned after giving the
//! password starts its session authenticated.
//!
//! The shared upstream session is an ordinary session ([`session::serve_shared`]) whose client is
//! the router itself, run in the router's task: the session reads the requests from the router
//! and writes the replies to it, with no pipe or other task between them. Authentication,
//! re-authentication at every rotation, expiry, metrics and draining are the same code as for
//! every other connection.
//!
//! If the shared upstream connection fails, the clients owed replies to requests it took are
//! closed (their commands may or may not have run, as with a connection of their own);
//! requests it never took go to the next shared session; the others carry on (see
//! `Router::lost`).
//!
//! A shared client more than 1 MiB behind in reading its replies makes the shared connection
//! wait for it, as a connection of its own would: the proxy never holds much of a big reply
//! for a slow reader, and the clients behind it wait. One that does not catch up within 10 s
//! is closed (`PAUSE`, `RESUME`, `SLOW_CLIENT`). One that does, and one handed a reply of
//! more than 1 MiB, pins at its next request: the others wait behind one of its big replies
//! at most.
//!
//! # Layout
//! - `commands.rs`: what a request means here (shares, answered by the proxy, switches
//!   protocol, pins, and why);
//! - `client.rs`: a client in its shared phase;
//! - `link.rs`: what a client and its router exchange;
//! - `router.rs`: a thread's router and the shared session it runs;
//! - `balance.rs`: which session threads the shared clients run on.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::session::{self, CloseReason, Outcome, Shared, Target};
use crate::workers::Workers;

mod balance;
mod client;
mod commands;
mod link;
mod router;

pub use balance::Balance;
pub use commands::shareable;

use client::shared_phase;
use commands::PinnedBy;
use link::Submit;
use router::{route, Router};

/// With `--multiplex-max-batches`, held requests go at once when they reach this size: a
/// batch this large already spreads the costs of a batch (a system call and a TLS record
/// each way, a pass of the server's event loop) thin, and holding it longer would only
/// delay it.
const HOLD_BYTES: usize = 16 * 1024;
/// A reply frame larger than this goes to its client in parts of this size or more, as it
/// arrives, rather than whole: the router would otherwise hold all of it (a `GET` of a 100 MB
/// value, 100 MB). Each part costs a hand-over and a write to the client, fewer than a
/// connection of its own makes (a write per 16 KiB read). Parts of 256 KiB, or whole replies,
/// measured no different (`benches/ab.sh 5 "-c 20 -n 4000 -d 200000 -t get"`, `--multiplex`:
/// 180, 228 and 198 µs of proxy CPU per GET, within the noise between rounds).
const PASS_ON: usize = 64 * 1024;
/// A shared client stops reading requests while this many replies are owed to it, or while
/// this many reply bytes wait for it to read them.
const MAX_OWED: usize = 1024;
const MAX_UNSENT: usize = 256 * 1024;
/// The router hands a client no more replies while this many bytes it was handed wait for it
/// to read them, and goes on once no more than [`RESUME`] do: the shared connection then waits
/// for a client that reads a big reply more slowly than the server sends it, as a connection
/// of its own would, instead of the proxy holding all of the reply. A client that keeps up
/// seldom makes it wait: its socket's buffers hold more than this.
const PAUSE: usize = 1024 * 1024;
const RESUME: usize = PAUSE / 2;
/// The shared connection waits this long at most for a client to read its replies down to
/// [`RESUME`]; then the client is closed and the rest of its replies dropped. Only a
/// client that stopped reading (stuck, or paused far longer than a garbage collection) is
/// this slow, and every other client of the connection waits while it is.
const SLOW_CLIENT: Duration = Duration::from_secs(10);
/// Reads from a shared client start at this size and double while they fill, up to 32 KiB:
/// a request with a 16 KiB value (16.4 KB with its headers) then comes in one read into one
/// allocation. With 16 KiB reads its last bytes made the buffer grow, copying the rest, and
/// 16 KiB SETs cost 8 % more proxy CPU (`benches/ab.sh`, `--multiplex`).
const READ_START: usize = 2 * 1024;
const READ_MAX: usize = 32 * 1024;

/// The routers of one target, one per session thread and protocol (RESP2 clients share one
/// connection, RESP3 clients another), started on first use.
pub struct Routers {
    by_worker: Mutex<HashMap<(usize, u8), mpsc::UnboundedSender<Submit>>>,
    /// Which session threads the shared clients run on.
    balance: Arc<Balance>,
    /// `--multiplex-max-batches`: batches a shared connection may have owed replies before
    /// new requests are held for the next one; 0: no limit.
    max_batches: usize,
}

impl Routers {
    /// `consolidate`: `--multiplex-consolidate` with more than one session thread.
    pub fn new(max_batches: usize, consolidate: bool) -> Routers {
        Routers {
            by_worker: Mutex::default(),
            balance: Arc::new(Balance::new(consolidate)),
            max_batches,
        }
    }

    /// Whether a new client of this target should start on the home thread.
    pub fn gathering(&self) -> bool {
        self.balance.consolidated()
    }

    /// The session thread a shared client on `worker` should move to, if any: the home
    /// thread while consolidated, a thread with fewer sessions while spread (and moving
    /// leaves the threads more even).
    fn destination(&self, worker: usize, workers: &Workers) -> Option<usize> {
        if !self.balance.enabled() {
            None
        } else if self.balance.consolidated() {
            (worker != Workers::HOME).then_some(Workers::HOME)
        } else {
            workers.lighter_than(worker)
        }
    }

    /// The router of session thread `worker` (the caller runs on it) for protocol `proto`,
    /// started if there is none (or it ended).
    fn get(
        &self,
        worker: usize,
        proto: u8,
        shared: &Arc<Shared>,
        target: &Arc<Target>,
    ) -> mpsc::UnboundedSender<Submit> {
        let mut map = self.by_worker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(&(worker, proto)).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut router = Router::new(proto, self.max_batches, rx);
        router.balance = Some((
            self.balance.clone(),
            balance::Tally::new(worker == Workers::HOME),
        ));
        tokio::spawn(route(router, shared.clone(), target.clone()));
        map.insert((worker, proto), tx.clone());
        tx
    }
}

/// How a shared client's first phase ended.
enum Phase {
    Done(Outcome),
    /// Serve the rest on a connection of its own speaking this protocol and named so (the
    /// client's `CLIENT SETNAME`), these bytes first; `true`: the client gave the local
    /// password. The last: why, for `multiplex_pinned_total`
    /// ([`pin_reason`](commands::pin_reason)).
    Pin(BytesMut, u8, Option<Bytes>, bool, &'static str),
    /// Go on on this session thread.
    Move(usize, Carry),
}

/// What a shared client carries to the session thread it moves to.
pub struct Carry {
    /// A request it has begun to send.
    cin: BytesMut,
    proto: u8,
    name: Option<Bytes>,
    /// It gave the local password.
    authenticated: bool,
}

impl Default for Carry {
    /// What a client that just connected has: nothing read, RESP2, no name, no password given.
    fn default() -> Carry {
        Carry {
            cin: BytesMut::new(),
            proto: 2,
            name: None,
            authenticated: false,
        }
    }
}

/// How [`serve`] ended.
pub enum Served<C> {
    Done(Outcome),
    /// Nothing is owed to the client, and it goes on on session thread `to`
    /// (`--multiplex-consolidate`): serve it there, with `carry`.
    Move {
        client: C,
        to: usize,
        carry: Carry,
    },
}

/// Serves a client with multiplexing: shared while it sends only [`shareable`] commands,
/// pinned to a session of its own from its first other command on. `worker`: the session
/// thread this runs on (`workers.rs`), whose shared connection it uses; `carry`: what the
/// client had when it moved here from another thread.
pub async fn serve<C>(
    mut client: C,
    shared: &Arc<Shared>,
    target: &Arc<Target>,
    worker: usize,
    workers: &Workers,
    carry: Option<Carry>,
) -> Served<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let Some(routers) = &target.mux else {
        return Served::Done(session::serve(client, shared, target).await);
    };
    let router = |proto| routers.get(worker, proto, shared, target);
    let destination = || routers.destination(worker, workers);
    let m = crate::metrics::handles();
    let sharing = crate::metrics::Active::new(&m.mux_shared, false);
    let phase = shared_phase(&mut client, shared, router, destination, carry).await;
    drop(sharing);
    match phase {
        Phase::Done(outcome) => {
            // The proxy closes: FIN, then unread input is drained, so that the close does not
            // turn into a reset that destroys replies the client has not read yet. (A client
            // closed for not reading gets no such care.)
            let slow = matches!(outcome, Outcome::Closed(CloseReason::SlowClient(_)));
            if matches!(
                outcome,
                Outcome::Drained | Outcome::Closed(_) | Outcome::UpstreamConnect(_)
            ) && !slow
            {
                session::linger(&mut client).await;
            }
            Served::Done(outcome)
        }
        Phase::Move(to, carry) => Served::Move { client, to, carry },
        Phase::Pin(rest, proto, name, authenticated, reason) => {
            metrics::counter!(crate::metrics::MULTIPLEX_PINNED_TOTAL, "reason" => reason)
                .increment(1);
            tracing::debug!(
                command = %PinnedBy(&rest),
                reason,
                proto,
                "pinned: a connection of its own from now on"
            );
            // The client's connection state starts clean, in the protocol it said it speaks.
            Served::Done(
                session::serve_with(
                    Prefixed {
                        first: rest,
                        inner: client,
                    },
                    shared,
                    target,
                    proto,
                    name.as_deref(),
                    authenticated,
                )
                .await,
            )
        }
    }
}

/// A client stream with bytes already read from it put back in front.
struct Prefixed<C> {
    first: BytesMut,
    inner: C,
}

impl<C: AsyncRead + Unpin> AsyncRead for Prefixed<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first[..n]);
            self.first.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Prefixed<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
