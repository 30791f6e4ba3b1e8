//! redis-entra-proxy: a RESP-aware proxy that lets applications which cannot change their code
//! use Azure Managed Redis (and Azure Cache for Redis) with Microsoft Entra ID authentication.
//! Applications connect to a local plain-text endpoint; the proxy opens one TLS connection per
//! client to the server, authenticates it with `AUTH <object id> <access token>`, and keeps it
//! authenticated as tokens rotate, without the application seeing anything.
//!
//! # Data flow
//! A listener ([`server`]) accepts a client and starts a [`session`]. The session connects the
//! upstream ([`upstream`], [`tls`]) and drives a sans-IO core (`session/core.rs`) that frames
//! client commands exactly as Redis does ([`resp::request`]), forwards them, frames replies
//! ([`resp::reply`]) and matches them to a ledger of expected replies, so that the AUTH
//! commands the proxy injects are answered to the proxy and never reach the client. The token
//! refresher ([`credentials::refresh`]) publishes new credentials through a `watch` channel,
//! handed on to the sessions in groups ([`credentials::fanout`]); each session
//! re-authenticates at its next safe point.
//!
//! # Layout
//! - `main.rs`: parse, load config, init logging, bind, run, exit codes.
//! - [`cli`], [`config`]: options (flag > env > file > default) and their validation.
//! - [`server`]: accept loops, connection limit, draining.
//! - [`workers`]: session threads, one single-threaded runtime each; a connection stays on one.
//! - [`mux`]: `--multiplex`: plain commands of many clients over one shared session per thread;
//!   `mux/commands.rs` what a request gets, `mux/client.rs` a client in its shared phase,
//!   `mux/router.rs` a thread's router, `mux/link.rs` what the two exchange, `mux/balance.rs`
//!   which threads shared clients run on.
//! - [`session`]: the per-connection driver; `session/relay.rs` its poll that moves bytes,
//!   `session/core.rs` the sans-IO core (its reply side in `core/replies.rs`, the upstream's
//!   authentication in `core/auth.rs`), `session/commands.rs` client command handling,
//!   `session/ledger.rs` the reply FIFO, `session/state.rs` the tracked connection state,
//!   `session/framing.rs` what the router of shared clients tells its session of the
//!   requests it hands over (parsed once).
//! - [`notify`]: systemd's service notifications (ready, status, stopping, watchdog).
//! - `log_budget.rs`: at most a few lines a second for what is logged once per connection.
//! - `gated.rs`: a future polled only once it woke (a session's shutdown and credentials
//!   waits).
//! - [`resp`]: request parser (RESP + inline), reply scanner (RESP2/RESP3), encoders, and
//!   reply trees for the few replies the proxy edits.
//! - [`cluster`]: OSS cluster mode: a local listener per node, node addresses in topology
//!   replies and redirections rewritten to them, the topology refresh.
//! - [`upstream`], [`tls`]: TCP/TLS connections to the server.
//! - [`credentials`]: `Credentials`, the `TokenSource` trait, the refresher, the fan-out to
//!   the sessions; one file per source (`azure.rs` is the only one touching
//!   `azure_identity`), `source.rs` chooses.
//! - [`admin`], [`metrics`]: the admin HTTP endpoint and the metric names.
//! - [`open_files`]: the open-file limit, raised at startup to hold `--max-connections`.
//! - [`secret`]: a string type that cannot be printed.
//! - [`dev`], [`devenv`]: the built-in local setup (TLS redis-server, token issuer) used by
//!   `redis-entra-proxy dev` and by the tests.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod dev;
pub mod devenv;
mod gated;
mod log_budget;
pub mod metrics;
pub mod mux;
pub mod notify;
pub mod open_files;
pub mod pool;
pub mod resp;
pub mod secret;
pub mod server;
pub mod session;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod upstream;
pub mod workers;

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::credentials::refresh::{self, CredentialsRx, Policy};
use crate::credentials::TokenSource;
pub use crate::server::Listeners;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsConfigError),
    #[error("binding {what}: {source}")]
    Bind {
        what: String,
        source: std::io::Error,
    },
    #[error("starting session threads: {0}")]
    Threads(std::io::Error),
}

/// Binds the listeners the configuration asks for.
pub async fn bind(config: &Config) -> Result<Listeners, RunError> {
    let tcp = match config.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind {
                    what: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let unix = match &config.unix_socket {
        Some(path) => {
            // A socket file left by a previous run (killed) would make bind fail.
            remove_socket(path);
            let bind_error = |source| RunError::Bind {
                what: path.display().to_string(),
                source,
            };
            let listener = tokio::net::UnixListener::bind(path).map_err(bind_error)?;
            if let Some(mode) = config.unix_socket_mode {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(bind_error)?;
            }
            Some(listener)
        }
        None => None,
    };
    let admin = match config.admin_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind {
                    what: format!("admin {addr}"),
                    source,
                })?,
        ),
        None => None,
    };
    Ok(Listeners { tcp, unix, admin })
}

/// How the proxy is told to stop. Cancelling `drain` stops it accepting connections and lets
/// the open ones finish what is in flight, for up to `--drain-timeout`; cancelling `now` too
/// ends the drain at once (a second SIGTERM or SIGINT, see [`signals`]). A lone token converts
/// into one whose drain can only time out.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub now: CancellationToken,
}

impl From<CancellationToken> for Shutdown {
    fn from(drain: CancellationToken) -> Self {
        Shutdown {
            drain,
            now: CancellationToken::new(),
        }
    }
}

/// Runs the proxy with the configured token source until `shutdown` is cancelled and the
/// sessions have drained.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Into<Shutdown>,
) -> Result<(), RunError> {
    let source = credentials::source::from_config(&config)?;
    run_with_source(config, listeners, source, shutdown).await
}

/// Like [`run`], with a token source chosen by the caller (the `dev` setup, tests).
pub async fn run_with_source(
    config: Config,
    mut listeners: Listeners,
    source: Arc<dyn TokenSource>,
    shutdown: impl Into<Shutdown>,
) -> Result<(), RunError> {
    let Shutdown {
        drain: shutdown,
        now: shutdown_now,
    } = shutdown.into();
    // First, so that every metric handle registered afterwards records.
    let prometheus = metrics::install();
    let unix_socket = config.unix_socket.clone();
    let health = Arc::new(admin::Health::default());
    let (tx, rx): (_, CredentialsRx) = watch::channel(None);
    // Before the refresher can say it is serving.
    notify::send(&notify::status(&format!(
        "waiting for the first token ({})",
        source.name()
    )));
    let refresher = tokio::spawn(refresh::run(
        source,
        config.username.clone(),
        Policy {
            ratio: config.refresh_ratio,
        },
        tx,
        health.clone(),
        shutdown.clone(),
    ));
    let tls = if config.upstream.tls {
        let client = tls::client_config(config.upstream.ca_file.as_deref())?;
        let name = rustls::pki_types::ServerName::try_from(config.upstream.server_name.clone())
            .map_err(|e| config::ConfigError::Invalid {
                option: "upstream-server-name",
                reason: e.to_string(),
            })?;
        Some((client, name))
    } else {
        tracing::warn!(
            "upstream TLS is disabled: tokens travel in clear text (local development only)"
        );
        None
    };
    let connector =
        upstream::Connector::new(config.upstream.addr.clone(), tls, config.connect_timeout);
    let pool = (config.warm_connections > 0).then(|| pool::Pool::new(config.warm_connections));
    let (fanout, forward) = credentials::fanout::Fanout::new(rx.clone());
    tokio::spawn(forward);
    let shared = Arc::new(session::Shared {
        connector: connector.clone(),
        credentials: rx.clone(),
        fanout,
        local_password: config.local_password.clone().map(Arc::new),
        shutdown: shutdown.clone(),
        reauth_window: config.reauth_window,
        client_idle_timeout: config.client_idle_timeout,
        partial_request_timeout: config.partial_request_timeout,
        health: health.clone(),
    });
    if let Some(pool) = &pool {
        tokio::spawn(pool::run(pool.clone(), shared.clone()));
    }
    if config.cluster.auto_disabled {
        tracing::warn!("cluster support is off: --listen is not a specific IP address that cluster clients could be sent to (set --cluster-announce-host)");
    }
    let threads = config.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    // Gathering shared clients on one thread means something only with more than one.
    let consolidate = config.multiplex_consolidate && threads > 1;
    let (cluster, nodes) = match (config.cluster.mode, config.listen) {
        (cluster::ClusterMode::Off, _) | (_, None) => (None, None),
        (mode, Some(listen)) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let cluster = cluster::Cluster::new(
                mode,
                listen.ip(),
                config.cluster.announce.as_deref(),
                config.cluster.ports,
                connector.clone(),
                cluster::NodeOptions {
                    tls: config.upstream.tls,
                    multiplex: config.multiplex,
                    multiplex_max_batches: config.multiplex_max_batches,
                    multiplex_consolidate: consolidate,
                },
                tx,
            );
            tokio::spawn(cluster::refresh::run(
                cluster.clone(),
                shared.clone(),
                config.cluster.refresh_interval,
            ));
            (Some(cluster), Some(rx))
        }
    };
    let main = Arc::new(session::Target {
        connector: connector.clone(),
        pool,
        rewriter: cluster.as_ref().and_then(|c| c.rewriter(c.seed_host())),
        clients: Default::default(),
        mux: config
            .multiplex
            .then(|| mux::Routers::new(config.multiplex_max_batches, consolidate)),
        in_topology: None,
    });
    // Histograms keep their samples until the exporter's upkeep folds them: without it, a
    // proxy nobody scrapes (or with no admin endpoint) grows with every connection and AUTH.
    tokio::spawn({
        let handle = prometheus.clone();
        let shutdown = shutdown.clone();
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => handle.run_upkeep(),
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    });
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            notify::send(&format!(
                "STOPPING=1\n{}",
                notify::status("draining: no new connections, finishing in-flight commands")
            ));
        }
    });
    if let Some(every) = notify::watchdog_interval() {
        // Fed from the main thread, which accepts connections, refreshes tokens and serves
        // the admin endpoint: a stall there has the service manager restart the proxy.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                notify::send("WATCHDOG=1");
            }
        });
    }
    // The counts of log lines left out in bursts that no line followed (`log_budget`).
    let flusher = tokio::spawn(async {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            log_budget::flush(false);
        }
    });
    // The admin endpoint outlives the drain: it stops once the sessions are done.
    let admin_stop = CancellationToken::new();
    if let Some(listener) = listeners.admin.take() {
        let admin = Arc::new(admin::Admin::new(
            prometheus,
            health,
            rx,
            connector,
            shutdown.clone(),
        ));
        tokio::spawn(admin::serve(listener, admin, admin_stop.clone()));
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = config.listen.map(|a| a.to_string()),
        unix_socket = config.unix_socket.as_ref().map(|p| p.display().to_string()),
        admin_listen = config.admin_listen.map(|a| a.to_string()),
        upstream = %config.upstream.addr,
        tls = config.upstream.tls,
        cluster_mode = config.cluster.mode.name(),
        multiplex = config.multiplex,
        "proxy started"
    );
    ::metrics::gauge!(metrics::CLIENT_CONNECTIONS_MAX).set(config.max_connections as f64);
    let workers = Arc::new(workers::Workers::start(threads).map_err(RunError::Threads)?);
    server::serve(
        listeners,
        shared,
        main,
        nodes,
        workers.clone(),
        config.max_connections,
        server::Drain {
            timeout: config.drain_timeout,
            cut: shutdown_now,
        },
    )
    .await;
    refresher.abort();
    // Sessions still running past the drain timeout end with their threads.
    workers.stop().await;
    flusher.abort();
    log_budget::flush(true);
    admin_stop.cancel();
    if let Some(path) = &unix_socket {
        remove_socket(path);
    }
    Ok(())
}

/// Removes the unix socket at `path`, if a socket is there (never another kind of file).
fn remove_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Starts the drain on the first SIGTERM or SIGINT, and ends it at once on the second: an
/// operator who pressed Ctrl-C once and waits on a busy connection can press it again.
/// SIGHUP is logged and ignored.
pub async fn signals(shutdown: impl Into<Shutdown>) {
    use tokio::signal::unix::{signal, SignalKind};
    let shutdown = shutdown.into();
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; SIGTERM will not drain");
        return;
    };
    let mut next = async || loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            // Its default action would end the process at once, cutting every connection
            // (a `systemctl reload`, a logrotate hook); there is nothing to reload: tokens and
            // the files they come from are read again on their own.
            _ = hup.recv() => tracing::info!(signal = "SIGHUP", "ignored: nothing to reload"),
        }
    };
    let which = next().await;
    tracing::info!(
        signal = which,
        "shutting down: no new connections, finishing in-flight commands (send it again to stop at once)"
    );
    shutdown.drain.cancel();
    let which = next().await;
    tracing::warn!(
        signal = which,
        "second signal: closing the remaining connections now"
    );
    shutdown.now.cancel();
}
