//! `--client-idle-timeout` (Redis's `timeout`) and `--partial-request-timeout` (slow or stalled
//! senders holding an incomplete request open), and requests held back by backpressure, which
//! must be served once there is room even if the client sends nothing more.

mod support;

use std::time::{Duration, Instant};

use support::{Proxy, ProxyOptions, Raw, Reply, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Whether the proxy closed `raw` within `within` (EOF or reset), reading and dropping
/// whatever comes first.
async fn closed_within(raw: &mut Raw, within: Duration) -> bool {
    let mut sink = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, raw.0.read(&mut sink)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn idle_clients_are_closed_but_not_subscribers_monitors_or_blocked_ones() {
    let idle = Duration::from_millis(400);
    let proxy = Proxy::start_with(ProxyOptions {
        client_idle_timeout: Some(idle),
        ..Default::default()
    })
    .await;

    let mut quiet = proxy.raw().await;
    quiet.send(b"PING\r\n").await;
    quiet.expect(b"+PONG\r\n").await;

    let mut subscriber = proxy.raw().await;
    subscriber.send(b"SUBSCRIBE news\r\n").await;
    subscriber
        .expect(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n")
        .await;

    let mut monitor = proxy.raw().await;
    monitor.send(b"MONITOR\r\n").await;
    monitor.expect(b"+OK\r\n").await;

    // Blocked for longer than the idle timeout: it is owed a reply, so it is not idle.
    let mut blocked = proxy.raw().await;
    blocked.send(b"BLPOP idle:nothing 2\r\n").await;

    // Keeps talking, each gap shorter than the timeout.
    let mut chatty = proxy.client().await;
    let started = Instant::now();
    assert!(
        closed_within(&mut quiet, idle * 4).await,
        "an idle client is closed"
    );
    assert!(
        started.elapsed() >= idle - Duration::from_millis(50),
        "not before the timeout ({:?})",
        started.elapsed()
    );
    while started.elapsed() < idle * 3 {
        assert_eq!(
            chatty.command(&[b"PING"]).await.expect("chatty PING"),
            Reply::Simple("PONG".into())
        );
        tokio::time::sleep(idle / 4).await;
    }

    // The exempt ones still work.
    let mut publisher = proxy.client().await;
    assert_eq!(
        publisher
            .command(&[b"PUBLISH", b"news", b"hello"])
            .await
            .expect("publish"),
        Reply::Integer(1)
    );
    subscriber
        .expect(b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n")
        .await;
    let mut line = [0u8; 1];
    monitor.0.read_exact(&mut line).await.expect("monitor line");
    assert_eq!(line[0], b'+', "MONITOR still streams");
    blocked.expect(b"*-1\r\n").await;
    // Once its reply is delivered, the blocked client is an idle one like any other.
    assert!(closed_within(&mut blocked, idle * 4).await);
    proxy.stop().await;
}

#[tokio::test]
async fn a_request_left_incomplete_is_closed_after_the_partial_request_timeout() {
    partial_requests(false).await;
}

/// The same, for a client that shares a connection (its own clock, in the multiplexer).
#[tokio::test]
async fn a_shared_client_is_held_to_the_partial_request_timeout_too() {
    partial_requests(true).await;
}

async fn partial_requests(multiplex: bool) {
    let limit = Duration::from_millis(500);
    let proxy = Proxy::start_with(ProxyOptions {
        partial_request_timeout: Some(limit),
        multiplex,
        ..Default::default()
    })
    .await;

    // A bulk announced and never sent, after a command that is answered first.
    let mut stalled = proxy.raw().await;
    stalled
        .send(b"PING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\nabc")
        .await;
    stalled.expect(b"+PONG\r\n").await;
    let started = Instant::now();
    assert!(closed_within(&mut stalled, limit * 4).await);
    assert!(started.elapsed() >= limit - Duration::from_millis(100));

    // Slowloris: one byte at a time, each well within the limit, never finishing.
    let mut slow = proxy.raw().await;
    let started = Instant::now();
    let header = b"*2\r\n$3\r\nGET\r\n$50\r\n"
        .iter()
        .chain([b'x'; 50].iter());
    let mut closed = false;
    for &b in header {
        if slow.0.write_all(&[b]).await.is_err() {
            closed = true;
            break;
        }
        if closed_within(&mut slow, limit / 5).await {
            closed = true;
            break;
        }
        assert!(started.elapsed() < limit * 6, "slowloris not closed");
    }
    assert!(closed, "a trickled request is closed");
    assert!(started.elapsed() < limit * 4, "{:?}", started.elapsed());

    // A steady pipeline whose writes end mid-request, but whose requests keep completing,
    // runs for several times the limit.
    let mut steady = proxy.raw().await;
    let cmd = b"*3\r\n$3\r\nSET\r\n$6\r\nsteady\r\n$5\r\nvalue\r\n";
    let (head, tail) = cmd.split_at(cmd.len() / 2);
    let started = Instant::now();
    steady.send(head).await;
    let mut completed = 0usize;
    while started.elapsed() < limit * 3 {
        // The end of one request and the beginning of the next.
        steady.send(tail).await;
        steady.send(head).await;
        completed += 1;
        tokio::time::sleep(limit / 5).await;
    }
    steady.send(tail).await;
    completed += 1;
    steady.send(b"PING\r\n").await;
    let mut want = b"+OK\r\n".repeat(completed);
    want.extend_from_slice(b"+PONG\r\n");
    steady.expect(&want).await;
    proxy.stop().await;
}

/// The idle clock starts when the last reply went out, not when the request came in: a
/// reply slower than the timeout is not followed by a close, in either mode.
#[tokio::test]
async fn the_idle_time_counts_from_the_last_reply() {
    for multiplex in [false, true] {
        let idle = Duration::from_millis(400);
        let proxy = Proxy::start_with(ProxyOptions {
            client_idle_timeout: Some(idle),
            multiplex,
            ..Default::default()
        })
        .await;
        let mut c = proxy.raw().await;
        c.send(b"SET slow v\r\n").await;
        c.expect(b"+OK\r\n").await;
        proxy
            .redis
            .command(&[b"CLIENT", b"PAUSE", b"1000", b"ALL"])
            .await
            .unwrap();
        c.send(b"GET slow\r\n").await;
        c.expect(b"$1\r\nv\r\n").await;
        // At once after the late reply: served, not closed.
        c.send(b"PING\r\n").await;
        c.expect(b"+PONG\r\n").await;
        // And idle afterwards, closed.
        assert!(
            closed_within(&mut c, idle * 4).await,
            "multiplex {multiplex}"
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_big_pipeline_written_before_reading_then_half_closed_gets_every_reply() {
    let proxy = Proxy::start().await;
    let value = vec![b'v'; 1024];
    let mut pipeline = Vec::new();
    let n = 20_000;
    for i in 0..n {
        let key = format!("held:{}", i % 100);
        pipeline.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
                key.len(),
                value.len()
            )
            .as_bytes(),
        );
        pipeline.extend_from_slice(&value);
        pipeline.extend_from_slice(b"\r\n");
        pipeline.extend_from_slice(
            format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).as_bytes(),
        );
    }
    let reply_len = n * (5 + format!("${}\r\n", value.len()).len() + value.len() + 2);
    let stream = proxy.raw().await.0;
    let (mut rd, mut wr) = stream.into_split();
    // Writes the whole pipeline (about 21 MB) and half-closes, while nothing is read for a
    // while: the proxy stops reading when its buffers are full, and must still answer every
    // request it already read once the client starts reading, with no further input.
    let writer = tokio::spawn(async move {
        wr.write_all(&pipeline).await.expect("write pipeline");
        wr.shutdown().await.expect("half-close");
        wr
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut got = Vec::with_capacity(reply_len);
    tokio::time::timeout(STEP * 3, rd.read_to_end(&mut got))
        .await
        .expect("every reply within bound")
        .expect("read");
    let _wr = tokio::time::timeout(STEP, writer)
        .await
        .expect("writer done")
        .expect("writer");
    assert_eq!(got.len(), reply_len, "every reply, nothing more");
    let one = [
        b"+OK\r\n".as_slice(),
        format!("${}\r\n", value.len()).as_bytes(),
        &value,
        b"\r\n",
    ]
    .concat();
    assert!(got.chunks(one.len()).all(|c| c == one.as_slice()));
    proxy.stop().await;
}
