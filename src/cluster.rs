//! OSS cluster support (`--cluster-mode`). Azure Managed Redis with the OSS clustering policy
//! tells clients the addresses of its shards (`10.x.y.z:85xx`, internal and TLS-only) in
//! `CLUSTER SLOTS`/`SHARDS`/`NODES` and in `-MOVED`/`-ASK` redirections. The proxy gives each
//! such node a local listener and rewrites every address it forwards to that listener's, so
//! cluster-aware clients follow the topology through the proxy without knowing it is there.
//!
//! - [`Cluster`] is the node registry: upstream address → local listener, ports taken from
//!   `--cluster-ports`, listeners handed to the accept loops (`server.rs`) through a channel,
//!   retired once a node has left the topology and its clients have gone.
//! - `rewrite.rs`: the address rewriting of replies, pure functions over whole frames.
//! - `refresh.rs`: the background task that reads `CLUSTER NODES` at start and then
//!   periodically (and soon after a redirection names an unknown node), so listeners exist
//!   before clients are told about them.
//!
//! Every node connection is a normal session: authenticated, re-authenticated at rotations,
//! its TLS certificate checked against (and its SNI set to) the configured server name.

pub mod refresh;
pub mod rewrite;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::session::Target;
use crate::upstream::Connector;
pub use rewrite::{Local, Remap, Rewriter, Topology};

/// Whether the proxy treats the upstream as an OSS cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterMode {
    /// Rewrite addresses and run the topology refresh once the upstream reports
    /// `cluster_enabled:1`; a non-clustered upstream is served as is.
    Auto,
    /// Always; an upstream that is not a cluster is reported as an error.
    On,
    /// Never: replies are forwarded untouched.
    Off,
}

impl ClusterMode {
    /// As the configuration spells it.
    pub fn name(self) -> &'static str {
        match self {
            ClusterMode::Auto => "auto",
            ClusterMode::On => "on",
            ClusterMode::Off => "off",
        }
    }
}

/// Local ports for node listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    /// Ports `first..=last`, handed out in turn so a port is reused as late as possible.
    Range(u16, u16),
    /// Whatever the kernel gives (`--cluster-ports 0`; tests).
    Any,
}

impl Ports {
    pub fn parse(s: &str) -> Result<Ports, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Ports::Any);
        }
        let bad = || format!("{s:?} is not FIRST-LAST (e.g. 6380-6479) or 0");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let a: u16 = a.trim().parse().map_err(|_| bad())?;
        let b: u16 = b.trim().parse().map_err(|_| bad())?;
        if a == 0 || a > b {
            return Err(bad());
        }
        Ok(Ports::Range(a, b))
    }

    /// The default: the 100 ports after the listen port, or kernel-chosen ones when the
    /// listen port is itself kernel-chosen.
    pub fn after(listen_port: u16) -> Ports {
        if listen_port == 0 {
            return Ports::Any;
        }
        let first = listen_port.saturating_add(1);
        Ports::Range(first, listen_port.saturating_add(100).max(first))
    }
}

impl std::fmt::Display for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ports::Range(a, b) => write!(f, "{a}-{b}"),
            Ports::Any => f.write_str("0"),
        }
    }
}

/// Most nodes at once that only a redirection named, waiting for a topology read to list
/// them: a scale-out adds a few; more is a client naming addresses of its choice.
const UNLISTED_MAX: usize = 8;

/// A listener for one node, for the accept loops to serve until `stop` is cancelled.
pub struct NodeListener {
    pub listener: tokio::net::TcpListener,
    pub target: Arc<Target>,
    pub stop: CancellationToken,
}

/// One upstream node and its local listener.
struct Node {
    local: Local,
    target: Arc<Target>,
    stop: CancellationToken,
    /// Absent from the last topology read: retired once no client uses it.
    vanished: bool,
    /// Listed by a topology read of the proxy's own (not only named by a redirection, which
    /// a client can forge): what lets its clients connect.
    in_topology: tokio::sync::watch::Sender<bool>,
}

struct Registry {
    /// By upstream `host:port`.
    nodes: HashMap<String, Node>,
    /// Next port of the range to try.
    cursor: u16,
}

/// The node registry, shared by every session of a clustered upstream.
pub struct Cluster {
    mode: ClusterMode,
    listen_ip: IpAddr,
    /// The host written into rewritten replies (`--cluster-announce-host`, else the listen
    /// address).
    announce: Arc<str>,
    ports: Ports,
    /// For node connections: the main connector with another address.
    connector: Connector,
    /// The host of the configured upstream: the origin of its connections' replies and of
    /// the topology reads.
    seed: Arc<str>,
    tls: bool,
    /// Node listeners multiplex their clients (`--multiplex`).
    multiplex: bool,
    multiplex_max_batches: usize,
    multiplex_consolidate: bool,
    registry: Mutex<Registry>,
    listeners: mpsc::UnboundedSender<NodeListener>,
    /// Wakes the refresh task early (a redirection named a node not seen before).
    pub(crate) refresh_now: Notify,
    /// For the rewriters of node sessions, which map through this registry.
    me: std::sync::Weak<Cluster>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("mode", &self.mode)
            .field("announce", &self.announce)
            .field("ports", &self.ports)
            .finish_non_exhaustive()
    }
}

/// How node connections are made and served.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeOptions {
    /// The upstream speaks TLS (nodes' `tls-port` is the one to use).
    pub tls: bool,
    /// `--multiplex`: node listeners share upstream connections like the main one.
    pub multiplex: bool,
    /// `--multiplex-max-batches`.
    pub multiplex_max_batches: usize,
    /// `--multiplex-consolidate`, with more than one session thread.
    pub multiplex_consolidate: bool,
}

impl Cluster {
    /// A registry handing node listeners to `listeners`' receiver (the accept loops).
    pub fn new(
        mode: ClusterMode,
        listen_ip: IpAddr,
        announce: Option<&str>,
        ports: Ports,
        connector: Connector,
        nodes: NodeOptions,
        listeners: mpsc::UnboundedSender<NodeListener>,
    ) -> Arc<Cluster> {
        let announce: Arc<str> = match (announce, listen_ip) {
            (Some(host), _) => host.into(),
            (None, ip) if ip.is_unspecified() => "127.0.0.1".into(),
            (None, ip) => ip.to_string().into(),
        };
        let cursor = match ports {
            Ports::Range(first, _) => first,
            Ports::Any => 0,
        };
        let seed: Arc<str> = match crate::config::split_host_port(connector.addr()) {
            Ok((host, _)) => host.into(),
            Err(_) => connector.addr().into(),
        };
        Arc::new_cyclic(|me| Cluster {
            seed,
            me: me.clone(),
            mode,
            listen_ip,
            announce,
            ports,
            connector,
            tls: nodes.tls,
            multiplex: nodes.multiplex,
            multiplex_max_batches: nodes.multiplex_max_batches,
            multiplex_consolidate: nodes.multiplex_consolidate,
            registry: Mutex::new(Registry {
                nodes: HashMap::new(),
                cursor,
            }),
            listeners,
            refresh_now: Notify::new(),
        })
    }

    pub fn mode(&self) -> ClusterMode {
        self.mode
    }

    /// The host of the configured upstream.
    pub fn seed_host(&self) -> &str {
        &self.seed
    }

    /// The rewriter for connections to the node at `origin_host`; it maps addresses through
    /// this registry.
    pub fn rewriter(&self, origin_host: &str) -> Option<Rewriter> {
        Some(Rewriter {
            map: self.me.upgrade()?,
            origin: origin_host.into(),
            tls: self.tls,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves the map consistent (every change is one
        // insert or remove), so a poisoned lock is still usable.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Node listeners open now.
    pub fn len(&self) -> usize {
        self.lock().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The topology now holds exactly `present` (upstream `host:port`s): listeners are
    /// opened for new nodes, and those of nodes no longer listed close once their clients
    /// have gone (a node listed again is kept).
    pub fn update(&self, present: &[(String, u16)]) {
        for (host, port) in present {
            if self.register(host, *port, false).is_none() {
                tracing::error!(node = %rewrite::join(host, *port), ports = %self.ports, "no local port free for a cluster node; clients sent to it will get an error");
            }
        }
        let keep: std::collections::HashSet<String> =
            present.iter().map(|(h, p)| rewrite::join(h, *p)).collect();
        let mut reg = self.lock();
        for (addr, node) in reg.nodes.iter_mut() {
            if !keep.contains(addr) && !node.vanished {
                tracing::info!(node = %addr, local = node.local.port, "cluster node left the topology; its listener closes once its clients have gone");
                node.vanished = true;
            }
        }
        self.retire(&mut reg);
    }

    /// Closes the listeners of vanished nodes nobody uses any more.
    fn retire(&self, reg: &mut Registry) {
        reg.nodes.retain(|addr, node| {
            let idle = node.target.clients.load(Ordering::Relaxed) == 0;
            if node.vanished && idle {
                tracing::info!(node = %addr, local = node.local.port, "cluster node listener closed");
                node.stop.cancel();
                return false;
            }
            true
        });
        metrics::gauge!(crate::metrics::CLUSTER_NODES).set(reg.nodes.len() as f64);
    }

    /// Binds a listener for a new node: the next free port of the range, or any port.
    fn bind(&self, reg: &mut Registry) -> Option<std::net::TcpListener> {
        let taken: std::collections::HashSet<u16> =
            reg.nodes.values().map(|n| n.local.port).collect();
        let candidates: Box<dyn Iterator<Item = u16>> = match self.ports {
            Ports::Any => Box::new(std::iter::once(0)),
            Ports::Range(first, last) => {
                let start = reg.cursor.clamp(first, last);
                Box::new((start..=last).chain(first..start))
            }
        };
        for port in candidates {
            if port != 0 && taken.contains(&port) {
                continue;
            }
            match std::net::TcpListener::bind(SocketAddr::new(self.listen_ip, port)) {
                Ok(l) => {
                    if let Ports::Range(first, last) = self.ports {
                        reg.cursor = if port >= last { first } else { port + 1 };
                    }
                    return Some(l);
                }
                Err(e) => {
                    tracing::debug!(port, error = %e, "cluster node listener: port not available")
                }
            }
        }
        None
    }
}

impl Remap for Cluster {
    /// A reply names the node: a node not seen before means the topology changed, so it is
    /// read again soon.
    fn local(&self, host: &str, port: u16) -> Option<Local> {
        self.register(host, port, true)
    }
}

impl Cluster {
    /// The local address of a node, opening a listener for it if it has none. `reread`: a
    /// reply named it, so ask the refresh task for the whole topology when the node is new;
    /// otherwise a topology read listed it, and its clients may connect.
    fn register(&self, host: &str, port: u16, reread: bool) -> Option<Local> {
        let addr = rewrite::join(host, port);
        let mut reg = self.lock();
        if let Some(node) = reg.nodes.get_mut(&addr) {
            node.vanished = false;
            if !reread {
                node.in_topology.send_replace(true);
            }
            return Some(node.local.clone());
        }
        if reread {
            let unlisted = (reg.nodes.values())
                .filter(|n| !*n.in_topology.borrow())
                .count();
            if unlisted >= UNLISTED_MAX {
                // Redirections to addresses no topology read lists (a script can answer any
                // MOVED) must not take every port of the range.
                tracing::warn!(node = %addr, "a redirection names a node no topology read lists, and {UNLISTED_MAX} such wait already: no listener for it");
                return None;
            }
        }
        let std_listener = self.bind(&mut reg)?;
        let local_port = std_listener.local_addr().ok()?.port();
        let listener = std_listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(std_listener));
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(node = %addr, error = %e, "cluster node listener cannot be registered");
                return None;
            }
        };
        let local = Local {
            host: self.announce.clone(),
            port: local_port,
        };
        let (in_topology, listed) = tokio::sync::watch::channel(!reread);
        let target = Arc::new(Target {
            // Redis writes IPv6 addresses without brackets; a socket address needs them.
            connector: self.connector.with_addr(if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                addr.clone()
            }),
            pool: None,
            rewriter: Some(self.rewriter(host)?),
            clients: AtomicUsize::new(0),
            mux: self.multiplex.then(|| {
                crate::mux::Routers::new(self.multiplex_max_batches, self.multiplex_consolidate)
            }),
            in_topology: Some(listed),
        });
        let stop = CancellationToken::new();
        let listener = NodeListener {
            listener,
            target: target.clone(),
            stop: stop.clone(),
        };
        if self.listeners.send(listener).is_err() {
            // The accept loops are gone: the proxy is shutting down.
            return None;
        }
        tracing::info!(node = %addr, local = %rewrite::join(&self.announce, local_port), "cluster node listener opened");
        reg.nodes.insert(
            addr,
            Node {
                local: local.clone(),
                target,
                stop,
                vanished: false,
                in_topology,
            },
        );
        metrics::gauge!(crate::metrics::CLUSTER_NODES).set(reg.nodes.len() as f64);
        if reread {
            self.refresh_now.notify_one();
        }
        Some(local)
    }
}

#[cfg(test)]
mod tests;
