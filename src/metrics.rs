//! Metric names (all under one prefix, documented in the README) and the handles the hot
//! path uses. Handles are registered once: recording through a handle is an atomic add, with
//! no name lookup or allocation per command.
//!
//! The Prometheus recorder is process-wide: [`install`] sets it once, and every proxy in the
//! process (tests run several) shares it.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const CLIENT_CONNECTIONS_ACTIVE: &str = "redis_entra_proxy_client_connections_active";
pub const CLIENT_CONNECTIONS_TOTAL: &str = "redis_entra_proxy_client_connections_total";
pub const CLIENT_CONNECTIONS_MAX: &str = "redis_entra_proxy_client_connections_max";
pub const UPSTREAM_CONNECTIONS_ACTIVE: &str = "redis_entra_proxy_upstream_connections_active";
pub const UPSTREAM_CONNECT_SECONDS: &str = "redis_entra_proxy_upstream_connect_seconds";
pub const UPSTREAM_CONNECT_ERRORS_TOTAL: &str = "redis_entra_proxy_upstream_connect_errors_total";
pub const UPSTREAM_TLS_HANDSHAKES_TOTAL: &str = "redis_entra_proxy_upstream_tls_handshakes_total";
pub const COMMANDS_TOTAL: &str = "redis_entra_proxy_commands_total";
pub const BYTES_TOTAL: &str = "redis_entra_proxy_bytes_total";
pub const UPSTREAM_AUTH_TOTAL: &str = "redis_entra_proxy_upstream_auth_total";
pub const UPSTREAM_AUTH_SECONDS: &str = "redis_entra_proxy_upstream_auth_seconds";
pub const TOKEN_REFRESH_TOTAL: &str = "redis_entra_proxy_token_refresh_total";
pub const TOKEN_EXPIRES_IN_SECONDS: &str = "redis_entra_proxy_token_expires_in_seconds";
pub const TOKEN_GENERATION: &str = "redis_entra_proxy_token_generation";
pub const CONNECTIONS_CLOSED_TOTAL: &str = "redis_entra_proxy_connections_closed_total";
pub const PROTOCOL_ERRORS_TOTAL: &str = "redis_entra_proxy_protocol_errors_total";
pub const LOCAL_AUTH_FAILURES_TOTAL: &str = "redis_entra_proxy_local_auth_failures_total";
pub const WARM_CONNECTIONS: &str = "redis_entra_proxy_warm_connections";
pub const WARM_HANDED_OUT_TOTAL: &str = "redis_entra_proxy_warm_handed_out_total";
pub const MULTIPLEX_SHARED_CLIENTS: &str = "redis_entra_proxy_multiplex_shared_clients";
pub const MULTIPLEX_PINNED_TOTAL: &str = "redis_entra_proxy_multiplex_pinned_total";
pub const MULTIPLEX_BATCHES_TOTAL: &str = "redis_entra_proxy_multiplex_batches_total";
pub const MULTIPLEX_CONSOLIDATED: &str = "redis_entra_proxy_multiplex_consolidated";
pub const MULTIPLEX_MOVES_TOTAL: &str = "redis_entra_proxy_multiplex_moves_total";
pub const MULTIPLEX_SLOW_READER_WAITS_TOTAL: &str =
    "redis_entra_proxy_multiplex_slow_reader_waits_total";
pub const CLUSTER_NODES: &str = "redis_entra_proxy_cluster_nodes";
pub const CLUSTER_REFRESH_TOTAL: &str = "redis_entra_proxy_cluster_refresh_total";
pub const CLUSTER_REDIRECTS_TOTAL: &str = "redis_entra_proxy_cluster_redirects_total";

pub const BUILD_INFO: &str = "redis_entra_proxy_build_info";

/// Every `(side, reason)` of [`CONNECTIONS_CLOSED_TOTAL`] (`Outcome::side`/`label`, and a
/// session's panic), and every `kind` of [`UPSTREAM_CONNECT_ERRORS_TOTAL`]
/// (`ConnectError::label`). They are registered at 0 from the start: a series that appears
/// only at its first event shows Prometheus that event as its starting value, and
/// `increase()` and `rate()` miss it.
pub const CLOSE_LABELS: &[(&str, &str)] = &[
    ("client", "client_closed"),
    ("client", "client_error"),
    ("client", "client_quit"),
    ("client", "client_protocol_error"),
    ("client", "client_idle_timeout"),
    ("client", "partial_request_timeout"),
    ("client", "slow_client"),
    ("client", "unauthenticated_output_limit"),
    ("upstream", "upstream_closed"),
    ("upstream", "upstream_error"),
    ("upstream", "upstream_connect_failed"),
    ("upstream", "upstream_auth_failed"),
    ("upstream", "upstream_auth_timeout"),
    ("upstream", "upstream_protocol_error"),
    ("upstream", "upstream_desync"),
    ("proxy", "drained"),
    ("proxy", "no_valid_token"),
    ("proxy", "token_expiring"),
    ("proxy", "panic"),
];
pub const CONNECT_ERROR_KINDS: &[&str] =
    &["resolve", "connect", "timeout", "tls", "not_in_topology"];

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (an embedding program's):
            // then that one receives the metrics.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            for (side, reason) in CLOSE_LABELS {
                metrics::counter!(CONNECTIONS_CLOSED_TOTAL, "side" => *side, "reason" => *reason)
                    .increment(0);
            }
            for kind in CONNECT_ERROR_KINDS {
                metrics::counter!(UPSTREAM_CONNECT_ERRORS_TOTAL, "kind" => *kind).increment(0);
            }
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version of the proxy in its label."
    );
    describe_gauge!(CLIENT_CONNECTIONS_ACTIVE, "Client connections open now.");
    describe_counter!(
        CLIENT_CONNECTIONS_TOTAL,
        "Client connections accepted, by outcome (served, refused_max_connections)."
    );
    describe_gauge!(
        CLIENT_CONNECTIONS_MAX,
        "Most client connections served at once: --max-connections, or fewer when the \
         open-file limit cannot hold that many."
    );
    describe_gauge!(
        UPSTREAM_CONNECTIONS_ACTIVE,
        "Upstream connections open now."
    );
    describe_histogram!(
        UPSTREAM_CONNECT_SECONDS,
        Unit::Seconds,
        "Time to open an upstream connection (TCP and TLS)."
    );
    describe_counter!(
        UPSTREAM_CONNECT_ERRORS_TOTAL,
        "Failed upstream connection attempts, by kind (resolve, connect, timeout, tls)."
    );
    describe_counter!(
        UPSTREAM_TLS_HANDSHAKES_TOTAL,
        "Completed upstream TLS handshakes, by kind (full, resumed)."
    );
    describe_counter!(
        COMMANDS_TOTAL,
        "Client commands handled (forwarded or answered by the proxy)."
    );
    describe_counter!(
        BYTES_TOTAL,
        Unit::Bytes,
        "Bytes moved, by direction (client_in, client_out, upstream_in, upstream_out)."
    );
    describe_counter!(
        UPSTREAM_AUTH_TOTAL,
        "Upstream AUTH results, by kind (initial, reauth) and result (ok, error)."
    );
    describe_histogram!(
        UPSTREAM_AUTH_SECONDS,
        Unit::Seconds,
        "Time from writing an AUTH to its reply, by kind."
    );
    describe_counter!(
        TOKEN_REFRESH_TOTAL,
        "Token fetch attempts, by source and result (ok, unchanged, error)."
    );
    describe_gauge!(
        TOKEN_EXPIRES_IN_SECONDS,
        Unit::Seconds,
        "Seconds until the current token expires (negative once expired)."
    );
    describe_gauge!(
        TOKEN_GENERATION,
        "Generation of the current token (increases with every new token)."
    );
    describe_counter!(
        CONNECTIONS_CLOSED_TOTAL,
        "Client connections ended, by side (client, upstream, proxy) and reason."
    );
    describe_counter!(PROTOCOL_ERRORS_TOTAL, "Malformed client input, by kind.");
    describe_counter!(
        LOCAL_AUTH_FAILURES_TOTAL,
        "Client AUTH or HELLO AUTH with a wrong local password."
    );
    describe_gauge!(
        WARM_CONNECTIONS,
        "Authenticated upstream connections waiting in the warm pool."
    );
    describe_counter!(
        WARM_HANDED_OUT_TOTAL,
        "Client connections served by a connection from the warm pool."
    );
    describe_gauge!(
        MULTIPLEX_SHARED_CLIENTS,
        "Client connections sharing upstream connections now (--multiplex)."
    );
    describe_counter!(
        MULTIPLEX_PINNED_TOTAL,
        "Shared clients given an upstream connection of their own, by reason: a command that cannot share (auth, transaction, pubsub, blocking, connection, script, malformed, large_request, other), or at its next request a client handed a reply of more than 1 MiB (large_reply) or that the shared connection had to wait for (slow_reader) (--multiplex)."
    );
    describe_counter!(
        MULTIPLEX_BATCHES_TOTAL,
        "Batches of shared requests sent over shared connections; shared requests per batch is the mean batch size (--multiplex)."
    );
    describe_gauge!(
        MULTIPLEX_CONSOLIDATED,
        "1 while shared clients gather on one session thread (small requests), 0 while they spread over all (--multiplex-consolidate)."
    );
    describe_counter!(
        MULTIPLEX_MOVES_TOTAL,
        "Shared clients moved from one session thread to another (--multiplex-consolidate)."
    );
    describe_counter!(
        MULTIPLEX_SLOW_READER_WAITS_TOTAL,
        "Times a shared connection waited for a client more than 1 MiB behind in reading its replies, holding back the clients behind it; the client then pins at its next request (--multiplex)."
    );
    describe_gauge!(
        CLUSTER_NODES,
        "Cluster nodes with a local listener (cluster mode)."
    );
    describe_counter!(
        CLUSTER_REFRESH_TOTAL,
        "Reads of the cluster topology, by outcome (ok, error, not_cluster)."
    );
    describe_counter!(
        CLUSTER_REDIRECTS_TOTAL,
        "MOVED and ASK redirections relayed with a local address, by kind (moved, ask)."
    );
}

/// The process's own figures, in the standard `process_*` names Prometheus's client
/// libraries use (resident memory, CPU time, open and allowed file descriptors, start
/// time), read from `/proc/self` at each scrape; nothing on other systems.
pub fn render_process() -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    };
    // Clock ticks of /proc's times: USER_HZ, 100 on every Linux architecture.
    const TICKS: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which ends at the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // utime and stime are the 14th and 15th fields, starttime the 22nd (from 1, the pid).
    if let (Some(user), Some(system)) = (field(11), field(12)) {
        metric(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (user + system) / TICKS,
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|t| t.trim().parse::<f64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot, field(19)) {
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot + start / TICKS,
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib = status.lines().find_map(|l| {
        l.strip_prefix("VmRSS:")
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
    });
    if let Some(kib) = rss_kib {
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            kib * 1024.0,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let max_fds = limits.lines().find_map(|l| {
        l.strip_prefix("Max open files")
            .and_then(|v| v.split_whitespace().next())
            .and_then(|soft| soft.parse::<f64>().ok())
    });
    if let Some(max) = max_fds {
        metric(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max,
        );
    }
    out
}

/// Handles the per-connection paths use, registered once.
pub struct Handles {
    pub client_active: Gauge,
    pub upstream_active: Gauge,
    pub commands: Counter,
    pub client_in: Counter,
    pub client_out: Counter,
    pub upstream_in: Counter,
    pub upstream_out: Counter,
    pub connect_seconds: Histogram,
    /// `[full, resumed]` TLS handshakes.
    pub tls_handshakes: [Counter; 2],
    pub auth_ok: [Counter; 2],
    pub auth_error: [Counter; 2],
    pub auth_seconds: [Histogram; 2],
    pub warm_idle: Gauge,
    pub warm_handed_out: Counter,
    pub mux_shared: Gauge,
    pub mux_batches: Counter,
    pub mux_consolidated: Gauge,
    pub mux_moves: Counter,
}

/// Index into the `[initial, reauth]` arrays.
pub fn auth_kind(initial: bool) -> usize {
    usize::from(!initial)
}

pub fn handles() -> &'static Handles {
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    HANDLES.get_or_init(|| {
        install();
        let bytes = |d: &'static str| metrics::counter!(BYTES_TOTAL, "direction" => d);
        let auth = |k: &'static str, r: &'static str| {
            metrics::counter!(UPSTREAM_AUTH_TOTAL, "kind" => k, "result" => r)
        };
        Handles {
            client_active: metrics::gauge!(CLIENT_CONNECTIONS_ACTIVE),
            upstream_active: metrics::gauge!(UPSTREAM_CONNECTIONS_ACTIVE),
            commands: metrics::counter!(COMMANDS_TOTAL),
            client_in: bytes("client_in"),
            client_out: bytes("client_out"),
            upstream_in: bytes("upstream_in"),
            upstream_out: bytes("upstream_out"),
            connect_seconds: metrics::histogram!(UPSTREAM_CONNECT_SECONDS),
            tls_handshakes: [
                metrics::counter!(UPSTREAM_TLS_HANDSHAKES_TOTAL, "kind" => "full"),
                metrics::counter!(UPSTREAM_TLS_HANDSHAKES_TOTAL, "kind" => "resumed"),
            ],
            auth_ok: [auth("initial", "ok"), auth("reauth", "ok")],
            auth_error: [auth("initial", "error"), auth("reauth", "error")],
            auth_seconds: [
                metrics::histogram!(UPSTREAM_AUTH_SECONDS, "kind" => "initial"),
                metrics::histogram!(UPSTREAM_AUTH_SECONDS, "kind" => "reauth"),
            ],
            warm_idle: metrics::gauge!(WARM_CONNECTIONS),
            warm_handed_out: metrics::counter!(WARM_HANDED_OUT_TOTAL),
            mux_shared: metrics::gauge!(MULTIPLEX_SHARED_CLIENTS),
            mux_batches: metrics::counter!(MULTIPLEX_BATCHES_TOTAL),
            mux_consolidated: metrics::gauge!(MULTIPLEX_CONSOLIDATED),
            mux_moves: metrics::counter!(MULTIPLEX_MOVES_TOTAL),
        }
    })
}

/// Holds a gauge one higher for as long as it lives, unwinding included. With `session`, a
/// drop during a panic is logged and counted as a connection the proxy closed.
pub struct Active<'a> {
    gauge: &'a Gauge,
    session: bool,
}

impl<'a> Active<'a> {
    pub fn new(gauge: &'a Gauge, session: bool) -> Self {
        gauge.increment(1.0);
        Active { gauge, session }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
        if self.session && std::thread::panicking() {
            metrics::counter!(CONNECTIONS_CLOSED_TOTAL, "side" => "proxy", "reason" => "panic")
                .increment(1);
            tracing::error!(
                side = "proxy",
                "closed: internal error (panic); other connections are unaffected"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic inside a session task unwinds that task only; the guard keeps the active
    /// gauge right and counts the close, and other tasks go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_session_is_counted_and_leaves_the_gauge_right() {
        let handle = install();
        let gauge = metrics::gauge!("redis_entra_proxy_test_active_guard");
        let survivor = tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            "still running"
        });
        let crashed = tokio::spawn(async move {
            let _active = Active::new(&gauge, true);
            panic!("a bug in one session");
        })
        .await;
        assert!(crashed.expect_err("the task panicked").is_panic());
        assert_eq!(survivor.await.expect("other task"), "still running");
        let text = handle.render();
        assert!(
            text.contains("redis_entra_proxy_test_active_guard 0"),
            "gauge back to 0:\n{text}"
        );
        assert!(
            text.lines().any(|l| l.starts_with(CONNECTIONS_CLOSED_TOTAL)
                && l.contains("reason=\"panic\"")
                && !l.ends_with(" 0")),
            "panic close counted:\n{text}"
        );
    }
}
