//! Session threads: each client connection lives on one thread, and its session with its
//! upstream connection runs there until it ends.
//!
//! Every thread runs a single-threaded tokio runtime. The runtime that calls [`Workers::start`]
//! (the one running the accept loops, the token refresher and the admin endpoint) is worker 0;
//! the others are started here. An accepted connection goes to the worker with the fewest
//! live sessions. The one exception is a multiplexed client while it shares: it has no
//! upstream connection of its own and may move between workers when nothing is owed to it
//! (`mux::balance`), to the home worker ([`Workers::HOME`]) or to a lighter one
//! ([`Workers::lighter_than`]).
//!
//! Why not tokio's work-stealing runtime: a session is one task whose two sockets wake it
//! alternately, and the shared scheduler wakes other threads to steal it, with cross-thread
//! wake-ups (futex calls and context switches) on every request. Measured on 2 CPUs with
//! `redis-benchmark -c 50` against the `dev` setup, single-threaded runtimes cost about 12 %
//! less CPU per request, with and without pipelining, at the same throughput.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The session threads, worker 0 being the caller's runtime.
pub struct Workers {
    workers: Vec<Worker>,
    /// Ends the runtimes of the started threads.
    stop: CancellationToken,
    /// One per started thread, completed once its runtime (and every task on it) is gone.
    stopped: std::sync::Mutex<Vec<oneshot::Receiver<()>>>,
}

struct Worker {
    handle: Handle,
    /// Sessions running on this worker now.
    live: Arc<AtomicUsize>,
}

impl Worker {
    fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

/// Where a connection was placed: run its session with [`Placement::spawn`].
pub struct Placement<'a> {
    worker: &'a Worker,
    /// Which worker: 0 is the caller's own runtime, where the connection's socket is
    /// registered.
    pub index: usize,
    pub local: bool,
}

impl Workers {
    /// Starts `threads - 1` threads (at least the caller's runtime serves sessions). Must be
    /// called from within a tokio runtime.
    pub fn start(threads: usize) -> io::Result<Workers> {
        let mut workers = vec![Worker {
            handle: Handle::current(),
            live: Default::default(),
        }];
        let stop = CancellationToken::new();
        let mut stopped = Vec::new();
        for i in 1..threads.max(1) {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (done_tx, done_rx) = oneshot::channel();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("session-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(stop.cancelled());
                    // Sessions still running (past the drain timeout) end here, their sockets
                    // closed.
                    drop(runtime);
                    let _ = done_tx.send(());
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| io::Error::other("a session thread ended while starting"))??;
            workers.push(Worker {
                handle,
                live: Default::default(),
            });
            stopped.push(done_rx);
        }
        Ok(Workers {
            workers,
            stop,
            stopped: std::sync::Mutex::new(stopped),
        })
    }

    /// The caller's runtime, worker 0: where multiplexed clients gather while their requests
    /// are small (`mux::balance`).
    pub const HOME: usize = 0;

    /// Worker `index` (`index` < the number of workers).
    pub fn at(&self, index: usize) -> Placement<'_> {
        Placement {
            worker: &self.workers[index],
            index,
            local: index == 0,
        }
    }

    /// A worker with fewer live sessions than worker `from` has, by more than one: moving a
    /// session there leaves the workers more even.
    pub fn lighter_than(&self, from: usize) -> Option<usize> {
        let here = self.workers.get(from)?.live();
        let lightest = self.lightest();
        (self.workers[lightest].live() + 1 < here).then_some(lightest)
    }

    /// The worker with the fewest live sessions (the first of equals, so a lone connection
    /// stays on the caller's runtime).
    pub fn place(&self) -> Placement<'_> {
        self.at(self.lightest())
    }

    /// The index of the worker with the fewest live sessions, the first of equals.
    fn lightest(&self) -> usize {
        self.workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.live())
            .map_or(0, |(index, _)| index)
    }

    /// Ends the started threads' runtimes (tasks still on them are dropped) and waits for
    /// them to be gone.
    pub async fn stop(&self) {
        self.stop.cancel();
        let stopped = std::mem::take(&mut *self.stopped.lock().unwrap_or_else(|e| e.into_inner()));
        for done in stopped {
            let _ = done.await;
        }
    }
}

impl Placement<'_> {
    /// Runs the session `make` builds on the chosen worker. The session holds the [`Live`]
    /// guard it is given for as long as it runs (it is not wrapped in another future, which
    /// would store it twice and make every idle connection larger).
    pub fn spawn<F>(self, make: impl FnOnce(Live) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let live = self.worker.live.clone();
        live.fetch_add(1, Ordering::Relaxed);
        self.worker.handle.spawn(make(Live(live)));
    }
}

/// Holds a worker's live count one higher, unwinding included.
pub struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket accepted on one runtime and served on another: it leaves the accepting runtime's
/// reactor and joins the serving one's.
pub trait Portable: Sized {
    type Std: Send + 'static;
    fn into_std(self) -> io::Result<Self::Std>;
    fn from_std(std: Self::Std) -> io::Result<Self>;
}

impl Portable for tokio::net::TcpStream {
    type Std = std::net::TcpStream;
    fn into_std(self) -> io::Result<Self::Std> {
        tokio::net::TcpStream::into_std(self)
    }
    fn from_std(std: Self::Std) -> io::Result<Self> {
        tokio::net::TcpStream::from_std(std)
    }
}

impl Portable for tokio::net::UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std(self) -> io::Result<Self::Std> {
        tokio::net::UnixStream::into_std(self)
    }
    fn from_std(std: Self::Std) -> io::Result<Self> {
        tokio::net::UnixStream::from_std(std)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections spread over the workers by live sessions; a session placed on a started
    /// thread runs there; stopping drops what is still running and waits for the threads.
    #[tokio::test]
    async fn sessions_spread_over_threads_and_stop_with_them() {
        let workers = Workers::start(3).expect("threads start");
        assert_eq!(workers.workers.len(), 3);
        let main_thread = std::thread::current().id();
        let release = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..6 {
            let placement = workers.place();
            let local = placement.local;
            let tx = tx.clone();
            let release = release.clone();
            placement.spawn(|live| async move {
                let _live = live;
                let on_main = std::thread::current().id() == main_thread;
                tx.send((local, on_main)).unwrap();
                release.cancelled().await;
            });
            tokio::task::yield_now().await;
        }
        let mut placed = Vec::new();
        for _ in 0..6 {
            placed.push(rx.recv().await.unwrap());
        }
        // Placement says where a session runs, and 6 sessions fill 3 workers evenly.
        for (local, on_main) in &placed {
            assert_eq!(local, on_main);
        }
        assert_eq!(placed.iter().filter(|(local, _)| *local).count(), 2);
        let lives: Vec<_> = workers
            .workers
            .iter()
            .map(|w| w.live.load(Ordering::Relaxed))
            .collect();
        assert_eq!(lives, [2, 2, 2]);
        assert_eq!(
            workers.lighter_than(1),
            None,
            "even: nothing to gain by moving"
        );
        // Two more on worker 0: a session there would leave it for the lightest, worker 1.
        for _ in 0..2 {
            let release = release.clone();
            workers.at(Workers::HOME).spawn(|live| async move {
                let _live = live;
                release.cancelled().await;
            });
        }
        assert_eq!(workers.lighter_than(0), Some(1));
        assert_eq!(
            (workers.lighter_than(1), workers.lighter_than(2)),
            (None, None)
        );
        // Sessions on the started threads are dropped with their runtimes.
        let (w0, others) = (
            workers.workers[0].live.clone(),
            workers.workers[1].live.clone(),
        );
        tokio::time::timeout(std::time::Duration::from_secs(10), workers.stop())
            .await
            .expect("threads stop");
        assert_eq!(others.load(Ordering::Relaxed), 0);
        assert_eq!(w0.load(Ordering::Relaxed), 4);
        release.cancel();
    }
}
