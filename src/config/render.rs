//! `--print-config`: the effective configuration as TOML, in the shape of
//! `config/example.toml`, with every default filled in and secrets redacted: a valid config
//! file, whose unset settings and secrets are comments.

use std::path::PathBuf;
use std::time::Duration;

use super::{
    DEFAULT_ADMIN_LISTEN, DEFAULT_CLUSTER_REFRESH_INTERVAL, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_LISTEN, DEFAULT_LOG_LEVEL, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PARTIAL_REQUEST_TIMEOUT, DEFAULT_REAUTH_WINDOW, TOKEN_ENV,
};
use crate::cli::{CredentialKind, LogFormat, Options};
use crate::cluster::ClusterMode;

/// The effective configuration as TOML, secrets redacted (`--print-config`).
pub fn render(o: &Options, token_set: bool) -> String {
    fn q(s: &str) -> String {
        serde_json::to_string(s).unwrap_or_default()
    }
    fn p(p: &Option<PathBuf>) -> String {
        p.as_ref()
            .map_or_else(|| "# (unset)".to_owned(), |p| q(&p.display().to_string()))
    }
    fn d(d: Option<Duration>, def: Duration) -> String {
        q(&format!("{}ms", d.unwrap_or(def).as_millis()))
    }
    let listen = o
        .listen
        .clone()
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let mut out = String::new();
    // A value that is a comment (unset, or a secret) makes the whole line one: the output
    // is valid TOML, a config file for the same settings but the secrets.
    let mut line = |k: &str, v: String| match v.strip_prefix("# ") {
        Some(note) => out.push_str(&format!("# {k} = {note}\n")),
        None => out.push_str(&format!("{k} = {v}\n")),
    };
    line("listen", q(&listen));
    line("unix-socket", p(&o.unix_socket));
    line(
        "unix-socket-mode",
        o.unix_socket_mode
            .as_deref()
            .map_or("# (from the umask)".into(), q),
    );
    line(
        "upstream",
        o.upstream.as_deref().map_or("# (unset)".into(), q),
    );
    line("upstream-tls", o.upstream_tls.unwrap_or(true).to_string());
    line("upstream-ca-file", p(&o.upstream_ca_file));
    line(
        "upstream-server-name",
        o.upstream_server_name
            .as_deref()
            .map_or("# (host of upstream)".into(), q),
    );
    let cred = o.credential.unwrap_or(CredentialKind::Auto);
    line("credential", q(cred.name()));
    let opt = |v: &Option<String>, unset: &str| v.as_deref().map_or(format!("# ({unset})"), q);
    line("client-id", opt(&o.client_id, "unset"));
    line("object-id", opt(&o.object_id, "unset"));
    line("resource-id", opt(&o.resource_id, "unset"));
    line("tenant-id", opt(&o.tenant_id, "unset"));
    line("client-secret-file", p(&o.client_secret_file));
    line("client-certificate-file", p(&o.client_certificate_file));
    line("credential-file", p(&o.credential_file));
    line("credential-command", opt(&o.credential_command, "unset"));
    line(
        "json-username-path",
        opt(&o.json_username_path, "$.username"),
    );
    line("json-token-path", opt(&o.json_token_path, "$.access_token"));
    line("json-expiry-path", opt(&o.json_expiry_path, "$.expires_on"));
    line(
        "scope",
        q(o.scope
            .as_deref()
            .unwrap_or(crate::credentials::DEFAULT_SCOPE)),
    );
    line(
        "authority-host",
        opt(&o.authority_host, "Azure public cloud"),
    );
    line("token-file", p(&o.token_file));
    line(
        "username",
        o.username
            .as_deref()
            .map_or("# (oid claim of the token)".into(), q),
    );
    let pw = if o.local_password.is_some() {
        "# [redacted]".into()
    } else {
        "# (unset)".into()
    };
    line("local-password", pw);
    line("local-password-file", p(&o.local_password_file));
    line(
        "allow-unauthenticated-remote",
        o.allow_unauthenticated_remote.unwrap_or(false).to_string(),
    );
    line(
        "connect-timeout",
        d(o.connect_timeout, DEFAULT_CONNECT_TIMEOUT),
    );
    line("drain-timeout", d(o.drain_timeout, DEFAULT_DRAIN_TIMEOUT));
    line(
        "client-idle-timeout",
        d(o.client_idle_timeout, Duration::ZERO),
    );
    line(
        "partial-request-timeout",
        d(o.partial_request_timeout, DEFAULT_PARTIAL_REQUEST_TIMEOUT),
    );
    line(
        "warm-connections",
        o.warm_connections.unwrap_or(0).to_string(),
    );
    line("multiplex", o.multiplex.unwrap_or(false).to_string());
    line(
        "multiplex-max-batches",
        o.multiplex_max_batches.unwrap_or(0).to_string(),
    );
    line(
        "multiplex-consolidate",
        o.multiplex_consolidate.unwrap_or(true).to_string(),
    );
    line(
        "cluster-mode",
        q(o.cluster_mode.unwrap_or(ClusterMode::Auto).name()),
    );
    line(
        "cluster-ports",
        o.cluster_ports
            .as_deref()
            .map_or("# (the 100 ports after the listen port)".into(), q),
    );
    line(
        "cluster-announce-host",
        o.cluster_announce_host
            .as_deref()
            .map_or("# (the listen IP)".into(), q),
    );
    line(
        "cluster-refresh-interval",
        d(o.cluster_refresh_interval, DEFAULT_CLUSTER_REFRESH_INTERVAL),
    );
    line(
        "worker-threads",
        o.worker_threads
            .map_or("# (one per CPU)".into(), |n| n.to_string()),
    );
    line(
        "max-connections",
        o.max_connections
            .unwrap_or(DEFAULT_MAX_CONNECTIONS)
            .to_string(),
    );
    let ratio = o
        .refresh_ratio
        .unwrap_or(crate::credentials::refresh::DEFAULT_REFRESH_RATIO);
    line("refresh-ratio", ratio.to_string());
    line("reauth-window", d(o.reauth_window, DEFAULT_REAUTH_WINDOW));
    line(
        "admin-listen",
        q(o.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN)),
    );
    line(
        "log-level",
        q(o.log_level.as_deref().unwrap_or(DEFAULT_LOG_LEVEL)),
    );
    let fmt = o.log_format.unwrap_or(LogFormat::Text);
    line("log-format", q(&format!("{fmt:?}").to_lowercase()));
    let token = if token_set { "set (redacted)" } else { "unset" };
    out.push_str(&format!("# {TOKEN_ENV}: {token}\n"));
    out
}
