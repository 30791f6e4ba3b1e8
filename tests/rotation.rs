//! Live re-authentication against the Azure Managed Redis stand-in of `testing.md`: one ACL
//! user per token generation, deleted when that token expires, so Redis closes every
//! connection still authenticated with it, exactly as AMR does. A proxy that does not
//! re-authenticate every connection in time loses connections here at once.
//!
//! Durations: tokens rotate every 2 s. `ROTATION_TEST_SECS` (default 60) bounds the load run.
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Refresh at 75 % of a 2.667 s lifetime: a new generation every 2 s, each deleted 0.667 s
/// after the next one is issued.
const LIFETIME: Duration = Duration::from_millis(2667);

fn run_for() -> Duration {
    let secs = std::env::var("ROTATION_TEST_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

async fn rotating_proxy() -> Proxy {
    Proxy::start_with(ProxyOptions {
        token_lifetime: LIFETIME,
        ..Default::default()
    })
    .await
}

/// Waits (bounded) until every upstream connection is on one generation, the newest.
async fn assert_all_on_newest(proxy: &Proxy, expected_conns: usize) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let gens = proxy.upstream_generations().await;
        let newest = gens.iter().copied().max().unwrap_or(0);
        if gens.len() == expected_conns && gens.iter().all(|&g| g == newest) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections not converged: {gens:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One client: pipelines of 8 commands with replies checked byte for byte, until `until`.
async fn pipelined_client(
    proxy_addr: std::net::SocketAddr,
    id: usize,
    until: tokio::time::Instant,
    replies: Arc<AtomicU64>,
) {
    let mut s = TcpStream::connect(proxy_addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let key = format!("k{id}");
    let mut n: u64 = 0;
    let mut buf = vec![0u8; 4096];
    while tokio::time::Instant::now() < until {
        let mut req = Vec::new();
        let mut want = Vec::new();
        for _ in 0..4 {
            n += 1;
            req.extend(format!("*2\r\n$4\r\nINCR\r\n${}\r\n{key}\r\n", key.len()).bytes());
            want.extend(format!(":{n}\r\n").bytes());
            req.extend(format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).bytes());
            let v = n.to_string();
            want.extend(format!("${}\r\n{v}\r\n", v.len()).bytes());
        }
        s.write_all(&req).await.expect("write");
        let mut got = Vec::new();
        while got.len() < want.len() {
            let r = tokio::time::timeout(STEP, s.read(&mut buf))
                .await
                .expect("reply in time")
                .expect("read");
            assert!(
                r > 0,
                "client {id}: connection closed by the proxy after {n} commands"
            );
            got.extend_from_slice(&buf[..r]);
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "client {id}"
        );
        replies.fetch_add(8, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_loses_nothing() {
    let proxy = rotating_proxy().await;
    // An idle connection held across the whole run: it must follow every rotation too.
    let mut idle = proxy.client().await;
    assert_eq!(
        idle.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    let clients = 200;
    let until = tokio::time::Instant::now() + run_for();
    let replies = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|i| tokio::spawn(pipelined_client(proxy.addr, i, until, replies.clone())))
        .collect();
    for t in tasks {
        t.await
            .expect("client task: no error reply, no closed connection");
    }
    assert_eq!(
        idle.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    let gens = proxy.upstream_generations().await;
    let rotations = gens.iter().copied().max().unwrap_or(0).saturating_sub(1);
    eprintln!(
        "{} replies checked over {rotations} rotations",
        replies.load(Ordering::Relaxed)
    );
    assert!(
        rotations as f64 >= run_for().as_secs_f64() / 2.0 - 2.0,
        "too few rotations: {rotations}"
    );
    // The load clients are gone; the idle connection is the only one left, on the newest.
    assert_all_on_newest(&proxy, 1).await;
}

/// Reads pub/sub messages `seq:<n>` from a subscriber socket and checks they are consecutive.
async fn expect_sequence(s: &mut TcpStream, resp3: bool, count: u64) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 8192];
    let mut next = 0u64;
    let head = if resp3 { ">3\r\n" } else { "*3\r\n" };
    while next < count {
        let frame = format!("{head}$7\r\nmessage\r\n$2\r\nch\r\n");
        // Parse as many complete messages as the buffer holds.
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some(rest) = text.strip_prefix(&frame) else {
                break;
            };
            let Some((len_line, after)) = rest.split_once("\r\n") else {
                break;
            };
            let len: usize = len_line
                .trim_start_matches('$')
                .parse()
                .expect("bulk length");
            if after.len() < len + 2 {
                break;
            }
            let payload = &after[..len];
            assert_eq!(
                payload,
                format!("seq:{next}"),
                "gap, duplicate or reordering (resp3={resp3})"
            );
            next += 1;
            let consumed = frame.len() + len_line.len() + 2 + len + 2;
            buf.drain(..consumed);
        }
        if next >= count {
            break;
        }
        let n = tokio::time::timeout(STEP, s.read(&mut chunk))
            .await
            .expect("message in time")
            .expect("read");
        assert!(
            n > 0,
            "subscriber (resp3={resp3}) disconnected after {next} messages"
        );
        buf.extend_from_slice(&chunk[..n]);
        assert!(
            !buf.is_empty() && (buf[0] == head.as_bytes()[0]),
            "unexpected frame: {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(80)])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_survives_rotations_without_gaps() {
    let proxy = rotating_proxy().await;
    let mut resp2 = TcpStream::connect(proxy.addr).await.unwrap();
    resp2.write_all(b"SUBSCRIBE ch\r\n").await.unwrap();
    let mut ack = [0u8; 32];
    let want = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n";
    resp2.read_exact(&mut ack[..want.len()]).await.unwrap();
    assert_eq!(&ack[..want.len()], want);

    let mut resp3 = TcpStream::connect(proxy.addr).await.unwrap();
    resp3.write_all(b"HELLO 3\r\n").await.unwrap();
    let mut hello = vec![0u8; 1];
    resp3.read_exact(&mut hello).await.unwrap();
    assert_eq!(hello, b"%");
    // Drain the rest of the HELLO map, then subscribe.
    let mut rest = vec![0u8; 4096];
    let n = tokio::time::timeout(STEP, resp3.read(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&rest[..n]).contains("proto"));
    resp3.write_all(b"SUBSCRIBE ch\r\n").await.unwrap();
    let want3 = b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n";
    resp3.read_exact(&mut ack[..want3.len()]).await.unwrap();
    assert_eq!(&ack[..want3.len()], want3);

    // 30 rotations at 2 s: publish for 60 s at ~100 messages per second.
    let duration = run_for();
    let per_sec = 100u64;
    let count = duration.as_secs() * per_sec;
    let addr = proxy.addr;
    let publisher = tokio::spawn(async move {
        let mut p = TcpStream::connect(addr).await.unwrap();
        let mut sink = vec![0u8; 64];
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / per_sec));
        for i in 0..count {
            tick.tick().await;
            let msg = format!("seq:{i}");
            let cmd = format!(
                "*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n${}\r\n{msg}\r\n",
                msg.len()
            );
            p.write_all(cmd.as_bytes()).await.unwrap();
            // `:2\r\n`: both subscribers received it.
            let n = tokio::time::timeout(STEP, p.read(&mut sink))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                &sink[..n],
                b":2\r\n",
                "message {i} did not reach both subscribers"
            );
        }
    });
    let (a, b) = tokio::join!(
        expect_sequence(&mut resp2, false, count),
        expect_sequence(&mut resp3, true, count)
    );
    let _ = (a, b);
    publisher.await.expect("publisher");
    let gens = proxy.upstream_generations().await;
    let newest = gens.iter().copied().max().unwrap_or(0);
    assert!(
        newest as f64 >= duration.as_secs_f64() / 2.0 - 1.0,
        "rotations: {}",
        newest - 1
    );
}
