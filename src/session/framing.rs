//! What a client that parsed its requests already (the router of shared clients) tells the
//! session about the bytes it hands over: which of them are runs of whole plain requests (one
//! reply each, nothing in them for the session to act on), which the session then forwards
//! without parsing them a second time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// The client's side and the session's side of one session's runs.
#[derive(Clone, Default)]
pub struct Framing(Arc<Mutex<Runs>>);

impl Framing {
    pub fn lock(&self) -> MutexGuard<'_, Runs> {
        // A panic while held leaves whole runs behind, at worst: the data stays usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The bytes handed to the session and not yet taken by it, in order, split into runs.
#[derive(Debug, Default)]
pub struct Runs {
    runs: VecDeque<Run>,
    /// Bytes of the front run already taken.
    taken: usize,
    /// The session's byte pump runs: before it (while the session connects, or answers
    /// without a token, reading into buffers of its own), nothing is recorded, so nothing
    /// piles up that no pump will take.
    started: bool,
}

#[derive(Debug, PartialEq)]
struct Run {
    len: usize,
    /// The number of whole plain requests (multibulk, each a command that shares) the run is
    /// made of; 0: not known (the session parses it).
    plain: usize,
}

impl Runs {
    /// The session's byte pump starts, with nothing read yet.
    pub fn start(&mut self) {
        self.clear();
        self.started = true;
    }

    /// The client handed over `len` more bytes: `plain` whole plain requests, or 0 when
    /// they are anything else (part of a request among them).
    pub fn handed(&mut self, len: usize, plain: usize) {
        if len == 0 || !self.started {
            return;
        }
        if plain == 0 {
            if let Some(last) = self.runs.back_mut().filter(|r| r.plain == 0) {
                last.len += len;
                return;
            }
        }
        self.runs.push_back(Run { len, plain });
    }

    /// The front run when the session is at its start and it is plain: `(bytes, requests)`.
    pub fn plain_front(&self) -> Option<(usize, usize)> {
        match self.runs.front() {
            Some(run) if self.taken == 0 && run.plain > 0 => Some((run.len, run.plain)),
            _ => None,
        }
    }

    /// The session took `n` bytes from the front.
    pub fn took(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.runs.front() else {
                // More taken than handed: nothing left to describe.
                self.taken = 0;
                return;
            };
            let step = n.min(front.len - self.taken);
            self.taken += step;
            n -= step;
            if self.taken == front.len {
                self.runs.pop_front();
                self.taken = 0;
            }
        }
    }

    /// Bytes handed and not taken yet.
    pub fn pending(&self) -> usize {
        self.runs.iter().map(|r| r.len).sum::<usize>() - self.taken
    }

    /// The session dropped every byte it was handed.
    pub fn clear(&mut self) {
        self.runs.clear();
        self.taken = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_follow_the_bytes_taken() {
        let mut r = Runs::default();
        // Before the pump starts, nothing is recorded.
        r.handed(30, 2);
        assert_eq!((r.plain_front(), r.pending()), (None, 0));
        r.start();
        r.handed(30, 2);
        r.handed(10, 0);
        r.handed(5, 0);
        r.handed(20, 1);
        assert_eq!(r.plain_front(), Some((30, 2)));
        r.took(30);
        // Unknown runs in a row are one.
        assert_eq!(r.runs.front(), Some(&Run { len: 15, plain: 0 }));
        assert_eq!(r.plain_front(), None);
        r.took(12);
        assert_eq!(r.plain_front(), None, "inside a run");
        r.took(3);
        assert_eq!(r.plain_front(), Some((20, 1)));
        // Taken across runs, and past the end.
        r.handed(7, 3);
        r.took(22);
        assert_eq!(r.plain_front(), None);
        assert_eq!((r.runs.len(), r.taken), (1, 2));
        r.took(100);
        assert_eq!((r.runs.len(), r.taken), (0, 0));
        r.handed(4, 1);
        r.clear();
        assert_eq!(r.plain_front(), None);
    }
}
