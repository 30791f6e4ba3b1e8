//! Throughput of the proxy's hot path without sockets: the client request parser
//! ([`RequestParser`]), the upstream reply scanner ([`ReplyScanner`]) and the sans-IO session
//! core ([`Core`]) that puts both together. Figures are bytes per second of RESP moved.
//!
//! It does not measure I/O, TLS or the async driver (`benches/compare.sh` does, end to end,
//! against stunnel, haproxy and direct TLS). Run with `cargo bench --bench parsers`; every
//! group is kept short (1 s warm-up, 3 s measurement, 20 samples) so the whole run takes
//! about a minute on a shared 2-core machine.
//!
//! Workloads, shared by the three groups so that the figures compare:
//! - `mixed`: a 1,000-command pipeline of `SET key:NNNN <3 bytes>`, `GET key:NNNN`,
//!   `INCR counter`, `LPUSH list v`, `HSET h f v`, with an `LRANGE list 0 99` (a 100-element
//!   array reply) every 100 commands; the replies are what Redis sends for it.
//! - `16k`: 50 `SET` with 16 KiB values followed by 50 `GET` of them (16 KiB bulk replies).
//! - `inline`: the `mixed` pipeline written as inline commands (`SET key:0001 abc\r\n`),
//!   which the core re-encodes as multibulk.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, Throughput,
};

use redis_entra_proxy::credentials::Credentials;
use redis_entra_proxy::resp::reply::ReplyScanner;
use redis_entra_proxy::resp::request::RequestParser;
use redis_entra_proxy::secret::Secret;
use redis_entra_proxy::session::Core;

/// Commands in the `mixed` and `inline` pipelines.
const PIPELINE: usize = 1_000;
/// Commands of each kind (SET, then GET) in the `16k` pipeline.
const BIG_COUNT: usize = 50;
/// Value size of the `16k` pipeline: Redis's read size, so every value straddles reads.
const BIG_VALUE: usize = 16 * 1024;
/// What the session driver reads per call (`READ_CHUNK` in `session.rs`), for the chunked
/// core cases.
const READ_CHUNK: usize = 16 * 1024;

/// One workload: the client's bytes and the server's replies to them.
struct Workload {
    name: &'static str,
    requests: Vec<u8>,
    replies: Vec<u8>,
    /// Commands the requests hold (for sanity checks).
    commands: usize,
}

fn multibulk(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

fn bulk(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The `mixed` pipeline, as multibulk or inline commands, with its replies.
fn mixed(inline: bool) -> Workload {
    let mut requests = Vec::new();
    let mut replies = Vec::new();
    let mut list_len = 0u64;
    let mut counter = 0u64;
    for i in 0..PIPELINE {
        let key = format!("key:{:04}", i % 10_000);
        let args: Vec<&[u8]> = if i % 100 == 99 {
            replies.extend_from_slice(b"*100\r\n");
            for _ in 0..100 {
                bulk(&mut replies, b"v");
            }
            vec![b"LRANGE", b"list", b"0", b"99"]
        } else {
            match i % 5 {
                0 => {
                    replies.extend_from_slice(b"+OK\r\n");
                    vec![b"SET", key.as_bytes(), b"abc"]
                }
                1 => {
                    bulk(&mut replies, b"abc");
                    vec![b"GET", key.as_bytes()]
                }
                2 => {
                    counter += 1;
                    replies.extend_from_slice(format!(":{counter}\r\n").as_bytes());
                    vec![b"INCR", b"counter"]
                }
                3 => {
                    list_len += 1;
                    replies.extend_from_slice(format!(":{list_len}\r\n").as_bytes());
                    vec![b"LPUSH", b"list", b"v"]
                }
                _ => {
                    replies.extend_from_slice(b":0\r\n");
                    vec![b"HSET", b"h", b"f", b"v"]
                }
            }
        };
        if inline {
            let words: Vec<&str> = args
                .iter()
                .map(|a| std::str::from_utf8(a).expect("ASCII arguments"))
                .collect();
            requests.extend_from_slice(words.join(" ").as_bytes());
            requests.extend_from_slice(b"\r\n");
        } else {
            multibulk(&mut requests, &args);
        }
    }
    Workload {
        name: if inline { "inline" } else { "mixed" },
        requests,
        replies,
        commands: PIPELINE,
    }
}

/// The `16k` pipeline: SETs of 16 KiB values, then GETs of them.
fn big() -> Workload {
    let value: Vec<u8> = (0..BIG_VALUE).map(|i| b'a' + (i % 26) as u8).collect();
    let mut requests = Vec::new();
    let mut replies = Vec::new();
    for i in 0..BIG_COUNT {
        let key = format!("big:{i:04}");
        multibulk(&mut requests, &[b"SET", key.as_bytes(), &value]);
        replies.extend_from_slice(b"+OK\r\n");
    }
    for i in 0..BIG_COUNT {
        let key = format!("big:{i:04}");
        multibulk(&mut requests, &[b"GET", key.as_bytes()]);
        bulk(&mut replies, &value);
    }
    Workload {
        name: "16k",
        requests,
        replies,
        commands: 2 * BIG_COUNT,
    }
}

fn workloads() -> Vec<Workload> {
    vec![mixed(false), big(), mixed(true)]
}

/// Frames every command of `buf` the way the core does: parse, then drop the frame.
fn parse_all(buf: &[u8]) -> usize {
    let mut parser = RequestParser::new();
    let mut off = 0;
    let mut frames = 0;
    while let Some(frame) = parser.parse(&buf[off..]).expect("valid pipeline") {
        off += frame.len();
        frames += 1;
    }
    assert_eq!(off, buf.len(), "the whole pipeline is framed");
    frames
}

/// Finds the end of every top-level reply of `buf`.
fn scan_all(buf: &[u8]) -> usize {
    let mut scanner = ReplyScanner::new();
    let mut off = 0;
    let mut frames = 0;
    while off < buf.len() {
        let scan = scanner.scan(&buf[off..]).expect("valid replies");
        off += scan.consumed;
        if scan.complete {
            frames += 1;
        } else {
            assert!(scan.consumed > 0, "the reply stream is complete");
        }
    }
    frames
}

fn credentials() -> Arc<Credentials> {
    Arc::new(Credentials {
        username: "bench".to_owned(),
        // A token of realistic length (Entra access tokens are 1.5–2.5 KB).
        token: Secret::new("x".repeat(2_000)),
        expires_at: Some(SystemTime::now() + Duration::from_secs(3_600)),
        generation: 1,
    })
}

/// One proxied pipeline through a fresh core, as the session driver does it: the server's
/// `+OK` to the injected AUTH, the client's bytes in `chunk`-sized reads, what goes upstream
/// taken, then the replies in `chunk`-sized reads and what goes to the client taken.
/// Returns (bytes sent upstream, bytes sent to the client).
fn proxy(
    creds: &Arc<Credentials>,
    requests: &[u8],
    replies: &[u8],
    chunk: usize,
) -> (usize, usize) {
    let mut core = Core::new(creds.clone(), None);
    let mut uin = BytesMut::from(&b"+OK\r\n"[..]);
    core.upstream_input(&mut uin);
    // The injected AUTH is not the client's traffic.
    core.to_upstream.clear();
    let (mut up, mut down) = (0, 0);
    let mut cin = BytesMut::with_capacity(chunk.min(requests.len()));
    for piece in requests.chunks(chunk) {
        cin.extend_from_slice(piece);
        // The core stops reading past its upstream high-water mark until the driver writes.
        loop {
            let before = cin.len();
            core.client_input(&mut cin);
            up += core.to_upstream.len();
            core.to_upstream.clear();
            if cin.is_empty() || cin.len() == before {
                break;
            }
        }
    }
    assert!(cin.is_empty(), "every command was framed");
    for piece in replies.chunks(chunk) {
        uin.extend_from_slice(piece);
        loop {
            let before = uin.len();
            core.upstream_input(&mut uin);
            down += core.to_client.len();
            core.to_client.clear();
            if uin.is_empty() || uin.len() == before {
                break;
            }
        }
    }
    assert!(uin.is_empty(), "every reply was matched");
    assert!(core.idle() && core.close_reason().is_none());
    (up, down)
}

/// Keeps each group short: the whole bench must finish in about a minute on 2 shared cores.
fn short<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    g
}

fn request_parser(c: &mut Criterion) {
    let mut g = short(c, "request_parser");
    for w in workloads() {
        assert_eq!(parse_all(&w.requests), w.commands);
        g.throughput(Throughput::Bytes(w.requests.len() as u64));
        g.bench_function(w.name, |b| b.iter(|| parse_all(black_box(&w.requests))));
    }
    g.finish();
}

fn reply_scanner(c: &mut Criterion) {
    let mut g = short(c, "reply_scanner");
    // The inline workload's replies are the mixed one's.
    for w in workloads().into_iter().filter(|w| w.name != "inline") {
        assert_eq!(scan_all(&w.replies), w.commands);
        g.throughput(Throughput::Bytes(w.replies.len() as u64));
        g.bench_function(w.name, |b| b.iter(|| scan_all(black_box(&w.replies))));
    }
    g.finish();
}

fn session_core(c: &mut Criterion) {
    let mut g = short(c, "session_core");
    let creds = credentials();
    for w in workloads() {
        // Sanity: multibulk commands go upstream byte for byte (after the AUTH), and the
        // client gets every reply.
        let (up, down) = proxy(&creds, &w.requests, &w.replies, usize::MAX);
        if w.name != "inline" {
            assert_eq!(up, w.requests.len());
        }
        assert_eq!(down, w.replies.len());
        g.throughput(Throughput::Bytes(
            (w.requests.len() + w.replies.len()) as u64,
        ));
        g.bench_function(format!("{}/whole", w.name), |b| {
            b.iter(|| {
                proxy(
                    &creds,
                    black_box(&w.requests),
                    black_box(&w.replies),
                    usize::MAX,
                )
            })
        });
        g.bench_function(format!("{}/16k_reads", w.name), |b| {
            b.iter(|| {
                proxy(
                    &creds,
                    black_box(&w.requests),
                    black_box(&w.replies),
                    READ_CHUNK,
                )
            })
        });
    }
    // A core per connection: what accepting a client costs the core (AUTH written, reply
    // swallowed), with no command.
    g.throughput(Throughput::Elements(1));
    g.bench_function("new_and_auth", |b| {
        b.iter_batched(
            || BytesMut::from(&b"+OK\r\n"[..]),
            |mut ok| {
                let mut core = Core::new(creds.clone(), None);
                core.upstream_input(&mut ok);
                core
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, request_parser, reply_scanner, session_core);
criterion_main!(benches);
