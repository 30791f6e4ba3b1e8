//! A thread's router: it batches the requests its shared clients submit, runs the shared
//! upstream session with itself as that session's client, and hands each reply back to the
//! client whose request it answers.

use std::collections::{HashSet, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use super::balance::{self, Balance};
use super::link::{Delivery, Link, Submit, LARGE_REPLY, SLOW_READER};
use super::{HOLD_BYTES, PASS_ON, PAUSE, SLOW_CLIENT};
use crate::resp::reply::ReplyScanner;
use crate::session::{self, CloseReason, Outcome, Shared, Target};

/// One thread's router: whenever its shared clients have requests for the shared connection,
/// it runs the shared session with itself as that session's client ([`Router`]'s `AsyncRead`
/// and `AsyncWrite`), in this task; when the session ends, every client still owed a reply
/// is closed, and the next request starts a new session.
pub(super) async fn route(mut r: Router, shared: Arc<Shared>, target: Arc<Target>) {
    loop {
        // Once the proxy stops, draining clients may still send for a moment (a pipeline
        // written just before the signal): the router ends when nothing is owed and none has
        // sent anything for that moment.
        let stopping = shared.shutdown.is_cancelled();
        let quiet_at = r.last_submit + session::DRAIN_QUIET;
        let ending = stopping && tokio::time::Instant::now() >= quiet_at;
        let work = tokio::select! {
            work = poll_fn(|cx| r.wait(cx, ending)) => work,
            // Look again, stopping.
            _ = shared.shutdown.cancelled(), if !stopping => continue,
            _ = tokio::time::sleep_until(quiet_at), if stopping && !ending => continue,
        };
        if !work {
            return;
        }
        let (proto, polls) = (r.proto, r.polls.clone());
        // The session starts with nothing read.
        r.framing = session::Framing::default();
        let framing = r.framing.clone();
        let outcome = {
            let mut session = std::pin::pin!(session::serve_shared(
                &mut r, &shared, &target, proto, framing
            ));
            // Counts the polls of this task for the router (see `Router::answered_in`).
            poll_fn(|cx| {
                polls.fetch_add(1, Ordering::Relaxed);
                session.as_mut().poll(cx)
            })
            .await
        };
        tracing::debug!(outcome = %outcome, "shared upstream session ended");
        r.lost(&outcome);
    }
}

pub(super) struct Route {
    pub(super) link: Arc<Link>,
    pub(super) replies: usize,
    /// Bytes handed so far of a reply handed in parts (see [`PASS_ON`]).
    part: usize,
    /// The client was closed for reading too slowly: its replies are dropped.
    dropped: bool,
}

impl Route {
    pub(super) fn new(link: Arc<Link>, replies: usize) -> Route {
        Route {
            link,
            replies,
            part: 0,
            dropped: false,
        }
    }
}

/// The client end of a shared session: it reads the requests of the router's clients, in
/// the order they were submitted, and writes their replies, which the router hands to the
/// clients they answer.
///
/// A read that finds nothing to hand out registers for new submissions only. Held requests
/// need no other wake-up: the replies that release them are written by the session in one of
/// its polls, and the read in that poll asks for the next one (see `answered_in`).
pub(super) struct Router {
    /// The protocol the shared session speaks.
    pub(super) proto: u8,
    pub(super) rx: mpsc::UnboundedReceiver<Submit>,
    /// No client can submit any more.
    closed: bool,
    /// The session shut its end (it is closing): reads see the end of the stream, and
    /// submissions wait for the next session.
    shut: bool,
    /// Requests of released batches not yet read by the session, each with the number of
    /// plain requests it is (0: not all plain, or partly read already).
    pub(super) out: VecDeque<(Bytes, usize)>,
    /// The session read part of the front of `out`.
    front_started: bool,
    /// The session read requests: it was connected and serving.
    read_any: bool,
    /// Requests submitted since the last batch was released (as in `out`), with their reply
    /// count and size.
    pub(super) held: VecDeque<(Bytes, usize)>,
    pub(super) held_replies: usize,
    held_bytes: usize,
    /// Replies still owed for each released batch, oldest first.
    pub(super) batches: VecDeque<usize>,
    /// Polls of the session's task so far, and the one in which a batch was last answered:
    /// held requests are released only in a later poll, after the clients that batch woke
    /// and the clients whose requests came meanwhile have run, so that what they submit joins
    /// the batch. Released at once, batches are smaller, and the server does more work per
    /// request (`benches/ab.sh 8 "-c 50 -n 200000 -t get"`, `--multiplex-max-batches 1`:
    /// redis-server 2.60 µs per request instead of 1.85, throughput 10 % less).
    pub(super) polls: Arc<AtomicU64>,
    answered_in: Option<u64>,
    /// Release a batch only while fewer than this many are owed replies (or once
    /// [`HOLD_BYTES`] are held); `usize::MAX`: at once.
    pub(super) max_batches: usize,
    /// Who is owed the next replies, in order.
    pub(super) routes: VecDeque<Route>,
    /// What the session is told of the bytes it reads (which are plain requests); a new one
    /// for each session.
    pub(super) framing: session::Framing,
    pub(super) rin: BytesMut,
    /// Bytes at the front of `rin` scanned as part of a reply frame not yet complete.
    scanned: usize,
    scanner: ReplyScanner,
    /// The frame being scanned is a push (RESP3 `>`), which answers no request.
    pub(super) push: bool,
    /// When a client last submitted requests.
    last_submit: tokio::time::Instant,
    /// Where the traffic is counted for placing the shared clients (`None` in unit tests).
    pub(super) balance: Option<(Arc<Balance>, balance::Tally)>,
    /// Since the router began waiting for the front route's client to read, the end of its
    /// patience ([`SLOW_CLIENT`]).
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Router {
    /// `max_batches`: see [`Routers`](super::Routers); `rx`: the clients' submissions.
    pub(super) fn new(
        proto: u8,
        max_batches: usize,
        rx: mpsc::UnboundedReceiver<Submit>,
    ) -> Router {
        Router {
            proto,
            rx,
            closed: false,
            shut: false,
            out: VecDeque::new(),
            front_started: false,
            read_any: false,
            held: VecDeque::new(),
            held_replies: 0,
            held_bytes: 0,
            batches: VecDeque::new(),
            polls: Arc::default(),
            answered_in: None,
            max_batches: if max_batches == 0 {
                usize::MAX
            } else {
                max_batches
            },
            routes: VecDeque::new(),
            framing: session::Framing::default(),
            rin: BytesMut::new(),
            scanned: 0,
            scanner: ReplyScanner::new(),
            push: false,
            balance: None,
            stall: None,
            last_submit: tokio::time::Instant::now(),
        }
    }

    /// Takes every submission waiting into the next batch.
    fn receive(&mut self, cx: &mut Context<'_>) {
        while !self.closed {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(s)) => self.hold(s),
                Poll::Ready(None) => self.closed = true,
                Poll::Pending => break,
            }
        }
    }

    /// Between sessions: `Ready(true)` once some client is owed a reply (a session must
    /// start), `Ready(false)` once no client can submit any more, or the proxy is `stopping`
    /// and none is owed one.
    pub(super) fn wait(&mut self, cx: &mut Context<'_>, stopping: bool) -> Poll<bool> {
        self.receive(cx);
        if !self.routes.is_empty() {
            Poll::Ready(true)
        } else if self.closed || stopping {
            Poll::Ready(false)
        } else {
            Poll::Pending
        }
    }

    /// Hands every whole reply frame read so far to its client: consecutive replies for the
    /// same client go together. Pushes are dropped: shared clients never subscribe or track
    /// keys, so none is theirs. An error means the replies are out of step with the requests.
    pub(super) fn deliver(&mut self) -> Result<(), &'static str> {
        // Bytes at the front of `rin` holding whole replies for the front route, and how many.
        let mut run = 0;
        let mut replies = 0;
        while self.scanned < self.rin.len() {
            if self.scanner.at_boundary() {
                // A frame starts here.
                self.push = self.rin[self.scanned] == b'>';
            }
            // The session checks every reply it relays: a frame it let through that does not
            // scan here is a bug, and the shared session ends rather than misroute.
            let scan = self
                .scanner
                .scan(&self.rin[self.scanned..])
                .map_err(|_| "a relayed reply does not scan")?;
            self.scanned += scan.consumed;
            if !scan.complete {
                break;
            }
            if self.push {
                tracing::debug!(
                    "push on a shared connection dropped: no shared client asked for it"
                );
                self.push = false;
                if replies > 0 {
                    // The replies before it go first.
                    self.send_run(run, replies);
                    (run, replies) = (0, 0);
                }
                self.rin.advance(self.scanned);
                self.scanned = 0;
                continue;
            }
            run = self.scanned;
            replies += 1;
            if let Some(owed) = self.batches.front_mut() {
                *owed -= 1;
                if *owed == 0 {
                    // The next batch may go.
                    self.batches.pop_front();
                    self.answered_in = Some(self.polls.load(Ordering::Relaxed));
                    if let Some((balance, tally)) = &mut self.balance {
                        tally.batch_answered(balance);
                    }
                }
            }
            let Some(route) = self.routes.front_mut() else {
                return Err("a reply nobody asked for");
            };
            if replies == route.replies {
                self.send_run(run, replies);
                self.routes.pop_front();
                (run, replies) = (0, 0);
            }
        }
        if replies > 0 {
            self.send_run(run, replies);
        }
        // What was read of a big frame goes at once: the beginning of a reply to its client
        // (the rest as it comes, counted with its end), that of a push nowhere.
        if self.scanned >= PASS_ON {
            if self.push {
                self.rin.advance(self.scanned);
                self.scanned = 0;
            } else if !self.routes.is_empty() {
                self.send_run(self.scanned, 0);
            }
        }
        Ok(())
    }

    /// Whether replies must wait for the client of the front route, which is more than
    /// [`PAUSE`] bytes behind in reading them, until it is no more than
    /// [`RESUME`](super::RESUME) behind. After [`SLOW_CLIENT`] of waiting it is given up on:
    /// closed, and its replies dropped as they come.
    fn wait_for_front(&mut self, cx: &mut Context<'_>) -> bool {
        let waiting = self.stall.is_some();
        let Some(route) = self
            .routes
            .front_mut()
            .filter(|route| !route.dropped && route.link.behind(cx, waiting))
        else {
            self.stall = None;
            return false;
        };
        let stall = self.stall.get_or_insert_with(|| {
            metrics::counter!(crate::metrics::MULTIPLEX_SLOW_READER_WAITS_TOTAL).increment(1);
            route.link.pin_next(SLOW_READER);
            Box::pin(tokio::time::sleep(SLOW_CLIENT))
        });
        if stall.as_mut().poll(cx).is_pending() {
            return true;
        }
        self.stall = None;
        let unread = route.link.unsent();
        tracing::warn!(
            unread,
            "a shared client did not catch up on its replies within {SLOW_CLIENT:?} while \
             its shared connection waited for it: closing it"
        );
        route.dropped = true;
        let _ = route
            .link
            .to
            .send(Delivery::End(Outcome::Closed(CloseReason::SlowClient(
                SLOW_CLIENT,
            ))));
        false
    }

    /// Takes a submission into the next batch.
    pub(super) fn hold(&mut self, s: Submit) {
        let plain = if s.plain { s.replies } else { 0 };
        self.hold_requests(s.frames, plain, Route::new(s.link, s.replies));
    }

    /// Takes requests into the next batch: `plain` as in [`Router::held`].
    fn hold_requests(&mut self, frames: Bytes, plain: usize, route: Route) {
        self.last_submit = tokio::time::Instant::now();
        self.held_bytes += frames.len();
        self.held_replies += route.replies;
        self.held.push_back((frames, plain));
        self.routes.push_back(route);
    }

    /// Releases the held requests as one batch, for the session to read, unless
    /// `max_batches` batches are owed replies and the held requests are small.
    pub(super) fn release_due(&mut self) {
        if self.held_replies == 0
            || (self.batches.len() >= self.max_batches && self.held_bytes < HOLD_BYTES)
        {
            return;
        }
        self.batches.push_back(self.held_replies);
        if let Some((_, tally)) = &mut self.balance {
            tally.count(self.held_replies, self.held_bytes);
        }
        self.out.append(&mut self.held);
        (self.held_replies, self.held_bytes) = (0, 0);
        crate::metrics::handles().mux_batches.increment(1);
    }

    /// Hands the first `run` bytes of `rin`, `replies` whole replies, to the front route.
    fn send_run(&mut self, run: usize, replies: usize) {
        let route = self
            .routes
            .front_mut()
            .expect("replies are counted against the front route");
        let frames = self.rin.split_to(run).freeze();
        if let Some((_, tally)) = &mut self.balance {
            tally.count(0, run);
        }
        if !route.dropped {
            route.link.send(frames, replies);
        }
        // A reply handed in parts ends in the first run that counts a whole reply.
        if (replies == 0 || route.part > 0) && route.part + run > PAUSE {
            // A reply this long holds the shared connection, and every client behind it, for
            // as long as it takes to pass: the client's next big one will wait in the server
            // for it alone.
            route.link.pin_next(LARGE_REPLY);
        }
        route.part = if replies == 0 { route.part + run } else { 0 };
        route.replies -= replies;
        self.scanned -= run;
    }

    /// The shared session ended. A client owed a reply to a request the session read is
    /// closed: the request may or may not have run, as on a connection of its own. Requests
    /// the session never read reached no server. If it served before the connection failed
    /// (or it answered errors until a valid token came), they go to the next session, whole
    /// and in order, and their clients see nothing; if the connection could not be opened,
    /// their clients are closed, those never served before after the error a connection of
    /// their own would have given when it was a configuration to fix (a server that is down
    /// closes them without a word). Requests not taken from the channel yet go to the next
    /// session. The next session starts clean.
    pub(super) fn lost(&mut self, outcome: &Outcome) {
        // A session that drained ended because nothing came for a moment: what came just
        // after is served by the next one.
        let retry = self.read_any
            && (outcome.side() == "upstream"
                || matches!(outcome, Outcome::NoCredentials(_) | Outcome::Drained));
        let refusal = match outcome {
            Outcome::UpstreamConnect(e) if !e.transient() => {
                let mut reply = BytesMut::new();
                crate::resp::encode::error(&mut reply, &format!("ERR redis-entra-proxy: {e}"));
                Some((reply.freeze(), e))
            }
            _ => None,
        };
        let skip = usize::from(self.front_started);
        let unread: Vec<(Bytes, usize)> = (self.out.drain(..).skip(skip))
            .chain(self.held.drain(..))
            .collect();
        let unread_routes = self.routes.split_off(self.routes.len() - unread.len());
        let mut closed = HashSet::new();
        for route in self.routes.drain(..) {
            if !route.dropped {
                let _ = route.link.to.send(Delivery::End(Outcome::UpstreamClosed));
            }
            closed.insert(Arc::as_ptr(&route.link));
        }
        self.shut = false;
        (self.front_started, self.read_any) = (false, false);
        (self.held_replies, self.held_bytes) = (0, 0);
        self.batches.clear();
        self.stall = None;
        self.rin = BytesMut::new();
        self.scanned = 0;
        self.scanner = ReplyScanner::new();
        self.push = false;
        for (route, (frames, plain)) in unread_routes.into_iter().zip(unread) {
            if route.dropped || closed.contains(&Arc::as_ptr(&route.link)) {
                continue;
            }
            if retry {
                self.hold_requests(frames, plain, route);
                continue;
            }
            let end = match (&refusal, outcome) {
                (Some((reply, e)), _) => {
                    // A client answered before is closed without a word, as its own
                    // connection would have been closed by the server it lost: client
                    // libraries retry a closed connection, not an error reply. A client that
                    // had no reply yet gets the reason first, as a new connection of its own
                    // would have (before anything else).
                    if !route.link.served() {
                        route.link.send(reply.clone(), 1);
                    }
                    Outcome::UpstreamConnect(e.duplicate())
                }
                // A server that is down: closed without a word, as a connection of the
                // client's own would be (`ConnectError::transient`).
                (None, Outcome::UpstreamConnect(e)) => Outcome::UpstreamConnect(e.duplicate()),
                (None, _) => Outcome::UpstreamClosed,
            };
            let _ = route.link.to.send(Delivery::End(end));
            closed.insert(Arc::as_ptr(&route.link));
        }
    }
}

impl AsyncRead for Router {
    /// The released requests, as many bytes as fit; the end of the stream once the session
    /// shut its end or no client can submit any more.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = &mut *self;
        if r.shut {
            return Poll::Ready(Ok(()));
        }
        r.receive(cx);
        if r.answered_in == Some(r.polls.load(Ordering::Relaxed)) {
            if r.out.is_empty() && r.held_replies > 0 {
                // Poll again once the runtime has run the other ready tasks and polled for
                // I/O (what `yield_now` does for an async fn).
                let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
            }
        } else {
            r.answered_in = None;
            r.release_due();
        }
        if r.out.is_empty() {
            return if r.closed && r.held_replies == 0 {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        }
        let mut runs = r.framing.lock();
        while let Some((front, plain)) = r.out.front_mut() {
            let n = front.len().min(buf.remaining());
            if n == 0 {
                break;
            }
            buf.put_slice(&front[..n]);
            front.advance(n);
            r.read_any = true;
            if front.is_empty() {
                runs.handed(n, *plain);
                r.out.pop_front();
                r.front_started = false;
            } else {
                // Split: neither part is whole requests.
                runs.handed(n, 0);
                *plain = 0;
                r.front_started = true;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Router {
    /// Replies from the session: every whole one goes to its client at once, unless the
    /// client they go to is far behind in reading ([`Router::wait_for_front`]).
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.wait_for_front(cx) {
            // The session stops reading from the server once its buffer for the router is
            // full: the rest of the reply waits in the server, not here.
            return Poll::Pending;
        }
        self.rin.extend_from_slice(buf);
        Poll::Ready(match self.deliver() {
            Ok(()) => Ok(buf.len()),
            Err(why) => {
                tracing::error!("shared connection out of step, closing it: {why}");
                Err(io::Error::other(why))
            }
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shut = true;
        Poll::Ready(Ok(()))
    }
}
