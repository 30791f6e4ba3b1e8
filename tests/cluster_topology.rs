//! Cluster topology changes end to end: real primaries joining and leaving a TLS Redis
//! Cluster on 127.0.0.1 (`devenv::RedisCluster::add_primary`/`forget_primary`), with the
//! proxy in front in cluster mode. A node that joins gets a local listener, from the periodic
//! refresh or at once when a `-MOVED` names it; a node that leaves keeps its listener while a
//! client still uses it and loses it after that client has gone; token rotations reach a node
//! added later.
//!
//! The proxy's gauges live in one process-wide recorder, shared by every proxy in this test
//! binary, so the tests here run one at a time (`ONE_AT_A_TIME`): a test reading
//! `redis_entra_proxy_cluster_nodes` must be the only one with a proxy running.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use redis_entra_proxy::devenv::{key_slot, RespConn};
use support::cluster::{key_in, sum_metric, text, Setup, SetupOptions};
use support::{Reply, STEP};
use tokio::sync::MutexGuard;

/// Held by each test for its whole run (see the module documentation).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NODES_GAUGE: &str = "redis_entra_proxy_cluster_nodes";
const REFRESHES: &str = "redis_entra_proxy_cluster_refresh_total";
const OK: &str = "outcome=\"ok\"";
/// Bound on the proxy noticing a topology change: a few refresh intervals of 1 s.
const WITHIN: Duration = Duration::from_secs(15);
/// Pause between checks while waiting for the proxy; it has no notification to wait on.
const POLL: Duration = Duration::from_millis(50);

/// Polls `probe` until it yields a value, at most every `POLL` and for at most `within`;
/// panics with `what` and the probe's last reason otherwise.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    let polls = within.as_millis() / POLL.as_millis() + 1;
    let mut last = String::new();
    for _ in 0..polls {
        match probe().await {
            Ok(v) => return v,
            Err(why) => last = why,
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("{what}: not within {within:?}; last: {last}");
}

/// Successful topology reads of every proxy in this process so far, read in-process (the
/// recorder the proxies share) so it can be read before a proxy exists.
fn refreshes_in_process() -> f64 {
    let body = redis_entra_proxy::metrics::install().render();
    sum_metric(&body, REFRESHES, OK)
}

/// This test's turn, and three primaries with the proxy in front, returned once the proxy's
/// first read of the topology is applied (so nothing learnt later can be mistaken for it).
async fn start(opts: SetupOptions) -> (MutexGuard<'static, ()>, Setup) {
    let turn = ONE_AT_A_TIME.lock().await;
    let before = refreshes_in_process();
    let s = Setup::start_with(opts).await;
    eventually("the proxy's first topology read", STEP, || async {
        let (reads, gauge) = (
            s.metric(REFRESHES, OK).await,
            s.metric(NODES_GAUGE, "").await,
        );
        // A read is counted microseconds before it is applied, which sets the gauge to 3.
        if reads > before && gauge == 3.0 {
            Ok(())
        } else {
            Err(format!("{} reads, gauge {gauge}", reads - before))
        }
    })
    .await;
    (turn, s)
}

/// Waits until the nodes gauge reads `want`.
async fn wait_gauge(s: &Setup, want: f64) {
    eventually(&format!("{NODES_GAUGE} = {want}"), WITHIN, || async {
        match s.metric(NODES_GAUGE, "").await {
            v if v == want => Ok(()),
            v => Err(format!("{v}")),
        }
    })
    .await
}

/// Waits until the proxy has applied a topology read that started after this call: reads are
/// sequential and counted just before they are applied, so the third count from now is
/// after the whole of a read that began after now.
async fn wait_fresh_refresh(s: &Setup) {
    let base = s.metric(REFRESHES, OK).await;
    eventually("three more topology reads", WITHIN, || async {
        match s.metric(REFRESHES, OK).await - base {
            n if n >= 3.0 => Ok(()),
            n => Err(format!("{n} reads")),
        }
    })
    .await
}

/// Waits until no topology read has happened for 3 s (the early re-read a read may ask for
/// comes 1 s after it) and returns the count of reads; for a long refresh interval only.
async fn wait_quiet(s: &Setup) -> f64 {
    const QUIET: Duration = Duration::from_secs(3);
    let deadline = Instant::now() + WITHIN;
    let (mut reads, mut since) = (s.metric(REFRESHES, OK).await, Instant::now());
    for _ in 0..WITHIN.as_millis() / POLL.as_millis() {
        if since.elapsed() >= QUIET {
            return reads;
        }
        assert!(
            Instant::now() < deadline,
            "topology reads did not stop within {WITHIN:?}: {reads}"
        );
        tokio::time::sleep(POLL).await;
        let now = s.metric(REFRESHES, OK).await;
        if now != reads {
            (reads, since) = (now, Instant::now());
        }
    }
    panic!("topology reads did not stop within {WITHIN:?}: {reads}");
}

/// The slots `node` serves now.
async fn slots_of(s: &Setup, node: usize) -> HashSet<u16> {
    let owners = s.cluster.slot_owners().await.expect("slot owners");
    (0..owners.len())
        .filter(|slot| owners[*slot] == node)
        .map(|slot| u16::try_from(slot).expect("a slot"))
        .collect()
}

/// Asserts `local` is a listener of the proxy's own (127.0.0.1, not a node's port, none of
/// `others`) and that it leads to the node `id`.
async fn assert_leads_to(s: &Setup, local: SocketAddr, id: &str, others: &[SocketAddr]) {
    assert_eq!(local.ip().to_string(), "127.0.0.1", "{local}");
    assert!(
        !s.cluster.addrs().iter().any(|a| a.port() == local.port()),
        "{local} is a node's own port"
    );
    assert!(
        !others.contains(&local),
        "{local} is another node's listener"
    );
    let mut c = RespConn::connect_plain(local).await.expect("connect");
    let myid = c.command(&[b"CLUSTER", b"MYID"]).await.expect("MYID");
    assert_eq!(text(&myid), id, "{local} leads to node {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_gets_a_listener_from_the_periodic_refresh() {
    let began = Instant::now();
    let (_turn, s) = start(SetupOptions {
        refresh_interval: Duration::from_secs(1),
        ..SetupOptions::default()
    })
    .await;
    let before: Vec<SocketAddr> = s.locals().await.into_values().collect();
    assert_eq!(before.len(), 3, "{before:?}");

    // Nothing asks the proxy for the topology meanwhile: only its own refresh can open a
    // listener for the new node (it may, while add_primary waits for the cluster to agree).
    let joining = Instant::now();
    let new = s.cluster.add_primary().await.expect("a primary joins");
    assert_eq!(new, 3);
    let new_id = s.cluster.node_id(new).unwrap();
    eprintln!("add_primary took {:?}", joining.elapsed());
    wait_gauge(&s, 4.0).await;
    eprintln!(
        "the refresh opened a listener within {:?}",
        joining.elapsed()
    );

    // CLUSTER NODES lists the new node (no slots yet) at a new local listener leading to it.
    let (nodes, reply) = s.node_lines().await;
    s.assert_no_internal("CLUSTER NODES", &reply);
    let local = *nodes
        .get(&new_id)
        .unwrap_or_else(|| panic!("CLUSTER NODES lists {new_id}: {reply}"));
    assert_leads_to(&s, local, &new_id, &before).await;

    // Slots move to it: CLUSTER SLOTS names that listener, MOVED sends clients there.
    s.cluster
        .reshard(0, new, 100)
        .await
        .expect("reshard 0 → new");
    let moved = slots_of(&s, new).await;
    assert_eq!(moved.len(), 100);
    let locals = s.locals().await;
    assert_eq!(
        locals.get(&new_id),
        Some(&local),
        "CLUSTER SLOTS: {locals:?}"
    );
    let slots = text(
        &s.proxy
            .client()
            .await
            .command(&[b"CLUSTER", b"SLOTS"])
            .await
            .unwrap(),
    );
    s.assert_no_internal("CLUSTER SLOTS", &slots);

    let key = key_in(&moved, "joined");
    let mut main = s.proxy.client().await;
    let reply = main.command(&[b"SET", key.as_bytes(), b"v"]).await.unwrap();
    let slot = key_slot(key.as_bytes());
    assert_eq!(reply, Reply::Error(format!("MOVED {slot} {local}")));
    let mut there = RespConn::connect_plain(local).await.unwrap();
    assert_eq!(
        there
            .command(&[b"SET", key.as_bytes(), b"v"])
            .await
            .unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        s.metric(NODES_GAUGE, "").await,
        4.0,
        "one listener per node, none twice"
    );
    s.proxy.stop().await;
    eprintln!("test took {:?}", began.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_naming_an_unknown_node_opens_its_listener_at_once() {
    let began = Instant::now();
    // No periodic read for a minute: only the redirection itself can tell the proxy.
    let (_turn, s) = start(SetupOptions {
        refresh_interval: Duration::from_secs(60),
        ..SetupOptions::default()
    })
    .await;
    let before: Vec<SocketAddr> = s.locals().await.into_values().collect();
    // Let the proxy settle into its minute's sleep after its first read.
    let reads = wait_quiet(&s).await;

    let new = s.cluster.add_primary().await.expect("a primary joins");
    let new_id = s.cluster.node_id(new).unwrap();
    s.cluster
        .reshard(0, new, 100)
        .await
        .expect("reshard 0 → new");
    let moved = slots_of(&s, new).await;
    assert_eq!(
        (
            s.metric(REFRESHES, OK).await,
            s.metric(NODES_GAUGE, "").await
        ),
        (reads, 3.0),
        "the proxy has not read the topology since it started"
    );

    let key = key_in(&moved, "unknown");
    let slot = key_slot(key.as_bytes());
    let mut main = s.proxy.client().await;
    let reply = main.command(&[b"SET", key.as_bytes(), b"v"]).await.unwrap();
    let Reply::Error(moved_to) = &reply else {
        panic!("a MOVED for slot {slot}: {reply:?}");
    };
    let target = moved_to
        .strip_prefix(&format!("MOVED {slot} "))
        .unwrap_or_else(|| panic!("a MOVED for slot {slot}: {moved_to}"));
    let local: SocketAddr = target.parse().expect("MOVED names host:port");
    // At once, no waiting: the listener exists by the time the client hears of it.
    assert_leads_to(&s, local, &new_id, &before).await;
    let mut there = RespConn::connect_plain(local).await.unwrap();
    assert_eq!(
        there
            .command(&[b"SET", key.as_bytes(), b"v"])
            .await
            .unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(s.metric(NODES_GAUGE, "").await, 4.0);
    assert_eq!(s.locals().await.get(&new_id), Some(&local));
    // The unknown node also makes the proxy read the topology again soon, not in a minute.
    eventually(
        "a topology read soon after the MOVED",
        Duration::from_secs(5),
        || async {
            match s.metric(REFRESHES, OK).await {
                n if n > reads => Ok(()),
                n => Err(format!("{n} reads")),
            }
        },
    )
    .await;
    s.proxy.stop().await;
    eprintln!("test took {:?}", began.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_keeps_its_listener_until_its_client_goes() {
    let began = Instant::now();
    let (_turn, s) = start(SetupOptions {
        refresh_interval: Duration::from_secs(1),
        ..SetupOptions::default()
    })
    .await;
    let new = s.cluster.add_primary().await.expect("a primary joins");
    let new_id = s.cluster.node_id(new).unwrap();
    s.cluster
        .reshard(0, new, 50)
        .await
        .expect("reshard 0 → new");
    let local = s.locals().await[&new_id];
    wait_gauge(&s, 4.0).await;

    // It hands its slots back, and a client stays connected to its listener.
    s.cluster
        .reshard(new, 0, 50)
        .await
        .expect("reshard new → 0");
    assert!(slots_of(&s, new).await.is_empty());
    let mut client = RespConn::connect_plain(local).await.unwrap();
    let myid = client.command(&[b"CLUSTER", b"MYID"]).await.unwrap();
    assert_eq!(text(&myid), new_id);

    // The others forget it; it keeps running, so the client's upstream connection lives on.
    let left = s
        .cluster
        .forget_primary(new)
        .await
        .expect("the node leaves");
    let (nodes, reply) = s.node_lines().await;
    assert_eq!(nodes.len(), 3, "{reply}");
    assert!(!nodes.contains_key(&new_id), "CLUSTER NODES: {reply}");
    assert!(
        !nodes.values().any(|a| *a == local),
        "CLUSTER NODES names {local}: {reply}"
    );

    // The proxy has read the topology without it; the listener stays while the client does.
    wait_fresh_refresh(&s).await;
    assert_eq!(
        s.metric(NODES_GAUGE, "").await,
        4.0,
        "the listener of a node that left is kept while a client uses it"
    );
    let myid = client.command(&[b"CLUSTER", b"MYID"]).await.unwrap();
    assert_eq!(text(&myid), new_id, "the client is still served");

    // The client goes: the next read retires the listener.
    drop(client);
    let gone = Instant::now();
    wait_gauge(&s, 3.0).await;
    eventually("the listener closed", WITHIN, || async {
        match tokio::net::TcpStream::connect(local).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            Err(e) => Err(e.to_string()),
            Ok(_) => Err("still accepting".into()),
        }
    })
    .await;
    eprintln!("listener closed {:?} after its client left", gone.elapsed());
    let locals: BTreeMap<String, SocketAddr> = s.locals().await;
    assert!(!locals.values().any(|a| *a == local), "{locals:?}");
    let (nodes, _) = s.node_lines().await;
    assert_eq!(nodes.len(), 3);

    let mut left = left;
    left.kill().await.expect("the node that left stops");
    s.proxy.stop().await;
    eprintln!("test took {:?}", began.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rotations_reach_a_node_added_later() {
    let began = Instant::now();
    // A token every 2 s, each deleted from every node (the new one included) when it expires
    // 2 s later: a connection to the new node that missed a re-AUTH is closed by the server.
    let (_turn, s) = start(SetupOptions {
        token_lifetime: Duration::from_secs(4),
        refresh_ratio: 0.5,
        refresh_interval: Duration::from_secs(1),
        ..SetupOptions::default()
    })
    .await;
    let new = s.cluster.add_primary().await.expect("a primary joins");
    s.cluster
        .reshard(0, new, 100)
        .await
        .expect("reshard 0 → new");
    s.ping_through_rotations(&[new, 1], 3).await;
    s.proxy.stop().await;
    eprintln!("test took {:?}", began.elapsed());
}
