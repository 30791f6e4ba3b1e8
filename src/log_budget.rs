//! At most a few log lines a second for events that come once per connection.
//!
//! A connection that fails logs why, which is what an operator needs, until an outage makes
//! thousands fail a second: applications reconnect in tight loops while the server is
//! unreachable or the connection limit is reached, and one line per attempt would bury the
//! log (and its ingestion bill) without saying anything more. Each such log statement gets a
//! budget of [`LogBudget::PER_SECOND`] lines a second; the lines over it are counted and the
//! next line let through says how many were left out (`suppressed`). When no line comes after
//! a burst, [`flush`] says it (run each second by the proxy), so no count is lost. The
//! metrics still count every event.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LogBudget {
    /// What the lines say, for the line that reports the last burst's count.
    what: &'static str,
    state: Mutex<State>,
    /// In [`BUDGETS`] (from its first line left out on).
    listed: AtomicBool,
}

struct State {
    /// Start of the current one-second window; `None` before the first event.
    window: Option<Instant>,
    /// Lines let through in the window.
    passed: u32,
    /// Lines left out since the last one let through.
    suppressed: u64,
}

/// The budgets that have left a line out, for [`flush`].
static BUDGETS: Mutex<Vec<&'static LogBudget>> = Mutex::new(Vec::new());

impl LogBudget {
    pub const PER_SECOND: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(1);

    /// A budget for lines that say `what` (e.g. `"refused: max connections reached"`).
    pub const fn new(what: &'static str) -> LogBudget {
        LogBudget {
            what,
            state: Mutex::new(State {
                window: None,
                passed: 0,
                suppressed: 0,
            }),
            listed: AtomicBool::new(false),
        }
    }

    /// Whether a line may be logged now: `None` when this one should be left out, else
    /// `Some` with the number of lines left out since the last one let through, if any (as a
    /// log field, `None` is left out).
    pub fn take(&'static self) -> Option<Option<u64>> {
        let taken = self.take_at(Instant::now());
        if taken.is_none() && !self.listed.swap(true, Ordering::Relaxed) {
            BUDGETS.lock().unwrap_or_else(|e| e.into_inner()).push(self);
        }
        taken
    }

    fn take_at(&self, now: Instant) -> Option<Option<u64>> {
        let mut s = self.lock();
        if s.window
            .is_none_or(|start| now.duration_since(start) >= Self::WINDOW)
        {
            s.window = Some(now);
            s.passed = 0;
        }
        if s.passed < Self::PER_SECOND {
            s.passed += 1;
            let suppressed = std::mem::take(&mut s.suppressed);
            Some((suppressed > 0).then_some(suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }

    /// The lines left out in a window that has ended (or, with `stopping`, in any) with no
    /// line after them: their count, taken (the next line let through would have said it).
    fn left_out_at(&self, now: Instant, stopping: bool) -> Option<u64> {
        let mut s = self.lock();
        let ended = stopping
            || s.window
                .is_some_and(|start| now.duration_since(start) >= Self::WINDOW);
        (ended && s.suppressed > 0).then(|| std::mem::take(&mut s.suppressed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Logs, for each budget whose burst ended without a line after it, how many of its lines
/// were left out. The proxy runs it every second, and once more, `stopping`, as it exits.
pub fn flush(stopping: bool) {
    let budgets = BUDGETS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let now = Instant::now();
    for budget in budgets {
        if let Some(suppressed) = budget.left_out_at(now, stopping) {
            tracing::warn!(
                suppressed,
                "{}: {suppressed} more such lines left out (the metrics count each)",
                budget.what
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_and_the_next_line_counts_what_was_left_out() {
        let budget = LogBudget::new("test");
        let t0 = Instant::now();
        let first: Vec<_> = (0..LogBudget::PER_SECOND)
            .map(|_| budget.take_at(t0))
            .collect();
        assert!(first.iter().all(|t| *t == Some(None)), "{first:?}");
        for i in 0..25 {
            let at = t0 + Duration::from_millis(10 * i);
            assert_eq!(budget.take_at(at), None);
        }
        // A new second: lines again, the first saying how many were left out.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(budget.take_at(t1), Some(Some(25)));
        assert_eq!(budget.take_at(t1), Some(None));
    }

    /// A burst with no line after it: its count is reported once its window is over, once.
    #[test]
    fn the_count_of_a_last_burst_is_not_lost() {
        let budget = LogBudget::new("test");
        let t0 = Instant::now();
        for _ in 0..LogBudget::PER_SECOND + 7 {
            budget.take_at(t0);
        }
        assert_eq!(
            budget.left_out_at(t0 + Duration::from_millis(500), false),
            None,
            "window open"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(budget.left_out_at(t1, false), Some(7));
        assert_eq!(budget.left_out_at(t1, false), None, "reported once");
        assert_eq!(
            budget.take_at(t1),
            Some(None),
            "and not again by the next line"
        );
    }

    #[test]
    fn a_steady_trickle_is_never_cut() {
        let budget = LogBudget::new("test");
        let t0 = Instant::now();
        for i in 0..100 {
            let at = t0 + Duration::from_millis(150 * i);
            assert_eq!(budget.take_at(at), Some(None), "line {i}");
        }
    }
}
