//! The reply side: each frame from the upstream is matched against the ledger and relayed,
//! dropped, held whole (to read or rewrite it) or swallowed (the proxy's own AUTH, HELLO,
//! CLIENT SETNAME), and what it answers updates the tracked connection state.

use bytes::{Buf, BytesMut};

use super::{CloseReason, Core};
use crate::resp::reply::{peek_head, First, Head, ReplyScanner};
use crate::resp::value::Value;
use crate::session::ledger::{Effect, Expect, Injected, SubKind};

/// What to do with the upstream frame being scanned.
#[derive(Debug, Clone, Copy)]
pub(super) enum Role {
    /// Answers the ledger's front entry.
    Reply { error: bool, mode: Mode },
    /// A subscription confirmation (held whole to read its count).
    Ack { kind: SubKind, subscribe: bool },
    /// A message or push nobody asked for: relay (as a RESP2 array when translating).
    Unsolicited { translate: bool },
    /// A client-side caching invalidation while translating for a RESP2 client (held whole).
    Invalidation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Relay,
    Drop,
    Hold,
    /// Held whole, then relayed with its node addresses made local (cluster mode).
    Rewrite,
}

impl Core {
    /// Scans replies in `buf`, relaying, dropping or swallowing each.
    pub fn upstream_input(&mut self, buf: &mut BytesMut) {
        while !buf.is_empty() && self.wants_upstream_input() {
            let (role, fresh) = match self.role {
                Some(role) => (role, false),
                None => {
                    let Some(head) = peek_head(buf) else { break };
                    match self.decide(head) {
                        Some(role) => (*self.role.insert(role), true),
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
                Role::Unsolicited { translate: true } if fresh => {
                    // A push becomes an array; its elements are the same in RESP2.
                    self.to_client.extend_from_slice(b"*");
                    self.to_client.extend_from_slice(&bytes[1..]);
                }
                Role::Reply {
                    mode: Mode::Relay, ..
                }
                | Role::Unsolicited { .. } => self.to_client.extend_from_slice(bytes),
                Role::Reply {
                    mode: Mode::Drop, ..
                } => {}
                Role::Reply {
                    mode: Mode::Hold | Mode::Rewrite,
                    ..
                }
                | Role::Ack { .. }
                | Role::Invalidation => self.held.extend_from_slice(bytes),
            }
            buf.advance(scan.consumed);
            if scan.complete {
                self.role = None;
                self.finish(role);
                self.held.clear();
                self.drain_local();
                if let Some(reason) = self.close_between_frames.take() {
                    return self.close(reason);
                }
                if self.state.barrier && self.ledger.client_pending() == 0 {
                    // The barrier was answered: the client's next commands are judged on
                    // what the server did.
                    self.state.barrier = false;
                }
                self.maybe_reauth();
            } else if scan.consumed == 0 {
                break;
            }
        }
    }

    /// Chooses the role of the frame that starts with `head`; `None` if no command expects it.
    fn decide(&mut self, head: Head<'_>) -> Option<Role> {
        let ack = match head.first {
            First::Str(s) => SubKind::from_ack(s),
            _ => None,
        };
        if head.kind == b'>' {
            return Some(match (ack, head.first) {
                (Some((kind, subscribe)), _) => Role::Ack { kind, subscribe },
                (None, First::Str(b"invalidate")) if self.state.translate => Role::Invalidation,
                (None, _) => Role::Unsolicited {
                    translate: self.state.translate,
                },
            });
        }
        let front_is_acks = matches!(self.ledger.front(), Some(Expect::Acks { .. }));
        if head.kind == b'*' && self.state.proto == 2 && (self.state.subs.any() || front_is_acks) {
            if let First::Str(b"message" | b"pmessage" | b"smessage") = head.first {
                return Some(Role::Unsolicited { translate: false });
            }
            if let Some((kind, subscribe)) = ack {
                return Some(Role::Ack { kind, subscribe });
            }
        }
        if self.state.monitor && head.kind == b'+' && is_monitor_line(head.line) {
            return Some(Role::Unsolicited { translate: false });
        }
        // A null array (EXEC aborted by WATCH) also means the command's effect did not happen.
        let error = matches!(head.kind, b'-' | b'!') || (head.kind == b'*' && head.line == b"-1");
        let front = self.ledger.front()?;
        let mode = match front {
            Expect::Reply {
                effect: Effect::Pong,
                relay: true,
            } if self.state.translate => Mode::Hold,
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
        let rewrite = mode == Mode::Relay
            && self.rewriter.is_some()
            && match front {
                Expect::Reply {
                    effect: Effect::Topology(_),
                    ..
                } => !error,
                _ => head.kind == b'-' && crate::cluster::rewrite::is_redirect(head.line),
            };
        let mode = if rewrite { Mode::Rewrite } else { mode };
        Some(Role::Reply { error, mode })
    }

    fn finish(&mut self, role: Role) {
        if matches!(role, Role::Reply { mode, .. } if mode != Mode::Rewrite)
            && self.ledger.pop_plain()
        {
            // A plain reply, relayed or dropped: nothing else to do, error or not.
            return;
        }
        match role {
            Role::Unsolicited { .. } => {}
            Role::Invalidation => self.relay_invalidation(),
            Role::Ack { kind, subscribe } => self.finish_ack(kind, subscribe),
            Role::Reply { error, mode } => match self.ledger.pop() {
                entry if mode == Mode::Rewrite => {
                    self.relay_rewritten(entry.as_ref());
                    if let Some(Expect::Reply { effect, .. }) = entry {
                        if !error {
                            self.apply(effect);
                        }
                    }
                }
                // Held whole; dropped when the client turned replies off.
                Some(Expect::Reply {
                    effect: Effect::Pong,
                    relay: true,
                }) if self.state.translate => pong_as_resp2(&self.held, &mut self.to_client),
                Some(Expect::Reply {
                    effect: Effect::Pong,
                    relay: false,
                }) if self.state.translate => {}
                Some(Expect::Reply { effect, .. }) if !error => self.apply(effect),
                Some(Expect::Reply {
                    effect: Effect::Hello(_),
                    ..
                }) => {
                    // The predicted switch did not happen.
                    self.state.wproto = self.state.proto;
                }
                Some(Expect::Reply {
                    effect: Effect::Multi(seq),
                    ..
                }) if self.state.in_multi && self.state.multi_seq == seq => {
                    // Refused (an ACL): the commands after it ran at once, and there is no
                    // transaction to wait for the end of.
                    self.end_multi();
                }
                Some(Expect::Swallow(Injected::Auth {
                    generation,
                    initial,
                    expires_at,
                    sent,
                })) => self.auth_answered(generation, initial, expires_at, sent, error),
                Some(Expect::Swallow(Injected::Hello { version, emulate })) => {
                    self.hello_answered(version, emulate, error)
                }
                Some(Expect::Swallow(Injected::SetName)) if error => {
                    // The proxy accepted only names Redis accepts; the client goes on unnamed.
                    tracing::warn!(error = %error_text(&self.held), "upstream refused the CLIENT SETNAME of a pinned multiplexed client");
                }
                _ => {}
            },
        }
    }

    /// Relays the held reply with node addresses made local; one that cannot be rewritten
    /// becomes an error reply, never a reply naming addresses the client cannot reach.
    fn relay_rewritten(&mut self, entry: Option<&Expect>) {
        let Some(rw) = &self.rewriter else {
            self.to_client.extend_from_slice(&self.held);
            return;
        };
        let rewritten = match entry {
            Some(Expect::Reply {
                effect: Effect::Topology(kind),
                ..
            }) => rw.topology(*kind, &self.held),
            _ => rw.redirect(&self.held),
        };
        match rewritten {
            Ok(bytes) => self.to_client.extend_from_slice(&bytes),
            Err(e) => {
                tracing::warn!(error = %e, "cannot rewrite cluster addresses in a reply");
                crate::resp::encode::error(
                    &mut self.to_client,
                    &format!("ERR redis-entra-proxy: {e}"),
                );
            }
        }
    }

    fn finish_ack(&mut self, kind: SubKind, subscribe: bool) {
        // Redis 7 sends confirmations as pushes even under CLIENT REPLY OFF/SKIP
        // (`CLIENT_PUSHING`), so they are relayed whatever the reply mode.
        if let Some(Expect::Acks {
            kind: k,
            subscribe: s,
            remaining,
            ..
        }) = self.ledger.front_mut()
        {
            if *k == kind && *s == subscribe {
                // An unsubscribe-all learns its count now that every earlier confirmation
                // has been read: one per subscription of its kind, or one if there is none.
                let left = remaining.get_or_insert(self.state.subs.count(kind).max(1) as u32);
                *left = left.saturating_sub(1);
                if *left == 0 {
                    self.ledger.pop();
                }
            }
        }
        self.state
            .subs
            .confirm(kind, subscribe, ack_name(&self.held).as_deref());
        if self.state.translate {
            push_as_resp2(&self.held, &mut self.to_client);
        } else {
            self.to_client.extend_from_slice(&self.held);
        }
    }

    /// Redis sends a RESP2 client a client-side caching invalidation only as a message on
    /// `__redis__:invalidate`, when another connection's tracking redirects to it and it is
    /// subscribed to that channel; its own tracking sends it none. The RESP3 upstream of a
    /// RESP2 subscriber gets every invalidation as a push: what RESP2 would not send is
    /// dropped, the rest becomes that message.
    fn relay_invalidation(&mut self) {
        if !self
            .state
            .subs
            .contains(SubKind::Channel, INVALIDATE_CHANNEL)
        {
            return;
        }
        let Some(keys) = elements(&self.held).nth(1) else {
            return;
        };
        self.to_client
            .extend_from_slice(b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n");
        // All keys (flush): a RESP3 null, RESP2's null bulk.
        self.to_client
            .extend_from_slice(if keys == b"_\r\n" { b"$-1\r\n" } else { keys });
    }

    fn hello_answered(&mut self, version: u8, emulate: bool, error: bool) {
        if !error {
            self.state.proto = version;
            self.state.translate = emulate;
            return;
        }
        if version == 3 {
            // The subscriber stays RESP2: it cannot be re-authenticated, and is closed before
            // its token expires (see `close_deadline`).
            tracing::warn!(error = %error_text(&self.held), "upstream refused HELLO 3; RESP2 subscribers on this connection cannot be re-authenticated");
            self.state.resp3_refused = true;
            if self.state.emulating {
                self.state.emulating = false;
                self.state.wproto = 2;
            } else if !emulate {
                // [`Core::speak_resp3`]: the predicted switch did not happen.
                self.state.wproto = self.state.proto;
            }
        }
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::Hello(v) => self.state.proto = v,
            Effect::Monitor => self.state.monitor = true,
            Effect::Reset => self.reset(),
            Effect::Multi(_) | Effect::Pong | Effect::Topology(_) | Effect::Blocks => {}
        }
    }

    /// What a `RESET` the server accepted did to the connection. Nothing was written behind
    /// it (a barrier), so the read and the write side start over together.
    fn reset(&mut self) {
        let s = &mut self.state;
        s.proto = 2;
        s.wproto = 2;
        s.translate = false;
        s.emulating = false;
        s.subs.clear();
        s.monitor = false;
        s.reply_mode = crate::session::state::ReplyMode::On;
        self.end_multi();
        if let Some(password) = &self.local_password {
            self.client_authenticated = password.is_empty();
            self.parser.set_auth_required(!self.client_authenticated);
        }
        // RESET de-authenticates the connection: authenticate again before anything else.
        self.reauth_now();
    }
}

/// The channel of client-side caching invalidations redirected to a RESP2 connection.
const INVALIDATE_CHANNEL: &[u8] = b"__redis__:invalidate";

/// The text of an error reply, without the `-` and CRLF.
pub(super) fn error_text(frame: &[u8]) -> String {
    let line = frame.split(|&b| b == b'\r').next().unwrap_or_default();
    String::from_utf8_lossy(line.get(1..).unwrap_or_default()).into_owned()
}

/// Elements of a flat aggregate frame, each with its encoding.
fn elements(frame: &[u8]) -> impl Iterator<Item = &[u8]> {
    let start = memchr::memchr(b'\n', frame).map_or(frame.len(), |i| i + 1);
    let mut rest = &frame[start..];
    std::iter::from_fn(move || {
        let n = ReplyScanner::new()
            .scan(rest)
            .ok()
            .filter(|s| s.complete)?
            .consumed;
        let (elem, tail) = rest.split_at(n);
        rest = tail;
        Some(elem)
    })
}

/// A RESP3 subscription push as the RESP2 array Redis would send (`_` nulls become `$-1`).
fn push_as_resp2(frame: &[u8], out: &mut BytesMut) {
    if frame.first() != Some(&b'>') {
        out.extend_from_slice(frame);
        return;
    }
    let header_end = memchr::memchr(b'\n', frame).map_or(frame.len(), |i| i + 1);
    out.extend_from_slice(b"*");
    out.extend_from_slice(&frame[1..header_end]);
    for e in elements(frame) {
        out.extend_from_slice(if e == b"_\r\n" { b"$-1\r\n" } else { e });
    }
}

/// The reply to PING from a RESP2 subscriber: `["pong", <argument or "">]`.
fn pong_as_resp2(reply: &[u8], out: &mut BytesMut) {
    match reply.first() {
        Some(b'+') => out.extend_from_slice(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"),
        Some(b'$') => {
            out.extend_from_slice(b"*2\r\n$4\r\npong\r\n");
            out.extend_from_slice(reply);
        }
        _ => out.extend_from_slice(reply),
    }
}

/// A monitor line, as Redis formats one: `<seconds>.<microseconds> [<db> <client>] …`.
fn is_monitor_line(line: &[u8]) -> bool {
    let secs = line.iter().take_while(|b| b.is_ascii_digit()).count();
    let rest = &line[secs..];
    secs > 0
        && rest.len() >= 9
        && rest[0] == b'.'
        && rest[1..7].iter().all(u8::is_ascii_digit)
        && &rest[7..9] == b" ["
}

/// The channel a confirmation names (`[kind, channel, count]`); none for an unsubscribe
/// from nothing (a null).
fn ack_name(frame: &[u8]) -> Option<Vec<u8>> {
    let (channel, _) = Value::decode(elements(frame).nth(1)?)?;
    channel.as_str().map(<[u8]>::to_vec)
}
