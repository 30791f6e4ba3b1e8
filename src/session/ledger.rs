//! The ledger: a FIFO of the replies the proxy expects from the upstream, one entry per
//! command it wrote, in the order it wrote them, plus entries that consume no upstream reply
//! (local answers, mode changes, close) slotted where they belong in the reply stream.
//!
//! Redis answers a connection's commands in order, so this FIFO is exact; push frames and
//! pub/sub messages bypass it (the session core classifies them before looking here).

use std::collections::VecDeque;

use bytes::Bytes;

/// Which family of subscription a confirmation belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum SubKind {
    Channel,
    Pattern,
    Shard,
}

impl SubKind {
    /// Parses the first element of a confirmation: `(kind, is_subscribe)`.
    pub fn from_ack(name: &[u8]) -> Option<(SubKind, bool)> {
        Some(match name {
            b"subscribe" => (SubKind::Channel, true),
            b"unsubscribe" => (SubKind::Channel, false),
            b"psubscribe" => (SubKind::Pattern, true),
            b"punsubscribe" => (SubKind::Pattern, false),
            b"ssubscribe" => (SubKind::Shard, true),
            b"sunsubscribe" => (SubKind::Shard, false),
            _ => return None,
        })
    }
}

/// Something to do when a relayed reply arrives and is not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    /// A `HELLO <ver>` succeeded: the connection now speaks RESP `ver`.
    Hello(u8),
    /// `MONITOR` succeeded: every later frame is a monitor line.
    Monitor,
    /// `RESET` succeeded: RESP2, no subscriptions, not monitoring.
    Reset,
    /// `PING` from a RESP2 subscriber on an upstream switched to RESP3: answer as RESP2 does
    /// in subscribed mode, `["pong", <arg or "">]`.
    Pong,
}

/// What the proxy injected, and so must check and swallow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// `AUTH <user> <token>` with credentials of this generation; `initial` for the first AUTH
    /// of the connection, whose failure the client must hear about; the token's expiry and
    /// when the AUTH was written travel with it, since a RESET can put a second AUTH in flight
    /// behind the first.
    Auth {
        generation: u64,
        initial: bool,
        expires_at: Option<std::time::SystemTime>,
        sent: std::time::Instant,
    },
    /// `HELLO <version>` switching the upstream's protocol for a RESP2 subscriber
    /// (`emulate`: to RESP3 and translate; otherwise back to RESP2).
    Hello { version: u8, emulate: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The reply to a client command: relay it, or drop it when the client turned replies off
    /// (`CLIENT REPLY OFF`/`SKIP`, emulated by the proxy). The effect applies either way.
    Reply { effect: Effect, relay: bool },
    /// The reply to a command the proxy injected: check it, never relay it.
    Swallow(Injected),
    /// Subscription confirmations of `kind`: `remaining` of them, or, for an unsubscribe with
    /// no argument, as many as the connection has subscriptions of that kind when the entry
    /// reaches the front (at least one). An error reply replaces them all; `relay` applies to
    /// that error only, since Redis sends confirmations even under `CLIENT REPLY OFF`.
    Acks {
        kind: SubKind,
        subscribe: bool,
        remaining: Option<u32>,
        relay: bool,
    },
    /// A reply the proxy answers itself; consumes nothing from the upstream.
    Local(Bytes),
    /// Close the client connection once everything before this has been relayed.
    Close,
}

#[derive(Debug, Default)]
pub struct Ledger {
    entries: VecDeque<Expect>,
}

impl Ledger {
    pub fn push(&mut self, e: Expect) {
        self.entries.push_back(e);
    }

    pub fn front(&self) -> Option<&Expect> {
        self.entries.front()
    }

    pub fn front_mut(&mut self) -> Option<&mut Expect> {
        self.entries.front_mut()
    }

    pub fn pop(&mut self) -> Option<Expect> {
        self.entries.pop_front()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Replies the client still waits for (excluding injected ones).
    pub fn client_pending(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| !matches!(e, Expect::Swallow(_) | Expect::Close))
            .count()
    }

    /// Releases the capacity of an empty ledger (a deep pipeline leaves a large one behind).
    pub fn shrink(&mut self) {
        if self.entries.is_empty() {
            self.entries = VecDeque::new();
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}
