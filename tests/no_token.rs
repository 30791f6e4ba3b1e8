//! With no valid token the proxy still listens, answers every command with an error naming
//! the cause, and says why in `/readyz`; it keeps retrying the token source.
mod support;

use std::sync::Arc;
use std::time::Duration;

use redis_entra_proxy::credentials::exec::ExecSource;
use redis_entra_proxy::credentials::file::FieldPaths;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_gets_the_cause_until_a_token_arrives() {
    let source = ExecSource::new(
        "echo 'identity endpoint unreachable' >&2; exit 3".into(),
        FieldPaths::default(),
        Duration::from_secs(5),
    );
    let proxy = Proxy::start_with(ProxyOptions {
        admin: true,
        no_ready_wait: true,
        source: Some(Arc::new(source)),
        ..Default::default()
    })
    .await;
    let (status, body) = http_get(proxy.admin_addr.unwrap(), "/startupz").await;
    assert_eq!(status, 503);
    assert!(body.contains("waiting for the first token"), "{body}");
    // Nothing left: an alert on a short time left fires for a proxy that never got a token.
    let (_, metrics) = http_get(proxy.admin_addr.unwrap(), "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "redis_entra_proxy_token_expires_in_seconds 0"),
        "{metrics}"
    );
    let mut c = proxy.raw().await;
    c.send(b"PING\r\nGET k\r\n").await;
    let want = "-ERR redis-entra-proxy has no valid token: the first token has not been acquired yet; see the proxy's log and /readyz\r\n";
    // The proxy waits a few seconds for a first token before answering.
    c.expect(format!("{want}{want}").as_bytes()).await;
    let (status, body) = http_get(proxy.admin_addr.unwrap(), "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        body.contains("no token yet") && body.contains("identity endpoint unreachable"),
        "{body}"
    );
    c.send(b"QUIT\r\n").await;
    c.expect(b"+OK\r\n").await;
    assert!(c.read_to_end().await.is_empty());
}

/// A client that has not given the local password is held to Redis's limits for such clients
/// while no token is held too: a big bulk is refused as it starts, not buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_an_unauthenticated_client_cannot_send_big_requests() {
    let source = ExecSource::new(
        "exit 3".into(),
        FieldPaths::default(),
        Duration::from_secs(5),
    );
    let proxy = Proxy::start_with(ProxyOptions {
        no_ready_wait: true,
        source: Some(Arc::new(source)),
        local_password: Some("pw".into()),
        ..Default::default()
    })
    .await;
    let mut c = proxy.raw().await;
    c.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1000000\r\n").await;
    c.expect(b"-ERR Protocol error: unauthenticated bulk length\r\n")
        .await;
    assert!(c.read_to_end().await.is_empty());
}
