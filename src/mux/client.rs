//! A client in its shared phase: reads its requests, decides for each what it gets
//! ([`super::commands`]), submits those that share to its thread's router, writes the replies
//! back in order, and ends the phase when the client leaves, moves to another thread or pins.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::commands::{self, pin_reason, Plan};
use super::link::{Delivery, Link, Submit};
use super::{Carry, Phase, MAX_OWED, MAX_UNSENT, READ_MAX, READ_START};
use crate::gated::Gated;
use crate::resp::request::{Frame, RequestParser};
use crate::secret::Secret;
use crate::session::{self, CloseReason, Outcome, Shared};

/// How long a client the router ended may take to be handed what it was sent before the end
/// (replies received, the error that ended it) before it is closed anyway.
const FLUSH_BEFORE_END: Duration = Duration::from_secs(1);

/// The shared phase of one client. `router(proto)`: the router of this thread for protocol
/// `proto`; `destination()`: the thread the client should move to, if any; `carry`: the
/// state it moved here with.
pub(super) async fn shared_phase<C>(
    client: &mut C,
    shared: &Shared,
    router: impl Fn(u8) -> mpsc::UnboundedSender<Submit>,
    destination: impl Fn() -> Option<usize>,
    carry: Option<Carry>,
) -> Phase
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let carry = carry.unwrap_or_default();
    let proto = carry.proto;
    let password = shared.local_password.clone();
    let mut c = SharedClient::new(carry, password, router(proto));
    let idle = shared.client_idle_timeout;
    let partial = shared.partial_request_timeout;
    // Made once: the loop turns at every change that matters to it, and a new wait on the
    // shutdown at each turn would cost a registration and a removal under its lock; gated,
    // the polls at every wake of the task cost no lock either.
    let mut stop = Gated::new(Box::pin(shared.shutdown.cancelled()));
    let mut draining = shared.shutdown.is_cancelled();
    // Armed once per idle spell, not at every turn of the loop (one per request of a client
    // that waits for each reply): a timer set and cancelled per request would cost more than
    // the buffers it gives back.
    let mut shrink = std::pin::pin!(tokio::time::sleep(session::IDLE_SHRINK));
    let mut shrink_armed = false;
    loop {
        // Draining, the client goes once it is idle: nothing owed, nothing to write, nothing
        // sent for a moment, so that a pipeline written just before the signal is served
        // whole (as a session of its own drains).
        if draining
            && c.owed() == 0
            && c.out.is_empty()
            && c.cin.is_empty()
            && c.last_input.elapsed() >= session::DRAIN_QUIET
        {
            return Phase::Done(Outcome::Drained);
        }
        if c.owed() == 0 {
            if let Some(proto) = c.switch.take() {
                // Nothing is owed on the old protocol's connection: what follows cannot
                // overtake it.
                c.router = router(proto);
                c.proto = proto;
                c.submit();
                continue;
            }
        }
        if c.owed() == 0 && c.out.is_empty() {
            if c.pin {
                let reason = c
                    .pinned_by
                    .unwrap_or_else(|| pin_reason(&c.cin, c.authenticated));
                return Phase::Pin(
                    std::mem::take(&mut c.cin),
                    c.proto,
                    c.name.take(),
                    c.authenticated,
                    reason,
                );
            }
            if !c.reading {
                return Phase::Done(if draining {
                    Outcome::Drained
                } else {
                    Outcome::ClientClosed
                });
            }
            if c.may_move() {
                if let Some(to) = destination() {
                    // Nothing owed, nothing to write: the client can go on elsewhere.
                    return Phase::Move(
                        to,
                        Carry {
                            cin: std::mem::take(&mut c.cin),
                            proto: c.proto,
                            name: c.name.take(),
                            authenticated: c.authenticated,
                        },
                    );
                }
            }
        }
        if !shrink_armed {
            if let Some(at) = c.shrink_at() {
                shrink.as_mut().reset(at);
                shrink_armed = true;
            }
        }
        let deadline = c.deadline(idle, partial);
        // Only ahead: a past one would fire again at once.
        let ending_by = c.ending_by();
        let quiet_at = (draining)
            .then(|| c.last_input + session::DRAIN_QUIET)
            .filter(|at| *at > tokio::time::Instant::now());
        let step = tokio::select! {
            biased;
            step = poll_fn(|cx| c.poll(cx, client)) => step,
            _ = &mut stop, if !draining => {
                draining = true;
                continue;
            }
            _ = sleep_until(quiet_at), if quiet_at.is_some() => continue,
            _ = sleep_until(ending_by), if ending_by.is_some() => {
                if let Some((outcome, _)) = c.ending.take() {
                    return Phase::Done(outcome);
                }
                continue;
            }
            _ = &mut shrink, if shrink_armed => {
                // Input since it was armed moved the moment on: it is armed again for that.
                shrink_armed = false;
                if c.shrink_at().is_some_and(|at| at <= tokio::time::Instant::now()) {
                    c.shrink();
                }
                continue;
            }
            _ = sleep_until(deadline.as_ref().map(|(at, _)| *at)) => {
                // The deadline may have passed while the loop was not looking: it holds only
                // if it still would.
                match c.deadline(idle, partial) {
                    Some((at, reason)) if at <= tokio::time::Instant::now() => {
                        return Phase::Done(Outcome::Closed(reason));
                    }
                    _ => continue,
                }
            }
        };
        if let Some(outcome) = step {
            return Phase::Done(outcome);
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A client in its shared phase. Its bytes are counted in the metrics by the sessions that
/// carry them: the shared session counts what it reads from and writes to the router, a
/// pinned session what it reads (the bytes handed over first included); only requests no
/// session sees are counted here.
pub(super) struct SharedClient {
    pub(super) cin: BytesMut,
    pub(super) chunk: usize,
    pub(super) parser: RequestParser,
    /// Replies submitted for, and received, since the client connected (the difference is
    /// what is owed).
    asked: u64,
    received: u64,
    /// Replies the proxy gives itself (`CLIENT SETINFO`, `AUTH`, …), each after the
    /// `asked` count of replies submitted before it: released into `out` once those came.
    pub(super) locals: VecDeque<(u64, Bytes)>,
    /// The name the client gave itself (`CLIENT SETNAME`, answered by the proxy).
    pub(super) name: Option<Bytes>,
    /// Replies received, not yet written to the client (the front one perhaps in part).
    pub(super) out: VecDeque<Bytes>,
    /// A command that cannot share was read, or the router decided the client pins: submit
    /// nothing more.
    pub(super) pin: bool,
    /// Why it pinned, when the router decided it ([`Link::pins`]).
    pub(super) pinned_by: Option<&'static str>,
    /// The protocol the client speaks (its shared connection's), 2 until it says `HELLO 3`.
    pub(super) proto: u8,
    /// A `HELLO` to this protocol waits (first in `cin`) until nothing is owed on the
    /// current protocol's connection.
    switch: Option<u8>,
    /// Still reading the client (not closed by it, not draining).
    reading: bool,
    /// `--local-password`, which the client must give before anything it sends shares.
    password: Option<Arc<Secret>>,
    /// The client gave it (or there is none).
    pub(super) authenticated: bool,
    /// When bytes last came from the client.
    pub(super) last_input: tokio::time::Instant,
    /// When bytes last moved either way: the client's idle time counts from it, not from a
    /// request whose reply came late.
    last_activity: tokio::time::Instant,
    /// Since when the request at the end of `cin` has been incomplete (reset whenever a
    /// request completes), for `--partial-request-timeout`.
    partial_since: Option<tokio::time::Instant>,
    /// The router ended the client (`Delivery::End`): once the replies received before it
    /// are written (within [`FLUSH_BEFORE_END`]), it closes so.
    ending: Option<(Outcome, tokio::time::Instant)>,
    /// Its buffers were given back, and nothing came since ([`SharedClient::shrink`]).
    shrunk: bool,
    pub(super) router: mpsc::UnboundedSender<Submit>,
    /// Where the router sends the replies, which come in `replies`.
    pub(super) link: Arc<Link>,
    pub(super) replies: mpsc::UnboundedReceiver<Delivery>,
}

impl SharedClient {
    pub(super) fn new(
        carry: Carry,
        password: Option<Arc<Secret>>,
        router: mpsc::UnboundedSender<Submit>,
    ) -> SharedClient {
        let authenticated = carry.authenticated || password.is_none();
        let (to_me, replies) = mpsc::unbounded_channel();
        SharedClient {
            chunk: READ_START,
            parser: RequestParser::new(),
            asked: 0,
            received: 0,
            locals: VecDeque::new(),
            out: VecDeque::new(),
            name: carry.name,
            pin: false,
            pinned_by: None,
            proto: carry.proto,
            switch: None,
            reading: true,
            password,
            authenticated,
            last_input: tokio::time::Instant::now(),
            last_activity: tokio::time::Instant::now(),
            partial_since: None,
            ending: None,
            shrunk: false,
            router,
            link: Link::new(to_me),
            replies,
            cin: carry.cin,
        }
    }

    /// Replies submitted for and not yet received.
    pub(super) fn owed(&self) -> u64 {
        self.asked - self.received
    }

    /// Whether it may go on on another session thread (when nothing is owed to it and nothing
    /// waits to be written): not while a `HELLO` waits to switch protocols, nor once the router
    /// decided that it pins at its next request ([`SharedClient::submit`]).
    pub(super) fn may_move(&self) -> bool {
        self.switch.is_none() && self.link.pins().is_none()
    }

    fn has_room(&self) -> bool {
        self.owed() < MAX_OWED as u64 && self.link.unsent() < MAX_UNSENT
    }

    /// Moves the local replies whose turn has come (every reply submitted before them
    /// received) into `out`.
    fn release_locals(&mut self) {
        while self
            .locals
            .front()
            .is_some_and(|(after, _)| *after <= self.received)
        {
            let (_, reply) = self.locals.pop_front().expect("checked above");
            self.link.handed(reply.len());
            self.out.push_back(reply);
        }
    }

    /// When an idle client gives its buffers back (as sessions do, after
    /// [`session::IDLE_SHRINK`] with nothing sent, nothing owed, nothing to write): thousands
    /// of idle shared clients then cost little memory, and a busy one allocates nothing per
    /// request. `None` while there is nothing to give back.
    pub(super) fn shrink_at(&self) -> Option<tokio::time::Instant> {
        let idle = self.cin.is_empty()
            && self.owed() == 0
            && self.out.is_empty()
            && self.locals.is_empty();
        (idle && !self.shrunk).then(|| self.last_input + session::IDLE_SHRINK)
    }

    /// The next read allocates a buffer of [`READ_START`] again.
    pub(super) fn shrink(&mut self) {
        self.cin = BytesMut::new();
        self.chunk = READ_START;
        self.out = VecDeque::new();
        self.locals = VecDeque::new();
        self.shrunk = true;
    }

    /// When a client ended by the router gives up writing what it had before the end.
    fn ending_by(&self) -> Option<tokio::time::Instant> {
        self.ending.as_ref().map(|(_, by)| *by)
    }

    /// Redis's `timeout` (`idle`), or the limit on one incomplete request (`partial`), with
    /// the close it brings: they run while nothing is owed to the client (the wait is then the
    /// client's), the first from the last byte moved either way, the second from the first
    /// byte of the incomplete request.
    fn deadline(
        &self,
        idle: Option<Duration>,
        partial: Option<Duration>,
    ) -> Option<(tokio::time::Instant, CloseReason)> {
        if self.owed() > 0 || !self.out.is_empty() {
            return None;
        }
        match self.partial_since {
            None => idle.map(|t| (self.last_activity + t, CloseReason::ClientIdle(t))),
            Some(since) => partial.map(|t| (since + t, CloseReason::PartialRequest(t))),
        }
    }

    /// Moves bytes until nothing more can move now (`Pending`). `Ready(None)`: bytes moved and
    /// nothing is owed any more, which the loop must look at (an end, a move, a pin, a
    /// protocol switch, a timer); `Ready(Some)`: the end.
    pub(super) fn poll<C>(&mut self, cx: &mut Context<'_>, client: &mut C) -> Poll<Option<Outcome>>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let mut moved = false;
        loop {
            let mut progress = false;
            while let Poll::Ready(d) = self.replies.poll_recv(cx) {
                match d {
                    Some(Delivery::Replies(frames, n)) => {
                        // The router counted the bytes in `link` as it sent them.
                        self.received += n as u64;
                        self.out.push_back(frames);
                        // A delivery holds replies of one submission: a local reply queued
                        // between two submissions never falls inside one.
                        self.release_locals();
                        progress = true;
                    }
                    // A client too slow to read ends at once; otherwise what came before the
                    // end (the error that ends it, say) goes first.
                    Some(Delivery::End(outcome @ Outcome::Closed(CloseReason::SlowClient(_)))) => {
                        return Poll::Ready(Some(outcome))
                    }
                    Some(Delivery::End(outcome)) => {
                        let by = tokio::time::Instant::now() + FLUSH_BEFORE_END;
                        self.ending = Some((outcome, by));
                        break;
                    }
                    None => return Poll::Ready(Some(Outcome::UpstreamClosed)),
                }
            }
            while !self.out.is_empty() {
                // Every reply waiting, in one write.
                let mut slices = [io::IoSlice::new(&[]); 64];
                let mut count = 0;
                for (slot, chunk) in slices.iter_mut().zip(self.out.iter()) {
                    *slot = io::IoSlice::new(chunk);
                    count += 1;
                }
                match Pin::new(&mut *client).poll_write_vectored(cx, &slices[..count]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Some(Outcome::ClientError(
                            io::ErrorKind::WriteZero.into(),
                        )))
                    }
                    Poll::Ready(Ok(mut n)) => {
                        progress = true;
                        self.last_activity = tokio::time::Instant::now();
                        self.link.written(n);
                        while n > 0 {
                            let front = self.out.front_mut().expect("written bytes were queued");
                            let take = n.min(front.len());
                            front.advance(take);
                            n -= take;
                            if front.is_empty() {
                                self.out.pop_front();
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Outcome::ClientError(e))),
                    Poll::Pending => break,
                }
            }
            if self.out.is_empty() {
                if let Some((outcome, _)) = self.ending.take() {
                    return Poll::Ready(Some(outcome));
                }
            }
            if self.ending.is_some() {
                // Only the replies before the end are left to write.
                return Poll::Pending;
            }
            if self.reading && !self.pin && self.switch.is_none() && self.has_room() {
                self.cin.reserve(self.chunk);
                match tokio_util::io::poll_read_buf(Pin::new(&mut *client), cx, &mut self.cin) {
                    Poll::Ready(Ok(0)) => {
                        self.reading = false;
                        progress = true;
                    }
                    Poll::Ready(Ok(n)) => {
                        if n >= self.chunk {
                            self.chunk = (self.chunk * 2).min(READ_MAX);
                        }
                        let now = tokio::time::Instant::now();
                        (self.last_input, self.last_activity) = (now, now);
                        self.shrunk = false;
                        self.submit();
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Outcome::ClientError(e))),
                    Poll::Pending => {}
                }
            }
            moved |= progress;
            if !progress {
                // While replies are owed, what the loop decides stays as it was (its timers
                // run only while nothing is owed), and they will wake this task again.
                return if moved && self.owed() == 0 {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            }
        }
    }

    /// Sends the complete shareable requests at the front of `cin` to the router (in one
    /// submission, or in two around a request the proxy answers itself, whose reply waits for
    /// those before it); stops at the first request that is not shareable (or malformed: the
    /// pinned session gives Redis's own error for it).
    pub(super) fn submit(&mut self) {
        let before = self.cin.len();
        self.submit_requests();
        // As a session of its own counts it: from the first byte of a request, again
        // whenever one completes. (Complete requests left waiting, for a pin or a protocol
        // switch, wait for replies owed, which suspends the timers.)
        let took = self.cin.len() < before;
        if self.cin.is_empty() {
            self.partial_since = None;
        } else if took || self.partial_since.is_none() {
            self.partial_since = Some(tokio::time::Instant::now());
        }
    }

    fn submit_requests(&mut self) {
        let mut end = 0;
        let mut replies = 0;
        // Every request in `..end` is plain.
        let mut plain = true;
        if let Some(why) = self.link.pins().filter(|_| !self.pin) {
            // Its replies are big, or it reads them slowly: from now on they wait in the
            // server for it alone, on a connection of its own, instead of holding up every
            // client behind it on the shared one.
            self.pin = true;
            self.pinned_by = Some(why);
        }
        while !self.pin && self.switch.is_none() {
            // Redis's limits on what an unauthenticated client may announce hold until the
            // request that authenticates it (the parser is between requests then); set here,
            // before every request, for a new parser as for one in use.
            self.parser.set_auth_required(!self.authenticated);
            match self.parser.parse(&self.cin[end..]) {
                Ok(Some(frame)) => {
                    let plan = match &frame {
                        // Nothing is answered for an empty request: it goes along, ignored.
                        Frame::Empty { .. } => Plan::Share {
                            replies: 0,
                            plain: false,
                        },
                        _ => {
                            let cmd = self.parser.command(&self.cin[end..], &frame);
                            let (plan, authenticates) = commands::plan(
                                &cmd,
                                matches!(frame, Frame::Multibulk { .. }),
                                self.proto,
                                self.name.as_ref(),
                                self.password.as_deref(),
                                self.authenticated,
                            );
                            self.authenticated |= authenticates;
                            plan
                        }
                    };
                    match plan {
                        Plan::Share {
                            replies: n,
                            plain: p,
                        } => {
                            end += frame.len();
                            replies += n;
                            plain &= p;
                        }
                        Plan::Local { reply, name } => {
                            if let Some(name) = name {
                                self.name = name;
                            }
                            // The requests before it go first; its reply comes after theirs.
                            self.send(end, replies, plain);
                            (end, replies, plain) = (0, 0, true);
                            self.cin.advance(frame.len());
                            // The only client bytes no session sees (see `SharedClient`).
                            let m = crate::metrics::handles();
                            m.commands.increment(1);
                            m.client_in.increment(frame.len() as u64);
                            m.client_out.increment(reply.len() as u64);
                            self.locals.push_back((self.asked, reply));
                            self.release_locals();
                        }
                        Plan::Named(name) => {
                            // `HELLO <protocol>` goes in its place, alone: the name stays here.
                            self.send(end, replies, plain);
                            (end, replies, plain) = (0, 0, true);
                            self.cin.advance(frame.len());
                            self.name = name;
                            let mut hello = BytesMut::new();
                            crate::resp::encode::hello(&mut hello, self.proto);
                            // The session counts the bytes of the request it sees.
                            crate::metrics::handles()
                                .client_in
                                .increment(frame.len().saturating_sub(hello.len()) as u64);
                            self.submit_frames(hello.freeze(), 1, false);
                        }
                        Plan::Switch(proto) => self.switch = Some(proto),
                        Plan::Pin => self.pin = true,
                    }
                }
                Ok(None) => {
                    // A request with a big argument does not wait here to be whole: its own
                    // session passes it upstream as it arrives.
                    if self.parser.big_bulk() {
                        self.pin = true;
                    }
                    break;
                }
                Err(_) => self.pin = true,
            }
        }
        self.send(end, replies, plain);
        if self.pin || self.switch.is_some() {
            // The parser may hold state for a request it has not finished: the pinned
            // session (or the next call, on the other connection) parses the bytes again
            // from the start.
            self.parser = RequestParser::new();
        }
    }

    /// Submits whole requests answered with `replies` replies, in one submission; `plain`:
    /// they are all plain (one reply each).
    fn submit_frames(&mut self, frames: Bytes, replies: usize, plain: bool) {
        self.asked += replies as u64;
        let sent = self.router.send(Submit {
            frames,
            replies,
            plain,
            link: self.link.clone(),
        });
        if sent.is_err() {
            // The router is gone (shutdown): the replies will not come.
            let _ = self.link.to.send(Delivery::End(Outcome::UpstreamClosed));
        }
    }

    /// Submits the first `end` bytes of `cin`, whole requests answered with `replies`
    /// replies, in one submission; `plain`: they are all plain.
    pub(super) fn send(&mut self, end: usize, replies: usize, plain: bool) {
        if end > 0 {
            let frames = self.cin.split_to(end).freeze();
            if replies > 0 {
                self.submit_frames(frames, replies, plain);
            } else {
                // Empty requests only: nothing to send, no session sees them.
                crate::metrics::handles()
                    .client_in
                    .increment(frames.len() as u64);
            }
        }
    }
}

impl Drop for SharedClient {
    /// The router may be waiting for this client to read: it goes on, and drops what it reads
    /// for it from now on.
    fn drop(&mut self) {
        self.replies.close();
        self.link.router.wake();
    }
}
