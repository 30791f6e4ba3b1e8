//! What a shared client and its router exchange: the client's requests ([`Submit`]), its
//! replies ([`Delivery`]), and the [`Link`] through which the router tells how far behind the
//! client is in reading them, and whether it pins at its next request.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Context;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{PAUSE, RESUME};
use crate::session::Outcome;

/// Requests of one client for the shared connection, with where their replies go.
pub(super) struct Submit {
    pub(super) frames: Bytes,
    pub(super) replies: usize,
    /// Every request is plain (a command that shares), so `replies` is also their number.
    pub(super) plain: bool,
    pub(super) link: Arc<Link>,
}

pub(super) enum Delivery {
    /// Reply frames, this many whole ones; with 0, part of a big reply (its end comes in a
    /// later delivery, which counts it).
    Replies(Bytes, usize),
    /// The client must close so, without the replies it is still owed (the shared connection
    /// ended before they came, or the client read too slowly).
    End(Outcome),
}

/// What a shared client and the router share: where its replies go, and how far behind it is
/// in reading them.
pub(super) struct Link {
    pub(super) to: mpsc::UnboundedSender<Delivery>,
    /// Bytes handed to the client (by the router, and its local replies) and not yet written
    /// to it.
    unsent: AtomicUsize,
    /// The router, when it waits for the client to catch up ([`Link::behind`]).
    pub(super) router: AtomicWaker,
    /// Why the client pins at its next request, if it does ([`Link::pins`]).
    pin_next: AtomicU8,
    /// The client was handed a reply before ([`Link::served`]).
    served: AtomicBool,
}

/// Values of [`Link::pin_next`]: the router handed the client a reply of more than [`PAUSE`]
/// bytes, or had to wait for it to read.
pub(super) const LARGE_REPLY: u8 = 1;
pub(super) const SLOW_READER: u8 = 2;

impl Link {
    pub(super) fn new(to: mpsc::UnboundedSender<Delivery>) -> Arc<Link> {
        Arc::new(Link {
            to,
            unsent: AtomicUsize::new(0),
            router: AtomicWaker::new(),
            pin_next: AtomicU8::new(0),
            served: AtomicBool::new(false),
        })
    }

    /// The client is to pin at its next request, for `why` (unless it already is, for another
    /// reason).
    pub(super) fn pin_next(&self, why: u8) {
        let _ = self
            .pin_next
            .compare_exchange(0, why, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Why the client pins at its next request (the `reason` of `multiplex_pinned_total`), if
    /// the router decided it does: it was handed a reply long enough to hold every client
    /// behind it while it passed, or the shared connection had to wait for it to read.
    pub(super) fn pins(&self) -> Option<&'static str> {
        match self.pin_next.load(Ordering::Relaxed) {
            0 => None,
            LARGE_REPLY => Some("large_reply"),
            _ => Some("slow_reader"),
        }
    }

    /// Whether the client was handed a reply before (the router's or a local one): for the
    /// client, a connection that worked.
    pub(super) fn served(&self) -> bool {
        self.served.load(Ordering::Relaxed)
    }

    pub(super) fn unsent(&self) -> usize {
        self.unsent.load(Ordering::SeqCst)
    }

    /// `n` more bytes were handed to the client.
    pub(super) fn handed(&self, n: usize) {
        self.served.store(true, Ordering::Relaxed);
        self.unsent.fetch_add(n, Ordering::SeqCst);
    }

    /// Hands the client reply frames, `replies` whole ones (see [`Delivery::Replies`]).
    pub(super) fn send(&self, frames: Bytes, replies: usize) {
        self.handed(frames.len());
        let _ = self.to.send(Delivery::Replies(frames, replies));
    }

    /// `n` bytes were written to the client: the router goes on if it waited for that.
    pub(super) fn written(&self, n: usize) {
        let before = self.unsent.fetch_sub(n, Ordering::SeqCst);
        if before > RESUME && before - n <= RESUME {
            self.router.wake();
        }
    }

    /// Whether the router must wait for the client: it is more than [`PAUSE`] behind (more
    /// than [`RESUME`] once the router is `waiting` for it) and still there. `cx` is then woken
    /// once it caught up to [`RESUME`] or is gone.
    pub(super) fn behind(&self, cx: &Context<'_>, waiting: bool) -> bool {
        let limit = if waiting { RESUME } else { PAUSE };
        if self.unsent() <= limit || self.to.is_closed() {
            return false;
        }
        self.router.register(cx.waker());
        // Checked again: the client may have caught up before the waker was in place.
        self.unsent() > limit && !self.to.is_closed()
    }
}
