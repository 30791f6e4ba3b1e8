//! Tests of the local setup against the real redis-server: they fail (not skip) when it is
//! missing, because CI installs it and a silent skip would hide a broken fixture.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::*;

/// Bound on waiting for Redis to close a connection after `ACL DELUSER`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

async fn start(opts: RedisOptions) -> RedisServer {
    match RedisServer::start(opts).await {
        Ok(server) => server,
        Err(e) => panic!("starting redis-server: {e}"),
    }
}

fn users(list: &[HashMap<String, String>]) -> Vec<&str> {
    list.iter()
        .filter_map(|c| c.get("user").map(String::as_str))
        .collect()
}

#[test]
fn mint_token_decodes_to_its_claims() {
    let token = mint_token("oid-7", 1_900_000_000);
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "three-part JWT");
    let header: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(parts[0])
            .expect("header is base64url"),
    )
    .expect("header is JSON");
    assert_eq!(header["alg"], "none");
    let payload: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(parts[1])
            .expect("payload is base64url"),
    )
    .expect("payload is JSON");
    assert_eq!(payload["oid"], "oid-7");
    assert_eq!(payload["exp"], 1_900_000_000u64);
    assert_eq!(payload["aud"], "https://redis.azure.com");
    assert!(!parts[2].is_empty(), "signature part present");
    assert_ne!(
        token,
        mint_token("oid-7", 1_900_000_000),
        "tokens differ per call"
    );
}

#[test]
fn parser_handles_nesting_partial_input_and_garbage() {
    let full = b"*3\r\n+OK\r\n$-1\r\n*2\r\n:-5\r\n$3\r\nabc\r\n-ERR x\r\n";
    let (reply, used) = parse(full).expect("valid").expect("complete");
    assert_eq!(
        reply,
        Reply::Array(Some(vec![
            Reply::Simple("OK".into()),
            Reply::Bulk(None),
            Reply::Array(Some(vec![
                Reply::Integer(-5),
                Reply::Bulk(Some(b"abc".to_vec()))
            ])),
        ]))
    );
    assert_eq!(&full[used..], b"-ERR x\r\n");
    for cut in 0..used {
        assert_eq!(
            parse(&full[..cut]).expect("prefix is valid"),
            None,
            "cut at {cut}"
        );
    }
    assert!(parse(b"?what\r\n").is_err());
    assert!(parse(b"$3\r\nabcde\r\n").is_err());
    assert!(parse(b":12x\r\n").is_err());
    let deep = "*1\r\n".repeat(100);
    assert!(parse(deep.as_bytes()).is_err(), "nesting is bounded");
}

#[test]
fn encode_is_multibulk() {
    assert_eq!(
        encode(&[b"GET", b"k"]),
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec()
    );
}

#[test]
fn certs_cover_the_requested_names() {
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let certs = DevCerts::generate(&["localhost", "redis.test"], &[ip]).expect("generate");
    assert!(certs.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(certs.key_pem.contains("PRIVATE KEY"));
    assert!(
        !format!("{certs:?}").contains("PRIVATE KEY"),
        "Debug hides the key"
    );
}

/// The whole AMR emulation: admin commands, a token user, CLIENT LIST, and ACL DELUSER
/// closing the token user's connection.
#[tokio::test]
async fn tls_server_emulates_token_expiry() {
    let server = start(RedisOptions::default()).await;
    assert!(server.tls());
    assert!(server.ca_file().expect("TLS has a CA file").is_file());
    assert_eq!(
        server.command(&[b"PING"]).await.expect("ping"),
        Reply::Simple("PONG".into())
    );

    // The default user is off, as on AMR.
    let mut anon = server.connect().await.expect("connect");
    match anon.command(&[b"PING"]).await.expect("reply") {
        Reply::Error(e) => assert!(e.starts_with("NOAUTH"), "{e}"),
        other => panic!("unauthenticated PING answered {other:?}"),
    }

    let token = mint_token("oid-1", 1_900_000_000);
    server.acl_setuser("oid-1", &token).await.expect("setuser");
    let mut client = server.connect().await.expect("connect");
    let auth = client.command(&[b"AUTH", b"oid-1", token.as_bytes()]).await;
    assert_eq!(auth.expect("auth"), Reply::Simple("OK".into()));
    let set = client.command(&[b"SET", b"k", b"v"]).await.expect("set");
    assert_eq!(set, Reply::Simple("OK".into()));

    let list = server.client_list().await.expect("client list");
    assert!(users(&list).contains(&"oid-1"), "{:?}", users(&list));
    assert!(users(&list).contains(&"admin"));

    server.acl_deluser("oid-1").await.expect("deluser");
    let began = Instant::now();
    match tokio::time::timeout(CLOSE_TIMEOUT, client.read_reply()).await {
        Ok(Err(e @ (DevError::Closed | DevError::Io(_)))) => eprintln!("DELUSER -> {e:?}"),
        Ok(other) => panic!("expected the connection to close, got {other:?}"),
        Err(_) => panic!("connection still open {CLOSE_TIMEOUT:?} after ACL DELUSER"),
    }
    eprintln!(
        "ACL DELUSER closed the connection after {:?}",
        began.elapsed()
    );
    let list = server.client_list().await.expect("client list");
    assert!(!users(&list).contains(&"oid-1"));
}

#[tokio::test]
async fn kill_and_restart_keep_port_certs_and_users() {
    let mut server = start(RedisOptions::default()).await;
    let (port, ca) = (server.port(), server.ca_pem().map(str::to_owned));
    server
        .acl_setuser("oid-2", "secret-2")
        .await
        .expect("setuser");
    server.kill().await.expect("kill");
    assert_eq!(server.pid(), None);
    assert!(
        server.connect().await.is_err(),
        "nothing listens after kill"
    );
    assert!(matches!(
        server.command(&[b"PING"]).await,
        Err(DevError::NotRunning)
    ));

    server.restart().await.expect("restart");
    assert_eq!(server.port(), port);
    assert_eq!(server.ca_pem().map(str::to_owned), ca);
    assert_eq!(
        server.command(&[b"PING"]).await.expect("ping"),
        Reply::Simple("PONG".into())
    );
    let mut client = server.connect().await.expect("connect");
    let auth = client.command(&[b"AUTH", b"oid-2", b"secret-2"]).await;
    assert_eq!(auth.expect("auth"), Reply::Simple("OK".into()));
}

#[tokio::test]
async fn plain_server_and_cleanup_on_drop() {
    let opts = RedisOptions {
        tls: false,
        extra_args: vec!["--maxmemory".into(), "64mb".into()],
        ..RedisOptions::default()
    };
    let server = start(opts).await;
    assert!(!server.tls());
    assert_eq!(server.ca_file(), None);
    let reply = server
        .command(&[b"CONFIG", b"GET", b"maxmemory"])
        .await
        .expect("config");
    let expected = vec![
        Reply::Bulk(Some(b"maxmemory".to_vec())),
        Reply::Bulk(Some(b"67108864".to_vec())),
    ];
    assert_eq!(reply, Reply::Array(Some(expected)));

    let dir = server.dir().to_owned();
    let pid = server.pid().expect("running");
    drop(server);
    assert!(!dir.exists(), "temporary directory removed");
    // SIGKILL is asynchronous; wait (bounded) until the process is gone or a zombie.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
        if stat.is_empty() || state == Some('Z') {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server {pid} still running after drop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn startup_failure_reports_the_log_without_the_password() {
    let opts = RedisOptions {
        extra_args: vec!["--no-such-directive".into(), "1".into()],
        admin_password: "hunter2-do-not-print".into(),
        ..RedisOptions::default()
    };
    let err = RedisServer::start(opts)
        .await
        .expect_err("bad directive must fail");
    let text = err.to_string();
    assert!(matches!(err, DevError::NotReady { .. }), "{text}");
    assert!(
        text.contains("no-such-directive"),
        "log tail quoted: {text}"
    );
    assert!(!text.contains("hunter2"), "password leaked: {text}");
}

#[tokio::test]
async fn restart_retries_then_reports_a_taken_port() {
    let mut server = start(RedisOptions::default()).await;
    server.kill().await.expect("kill");
    let squatter = std::net::TcpListener::bind(server.addr()).expect("take the port");
    let err = server.restart().await.expect_err("port is taken");
    assert!(err.to_string().contains("Address already in use"), "{err}");
    drop(squatter);
    server
        .restart()
        .await
        .expect("restart once the port is free");
    assert_eq!(
        server.command(&[b"PING"]).await.expect("ping"),
        Reply::Simple("PONG".into())
    );
}

#[tokio::test]
async fn certificate_carries_the_requested_dns_names() {
    let opts = RedisOptions {
        dns_names: vec!["localhost".into(), "redis.test".into()],
        ..RedisOptions::default()
    };
    let server = start(opts).await;
    let config = server.tls_config().expect("TLS");
    for name in ["localhost", "redis.test", "127.0.0.1"] {
        let conn = RespConn::connect_tls(server.addr(), config.clone(), name).await;
        assert!(conn.is_ok(), "{name}: {conn:?}");
    }
    let wrong = RespConn::connect_tls(server.addr(), config, "other.test").await;
    assert!(matches!(wrong, Err(DevError::Tls(_))), "{wrong:?}");
}

#[test]
fn server_can_be_shared_across_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RedisServer>();
    assert_send_sync::<DevError>();
}
