//! The connection state the session core tracks: what Redis would consider the state of the
//! upstream connection, as far as it decides how replies are classified and whether an
//! injected `AUTH` is safe (see `protocol-rules.md`, "Where an injected AUTH is safe").
//!
//! Two clocks matter. Write-side facts (in MULTI, one-shot flags, QUIT) change when the proxy
//! writes a command; read-side facts (protocol version, subscriptions, MONITOR) change when
//! the reply that establishes them is read, because only then do they describe the frames
//! that follow.
//!
//! A command whose effect on the state depends on whether the server accepts it, and which
//! changes what the proxy must do with the commands after it (subscribing, `MONITOR`,
//! `RESET`), is a barrier: the commands behind it wait until it is answered, and are then
//! judged on what the server did, not on a guess. Such commands are rare and seldom
//! pipelined, so the round trip this costs them does not show.

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

/// The channels, patterns and shard channels the server confirmed, by name: every
/// confirmation names one, including those the server sends on its own (a shard channel
/// whose slot moved away).
#[derive(Debug, Clone, Default)]
pub struct Subscriptions {
    sets: [HashSet<Box<[u8]>>; 3],
}

impl Subscriptions {
    /// Applies one confirmation; an unsubscribe from nothing names no channel.
    pub fn confirm(&mut self, kind: SubKind, subscribe: bool, name: Option<&[u8]>) {
        let Some(name) = name else { return };
        let set = &mut self.sets[kind as usize];
        if subscribe {
            set.insert(name.into());
        } else {
            set.remove(name);
        }
    }

    pub fn any(&self) -> bool {
        self.sets.iter().any(|s| !s.is_empty())
    }

    /// How many of `kind` the server holds: what an unsubscribe-all of that kind confirms
    /// one by one.
    pub fn count(&self, kind: SubKind) -> usize {
        self.sets[kind as usize].len()
    }

    pub fn contains(&self, kind: SubKind, name: &[u8]) -> bool {
        self.sets[kind as usize].contains(name)
    }

    pub fn clear(&mut self) {
        self.sets.iter_mut().for_each(HashSet::clear);
    }
}

#[derive(Debug, Clone, Default)]
pub struct ConnState {
    /// Read side: RESP version of the connection (2 until a HELLO 3 succeeds).
    pub proto: u8,
    /// MONITOR succeeded: monitor lines come between the replies.
    pub monitor: bool,
    /// A barrier (see above) was written and is not answered yet: no client command is
    /// taken and nothing is injected.
    pub barrier: bool,
    /// Write side: MULTI written, EXEC/DISCARD/RESET not yet.
    pub in_multi: bool,
    /// Counts the transactions opened, so that a refused MULTI ends its own only.
    pub multi_seq: u32,
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
    /// The subscriptions the server holds. Subscribing is a barrier, so when a client command
    /// is judged, this is also what the server will hold when it runs it.
    pub subs: Subscriptions,
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
        self.client_proto() == 2 && self.subs.any()
    }
}
