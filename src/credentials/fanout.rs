//! Hands each new token to the sessions in groups, a millisecond apart, instead of all at
//! once.
//!
//! Every session waits for new credentials. Woken all together by the refresher's channel,
//! thousands of them held their session threads for milliseconds at each rotation (5,000
//! sessions: 4 to 13 ms, 10,000: 18 to 29 ms, during which no client request on those threads
//! moved), only to pick the moment of their re-AUTH, which is spread over `--reauth-window`
//! anyway. Each session now
//! follows one of [`GROUPS`] channels, and each change reaches group `i` [`STEP`] × `i` after
//! the refresher published it: a few dozen sessions wake at a time, and the last group
//! learns of a token at most [`GROUPS`] milliseconds late, nothing next to the window.
//!
//! A group always gets the newest credentials when its turn comes (a change during a round
//! starts a new round after it), never an older one than a group before it.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::refresh::CredentialsRx;
use super::Credentials;

/// Groups the sessions are spread over: with 10,000 sessions, about 160 wake together.
pub const GROUPS: usize = 64;
/// Between two groups: the timer's resolution.
pub const STEP: Duration = Duration::from_millis(1);

/// The groups' channels, and which one the next session follows.
pub struct Fanout {
    groups: Vec<CredentialsRx>,
    next: AtomicUsize,
}

impl Fanout {
    /// [`GROUPS`] groups following `main`, and the future that forwards its changes to them,
    /// for the caller to spawn. It ends, and the groups' channels close, when `main` closes
    /// (or when it is dropped).
    pub fn new(main: CredentialsRx) -> (Fanout, impl Future<Output = ()> + Send + 'static) {
        Fanout::with(main, GROUPS, STEP)
    }

    fn with(
        main: CredentialsRx,
        groups: usize,
        step: Duration,
    ) -> (Fanout, impl Future<Output = ()> + Send + 'static) {
        let current = main.borrow().clone();
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..groups.max(1))
            .map(|_| watch::channel(current.clone()))
            .unzip();
        let fanout = Fanout {
            groups: rxs,
            next: AtomicUsize::new(0),
        };
        (fanout, forward(main, txs, step))
    }

    /// The channel one more session follows: the groups in turn.
    pub fn subscribe(&self) -> CredentialsRx {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.groups.len();
        self.groups[i].clone()
    }
}

fn generation(c: &Option<Arc<Credentials>>) -> Option<u64> {
    c.as_ref().map(|c| c.generation)
}

/// At each change of `main`, hands its newest value to each group in turn, `step` apart.
async fn forward(
    mut main: CredentialsRx,
    groups: Vec<watch::Sender<Option<Arc<Credentials>>>>,
    step: Duration,
) {
    while main.changed().await.is_ok() {
        // Seen from here on: a change during the round makes `changed` return at once after
        // it, for a round that brings the groups before it up to date.
        main.borrow_and_update();
        for (i, group) in groups.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(step).await;
            }
            let newest = main.borrow().clone();
            // A group already on it (a round that a change cut short) is not woken again.
            group.send_if_modified(|held| {
                let changed = generation(&newest) != generation(held);
                if changed {
                    *held = newest;
                }
                changed
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn creds(generation: u64) -> Option<Arc<Credentials>> {
        Some(Arc::new(Credentials {
            username: "oid".into(),
            token: Secret::new(format!("tok{generation}")),
            expires_at: None,
            generation,
        }))
    }

    fn spawned(main: CredentialsRx, groups: usize, step: Duration) -> Fanout {
        let (fanout, forward) = Fanout::with(main, groups, step);
        tokio::spawn(forward);
        fanout
    }

    /// The generation each of `rxs` holds.
    fn held(rxs: &[CredentialsRx]) -> Vec<Option<u64>> {
        rxs.iter().map(|rx| generation(&rx.borrow())).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn each_group_gets_a_change_a_step_after_the_one_before() {
        let (tx, rx) = watch::channel(creds(1));
        let fanout = spawned(rx, 4, Duration::from_millis(10));
        let rxs: Vec<_> = (0..8).map(|_| fanout.subscribe()).collect();
        // Sessions go to the groups in turn, and start on the current credentials.
        assert!(rxs[0].same_channel(&rxs[4]) && !rxs[0].same_channel(&rxs[1]));
        assert_eq!(held(&rxs[..4]), [Some(1); 4]);

        tx.send_replace(creds(2));
        tokio::task::yield_now().await;
        assert_eq!(held(&rxs[..4]), [Some(2), Some(1), Some(1), Some(1)]);
        // Halfway between steps (the forwarder's timers and these fire at the same instants).
        tokio::time::sleep(Duration::from_millis(15)).await;
        assert_eq!(held(&rxs[..4]), [Some(2), Some(2), Some(1), Some(1)]);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(held(&rxs[..4]), [Some(2); 4]);
        assert_eq!(held(&rxs[4..]), [Some(2); 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_during_a_round_reaches_every_group_and_none_goes_back() {
        let (tx, rx) = watch::channel(creds(1));
        let fanout = spawned(rx, 4, Duration::from_millis(10));
        let mut rxs: Vec<_> = (0..4).map(|_| fanout.subscribe()).collect();
        tx.send_replace(creds(2));
        tokio::time::sleep(Duration::from_millis(15)).await;
        assert_eq!(held(&rxs), [Some(2), Some(2), Some(1), Some(1)]);
        for rx in &mut rxs {
            rx.borrow_and_update();
        }
        tx.send_replace(creds(3));
        // The rest of the round hands out the newest; the next round brings the first groups
        // up to it. No group is handed 2 after 3, nor woken twice for the same generation.
        let mut seen = vec![Vec::new(); 4];
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            for (rx, seen) in rxs.iter_mut().zip(&mut seen) {
                if rx.has_changed().unwrap() {
                    seen.push(generation(&rx.borrow_and_update()).unwrap());
                }
            }
        }
        assert_eq!(held(&rxs), [Some(3); 4]);
        assert_eq!(seen, [vec![3], vec![3], vec![3], vec![3]]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_groups_close_with_the_refresher() {
        let (tx, rx) = watch::channel(creds(1));
        let fanout = spawned(rx, 2, Duration::from_millis(1));
        let mut a = fanout.subscribe();
        drop(tx);
        assert!(a.changed().await.is_err(), "closed");
    }
}
