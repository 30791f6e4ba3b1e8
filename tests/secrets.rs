//! No secret in any output: the real binary runs the local setup at the most verbose log
//! level through start-up, token rotations, client AUTH (right and wrong), a protocol error
//! and SIGTERM; neither a token (every token is a JWT, so starts with `eyJ`) nor the local
//! password may appear in anything it printed.
mod support;

use std::process::Stdio;
use std::time::Duration;

use support::*;
use tokio::io::AsyncReadExt;

const PASSWORD: &str = "pw-0123456789-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_in_trace_logs() {
    let addr = free_addr();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_redis-entra-proxy"))
        .args(["dev", "--listen", &addr.to_string(), "--rotate-every", "1s"])
        .args(["--admin-listen", "none", "--log-level", "trace"])
        .env("REDIS_ENTRA_PROXY_LOCAL_PASSWORD", PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("binary runs");
    // Bounded wait for the listener.
    let deadline = tokio::time::Instant::now() + STEP;
    let mut c = loop {
        if let Ok(c) = redis_entra_proxy::devenv::RespConn::connect_plain(addr).await {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "proxy did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(matches!(
        c.command(&[b"AUTH", b"wrong"]).await.unwrap(),
        Reply::Error(_)
    ));
    assert_eq!(
        c.command(&[b"AUTH", PASSWORD.as_bytes()]).await.unwrap(),
        Reply::Simple("OK".into())
    );
    // Across a few rotations.
    for i in 0..30u32 {
        let v = i.to_string();
        assert_eq!(
            c.command(&[b"SET", b"k", v.as_bytes()]).await.unwrap(),
            Reply::Simple("OK".into())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut bad = redis_entra_proxy::devenv::RespConn::connect_plain(addr)
        .await
        .unwrap();
    bad.write_raw(b"*x\r\n").await.unwrap();
    let _ = bad.read_reply().await;
    let pid = child.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(STEP * 3, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert!(status.success(), "exit {status:?}\n{err}");
    let all = format!("{out}\n{err}");
    assert!(
        all.contains("token acquired") && all.contains("AUTH injected"),
        "trace logs missing:\n{all}"
    );
    for secret in ["eyJ", PASSWORD] {
        if let Some(line) = all.lines().find(|l| l.contains(secret)) {
            panic!("secret {secret:?} printed: {line}");
        }
    }
}

/// A token command sees none of the proxy's own secrets in its environment: not the local
/// password, not a fixed token, not the service principal's secret given to the proxy.
#[tokio::test]
async fn a_token_command_does_not_inherit_the_proxys_secrets() {
    let redis = redis_entra_proxy::devenv::RedisServer::start(Default::default())
        .await
        .expect("redis-server starts");
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("env");
    let cmd = format!("env > {}; exit 1", dump.display());
    let proxy = support::proxy_process::ProxyProcess::start(
        &redis,
        &["--credential", "exec", "--credential-command", &cmd],
        &[
            ("REDIS_ENTRA_PROXY_LOCAL_PASSWORD", PASSWORD),
            ("REDIS_ENTRA_PROXY_CLIENT_SECRET", "sp-secret-0123456789"),
            ("REDIS_ENTRA_PROXY_TOKEN", "fixed-token-0123456789"),
            ("PATH", "/usr/bin:/bin"),
            ("HELPER_SETTING", "kept"),
        ],
    )
    .await;
    proxy
        .wait_log("token fetch failed", Duration::from_secs(5))
        .await;
    let env = std::fs::read_to_string(&dump).expect("the command ran");
    assert!(env.contains("HELPER_SETTING=kept"), "{env}");
    for secret in [PASSWORD, "sp-secret-0123456789", "fixed-token-0123456789"] {
        assert!(!env.contains(secret), "the command saw {secret}:\n{env}");
    }
}

/// The proxy keeps its memory to itself: another process of the same user cannot read its
/// environment (where `REDIS_ENTRA_PROXY_TOKEN` is), nor, by the same rule, its memory. Both
/// run as `nobody`, so the test needs root to start them.
#[test]
fn another_process_of_the_same_user_cannot_read_the_proxys_environment() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root, to run the proxy and the reader as another user");
        return;
    }
    const NOBODY: u32 = 65534;
    // A copy `nobody` may run, wherever the build is.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("redis-entra-proxy");
    std::fs::copy(env!("CARGO_BIN_EXE_redis-entra-proxy"), &bin).unwrap();
    let token = "fixed-token-0123456789";
    let mut proxy = std::process::Command::new(&bin)
        .args([
            "--credential",
            "fixed",
            "--username",
            "oid",
            "--upstream",
            "127.0.0.1:1",
        ])
        .args([
            "--listen",
            &free_addr().to_string(),
            "--admin-listen",
            "none",
        ])
        .env("REDIS_ENTRA_PROXY_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .uid(NOBODY)
        .gid(NOBODY)
        .spawn()
        .expect("binary runs");
    let environ = format!("/proc/{}/environ", proxy.id());
    let read_as_nobody = || {
        std::process::Command::new("cat")
            .arg(&environ)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .expect("cat runs")
    };
    // Bounded: the proxy turns non-dumpable first thing in `main`.
    let mut last = None;
    for _ in 0..100 {
        let out = read_as_nobody();
        if !out.status.success() {
            last = None;
            break;
        }
        last = Some(out.stdout);
        std::thread::sleep(Duration::from_millis(20));
    }
    let alive = proxy.try_wait().unwrap().is_none();
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(alive, "the proxy exited early");
    if let Some(env) = last {
        let env = String::from_utf8_lossy(&env);
        assert!(
            !env.contains(token),
            "another process of the same user read the token in the proxy's environment"
        );
        panic!("another process of the same user read the proxy's environment");
    }
}
