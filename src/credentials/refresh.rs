//! The token refresher: fetches a token, publishes credentials to every session through a
//! `watch` channel, and fetches the next one before the current one expires. It never gives
//! up: failures are retried with capped exponential backoff and jitter for as long as the
//! process lives, while the current token stays in use until it expires.
//!
//! [`schedule`] and [`Backoff`] are pure so that the policy can be tested without a clock.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{credentials_from, Credentials, TokenSource};

/// Latest moment before expiry at which a refresh is scheduled, for tokens long enough to
/// allow it: Microsoft asks for every connection to re-authenticate at least 3 minutes before
/// expiry, and the fan-out to all connections needs the 2 minutes in between.
pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// Default fraction of a token's lifetime after which a new one is fetched.
pub const DEFAULT_REFRESH_RATIO: f64 = 0.75;
/// Jitter subtracted from the refresh time: at most this, and at most 5 % of the lifetime, so
/// that many proxies started together do not hit the identity endpoint in the same second.
pub const MAX_JITTER: Duration = Duration::from_secs(60);
/// First retry delay after a failed fetch.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Retry delays grow to this and stay there: short enough to recover quickly once the
/// endpoint is back, long enough not to hammer it.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// While no valid token is held (none yet, or it expired) every client is refused: retries
/// come at most this far apart (±20 %), so that the proxy is back within seconds of the
/// identity endpoint. A retry also comes as the current token expires, whatever the backoff.
pub const BACKOFF_WITHOUT_TOKEN: Duration = Duration::from_secs(5);
/// One fetch may take this long before it counts as failed; identity endpoints answer in
/// well under a second when healthy.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// What one fetch gave.
enum Fetched {
    New(Credentials),
    /// The current token again: identity endpoints (IMDS, App Service) and libraries hand
    /// back a cached token until shortly before it expires. Not a failure: asked again with
    /// the same backoff, quietly while the current token has time left.
    Unchanged,
    Failed(String),
}

/// The state the refresher publishes. `None` until the first token arrives.
pub type CredentialsRx = watch::Receiver<Option<Arc<Credentials>>>;

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub ratio: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            ratio: DEFAULT_REFRESH_RATIO,
        }
    }
}

/// Delay after a fetch before the next refresh, for a token valid for `lifetime` from the
/// fetch; `jitter` is a uniform sample from [0, 1).
pub fn schedule(lifetime: Duration, policy: Policy, jitter: f64) -> Duration {
    let mut delay = lifetime.mul_f64(policy.ratio.clamp(0.05, 0.95));
    // Never later than 5 minutes before expiry when the token lives longer than that, but
    // never sooner than a tenth of its life either (a 6-minute token is refreshed after 1
    // minute, not at once); tokens living 5 minutes or less (tests, dev) keep the plain ratio.
    if lifetime > REFRESH_BEFORE_EXPIRY {
        delay = delay.min((lifetime - REFRESH_BEFORE_EXPIRY).max(lifetime / 10));
    }
    let max_jitter = MAX_JITTER.min(lifetime / 20);
    delay.saturating_sub(max_jitter.mul_f64(jitter.clamp(0.0, 1.0)))
}

/// Capped exponential backoff with ±20 % jitter.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// Delay before the next attempt after one more failure; `jitter` uniform in [0, 1).
    pub fn next(&mut self, jitter: f64) -> Duration {
        let exp = BACKOFF_INITIAL.saturating_mul(1u32 << self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        exp.min(BACKOFF_MAX)
            .mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Delay before the next attempt after a failed one: the backoff's, but no later than the
/// current token's expiry (`valid_for`), and at most [`BACKOFF_WITHOUT_TOKEN`] (±20 %) while
/// no valid token is `held`.
pub fn retry_delay(backoff: &mut Backoff, held: bool, valid_for: Option<Duration>) -> Duration {
    let wait = backoff.next(fastrand::f64());
    if !held {
        return wait.min(BACKOFF_WITHOUT_TOKEN.mul_f64(0.8 + 0.4 * fastrand::f64()));
    }
    match valid_for {
        // Just past the expiry, so that the attempt sees it expired.
        Some(left) => wait.min(left + Duration::from_millis(10)),
        None => wait,
    }
}

/// Runs the refresher until `shutdown`. Publishes through `tx`.
pub async fn run(
    source: Arc<dyn TokenSource>,
    username: Option<String>,
    policy: Policy,
    tx: watch::Sender<Option<Arc<Credentials>>>,
    health: Arc<crate::admin::Health>,
    shutdown: CancellationToken,
) {
    let counter = |result: &'static str| metrics::counter!(crate::metrics::TOKEN_REFRESH_TOTAL, "source" => source.name(), "result" => result);
    let (ok_count, error_count, unchanged_count) =
        (counter("ok"), counter("error"), counter("unchanged"));
    let mut backoff = Backoff::default();
    let mut generation = 0u64;
    loop {
        let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, source.fetch());
        let outcome = tokio::select! {
            r = attempt => r,
            _ = shutdown.cancelled() => return,
        };
        let now = SystemTime::now();
        let current = tx.borrow().clone();
        let valid_for = current.as_ref().and_then(|c| c.remaining(now));
        let fetched = match outcome {
            Err(_) => Fetched::Failed(format!("timed out after {ATTEMPT_TIMEOUT:?}")),
            // Sources quote what endpoints and commands said, which may hold a secret.
            Ok(Err(e)) => Fetched::Failed(super::redact::<&str>(&e.to_string(), &[])),
            Ok(Ok(token)) => match credentials_from(token, username.as_deref(), generation + 1) {
                Err(e) => Fetched::Failed(e.to_string()),
                Ok(c) if c.is_expired(now) => {
                    Fetched::Failed("the source returned an expired token".into())
                }
                Ok(c)
                    if current
                        .as_ref()
                        .is_some_and(|cur| cur.token == c.token && c.expires_at.is_some()) =>
                {
                    if valid_for.is_some_and(|v| v > REFRESH_BEFORE_EXPIRY) {
                        Fetched::Unchanged
                    } else {
                        // Close to expiry, that is a failure to refresh.
                        Fetched::Failed(
                            "the source keeps returning the current token, which expires soon"
                                .into(),
                        )
                    }
                }
                Ok(c) => Fetched::New(c),
            },
        };
        // A token is held that sessions may still use.
        let held = current.as_ref().is_some_and(|c| !c.is_expired(now));
        let wait = match fetched {
            Fetched::New(creds) => {
                let failures = backoff.failures();
                backoff.reset();
                ok_count.increment(1);
                health.set_refresh_error(None);
                generation += 1;
                let lifetime = creds.remaining(now);
                tracing::info!(
                    source = source.name(),
                    username = %creds.username,
                    generation,
                    expires_in_s = lifetime.map(|d| d.as_secs()),
                    after_failures = (failures > 0).then_some(failures),
                    "token acquired"
                );
                // The first token: the service manager may start what depends on the proxy.
                let ready = if generation == 1 { "READY=1\n" } else { "" };
                crate::notify::send(&format!("{ready}{}", serving(&creds)));
                tx.send_replace(Some(Arc::new(creds)));
                match lifetime {
                    Some(l) if source.refreshable() => schedule(l, policy, fastrand::f64()),
                    _ => {
                        // A token without expiry, or from a source that cannot give another.
                        shutdown.cancelled().await;
                        return;
                    }
                }
            }
            Fetched::Unchanged => {
                let wait = backoff.next(fastrand::f64());
                unchanged_count.increment(1);
                // The source answers: an earlier failure is over.
                health.set_refresh_error(None);
                if let Some(current) = &current {
                    crate::notify::send(&serving(current));
                }
                tracing::debug!(
                    source = source.name(),
                    retry_in_ms = wait.as_millis() as u64,
                    current_valid_for_s = valid_for.map(|d| d.as_secs()),
                    "the source returned the current token again; asking again later"
                );
                wait
            }
            Fetched::Failed(reason) => {
                let wait = retry_delay(&mut backoff, held, valid_for);
                error_count.increment(1);
                crate::notify::send(&crate::notify::status(&match valid_for.filter(|_| held) {
                    Some(left) => format!(
                        "token fetch failing ({} in a row; the current token is valid for {} s \
                         more): {reason}",
                        backoff.failures(),
                        left.as_secs()
                    ),
                    None => format!(
                        "no valid token, clients are refused: token fetch failing ({} in a \
                         row): {reason}",
                        backoff.failures()
                    ),
                }));
                health.set_refresh_error(Some(reason.clone()));
                if held {
                    tracing::warn!(
                        source = source.name(),
                        failures = backoff.failures(),
                        retry_in_ms = wait.as_millis() as u64,
                        current_valid_for_s = valid_for.map(|d| d.as_secs()),
                        error = %reason,
                        "token fetch failed; retrying"
                    );
                } else {
                    // The proxy's worst state: every client is refused until a fetch works.
                    tracing::error!(
                        source = source.name(),
                        failures = backoff.failures(),
                        retry_in_ms = wait.as_millis() as u64,
                        error = %reason,
                        "token fetch failed and no valid token is held: clients are refused \
                         until a fetch succeeds; retrying"
                    );
                }
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = source.changed() => tracing::debug!(source = source.name(), "source changed; fetching now"),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The service manager's status line while `creds` serve.
fn serving(creds: &Credentials) -> String {
    crate::notify::status(&format!(
        "serving; token for {} (generation {}){}",
        creds.username,
        creds.generation,
        creds
            .expires_at
            .map(|at| format!(", expires at {}", crate::notify::clock(at)))
            .unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests;
