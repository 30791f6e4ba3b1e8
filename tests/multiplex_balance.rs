//! `--multiplex-consolidate`: shared clients gather on one session thread while requests are
//! small and spread over the threads again when they grow, each moving only when nothing is
//! owed to it. In a test binary of its own: the placement gauge is per process, and another
//! proxy of the same process would set it too.
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

/// Loaders and named clients; each thread gets half of each when they connect spread.
const LOADERS: usize = 8;
const NAMED: usize = 4;
/// Bound on each phase's wait for the proxy to change placement (it decides every 250 ms).
const PHASE: Duration = Duration::from_secs(30);

async fn metric(proxy: &Proxy, name: &str) -> f64 {
    let (_, body) = http_get(proxy.admin_addr.expect("admin endpoint"), "/metrics").await;
    support::cluster::sum_metric(&body, name, "")
}

/// `SET` then `GET` of the loader's own key, with values of `large` or small size, until
/// `stop`; every reply is checked. Returns the commands it sent.
async fn load(
    proxy_addr: std::net::SocketAddr,
    id: usize,
    large: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) {
    let mut c = redis_entra_proxy::devenv::RespConn::connect_plain(proxy_addr)
        .await
        .expect("connect");
    let key = format!("balance:{id}");
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let size = if large.load(Ordering::Relaxed) {
            16 * 1024
        } else {
            8
        };
        let value = format!("{id}:{round}:").into_bytes();
        let value: Vec<u8> = value
            .iter()
            .copied()
            .cycle()
            .take(size.max(value.len()))
            .collect();
        assert_eq!(
            c.command(&[b"SET", key.as_bytes(), &value])
                .await
                .expect("SET"),
            Reply::Simple("OK".into())
        );
        assert_eq!(
            c.command(&[b"GET", key.as_bytes()]).await.expect("GET"),
            Reply::Bulk(Some(value)),
            "loader {id} round {round}"
        );
        round += 1;
        done.fetch_add(2, Ordering::Relaxed);
    }
}

/// A client that said `HELLO 3` and named itself: it keeps both wherever it is served.
async fn check_named(c: &mut Raw, name: &str) {
    c.send(&redis_entra_proxy::devenv::encode(&[b"CLIENT", b"GETNAME"]))
        .await;
    c.expect(format!("${}\r\n{name}\r\n", name.len()).as_bytes())
        .await;
    // An empty map: RESP3.
    c.send(&redis_entra_proxy::devenv::encode(&[
        b"HGETALL",
        b"balance:none",
    ]))
    .await;
    c.expect(b"%0\r\n").await;
}

async fn wait_for(proxy: &Proxy, what: &str, mut ok: impl FnMut(f64, f64) -> bool) {
    let deadline = tokio::time::Instant::now() + PHASE;
    loop {
        let consolidated = metric(proxy, "redis_entra_proxy_multiplex_consolidated").await;
        let moves = metric(proxy, "redis_entra_proxy_multiplex_moves_total").await;
        if ok(consolidated, moves) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} not seen within {PHASE:?} (consolidated {consolidated}, moves {moves})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_clients_gather_while_requests_are_small_and_spread_when_they_grow() {
    if std::fs::read_to_string("/proc/thread-self/schedstat").is_err() {
        // Without a thread's CPU time the proxy cannot see saturation and never gathers.
        eprintln!("skipped: /proc/thread-self/schedstat is not readable here");
        return;
    }
    let proxy = Proxy::start_with(ProxyOptions {
        multiplex: true,
        worker_threads: Some(2),
        admin: true,
        ..Default::default()
    })
    .await;
    assert_eq!(
        metric(&proxy, "redis_entra_proxy_multiplex_consolidated").await,
        0.0
    );

    // Named RESP3 clients, connected while spread: half of them on each thread.
    let mut named = Vec::new();
    for i in 0..NAMED {
        let mut c = proxy.raw().await;
        c.send(&redis_entra_proxy::devenv::encode(&[b"HELLO", b"3"]))
            .await;
        let hello = c.read_frame().await;
        assert!(
            hello.starts_with(b"%"),
            "{}",
            String::from_utf8_lossy(&hello)
        );
        let name = format!("named-{i}");
        c.send(&redis_entra_proxy::devenv::encode(&[
            b"CLIENT",
            b"SETNAME",
            name.as_bytes(),
        ]))
        .await;
        c.expect(b"+OK\r\n").await;
        check_named(&mut c, &name).await;
        named.push((c, name));
    }

    let (large, stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let loaders: Vec<_> = (0..LOADERS)
        .map(|id| {
            tokio::spawn(load(
                proxy.addr,
                id,
                large.clone(),
                stop.clone(),
                done.clone(),
            ))
        })
        .collect();

    // Small requests: the shared clients gather on the home thread; the loaders on the other
    // thread move there between two of their requests.
    wait_for(&proxy, "gathering", |c, moves| {
        c == 1.0 && moves >= (LOADERS / 2) as f64
    })
    .await;
    let moved = metric(&proxy, "redis_entra_proxy_multiplex_moves_total").await;
    // Each named client is served where it is, then moves if it must, then is served there:
    // its name and protocol went with it.
    for (c, name) in &mut named {
        check_named(c, name).await;
        check_named(c, name).await;
    }
    wait_for(&proxy, "the named clients' moves", |_, moves| {
        moves >= moved + (NAMED / 2) as f64
    })
    .await;

    // Large values: they spread again, moving off the home thread.
    let moved = metric(&proxy, "redis_entra_proxy_multiplex_moves_total").await;
    large.store(true, Ordering::Relaxed);
    wait_for(&proxy, "spreading", |c, moves| {
        c == 0.0 && moves >= moved + (LOADERS / 2 - 1) as f64
    })
    .await;
    for (c, name) in &mut named {
        check_named(c, name).await;
    }

    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        tokio::time::timeout(Duration::from_secs(10), l)
            .await
            .expect("loader ends")
            .expect("every reply was the loader's own");
    }
    assert!(done.load(Ordering::Relaxed) > 0);
    proxy.stop().await;
}
