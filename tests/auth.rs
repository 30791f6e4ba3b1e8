//! Client credentials at the proxy: `AUTH` answered locally (with or without
//! `--local-password`, with or without `--multiplex`), `HELLO … AUTH` rewritten, and the
//! client's secrets never reaching Redis (checked in `CLIENT LIST` and `ACL LOG`).
//!
//! Not covered here: re-authentication as tokens rotate (`rotation.rs`); Redis refusing the
//! proxy's token and the token never reaching clients (`upstream_faults.rs`, which has the
//! fixed-token proxies those need).
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use redis_entra_proxy::credentials::TokenSource;
use redis_entra_proxy::dev::DevTokenSource;
use redis_entra_proxy::devenv::{encode, RedisOptions, RedisServer};
use redis_entra_proxy::secret::Secret;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NOAUTH: &str = "-NOAUTH Authentication required.\r\n";
const WRONGPASS: &str = "-WRONGPASS invalid username-password pair or user is disabled.\r\n";

/// A proxy with `--local-password s3cret` in front of a fresh server, tokens `oid-N` from the
/// dev issuer. Built without `Proxy::start_with`, whose readiness PING is unauthenticated and
/// so never answered `+PONG` by a proxy that requires a password.
struct PwProxy {
    addr: SocketAddr,
    redis: Arc<RedisServer>,
    _bare: Bare,
}

async fn with_password() -> PwProxy {
    with_password_on(false).await
}

/// [`with_password`], with `--multiplex` if `multiplex`.
async fn with_password_on(multiplex: bool) -> PwProxy {
    with_password_and(multiplex, None).await
}

/// [`with_password_on`], with `--warm-connections warm`.
async fn with_password_and(multiplex: bool, warm: Option<usize>) -> PwProxy {
    let redis = Arc::new(
        RedisServer::start(RedisOptions::default())
            .await
            .expect("redis-server starts"),
    );
    let source = Arc::new(DevTokenSource::new(
        redis.clone(),
        Duration::from_secs(3600),
        "oid",
    ));
    let bare = start_bare(
        redis.addr(),
        redis.ca_file(),
        source,
        Some("s3cret"),
        multiplex,
        warm,
    )
    .await;
    let ready = first_session_output(bare.addr, b"AUTH s3cret\r\nPING\r\nQUIT\r\n").await;
    assert_eq!(text(&ready), "+OK\r\n+PONG\r\n+OK\r\n");
    PwProxy {
        addr: bare.addr,
        redis,
        _bare: bare,
    }
}

impl PwProxy {
    async fn raw(&self) -> Raw {
        Raw(TcpStream::connect(self.addr)
            .await
            .expect("connect to proxy"))
    }
}

/// A raw client that frames RESP2/RESP3 replies itself, so byte-exact checks also work for
/// replies whose length the test does not know in advance (HELLO maps, CLIENT INFO).
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).await.expect("connect to proxy");
        s.set_nodelay(true).expect("nodelay");
        Conn { s, buf: Vec::new() }
    }

    async fn send(&mut self, args: &[&[u8]]) {
        self.s
            .write_all(&encode(args))
            .await
            .expect("write to proxy");
    }

    /// The next complete reply, as the bytes the proxy sent.
    async fn frame(&mut self) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Some(n) = frame_len(&self.buf, 0) {
                return self.buf.drain(..n).collect();
            }
            let read = tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf));
            let n = read.await.expect("reply within bound").expect("read");
            assert!(
                n > 0,
                "EOF before a complete reply; got {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    async fn cmd(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.send(args).await;
        self.frame().await
    }

    /// Sends each input as it is (inline commands, pipelines) and compares what comes back
    /// with the expected bytes.
    async fn exchange(&mut self, steps: &[(&str, &str)]) {
        for (input, expected) in steps {
            self.s
                .write_all(input.as_bytes())
                .await
                .expect("write to proxy");
            let mut got = Vec::new();
            while got.len() < expected.len() {
                got.extend(self.frame().await);
            }
            assert_eq!(text(&got), *expected, "after {input:?}");
        }
    }
}

/// Length of the RESP2/RESP3 frame starting at `at`, or `None` while it is incomplete.
fn frame_len(buf: &[u8], at: usize) -> Option<usize> {
    let nl = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[at + 1..nl]).expect("UTF-8 header");
    let after = nl + 2;
    let n: i64 = match buf[at] {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => return Some(after - at),
        b'$' | b'=' | b'!' => {
            let len: i64 = line.parse().expect("bulk length");
            if len < 0 {
                return Some(after - at);
            }
            let end = after + len as usize + 2;
            return (buf.len() >= end).then_some(end - at);
        }
        b'*' | b'~' | b'>' => line.parse().expect("aggregate length"),
        b'%' => 2 * line.parse::<i64>().expect("map length"),
        other => panic!(
            "unexpected type byte {:?} in {:?}",
            other as char,
            String::from_utf8_lossy(buf)
        ),
    };
    let mut pos = after;
    for _ in 0..n.max(0) {
        pos += frame_len(buf, pos)?;
    }
    Some(pos - at)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The `user=` field of the upstream connection this client is proxied over.
async fn upstream_user(c: &mut Conn) -> String {
    let info = text(&c.cmd(&[b"CLIENT", b"INFO"]).await);
    info.split_whitespace()
        .find_map(|f| f.strip_prefix("user="))
        .unwrap_or_else(|| panic!("no user= in {info:?}"))
        .to_owned()
}

/// Entries of `ACL LOG` whose reason is a failed authentication.
async fn failed_auth_entries(redis: &RedisServer) -> Vec<Reply> {
    let Reply::Array(Some(entries)) = redis.command(&[b"ACL", b"LOG"]).await.expect("ACL LOG")
    else {
        panic!("ACL LOG is not an array");
    };
    entries
        .into_iter()
        .filter(|e| match e {
            Reply::Array(Some(kv)) => kv.chunks(2).any(|p| {
                p[0] == Reply::Bulk(Some(b"reason".to_vec()))
                    && p.get(1) == Some(&Reply::Bulk(Some(b"auth".to_vec())))
            }),
            _ => false,
        })
        .collect()
}

#[tokio::test]
async fn auth_without_local_password_is_answered_locally() {
    let proxy = Proxy::start().await;
    let mut c = Conn::connect(proxy.addr).await;
    c.exchange(&[
        ("*2\r\n$4\r\nAUTH\r\n$8\r\nanything\r\n", "+OK\r\n"),
        (
            "*3\r\n$4\r\nAUTH\r\n$4\r\nuser\r\n$4\r\npass\r\n",
            "+OK\r\n",
        ),
        (
            "AUTH inline-pass\r\nSET k v\r\nGET k\r\n",
            "+OK\r\n+OK\r\n$1\r\nv\r\n",
        ),
    ])
    .await;
    assert_eq!(
        upstream_user(&mut c).await,
        "oid-1",
        "upstream identity changed"
    );
    let list = proxy.redis.client_list().await.expect("CLIENT LIST");
    for entry in &list {
        let user = entry.get("user").map(String::as_str);
        assert!(matches!(user, Some("oid-1" | "admin")), "{list:?}");
    }
    let failed = failed_auth_entries(&proxy.redis).await;
    assert!(failed.is_empty(), "credentials reached Redis: {failed:?}");
    // The check sees a failed AUTH when there is one.
    let mut direct = proxy.redis.connect().await.expect("connect to redis");
    let refused = direct.command(&[b"AUTH", b"user", b"pass"]).await;
    assert!(matches!(refused, Ok(Reply::Error(_))), "{refused:?}");
    assert_eq!(failed_auth_entries(&proxy.redis).await.len(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn local_password_works_like_requirepass() {
    works_like_requirepass(with_password().await).await;
}

/// A shared client gives the password as a client of its own does, and gets every reply a
/// client of its own gets, byte for byte.
#[tokio::test]
async fn local_password_works_like_requirepass_when_multiplexing() {
    works_like_requirepass(with_password_on(true).await).await;
}

async fn works_like_requirepass(proxy: PwProxy) {
    let mut c = Conn::connect(proxy.addr).await;
    c.exchange(&[
        ("*1\r\n$4\r\nPING\r\n", NOAUTH),
        ("GET k\r\n", NOAUTH),
        ("*2\r\n$4\r\nAUTH\r\n$5\r\nwrong\r\n", WRONGPASS),
        ("AUTH other s3cret\r\n", WRONGPASS),
        ("AUTH default wrong\r\n", WRONGPASS),
        ("AUTH S3CRET\r\n", WRONGPASS),
        ("PING\r\n", NOAUTH),
        ("*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n", "+OK\r\n"),
        ("PING\r\nSET k v\r\n", "+PONG\r\n+OK\r\n"),
        // A later wrong AUTH fails but, as in Redis, leaves the connection authenticated.
        ("AUTH bad\r\nGET k\r\n", &format!("{WRONGPASS}$1\r\nv\r\n")),
        ("auth default s3cret\r\n", "+OK\r\n"),
        // The unauthenticated limits are gone: 11 arguments are fine.
        ("MSET a 1 b 2 c 3 d 4 e 5\r\n", "+OK\r\n"),
    ])
    .await;
    let mut c = Conn::connect(proxy.addr).await;
    c.exchange(&[("AUTH default s3cret\r\nGET k\r\n", "+OK\r\n$1\r\nv\r\n")])
        .await;
    assert_eq!(upstream_user(&mut c).await, "oid-1");
    assert!(failed_auth_entries(&proxy.redis).await.is_empty());
}

/// A client that has not given the local password costs the cache nothing, whatever it
/// sends: no connection, no AUTH. Giving it opens the connection (or takes a pooled one), and
/// the commands behind it in the same write go after the proxy's AUTH; `HELLO … AUTH` works
/// the same way.
#[tokio::test]
async fn clients_without_the_password_open_no_upstream_connection() {
    for (multiplex, warm) in [(false, None), (true, None), (false, Some(2))] {
        let case = format!("multiplex {multiplex}, warm {warm:?}");
        let proxy = with_password_and(multiplex, warm).await;
        let upstream = || async {
            let list = proxy.redis.client_list().await.expect("CLIENT LIST");
            list.iter()
                .filter(|e| e.get("user").is_some_and(|u| u.starts_with("oid-")))
                .count()
        };
        // The readiness check's session is gone (its shared connection stays when
        // multiplexing); the pool, if any, full.
        let settled = warm.unwrap_or(usize::from(multiplex));
        let deadline = tokio::time::Instant::now() + STEP;
        while upstream().await != settled {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{case}: never settled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut silent = Vec::new();
        for _ in 0..20 {
            silent.push(TcpStream::connect(proxy.addr).await.expect("connect"));
        }
        let mut c = Conn::connect(proxy.addr).await;
        c.exchange(&[
            ("PING\r\n", NOAUTH),
            ("AUTH wrong\r\n", WRONGPASS),
            ("RESET\r\n", "+RESET\r\n"),
            ("HELLO 3 AUTH default wrong\r\n", WRONGPASS),
            ("QUIT\r\n", "+OK\r\n"),
        ])
        .await;
        let mut c = Conn::connect(proxy.addr).await;
        c.exchange(&[("GET k\r\n", NOAUTH)]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            upstream().await,
            settled,
            "{case}: connections without the password"
        );
        c.exchange(&[(
            "AUTH s3cret\r\nSET k v\r\nGET k\r\n",
            "+OK\r\n+OK\r\n$1\r\nv\r\n",
        )])
        .await;
        assert_eq!(upstream_user(&mut c).await, "oid-1", "{case}");
        let mut h = Raw(TcpStream::connect(proxy.addr).await.expect("connect"));
        h.send(b"HELLO 3 AUTH default s3cret SETNAME n\r\nCLIENT GETNAME\r\n")
            .await;
        let hello = text(&h.read_frame().await);
        assert!(
            hello.starts_with('%') && hello.contains("proto"),
            "{case}: {hello}"
        );
        h.expect(b"$1\r\nn\r\n").await;
        assert!(failed_auth_entries(&proxy.redis).await.is_empty(), "{case}");
        drop(silent);
    }
}

#[tokio::test]
async fn hello_before_auth_is_refused() {
    hello_before_auth(with_password().await).await;
}

#[tokio::test]
async fn hello_before_auth_is_refused_when_multiplexing() {
    hello_before_auth(with_password_on(true).await).await;
}

async fn hello_before_auth(proxy: PwProxy) {
    let mut c = Conn::connect(proxy.addr).await;
    let reply = text(&c.cmd(&[b"HELLO", b"3"]).await);
    assert!(reply.starts_with("-NOAUTH HELLO must be called"), "{reply}");
    c.exchange(&[
        ("GET nokey\r\n", NOAUTH),
        ("AUTH s3cret\r\n", "+OK\r\n"),
        ("GET nokey\r\n", "$-1\r\n"),
    ])
    .await;
}

/// Redis closes an unauthenticated client that announces more than 10 arguments or a bulk
/// longer than 16 KiB; the proxy must do the same rather than buffer its input.
#[tokio::test]
async fn unauthenticated_limits_close_like_redis() {
    unauthenticated_limits(with_password().await).await;
}

#[tokio::test]
async fn unauthenticated_limits_close_like_redis_when_multiplexing() {
    unauthenticated_limits(with_password_on(true).await).await;
}

async fn unauthenticated_limits(proxy: PwProxy) {
    let cases: [(&str, &[u8], &[u8]); 2] = [
        (
            "multibulk count",
            b"*11\r\n",
            b"-ERR Protocol error: unauthenticated multibulk length\r\n",
        ),
        (
            "bulk length",
            b"*1\r\n$16385\r\n",
            b"-ERR Protocol error: unauthenticated bulk length\r\n",
        ),
    ];
    for (name, input, expected) in cases {
        let mut raw = proxy.raw().await;
        raw.send(input).await;
        assert_eq!(text(&raw.read_to_end().await), text(expected), "{name}");
    }
}

fn hello_field<'a>(map: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let needle = format!("${}\r\n{key}\r\n", key.len());
    let at = map
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?
        + needle.len();
    let end = at + frame_len(map, at)?;
    Some(&map[at..end])
}

/// The upstream connection named `name` in `CLIENT LIST`.
async fn upstream_named(
    redis: &RedisServer,
    name: &str,
) -> std::collections::HashMap<String, String> {
    let list = redis.client_list().await.expect("CLIENT LIST");
    list.into_iter()
        .find(|c| c.get("name").map(String::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no upstream connection named {name}"))
}

#[tokio::test]
async fn hello_auth_is_rewritten_without_local_password() {
    let proxy = Proxy::start().await;
    let mut c = Conn::connect(proxy.addr).await;
    let map = c
        .cmd(&[b"HELLO", b"3", b"AUTH", b"x", b"y", b"SETNAME", b"n"])
        .await;
    assert_eq!(map[0], b'%', "a RESP3 map: {}", text(&map));
    assert_eq!(
        hello_field(&map, "proto"),
        Some(&b":3\r\n"[..]),
        "{}",
        text(&map)
    );
    c.exchange(&[("CLIENT GETNAME\r\nGET nokey\r\n", "$1\r\nn\r\n_\r\n")])
        .await;
    let up = upstream_named(&proxy.redis, "n").await;
    assert_eq!((up["resp"].as_str(), up["user"].as_str()), ("3", "oid-1"));
    assert!(
        failed_auth_entries(&proxy.redis).await.is_empty(),
        "x/y reached Redis"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn hello_auth_checks_the_local_password() {
    let proxy = with_password().await;
    let mut c = Conn::connect(proxy.addr).await;
    let map = c.cmd(&[
        b"HELLO", b"3", b"AUTH", b"default", b"s3cret", b"SETNAME", b"n",
    ]);
    let map = map.await;
    assert_eq!(
        hello_field(&map, "proto"),
        Some(&b":3\r\n"[..]),
        "{}",
        text(&map)
    );
    c.exchange(&[("CLIENT GETNAME\r\n", "$1\r\nn\r\n")]).await;
    let up = upstream_named(&proxy.redis, "n").await;
    assert_eq!((up["resp"].as_str(), up["user"].as_str()), ("3", "oid-1"));

    // A wrong password fails the whole HELLO: no protocol switch, no name, no authentication.
    let mut bad = Conn::connect(proxy.addr).await;
    bad.exchange(&[
        ("HELLO 3 AUTH default bad SETNAME z\r\n", WRONGPASS),
        ("PING\r\n", NOAUTH),
        ("AUTH s3cret\r\nPING\r\n", "+OK\r\n+PONG\r\n"),
        ("GET nokey\r\nCLIENT GETNAME\r\n", "$-1\r\n$-1\r\n"),
        ("HELLO 3 AUTH other s3cret\r\n", WRONGPASS),
        ("GET nokey\r\n", "$-1\r\n"),
    ])
    .await;

    // Options in any order; HELLO 2 answers with a flat array.
    let mut two = Conn::connect(proxy.addr).await;
    let reply = two.cmd(&[
        b"HELLO", b"2", b"SETNAME", b"a", b"AUTH", b"default", b"s3cret",
    ]);
    let reply = reply.await;
    assert_eq!(reply[0], b'*', "{}", text(&reply));
    assert_eq!(hello_field(&reply, "proto"), Some(&b":2\r\n"[..]));
    two.exchange(&[("CLIENT GETNAME\r\n", "$1\r\na\r\n")]).await;
    let up = upstream_named(&proxy.redis, "a").await;
    assert_eq!((up["resp"].as_str(), up["user"].as_str()), ("2", "oid-1"));
    assert!(failed_auth_entries(&proxy.redis).await.is_empty());
}

/// With `--multiplex`, clients that gave the right password share the server's connections,
/// however they gave it (`AUTH [default] …` alone or pipelined with their first commands,
/// `HELLO 2|3 AUTH default … [SETNAME …]`). What an unauthenticated client sends never runs,
/// and no password reaches the server.
#[tokio::test]
async fn authenticated_clients_share_when_multiplexing() {
    let proxy = with_password_on(true).await;
    let mut thief = Conn::connect(proxy.addr).await;
    thief
        .exchange(&[
            ("SET stolen 1\r\n", NOAUTH),
            (
                "AUTH default nope\r\nGET x\r\n",
                &format!("{WRONGPASS}{NOAUTH}"),
            ),
        ])
        .await;

    const CLIENTS: usize = 8;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut c = Conn::connect(proxy.addr).await;
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        let set_get = format!("SET {k} {v}\r\nGET {k}\r\n");
        let stored = format!("+OK\r\n${}\r\n{v}\r\n", v.len());
        match i % 4 {
            0 => {
                c.exchange(&[(
                    &format!("AUTH s3cret\r\n{set_get}"),
                    &format!("+OK\r\n{stored}"),
                )])
                .await
            }
            1 => {
                c.exchange(&[("AUTH default s3cret\r\n", "+OK\r\n"), (&set_get, &stored)])
                    .await
            }
            2 => {
                let map = c
                    .cmd(&[b"HELLO", b"3", b"AUTH", b"default", b"s3cret"])
                    .await;
                assert_eq!(
                    hello_field(&map, "proto"),
                    Some(&b":3\r\n"[..]),
                    "{}",
                    text(&map)
                );
                c.exchange(&[(&set_get, &stored)]).await;
            }
            _ => {
                let name = format!("n{i}");
                let reply = c
                    .cmd(&[
                        b"HELLO",
                        b"2",
                        b"AUTH",
                        b"default",
                        b"s3cret",
                        b"SETNAME",
                        name.as_bytes(),
                    ])
                    .await;
                assert_eq!(
                    hello_field(&reply, "proto"),
                    Some(&b":2\r\n"[..]),
                    "{}",
                    text(&reply)
                );
                let named = format!("${}\r\n{name}\r\n", name.len());
                c.exchange(&[("CLIENT GETNAME\r\n", &named), (&set_get, &stored)])
                    .await;
            }
        }
        clients.push(c);
    }
    clients[0]
        .exchange(&[("GET stolen\r\nGET k7\r\n", "$-1\r\n$2\r\nv7\r\n")])
        .await;
    // Shared connections (two session threads, two protocols at most) and the thief's own.
    let upstream = token_connections(&proxy.redis).await;
    assert!(
        upstream.len() <= 5,
        "{CLIENTS} authenticated clients did not share: {} upstream connections",
        upstream.len()
    );
    assert!(failed_auth_entries(&proxy.redis).await.is_empty());
}

#[tokio::test]
async fn hello_errors_match_redis() {
    let proxy = Proxy::start().await;
    let mut c = Conn::connect(proxy.addr).await;
    c.exchange(&[
        ("HELLO 4\r\n", "-NOPROTO unsupported protocol version\r\n"),
        (
            "HELLO 3 FOO\r\n",
            "-ERR Syntax error in HELLO option 'FOO'\r\n",
        ),
        (
            "HELLO 3 AUTH u\r\n",
            "-ERR Syntax error in HELLO option 'AUTH'\r\n",
        ),
        (
            "HELLO x\r\n",
            "-ERR Protocol version is not an integer or out of range\r\n",
        ),
        ("GET nokey\r\n", "$-1\r\n"),
    ])
    .await;
    proxy.stop().await;
}

/// Inside MULTI, Redis queues HELLO and reports its errors in the EXEC array; the rest of the
/// transaction still runs (checked against redis-server 7.0.15).
#[tokio::test]
async fn hello_errors_inside_multi_are_exec_time_errors() {
    let proxy = Proxy::start().await;
    let mut c = Conn::connect(proxy.addr).await;
    let exec = "*2\r\n-NOPROTO unsupported protocol version\r\n+OK\r\n";
    c.exchange(&[
        (
            "MULTI\r\nHELLO 4\r\nSET k v\r\n",
            "+OK\r\n+QUEUED\r\n+QUEUED\r\n",
        ),
        ("EXEC\r\nGET k\r\n", &format!("{exec}$1\r\nv\r\n")),
    ])
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn hello_3_auth_inside_multi_switches_at_exec() {
    let proxy = Proxy::start().await;
    let mut c = Conn::connect(proxy.addr).await;
    let queued = "+OK\r\n+QUEUED\r\n+QUEUED\r\n";
    c.exchange(&[("MULTI\r\nHELLO 3 AUTH u p\r\nGET nokey\r\n", queued)])
        .await;
    let exec = c.cmd(&[b"EXEC"]).await;
    assert!(
        exec.starts_with(b"*2\r\n%") && exec.ends_with(b"\r\n_\r\n"),
        "{}",
        text(&exec)
    );
    c.exchange(&[("GET nokey\r\n", "_\r\n")]).await;
    assert!(
        failed_auth_entries(&proxy.redis).await.is_empty(),
        "u/p reached Redis"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn maint_notifications_are_refused() {
    let proxy = Proxy::start().await;
    let mut c = Conn::connect(proxy.addr).await;
    c.send(&[
        b"CLIENT",
        b"MAINT_NOTIFICATIONS",
        b"ON",
        b"moving-endpoint-type",
        b"internal-ip",
    ])
    .await;
    let reply = text(&c.frame().await);
    assert!(reply.starts_with("-ERR"), "{reply}");
    c.exchange(&[("PING\r\n", "+PONG\r\n")]).await;
    proxy.stop().await;
}

/// A proxy that does not wait to be ready. Stopped and aborted on drop.
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

/// Builds the proxy as `support::Proxy::start_on` does, with the upstream and source given.
async fn start_bare(
    upstream: SocketAddr,
    ca: Option<&std::path::Path>,
    source: Arc<dyn TokenSource>,
    local_password: Option<&str>,
    multiplex: bool,
    warm: Option<usize>,
) -> Bare {
    let options = redis_entra_proxy::cli::Options {
        listen: Some("127.0.0.1:0".into()),
        upstream: Some(upstream.to_string()),
        upstream_tls: Some(true),
        upstream_ca_file: ca.map(|p| p.to_path_buf()),
        upstream_server_name: Some("localhost".into()),
        local_password: local_password.map(Secret::new),
        multiplex: Some(multiplex),
        warm_connections: warm,
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

/// Sends `input` on fresh connections until the proxy has its first token (a connection made
/// before that is refused with "no valid token"), and returns everything that connection got
/// up to EOF.
async fn first_session_output(addr: SocketAddr, input: &[u8]) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let mut raw = Raw(TcpStream::connect(addr).await.expect("connect to proxy"));
        raw.send(input).await;
        let out = raw.read_to_end().await;
        if !contains(&out, b"has no valid token") {
            return out;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no token within {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wrong local passwords are counted, and logged a few lines a second at most: guesses come
/// as fast as the network carries them.
#[tokio::test]
async fn wrong_local_passwords_are_counted_and_logged_sparingly() {
    let redis = redis_entra_proxy::devenv::RedisServer::start(Default::default())
        .await
        .expect("redis-server starts");
    let exp = std::time::SystemTime::now() + Duration::from_secs(3600);
    let exp = exp.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let token = redis_entra_proxy::devenv::mint_token("guessed-1", exp);
    redis.acl_setuser("guessed-1", &token).await.unwrap();
    let proxy = support::proxy_process::ProxyProcess::start(
        &redis,
        &["--credential", "fixed"],
        &[
            ("REDIS_ENTRA_PROXY_TOKEN", &token),
            ("REDIS_ENTRA_PROXY_LOCAL_PASSWORD", "right-password-1"),
        ],
    )
    .await;
    proxy.wait_started().await;
    let mut c = proxy.client().await;
    const GUESSES: usize = 300;
    for i in 0..GUESSES {
        let guess = format!("guess-{i}");
        let reply = c.command(&[b"AUTH", guess.as_bytes()]).await.unwrap();
        assert!(
            matches!(reply, Reply::Error(ref e) if e.starts_with("WRONGPASS")),
            "{reply:?}"
        );
    }
    let reply = c
        .command(&[b"HELLO", b"3", b"AUTH", b"default", b"nope"])
        .await
        .unwrap();
    assert!(
        matches!(reply, Reply::Error(ref e) if e.starts_with("WRONGPASS")),
        "{reply:?}"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        m.count("redis_entra_proxy_local_auth_failures_total", &[]),
        (GUESSES + 1) as f64
    );
    let logged = proxy
        .log()
        .lines()
        .filter(|l| l.contains("wrong local password"))
        .count();
    assert!(
        (1..=30).contains(&logged),
        "{logged} lines for {GUESSES} guesses"
    );
    assert!(!proxy.log().contains("guess-"), "a guess was logged");
}
