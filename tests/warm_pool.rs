//! `--warm-connections`: upstream connections opened and authenticated before clients come,
//! handed out once each, refilled, re-authenticated in place at rotations, and never handed
//! out once the server closed them.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use redis_entra_proxy::devenv::{RedisServer, RespConn};
use support::{Proxy, ProxyOptions, Reply, STEP};

/// Ids and users of the proxy's upstream connections waiting in the pool: authenticated
/// (`oid-*`) and whose last command was the AUTH.
async fn pooled(redis: &RedisServer) -> Vec<(String, String)> {
    let list = redis.client_list().await.expect("CLIENT LIST");
    list.iter()
        .filter(|c| c.get("cmd").map(String::as_str) == Some("auth"))
        .filter_map(|c| {
            let user = c.get("user")?;
            let id = c.get("id")?;
            user.starts_with("oid-").then(|| (id.clone(), user.clone()))
        })
        .collect()
}

/// Waits (bounded) until `cond` holds for the pooled connections; returns them.
async fn wait_pooled(
    redis: &RedisServer,
    what: &str,
    cond: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let now = pooled(redis).await;
        if cond(&now) {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: pooled connections {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ids(conns: &[(String, String)]) -> HashSet<String> {
    conns.iter().map(|(id, _)| id.clone()).collect()
}

async fn client_id(proxy: &Proxy) -> (RespConn, String) {
    let mut c = proxy.client().await;
    match c.command(&[b"CLIENT", b"ID"]).await.expect("CLIENT ID") {
        Reply::Integer(id) => (c, id.to_string()),
        other => panic!("CLIENT ID: {other:?}"),
    }
}

#[tokio::test]
async fn new_clients_get_a_pooled_connection_and_the_pool_refills() {
    let proxy = Proxy::start_with(ProxyOptions {
        warm_connections: Some(3),
        ..Default::default()
    })
    .await;
    let first = wait_pooled(&proxy.redis, "pool filled", |p| p.len() == 3).await;
    let (mut c, id) = client_id(&proxy).await;
    assert!(ids(&first).contains(&id), "served by a pooled connection");
    assert_eq!(
        c.command(&[b"SET", b"warm", b"1"]).await.expect("SET"),
        Reply::Simple("OK".into())
    );
    // Refilled with a new connection; the one handed out is never pooled again.
    let refilled = wait_pooled(&proxy.redis, "pool refilled", |p| p.len() == 3).await;
    assert!(!ids(&refilled).contains(&id));
    // More clients than the pool holds: the rest connect as usual, all are served.
    let mut clients = Vec::new();
    for _ in 0..5 {
        let (c, _) = client_id(&proxy).await;
        clients.push(c);
    }
    let served: usize = 5;
    assert_eq!(clients.len(), served);
    wait_pooled(&proxy.redis, "pool refilled again", |p| p.len() == 3).await;
    proxy.stop().await;
}

#[tokio::test]
async fn pooled_connections_reauthenticate_in_place_at_rotations() {
    // Each token lives 3 s and is refreshed after half its life; the stand-in server deletes
    // a token's user at expiry, closing connections still on it.
    let proxy = Proxy::start_with(ProxyOptions {
        warm_connections: Some(2),
        token_lifetime: Duration::from_secs(3),
        refresh_ratio: 0.5,
        ..Default::default()
    })
    .await;
    let first = wait_pooled(&proxy.redis, "pool filled", |p| p.len() == 2).await;
    let user = first[0].1.clone();
    // Two rotations later the same connections are on a newer user.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = wait_pooled(&proxy.redis, "re-authenticated", |p| {
        p.len() == 2 && p.iter().all(|(_, u)| *u != user)
    })
    .await;
    assert!(
        !ids(&first).is_disjoint(&ids(&later)),
        "re-authenticated in place, not replaced: {first:?} then {later:?}"
    );
    let (mut c, id) = client_id(&proxy).await;
    assert!(ids(&later).contains(&id));
    assert_eq!(
        c.command(&[b"PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );
    proxy.stop().await;
}

#[tokio::test]
async fn connections_the_server_closed_are_never_handed_out() {
    let proxy = Proxy::start_with(ProxyOptions {
        warm_connections: Some(3),
        ..Default::default()
    })
    .await;
    let pool = wait_pooled(&proxy.redis, "pool filled", |p| p.len() == 3).await;
    for (id, _) in &pool {
        let killed = proxy
            .redis
            .command(&[b"CLIENT", b"KILL", b"ID", id.as_bytes()])
            .await
            .expect("CLIENT KILL");
        assert_eq!(killed, Reply::Integer(1));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..3 {
        let (mut c, id) = client_id(&proxy).await;
        assert!(
            !ids(&pool).contains(&id),
            "a killed connection was handed out"
        );
        assert_eq!(
            c.command(&[b"PING"]).await.expect("PING"),
            Reply::Simple("PONG".into())
        );
    }
    proxy.stop().await;
}
