//! Tests of the cluster fixture itself (no proxy): three TLS primaries on 127.0.0.1 with a
//! hostname-only certificate, formed into one cluster, standing in for Azure Managed Redis
//! with the OSS cluster policy. They fail (not skip) when redis-server or redis-cli is missing,
//! because CI installs both and a silent skip would hide a broken fixture.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_entra_proxy::credentials::TokenSource;
use redis_entra_proxy::dev::DevTokenSource;
use redis_entra_proxy::devenv::{
    key_slot, ClusterOptions, DevError, RedisCluster, RedisOptions, RedisServer, Reply, RespConn,
    CLUSTER_SLOTS,
};

/// Bound on one expected event (a reply, a close) before it counts as a hang.
const STEP: Duration = Duration::from_secs(10);

async fn start() -> RedisCluster {
    let began = Instant::now();
    let cluster = RedisCluster::start(ClusterOptions::default())
        .await
        .unwrap_or_else(|e| panic!("cluster starts: {e}"));
    eprintln!("cluster of 3 formed in {:?}", began.elapsed());
    cluster
}

fn bulk(value: &str) -> Reply {
    Reply::Bulk(Some(value.as_bytes().to_vec()))
}

async fn run(cluster: &RedisCluster, node: usize, args: &[&[u8]]) -> Reply {
    cluster
        .command(node, args)
        .await
        .unwrap_or_else(|e| panic!("command on node {node}: {e}"))
}

/// A key in `slot` for each of `slots`, found by hashing candidate names (bounded search).
fn keys_for_slots(slots: &HashSet<u16>) -> BTreeMap<u16, String> {
    let mut found = BTreeMap::new();
    for n in 0..2_000_000u32 {
        if found.len() == slots.len() {
            break;
        }
        let key = format!("key:{n}");
        let slot = key_slot(key.as_bytes());
        if slots.contains(&slot) {
            found.entry(slot).or_insert(key);
        }
    }
    assert_eq!(found.len(), slots.len(), "a key for every wanted slot");
    found
}

#[tokio::test]
async fn three_primaries_cover_all_slots_on_loopback_with_a_hostname_only_certificate() {
    let cluster = start().await;
    assert_eq!(cluster.nodes().len(), 3);
    let node_ids = cluster.node_ids();
    let ids: HashSet<&String> = node_ids.iter().collect();
    assert_eq!(ids.len(), 3, "distinct node ids");
    assert!(cluster.node_ids().iter().all(|id| id.len() == 40));
    let addrs = cluster.addrs();
    assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    assert_eq!(addrs.iter().collect::<HashSet<_>>().len(), 3);

    let owners = cluster.slot_owners().await.expect("slot owners");
    assert_eq!(owners.len(), usize::from(CLUSTER_SLOTS));
    for node in 0..3 {
        let owned = owners.iter().filter(|o| **o == node).count();
        assert!((5461..=5462).contains(&owned), "node {node} owns {owned}");
    }
    for node in 0..3 {
        let Reply::Bulk(Some(info)) = run(&cluster, node, &[b"CLUSTER", b"INFO"]).await else {
            panic!("CLUSTER INFO is a bulk string");
        };
        let info = String::from_utf8_lossy(&info);
        assert!(info.contains("cluster_state:ok"), "node {node}: {info}");
        assert!(info.contains("cluster_size:3"), "node {node}: {info}");
    }

    // The certificate names only `server_name`: verifying against the address fails, as it
    // would for a client of AMR that checked the address it dialled.
    let tls = cluster.tls_config();
    for addr in addrs {
        let by_ip = RespConn::connect_tls(addr, tls.clone(), "127.0.0.1").await;
        assert!(matches!(by_ip, Err(DevError::Tls(_))), "{by_ip:?}");
        let mut by_name = RespConn::connect_tls(addr, tls.clone(), cluster.server_name())
            .await
            .expect("verified as the server name");
        let reply = by_name
            .command(&[b"PING"])
            .await
            .expect("an answer before AUTH");
        assert!(matches!(reply, Reply::Error(e) if e.starts_with("NOAUTH")));
    }
}

#[tokio::test]
async fn keys_live_on_their_owner_and_other_nodes_redirect_with_moved() {
    let cluster = start().await;
    for key in ["foo", "bar", "{user1000}.following", "", "a{b}c", "x{}y"] {
        let reply = run(&cluster, 0, &[b"CLUSTER", b"KEYSLOT", key.as_bytes()]).await;
        assert_eq!(
            reply,
            Reply::Integer(i64::from(key_slot(key.as_bytes()))),
            "{key:?}"
        );
    }

    let owner = cluster.key_owner(b"foo").await.expect("owner of foo");
    assert_eq!(
        run(&cluster, owner, &[b"SET", b"foo", b"bar"]).await,
        Reply::Simple("OK".into())
    );
    assert_eq!(run(&cluster, owner, &[b"GET", b"foo"]).await, bulk("bar"));
    let owner_port = cluster.addrs()[owner].port();
    for other in (0..3).filter(|n| *n != owner) {
        assert_eq!(
            run(&cluster, other, &[b"GET", b"foo"]).await,
            Reply::Error(format!("MOVED 12182 127.0.0.1:{owner_port}")),
            "node {other}"
        );
    }
}

#[tokio::test]
async fn reshard_moves_slots_with_their_keys() {
    let cluster = start().await;
    let before = cluster.slot_owners().await.expect("slot owners");
    // Keys in the first 150 and last 50 of node 0's slots, wherever redis-cli takes from.
    let mine: Vec<u16> = (0..CLUSTER_SLOTS)
        .filter(|s| before[usize::from(*s)] == 0)
        .collect();
    let wanted: HashSet<u16> = mine[..150]
        .iter()
        .chain(&mine[mine.len() - 50..])
        .copied()
        .collect();
    let keys = keys_for_slots(&wanted);
    for key in keys.values() {
        let reply = run(&cluster, 0, &[b"SET", key.as_bytes(), key.as_bytes()]).await;
        assert_eq!(reply, Reply::Simple("OK".into()), "{key}");
    }

    let began = Instant::now();
    cluster.reshard(0, 1, 100).await.expect("reshard");
    eprintln!("resharded 100 slots in {:?}", began.elapsed());

    let after = cluster.slot_owners().await.expect("slot owners");
    let moved: Vec<usize> = (0..before.len())
        .filter(|s| before[*s] != after[*s])
        .collect();
    assert_eq!(moved.len(), 100);
    assert!(moved.iter().all(|s| before[*s] == 0 && after[*s] == 1));
    let node1_port = cluster.addrs()[1].port();
    let mut moved_keys = 0;
    for (slot, key) in &keys {
        let owner = after[usize::from(*slot)];
        let value = run(&cluster, owner, &[b"GET", key.as_bytes()]).await;
        assert_eq!(value, bulk(key), "{key} on node {owner}");
        if owner == 1 {
            moved_keys += 1;
            assert_eq!(
                run(&cluster, 0, &[b"GET", key.as_bytes()]).await,
                Reply::Error(format!("MOVED {slot} 127.0.0.1:{node1_port}"))
            );
        }
    }
    assert!(moved_keys > 0, "some keys were in the moved slots");
}

#[tokio::test]
async fn acl_users_are_registered_and_deleted_on_every_node() {
    let cluster = start().await;
    cluster.acl_setuser("oid-x", "pw-x").await.expect("setuser");
    for node in 0..3 {
        let mut c = cluster.connect(node).await.expect("connect");
        let reply = c
            .command(&[b"AUTH", b"oid-x", b"pw-x"])
            .await
            .expect("AUTH");
        assert_eq!(reply, Reply::Simple("OK".into()), "node {node}");
    }
    cluster.acl_deluser("oid-x").await.expect("deluser");
    for node in 0..3 {
        let mut c = cluster.connect(node).await.expect("connect");
        let reply = c
            .command(&[b"AUTH", b"oid-x", b"pw-x"])
            .await
            .expect("AUTH");
        assert!(
            matches!(&reply, Reply::Error(e) if e.starts_with("WRONGPASS")),
            "{reply:?}"
        );
    }
}

#[tokio::test]
async fn dev_token_source_registers_on_every_node_and_expiry_closes_everywhere() {
    let cluster = start().await;
    let lifetime = Duration::from_millis(500);
    let source = Arc::new(DevTokenSource::for_servers(
        cluster.nodes(),
        lifetime,
        "oid",
    ));
    let token = source.fetch().await.expect("token");
    let mut conns = Vec::new();
    for node in 0..3 {
        let mut c = cluster.connect(node).await.expect("connect");
        let auth = c
            .command(&[b"AUTH", b"oid-1", token.token.expose().as_bytes()])
            .await
            .expect("AUTH");
        assert_eq!(auth, Reply::Simple("OK".into()), "node {node}");
        conns.push(c);
    }
    // At expiry the identity is deleted on every node, and every node closes its connection.
    for (node, mut c) in conns.into_iter().enumerate() {
        let end = tokio::time::timeout(lifetime + STEP, c.read_reply())
            .await
            .unwrap_or_else(|_| panic!("node {node} closes the expired identity's connection"));
        assert!(
            matches!(end, Err(DevError::Closed | DevError::Io(_))),
            "node {node}: {end:?}"
        );
    }
}

#[tokio::test]
async fn a_cluster_node_restarts_as_itself_on_the_same_ports() {
    let mut node = RedisServer::start(RedisOptions {
        cluster: true,
        ..RedisOptions::default()
    })
    .await
    .unwrap_or_else(|e| panic!("cluster node starts: {e}"));
    let (port, bus) = (node.port(), node.cluster_port().expect("a bus port"));
    assert_ne!(port, bus);
    let id = node.command(&[b"CLUSTER", b"MYID"]).await.expect("MYID");
    assert!(
        matches!(&id, Reply::Bulk(Some(id)) if id.len() == 40),
        "{id:?}"
    );
    node.restart().await.expect("restart");
    assert_eq!((node.port(), node.cluster_port()), (port, Some(bus)));
    let again = node.command(&[b"CLUSTER", b"MYID"]).await.expect("MYID");
    assert_eq!(again, id, "nodes.conf kept the node's identity");
}

/// `AUTH name password` on a fresh connection to `node`.
async fn auth(cluster: &RedisCluster, node: usize, name: &str, password: &str) -> Reply {
    let mut c = cluster.connect(node).await.expect("connect");
    c.command(&[b"AUTH", name.as_bytes(), password.as_bytes()])
        .await
        .expect("AUTH")
}

fn wrongpass(reply: &Reply) -> bool {
    matches!(reply, Reply::Error(e) if e.starts_with("WRONGPASS"))
}

#[tokio::test]
async fn a_primary_joins_with_the_users_and_leaves_once_it_serves_no_slots() {
    let cluster = Arc::new(start().await);
    let source = DevTokenSource::for_cluster(cluster.clone(), Duration::from_secs(3600), "oid");
    let early = source.fetch().await.expect("a token before the join");
    cluster
        .acl_setuser("gone", "pw-gone")
        .await
        .expect("setuser");
    cluster.acl_deluser("gone").await.expect("deluser");

    let began = Instant::now();
    let new = cluster.add_primary().await.expect("a primary joins");
    eprintln!("a primary joined in {:?}", began.elapsed());
    assert_eq!(new, 3);
    assert_eq!(cluster.nodes().len(), 4);
    let ids = cluster.node_ids();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 4, "{ids:?}");
    // Every node knows it, and it serves nothing yet.
    for node in 0..4 {
        let Reply::Bulk(Some(nodes)) = run(&cluster, node, &[b"CLUSTER", b"NODES"]).await else {
            panic!("CLUSTER NODES is a bulk string");
        };
        let nodes = String::from_utf8_lossy(&nodes);
        let line = nodes
            .lines()
            .find(|l| l.starts_with(ids[new].as_str()))
            .unwrap_or_else(|| panic!("node {node} knows the new node: {nodes}"));
        assert!(line.contains(" connected"), "{line}");
        assert!(line.trim_end().ends_with("connected"), "no slots: {line}");
    }
    let owners = cluster.slot_owners().await.expect("slot owners");
    assert!(!owners.contains(&new));

    // Users created before are there (those deleted are not), and later changes reach it.
    let token = early.token.expose().to_owned();
    assert_eq!(
        auth(&cluster, new, "oid-1", &token).await,
        Reply::Simple("OK".into())
    );
    assert!(wrongpass(&auth(&cluster, new, "gone", "pw-gone").await));
    let later = source.fetch().await.expect("a token after the join");
    assert_eq!(
        auth(&cluster, new, "oid-2", later.token.expose()).await,
        Reply::Simple("OK".into())
    );
    cluster.acl_deluser("oid-1").await.expect("deluser");
    assert!(wrongpass(&auth(&cluster, new, "oid-1", &token).await));

    // It takes slots, and cannot leave while it serves them.
    cluster.reshard(0, new, 10).await.expect("reshard 0 → new");
    let refused = cluster.remove_primary(new).await;
    assert!(
        matches!(&refused, Err(DevError::Cluster(e)) if e.contains("serves 10 slots")),
        "{refused:?}"
    );
    assert!(matches!(
        cluster.remove_primary(0).await,
        Err(DevError::Cluster(_))
    ));
    assert!(matches!(
        cluster.remove_primary(9).await,
        Err(DevError::Cluster(_))
    ));
    // A handle held elsewhere keeps it, unchanged.
    cluster.reshard(new, 0, 10).await.expect("reshard new → 0");
    let held = cluster.node(new).expect("node");
    let refused = cluster.remove_primary(new).await;
    assert!(
        matches!(&refused, Err(DevError::Cluster(e)) if e.contains("in use")),
        "{refused:?}"
    );
    assert_eq!(cluster.node_ids(), ids, "nothing changed");
    let port = held.port();
    drop(held);

    let began = Instant::now();
    cluster
        .remove_primary(new)
        .await
        .expect("the primary leaves");
    eprintln!("a primary left in {:?}", began.elapsed());
    assert_eq!(cluster.node_ids(), ids[..3]);
    for node in 0..3 {
        let Reply::Bulk(Some(nodes)) = run(&cluster, node, &[b"CLUSTER", b"NODES"]).await else {
            panic!("CLUSTER NODES is a bulk string");
        };
        let nodes = String::from_utf8_lossy(&nodes);
        assert_eq!(nodes.lines().count(), 3, "node {node}: {nodes}");
        assert!(!nodes.contains(ids[new].as_str()), "node {node}: {nodes}");
    }
    let owners = cluster.slot_owners().await.expect("slot owners");
    assert_eq!(owners.len(), usize::from(CLUSTER_SLOTS));
    let gone = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(gone.is_err(), "its process is gone: {gone:?}");
}
