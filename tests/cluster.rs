//! Cluster mode against a real TLS Redis Cluster of 3 primaries on 127.0.0.1
//! (`devenv::RedisCluster`), standing in for Azure Managed Redis with the OSS clustering
//! policy: every node speaks TLS only, its certificate names `cache.redis.test` and not its
//! address, and its own address is what CLUSTER SLOTS/SHARDS/NODES and MOVED/ASK tell
//! clients. Those addresses count as internal here: a client behind the proxy must never see
//! one, and real cluster clients (`redis-cli -c`, `redis-benchmark --cluster`, redis-py's
//! `RedisCluster`) must work through the proxy unmodified, through a resharding and token
//! rotations.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use redis_entra_proxy::devenv::{key_slot, RespConn};
use support::cluster::{key_on, text, Setup, SetupOptions};
use support::{free_addr, run_tool, Reply, STEP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_replies_name_local_listeners_that_reach_the_right_node() {
    let s = Setup::start(Duration::from_secs(3600), 0.75).await;
    let locals = s.locals().await;
    assert_eq!(locals.len(), 3, "three primaries: {locals:?}");
    let node_ids = s.cluster.node_ids();
    let ids: HashSet<&String> = node_ids.iter().collect();
    for (id, addr) in &locals {
        assert!(ids.contains(id), "{id} is a node of the cluster");
        assert_eq!(addr.ip().to_string(), "127.0.0.1");
        assert!(
            !s.cluster.addrs().iter().any(|a| a.port() == addr.port()),
            "{addr} is a node's own port"
        );
        // The listener leads to that very node, over TLS verified as the cache's name.
        let mut c = RespConn::connect_plain(*addr).await.unwrap();
        let myid = c.command(&[b"CLUSTER", b"MYID"]).await.unwrap();
        assert_eq!(&text(&myid), id, "{addr} leads to node {id}");
    }

    let mut c = s.proxy.client().await;
    let nodes = text(&c.command(&[b"CLUSTER", b"NODES"]).await.unwrap());
    s.assert_no_internal("CLUSTER NODES", &nodes);
    for (id, addr) in &locals {
        let line = nodes.lines().find(|l| l.starts_with(id.as_str())).unwrap();
        assert!(line.contains(&format!(" {addr}@")), "{line} names {addr}");
    }

    let shards = c.command(&[b"CLUSTER", b"SHARDS"]).await.unwrap();
    let flat = format!("{shards:?}");
    assert!(!flat.contains("tls-port"), "no TLS port is offered: {flat}");
    for addr in s.cluster.addrs() {
        assert!(
            !flat.contains(&format!("Integer({})", addr.port())),
            "CLUSTER SHARDS names port {}: {flat}",
            addr.port()
        );
    }
    for addr in locals.values() {
        assert!(
            flat.contains(&format!("Integer({})", addr.port())),
            "CLUSTER SHARDS names {addr}"
        );
    }
    let slots = text(&c.command(&[b"CLUSTER", b"SLOTS"]).await.unwrap());
    s.assert_no_internal("CLUSTER SLOTS", &slots);
    // (The `cluster_nodes` gauge is checked in tests/cluster_topology.rs, whose tests run one
    // at a time: the gauge is shared by every proxy of a test binary.)
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_and_ask_send_clients_to_local_listeners() {
    let s = Setup::start(Duration::from_secs(3600), 0.75).await;
    let locals = s.locals().await;
    let local_of = |i: usize| locals[&s.cluster.node_ids()[i]];

    // MOVED: a key of node 1 asked on the main listener (node 0).
    let key = key_on(&s.cluster, 1, "moved").await;
    let mut main = s.proxy.client().await;
    let moved = main.command(&[b"SET", key.as_bytes(), b"v"]).await.unwrap();
    let slot = key_slot(key.as_bytes());
    assert_eq!(moved, Reply::Error(format!("MOVED {slot} {}", local_of(1))));
    let mut one = RespConn::connect_plain(local_of(1)).await.unwrap();
    assert_eq!(
        one.command(&[b"SET", key.as_bytes(), b"v"]).await.unwrap(),
        Reply::Simple("OK".into())
    );

    // ASK: a slot of node 0 migrating to node 2; a key not on node 0 any more is asked there.
    let key = key_on(&s.cluster, 0, "ask").await;
    let slot = key_slot(key.as_bytes());
    let ids = s.cluster.node_ids();
    s.setslot(2, slot, "IMPORTING", &ids[0]).await;
    s.setslot(0, slot, "MIGRATING", &ids[2]).await;
    let ask = main.command(&[b"GET", key.as_bytes()]).await.unwrap();
    assert_eq!(ask, Reply::Error(format!("ASK {slot} {}", local_of(2))));
    let mut two = RespConn::connect_plain(local_of(2)).await.unwrap();
    assert_eq!(
        two.command(&[b"ASKING"]).await.unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        two.command(&[b"SET", key.as_bytes(), b"asked"])
            .await
            .unwrap(),
        Reply::Simple("OK".into())
    );
    assert!(
        s.metric("redis_entra_proxy_cluster_redirects_total", "ask")
            .await
            >= 1.0
    );
    assert!(
        s.metric("redis_entra_proxy_cluster_redirects_total", "moved")
            .await
            >= 1.0
    );
    s.proxy.stop().await;
}

/// Runs `script` through `redis-cli -c` against the proxy's `port`: the replies, the
/// redirections it reported following ("-> Redirected to slot [n] located at host:port"), and
/// its whole output.
async fn redis_cli_cluster(port: &str, script: &str) -> (Vec<String>, Vec<String>, String) {
    let (ok, out, err) = run_tool(
        "redis-cli",
        &["-c", "-h", "127.0.0.1", "-p", port],
        Some(script.as_bytes()),
    )
    .await;
    assert!(ok, "redis-cli -c failed: {err}");
    let (redirects, replies): (Vec<String>, Vec<String>) = out
        .lines()
        .map(str::to_owned)
        .partition(|l| l.starts_with("-> Redirected"));
    (replies, redirects, out)
}

/// `redis-benchmark --cluster` (10 clients per node, SET and GET) through the proxy at
/// `port`; checks that it ran both tests without an error and returns (stdout, stderr).
async fn redis_benchmark_cluster(port: &str) -> (String, String) {
    let (ok, out, err) = run_tool(
        "redis-benchmark",
        &[
            "--cluster",
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-q",
            "-n",
            "5000",
            "-c",
            "10",
            "-t",
            "set,get",
            "-r",
            "100000",
        ],
        None,
    )
    .await;
    assert!(ok, "redis-benchmark --cluster failed: {out}\n{err}");
    assert!(
        out.contains("SET:") && out.contains("GET:"),
        "redis-benchmark ran both tests: {out}"
    );
    assert!(!out.to_lowercase().contains("error"), "{out}");
    (out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_and_redis_benchmark_in_cluster_mode() {
    let s = Setup::start(Duration::from_secs(3600), 0.75).await;
    let port = s.proxy.addr.port().to_string();
    // 60 keys over the whole slot space, written and read back by redis-cli following
    // redirections on its own.
    let mut script = String::new();
    for i in 0..60 {
        script.push_str(&format!("SET cli:{i} value-{i}\n"));
    }
    for i in 0..60 {
        script.push_str(&format!("GET cli:{i}\n"));
    }
    let (lines, redirects, out) = redis_cli_cluster(&port, &script).await;
    assert!(!redirects.is_empty(), "redis-cli was redirected: {out}");
    assert_eq!(lines.len(), 120, "{out}");
    assert!(lines[..60].iter().all(|l| *l == "OK"), "{out}");
    for (i, l) in lines[60..].iter().enumerate() {
        assert_eq!(*l, format!("value-{i}"));
    }
    s.assert_no_internal("redis-cli output", &out);
    let mut owners = HashSet::new();
    for i in 0..60 {
        owners.insert(
            s.cluster
                .key_owner(format!("cli:{i}").as_bytes())
                .await
                .unwrap(),
        );
    }
    assert_eq!(owners.len(), 3, "the keys spread over every node");

    let (out, err) = redis_benchmark_cluster(&port).await;
    s.assert_no_internal("redis-benchmark output", &format!("{out}{err}"));
    // Its keys landed on every node.
    for i in 0..3 {
        let n = s.cluster.command(i, &[b"DBSIZE"]).await.unwrap();
        assert!(
            matches!(n, Reply::Integer(n) if n > 20),
            "node {i} holds keys: {n:?}"
        );
    }
    s.proxy.stop().await;
}

/// The interpreter with redis-py (scripts/test installs it and names it).
fn python() -> String {
    std::env::var("REDIS_PY_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs tests/clients/cluster_client.py; returns (ops, errors, nodes).
async fn redis_py(port: u16, keys: usize, seconds: f64) -> (u64, Vec<String>, Vec<String>) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/cluster_client.py"
    );
    let (ok, out, err) = run_tool(
        &python(),
        &[
            script,
            &port.to_string(),
            &keys.to_string(),
            &seconds.to_string(),
        ],
        None,
    )
    .await;
    assert!(
        ok,
        "redis-py's RedisCluster could not run ({}; scripts/test installs redis-py): {err}",
        python()
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_owned())
            .collect()
    };
    (
        v["ops"].as_u64().unwrap(),
        strings("errors"),
        strings("nodes"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_cluster_client_through_the_proxy() {
    let s = Setup::start(Duration::from_secs(3600), 0.75).await;
    let (ops, errors, nodes) = redis_py(s.proxy.addr.port(), 300, 1.0).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(ops >= 300, "{ops} operations");
    let locals: Vec<String> = s.locals().await.values().map(|a| a.to_string()).collect();
    let mut nodes = nodes;
    nodes.retain(|n| n != &s.proxy.addr.to_string());
    let mut want = locals.clone();
    want.sort();
    nodes.sort();
    assert_eq!(nodes, want, "the client learnt the local listeners only");
    for i in 0..3 {
        let n = s.cluster.command(i, &[b"DBSIZE"]).await.unwrap();
        assert!(matches!(n, Reply::Integer(n) if n > 50), "node {i}: {n:?}");
    }
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_under_load_costs_the_client_nothing() {
    let s = Setup::start(Duration::from_secs(3600), 0.75).await;
    let port = s.proxy.addr.port();
    let load = tokio::spawn(redis_py(port, 3000, 8.0));
    // Let the client write its keys and start its read/write rounds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = s.cluster.slot_owners().await.unwrap();
    s.cluster.reshard(0, 1, 1500).await.expect("reshard 0 → 1");
    s.cluster.reshard(2, 0, 1000).await.expect("reshard 2 → 0");
    let after = s.cluster.slot_owners().await.unwrap();
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert_eq!(moved, 2500, "slots changed owner");
    let (ops, errors, _) = tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .expect("the load ends")
        .unwrap();
    assert!(errors.is_empty(), "the client saw errors: {errors:?}");
    assert!(ops > 3000, "{ops} operations");
    // The client was really sent around by the cluster, through the proxy.
    let redirects = s
        .metric("redis_entra_proxy_cluster_redirects_total", "moved")
        .await;
    assert!(redirects >= 1.0, "{redirects} MOVED relayed");
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_connection_is_reauthenticated_at_rotations() {
    // A token every 2 s, each deleted from every node when it expires 2 s later: a node
    // connection that missed a re-AUTH is closed by the server.
    let s = Setup::start(Duration::from_secs(4), 0.5).await;
    s.ping_through_rotations(&[0, 1, 2], 3).await;
    s.proxy.stop().await;
}

/// `redis-entra-proxy dev --cluster`, the built-in cluster setup, through the real binary:
/// `redis-cli -c` writes and reads keys on every node across token rotations, and SIGTERM
/// stops the proxy and its cluster cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_setup_through_the_binary() {
    let addr = free_addr();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
        .args(["dev", "--cluster", "--rotate-every", "2s"])
        .args(["--listen", &addr.to_string()])
        .args(["--cluster-ports", "0", "--admin-listen", "none"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("binary runs");
    let deadline = tokio::time::Instant::now() + STEP * 2;
    loop {
        if let Ok(mut c) = RespConn::connect_plain(addr).await {
            if let Ok(Reply::Simple(s)) = c.command(&[b"PING"]).await {
                if s == "PONG" {
                    break;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dev --cluster did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let port = addr.port().to_string();
    for round in 0..3 {
        let mut script = String::new();
        for i in 0..30 {
            script.push_str(&format!("SET dev:{i} r{round}\nGET dev:{i}\n"));
        }
        let (replies, _, out) = redis_cli_cluster(&port, &script).await;
        assert_eq!(replies.len(), 60, "{out}");
        for pair in replies.chunks(2) {
            assert_eq!(pair, ["OK", &format!("r{round}")], "{out}");
        }
        // Across a token rotation (every 2 s) before the next round.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let pid = child.id().expect("pid").to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let status = tokio::time::timeout(STEP * 3, child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "exit {status}");
}

/// `--multiplex` in cluster mode: `redis-benchmark --cluster` (10 clients on every node
/// listener) runs through shared connections. When it has finished, each node keeps only
/// the shared connections of the node listeners (at most one per session thread); without
/// multiplexing, every connection would have closed with its client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_listeners_multiplex_their_clients() {
    let s = Setup::start_with(SetupOptions {
        multiplex: true,
        ..SetupOptions::default()
    })
    .await;
    let port = s.proxy.addr.port().to_string();
    redis_benchmark_cluster(&port).await;
    for i in 0..3 {
        let Reply::Bulk(Some(list)) = s.cluster.command(i, &[b"CLIENT", b"LIST"]).await.unwrap()
        else {
            panic!("CLIENT LIST is a bulk string")
        };
        let list = String::from_utf8_lossy(&list).into_owned();
        let proxy_conns: Vec<&str> = list.lines().filter(|l| l.contains(" user=oid-")).collect();
        assert!(
            (1..=2).contains(&proxy_conns.len()),
            "node {i}: the shared connections remain: {list}"
        );
        assert!(
            proxy_conns
                .iter()
                .all(|l| l.contains(" cmd=set ") || l.contains(" cmd=get ")),
            "node {i}: they carried the benchmark: {list}"
        );
    }
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_shard_subscription_leaves_the_client_unsubscribed() {
    let s = Setup::start(Duration::from_secs(3600), 0.75).await;
    let mut c = s.proxy.client().await;
    // Shard channels in two slots: the server refuses the command as a whole.
    let r = c.command(&[b"SSUBSCRIBE", b"a", b"b"]).await.unwrap();
    assert!(
        matches!(&r, Reply::Error(e) if e.starts_with("CROSSSLOT")),
        "{r:?}"
    );
    // So the RESP2 client never subscribed: its next command runs (or is redirected), where
    // it used to be refused by the proxy as if from a subscriber.
    let r = c.command(&[b"GET", b"a"]).await.unwrap();
    assert!(
        !matches!(&r, Reply::Error(e) if e.contains("Can't execute")),
        "{r:?}"
    );
    assert_eq!(
        c.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
}

/// A client can make a script answer `MOVED` to any address. The proxy tells it a local
/// address for it, as for any redirection, but connects there only once its own reading of
/// the topology lists the node: here never, so the client is told why, and the address gets
/// no connection (and no token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_redirection_gets_no_upstream_connection() {
    let s = Setup::start(Duration::from_secs(3600), 0.75).await;
    let catcher = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forged = catcher.local_addr().unwrap();
    let mut c = s.proxy.client().await;
    let script = format!("return redis.error_reply('MOVED 1 {forged}')");
    let reply = c
        .command(&[b"EVAL", script.as_bytes(), b"0"])
        .await
        .unwrap();
    let Reply::Error(moved) = reply else {
        panic!("{reply:?}")
    };
    let local: std::net::SocketAddr = moved
        .strip_prefix("MOVED 1 ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{moved}"));
    assert_ne!(local, forged, "rewritten to a local listener");
    let mut sent = RespConn::connect_plain(local).await.unwrap();
    let reply = tokio::time::timeout(STEP, sent.command(&[b"PING"]))
        .await
        .expect("answered in time")
        .unwrap();
    assert!(
        matches!(&reply, Reply::Error(e) if e.contains("not a node of the cluster's topology")),
        "{reply:?}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(100), catcher.accept())
            .await
            .is_err(),
        "the forged address got a connection"
    );
    // The proxy's own nodes still serve.
    assert_eq!(
        c.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
}
