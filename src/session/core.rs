//! The sans-IO session core: everything one proxied connection decides, with no sockets.
//!
//! Inputs: client bytes ([`Core::client_input`]), upstream bytes ([`Core::upstream_input`]),
//! new credentials ([`Core::set_credentials`]). Outputs: [`Core::to_upstream`],
//! [`Core::to_client`], and a close decision ([`Core::close_reason`]). The async driver in
//! `session.rs` only moves bytes between sockets and these buffers.
//!
//! Client commands are framed by the Redis-exact parser and mostly forwarded byte for byte;
//! each forwarded command gets a ledger entry. A request with a big argument is not held
//! whole: once its command is known to be forwarded as it is, it goes upstream as it arrives
//! ([`Core::mid_request`]), and nothing is injected before its end. Upstream replies are
//! framed by the streaming scanner and matched against the ledger: relayed, dropped, or
//! swallowed (the proxy's own AUTH). Pushes and pub/sub messages bypass the ledger. Command
//! handling lives in `commands.rs`, the reply side in `core/replies.rs`, the upstream's
//! authentication (first AUTH, re-AUTH, close before expiry) in `core/auth.rs`; this file owns
//! the core's state, the client input side and closing.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};

use super::framing::Runs;
use super::ledger::{Effect, Expect, Injected, Ledger};
use super::state::{ConnState, ReplyMode};
use crate::credentials::Credentials;
use crate::resp::reply::ReplyScanner;
use crate::resp::request::{Frame, ProtocolError, RequestParser};
use crate::secret::Secret;

/// Bytes waiting for the client beyond which the proxy stops reading the upstream, so a
/// client that reads slowly holds Redis's output buffer, not the proxy's memory.
pub const CLIENT_OUT_HIGH_WATER: usize = 256 * 1024;
/// Most bytes of replies a client that has not given the local password may leave unread
/// (the proxy answers all of them itself: `NOAUTH`, `WRONGPASS`): above, it is closed, as Redis
/// closes an unauthenticated client past 1 KiB of output (CVE-2025-21605). Without it, a peer
/// sending commands and reading nothing would grow the proxy's memory without bound.
pub const UNAUTHENTICATED_OUTPUT_MAX: usize = 1024;
/// Bytes waiting for the upstream beyond which the proxy stops reading the client.
pub const UPSTREAM_OUT_HIGH_WATER: usize = 256 * 1024;
/// A connection that could not re-authenticate is closed this long before its token expires,
/// so that it ends between replies rather than being cut by the server mid-reply. Scaled
/// down for tokens that live only seconds (tests, the dev setup).
pub const CLOSE_BEFORE_EXPIRY: Duration = Duration::from_secs(5);
/// A connection closing for expiry whose replies are still owed this close to expiry (a
/// command blocked past it) is closed at once: the server would cut it mid-reply.
pub const HARD_CLOSE_BEFORE_EXPIRY: Duration = Duration::from_secs(1);

/// Why the core wants the connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent QUIT.
    ClientQuit,
    /// The client sent bytes Redis would refuse; it got Redis's error first.
    ClientProtocol(ProtocolError),
    /// The upstream refused the proxy's first AUTH; the text is the server's error line and
    /// the identity it was sent as.
    UpstreamAuth(String),
    /// The upstream did not answer the proxy's first AUTH in time (a stalled server).
    UpstreamAuthTimeout(Duration),
    /// The upstream sent bytes that are not RESP.
    UpstreamProtocol(String),
    /// The upstream sent a reply no command asked for: the stream cannot be trusted.
    UpstreamDesync,
    /// The token this connection authenticated with is about to expire and the connection
    /// could not re-authenticate in time (blocked, a RESP2 subscriber, AUTH refused).
    TokenExpiring,
    /// The client sent nothing for `--client-idle-timeout` while nothing was owed to it.
    ClientIdle(Duration),
    /// The client kept one request incomplete for `--partial-request-timeout`.
    PartialRequest(Duration),
    /// A shared client (`--multiplex`) fell so far behind in reading its replies that its
    /// shared connection waited for it, and it did not catch up within this time.
    SlowClient(Duration),
    /// A client that has not given the local password has more than
    /// [`UNAUTHENTICATED_OUTPUT_MAX`] of replies waiting: as Redis closes it.
    UnauthenticatedOutput,
}

impl CloseReason {
    /// Which side caused the close, for logs and metrics.
    pub fn side(&self) -> &'static str {
        match self {
            CloseReason::ClientQuit
            | CloseReason::ClientProtocol(_)
            | CloseReason::ClientIdle(_)
            | CloseReason::PartialRequest(_)
            | CloseReason::SlowClient(_)
            | CloseReason::UnauthenticatedOutput => "client",
            CloseReason::TokenExpiring => "proxy",
            _ => "upstream",
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::ClientQuit => "client_quit",
            CloseReason::ClientProtocol(_) => "client_protocol_error",
            CloseReason::UpstreamAuth(_) => "upstream_auth_failed",
            CloseReason::UpstreamAuthTimeout(_) => "upstream_auth_timeout",
            CloseReason::UpstreamProtocol(_) => "upstream_protocol_error",
            CloseReason::UpstreamDesync => "upstream_desync",
            CloseReason::TokenExpiring => "token_expiring",
            CloseReason::ClientIdle(_) => "client_idle_timeout",
            CloseReason::PartialRequest(_) => "partial_request_timeout",
            CloseReason::SlowClient(_) => "slow_client",
            CloseReason::UnauthenticatedOutput => "unauthenticated_output_limit",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::ClientQuit => f.write_str("client sent QUIT"),
            CloseReason::ClientProtocol(e) => write!(f, "client protocol error: {e}"),
            CloseReason::UpstreamAuth(e) => write!(f, "upstream refused AUTH: {e}"),
            CloseReason::UpstreamAuthTimeout(d) => {
                write!(f, "upstream did not answer AUTH within {d:?}")
            }
            CloseReason::UpstreamProtocol(e) => write!(f, "upstream protocol error: {e}"),
            CloseReason::UpstreamDesync => f.write_str("upstream sent a reply nobody asked for"),
            CloseReason::TokenExpiring => f.write_str(
                "token about to expire and the connection could not re-authenticate in time",
            ),
            CloseReason::ClientIdle(d) => {
                write!(f, "client idle for {d:?} (client-idle-timeout)")
            }
            CloseReason::PartialRequest(d) => write!(
                f,
                "client kept a request incomplete for {d:?} (partial-request-timeout)"
            ),
            CloseReason::SlowClient(d) => write!(
                f,
                "client did not read its replies within {d:?} while its shared connection \
                 waited for it"
            ),
            CloseReason::UnauthenticatedOutput => write!(
                f,
                "client not authenticated left more than {UNAUTHENTICATED_OUTPUT_MAX} bytes \
                 of replies unread"
            ),
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

#[derive(Debug)]
pub struct Core {
    pub(super) parser: RequestParser,
    scanner: ReplyScanner,
    pub(super) ledger: Ledger,
    pub(super) state: ConnState,
    /// Password clients must AUTH with (`--local-password`); `None` accepts any AUTH.
    pub(super) local_password: Option<Arc<Secret>>,
    pub(super) client_authenticated: bool,
    /// No AUTH was written yet: the first waits until the client gives the local password
    /// ([`Core::unconnected`]).
    pub(super) deferred_auth: bool,
    /// Whether the client's current command may produce output (CLIENT REPLY emulation).
    pub(super) relay_current: bool,
    /// The newest credentials; the upstream must end up authenticated with them.
    pub(super) creds: Arc<Credentials>,
    /// The last AUTH the upstream accepted.
    authed: Option<Authed>,
    /// AUTHs written and not yet answered (two after a RESET written behind one).
    auths_in_flight: usize,
    /// The close deadline passed: closing after the replies owed.
    expiring: bool,
    /// A re-AUTH with the current generation failed; it is not retried until new credentials
    /// arrive or the driver calls [`Core::retry_reauth`].
    reauth_failed: bool,
    role: Option<Role>,
    /// A client request with a big argument is being passed on while it arrives: its command
    /// was handled (its ledger entry is the newest), the rest of its bytes follow it upstream.
    streaming: bool,
    /// Bytes of the frame being scanned when it must be seen whole.
    held: BytesMut,
    closing: Option<CloseReason>,
    /// The reason to report when the ledger's `Close` entry is reached.
    pending_close: Option<CloseReason>,
    /// Close as soon as the frame being relayed to the client ends (a close decided while a
    /// push passes through lands between two frames).
    close_between_frames: Option<CloseReason>,
    pub to_upstream: BytesMut,
    pub to_client: BytesMut,
    pub stats: Stats,
    /// AUTH replies since the driver last looked (for metrics and health).
    pub auth_events: Vec<AuthEvent>,
    /// Makes node addresses in replies local (cluster mode).
    pub(super) rewriter: Option<crate::cluster::Rewriter>,
}

impl Core {
    /// A core for a fresh upstream connection; the first AUTH is written at once, so client
    /// commands are pipelined behind it.
    pub fn new(creds: Arc<Credentials>, local_password: Option<Arc<Secret>>) -> Self {
        let mut core = Core::unconnected(creds, local_password);
        core.deferred_auth = false;
        core.inject_auth(true);
        core
    }

    /// A core for a client that has not given the local password yet: everything it says is
    /// answered here (`NOAUTH`, `WRONGPASS`, …) and nothing needs the upstream, whose
    /// connection is opened only once the first AUTH is written, when the client gave the
    /// password. A peer without it costs the cache no connection.
    pub fn unconnected(creds: Arc<Credentials>, local_password: Option<Arc<Secret>>) -> Self {
        let mut parser = RequestParser::new();
        parser.set_auth_required(local_password.is_some());
        Core {
            parser,
            scanner: ReplyScanner::new(),
            ledger: Ledger::default(),
            state: ConnState::new(),
            client_authenticated: local_password.is_none(),
            deferred_auth: true,
            local_password,
            relay_current: true,
            creds,
            authed: None,
            auths_in_flight: 0,
            expiring: false,
            reauth_failed: false,
            role: None,
            streaming: false,
            held: BytesMut::new(),
            closing: None,
            pending_close: None,
            close_between_frames: None,
            to_upstream: BytesMut::new(),
            to_client: BytesMut::new(),
            stats: Stats::default(),
            auth_events: Vec::new(),
            rewriter: None,
        }
    }

    /// Cluster mode: node addresses in topology replies and redirections are rewritten.
    pub fn set_rewriter(&mut self, rewriter: Option<crate::cluster::Rewriter>) {
        self.rewriter = rewriter;
    }

    /// Releases the capacity of empty buffers (an idle connection).
    pub fn shrink(&mut self) {
        for buf in [&mut self.to_client, &mut self.to_upstream, &mut self.held] {
            if buf.is_empty() {
                *buf = BytesMut::new();
            }
        }
        self.parser.shrink();
        self.ledger.shrink();
        self.auth_events.shrink_to_fit();
    }

    /// Set once the connection must close; the driver flushes `to_client` first.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.closing.as_ref()
    }

    pub fn wants_client_input(&self) -> bool {
        self.closing.is_none()
            && !self.state.quit
            && !self.state.barrier
            && self.to_upstream.len() < UPSTREAM_OUT_HIGH_WATER
    }

    pub fn wants_upstream_input(&self) -> bool {
        self.closing.is_none() && self.to_client.len() < CLIENT_OUT_HIGH_WATER
    }

    /// No client command is waiting for its reply.
    pub fn idle(&self) -> bool {
        self.ledger.client_pending() == 0
    }

    /// The server sends to this connection without being asked: subscribed or MONITOR.
    pub fn streaming(&self) -> bool {
        self.state.subs.any() || self.state.monitor
    }

    /// Stops reading the client and closes once every reply owed to it was delivered (what
    /// the driver's timeouts use; the bytes of an incomplete request are dropped).
    pub fn close_after_replies(&mut self, reason: CloseReason) {
        if self.closing.is_some() || self.pending_close.is_some() {
            return;
        }
        self.state.quit = true;
        self.abandon_stream();
        self.ledger.push(Expect::Close);
        self.closing_reason_after_drain(reason);
        self.drain_local();
    }

    /// The next reply owed to the client is that of a command that may be waiting for other
    /// clients (`Effect::Blocks`).
    pub fn next_reply_blocks(&self) -> bool {
        matches!(
            self.ledger.next_for_client(),
            Some(Expect::Reply {
                effect: Effect::Blocks,
                ..
            })
        )
    }

    /// Replies still expected from the upstream, injected ones included.
    pub fn in_flight(&self) -> usize {
        self.ledger.len()
    }

    /// Frames and handles every complete command in `buf`, removing them from it.
    pub fn client_input(&mut self, buf: &mut BytesMut) {
        self.client_input_framed(buf, None);
    }

    /// [`Core::client_input`], with what the client said of its bytes (`runs`, kept in step
    /// with what is taken from `buf`): a run of whole plain requests goes upstream as it is,
    /// without being parsed again.
    pub fn client_input_framed(&mut self, buf: &mut BytesMut, mut runs: Option<&mut Runs>) {
        while self.wants_client_input() {
            if let Some((len, requests)) = runs.as_deref().and_then(Runs::plain_front) {
                if len <= buf.len() && self.plain_ready() {
                    self.plain(&buf[..len], requests);
                    buf.advance(len);
                    if let Some(runs) = runs.as_deref_mut() {
                        runs.took(len);
                    }
                    self.maybe_reauth();
                    continue;
                }
            }
            let frame = match self.parser.parse(buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    self.pass_on(buf, runs);
                    break;
                }
                Err(e) => {
                    // Like Redis: replies to earlier commands, then the error, then close.
                    self.abandon_stream();
                    let mut reply = BytesMut::new();
                    e.write_reply(&mut reply);
                    self.ledger.push(Expect::Local(reply.freeze()));
                    self.ledger.push(Expect::Close);
                    self.state.quit = true;
                    self.closing_reason_after_drain(CloseReason::ClientProtocol(e));
                    buf.clear();
                    if let Some(runs) = runs.as_deref_mut() {
                        runs.clear();
                    }
                    break;
                }
            };
            if self.streaming {
                // The end of a request passed on while it arrived.
                self.streaming = false;
                self.to_upstream.extend_from_slice(&buf[..frame.len()]);
            } else if !frame.is_empty() {
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
            if let Some(runs) = runs.as_deref_mut() {
                runs.took(frame.len());
            }
            self.maybe_reauth();
        }
        self.drain_local();
    }

    /// The request at the front of `buf` is incomplete: if it has a big argument
    /// ([`RequestParser::big_bulk`]) and a command that is forwarded as it is whatever its
    /// arguments, it is handled now and its bytes go upstream as they arrive, so that the
    /// proxy never holds a big request whole. Its ledger entry is pushed now, and nothing
    /// else is written upstream until the request ends ([`Core::safe_to_inject`]).
    fn pass_on(&mut self, buf: &mut BytesMut, runs: Option<&mut Runs>) {
        let n = self.parser.settled(buf.len());
        if self.streaming {
            self.to_upstream.extend_from_slice(&buf[..n]);
        } else {
            if !self.parser.big_bulk() || !self.may_stream(&self.parser.partial_command(buf)) {
                return;
            }
            self.stats.commands += 1;
            let parser = std::mem::take(&mut self.parser);
            let before = (self.to_upstream.len(), self.ledger.len());
            self.on_command(parser.partial_command(buf), Some(&buf[..n]));
            self.parser = parser;
            debug_assert_eq!(
                (self.to_upstream.len(), self.ledger.len()),
                (before.0 + n, before.1 + 1),
                "a streamed command is forwarded as it is, with one reply"
            );
            self.streaming = true;
        }
        self.parser.release(n);
        buf.advance(n);
        if let Some(runs) = runs {
            runs.took(n);
        }
    }

    /// A request being passed on will not complete (a protocol error in its rest, the client
    /// gone, the connection closing): the server, holding its beginning, never answers it.
    fn abandon_stream(&mut self) {
        if std::mem::take(&mut self.streaming) {
            self.ledger.pop_newest();
        }
    }

    /// Inside a request: some of it was read and it is not complete yet.
    pub fn mid_request(&self) -> bool {
        self.streaming || !self.parser.at_start()
    }

    /// The client closed its side: a request being passed on will never complete.
    pub fn client_closed(&mut self) {
        self.abandon_stream();
    }

    /// Whether a plain request would be forwarded as it is, its reply relayed, with no other
    /// effect: what [`Core::plain`] does in its place.
    fn plain_ready(&self) -> bool {
        self.parser.at_start()
            && self.client_authenticated
            && self.state.reply_mode == ReplyMode::On
            && !self.state.subs.any()
    }

    /// `requests` whole plain requests (`bytes`), forwarded as `on_command` forwards each.
    fn plain(&mut self, bytes: &[u8], requests: usize) {
        self.stats.commands += requests as u64;
        self.relay_current = true;
        self.to_upstream.extend_from_slice(bytes);
        self.state.one_shot = false;
        self.ledger.push_many(
            Expect::Reply {
                effect: Effect::None,
                relay: true,
            },
            requests,
        );
    }

    /// Writes `HELLO <version>` and expects its reply to be swallowed.
    pub(super) fn inject_hello(&mut self, version: u8, emulate: bool) {
        crate::resp::encode::hello(&mut self.to_upstream, version);
        self.ledger
            .push(Expect::Swallow(Injected::Hello { version, emulate }));
        self.state.wproto = version;
        self.state.emulating = emulate;
    }

    /// The client is authenticated from now on: it gave the local password (`AUTH`,
    /// `HELLO … AUTH`), or gave it before this session started, while it shared a connection.
    /// A core still [`unconnected`](Core::unconnected) writes its first AUTH, ahead of
    /// whatever the client's commands will send.
    pub fn client_gave_password(&mut self) {
        self.client_authenticated = true;
        self.parser.set_auth_required(false);
        if self.deferred_auth {
            self.deferred_auth = false;
            self.inject_auth(true);
        }
    }

    /// Switches the upstream connection to RESP3 for a client that speaks RESP3 from its first
    /// command on (it said `HELLO 3` on a shared connection before it pinned): `HELLO 3`,
    /// swallowed, as if the client had sent it.
    pub fn speak_resp3(&mut self) {
        self.inject_hello(3, false);
    }

    /// Names the upstream connection `name` before the client's first command, as a
    /// multiplexed client that pins named itself while it shared a connection (`CLIENT
    /// SETNAME`, answered by the proxy then): `CLIENT SETNAME`, swallowed, as if the client
    /// had sent it.
    pub fn name_connection(&mut self, name: &[u8]) {
        crate::resp::encode::command(
            &mut self.to_upstream,
            [&b"CLIENT"[..], b"SETNAME", name].into_iter(),
        );
        self.ledger.push(Expect::Swallow(Injected::SetName));
    }

    /// Appends replies the proxy answers itself once everything before them was relayed.
    pub(super) fn drain_local(&mut self) {
        if self.role.is_some() {
            // A frame (a push) is half relayed: its end comes first; `upstream_input` calls
            // this again when it completes.
            return;
        }
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
        if !self.client_authenticated
            && self.closing.is_none()
            && self.to_client.len() + self.ledger.local_bytes() > UNAUTHENTICATED_OUTPUT_MAX
        {
            // Nothing more is read from it; the close waits for the end of a frame being
            // relayed, if one is.
            self.state.quit = true;
            if self.role.is_some() {
                self.close_between_frames = Some(CloseReason::UnauthenticatedOutput);
            } else {
                self.close(CloseReason::UnauthenticatedOutput);
            }
        }
    }
}

mod auth;
mod replies;

pub use auth::AuthEvent;
use auth::Authed;
use replies::Role;

#[cfg(test)]
mod model;
#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
