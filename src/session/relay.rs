//! The byte-moving half of a session ([`Io`]): its buffers, and the poll that moves bytes
//! between the client, the sans-IO core and the upstream until nothing more can move now.
//! The driver's loop (`pump` in `session.rs`) owns the timers around it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::{record_auth, Core, Framing, Outcome, Shared};
use super::{DRAIN_QUIET, READ_CHUNK, READ_CHUNK_MIN, YIELD_AFTER};
use crate::admin::Health;
use crate::metrics;

/// What the driver's timers depend on: when it changes during a poll, the poll returns so
/// that the timers are recomputed. (A timer that fires early finds its condition unmet and
/// is simply recomputed.)
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Timers {
    pub(super) reauth_failed: bool,
    pub(super) close_deadline: Option<SystemTime>,
    /// Nothing owed to the client, nothing buffered from it, not streaming.
    pub(super) idle: bool,
    partial: bool,
}

/// The byte-moving half of a session: buffers and the poll loop.
pub(super) struct Io {
    /// Whether `Timers::idle` matters (`--client-idle-timeout` is set). It flips twice per
    /// request, and every flip costs a turn of the driver's loop (its futures and timer set up
    /// again), so it is left out when nothing waits on it.
    track_idle: bool,
    /// What the client says of the bytes in `cin` (the router of shared clients).
    pub(super) framing: Option<Framing>,
    pub(super) cin: BytesMut,
    uin: BytesMut,
    /// False once the client half-closed.
    pub(super) reading_client: bool,
    /// The proxy is shutting down: close as soon as the connection is idle (nothing owed to
    /// the client, no partial command buffered, nothing more to read right now).
    pub(super) draining: bool,
    /// When the client last sent something.
    pub(super) last_client_input: Instant,
    /// When either side last sent something.
    pub(super) last_activity: Instant,
    /// Room reserved before the next read of each side (see [`READ_CHUNK_MIN`]).
    cin_chunk: usize,
    uin_chunk: usize,
    /// Most bytes read from the client at once.
    cin_max: usize,
    /// `cin` holds only the beginning of a request: the core waits for the client.
    cin_partial: bool,
    /// Since when the client has kept the current request incomplete (reset whenever a
    /// request completes), for `--partial-request-timeout`.
    pub(super) partial_since: Option<Instant>,
    /// Buffers were released after idleness and not needed since.
    pub(super) shrunk: bool,
    upstream_unflushed: bool,
}

impl Io {
    pub(super) fn new(shared: &Shared, read_max: usize, framing: Option<Framing>) -> Io {
        Io {
            cin: BytesMut::new(),
            uin: BytesMut::new(),
            cin_chunk: READ_CHUNK_MIN,
            uin_chunk: READ_CHUNK_MIN,
            cin_max: read_max,
            reading_client: true,
            draining: false,
            last_client_input: Instant::now(),
            last_activity: Instant::now(),
            cin_partial: false,
            partial_since: None,
            shrunk: false,
            upstream_unflushed: false,
            track_idle: shared.client_idle_timeout.is_some(),
            framing,
        }
    }

    pub(super) fn timers(&self, core: &Core) -> Timers {
        Timers {
            reauth_failed: core.reauth_failed(),
            close_deadline: core.close_deadline(),
            idle: self.track_idle
                && core.idle()
                && core.to_client.is_empty()
                && self.cin.is_empty()
                && !core.streaming()
                && core.close_reason().is_none(),
            partial: self.partial_since.is_some(),
        }
    }

    /// Hands buffered client bytes to the core; returns whether it took any.
    fn feed_client(&mut self, core: &mut Core) -> bool {
        let before = self.cin.len();
        let commands = core.stats.commands;
        match &self.framing {
            Some(framing) => {
                let mut runs = framing.lock();
                core.client_input_framed(&mut self.cin, Some(&mut runs));
                debug_assert_eq!(runs.pending(), self.cin.len(), "runs out of step");
            }
            None => core.client_input(&mut self.cin),
        }
        metrics::handles()
            .commands
            .increment(core.stats.commands - commands);
        let took = self.cin.len() != before;
        // Bytes left while the core still wants input are an incomplete request (as is a
        // big one passed on as it arrives, with nothing left); bytes left because the
        // upstream side is full are complete requests that wait for room.
        self.cin_partial =
            (!self.cin.is_empty() || core.mid_request()) && core.wants_client_input();
        if !self.cin_partial {
            self.partial_since = None;
        } else if took || self.partial_since.is_none() {
            self.partial_since = Some(Instant::now());
        }
        took
    }

    /// Releases every empty buffer; the next read allocates again.
    pub(super) fn shrink(&mut self, core: &mut Core) {
        if self.cin.is_empty() {
            self.cin = BytesMut::new();
        }
        if self.uin.is_empty() {
            self.uin = BytesMut::new();
        }
        self.cin_chunk = READ_CHUNK_MIN;
        self.uin_chunk = READ_CHUNK_MIN;
        core.shrink();
        self.shrunk = true;
    }

    pub(super) fn poll<C, U>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        upstream: &mut U,
        core: &mut Core,
        timers: Timers,
        health: &Health,
    ) -> Poll<Option<Outcome>>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let m = metrics::handles();
        // Bytes read from the upstream in this poll.
        let mut read = 0;
        loop {
            if read >= YIELD_AFTER {
                // Polled again once the runtime has run its other ready tasks and polled for
                // I/O, as `yield_now` is.
                let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
                return Poll::Pending;
            }
            let mut progress = false;
            match write_out(cx, &mut *client, &mut core.to_client, &m.client_out) {
                Ok(n) => progress |= n > 0,
                Err(e) => return Poll::Ready(Some(Outcome::ClientError(e))),
            }
            if core.to_client.is_empty() {
                if let Some(reason) = core.close_reason() {
                    return Poll::Ready(Some(Outcome::Closed(reason.clone())));
                }
                // Half-closed: done once every request read was answered (a trailing partial
                // request will never complete), or once what is left starts with a command
                // that may be waiting for other clients: Redis drops a blocked client that
                // closed, and closing the upstream connection has the server do the same.
                if !self.reading_client
                    && (core.next_reply_blocks()
                        || core.idle() && (self.cin.is_empty() || self.cin_partial))
                {
                    return Poll::Ready(Some(Outcome::ClientClosed));
                }
            }
            match write_out(cx, &mut *upstream, &mut core.to_upstream, &m.upstream_out) {
                Ok(0) => {}
                Ok(_) => {
                    self.upstream_unflushed = true;
                    progress = true;
                }
                Err(e) => return Poll::Ready(Some(Outcome::UpstreamError(e))),
            }
            if self.upstream_unflushed {
                // TLS buffers records until flushed.
                match Pin::new(&mut *upstream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.upstream_unflushed = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Outcome::UpstreamError(e))),
                    Poll::Pending => {}
                }
            }
            // Complete requests held back while the upstream side was full.
            if !self.cin.is_empty() && !self.cin_partial && core.wants_client_input() {
                progress |= self.feed_client(core);
            }
            if self.reading_client && core.wants_client_input() {
                self.cin.reserve(self.cin_chunk);
                match tokio_util::io::poll_read_buf(Pin::new(&mut *client), cx, &mut self.cin) {
                    Poll::Ready(Ok(0)) => {
                        core.client_closed();
                        return Poll::Ready(Some(Outcome::ClientClosed));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.last_client_input = Instant::now();
                        self.last_activity = self.last_client_input;
                        self.shrunk = false;
                        m.client_in.increment(n as u64);
                        if n >= self.cin_chunk {
                            self.cin_chunk = (self.cin_chunk * 2).min(self.cin_max);
                        }
                        self.feed_client(core);
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Outcome::ClientError(e))),
                    Poll::Pending => {}
                }
            }
            if !self.uin.is_empty() && core.wants_upstream_input() {
                // Bytes held back while the client was slow.
                let before = self.uin.len();
                core.upstream_input(&mut self.uin);
                progress |= self.uin.len() != before;
            }
            if core.wants_upstream_input() {
                self.uin.reserve(self.uin_chunk);
                match tokio_util::io::poll_read_buf(Pin::new(&mut *upstream), cx, &mut self.uin) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Some(Outcome::UpstreamClosed)),
                    Poll::Ready(Ok(n)) => {
                        m.upstream_in.increment(n as u64);
                        read += n;
                        if n >= self.uin_chunk {
                            self.uin_chunk = (self.uin_chunk * 2).min(READ_CHUNK);
                        }
                        self.last_activity = Instant::now();
                        self.shrunk = false;
                        core.upstream_input(&mut self.uin);
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Outcome::UpstreamError(e))),
                    Poll::Pending => {}
                }
            }
            record_auth(core, health);
            if self.timers(core) != timers {
                return Poll::Ready(None);
            }
            if !progress {
                // Reads returned Pending above: the client has nothing more in flight.
                if self.draining
                    && core.idle()
                    && core.to_client.is_empty()
                    && self.cin.is_empty()
                    && self.last_client_input.elapsed() >= DRAIN_QUIET
                {
                    return Poll::Ready(Some(Outcome::Drained));
                }
                return Poll::Pending;
            }
        }
    }
}

/// Writes `buf` to `to` until it is empty or `to` is not ready, taking what was written from
/// it and counting it in `counted` as it goes: how many bytes that was. A write of nothing is
/// an error (`WriteZero`).
fn write_out<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    to: &mut W,
    buf: &mut BytesMut,
    counted: &::metrics::Counter,
) -> io::Result<usize> {
    let mut written = 0;
    while !buf.is_empty() {
        match Pin::new(&mut *to).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                counted.increment(n as u64);
                written += n;
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(written)
}
