//! Upstream faults, each ending in a clear error or a clean close for the client concerned
//! and nothing lost for the others: a refused connection, a certificate from the wrong CA,
//! Redis refusing the proxy's token, a server closing in the middle of a reply, and
//! redis-server killed and restarted. Also: the proxy's token never reaches a client.
//!
//! Not covered here: client-side AUTH and HELLO (`auth.rs`), token sources failing.
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis_entra_proxy::credentials::fixed::FixedSource;
use redis_entra_proxy::credentials::TokenSource;
use redis_entra_proxy::devenv::{mint_token, parse, DevCerts, RedisOptions, RedisServer, RespConn};
use redis_entra_proxy::secret::Secret;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How fast a client must learn that its upstream failed: well under the 10 s `STEP`, so a
/// proxy that waits for some unrelated timeout is caught.
const FAIL_FAST: Duration = Duration::from_secs(5);

/// A proxy that does not wait to be ready (its upstream may be unreachable). Stopped and
/// aborted on drop.
struct Bare {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Drop for Bare {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

/// A token source whose token Redis knows as user `oid` only if the test registers it.
fn fixed_source(oid: &str) -> (Arc<dyn TokenSource>, String) {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + 86_400;
    let token = mint_token(oid, exp);
    (
        Arc::new(FixedSource::new(Secret::new(token.clone()))),
        token,
    )
}

/// Builds the proxy as `support::Proxy::start_on` does, without its readiness poll.
async fn start_bare(
    upstream: (String, bool, Option<PathBuf>),
    source: Arc<dyn TokenSource>,
    connect_timeout: Option<Duration>,
) -> Bare {
    let (addr, tls, ca) = upstream;
    let options = redis_entra_proxy::cli::Options {
        listen: Some("127.0.0.1:0".into()),
        upstream: Some(addr),
        upstream_tls: Some(tls),
        upstream_ca_file: ca,
        upstream_server_name: Some("localhost".into()),
        connect_timeout,
        admin_listen: Some("none".into()),
        ..Default::default()
    };
    let config = redis_entra_proxy::config::validate(options, None).expect("valid test config");
    let listeners = redis_entra_proxy::bind(&config).await.expect("bind");
    let addr = listeners
        .tcp
        .as_ref()
        .expect("tcp listener")
        .local_addr()
        .expect("local addr");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            redis_entra_proxy::run_with_source(config, listeners, source, shutdown)
                .await
                .expect("proxy runs");
        }
    });
    Bare {
        addr,
        shutdown,
        task,
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A reply as text, bulk strings included, to search it.
fn render(reply: &Reply) -> String {
    match reply {
        Reply::Simple(s) | Reply::Error(s) => format!("{s}\n"),
        Reply::Integer(n) => format!("{n}\n"),
        Reply::Bulk(b) => format!("{}\n", text(b.as_deref().unwrap_or_default())),
        Reply::Array(items) => items.iter().flatten().map(render).collect(),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Sends `input` on fresh connections until the proxy has its first token (before that a
/// client is refused with "no valid token"), and returns what that connection got up to EOF,
/// with how long it took.
async fn first_session_output(addr: SocketAddr, input: &[u8]) -> (Vec<u8>, Duration) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let start = tokio::time::Instant::now();
        let mut raw = Raw(TcpStream::connect(addr).await.expect("connect to proxy"));
        raw.send(input).await;
        let out = raw.read_to_end().await;
        if !contains(&out, b"has no valid token") {
            return (out, start.elapsed());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no token within {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts `out` is exactly one error reply starting with `prefix` and containing every one
/// of `needles`.
fn assert_one_error(out: &[u8], prefix: &str, needles: &[&str]) {
    let s = text(out);
    assert!(s.starts_with(prefix) && s.ends_with("\r\n"), "{s:?}");
    assert_eq!(
        s.matches("\r\n").count(),
        1,
        "exactly one reply, then EOF: {s:?}"
    );
    for needle in needles {
        assert!(s.contains(needle), "{needle:?} missing in {s:?}");
    }
}

#[tokio::test]
async fn upstream_refusing_connections() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let (source, _) = fixed_source("oid-x");
    let upstream = (closed.to_string(), true, None);
    let bare = start_bare(upstream, source, Some(Duration::from_secs(2))).await;
    // A server that is down: the client's connection closes at once without a reply, as a
    // connection of its own would (client libraries retry that, not an error reply).
    for client in 0..2 {
        let (out, took) = first_session_output(bare.addr, b"*1\r\n$4\r\nPING\r\n").await;
        assert_eq!(text(&out), "", "client {client}");
        assert!(took < FAIL_FAST, "client {client} waited {took:?}");
    }
}

#[tokio::test]
async fn upstream_certificate_from_another_ca() {
    let redis = RedisServer::start(RedisOptions::default())
        .await
        .expect("redis-server starts");
    let other =
        DevCerts::generate(&["localhost"], &["127.0.0.1".parse().expect("IP")]).expect("certs");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("other-ca.pem");
    std::fs::write(&ca, &other.ca_pem).expect("write CA");
    let (source, _) = fixed_source("oid-x");
    let bare = start_bare(
        (redis.addr().to_string(), true, Some(ca)),
        source,
        Some(Duration::from_secs(2)),
    )
    .await;
    for _ in 0..2 {
        let (out, took) = first_session_output(bare.addr, b"PING\r\n").await;
        assert_one_error(&out, "-ERR ", &["redis-entra-proxy", "TLS"]);
        assert!(took < FAIL_FAST, "waited {took:?}");
    }
}

#[tokio::test]
async fn upstream_refusing_the_token() {
    let redis = RedisServer::start(RedisOptions::default())
        .await
        .expect("redis-server starts");
    let (source, token) = fixed_source("nobody"); // no such ACL user
    let upstream = (
        redis.addr().to_string(),
        true,
        redis.ca_file().map(|p| p.to_path_buf()),
    );
    let bare = start_bare(upstream, source, None).await;
    // Commands pipelined behind the failed AUTH get no answer of their own; each new client
    // is told the same and the proxy keeps serving.
    for input in [
        &b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"[..],
        b"PING\r\n",
    ] {
        let (out, took) = first_session_output(bare.addr, input).await;
        assert_one_error(&out, "-WRONGPASS ", &["redis-entra-proxy", "nobody"]);
        assert!(
            !contains(&out, token.as_bytes()),
            "the token reached the client"
        );
        assert!(took < FAIL_FAST, "waited {took:?}");
    }
}

/// With a token known to the test, nothing a client can see carries it: replies, errors,
/// `CLIENT INFO`/`CLIENT LIST`, and MONITOR while another client's upstream authenticates.
#[tokio::test]
async fn token_never_reaches_clients() {
    let redis = RedisServer::start(RedisOptions::default())
        .await
        .expect("redis-server starts");
    let (source, token) = fixed_source("fixed-oid");
    redis
        .acl_setuser("fixed-oid", &token)
        .await
        .expect("ACL SETUSER");
    let upstream = (
        redis.addr().to_string(),
        true,
        redis.ca_file().map(|p| p.to_path_buf()),
    );
    let bare = start_bare(upstream, source, None).await;
    let (probe, _) = first_session_output(bare.addr, b"PING\r\nQUIT\r\n").await;
    assert_eq!(text(&probe), "+PONG\r\n+OK\r\n");

    let mut mon = RespConn::connect_plain(bare.addr).await.expect("connect");
    assert_eq!(
        mon.command(&[b"MONITOR"]).await.expect("MONITOR"),
        Reply::Simple("OK".into())
    );
    let mut c = RespConn::connect_plain(bare.addr).await.expect("connect");
    let mut seen = String::new();
    for args in [
        &[&b"HELLO"[..], b"2", b"AUTH", b"u", b"p"][..],
        &[b"CLIENT", b"INFO"],
        &[b"CLIENT", b"LIST"],
        &[b"ACL", b"WHOAMI"],
        &[b"AUTH", b"a", b"b"],
        &[b"SET", b"probe-key", b"1"],
    ] {
        seen += &render(&c.command(args).await.expect("reply"));
    }
    assert!(
        seen.contains("fixed-oid"),
        "not authenticated as the token's oid: {seen}"
    );
    // MONITOR shows the new upstream connection's commands, its AUTH included; read until SET.
    let deadline = tokio::time::Instant::now() + STEP;
    while !seen.contains("probe-key") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "MONITOR did not show the SET"
        );
        let line = tokio::time::timeout(STEP, mon.read_reply())
            .await
            .expect("monitor line");
        seen += &render(&line.expect("monitor line"));
    }
    assert!(!seen.contains(&token), "the token reached a client: {seen}");
}

/// A fake upstream speaking plain RESP: answers AUTH `+OK`, PING `+PONG`, `ECHO x` with `x`,
/// and `GET half` with the first bytes of a 10-byte bulk, then closes the connection.
async fn fake_upstream() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake upstream");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        // Ends when the test drops the handle (aborted with the runtime).
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(fake_session(conn));
        }
    });
    (addr, task)
}

async fn fake_session(mut conn: TcpStream) {
    let mut buf = Vec::new();
    loop {
        while let Some((cmd, used)) = parse(&buf).expect("proxy sends RESP") {
            buf.drain(..used);
            let Reply::Array(Some(args)) = cmd else {
                panic!("not a command: {cmd:?}")
            };
            let arg = |i: usize| match args.get(i) {
                Some(Reply::Bulk(Some(b))) => b.clone(),
                _ => Vec::new(),
            };
            let reply: Vec<u8> = match arg(0).to_ascii_uppercase().as_slice() {
                b"AUTH" => b"+OK\r\n".to_vec(),
                b"PING" => b"+PONG\r\n".to_vec(),
                b"ECHO" => [
                    format!("${}\r\n", arg(1).len()).into_bytes(),
                    arg(1),
                    b"\r\n".to_vec(),
                ]
                .concat(),
                b"GET" if arg(1) == b"half" => {
                    let _ = conn.write_all(b"$10\r\nabc").await;
                    let _ = conn.shutdown().await;
                    return;
                }
                _ => b"-ERR fake upstream: unknown command\r\n".to_vec(),
            };
            if conn.write_all(&reply).await.is_err() {
                return;
            }
        }
        match conn.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn upstream_closing_mid_reply() {
    let (fake, _fake_task) = fake_upstream().await;
    let (source, _) = fixed_source("oid-f");
    let bare = start_bare((fake.to_string(), false, None), source, None).await;
    let (ready, _) = first_session_output(bare.addr, b"PING\r\nQUIT\r\n").await;
    assert_eq!(text(&ready), "+PONG\r\n+OK\r\n");

    let mut other = RespConn::connect_plain(bare.addr).await.expect("connect");
    assert_eq!(
        other.command(&[b"PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );

    let mut victim = Raw(TcpStream::connect(bare.addr).await.expect("connect"));
    let start = tokio::time::Instant::now();
    victim.send(b"*2\r\n$3\r\nGET\r\n$4\r\nhalf\r\n").await;
    let got = victim.read_to_end().await;
    let took = start.elapsed();
    // The partial bulk may have been relayed as it arrived, but never completed or padded.
    assert!(b"$10\r\nabc".starts_with(&got), "got {:?}", text(&got));
    assert!(took < FAIL_FAST, "EOF after {took:?}");

    // The other client, on its own upstream connection, is unaffected; new clients work.
    assert_eq!(
        other.command(&[b"ECHO", b"still"]).await.expect("ECHO"),
        Reply::Bulk(Some(b"still".to_vec()))
    );
    let mut fresh = RespConn::connect_plain(bare.addr).await.expect("connect");
    assert_eq!(
        fresh.command(&[b"PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );
}

#[tokio::test]
async fn redis_killed_and_restarted() {
    // The harness shares its server behind an `Arc`, which `kill` (needing `&mut`) cannot go
    // through: this test owns its server and gives the proxy a fixed token registered as an
    // ACL user, which `restart` re-creates.
    let mut redis = RedisServer::start(RedisOptions::default())
        .await
        .expect("redis-server starts");
    let (source, token) = fixed_source("oid-k");
    redis
        .acl_setuser("oid-k", &token)
        .await
        .expect("ACL SETUSER");
    let upstream = (
        redis.addr().to_string(),
        true,
        redis.ca_file().map(|p| p.to_path_buf()),
    );
    let bare = start_bare(upstream, source, Some(Duration::from_secs(2))).await;
    let (ready, _) = first_session_output(bare.addr, b"PING\r\nQUIT\r\n").await;
    assert_eq!(text(&ready), "+PONG\r\n+OK\r\n");

    let mut c = RespConn::connect_plain(bare.addr).await.expect("connect");
    assert_eq!(
        c.command(&[b"SET", b"k", b"v"]).await.expect("SET"),
        Reply::Simple("OK".into())
    );

    redis.kill().await.expect("kill");
    let start = tokio::time::Instant::now();
    let after = tokio::time::timeout(FAIL_FAST, c.command(&[b"GET", b"k"]))
        .await
        .expect("client told within bound");
    assert!(after.is_err(), "a reply from a dead server: {after:?}");
    // While the server is down, a new client's connection closes at once, as a connection of
    // its own would.
    let (out, took) = first_session_output(bare.addr, b"PING\r\n").await;
    assert_eq!(text(&out), "");
    assert!(
        took < FAIL_FAST && start.elapsed() < STEP,
        "waited {took:?}"
    );

    redis.restart().await.expect("restart");
    let mut c = RespConn::connect_plain(bare.addr).await.expect("connect");
    assert_eq!(
        c.command(&[b"PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );
    assert_eq!(
        c.command(&[b"GET", b"k"]).await.expect("GET"),
        Reply::Bulk(None),
        "no persistence"
    );
    let list = redis.client_list().await.expect("CLIENT LIST");
    assert!(
        list.iter()
            .any(|e| e.get("user").map(String::as_str) == Some("oid-k")),
        "{list:?}"
    );
}

/// Accepts connections and holds them open without a byte in either direction (a server
/// that hangs), reading and dropping whatever arrives when `read` is set. Returns its address.
async fn silent_upstream(read: bool) -> (SocketAddr, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = listener.accept().await {
            if read {
                tokio::spawn(async move {
                    let mut sink = [0u8; 1024];
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut conn, &mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            } else {
                held.push(conn);
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn tls_handshake_that_never_completes() {
    let (addr, server) = silent_upstream(false).await;
    let (source, _) = fixed_source("oid-x");
    let upstream = (addr.to_string(), true, None);
    let bare = start_bare(upstream, source, Some(Duration::from_secs(1))).await;
    // Bounded by --connect-timeout, then closed without a reply: a server that hangs, as a
    // connection of the client's own would end in its own timeout.
    let (out, took) = first_session_output(bare.addr, b"*1\r\n$4\r\nPING\r\n").await;
    assert_eq!(text(&out), "");
    assert!(
        took >= Duration::from_millis(900) && took < FAIL_FAST,
        "waited {took:?}"
    );
    server.abort();
}

#[tokio::test]
async fn upstream_that_never_answers_auth() {
    let (addr, server) = silent_upstream(true).await;
    let (source, token) = fixed_source("oid-x");
    let upstream = (addr.to_string(), false, None);
    let bare = start_bare(upstream, source, Some(Duration::from_secs(1))).await;
    // A pipeline: the client hears one error for all of it, then the close.
    let (out, took) = first_session_output(
        bare.addr,
        b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
    )
    .await;
    assert_one_error(
        &out,
        "-ERR ",
        &["redis-entra-proxy", "did not answer AUTH within 1s"],
    );
    assert!(!contains(&out, token.as_bytes()));
    assert!(
        took >= Duration::from_millis(900) && took < FAIL_FAST,
        "waited {took:?}"
    );
    server.abort();
}
