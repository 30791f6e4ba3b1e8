//! `RedisCluster`: N TLS redis-server primaries on 127.0.0.1 formed into one Redis Cluster,
//! standing in for Azure Managed Redis with the OSS cluster policy, where clients see every
//! node's own address in `CLUSTER SLOTS`/`SHARDS`/`NODES` and in `-MOVED`/`-ASK` errors.
//!
//! All nodes share one CA and one certificate whose only name is `server_name` (no IP SAN):
//! as with AMR, every node is reached at its own address but verified as the one host name,
//! so a client that verified against the address it dialled would fail. The fixture's own
//! connections verify `server_name` too.
//!
//! Owns: starting the nodes (each a `RedisServer`, which owns its process and directory),
//! forming the cluster without redis-cli (slots, epochs, `CLUSTER MEET`), waiting until every
//! node agrees, cluster-wide ACL users (remembered, so a node joining later gets them) and slot
//! lookups. `cluster/state.rs` reads the nodes' replies, `cluster/reshard.rs` moves slots with
//! redis-cli, `cluster/membership.rs` adds and removes primaries while the cluster runs,
//! `cluster/keyslot.rs` hashes keys.

mod keyslot;
mod membership;
mod reshard;
mod state;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

pub use keyslot::key_slot;
use state::{info_unsettled, nodes_unsettled, parse_info, parse_slots, SlotRange};

use super::{random_hex, DevCerts, DevError, RedisOptions, RedisServer, Reply, RespConn};

/// How many hash slots a Redis Cluster has.
pub const CLUSTER_SLOTS: u16 = 16384;
/// The admin user `RedisServer` creates on every node.
const ADMIN_USER: &str = "admin";
/// Most primaries a fixture may ask for: each is a process, and a test wanting more than this
/// is more likely a mistake than a need.
const MAX_PRIMARIES: usize = 16;
/// Default `cluster-node-timeout`: short so a test that stops a node sees the cluster notice
/// within seconds, long enough that a loaded 2-core CI machine does not mark a busy node
/// failing.
const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(3000);
/// Bound on a cluster settling (after forming or a reshard). Forming takes about two seconds:
/// the nodes meet within ~100 ms, but a primary keeps reporting `cluster_state:fail` for
/// 2 s after it starts (Redis's hard-coded `CLUSTER_WRITABLE_DELAY`, so a rebooted primary
/// cannot take writes before the cluster could reconfigure it). Twenty seconds only run out
/// when something is really wrong.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between checks while waiting to settle: the nodes offer no notification, so polling
/// is the only option; short enough to add little latency.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Upper bound on checks while settling, so the loop is bounded in count as well as time.
const MAX_POLLS: u32 = 2000;

/// How to run the stand-in cluster.
#[derive(Clone)]
pub struct ClusterOptions {
    /// Number of primaries (no replicas); the slots are split evenly between them.
    pub primaries: usize,
    /// The only name in the shared certificate (no IP SAN): what clients must verify and
    /// send as SNI whichever node they dial.
    pub server_name: String,
    /// `cluster-node-timeout`.
    pub node_timeout: Duration,
    /// Appended to every node's redis-server command line.
    pub extra_args: Vec<String>,
    /// Password of the `admin` user on every node.
    pub admin_password: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            primaries: 3,
            server_name: "cache.redis.test".to_owned(),
            node_timeout: DEFAULT_NODE_TIMEOUT,
            extra_args: Vec::new(),
            admin_password: random_hex(16),
        }
    }
}

impl std::fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterOptions")
            .field("primaries", &self.primaries)
            .field("server_name", &self.server_name)
            .field("node_timeout", &self.node_timeout)
            .field("extra_args", &self.extra_args)
            .field("admin_password", &"<redacted>")
            .finish()
    }
}

/// One member of the cluster.
#[derive(Clone)]
struct Member {
    server: Arc<RedisServer>,
    /// Its `CLUSTER MYID`.
    id: String,
}

/// A formed Redis Cluster of TLS primaries on 127.0.0.1. Dropping it kills every node.
///
/// Membership can change while it runs (`add_primary`, `remove_primary`), as when Azure scales
/// a cache: every API taking `&self` reads the members as they are at that moment.
pub struct RedisCluster {
    /// The members, in the order every index of this API refers to. Changed only under
    /// `membership`; read as clones, so no lock on it is ever held across an await.
    members: RwLock<Vec<Member>>,
    /// Node 0, never removed: the cluster was formed around it, and its directory holds the CA
    /// file handed to clients (`ca_file`), which must outlive any other node.
    seed: Arc<RedisServer>,
    /// How every node is started, so a node added later has the same CA, certificate, admin
    /// password and command line as the first ones.
    node_options: RedisOptions,
    server_name: String,
    /// Held for the whole of a membership change, so two changes never interleave.
    membership: tokio::sync::Mutex<()>,
    /// `(name, password)` of the users `acl_setuser` created and `acl_deluser` has not deleted,
    /// in order: what a node joining later is given. Held while a change is applied to the
    /// nodes, and while a joining node is given the users and becomes a member, so a user
    /// change and a join never interleave and every member ends up with every user.
    users: tokio::sync::Mutex<Vec<(String, String)>>,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Addresses and ids only: the users' passwords are tokens.
        f.debug_struct("RedisCluster")
            .field("addrs", &self.addrs())
            .field("ids", &self.node_ids())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl RedisCluster {
    /// Starts `opts.primaries` nodes sharing one fresh CA and certificate, gives each an even
    /// share of the slots, introduces them to node 0, and returns once every node reports the
    /// cluster healthy with all slots served and agrees with the others on who serves which.
    pub async fn start(opts: ClusterOptions) -> Result<RedisCluster, DevError> {
        if !(1..=MAX_PRIMARIES).contains(&opts.primaries) {
            return Err(DevError::Cluster(format!(
                "{} primaries asked for; 1 to {MAX_PRIMARIES} supported",
                opts.primaries
            )));
        }
        let certs = DevCerts::generate_for_cluster(&[opts.server_name.as_str()], &[])?;
        let mut extra_args = vec![
            "--cluster-node-timeout".to_owned(),
            opts.node_timeout.as_millis().to_string(),
            // Primaries only: no replica may wander to a primary that lost its slots.
            "--cluster-allow-replica-migration".to_owned(),
            "no".to_owned(),
        ];
        extra_args.extend(opts.extra_args);
        let node_options = RedisOptions {
            tls: true,
            dns_names: vec![opts.server_name.clone()],
            extra_args,
            admin_password: opts.admin_password,
            certs: Some(certs),
            tls_server_name: Some(opts.server_name.clone()),
            cluster: true,
        };
        let mut members = Vec::with_capacity(opts.primaries);
        for _ in 0..opts.primaries {
            let server = Arc::new(RedisServer::start(node_options.clone()).await?);
            let id = bulk_text(server.command(&[b"CLUSTER", b"MYID"]).await?)?;
            members.push(Member { server, id });
        }
        let cluster = RedisCluster {
            seed: members[0].server.clone(),
            members: RwLock::new(members),
            node_options,
            server_name: opts.server_name,
            membership: tokio::sync::Mutex::new(()),
            users: tokio::sync::Mutex::new(Vec::new()),
        };
        cluster.form().await?;
        Ok(cluster)
    }

    async fn form(&self) -> Result<(), DevError> {
        let nodes = self.nodes();
        let count = nodes.len();
        for (i, node) in nodes.iter().enumerate() {
            // Distinct epochs from the start: nodes that all claim epoch 0 would settle the
            // collision one gossip round at a time.
            let epoch = (i + 1).to_string();
            expect_ok(
                node.command(&[b"CLUSTER", b"SET-CONFIG-EPOCH", epoch.as_bytes()])
                    .await?,
            )?;
            let first = (i * usize::from(CLUSTER_SLOTS) / count).to_string();
            let last = ((i + 1) * usize::from(CLUSTER_SLOTS) / count - 1).to_string();
            let args: [&[u8]; 4] = [
                b"CLUSTER",
                b"ADDSLOTSRANGE",
                first.as_bytes(),
                last.as_bytes(),
            ];
            expect_ok(node.command(&args).await?)?;
        }
        for node in &nodes[1..] {
            meet(&self.seed, node).await?;
        }
        self.wait_settled("forming").await
    }

    /// Polls every node until all report a healthy cluster with all slots served, no slot in
    /// migration, and the same slot map (bounded by `SETTLE_TIMEOUT` and `MAX_POLLS`).
    async fn wait_settled(&self, phase: &str) -> Result<(), DevError> {
        let nodes = self.nodes();
        poll_settled(phase, || unsettled_among(&nodes)).await
    }

    fn read_members(&self) -> std::sync::RwLockReadGuard<'_, Vec<Member>> {
        // Every change is one push or remove: a panic elsewhere leaves the list consistent.
        self.members.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_members(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Member>> {
        self.members.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn member(&self, index: usize) -> Result<Member, DevError> {
        let members = self.read_members();
        members.get(index).cloned().ok_or_else(|| {
            DevError::Cluster(format!("no node {index} in a cluster of {}", members.len()))
        })
    }

    /// The nodes now, in the order every index in this API refers to (a snapshot: a node
    /// added or removed afterwards changes the next call's answer, not this one).
    pub fn nodes(&self) -> Vec<Arc<RedisServer>> {
        self.read_members()
            .iter()
            .map(|m| m.server.clone())
            .collect()
    }
    /// Node `index`, or an error naming the bad index.
    pub fn node(&self, index: usize) -> Result<Arc<RedisServer>, DevError> {
        self.member(index).map(|m| m.server)
    }
    /// The nodes' TLS addresses: the internal addresses a client of the proxy must never see.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.read_members()
            .iter()
            .map(|m| m.server.addr())
            .collect()
    }
    /// The nodes' cluster ids (`CLUSTER MYID`), in node order.
    pub fn node_ids(&self) -> Vec<String> {
        self.read_members().iter().map(|m| m.id.clone()).collect()
    }
    /// Node `index`'s cluster id, or an error naming the bad index.
    pub fn node_id(&self, index: usize) -> Result<String, DevError> {
        self.member(index).map(|m| m.id)
    }
    /// PEM file of the CA that signed the shared node certificate.
    pub fn ca_file(&self) -> &Path {
        self.seed.ca_file().expect("cluster nodes always run TLS")
    }
    /// PEM of the CA that signed the shared node certificate.
    pub fn ca_pem(&self) -> &str {
        self.seed.ca_pem().expect("cluster nodes always run TLS")
    }
    /// Client TLS configuration trusting only the dev CA; verify as `server_name`.
    pub fn tls_config(&self) -> Arc<rustls::ClientConfig> {
        self.seed
            .tls_config()
            .expect("cluster nodes always run TLS")
    }
    /// The only name in the node certificate.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }
    /// The admin user's password on every node. A secret: for tests that must authenticate
    /// as admin.
    pub fn admin_password(&self) -> &str {
        self.seed.admin_password()
    }

    /// A new, unauthenticated TLS connection to node `index`, verified as `server_name`.
    pub async fn connect(&self, index: usize) -> Result<RespConn, DevError> {
        self.node(index)?.connect().await
    }

    /// Runs one command as admin on node `index` (see `RedisServer::command`); error replies,
    /// `-MOVED` included, come back as `Reply::Error`.
    pub async fn command(&self, index: usize, args: &[&[u8]]) -> Result<Reply, DevError> {
        self.node(index)?.command(args).await
    }

    /// `ACL SETUSER` on every node (see `RedisServer::acl_setuser`), in node order; remembered,
    /// so a node added later by `add_primary` gets the user too.
    pub async fn acl_setuser(&self, name: &str, password: &str) -> Result<(), DevError> {
        let mut users = self.users.lock().await;
        for node in self.nodes() {
            node.acl_setuser(name, password).await?;
        }
        users.push((name.to_owned(), password.to_owned()));
        Ok(())
    }

    /// `ACL DELUSER` on every node: each closes the connections authenticated as `name`. Tries
    /// every node even if one fails (a user left behind would keep connections open), then
    /// reports the first failure.
    pub async fn acl_deluser(&self, name: &str) -> Result<(), DevError> {
        let mut users = self.users.lock().await;
        users.retain(|(user, _)| user != name);
        let mut failed = None;
        for node in self.nodes() {
            if let Err(e) = node.acl_deluser(name).await {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// The index of the node serving each slot (16384 entries), as every node's
    /// `CLUSTER SLOTS` says; an error if the nodes disagree or a slot is unserved.
    pub async fn slot_owners(&self) -> Result<Vec<usize>, DevError> {
        let nodes = self.nodes();
        let mut agreed: Option<Vec<SlotRange>> = None;
        for (i, node) in nodes.iter().enumerate() {
            let map = parse_slots(node.command(&[b"CLUSTER", b"SLOTS"]).await?)?;
            match &agreed {
                Some(first) if *first != map => {
                    return Err(DevError::Cluster(format!(
                        "node {i} disagrees with node 0 on the slots"
                    )))
                }
                Some(_) => {}
                None => agreed = Some(map),
            }
        }
        let mut owners = vec![None; usize::from(CLUSTER_SLOTS)];
        for range in agreed.unwrap_or_default() {
            let owner = nodes
                .iter()
                .position(|n| n.port() == range.port)
                .ok_or_else(|| {
                    DevError::Cluster(format!("CLUSTER SLOTS names unknown port {}", range.port))
                })?;
            for slot in range.start..=range.end {
                owners[usize::from(slot)] = Some(owner);
            }
        }
        owners
            .iter()
            .enumerate()
            .map(|(slot, owner)| {
                owner.ok_or_else(|| DevError::Cluster(format!("slot {slot} is not served")))
            })
            .collect()
    }

    /// The index of the node serving `slot`.
    pub async fn slot_owner(&self, slot: u16) -> Result<usize, DevError> {
        let owners = self.slot_owners().await?;
        owners
            .get(usize::from(slot))
            .copied()
            .ok_or_else(|| DevError::Cluster(format!("no slot {slot}")))
    }

    /// The index of the node serving `key`'s slot.
    pub async fn key_owner(&self, key: &[u8]) -> Result<usize, DevError> {
        self.slot_owner(key_slot(key)).await
    }
}

/// `CLUSTER MEET` on `seed` for `node`'s client and bus ports.
async fn meet(seed: &RedisServer, node: &RedisServer) -> Result<(), DevError> {
    let port = node.port().to_string();
    let bus = node
        .cluster_port()
        .expect("cluster nodes have a bus port")
        .to_string();
    let args: [&[u8]; 5] = [
        b"CLUSTER",
        b"MEET",
        b"127.0.0.1",
        port.as_bytes(),
        bus.as_bytes(),
    ];
    expect_ok(seed.command(&args).await?)
}

/// Polls `check` until it finds nothing unsettled (bounded by `SETTLE_TIMEOUT` and
/// `MAX_POLLS`); the error quotes the last reason.
async fn poll_settled<F, Fut>(phase: &str, mut check: F) -> Result<(), DevError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>, DevError>>,
{
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut last = String::new();
    for _ in 0..MAX_POLLS {
        match check().await {
            Ok(None) => return Ok(()),
            Ok(Some(why)) => last = why,
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    Err(DevError::Cluster(format!(
        "{phase}: not settled within {SETTLE_TIMEOUT:?}; last check: {last}"
    )))
}

/// Why `nodes` are not settled yet as a cluster of exactly those nodes, or `None` once they
/// are.
async fn unsettled_among(nodes: &[Arc<RedisServer>]) -> Result<Option<String>, DevError> {
    let count = nodes.len();
    let mut first_map: Option<Vec<SlotRange>> = None;
    for (i, node) in nodes.iter().enumerate() {
        let info = bulk_text(node.command(&[b"CLUSTER", b"INFO"]).await?)?;
        if let Some(why) = info_unsettled(&parse_info(&info), count) {
            return Ok(Some(format!("node {i}: {why}")));
        }
        let text = bulk_text(node.command(&[b"CLUSTER", b"NODES"]).await?)?;
        if let Some(why) = nodes_unsettled(&text, count) {
            return Ok(Some(format!("node {i}: {why}")));
        }
        let map = parse_slots(node.command(&[b"CLUSTER", b"SLOTS"]).await?)?;
        match &first_map {
            None => first_map = Some(map),
            Some(first) if *first != map => {
                return Ok(Some(format!("node {i} disagrees with node 0 on the slots")))
            }
            Some(_) => {}
        }
    }
    Ok(None)
}

fn bulk_text(reply: Reply) -> Result<String, DevError> {
    match reply {
        Reply::Bulk(Some(text)) => Ok(String::from_utf8_lossy(&text).into_owned()),
        // CLUSTER MYID and friends are bulk strings; RESP2 never makes them verbatim.
        Reply::Simple(text) => Ok(text),
        Reply::Error(e) => Err(DevError::Reply(e)),
        other => Err(DevError::Protocol(format!("expected text, got {other:?}"))),
    }
}

fn expect_ok(reply: Reply) -> Result<(), DevError> {
    match reply {
        Reply::Simple(s) if s == "OK" => Ok(()),
        Reply::Error(e) => Err(DevError::Reply(e)),
        other => Err(DevError::Protocol(format!("expected +OK, got {other:?}"))),
    }
}
