//! Backpressure: a connection whose client does not keep up (never reads, reads slowly, or
//! keeps a MONITOR stream it does not drain) must not make the proxy buffer without bound,
//! and must not slow other connections down.
//!
//! The session core stops reading the upstream once `CLIENT_OUT_HIGH_WATER` (256 KiB) waits
//! for the client, and stops reading the client once `UPSTREAM_OUT_HIGH_WATER` (256 KiB) waits
//! for the upstream; everything beyond that must wait in the kernel's socket buffers or in
//! Redis's client output buffer, never in the proxy. Memory is measured where it matters: on
//! the real binary in its own process (`VmRSS`/`VmHWM` of `/proc/<pid>/status`), in front of
//! the devenv TLS redis-server, with a fixed token (no rotation: these tests are about bytes).
//!
//! Cases, each pushing 64-580 MiB through one connection:
//! - a client pipelines ~128 MiB of `SET`/`GET` and reads nothing, then reads every reply;
//! - the upstream stalls (`DEBUG SLEEP`) under a pipelining client: the proxy stops reading it;
//! - a slow reader of a ~200 MiB `LRANGE` reply, requested three times in one pipeline;
//! - a `MONITOR` consumer that reads nothing while another client writes ~64 MiB;
//! - a 128 MiB value written with `SET` and read back with `GET`, on a connection of its own
//!   and from a client that starts out sharing one (`--multiplex`);
//! - a shared client that reads such a value late (and then has a connection of its own, so
//!   that nobody waits for it again), and one that never reads it (closed after 10 s, while the
//!   clients behind it wait).
//!
//! In each, the proxy's peak RSS may grow by at most [`MEMORY_BOUND`] over its warmed-up
//! baseline. In all but the last, a probe client's round trips stay under [`PROMPT`], and the
//! slow client finally gets every reply, in order. The tests run one at a time ([`SERIAL`]):
//! on a 2-CPU machine two of them at once would measure each other.
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis_entra_proxy::devenv::{mint_token, RedisOptions, RedisServer, RespConn};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::time::{timeout, Instant};

/// Peak RSS growth of the proxy process allowed over its warmed-up baseline, for the whole
/// test (a few connections, one of them moving 96-580 MiB). By design such a connection
/// holds at most 256 KiB waiting for the client, 256 KiB waiting for the upstream, a 16 KiB
/// read chunk per side, rustls' buffers and its ledger of unanswered commands. Measured
/// (debug build, 2 CPUs): 0.4-0.9 MiB in the LRANGE, MONITOR and stall cases, 3.4 MiB in
/// the never-reading case once the ledger is bounded (unbounded, it costs ~35 bytes per
/// unanswered command: 154 MiB there). 32 MiB leaves ten times the worst of those for
/// allocator slack and stays far below what a proxy buffering the stream would hold.
const MEMORY_BOUND_KIB: u64 = 32 * 1024;
/// The same, as shown in messages.
const MEMORY_BOUND: &str = "32 MiB";
/// Longest round trip (SET then GET) the probe client may see while another connection is
/// flooded. Measured: at most 30-80 ms. (Behind the LRANGEs, redis-server itself is busy for
/// a fraction of a second building each 196 MiB reply, up to 0.38 s each and more than 2 s for
/// the three on a slow day, for every client, a direct one too: that case starts its probe
/// once the server has built them.) 2 s absorbs a loaded 2-CPU machine without hiding a
/// connection that waits behind the flood (that would take the flood's whole duration, 3-15 s).
const PROMPT: Duration = Duration::from_secs(2);
/// Pause between probe round trips: about 50 probes a second, enough to catch a stall of the
/// proxy's event loop without adding load of its own.
const PROBE_PACE: Duration = Duration::from_millis(20);
/// Bound on each case's long phases (flooding, draining): far above what they take (a few
/// seconds), so that only a hang or a lost reply trips it.
const PHASE: Duration = Duration::from_secs(60);
/// Without progress for this long, the flooding client counts as blocked by backpressure.
const STALLED: Duration = Duration::from_secs(3);
/// The fixed token's identity (the ACL user the proxy authenticates as).
const OID: &str = "bp-1";

/// One test at a time: each measures a process's memory and latency on a shared 2-CPU box.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The real proxy binary in its own process, in front of its own stand-in server.
struct ProxyBinary {
    /// Spawned with `kill_on_drop`: dropping the test's handle ends the process.
    child: Child,
    pid: u32,
    addr: SocketAddr,
    redis: RedisServer,
    /// Holds the proxy's log (quoted when it exits early).
    dir: tempfile::TempDir,
}

/// `VmRSS` and `VmHWM` (peak RSS) of a process, in KiB.
#[derive(Debug, Clone, Copy)]
struct Mem {
    rss: u64,
    hwm: u64,
}

impl ProxyBinary {
    async fn start() -> ProxyBinary {
        Self::start_with(&[]).await
    }

    /// The proxy with `args` after the common ones (and no admin endpoint unless they ask for
    /// one).
    async fn start_with(args: &[&str]) -> ProxyBinary {
        let redis = RedisServer::start(RedisOptions {
            extra_args: vec![
                // Redis's defaults, stated: a normal client's output buffer is unlimited, so
                // Redis holds what the proxy does not read and never disconnects the slow
                // client (MONITOR consumers are normal clients too). Azure's limits may differ;
                // what is tested here is that the proxy pushes the backlog to Redis.
                "--client-output-buffer-limit".into(),
                "normal 0 0 0".into(),
                // `DEBUG SLEEP` stalls the upstream in the stall case.
                "--enable-debug-command".into(),
                "local".into(),
            ],
            ..RedisOptions::default()
        })
        .await
        .expect("redis-server starts");
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 24 * 3600;
        let token = mint_token(OID, exp);
        redis.acl_setuser(OID, &token).await.expect("ACL SETUSER");
        let addr = free_addr();
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("proxy.log")).expect("log file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
            .args(["--listen", &addr.to_string()])
            .args(["--upstream", &redis.addr().to_string()])
            .arg("--upstream-ca-file")
            .arg(redis.ca_file().expect("TLS server"))
            .args(["--upstream-server-name", "localhost"])
            .args(["--credential", "fixed"])
            .args(if args.contains(&"--admin-listen") {
                &[][..]
            } else {
                &["--admin-listen", "none"][..]
            })
            .args(["--log-level", "warn"])
            .args(args)
            .env("REDIS_ENTRA_PROXY_TOKEN", &token)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("proxy binary runs");
        let pid = child.id().expect("pid");
        let mut proxy = ProxyBinary {
            child,
            pid,
            addr,
            redis,
            dir,
        };
        proxy.wait_ready().await;
        proxy
    }

    /// Polls (bounded) until a PING through the proxy is answered.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + STEP;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("proxy exited: {status}\n{}", self.log());
            }
            if let Ok(mut c) = RespConn::connect_plain(self.addr).await {
                if let Ok(Ok(Reply::Simple(s))) = timeout(STEP, c.command(&[b"PING"])).await {
                    if s == "PONG" {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "proxy not ready\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    fn mem(&self) -> Mem {
        let field = |name| {
            proc_status_kib(self.pid, name)
                .unwrap_or_else(|| panic!("{name} of the running proxy in /proc/<pid>/status"))
        };
        Mem {
            rss: field("VmRSS"),
            hwm: field("VmHWM"),
        }
    }

    /// Runs a little traffic, so that the runtime's threads, the allocator's arenas and TLS
    /// are set up, and returns the RSS the test's growth is measured from.
    async fn warmed_baseline(&self) -> Mem {
        let mut c = RespConn::connect_plain(self.addr).await.expect("connect");
        let value = vec![b'w'; 64 * 1024];
        for _ in 0..32 {
            c.command(&[b"SET", b"warm", &value]).await.expect("SET");
            c.command(&[b"GET", b"warm"]).await.expect("GET");
        }
        drop(c);
        self.mem()
    }

    /// Asserts the peak RSS stayed within [`MEMORY_BOUND`] of `baseline`, and prints it.
    fn assert_bounded(&self, case: &str, baseline: Mem, pushed_mib: u64) {
        let now = self.mem();
        let growth = now.hwm.saturating_sub(baseline.rss);
        eprintln!(
            "{case}: {pushed_mib} MiB through one connection; proxy RSS baseline {} KiB, \
             peak {} KiB (growth {growth} KiB, bound {MEMORY_BOUND}), now {} KiB",
            baseline.rss, now.hwm, now.rss
        );
        assert!(
            growth <= MEMORY_BOUND_KIB,
            "{case}: proxy peak RSS grew by {growth} KiB over {} KiB, more than {MEMORY_BOUND}",
            baseline.rss
        );
    }

    /// An authenticated admin connection straight to the stand-in server.
    async fn redis_admin(&self) -> RespConn {
        let mut c = self.redis.connect().await.expect("connect to redis");
        let pw = self.redis.admin_password().as_bytes();
        let ok = c.command(&[b"AUTH", b"admin", pw]).await.expect("AUTH");
        assert_eq!(ok, Reply::Simple("OK".into()));
        c
    }
}

/// What the probe client saw.
#[derive(Debug, Default)]
struct ProbeStats {
    round_trips: u64,
    max: Duration,
}

/// Another client of the same proxy: SET then GET, checked, every [`PROBE_PACE`], until
/// `stop`; each round trip must finish within [`PROMPT`].
fn spawn_probe(addr: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<ProbeStats> {
    tokio::spawn(async move {
        let mut c = RespConn::connect_plain(addr).await.expect("probe connects");
        // The upstream connection (TLS handshake, AUTH) is set up before the first reply; what
        // is timed below is round trips, not connection setup on a loaded machine.
        let pong = timeout(STEP, c.command(&[b"PING"]))
            .await
            .expect("probe's first PING answered")
            .expect("probe PING");
        assert_eq!(pong, Reply::Simple("PONG".into()));
        let mut stats = ProbeStats::default();
        // Bounded in count as well as by `stop`: PHASE worth of probes at most, per phase.
        for i in 0..(4 * PHASE.as_millis() as u64 / PROBE_PACE.as_millis() as u64) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let v = i.to_string();
            let started = Instant::now();
            let set = timeout(PROMPT, c.command(&[b"SET", b"probe", v.as_bytes()]))
                .await
                .unwrap_or_else(|_| panic!("probe SET {i} not answered within {PROMPT:?}"))
                .expect("probe SET");
            assert_eq!(set, Reply::Simple("OK".into()), "probe SET {i}");
            let get = timeout(PROMPT, c.command(&[b"GET", b"probe"]))
                .await
                .unwrap_or_else(|_| panic!("probe GET {i} not answered within {PROMPT:?}"))
                .expect("probe GET");
            assert_eq!(get, Reply::Bulk(Some(v.into_bytes())), "probe GET {i}");
            let rtt = started.elapsed();
            assert!(rtt < PROMPT, "probe round trip {i} took {rtt:?}");
            stats.max = stats.max.max(rtt);
            stats.round_trips += 1;
            tokio::time::sleep(PROBE_PACE).await;
        }
        stats
    })
}

/// Stops the probe and checks it kept going.
async fn finish_probe(stop: &AtomicBool, probe: tokio::task::JoinHandle<ProbeStats>) {
    stop.store(true, Ordering::Relaxed);
    let stats = timeout(STEP, probe)
        .await
        .expect("probe stops")
        .expect("probe: every round trip answered correctly and promptly");
    eprintln!(
        "probe client: {} round trips, slowest {:?} (bound {PROMPT:?})",
        stats.round_trips, stats.max
    );
    assert!(stats.round_trips >= 10, "probe barely ran: {stats:?}");
}

/// Samples the proxy's RSS every 100 ms until `stop` (bounded by [`PHASE`] x 4); returns the
/// highest sample. `VmHWM` is the authoritative peak; this shows when it happened.
fn spawn_sampler(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut max = 0;
        for _ in 0..(4 * PHASE.as_millis() / 100) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Some(kib) = proc_status_kib(pid, "VmRSS") {
                max = max.max(kib);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        max
    })
}

/// Pair `i` of the flood: `SET bp:k <i>` and `GET bp:k`, so every reply is predictable and a
/// lost, duplicated or reordered reply shows.
fn pair_command(out: &mut Vec<u8>, i: u64) {
    let v = i.to_string();
    out.extend_from_slice(b"*3\r\n$3\r\nSET\r\n$4\r\nbp:k\r\n");
    out.extend_from_slice(format!("${}\r\n{v}\r\n", v.len()).as_bytes());
    out.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$4\r\nbp:k\r\n");
}

fn pair_replies(out: &mut Vec<u8>, i: u64) {
    let v = i.to_string();
    out.extend_from_slice(b"+OK\r\n");
    out.extend_from_slice(format!("${}\r\n{v}\r\n", v.len()).as_bytes());
}

/// Bytes a flooding writer has written so far, and whether it has written everything.
#[derive(Default)]
struct Progress {
    written: AtomicU64,
    finished: AtomicBool,
}

/// Writes `pairs` pairs in 64 KiB chunks, publishing its progress. Returns the write half,
/// still open: closing it would end the session before the replies are read.
fn spawn_pair_writer(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    pairs: u64,
    progress: Arc<Progress>,
) -> tokio::task::JoinHandle<tokio::net::tcp::OwnedWriteHalf> {
    tokio::spawn(async move {
        let mut chunk = Vec::with_capacity(80 * 1024);
        let mut i = 0;
        while i < pairs {
            chunk.clear();
            while i < pairs && chunk.len() < 64 * 1024 {
                pair_command(&mut chunk, i);
                i += 1;
            }
            timeout(PHASE, wr.write_all(&chunk))
                .await
                .expect("the proxy reads the pipeline again once replies are read")
                .expect("write pipeline");
            progress
                .written
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        progress.finished.store(true, Ordering::Relaxed);
        wr
    })
}

/// Waits until the writer finished, or made no progress for [`STALLED`] (bounded by
/// [`PHASE`]); returns the bytes written by then.
async fn wait_flood(progress: &Progress) -> u64 {
    let deadline = Instant::now() + PHASE;
    let mut last = (progress.written.load(Ordering::Relaxed), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = progress.written.load(Ordering::Relaxed);
        if progress.finished.load(Ordering::Relaxed) {
            return now;
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= STALLED || Instant::now() >= deadline {
            return now;
        }
    }
}

/// Reads and checks the replies to `pairs` pairs, in order (bounded by [`PHASE`]).
async fn read_pair_replies(rd: &mut tokio::net::tcp::OwnedReadHalf, pairs: u64) -> u64 {
    let deadline = Instant::now() + PHASE;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut at = 0;
    let mut expected = Vec::with_capacity(64);
    let mut chunk = vec![0u8; 256 * 1024];
    let mut done = 0;
    while done < pairs {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = timeout(left, rd.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("replies stopped after {done} of {pairs} pairs"))
            .expect("read replies");
        assert!(n > 0, "connection closed after {done} of {pairs} pairs");
        buf.extend_from_slice(&chunk[..n]);
        while done < pairs {
            expected.clear();
            pair_replies(&mut expected, done);
            if buf.len() - at < expected.len() {
                break;
            }
            let got = &buf[at..at + expected.len()];
            assert!(
                got == expected.as_slice(),
                "pair {done}: expected {:?}, got {:?}",
                String::from_utf8_lossy(&expected),
                String::from_utf8_lossy(&buf[at..(at + 64).min(buf.len())])
            );
            at += expected.len();
            done += 1;
        }
        buf.drain(..at);
        at = 0;
    }
    assert!(buf.is_empty(), "bytes after the last reply: {buf:?}");
    done
}

/// Replies nobody asked for must not follow: a short bounded look at the socket.
async fn assert_nothing_more(rd: &mut tokio::net::tcp::OwnedReadHalf) {
    let mut b = [0u8; 64];
    if let Ok(r) = timeout(Duration::from_millis(200), rd.read(&mut b)).await {
        let n = r.expect("read");
        assert_eq!(
            n,
            0,
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&b[..n])
        );
    }
}

/// ~128 MiB of pipelined `SET`/`GET` (about 4.5 million commands) from a client that reads
/// nothing: the proxy's memory stays bounded, other clients are served promptly, and once the
/// client reads, every reply arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_client_that_never_reads() {
    let _serial = SERIAL.lock().await;
    let proxy = ProxyBinary::start().await;
    let baseline = proxy.warmed_baseline().await;
    // 59 bytes per pair once the values have 7 digits.
    const PAIRS: u64 = 128 * 1024 * 1024 / 59;

    let stop = Arc::new(AtomicBool::new(false));
    let probe = spawn_probe(proxy.addr, stop.clone());
    let sampler = spawn_sampler(proxy.pid, stop.clone());
    let flood = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut rd, wr) = flood.into_split();
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let writer = spawn_pair_writer(wr, PAIRS, progress.clone());
    // Phase 1: the client writes and never reads.
    let sent = wait_flood(&progress).await;
    let mem1 = proxy.mem();
    eprintln!(
        "never-reading client: {} MiB written in {:?} without reading ({}); proxy RSS {} KiB, \
         peak {} KiB",
        sent >> 20,
        started.elapsed(),
        if progress.finished.load(Ordering::Relaxed) {
            "all of it"
        } else {
            "then no progress"
        },
        mem1.rss,
        mem1.hwm
    );
    // Phase 2: it reads every reply; the writer resumes if it was held back.
    let replies = 2 * read_pair_replies(&mut rd, PAIRS).await;
    let _wr = timeout(STEP, writer)
        .await
        .expect("writer done")
        .expect("writer");
    assert_nothing_more(&mut rd).await;
    eprintln!(
        "never-reading client: {replies} replies checked in order, {:?} in all",
        started.elapsed()
    );
    finish_probe(&stop, probe).await;
    let sampled = sampler.await.expect("sampler");
    eprintln!("highest RSS sample: {sampled} KiB");
    let total = progress.written.load(Ordering::Relaxed);
    proxy.assert_bounded("never-reading client", baseline, total >> 20);
}

/// The upstream stops reading (`DEBUG SLEEP` blocks redis-server's event loop) under a client
/// pipelining 96 MiB of 16 KiB `SET`s: the proxy stops reading that client once 256 KiB wait
/// for the upstream, so the backlog stays in the kernel's socket buffers (a few MiB), not in
/// the proxy. No probe here: a sleeping Redis answers nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_stops_reading_the_client() {
    let _serial = SERIAL.lock().await;
    let proxy = ProxyBinary::start().await;
    let baseline = proxy.warmed_baseline().await;
    const VALUE: usize = 16 * 1024;
    const COMMANDS: usize = 96 * 1024 * 1024 / VALUE;
    const SLEEP_SECS: u64 = 4;

    let mut admin = proxy.redis_admin().await;
    admin
        .send(&[b"DEBUG", b"SLEEP", SLEEP_SECS.to_string().as_bytes()])
        .await
        .expect("DEBUG SLEEP");
    let stalled_at = Instant::now();
    let flood = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut rd, mut wr) = flood.into_split();
    let progress = Arc::new(Progress::default());
    let writer = tokio::spawn({
        let progress = progress.clone();
        async move {
            let value = vec![b's'; VALUE];
            let mut cmd = Vec::with_capacity(VALUE + 64);
            for i in 0..COMMANDS {
                cmd.clear();
                let key = format!("bs:{}", i % 16);
                cmd.extend_from_slice(&redis_entra_proxy::devenv::encode(&[
                    b"SET",
                    key.as_bytes(),
                    &value,
                ]));
                timeout(PHASE, wr.write_all(&cmd))
                    .await
                    .expect("the proxy reads again once the upstream does")
                    .expect("write");
                progress
                    .written
                    .fetch_add(cmd.len() as u64, Ordering::Relaxed);
            }
            progress.finished.store(true, Ordering::Relaxed);
            wr
        }
    });
    // While redis-server sleeps, the client must block on full socket buffers.
    let held = wait_flood(&progress).await;
    let mem1 = proxy.mem();
    let stall_seen = stalled_at.elapsed();
    eprintln!(
        "stalled upstream: client wrote {} MiB before blocking ({stall_seen:?} into a {SLEEP_SECS} \
         s stall); proxy RSS {} KiB, peak {} KiB",
        held >> 20,
        mem1.rss,
        mem1.hwm
    );
    assert!(
        !progress.finished.load(Ordering::Relaxed),
        "96 MiB went through a sleeping upstream: something buffered it"
    );
    proxy.assert_bounded("stalled upstream (during the stall)", baseline, held >> 20);
    let ok = timeout(STEP, admin.read_reply())
        .await
        .expect("redis-server wakes up")
        .expect("DEBUG SLEEP reply");
    assert_eq!(ok, Reply::Simple("OK".into()));
    // Every SET is answered once Redis reads again.
    let deadline = Instant::now() + PHASE;
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    while got < COMMANDS {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = timeout(left, rd.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("replies stopped after {got} of {COMMANDS}"))
            .expect("read");
        assert!(n > 0, "closed after {got} of {COMMANDS} replies");
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / 5;
        for reply in pending[..whole * 5].chunks(5) {
            assert_eq!(reply, b"+OK\r\n", "reply {got}");
            got += 1;
        }
        pending.drain(..whole * 5);
    }
    let _wr = timeout(STEP, writer)
        .await
        .expect("writer done")
        .expect("writer");
    assert_nothing_more(&mut rd).await;
    proxy.assert_bounded("stalled upstream", baseline, 96);
}

/// Elements of the big list: `<8-digit index>` then filler, [`ELEMENT`] bytes each.
const ELEMENT: usize = 1000;
/// 200,000 elements: an `LRANGE 0 -1` reply of ~196 MiB.
const ELEMENTS: u64 = 200_000;
/// Times the whole list is requested, in one pipeline.
const LRANGES: u64 = 3;
/// The slow reader's pace, in bytes per second: well below what redis-server sends (the
/// proxy must hold it back), and fast enough to read the ~590 MiB in about 12 s.
const SLOW_READ: u64 = 48 * 1024 * 1024;

fn element(i: u64, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(format!("{i:08}").as_bytes());
    out.resize(ELEMENT, b'x');
}

/// Checks a stream of `LRANGE` replies as it arrives, element by element, keeping only the
/// unparsed tail in memory.
struct ListChecker {
    /// Arrays completely checked.
    arrays: u64,
    /// Next element of the current array; `None` before its `*N` header.
    next: Option<u64>,
    buf: Vec<u8>,
    /// The expected frame of the next element, rebuilt in place.
    frame: Vec<u8>,
}

impl ListChecker {
    fn new() -> Self {
        let mut frame = format!("${ELEMENT}\r\n").into_bytes();
        frame.resize(frame.len() + ELEMENT, b'x');
        frame.extend_from_slice(b"\r\n");
        ListChecker {
            arrays: 0,
            next: None,
            buf: Vec::new(),
            frame,
        }
    }

    /// Takes bytes; returns true once all `LRANGES` arrays were checked.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        self.buf.extend_from_slice(bytes);
        let mut at = 0;
        let header = format!("*{ELEMENTS}\r\n");
        let prefix = format!("${ELEMENT}\r\n").len();
        while self.arrays < LRANGES {
            let rest = &self.buf[at..];
            match self.next {
                None => {
                    if rest.len() < header.len() {
                        break;
                    }
                    assert_eq!(
                        String::from_utf8_lossy(&rest[..header.len()]),
                        header,
                        "array {} header",
                        self.arrays
                    );
                    at += header.len();
                    self.next = Some(0);
                }
                Some(i) => {
                    if rest.len() < self.frame.len() {
                        break;
                    }
                    self.frame[prefix..prefix + 8].copy_from_slice(format!("{i:08}").as_bytes());
                    assert!(
                        rest[..self.frame.len()] == self.frame[..],
                        "array {} element {i}: got {:?}",
                        self.arrays,
                        String::from_utf8_lossy(&rest[..40])
                    );
                    at += self.frame.len();
                    self.next = if i + 1 == ELEMENTS {
                        self.arrays += 1;
                        None
                    } else {
                        Some(i + 1)
                    };
                }
            }
        }
        self.buf.drain(..at);
        if self.arrays == LRANGES {
            assert!(self.buf.is_empty(), "bytes after the last array");
        }
        self.arrays == LRANGES
    }
}

/// A client asks for a ~196 MiB list three times in one pipeline, reads nothing for a while,
/// then reads slowly (64 KiB reads, at most [`SLOW_READ`] per second): the proxy's memory stays
/// bounded, other clients are served promptly, and all 600,000 elements arrive intact and in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_of_huge_lrange_replies() {
    let _serial = SERIAL.lock().await;
    let proxy = ProxyBinary::start().await;
    // The list goes in straight to redis-server, 1,000 elements (1 MB) per RPUSH.
    let mut admin = proxy.redis_admin().await;
    let mut elems: Vec<Vec<u8>> = Vec::new();
    for batch in 0..ELEMENTS / 1000 {
        elems.clear();
        for i in batch * 1000..(batch + 1) * 1000 {
            let mut e = Vec::new();
            element(i, &mut e);
            elems.push(e);
        }
        let mut args: Vec<&[u8]> = vec![b"RPUSH", b"bp:list"];
        args.extend(elems.iter().map(Vec::as_slice));
        let n = admin.command(&args).await.expect("RPUSH");
        assert_eq!(n, Reply::Integer(((batch + 1) * 1000) as i64));
    }
    drop(admin);
    let baseline = proxy.warmed_baseline().await;

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = spawn_sampler(proxy.pid, stop.clone());
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let started = Instant::now();
    let lrange = b"*4\r\n$6\r\nLRANGE\r\n$7\r\nbp:list\r\n$1\r\n0\r\n$2\r\n-1\r\n";
    s.write_all(&lrange.repeat(LRANGES as usize))
        .await
        .expect("write");
    // redis-server runs the LRANGEs back to back, and nobody else is served meanwhile; the
    // probe measures the proxy, so it starts once they have run (the connection's query
    // buffer is empty and its last command was LRANGE; the replies wait in its output buffer).
    let mut admin = proxy.redis_admin().await;
    let ran = timeout(PHASE, async {
        loop {
            let list = admin
                .command(&[b"CLIENT", b"LIST"])
                .await
                .expect("CLIENT LIST");
            let Reply::Bulk(Some(list)) = list else {
                panic!("CLIENT LIST replied {list:?}")
            };
            let list = String::from_utf8_lossy(&list).into_owned();
            if list
                .lines()
                .any(|l| l.contains(" qbuf=0 ") && l.contains(" cmd=lrange "))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    ran.await.expect("the LRANGEs run");
    drop(admin);
    let probe = spawn_probe(proxy.addr, stop.clone());
    // Phase 1: not reading at all; the proxy's buffer toward this client fills.
    tokio::time::sleep(STALLED).await;
    let mem1 = proxy.mem();
    eprintln!(
        "slow LRANGE reader: not reading for {STALLED:?}; proxy RSS {} KiB, peak {} KiB",
        mem1.rss, mem1.hwm
    );
    // Phase 2: slow reads.
    let reading = Instant::now();
    let mut checker = ListChecker::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    let deadline = Instant::now() + PHASE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = timeout(left, s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "LRANGE replies incomplete after {PHASE:?}: {} arrays and {:?} elements",
                    checker.arrays, checker.next
                )
            })
            .expect("read");
        assert!(n > 0, "closed after {bytes} bytes");
        bytes += n as u64;
        if checker.feed(&chunk[..n]) {
            break;
        }
        // Never faster than SLOW_READ: pause until the bytes read are due.
        let due = Duration::from_secs_f64(bytes as f64 / SLOW_READ as f64);
        tokio::time::sleep(due.saturating_sub(reading.elapsed())).await;
    }
    eprintln!(
        "slow LRANGE reader: {LRANGES} x {ELEMENTS} elements ({} MiB) checked in {:?}",
        bytes >> 20,
        started.elapsed()
    );
    let (_, mut wr) = s.into_split();
    let _ = wr.shutdown().await;
    finish_probe(&stop, probe).await;
    let sampled = sampler.await.expect("sampler");
    eprintln!("highest RSS sample: {sampled} KiB");
    proxy.assert_bounded("slow LRANGE reader", baseline, bytes >> 20);
}

/// A `MONITOR` client reads nothing while another client writes 64 MiB of `SET`s (each
/// mirrored to the monitor as a ~1 KiB line): the proxy's memory stays bounded, the writing
/// client's round trips stay prompt, and the monitor finally sees every `SET`, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_that_never_reads() {
    let _serial = SERIAL.lock().await;
    let proxy = ProxyBinary::start().await;
    let baseline = proxy.warmed_baseline().await;
    const VALUE: usize = 1000;
    const BATCH: usize = 64;
    const SETS: usize = 64 * 1024 * 1024 / VALUE / BATCH * BATCH;

    let mut monitor = TcpStream::connect(proxy.addr).await.expect("connect");
    monitor.write_all(b"MONITOR\r\n").await.expect("write");
    let mut ok = [0u8; 5];
    timeout(STEP, monitor.read_exact(&mut ok))
        .await
        .expect("MONITOR answered")
        .expect("read");
    assert_eq!(&ok, b"+OK\r\n");

    let stop = Arc::new(AtomicBool::new(false));
    let probe = spawn_probe(proxy.addr, stop.clone());
    let sampler = spawn_sampler(proxy.pid, stop.clone());
    let mut traffic = TcpStream::connect(proxy.addr).await.expect("connect");
    traffic.set_nodelay(true).expect("nodelay");
    let value = vec![b'm'; VALUE];
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    let mut replies = vec![0u8; BATCH * 5];
    for batch in 0..SETS / BATCH {
        let mut req = Vec::with_capacity(BATCH * (VALUE + 48));
        for i in batch * BATCH..(batch + 1) * BATCH {
            let key = format!("mk:{i}");
            req.extend_from_slice(&redis_entra_proxy::devenv::encode(&[
                b"SET",
                key.as_bytes(),
                &value,
            ]));
        }
        let t = Instant::now();
        traffic.write_all(&req).await.expect("write");
        timeout(PROMPT, traffic.read_exact(&mut replies))
            .await
            .unwrap_or_else(|_| panic!("batch {batch} not answered within {PROMPT:?}"))
            .expect("read");
        assert_eq!(replies, b"+OK\r\n".repeat(BATCH), "batch {batch}");
        slowest = slowest.max(t.elapsed());
    }
    let mem1 = proxy.mem();
    eprintln!(
        "MONITOR that never reads: {SETS} SETs of {VALUE} bytes in {:?}, slowest batch of \
         {BATCH} {slowest:?}; proxy RSS {} KiB, peak {} KiB",
        started.elapsed(),
        mem1.rss,
        mem1.hwm
    );
    finish_probe(&stop, probe).await;
    // The monitor reads now: every SET of the traffic client, in order.
    let deadline = Instant::now() + PHASE;
    let mut next = 0usize;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut lines = 0u64;
    while next < SETS {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = timeout(left, monitor.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("monitor saw {next} of {SETS} SETs"))
            .expect("read");
        assert!(n > 0, "monitor closed after {next} of {SETS} SETs");
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Some(end) = memchr::memmem::find(&buf[at..], b"\r\n") {
            let line = &buf[at..at + end];
            at += end + 2;
            lines += 1;
            assert_eq!(line.first(), Some(&b'+'), "monitor line {lines}");
            const MARK: &[u8] = b"\"SET\" \"mk:";
            if let Some(pos) = memchr::memmem::find(line, MARK) {
                let digits: Vec<u8> = line[pos + MARK.len()..]
                    .iter()
                    .copied()
                    .take_while(u8::is_ascii_digit)
                    .collect();
                let i: usize = String::from_utf8_lossy(&digits).parse().expect("key index");
                assert_eq!(i, next, "monitor line {lines}: SET out of order or missing");
                next += 1;
            }
        }
        buf.drain(..at);
    }
    eprintln!(
        "MONITOR that never reads: then read {lines} lines, every SET in order, {:?} in all",
        started.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let sampled = sampler.await.expect("sampler");
    eprintln!("highest RSS sample: {sampled} KiB");
    proxy.assert_bounded(
        "MONITOR that never reads",
        baseline,
        ((SETS * VALUE) >> 20) as u64,
    );
}

/// Size of the value in [`big_values_pass_through`]: over four times [`MEMORY_BOUND`], so that a
/// proxy holding the request or the reply whole (let alone both, or a copy of either) fails.
const BIG_VALUE: usize = 128 << 20;

/// Byte `i` of the big value: no period that lines up with power-of-two reads.
fn big_byte(i: usize) -> u8 {
    ((i % 251) as u8) ^ ((i >> 20) as u8)
}

/// A 128 MiB value `SET` and read back with `GET`, on a connection of its own and from a client
/// that starts out sharing one (`--multiplex`): the proxy passes the request upstream and the
/// reply to the client as they arrive, so its memory stays bounded while the whole value goes
/// through it twice; other clients are served promptly; the bytes come back as they went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_values_pass_through() {
    let _serial = SERIAL.lock().await;
    for args in [&[][..], &["--multiplex"][..]] {
        let case = format!("big value, proxy {args:?}");
        let proxy = ProxyBinary::start_with(args).await;
        let baseline = proxy.warmed_baseline().await;
        let stop = Arc::new(AtomicBool::new(false));
        let probe = spawn_probe(proxy.addr, stop.clone());
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        let chunk = 1 << 20;
        timeout(PHASE, async {
            let header = format!("*3\r\n$3\r\nSET\r\n$6\r\nbp:big\r\n${BIG_VALUE}\r\n");
            s.write_all(header.as_bytes()).await.expect("write");
            let mut part = Vec::with_capacity(chunk);
            for start in (0..BIG_VALUE).step_by(chunk) {
                part.clear();
                part.extend((start..start + chunk).map(big_byte));
                s.write_all(&part).await.expect("write the value");
            }
            s.write_all(b"\r\n").await.expect("write");
            let mut ok = [0u8; 5];
            s.read_exact(&mut ok).await.expect("SET answered");
            assert_eq!(&ok, b"+OK\r\n");

            s.write_all(GET_BIG).await.expect("write");
            read_big_reply(&mut s, &case).await;
        })
        .await
        .unwrap_or_else(|_| panic!("{case}: SET and GET not done within {PHASE:?}"));
        finish_probe(&stop, probe).await;
        proxy.assert_bounded(&case, baseline, 2 * (BIG_VALUE as u64 >> 20));
    }
}

const GET_BIG: &[u8] = b"*2\r\n$3\r\nGET\r\n$6\r\nbp:big\r\n";

/// Reads the reply to [`GET_BIG`] and checks every byte of it.
async fn read_big_reply(s: &mut TcpStream, case: &str) {
    let head = format!("${BIG_VALUE}\r\n");
    let mut got = vec![0u8; head.len()];
    s.read_exact(&mut got).await.expect("GET answered");
    assert_eq!(got, head.as_bytes());
    let chunk = 1 << 20;
    let mut part = vec![0u8; chunk];
    for start in (0..BIG_VALUE).step_by(chunk) {
        s.read_exact(&mut part).await.expect("read the value");
        assert!(
            part.iter()
                .enumerate()
                .all(|(i, b)| *b == big_byte(start + i)),
            "{case}: the value read back differs in the MiB at {start}"
        );
    }
    let mut end = [0u8; 2];
    s.read_exact(&mut end).await.expect("read");
    assert_eq!(&end, b"\r\n");
}

/// How long the shared connection waits for a client far behind before closing it
/// (`SLOW_CLIENT` in `src/mux.rs`).
const SLOW_CLIENT: Duration = Duration::from_secs(10);

/// A shared client (`--multiplex`) that falls behind reading a 128 MiB reply: the shared
/// connection waits for it, so that the rest of the reply waits in the server rather than in
/// the proxy. One that then reads gets every byte, and its next request goes on a connection
/// of its own, so that the others no longer wait for it. One that reads nothing more is closed
/// after [`SLOW_CLIENT`], and a client behind it on the shared connection gets its reply. One
/// worker thread: every client shares the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_client_behind_on_a_big_reply() {
    let _serial = SERIAL.lock().await;
    let admin = free_addr();
    let proxy = ProxyBinary::start_with(&[
        "--multiplex",
        "--worker-threads",
        "1",
        "--admin-listen",
        &admin.to_string(),
    ])
    .await;
    let value: Vec<u8> = (0..BIG_VALUE).map(big_byte).collect();
    let ok = proxy
        .redis_admin()
        .await
        .command(&[b"SET", b"bp:big", &value])
        .await
        .expect("SET");
    assert_eq!(ok, Reply::Simple("OK".into()));
    drop(value);
    let baseline = proxy.warmed_baseline().await;

    // Reads nothing for a while, then all of it.
    let case = "a shared client reading a big reply late";
    let mut late = TcpStream::connect(proxy.addr).await.expect("connect");
    late.write_all(GET_BIG).await.expect("write");
    tokio::time::sleep(SLOW_CLIENT / 4).await;
    timeout(PHASE, read_big_reply(&mut late, case))
        .await
        .unwrap_or_else(|_| panic!("{case}: not read within {PHASE:?}"));
    proxy.assert_bounded(case, baseline, BIG_VALUE as u64 >> 20);

    // It got a big reply (and the shared connection had to wait for it): its next request
    // goes on a connection of its own, where the big reply waits for it alone, and a client
    // asking behind it is answered at once.
    let case = "a client that got a big reply, asking again";
    late.write_all(GET_BIG).await.expect("write");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut behind = RespConn::connect_plain(proxy.addr).await.expect("connect");
    let reply = timeout(PROMPT, behind.command(&[b"GET", b"warm"]))
        .await
        .unwrap_or_else(|_| panic!("{case}: another client waited for it"))
        .expect("GET");
    assert_eq!(reply, Reply::Bulk(Some(vec![b'w'; 64 * 1024])));
    tokio::time::sleep(SLOW_CLIENT / 4).await;
    timeout(PHASE, read_big_reply(&mut late, case))
        .await
        .unwrap_or_else(|_| panic!("{case}: not read within {PHASE:?}"));
    proxy.assert_bounded(case, baseline, BIG_VALUE as u64 >> 20);

    // Reads nothing at all; another client asks for something behind it.
    let case = "a shared client that stops reading a big reply";
    let mut stuck = TcpStream::connect(proxy.addr).await.expect("connect");
    stuck.write_all(GET_BIG).await.expect("write");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut other = RespConn::connect_plain(proxy.addr).await.expect("connect");
    let asked = Instant::now();
    let reply = timeout(
        SLOW_CLIENT + PROMPT + PROMPT,
        other.command(&[b"GET", b"warm"]),
    )
    .await
    .unwrap_or_else(|_| panic!("{case}: the other client waited more than {SLOW_CLIENT:?}"))
    .expect("GET");
    assert_eq!(reply, Reply::Bulk(Some(vec![b'w'; 64 * 1024])));
    eprintln!("{case}: the other client waited {:?}", asked.elapsed());
    let mut read = Vec::new();
    timeout(PHASE, stuck.read_to_end(&mut read))
        .await
        .unwrap_or_else(|_| panic!("{case}: not closed"))
        .expect("read");
    assert!(
        read.len() < BIG_VALUE,
        "{case}: got the whole reply ({} bytes)",
        read.len()
    );
    assert!(
        proxy.log().contains("did not catch up on its replies"),
        "{case}: the proxy says why it closed the client\n{}",
        proxy.log()
    );
    let (_, metrics) = http_get(admin, "/metrics").await;
    let metric = |name, label| support::cluster::sum_metric(&metrics, name, label);
    assert_eq!(
        metric(
            "redis_entra_proxy_connections_closed_total",
            "reason=\"slow_client\""
        ),
        1.0,
        "{case}: counted as closed for being slow\n{metrics}"
    );
    let waits = metric("redis_entra_proxy_multiplex_slow_reader_waits_total", "");
    assert!(waits >= 2.0, "{case}: {waits} waits counted");
    assert_eq!(
        metric(
            "redis_entra_proxy_multiplex_pinned_total",
            "reason=\"large_reply\""
        ),
        1.0,
        "the client that got a big reply and asked again pinned\n{metrics}"
    );
    proxy.assert_bounded(case, baseline, BIG_VALUE as u64 >> 20);
}
