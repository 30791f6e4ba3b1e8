//! Lifecycle: draining on shutdown loses no reply Redis produced, the connection limit
//! answers like Redis's `maxclients`, and the open-file limit is fitted to it at startup.
mod support;

use std::time::Duration;

use redis_entra_proxy::devenv::{mint_token, RedisOptions, RedisServer, RespConn};
use support::proxy_process::ProxyProcess;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_pipelines() {
    drains_in_flight_pipelines(false).await;
}

/// The same for a client sharing a connection: it keeps being read until it is quiet, and
/// the shared connection serves it to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_pipelines_when_multiplexing() {
    drains_in_flight_pipelines(true).await;
}

async fn drains_in_flight_pipelines(multiplex: bool) {
    let proxy = Proxy::start_with(ProxyOptions {
        drain_timeout: Some(Duration::from_secs(10)),
        multiplex,
        ..Default::default()
    })
    .await;
    let mut raw = proxy.raw().await;
    // Served before the shutdown (a connection still in the listen backlog when the
    // listener closes is reset by the kernel, before anything was executed).
    raw.send(b"PING\r\n").await;
    raw.expect(b"+PONG\r\n").await;
    let n = 5000;
    let pipeline = "INCR drained\r\n".repeat(n);
    raw.send(pipeline.as_bytes()).await;
    // Shut down while the pipeline is in flight.
    proxy.shutdown.cancel();
    let got = raw.read_to_end().await;
    let text = String::from_utf8_lossy(&got);
    let want: String = (1..=n).map(|i| format!(":{i}\r\n")).collect();
    assert_eq!(text.len(), want.len(), "replies lost in the drain");
    assert_eq!(text, want);
    // No new connections after shutdown: refused, or closed without a reply.
    match tokio::net::TcpStream::connect(proxy.addr).await {
        Err(_) => {}
        Ok(mut s) => {
            let _ = s.write_all(b"PING\r\n").await;
            let mut buf = Vec::new();
            let r = tokio::time::timeout(STEP, s.read_to_end(&mut buf))
                .await
                .expect("bounded");
            assert!(
                r.is_err() || buf.is_empty(),
                "served after shutdown: {buf:?}"
            );
        }
    }
    proxy.stop().await;
}

/// While the proxy drains on shutdown, a connection kept busy (a blocked `BLPOP`) costs no
/// CPU, the admin endpoint keeps answering (`/readyz` says the proxy is shutting down), and
/// the process exits at the drain timeout.
#[tokio::test]
async fn draining_a_busy_connection_spins_nothing_and_keeps_the_admin_endpoint() {
    let (mut proxy, _redis) = fixed_proxy("drain-1", &["--drain-timeout", "4s"]).await;
    proxy.wait_started().await;
    assert_eq!(proxy.get("/readyz").await.0, 200);
    let mut blocked = proxy.client().await;
    blocked
        .send(&[b"BLPOP", b"drain:never", b"0"])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.terminate();
    // Past the quiet period after the client's last input.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proxy.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = proxy.cpu_ticks() - before;
    // Spinning, the drain took a whole core: about 100 ticks.
    assert!(used < 30, "{used} ticks of CPU in 1 s of draining");
    let (status, body) = proxy.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = proxy.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("shutting down"), "{body}");
    assert!(proxy.metrics().await.0.contains("redis_entra_proxy_"));
    let status = proxy.wait_exit(STEP).await;
    assert!(status.success(), "{status}");
    assert_closed(
        &mut blocked,
        "the blocked client is closed at the drain timeout",
    )
    .await;
}

/// A second SIGTERM ends the drain at once: an operator who stopped the proxy and sees it
/// wait on a busy connection (here a `BLPOP` that never returns, with a minute of drain
/// timeout) can stop it for good, and it still exits cleanly.
#[tokio::test]
async fn a_second_signal_ends_the_drain_at_once() {
    let (mut proxy, _redis) = fixed_proxy("drain-2", &["--drain-timeout", "60s"]).await;
    proxy.wait_started().await;
    let mut blocked = proxy.client().await;
    blocked
        .send(&[b"BLPOP", b"drain:never", b"0"])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.terminate();
    proxy.wait_log("shutting down", STEP).await;
    // Still draining, well past the quiet period: the busy connection holds it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, body) = proxy.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let started = std::time::Instant::now();
    proxy.terminate();
    let status = proxy.wait_exit(STEP).await;
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited {:?} after the second signal",
        started.elapsed()
    );
    assert!(
        proxy.log().contains("second signal"),
        "{}",
        proxy.log_tail()
    );
    assert_closed(&mut blocked, "the blocked client is closed").await;
}

/// Under systemd (`Type=notify`, config/redis-entra-proxy.service) the proxy says on
/// `NOTIFY_SOCKET` what it is doing: waiting for its first token, why fetches fail, `READY=1`
/// once the first token came (as `/startupz`), `STOPPING=1` when it drains, and it feeds
/// the watchdog the unit set.
#[tokio::test]
async fn systemd_is_told_of_readiness_status_and_stopping() {
    let redis = RedisServer::start(RedisOptions::default())
        .await
        .expect("redis-server starts");
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let manager = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let token_file = dir.path().join("token.json");
    let mut proxy = ProxyProcess::start(
        &redis,
        &["--credential-file", token_file.to_str().unwrap()],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    )
    .await;
    let mut heard = Vec::new();
    let next = async |heard: &mut Vec<String>, what: &str| -> String {
        let mut buf = [0u8; 1024];
        loop {
            let n = tokio::time::timeout(STEP, manager.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {what:?} in {heard:#?}"))
                .unwrap();
            let got = String::from_utf8(buf[..n].to_vec()).unwrap();
            heard.push(got.clone());
            if got.contains(what) {
                return got;
            }
        }
    };
    next(&mut heard, "STATUS=waiting for the first token (file)").await;
    let failing = next(&mut heard, "STATUS=no valid token, clients are refused").await;
    assert!(failing.contains("token.json"), "{failing}");
    assert!(!heard.iter().any(|m| m.contains("READY=1")), "{heard:#?}");

    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = mint_token("notify-1", exp);
    let document = serde_json::json!({ "access_token": token, "expires_on": exp });
    std::fs::write(&token_file, document.to_string()).unwrap();
    let ready = next(&mut heard, "READY=1").await;
    assert!(
        ready.contains("STATUS=serving; token for notify-1 (generation 1), expires at "),
        "{ready}"
    );
    assert!(!ready.contains(&token), "the token in a notification");
    let (status, body) = proxy.get("/startupz").await;
    assert_eq!(status, 200, "{body}");

    proxy.terminate();
    let stopping = next(&mut heard, "STOPPING=1").await;
    assert!(stopping.contains("STATUS=draining"), "{stopping}");
    assert!(proxy.wait_exit(STEP).await.success());
    let fed = heard.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(fed >= 2, "the watchdog fed {fed} times: {heard:#?}");
}

/// When stderr is the journal's stream (`JOURNAL_STREAM` names its device and inode, as
/// systemd sets it), text lines start with their syslog priority and carry no timestamp;
/// otherwise they are as before.
#[tokio::test]
async fn log_lines_for_the_journal_carry_their_priority() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    for journal in [true, false] {
        let log = dir.path().join(format!("stderr-{journal}"));
        let file = std::fs::File::create(&log).unwrap();
        let meta = file.metadata().unwrap();
        let stream = if journal {
            format!("{}:{}", meta.dev(), meta.ino())
        } else {
            // Another file's: stderr was redirected away from the journal.
            let other = std::fs::metadata(dir.path()).unwrap();
            format!("{}:{}", other.dev(), other.ino())
        };
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
            .env_clear()
            .env("JOURNAL_STREAM", stream)
            .env(
                "REDIS_ENTRA_PROXY_TOKEN",
                mint_token("journal-1", u32::MAX as u64),
            )
            .args(["--credential", "fixed", "--upstream-tls", "false"])
            .args(["--upstream", &free_addr().to_string()])
            .args(["--listen", &free_addr().to_string()])
            .stdin(std::process::Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let started = tokio::time::Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap()
            .contains("proxy started")
        {
            assert!(started.elapsed() < STEP, "no start line");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = child.id().unwrap().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(STEP, child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status}");
        lines.push(std::fs::read_to_string(&log).unwrap());
    }
    let (journal, plain) = (&lines[0], &lines[1]);
    let warning = journal
        .lines()
        .find(|l| l.contains("upstream TLS is disabled"))
        .expect("a warning");
    assert!(warning.starts_with("<4>"), "{warning}");
    let started = journal
        .lines()
        .find(|l| l.contains("proxy started"))
        .expect("a start line");
    assert!(
        started.starts_with("<6> INFO redis_entra_proxy:"),
        "{started}"
    );
    assert!(journal.lines().all(|l| l.starts_with('<')), "{journal}");
    assert!(
        plain.lines().all(|l| l.starts_with("20")),
        "timestamps when stderr is not the journal: {plain}"
    );
}

/// SIGHUP (a `systemctl reload`, a logrotate hook) is logged and ignored: its default action
/// would end the process and cut every connection.
#[tokio::test]
async fn sighup_is_ignored() {
    let (mut proxy, _redis) = fixed_proxy("hup-1", &[]).await;
    proxy.wait_started().await;
    let mut c = proxy.client().await;
    assert_eq!(
        c.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    proxy.wait_log("SIGHUP", STEP).await;
    assert_eq!(
        c.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    proxy.terminate();
    assert!(proxy.wait_exit(STEP).await.success());
}

/// `--log-format json` writes one JSON object per line, with plain values: addresses as
/// strings (not Rust's `Some(…)`), the configuration's spelling of settings, and a
/// connection's span once.
#[tokio::test]
async fn json_logs_are_one_object_per_line_with_plain_values() {
    let (mut proxy, _redis) = fixed_proxy("json-1", &["--log-format", "json"]).await;
    proxy.wait_started().await;
    // A close logged as a warning, in the connection's span: a malformed request.
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"*1\r\n$abc\r\n").await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(STEP, c.read_to_end(&mut reply)).await;
    assert!(reply.starts_with(b"-ERR Protocol error"), "{reply:?}");
    proxy.wait_log("closed", STEP).await;
    proxy.terminate();
    assert!(proxy.wait_exit(STEP).await.success());
    let log = proxy.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["message"] == "proxy started")
        .expect("a start line");
    assert!(
        started["listen"]
            .as_str()
            .is_some_and(|l| l.starts_with("127.0.0.1:")),
        "{started}"
    );
    assert_eq!(started["cluster_mode"], "auto", "{started}");
    assert!(started["version"].is_string(), "{started}");
    let closed = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("closed"))
        })
        .expect("a close line");
    assert!(closed["span"].is_object(), "{closed}");
    assert!(closed.get("spans").is_none(), "{closed}");
}

/// A server that dies under a live connection: the close line says which server (the
/// upstream address, in cluster mode which node), not only that the upstream closed.
#[tokio::test]
async fn the_close_line_of_a_dead_server_names_it() {
    let (proxy, mut redis) = fixed_proxy("dies-1", &[]).await;
    proxy.wait_started().await;
    let mut c = proxy.client().await;
    assert_eq!(
        c.command(&[b"PING"]).await.expect("PING"),
        Reply::Simple("PONG".into())
    );
    let addr = redis.addr().to_string();
    redis.kill().await.expect("kill");
    assert_closed(&mut c, "the client follows its upstream connection").await;
    proxy.wait_log("side=\"upstream\"", STEP).await;
    let log = proxy.log();
    let line = log
        .lines()
        .find(|l| l.contains("closed: ") && l.contains("side=\"upstream\""))
        .expect("a close line");
    assert!(line.contains(&format!("upstream=\"{addr}\"")), "{line}");
}

/// `healthcheck` asks a running proxy's admin endpoint, for a container HEALTHCHECK in an
/// image without curl: 0 when it answers 200, 1 when it answers otherwise or not at all.
#[tokio::test]
async fn the_healthcheck_command_asks_the_admin_endpoint() {
    let (proxy, _redis) = fixed_proxy("health-1", &[]).await;
    proxy.wait_started().await;
    let check = |admin: String, args: &'static [&'static str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
            .args(args)
            .env("REDIS_ENTRA_PROXY_ADMIN_LISTEN", admin)
            .output()
            .expect("runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let admin = proxy.admin.to_string();
    let (code, out) = check(admin.clone(), &["healthcheck"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("/healthz: 200 ok"), "{out}");
    let (code, out) = check(admin, &["healthcheck", "--ready"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("/readyz: 200 ready"), "{out}");
    // A wildcard address is asked on loopback.
    let (code, out) = check(format!("0.0.0.0:{}", proxy.admin.port()), &["healthcheck"]);
    assert_eq!(code, Some(0), "{out}");
    // Nothing listening.
    let (code, out) = check(free_addr().to_string(), &["healthcheck"]);
    assert_eq!(code, Some(1), "{out}");
    let (code, _) = check("none".into(), &["healthcheck"]);
    assert_eq!(code, Some(2));
}

/// Settings of a token source other than the one in use are named in a warning: most
/// likely a mistake (a forgotten variable, the wrong --credential).
#[tokio::test]
async fn settings_of_another_token_source_are_warned_about() {
    let (proxy, _redis) = fixed_proxy(
        "ignored-1",
        &["--credential-file", "/nonexistent/token.json"],
    )
    .await;
    proxy.wait_started().await;
    proxy
        .wait_log(
            "--credential-file is set but ignored: the token source is fixed",
            STEP,
        )
        .await;
}

#[tokio::test]
async fn connection_limit_answers_like_maxclients() {
    let proxy = Proxy::start_with(ProxyOptions {
        max_connections: Some(2),
        ..Default::default()
    })
    .await;
    let mut a = proxy.client().await;
    let mut b = proxy.client().await;
    assert_eq!(
        a.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    assert_eq!(
        b.command(&[b"PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    let mut c = proxy.raw().await;
    c.expect(b"-ERR max number of clients reached\r\n").await;
    assert!(c.read_to_end().await.is_empty());
    drop(a);
    // The slot frees when the session ends: bounded polling for a served connection.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let mut d = proxy.client().await;
        if let Ok(Reply::Simple(s)) = d.command(&[b"PING"]).await {
            assert_eq!(s, "PONG");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The binary in front of its own stand-in server, with a fixed token and the open-file
/// limit `open_files` (soft, hard).
async fn limited_proxy(
    max_connections: Option<usize>,
    open_files: (u64, u64),
) -> (ProxyProcess, RedisServer) {
    let redis = RedisServer::start(RedisOptions::default())
        .await
        .expect("redis-server starts");
    let token = fixed_token(&redis, "limits-1", true).await;
    let max = max_connections.map(|m| m.to_string());
    let mut args = vec!["--credential", "fixed"];
    if let Some(max) = &max {
        args.extend(["--max-connections", max]);
    }
    let proxy = ProxyProcess::start_limited(
        &redis,
        &args,
        &[("REDIS_ENTRA_PROXY_TOKEN", &token)],
        Some(open_files),
    )
    .await;
    proxy.wait_started().await;
    (proxy, redis)
}

/// A proxy process in front of its own redis-server, with a fixed token for `oid` (known to
/// the server), started with `args` too.
async fn fixed_proxy(oid: &str, args: &[&str]) -> (ProxyProcess, RedisServer) {
    let redis = RedisServer::start(RedisOptions::default())
        .await
        .expect("redis-server starts");
    let token = fixed_token(&redis, oid, true).await;
    let mut all = vec!["--credential", "fixed"];
    all.extend_from_slice(args);
    let proxy = ProxyProcess::start(&redis, &all, &[("REDIS_ENTRA_PROXY_TOKEN", &token)]).await;
    (proxy, redis)
}

/// `c` is closed within [`STEP`], without a reply.
async fn assert_closed(c: &mut RespConn, why: &str) {
    assert!(
        tokio::time::timeout(STEP, c.read_reply())
            .await
            .expect("closed in time")
            .is_err(),
        "{why}"
    );
}

/// A token valid for an hour for the identity `oid`, which the server knows when `known`.
async fn fixed_token(redis: &RedisServer, oid: &str, known: bool) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = mint_token(oid, exp);
    if known {
        redis.acl_setuser(oid, &token).await.expect("ACL SETUSER");
    }
    token
}

/// The soft and hard "Max open files" of a process.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut numbers = line.split_whitespace().filter_map(|w| w.parse().ok());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

/// Opens `n` clients through the proxy, each with its own upstream connection (a PING
/// answered), and returns them held open.
async fn served_clients(proxy: &ProxyProcess, n: usize) -> Vec<RespConn> {
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = proxy.client().await;
        let pong = tokio::time::timeout(STEP, c.command(&[b"PING"])).await;
        assert!(
            matches!(pong, Ok(Ok(Reply::Simple(ref s))) if s == "PONG"),
            "client {i} of {n}: {pong:?}\n{}",
            proxy.log_tail()
        );
        clients.push(c);
    }
    clients
}

/// The proxy serves exactly `n` clients at once: `n` answered, the next refused as Redis
/// refuses past `maxclients`, and `n` the limit in force in the metrics. Returns the served
/// ones, held open.
async fn serves_exactly(proxy: &ProxyProcess, n: usize) -> Vec<RespConn> {
    let clients = served_clients(proxy, n).await;
    let mut refused = Raw(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    refused
        .expect(b"-ERR max number of clients reached\r\n")
        .await;
    assert!(refused.read_to_end().await.is_empty());
    let m = proxy.metrics().await;
    assert_eq!(
        m.get("redis_entra_proxy_client_connections_max", &[]),
        Some(n as f64)
    );
    clients
}

#[tokio::test]
async fn a_short_open_file_limit_is_raised_to_hold_every_connection() {
    // 100 clients need 2 × 100 + 64 descriptors; the shell leaves the proxy 150 of a possible
    // 1,000, which would hold 43.
    let (proxy, _redis) = limited_proxy(Some(100), (150, 1_000)).await;
    assert_eq!(open_file_limits(proxy.pid()), (264, 1_000));
    assert!(
        proxy.log().contains("raised the open-file limit"),
        "{}",
        proxy.log_tail()
    );
    serves_exactly(&proxy, 100).await;
}

#[tokio::test]
async fn a_hard_limit_too_low_lowers_the_connection_limit_like_maxclients() {
    // 200 descriptors hold (200 − 64) / 2 = 68 clients, not the 1,000 asked for. Without the
    // fit, the 69th would be served and, some twenty later, clients would get no answer at all
    // (accept failing) or a failed upstream connect.
    let (proxy, _redis) = limited_proxy(Some(1_000), (200, 200)).await;
    assert_eq!(open_file_limits(proxy.pid()), (200, 200));
    assert!(
        proxy.log().contains("holds only 68 client connections"),
        "{}",
        proxy.log_tail()
    );
    let clients = serves_exactly(&proxy, 68).await;
    // The served ones go on being served.
    for mut c in clients.into_iter().take(3) {
        assert_eq!(
            c.command(&[b"PING"]).await.unwrap(),
            Reply::Simple("PONG".into())
        );
    }
}

/// With `--max-connections` left at its default, a limit that holds fewer is said at info:
/// nobody asked for 10,000, and a warning at every start would be noise.
#[tokio::test]
async fn a_limit_short_of_the_default_is_no_warning() {
    let (proxy, _redis) = limited_proxy(None, (200, 200)).await;
    let log = proxy.log();
    let line = log
        .lines()
        .find(|l| l.contains("holds 68 client connections"))
        .unwrap_or_else(|| panic!("{}", proxy.log_tail()));
    assert!(line.contains("INFO"), "{line}");
    serves_exactly(&proxy, 68).await;
}

#[tokio::test]
async fn a_flood_of_failing_connections_logs_a_few_lines_a_second() {
    // A token the server does not know: every connection's first AUTH fails, as when the
    // identity lost its access policy, while the application reconnects in a tight loop.
    let redis = RedisServer::start(RedisOptions::default())
        .await
        .expect("redis-server starts");
    let token = fixed_token(&redis, "nobody-1", false).await;
    let proxy = ProxyProcess::start(
        &redis,
        &["--credential", "fixed"],
        &[("REDIS_ENTRA_PROXY_TOKEN", &token)],
    )
    .await;
    proxy.wait_started().await;
    const ATTEMPTS: usize = 300;
    let started = tokio::time::Instant::now();
    for i in 0..ATTEMPTS {
        let mut c = proxy.client().await;
        let reply = tokio::time::timeout(STEP, c.command(&[b"PING"])).await;
        assert!(
            matches!(reply, Ok(Ok(Reply::Error(ref e))) if e.starts_with("WRONGPASS")),
            "attempt {i}: {reply:?}"
        );
    }
    let seconds = started.elapsed().as_secs() + 1;
    let m = proxy.metrics().await;
    assert_eq!(
        m.count(
            "redis_entra_proxy_connections_closed_total",
            &[("reason", "upstream_auth_failed")]
        ),
        ATTEMPTS as f64
    );
    let log = proxy.log();
    let lines = log.lines().filter(|l| l.contains("closed: ")).count() as u64;
    assert!(
        (1..=10 * seconds).contains(&lines),
        "{lines} close lines for {ATTEMPTS} connections in {seconds} s"
    );
    // Every connection is accounted for in the log: a line, or a count of lines left out,
    // the last burst's included once its second is over.
    proxy.wait_log("more such lines left out", STEP).await;
    let log = proxy.log();
    let lines = log.lines().filter(|l| l.contains("closed: ")).count() as u64;
    let left_out: u64 = log
        .lines()
        .filter_map(|l| l.split("suppressed=").nth(1))
        .filter_map(|n| {
            n.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(lines + left_out, ATTEMPTS as u64, "{}", proxy.log_tail());
}
