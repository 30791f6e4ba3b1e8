//! The cluster tests' setup: a `devenv::RedisCluster` of TLS primaries with the proxy in
//! front in cluster mode (node listeners on any free port, admin endpoint on), tokens from a
//! `DevTokenSource` registered on every node the cluster has, nodes added later included;
//! and helpers that read the topology through the proxy.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use redis_entra_proxy::cluster::ClusterMode;
use redis_entra_proxy::dev::DevTokenSource;
use redis_entra_proxy::devenv::{key_slot, ClusterOptions, RedisCluster};

use super::token_issuer::Pinger;
use super::{http_get, Proxy, ProxyOptions, Reply, STEP};

/// How to run the cluster and the proxy.
pub struct SetupOptions {
    /// Lifetime of each dev token (its identity is deleted on every node at expiry).
    pub token_lifetime: Duration,
    pub refresh_ratio: f64,
    /// `--cluster-refresh-interval`.
    pub refresh_interval: Duration,
    /// `--multiplex`.
    pub multiplex: bool,
}

impl Default for SetupOptions {
    fn default() -> Self {
        SetupOptions {
            token_lifetime: Duration::from_secs(3600),
            refresh_ratio: 0.75,
            refresh_interval: Duration::from_secs(2),
            multiplex: false,
        }
    }
}

pub struct Setup {
    pub cluster: Arc<RedisCluster>,
    pub proxy: Proxy,
}

impl Setup {
    /// Three primaries, the proxy reading the topology every 2 s.
    pub async fn start(token_lifetime: Duration, refresh_ratio: f64) -> Setup {
        Self::start_with(SetupOptions {
            token_lifetime,
            refresh_ratio,
            ..SetupOptions::default()
        })
        .await
    }

    pub async fn start_with(opts: SetupOptions) -> Setup {
        let cluster = Arc::new(
            RedisCluster::start(ClusterOptions::default())
                .await
                .expect("the cluster forms"),
        );
        let seed = cluster.node(0).expect("node 0");
        let source = Arc::new(DevTokenSource::for_cluster(
            cluster.clone(),
            opts.token_lifetime,
            "oid",
        ));
        let proxy = Proxy::start_on(
            seed.clone(),
            ProxyOptions {
                upstream: Some((
                    seed.addr().to_string(),
                    true,
                    Some(cluster.ca_file().to_path_buf()),
                )),
                server_name: Some(cluster.server_name().to_owned()),
                source: Some(source),
                refresh_ratio: opts.refresh_ratio,
                cluster_mode: Some(ClusterMode::On),
                cluster_refresh_interval: Some(opts.refresh_interval),
                multiplex: opts.multiplex,
                admin: true,
                ..ProxyOptions::default()
            },
        )
        .await;
        Setup { cluster, proxy }
    }

    /// The nodes' own addresses, which clients must never see.
    pub fn internal(&self) -> Vec<String> {
        self.cluster.addrs().iter().map(|a| a.to_string()).collect()
    }

    /// Node id → local address, from CLUSTER SLOTS through the proxy (nodes serving slots).
    pub async fn locals(&self) -> BTreeMap<String, SocketAddr> {
        let mut c = self.proxy.client().await;
        let Reply::Array(Some(ranges)) = c.command(&[b"CLUSTER", b"SLOTS"]).await.unwrap() else {
            panic!("CLUSTER SLOTS is an array");
        };
        let mut locals = BTreeMap::new();
        for range in ranges {
            let Reply::Array(Some(items)) = range else {
                panic!("a slot range is an array")
            };
            for node in &items[2..] {
                let Reply::Array(Some(node)) = node else {
                    panic!("a node is an array")
                };
                let (Reply::Bulk(Some(host)), Reply::Integer(port), Reply::Bulk(Some(id))) =
                    (&node[0], &node[1], &node[2])
                else {
                    panic!("a node is [host, port, id, …]: {node:?}");
                };
                let host = String::from_utf8_lossy(host);
                let addr: SocketAddr = format!("{host}:{port}").parse().unwrap();
                locals.insert(String::from_utf8_lossy(id).into_owned(), addr);
            }
        }
        locals
    }

    /// Node id → address, from CLUSTER NODES through the proxy (every node, with slots or
    /// not), and the whole reply for assertions about what it does not say.
    pub async fn node_lines(&self) -> (BTreeMap<String, SocketAddr>, String) {
        let mut c = self.proxy.client().await;
        let nodes = text(&c.command(&[b"CLUSTER", b"NODES"]).await.unwrap());
        let mut addrs = BTreeMap::new();
        for line in nodes.lines().filter(|l| !l.trim().is_empty()) {
            // <id> <ip:port@cport[,hostname]> <flags> …
            let mut fields = line.split(' ');
            let (Some(id), Some(addr)) = (fields.next(), fields.next()) else {
                panic!("unreadable CLUSTER NODES line {line:?}");
            };
            let addr = addr.split(['@', ',']).next().unwrap_or_default();
            let addr: SocketAddr = addr
                .parse()
                .unwrap_or_else(|e| panic!("{addr:?} in {line:?}: {e}"));
            addrs.insert(id.to_owned(), addr);
        }
        (addrs, nodes)
    }

    /// Asserts `text` names no internal address (host:port or a bare node port).
    pub fn assert_no_internal(&self, what: &str, text: &str) {
        for addr in self.internal() {
            assert!(!text.contains(&addr), "{what} names {addr}: {text}");
        }
    }

    /// The sum of the samples of `name` whose line contains `label`, from the admin endpoint.
    /// The recorder is process-wide: every proxy of the test binary adds to it.
    /// Holds a connection on the local listener of each of `nodes` (counting in a key that
    /// node owns) until every one of them was re-authenticated `rotations` times; none may
    /// end on the way.
    pub async fn ping_through_rotations(&self, nodes: &[usize], rotations: u64) {
        let locals = self.locals().await;
        let mut pingers = Vec::new();
        for &i in nodes {
            let id = self.cluster.node_id(i).expect("node id");
            let key = key_on(&self.cluster, i, "pinger").await;
            pingers.push(Pinger::start_keyed(locals[&id], &key).await);
        }
        let first = pingers[0].user();
        let n: u64 = first.trim_start_matches("oid-").parse().expect("oid-N");
        let target = format!("oid-{}", n + rotations);
        for p in &pingers {
            p.wait_user(&target, STEP * 2).await;
        }
        for p in pingers {
            let state = p.stop().await;
            assert!(state.users.len() as u64 > rotations, "{:?}", state.users);
        }
    }

    /// `CLUSTER SETSLOT <slot> <state> <id>` on node `i`, which must accept it.
    pub async fn setslot(&self, i: usize, slot: u16, state: &str, id: &str) {
        let slot = slot.to_string();
        let args: [&[u8]; 5] = [
            b"CLUSTER",
            b"SETSLOT",
            slot.as_bytes(),
            state.as_bytes(),
            id.as_bytes(),
        ];
        let r = self.cluster.command(i, &args).await.expect("SETSLOT");
        assert_eq!(
            r,
            Reply::Simple("OK".into()),
            "SETSLOT {slot} {state} on node {i}"
        );
    }

    pub async fn metric(&self, name: &str, label: &str) -> f64 {
        let (_, body) = http_get(self.proxy.admin_addr.unwrap(), "/metrics").await;
        sum_metric(&body, name, label)
    }
}

/// The sum of the samples of `name` whose line contains `label` in a Prometheus text body.
pub fn sum_metric(body: &str, name: &str, label: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn text(reply: &Reply) -> String {
    match reply {
        Reply::Simple(s) | Reply::Error(s) => s.clone(),
        Reply::Integer(n) => n.to_string(),
        Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
        Reply::Bulk(None) | Reply::Array(None) => "(nil)".into(),
        Reply::Array(Some(items)) => items.iter().map(text).collect::<Vec<_>>().join(" "),
    }
}

/// A key owned by node `i`.
pub async fn key_on(cluster: &RedisCluster, i: usize, prefix: &str) -> String {
    let owners = cluster.slot_owners().await.unwrap();
    for n in 0..1000 {
        let key = format!("{prefix}:{n}");
        if owners[usize::from(key_slot(key.as_bytes()))] == i {
            return key;
        }
    }
    panic!("no key for node {i}");
}

/// A key in one of `slots` (bounded search).
pub fn key_in(slots: &HashSet<u16>, prefix: &str) -> String {
    for n in 0..1_000_000u32 {
        let key = format!("{prefix}:{n}");
        if slots.contains(&key_slot(key.as_bytes())) {
            return key;
        }
    }
    panic!("no key in {} slots", slots.len());
}
