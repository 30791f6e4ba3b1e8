//! Client input the proxy parses itself, byte for byte: inline commands with quotes and
//! escapes, requests that produce no reply, and every protocol error Redis 7.0 reports, which
//! must come with Redis' exact text, after the replies to earlier commands, followed by the
//! connection closing. Each case also runs directly against redis-server (authenticated as the
//! admin user) and the two byte streams must match.
//!
//! Not covered here: the unauthenticated limits of `--local-password` (`auth.rs`).
mod support;

use support::*;
use tokio::io::AsyncReadExt;

/// Bytes a fresh proxy connection receives for `input` until the proxy closes it.
async fn through_proxy(proxy: &Proxy, input: &[u8]) -> Vec<u8> {
    let mut c = proxy.raw().await;
    c.send(input).await;
    c.read_to_end().await
}

/// Bytes a fresh direct connection to redis-server, authenticated as admin, receives for
/// `input` until the server closes it.
async fn direct(redis: &redis_entra_proxy::devenv::RedisServer, input: &[u8]) -> Vec<u8> {
    let mut c = redis.connect().await.expect("connect to redis");
    let auth = [
        b"AUTH".as_slice(),
        b"admin",
        redis.admin_password().as_bytes(),
    ];
    assert_eq!(
        c.command(&auth).await.expect("AUTH"),
        Reply::Simple("OK".into())
    );
    c.write_raw(input).await.expect("write to redis");
    let mut out = Vec::new();
    let read = tokio::time::timeout(STEP, async {
        loop {
            match c.stream_mut().read_buf(&mut out).await {
                Ok(0) => return,
                Ok(_) => {}
                // Redis closes TLS connections without close_notify.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
                Err(e) => panic!("reading from redis: {e}"),
            }
        }
    });
    read.await.expect("redis closes within bound");
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs each (name, input, expected output up to EOF) through the proxy and directly.
async fn check(proxy: &Proxy, cases: &[Case]) {
    for (name, input, want) in cases {
        let got = through_proxy(proxy, input).await;
        assert_eq!(text(&got), text(want), "{name}: through the proxy");
        let redis = direct(&proxy.redis, input).await;
        assert_eq!(text(&redis), text(want), "{name}: redis-server directly");
    }
}

/// A named case: the client's input and everything it must receive before EOF.
type Case = (&'static str, Vec<u8>, Vec<u8>);

fn case(name: &'static str, input: &[u8], want: &[u8]) -> Case {
    (name, input.to_vec(), want.to_vec())
}

#[tokio::test]
async fn inline_commands_split_like_redis() {
    // Every input ends in QUIT, whose `+OK` is followed by the connection closing.
    let cases = [
        case(
            "quotes",
            b"SET \"a b\" 'c\\'d'\r\nGET \"a b\"\r\nQUIT\r\n",
            b"+OK\r\n$3\r\nc'd\r\n+OK\r\n",
        ),
        case("hex escape", b"ECHO \"\\x41\\n\"\r\nQUIT\r\n", b"$2\r\nA\n\r\n+OK\r\n"),
        case(
            "escapes",
            b"ECHO \"\\t\\\"\\\\\\x7a\"\r\nQUIT\r\n",
            b"$4\r\n\t\"\\z\r\n+OK\r\n",
        ),
        case("empty line", b"\r\nPING\r\nQUIT\r\n", b"+PONG\r\n+OK\r\n"),
        case(
            "blank lines and bare LF",
            b"   \r\n\n\t\nPING\nQUIT\n",
            b"+PONG\r\n+OK\r\n",
        ),
        case(
            "empty and null multibulk",
            b"*0\r\n*-1\r\n*-5\r\nPING\r\nQUIT\r\n",
            b"+PONG\r\n+OK\r\n",
        ),
        case(
            "inline between multibulks",
            b"*1\r\n$4\r\nPING\r\nECHO x\r\n*2\r\n$4\r\nECHO\r\n$1\r\ny\r\nQUIT\r\n",
            b"+PONG\r\n$1\r\nx\r\n$1\r\ny\r\n+OK\r\n",
        ),
        case(
            "sdssplitargs corners",
            b"ECHO \"\\xZZ\\q\"\r\nECHO 'a\\nb'\r\nECHO \"\"\r\nECHO a\rb\r\nQUIT\r\n",
            b"$4\r\nxZZq\r\n$4\r\na\\nb\r\n$0\r\n\r\n-ERR wrong number of arguments for 'echo' command\r\n+OK\r\n",
        ),
        case("nothing runs after QUIT", b"QUIT\r\nSET q 1\r\n", b"+OK\r\n"),
        case("bulk trailer unchecked", b"*1\r\n$4\r\nPINGxxQUIT\r\n", b"+PONG\r\n+OK\r\n"),
    ];
    let proxy = Proxy::start().await;
    check(&proxy, &cases).await;
    let exists = proxy.redis.command(&[b"EXISTS", b"q"]).await;
    assert_eq!(
        exists.expect("EXISTS"),
        Reply::Integer(0),
        "SET behind QUIT ran"
    );
    proxy.stop().await;
}

fn long(prefix: &[u8], fill: u8) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend(std::iter::repeat_n(fill, 70_000));
    v
}

#[tokio::test]
async fn protocol_errors_are_byte_exact_and_close() {
    let e = |reason: &str| format!("-ERR Protocol error: {reason}\r\n").into_bytes();
    let cases = [
        case(
            "multibulk length",
            b"*x\r\n",
            &e("invalid multibulk length"),
        ),
        case(
            "multibulk over INT_MAX",
            b"*2147483648\r\n",
            &e("invalid multibulk length"),
        ),
        case("not a bulk", b"*1\r\n:1\r\n", &e("expected '$', got ':'")),
        case("negative bulk", b"*1\r\n$-5\r\n", &e("invalid bulk length")),
        case(
            "bulk over 512 MiB",
            b"*1\r\n$536870913\r\n",
            &e("invalid bulk length"),
        ),
        case(
            "bulk not a number",
            b"*1\r\n$x\r\n",
            &e("invalid bulk length"),
        ),
        case(
            "open quote",
            b"SET \"a\r\n",
            &e("unbalanced quotes in request"),
        ),
        case(
            "quote then letter",
            b"SET \"a\"b c\r\n",
            &e("unbalanced quotes in request"),
        ),
        case(
            "inline too big",
            &long(b"", b'a'),
            &e("too big inline request"),
        ),
        case(
            "mbulk count too big",
            &long(b"*", b'1'),
            &e("too big mbulk count string"),
        ),
        case(
            "bulk count too big",
            &long(b"*1\r\n$", b'1'),
            &e("too big bulk count string"),
        ),
    ];
    let proxy = Proxy::start().await;
    check(&proxy, &cases).await;
    proxy.stop().await;
}

#[tokio::test]
async fn replies_before_a_protocol_error_arrive_first_and_nothing_after_runs() {
    let err = b"-ERR Protocol error: invalid multibulk length\r\n";
    let mut want = b"+PONG\r\n$1\r\n1\r\n".to_vec();
    want.extend(err);
    let cases = [
        case(
            "PING first",
            b"PING\r\n*x\r\n",
            &[b"+PONG\r\n".as_slice(), err].concat(),
        ),
        case(
            "pipeline around the error",
            b"PING\r\nECHO 1\r\n*x\r\nSET after 1\r\n*1\r\n$4\r\nPING\r\n",
            &want,
        ),
    ];
    let proxy = Proxy::start().await;
    check(&proxy, &cases).await;

    // The command behind the malformed one never reached Redis.
    let got = through_proxy(&proxy, b"SET before 1\r\n*x\r\nSET after 1\r\n").await;
    assert_eq!(text(&got), text(&[b"+OK\r\n".as_slice(), err].concat()));
    let exists = proxy.redis.command(&[b"EXISTS", b"before", b"after"]).await;
    assert_eq!(exists.expect("EXISTS"), Reply::Integer(1));
    proxy.stop().await;
}
