//! The validated configuration. Sources merge with precedence flag > environment > file >
//! default ([`load`]); every default is a named constant here; validation turns every bad
//! value into a [`ConfigError`] that names the option, so that the process exits with a clear
//! message instead of failing later.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{CredentialKind, LogFormat, Options};
use crate::cluster::{ClusterMode, Ports};
use crate::secret::Secret;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:6379";
/// Azure Managed Redis serves TLS on 10000.
pub const DEFAULT_UPSTREAM_PORT: u16 = 10000;
/// Azure Cache for Redis serves TLS on 6380 (6379 is its plain port, which Entra ID
/// authentication does not accept).
pub const AZURE_CACHE_PORT: u16 = 6380;
/// The host names of Azure Cache for Redis, in each cloud: their default port is
/// [`AZURE_CACHE_PORT`].
const AZURE_CACHE_SUFFIXES: [&str; 3] = [
    ".redis.cache.windows.net",
    ".redis.cache.chinacloudapi.cn",
    ".redis.cache.usgovcloudapi.net",
];

/// The port of `host` when none is given: Azure Cache for Redis's TLS port for its host
/// names, Azure Managed Redis's for every other.
pub fn default_port(host: &str) -> u16 {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if AZURE_CACHE_SUFFIXES.iter().any(|s| host.ends_with(s)) {
        AZURE_CACHE_PORT
    } else {
        DEFAULT_UPSTREAM_PORT
    }
}
/// TCP plus TLS handshake to a cloud endpoint; generous because a slow first handshake is
/// better than a failed one, and short enough that a dead endpoint is reported promptly.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Below Kubernetes' default 30 s termination grace period, so draining ends before SIGKILL.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Redis's own default `maxclients`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Connections re-authenticate at random moments within this window after a new token
/// arrives: wide enough to spread thousands of AUTHs, far shorter than the 2 minutes between
/// the latest refresh (5 min before expiry) and Microsoft's 3-minute deadline.
pub const DEFAULT_PARTIAL_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_REAUTH_WINDOW: Duration = Duration::from_secs(30);
/// Loopback by default: metrics and probes are for the pod and its node, not the network.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Clients cache the topology and learn changes from redirections; a periodic read is for
/// nodes that appear without a client being sent to them first.
pub const DEFAULT_CLUSTER_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Environment variable holding the token of the `fixed` source (never a flag).
pub const TOKEN_ENV: &str = "REDIS_ENTRA_PROXY_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{option}: {reason}")]
    Invalid {
        option: &'static str,
        reason: String,
    },
    #[error("--{option} is required{hint}")]
    Missing {
        option: &'static str,
        hint: &'static str,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
}

/// Permission bits in octal, as `chmod` takes them: `660`, `0666`, at most `777`.
fn parse_mode(s: &str) -> Option<u32> {
    let digits = s.trim();
    if digits.is_empty() || digits.len() > 4 {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o777)
}

fn invalid(option: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        option,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `host:port` to connect to.
    pub addr: String,
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub server_name: String,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `Off` when cluster support cannot work (no TCP listener, or `auto` on a wildcard
    /// listen address).
    pub mode: ClusterMode,
    pub ports: Ports,
    /// The host written into rewritten replies.
    pub announce: Option<String>,
    pub refresh_interval: Duration,
    /// `auto` was turned off because the listen address cannot be announced to clients.
    pub auto_disabled: bool,
}

/// Options of the credential sources other than `fixed`, as given; `credentials/source.rs`
/// turns them into a source.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    pub client_id: Option<String>,
    pub object_id: Option<String>,
    pub resource_id: Option<String>,
    pub tenant_id: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub client_certificate_file: Option<PathBuf>,
    pub credential_file: Option<PathBuf>,
    pub credential_command: Option<String>,
    pub json_username_path: Option<String>,
    pub json_token_path: Option<String>,
    pub json_expiry_path: Option<String>,
    pub scope: String,
    pub authority_host: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Option<SocketAddr>,
    pub unix_socket: Option<PathBuf>,
    /// Permission bits given to the unix socket once bound (`None`: as the umask leaves them).
    pub unix_socket_mode: Option<u32>,
    pub upstream: UpstreamConfig,
    pub credential: CredentialKind,
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    pub username: Option<String>,
    pub sources: SourceOptions,
    pub local_password: Option<Secret>,
    pub allow_unauthenticated_remote: bool,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// `None`: never.
    pub client_idle_timeout: Option<Duration>,
    /// `None`: never.
    pub partial_request_timeout: Option<Duration>,
    pub warm_connections: usize,
    /// Plain commands of many clients share an upstream connection (`mux.rs`).
    pub multiplex: bool,
    /// `--multiplex-max-batches`; 0: no limit.
    pub multiplex_max_batches: usize,
    /// `--multiplex-consolidate`.
    pub multiplex_consolidate: bool,
    pub cluster: ClusterConfig,
    /// `None`: one per CPU.
    pub worker_threads: Option<usize>,
    pub max_connections: usize,
    /// `--max-connections` was set, rather than left at its default.
    pub max_connections_set: bool,
    pub refresh_ratio: f64,
    pub reauth_window: Duration,
    pub admin_listen: Option<SocketAddr>,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// Merges flags and environment (already merged by clap) over the config file, then applies
/// defaults and validates. `token_env` is the value of [`TOKEN_ENV`].
pub fn load(cli: Options, token_env: Option<String>) -> Result<(Config, Options), ConfigError> {
    let merged = with_file(cli)?;
    let config = validate(merged.clone(), token_env)?;
    Ok((config, merged))
}

/// `cli` (flags and environment) with, beneath it, the config file it names (`--config`).
pub fn with_file(cli: Options) -> Result<Options, ConfigError> {
    match &cli.config {
        Some(path) => {
            let file = read_file(path)?;
            Ok(cli.or(file))
        }
        None => Ok(cli),
    }
}

/// `--admin-listen`: where the admin endpoint listens, or `None` (`none`).
pub fn admin_listen(o: &Options) -> Result<Option<SocketAddr>, ConfigError> {
    match o.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN) {
        "none" => Ok(None),
        s => s.parse::<SocketAddr>().map(Some).map_err(|_| {
            invalid(
                "admin-listen",
                format!("{s:?} is not IP:PORT (e.g. 127.0.0.1:9090) or `none`"),
            )
        }),
    }
}

/// The `REDIS_ENTRA_PROXY_*` names among `vars` that belong to no option (nor to the token
/// or the client secret, which have no flag).
pub fn unknown_env_vars(vars: impl IntoIterator<Item = String>) -> Vec<String> {
    fn options(cmd: &clap::Command, known: &mut std::collections::HashSet<String>) {
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env() {
                known.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            options(sub, known);
        }
    }
    let mut known = std::collections::HashSet::new();
    options(
        &<crate::cli::Cli as clap::CommandFactory>::command(),
        &mut known,
    );
    known.insert(TOKEN_ENV.to_owned());
    known.extend(crate::credentials::source::CLIENT_SECRET_ENVS.map(str::to_owned));
    let mut unknown: Vec<String> = vars
        .into_iter()
        .filter(|v| v.starts_with("REDIS_ENTRA_PROXY_") && !known.contains(v))
        .collect();
    unknown.sort();
    unknown
}

/// Checks a `--log-level` filter and spells it as `tracing` reads it. A bare word must be a
/// level: `tracing` takes any other word (`warning`, Redis's name for `warn`) for a target,
/// and the filter then lets nothing through, errors included. Redis's level names stand for
/// the nearest ones: `warning` for `warn`, `notice` for `info`, `verbose` for `debug`. A
/// filter without a bare level gets `warn` for the rest; hyphens in a target are
/// underscores (`redis-entra-proxy=debug`).
pub fn log_filter(raw: &str) -> Result<String, String> {
    const LEVELS: &str = "off, error, warn, info, debug, trace";
    let level = |word: &str| -> Option<&'static str> {
        Some(match word.trim().to_ascii_lowercase().as_str() {
            "off" => "off",
            "error" => "error",
            "warn" | "warning" => "warn",
            "info" | "notice" => "info",
            "debug" | "verbose" => "debug",
            "trace" => "trace",
            _ => return None,
        })
    };
    let mut directives = Vec::new();
    for d in raw.split(',').map(str::trim) {
        if d.is_empty() {
            return Err("an empty directive (two commas in a row, or one at an end)".into());
        }
        let directive = if d.contains(['[', '{']) {
            // Span and field directives: as `tracing` reads them, checked below.
            d.to_owned()
        } else if let Some((target, word)) = d.rsplit_once('=') {
            let l = level(word)
                .ok_or_else(|| format!("{word:?} in {d:?} is not a level ({LEVELS})"))?;
            // Module paths have underscores where the crate's name has hyphens.
            format!("{}={l}", target.trim().replace('-', "_"))
        } else {
            level(d)
                .ok_or_else(|| {
                    format!("{d:?} is not a level ({LEVELS}); for a module, write MODULE=LEVEL")
                })?
                .to_owned()
        };
        directives.push(directive);
    }
    // Without a level of its own, a filter lets nothing else through (`redis_entra_proxy=debug`
    // alone would hide every other module's errors): warnings and errors of the rest stay.
    if !directives.iter().any(|d| level(d).is_some()) {
        directives.insert(0, "warn".to_owned());
    }
    let filter = directives.join(",");
    tracing_subscriber::EnvFilter::try_new(&filter).map_err(|e| e.to_string())?;
    Ok(filter)
}

/// Parses a TOML config file; unknown keys are errors, so typos do not pass silently.
/// Relative paths in it are taken from the file's directory.
pub fn read_file(path: &Path) -> Result<Options, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut options: Options = toml::from_str(&text).map_err(|e| ConfigError::File {
        path: shown,
        reason: toml_error(&text, &e),
    })?;
    // A relative path in the file means the same file wherever the proxy is started from.
    let dir = path.parent().unwrap_or(Path::new(""));
    for file in [
        &mut options.unix_socket,
        &mut options.upstream_ca_file,
        &mut options.client_secret_file,
        &mut options.client_certificate_file,
        &mut options.credential_file,
        &mut options.token_file,
        &mut options.local_password_file,
    ]
    .into_iter()
    .flatten()
    {
        if file.is_relative() {
            *file = dir.join(&*file);
        }
    }
    Ok(options)
}

/// Where and what, without the excerpt of the file `toml` would print: the line may hold the
/// local password. An error on a line naming a password says only that, since the message
/// itself may quote the value.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_owned();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let line_text = text.lines().nth(line - 1).unwrap_or_default();
    let key = match line_text.split_once('=') {
        Some((key, _)) => format!(" ({})", key.trim()),
        None => String::new(),
    };
    let message = if line_text.contains("password") {
        "not a valid setting (the value is not shown: the line names a password)"
    } else {
        e.message()
    };
    format!("line {line}, column {column}{key}: {message}")
}

pub fn validate(o: Options, token_env: Option<String>) -> Result<Config, ConfigError> {
    let listen = match o.listen.as_deref().unwrap_or(DEFAULT_LISTEN) {
        "none" => None,
        s => Some(s.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "listen",
                format!("{s:?} is not IP:PORT (e.g. 127.0.0.1:6379) or `none`"),
            )
        })?),
    };
    if listen.is_none() && o.unix_socket.is_none() {
        return Err(invalid(
            "listen",
            "`none` needs --unix-socket, or nothing would be served",
        ));
    }
    let unix_socket_mode = match o.unix_socket_mode.as_deref() {
        None => None,
        Some(_) if o.unix_socket.is_none() => {
            return Err(invalid("unix-socket-mode", "needs --unix-socket"));
        }
        Some(s) => Some(parse_mode(s).ok_or_else(|| {
            invalid(
                "unix-socket-mode",
                format!("{s:?} is not permission bits in octal (e.g. 660, 0666)"),
            )
        })?),
    };
    let upstream = o.upstream.as_deref().ok_or(ConfigError::Missing {
        option: "upstream",
        hint: " (e.g. --upstream myredis.westeurope.redis.azure.net)",
    })?;
    let (host, port) = split_host_port(upstream)?;
    let tls = o.upstream_tls.unwrap_or(true);
    let server_name = o
        .upstream_server_name
        .clone()
        .unwrap_or_else(|| host.clone());
    if tls {
        rustls::pki_types::ServerName::try_from(server_name.clone())
            .map_err(|e| invalid("upstream-server-name", format!("{server_name:?}: {e}")))?;
    }
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };

    let local_password = match (&o.local_password, &o.local_password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(path)) => Some(read_secret_file(path, "local-password-file")?),
        (None, None) => None,
    };
    if local_password.as_ref().is_some_and(Secret::is_empty) {
        return Err(invalid("local-password", "must not be empty"));
    }
    let allow_remote = o.allow_unauthenticated_remote.unwrap_or(false);
    if let Some(addr) = listen {
        if !addr.ip().is_loopback() && local_password.is_none() && !allow_remote {
            return Err(invalid(
                "listen",
                format!(
                    "{addr} is reachable from other hosts: set a local password \
                     (REDIS_ENTRA_PROXY_LOCAL_PASSWORD or --local-password-file) or pass \
                     --allow-unauthenticated-remote"
                ),
            ));
        }
    }

    let credential = o.credential.unwrap_or(CredentialKind::Auto);
    let sources = SourceOptions {
        client_id: o.client_id.clone(),
        object_id: o.object_id.clone(),
        resource_id: o.resource_id.clone(),
        tenant_id: o.tenant_id.clone(),
        client_secret_file: o.client_secret_file.clone(),
        client_certificate_file: o.client_certificate_file.clone(),
        credential_file: o.credential_file.clone(),
        credential_command: o.credential_command.clone(),
        json_username_path: o.json_username_path.clone(),
        json_token_path: o.json_token_path.clone(),
        json_expiry_path: o.json_expiry_path.clone(),
        scope: o
            .scope
            .clone()
            .unwrap_or_else(|| crate::credentials::DEFAULT_SCOPE.to_owned()),
        authority_host: o.authority_host.clone(),
    };
    let ids = [&sources.client_id, &sources.object_id, &sources.resource_id];
    if credential == CredentialKind::ManagedIdentity
        && ids.iter().filter(|i| i.is_some()).count() > 1
    {
        return Err(invalid(
            "client-id",
            "a managed identity is chosen by one of --client-id, --object-id, --resource-id",
        ));
    }
    let token = token_env.filter(|t| !t.is_empty()).map(Secret::new);
    let refresh_ratio = o
        .refresh_ratio
        .unwrap_or(crate::credentials::refresh::DEFAULT_REFRESH_RATIO);
    if !(0.05..=0.95).contains(&refresh_ratio) {
        return Err(invalid(
            "refresh-ratio",
            format!("{refresh_ratio} is outside 0.05..=0.95"),
        ));
    }
    let admin_listen = admin_listen(&o)?;
    let max_connections = o.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        return Err(invalid("max-connections", "must be at least 1"));
    }
    let cluster = cluster_config(&o, listen)?;
    if o.worker_threads == Some(0) {
        return Err(invalid("worker-threads", "must be at least 1"));
    }
    let log_level = o
        .log_level
        .clone()
        .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
    let log_level =
        log_filter(&log_level).map_err(|e| invalid("log-level", format!("{log_level:?}: {e}")))?;

    Ok(Config {
        listen,
        unix_socket: o.unix_socket,
        unix_socket_mode,
        upstream: UpstreamConfig {
            addr,
            tls,
            ca_file: o.upstream_ca_file,
            server_name,
        },
        credential,
        token,
        token_file: o.token_file,
        username: o.username,
        sources,
        local_password,
        allow_unauthenticated_remote: allow_remote,
        connect_timeout: o.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        drain_timeout: o.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
        client_idle_timeout: o.client_idle_timeout.filter(|d| !d.is_zero()),
        partial_request_timeout: Some(
            o.partial_request_timeout
                .unwrap_or(DEFAULT_PARTIAL_REQUEST_TIMEOUT),
        )
        .filter(|d| !d.is_zero()),
        warm_connections: o.warm_connections.unwrap_or(0),
        multiplex: o.multiplex.unwrap_or(false),
        multiplex_max_batches: o.multiplex_max_batches.unwrap_or(0),
        multiplex_consolidate: o.multiplex_consolidate.unwrap_or(true),
        cluster,
        worker_threads: o.worker_threads,
        max_connections,
        max_connections_set: o.max_connections.is_some(),
        refresh_ratio,
        reauth_window: o.reauth_window.unwrap_or(DEFAULT_REAUTH_WINDOW),
        admin_listen,
        log_level,
        log_format: o.log_format.unwrap_or(LogFormat::Text),
    })
}

fn cluster_config(o: &Options, listen: Option<SocketAddr>) -> Result<ClusterConfig, ConfigError> {
    let mut mode = o.cluster_mode.unwrap_or(ClusterMode::Auto);
    let ports = match &o.cluster_ports {
        Some(s) => Ports::parse(s).map_err(|e| invalid("cluster-ports", e))?,
        None => Ports::after(listen.map_or(0, |a| a.port())),
    };
    let refresh_interval = o
        .cluster_refresh_interval
        .unwrap_or(DEFAULT_CLUSTER_REFRESH_INTERVAL);
    if refresh_interval < Duration::from_secs(1) {
        return Err(invalid("cluster-refresh-interval", "must be at least 1s"));
    }
    let announce = o.cluster_announce_host.clone();
    if let Some(host) = &announce {
        if host.is_empty()
            || host
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(invalid(
                "cluster-announce-host",
                format!("{host:?} is not a host name or IP address"),
            ));
        }
    }
    // Rewritten replies send clients to the announced host, by default the listen address:
    // it must be one they can reach, and node listeners need a TCP listen address.
    let usable = listen.is_some_and(|a| announce.is_some() || !a.ip().is_unspecified());
    if !usable {
        match mode {
            ClusterMode::On => {
                return Err(invalid(
                    "cluster-mode",
                    "`on` needs --listen with a specific IP address (clients are sent to it \
                     for every cluster node) or --cluster-announce-host, and a TCP listener",
                ))
            }
            ClusterMode::Auto => mode = ClusterMode::Off,
            ClusterMode::Off => {}
        }
    }
    Ok(ClusterConfig {
        auto_disabled: !usable && o.cluster_mode.unwrap_or(ClusterMode::Auto) == ClusterMode::Auto,
        mode,
        ports,
        announce,
        refresh_interval,
    })
}

/// Splits `HOST[:PORT]` (IPv6 literals in brackets) and applies the default port
/// ([`default_port`]).
pub fn split_host_port(s: &str) -> Result<(String, u16), ConfigError> {
    let bad = || invalid("upstream", format!("{s:?} is not HOST[:PORT]"));
    if s.is_empty() {
        return Err(bad());
    }
    if let Some((_, rest)) = s.split_once("://") {
        let host = rest.split(['/', '?']).next().unwrap_or_default();
        return Err(invalid(
            "upstream",
            format!("{s:?} is a URL; it takes HOST[:PORT] (here {host:?}), TLS unless --upstream-tls false"),
        ));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        if host.is_empty() {
            return Err(bad());
        }
        let port = match after {
            "" => DEFAULT_UPSTREAM_PORT,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .ok_or_else(bad)?,
        };
        return Ok((host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some(("", _)) => Err(bad()),
        Some((host, port)) if !host.contains(':') => {
            Ok((host.to_owned(), port.parse().map_err(|_| bad())?))
        }
        // A bare IPv6 literal.
        Some(_) => Ok((s.to_owned(), DEFAULT_UPSTREAM_PORT)),
        None => Ok((s.to_owned(), default_port(s))),
    }
}

/// Reads a secret from a file, trimming one trailing newline as editors and `echo` add it.
pub fn read_secret_file(path: &Path, option: &'static str) -> Result<Secret, ConfigError> {
    let fail = |e: std::io::Error| invalid(option, format!("reading {}: {e}", path.display()));
    let bytes =
        crate::secret::read_small_file(path, crate::secret::MAX_SECRET_FILE).map_err(fail)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        invalid(
            option,
            format!("reading {}: not UTF-8 text", path.display()),
        )
    })?;
    warn_if_readable_by_others(path);
    let trimmed = text.strip_suffix('\n').unwrap_or(text);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
    Ok(Secret::new(trimmed))
}

/// Secrets in files other users can read are a leak waiting to happen; say so.
pub fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(path = %path.display(), "secret file is readable by other users; chmod o-r it");
        }
    }
}

mod render;

pub use render::render;

#[cfg(test)]
mod tests;
