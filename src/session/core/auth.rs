//! The upstream's authentication: the first AUTH, a re-AUTH with every new token at the
//! first point where it cannot disturb the client's commands, their answers, and the close
//! shortly before the token the connection is authenticated with expires.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::replies::error_text;
use super::{CloseReason, Core, CLOSE_BEFORE_EXPIRY, HARD_CLOSE_BEFORE_EXPIRY};
use crate::credentials::Credentials;
use crate::log_budget::LogBudget;
use crate::session::ledger::{Expect, Injected};

/// An AUTH the upstream accepted.
#[derive(Debug, Clone, Copy)]
pub(super) struct Authed {
    generation: u64,
    expires_at: Option<SystemTime>,
    /// When the reply arrived.
    at: SystemTime,
}

/// One answered AUTH of the proxy's.
#[derive(Debug, Clone, Copy)]
pub struct AuthEvent {
    pub initial: bool,
    /// The token generation the AUTH carried.
    pub generation: u64,
    pub ok: bool,
    /// From writing the AUTH to reading its reply (includes commands queued before it).
    pub latency: Duration,
}

impl Core {
    /// Whether the upstream is authenticated with the newest credentials.
    pub fn current(&self) -> bool {
        self.authed
            .is_some_and(|a| a.generation == self.creds.generation)
    }

    /// A re-AUTH failed and waits for [`Core::retry_reauth`].
    pub fn reauth_failed(&self) -> bool {
        self.reauth_failed
    }

    /// When the connection must be closed unless it re-authenticates first: shortly before
    /// the token it is authenticated with expires. Once that passed ([`Core::expire`]), the
    /// moment just before expiry when replies still owed are given up.
    pub fn close_deadline(&self) -> Option<SystemTime> {
        let a = self.authed?;
        let expires = a.expires_at?;
        let lifetime = expires.duration_since(a.at).unwrap_or_default();
        if self.expiring {
            return Some(expires - HARD_CLOSE_BEFORE_EXPIRY.min(lifetime / 20));
        }
        Some(expires - CLOSE_BEFORE_EXPIRY.min(lifetime / 10))
    }

    /// The upstream accepted an AUTH on this connection at least once.
    pub fn authenticated(&self) -> bool {
        self.authed.is_some()
    }

    /// The first AUTH was written (always, but for a core still
    /// [`unconnected`](Core::unconnected)).
    pub fn auth_written(&self) -> bool {
        !self.deferred_auth
    }

    /// This core, once [`unconnected`](Core::unconnected), goes on over the connection of
    /// `pooled`, which is authenticated with the same credentials: its own first AUTH, not
    /// written yet, is not needed and goes. (With other credentials, it stays: correct,
    /// one AUTH more.) Whether it went.
    pub fn adopt_authentication(&mut self, pooled: &Core) -> bool {
        let Some(authed) = pooled
            .authed
            .filter(|a| a.generation == self.creds.generation)
        else {
            return false;
        };
        let first = matches!(
            self.ledger.front(),
            Some(Expect::Swallow(Injected::Auth { generation, initial: true, .. }))
                if *generation == authed.generation
        );
        let mut auth = bytes::BytesMut::new();
        self.creds.write_auth(&mut auth);
        if !first || self.authed.is_some() || !self.to_upstream.starts_with(&auth) {
            return false;
        }
        bytes::Buf::advance(&mut self.to_upstream, auth.len());
        self.ledger.pop();
        self.auths_in_flight -= 1;
        self.authed = Some(authed);
        true
    }

    /// The first AUTH was not answered in time: the client hears it once, as when the AUTH
    /// is refused, and the connection closes.
    pub fn auth_timed_out(&mut self, after: Duration) {
        if self.authed.is_some() || self.closing.is_some() {
            return;
        }
        let msg = format!("ERR redis-entra-proxy: upstream did not answer AUTH within {after:?}");
        self.first_auth_failed(&msg, CloseReason::UpstreamAuthTimeout(after));
    }

    /// The first AUTH failed: the client hears about it once, as the reply to everything it
    /// sent (nothing it pipelined has been answered yet), and the connection closes.
    fn first_auth_failed(&mut self, msg: &str, reason: CloseReason) {
        self.ledger.clear();
        self.streaming = false;
        self.to_client.clear();
        crate::resp::encode::error(&mut self.to_client, msg);
        self.closing = Some(reason);
    }

    /// Time left on the token the upstream is authenticated with.
    pub fn authed_remaining(&self, now: SystemTime) -> Option<Duration> {
        let expires = self.authed?.expires_at?;
        Some(expires.duration_since(now).unwrap_or_default())
    }

    /// The deadline passed without re-authentication. The first time: read nothing more
    /// from the client and close once every reply owed to it was delivered. The second time
    /// (the token is about to expire, a command is still blocked): close now.
    pub fn expire(&mut self) {
        if self.closing.is_some() {
            return;
        }
        if self.expiring {
            self.closing = Some(CloseReason::TokenExpiring);
        } else {
            self.expiring = true;
            self.close_after_replies(CloseReason::TokenExpiring);
        }
    }

    /// New credentials: the upstream re-authenticates at its next safe point.
    pub fn set_credentials(&mut self, creds: Arc<Credentials>) {
        tracing::trace!(
            generation = creds.generation,
            safe = self.safe_to_inject(),
            "new credentials"
        );
        // Only a newer token: a session may hear of one twice, from the refresher's channel
        // when it starts and from its group's (`credentials::fanout`) later.
        if creds.generation > self.creds.generation {
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
        // Redis refuses AUTH from a RESP2 subscriber.
        let resp2_sub = s.wproto == 2 && s.subs.any();
        self.between_commands() && !s.monitor && !resp2_sub
    }

    /// Whether a command written now runs on its own, between two of the client's: not
    /// queued in MULTI, not after a one-shot flag or QUIT, not inside a request being passed
    /// on, not behind a barrier.
    fn between_commands(&self) -> bool {
        let s = &self.state;
        self.closing.is_none()
            && !self.streaming
            && !s.in_multi
            && !s.one_shot
            && !s.quit
            && !s.barrier
    }

    /// Injects what the connection owes now: `HELLO 2` once a RESP2 client the proxy moved
    /// to RESP3 has no subscription left, and the AUTH of newer credentials.
    pub(in crate::session) fn maybe_reauth(&mut self) {
        if self.deferred_auth {
            // Nothing is written before the client gives the password.
            return;
        }
        if self.state.emulating && !self.state.subs.any() && self.between_commands() {
            self.inject_hello(2, false);
        }
        if self.auths_in_flight == 0
            && !self.current()
            && !self.reauth_failed
            && self.safe_to_inject()
        {
            self.inject_auth(false);
        }
    }

    /// Writes `AUTH <user> <token>` and expects its reply to be swallowed.
    pub(in crate::session) fn inject_auth(&mut self, initial: bool) {
        self.creds.write_auth(&mut self.to_upstream);
        let generation = self.creds.generation;
        tracing::trace!(generation, initial, "AUTH injected");
        self.auths_in_flight += 1;
        self.ledger.push(Expect::Swallow(Injected::Auth {
            generation,
            initial,
            expires_at: self.creds.expires_at,
            sent: std::time::Instant::now(),
        }));
    }

    /// Forces a fresh AUTH now (after RESET, which de-authenticates the connection).
    pub(in crate::session) fn reauth_now(&mut self) {
        self.authed = None;
        self.inject_auth(false);
    }

    pub(super) fn auth_answered(
        &mut self,
        generation: u64,
        initial: bool,
        expires_at: Option<SystemTime>,
        sent: std::time::Instant,
        error: bool,
    ) {
        self.auths_in_flight = self.auths_in_flight.saturating_sub(1);
        self.auth_events.push(AuthEvent {
            initial,
            generation,
            ok: !error,
            latency: sent.elapsed(),
        });
        tracing::trace!(generation, initial, error, "AUTH answered");
        if !error {
            if !initial {
                self.stats.reauth_ok += 1;
            }
            self.authed = Some(Authed {
                generation,
                expires_at,
                at: SystemTime::now(),
            });
            if generation == self.creds.generation {
                // An earlier refusal of this generation is moot.
                self.reauth_failed = false;
            }
            return;
        }
        let text = error_text(&self.held);
        if initial {
            // With the server's own error code.
            let msg = format!(
                "{text} (redis-entra-proxy: upstream authentication as '{}' failed)",
                self.creds.username
            );
            let logged = format!("{text} (as '{}')", self.creds.username);
            self.first_auth_failed(&msg, CloseReason::UpstreamAuth(logged));
        } else {
            // The previous token is still valid: keep the connection, retry later.
            self.stats.reauth_failed += 1;
            self.reauth_failed = true;
            static REFUSED: LogBudget = LogBudget::new("upstream refused re-authentication");
            if let Some(suppressed) = REFUSED.take() {
                tracing::warn!(
                    generation,
                    username = %self.creds.username,
                    error = %text,
                    suppressed,
                    "upstream refused re-authentication"
                );
            }
        }
    }
}
