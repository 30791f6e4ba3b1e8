//! Lifecycle: draining on shutdown loses no reply Redis produced, and the connection limit
//! answers like Redis's `maxclients`.
mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_pipelines() {
    let proxy = Proxy::start_with(ProxyOptions {
        drain_timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    })
    .await;
    let mut raw = proxy.raw().await;
    // Served before the shutdown (a connection still in the listen backlog when the
    // listener closes is reset by the kernel, before anything was executed).
    raw.send(b"PING\r\n").await;
    raw.expect(b"+PONG\r\n").await;
    let n = 5000;
    let pipeline = "INCR drained\r\n".repeat(n);
    raw.send(pipeline.as_bytes()).await;
    // Shut down while the pipeline is in flight.
    proxy.shutdown.cancel();
    let got = raw.read_to_end().await;
    let text = String::from_utf8_lossy(&got);
    let want: String = (1..=n).map(|i| format!(":{i}\r\n")).collect();
    assert_eq!(text.len(), want.len(), "replies lost in the drain");
    assert_eq!(text, want);
    // No new connections after shutdown: refused, or closed without a reply.
    match tokio::net::TcpStream::connect(proxy.addr).await {
        Err(_) => {}
        Ok(mut s) => {
            let _ = s.write_all(b"PING\r\n").await;
            let mut buf = Vec::new();
            let r = tokio::time::timeout(STEP, s.read_to_end(&mut buf))
                .await
                .expect("bounded");
            assert!(
                r.is_err() || buf.is_empty(),
                "served after shutdown: {buf:?}"
            );
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn connection_limit_answers_like_maxclients() {
    let proxy = Proxy::start_with(ProxyOptions {
        max_connections: Some(2),
        ..Default::default()
    })
    .await;
    let mut a = proxy.client().await;
    let mut b = proxy.client().await;
    assert_eq!(
        a.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    assert_eq!(
        b.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    let mut c = proxy.raw().await;
    c.expect(b"-ERR max number of clients reached\r\n").await;
    assert!(c.read_to_end().await.is_empty());
    drop(a);
    // The slot frees when the session ends: bounded polling for a served connection.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let mut d = proxy.client().await;
        if let Ok(Reply::Simple(s)) = d.command(&[b"PING"]).await {
            assert_eq!(s, "PONG");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
