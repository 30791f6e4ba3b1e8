//! A future that polls the one it wraps only once that one asked to be woken.
//!
//! A session's task waits on its sockets and, in the same `select!`, on the shutdown and on
//! new credentials. Every wake of the task polls every branch, and polling a wait on a
//! `CancellationToken` or a `watch` channel takes their locks (and clones the waker) even though
//! nearly every wake is for a socket. Wrapped, such a wait costs one atomic swap per poll until
//! it is really woken.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

pub struct Gated<F> {
    inner: F,
    /// The waker the inner future was last polled with, and whether it was woken since.
    flag: Option<Arc<Flag>>,
}

struct Flag {
    woken: AtomicBool,
    task: Waker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<F> Gated<F> {
    pub fn new(inner: F) -> Gated<F> {
        Gated { inner, flag: None }
    }
}

impl<F: Future + Unpin> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let flag = match &this.flag {
            // Polled by the same task as before: the inner future has nothing new unless it
            // woke its waker.
            Some(flag) if flag.task.will_wake(cx.waker()) => {
                if !flag.woken.swap(false, Ordering::AcqRel) {
                    return Poll::Pending;
                }
                Arc::clone(flag)
            }
            _ => {
                let flag = Arc::new(Flag {
                    woken: AtomicBool::new(false),
                    task: cx.waker().clone(),
                });
                this.flag = Some(Arc::clone(&flag));
                flag
            }
        };
        let waker = Waker::from(flag);
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts its polls; ready once `ready` is set, waking the waker it was last polled with.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.ready.load(Ordering::Relaxed) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[tokio::test]
    async fn the_inner_future_is_polled_only_when_it_woke() {
        let token = tokio_util::sync::CancellationToken::new();
        let mut stop = Gated::new(Box::pin(token.cancelled()));
        // Many polls of the task, for other reasons: the wait is not ready, and cheap.
        for _ in 0..3 {
            assert!(poll_fn(|cx| Poll::Ready(Pin::new(&mut stop).poll(cx).is_pending())).await);
        }
        let cancel = token.clone();
        tokio::spawn(async move { cancel.cancel() });
        // Woken by the cancellation, it is polled and ready.
        tokio::time::timeout(std::time::Duration::from_secs(5), &mut stop)
            .await
            .expect("the cancellation wakes it");

        // A future that never wakes is polled once, then never again by the same task: a
        // spawned one, as sessions are. (The waker `block_on` gives the test's own future is
        // not always recognized as the same by `will_wake` in a release build.)
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let mut probe = Gated::new(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
        });
        tokio::spawn(async move {
            for _ in 0..3 {
                assert!(
                    poll_fn(|cx| Poll::Ready(Pin::new(&mut probe).poll(cx).is_pending())).await
                );
            }
            assert_eq!(polls.load(Ordering::Relaxed), 1);
            // Polled from another task (another waker), it is polled again.
            ready.store(true, Ordering::Relaxed);
            tokio::spawn(probe).await.unwrap();
            assert_eq!(polls.load(Ordering::Relaxed), 2);
        })
        .await
        .unwrap();
    }
}
