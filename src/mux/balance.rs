//! Where shared clients run (`--multiplex-consolidate`): on one session thread while their
//! requests are small and one thread keeps up, spread over all of them otherwise.
//!
//! Why: each session thread has its own router and shared connection. With small requests a
//! request costs little and its overheads dominate (a batch per thread, a wake-up of each
//! thread per batch, one more thread for the machine to schedule): on 2 cores with 50
//! clients, one thread served 10–28 % more requests per second than two, at less CPU per
//! request, since its batches were twice as large. With large values (16 KiB) the work per
//! request (copies, AES-GCM) is what counts, and two threads served 15 % more than one. So the
//! routers measure what goes through them, and the router on the home thread (worker 0)
//! decides, every [`INTERVAL`]:
//! - consolidate when requests and replies average under [`SMALL`] bytes a request and the
//!   request rate is below what made the home thread saturate before (if it ever did);
//! - spread when they average over [`LARGE`] bytes (at once after [`LARGE_AT_ONCE`] such
//!   requests), or when the home thread, with every shared client on it, was on a CPU
//!   [`SATURATED`] of the time: one thread no longer keeps up, and the rate at which it
//!   happened is remembered.
//!
//! Clients move between threads only when nothing is owed to them and nothing is waiting to
//! be written to them (`mux::shared_phase`), so a move cannot reorder or lose a reply.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the home router decides.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// Mean bytes per request (request and reply together) under which clients consolidate.
pub const SMALL: u64 = 1024;
/// Mean bytes per request over which clients spread.
pub const LARGE: u64 = 4096;
/// Share of the time on a CPU at which the home thread, serving every shared client, counts
/// as saturated.
pub const SATURATED: f64 = 0.93;
/// After a saturation, consolidate again only below this share of the rate it happened at.
const RESATURATE_MARGIN: f64 = 0.7;
/// Routers add their counts to the shared ones at most this often.
const FLUSH: Duration = Duration::from_millis(20);
/// Gathered, the home router spreads the clients at once, without waiting for the interval,
/// once this many large requests (over [`LARGE`] bytes on average) went through it: a
/// thread that cannot keep up with large values should not be left alone with them for
/// long. Gathering again always waits for a whole interval.
const LARGE_AT_ONCE: u64 = 32;

/// The placement state of one target's shared clients.
pub struct Balance {
    /// `--multiplex-consolidate`, and more than one session thread.
    enabled: bool,
    consolidated: AtomicBool,
    bytes: AtomicU64,
    requests: AtomicU64,
    decider: Mutex<Decider>,
}

/// What the home router remembers between decisions.
struct Decider {
    last: Instant,
    /// CPU time of the home thread at `last`, when it could be read.
    cpu: Option<Duration>,
    /// The request rate at which the home thread saturated, if it did.
    saturated_at: Option<f64>,
    /// The home thread's CPU time, opened by it at its first decision.
    clock: Option<ThreadCpu>,
}

/// One interval's measurements.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub requests: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Share of the interval the home thread spent on a CPU; `None` if unknown.
    pub busy: Option<f64>,
}

/// The decision for one interval: `Some(consolidate)` to change, `None` to stay.
pub fn decide(consolidated: bool, s: Sample, saturated_at: &mut Option<f64>) -> Option<bool> {
    if s.requests == 0 || s.seconds <= 0.0 {
        return None;
    }
    let per = s.bytes / s.requests;
    let rate = s.requests as f64 / s.seconds;
    if consolidated {
        if s.busy.is_some_and(|b| b >= SATURATED) {
            *saturated_at = Some(rate);
            return Some(false);
        }
        (per > LARGE).then_some(false)
    } else {
        // Without the home thread's CPU time, saturation could not be seen: stay spread.
        let fits = s.busy.is_some() && saturated_at.is_none_or(|at| rate < at * RESATURATE_MARGIN);
        (per < SMALL && fits).then_some(true)
    }
}

impl Balance {
    /// `enabled`: `--multiplex-consolidate` with more than one session thread.
    pub fn new(enabled: bool) -> Balance {
        Balance {
            enabled,
            consolidated: AtomicBool::new(false),
            bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            decider: Mutex::new(Decider {
                last: Instant::now(),
                // Read on the home thread at its first decision.
                cpu: None,
                saturated_at: None,
                clock: None,
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether shared clients gather on the home thread now.
    pub fn consolidated(&self) -> bool {
        self.enabled && self.consolidated.load(Ordering::Relaxed)
    }

    /// Adds a router's counts (see [`Tally`]).
    fn add(&self, requests: u64, bytes: u64) {
        self.requests.fetch_add(requests, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Called by the home router: decides once [`INTERVAL`] has passed since the last time,
    /// or at once when `large` requests came while gathered.
    fn maybe_decide(&self, now: Instant, large: bool) {
        let Ok(mut d) = self.decider.try_lock() else {
            return;
        };
        let elapsed = now.saturating_duration_since(d.last);
        if elapsed < INTERVAL && !large {
            return;
        }
        let cpu = d.clock.get_or_insert_with(ThreadCpu::open).read();
        let busy = match (cpu, d.cpu) {
            // Over a short window the share is too rough to call saturation.
            (Some(now), Some(then)) if elapsed >= INTERVAL => {
                Some(now.saturating_sub(then).as_secs_f64() / elapsed.as_secs_f64())
            }
            _ => None,
        };
        let sample = Sample {
            requests: self.requests.swap(0, Ordering::Relaxed),
            bytes: self.bytes.swap(0, Ordering::Relaxed),
            seconds: elapsed.as_secs_f64(),
            busy,
        };
        (d.last, d.cpu) = (now, cpu);
        let consolidated = self.consolidated.load(Ordering::Relaxed);
        if let Some(to) = decide(consolidated, sample, &mut d.saturated_at) {
            self.consolidated.store(to, Ordering::Relaxed);
            crate::metrics::handles()
                .mux_consolidated
                .set(f64::from(u8::from(to)));
            let per_request = sample.bytes / sample.requests.max(1);
            let rate = (sample.requests as f64 / sample.seconds) as u64;
            let busy = busy.map(|b| (b * 100.0).round() as u64);
            if to {
                tracing::info!(
                    per_request,
                    rate,
                    "shared clients gather on one session thread: small requests"
                );
            } else {
                tracing::info!(
                    per_request,
                    rate,
                    home_thread_busy_pct = busy,
                    "shared clients spread over the session threads"
                );
            }
        }
    }
}

/// A router's counts since it last added them to its [`Balance`].
pub struct Tally {
    home: bool,
    requests: u64,
    bytes: u64,
    flushed: Instant,
}

impl Tally {
    /// `home`: the router runs on the home thread and makes the decisions.
    pub fn new(home: bool) -> Tally {
        Tally {
            home,
            requests: 0,
            bytes: 0,
            flushed: Instant::now(),
        }
    }

    pub fn count(&mut self, requests: usize, bytes: usize) {
        self.requests += requests as u64;
        self.bytes += bytes as u64;
    }

    /// After a batch is answered: hands the counts over now and then, and on the home
    /// thread decides when it is time.
    pub fn batch_answered(&mut self, balance: &Balance) {
        if !balance.enabled {
            return;
        }
        let large = self.home
            && self.requests >= LARGE_AT_ONCE
            && self.bytes / self.requests > LARGE
            && balance.consolidated();
        let now = Instant::now();
        if now.saturating_duration_since(self.flushed) < FLUSH && !large {
            return;
        }
        balance.add(self.requests, self.bytes);
        (self.requests, self.bytes, self.flushed) = (0, 0, now);
        if self.home {
            balance.maybe_decide(now, large);
        }
    }
}

/// CPU time so far of the thread that opened it (`/proc/thread-self/schedstat`, nanoseconds
/// on a CPU); `None` where it cannot be read.
///
/// The file stays open and is read again from its start at each decision: one `pread`
/// (0.7 µs measured) instead of opening, reading and closing it (6.2 µs), on the request path
/// of whichever request ends the interval. It is the opening thread's for good.
struct ThreadCpu(Option<std::fs::File>);

impl ThreadCpu {
    fn open() -> ThreadCpu {
        ThreadCpu(std::fs::File::open("/proc/thread-self/schedstat").ok())
    }

    fn read(&self) -> Option<Duration> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 128];
        let n = self.0.as_ref()?.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        let ns = text.split_whitespace().next()?.parse().ok()?;
        Some(Duration::from_nanos(ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(requests: u64, per: u64, busy: Option<f64>) -> Sample {
        Sample {
            requests,
            bytes: requests * per,
            seconds: 1.0,
            busy,
        }
    }

    #[test]
    fn small_requests_consolidate_and_large_ones_spread() {
        let mut sat = None;
        assert_eq!(
            decide(false, sample(1000, 60, Some(0.4)), &mut sat),
            Some(true)
        );
        assert_eq!(decide(true, sample(1000, 60, Some(0.8)), &mut sat), None);
        // Between the thresholds nothing changes, either way.
        assert_eq!(decide(true, sample(1000, 2000, Some(0.5)), &mut sat), None);
        assert_eq!(decide(false, sample(1000, 2000, Some(0.5)), &mut sat), None);
        assert_eq!(
            decide(true, sample(1000, 16_400, Some(0.7)), &mut sat),
            Some(false)
        );
        assert_eq!(
            decide(false, sample(1000, 16_400, Some(0.3)), &mut sat),
            None
        );
        assert_eq!(sat, None);
    }

    #[test]
    fn a_saturated_home_thread_spreads_until_the_rate_falls_well_below() {
        let mut sat = None;
        assert_eq!(
            decide(true, sample(100_000, 60, Some(0.97)), &mut sat),
            Some(false)
        );
        assert_eq!(sat, Some(100_000.0));
        // Spread, the same load would saturate it again: stay spread.
        assert_eq!(decide(false, sample(90_000, 60, Some(0.5)), &mut sat), None);
        // Well below the rate it saturated at: consolidate again.
        assert_eq!(
            decide(false, sample(50_000, 60, Some(0.3)), &mut sat),
            Some(true)
        );
    }

    #[test]
    fn gathered_large_requests_spread_the_clients_at_once() {
        let balance = Balance::new(true);
        balance.consolidated.store(true, Ordering::Relaxed);
        let mut tally = Tally::new(true);
        // A few large requests: they wait for the interval.
        tally.count(
            LARGE_AT_ONCE as usize - 1,
            16_400 * (LARGE_AT_ONCE as usize - 1),
        );
        tally.batch_answered(&balance);
        assert!(balance.consolidated());
        // Enough of them: spread now, well within the interval.
        tally.count(1, 16_400);
        tally.batch_answered(&balance);
        assert!(!balance.consolidated());
        // Only the home router decides.
        balance.consolidated.store(true, Ordering::Relaxed);
        let mut other = Tally::new(false);
        other.count(1000, 16_400_000);
        other.batch_answered(&balance);
        assert!(balance.consolidated());
    }

    #[test]
    fn nothing_measured_changes_nothing() {
        let mut sat = None;
        assert_eq!(decide(false, sample(0, 0, Some(0.0)), &mut sat), None);
        // Without the thread's CPU time, saturation cannot be seen: never consolidate.
        assert_eq!(decide(false, sample(1000, 60, None), &mut sat), None);
        assert_eq!(decide(true, sample(1000, 60, None), &mut sat), None);
    }

    #[test]
    fn the_thread_cpu_time_is_readable_and_grows() {
        let clock = ThreadCpu::open();
        let Some(before) = clock.read() else {
            // Not Linux, or no schedstat: consolidation stays off there (tested above).
            return;
        };
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        // The same open file, read again, says the new time.
        let after = clock.read().expect("readable twice");
        assert!(after > before);
        // Read by another thread, it still says the time of the thread that opened it.
        let seen = std::thread::spawn(move || clock.read().expect("readable"))
            .join()
            .unwrap();
        assert!(seen >= after, "{seen:?} < {after:?}");
    }
}
