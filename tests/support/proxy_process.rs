//! The real `redis-entra-proxy` binary as a child process, in front of a stand-in server, with
//! its admin endpoint on a free loopback port.
//!
//! Fault tests of the token path use the binary rather than the in-process harness for two
//! reasons: the Prometheus recorder is process-wide, so only a process of its own gives
//! counters a test can compare exactly; and the managed-identity source reads
//! `IDENTITY_ENDPOINT` from the process environment, which a test may set for a child but not
//! for itself. The child's environment is cleared first, so no `AZURE_*`, `IMDS_ENDPOINT` or
//! `REDIS_ENTRA_PROXY_*` variable of the machine running the tests can steer it anywhere but
//! 127.0.0.1. Its log goes to a file whose tail is printed if the test panics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use redis_entra_proxy::devenv::{RedisServer, RespConn};

use super::{http_get, STEP};

/// Bind attempts before giving up: ports are chosen by binding port 0 and closing it, and
/// another process may take one in between.
const BIND_ATTEMPTS: usize = 3;

pub struct ProxyProcess {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts the binary with `args` after the upstream, listener, admin and log options, and
    /// exactly `env` as its environment. Returns once `/healthz` answers; the first token may
    /// not have arrived yet (see [`ProxyProcess::wait_started`]).
    pub async fn start(redis: &RedisServer, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_limited(redis, args, env, None).await
    }

    /// Like [`ProxyProcess::start`], with the process's open-file limit set to
    /// `open_files` (soft, hard) before it starts.
    pub async fn start_limited(
        redis: &RedisServer,
        args: &[&str],
        env: &[(&str, &str)],
        open_files: Option<(u64, u64)>,
    ) -> Self {
        for _ in 0..BIND_ATTEMPTS {
            if let Some(p) = Self::try_start(redis, args, env, open_files).await {
                return p;
            }
        }
        panic!("the proxy could not bind its ports in {BIND_ATTEMPTS} attempts");
    }

    async fn try_start(
        redis: &RedisServer,
        args: &[&str],
        env: &[(&str, &str)],
        open_files: Option<(u64, u64)>,
    ) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("proxy.log");
        let (addr, admin) = (super::free_addr(), super::free_addr());
        let ca = redis.ca_file().expect("the stand-in server uses TLS");
        let binary = env!("CARGO_BIN_EXE_redis-entra-proxy");
        let mut cmd = match open_files {
            None => tokio::process::Command::new(binary),
            // The shell sets both limits, then becomes the proxy (same pid).
            Some((soft, hard)) => {
                let mut sh = tokio::process::Command::new("/bin/sh");
                sh.arg("-c")
                    .arg(format!(
                        "ulimit -n {hard} && ulimit -Sn {soft} && exec \"$0\" \"$@\""
                    ))
                    .arg(binary);
                sh
            }
        };
        cmd.env_clear()
            .envs(env.iter().copied())
            .args(["--listen", &addr.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--upstream", &redis.addr().to_string()])
            .arg("--upstream-ca-file")
            .arg(ca)
            .args(["--upstream-server-name", "localhost"])
            .args(["--log-level", "info"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("the proxy binary runs");
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Some(status) = child.try_wait().expect("child status") {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if status.code() == Some(3) {
                    return None;
                }
                panic!("the proxy exited at start-up with {status}:\n{text}");
            }
            if tokio::net::TcpStream::connect(admin).await.is_ok()
                && http_get(admin, "/healthz").await.0 == 200
            {
                return Some(ProxyProcess {
                    child,
                    addr,
                    admin,
                    log,
                    _dir: dir,
                });
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the proxy's admin endpoint did not answer within {STEP:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id (the same after the shell of [`ProxyProcess::start_limited`] execs).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the proxy is running")
    }

    /// Sends SIGTERM: the proxy stops accepting and drains.
    #[allow(dead_code)]
    pub fn terminate(&self) {
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(killed.success(), "kill -TERM");
    }

    /// Waits (bounded by `within`) for the process to exit; its exit status.
    #[allow(dead_code)]
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the proxy exits in time")
            .expect("wait")
    }

    /// CPU time the process has used (user and system), in clock ticks (1/100 s).
    #[allow(dead_code)]
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        // The fields after the command name, which ends with the last ')': utime and stime
        // are the 12th and 13th.
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = after.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// Waits until `/startupz` reports the first token (bounded by [`STEP`]).
    pub async fn wait_started(&self) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let (status, body) = self.get("/startupz").await;
            if status == 200 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no first token within {STEP:?}: {status} {body}\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One admin GET: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    pub async fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        Metrics(body)
    }

    /// A RESP2 client connected to the proxy.
    pub async fn client(&self) -> RespConn {
        RespConn::connect_plain(self.addr)
            .await
            .expect("connect to the proxy")
    }

    /// Everything the proxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (bounded by `within`).
    pub async fn wait_log(&self, needle: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.log().contains(needle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{needle:?} not logged within {within:?}\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!("--- proxy log (tail) ---\n{}", lines[from..].join("\n"))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        // This process is the child started above, ended by its own handle.
        let _ = self.child.start_kill();
    }
}

/// A Prometheus text exposition.
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the sample named `name` whose labels include all of `labels`; the sum if
    /// several match; `None` if none does.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                continue;
            }
            let has = |(k, v): &(&str, &str)| {
                series_labels
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            };
            if labels.iter().all(has) {
                if let Ok(v) = value.parse::<f64>() {
                    found = Some(found.unwrap_or(0.0) + v);
                }
            }
        }
        found
    }

    /// Like [`Metrics::get`], counting an absent counter as zero.
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}
