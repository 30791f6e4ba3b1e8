//! Test harness: a TLS `redis-server` standing in for Azure Managed Redis (from
//! `redis_entra_proxy::devenv`), the proxy running in-process on a port-0 listener in front of
//! it, and small raw-socket helpers for byte-level assertions. Everything is on 127.0.0.1;
//! every wait is bounded.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redis_entra_proxy::cli::Options;
use redis_entra_proxy::credentials::TokenSource;
use redis_entra_proxy::dev::DevTokenSource;
use redis_entra_proxy::devenv::{RedisOptions, RedisServer, RespConn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use redis_entra_proxy::devenv::Reply;

/// Longest any single expected event may take in a test before it counts as a hang.
pub const STEP: Duration = Duration::from_secs(10);

pub struct ProxyOptions {
    /// `--local-password`.
    pub local_password: Option<String>,
    /// Token lifetime of the dev issuer (each generation is an ACL user deleted at expiry).
    pub token_lifetime: Duration,
    pub refresh_ratio: f64,
    /// Also listen on a unix socket in a temporary directory.
    pub unix_socket: bool,
    /// `--unix-socket-mode`.
    pub unix_socket_mode: Option<&'static str>,
    /// Point the proxy somewhere else than the stand-in server (fault tests):
    /// (address, tls, CA file).
    pub upstream: Option<(String, bool, Option<PathBuf>)>,
    /// Replace the dev token issuer.
    pub source: Option<Arc<dyn TokenSource>>,
    pub max_connections: Option<usize>,
    pub drain_timeout: Option<Duration>,
    pub connect_timeout: Option<Duration>,
    /// `--client-idle-timeout` and `--partial-request-timeout`.
    pub client_idle_timeout: Option<Duration>,
    pub partial_request_timeout: Option<Duration>,
    /// `--warm-connections`.
    pub warm_connections: Option<usize>,
    /// `--multiplex` and `--multiplex-max-batches`.
    pub multiplex: bool,
    pub multiplex_max_batches: Option<usize>,
    /// Session threads (2 unless set: every test also covers the hand-off between threads).
    pub worker_threads: Option<usize>,
    /// `--upstream-server-name` (default `localhost`, a name of the stand-in's certificate).
    pub server_name: Option<String>,
    /// `--cluster-mode` (off unless set), `--cluster-ports` (default `0`: any free port) and
    /// `--cluster-refresh-interval`.
    pub cluster_mode: Option<redis_entra_proxy::cluster::ClusterMode>,
    pub cluster_ports: Option<String>,
    pub cluster_refresh_interval: Option<Duration>,
    /// Serve the admin endpoint on a free port.
    pub admin: bool,
    /// Return without waiting for a PING to succeed (for proxies that cannot be ready).
    pub no_ready_wait: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            local_password: None,
            token_lifetime: Duration::from_secs(3600),
            refresh_ratio: 0.75,
            unix_socket: false,
            unix_socket_mode: None,
            upstream: None,
            source: None,
            max_connections: None,
            drain_timeout: None,
            connect_timeout: None,
            client_idle_timeout: None,
            partial_request_timeout: None,
            warm_connections: None,
            multiplex: false,
            multiplex_max_batches: None,
            worker_threads: None,
            server_name: None,
            cluster_mode: None,
            cluster_ports: None,
            cluster_refresh_interval: None,
            admin: false,
            no_ready_wait: false,
        }
    }
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub unix_socket: Option<PathBuf>,
    pub redis: Arc<RedisServer>,
    pub shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
    /// The local password, sent before the readiness PING.
    password: Option<String>,
    /// The admin endpoint, when `ProxyOptions::admin` asked for one.
    pub admin_addr: Option<SocketAddr>,
}

impl Proxy {
    pub async fn start() -> Proxy {
        Self::start_with(ProxyOptions::default()).await
    }

    pub async fn start_with(opts: ProxyOptions) -> Proxy {
        let redis = Arc::new(
            RedisServer::start(RedisOptions::default())
                .await
                .expect("redis-server starts"),
        );
        Self::start_on(redis, opts).await
    }

    /// Starts a proxy in front of an already running server.
    pub async fn start_on(redis: Arc<RedisServer>, opts: ProxyOptions) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let unix_socket = opts.unix_socket.then(|| dir.path().join("proxy.sock"));
        let (upstream, tls, ca) = opts.upstream.clone().unwrap_or_else(|| {
            (
                redis.addr().to_string(),
                true,
                redis.ca_file().map(|p| p.to_path_buf()),
            )
        });
        let options = Options {
            listen: Some("127.0.0.1:0".into()),
            unix_socket: unix_socket.clone(),
            unix_socket_mode: opts.unix_socket_mode.map(str::to_owned),
            upstream: Some(upstream),
            upstream_tls: Some(tls),
            upstream_ca_file: ca,
            upstream_server_name: Some(
                opts.server_name
                    .clone()
                    .unwrap_or_else(|| "localhost".into()),
            ),
            local_password: opts
                .local_password
                .clone()
                .map(redis_entra_proxy::secret::Secret::new),
            refresh_ratio: Some(opts.refresh_ratio),
            max_connections: opts.max_connections,
            drain_timeout: opts.drain_timeout,
            connect_timeout: opts.connect_timeout,
            client_idle_timeout: opts.client_idle_timeout,
            partial_request_timeout: opts.partial_request_timeout,
            warm_connections: opts.warm_connections,
            multiplex: Some(opts.multiplex),
            multiplex_max_batches: opts.multiplex_max_batches,
            // Off unless a test asks: in `auto`, the topology read at start opens a connection
            // of its own beside the tests' (`--cluster-mode auto` against a plain server is
            // covered through the binary, which runs with the defaults).
            cluster_mode: Some(
                opts.cluster_mode
                    .unwrap_or(redis_entra_proxy::cluster::ClusterMode::Off),
            ),
            cluster_ports: Some(opts.cluster_ports.clone().unwrap_or_else(|| "0".into())),
            cluster_refresh_interval: opts.cluster_refresh_interval,
            admin_listen: Some(if opts.admin { "127.0.0.1:0" } else { "none" }.into()),
            // Two session threads whatever the machine, so that every test also covers
            // connections handed from the accepting runtime to another thread.
            worker_threads: Some(opts.worker_threads.unwrap_or(2)),
            ..Options::default()
        };
        let config = redis_entra_proxy::config::validate(options, None).expect("valid test config");
        let listeners = redis_entra_proxy::bind(&config).await.expect("bind");
        let addr = listeners
            .tcp
            .as_ref()
            .expect("tcp listener")
            .local_addr()
            .expect("local addr");
        let admin_addr = listeners
            .admin
            .as_ref()
            .map(|l| l.local_addr().expect("admin addr"));
        let source = opts.source.clone().unwrap_or_else(|| {
            Arc::new(DevTokenSource::new(
                redis.clone(),
                opts.token_lifetime,
                "oid",
            ))
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                redis_entra_proxy::run_with_source(config, listeners, source, shutdown)
                    .await
                    .expect("proxy runs");
            }
        });
        let proxy = Proxy {
            addr,
            unix_socket,
            redis,
            shutdown,
            task: Some(task),
            _dir: dir,
            password: opts.local_password.clone(),
            admin_addr,
        };
        if !opts.no_ready_wait {
            proxy.wait_ready().await;
        }
        proxy
    }

    /// Polls until a PING through the proxy is answered (the first token has arrived).
    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Ok(mut c) = RespConn::connect_plain(self.addr).await {
                if let Some(pw) = &self.password {
                    let _ = c.command(&[b"AUTH", pw.as_bytes()]).await;
                }
                if let Ok(Ok(Reply::Simple(s))) =
                    tokio::time::timeout(STEP, c.command(&[b"PING"])).await
                {
                    if s == "PONG" {
                        return;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "proxy not ready within {STEP:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Token generations of the proxy's upstream connections, as the server lists them
    /// (`user=oid-N`).
    pub async fn upstream_generations(&self) -> Vec<u64> {
        let list = self.redis.client_list().await.expect("CLIENT LIST");
        list.iter()
            .filter_map(|c| c.get("user")?.strip_prefix("oid-")?.parse().ok())
            .collect()
    }

    /// A RESP2 client connected to the proxy.
    pub async fn client(&self) -> RespConn {
        RespConn::connect_plain(self.addr)
            .await
            .expect("connect to proxy")
    }

    /// A raw TCP connection to the proxy.
    pub async fn raw(&self) -> Raw {
        Raw(TcpStream::connect(self.addr)
            .await
            .expect("connect to proxy"))
    }

    /// Stops the proxy and waits for it to drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(STEP * 3, task)
                .await
                .expect("proxy stops")
                .expect("proxy task");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A raw socket for byte-exact tests.
pub struct Raw(pub TcpStream);

impl Raw {
    pub async fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).await.expect("write to proxy");
    }

    /// Reads exactly `n` bytes.
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::time::timeout(STEP, self.0.read_exact(&mut buf))
            .await
            .expect("reply within bound")
            .expect("read");
        buf
    }

    /// Reads until `expected.len()` bytes arrived and compares them.
    pub async fn expect(&mut self, expected: &[u8]) {
        let got = self.read_exact(expected.len()).await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(expected)
        );
    }

    /// Reads one whole reply frame, RESP2 or RESP3, and returns its bytes.
    pub async fn read_frame(&mut self) -> Vec<u8> {
        let mut scanner = redis_entra_proxy::resp::reply::ReplyScanner::new();
        let (mut frame, mut unscanned) = (Vec::new(), Vec::new());
        loop {
            // A byte at a time: nothing past the frame is taken from the socket.
            let byte = self.read_exact(1).await;
            frame.extend_from_slice(&byte);
            unscanned.extend_from_slice(&byte);
            let scan = scanner.scan(&unscanned).expect("a well-formed reply");
            unscanned.drain(..scan.consumed);
            if scan.complete {
                return frame;
            }
        }
    }

    /// Reads until EOF (bounded); returns everything read.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut buf = Vec::new();
        tokio::time::timeout(STEP, self.0.read_to_end(&mut buf))
            .await
            .expect("close within bound")
            .expect("read");
        buf
    }
}

/// A loopback address the kernel just handed out (another process may take it first).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`…), in KiB; `None` once the process
/// is gone.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The server's connections from a proxy: those authenticated as a token's user (`oid-N`,
/// from the dev issuer).
pub async fn token_connections(
    redis: &RedisServer,
) -> Vec<std::collections::HashMap<String, String>> {
    redis
        .client_list()
        .await
        .expect("CLIENT LIST")
        .into_iter()
        .filter(|c| c.get("user").is_some_and(|u| u.starts_with("oid-")))
        .collect()
}

/// A bounded HTTP/1.1 GET; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut buf))
        .await
        .expect("admin answers in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Runs an external command (redis-cli, redis-benchmark) with a time bound; returns stdout.
pub async fn run_tool(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{program} runs (apt-get install redis-tools): {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input).await.expect("write stdin");
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} finished within 120 s"))
        .expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub mod cluster;
pub mod mock_identity;
pub mod proxy_process;
pub mod token_issuer;
