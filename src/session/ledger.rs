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
    /// `MONITOR` succeeded: monitor lines come between the replies.
    Monitor,
    /// `RESET` succeeded: RESP2, no subscriptions, not monitoring, not in MULTI, replies on,
    /// and the connection de-authenticated.
    Reset,
    /// The `MULTI` that opened the transaction of this number; refused, it opened none.
    Multi(u32),
    /// `PING` from a RESP2 subscriber on an upstream switched to RESP3: answer as RESP2 does
    /// in subscribed mode, `["pong", <arg or "">]`.
    Pong,
    /// A cluster topology reply whose node addresses must be made local (cluster mode).
    Topology(crate::cluster::Topology),
    /// The reply to a command that may wait for other clients (`BLPOP`, `XREAD BLOCK`,
    /// `WAIT`…). A client that leaves while it is the next reply owed is not waited for:
    /// Redis drops a blocked client that closed its connection, and a command kept running
    /// for it would still take the element another client was to get.
    Blocks,
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
    /// `CLIENT SETNAME <name>` naming the connection of a multiplexed client that pinned as
    /// it named itself while it shared one.
    SetName,
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

/// Consecutive plain replies (no effect) share one entry with a count, so a client that
/// pipelines millions of ordinary commands without reading costs the ledger one entry, not
/// one per command: its memory stays bounded by what is special in the stream.
#[derive(Debug, Default)]
pub struct Ledger {
    entries: VecDeque<(Expect, u32)>,
    /// Sum of the counts.
    total: usize,
    /// How many of them are injected or `Close` (no client reply).
    not_client: usize,
}

fn mergeable(e: &Expect) -> bool {
    matches!(
        e,
        Expect::Reply {
            effect: Effect::None,
            ..
        }
    )
}

fn counts_for_client(e: &Expect) -> bool {
    !matches!(e, Expect::Swallow(_) | Expect::Close)
}

impl Ledger {
    pub fn push(&mut self, e: Expect) {
        self.total += 1;
        if !counts_for_client(&e) {
            self.not_client += 1;
        }
        if let Some((last, n)) = self.entries.back_mut() {
            if *n < u32::MAX && mergeable(&e) && *last == e {
                *n += 1;
                return;
            }
        }
        self.entries.push_back((e, 1));
    }

    /// `n` entries `e` (`e` mergeable), as `n` pushes would.
    pub fn push_many(&mut self, e: Expect, n: usize) {
        debug_assert!(mergeable(&e));
        self.total += n;
        if !counts_for_client(&e) {
            self.not_client += n;
        }
        let mut left = n;
        if let Some((last, count)) = self.entries.back_mut() {
            if *last == e {
                let add = left.min((u32::MAX - *count) as usize);
                *count += add as u32;
                left -= add;
            }
        }
        while left > 0 {
            let add = left.min(u32::MAX as usize);
            self.entries.push_back((e.clone(), add as u32));
            left -= add;
        }
    }

    /// The first entry that is a reply to the client (injected commands' replies, and
    /// `Close`, skipped).
    pub fn next_for_client(&self) -> Option<&Expect> {
        self.entries
            .iter()
            .map(|(e, _)| e)
            .find(|e| counts_for_client(e))
    }

    pub fn front(&self) -> Option<&Expect> {
        self.entries.front().map(|(e, _)| e)
    }

    /// The front entry alone (split from its run, so that changing it changes one reply).
    pub fn front_mut(&mut self) -> Option<&mut Expect> {
        if let Some((e, n)) = self.entries.front_mut() {
            if *n > 1 {
                *n -= 1;
                let one = e.clone();
                self.entries.push_front((one, 1));
            }
        }
        self.entries.front_mut().map(|(e, _)| e)
    }

    pub fn pop(&mut self) -> Option<Expect> {
        self.take(false)
    }

    /// Takes back the newest entry (a command that will not reach the server whole).
    pub fn pop_newest(&mut self) -> Option<Expect> {
        self.take(true)
    }

    /// Takes one entry off the oldest end, or the `newest`.
    #[inline]
    fn take(&mut self, newest: bool) -> Option<Expect> {
        let (e, n) = if newest {
            self.entries.back_mut()?
        } else {
            self.entries.front_mut()?
        };
        let e = if *n > 1 {
            *n -= 1;
            e.clone()
        } else if newest {
            self.entries.pop_back()?.0
        } else {
            self.entries.pop_front()?.0
        };
        self.total -= 1;
        if !counts_for_client(&e) {
            self.not_client -= 1;
        }
        Some(e)
    }

    /// Drops the front entry when it is a plain reply (no effect), without handing it out:
    /// the common case of every relayed reply, kept cheap. Returns whether it did.
    pub fn pop_plain(&mut self) -> bool {
        let Some((e, n)) = self.entries.front_mut() else {
            return false;
        };
        if !mergeable(e) {
            return false;
        }
        if *n > 1 {
            *n -= 1;
        } else {
            self.entries.pop_front();
        }
        self.total -= 1;
        true
    }

    pub fn len(&self) -> usize {
        self.total
    }

    /// Bytes of the replies the proxy answered itself that wait behind others.
    pub fn local_bytes(&self) -> usize {
        (self.entries.iter())
            .map(|(e, n)| match e {
                Expect::Local(bytes) => bytes.len() * *n as usize,
                _ => 0,
            })
            .sum()
    }

    /// Replies the client still waits for (excluding injected ones).
    pub fn client_pending(&self) -> usize {
        self.total - self.not_client
    }

    /// Releases the capacity of an empty ledger (a deep pipeline leaves a large one behind).
    pub fn shrink(&mut self) {
        if self.entries.is_empty() {
            self.entries = VecDeque::new();
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.total = 0;
        self.not_client = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> Expect {
        Expect::Reply {
            effect: Effect::None,
            relay: true,
        }
    }

    #[test]
    fn plain_replies_share_one_entry_and_come_out_one_by_one() {
        let mut l = Ledger::default();
        for _ in 0..1_000_000 {
            l.push(plain());
        }
        l.push(Expect::Close);
        l.push(plain());
        assert_eq!(l.entries.len(), 3, "runs, not one entry per command");
        assert_eq!((l.len(), l.client_pending()), (1_000_002, 1_000_001));
        for _ in 0..1_000_000 {
            assert_eq!(l.pop(), Some(plain()));
        }
        assert_eq!(l.pop(), Some(Expect::Close));
        assert_eq!((l.len(), l.client_pending()), (1, 1));
        assert_eq!(l.pop(), Some(plain()));
        assert_eq!((l.pop(), l.len(), l.client_pending()), (None, 0, 0));
    }

    #[test]
    fn changing_the_front_changes_one_reply_of_a_run() {
        let mut l = Ledger::default();
        l.push(plain());
        l.push(plain());
        if let Some(Expect::Reply { relay, .. }) = l.front_mut() {
            *relay = false;
        }
        assert_eq!(
            l.pop(),
            Some(Expect::Reply {
                effect: Effect::None,
                relay: false
            })
        );
        assert_eq!(l.pop(), Some(plain()));
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn pop_plain_takes_only_plain_replies() {
        let mut l = Ledger::default();
        l.push(plain());
        l.push(plain());
        l.push(Expect::Close);
        assert!(l.pop_plain());
        assert_eq!((l.len(), l.client_pending()), (2, 1));
        assert!(l.pop_plain());
        assert!(!l.pop_plain(), "Close is not a plain reply");
        assert_eq!(l.pop(), Some(Expect::Close));
        assert!(!l.pop_plain());
        assert_eq!((l.len(), l.client_pending()), (0, 0));
    }
}
