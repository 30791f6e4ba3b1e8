//! The `redis-entra-proxy` binary: parse, load config, init logging, bind, run, and map errors
//! to exit codes (0 clean shutdown, 1 runtime failure, 2 bad usage or configuration, 3 cannot
//! bind the listen address).

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use redis_entra_proxy::cli::{Cli, Command, LogFormat};
use redis_entra_proxy::config::{self, TOKEN_ENV};
use redis_entra_proxy::RunError;
use redis_entra_proxy::{open_files, secret};

fn main() -> ExitCode {
    if let Err(e) = secret::keep_memory_private() {
        eprintln!("redis-entra-proxy: cannot make the process non-dumpable: {e}");
    }
    // Parsed once; `dev` looks again at where its options came from (`warn_set_by_dev`).
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let token_env = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
    if let Some(Command::Healthcheck(args)) = &cli.command {
        return healthcheck(cli.options, args.ready);
    }
    if let Some(Command::Dev(mut args)) = cli.command {
        if cli.print_config {
            eprintln!("redis-entra-proxy: --print-config does not apply to `dev`, whose setup is made as it starts");
            return ExitCode::from(2);
        }
        let options = match config::with_file(std::mem::take(&mut args.options).or(cli.options)) {
            Ok(options) => options,
            Err(e) => {
                eprintln!("redis-entra-proxy: invalid configuration: {e}");
                return ExitCode::from(2);
            }
        };
        let log_level = options
            .log_level
            .as_deref()
            .unwrap_or(config::DEFAULT_LOG_LEVEL);
        let log_level = match config::log_filter(log_level) {
            Ok(filter) => filter,
            Err(e) => {
                eprintln!(
                    "redis-entra-proxy: invalid configuration: --log-level: {log_level:?}: {e}"
                );
                return ExitCode::from(2);
            }
        };
        init_logging(&log_level, options.log_format);
        warn_unknown_env_vars();
        warn_set_by_dev(&matches);
        return runtime().block_on(redis_entra_proxy::dev::run(args, options));
    }
    let (mut config, merged) = match config::load(cli.options, token_env.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("redis-entra-proxy: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        // Warnings on stderr, as at a start: unknown variables, and the token source's, which
        // is built as a start would (a check before deploying).
        init_logging("warn", Some(LogFormat::Text));
        warn_unknown_env_vars();
        if let Err(e) = runtime()
            .block_on(async { redis_entra_proxy::credentials::source::from_config(&config) })
        {
            eprintln!("redis-entra-proxy: invalid configuration: {e}");
            return ExitCode::from(2);
        }
        print!("{}", config::render(&merged, token_env.is_some()));
        return ExitCode::SUCCESS;
    }
    init_logging(&config.log_level, Some(config.log_format));
    warn_unknown_env_vars();
    // Read before logging started: say it now.
    if let Some(path) = &merged.local_password_file {
        if merged.local_password.is_some() {
            tracing::warn!("--local-password-file is set but ignored: --local-password is set too");
        } else {
            config::warn_if_readable_by_others(path);
        }
    }
    open_files::fit(&mut config);
    runtime().block_on(async move {
        let listeners = match redis_entra_proxy::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(3);
            }
        };
        let shutdown = redis_entra_proxy::Shutdown::default();
        tokio::spawn(redis_entra_proxy::signals(shutdown.clone()));
        match redis_entra_proxy::run(config, listeners, shutdown).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e @ (RunError::Config(_) | RunError::Tls(_))) => {
                tracing::error!("invalid configuration: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(1)
            }
        }
    })
}

/// The main thread's runtime: accept loops, token refresh, admin endpoint, and one share of
/// the sessions. The other session threads are started by the proxy itself (`workers`).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts (it only fails when the OS refuses resources)")
}

/// `healthcheck`: one GET of `/healthz` (or `/readyz`) on the admin endpoint; 0 if it answers
/// 200, 1 if it answers otherwise or not at all, 2 if there is no admin endpoint to ask.
fn healthcheck(options: redis_entra_proxy::cli::Options, ready: bool) -> ExitCode {
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
    use std::time::Duration;
    let options = match config::with_file(options) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("redis-entra-proxy healthcheck: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let addr = match config::admin_listen(&options) {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            eprintln!("redis-entra-proxy healthcheck: --admin-listen is none: nothing to ask");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("redis-entra-proxy healthcheck: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // A wildcard address listens on loopback too.
    let addr = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    let path = if ready { "/readyz" } else { "/healthz" };
    // `/readyz` may probe the upstream, for up to 5 s.
    let timeout = Duration::from_secs(if ready { 7 } else { 3 });
    let answer = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
        let mut answer = Vec::new();
        s.take(64 * 1024).read_to_end(&mut answer)?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    })();
    match answer {
        Ok(text) => {
            let status = text.split(' ').nth(1).unwrap_or_default();
            let body = text
                .split_once("\r\n\r\n")
                .map_or("", |(_, b)| b.trim_end());
            println!("http://{addr}{path}: {status} {body}");
            if status == "200" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                println!("http://{addr}{path}: no answer within {timeout:?}");
            } else {
                println!("http://{addr}{path}: {e}");
            }
            ExitCode::from(1)
        }
    }
}

/// `dev` sets the upstream and token options itself: says which of them it was given
/// (flags or environment), which it ignores.
fn warn_set_by_dev(matches: &clap::ArgMatches) {
    use clap::parser::ValueSource;
    let given = |m: &clap::ArgMatches, id: &str| {
        matches!(
            m.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let dev = matches.subcommand_matches("dev");
    let ignored: Vec<String> = redis_entra_proxy::cli::SET_BY_DEV
        .iter()
        .filter(|id| given(matches, id) || dev.is_some_and(|d| given(d, id)))
        .map(|id| format!("--{}", id.replace('_', "-")))
        .collect();
    if !ignored.is_empty() {
        tracing::warn!(
            "dev runs its own upstream and token issuer: {} ignored",
            ignored.join(", ")
        );
    }
}

/// The names of this process's environment variables.
fn env_names() -> impl Iterator<Item = String> {
    std::env::vars_os().filter_map(|(name, _)| name.into_string().ok())
}

/// A mistyped variable (`REDIS_ENTRA_PROXY_LISTN`) would otherwise leave its option at the
/// default without a word. Names only: values may be secrets.
fn warn_unknown_env_vars() {
    for name in config::unknown_env_vars(env_names()) {
        tracing::warn!(
            variable = %name,
            "not a variable of the proxy; ignored (--help lists each option's)"
        );
    }
}

fn init_logging(filter: &str, format: Option<LogFormat>) {
    use tracing_subscriber::filter::{EnvFilter, Targets};
    // Directives naming only targets and levels (`info`, `redis_entra_proxy=debug,warn`) are
    // decided once per call site by `Targets`. `EnvFilter`, needed only for span and field
    // directives (`[conn]=debug`), takes a lock on every span enter and exit: every poll of a
    // session, since each connection's task runs in its `conn` span.
    if !filter.contains(['[', '{']) {
        if let Ok(targets) = filter.parse::<Targets>() {
            return install_logging(targets, format);
        }
    }
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    install_logging(filter, format);
}

fn install_logging<F>(filter: F, format: Option<LogFormat>)
where
    F: tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync + 'static,
{
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let logs = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format.unwrap_or(LogFormat::Text) {
        LogFormat::Text if redis_entra_proxy::notify::stderr_is_journal() => logs
            .with(fmt.event_format(Journal(tracing_subscriber::fmt::format().without_time())))
            .init(),
        LogFormat::Text => logs.with(fmt).init(),
        // The current span (the connection's) once: its list repeated it.
        LogFormat::Json => logs
            .with(fmt.json().flatten_event(true).with_span_list(false))
            .init(),
    }
}

/// Text lines for the journal: each starts with its level's syslog priority (`<4>` for a
/// warning), which the journal takes as the line's priority, and has no timestamp (the
/// journal's own is exact).
struct Journal<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Journal<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = redis_entra_proxy::notify::priority(*event.metadata().level());
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}
