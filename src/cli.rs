//! The command line. Every option is also an environment variable `REDIS_ENTRA_PROXY_<NAME>`
//! and a key of the TOML file given by `--config`; [`Options`] is used for all three so the
//! names cannot drift apart. Values stay optional here: defaults are applied after merging
//! (see `config.rs`), which is what makes file values lose to flags and environment but win
//! over defaults.
//!
//! The options' doc comments are their `--help` text, written for a terminal: `HOST[:PORT]`
//! and bare URLs there are meant literally, not as rustdoc links.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::bare_urls)]

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Deserializer};

use crate::secret::Secret;

const AFTER_HELP: &str = "\
Every option can also be set with an environment variable named REDIS_ENTRA_PROXY_ followed by \
the option name in capitals with '-' as '_' (e.g. REDIS_ENTRA_PROXY_UPSTREAM), and in the TOML \
file given by --config under the option name (e.g. upstream = \"host:10000\").
Precedence: command-line flag > environment variable > config file > built-in default.
The token of the `fixed` source is read from REDIS_ENTRA_PROXY_TOKEN or --token-file, never \
from the command line.";

#[derive(Debug, Parser)]
#[command(name = "redis-entra-proxy", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub options: Options,
    /// Check the configuration as a start would, print it (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
}

// Parsed once per process: the size of `Dev` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a built-in local setup: a TLS redis-server standing in for Azure Managed Redis,
    /// with rotating tokens, and the proxy in front of it. No Azure needed.
    #[command(mut_args(hide_in_dev))]
    Dev(DevArgs),
    /// Ask a running proxy's admin endpoint whether it is healthy (`/healthz`; with `--ready`,
    /// `/readyz`) and exit 0 if it is, 1 if not: a container HEALTHCHECK for an image without
    /// curl. The address is `--admin-listen`'s, from the flags before `healthcheck`, the
    /// environment or the config file; a wildcard address is asked on loopback.
    Healthcheck(HealthcheckArgs),
}

/// Options `dev` sets itself (its own upstream and token issuer): left out of `dev --help`,
/// and warned about when given (`dev::run`).
pub const SET_BY_DEV: &[&str] = &[
    "upstream",
    "upstream_tls",
    "upstream_ca_file",
    "upstream_server_name",
    "credential",
    "client_id",
    "object_id",
    "resource_id",
    "tenant_id",
    "client_secret_file",
    "client_certificate_file",
    "credential_file",
    "credential_command",
    "json_username_path",
    "json_token_path",
    "json_expiry_path",
    "scope",
    "authority_host",
    "token_file",
    "username",
];

fn hide_in_dev(arg: clap::Arg) -> clap::Arg {
    let hide = SET_BY_DEV.contains(&arg.get_id().as_str());
    arg.hide(hide)
}

#[derive(Debug, Args, Clone)]
pub struct HealthcheckArgs {
    /// Ask `/readyz` (a valid token, and an upstream that accepts it) instead of `/healthz`.
    #[arg(long)]
    pub ready: bool,
}

#[derive(Debug, Args, Clone)]
pub struct DevArgs {
    /// How often the local token issuer rotates tokens (each token expires soon after, and
    /// the stand-in server then drops connections still using it, as Azure does).
    #[arg(long, default_value = "20s", value_parser = parse_duration, env = "REDIS_ENTRA_PROXY_DEV_ROTATE_EVERY")]
    pub rotate_every: Duration,
    /// Stand in for Azure Managed Redis with the OSS clustering policy: a Redis Cluster of 3
    /// TLS primaries, whose node addresses the proxy rewrites to local listeners (connect
    /// with `redis-cli -c`).
    #[arg(long, env = "REDIS_ENTRA_PROXY_DEV_CLUSTER")]
    pub cluster: bool,
    /// The proxy's own options (listen address, local password, logging…); the upstream and
    /// credential options are set by the dev setup.
    #[command(flatten)]
    pub options: Options,
}

/// How the proxy obtains tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialKind {
    /// A fixed token if one is given; else a secret file or command if given; else the
    /// environment's service principal or workload identity; else managed identity where the
    /// environment shows one; else the Azure CLI if `az` is on PATH; else managed identity.
    Auto,
    /// Managed identity (system-assigned, or user-assigned by client, object or resource id).
    ManagedIdentity,
    /// AKS workload identity (AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID, AZURE_TENANT_ID).
    WorkloadIdentity,
    /// Service principal with a client secret or certificate.
    ServicePrincipal,
    /// The Azure CLI's signed-in account (developer machines).
    AzureCli,
    /// A JSON file written by an external job, re-read when it changes.
    File,
    /// A command that prints the JSON.
    Exec,
    /// One token from REDIS_ENTRA_PROXY_TOKEN or --token-file.
    Fixed,
}

impl CredentialKind {
    pub fn name(&self) -> &'static str {
        match self {
            CredentialKind::Auto => "auto",
            CredentialKind::ManagedIdentity => "managed-identity",
            CredentialKind::WorkloadIdentity => "workload-identity",
            CredentialKind::ServicePrincipal => "service-principal",
            CredentialKind::AzureCli => "azure-cli",
            CredentialKind::File => "file",
            CredentialKind::Exec => "exec",
            CredentialKind::Fixed => "fixed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Options shared by flags, environment and config file. Keep in sync with
/// `config/example.toml` (a test parses it) and the README table.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Options {
    /// TOML configuration file.
    #[arg(long, env = "REDIS_ENTRA_PROXY_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address to listen on for clients, or `none` [default: 127.0.0.1:6379].
    #[arg(long, env = "REDIS_ENTRA_PROXY_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,

    /// Also listen on this unix socket.
    #[arg(long, env = "REDIS_ENTRA_PROXY_UNIX_SOCKET", value_name = "PATH")]
    pub unix_socket: Option<PathBuf>,

    /// Permissions of the unix socket, in octal (e.g. 660, or 666 for every local user)
    /// [default: from the umask].
    #[arg(long, env = "REDIS_ENTRA_PROXY_UNIX_SOCKET_MODE", value_name = "OCTAL")]
    pub unix_socket_mode: Option<String>,

    /// Azure Managed Redis (or Azure Cache for Redis) endpoint, HOST[:PORT] (port defaults
    /// to 10000, or to 6380 for an Azure Cache for Redis host name, *.redis.cache.windows.net).
    #[arg(long, env = "REDIS_ENTRA_PROXY_UPSTREAM", value_name = "HOST[:PORT]")]
    pub upstream: Option<String>,

    /// Use TLS to the upstream; false only for local development [default: true].
    #[arg(long, env = "REDIS_ENTRA_PROXY_UPSTREAM_TLS", value_name = "BOOL", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub upstream_tls: Option<bool>,

    /// PEM file of extra CA certificates to trust for the upstream (public roots are built in).
    #[arg(long, env = "REDIS_ENTRA_PROXY_UPSTREAM_CA_FILE", value_name = "PEM")]
    pub upstream_ca_file: Option<PathBuf>,

    /// TLS server name (SNI and certificate check) [default: HOST of --upstream].
    #[arg(
        long,
        env = "REDIS_ENTRA_PROXY_UPSTREAM_SERVER_NAME",
        value_name = "NAME"
    )]
    pub upstream_server_name: Option<String>,

    /// Where tokens come from [default: auto].
    #[arg(long, env = "REDIS_ENTRA_PROXY_CREDENTIAL", value_name = "SOURCE")]
    pub credential: Option<CredentialKind>,

    /// Application (client) id: of the service principal, the workload identity, or a
    /// user-assigned managed identity.
    #[arg(long, env = "REDIS_ENTRA_PROXY_CLIENT_ID", value_name = "ID")]
    pub client_id: Option<String>,

    /// Object (principal) id of a user-assigned managed identity.
    #[arg(long, env = "REDIS_ENTRA_PROXY_OBJECT_ID", value_name = "ID")]
    pub object_id: Option<String>,

    /// Azure resource id of a user-assigned managed identity.
    #[arg(long, env = "REDIS_ENTRA_PROXY_RESOURCE_ID", value_name = "ID")]
    pub resource_id: Option<String>,

    /// Entra tenant id (service principal, workload identity).
    #[arg(long, env = "REDIS_ENTRA_PROXY_TENANT_ID", value_name = "ID")]
    pub tenant_id: Option<String>,

    /// File holding the service principal's client secret (or set
    /// REDIS_ENTRA_PROXY_CLIENT_SECRET / AZURE_CLIENT_SECRET).
    #[arg(
        long,
        env = "REDIS_ENTRA_PROXY_CLIENT_SECRET_FILE",
        value_name = "PATH"
    )]
    pub client_secret_file: Option<PathBuf>,

    /// PEM file with the service principal's certificate and private key.
    #[arg(
        long,
        env = "REDIS_ENTRA_PROXY_CLIENT_CERTIFICATE_FILE",
        value_name = "PATH"
    )]
    pub client_certificate_file: Option<PathBuf>,

    /// JSON file with `username`, `access_token`, `expires_on` (the `file` source).
    #[arg(long, env = "REDIS_ENTRA_PROXY_CREDENTIAL_FILE", value_name = "PATH")]
    pub credential_file: Option<PathBuf>,

    /// Command printing that JSON (the `exec` source), run through /bin/sh -c.
    #[arg(long, env = "REDIS_ENTRA_PROXY_CREDENTIAL_COMMAND", value_name = "CMD")]
    pub credential_command: Option<String>,

    /// JSON path of the username in the file/command output [default: $.username].
    #[arg(
        long,
        env = "REDIS_ENTRA_PROXY_JSON_USERNAME_PATH",
        value_name = "PATH"
    )]
    pub json_username_path: Option<String>,

    /// JSON path of the token [default: $.access_token].
    #[arg(long, env = "REDIS_ENTRA_PROXY_JSON_TOKEN_PATH", value_name = "PATH")]
    pub json_token_path: Option<String>,

    /// JSON path of the expiry (unix seconds or RFC 3339) [default: $.expires_on].
    #[arg(long, env = "REDIS_ENTRA_PROXY_JSON_EXPIRY_PATH", value_name = "PATH")]
    pub json_expiry_path: Option<String>,

    /// Token scope [default: https://redis.azure.com/.default].
    #[arg(long, env = "REDIS_ENTRA_PROXY_SCOPE", value_name = "SCOPE")]
    pub scope: Option<String>,

    /// Entra authority host for sovereign clouds (e.g. https://login.microsoftonline.us/).
    #[arg(long, env = "REDIS_ENTRA_PROXY_AUTHORITY_HOST", value_name = "URL")]
    pub authority_host: Option<String>,

    /// File holding the token of the `fixed` source (re-read at start-up only).
    #[arg(long, env = "REDIS_ENTRA_PROXY_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Username for upstream AUTH [default: the `oid` claim of the token].
    #[arg(long, env = "REDIS_ENTRA_PROXY_USERNAME", value_name = "NAME")]
    pub username: Option<String>,

    /// Password clients must AUTH with, like Redis `requirepass`. Prefer the environment
    /// variable or --local-password-file: command lines are visible to other users.
    #[arg(
        long,
        env = "REDIS_ENTRA_PROXY_LOCAL_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub local_password: Option<Secret>,

    /// File holding the local password.
    #[arg(
        long,
        env = "REDIS_ENTRA_PROXY_LOCAL_PASSWORD_FILE",
        value_name = "PATH"
    )]
    pub local_password_file: Option<PathBuf>,

    /// Allow listening on a non-loopback address without a local password.
    #[arg(long, env = "REDIS_ENTRA_PROXY_ALLOW_UNAUTHENTICATED_REMOTE", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_unauthenticated_remote: Option<bool>,

    /// Upstream connect timeout: TCP and TLS together, and again for the first AUTH
    /// [default: 10s].
    #[arg(long, env = "REDIS_ENTRA_PROXY_CONNECT_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub connect_timeout: Option<Duration>,

    /// On SIGTERM/SIGINT, how long in-flight commands may take to finish; a second signal ends
    /// the wait at once [default: 20s].
    #[arg(long, env = "REDIS_ENTRA_PROXY_DRAIN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub drain_timeout: Option<Duration>,

    /// Close a client connection that sent nothing for this long while nothing was owed to it
    /// (Redis's `timeout`; subscribers, MONITOR and blocked commands are exempt); 0 never
    /// closes idle clients [default: 0].
    #[arg(long, env = "REDIS_ENTRA_PROXY_CLIENT_IDLE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub client_idle_timeout: Option<Duration>,

    /// Close a client connection that keeps a request incomplete for this long (a slow or
    /// stalled sender holding a partial frame open); 0 never does [default: 60s].
    #[arg(long, env = "REDIS_ENTRA_PROXY_PARTIAL_REQUEST_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub partial_request_timeout: Option<Duration>,

    /// Upstream connections kept open and authenticated ahead of clients, each handed to one
    /// new client at once and replaced in the background; for applications that open a
    /// connection per request. Each counts against the cache's connection limit [default: 0].
    #[arg(long, env = "REDIS_ENTRA_PROXY_WARM_CONNECTIONS", value_name = "N")]
    pub warm_connections: Option<usize>,

    /// Send the plain commands of many clients (GET, SET, HGET, … : one reply, no connection
    /// state, never blocking) over one shared upstream connection per thread and protocol
    /// (RESP2, RESP3), in batches. A client gets a connection of its own at its first other
    /// command (SELECT, MULTI, CLIENT LIST, a blocking command…) and keeps it. Fewer
    /// connections to the cache and less work for it; a slow command delays the others
    /// sharing its connection [default: false].
    #[arg(long, env = "REDIS_ENTRA_PROXY_MULTIPLEX", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub multiplex: Option<bool>,

    /// With --multiplex: while this many batches of shared requests await their replies on a
    /// shared connection, new shared requests wait and go together, as one batch, once the
    /// oldest is answered (or at once when 16 KiB wait). Larger batches cost the cache and the
    /// proxy less per request, for up to one round trip to the cache of waiting under load;
    /// 0 never holds a request back [default: 0].
    #[arg(
        long,
        env = "REDIS_ENTRA_PROXY_MULTIPLEX_MAX_BATCHES",
        value_name = "N"
    )]
    pub multiplex_max_batches: Option<usize>,

    /// With --multiplex and more than one --worker-threads: while shared requests are small
    /// (under 1 KiB a request with its reply) and one thread keeps up, gather the shared
    /// clients on one thread, whose batches are then larger; spread them over all threads
    /// again when requests grow (over 4 KiB) or that thread saturates. Clients move only
    /// when nothing is owed to them [default: true].
    #[arg(long, env = "REDIS_ENTRA_PROXY_MULTIPLEX_CONSOLIDATE", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub multiplex_consolidate: Option<bool>,

    /// OSS cluster support: `auto` turns it on when the upstream reports cluster support
    /// enabled; then each cluster node gets a local listener and node addresses in CLUSTER
    /// SLOTS/SHARDS/NODES replies and MOVED/ASK errors are rewritten to them [default: auto].
    #[arg(long, env = "REDIS_ENTRA_PROXY_CLUSTER_MODE", value_name = "MODE")]
    pub cluster_mode: Option<crate::cluster::ClusterMode>,

    /// Local ports for cluster node listeners, FIRST-LAST on the --listen address, or 0 for
    /// ports the system chooses [default: the 100 ports after the --listen port].
    #[arg(long, env = "REDIS_ENTRA_PROXY_CLUSTER_PORTS", value_name = "RANGE")]
    pub cluster_ports: Option<String>,

    /// The host (IP address or DNS name) rewritten replies send cluster clients to
    /// [default: the --listen IP]. Needed when --listen is a wildcard address such as 0.0.0.0:
    /// the address other hosts reach this proxy at.
    #[arg(
        long,
        env = "REDIS_ENTRA_PROXY_CLUSTER_ANNOUNCE_HOST",
        value_name = "HOST"
    )]
    pub cluster_announce_host: Option<String>,

    /// How often the cluster topology is read again (also soon after a redirection names a
    /// node not seen before) [default: 30s].
    #[arg(long, env = "REDIS_ENTRA_PROXY_CLUSTER_REFRESH_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub cluster_refresh_interval: Option<Duration>,

    /// Threads serving client connections, each with its own event loop; a connection stays
    /// on one thread for its whole life, except that a multiplexed client may move while it
    /// shares (--multiplex-consolidate) [default: the number of CPUs the process may use].
    /// On a machine shared with busy neighbours (the application, Redis itself), fewer
    /// threads than CPUs cost less CPU per request.
    #[arg(long, env = "REDIS_ENTRA_PROXY_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,

    /// Most client connections served at once [default: 10000].
    #[arg(long, env = "REDIS_ENTRA_PROXY_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Fraction of a token's lifetime after which a new one is fetched [default: 0.75].
    #[arg(long, env = "REDIS_ENTRA_PROXY_REFRESH_RATIO", value_name = "RATIO")]
    pub refresh_ratio: Option<f64>,

    /// Window over which live connections re-authenticate after a token rotation, each at a
    /// random moment [default: 30s].
    #[arg(long, env = "REDIS_ENTRA_PROXY_REAUTH_WINDOW", value_name = "DURATION", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub reauth_window: Option<Duration>,

    /// Admin HTTP endpoint (/metrics, /healthz, /readyz, /startupz), or `none`
    /// [default: 127.0.0.1:9090].
    #[arg(long, env = "REDIS_ENTRA_PROXY_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,

    /// Log level (off, error, warn, info, debug, trace; Redis's warning, notice and verbose
    /// stand for warn, info and debug), or a filter in RUST_LOG syntax with MODULE=LEVEL
    /// directives (info,redis_entra_proxy::mux=debug) [default: info].
    #[arg(long, env = "REDIS_ENTRA_PROXY_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log format [default: text].
    #[arg(long, env = "REDIS_ENTRA_PROXY_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

macro_rules! merge_fields {
    ($hi:ident, $lo:ident; $($f:ident),* $(,)?) => {
        Options { config: $hi.config.or($lo.config), $($f: $hi.$f.or($lo.$f)),* }
    };
}

impl Options {
    /// Field by field: `self` where set, else `lower`.
    pub fn or(self, lower: Options) -> Options {
        let hi = self;
        let lo = lower;
        merge_fields!(hi, lo; listen, unix_socket, unix_socket_mode, upstream, upstream_tls, upstream_ca_file,
            upstream_server_name, credential, client_id, object_id, resource_id, tenant_id,
            client_secret_file, client_certificate_file, credential_file, credential_command,
            json_username_path, json_token_path, json_expiry_path, scope, authority_host, token_file, username, local_password,
            local_password_file, allow_unauthenticated_remote, connect_timeout, drain_timeout,
            client_idle_timeout, partial_request_timeout, warm_connections, multiplex, multiplex_max_batches, multiplex_consolidate, cluster_mode, cluster_ports,
            cluster_announce_host, cluster_refresh_interval, worker_threads, max_connections, refresh_ratio, reauth_window, admin_listen, log_level, log_format)
    }
}

/// Parses `500ms`, `10s`, `5m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 10s, 5m"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?}: use ms, s, m or h"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(f64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Secs(n)) => parse_duration(&n.to_string())
            .map(Some)
            .map_err(serde::de::Error::custom),
        Some(Raw::Text(s)) => parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret::new(s))
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
