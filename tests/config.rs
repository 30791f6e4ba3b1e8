//! Configuration as a user meets it: the real binary, run with `--print-config` in a
//! controlled environment (everything cleared but `PATH` and the case's own
//! `REDIS_ENTRA_PROXY_*` variables). Precedence (flag > environment > file > default) is tested
//! one case per edge; then redaction, exit codes of bad configurations, `--help`, and the
//! README's option table. Nothing here opens a socket.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Output};

use clap::CommandFactory;
use redis_entra_proxy::cli::Cli;

const BIN: &str = env!("CARGO_BIN_EXE_redis-entra-proxy");
/// Every case needs an upstream to validate; it is never contacted.
const UPSTREAM: &str = "myredis.example.net";

/// Runs the binary with only `PATH` and `env` in its environment.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear().args(args);
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in env {
        assert!(
            k.starts_with("REDIS_ENTRA_PROXY_"),
            "only the proxy's own variables: {k}"
        );
        cmd.env(k, v);
    }
    cmd.output().expect("the proxy binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Parses `--print-config` output: `key = value` lines, and `# key = note` for settings
/// left unset (or secret); other comments skipped.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut all = vec!["--print-config"];
    all.extend_from_slice(args);
    let out = run(&all, env);
    assert!(
        out.status.success(),
        "--print-config {args:?} failed: {:?}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn config_file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    f.write_all(contents.as_bytes()).expect("write config file");
    f
}

/// The long flags that are options: every long flag but `help`, `version`, `print-config`.
/// `config` is included: it has an environment variable too, though no file key.
fn option_flags() -> Vec<clap::Arg> {
    Cli::command()
        .get_arguments()
        .filter(|a| {
            a.get_long()
                .is_some_and(|l| !["help", "version", "print-config"].contains(&l))
        })
        .cloned()
        .collect()
}

fn env_name(long: &str) -> String {
    format!(
        "REDIS_ENTRA_PROXY_{}",
        long.to_uppercase().replace('-', "_")
    )
}

#[test]
fn precedence_one_case_per_edge() {
    const KEY: &str = "max-connections";
    const ENV: &str = "REDIS_ENTRA_PROXY_MAX_CONNECTIONS";
    let file = config_file("max-connections = 11\n");
    let file = file.path().to_str().expect("utf-8 temp path");
    struct Case {
        name: &'static str,
        file: bool,
        env: Option<&'static str>,
        flag: Option<&'static str>,
        want: &'static str,
    }
    let cases = [
        Case {
            name: "(a) default only",
            file: false,
            env: None,
            flag: None,
            want: "10000",
        },
        Case {
            name: "(b) file beats default",
            file: true,
            env: None,
            flag: None,
            want: "11",
        },
        Case {
            name: "(c) env beats file",
            file: true,
            env: Some("22"),
            flag: None,
            want: "22",
        },
        Case {
            name: "(d) flag beats env",
            file: false,
            env: Some("22"),
            flag: Some("33"),
            want: "33",
        },
        Case {
            name: "(e) flag beats file, no env",
            file: true,
            env: None,
            flag: Some("33"),
            want: "33",
        },
    ];
    for case in cases {
        let mut args = vec!["--upstream", UPSTREAM];
        if case.file {
            args.extend(["--config", file]);
        }
        if let Some(v) = case.flag {
            args.extend(["--max-connections", v]);
        }
        let env: Vec<(&str, &str)> = case.env.map(|v| (ENV, v)).into_iter().collect();
        let got = print_config(&args, &env);
        assert_eq!(
            got.get(KEY).map(String::as_str),
            Some(case.want),
            "{}: {got:?}",
            case.name
        );
    }
}

#[test]
fn config_file_named_by_env_var() {
    let file = config_file("upstream = \"from-file.example.net\"\nlog-format = \"json\"\n");
    let path = file.path().to_str().expect("utf-8 temp path");
    let got = print_config(&[], &[("REDIS_ENTRA_PROXY_CONFIG", path)]);
    assert_eq!(got["upstream"], "\"from-file.example.net\"");
    assert_eq!(got["log-format"], "\"json\"");
}

#[test]
fn print_config_shows_every_option() {
    let got = print_config(&["--upstream", UPSTREAM], &[]);
    for arg in option_flags() {
        let long = arg.get_long().expect("filtered on long");
        if long != "config" {
            assert!(
                got.contains_key(long),
                "--print-config lacks {long}: {got:?}"
            );
        }
    }
}

#[test]
fn print_config_redacts_secrets() {
    const PASSWORD: &str = "local-pw-3b1f9c";
    const TOKEN: &str = "token-value-8e2d7a";
    let file = config_file(&format!("local-password = \"{PASSWORD}\"\n"));
    let file_path = file.path().to_str().expect("utf-8 temp path");
    // (name, extra args, env)
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>);
    let cases: [Case; 3] = [
        (
            "password from env",
            vec![],
            vec![("REDIS_ENTRA_PROXY_LOCAL_PASSWORD", PASSWORD)],
        ),
        (
            "password from flag",
            vec!["--local-password", PASSWORD],
            vec![],
        ),
        ("password from file", vec!["--config", file_path], vec![]),
    ];
    for (name, extra, mut env) in cases {
        env.push(("REDIS_ENTRA_PROXY_TOKEN", TOKEN));
        // Not a JWT: the start (and so --print-config) needs the identity named.
        let mut args = vec![
            "--print-config",
            "--upstream",
            UPSTREAM,
            "--username",
            "oid-1",
        ];
        args.extend(extra);
        let out = run(&args, &env);
        assert!(
            out.status.success(),
            "{name}: {:?}\n{}",
            out.status,
            text(&out.stderr)
        );
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        for secret in [PASSWORD, TOKEN] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{name}: secret printed:\n{stdout}{stderr}"
            );
        }
        assert!(
            stdout.contains("# local-password = [redacted]"),
            "{name}: {stdout}"
        );
        assert!(
            stdout.contains("# REDIS_ENTRA_PROXY_TOKEN: set (redacted)"),
            "{name}: {stdout}"
        );
    }
    let stdout = text(&run(&["--print-config", "--upstream", UPSTREAM], &[]).stdout);
    assert!(
        stdout.contains("# REDIS_ENTRA_PROXY_TOKEN: unset"),
        "{stdout}"
    );
}

#[test]
fn invalid_configurations_exit_2_naming_the_option() {
    let unknown_key = config_file("upstream = \"x.example.net\"\nmax-conections = 5\n");
    let unknown_key = unknown_key.path().to_str().expect("utf-8 temp path");
    // (name, args, env, substring stderr must contain)
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 8] = [
        (
            "non-loopback listen without password",
            vec!["--upstream", UPSTREAM, "--listen", "0.0.0.0:6379"],
            vec![],
            "--listen",
        ),
        (
            "non-loopback listen from env without password",
            vec!["--upstream", UPSTREAM],
            vec![("REDIS_ENTRA_PROXY_LISTEN", "0.0.0.0:6379")],
            "--listen",
        ),
        ("missing upstream", vec![], vec![], "--upstream"),
        (
            "listen none without unix socket",
            vec!["--upstream", UPSTREAM, "--listen", "none"],
            vec![],
            "--listen",
        ),
        (
            "refresh ratio out of range",
            vec!["--upstream", UPSTREAM, "--refresh-ratio", "1.5"],
            vec![],
            "--refresh-ratio",
        ),
        (
            "unknown key in file",
            vec!["--config", unknown_key],
            vec![],
            "max-conections",
        ),
        (
            "missing config file",
            vec!["--config", "/nonexistent/proxy.toml"],
            vec![],
            "/nonexistent/proxy.toml",
        ),
        // clap's own usage errors share the exit code.
        (
            "bad duration flag",
            vec!["--upstream", UPSTREAM, "--connect-timeout", "10 parsecs"],
            vec![],
            "--connect-timeout",
        ),
    ];
    for (name, args, env, needle) in cases {
        for print in [false, true] {
            let mut args = args.clone();
            if print {
                args.push("--print-config");
            }
            let out = run(&args, &env);
            let stderr = text(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{name} (print-config {print}): {stderr}"
            );
            assert!(
                stderr.contains(needle),
                "{name}: stderr should name {needle:?}: {stderr}"
            );
            assert!(
                out.stdout.is_empty(),
                "{name}: nothing on stdout: {}",
                text(&out.stdout)
            );
        }
    }
}

/// `dev` makes its configuration as it starts: asked to print it instead, it refuses, before
/// or after the subcommand, rather than start.
#[test]
fn print_config_is_refused_with_dev() {
    for args in [vec!["--print-config", "dev"], vec!["dev", "--print-config"]] {
        let out = run(&args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains("--print-config"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn help_states_precedence_and_every_env_var() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(
        help.contains("Precedence: command-line flag > environment variable > config file > built-in default."),
        "{help}"
    );
    assert!(
        help.contains("REDIS_ENTRA_PROXY_TOKEN"),
        "the token variable is documented"
    );
    let flags = option_flags();
    assert!(
        flags.len() >= 20,
        "the option list was read: {}",
        flags.len()
    );
    for arg in flags {
        let long = arg.get_long().expect("filtered on long");
        let env = env_name(long);
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some(env.as_str()),
            "--{long} has env {env}"
        );
        assert!(help.contains(&format!("--{long}")), "--help lacks --{long}");
        // Secret values are hidden: `[env: NAME]` instead of `[env: NAME=value]`.
        let shown =
            help.contains(&format!("[env: {env}=")) || help.contains(&format!("[env: {env}]"));
        assert!(shown, "--help does not show [env: {env}] for --{long}");
    }
}

#[test]
fn help_never_shows_secret_env_values() {
    let out = run(
        &["--help"],
        &[("REDIS_ENTRA_PROXY_LOCAL_PASSWORD", "pw-in-help-5c0a")],
    );
    assert!(out.status.success());
    assert!(!text(&out.stdout).contains("pw-in-help-5c0a"));
}

#[test]
fn readme_table_lists_every_option() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    for arg in option_flags() {
        let long = arg.get_long().expect("filtered on long");
        let env = env_name(long);
        let key = if long == "config" {
            "—".to_owned()
        } else {
            format!("`{long}`")
        };
        let row = format!("| `--{long}` | `{env}` | {key} |");
        assert!(
            readme.contains(&row),
            "README.md lacks the table row starting {row}"
        );
    }
}

#[test]
fn a_secret_file_readable_by_other_users_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = dir.path().join("local-password");
    std::fs::write(&pw, "a-local-password\n").expect("write");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut child = Command::new(BIN)
        .env_clear()
        .env("REDIS_ENTRA_PROXY_TOKEN", "tok")
        .args([
            "--credential",
            "fixed",
            "--username",
            "oid",
            "--upstream",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "none",
            "--log-format",
            "json",
        ])
        .arg("--local-password-file")
        .arg(&pw)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the proxy binary runs");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    child.kill().expect("stop the proxy we started");
    let out = child.wait_with_output().expect("wait");
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        logs.contains("readable by other users") && logs.contains("local-password"),
        "{logs}"
    );
    assert!(
        !logs.contains("a-local-password"),
        "the secret itself is never logged"
    );
}

/// Boolean options take what environment variables usually say: `1`/`0`, `yes`/`no`,
/// `on`/`off`, `true`/`false`, in any case; anything else is refused with exit code 2.
#[test]
fn boolean_options_take_the_usual_spellings() {
    for (value, want) in [
        ("1", "true"),
        ("yes", "true"),
        ("On", "true"),
        ("TRUE", "true"),
        ("0", "false"),
        ("no", "false"),
        ("off", "false"),
        ("False", "false"),
    ] {
        let got = print_config(
            &["--upstream", UPSTREAM],
            &[("REDIS_ENTRA_PROXY_MULTIPLEX", value)],
        );
        assert_eq!(
            got["multiplex"], want,
            "REDIS_ENTRA_PROXY_MULTIPLEX={value}"
        );
        let got = print_config(&["--upstream", UPSTREAM, "--upstream-tls", value], &[]);
        assert_eq!(got["upstream-tls"], want, "--upstream-tls {value}");
    }
    let out = run(
        &["--print-config", "--upstream", UPSTREAM],
        &[("REDIS_ENTRA_PROXY_MULTIPLEX", "maybe")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--multiplex"),
        "{}",
        text(&out.stderr)
    );
}

/// A relative path in a config file is taken from the file's directory, so the file means the
/// same files wherever the proxy is started from; on the command line and in the environment,
/// from the working directory, as usual.
#[test]
fn relative_paths_in_a_config_file_are_taken_from_its_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("proxy.toml");
    std::fs::write(
        &file,
        "upstream = \"x.example.net\"\nupstream-ca-file = \"certs/ca.pem\"\n\
         credential-file = \"token.json\"\nunix-socket = \"/run/abs.sock\"\n",
    )
    .expect("write config file");
    let file = file.to_str().expect("utf-8 temp path");
    let got = print_config(&["--config", file], &[]);
    let within = |name: &str| format!("\"{}\"", dir.path().join(name).display());
    assert_eq!(got["upstream-ca-file"], within("certs/ca.pem"));
    assert_eq!(got["credential-file"], within("token.json"));
    assert_eq!(got["unix-socket"], "\"/run/abs.sock\"");
    let got = print_config(&["--config", file, "--credential-file", "here.json"], &[]);
    assert_eq!(got["credential-file"], "\"here.json\"");
}

/// A mistyped variable of the proxy's is named in a warning (not its value, which may be a
/// secret): it would otherwise leave its option at the default without a word.
#[test]
fn an_unknown_variable_of_the_proxys_is_warned_about() {
    let out = run(
        &["--print-config", "--upstream", UPSTREAM],
        &[
            ("REDIS_ENTRA_PROXY_LISTN", "127.0.0.1:7000"),
            ("REDIS_ENTRA_PROXY_MULTIPLEX", "true"),
            ("REDIS_ENTRA_PROXY_TOKEN", "t0ken-value"),
            ("REDIS_ENTRA_PROXY_USERNAME", "oid-1"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("REDIS_ENTRA_PROXY_LISTN"), "{stderr}");
    for quiet in ["MULTIPLEX", "TOKEN", "127.0.0.1:7000", "t0ken"] {
        assert!(!stderr.contains(quiet), "{quiet} in {stderr}");
    }
}

/// `--print-config` checks the token source as a start would, so that it can vet a
/// configuration before it is deployed: what would exit 2 at start-up exits 2 here too.
#[test]
fn print_config_checks_the_token_source() {
    for (args, names) in [
        (vec!["--credential", "fixed"], "--token-file"),
        (
            vec!["--credential", "exec", "--credential-command", "  "],
            "--credential-command",
        ),
    ] {
        let mut all = vec!["--print-config", "--upstream", UPSTREAM];
        all.extend(args.iter().copied());
        let out = run(&all, &[]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(names),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "{args:?}: nothing printed");
    }
}

/// `dev --help` leaves out the options `dev` sets itself (its own upstream and token issuer),
/// and keeps the proxy's own.
#[test]
fn dev_help_leaves_out_what_dev_sets() {
    let out = run(&["dev", "--help"], &[]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for set in [
        "--upstream ",
        "--credential ",
        "--token-file",
        "--client-id ",
    ] {
        assert!(!help.contains(set), "{set} in dev --help:\n{help}");
    }
    for kept in [
        "--listen",
        "--local-password",
        "--multiplex",
        "--rotate-every",
    ] {
        assert!(
            help.contains(kept),
            "{kept} missing from dev --help:\n{help}"
        );
    }
}

/// config/redis-entra-proxy.service is a unit systemd reads without a complaint (an unknown
/// key or a misspelt value is only a warning to systemd, which then ignores the line), and
/// the variables its comments suggest are the proxy's own.
#[test]
fn the_systemd_unit_is_one_systemd_reads_without_a_warning() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/redis-entra-proxy.service"
    ))
    .unwrap();
    let help = text(&run(&["--help"], &[]).stdout);
    for var in unit
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("REDIS_ENTRA_PROXY_"))
    {
        assert!(help.contains(&format!("[env: {var}=")), "{var} in the unit");
    }
    // systemd checks that the program exists: this build's stands in for the installed one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redis-entra-proxy.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/redis-entra-proxy", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze runs (scripts/test installs systemd when it is missing)");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}
