//! At most a few log lines a second for events that come once per connection.
//!
//! A connection that fails logs why, which is what an operator needs, until an outage makes
//! thousands fail a second: applications reconnect in tight loops while the server is
//! unreachable or the connection limit is reached, and one line per attempt would bury the
//! log (and its ingestion bill) without saying anything more. Each such log statement gets a
//! budget of [`LogBudget::PER_SECOND`] lines a second; the lines over it are counted and the
//! next line let through says how many were left out (`suppressed`). The metrics still count
//! every event.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LogBudget {
    state: Mutex<State>,
}

struct State {
    /// Start of the current one-second window; `None` before the first event.
    window: Option<Instant>,
    /// Lines let through in the window.
    passed: u32,
    /// Lines left out since the last one let through.
    suppressed: u64,
}

impl LogBudget {
    pub const PER_SECOND: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(1);

    pub const fn new() -> LogBudget {
        LogBudget {
            state: Mutex::new(State {
                window: None,
                passed: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now: `None` when this one should be left out, else
    /// `Some` with the number of lines left out since the last one let through, if any (as a
    /// log field, `None` is left out).
    pub fn take(&self) -> Option<Option<u64>> {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> Option<Option<u64>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
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
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_and_the_next_line_counts_what_was_left_out() {
        let budget = LogBudget::new();
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

    #[test]
    fn a_steady_trickle_is_never_cut() {
        let budget = LogBudget::new();
        let t0 = Instant::now();
        for i in 0..100 {
            let at = t0 + Duration::from_millis(150 * i);
            assert_eq!(budget.take_at(at), Some(None), "line {i}");
        }
    }
}
