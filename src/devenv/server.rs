//! `RedisServer`: a redis-server child process on 127.0.0.1 in a private temporary directory,
//! configured like Azure Managed Redis as far as the proxy can tell (TLS, default user off,
//! ACL users as tokens). Owns the process, its directory, the admin connection and the list
//! of users to re-create after a restart. Killed by its handle and cleaned up on drop.
//! Admin operations (commands, ACL users, `CLIENT LIST`) live in `server/ops.rs`.

mod ops;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::workdir::Workdir;
use super::{client_tls_config, random_hex, DevCerts, DevError, RespConn};
use ops::{lock, redact};

/// Where Debian's package installs the server; `REDIS_SERVER` overrides it.
const DEFAULT_REDIS_SERVER: &str = "/usr/bin/redis-server";
/// Upper bound on waiting for a fresh redis-server to answer: it is usually ready in tens of
/// milliseconds, so ten seconds only runs out when something is really wrong.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one readiness probe (connect, handshake, AUTH, PING) so a stuck probe cannot eat
/// the whole readiness budget.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between readiness probes: the server is a process we do not control and it offers no
/// "ready" notification, so polling is the only option; short enough to add little latency.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// How many times to try binding when another process takes the chosen port between our
/// probe and redis-server's bind.
const BIND_ATTEMPTS: usize = 5;
/// Pause before re-binding the same port on restart, giving whoever holds it time to let go.
const REBIND_DELAY: Duration = Duration::from_millis(200);
/// The admin user's name; the default user is disabled, as on AMR.
const ADMIN_USER: &str = "admin";

/// How to run the stand-in server.
#[derive(Clone)]
pub struct RedisOptions {
    /// Listen with `--port 0 --tls-port N` (true, the default) or plain `--port N`.
    pub tls: bool,
    /// Certificate DNS SANs; 127.0.0.1 is always added as an IP SAN.
    pub dns_names: Vec<String>,
    /// Appended to the redis-server command line after the generated config file.
    pub extra_args: Vec<String>,
    /// Password of the `admin` user this module administers the server with.
    pub admin_password: String,
    /// Certificates to serve instead of a fresh CA and certificate for `dns_names` (which is
    /// then unused): lets the nodes of a cluster share one CA and one certificate. Without an
    /// IP SAN for 127.0.0.1, set `tls_server_name` too.
    pub certs: Option<DevCerts>,
    /// The name the fixture's own connections verify the certificate as and send as SNI;
    /// `None` means 127.0.0.1, the IP SAN every certificate generated here carries.
    pub tls_server_name: Option<String>,
    /// Run as a cluster node: `cluster-enabled yes`, `nodes.conf` in the private directory,
    /// announcing 127.0.0.1, and the cluster bus on a second free port (TLS when `tls`).
    /// Forming a cluster out of nodes is `RedisCluster`'s job.
    pub cluster: bool,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            tls: true,
            dns_names: vec!["localhost".to_owned()],
            extra_args: Vec::new(),
            admin_password: random_hex(16),
            certs: None,
            tls_server_name: None,
            cluster: false,
        }
    }
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("tls", &self.tls)
            .field("dns_names", &self.dns_names)
            .field("extra_args", &self.extra_args)
            .field("admin_password", &"<redacted>")
            .field("certs", &self.certs)
            .field("tls_server_name", &self.tls_server_name)
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// A redis-server child process in its own temporary directory. Dropping it kills the process
/// (by its handle) and removes the directory.
pub struct RedisServer {
    program: PathBuf,
    /// The running server; `None` between `kill` and `restart`. Spawned with `kill_on_drop`, so
    /// dropping the handle also ends the process.
    child: Option<Child>,
    /// Private temporary directory holding config, certificates, key and logs; declared after
    /// `child` so the process is killed before its directory goes.
    workdir: Workdir,
    port: u16,
    /// The cluster bus port of a cluster node (`None` otherwise); kept across `restart`.
    cluster_port: Option<u16>,
    certs: Option<DevCerts>,
    ca_file: Option<PathBuf>,
    /// Trusts only the dev CA; used with `server_name`.
    tls_config: Option<Arc<rustls::ClientConfig>>,
    /// What the fixture's connections verify the certificate as: 127.0.0.1 by default, an IP
    /// SAN every generated certificate carries, so the admin connection works whatever DNS
    /// names the caller chose; `RedisOptions::tls_server_name` when the caller's certificate
    /// has no IP SAN.
    server_name: String,
    extra_args: Vec<String>,
    admin_password: String,
    /// Cached admin connection; `None` until first use and after any failure on it.
    admin: tokio::sync::Mutex<Option<RespConn>>,
    /// Users created with `acl_setuser` (name, password) in order, replayed by `restart` since a
    /// server without persistence forgets them.
    users: std::sync::Mutex<Vec<(String, String)>>,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("addr", &self.addr())
            .field("tls", &self.tls())
            .field("dir", &self.workdir.path())
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

impl RedisServer {
    /// Generates certificates, writes the config, starts redis-server on a free loopback port
    /// (retrying on a port taken meanwhile) and returns once it answers AUTH and PING.
    pub async fn start(opts: RedisOptions) -> Result<RedisServer, DevError> {
        let program = std::env::var_os("REDIS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_REDIS_SERVER));
        if !program.is_file() {
            return Err(DevError::RedisServerMissing {
                path: program.display().to_string(),
            });
        }
        let certs = match (opts.tls, opts.certs) {
            (true, Some(certs)) => Some(certs),
            (true, None) => {
                let names: Vec<&str> = opts.dns_names.iter().map(String::as_str).collect();
                let ips = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
                Some(match opts.cluster {
                    true => DevCerts::generate_for_cluster(&names, &ips)?,
                    false => DevCerts::generate(&names, &ips)?,
                })
            }
            (false, _) => None,
        };
        let tls_config = match &certs {
            Some(certs) => Some(client_tls_config(&certs.ca_pem)?),
            None => None,
        };
        // From here on the directory belongs to `server`, which removes it on any error.
        let workdir = Workdir::create()?;
        workdir.write_config(
            ADMIN_USER,
            &opts.admin_password,
            certs.as_ref(),
            opts.cluster,
        )?;
        let mut server = RedisServer {
            program,
            child: None,
            workdir,
            port: 0,
            cluster_port: None,
            ca_file: None,
            certs,
            tls_config,
            server_name: opts
                .tls_server_name
                .unwrap_or_else(|| Ipv4Addr::LOCALHOST.to_string()),
            extra_args: opts.extra_args,
            admin_password: opts.admin_password,
            admin: tokio::sync::Mutex::new(None),
            users: std::sync::Mutex::new(Vec::new()),
        };
        if server.certs.is_some() {
            server.ca_file = Some(server.workdir.ca());
        }

        let mut attempt = 0;
        loop {
            attempt += 1;
            let ports = free_ports(if opts.cluster { 2 } else { 1 })?;
            server.port = ports[0];
            server.cluster_port = ports.get(1).copied();
            if attempt > 1 {
                // A failed attempt may have written nodes.conf naming its ports; start afresh.
                server.workdir.remove_nodes_conf()?;
            }
            server.spawn()?;
            match server.wait_ready().await {
                Ok(()) => return Ok(server),
                Err(e) if attempt < BIND_ATTEMPTS && is_addr_in_use(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The port clients connect to (the TLS port when TLS is on).
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The cluster bus port of a cluster node (`None` unless `RedisOptions::cluster`).
    pub fn cluster_port(&self) -> Option<u16> {
        self.cluster_port
    }
    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
    /// Whether clients must speak TLS.
    pub fn tls(&self) -> bool {
        self.certs.is_some()
    }
    /// PEM file of the CA that signed the server certificate (`None` without TLS).
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }
    /// PEM of the CA that signed the server certificate (`None` without TLS).
    pub fn ca_pem(&self) -> Option<&str> {
        self.certs.as_ref().map(|c| c.ca_pem.as_str())
    }
    /// The generated certificates (`None` without TLS).
    pub fn certs(&self) -> Option<&DevCerts> {
        self.certs.as_ref()
    }
    /// The name the fixture's connections verify the certificate as and send as SNI.
    pub fn tls_server_name(&self) -> &str {
        &self.server_name
    }
    /// Client TLS configuration trusting only the dev CA (`None` without TLS).
    pub fn tls_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls_config.clone()
    }
    /// The server's private temporary directory.
    pub fn dir(&self) -> &Path {
        self.workdir.path()
    }
    /// The process id while running (`None` after `kill`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }
    /// The admin user's password. A secret: for tests that must authenticate as admin.
    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    /// A new, unauthenticated client connection (TLS verified as `tls_server_name` when TLS
    /// is on).
    pub async fn connect(&self) -> Result<RespConn, DevError> {
        match &self.tls_config {
            Some(config) => {
                RespConn::connect_tls(self.addr(), config.clone(), &self.server_name).await
            }
            None => RespConn::connect_plain(self.addr()).await,
        }
    }

    /// Stops the server with SIGKILL through the child handle and waits for it to exit.
    pub async fn kill(&mut self) -> Result<(), DevError> {
        *self.admin.get_mut() = None;
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts the same server again on the same port with the same certificates, waits until
    /// it is ready, and re-creates the users added with `acl_setuser` since start.
    pub async fn restart(&mut self) -> Result<(), DevError> {
        self.kill().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.spawn()?;
            match self.wait_ready().await {
                Ok(()) => break,
                Err(e) if attempt < BIND_ATTEMPTS && is_addr_in_use(&e) => {
                    tokio::time::sleep(REBIND_DELAY).await
                }
                Err(e) => return Err(e),
            }
        }
        let users = lock(&self.users).clone();
        for (name, password) in &users {
            self.setuser(name, password).await?;
        }
        Ok(())
    }

    fn spawn(&mut self) -> Result<(), DevError> {
        let stdio = self.workdir.fresh_logs()?;
        let port = self.port.to_string();
        let mut cmd = Command::new(&self.program);
        cmd.arg(self.workdir.conf());
        if self.tls() {
            cmd.args(["--port", "0", "--tls-port", &port]);
        } else {
            cmd.args(["--port", &port]);
        }
        if let Some(cluster_port) = self.cluster_port {
            cmd.args(["--cluster-port", &cluster_port.to_string()]);
        }
        cmd.args(&self.extra_args)
            .current_dir(self.workdir.path())
            .stdin(Stdio::null())
            .stdout(stdio.try_clone()?)
            .stderr(stdio)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DevError::RedisServerMissing {
                path: self.program.display().to_string(),
            },
            _ => DevError::Spawn(e),
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// Polls until an admin connection can AUTH and PING, caching that connection. Fails as
    /// soon as the child exits (each probe races its exit), and after `READY_TIMEOUT` otherwise
    /// (killing the child).
    async fn wait_ready(&mut self) -> Result<(), DevError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        // Held locally so a probe (which borrows `self`) can race `wait`; put back on success.
        let Some(mut child) = self.child.take() else {
            return Err(DevError::NotRunning);
        };
        loop {
            let probe = tokio::time::timeout(PROBE_TIMEOUT, self.admin_connect());
            let last = tokio::select! {
                status = child.wait() => {
                    let status = status?;
                    return Err(self.not_ready(format!("redis-server exited ({status})")));
                }
                probe = probe => match probe {
                    Ok(Ok(conn)) => {
                        *self.admin.get_mut() = Some(conn);
                        self.child = Some(child);
                        return Ok(());
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "probe timed out".to_owned(),
                },
            };
            if Instant::now() >= deadline {
                child.kill().await?;
                let reason = format!("no answer within {READY_TIMEOUT:?}; last probe: {last}");
                return Err(self.not_ready(reason));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    fn not_ready(&self, reason: String) -> DevError {
        let log_tail = self.workdir.log_tail();
        // Redis echoes a rejected config line, which may be the admin user's line.
        let users = lock(&self.users).clone();
        let mut secrets: Vec<&str> = users.iter().map(|(_, pw)| pw.as_str()).collect();
        secrets.push(&self.admin_password);
        redact(DevError::NotReady { reason, log_tail }, &secrets)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // Best effort: kill_on_drop would do the same when the handle drops just after.
            let _ = child.start_kill();
        }
    }
}

/// `count` distinct ports the kernel just handed out on 127.0.0.1 (all listeners are held
/// until the last is bound, so they differ). Another process may take one before
/// redis-server binds; callers retry on "Address already in use".
fn free_ports(count: usize) -> Result<Vec<u16>, DevError> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn is_addr_in_use(err: &DevError) -> bool {
    matches!(err, DevError::NotReady { log_tail, .. } if log_tail.contains("Address already in use"))
}
