//! The connection state the session core tracks: what Redis would consider the state of the
//! upstream connection, as far as it decides how replies are classified and whether an
//! injected `AUTH` is safe (see `protocol-rules.md`, "Where an injected AUTH is safe").
//!
//! Two clocks matter. Write-side facts (in MULTI, one-shot flags, QUIT) change when the proxy
//! writes a command; read-side facts (protocol version, subscriptions, MONITOR) change when
//! the reply that establishes them is read, because only then do they describe the frames
//! that follow.

use std::collections::HashSet;

use super::ledger::SubKind;

/// `CLIENT REPLY` mode, emulated by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplyMode {
    #[default]
    On,
    Off,
    /// The next command's reply is dropped.
    Skip,
}

/// Subscription counts as the server reported them in confirmations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subscriptions {
    pub channels: u64,
    pub patterns: u64,
    pub shard: u64,
}

impl Subscriptions {
    pub fn any(&self) -> bool {
        self.channels + self.patterns + self.shard > 0
    }

    pub fn of(&self, kind: SubKind) -> u64 {
        match kind {
            SubKind::Channel => self.channels,
            SubKind::Pattern => self.patterns,
            SubKind::Shard => self.shard,
        }
    }

    /// Applies the count carried by a confirmation. For channels and patterns Redis reports
    /// their sum; for shard channels their own count.
    pub fn confirm(&mut self, kind: SubKind, count: u64) {
        match kind {
            SubKind::Channel => self.channels = count.saturating_sub(self.patterns),
            SubKind::Pattern => self.patterns = count.saturating_sub(self.channels),
            SubKind::Shard => self.shard = count,
        }
    }
}

/// Subscriptions as predicted from the commands written: what the server's subscription
/// sets will be when it processes the next command written.
#[derive(Debug, Clone, Default)]
pub struct PredictedSubs {
    sets: [HashSet<Box<[u8]>>; 3],
}

impl PredictedSubs {
    fn set(&mut self, kind: SubKind) -> &mut HashSet<Box<[u8]>> {
        &mut self.sets[kind as usize]
    }

    pub fn subscribe(&mut self, kind: SubKind, names: impl Iterator<Item = Box<[u8]>>) {
        self.set(kind).extend(names);
    }

    /// Removes the named subscriptions, or all of the kind when `names` is empty.
    pub fn unsubscribe(&mut self, kind: SubKind, names: &[&[u8]]) {
        let set = self.set(kind);
        if names.is_empty() {
            set.clear();
        } else {
            for n in names {
                set.remove(*n);
            }
        }
    }

    pub fn any(&self) -> bool {
        self.sets.iter().any(|s| !s.is_empty())
    }

    pub fn clear(&mut self) {
        self.sets.iter_mut().for_each(HashSet::clear);
    }
}

#[derive(Debug, Clone, Default)]
pub struct ConnState {
    /// Read side: RESP version of the connection (2 until a HELLO 3 succeeds).
    pub proto: u8,
    /// Read side: confirmed subscriptions.
    pub subs: Subscriptions,
    /// Read side: MONITOR's reply was read; every later frame is a monitor line.
    pub monitor: bool,
    /// Write side: MULTI written, EXEC/DISCARD/RESET not yet.
    pub in_multi: bool,
    /// Write side: a command inside the current MULTI was refused by the proxy, so EXEC must
    /// fail with EXECABORT as Redis would.
    pub multi_dirty: bool,
    /// Write side: a HELLO queued in the current MULTI switches to this version at EXEC.
    pub multi_hello: Option<u8>,
    /// Write side: the last command written was ASKING or CLIENT CACHING, whose effect lasts
    /// for exactly the next command.
    pub one_shot: bool,
    /// Read side: the upstream speaks RESP3 to a client that speaks RESP2 (a RESP2
    /// subscriber the proxy moved to RESP3 so that it can be re-authenticated): translate.
    pub translate: bool,
    /// Write side: the protocol the upstream will speak when it processes the next command.
    pub wproto: u8,
    /// Write side: the upstream was switched to RESP3 for a RESP2 subscriber.
    pub emulating: bool,
    /// The server refused `HELLO 3`: RESP2 subscribers stay RESP2 on this connection.
    pub resp3_refused: bool,
    /// Write side: the subscriptions the server will hold.
    pub wsubs: PredictedSubs,
    /// Write side: MONITOR written; no AUTH may follow it.
    pub monitor_sent: bool,
    /// Write side: QUIT seen; nothing more is read from the client.
    pub quit: bool,
    /// Write side: the emulated CLIENT REPLY mode.
    pub reply_mode: ReplyMode,
}

impl ConnState {
    pub fn new() -> Self {
        ConnState {
            proto: 2,
            wproto: 2,
            ..Default::default()
        }
    }

    /// The protocol the client believes it speaks (write side).
    pub fn client_proto(&self) -> u8 {
        if self.emulating {
            2
        } else {
            self.wproto
        }
    }

    /// Whether the server would treat the client as a RESP2 subscriber for the next command
    /// (and so refuse everything but (P|S)(UN)SUBSCRIBE, PING, QUIT and RESET).
    pub fn client_resp2_subscribed(&self) -> bool {
        self.client_proto() == 2 && self.wsubs.any()
    }
}
