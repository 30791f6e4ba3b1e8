//! Fuzzes the sans-IO session core (`Core`) through one connection's life: client bytes,
//! upstream bytes, credential rotations, `retry_reauth`, `expire`, `shrink`, and the driver
//! writing out what the core produced, in any order and any chunking. The input format is in
//! fuzz/src/ops.rs.
//!
//! Checks after every operation:
//! - no panic; once the core decided to close it stays closed, wants no input, and writes
//!   nothing more to either side;
//! - everything written upstream frames as whole multibulk commands (nothing malformed,
//!   inline or empty is forwarded); every `AUTH` upstream is the proxy's own, with credentials
//!   it was given, and there are no more of them than the first, one per new generation, one
//!   per `retry_reauth` and one per forwarded `RESET`; no `HELLO` carries an `AUTH` pair;
//! - what the client receives is strict RESP whenever the upstream's bytes were; a reply the
//!   proxy answers itself never lands inside a frame being relayed; a connection the proxy
//!   closes on purpose ends between two replies; operations other than upstream input never
//!   take back bytes already queued for the client;
//! - output stays proportional to input: bytes to the client and upstream and expected
//!   replies are bounded by linear functions of the bytes fed and operations done.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::{Buf, BytesMut};
use libfuzzer_sys::fuzz_target;
use redis_entra_proxy::secret::Secret;
use redis_entra_proxy::session::{CloseReason, Core};
use redis_entra_proxy_fuzz::ops::{decode, Creds, Op};
use redis_entra_proxy_fuzz::upstream::UpstreamCheck;
use redis_entra_proxy_fuzz::{check_replies, ReplyStream, Rules};

/// Rounds of "deliver everything, write everything" after the last operation; each moves at
/// least the core's high-water mark, more than any input holds.
const FLUSH_ROUNDS: usize = 64;

/// Whether to print every operation and what it produced (`FUZZ_TRACE=1`, to read a crash).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

/// The harness: the core, the two wires and everything that crossed them.
struct Harness {
    core: Core,
    generation: u64,
    client_wire: Vec<u8>,
    upstream_wire: Vec<u8>,
    cin: BytesMut,
    uin: BytesMut,
    client_fed: usize,
    upstream_fed: Vec<u8>,
    /// What the driver wrote to the client so far; the client's stream is this followed by
    /// `core.to_client`.
    client_written: Vec<u8>,
    /// What the driver wrote upstream so far; followed by `core.to_upstream`, everything the
    /// core wrote upstream.
    upstream_written: Vec<u8>,
    upstream: UpstreamCheck,
    /// Strict readers of the client's stream and of the server's, and whether the server's
    /// stayed strict RESP (the checks of the client's stream hold only then).
    client_strict: ReplyStream,
    server_strict: ReplyStream,
    server_was_strict: bool,
    /// How much of the upstream stream was printed (`FUZZ_TRACE`).
    upstream_traced: usize,
    /// `expire` calls so far, and whether the last operation was one after the first.
    expires: usize,
    hard_expire: bool,
    ops: usize,
    closed: bool,
}

impl Harness {
    fn new(config: u8) -> Harness {
        let password = match config & 3 {
            1 => Some(Arc::new(Secret::new("pw"))),
            2 => Some(Arc::new(Secret::new(""))),
            _ => None,
        };
        let creds = Creds::from_byte(config >> 2).build(1);
        let mut h = Harness {
            upstream: UpstreamCheck::new(&creds),
            core: Core::new(Arc::new(creds), password),
            generation: 1,
            client_wire: Vec::new(),
            upstream_wire: Vec::new(),
            cin: BytesMut::new(),
            uin: BytesMut::new(),
            client_fed: 0,
            upstream_fed: Vec::new(),
            client_written: Vec::new(),
            upstream_written: Vec::new(),
            client_strict: ReplyStream::new(Rules::Strict),
            server_strict: ReplyStream::new(Rules::Strict),
            server_was_strict: true,
            upstream_traced: 0,
            expires: 0,
            hard_expire: false,
            ops: 0,
            closed: false,
        };
        h.check(false, false);
        h
    }

    fn deliver_client(&mut self, n: usize) {
        let n = n.min(self.client_wire.len());
        self.cin.extend_from_slice(&self.client_wire[..n]);
        self.client_wire.drain(..n);
        self.client_fed += n;
        self.core.client_input(&mut self.cin);
    }

    fn deliver_upstream(&mut self, n: usize) {
        let n = n.min(self.upstream_wire.len());
        self.uin.extend_from_slice(&self.upstream_wire[..n]);
        self.upstream_fed
            .extend_from_slice(&self.upstream_wire[..n]);
        self.upstream_wire.drain(..n);
        self.core.upstream_input(&mut self.uin);
    }

    fn drain_client(&mut self, n: usize) {
        let n = n.min(self.core.to_client.len());
        self.client_written
            .extend_from_slice(&self.core.to_client[..n]);
        self.core.to_client.advance(n);
    }

    fn drain_upstream(&mut self, n: usize) {
        let n = n.min(self.core.to_upstream.len());
        self.upstream_written
            .extend_from_slice(&self.core.to_upstream[..n]);
        self.core.to_upstream.advance(n);
    }

    fn apply(&mut self, op: Op) {
        self.ops += 1;
        if trace() {
            eprintln!("op {}: {op:?}", self.ops);
        }
        let before_client: Vec<u8> = self.core.to_client.to_vec();
        let client_at_boundary = self.server_was_strict
            && self
                .client_strict
                .check(&self.client_written, &before_client)
                .1;
        let up_before = self.core.to_upstream.len();
        let (mut drained_up, mut from_upstream) = (0, false);
        match op {
            Op::Client { bytes, deliver } => {
                self.client_wire.extend_from_slice(&bytes);
                if deliver {
                    self.deliver_client(usize::MAX);
                }
            }
            Op::Upstream { bytes, deliver } => {
                self.upstream_wire.extend_from_slice(&bytes);
                if deliver {
                    self.deliver_upstream(usize::MAX);
                    from_upstream = true;
                }
            }
            Op::DeliverClient(n) => self.deliver_client(n),
            Op::DeliverUpstream(n) => {
                self.deliver_upstream(n);
                from_upstream = true;
            }
            Op::Rotate(b) => {
                let c = Creds::from_byte(b);
                if !c.same_generation {
                    self.generation += 1;
                    self.upstream.allow_auth();
                }
                let creds = c.build(self.generation);
                self.upstream.give(&creds);
                self.core.set_credentials(Arc::new(creds));
            }
            Op::RetryReauth => {
                self.upstream.allow_auth();
                self.core.retry_reauth();
            }
            Op::Expire => {
                // The second call closes at once, whatever is in flight.
                self.hard_expire = self.expires > 0;
                self.expires += 1;
                self.core.expire();
            }
            Op::Shrink => self.core.shrink(),
            Op::DrainClient(n) => {
                self.drain_client(n);
                return self.check(false, false);
            }
            Op::DrainUpstream(n) => {
                drained_up = n.min(up_before);
                self.drain_upstream(n);
            }
        }
        let auth_failed =
            !self.closed && matches!(self.core.close_reason(), Some(CloseReason::UpstreamAuth(_)));
        if auth_failed {
            // Known and accepted: when the first AUTH fails, the core drops what it had queued
            // for the client, which cuts a frame the driver had begun to write. Only a server
            // that sends a push before answering AUTH gets there (Redis never does), so the
            // record of the client's stream resumes at the last frame written whole.
            let whole = check_replies(&self.client_written, Rules::Lax)
                .ends
                .last()
                .copied();
            self.client_written.truncate(whole.unwrap_or(0));
            self.client_strict.cut(self.client_written.len());
        }
        let to_client = &self.core.to_client;
        if !auth_failed {
            // Only the first AUTH's failure may take back replies.
            assert!(
                to_client.starts_with(&before_client),
                "queued client bytes were taken back"
            );
            // Only upstream input relays; what other operations add is the proxy's own.
            if !from_upstream && to_client.len() > before_client.len() {
                assert!(
                    client_at_boundary || !self.server_was_strict,
                    "a local reply was queued inside a frame being relayed: {:?}",
                    String::from_utf8_lossy(&to_client[before_client.len()..])
                );
            }
        }
        let grew_up = self.core.to_upstream.len() + drained_up > up_before;
        let grew_client = to_client.len() > before_client.len();
        self.check(grew_up, grew_client);
    }

    /// Invariants after an operation; `grew_*` tell whether that operation added output.
    fn check(&mut self, grew_up: bool, grew_client: bool) {
        // Upstream: everything new frames as whole multibulk commands.
        self.upstream
            .check(&self.upstream_written, &self.core.to_upstream);
        let upstream_len = self.upstream_written.len() + self.core.to_upstream.len();

        let core = &self.core;
        let hard_expire = std::mem::take(&mut self.hard_expire);
        if trace() {
            let full = [&self.upstream_written[..], &core.to_upstream[..]].concat();
            eprintln!(
                "  upstream {:?}\n  client {:?}{:?}\n  close {:?}",
                String::from_utf8_lossy(&full[self.upstream_traced..]),
                String::from_utf8_lossy(&self.client_written),
                String::from_utf8_lossy(&core.to_client),
                core.close_reason()
            );
            self.upstream_traced = full.len();
        }
        if self.closed {
            assert!(core.close_reason().is_some(), "a closed core reopened");
            assert!(!core.wants_client_input() && !core.wants_upstream_input());
            assert!(!grew_up, "wrote upstream after closing");
            assert!(!grew_client, "wrote to the client after closing");
        }
        let was_closed = self.closed;
        self.closed = core.close_reason().is_some();
        // Exercised for panics: the driver calls these on every timer reset.
        let _ = (
            core.close_deadline(),
            core.authed_remaining(SystemTime::now()),
        );

        // Client: with a server that speaks RESP, a strict RESP stream whose frames are never
        // cut by the proxy. A server that does not (a line ended by CR and another byte than
        // LF, say) gets no such promise: the proxy need not repair what it relays.
        if self.server_was_strict {
            let (error, _) = self.server_strict.check(&self.upstream_fed, &[]);
            self.server_was_strict = error.is_none();
        }
        if self.server_was_strict {
            let show = || {
                let stream = [&self.client_written[..], &self.core.to_client[..]].concat();
                String::from_utf8_lossy(&stream).into_owned()
            };
            let (error, at_boundary) = self
                .client_strict
                .check(&self.client_written, &core.to_client);
            assert_eq!(
                error,
                None,
                "the server's replies were strict RESP, the client's are not: {:?}",
                show()
            );
            if let (false, Some(reason)) = (was_closed, core.close_reason()) {
                // A connection the proxy closes on purpose ends between two replies; only a
                // broken server stream, or the last-moment close before expiry, may cut one.
                let may_cut = match reason {
                    CloseReason::UpstreamProtocol(_) | CloseReason::UpstreamDesync => true,
                    CloseReason::TokenExpiring => hard_expire,
                    _ => false,
                };
                assert!(
                    may_cut || at_boundary,
                    "closed ({reason:?}) inside a frame: {:?}",
                    show()
                );
            }
        }

        // Proportionality.
        let client_len = self.client_written.len() + core.to_client.len();
        let (cf, uf, ops) = (self.client_fed, self.upstream_fed.len(), self.ops + 1);
        assert!(
            client_len <= 8 * uf + 256 * cf + 1024 * ops,
            "{client_len} bytes to the client for {uf} upstream and {cf} client bytes, {ops} operations"
        );
        assert!(
            upstream_len <= 8 * cf + 64 * (cf + ops) + self.upstream.auth_bytes + 8192,
            "upstream output out of proportion"
        );
        assert!(
            core.in_flight() <= 2 * cf + ops + 2,
            "{} replies expected",
            core.in_flight()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let (config, ops) = decode(data);
    let mut h = Harness::new(config);
    for op in ops {
        h.apply(op);
    }
    // The connection runs on: everything is delivered and written until nothing moves.
    for _ in 0..FLUSH_ROUNDS {
        let before = (
            h.client_wire.len(),
            h.upstream_wire.len(),
            h.cin.len(),
            h.uin.len(),
        );
        h.apply(Op::DeliverClient(usize::MAX));
        h.apply(Op::DeliverUpstream(usize::MAX));
        h.apply(Op::DrainClient(usize::MAX));
        h.apply(Op::DrainUpstream(usize::MAX));
        let after = (
            h.client_wire.len(),
            h.upstream_wire.len(),
            h.cin.len(),
            h.uin.len(),
        );
        if before == after {
            break;
        }
    }
});
