//! Unit tests of configuration loading: the documented example file, `HOST[:PORT]` splitting,
//! validation rules, and config-file errors. Precedence across flag, environment and file is
//! tested end to end on the real binary in `tests/config.rs`.

use std::collections::BTreeSet;
use std::io::Write;

use clap::CommandFactory;

use super::*;
use crate::cli::Cli;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");

/// The long flags that are options (also env vars and file keys): every long flag except the
/// ones that only make sense on the command line.
fn option_flags() -> Vec<clap::Arg> {
    Cli::command()
        .get_arguments()
        .filter(|a| {
            a.get_long()
                .is_some_and(|l| !["help", "version", "config", "print-config"].contains(&l))
        })
        .cloned()
        .collect()
}

fn example_text() -> String {
    std::fs::read_to_string(EXAMPLE).expect("config/example.toml exists")
}

/// The key of a `key = value` or `# key = value` line, if it names an option.
fn setting_key<'a>(line: &'a str, keys: &BTreeSet<String>) -> Option<&'a str> {
    let line = line.trim_start();
    let line = line.strip_prefix('#').unwrap_or(line).trim_start();
    let (key, _) = line.split_once(" = ")?;
    keys.contains(key).then_some(key)
}

fn option_keys() -> BTreeSet<String> {
    option_flags()
        .iter()
        .map(|a| a.get_long().expect("filtered on long").to_owned())
        .collect()
}

#[test]
fn example_file_parses_and_validates() {
    let options = read_file(Path::new(EXAMPLE)).expect("config/example.toml parses");
    // `upstream` has no default; everything else in the example is a default.
    let options = Options {
        upstream: Some("myredis.example.net".into()),
        ..options
    };
    validate(options, None).expect("config/example.toml yields a valid configuration");
}

#[test]
fn example_file_has_every_option_once_with_flag_and_env() {
    let text = example_text();
    let keys = option_keys();
    let mut seen = Vec::new();
    for line in text.lines() {
        if let Some(key) = setting_key(line, &keys) {
            seen.push(key.to_owned());
        }
    }
    let seen_set: BTreeSet<String> = seen.iter().cloned().collect();
    let missing: Vec<_> = keys.difference(&seen_set).collect();
    assert!(
        missing.is_empty(),
        "keys missing from config/example.toml: {missing:?}"
    );
    assert_eq!(
        seen.len(),
        seen_set.len(),
        "a key appears twice as a setting: {seen:?}"
    );
    for arg in option_flags() {
        let long = arg.get_long().expect("filtered on long");
        let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
        assert!(
            text.contains(&format!("flag: --{long} ")),
            "example.toml lacks `flag: --{long}`"
        );
        assert!(
            text.contains(&format!("env: {env}")),
            "example.toml lacks `env: {env}` for --{long}"
        );
    }
}

#[test]
fn example_file_values_all_parse_when_uncommented() {
    // Every example value must be of the right type and spelled right, not only the ones
    // left active: uncomment every setting line and parse the result.
    let keys = option_keys();
    let uncommented: String = example_text()
        .lines()
        .map(|line| match setting_key(line, &keys) {
            Some(_) => line.trim_start().trim_start_matches('#').trim_start(),
            None => line,
        })
        .fold(String::new(), |acc, l| acc + l + "\n");
    let table: toml::Table = toml::from_str(&uncommented).expect("uncommented example is TOML");
    let set: BTreeSet<String> = table.keys().cloned().collect();
    assert_eq!(
        set, keys,
        "every option is set once in the uncommented example"
    );
    let options: Options =
        toml::from_str(&uncommented).expect("uncommented example parses as Options");
    assert!(options.local_password.is_some() && options.reauth_window.is_some());
}

#[test]
fn split_host_port_cases() {
    // (name, input, expected host and port, or None for an error)
    type Case = (&'static str, &'static str, Option<(&'static str, u16)>);
    let cases: &[Case] = &[
        (
            "host only",
            "myredis.example.net",
            Some(("myredis.example.net", 10000)),
        ),
        (
            "host and port",
            "myredis.example.net:6380",
            Some(("myredis.example.net", 6380)),
        ),
        ("ipv4 and port", "127.0.0.1:6380", Some(("127.0.0.1", 6380))),
        ("bracketed ipv6", "[::1]", Some(("::1", 10000))),
        ("bracketed ipv6 and port", "[::1]:6380", Some(("::1", 6380))),
        ("bare ipv6", "::1", Some(("::1", 10000))),
        (
            "bare ipv6, longer",
            "2001:db8::1",
            Some(("2001:db8::1", 10000)),
        ),
        ("empty", "", None),
        ("port not a number", "host:port", None),
        ("port out of range", "host:65536", None),
        ("empty port", "host:", None),
        ("empty host", ":6380", None),
        ("empty bracketed host", "[]:6380", None),
        ("unclosed bracket", "[::1", None),
        ("junk after bracket", "[::1]6380", None),
        ("empty port after bracket", "[::1]:", None),
        ("a URL", "rediss://myredis.example.net:10000", None),
        ("a URL with a path", "redis://myredis.example.net/0", None),
    ];
    for (name, input, want) in cases {
        let got = split_host_port(input);
        match (want, got) {
            (Some((host, port)), Ok((h, p))) => {
                assert_eq!((h.as_str(), p), (*host, *port), "{name}: {input:?}")
            }
            (None, Err(e)) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with("--upstream:"),
                    "{name}: error names the option: {msg}"
                );
            }
            (want, got) => panic!("{name}: {input:?}: want {want:?}, got {got:?}"),
        }
    }
    let e = split_host_port("rediss://myredis.example.net:10000/").unwrap_err();
    assert!(
        e.to_string().contains("\"myredis.example.net:10000\""),
        "says what to write: {e}"
    );
}

fn base() -> Options {
    Options {
        upstream: Some("myredis.example.net".into()),
        ..Options::default()
    }
}

#[test]
fn validate_cases() {
    // (name, change to a valid base, expected: Ok or a substring of the error)
    type Case = (&'static str, fn(&mut Options), Result<(), &'static str>);
    let cases: &[Case] = &[
        ("defaults", |_| {}, Ok(())),
        (
            "loopback v6 without password",
            |o| o.listen = Some("[::1]:6379".into()),
            Ok(()),
        ),
        (
            "non-loopback listen without password is refused",
            |o| o.listen = Some("0.0.0.0:6379".into()),
            Err("--listen: 0.0.0.0:6379 is reachable from other hosts"),
        ),
        (
            "non-loopback v6 listen without password is refused",
            |o| o.listen = Some("[::]:6379".into()),
            Err("--listen"),
        ),
        (
            "non-loopback listen with password",
            |o| {
                o.listen = Some("0.0.0.0:6379".into());
                o.local_password = Some(Secret::new("pw"));
            },
            Ok(()),
        ),
        (
            "non-loopback listen with allow-unauthenticated-remote",
            |o| {
                o.listen = Some("0.0.0.0:6379".into());
                o.allow_unauthenticated_remote = Some(true);
            },
            Ok(()),
        ),
        (
            "allow-unauthenticated-remote=false still refuses",
            |o| {
                o.listen = Some("0.0.0.0:6379".into());
                o.allow_unauthenticated_remote = Some(false);
            },
            Err("--listen"),
        ),
        (
            "empty local password",
            |o| o.local_password = Some(Secret::new("")),
            Err("--local-password"),
        ),
        (
            "listen none without unix socket",
            |o| o.listen = Some("none".into()),
            Err("--listen: `none`"),
        ),
        (
            "listen none with unix socket",
            |o| {
                o.listen = Some("none".into());
                o.unix_socket = Some("/tmp/proxy.sock".into());
            },
            Ok(()),
        ),
        (
            "unix-socket-mode without unix socket",
            |o| o.unix_socket_mode = Some("660".into()),
            Err("--unix-socket-mode: needs --unix-socket"),
        ),
        (
            "unix-socket-mode 0666",
            |o| {
                o.unix_socket = Some("/tmp/proxy.sock".into());
                o.unix_socket_mode = Some("0666".into());
            },
            Ok(()),
        ),
        (
            "unix-socket-mode not octal",
            |o| {
                o.unix_socket = Some("/tmp/proxy.sock".into());
                o.unix_socket_mode = Some("rw-rw----".into());
            },
            Err("--unix-socket-mode"),
        ),
        (
            "unix-socket-mode beyond 777",
            |o| {
                o.unix_socket = Some("/tmp/proxy.sock".into());
                o.unix_socket_mode = Some("1777".into());
            },
            Err("--unix-socket-mode"),
        ),
        (
            "listen on a host name",
            |o| o.listen = Some("localhost:6379".into()),
            Err("--listen"),
        ),
        (
            "listen without port",
            |o| o.listen = Some("127.0.0.1".into()),
            Err("--listen"),
        ),
        (
            "missing upstream",
            |o| o.upstream = None,
            Err("--upstream is required"),
        ),
        (
            "bad upstream port",
            |o| o.upstream = Some("host:x".into()),
            Err("--upstream"),
        ),
        (
            "refresh-ratio 0",
            |o| o.refresh_ratio = Some(0.0),
            Err("--refresh-ratio"),
        ),
        (
            "refresh-ratio below range",
            |o| o.refresh_ratio = Some(0.049),
            Err("--refresh-ratio"),
        ),
        (
            "refresh-ratio lowest",
            |o| o.refresh_ratio = Some(0.05),
            Ok(()),
        ),
        (
            "refresh-ratio highest",
            |o| o.refresh_ratio = Some(0.95),
            Ok(()),
        ),
        (
            "refresh-ratio above range",
            |o| o.refresh_ratio = Some(0.96),
            Err("--refresh-ratio"),
        ),
        (
            "refresh-ratio 1",
            |o| o.refresh_ratio = Some(1.0),
            Err("--refresh-ratio"),
        ),
        (
            "refresh-ratio NaN",
            |o| o.refresh_ratio = Some(f64::NAN),
            Err("--refresh-ratio"),
        ),
        (
            "max-connections 0",
            |o| o.max_connections = Some(0),
            Err("--max-connections"),
        ),
        ("max-connections 1", |o| o.max_connections = Some(1), Ok(())),
        (
            "worker-threads 0",
            |o| o.worker_threads = Some(0),
            Err("--worker-threads"),
        ),
        ("worker-threads 1", |o| o.worker_threads = Some(1), Ok(())),
        (
            "cluster-ports backwards",
            |o| o.cluster_ports = Some("7000-6000".into()),
            Err("--cluster-ports"),
        ),
        (
            "cluster-mode on, unix socket only",
            |o| {
                o.listen = Some("none".into());
                o.unix_socket = Some("/tmp/x.sock".into());
                o.cluster_mode = Some(crate::cluster::ClusterMode::On);
            },
            Err("--cluster-mode"),
        ),
        (
            "cluster-mode on, wildcard listen",
            |o| {
                o.listen = Some("0.0.0.0:6379".into());
                o.allow_unauthenticated_remote = Some(true);
                o.cluster_mode = Some(crate::cluster::ClusterMode::On);
            },
            Err("--cluster-mode"),
        ),
        (
            "cluster-refresh-interval too short",
            |o| o.cluster_refresh_interval = Some(std::time::Duration::from_millis(100)),
            Err("--cluster-refresh-interval"),
        ),
        (
            "bad log filter",
            |o| o.log_level = Some("=foo=bar".into()),
            Err("--log-level"),
        ),
        (
            "log filter with targets",
            |o| o.log_level = Some("warn,redis_entra_proxy=debug".into()),
            Ok(()),
        ),
        (
            "server name that is no DNS name",
            |o| o.upstream_server_name = Some("not a name".into()),
            Err("--upstream-server-name"),
        ),
        (
            "server name unchecked without TLS",
            |o| {
                o.upstream_server_name = Some("not a name".into());
                o.upstream_tls = Some(false);
            },
            Ok(()),
        ),
    ];
    for (name, edit, want) in cases {
        let mut o = base();
        edit(&mut o);
        match (want, validate(o, None)) {
            (Ok(()), Ok(_)) => {}
            (Err(needle), Err(e)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(needle),
                    "{name}: {msg:?} should contain {needle:?}"
                );
            }
            (want, got) => panic!("{name}: want {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn azure_cache_for_redis_host_names_default_to_its_tls_port() {
    for (given, want) in [
        (
            "mycache.redis.cache.windows.net",
            "mycache.redis.cache.windows.net:6380",
        ),
        (
            "MyCache.Redis.Cache.Windows.Net.",
            "MyCache.Redis.Cache.Windows.Net.:6380",
        ),
        (
            "c.redis.cache.chinacloudapi.cn",
            "c.redis.cache.chinacloudapi.cn:6380",
        ),
        (
            "c.redis.cache.usgovcloudapi.net",
            "c.redis.cache.usgovcloudapi.net:6380",
        ),
        (
            "mycache.redis.cache.windows.net:16380",
            "mycache.redis.cache.windows.net:16380",
        ),
        (
            "mycache.westeurope.redis.azure.net",
            "mycache.westeurope.redis.azure.net:10000",
        ),
        (
            "redis.cache.windows.net.example.org",
            "redis.cache.windows.net.example.org:10000",
        ),
        ("10.0.0.4", "10.0.0.4:10000"),
        ("[fd00::4]", "[fd00::4]:10000"),
    ] {
        let mut o = base();
        o.upstream = Some(given.to_owned());
        let c = validate(o, None).expect("valid");
        assert_eq!(c.upstream.addr, want, "{given}");
    }
}

#[test]
fn defaults_are_the_named_constants() {
    let c = validate(base(), None).expect("valid");
    assert_eq!(
        c.listen,
        Some(DEFAULT_LISTEN.parse().expect("constant is an address"))
    );
    assert_eq!(
        c.upstream.addr,
        format!("myredis.example.net:{DEFAULT_UPSTREAM_PORT}")
    );
    assert_eq!(c.upstream.server_name, "myredis.example.net");
    assert!(c.upstream.tls);
    assert_eq!(c.credential, CredentialKind::Auto);
    assert!(c.local_password.is_none() && !c.allow_unauthenticated_remote);
    assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(
        c.refresh_ratio,
        crate::credentials::refresh::DEFAULT_REFRESH_RATIO
    );
    assert_eq!(c.reauth_window, DEFAULT_REAUTH_WINDOW);
    assert_eq!(
        c.client_idle_timeout, None,
        "idle clients are kept, as by Redis"
    );
    assert_eq!(
        c.partial_request_timeout,
        Some(DEFAULT_PARTIAL_REQUEST_TIMEOUT)
    );
    assert_eq!(c.log_level, DEFAULT_LOG_LEVEL);
    assert_eq!(c.log_format, LogFormat::Text);
}

#[test]
fn zero_turns_a_client_timeout_off() {
    let base = || Options {
        upstream: Some("r.example.net".into()),
        token_file: Some("/dev/null".into()),
        credential: Some(CredentialKind::Fixed),
        ..Options::default()
    };
    let c = validate(
        Options {
            client_idle_timeout: Some(Duration::from_secs(300)),
            partial_request_timeout: Some(Duration::ZERO),
            ..base()
        },
        None,
    )
    .expect("valid");
    assert_eq!(c.client_idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(c.partial_request_timeout, None);
    let c = validate(
        Options {
            client_idle_timeout: Some(Duration::ZERO),
            ..base()
        },
        None,
    )
    .expect("valid");
    assert_eq!(c.client_idle_timeout, None);
}

#[test]
fn ipv6_upstream_is_bracketed_in_the_address() {
    let o = Options {
        upstream: Some("[::1]:6380".into()),
        upstream_tls: Some(false),
        ..base()
    };
    assert_eq!(
        validate(o, None).expect("valid").upstream.addr,
        "[::1]:6380"
    );
}

#[test]
fn token_from_env_is_kept_unless_empty() {
    let c = validate(base(), Some("tok".into())).expect("valid");
    assert_eq!(c.token.as_ref().map(Secret::expose), Some("tok"));
    assert!(validate(base(), Some(String::new()))
        .expect("valid")
        .token
        .is_none());
}

fn file_with(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text.as_bytes()).expect("write temp file");
    f
}

#[test]
fn local_password_file() {
    let f = file_with("s3cret\n");
    let o = Options {
        local_password_file: Some(f.path().into()),
        ..base()
    };
    let c = validate(o, None).expect("valid");
    assert_eq!(
        c.local_password.as_ref().map(Secret::expose),
        Some("s3cret"),
        "one newline trimmed"
    );

    let o = Options {
        local_password: Some(Secret::new("from-flag")),
        local_password_file: Some(f.path().into()),
        ..base()
    };
    let c = validate(o, None).expect("valid");
    assert_eq!(
        c.local_password.as_ref().map(Secret::expose),
        Some("from-flag"),
        "the value wins"
    );

    let o = Options {
        local_password_file: Some("/nonexistent/pw".into()),
        ..base()
    };
    let e = validate(o, None).expect_err("missing file").to_string();
    assert!(e.starts_with("--local-password-file:"), "{e}");

    let empty = file_with("\n");
    let o = Options {
        local_password_file: Some(empty.path().into()),
        ..base()
    };
    let e = validate(o, None).expect_err("empty password").to_string();
    assert!(e.contains("must not be empty"), "{e}");
}

#[test]
fn file_values() {
    let f = file_with(
        "listen = \"none\"\nunix-socket = \"/tmp/p.sock\"\nupstream-tls = false\n\
         connect-timeout = 5\ndrain-timeout = \"1.5s\"\nreauth-window = \"2m\"\n\
         max-connections = 7\nrefresh-ratio = 0.5\ncredential = \"fixed\"\nlog-format = \"json\"\n",
    );
    let o = read_file(f.path()).expect("parses");
    assert_eq!(o.listen.as_deref(), Some("none"));
    assert_eq!(o.upstream_tls, Some(false));
    assert_eq!(
        o.connect_timeout,
        Some(Duration::from_secs(5)),
        "a number is seconds"
    );
    assert_eq!(o.drain_timeout, Some(Duration::from_millis(1500)));
    assert_eq!(o.reauth_window, Some(Duration::from_secs(120)));
    assert_eq!(o.max_connections, Some(7));
    assert_eq!(o.refresh_ratio, Some(0.5));
    assert_eq!(o.log_format, Some(LogFormat::Json));
    assert!(o.config.is_none());
}

#[test]
fn file_errors() {
    // (name, file text, substrings the error must contain)
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown key",
            "listen = \"127.0.0.1:6379\"\nlisten-adress = \"x\"\n",
            &["listen-adress"],
        ),
        (
            "config key is not a file key",
            "config = \"other.toml\"\n",
            &["config"],
        ),
        (
            "bad duration",
            "connect-timeout = \"10 parsecs\"\n",
            &["connect-timeout", "duration"],
        ),
        (
            "negative duration",
            "drain-timeout = -1\n",
            &["drain-timeout", "duration"],
        ),
        (
            "wrong type",
            "max-connections = \"many\"\n",
            &["max-connections"],
        ),
        (
            "unknown enum value",
            "log-format = \"xml\"\n",
            &["log-format", "xml"],
        ),
        ("not TOML", "listen = \n", &["listen"]),
        (
            "a password's line is named, not shown",
            "local-password = \"hunter2-unterminated\n",
            &["line 1", "local-password", "not shown"],
        ),
        (
            "a password's line, wrong type",
            "local-password = 123456789\n",
            &["local-password", "not shown"],
        ),
    ];
    for (name, text, needles) in cases {
        let f = file_with(text);
        let err = read_file(f.path()).expect_err(name);
        assert!(matches!(err, ConfigError::File { .. }), "{name}: {err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&f.path().display().to_string()),
            "{name}: names the file: {msg}"
        );
        for needle in *needles {
            assert!(
                msg.contains(needle),
                "{name}: {msg:?} should contain {needle:?}"
            );
        }
        for secret in ["hunter2", "123456789"] {
            assert!(!msg.contains(secret), "{name}: {msg:?} quotes the value");
        }
    }
}

#[test]
fn missing_file_is_a_read_error() {
    let err = read_file(Path::new("/nonexistent/redis-entra-proxy.toml")).expect_err("missing");
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(err
        .to_string()
        .contains("/nonexistent/redis-entra-proxy.toml"));
}

#[test]
fn render_redacts_and_round_trips_defaults() {
    let o = Options {
        local_password: Some(Secret::new("hunter2")),
        ..base()
    };
    let out = render(&o, true);
    assert!(!out.contains("hunter2"), "{out}");
    assert!(out.contains("# local-password = [redacted]"), "{out}");
    assert!(
        out.contains(&format!("# {TOKEN_ENV}: set (redacted)")),
        "{out}"
    );
    // Every option is rendered, set or as a comment.
    for key in option_keys() {
        assert!(
            out.lines().any(|l| l
                .strip_prefix("# ")
                .unwrap_or(l)
                .starts_with(&format!("{key} = "))),
            "{key} missing in:\n{out}"
        );
    }
    // The output is a config file for the same settings, but the secret.
    let f = file_with(&out);
    let again = read_file(f.path()).expect("--print-config output parses as a config file");
    assert_eq!(
        render(&again, true),
        out.replace(
            "# local-password = [redacted]",
            "# local-password = (unset)"
        )
    );
}

#[test]
fn cluster_defaults_follow_the_listen_address() {
    use crate::cluster::{ClusterMode, Ports};
    let c = validate(base(), None).unwrap();
    assert_eq!(c.cluster.mode, ClusterMode::Auto);
    assert_eq!(c.cluster.ports, Ports::Range(6380, 6479));
    assert!(!c.cluster.auto_disabled);
    let mut o = base();
    o.listen = Some("127.0.0.1:7000".into());
    assert_eq!(
        validate(o, None).unwrap().cluster.ports,
        Ports::Range(7001, 7100)
    );
    // A wildcard address cannot be announced: `auto` turns itself off, and says so.
    let mut o = base();
    o.listen = Some("0.0.0.0:6379".into());
    o.allow_unauthenticated_remote = Some(true);
    let c = validate(o, None).unwrap();
    assert_eq!(c.cluster.mode, ClusterMode::Off);
    assert!(c.cluster.auto_disabled);
    // … unless an address to announce is given.
    let mut o = base();
    o.listen = Some("0.0.0.0:6379".into());
    o.allow_unauthenticated_remote = Some(true);
    o.cluster_announce_host = Some("10.1.2.3".into());
    let c = validate(o, None).unwrap();
    assert_eq!(c.cluster.mode, ClusterMode::Auto);
    assert_eq!(c.cluster.announce.as_deref(), Some("10.1.2.3"));
    let mut o = base();
    o.cluster_announce_host = Some("bad host".into());
    assert!(validate(o, None)
        .unwrap_err()
        .to_string()
        .contains("--cluster-announce-host"));
    let mut o = base();
    o.cluster_mode = Some(ClusterMode::Off);
    o.cluster_ports = Some("0".into());
    let c = validate(o, None).unwrap();
    assert_eq!(
        (c.cluster.mode, c.cluster.ports),
        (ClusterMode::Off, Ports::Any)
    );
}

/// A bare word in `--log-level` must be a level: `tracing` would read `warning` as a module
/// name and log nothing at all, errors included. Redis's level names stand for the nearest.
#[test]
fn log_filter_takes_levels_and_redis_names_and_refuses_other_words() {
    for (given, want) in [
        ("info", "info"),
        ("INFO", "info"),
        ("warning", "warn"),
        ("notice", "info"),
        ("verbose", "debug"),
        (
            "warn, redis_entra_proxy::session=DEBUG",
            "warn,redis_entra_proxy::session=debug",
        ),
        // Without a level of its own, the rest keeps its warnings and errors.
        ("redis_entra_proxy=warning", "warn,redis_entra_proxy=warn"),
        ("redis-entra-proxy=debug", "warn,redis_entra_proxy=debug"),
        ("info,[conn]=debug", "info,[conn]=debug"),
        ("[conn]=debug", "warn,[conn]=debug"),
    ] {
        assert_eq!(log_filter(given).as_deref(), Ok(want), "{given:?}");
    }
    for bad in [
        "warnings",
        "bogus",
        "info,,",
        "",
        "x=loud",
        "info,redis_entra_proxy",
    ] {
        assert!(log_filter(bad).is_err(), "{bad:?} accepted");
    }
}
