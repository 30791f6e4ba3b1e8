//! Pub/sub through the proxy, byte for byte: RESP2 subscribers (whose upstream the proxy moves
//! to RESP3 and translates back), RESP3 subscribers with pushes interleaved with replies,
//! sharded channels, leaving subscribed mode, and a long message stream mixed with PINGs.
//!
//! Not covered here: re-authentication of subscribers as tokens rotate (`rotation.rs`).
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use redis_entra_proxy::devenv::{encode, RespConn};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The reading half of a raw client: frames RESP2/RESP3 replies itself.
struct Reader {
    r: OwnedReadHalf,
    buf: Vec<u8>,
}

impl Reader {
    /// The next complete frame, as the bytes the proxy sent.
    async fn frame(&mut self) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Some(n) = frame_len(&self.buf, 0) {
                return self.buf.drain(..n).collect();
            }
            let read = tokio::time::timeout_at(deadline, self.r.read_buf(&mut self.buf));
            let n = read.await.expect("frame within bound").expect("read");
            assert!(
                n > 0,
                "EOF before a complete frame; got {:?}",
                text(&self.buf)
            );
        }
    }
}

/// A raw client. The halves are separate so one task can write while another reads.
struct Conn {
    rd: Reader,
    w: OwnedWriteHalf,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).await.expect("connect to proxy");
        s.set_nodelay(true).expect("nodelay");
        let (r, w) = s.into_split();
        Conn {
            rd: Reader { r, buf: Vec::new() },
            w,
        }
    }

    async fn send(&mut self, args: &[&[u8]]) {
        self.w
            .write_all(&encode(args))
            .await
            .expect("write to proxy");
    }

    async fn frame(&mut self) -> Vec<u8> {
        self.rd.frame().await
    }

    /// Reads whole frames until they hold as many bytes as `expected`, and compares.
    async fn expect(&mut self, expected: &str) {
        let mut got = Vec::new();
        while got.len() < expected.len() {
            got.extend(self.frame().await);
        }
        assert_eq!(text(&got), expected);
    }

    /// Sends an inline command and expects these bytes back.
    async fn io(&mut self, command: &str, expected: &str) {
        let line = format!("{command}\r\n");
        self.w
            .write_all(line.as_bytes())
            .await
            .expect("write to proxy");
        self.expect(expected).await;
    }

    /// `HELLO 3`, checking the reply is a RESP3 map.
    async fn hello3(&mut self) {
        self.send(&[b"HELLO", b"3"]).await;
        let map = self.frame().await;
        assert_eq!(map[0], b'%', "{}", text(&map));
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
            text(buf)
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

/// A RESP aggregate (`*` or `>`) of bulk strings, and integers written as `:n`.
fn agg(kind: char, items: &[&str]) -> String {
    let mut out = format!("{kind}{}\r\n", items.len());
    for item in items {
        match item.strip_prefix(':') {
            Some(n) => out += &format!(":{n}\r\n"),
            None => out += &format!("${}\r\n{item}\r\n", item.len()),
        }
    }
    out
}

/// Runs `PUBLISH`/`SPUBLISH channel message` (space-separated) and checks the receiver count.
async fn publish(p: &mut RespConn, command: &str, receivers: i64) {
    let args: Vec<&[u8]> = command.split(' ').map(str::as_bytes).collect();
    let reply = p.command(&args).await.expect("publish");
    assert_eq!(reply, Reply::Integer(receivers), "{command}");
}

const PONG2: &str = "*2\r\n$4\r\npong\r\n$0\r\n\r\n";
const NOT_IN_CONTEXT: &str =
    "only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context";

#[tokio::test]
async fn resp2_subscribe_publish_unsubscribe() {
    let proxy = Proxy::start().await;
    let mut a = Conn::connect(proxy.addr).await;
    let mut b = proxy.client().await;
    a.send(&[b"SUBSCRIBE", b"a", b"b"]).await;
    a.expect(&(agg('*', &["subscribe", "a", ":1"]) + &agg('*', &["subscribe", "b", ":2"])))
        .await;
    a.io("PSUBSCRIBE p*", &agg('*', &["psubscribe", "p*", ":3"]))
        .await;

    publish(&mut b, "PUBLISH a hello", 1).await;
    a.expect(&agg('*', &["message", "a", "hello"])).await;
    publish(&mut b, "PUBLISH pz x", 1).await;
    a.expect(&agg('*', &["pmessage", "p*", "pz", "x"])).await;
    a.send(&[b"PING"]).await;
    a.expect(PONG2).await;
    a.io("PING hi", "*2\r\n$4\r\npong\r\n$2\r\nhi\r\n").await;
    // Unsubscribing from nothing of a kind while subscribed: a null name (RESP3 `_` upstream,
    // `$-1` for this RESP2 client).
    a.io("SUNSUBSCRIBE", "*3\r\n$12\r\nsunsubscribe\r\n$-1\r\n:0\r\n")
        .await;

    // Unsubscribe-all confirms each channel, in the server's order; the pattern remains.
    a.send(&[b"UNSUBSCRIBE"]).await;
    let got = text(&[a.frame().await, a.frame().await].concat());
    let ab = agg('*', &["unsubscribe", "a", ":2"]) + &agg('*', &["unsubscribe", "b", ":1"]);
    let ba = agg('*', &["unsubscribe", "b", ":2"]) + &agg('*', &["unsubscribe", "a", ":1"]);
    assert!(got == ab || got == ba, "{got:?}");
    publish(&mut b, "PUBLISH a gone", 0).await;
    a.io("PUNSUBSCRIBE", &agg('*', &["punsubscribe", "p*", ":0"]))
        .await;

    // A normal client again, in RESP2.
    a.io("SET x 1", "+OK\r\n").await;
    a.io("GET nokey", "$-1\r\n").await;
    a.io("PING", "+PONG\r\n").await;
    a.io("UNSUBSCRIBE", "*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n")
        .await;
    proxy.stop().await;
}

/// Subscribing, commands in subscribed mode and unsubscribing in one pipeline: each reply
/// in order, in the protocol the server is in at that point (checked against Redis 7.0.15).
#[tokio::test]
async fn resp2_pipeline_through_subscribed_mode() {
    let proxy = Proxy::start().await;
    let mut a = Conn::connect(proxy.addr).await;
    let pipeline = "SUBSCRIBE a\r\nPING\r\nGET x\r\nUNSUBSCRIBE\r\nPING\r\nGET x\r\n\
                    SUBSCRIBE b\r\nPING x\r\nRESET\r\nPING";
    let expected = [
        agg('*', &["subscribe", "a", ":1"]),
        PONG2.into(),
        format!("-ERR Can't execute 'get': {NOT_IN_CONTEXT}\r\n"),
        agg('*', &["unsubscribe", "a", ":0"]),
        "+PONG\r\n$-1\r\n".into(),
        agg('*', &["subscribe", "b", ":1"]),
        agg('*', &["pong", "x"]),
        "+RESET\r\n+PONG\r\n".into(),
    ];
    a.io(pipeline, &expected.concat()).await;
    proxy.stop().await;
}

/// Messages larger than the proxy's read size reach a RESP2 subscriber (whose upstream is
/// RESP3, so each push is rewritten as an array while it streams through) intact.
#[tokio::test]
async fn large_messages_to_resp2_subscriber() {
    let proxy = Proxy::start().await;
    let mut a = Conn::connect(proxy.addr).await;
    let mut b = proxy.client().await;
    a.io("SUBSCRIBE big", &agg('*', &["subscribe", "big", ":1"]))
        .await;
    for size in [16 * 1024 - 3, 100_000, 1 << 20] {
        let body: String = (0..size)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        publish(&mut b, &format!("PUBLISH big {body}"), 1).await;
        let expected = agg('*', &["message", "big", &body]) + &agg('*', &["pong", "after"]);
        a.io("PING after", &expected).await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn unsubscribe_without_subscriptions() {
    let proxy = Proxy::start().await;
    let mut a = Conn::connect(proxy.addr).await;
    a.io("UNSUBSCRIBE", "*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n")
        .await;
    a.io("PUNSUBSCRIBE", "*3\r\n$12\r\npunsubscribe\r\n$-1\r\n:0\r\n")
        .await;
    a.io(
        "UNSUBSCRIBE never",
        &agg('*', &["unsubscribe", "never", ":0"]),
    )
    .await;
    a.io("SET x 1", "+OK\r\n").await;
    proxy.stop().await;
}

/// A RESP2 subscriber may only (un)subscribe, PING, QUIT or RESET. The proxy answers the
/// rest itself (its upstream is RESP3, which would accept them): the error must be Redis's.
#[tokio::test]
async fn resp2_subscribed_mode_refuses_other_commands_like_redis() {
    let proxy = Proxy::start().await;
    let mut direct = proxy.redis.connect().await.expect("connect to redis");
    let pw = proxy.redis.admin_password().as_bytes();
    let auth = direct
        .command(&[b"AUTH", b"admin", pw])
        .await
        .expect("AUTH");
    assert_eq!(auth, Reply::Simple("OK".into()));
    direct.send(&[b"SUBSCRIBE", b"c"]).await.expect("send");
    direct.read_reply().await.expect("subscribe confirmation");
    let mut a = Conn::connect(proxy.addr).await;
    a.io("SUBSCRIBE c", &agg('*', &["subscribe", "c", ":1"]))
        .await;
    for command in ["GET x", "CLIENT GETNAME", "HELLO 3", "AUTH p"] {
        let args: Vec<&[u8]> = command.split(' ').map(str::as_bytes).collect();
        let Reply::Error(want) = direct.command(&args).await.expect("direct reply") else {
            panic!("Redis accepted {command} while subscribed");
        };
        a.io(command, &format!("-{want}\r\n")).await;
    }
    // RESET leaves subscribed mode; messages stop.
    a.io("RESET", "+RESET\r\n").await;
    let mut b = proxy.client().await;
    publish(&mut b, "PUBLISH c late", 1).await; // the direct subscriber only
    a.io("PING", "+PONG\r\n").await;
    a.io("SET x 1", "+OK\r\n").await;
    proxy.stop().await;
}

#[tokio::test]
async fn resp3_pushes_interleave_with_replies() {
    let proxy = Proxy::start().await;
    let mut a = Conn::connect(proxy.addr).await;
    let mut b = proxy.client().await;
    a.hello3().await;
    a.io("SUBSCRIBE a", ">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n")
        .await;
    a.io("PSUBSCRIBE p*", &agg('>', &["psubscribe", "p*", ":2"]))
        .await;
    // Regular commands work while subscribed.
    a.io("GET x", "_\r\n").await;
    a.io("SET x 1", "+OK\r\n").await;
    a.io("PING", "+PONG\r\n").await;

    // A message published before a command is answered comes before that command's reply.
    publish(&mut b, "PUBLISH a hello", 1).await;
    a.io(
        "GET x",
        &(agg('>', &["message", "a", "hello"]) + "$1\r\n1\r\n"),
    )
    .await;
    publish(&mut b, "PUBLISH pz x", 1).await;
    a.io(
        "INCR x",
        &(agg('>', &["pmessage", "p*", "pz", "x"]) + ":2\r\n"),
    )
    .await;

    a.io("UNSUBSCRIBE", &agg('>', &["unsubscribe", "a", ":1"]))
        .await;
    a.io("PUNSUBSCRIBE p*", &agg('>', &["punsubscribe", "p*", ":0"]))
        .await;
    a.io("UNSUBSCRIBE", ">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n")
        .await;
    publish(&mut b, "PUBLISH a gone", 0).await;
    a.io("GET x", "$1\r\n2\r\n").await;
    proxy.stop().await;
}

/// `HELLO 2` sent by a RESP3 subscriber makes it a RESP2 subscriber: messages become arrays,
/// PING answers `pong` arrays, other commands are refused.
#[tokio::test]
async fn hello_2_while_subscribed_switches_to_resp2_subscriber() {
    let proxy = Proxy::start().await;
    let mut a = Conn::connect(proxy.addr).await;
    let mut b = proxy.client().await;
    a.hello3().await;
    a.io("SUBSCRIBE a", &agg('>', &["subscribe", "a", ":1"]))
        .await;
    a.send(&[b"HELLO", b"2"]).await;
    let reply = a.frame().await;
    assert_eq!(reply[0], b'*', "{}", text(&reply));
    publish(&mut b, "PUBLISH a m", 1).await;
    a.expect(&agg('*', &["message", "a", "m"])).await;
    a.io("PING", PONG2).await;
    a.io(
        "GET x",
        &format!("-ERR Can't execute 'get': {NOT_IN_CONTEXT}\r\n"),
    )
    .await;
    a.io("UNSUBSCRIBE a", &agg('*', &["unsubscribe", "a", ":0"]))
        .await;
    a.io("GET nokey", "$-1\r\n").await;
    proxy.stop().await;
}

/// A HELLO the server refuses (here for an invalid SETNAME) leaves the protocol as it was, so
/// a RESP3 subscriber stays one and may still run any command (checked against
/// redis-server 7.0.15: `GET x` answers `_`).
#[tokio::test]
async fn refused_hello_2_keeps_a_resp3_subscriber() {
    let proxy = Proxy::start().await;
    let mut a = Conn::connect(proxy.addr).await;
    a.hello3().await;
    a.io("SUBSCRIBE a", &agg('>', &["subscribe", "a", ":1"]))
        .await;
    let err = "-ERR Client names cannot contain spaces, newlines or special characters.\r\n";
    a.io("HELLO 2 SETNAME \"a b\"", err).await;
    a.io("GET x", "_\r\n").await;
    a.io("PING", "+PONG\r\n").await;
    proxy.stop().await;
}

/// A RESP2 subscriber whose `HELLO 3` was refused is still a RESP2 client; it must survive a
/// token rotation like any other RESP2 subscriber (which the proxy moves to RESP3 upstream so
/// it can be re-authenticated).
#[tokio::test]
async fn resp2_subscriber_after_refused_hello_3_survives_rotation() {
    // A new token at 2 s; the first is deleted (its connections closed) at 2.667 s.
    let token_lifetime = Duration::from_millis(2667);
    let proxy = Proxy::start_with(ProxyOptions {
        token_lifetime,
        ..Default::default()
    })
    .await;
    let mut subscribers = Vec::new();
    for refused_hello in [false, true] {
        let mut a = Conn::connect(proxy.addr).await;
        if refused_hello {
            let err =
                "-ERR Client names cannot contain spaces, newlines or special characters.\r\n";
            a.io("HELLO 3 SETNAME \"a b\"", err).await;
        }
        a.io("SUBSCRIBE rot", &agg('*', &["subscribe", "rot", ":1"]))
            .await;
        subscribers.push(a);
    }
    // Wait (bounded) until the first identity is gone from the server.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let list = proxy.redis.client_list().await.expect("CLIENT LIST");
        if list
            .iter()
            .all(|c| c.get("user").map(String::as_str) != Some("oid-1"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "oid-1 still there: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut b = proxy.client().await;
    publish(&mut b, "PUBLISH rot after", 2).await;
    for a in &mut subscribers {
        a.expect(&agg('*', &["message", "rot", "after"])).await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn sharded_channels() {
    let proxy = Proxy::start().await;
    let mut b = proxy.client().await;
    for kind in ['*', '>'] {
        let mut a = Conn::connect(proxy.addr).await;
        if kind == '>' {
            a.hello3().await;
        }
        let acks = agg(kind, &["ssubscribe", "s", ":1"]) + &agg(kind, &["ssubscribe", "t", ":2"]);
        a.io("SSUBSCRIBE s t", &acks).await;
        publish(&mut b, "SPUBLISH s m", 1).await;
        a.expect(&agg(kind, &["smessage", "s", "m"])).await;
        a.io("SUNSUBSCRIBE t", &agg(kind, &["sunsubscribe", "t", ":1"]))
            .await;
        publish(&mut b, "SPUBLISH t gone", 0).await;
        publish(&mut b, "SPUBLISH s m2", 1).await;
        a.expect(&agg(kind, &["smessage", "s", "m2"])).await;
        a.io("SUNSUBSCRIBE", &agg(kind, &["sunsubscribe", "s", ":0"]))
            .await;
        a.io("SET x 1", "+OK\r\n").await;
    }
    proxy.stop().await;
}

/// Messages published while the subscriber also sends PINGs; every message arrives once and
/// in order, and every PING is answered in order.
async fn many_messages(kind: char) {
    const MESSAGES: usize = 2_000;
    const BATCH: usize = 100;
    const PINGS_PER_BATCH: usize = 10;
    const PINGS: usize = MESSAGES / BATCH * PINGS_PER_BATCH;
    let proxy = Proxy::start().await;
    let mut a = Conn::connect(proxy.addr).await;
    let mut b = proxy.client().await;
    if kind == '>' {
        a.hello3().await;
    }
    a.io("SUBSCRIBE many", &agg(kind, &["subscribe", "many", ":1"]))
        .await;

    let Conn { mut rd, mut w } = a;
    let reader = tokio::spawn(async move {
        let (mut messages, mut pongs) = (0, 0);
        while messages < MESSAGES || pongs < PINGS {
            let frame = text(&rd.frame().await);
            if frame.starts_with(&format!("{kind}3\r\n$7\r\nmessage\r\n")) {
                let expected = agg(kind, &["message", "many", &format!("m{messages}")]);
                assert_eq!(frame, expected, "message {messages}");
                messages += 1;
            } else {
                let arg = format!("p{pongs}");
                let expected = match kind {
                    '>' => format!("${}\r\n{arg}\r\n", arg.len()),
                    _ => agg('*', &["pong", &arg]),
                };
                assert_eq!(frame, expected, "PING {pongs} (after {messages} messages)");
                pongs += 1;
            }
        }
        rd
    });
    // Each batch: the publisher pipelines its PUBLISHes, the subscriber PINGs meanwhile, then
    // the publisher reads its replies. No sleeps: the interleaving comes from the pipelines.
    for batch in 0..MESSAGES / BATCH {
        let mut pipeline = Vec::new();
        for i in batch * BATCH..(batch + 1) * BATCH {
            pipeline.extend(encode(&[b"PUBLISH", b"many", format!("m{i}").as_bytes()]));
        }
        b.write_raw(&pipeline).await.expect("publish");
        let mut pings = String::new();
        for i in batch * PINGS_PER_BATCH..(batch + 1) * PINGS_PER_BATCH {
            pings += &format!("PING p{i}\r\n");
        }
        w.write_all(pings.as_bytes()).await.expect("ping");
        for _ in 0..BATCH {
            assert_eq!(
                b.read_reply().await.expect("PUBLISH reply"),
                Reply::Integer(1)
            );
        }
    }
    let reader = tokio::time::timeout(Duration::from_secs(30), reader).await;
    let rd = reader
        .expect("every message and PING reply within 30 s")
        .expect("reader");
    // Nothing extra: the next frame answers the next command.
    let mut a = Conn { rd, w };
    a.io("UNSUBSCRIBE", &agg(kind, &["unsubscribe", "many", ":0"]))
        .await;
    proxy.stop().await;
}

#[tokio::test]
async fn many_messages_with_pings_resp2() {
    many_messages('*').await;
}

#[tokio::test]
async fn many_messages_with_pings_resp3() {
    many_messages('>').await;
}
