//! One client, one request in flight, every round trip timed to the nanosecond: the latency
//! figures of `benches/compare.sh` for the single-client cases.
//!
//! `redis-benchmark` cannot tell two latencies apart below 8 µs: its histogram's lowest
//! discernible value is 10 µs, so the smallest step of its buckets is 2^3 µs. Through two
//! proxies that answer within a few microseconds of each other, its p99 lands in the same
//! bucket or the next one by chance. This probe does what `redis-benchmark -c 1 -t set,get`
//! does (`SET key:__rand_int__ xxx`, then `GET key:__rand_int__`, one at a time, on one
//! connection) and keeps every sample.
//!
//! ```text
//! cargo bench --bench latency -- HOST:PORT [-n N] [--tls CA_FILE SNI] [--user USER --pass PASS]
//! ```
//!
//! For each test it prints a tab-separated line: test, requests/s, then p50, p99, p99.9 and
//! max in milliseconds (three decimals for `compare.sh`'s tables, which are in ms, and a
//! fourth for the microsecond). `--pass` is sent in `AUTH` and never printed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_entra_proxy::resp::reply::ReplyScanner;

/// Requests before the timed ones, on the same connection (caches, branch predictors, the
/// proxy's buffers).
const WARMUP: usize = 1_000;
/// No single round trip may take longer: the probe fails rather than hang.
const TIMEOUT: Duration = Duration::from_secs(10);

struct Args {
    addr: String,
    n: usize,
    tls: Option<(String, String)>,
    auth: Option<(String, String)>,
}

fn usage() -> String {
    "usage: latency HOST:PORT [-n N] [--tls CA_FILE SNI] [--user USER --pass PASS]".to_string()
}

/// `Ok(None)`: run with no arguments at all, as `cargo test --all-targets` runs every bench
/// target to check that it starts: there is nothing to measure.
fn parse_args() -> Result<Option<Args>, String> {
    if std::env::args().len() == 1 {
        return Ok(None);
    }
    // `cargo bench` passes `--bench` to harness-less targets; it means nothing here.
    let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
    let addr = it.next().ok_or_else(usage)?;
    let (mut n, mut tls, mut user, mut pass) = (20_000, None, None, None);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "-n" => n = value()?.parse().map_err(|e| format!("-n: {e}"))?,
            "--tls" => tls = Some((value()?, value()?)),
            "--user" => user = Some(value()?),
            "--pass" => pass = Some(value()?),
            _ => return Err(format!("unknown argument {flag}\n{}", usage())),
        }
    }
    if n == 0 {
        return Err("-n must be at least 1".into());
    }
    let auth = match (user, pass) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => return Err("--user and --pass go together".into()),
    };
    Ok(Some(Args { addr, n, tls, auth }))
}

/// A blocking connection, plain or TLS, that sends a request and reads its whole reply.
struct Conn {
    io: Box<dyn ReadWrite>,
    buf: Vec<u8>,
    scanner: ReplyScanner,
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

impl Conn {
    fn open(args: &Args) -> Result<Conn, String> {
        let tcp = TcpStream::connect(&args.addr).map_err(|e| format!("{}: {e}", args.addr))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        tcp.set_write_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        let io: Box<dyn ReadWrite> = match &args.tls {
            None => Box::new(tcp),
            Some((ca, sni)) => {
                let config: Arc<rustls::ClientConfig> =
                    redis_entra_proxy::tls::client_config(Some(Path::new(ca)))
                        .map_err(|e| e.to_string())?;
                let name = rustls::pki_types::ServerName::try_from(sni.clone())
                    .map_err(|e| format!("{sni}: {e}"))?;
                let conn =
                    rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
                Box::new(rustls::StreamOwned::new(conn, tcp))
            }
        };
        Ok(Conn {
            io,
            buf: Vec::with_capacity(4096),
            scanner: ReplyScanner::new(),
        })
    }

    /// Sends `request` and returns its reply.
    fn call(&mut self, request: &[u8]) -> Result<&[u8], String> {
        self.io.write_all(request).map_err(|e| e.to_string())?;
        self.buf.clear();
        let mut scanned = 0;
        let mut chunk = [0u8; 4096];
        loop {
            let scan = self
                .scanner
                .scan(&self.buf[scanned..])
                .map_err(|e| format!("reply: {e}"))?;
            scanned += scan.consumed;
            if scan.complete {
                return Ok(&self.buf[..scanned]);
            }
            let n = self.io.read(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

/// The value at `q` (0..=1) of sorted nanoseconds, in milliseconds.
fn percentile(sorted: &[u64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1e6
}

fn run() -> Result<(), String> {
    let Some(args) = parse_args()? else {
        eprintln!("latency: no address given, nothing measured\n{}", usage());
        return Ok(());
    };
    let mut conn = Conn::open(&args)?;
    if let Some((user, pass)) = &args.auth {
        let reply = conn.call(&command(&["AUTH", user, pass]))?;
        if !reply.starts_with(b"+OK") {
            // The reply names no secret: Redis answers a failed AUTH with a fixed message.
            return Err(format!(
                "AUTH refused: {}",
                String::from_utf8_lossy(reply).trim_end()
            ));
        }
    }
    let tests = [
        ("SET", command(&["SET", "key:__rand_int__", "xxx"])),
        ("GET", command(&["GET", "key:__rand_int__"])),
    ];
    for (name, request) in &tests {
        for _ in 0..WARMUP {
            conn.call(request)?;
        }
        let mut samples = Vec::with_capacity(args.n);
        let start = Instant::now();
        for _ in 0..args.n {
            let t = Instant::now();
            let reply = conn.call(request)?;
            let took = t.elapsed();
            if reply.first() == Some(&b'-') {
                return Err(format!(
                    "{name}: {}",
                    String::from_utf8_lossy(reply).trim_end()
                ));
            }
            samples.push(took.as_nanos() as u64);
        }
        let rps = args.n as f64 / start.elapsed().as_secs_f64();
        samples.sort_unstable();
        println!(
            "{name}\t{rps:.0}\t{:.4}\t{:.4}\t{:.4}\t{:.4}",
            percentile(&samples, 0.5),
            percentile(&samples, 0.99),
            percentile(&samples, 0.999),
            percentile(&samples, 1.0),
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latency: {e}");
            ExitCode::FAILURE
        }
    }
}
