//! End to end through the real proxy: an Entra source (the real `azure_identity` code path,
//! its requests redirected to a loopback mock by `Redirect`) feeds `run_with_source`, whose
//! sessions authenticate to a TLS `redis-server` standing in for Azure Managed Redis. The
//! stand-in knows one ACL user, named after the token's `oid` with the token as password, so a
//! client's PING answered through the proxy and `user=<oid>` in `CLIENT LIST` show that the
//! token the identity endpoint issued reached Redis as `AUTH <oid> <token>`.
//!
//! Everything runs on 127.0.0.1: the IMDS and `login.microsoftonline.com` URLs the real code
//! builds are recorded by `Redirect` and never contacted.

use tokio_util::sync::CancellationToken;

use super::*;
use crate::cli::Options;
use crate::devenv::{mint_token, RedisOptions, RedisServer, Reply, RespConn};

/// Pause between readiness probes of the proxy; it offers no "ready" signal besides
/// answering, and a short pause adds little latency.
const POLL: Duration = Duration::from_millis(20);
/// How long the proxy may take to fetch its first token and answer a PING, and to drain.
const STEP: Duration = Duration::from_secs(15);

/// The stand-in server with one user for `oid`, and a token for that user valid for an hour.
async fn redis_with_user(oid: &str) -> (RedisServer, String, u64) {
    let redis = RedisServer::start(RedisOptions::default())
        .await
        .expect("redis-server starts (apt-get install redis-server)");
    let expires_on = unix_now() + 3600;
    let token = mint_token(oid, expires_on);
    redis.acl_setuser(oid, &token).await.expect("ACL SETUSER");
    (redis, token, expires_on)
}

/// Runs the proxy in front of `redis` with `source`, waits until a client's PING is answered,
/// checks that Redis sees the proxy's connection as `oid`, and shuts the proxy down.
async fn proxy_authenticates_as(redis: &RedisServer, source: Arc<dyn TokenSource>, oid: &str) {
    let options = Options {
        listen: Some("127.0.0.1:0".into()),
        upstream: Some(redis.addr().to_string()),
        upstream_tls: Some(true),
        upstream_ca_file: redis.ca_file().map(|p| p.to_path_buf()),
        upstream_server_name: Some("localhost".into()),
        admin_listen: Some("none".into()),
        ..Default::default()
    };
    let config = crate::config::validate(options, None).expect("valid test config");
    let listeners = crate::bind(&config).await.expect("bind port 0");
    let addr = listeners
        .tcp
        .as_ref()
        .expect("a tcp listener")
        .local_addr()
        .expect("local addr");
    assert!(addr.ip().is_loopback());
    let shutdown = CancellationToken::new();
    let proxy = tokio::spawn(crate::run_with_source(
        config,
        listeners,
        source,
        shutdown.clone(),
    ));

    let mut client = ping_until_pong(addr).await;
    let clients = redis.client_list().await.expect("CLIENT LIST");
    let users: Vec<&str> = clients
        .iter()
        .filter_map(|c| c.get("user").map(String::as_str))
        .collect();
    assert!(
        users.contains(&oid),
        "a connection authenticated as {oid}: {users:?}"
    );
    // And it keeps working: a write and a read through the same client.
    let set = client.command(&[b"SET", b"e2e-key", oid.as_bytes()]).await;
    assert!(
        matches!(set, Ok(Reply::Simple(ref s)) if s == "OK"),
        "{set:?}"
    );
    drop(client);

    shutdown.cancel();
    tokio::time::timeout(STEP, proxy)
        .await
        .expect("the proxy stops within its bound")
        .expect("the proxy task does not panic")
        .expect("the proxy ends cleanly");
}

/// Connects and PINGs until PONG, within [`STEP`]; returns the connection that got it.
async fn ping_until_pong(addr: std::net::SocketAddr) -> RespConn {
    let deadline = tokio::time::Instant::now() + STEP;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        if let Ok(mut conn) = RespConn::connect_plain(addr).await {
            match tokio::time::timeout(STEP, conn.command(&[b"PING"])).await {
                Ok(Ok(Reply::Simple(s))) if s == "PONG" => return conn,
                other => last = format!("{other:?}"),
            }
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("no PONG through the proxy within {STEP:?}; last answer {last}");
}

#[tokio::test]
async fn managed_identity_token_reaches_redis() {
    bounded(async {
        let oid = "e2e-oid";
        let (redis, token, expires_on) = redis_with_user(oid).await;
        let server = MockServer::answering(200, msi_answer(&token, expires_on)).await;
        let redirect = Redirect::to(&server);
        let source = source_in(managed_identity("system", redirect.clone()), &env(&[]))
            .expect("managed identity source");
        assert_eq!(source.name(), "managed-identity");

        proxy_authenticates_as(&redis, source, oid).await;

        // What the real code sent: to IMDS (recorded, never contacted) ...
        let sent = redirect.sent();
        assert!(!sent.is_empty());
        for request in &sent {
            assert_eq!(request.url.host_str(), Some("169.254.169.254"));
            assert_eq!(request.header("metadata"), Some("true"));
            assert_msi_request(request, "system");
        }
        // ... and what the loopback mock received.
        let received = server.requests();
        assert_eq!(received.len(), sent.len());
        for request in &received {
            assert_eq!(request.url.path(), "/metadata/identity/oauth2/token");
            assert_eq!(request.header("metadata"), Some("true"));
            assert_eq!(
                request.query("resource").as_deref(),
                Some("https://redis.azure.com")
            );
        }
    })
    .await
}

#[tokio::test]
async fn service_principal_token_reaches_redis() {
    const TENANT: &str = "11111111-2222-3333-4444-555555555555";
    const CLIENT: &str = "e2e-app-client-id";
    const SECRET: &str = "e2e-client-secret-do-not-print";
    bounded(async {
        let oid = "e2e-sp-oid";
        let (redis, token, _) = redis_with_user(oid).await;
        let answer = serde_json::json!({
            "token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600,
            "access_token": token,
        });
        let server = MockServer::answering(200, answer.to_string()).await;
        let redirect = Redirect::to(&server);
        let config = EntraConfig {
            kind: EntraKind::ServicePrincipal,
            tenant_id: Some(TENANT.into()),
            client_id: Some(CLIENT.into()),
            client_secret: Some(Secret::new(SECRET)),
            transport: Some(redirect.clone()),
            ..Default::default()
        };
        let source = source_in(config, &env(&[])).expect("service principal source");

        proxy_authenticates_as(&redis, source, oid).await;

        let sent = redirect.sent();
        assert!(!sent.is_empty());
        for request in &sent {
            assert_eq!(request.method, "POST");
            assert_eq!(
                request.url.as_str(),
                format!("https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token")
            );
            assert_eq!(request.form("scope").as_deref(), Some(DEFAULT_SCOPE));
            assert_eq!(request.form("client_id").as_deref(), Some(CLIENT));
            assert_eq!(request.form("client_secret").as_deref(), Some(SECRET));
            assert_eq!(
                request.form("grant_type").as_deref(),
                Some("client_credentials")
            );
        }
        assert_eq!(server.requests().len(), sent.len());
    })
    .await
}
