//! Tests of the refresher: the pure policy ([`schedule`], [`Backoff`]) with exact values, and
//! [`run`] itself under paused tokio time against a scripted [`TokenSource`] that records the
//! virtual instant of every fetch. Jitter comes from `fastrand` inside `run`, so the timing
//! tests check bounds rather than exact values.
//!
//! Not covered here: the refresh error kept in `admin::Health`, which has no public reader
//! (the admin endpoint's tests read it through `/readyz`).

use super::*;

const MIN: Duration = Duration::from_secs(60);
const SEC: Duration = Duration::from_secs(1);

#[test]
fn schedule_follows_ratio_and_bound() {
    let p = Policy::default();
    let cases = [
        ("1 h at 75 %", 60 * MIN, 0.0, 45 * MIN),
        ("1 h, full jitter", 60 * MIN, 1.0, 44 * MIN),
        (
            "12 min capped at 5 min before expiry",
            12 * MIN,
            0.0,
            7 * MIN,
        ),
        ("24 h", 24 * 60 * MIN, 0.0, 18 * 60 * MIN),
        ("6 min: 5 min before expiry", 6 * MIN, 0.0, MIN),
        (
            "5.5 min: a tenth of its life, not at once",
            11 * MIN / 2,
            0.0,
            33 * SEC,
        ),
        (
            "2 s test token",
            Duration::from_secs(2),
            0.0,
            Duration::from_millis(1500),
        ),
        (
            "2 s, full jitter",
            Duration::from_secs(2),
            1.0,
            Duration::from_millis(1400),
        ),
    ];
    for (name, lifetime, jitter, want) in cases {
        assert_eq!(schedule(lifetime, p, jitter), want, "{name}");
    }
    for j in [0.0, 0.3, 0.99] {
        let d = schedule(60 * MIN, p, j);
        assert!(d <= 55 * MIN && d >= 44 * MIN, "{d:?}");
    }
}

#[test]
fn backoff_grows_to_cap_and_never_stops() {
    let mut b = Backoff::default();
    let delays: Vec<_> = (0..10).map(|_| b.next(0.5)).collect();
    assert_eq!(delays[0], Duration::from_secs(1));
    assert_eq!(delays[1], Duration::from_secs(2));
    assert_eq!(delays[5], Duration::from_secs(32));
    assert_eq!(delays[9], BACKOFF_MAX);
    for _ in 0..1000 {
        b.next(1.0);
    }
    assert!(b.next(1.0) <= BACKOFF_MAX.mul_f64(1.2));
    assert!(b.next(0.0) >= BACKOFF_MAX.mul_f64(0.8));
}

/// `run` under paused time (tokio's `test-util`, enabled for tests in `Cargo.toml`).
mod paused {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use tokio::sync::{mpsc, Notify};
    use tokio::task::JoinHandle;
    use tokio::time::Instant;

    use super::*;
    use crate::admin::Health;
    use crate::credentials::{ChangedFuture, CredentialError, Token, TokenFuture};
    use crate::secret::Secret;

    /// Longest the test waits (in virtual time) for any one event. Every refresh or retry in
    /// these tests is due within 45 minutes, so two hours only runs out if `run` stalls.
    const HORIZON: Duration = Duration::from_secs(2 * 3600);
    /// tokio's timer fires on whole milliseconds, so a sleep may end up to this much late.
    const TICK: Duration = Duration::from_millis(2);
    const SOURCE_USER: &str = "scripted-user";

    /// What the scripted source does on one fetch.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// A new token valid for this long (from the real clock, which `run` checks expiry
        /// against).
        Valid(Duration),
        /// A new token without an expiry.
        NoExpiry,
        /// The token of the last `Valid` step again, as a caching identity library would.
        Again,
        /// A new token that expired a second ago.
        Expired,
        Fail,
        /// A failure whose text quotes secrets, as an endpoint echoing its request would,
        /// and goes on for pages.
        FailQuoting,
        /// Never answers (until `run` drops the future).
        Hang,
    }

    /// A [`TokenSource`] that plays a script and records when it was asked. Once the script
    /// is played out, every fetch hangs.
    #[derive(Debug)]
    struct Scripted {
        steps: Mutex<VecDeque<Step>>,
        /// Virtual instant of every fetch, in order; also sent on `fetched` so that the test
        /// can wait for the next one.
        calls: Mutex<Vec<Instant>>,
        fetched: mpsc::UnboundedSender<Instant>,
        /// Fetches in progress that are hanging; a guard decrements it when `run` drops them.
        hanging: Arc<AtomicUsize>,
        /// Resolves `changed()`; the test notifies it to simulate a source-side change.
        changed: Notify,
        issued: AtomicUsize,
        last: Mutex<Option<Token>>,
    }

    /// Decrements the hanging count when a hanging fetch is dropped.
    struct HangGuard(Arc<AtomicUsize>);

    impl Drop for HangGuard {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Scripted {
        fn token(&self, expires_at: Option<SystemTime>) -> Token {
            let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
            Token {
                token: Secret::new(format!("token-{n}")),
                expires_at,
                username: Some(SOURCE_USER.into()),
            }
        }
    }

    impl TokenSource for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }

        fn fetch(&self) -> TokenFuture<'_> {
            Box::pin(async move {
                let now = Instant::now();
                self.calls.lock().expect("lock").push(now);
                let _ = self.fetched.send(now);
                let step = self.steps.lock().expect("lock").pop_front();
                let real_now = SystemTime::now();
                match step.unwrap_or(Step::Hang) {
                    Step::Valid(lifetime) => {
                        let token = self.token(Some(real_now + lifetime));
                        *self.last.lock().expect("lock") = Some(token.clone());
                        Ok(token)
                    }
                    Step::NoExpiry => Ok(self.token(None)),
                    Step::Again => Ok(self
                        .last
                        .lock()
                        .expect("lock")
                        .clone()
                        .expect("the script issues a token before `Again`")),
                    Step::Expired => Ok(self.token(Some(real_now - Duration::from_secs(1)))),
                    Step::Fail => Err(CredentialError::Source("scripted failure".into())),
                    Step::FailQuoting => Err(CredentialError::Source(format!(
                        "HTTP 500: Authorization: Bearer s3cr3t-opaque eyJhbGciOi.eyJvaWQiOi.c2lnbmF0dXJl {}",
                        "é".repeat(1000)
                    ))),
                    Step::Hang => {
                        self.hanging.fetch_add(1, Ordering::SeqCst);
                        let _guard = HangGuard(self.hanging.clone());
                        std::future::pending().await
                    }
                }
            })
        }

        fn changed(&self) -> ChangedFuture<'_> {
            Box::pin(self.changed.notified())
        }
    }

    /// `run` on a scripted source, and the test's ends of its channels.
    struct Harness {
        source: Arc<Scripted>,
        rx: CredentialsRx,
        fetches: mpsc::UnboundedReceiver<Instant>,
        shutdown: CancellationToken,
        task: JoinHandle<()>,
        start: Instant,
        health: Arc<Health>,
    }

    impl Harness {
        fn start(steps: impl IntoIterator<Item = Step>) -> Harness {
            let (fetched, fetches) = mpsc::unbounded_channel();
            let source = Arc::new(Scripted {
                steps: Mutex::new(steps.into_iter().collect()),
                calls: Mutex::default(),
                fetched,
                hanging: Arc::default(),
                changed: Notify::new(),
                issued: AtomicUsize::new(0),
                last: Mutex::default(),
            });
            let (tx, rx) = watch::channel(None);
            let shutdown = CancellationToken::new();
            let start = Instant::now();
            let health = Arc::new(Health::default());
            let task = tokio::spawn(run(
                source.clone(),
                None,
                Policy::default(),
                tx,
                health.clone(),
                shutdown.clone(),
            ));
            Harness {
                source,
                rx,
                fetches,
                shutdown,
                task,
                start,
                health,
            }
        }

        /// Waits for the next fetch; returns its virtual time since the start.
        async fn next_fetch(&mut self) -> Duration {
            let at = tokio::time::timeout(HORIZON, self.fetches.recv())
                .await
                .expect("a fetch within the horizon")
                .expect("the source lives as long as the harness");
            at - self.start
        }

        /// Waits for the next fetch and returns the gap since `previous`.
        async fn gap_after(&mut self, previous: &mut Duration) -> Duration {
            let at = self.next_fetch().await;
            let gap = at - *previous;
            *previous = at;
            gap
        }

        /// Waits until `run` publishes again; returns what it published.
        async fn next_published(&mut self) -> Arc<Credentials> {
            tokio::time::timeout(HORIZON, self.rx.changed())
                .await
                .expect("a publication within the horizon")
                .expect("run holds the sender");
            self.rx
                .borrow_and_update()
                .clone()
                .expect("run publishes Some")
        }

        /// Cancels `run` and checks that it ends without any virtual time passing.
        async fn stop(self) {
            let before = Instant::now();
            self.shutdown.cancel();
            tokio::time::timeout(HORIZON, self.task)
                .await
                .expect("run ends after shutdown")
                .expect("run does not panic");
            assert_eq!(Instant::now(), before, "shutdown is immediate");
        }
    }

    fn assert_within(name: &str, got: Duration, lo: Duration, hi: Duration) {
        assert!(
            got >= lo && got <= hi + TICK,
            "{name}: {got:?} not in [{lo:?}, {hi:?}]"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_at_ratio_minus_jitter_and_before_the_bound() {
        let ms = Duration::from_millis;
        // (name, lifetime, earliest and latest refresh after the fetch)
        let cases = [
            ("1 h: 75 % minus up to 1 min", 60 * MIN, 44 * MIN, 45 * MIN),
            (
                "12 min: 5 min before expiry minus up to 5 %",
                12 * MIN,
                7 * MIN - 12 * MIN / 20,
                7 * MIN,
            ),
            ("2 s: 75 % minus up to 5 %", ms(2000), ms(1400), ms(1500)),
        ];
        for (name, lifetime, lo, hi) in cases {
            // A few rounds sample the jitter.
            for _ in 0..5 {
                let mut h = Harness::start([Step::Valid(lifetime), Step::Valid(lifetime)]);
                assert_eq!(h.next_fetch().await, Duration::ZERO, "{name}: at once");
                let first = h.next_published().await;
                assert_eq!(first.generation, 1, "{name}");
                assert_eq!(first.username, SOURCE_USER, "{name}");
                // The real clock moves a little between the source's expiry and `run`'s
                // reading of it, so the lifetime `run` sees may be a hair shorter.
                assert_within(name, h.next_fetch().await, lo - TICK, hi);
                let second = h.next_published().await;
                assert_eq!(second.generation, 2, "{name}");
                assert_ne!(second.token, first.token, "{name}");
                h.stop().await;
            }
        }
    }

    /// Retries after failures, while a valid token is held, `nominal` seconds apart (±20 %).
    async fn assert_backoff(held: bool, nominal: &[u64]) {
        let mut steps = if held {
            vec![Step::Valid(60 * MIN)]
        } else {
            vec![]
        };
        steps.extend(vec![Step::Fail; nominal.len()]);
        steps.push(Step::Valid(60 * MIN));
        let mut h = Harness::start(steps);
        let mut previous = h.next_fetch().await;
        assert_eq!(previous, Duration::ZERO);
        if held {
            h.next_published().await;
            previous = h.next_fetch().await;
        }
        for (i, &secs) in nominal.iter().enumerate() {
            let gap = h.gap_after(&mut previous).await;
            let n = Duration::from_secs(secs);
            assert_within(
                &format!("gap after failure {} (token held: {held})", i + 1),
                gap,
                n.mul_f64(0.8),
                n.mul_f64(1.2),
            );
            if i < nominal.len() - 1 {
                assert!(
                    !h.rx.has_changed().expect("sender alive"),
                    "nothing published on failure"
                );
            }
        }
        let creds = h.next_published().await;
        assert_eq!(creds.generation, if held { 2 } else { 1 });
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_to_the_cap() {
        assert_backoff(true, &[1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60, 60]).await;
    }

    /// Without a valid token every client is refused: retries come every 5 s at most, so the
    /// proxy is back within seconds of its identity endpoint.
    #[tokio::test(start_paused = true)]
    async fn without_a_token_retries_come_every_few_seconds() {
        assert_eq!(BACKOFF_WITHOUT_TOKEN, Duration::from_secs(5));
        assert_backoff(false, &[1, 2, 4, 5, 5, 5, 5, 5]).await;
    }

    /// A retry never comes later than the current token's expiry, whatever the backoff: the
    /// proxy would otherwise refuse clients until the retry after.
    #[test]
    fn a_retry_comes_by_the_current_tokens_expiry() {
        let left = Duration::from_secs(20);
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..8)
            .map(|_| retry_delay(&mut b, true, Some(left)))
            .collect();
        assert!(delays[..4].iter().all(|d| *d < left), "{delays:?}");
        for d in &delays[5..] {
            assert_eq!(*d, left + Duration::from_millis(10), "{delays:?}");
        }
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..10).map(|_| retry_delay(&mut b, false, None)).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d <= BACKOFF_WITHOUT_TOKEN.mul_f64(1.2)),
            "{delays:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_gives_up_and_keeps_the_current_token() {
        const FAILURES: usize = 1000;
        let mut steps = vec![Step::Valid(60 * MIN)];
        steps.extend([Step::Fail; FAILURES]);
        steps.push(Step::Valid(60 * MIN));
        let mut h = Harness::start(steps);
        h.next_fetch().await;
        let current = h.next_published().await;
        assert_eq!(current.generation, 1);
        // The fake answers within the same poll of `run`, so by the time the test sees a
        // fetch, `run` has already handled its result.
        let mut previous = h.next_fetch().await;
        assert_within("first refresh", previous, 44 * MIN - TICK, 45 * MIN);
        for i in 1..=FAILURES {
            if i > 1 {
                let gap = h.gap_after(&mut previous).await;
                assert!(gap <= BACKOFF_MAX.mul_f64(1.2) + TICK, "gap {i}: {gap:?}");
            }
            assert!(!h.rx.has_changed().expect("sender alive"), "failure {i}");
            let still = h.rx.borrow().clone().expect("the current token stays");
            assert!(Arc::ptr_eq(&still, &current), "failure {i}");
        }
        // 1,000 retries at about a minute each: most of a day of virtual time.
        assert!(
            previous > 13 * 60 * MIN && previous < 22 * 60 * MIN,
            "{previous:?}"
        );
        let gap = h.gap_after(&mut previous).await;
        assert!(gap <= BACKOFF_MAX.mul_f64(1.2) + TICK, "last gap: {gap:?}");
        let next = h.next_published().await;
        assert_eq!(next.generation, 2);
        assert_eq!(next.token.expose(), "token-2");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_fetch_is_abandoned_and_retried() {
        let mut h = Harness::start([Step::Hang, Step::Valid(60 * MIN)]);
        let mut previous = h.next_fetch().await;
        let gap = h.gap_after(&mut previous).await;
        // The attempt timeout, then the first backoff delay (1 s ± 20 %).
        let first_backoff = BACKOFF_INITIAL;
        assert_within(
            "retry after a hang",
            gap,
            ATTEMPT_TIMEOUT + first_backoff.mul_f64(0.8),
            ATTEMPT_TIMEOUT + first_backoff.mul_f64(1.2),
        );
        assert_eq!(
            h.source.hanging.load(Ordering::SeqCst),
            0,
            "the hanging fetch was dropped"
        );
        assert_eq!(h.next_published().await.generation, 1);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_token_is_rejected_and_retried() {
        let mut h = Harness::start([Step::Expired, Step::Valid(60 * MIN)]);
        let mut previous = h.next_fetch().await;
        assert!(
            h.rx.borrow().is_none(),
            "the expired token is not published"
        );
        let gap = h.gap_after(&mut previous).await;
        let ms = Duration::from_millis;
        assert_within("retry", gap, ms(800), ms(1200));
        let creds = h.next_published().await;
        assert_eq!(creds.generation, 1, "the expired token was never published");
        assert_eq!(creds.token.expose(), "token-2");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_token_again_is_not_republished() {
        let mut h = Harness::start([
            Step::Valid(60 * MIN),
            Step::Again,
            Step::Again,
            Step::Valid(60 * MIN),
        ]);
        h.next_fetch().await;
        let first = h.next_published().await;
        let mut previous = h.next_fetch().await;
        assert!(
            !h.rx.has_changed().expect("sender alive"),
            "first rejection"
        );
        // With a quarter of its life left, the current token is no reason for alarm.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(h.health.refresh_error(), None);
        // Two rejections, retried after 1 s and 2 s (± 20 %); the last retry succeeds.
        for (i, secs) in [1, 2].into_iter().enumerate() {
            let gap = h.gap_after(&mut previous).await;
            let n = Duration::from_secs(secs);
            assert_within(&format!("retry {i}"), gap, n.mul_f64(0.8), n.mul_f64(1.2));
            if i == 0 {
                assert!(
                    !h.rx.has_changed().expect("sender alive"),
                    "second rejection"
                );
            }
        }
        let next = h.next_published().await;
        assert_eq!(
            (first.generation, next.generation),
            (1, 2),
            "generations count published tokens only"
        );
        assert_eq!(next.token.expose(), "token-2");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_token_close_to_expiry_is_a_failure() {
        // A 4-minute token has less left than the 5 minutes every connection's re-AUTH needs:
        // the same token again is a refresh that failed, and readiness says why.
        let mut h = Harness::start([Step::Valid(4 * MIN), Step::Again]);
        h.next_fetch().await;
        h.next_published().await;
        h.next_fetch().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let error = h.health.refresh_error().expect("a refresh error");
        assert!(
            error.contains("keeps returning the current token"),
            "{error}"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_shown_redacted_and_cut() {
        let mut h = Harness::start([Step::FailQuoting]);
        h.next_fetch().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let error = h.health.refresh_error().expect("a refresh error");
        assert!(
            error.starts_with(
                "token source failed: HTTP 500: Authorization: Bearer [redacted] [redacted] éé"
            ),
            "{error}"
        );
        assert!(
            !error.contains("s3cr3t") && !error.contains("eyJ"),
            "{error}"
        );
        assert!(error.len() <= crate::credentials::MAX_ERROR_TEXT + '…'.len_utf8());
        assert!(error.ends_with('…'), "{error}");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_without_expiry_is_fetched_once() {
        let mut h = Harness::start([Step::NoExpiry, Step::Valid(60 * MIN)]);
        h.next_fetch().await;
        let creds = h.next_published().await;
        assert_eq!((creds.generation, creds.expires_at), (1, None));
        let more = tokio::time::timeout(24 * 60 * MIN, h.fetches.recv()).await;
        assert!(more.is_err(), "no second fetch in a day");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_signalled_by_the_source_fetches_at_once() {
        let mut h = Harness::start([Step::Valid(60 * MIN), Step::Valid(60 * MIN)]);
        h.next_fetch().await;
        h.next_published().await;
        tokio::time::sleep(10 * MIN).await;
        h.source.changed.notify_one();
        assert_eq!(h.next_fetch().await, 10 * MIN);
        assert_eq!(h.next_published().await.generation, 2);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_it_promptly_in_every_state() {
        let cases = [
            ("waiting for the next refresh", Step::Valid(60 * MIN)),
            ("during a hanging fetch", Step::Hang),
            ("backing off after a failure", Step::Fail),
            ("holding a token without expiry", Step::NoExpiry),
        ];
        for (name, step) in cases {
            let mut h = Harness::start([step]);
            h.next_fetch().await;
            // Let `run` settle into the state the case names (less than the shortest
            // backoff, 0.8 s, so that no second fetch starts).
            tokio::time::sleep(Duration::from_millis(500)).await;
            let source = h.source.clone();
            h.stop().await;
            assert_eq!(source.hanging.load(Ordering::SeqCst), 0, "{name}");
            assert_eq!(source.calls.lock().expect("lock").len(), 1, "{name}");
        }
    }
}
