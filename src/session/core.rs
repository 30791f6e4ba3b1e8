//! The sans-IO session core: everything one proxied connection decides, with no sockets.
//!
//! Inputs: client bytes ([`Core::client_input`]), upstream bytes ([`Core::upstream_input`]),
//! new credentials ([`Core::set_credentials`]). Outputs: [`Core::to_upstream`],
//! [`Core::to_client`], and a close decision ([`Core::close_reason`]). The async driver in
//! `session.rs` only moves bytes between sockets and these buffers.
//!
//! Client commands are framed by the Redis-exact parser and mostly forwarded byte for byte;
//! each forwarded command gets a ledger entry. Upstream replies are framed by the streaming
//! scanner and matched against the ledger: relayed, dropped, or swallowed (the proxy's own
//! AUTH). Pushes and pub/sub messages bypass the ledger. Command handling lives in
//! `commands.rs`; this file owns the reply side and re-authentication.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};

use super::ledger::{Effect, Expect, Injected, Ledger, SubKind};
use super::state::ConnState;
use crate::credentials::Credentials;
use crate::resp::reply::{peek_head, First, Head, ReplyScanner};
use crate::resp::request::{Frame, ProtocolError, RequestParser};
use crate::secret::Secret;

/// Bytes waiting for the client beyond which the proxy stops reading the upstream, so a
/// client that reads slowly holds Redis's output buffer, not the proxy's memory.
pub const CLIENT_OUT_HIGH_WATER: usize = 256 * 1024;
/// Bytes waiting for the upstream beyond which the proxy stops reading the client.
pub const UPSTREAM_OUT_HIGH_WATER: usize = 256 * 1024;

/// Why the core wants the connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent QUIT.
    ClientQuit,
    /// The client sent bytes Redis would refuse; it got Redis's error first.
    ClientProtocol(ProtocolError),
    /// The upstream refused the proxy's first AUTH; the text is the server's error line.
    UpstreamAuth(String),
    /// The upstream sent bytes that are not RESP.
    UpstreamProtocol(String),
    /// The upstream sent a reply no command asked for: the stream cannot be trusted.
    UpstreamDesync,
}

impl CloseReason {
    /// Which side caused the close, for logs and metrics.
    pub fn side(&self) -> &'static str {
        match self {
            CloseReason::ClientQuit | CloseReason::ClientProtocol(_) => "client",
            _ => "upstream",
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::ClientQuit => "client_quit",
            CloseReason::ClientProtocol(_) => "client_protocol_error",
            CloseReason::UpstreamAuth(_) => "upstream_auth_failed",
            CloseReason::UpstreamProtocol(_) => "upstream_protocol_error",
            CloseReason::UpstreamDesync => "upstream_desync",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::ClientQuit => f.write_str("client sent QUIT"),
            CloseReason::ClientProtocol(e) => write!(f, "client protocol error: {e}"),
            CloseReason::UpstreamAuth(e) => write!(f, "upstream refused AUTH: {e}"),
            CloseReason::UpstreamProtocol(e) => write!(f, "upstream protocol error: {e}"),
            CloseReason::UpstreamDesync => f.write_str("upstream sent a reply nobody asked for"),
        }
    }
}

/// Counters the driver turns into metrics and logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub commands: u64,
    pub reauth_ok: u64,
    pub reauth_failed: u64,
}

/// What to do with the upstream frame being scanned.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Answers the ledger's front entry.
    Reply { error: bool, mode: Mode },
    /// A subscription confirmation (held whole to read its count).
    Ack { kind: SubKind, subscribe: bool },
    /// A message or push nobody asked for: relay.
    Unsolicited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Relay,
    Drop,
    Hold,
}

#[derive(Debug)]
pub struct Core {
    pub(super) parser: RequestParser,
    scanner: ReplyScanner,
    pub(super) ledger: Ledger,
    pub(super) state: ConnState,
    /// Password clients must AUTH with (`--local-password`); `None` accepts any AUTH.
    pub(super) local_password: Option<Arc<Secret>>,
    pub(super) client_authenticated: bool,
    /// Whether the client's current command may produce output (CLIENT REPLY emulation).
    pub(super) relay_current: bool,
    /// The newest credentials; the upstream must end up authenticated with them.
    pub(super) creds: Arc<Credentials>,
    /// Generation of the credentials of the last AUTH the upstream accepted.
    authed_generation: Option<u64>,
    /// Generation of an AUTH written and not yet answered.
    auth_in_flight: Option<u64>,
    /// A re-AUTH with the current generation failed; it is not retried until new credentials
    /// arrive or the driver calls [`Core::retry_reauth`].
    reauth_failed: bool,
    role: Option<Role>,
    /// Bytes of the frame being scanned when it must be seen whole.
    held: BytesMut,
    closing: Option<CloseReason>,
    /// The reason to report when the ledger's `Close` entry is reached.
    pending_close: Option<CloseReason>,
    pub to_upstream: BytesMut,
    pub to_client: BytesMut,
    pub stats: Stats,
}

impl Core {
    /// A core for a fresh upstream connection; the first AUTH is written at once, so client
    /// commands are pipelined behind it.
    pub fn new(creds: Arc<Credentials>, local_password: Option<Arc<Secret>>) -> Self {
        let mut parser = RequestParser::new();
        parser.set_auth_required(local_password.is_some());
        let mut core = Core {
            parser,
            scanner: ReplyScanner::new(),
            ledger: Ledger::default(),
            state: ConnState::new(),
            client_authenticated: local_password.is_none(),
            local_password,
            relay_current: true,
            creds,
            authed_generation: None,
            auth_in_flight: None,
            reauth_failed: false,
            role: None,
            held: BytesMut::new(),
            closing: None,
            pending_close: None,
            to_upstream: BytesMut::new(),
            to_client: BytesMut::new(),
            stats: Stats::default(),
        };
        core.inject_auth(true);
        core
    }

    /// Set once the connection must close; the driver flushes `to_client` first.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.closing.as_ref()
    }

    pub fn wants_client_input(&self) -> bool {
        self.closing.is_none() && !self.state.quit && self.to_upstream.len() < UPSTREAM_OUT_HIGH_WATER
    }

    pub fn wants_upstream_input(&self) -> bool {
        self.closing.is_none() && self.to_client.len() < CLIENT_OUT_HIGH_WATER
    }

    /// No client command is waiting for its reply.
    pub fn idle(&self) -> bool {
        self.ledger.client_pending() == 0
    }

    /// Whether the upstream is authenticated with the newest credentials.
    pub fn current(&self) -> bool {
        self.authed_generation == Some(self.creds.generation)
    }

    /// Replies still expected from the upstream, injected ones included.
    pub fn in_flight(&self) -> usize {
        self.ledger.len()
    }

    /// Frames and handles every complete command in `buf`, removing them from it.
    pub fn client_input(&mut self, buf: &mut BytesMut) {
        while self.wants_client_input() {
            let frame = match self.parser.parse(buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    // Like Redis: replies to earlier commands, then the error, then close.
                    let mut reply = BytesMut::new();
                    e.write_reply(&mut reply);
                    self.ledger.push(Expect::Local(reply.freeze()));
                    self.ledger.push(Expect::Close);
                    self.state.quit = true;
                    self.closing_reason_after_drain(CloseReason::ClientProtocol(e));
                    buf.clear();
                    break;
                }
            };
            if !frame.is_empty() {
                self.stats.commands += 1;
                // The handler needs `self` mutably while the command borrows the parser:
                // lend the parser out (an empty parser allocates nothing) and take it back.
                let parser = std::mem::take(&mut self.parser);
                let cmd = parser.command(buf, &frame);
                let raw = matches!(frame, Frame::Multibulk { .. }).then(|| &buf[..frame.len()]);
                self.on_command(cmd, raw);
                self.parser = parser;
                self.parser
                    .set_auth_required(self.local_password.is_some() && !self.client_authenticated);
            }
            buf.advance(frame.len());
            self.maybe_reauth();
        }
        self.drain_local();
    }

    /// Scans replies in `buf`, relaying, dropping or swallowing each.
    pub fn upstream_input(&mut self, buf: &mut BytesMut) {
        while !buf.is_empty() && self.wants_upstream_input() {
            let role = match self.role {
                Some(role) => role,
                None => {
                    let Some(head) = peek_head(buf) else { break };
                    match self.decide(head) {
                        Some(role) => *self.role.insert(role),
                        None => return self.close(CloseReason::UpstreamDesync),
                    }
                }
            };
            let scan = match self.scanner.scan(buf) {
                Ok(scan) => scan,
                Err(e) => return self.close(CloseReason::UpstreamProtocol(e.to_string())),
            };
            let bytes = &buf[..scan.consumed];
            match role {
                Role::Reply { mode: Mode::Relay, .. } | Role::Unsolicited => {
                    self.to_client.extend_from_slice(bytes)
                }
                Role::Reply { mode: Mode::Drop, .. } => {}
                Role::Reply { mode: Mode::Hold, .. } | Role::Ack { .. } => {
                    self.held.extend_from_slice(bytes)
                }
            }
            buf.advance(scan.consumed);
            if scan.complete {
                self.role = None;
                self.finish(role);
                self.held.clear();
                self.drain_local();
                self.maybe_reauth();
            } else if scan.consumed == 0 {
                break;
            }
        }
    }

    /// New credentials: the upstream re-authenticates at its next safe point.
    pub fn set_credentials(&mut self, creds: Arc<Credentials>) {
        if creds.generation != self.creds.generation {
            self.creds = creds;
            self.reauth_failed = false;
            self.maybe_reauth();
        }
    }

    /// Allows another attempt after a failed re-AUTH.
    pub fn retry_reauth(&mut self) {
        self.reauth_failed = false;
        self.maybe_reauth();
    }

    /// Whether an AUTH written now would be executed as a plain AUTH, with a reply the proxy
    /// can swallow, and without disturbing the client's own commands.
    pub fn safe_to_inject(&self) -> bool {
        let s = &self.state;
        let resp2_sub = (s.proto == 2 || s.hellos_in_flight > 0)
            && (s.subs.any() || self.ledger.subscribe_pending());
        self.closing.is_none()
            && !s.in_multi
            && !s.one_shot
            && !s.quit
            && !s.monitor_sent
            && !resp2_sub
    }

    pub(super) fn maybe_reauth(&mut self) {
        if self.auth_in_flight.is_none()
            && !self.current()
            && !self.reauth_failed
            && self.safe_to_inject()
        {
            self.inject_auth(false);
        }
    }

    /// Writes `AUTH <user> <token>` and expects its reply to be swallowed.
    pub(super) fn inject_auth(&mut self, initial: bool) {
        self.creds.write_auth(&mut self.to_upstream);
        let generation = self.creds.generation;
        self.auth_in_flight = Some(generation);
        self.ledger.push(Expect::Swallow(Injected::Auth { generation, initial }));
    }

    /// Forces a fresh AUTH now (after RESET, which de-authenticates the connection).
    pub(super) fn reauth_now(&mut self) {
        self.authed_generation = None;
        self.inject_auth(false);
    }

    /// Chooses the role of the frame that starts with `head`; `None` if no command expects it.
    fn decide(&mut self, head: Head<'_>) -> Option<Role> {
        let ack = match head.first {
            First::Str(s) => SubKind::from_ack(s),
            _ => None,
        };
        if head.kind == b'>' {
            return Some(match ack {
                Some((kind, subscribe)) => Role::Ack { kind, subscribe },
                None => Role::Unsolicited,
            });
        }
        let front_is_acks = matches!(self.ledger.front(), Some(Expect::Acks { .. }));
        if head.kind == b'*' && self.state.proto == 2 && (self.state.subs.any() || front_is_acks) {
            if let First::Str(b"message" | b"pmessage" | b"smessage") = head.first {
                return Some(Role::Unsolicited);
            }
            if let Some((kind, subscribe)) = ack {
                return Some(Role::Ack { kind, subscribe });
            }
        }
        if self.state.monitor {
            return Some(Role::Unsolicited);
        }
        let error = matches!(head.kind, b'-' | b'!');
        let mode = match self.ledger.front()? {
            Expect::Reply { relay: true, .. } => Mode::Relay,
            Expect::Reply { relay: false, .. } => Mode::Drop,
            Expect::Swallow(_) => Mode::Hold,
            Expect::Acks { relay, .. } => {
                if *relay {
                    Mode::Relay
                } else {
                    Mode::Drop
                }
            }
            Expect::Local(_) | Expect::Close => return None,
        };
        Some(Role::Reply { error, mode })
    }

    fn finish(&mut self, role: Role) {
        match role {
            Role::Unsolicited => {}
            Role::Ack { kind, subscribe } => self.finish_ack(kind, subscribe),
            Role::Reply { error, .. } => match self.ledger.pop() {
                Some(Expect::Reply { effect, .. }) => {
                    if let Effect::Hello(_) = effect {
                        self.state.hellos_in_flight = self.state.hellos_in_flight.saturating_sub(1);
                    }
                    if !error {
                        self.apply(effect);
                    }
                }
                Some(Expect::Swallow(Injected::Auth { generation, initial })) => {
                    self.auth_answered(generation, initial, error)
                }
                _ => {}
            },
        }
    }

    fn finish_ack(&mut self, kind: SubKind, subscribe: bool) {
        let count = ack_count(&self.held);
        let mut relay = true;
        if let Some(Expect::Acks { kind: k, subscribe: s, remaining, relay: r }) = self.ledger.front_mut() {
            if *k == kind && *s == subscribe {
                relay = *r;
                // An unsubscribe-all learns its count now that every earlier confirmation
                // has been read: one per subscription of its kind, or one if there is none.
                let left = remaining.get_or_insert(self.state.subs.of(kind).max(1) as u32);
                *left = left.saturating_sub(1);
                if *left == 0 {
                    self.ledger.pop();
                }
            }
        }
        if let Some(count) = count {
            self.state.subs.confirm(kind, count);
        }
        if relay {
            self.to_client.extend_from_slice(&self.held);
        }
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::Hello(v) => self.state.proto = v,
            Effect::Monitor => self.state.monitor = true,
            Effect::Reset => {
                self.state.proto = 2;
                self.state.subs = Default::default();
                self.state.monitor = false;
            }
        }
    }

    fn auth_answered(&mut self, generation: u64, initial: bool, error: bool) {
        self.auth_in_flight = None;
        if !error {
            if !initial {
                self.stats.reauth_ok += 1;
            }
            self.authed_generation = Some(generation);
            return;
        }
        let text = error_text(&self.held);
        if initial {
            // The client hears about it once, with the server's own error code, and the
            // connection closes: nothing it pipelined behind has been answered yet.
            let msg = format!(
                "{text} (redis-entra-proxy: upstream authentication as '{}' failed)",
                self.creds.username
            );
            self.ledger.clear();
            self.to_client.clear();
            crate::resp::encode::error(&mut self.to_client, &msg);
            self.closing = Some(CloseReason::UpstreamAuth(text));
        } else {
            // The previous token is still valid: keep the connection, retry later.
            self.stats.reauth_failed += 1;
            self.reauth_failed = true;
            tracing::warn!(generation, error = %text, "upstream refused re-authentication");
        }
    }

    /// Appends replies the proxy answers itself once everything before them was relayed.
    pub(super) fn drain_local(&mut self) {
        while let Some(front) = self.ledger.front() {
            match front {
                Expect::Local(bytes) => {
                    self.to_client.extend_from_slice(bytes);
                    self.ledger.pop();
                }
                Expect::Close => {
                    self.ledger.pop();
                    if self.closing.is_none() {
                        self.closing = Some(CloseReason::ClientQuit);
                    }
                    if let Some(reason) = self.pending_close.take() {
                        self.closing = Some(reason);
                    }
                }
                _ => break,
            }
        }
    }

    fn close(&mut self, reason: CloseReason) {
        self.closing = Some(reason);
    }

    fn closing_reason_after_drain(&mut self, reason: CloseReason) {
        self.pending_close = Some(reason);
    }

    /// Queues a reply the proxy answers itself, unless the client turned replies off.
    pub(super) fn local(&mut self, reply: Bytes) {
        if self.relay_current {
            self.ledger.push(Expect::Local(reply));
        }
    }
}

/// The text of an error reply, without the `-` and CRLF.
fn error_text(frame: &[u8]) -> String {
    let line = frame.split(|&b| b == b'\r').next().unwrap_or_default();
    String::from_utf8_lossy(line.get(1..).unwrap_or_default()).into_owned()
}

/// The subscription count in a confirmation (`[kind, channel, count]`).
fn ack_count(frame: &[u8]) -> Option<u64> {
    let mut rest = frame;
    let header_end = memchr::memchr(b'\n', rest)?;
    rest = &rest[header_end + 1..];
    for _ in 0..2 {
        let n = ReplyScanner::new().scan(rest).ok().filter(|s| s.complete)?.consumed;
        rest = &rest[n..];
    }
    let line = rest.strip_prefix(b":")?;
    let end = memchr::memchr(b'\r', line)?;
    crate::resp::request::string2ll(&line[..end]).and_then(|n| u64::try_from(n).ok())
}


#[cfg(test)]
mod tests;
