//! The admin endpoint: probes and Prometheus metrics, against a real proxy and server.
mod support;

use std::sync::Arc;
use std::time::Duration;

use redis_entra_proxy::credentials::fixed::FixedSource;
use redis_entra_proxy::devenv::mint_token;
use redis_entra_proxy::secret::Secret;
use support::*;

/// Value of an unlabelled or labelled sample line starting with `prefix`.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn probes_and_metrics_of_a_working_proxy() {
    let proxy = Proxy::start_with(ProxyOptions {
        admin: true,
        ..Default::default()
    })
    .await;
    let admin = proxy.admin_addr.expect("admin endpoint");
    assert_eq!(http_get(admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(
        http_get(admin, "/startupz").await,
        (200, "started\n".into())
    );
    assert_eq!(http_get(admin, "/readyz").await, (200, "ready\n".into()));
    assert_eq!(http_get(admin, "/nope").await.0, 404);

    let mut c = proxy.client().await;
    for _ in 0..10 {
        c.command(&[b"SET", b"k", b"v"]).await.unwrap();
    }
    let (status, m) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "redis_entra_proxy_client_connections_active",
        "redis_entra_proxy_client_connections_total{outcome=\"served\"}",
        "redis_entra_proxy_upstream_connections_active",
        "redis_entra_proxy_upstream_connect_seconds_count",
        "redis_entra_proxy_commands_total",
        "redis_entra_proxy_bytes_total{direction=\"client_in\"}",
        "redis_entra_proxy_bytes_total{direction=\"upstream_out\"}",
        "redis_entra_proxy_upstream_auth_total{kind=\"initial\",result=\"ok\"}",
        "redis_entra_proxy_upstream_auth_seconds_count{kind=\"initial\"}",
        "redis_entra_proxy_token_refresh_total{source=\"dev\",result=\"ok\"}",
        "redis_entra_proxy_token_expires_in_seconds",
        "redis_entra_proxy_token_generation",
        "redis_entra_proxy_build_info{version=",
        // Registered at 0 before any such event.
        "redis_entra_proxy_connections_closed_total{side=\"upstream\",reason=\"upstream_desync\"}",
        "redis_entra_proxy_upstream_connect_errors_total{kind=\"tls\"}",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "process_open_fds",
        "process_max_fds",
    ] {
        assert!(sample(&m, name).is_some(), "{name} missing from:\n{m}");
    }
    let rss = sample(&m, "process_resident_memory_bytes ").expect("resident memory");
    assert!(rss > 1e6, "{rss}");
    // Metrics are process-wide and tests share the process: compare at least, not equal.
    assert!(sample(&m, "redis_entra_proxy_commands_total").unwrap() >= 10.0);
    assert!(sample(&m, "redis_entra_proxy_client_connections_active").unwrap() >= 1.0);
    let left = sample(&m, "redis_entra_proxy_token_expires_in_seconds").unwrap();
    assert!(left > 3000.0 && left <= 3600.0, "{left}");
    assert!(!m.contains("eyJ"), "a token leaked into the metrics");
}

#[tokio::test]
async fn readyz_says_why_when_the_upstream_refuses_the_token() {
    let redis = Arc::new(
        redis_entra_proxy::devenv::RedisServer::start(Default::default())
            .await
            .unwrap(),
    );
    let exp = std::time::SystemTime::now() + Duration::from_secs(3600);
    let exp = exp.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let token = mint_token("unknown-identity", exp);
    let proxy = Proxy::start_on(
        redis.clone(),
        ProxyOptions {
            admin: true,
            no_ready_wait: true,
            source: Some(Arc::new(FixedSource::new(Secret::new(token.clone())))),
            // No topology reads: the probes' connections are the only ones.
            cluster_mode: Some(redis_entra_proxy::cluster::ClusterMode::Off),
            ..Default::default()
        },
    )
    .await;
    let admin = proxy.admin_addr.unwrap();
    // Bounded poll until the first token is published.
    let deadline = tokio::time::Instant::now() + STEP;
    while http_get(admin, "/startupz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        body.contains("upstream refused the token") && body.contains("WRONGPASS"),
        "{body}"
    );
    assert!(!body.contains(&token));
    assert_eq!(http_get(admin, "/healthz").await.0, 200);

    // Many probes at once, and again and again, cost the upstream one connection every
    // couple of seconds, not one each.
    let received = || async {
        let Reply::Bulk(Some(info)) = redis.command(&[b"INFO", b"stats"]).await.unwrap() else {
            panic!("INFO")
        };
        let info = String::from_utf8(info).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("total_connections_received")
    };
    // What asking costs (a connection of its own, or none).
    let asking = received().await;
    let before = received().await;
    let asking = before - asking;
    // Past the reuse of the probe above.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let probes: Vec<_> = (0..24)
        .map(|_| tokio::spawn(http_get(admin, "/readyz")))
        .collect();
    for p in probes {
        let (status, body) = p.await.unwrap();
        assert_eq!(status, 503);
        assert!(body.contains("WRONGPASS"), "{body}");
    }
    let opened = received().await - before - asking;
    assert_eq!(opened, 1, "upstream connections for 24 probes at once");
}

#[tokio::test]
async fn readyz_is_unready_when_the_upstream_is_down() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let redis = std::sync::Arc::new(
        redis_entra_proxy::devenv::RedisServer::start(Default::default())
            .await
            .unwrap(),
    );
    let exp = std::time::SystemTime::now() + Duration::from_secs(3600);
    let exp = exp.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let proxy = Proxy::start_on(
        redis,
        ProxyOptions {
            admin: true,
            no_ready_wait: true,
            upstream: Some((closed.to_string(), false, None)),
            source: Some(Arc::new(FixedSource::new(Secret::new(mint_token(
                "x", exp,
            ))))),
            ..Default::default()
        },
    )
    .await;
    let admin = proxy.admin_addr.unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (status, body) = http_get(admin, "/readyz").await;
        if body.contains("connect failed") {
            assert_eq!(status, 503);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "unexpected: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// New upstream connections resume the TLS session of an earlier one (redis-server issues
/// TLS 1.3 session tickets): one full handshake, then resumed ones. Counted per kind.
#[tokio::test]
async fn new_upstream_connections_resume_tls_sessions() {
    let proxy = Proxy::start_with(ProxyOptions {
        admin: true,
        ..Default::default()
    })
    .await;
    let admin = proxy.admin_addr.expect("admin endpoint");
    let resumed = |m: &str| {
        sample(
            m,
            "redis_entra_proxy_upstream_tls_handshakes_total{kind=\"resumed\"}",
        )
        .unwrap_or(0.0)
    };
    let before = resumed(&http_get(admin, "/metrics").await.1);
    // One after another, so that each connection has received its tickets (they arrive before
    // the reply to its AUTH) before the next one is opened.
    for _ in 0..5 {
        let mut c = proxy.client().await;
        assert_eq!(
            c.command(&[b"PING"]).await.unwrap(),
            Reply::Simple("PONG".into())
        );
    }
    let (_, m) = http_get(admin, "/metrics").await;
    // Metrics are process-wide: other tests may add handshakes of either kind, never remove.
    assert!(
        resumed(&m) - before >= 5.0,
        "5 resumed handshakes expected:\n{m}"
    );
    assert!(
        sample(
            &m,
            "redis_entra_proxy_upstream_tls_handshakes_total{kind=\"full\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "the first connection's handshake is full:\n{m}"
    );
    proxy.stop().await;
}

/// A failed connect is news `/readyz` does not wait a minute for: right after the upstream
/// went away and a client could not be served, the proxy is unready and says why.
#[tokio::test]
async fn readyz_turns_unready_as_soon_as_a_connect_fails() {
    let proxy = Proxy::start_with(ProxyOptions {
        admin: true,
        ..Default::default()
    })
    .await;
    let admin = proxy.admin_addr.expect("admin endpoint");
    assert_eq!(http_get(admin, "/readyz").await, (200, "ready\n".into()));
    // The server goes away (its admin connection's SHUTDOWN gets no reply).
    let _ = proxy.redis.command(&[b"SHUTDOWN", b"NOSAVE"]).await;
    // A client's connection closes without a reply, as a connection of its own would; the
    // reason is for the operator.
    let mut c = proxy.raw().await;
    c.send(b"PING\r\n").await;
    let got = String::from_utf8(c.read_to_end().await).unwrap();
    assert_eq!(got, "");
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("connect failed"), "{body}");
}

/// When the server goes away under connections already open, `/readyz` turns unready at
/// once, without waiting for a new client to fail to connect: the broken connections are
/// enough for it to ask the server again.
#[tokio::test]
async fn readyz_turns_unready_when_open_connections_break() {
    let proxy = Proxy::start_with(ProxyOptions {
        admin: true,
        ..Default::default()
    })
    .await;
    let admin = proxy.admin_addr.expect("admin endpoint");
    let mut c = proxy.raw().await;
    c.send(b"PING\r\n").await;
    c.expect(b"+PONG\r\n").await;
    assert_eq!(http_get(admin, "/readyz").await, (200, "ready\n".into()));
    let _ = proxy.redis.command(&[b"SHUTDOWN", b"NOSAVE"]).await;
    // The client's connection breaks with the server's.
    let _ = c.read_to_end().await;
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("connect failed"), "{body}");
}

/// Sockets that connect and send nothing cannot keep probes out: with every admin connection
/// taken by them, a probe still gets its answer at once (they are given up oldest first),
/// not after their request timeout of 5 s, which a liveness probe would not survive.
#[tokio::test]
async fn idle_admin_connections_do_not_keep_probes_out() {
    use tokio::io::AsyncReadExt;
    let proxy = Proxy::start_with(ProxyOptions {
        admin: true,
        ..Default::default()
    })
    .await;
    let admin = proxy.admin_addr.expect("admin endpoint");
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(
            tokio::net::TcpStream::connect(admin)
                .await
                .expect("connects"),
        );
    }
    // Let the endpoint take them all in.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let (status, body) = tokio::time::timeout(STEP, http_get(admin, "/healthz"))
        .await
        .expect("answered in time");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "/healthz took {:?}",
        started.elapsed()
    );
    // The oldest idle connection was the one given up.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), idle[0].read(&mut byte))
        .await
        .expect("the oldest idle connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
