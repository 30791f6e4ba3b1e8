//! `--multiplex`: plain commands of many clients share one upstream connection per session
//! thread; a client gets a connection of its own at its first other command. Against the real
//! TLS redis-server stand-in, with real clients (`redis-benchmark`).
mod support;

use std::time::Duration;

use redis_entra_proxy::devenv::RespConn;
use support::*;
use tokio::io::AsyncReadExt;

async fn multiplexed(opts: ProxyOptions) -> Proxy {
    Proxy::start_with(ProxyOptions {
        multiplex: true,
        ..opts
    })
    .await
}

/// One session thread: the clients of a test share one connection per protocol.
async fn multiplexed_on_one_thread() -> Proxy {
    multiplexed(ProxyOptions {
        worker_threads: Some(1),
        ..Default::default()
    })
    .await
}

/// The server's connections from the proxy (authenticated as a token's user, `oid-N`).
async fn proxy_conns(proxy: &Proxy) -> Vec<std::collections::HashMap<String, String>> {
    token_connections(&proxy.redis).await
}

fn bulk(s: &str) -> Reply {
    Reply::Bulk(Some(s.as_bytes().to_vec()))
}

/// Connections the server has accepted so far (`INFO stats`).
async fn connections_received(proxy: &Proxy) -> u64 {
    let Reply::Bulk(Some(text)) = proxy.redis.command(&[b"INFO", b"stats"]).await.unwrap() else {
        panic!("INFO stats")
    };
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_connections_received")
}

fn cmd(args: &[&str]) -> Vec<u8> {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    redis_entra_proxy::devenv::encode(&args)
}

/// `redis-benchmark` through the proxy, 20 clients, 20,000 requests per test, with `args`:
/// its CSV report, after checking that it succeeded with no error reply.
async fn redis_benchmark(proxy: &Proxy, args: &[&str]) -> String {
    let port = proxy.addr.port().to_string();
    let mut all = vec!["-p", &port, "-c", "20", "-n", "20000", "-q", "--csv"];
    all.extend_from_slice(args);
    let (ok, out, err) = run_tool("redis-benchmark", &all, None).await;
    assert!(ok, "redis-benchmark failed: {out}\n{err}");
    assert!(!err.contains("ERR") && !out.contains("ERR"), "{out}\n{err}");
    out
}

/// Requests written together.
fn pipeline(requests: &[&[&str]]) -> Vec<u8> {
    requests.iter().flat_map(|r| cmd(r)).collect()
}

/// `HELLO`'s reply: a map in RESP3, an array in RESP2, with the protocol in it.
fn assert_hello(frame: &[u8], proto: u8) {
    let text = String::from_utf8_lossy(frame);
    let kind = if proto == 3 { "%" } else { "*" };
    assert!(text.starts_with(kind), "HELLO {proto} answered {text:?}");
    assert!(
        text.contains(&format!("$5\r\nproto\r\n:{proto}\r\n")),
        "HELLO {proto} answered {text:?}"
    );
}

/// 40 clients pipeline batches of different sizes at once; each gets exactly its own replies,
/// in order, while the server sees no more connections than the proxy has session threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_connections_and_each_gets_its_own_replies() {
    many_clients_get_their_own_replies(ProxyOptions::default()).await;
}

/// The same with `--multiplex-max-batches 1`: requests held while a batch is owed its replies
/// go later, together, and still reach the server in each client's order and come back to
/// the client that sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_batches_keep_every_client_in_order() {
    many_clients_get_their_own_replies(ProxyOptions {
        multiplex_max_batches: Some(1),
        ..Default::default()
    })
    .await;
}

async fn many_clients_get_their_own_replies(opts: ProxyOptions) {
    let proxy = multiplexed(opts).await;
    let addr = proxy.addr;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<RespConn>(40);
    let mut tasks = Vec::new();
    for c in 0..40u32 {
        let done = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = RespConn::connect_plain(addr).await.expect("connect");
            let mut i = 0u32;
            for round in 0..30u32 {
                // 1 to 20 requests per write, different for every client and round.
                let batch = 1 + (c * 7 + round * 13) % 20;
                let mut expected = Vec::new();
                let mut bytes = Vec::new();
                for _ in 0..batch {
                    let key = format!("mux:{c}:{i}");
                    let value = format!("v{c}-{i}");
                    bytes.extend(redis_entra_proxy::devenv::encode(&[
                        b"SET",
                        key.as_bytes(),
                        value.as_bytes(),
                    ]));
                    bytes.extend(redis_entra_proxy::devenv::encode(&[b"GET", key.as_bytes()]));
                    bytes.extend(redis_entra_proxy::devenv::encode(&[
                        b"INCR",
                        format!("mux:count:{c}").as_bytes(),
                    ]));
                    expected.push(Reply::Simple("OK".into()));
                    expected.push(bulk(&value));
                    expected.push(Reply::Integer(i64::from(i) + 1));
                    i += 1;
                }
                conn.write_raw(&bytes).await.expect("write");
                for want in expected {
                    let got = tokio::time::timeout(STEP, conn.read_reply())
                        .await
                        .expect("reply in time")
                        .expect("reply");
                    assert_eq!(got, want, "client {c}, round {round}");
                }
            }
            done.send(conn).await.expect("collect");
        }));
    }
    drop(done_tx);
    for t in tasks {
        t.await.expect("client task");
    }
    // Every client still connected: the server sees the shared connections only.
    let mut open = Vec::new();
    while let Some(conn) = done_rx.recv().await {
        open.push(conn);
    }
    assert_eq!(open.len(), 40);
    let conns = proxy_conns(&proxy).await;
    assert!(
        (1..=2).contains(&conns.len()),
        "40 clients over at most 2 shared connections (2 session threads): {conns:?}"
    );
    proxy.stop().await;
}

/// A command that cannot share pins the client: its shared replies come first, then its own
/// connection serves it with a clean state, and keeps serving it.
#[tokio::test]
async fn a_stateful_command_pins_the_client_after_its_shared_replies() {
    let proxy = multiplexed(ProxyOptions::default()).await;
    let mut c = proxy.client().await;
    // One write: shared SET, then SELECT (pins), reads in db 1 and back in db 0.
    let mut bytes = Vec::new();
    for args in [
        &[&b"SET"[..], b"pin:k", b"v"][..],
        &[b"SELECT", b"1"],
        &[b"GET", b"pin:k"],
        &[b"SELECT", b"0"],
        &[b"GET", b"pin:k"],
        &[b"CLIENT", b"ID"],
    ] {
        bytes.extend(redis_entra_proxy::devenv::encode(args));
    }
    c.write_raw(&bytes).await.unwrap();
    let mut replies = Vec::new();
    for _ in 0..6 {
        replies.push(c.read_reply().await.unwrap());
    }
    assert_eq!(replies[0], Reply::Simple("OK".into()));
    assert_eq!(replies[1], Reply::Simple("OK".into()));
    assert_eq!(replies[2], Reply::Bulk(None), "db 1 does not have the key");
    assert_eq!(replies[3], Reply::Simple("OK".into()));
    assert_eq!(replies[4], bulk("v"), "the write made while shared is seen");
    let Reply::Integer(id) = replies[5] else {
        panic!("CLIENT ID: {:?}", replies[5])
    };
    // Pinned for good: the same connection, even for commands that could share.
    assert_eq!(c.command(&[b"GET", b"pin:k"]).await.unwrap(), bulk("v"));
    assert_eq!(
        c.command(&[b"CLIENT", b"ID"]).await.unwrap(),
        Reply::Integer(id)
    );
    assert_eq!(
        c.command(&[b"MULTI"]).await.unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        c.command(&[b"INCR", b"pin:n"]).await.unwrap(),
        Reply::Simple("QUEUED".into())
    );
    assert_eq!(
        c.command(&[b"EXEC"]).await.unwrap(),
        Reply::Array(Some(vec![Reply::Integer(1)]))
    );
    // Another client still shares: its connection is not the pinned one.
    let mut other = proxy.client().await;
    assert_eq!(other.command(&[b"GET", b"pin:k"]).await.unwrap(), bulk("v"));
    let conns = proxy_conns(&proxy).await;
    assert!(
        conns.iter().any(|c| c.get("id") == Some(&id.to_string())),
        "the pinned connection is open: {conns:?}"
    );
    proxy.stop().await;
}

/// The shared connections are re-authenticated at every rotation like any other: with tokens
/// deleted at expiry, clients keep working through several rotations, never closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_connections_reauthenticate_through_rotations() {
    let proxy = multiplexed(ProxyOptions {
        token_lifetime: Duration::from_millis(2667),
        ..Default::default()
    })
    .await;
    let addr = proxy.addr;
    let until = tokio::time::Instant::now() + Duration::from_secs(7);
    let mut tasks = Vec::new();
    for c in 0..8u32 {
        tasks.push(tokio::spawn(async move {
            let mut conn = RespConn::connect_plain(addr).await.expect("connect");
            let mut n = 0i64;
            while tokio::time::Instant::now() < until {
                n += 1;
                let reply = tokio::time::timeout(
                    STEP,
                    conn.command(&[b"INCR", format!("rot:{c}").as_bytes()]),
                )
                .await
                .expect("reply in time")
                .unwrap_or_else(|e| panic!("client {c} lost its connection: {e}"));
                assert_eq!(reply, Reply::Integer(n), "client {c}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n
        }));
    }
    for t in tasks {
        assert!(t.await.expect("client task") > 50);
    }
    // Three rotations or more happened, and the shared connections are on the newest token.
    let gens = proxy.upstream_generations().await;
    assert!(
        gens.iter().all(|&g| g >= 3),
        "shared connections re-authenticated: {gens:?}"
    );
    proxy.stop().await;
}

/// When the shared connection dies, a client owed a reply to a command written to it is
/// closed (its command may or may not have run); a client whose command waited behind the
/// owed batch (`--multiplex-max-batches 1`) gets its reply over a new shared connection, as
/// does a client owed nothing.
#[tokio::test]
async fn losing_the_shared_connection_closes_only_clients_owed_replies() {
    // One session thread: the clients share one connection, so once the owed client has seen
    // the loss, the other's next request cannot race it onto the dead connection (with two
    // threads, the other thread may not have read the close yet, and a request sent to it
    // then is legitimately lost).
    let proxy = multiplexed(ProxyOptions {
        worker_threads: Some(1),
        multiplex_max_batches: Some(1),
        ..Default::default()
    })
    .await;
    let mut owed = proxy.client().await;
    let mut waiting = proxy.client().await;
    let mut idle = proxy.client().await;
    for c in [&mut idle, &mut owed, &mut waiting] {
        assert_eq!(
            c.command(&[b"PING"]).await.unwrap(),
            Reply::Simple("PONG".into())
        );
    }
    let shared = proxy_conns(&proxy).await;
    assert_eq!(shared.len(), 1, "{shared:?}");
    let user = shared[0]["user"].clone();
    // Writes wait while the server is paused: `owed` sends one, `waiting` one that waits
    // behind it, then the shared connections (all of the token's user) are killed.
    proxy
        .redis
        .command(&[b"CLIENT", b"PAUSE", b"5000", b"WRITE"])
        .await
        .unwrap();
    owed.send(&[b"SET", b"lost:k", b"v"]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    waiting.send(&[b"SET", b"lost:waited", b"w"]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy
        .redis
        .command(&[b"CLIENT", b"KILL", b"USER", user.as_bytes()])
        .await
        .unwrap();
    proxy.redis.command(&[b"CLIENT", b"UNPAUSE"]).await.unwrap();
    let closed = tokio::time::timeout(STEP, owed.read_reply())
        .await
        .expect("owed client answered or closed in time");
    assert!(closed.is_err(), "the owed client is closed: {closed:?}");
    assert_eq!(
        tokio::time::timeout(STEP, waiting.read_reply())
            .await
            .expect("in time")
            .unwrap(),
        Reply::Simple("OK".into()),
        "the waiting client's command ran on a new shared connection"
    );
    assert_eq!(
        proxy
            .redis
            .command(&[b"GET", b"lost:waited"])
            .await
            .unwrap(),
        Reply::Bulk(Some(b"w".to_vec()))
    );
    assert_eq!(
        tokio::time::timeout(STEP, idle.command(&[b"GET", b"lost:other"]))
            .await
            .expect("in time")
            .unwrap(),
        Reply::Bulk(None),
        "the other client goes on"
    );
    proxy.stop().await;
}

/// A malformed request gets Redis's own protocol error after the replies already owed, and
/// the connection closes.
#[tokio::test]
async fn a_malformed_request_gets_redis_error_after_the_shared_replies() {
    let proxy = multiplexed(ProxyOptions::default()).await;
    let mut c = proxy.client().await;
    c.write_raw(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n+oops\r\n")
        .await
        .unwrap();
    assert_eq!(c.read_reply().await.unwrap(), Reply::Simple("PONG".into()));
    assert_eq!(
        c.read_reply().await.unwrap(),
        Reply::Error("ERR Protocol error: expected '$', got '+'".into())
    );
    assert!(c.read_reply().await.is_err(), "closed after the error");
    proxy.stop().await;
}

/// `--client-idle-timeout` closes a shared client that sent nothing for that long.
#[tokio::test]
async fn the_idle_timeout_closes_a_shared_client() {
    let proxy = multiplexed(ProxyOptions {
        client_idle_timeout: Some(Duration::from_millis(500)),
        ..Default::default()
    })
    .await;
    let mut c = proxy.client().await;
    assert_eq!(
        c.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    let started = tokio::time::Instant::now();
    let closed = tokio::time::timeout(STEP, c.read_reply())
        .await
        .expect("closed in time");
    assert!(closed.is_err(), "closed: {closed:?}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    proxy.stop().await;
}

/// Requests keep a shared client open past its idle timeout many times over; a request left
/// incomplete closes it after the partial-request limit, even after replies were owed.
#[tokio::test]
async fn shared_clients_timers_follow_their_requests() {
    let limit = Duration::from_millis(400);
    let proxy = multiplexed(ProxyOptions {
        client_idle_timeout: Some(limit),
        partial_request_timeout: Some(limit),
        ..Default::default()
    })
    .await;
    let mut busy = proxy.client().await;
    let started = tokio::time::Instant::now();
    while started.elapsed() < limit * 4 {
        let reply = tokio::time::timeout(STEP, busy.command(&[b"GET", b"timers:busy"]))
            .await
            .expect("answered in time");
        assert_eq!(
            reply.unwrap(),
            Reply::Bulk(None),
            "open after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(limit / 4).await;
    }

    // A bulk announced and never sent, after requests that were answered.
    let mut stalled = proxy.raw().await;
    stalled
        .send(b"GET timers:a\r\nGET timers:b\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\nabc")
        .await;
    stalled.expect(b"$-1\r\n$-1\r\n").await;
    let started = tokio::time::Instant::now();
    let mut sink = [0u8; 64];
    let read = tokio::time::timeout(limit * 4, stalled.0.read(&mut sink))
        .await
        .expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "closed: {read:?}");
    assert!(started.elapsed() >= limit - Duration::from_millis(100));

    // The busy client, silent now, is closed as idle.
    let closed = tokio::time::timeout(limit * 4, busy.read_reply())
        .await
        .expect("closed in time");
    assert!(closed.is_err(), "closed: {closed:?}");
    proxy.stop().await;
}

/// `redis-benchmark`, pipelined, with its usual mix of commands (some share, some pin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_through_multiplexing() {
    let proxy = multiplexed(ProxyOptions::default()).await;
    let out = redis_benchmark(
        &proxy,
        &[
            "-P",
            "8",
            "-t",
            "ping,set,get,incr,lpush,rpush,lpop,rpop,sadd,hset,spop,lrange_100,mset",
        ],
    )
    .await;
    for test in ["\"SET\"", "\"GET\"", "\"MSET (10 keys)\"", "\"LRANGE_100"] {
        assert!(out.contains(test), "{test} ran: {out}");
    }
    proxy.stop().await;
}

/// The same with `--multiplex-max-batches 1`, with 16 KiB values among small ones (which go
/// without waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_with_held_batches() {
    let proxy = multiplexed(ProxyOptions {
        multiplex_max_batches: Some(1),
        ..Default::default()
    })
    .await;
    // LRANGE_100 only with small elements: with 16 KiB ones each reply is 1.6 MB.
    for (size, tests) in [
        ("3", "set,get,lpush,lrange_100"),
        ("16384", "set,get"),
        ("40000", "set,get"),
    ] {
        let out = redis_benchmark(&proxy, &["-P", "4", "-d", size, "-t", tests]).await;
        assert!(out.contains("\"GET\""), "{out}");
    }
    proxy.stop().await;
}

/// Stopping the proxy ends shared clients (after what they are owed), the routers and the
/// shared sessions: the stop completes and the client sees its connection close.
#[tokio::test]
async fn stopping_ends_shared_clients_and_shared_connections() {
    let proxy = multiplexed(ProxyOptions {
        drain_timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    })
    .await;
    let mut c = proxy.client().await;
    assert_eq!(
        c.command(&[b"SET", b"stop:k", b"v"]).await.unwrap(),
        Reply::Simple("OK".into())
    );
    let redis = proxy.redis.clone();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(STEP, proxy.stop())
        .await
        .expect("the proxy stops");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped before the drain timeout"
    );
    let closed = tokio::time::timeout(STEP, c.read_reply())
        .await
        .expect("closed in time");
    assert!(closed.is_err(), "the shared client is closed: {closed:?}");
    // The shared connection is gone from the server too.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let list = redis.client_list().await.expect("CLIENT LIST");
        if !list
            .iter()
            .any(|c| c.get("user").is_some_and(|u| u.starts_with("oid-")))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "shared connection still open: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A library naming itself when it connects (`CLIENT SETINFO`), and an application sending
/// the password it is configured with (`AUTH`), are answered by the proxy and go on sharing;
/// a value Redis would refuse pins the client, and the server answers it.
#[tokio::test]
async fn client_setinfo_is_answered_and_the_client_keeps_sharing() {
    let proxy = multiplexed(ProxyOptions::default()).await;
    let mut c = proxy.client().await;
    let mut bytes = Vec::new();
    for args in [
        &[&b"AUTH"[..], b"app-password"][..],
        &[b"CLIENT", b"SETINFO", b"LIB-NAME", b"my-lib"],
        &[b"client", b"setinfo", b"lib-ver", b"1.2.3"],
        &[b"auth", b"app", b"app-password"],
        &[b"CLIENT", b"MAINT_NOTIFICATIONS", b"ON"],
        &[b"GET", b"setinfo:k"],
    ] {
        bytes.extend(redis_entra_proxy::devenv::encode(args));
    }
    c.write_raw(&bytes).await.unwrap();
    for _ in 0..4 {
        assert_eq!(c.read_reply().await.unwrap(), Reply::Simple("OK".into()));
    }
    // Refused, as on a connection of its own (Lettuce goes on without it).
    let maint = c.read_reply().await.unwrap();
    assert!(
        matches!(&maint, Reply::Error(e) if e.contains("MAINT_NOTIFICATIONS is not supported")),
        "{maint:?}"
    );
    assert_eq!(c.read_reply().await.unwrap(), Reply::Bulk(None));
    // Still shared: the server has only shared connections (one per session thread used so
    // far), which ran the readiness PING and the GET, never the SETINFO or the AUTH.
    let conns = proxy_conns(&proxy).await;
    assert!(
        conns
            .iter()
            .all(|c| c["cmd"] == "get" || c["cmd"] == "ping"),
        "{conns:?}"
    );
    // A name with a space is Redis's to refuse: the client pins and gets the server's error.
    let reply = c
        .command(&[b"CLIENT", b"SETINFO", b"LIB-NAME", b"my lib"])
        .await
        .unwrap();
    assert!(matches!(reply, Reply::Error(_)), "{reply:?}");
    assert_eq!(
        proxy_conns(&proxy).await.len(),
        conns.len() + 1,
        "pinned: a connection of its own"
    );
    proxy.stop().await;
}

/// `CLIENT SETNAME` (redis-py's `client_name`, Jedis's `clientName`, …) keeps a client
/// shared: the proxy answers it, and `CLIENT GETNAME`, in order among the shared replies, in
/// the client's protocol. A client that pins gets a connection named so before its command
/// runs, with no extra reply; a name Redis refuses is the server's to refuse.
#[tokio::test]
async fn client_setname_keeps_the_client_shared_and_names_its_own_connection() {
    let proxy = multiplexed_on_one_thread().await;
    let before = connections_received(&proxy).await;
    let mut raw = proxy.raw().await;
    raw.send(&pipeline(&[
        &["CLIENT", "GETNAME"],
        &["SET", "name:k", "v"],
        &["CLIENT", "SETNAME", "billing-7"],
        &["GET", "name:k"],
        &["CLIENT", "GETNAME"],
        &["CLIENT", "SETNAME", ""],
        &["CLIENT", "GETNAME"],
        &["HELLO", "3"],
        &["CLIENT", "GETNAME"],
        &["client", "setname", "billing-8"],
        &["GET", "name:none"],
    ]))
    .await;
    raw.expect(b"$-1\r\n+OK\r\n+OK\r\n$1\r\nv\r\n$9\r\nbilling-7\r\n+OK\r\n$-1\r\n")
        .await;
    assert_hello(&raw.read_frame().await, 3);
    raw.expect(b"_\r\n+OK\r\n_\r\n").await;
    // Only the RESP3 shared connection was opened (for the HELLO), none of the client's own,
    // and no connection of the server's has a name.
    assert_eq!(connections_received(&proxy).await - before, 1);
    assert!(
        proxy_conns(&proxy)
            .await
            .iter()
            .all(|c| c["name"].is_empty()),
        "{:?}",
        proxy_conns(&proxy).await
    );

    // CLIENT INFO pins: the client's own connection speaks RESP3 and carries the name, and the
    // only reply is CLIENT INFO's.
    raw.send(&pipeline(&[&["CLIENT", "INFO"], &["CLIENT", "GETNAME"]]))
        .await;
    let info = String::from_utf8(raw.read_frame().await).unwrap();
    assert!(
        info.contains(" name=billing-8 ") && info.contains(" resp=3"),
        "{info:?}"
    );
    raw.expect(b"$9\r\nbilling-8\r\n").await;
    assert_eq!(connections_received(&proxy).await - before, 2);

    // go-redis v9 and Lettuce name themselves in their HELLO: the proxy keeps the name and
    // the client shares the RESP3 connection.
    let before = connections_received(&proxy).await;
    let mut go = proxy.raw().await;
    go.send(&pipeline(&[
        &[
            "HELLO",
            "3",
            "AUTH",
            "app",
            "app-password",
            "SETNAME",
            "go-svc",
        ],
        &["CLIENT", "GETNAME"],
        &["GET", "name:k"],
    ]))
    .await;
    assert_hello(&go.read_frame().await, 3);
    go.expect(b"$6\r\ngo-svc\r\n$1\r\nv\r\n").await;
    assert_eq!(connections_received(&proxy).await, before, "shared");
    assert!(
        proxy_conns(&proxy)
            .await
            .iter()
            .all(|c| c["name"] != "go-svc"),
        "the name stays with the proxy"
    );

    // A name with a space: the client pins, and the server refuses it.
    let mut c = proxy.client().await;
    let reply = c
        .command(&[b"CLIENT", b"SETNAME", b"bad name"])
        .await
        .unwrap();
    assert!(
        matches!(&reply, Reply::Error(e) if e.contains("cannot contain spaces")),
        "{reply:?}"
    );
    assert_eq!(
        c.command(&[b"CLIENT", b"GETNAME"]).await.unwrap(),
        Reply::Bulk(None)
    );
    let mut c = proxy.client().await;
    let reply = c
        .command(&[b"HELLO", b"3", b"SETNAME", b"bad name"])
        .await
        .unwrap();
    assert!(
        matches!(&reply, Reply::Error(e) if e.contains("cannot contain spaces")),
        "{reply:?}"
    );
    proxy.stop().await;
}

fn python() -> String {
    std::env::var("REDIS_PY_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// redis-py (which sends `CLIENT SETINFO` on every new connection, and `HELLO 3` with
/// `protocol=3`) shares: 6 clients in threads, half of them RESP3, run SET/GET/HGETALL for 2 s
/// while the server sees at most one connection per session thread and protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_clients_share_connections() {
    let proxy = multiplexed(ProxyOptions::default()).await;
    let script = format!(
        r#"
import threading, time, redis
errors, ops = [], [0]
def run(i):
    r = redis.Redis(host="127.0.0.1", port={port}, single_connection_client=True,
                    protocol=3 if i % 2 else 2, client_name=f"w{{i}}")
    name = r.client_getname()  # str in RESP2, bytes in RESP3 (redis-py decodes only the first)
    if (name.decode() if isinstance(name, bytes) else name) != f"w{{i}}":
        errors.append(f"name of {{i}}: {{name!r}}")
    n, end = 0, time.time() + 2.0
    while time.time() < end:
        key = f"py:{{i}}:{{n}}"
        r.set(key, n)
        if int(r.get(key)) != n:
            errors.append(key)
        r.hset(f"py:h:{{i}}", "n", n)
        if r.hgetall(f"py:h:{{i}}") != {{b"n": str(n).encode()}}:
            errors.append(f"py:h:{{i}}")
        n += 1
    ops[0] += n
threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
print(ops[0], len(errors))
"#,
        port = proxy.addr.port()
    );
    let run = tokio::spawn(async move { run_tool(&python(), &["-c", &script], None).await });
    // Sample the server's connections while the clients run.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let conns = proxy_conns(&proxy).await;
    let (ok, out, err) = run.await.expect("python");
    assert!(ok, "redis-py script failed: {out}\n{err}");
    let mut fields = out.split_whitespace();
    let ops: u64 = fields.next().and_then(|s| s.parse().ok()).expect("ops");
    assert_eq!(fields.next(), Some("0"), "no wrong value: {out}");
    assert!(ops > 100, "{out}");
    assert!(
        (1..=4).contains(&conns.len()),
        "6 redis-py clients over the shared connections: {conns:?}"
    );
    assert!(conns.iter().any(|c| c["resp"] == "3"), "{conns:?}");
    proxy.stop().await;
}

/// RESP3 clients (`HELLO 3`: go-redis v9, Lettuce, redis-py with `protocol=3`) share too, over
/// a connection of each thread that speaks RESP3, while RESP2 clients share one speaking RESP2:
/// each gets its replies in its own protocol (maps, nulls, doubles), and the server accepts no
/// more connections than threads times protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_clients_share_a_connection_speaking_resp3() {
    let proxy = multiplexed(ProxyOptions::default()).await;
    let before = connections_received(&proxy).await;
    let addr = proxy.addr;
    let mut tasks = Vec::new();
    for c in 0..16u32 {
        let proto = if c % 2 == 0 { 3 } else { 2 };
        tasks.push(tokio::spawn(async move {
            let mut raw = Raw(tokio::net::TcpStream::connect(addr).await.expect("connect"));
            if proto == 3 {
                // As go-redis and redis-py send it, with a password configured or not.
                let hello = match c % 4 {
                    0 => cmd(&["HELLO", "3"]),
                    _ => cmd(&["HELLO", "3", "AUTH", "app", "app-password"]),
                };
                raw.send(&hello).await;
                assert_hello(&raw.read_frame().await, 3);
            } else {
                // What ioredis asks first: server-wide, so it shares.
                raw.send(&cmd(&["INFO", "server"])).await;
                let info = raw.read_frame().await;
                assert!(String::from_utf8_lossy(&info).contains("redis_version"));
            }
            let (h, z, missing) = (
                format!("r3:h:{c}"),
                format!("r3:z:{c}"),
                format!("r3:none:{c}"),
            );
            for round in 0..20u32 {
                let value = format!("v{round}");
                let mut bytes = cmd(&["HSET", &h, "f", &value]);
                bytes.extend(cmd(&["HGETALL", &h]));
                bytes.extend(cmd(&["GET", &missing]));
                bytes.extend(cmd(&["ZADD", &z, "1.5", "m"]));
                bytes.extend(cmd(&["ZSCORE", &z, "m"]));
                raw.send(&bytes).await;
                let fresh = if round == 0 { ":1\r\n" } else { ":0\r\n" };
                let pair = format!("$1\r\nf\r\n${}\r\n{value}\r\n", value.len());
                let expected = if proto == 3 {
                    format!("{fresh}%1\r\n{pair}_\r\n{fresh},1.5\r\n")
                } else {
                    format!("{fresh}*2\r\n{pair}$-1\r\n{fresh}$3\r\n1.5\r\n")
                };
                raw.expect(expected.as_bytes()).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let opened = connections_received(&proxy).await - before;
    assert!(
        opened <= 4,
        "16 clients, 2 protocols, 2 session threads: {opened} upstream connections opened"
    );
    let conns = proxy_conns(&proxy).await;
    assert!(conns.iter().any(|c| c["resp"] == "3"), "{conns:?}");
    assert!(conns.iter().any(|c| c["resp"] == "2"), "{conns:?}");
    proxy.stop().await;
}

/// One write: `HELLO 3`, a read, `HELLO 2`, a read, `HELLO 3`, then a command that pins. Each
/// `HELLO` moves the client to the other protocol's shared connection only after the replies
/// it is owed on the first; once pinned, its own connection speaks the protocol it chose.
#[tokio::test]
async fn a_client_moves_between_protocols_in_order_and_pins_in_its_own() {
    let proxy = multiplexed(ProxyOptions::default()).await;
    let mut raw = proxy.raw().await;
    raw.send(&pipeline(&[
        &["HSET", "proto:h", "f", "v"],
        &["HELLO", "3"],
        &["GET", "proto:none"],
        &["HELLO", "2"],
        &["GET", "proto:none"],
        &["HELLO", "3"],
        &["GET", "proto:none"],
        &["CLIENT", "ID"],
        &["GET", "proto:none"],
        &["HGETALL", "proto:h"],
    ]))
    .await;
    raw.expect(b":1\r\n").await;
    assert_hello(&raw.read_frame().await, 3);
    raw.expect(b"_\r\n").await;
    assert_hello(&raw.read_frame().await, 2);
    raw.expect(b"$-1\r\n").await;
    assert_hello(&raw.read_frame().await, 3);
    raw.expect(b"_\r\n").await;
    let id = String::from_utf8(raw.read_frame().await).unwrap();
    let id = id
        .trim()
        .strip_prefix(':')
        .expect("CLIENT ID is an integer")
        .to_owned();
    // Pinned, and still RESP3.
    raw.expect(b"_\r\n%1\r\n$1\r\nf\r\n$1\r\nv\r\n").await;
    let conns = proxy_conns(&proxy).await;
    let own = conns
        .iter()
        .find(|c| c["id"] == id)
        .expect("its own connection");
    assert_eq!(own["resp"], "3", "{own:?}");
    // The shared connections of both protocols are still there for others.
    assert!(
        conns.iter().any(|c| c["resp"] == "2" && c["id"] != id),
        "{conns:?}"
    );
    assert!(
        conns.iter().any(|c| c["resp"] == "3" && c["id"] != id),
        "{conns:?}"
    );
    proxy.stop().await;
}

/// `redis-benchmark -3` (every client says `HELLO 3` first) shares: its clients open no
/// connections of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_in_resp3_shares() {
    let proxy = multiplexed(ProxyOptions::default()).await;
    let before = connections_received(&proxy).await;
    let out = redis_benchmark(
        &proxy,
        &["-3", "-P", "4", "-t", "ping,set,get,lpush,lrange_100,hset"],
    )
    .await;
    assert!(out.contains("\"LRANGE_100"), "{out}");
    let opened = connections_received(&proxy).await - before;
    // 7 tests of 20 clients each would open 140 without sharing. redis-benchmark's own
    // `CONFIG GET` at the start pins one client.
    assert!(opened <= 6, "{opened} upstream connections opened");
    proxy.stop().await;
}

/// The metrics say how many clients share now and how many pinned: what an operator checks to
/// see whether an application's clients share at all. (Metrics are per process and the tests
/// of this file run at once: only lower bounds hold.)
#[tokio::test]
async fn metrics_count_shared_and_pinned_clients() {
    let proxy = multiplexed(ProxyOptions {
        admin: true,
        ..Default::default()
    })
    .await;
    let metric = |name: &'static str| {
        let admin = proxy.admin_addr.expect("admin endpoint");
        async move {
            let (_, body) = http_get(admin, "/metrics").await;
            support::cluster::sum_metric(&body, name, "")
        }
    };
    let mut a = proxy.client().await;
    let mut b = proxy.client().await;
    for c in [&mut a, &mut b] {
        assert_eq!(
            c.command(&[b"PING"]).await.unwrap(),
            Reply::Simple("PONG".into())
        );
    }
    assert!(metric("redis_entra_proxy_multiplex_shared_clients").await >= 2.0);
    assert!(metric("redis_entra_proxy_multiplex_batches_total").await >= 1.0);
    // The registry is the process's: other tests pin clients too, so counts only grow.
    let connection = || async {
        let (_, body) = http_get(proxy.admin_addr.expect("admin endpoint"), "/metrics").await;
        support::cluster::sum_metric(
            &body,
            "redis_entra_proxy_multiplex_pinned_total",
            "reason=\"connection\"",
        )
    };
    let pinned = metric("redis_entra_proxy_multiplex_pinned_total").await;
    let by_connection = connection().await;
    assert_eq!(
        a.command(&[b"SELECT", b"0"]).await.unwrap(),
        Reply::Simple("OK".into())
    );
    assert!(metric("redis_entra_proxy_multiplex_pinned_total").await >= pinned + 1.0);
    // Counted by reason: SELECT changes the connection's state.
    assert!(connection().await >= by_connection + 1.0);
    proxy.stop().await;
}

/// Requests the proxy answers itself, pipelined between shared ones (node-redis writes
/// `HELLO 3` and `CLIENT SETINFO` together when it connects), get their replies in order, and
/// the client goes on sharing.
#[tokio::test]
async fn local_replies_keep_their_place_among_shared_ones() {
    // One session thread, whose RESP2 shared connection the readiness check opened already.
    let proxy = multiplexed_on_one_thread().await;
    let before = connections_received(&proxy).await;
    let mut raw = proxy.raw().await;
    raw.send(&pipeline(&[
        &["SET", "local:k", "v"],
        &["CLIENT", "SETINFO", "LIB-NAME", "node-redis"],
        &["GET", "local:k"],
        &["AUTH", "app-password"],
        &["HELLO", "3"],
        &["CLIENT", "SETINFO", "LIB-VER", "5.0.0"],
        &["GET", "local:none"],
        &["CLIENT", "MAINT_NOTIFICATIONS", "ON"],
        &["INCR", "local:n"],
    ]))
    .await;
    raw.expect(b"+OK\r\n+OK\r\n$1\r\nv\r\n+OK\r\n").await;
    assert_hello(&raw.read_frame().await, 3);
    raw.expect(b"+OK\r\n_\r\n").await;
    let maint = String::from_utf8(raw.read_frame().await).unwrap();
    assert!(
        maint.starts_with("-ERR CLIENT MAINT_NOTIFICATIONS"),
        "{maint:?}"
    );
    raw.expect(b":1\r\n").await;
    // Only the RESP3 shared connection was opened, none of the client's own.
    let opened = connections_received(&proxy).await - before;
    assert_eq!(opened, 1, "upstream connections opened");
    proxy.stop().await;
}

/// A shared client whose server went away is closed without a reply when no new shared
/// connection can be opened, as its own connection would have been closed by the server:
/// client libraries retry a closed connection, not an error reply.
#[tokio::test]
async fn a_shared_client_whose_server_went_away_sees_a_closed_connection() {
    let proxy = multiplexed_on_one_thread().await;
    let mut served = proxy.client().await;
    assert_eq!(
        served.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    // The server goes away (its reply to SHUTDOWN is the connection closing).
    let _ = proxy.redis.command(&[b"SHUTDOWN", b"NOSAVE"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    served.send(&[b"GET", b"k"]).await.unwrap();
    let got = tokio::time::timeout(STEP, served.read_reply())
        .await
        .expect("closed in time");
    assert!(got.is_err(), "closed without a reply: {got:?}");
    // A new one too, after what the proxy answered itself (redis-py's CLIENT SETINFO).
    let mut raw = proxy.raw().await;
    raw.send(b"CLIENT SETINFO LIB-NAME redis-py\r\nGET k\r\n")
        .await;
    let got = String::from_utf8(raw.read_to_end().await).unwrap();
    assert_eq!(got, "+OK\r\n");
}

/// When no shared connection can be opened (nothing listens), every client waiting is
/// closed without a reply, as a connection of its own would be, however many commands it
/// sent.
#[tokio::test]
async fn when_no_connection_can_be_opened_every_shared_client_is_closed() {
    // Nothing listens there.
    let unreachable = free_addr();
    let proxy = multiplexed(ProxyOptions {
        upstream: Some((unreachable.to_string(), false, None)),
        no_ready_wait: true,
        ..Default::default()
    })
    .await;
    for input in [
        &b"GET x\r\n"[..],
        b"GET x\r\nGET y\r\n",
        b"PING\r\nPING\r\nPING\r\n",
    ] {
        let mut raw = proxy.raw().await;
        raw.send(input).await;
        let got = String::from_utf8(raw.read_to_end().await).unwrap();
        assert_eq!(got, "", "{input:?}");
    }
}
