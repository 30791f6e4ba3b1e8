//! Soak: many concurrent client connections held through token rotations with mixed traffic,
//! on the real binary in its own process, so that its memory per connection can be measured.
//!
//! The proxy runs as `redis-entra-proxy dev --rotate-every 2s`: the built-in stand-in for
//! Azure Managed Redis, where every token generation is an ACL user deleted when the token
//! expires (Redis then closes every connection still using it), so a connection the proxy
//! fails to re-authenticate in time is lost at once. The issuer and the admin connection to
//! redis-server live in that process too; they are part of the baseline, not of the
//! per-connection figures. redis-server is a child process with its own memory.
//!
//! Each connection runs a random mix of `SET`+`GET`, `INCR`, pipelines of 8, `MULTI`/`EXEC`
//! and idle spells longer than the proxy's buffer-release delay, checking every reply byte for
//! byte. At the end: no client error, no closed connection, every upstream connection on the
//! newest token generation, every connection still answering `PING`, and the proxy's RSS per
//! connection, idle and under traffic, printed and bounded.
//!
//! The same soak runs twice, one after the other: with a connection of its own per client
//! (the default), and with `--multiplex --local-password`, where every client gives the
//! password and then shares the upstream connections of its session thread, except one in
//! [`PIN_EVERY`], whose transactions pin it to a connection of its own in the middle of the
//! traffic. There the upstream connections are few: what is checked is that all of them move
//! to every new token, that no shared client ever gets a reply that is not its own, and what a
//! shared client costs.
//!
//! Size and length come from the environment: `SOAK_CONNECTIONS` (default 1,000) and
//! `SOAK_SECS` (default 15), so that `cargo test --test soak` is a CI-sized run and
//! `scripts/soak` runs 10,000 connections for 120 s in release mode. The proxy holds two file
//! descriptors per connection: the test raises its soft `RLIMIT_NOFILE` to the hard limit
//! with `prlimit(1)` (children inherit it), and runs fewer connections, saying so, when even
//! the hard limit is too low.
mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use redis_entra_proxy::devenv::RespConn;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// How often the dev issuer rotates tokens.
const ROTATE_EVERY: &str = "2s";
/// With it, each token lives `ROTATE_EVERY / REFRESH_RATIO` = 8 s and its ACL user is
/// deleted then, 6 s after the next token is issued. The proxy spreads re-AUTHs over a quarter
/// of that overlap (1.5 s) and closes a connection still on the old token 0.8 s before expiry,
/// so the last of 10,000 connections still has ~3.7 s for its AUTH round trip: a soak of
/// correctness, not of how many AUTHs two CPUs answer per second. Measured with 9,984
/// connections on 2 CPUs: with the default 0.75 (0.17 s spread, ~0.4 s in all), thousands of
/// connections were closed for want of re-authentication while others were still connecting
/// (TLS handshakes saturate the CPUs); with 0.5 (a 0.5 s spread, ~1.1 s in all), a 30 s run
/// passed but 120 s runs next to a fuzzer and compilers lost 3,647, then all 9,984
/// connections, as re-AUTH round trips reached 1-2.5 s in the 20,000-a-second bursts; with
/// 0.25, 99.5 % of re-AUTHs took under 0.25 s and all under 1 s.
const REFRESH_RATIO: &str = "0.25";
/// File descriptors the proxy needs besides two per connection (listeners, epoll, the
/// redis-server child's pipes, the issuer's admin connection): 17 measured, with room to spare.
const FD_SPARE: u64 = 32;
/// Connections opened at once while connecting: below the listener's backlog (1,024).
const CONNECT_CONCURRENCY: usize = 256;
/// Longer than the proxy's `IDLE_SHRINK` (2 s), so that idle connections have given their
/// buffers back when their memory is measured, and idle spells in the traffic exercise it.
const SETTLE: Duration = Duration::from_secs(3);
/// Pause between one connection's operations, drawn uniformly in this range (milliseconds):
/// with idle spells, ~1.5 operations per second per connection, about 15,000 a second (and
/// ~40,000 commands) for 10,000 connections, which two CPUs carry next to redis-server.
const PACE_MS: (u64, u64) = (100, 900);
/// Idle spell length (milliseconds): longer than `IDLE_SHRINK`, and often across a rotation.
const IDLE_MS: (u64, u64) = (2_000, 4_500);
/// Proxy RSS per idle connection allowed (the session task, the upstream TLS session, two
/// sockets; buffers are released after 2 s idle). This soak measured 16.7 KiB with 1,000 to
/// 9,984 connections (24.4-25.0 KiB before reads started at 2 KiB), and 17.1-18.1 KiB after
/// 2 minutes of traffic and 68 rotations. 64 KiB catches a per-connection buffer that is
/// never released.
const IDLE_PER_CONN_KIB: u64 = 64;
/// Proxy peak RSS per connection allowed under the mixed traffic. Measured 16.9-18.1 KiB
/// (25.7-27.4 KiB before reads started at 2 KiB). A
/// connection in the middle of a round trip also holds a 16 KiB read buffer per side: 128 KiB
/// allows that on every connection at once, with room to spare, and still catches buffers
/// that grow with traffic or rotations.
const PEAK_PER_CONN_KIB: u64 = 128;

/// The local password of the multiplexed soak.
const PASSWORD: &str = "soak-local-password";
/// In the multiplexed soak, one client in this many runs transactions (and is pinned by its
/// first); the others run large `SET`s instead.
const PIN_EVERY: usize = 50;
/// The two soaks run one after the other: each sizes itself for the whole machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How clients reach Redis through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A connection of its own per client (the default).
    Own,
    /// `--multiplex --local-password`: clients authenticate, then share.
    Multiplexed,
}

const SHARED_CLIENTS: &str = "redis_entra_proxy_multiplex_shared_clients";
const PINNED_TOTAL: &str = "redis_entra_proxy_multiplex_pinned_total";

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// (soft, hard) `RLIMIT_NOFILE` of this process, from `/proc/self/limits`.
fn nofile() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| match w {
            "unlimited" => Some(u64::MAX),
            w => w.parse().ok(),
        })
        .collect();
    (nums[0], nums[1])
}

/// The number of connections to run: `requested` if the descriptor limit allows, after raising
/// the soft limit to the hard one with `prlimit(1)` when needed; fewer otherwise, with a
/// message saying why.
fn connections_within_fd_limit(requested: u64) -> u64 {
    let need = 2 * requested + FD_SPARE;
    let (soft, hard) = nofile();
    if soft < need && hard > soft {
        let target = hard.min(need.max(65_536));
        let status = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={target}:{hard}"))
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => eprintln!("SOAK: could not raise the soft descriptor limit: {other:?}"),
        }
    }
    let (soft, _) = nofile();
    if soft >= need {
        return requested;
    }
    let fit = soft.saturating_sub(FD_SPARE) / 2;
    eprintln!(
        "SOAK: RLIMIT_NOFILE is {soft}: the proxy holds two descriptors per connection, so \
         {requested} connections need {need}. Running {fit} connections instead; raise the \
         hard limit (ulimit -Hn, as root) for the full count."
    );
    assert!(fit >= 10, "too few file descriptors for a soak: {soft}");
    fit
}

/// The proxy binary running the dev setup, in its own process.
struct DevProxy {
    /// Spawned with `kill_on_drop` as a last resort; [`DevProxy::stop`] and `Drop` send
    /// SIGTERM first, so that the proxy ends its redis-server child by its handle (a SIGKILL
    /// would orphan it).
    child: tokio::process::Child,
    pid: u32,
    addr: SocketAddr,
    admin: SocketAddr,
    /// Holds the proxy's log.
    dir: tempfile::TempDir,
}

impl DevProxy {
    async fn start(max_connections: u64, extra: &[&str]) -> DevProxy {
        Self::start_with(max_connections, ROTATE_EVERY, REFRESH_RATIO, extra).await
    }

    /// With a rotation period, refresh ratio and more options of the caller's.
    async fn start_with(
        max_connections: u64,
        rotate_every: &str,
        refresh_ratio: &str,
        extra: &[&str],
    ) -> DevProxy {
        let (addr, admin) = (free_addr(), free_addr());
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("proxy.log")).expect("log file");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"));
        // A clean environment: nothing of the machine's can point the proxy elsewhere.
        cmd.env_clear();
        if let Some(server) = std::env::var_os("REDIS_SERVER") {
            cmd.env("REDIS_SERVER", server);
        }
        let child = cmd
            .args(["dev", "--rotate-every", rotate_every])
            .args(["--refresh-ratio", refresh_ratio])
            .args(extra)
            .args(["--listen", &addr.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--max-connections", &max_connections.to_string()])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("proxy binary runs");
        let pid = child.id().expect("pid");
        // Made before it is ready, so that a panic below stops it as `Drop` does, its
        // redis-server child with it.
        let mut proxy = DevProxy {
            child,
            pid,
            addr,
            admin,
            dir,
        };
        let password = extra
            .iter()
            .position(|&a| a == "--local-password")
            .map(|i| extra[i + 1]);
        let deadline = Instant::now() + STEP;
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!("proxy exited: {status}\n{}", proxy.log());
            }
            if let Ok(mut c) = RespConn::connect_plain(addr).await {
                if let Some(password) = password {
                    let _ = timeout(STEP, c.command(&[b"AUTH", password.as_bytes()])).await;
                }
                if let Ok(Ok(Reply::Simple(s))) = timeout(STEP, c.command(&[b"PING"])).await {
                    if s == "PONG" {
                        break;
                    }
                }
            }
            assert!(Instant::now() < deadline, "proxy not ready within {STEP:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        proxy
    }

    /// `VmRSS` in KiB, and `VmHWM` (peak RSS) in KiB.
    fn mem(&self) -> (u64, u64) {
        let field = |name| {
            proc_status_kib(self.pid, name)
                .unwrap_or_else(|| panic!("{name} of the running proxy in /proc/<pid>/status"))
        };
        (field("VmRSS"), field("VmHWM"))
    }

    /// Open file descriptors of the proxy. It is not dumpable, so only root may list them.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or_else(|e| panic!("/proc/{}/fd (needs root): {e}", self.pid))
    }

    /// One sample of the proxy's Prometheus metrics: the sum of the series of `name` whose
    /// labels include every one of `labels`.
    async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let (status, body) = http_get(self.admin, "/metrics").await;
        assert_eq!(status, 200, "/metrics: {body}");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(series, _)| {
                let (n, rest) = series.split_once('{').unwrap_or((series, ""));
                n == name && labels.iter().all(|lab| rest.contains(lab))
            })
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .sum()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// The distribution of re-AUTH round trips (cumulative `le` buckets), from `/metrics`.
    async fn reauth_latency(&self) -> String {
        let (_, body) = http_get(self.admin, "/metrics").await;
        let mut out = Vec::new();
        for line in body.lines() {
            let Some(rest) = line.strip_prefix("redis_entra_proxy_upstream_auth_seconds_bucket{")
            else {
                continue;
            };
            if !rest.contains("kind=\"reauth\"") {
                continue;
            }
            let le = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next());
            let count = line.rsplit_once(' ').map(|(_, v)| v);
            if let (Some(le), Some(count)) = (le, count) {
                out.push(format!("<={le}s: {count}"));
            }
        }
        out.join(", ")
    }

    /// Connections closed so far, by side and reason, from `/metrics`.
    async fn closes(&self) -> String {
        let (_, body) = http_get(self.admin, "/metrics").await;
        body.lines()
            .filter(|l| l.starts_with("redis_entra_proxy_connections_closed_total"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The last lines of the proxy's log, for failure messages.
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!("--- proxy log (tail) ---\n{}", lines[from..].join("\n"))
    }

    /// The redis-server child's pid, from the dev setup's banner (`... (pid Some(N), ...`).
    fn redis_pid(&self) -> Option<u32> {
        let log = self.log();
        let at = log.find("(pid Some(")? + "(pid Some(".len();
        log[at..].split(')').next()?.parse().ok()
    }

    fn sigterm(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    async fn stop(mut self) {
        self.sigterm();
        let status = timeout(STEP * 3, self.child.wait())
            .await
            .expect("the proxy exits after SIGTERM")
            .expect("wait");
        assert!(status.success(), "proxy exit {status}\n{}", self.log());
    }
}

impl Drop for DevProxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let redis = self.redis_pid();
        self.sigterm();
        let deadline = std::time::Instant::now() + STEP * 3;
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The proxy did not stop: kill it (kill_on_drop) and its redis-server child, both
        // started by this test, by their pids.
        let _ = self.child.start_kill();
        if let Some(pid) = redis {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("redis-server") {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Generations (`user=dev-identity-N`) of the proxy's upstream connections, from `CLIENT LIST`
/// asked through the proxy.
async fn generations(ctl: &mut RespConn) -> Vec<u64> {
    let reply = timeout(STEP, ctl.command(&[b"CLIENT", b"LIST"]))
        .await
        .expect("CLIENT LIST in time")
        .expect("CLIENT LIST");
    let Reply::Bulk(Some(text)) = reply else {
        panic!("CLIENT LIST replied {reply:?}");
    };
    String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("user=dev-identity-"))
                .and_then(|g| g.parse().ok())
        })
        .collect()
}

/// What one connection did.
#[derive(Debug, Default, Clone)]
struct ConnStats {
    ops: u64,
    /// Transactions run (in the multiplexed soak, the first pins the client).
    transactions: u64,
    commands: u64,
    idles: u64,
    slowest: Duration,
}

/// One failure, by kind: `error` (an error reply), `closed`, `timeout`, `mismatch`, `io`.
#[derive(Debug)]
struct Failure {
    id: usize,
    kind: &'static str,
    detail: String,
    at: Instant,
}

/// A client connection: a socket and a read buffer.
struct Conn {
    id: usize,
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Writes `req`, then reads exactly `want` (bounded by [`STEP`]), failing on the first
    /// byte that differs.
    async fn round_trip(&mut self, req: &[u8], want: &[u8]) -> Result<Duration, Failure> {
        let fail = |kind, detail: String| Failure {
            id: self.id,
            kind,
            detail,
            at: Instant::now(),
        };
        let started = Instant::now();
        self.s
            .write_all(req)
            .await
            .map_err(|e| fail("io", format!("write: {e}")))?;
        let mut got = Vec::with_capacity(want.len());
        let deadline = started + STEP;
        while got.len() < want.len() {
            self.buf.resize(4096, 0);
            let left = deadline.saturating_duration_since(Instant::now());
            let n = match timeout(left, self.s.read(&mut self.buf)).await {
                Err(_) => {
                    return Err(fail(
                        "timeout",
                        format!("no complete reply within {STEP:?}; got {got:?}"),
                    ))
                }
                Ok(Err(e)) => return Err(fail("io", format!("read: {e}"))),
                Ok(Ok(0)) => {
                    return Err(fail(
                        "closed",
                        format!("connection closed; got {:?}", String::from_utf8_lossy(&got)),
                    ))
                }
                Ok(Ok(n)) => n,
            };
            got.extend_from_slice(&self.buf[..n]);
            let upto = got.len().min(want.len());
            if got[..upto] != want[..upto] || got.len() > want.len() {
                let kind = if got.first() == Some(&b'-') {
                    "error"
                } else {
                    "mismatch"
                };
                return Err(fail(
                    kind,
                    format!(
                        "want {:?}, got {:?}",
                        String::from_utf8_lossy(want),
                        String::from_utf8_lossy(&got)
                    ),
                ));
            }
        }
        Ok(started.elapsed())
    }
}

fn cmd(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(&redis_entra_proxy::devenv::encode(args));
}

fn bulk(out: &mut Vec<u8>, v: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", v.len()).as_bytes());
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
}

/// One connection's traffic until `until`: a random mix of operations, every reply checked.
/// Returns the connection (still open) for the checks after the soak.
async fn traffic(mut c: Conn, until: Instant, mode: Mode) -> Result<(Conn, ConnStats), Failure> {
    let mut rng = fastrand::Rng::with_seed(c.id as u64);
    let key = format!("soak:{}", c.id);
    let counter = format!("soak:{}:n", c.id);
    let mut n: u64 = 0;
    let mut stats = ConnStats::default();
    let (mut req, mut want) = (Vec::new(), Vec::new());
    // Bounded by time and, as a backstop, by count (more than PACE_MS allows in any run).
    for op in 0..1_000_000u64 {
        if Instant::now() >= until {
            break;
        }
        req.clear();
        want.clear();
        #[allow(clippy::needless_late_init)]
        let commands;
        match rng.u32(0..100) {
            // SET then GET, pipelined.
            0..=29 => {
                let v = format!("v{op}-{}", rng.u32(..));
                cmd(&mut req, &[b"SET", key.as_bytes(), v.as_bytes()]);
                cmd(&mut req, &[b"GET", key.as_bytes()]);
                want.extend_from_slice(b"+OK\r\n");
                bulk(&mut want, v.as_bytes());
                commands = 2;
            }
            30..=49 => {
                n += 1;
                cmd(&mut req, &[b"INCR", counter.as_bytes()]);
                want.extend_from_slice(format!(":{n}\r\n").as_bytes());
                commands = 1;
            }
            // A pipeline of 8.
            50..=74 => {
                for _ in 0..4 {
                    n += 1;
                    cmd(&mut req, &[b"INCR", counter.as_bytes()]);
                    want.extend_from_slice(format!(":{n}\r\n").as_bytes());
                    cmd(&mut req, &[b"GET", counter.as_bytes()]);
                    bulk(&mut want, n.to_string().as_bytes());
                }
                commands = 8;
            }
            // A transaction: an injected AUTH must wait for its end.
            75..=84 if mode == Mode::Own || c.id.is_multiple_of(PIN_EVERY) => {
                stats.transactions += 1;
                n += 1;
                cmd(&mut req, &[b"MULTI"]);
                cmd(&mut req, &[b"INCR", counter.as_bytes()]);
                cmd(&mut req, &[b"GET", counter.as_bytes()]);
                cmd(&mut req, &[b"EXEC"]);
                want.extend_from_slice(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n");
                want.extend_from_slice(format!(":{n}\r\n").as_bytes());
                bulk(&mut want, n.to_string().as_bytes());
                commands = 4;
            }
            // Shared clients: a value of 1-8 KiB, so that requests and replies span reads and
            // batches.
            75..=84 => {
                let len = rng.usize(1024..8192);
                let v: Vec<u8> = (0..len as u64)
                    .map(|i| b'a' + ((i + op) % 26) as u8)
                    .collect();
                cmd(&mut req, &[b"SET", key.as_bytes(), &v]);
                cmd(&mut req, &[b"GET", key.as_bytes()]);
                want.extend_from_slice(b"+OK\r\n");
                bulk(&mut want, &v);
                commands = 2;
            }
            // Idle, often across a rotation.
            _ => {
                stats.idles += 1;
                let idle = Duration::from_millis(rng.u64(IDLE_MS.0..IDLE_MS.1));
                tokio::time::sleep_until((Instant::now() + idle).min(until)).await;
                continue;
            }
        }
        let rtt = c.round_trip(&req, &want).await?;
        stats.slowest = stats.slowest.max(rtt);
        stats.ops += 1;
        stats.commands += commands;
        let pause = Duration::from_millis(rng.u64(PACE_MS.0..PACE_MS.1));
        tokio::time::sleep_until((Instant::now() + pause).min(until)).await;
    }
    Ok((c, stats))
}

/// Opens `count` connections (at most [`CONNECT_CONCURRENCY`] at a time), each giving the
/// local password if there is one and answering a `PING` before it counts.
async fn connect_all(addr: SocketAddr, count: usize, password: Option<&'static str>) -> Vec<Conn> {
    let limit = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = tokio::task::JoinSet::new();
    for id in 0..count {
        let limit = limit.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("semaphore");
            let s = timeout(STEP, TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| panic!("connection {id}: connect within {STEP:?}"))
                .unwrap_or_else(|e| panic!("connection {id}: connect: {e}"));
            s.set_nodelay(true).expect("nodelay");
            let mut c = Conn {
                id,
                s,
                buf: Vec::new(),
            };
            if let Some(password) = password {
                let mut auth = Vec::new();
                cmd(&mut auth, &[b"AUTH", password.as_bytes()]);
                if let Err(f) = c.round_trip(&auth, b"+OK\r\n").await {
                    panic!("connection {id}: AUTH: {} {}", f.kind, f.detail);
                }
            }
            if let Err(f) = c.round_trip(b"PING\r\n", b"+PONG\r\n").await {
                panic!("connection {id}: first PING: {} {}", f.kind, f.detail);
            }
            c
        });
    }
    let mut conns = Vec::with_capacity(count);
    while let Some(c) = set.join_next().await {
        conns.push(c.expect("connect task"));
    }
    conns.sort_by_key(|c| c.id);
    conns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_many_connections_through_rotations() {
    soak(Mode::Own).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_multiplexed_clients_through_rotations() {
    soak(Mode::Multiplexed).await;
}

async fn soak(mode: Mode) {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let requested = env_u64("SOAK_CONNECTIONS", 1_000);
    let secs = env_u64("SOAK_SECS", 15);
    let connections = connections_within_fd_limit(requested) as usize;
    let (extra, password): (&[&str], _) = match mode {
        Mode::Own => (&[], None),
        Mode::Multiplexed => (
            &["--multiplex", "--local-password", PASSWORD],
            Some(PASSWORD),
        ),
    };
    let proxy = DevProxy::start(connections as u64 + FD_SPARE, extra).await;
    eprintln!("SOAK ({mode:?}): {connections} connections, {secs} s");

    // The control connection: raises redis-server's client limit (its default is 10,000),
    // then watches generations. Commands through the proxy run as the token's ACL user.
    // (Multiplexed, CONFIG pins it to a connection of its own.)
    let mut ctl = RespConn::connect_plain(proxy.addr).await.expect("connect");
    if let Some(password) = password {
        let ok = ctl
            .command(&[b"AUTH", password.as_bytes()])
            .await
            .expect("AUTH");
        assert_eq!(ok, Reply::Simple("OK".into()), "AUTH");
    }
    let max = (connections as u64 + FD_SPARE).to_string();
    let set = ctl
        .command(&[b"CONFIG", b"SET", b"maxclients", max.as_bytes()])
        .await
        .expect("CONFIG SET");
    assert_eq!(set, Reply::Simple("OK".into()), "CONFIG SET maxclients");
    for i in 0..64 {
        let v = vec![b'w'; 1024 * i];
        ctl.command(&[b"SET", b"warm", &v]).await.expect("SET");
    }
    tokio::time::sleep(SETTLE).await;
    let (baseline, _) = proxy.mem();

    let started = Instant::now();
    let conns = connect_all(proxy.addr, connections, password).await;
    let connect_time = started.elapsed();
    tokio::time::sleep(SETTLE).await;
    let (idle_rss, _) = proxy.mem();
    let fds = proxy.fds();
    eprintln!(
        "SOAK: {connections} connections opened in {connect_time:?}; proxy holds {fds} file \
         descriptors; RSS {baseline} KiB before, {idle_rss} KiB with them idle"
    );
    match mode {
        Mode::Own if fds < 2 * connections => panic!(
            "{fds} descriptors for {connections} connections: some have no upstream\n{}\n{}",
            proxy.closes().await,
            proxy.log_tail()
        ),
        Mode::Own => {}
        Mode::Multiplexed => {
            let shared = proxy.metric(SHARED_CLIENTS, &[]).await;
            assert_eq!(
                shared, connections as f64,
                "every client shares after its AUTH"
            );
            assert!(
                fds < connections + connections / 2,
                "{fds} descriptors for {connections} shared clients: they do not share"
            );
        }
    }

    let gen_before = proxy
        .metric("redis_entra_proxy_token_generation", &[])
        .await;
    let reauth_before = proxy
        .metric(
            "redis_entra_proxy_upstream_auth_total",
            &["kind=\"reauth\"", "result=\"ok\""],
        )
        .await;
    let until = Instant::now() + Duration::from_secs(secs);
    let traffic_started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(traffic(c, until, mode)))
        .collect();
    // Sample the RSS while the traffic runs (VmHWM is the exact peak; this shows the trend).
    let mut samples = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(proxy.mem().0);
    }
    let mut failures = Vec::new();
    let mut survivors = Vec::new();
    let mut total = ConnStats::default();
    // Clients that ran a transaction: multiplexed, those have a connection of their own now.
    let mut pinned = 0;
    for t in tasks {
        // Every task ends by `until` plus at most one bounded round trip.
        match timeout(STEP * 2, t).await.expect("traffic task ends") {
            Ok(Ok((c, s))) => {
                total.ops += s.ops;
                total.transactions += s.transactions;
                pinned += usize::from(s.transactions > 0);
                total.commands += s.commands;
                total.idles += s.idles;
                total.slowest = total.slowest.max(s.slowest);
                survivors.push(c);
            }
            Ok(Err(f)) => failures.push(f),
            Err(e) => panic!("traffic task panicked: {e}"),
        }
    }
    let traffic_time = traffic_started.elapsed();
    let (busy_rss, peak) = proxy.mem();
    let gen_after = proxy
        .metric("redis_entra_proxy_token_generation", &[])
        .await;
    let reauths = proxy
        .metric(
            "redis_entra_proxy_upstream_auth_total",
            &["kind=\"reauth\"", "result=\"ok\""],
        )
        .await
        - reauth_before;
    let reauth_errors = proxy
        .metric(
            "redis_entra_proxy_upstream_auth_total",
            &["kind=\"reauth\"", "result=\"error\""],
        )
        .await;
    let rotations = (gen_after - gen_before) as u64;
    for f in failures.iter().take(10) {
        eprintln!("SOAK failure: connection {} {}: {}", f.id, f.kind, f.detail);
    }
    if !failures.is_empty() {
        let mut by_second = std::collections::BTreeMap::new();
        for f in &failures {
            let second = f.at.saturating_duration_since(traffic_started).as_secs();
            *by_second.entry(second).or_insert(0) += 1;
        }
        eprintln!("SOAK failures by second of traffic: {by_second:?}");
    }
    eprintln!("SOAK: re-AUTH latency: {}", proxy.reauth_latency().await);
    let count = |kind: &str| failures.iter().filter(|f| f.kind == kind).count();
    eprintln!(
        "SOAK: {} s of traffic, {rotations} rotations, {} re-AUTHs; {} operations, {} commands \
         checked, {} idle spells; slowest operation {:?}; failures: {} error replies, {} closed, \
         {} timeouts, {} mismatches, {} I/O errors",
        traffic_time.as_secs(),
        reauths,
        total.ops,
        total.commands,
        total.idles,
        total.slowest,
        count("error"),
        count("closed"),
        count("timeout"),
        count("mismatch"),
        count("io"),
    );
    assert!(
        failures.is_empty(),
        "{} of {connections} connections failed (first: {:?})\n{}",
        failures.len(),
        failures.first(),
        proxy.log_tail()
    );
    assert_eq!(reauth_errors, 0.0, "re-AUTHs refused");
    assert!(
        rotations as f64 >= secs as f64 / 2.0 - 2.0,
        "too few rotations in {secs} s: {rotations}"
    );

    // Every upstream connection (the soak's and the control connection) re-authenticated to
    // the newest generation. A rotation may be under way: wait (bounded) for one moment when
    // they all agree. Multiplexed: the control connection and every pinned client have one
    // each, and the shared clients one per session thread that has any (at most one per
    // CPU: they all speak RESP2).
    let expected = match mode {
        Mode::Own => connections + 1..=connections + 1,
        Mode::Multiplexed => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            pinned + 2..=pinned + 1 + cpus
        }
    };
    if mode == Mode::Multiplexed {
        let shared = proxy.metric(SHARED_CLIENTS, &[]).await;
        let pins = proxy.metric(PINNED_TOTAL, &[]).await;
        eprintln!(
            "SOAK: {} transactions pinned {pinned} clients; {shared} clients still share",
            total.transactions
        );
        assert_eq!(shared, (connections - pinned) as f64, "shared clients");
        assert_eq!(
            pins,
            (pinned + 1) as f64,
            "pinned: the clients' and the control's"
        );
        let by_transactions = proxy
            .metric(PINNED_TOTAL, &["reason=\"transaction\""])
            .await;
        assert_eq!(
            by_transactions, pinned as f64,
            "the clients pinned by MULTI"
        );
    }
    let deadline = Instant::now() + STEP * 2;
    loop {
        let gens = generations(&mut ctl).await;
        let newest = gens.iter().copied().max().unwrap_or(0);
        let behind = gens.iter().filter(|&&g| g != newest).count();
        if expected.contains(&gens.len()) && behind == 0 {
            eprintln!(
                "SOAK: all {} upstream connections on generation {newest}",
                gens.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "upstream connections not converged: {} of them, {behind} behind generation \
             {newest}, {expected:?} expected",
            gens.len(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Idle again, then every connection still answers.
    tokio::time::sleep(SETTLE).await;
    let (after_rss, _) = proxy.mem();
    let mut set = tokio::task::JoinSet::new();
    for mut c in survivors {
        set.spawn(async move { c.round_trip(b"PING\r\n", b"+PONG\r\n").await.map(|_| c) });
    }
    let mut alive = 0;
    while let Some(r) = set.join_next().await {
        match r.expect("PING task") {
            Ok(_) => alive += 1,
            Err(f) => panic!(
                "connection {} after the soak: {} {}",
                f.id, f.kind, f.detail
            ),
        }
    }
    assert_eq!(alive, connections);

    let per_conn = |rss: u64| rss.saturating_sub(baseline) as f64 / connections as f64;
    eprintln!(
        "SOAK: proxy RSS baseline {baseline} KiB; {connections} idle connections {idle_rss} KiB \
         ({:.1} KiB per connection); under traffic peak {peak} KiB ({:.1} KiB per connection), \
         {busy_rss} KiB at the end of traffic; idle after the soak {after_rss} KiB ({:.1} KiB \
         per connection); RSS during the traffic, sampled every {} s: {:?}",
        per_conn(idle_rss),
        per_conn(peak),
        per_conn(after_rss),
        samples.len().div_ceil(12),
        samples
            .iter()
            .step_by(samples.len().div_ceil(12).max(1))
            .collect::<Vec<_>>(),
    );
    assert!(
        per_conn(idle_rss) <= IDLE_PER_CONN_KIB as f64,
        "idle connections cost {:.1} KiB each, more than {IDLE_PER_CONN_KIB} KiB",
        per_conn(idle_rss)
    );
    assert!(
        per_conn(after_rss) <= IDLE_PER_CONN_KIB as f64,
        "idle connections after the soak cost {:.1} KiB each, more than {IDLE_PER_CONN_KIB} KiB",
        per_conn(after_rss)
    );
    assert!(
        per_conn(peak) <= PEAK_PER_CONN_KIB as f64,
        "connections under traffic cost {:.1} KiB each, more than {PEAK_PER_CONN_KIB} KiB",
        per_conn(peak)
    );
    drop(ctl);
    let stopping = Instant::now();
    proxy.stop().await;
    eprintln!("SOAK: proxy drained and exited in {:?}", stopping.elapsed());
}

/// p50, p99 and max of `samples` (sorted here).
fn percentiles(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    samples.sort();
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    (
        at(0.50),
        at(0.99),
        samples.last().copied().unwrap_or_default(),
    )
}

/// The re-authentication storm benchmark (`benches/reauth_storm.sh`, not part of the suite):
/// `STORM_CONNECTIONS` idle client connections (default 5,000) are held through rotations
/// every `STORM_ROTATE` while a few probe connections measure command latency; each latency
/// sample is classed by whether re-AUTHs were being answered at that moment (the proxy's
/// `upstream_auth_total{kind="reauth"}` sampled every 50 ms). Prints p50/p99/max in quiet and
/// storm periods and their ratio; the goal is a storm p99 at most 2x the quiet one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run benches/reauth_storm.sh"]
async fn reauth_storm_latency() {
    const PROBES: usize = 4;
    const PROBE_EVERY: Duration = Duration::from_millis(2);
    const SAMPLE_EVERY: Duration = Duration::from_millis(50);
    // A storm's first moments: its first counter window and the next.
    const AT_ROTATION: Duration = Duration::from_millis(200);
    let requested = env_u64("STORM_CONNECTIONS", 5_000);
    let secs = env_u64("STORM_SECS", 75);
    let rotate = std::env::var("STORM_ROTATE").unwrap_or_else(|_| "30s".into());
    let window = std::env::var("STORM_WINDOW").unwrap_or_else(|_| "30s".into());
    let ratio = std::env::var("STORM_REFRESH_RATIO").unwrap_or_else(|_| "0.5".into());
    let connections = connections_within_fd_limit(requested) as usize;
    let proxy = DevProxy::start_with(
        (connections + PROBES) as u64 + FD_SPARE,
        &rotate,
        &ratio,
        &["--reauth-window", &window],
    )
    .await;
    let mut ctl = RespConn::connect_plain(proxy.addr).await.expect("connect");
    let max = ((connections + PROBES) as u64 + FD_SPARE).to_string();
    ctl.command(&[b"CONFIG", b"SET", b"maxclients", max.as_bytes()])
        .await
        .expect("CONFIG SET");
    ctl.command(&[b"SET", b"storm:probe", b"value"])
        .await
        .expect("SET");
    let idle = connect_all(proxy.addr, connections, None).await;
    let probes = connect_all(proxy.addr, PROBES, None).await;
    tokio::time::sleep(SETTLE).await;

    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let tasks: Vec<_> = probes
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut tick = tokio::time::interval(PROBE_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // Bounded by time, and by count as a backstop.
                for _ in 0..10_000_000u64 {
                    tick.tick().await;
                    let at = Instant::now();
                    if at >= until {
                        break;
                    }
                    let took = c
                        .round_trip(
                            b"*2\r\n$3\r\nGET\r\n$11\r\nstorm:probe\r\n",
                            b"$5\r\nvalue\r\n",
                        )
                        .await
                        .unwrap_or_else(|f| panic!("probe: {} {}", f.kind, f.detail));
                    samples.push((at, took));
                }
                samples
            })
        })
        .collect();
    // (time, re-AUTHs answered so far)
    let mut counts = Vec::new();
    while Instant::now() < until {
        let n = proxy
            .metric(
                "redis_entra_proxy_upstream_auth_total",
                &["kind=\"reauth\""],
            )
            .await;
        counts.push((Instant::now(), n));
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(
            timeout(STEP * 2, t)
                .await
                .expect("probe ends")
                .expect("probe"),
        );
    }
    // Storm periods: between two counter samples that differ (widened by one sample period
    // on each side, so that the edges of a storm count as storm).
    let storms: Vec<(Instant, Instant)> = counts
        .windows(2)
        .filter(|w| w[1].1 > w[0].1)
        .map(|w| (w[0].0 - SAMPLE_EVERY, w[1].0 + SAMPLE_EVERY))
        .collect();
    let in_storm = |t: Instant| storms.iter().any(|(a, b)| *a <= t && t <= *b);
    // Where each storm begins (its windows overlap), and the slowest probe in its first
    // moments, when every session hears of the new token.
    let starts: Vec<Instant> = storms
        .iter()
        .enumerate()
        .filter(|(i, (a, _))| *i == 0 || storms[i - 1].1 < *a)
        .map(|(_, (a, _))| *a)
        .collect();
    let at_rotation: Vec<Duration> = starts
        .iter()
        .map(|start| {
            samples
                .iter()
                .filter(|(at, _)| *start <= *at && *at <= *start + AT_ROTATION)
                .map(|(_, took)| *took)
                .max()
                .unwrap_or_default()
        })
        .collect();
    let (mut storm, mut quiet): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    for (at, took) in samples {
        if in_storm(at) {
            storm.push(took);
        } else {
            quiet.push(took);
        }
    }
    let reauths = counts.last().map_or(0.0, |c| c.1) - counts.first().map_or(0.0, |c| c.1);
    let storm_time = SAMPLE_EVERY * storms.len() as u32;
    let (qn, sn) = (quiet.len(), storm.len());
    let (q50, q99, qmax) = percentiles(&mut quiet);
    let (s50, s99, smax) = percentiles(&mut storm);
    eprintln!(
        "STORM: {connections} idle connections, rotations every {rotate} (refresh ratio {ratio}), \
         --reauth-window {window}; {reauths} re-AUTHs answered during {secs} s, over {storm_time:?} \
         of storm; {PROBES} probes each sending GET every {PROBE_EVERY:?}\n\
         STORM: quiet: {qn} samples, p50 {q50:?}, p99 {q99:?}, max {qmax:?}\n\
         STORM: storm: {sn} samples, p50 {s50:?}, p99 {s99:?}, max {smax:?}\n\
         STORM: p99 storm/quiet = {:.2} (goal: at most 2)\n\
         STORM: slowest probe within {AT_ROTATION:?} of each storm's start: {at_rotation:?}\n\
         STORM: re-AUTH latency: {}",
        s99.as_secs_f64() / q99.as_secs_f64().max(1e-9),
        proxy.reauth_latency().await,
    );
    assert!(
        reauths >= connections as f64,
        "a storm happened: {reauths} re-AUTHs"
    );
    assert!(sn > 0 && qn > 0, "samples in both periods");
    // Every idle connection survived.
    let mut set = tokio::task::JoinSet::new();
    for mut c in idle {
        set.spawn(async move { c.round_trip(b"PING\r\n", b"+PONG\r\n").await });
    }
    while let Some(r) = set.join_next().await {
        if let Err(f) = r.expect("PING task") {
            panic!(
                "connection {} after the storm: {} {}",
                f.id, f.kind, f.detail
            );
        }
    }
    proxy.stop().await;
}
