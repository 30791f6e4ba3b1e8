//! The data path end to end: real clients (`redis-cli`, `redis-benchmark`), deep pipelines,
//! values up to 64 MiB, transactions, blocking commands, a client vanishing mid-pipeline, the
//! unix socket listener and RESP3 (maps and client-side-caching pushes), each asserted on the
//! bytes a client receives.
//!
//! Not covered here: inline parsing and protocol errors (`protocol_errors.rs`), pub/sub
//! (`pubsub.rs`), token rotation (`rotation.rs`).
mod support;

use std::time::Duration;

use redis_entra_proxy::devenv::{encode, RespConn};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{timeout, Instant};

/// A raw client that frames RESP2/RESP3 replies itself, over TCP or a unix socket.
struct Frames<S> {
    s: S,
    /// Bytes read but not yet returned.
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Frames<S> {
    fn new(s: S) -> Self {
        Frames { s, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write to proxy");
    }

    async fn fill(&mut self, deadline: Instant) {
        let n = tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf))
            .await
            .expect("reply within bound")
            .expect("read");
        assert!(n > 0, "EOF; buffered {:?}", text(&self.buf));
    }

    /// The next complete frame, as sent by the proxy.
    async fn frame(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(n) = frame_len(&self.buf, 0) {
                return self.buf.drain(..n).collect();
            }
            self.fill(deadline).await;
        }
    }

    /// Reads exactly as many bytes as `expected` holds and compares them.
    async fn expect(&mut self, expected: &[u8]) {
        let deadline = Instant::now() + STEP;
        while self.buf.len() < expected.len() {
            self.fill(deadline).await;
        }
        let got: Vec<u8> = self.buf.drain(..expected.len()).collect();
        assert_eq!(text(&got), text(expected));
    }

    /// Asserts that nothing arrives within `d`.
    async fn quiet(&mut self, d: Duration) {
        let read = timeout(d, self.s.read_buf(&mut self.buf)).await;
        assert!(
            read.is_err() && self.buf.is_empty(),
            "unexpected bytes {:?}",
            text(&self.buf)
        );
    }
}

async fn tcp(proxy: &Proxy) -> Frames<TcpStream> {
    let s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    Frames::new(s)
}

/// Length of the RESP2/RESP3 frame starting at `at`, or `None` while it is incomplete.
fn frame_len(buf: &[u8], at: usize) -> Option<usize> {
    let nl = at + memchr::memmem::find(buf.get(at..)?, b"\r\n")?;
    let line = std::str::from_utf8(&buf[at + 1..nl]).expect("UTF-8 header");
    let after = nl + 2;
    let n: i64 = match buf[at] {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => return Some(after - at),
        b'$' | b'=' | b'!' => {
            let len: i64 = line.parse().expect("bulk length");
            let end = after + usize::try_from(len).map_or(0, |l| l + 2);
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

fn bulk(s: &str) -> Reply {
    Reply::Bulk(Some(s.as_bytes().to_vec()))
}

fn ok() -> Reply {
    Reply::Simple("OK".into())
}

async fn cmd(c: &mut RespConn, args: &[&str]) -> Reply {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    timeout(STEP, c.command(&args))
        .await
        .expect("reply within bound")
        .expect("reply")
}

/// Upstream connections the proxy holds: those authenticated as a token identity.
async fn upstream_count(proxy: &Proxy) -> usize {
    let list = proxy.redis.client_list().await.expect("CLIENT LIST");
    list.iter()
        .filter(|c| c.get("user").is_some_and(|u| u.starts_with("oid-")))
        .count()
}

/// Polls (bounded) until the proxy holds exactly `want` upstream connections.
async fn wait_upstreams(proxy: &Proxy, want: usize) {
    let deadline = Instant::now() + STEP;
    loop {
        let n = upstream_count(proxy).await;
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} upstream connections, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `redis-cli` against the proxy's TCP port.
async fn cli(proxy: &Proxy, args: &[&str], stdin: Option<&[u8]>) -> String {
    let port = proxy.addr.port().to_string();
    let mut all = vec!["-h", "127.0.0.1", "-p", &port];
    all.extend_from_slice(args);
    let (success, out, err) = run_tool("redis-cli", &all, stdin).await;
    assert!(success, "redis-cli {args:?}: {out} {err}");
    out
}

#[tokio::test]
async fn redis_cli_commands_through_proxy() {
    let proxy = Proxy::start().await;
    assert_eq!(cli(&proxy, &["SET", "k", "v"], None).await, "OK\n");
    assert_eq!(cli(&proxy, &["GET", "k"], None).await, "v\n");
    assert_eq!(cli(&proxy, &["--no-raw", "PING"], None).await, "PONG\n");
    assert_eq!(cli(&proxy, &["SET", "a b", "c d"], None).await, "OK\n");
    assert_eq!(cli(&proxy, &["GET", "a b"], None).await, "c d\n");
    // Lines from stdin are split by redis-cli itself, quotes included.
    let script = b"SET \"e f\" \"g h\"\nGET \"e f\"\nGET 'a b'\n";
    assert_eq!(cli(&proxy, &[], Some(script)).await, "OK\ng h\nc d\n");
    proxy.stop().await;
}

/// Runs redis-benchmark in quiet mode and checks it printed a rate for every test.
async fn benchmark(proxy: &Proxy, extra: &[&str], tests: &[&str]) {
    let port = proxy.addr.port().to_string();
    let mut args = vec!["-h", "127.0.0.1", "-p", &port, "-q"];
    args.extend_from_slice(extra);
    let (success, out, err) = run_tool("redis-benchmark", &args, None).await;
    assert!(success, "redis-benchmark failed: {out} {err}");
    assert!(!err.contains("Error"), "{err}");
    // Progress lines end in `\r`, results in `\n`.
    let lines: Vec<&str> = out.split(['\r', '\n']).collect();
    for t in tests {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("{t}: ")) && l.contains("requests per second")),
            "no rate for {t} in {out:?}"
        );
    }
}

#[tokio::test]
async fn redis_benchmark_through_proxy() {
    let proxy = Proxy::start().await;
    let n = "20000";
    let tests = "set,get,incr,lpush,lpop";
    let extra = ["-n", n, "-c", "20", "-t", tests, "-P", "8"];
    benchmark(&proxy, &extra, &["SET", "GET", "INCR", "LPUSH", "LPOP"]).await;
    // Nothing lost or doubled: every INCR counted, every LPUSH popped.
    let mut c = proxy.client().await;
    assert_eq!(cmd(&mut c, &["GET", "counter:__rand_int__"]).await, bulk(n));
    assert_eq!(cmd(&mut c, &["LLEN", "mylist"]).await, Reply::Integer(0));

    let extra = ["-n", "5000", "-c", "10", "-d", "16384", "-t", "set,get"];
    benchmark(&proxy, &extra, &["SET", "GET"]).await;
    let mut c = proxy.client().await;
    let len = cmd(&mut c, &["STRLEN", "key:__rand_int__"]).await;
    assert_eq!(len, Reply::Integer(16384));
    assert_eq!(cmd(&mut c, &["PING"]).await, Reply::Simple("PONG".into()));
    proxy.stop().await;
}

#[tokio::test]
async fn pipeline_of_10000_commands_in_one_write() {
    let proxy = Proxy::start().await;
    let (mut input, mut expected) = (Vec::new(), Vec::new());
    let mut counter = 0;
    for i in 0..10_000 {
        let (k, v) = (format!("key:{}", i / 3), (i / 3).to_string());
        match i % 3 {
            0 => {
                input.extend(encode(&[b"SET", k.as_bytes(), v.as_bytes()]));
                expected.extend(b"+OK\r\n");
            }
            1 => {
                input.extend(encode(&[b"GET", k.as_bytes()]));
                expected.extend(format!("${}\r\n{v}\r\n", v.len()).bytes());
            }
            _ => {
                counter += 1;
                input.extend(encode(&[b"INCR", b"counter"]));
                expected.extend(format!(":{counter}\r\n").bytes());
            }
        }
    }
    let s = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    // A separate writer: the proxy may answer before it has read the whole pipeline.
    let writer = tokio::spawn(async move {
        w.write_all(&input).await.expect("write pipeline");
        w
    });
    let mut got = vec![0; expected.len()];
    timeout(STEP, r.read_exact(&mut got))
        .await
        .expect("all replies within bound")
        .expect("read");
    assert!(got == expected, "reply stream differs");
    let _w = writer.await.expect("writer");
    proxy.stop().await;
}

/// The test pattern: no period that lines up with power-of-two chunk boundaries.
fn pattern(i: usize) -> u8 {
    ((i % 251) as u8) ^ ((i >> 20) as u8)
}

fn pattern_chunk(start: usize, len: usize) -> Vec<u8> {
    (start..start + len).map(pattern).collect()
}

/// Chunk for generating and checking large values, so neither side holds a whole copy.
const CHUNK: usize = 1 << 20;

/// SETs `key` to `len` pattern bytes, GETs it back and compares, chunk by chunk.
async fn set_get_large(c: &mut Frames<TcpStream>, key: &str, len: usize) {
    let header = format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${len}\r\n", key.len());
    c.send(header.as_bytes()).await;
    for start in (0..len).step_by(CHUNK) {
        c.send(&pattern_chunk(start, CHUNK.min(len - start))).await;
    }
    c.send(b"\r\n").await;
    c.expect(b"+OK\r\n").await;

    c.send(&encode(&[b"GET", key.as_bytes()])).await;
    c.expect(format!("${len}\r\n").as_bytes()).await;
    for start in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - start);
        let deadline = Instant::now() + STEP;
        while c.buf.len() < n {
            c.fill(deadline).await;
        }
        let got: Vec<u8> = c.buf.drain(..n).collect();
        assert!(
            got == pattern_chunk(start, n),
            "{key}: bytes differ in chunk at {start}"
        );
    }
    c.expect(b"\r\n").await;
}

#[tokio::test]
async fn large_values_round_trip() {
    let proxy = Proxy::start().await;
    let mut c = tcp(&proxy).await;
    set_get_large(&mut c, "one-mib", 1 << 20).await;
    let big = 64 << 20;
    set_get_large(&mut c, "big", big).await;
    c.send(b"STRLEN big\r\n").await;
    c.expect(format!(":{big}\r\n").as_bytes()).await;
    for (from, to) in [(0, 99), (40_000_000, 40_000_999), (big - 10, big - 1)] {
        let (f, t) = (from.to_string(), to.to_string());
        c.send(&encode(&[b"GETRANGE", b"big", f.as_bytes(), t.as_bytes()]))
            .await;
        let mut want = format!("${}\r\n", to - from + 1).into_bytes();
        want.extend(pattern_chunk(from, to - from + 1));
        want.extend(b"\r\n");
        c.expect(&want).await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn multi_exec_watch_discard() {
    let proxy = Proxy::start().await;
    let (mut a, mut b) = (proxy.client().await, proxy.client().await);
    let queued = Reply::Simple("QUEUED".into());

    // A transaction that runs.
    assert_eq!(cmd(&mut a, &["MULTI"]).await, ok());
    assert_eq!(cmd(&mut a, &["SET", "t", "1"]).await, queued);
    assert_eq!(cmd(&mut a, &["INCR", "t"]).await, queued);
    assert_eq!(cmd(&mut a, &["GET", "t"]).await, queued);
    let want = vec![ok(), Reply::Integer(2), bulk("2")];
    assert_eq!(cmd(&mut a, &["EXEC"]).await, Reply::Array(Some(want)));

    // Aborted by WATCH: another proxy client changes the key.
    assert_eq!(cmd(&mut a, &["WATCH", "w"]).await, ok());
    assert_eq!(cmd(&mut b, &["SET", "w", "theirs"]).await, ok());
    assert_eq!(cmd(&mut a, &["MULTI"]).await, ok());
    assert_eq!(cmd(&mut a, &["SET", "w", "mine"]).await, queued);
    a.send(&[b"EXEC"]).await.expect("send");
    let mut null = [0; 5];
    timeout(STEP, a.stream_mut().read_exact(&mut null))
        .await
        .expect("EXEC within bound")
        .expect("read");
    assert_eq!(&null, b"*-1\r\n");
    assert_eq!(cmd(&mut a, &["GET", "w"]).await, bulk("theirs"));

    // DISCARD.
    assert_eq!(cmd(&mut a, &["MULTI"]).await, ok());
    assert_eq!(cmd(&mut a, &["SET", "d", "1"]).await, queued);
    assert_eq!(cmd(&mut a, &["DISCARD"]).await, ok());
    assert_eq!(cmd(&mut a, &["GET", "d"]).await, Reply::Bulk(None));

    // A queue-time error aborts EXEC.
    assert_eq!(cmd(&mut a, &["MULTI"]).await, ok());
    let arity = Reply::Error("ERR wrong number of arguments for 'set' command".into());
    assert_eq!(cmd(&mut a, &["SET", "k"]).await, arity);
    assert_eq!(cmd(&mut a, &["SET", "e", "1"]).await, queued);
    let exec = cmd(&mut a, &["EXEC"]).await;
    assert_eq!(
        exec,
        Reply::Error("EXECABORT Transaction discarded because of previous errors.".into())
    );
    assert_eq!(cmd(&mut a, &["GET", "e"]).await, Reply::Bulk(None));
    assert_eq!(
        cmd(&mut a, &["EXEC"]).await,
        Reply::Error("ERR EXEC without MULTI".into())
    );
    proxy.stop().await;
}

#[tokio::test]
async fn blpop_times_out_and_is_unblocked_in_order() {
    let proxy = Proxy::start().await;
    let mut a = tcp(&proxy).await;
    let start = Instant::now();
    a.send(b"BLPOP emptylist 1\r\n").await;
    a.expect(b"*-1\r\n").await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "BLPOP returned after {waited:?}"
    );

    // Block, with a PING pipelined behind the BLPOP.
    a.send(&encode(&[b"BLPOP", b"q", b"5"])).await;
    a.send(b"PING\r\n").await;
    let deadline = Instant::now() + STEP;
    loop {
        let list = proxy.redis.client_list().await.expect("CLIENT LIST");
        let blocked = |c: &std::collections::HashMap<String, String>| {
            c.get("cmd").is_some_and(|c| c == "blpop")
                && c.get("flags").is_some_and(|f| f.contains('b'))
        };
        if list.iter().any(blocked) {
            break;
        }
        assert!(Instant::now() < deadline, "BLPOP never blocked: {list:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The PING waits behind the blocked command.
    a.quiet(Duration::from_millis(200)).await;
    let mut b = proxy.client().await;
    assert_eq!(
        cmd(&mut b, &["RPUSH", "q", "hello"]).await,
        Reply::Integer(1)
    );
    a.expect(b"*2\r\n$1\r\nq\r\n$5\r\nhello\r\n+PONG\r\n").await;
    assert_eq!(cmd(&mut b, &["LLEN", "q"]).await, Reply::Integer(0));
    proxy.stop().await;
}

#[tokio::test]
async fn client_vanishing_mid_pipeline_harms_no_one() {
    let proxy = Proxy::start().await;
    let mut live = proxy.client().await;
    wait_upstreams(&proxy, 1).await;

    let vanisher = tokio::spawn({
        let addr = proxy.addr;
        async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let mut input = encode(&[b"INCR", b"vanish"]).repeat(1000);
            input.extend(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\nhalf");
            s.write_all(&input).await.expect("write");
            // Dropping the socket here closes it with the last command half written.
        }
    });
    for i in 1..=200 {
        assert_eq!(cmd(&mut live, &["INCR", "live"]).await, Reply::Integer(i));
    }
    timeout(STEP, vanisher)
        .await
        .expect("vanisher within bound")
        .expect("vanisher");

    let mut fresh = proxy.client().await;
    assert_eq!(
        cmd(&mut fresh, &["PING"]).await,
        Reply::Simple("PONG".into())
    );
    assert_eq!(cmd(&mut fresh, &["EXISTS", "k"]).await, Reply::Integer(0));
    // `live` and `fresh` are the only clients left.
    wait_upstreams(&proxy, 2).await;
    assert_eq!(cmd(&mut live, &["GET", "live"]).await, bulk("200"));
    proxy.stop().await;
}

/// Shuts the write side of `s` and reads what comes until the proxy closes (within
/// [`STEP`]).
async fn half_close(s: &mut TcpStream) -> Vec<u8> {
    s.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    timeout(STEP, s.read_to_end(&mut got))
        .await
        .expect("EOF within bound")
        .expect("read");
    got
}

#[tokio::test]
async fn client_half_closing_after_a_pipeline_gets_every_reply() {
    let proxy = Proxy::start().await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&encode(&[b"INCR", b"hc"]).repeat(1000))
        .await
        .expect("write");
    let got = half_close(&mut s).await;
    let want: String = (1..=1000).map(|i| format!(":{i}\r\n")).collect();
    assert!(
        text(&got) == want,
        "got {} bytes: {:?}…",
        got.len(),
        text(&got[..got.len().min(40)])
    );
    proxy.stop().await;
}

/// A client that leaves while a blocking command of its is pending, as client libraries do
/// on a socket timeout or a cancelled call, takes nothing: Redis drops a blocked client that
/// closed, and the proxy closes its upstream connection at once (replies owed before the
/// blocking command still delivered) rather than keeping the command running for up to its
/// half-close grace, where it would pop, move or claim the next element for nobody.
#[tokio::test]
async fn a_client_leaving_a_blocked_command_takes_nothing() {
    let proxy = Proxy::start().await;
    let mut other = proxy.client().await;
    assert_eq!(
        cmd(
            &mut other,
            &["XGROUP", "CREATE", "lv:s", "g", "$", "MKSTREAM"]
        )
        .await,
        Reply::Simple("OK".into())
    );
    let cases: [(&[&[u8]], bool); 5] = [
        (&[b"BLPOP", b"lv:q", b"0"], true),
        (&[b"BLPOP", b"lv:q", b"0"], false),
        (
            &[b"BLMOVE", b"lv:q", b"lv:taken", b"LEFT", b"RIGHT", b"0"],
            true,
        ),
        (
            &[
                b"XREADGROUP",
                b"GROUP",
                b"g",
                b"gone",
                b"BLOCK",
                b"0",
                b"STREAMS",
                b"lv:s",
                b">",
            ],
            true,
        ),
        (&[b"BZPOPMIN", b"lv:z", b"0"], true),
    ];
    for (blocking, half_closes) in cases {
        let before = upstream_count(&proxy).await;
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        let mut input = encode(&[b"SET", b"lv:before", b"1"]);
        input.extend(encode(blocking));
        s.write_all(&input).await.expect("write");
        wait_upstreams(&proxy, before + 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        if half_closes {
            let got = half_close(&mut s).await;
            assert_eq!(
                text(&got),
                "+OK\r\n",
                "{blocking:?}: the reply before it only"
            );
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{blocking:?}: closed after {:?}",
                started.elapsed()
            );
        } else {
            drop(s);
        }
        // The server dropped the blocked client with the proxy's connection.
        wait_upstreams(&proxy, before).await;
        let name = String::from_utf8_lossy(blocking[0]).to_string();
        match &*name {
            "XREADGROUP" => {
                cmd(&mut other, &["XADD", "lv:s", "*", "job", "1"]).await;
                assert_eq!(
                    cmd(&mut other, &["XPENDING", "lv:s", "g"]).await,
                    Reply::Array(Some(vec![
                        Reply::Integer(0),
                        Reply::Bulk(None),
                        Reply::Bulk(None),
                        Reply::Array(None)
                    ])),
                    "nothing claimed for the consumer that left"
                );
            }
            "BZPOPMIN" => {
                cmd(&mut other, &["ZADD", "lv:z", "1", "job"]).await;
                assert_eq!(cmd(&mut other, &["ZCARD", "lv:z"]).await, Reply::Integer(1));
            }
            _ => {
                cmd(&mut other, &["RPUSH", "lv:q", "job"]).await;
                assert_eq!(
                    cmd(&mut other, &["LLEN", "lv:q"]).await,
                    Reply::Integer(1),
                    "{blocking:?} took the job for a client that left"
                );
                assert_eq!(cmd(&mut other, &["DEL", "lv:q"]).await, Reply::Integer(1));
            }
        }
    }
    proxy.stop().await;
}

/// A client that goes away in the middle of a big value, whose first bytes the proxy has
/// already passed upstream: the server never runs the half command, the proxy drops that
/// upstream connection at once (it will never be answered), and a client that only
/// half-closes still gets the replies owed before it, then EOF, without waiting out the
/// half-close grace period (5 s).
#[tokio::test]
async fn client_leaving_in_the_middle_of_a_big_value() {
    let proxy = Proxy::start().await;
    let mut live = proxy.client().await;
    wait_upstreams(&proxy, 1).await;
    let half = |key: &str| {
        let mut b = format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
            key.len(),
            1 << 20
        )
        .into_bytes();
        b.extend(pattern_chunk(0, 300_000));
        b
    };

    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&half("gone")).await.expect("write");
    wait_upstreams(&proxy, 2).await;
    drop(s);
    wait_upstreams(&proxy, 1).await;

    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut input = encode(&[b"INCR", b"hc-big"]).repeat(10);
    input.extend(half("half-closed"));
    s.write_all(&input).await.expect("write");
    s.shutdown().await.expect("half-close");
    let started = Instant::now();
    let mut got = Vec::new();
    timeout(STEP, s.read_to_end(&mut got))
        .await
        .expect("EOF within bound")
        .expect("read");
    let want: String = (1..=10).map(|i| format!(":{i}\r\n")).collect();
    assert_eq!(text(&got), want);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "EOF after {:?}: the half command was waited for",
        started.elapsed()
    );
    wait_upstreams(&proxy, 1).await;
    assert_eq!(
        cmd(&mut live, &["EXISTS", "gone", "half-closed"]).await,
        Reply::Integer(0)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn unix_socket_listener() {
    let proxy = Proxy::start_with(ProxyOptions {
        unix_socket: true,
        ..Default::default()
    })
    .await;
    let path = proxy.unix_socket.clone().expect("unix socket path");
    let s = UnixStream::connect(&path)
        .await
        .expect("connect unix socket");
    let mut c = Frames::new(s);
    c.send(b"PING\r\n").await;
    c.expect(b"+PONG\r\n").await;
    c.send(&encode(&[b"SET", b"u", b"x"])).await;
    c.expect(b"+OK\r\n").await;

    let path = path.to_str().expect("UTF-8 path");
    let (success, out, err) = run_tool("redis-cli", &["-s", path, "PING"], None).await;
    assert!(success, "{err}");
    assert_eq!(out, "PONG\n");
    let (_, out, _) = run_tool("redis-cli", &["-s", path, "GET", "u"], None).await;
    assert_eq!(out, "x\n");
    let path = std::path::PathBuf::from(path);
    proxy.stop().await;
    assert!(!path.exists(), "the socket file is removed at exit");
}

#[tokio::test]
async fn unix_socket_mode_decides_who_may_connect() {
    use std::os::unix::fs::PermissionsExt;
    for (mode, others_served) in [("666", true), ("600", false)] {
        let proxy = Proxy::start_with(ProxyOptions {
            unix_socket: true,
            unix_socket_mode: Some(mode),
            ..Default::default()
        })
        .await;
        let path = proxy.unix_socket.clone().expect("unix socket path");
        let bits = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(format!("{bits:o}"), mode);
        // Connecting takes write permission on the socket: another user (nobody) gets in with
        // 666 and not with 600. Only root can run a tool as another user.
        if rustix::process::getuid().is_root() {
            let dir = path.parent().unwrap();
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            let path = path.to_str().expect("UTF-8 path");
            let (_, out, err) = run_tool(
                "setpriv",
                &[
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "redis-cli",
                    "-s",
                    path,
                ],
                Some(b"PING\n"),
            )
            .await;
            if others_served {
                assert_eq!(out, "PONG\n", "{err}");
            } else {
                assert!(
                    err.contains("Permission denied") || out.contains("Permission denied"),
                    "{out}{err}"
                );
            }
        }
        proxy.stop().await;
    }
}

#[tokio::test]
async fn resp3_maps_nulls_and_tracking_pushes() {
    let proxy = Proxy::start().await;
    let mut a = tcp(&proxy).await;
    a.send(b"HELLO 3\r\n").await;
    let hello = a.frame().await;
    assert_eq!(hello[0], b'%', "{}", text(&hello));
    assert!(
        memchr::memmem::find(&hello, b"$5\r\nproto\r\n:3\r\n").is_some(),
        "{}",
        text(&hello)
    );

    a.send(b"HSET h f v\r\n").await;
    a.expect(b":1\r\n").await;
    a.send(b"HGETALL h\r\n").await;
    a.expect(b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n").await;
    a.send(b"GET missing\r\nBLPOP emptylist 0.01\r\n").await;
    a.expect(b"_\r\n_\r\n").await;

    let mut b = proxy.client().await;
    assert_eq!(cmd(&mut b, &["SET", "k", "v1"]).await, ok());
    a.send(b"CLIENT TRACKING on\r\n").await;
    a.expect(b"+OK\r\n").await;
    a.send(b"GET k\r\n").await;
    a.expect(b"$2\r\nv1\r\n").await;
    assert_eq!(cmd(&mut b, &["SET", "k", "v2"]).await, ok());
    a.expect(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n")
        .await;
    // The connection still answers in order after the push.
    a.send(b"GET k\r\n").await;
    a.expect(b"$2\r\nv2\r\n").await;
    proxy.stop().await;
}
