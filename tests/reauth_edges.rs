//! Re-authentication edge cases: a connection blocked when its token's deadline comes, and a
//! server that refuses the new token. In both the server itself never closes the connection
//! here (identities are kept after expiry), so any close is the proxy's own decision, made
//! before the token expires, cleanly, without touching other connections.
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_entra_proxy::dev::DevTokenSource;
use redis_entra_proxy::devenv::{RedisOptions, RedisServer};
use support::*;

const LIFETIME: Duration = Duration::from_millis(2667);

async fn proxy_with(source: impl FnOnce(Arc<RedisServer>) -> DevTokenSource) -> Proxy {
    let redis = Arc::new(
        RedisServer::start(RedisOptions::default())
            .await
            .expect("redis starts"),
    );
    let source = Arc::new(source(redis.clone()));
    Proxy::start_on(
        redis,
        ProxyOptions {
            source: Some(source),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_connection_is_closed_before_its_token_expires() {
    let proxy = proxy_with(|r| DevTokenSource::new(r, LIFETIME, "oid").keep_users()).await;
    let mut idle = proxy.client().await;
    assert_eq!(
        idle.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    let mut blocked = proxy.raw().await;
    let start = Instant::now();
    blocked.send(b"BLPOP never-filled 0\r\n").await;
    // The AUTH for the next token waits behind the BLPOP; at the deadline, shortly before
    // the first token's expiry, the proxy closes the connection rather than let it run on an
    // expired token.
    let rest = blocked.read_to_end().await;
    let elapsed = start.elapsed();
    assert!(
        rest.is_empty(),
        "no reply expected, got {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(
        elapsed < LIFETIME,
        "closed after {elapsed:?}, token lifetime {LIFETIME:?}"
    );
    assert!(elapsed > LIFETIME / 2, "closed too early: {elapsed:?}");
    // The idle connection re-authenticated and lives on.
    tokio::time::sleep(LIFETIME).await;
    assert_eq!(
        idle.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_reauth_keeps_serving_until_the_deadline() {
    // Generation 2 onwards is unknown to the server: every re-AUTH is refused.
    let proxy = proxy_with(|r| {
        DevTokenSource::new(r, LIFETIME, "oid")
            .keep_users()
            .refuse_from(2)
    })
    .await;
    let mut c = proxy.client().await;
    let start = Instant::now();
    let mut served = 0;
    // Commands keep working on the still-valid first token while re-AUTH fails and is retried.
    loop {
        match tokio::time::timeout(STEP, c.command(&[b"INCR", b"n"]))
            .await
            .expect("bounded")
        {
            Ok(Reply::Integer(n)) => {
                served = n;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(other) => panic!("unexpected reply {other:?}"),
            Err(_) => break,
        }
        assert!(
            start.elapsed() < STEP,
            "the proxy never closed the connection"
        );
    }
    let elapsed = start.elapsed();
    assert!(served >= 20, "served only {served} commands");
    assert!(
        elapsed < LIFETIME + Duration::from_millis(200),
        "closed after {elapsed:?}"
    );
    let users: Vec<String> = proxy
        .redis
        .client_list()
        .await
        .unwrap()
        .iter()
        .filter_map(|c| c.get("user").cloned())
        .collect();
    assert!(
        !users.iter().any(|u| u.starts_with("oid-")),
        "upstream connection left open: {users:?}"
    );
}
