//! Tests of the token document parser and of the file source's change detection against real
//! files: in-place rewrites, atomic renames and Kubernetes' `..data` symlink swap.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

/// Every document in these tests carries this token; no error message may contain any of it.
const TOKEN: &str = "s3cr3t-T0KEN-xyzzy";
/// 3000-01-01T00:00:00Z.
const YEAR_3000: u64 = 32_503_680_000;
/// Bounds every wait for `changed()`: generous next to the test poll interval.
const WAIT: Duration = Duration::from_secs(5);
const FAST_POLL: Duration = Duration::from_millis(20);

fn at(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

fn assert_no_token(msg: &str, case: &str) {
    assert!(
        !msg.contains(TOKEN) && !msg.contains("s3cr3t") && !msg.contains("xyzzy"),
        "{case}: message leaks the token: {msg}"
    );
}

fn doc(token: &str) -> String {
    format!(r#"{{"username": "oid-1", "access_token": "{token}", "expires_on": {YEAR_3000}}}"#)
}

fn source(path: &Path) -> FileSource {
    FileSource::new(path.to_owned(), FieldPaths::default()).with_poll_interval(FAST_POLL)
}

async fn fetch_token(src: &FileSource) -> String {
    let token = src.fetch().await.expect("fetch");
    token.token.expose().to_owned()
}

/// Asserts that `changed()` resolves within [`WAIT`].
async fn assert_changes(src: &FileSource, case: &str) {
    tokio::time::timeout(WAIT, src.changed())
        .await
        .unwrap_or_else(|_| panic!("{case}: changed() did not resolve within {WAIT:?}"));
}

#[test]
fn valid_documents() {
    let y3k = at(YEAR_3000, 0);
    let cases = [
        ("unix number", format!(r#""expires_on": {YEAR_3000}"#), y3k),
        (
            "numeric string",
            format!(r#""expires_on": "{YEAR_3000}""#),
            y3k,
        ),
        (
            "rfc 3339 Z",
            r#""expires_on": "3000-01-01T00:00:00Z""#.to_owned(),
            y3k,
        ),
        (
            "rfc 3339 offset",
            r#""expires_on": "3000-01-01T02:00:00+02:00""#.to_owned(),
            y3k,
        ),
        (
            "fractional seconds",
            r#""expires_on": "3000-01-01T00:00:00.125Z""#.to_owned(),
            at(YEAR_3000, 125_000_000),
        ),
        (
            "fractional number",
            format!(r#""expires_on": {YEAR_3000}.5"#),
            at(YEAR_3000, 500_000_000),
        ),
    ];
    for (name, expiry, want) in cases {
        let json = format!(r#"{{"username": "oid-1", "access_token": "{TOKEN}", {expiry}}}"#);
        let t = parse_token_json(json.as_bytes(), &FieldPaths::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.token.expose(), TOKEN, "{name}");
        assert_eq!(t.expires_at, Some(want), "{name}");
        assert_eq!(t.username.as_deref(), Some("oid-1"), "{name}");
    }
}

#[test]
fn optional_username_and_byte_order_mark() {
    let cases = [
        (
            "missing",
            format!(r#"{{"access_token": "{TOKEN}", "expires_on": {YEAR_3000}}}"#),
        ),
        (
            "null",
            format!(
                r#"{{"username": null, "access_token": "{TOKEN}", "expires_on": {YEAR_3000}}}"#
            ),
        ),
        (
            "empty",
            format!(r#"{{"username": "", "access_token": "{TOKEN}", "expires_on": {YEAR_3000}}}"#),
        ),
        (
            "bom",
            format!(
                "\u{feff}{}",
                doc(TOKEN).replace(r#""username": "oid-1", "#, "")
            ),
        ),
    ];
    for (name, json) in cases {
        let t = parse_token_json(json.as_bytes(), &FieldPaths::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.token.expose(), TOKEN, "{name}");
        assert_eq!(t.username, None, "{name}");
    }
}

#[test]
fn custom_field_paths() {
    let json = format!(
        r#"{{"data": {{"token": "{TOKEN}", "who": {{"oid": "oid-2"}}}},
             "expires-on": "3000-01-01T00:00:00Z",
             "items": [{{"tok": "second-token"}}]}}"#
    );
    let fields = FieldPaths {
        username: "$.data.who.oid".to_owned(),
        access_token: "$.data.token".to_owned(),
        expires_on: "$['expires-on']".to_owned(),
    };
    let t = parse_token_json(json.as_bytes(), &fields).expect("data.token");
    assert_eq!(t.token.expose(), TOKEN);
    assert_eq!(t.username.as_deref(), Some("oid-2"));
    assert_eq!(t.expires_at, Some(at(YEAR_3000, 0)));

    let fields = FieldPaths {
        access_token: "$.items[0].tok".to_owned(),
        ..fields
    };
    let t = parse_token_json(json.as_bytes(), &fields).expect("items[0].tok");
    assert_eq!(t.token.expose(), "second-token");
}

#[test]
fn bad_field_paths_are_config_errors() {
    let fields = FieldPaths {
        access_token: "access_token".to_owned(),
        ..FieldPaths::default()
    };
    assert!(FieldPaths::default().validate().is_ok());
    let err = fields.validate().expect_err("no $");
    assert!(matches!(err, CredentialError::Config(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("`access_token` must start with `$`"),
        "{err}"
    );
    let err = parse_token_json(doc(TOKEN).as_bytes(), &fields).expect_err("parse");
    assert!(matches!(err, CredentialError::Config(_)), "{err:?}");
}

#[test]
fn invalid_documents_fail_without_showing_the_token() {
    let now = at(1_700_000_000, 0);
    let defaults = FieldPaths::default();
    let expires_at_token = FieldPaths {
        expires_on: "$.access_token".to_owned(),
        ..FieldPaths::default()
    };
    let username_at_token = FieldPaths {
        username: "$.u".to_owned(),
        ..FieldPaths::default()
    };
    let cases: Vec<(&str, String, &FieldPaths, &str)> = vec![
        ("empty", String::new(), &defaults, "is empty"),
        ("whitespace", " \n".to_owned(), &defaults, "is empty"),
        (
            "half-written",
            doc(TOKEN)[..50].to_owned(),
            &defaults,
            "not complete JSON",
        ),
        (
            "missing comma",
            format!(r#"{{"access_token": "{TOKEN}" "expires_on": 1}}"#),
            &defaults,
            "syntax error at line 1",
        ),
        (
            "unquoted token",
            format!(r#"{{"access_token": {TOKEN}, "expires_on": 1}}"#),
            &defaults,
            "syntax error",
        ),
        (
            "trailing garbage",
            format!("{} {TOKEN}", doc(TOKEN)),
            &defaults,
            "syntax error",
        ),
        (
            "invalid escape in token",
            format!(r#"{{"access_token": "{TOKEN}\q"}}"#),
            &defaults,
            "syntax error",
        ),
        (
            "missing access_token",
            format!(r#"{{"token": "{TOKEN}", "expires_on": {YEAR_3000}}}"#),
            &defaults,
            "`$.access_token` not found: `$` has no key \"access_token\"",
        ),
        (
            "token not a string",
            format!(r#"{{"access_token": ["{TOKEN}"], "expires_on": {YEAR_3000}}}"#),
            &defaults,
            "`$.access_token` is an array, not a string",
        ),
        (
            "empty token",
            format!(r#"{{"access_token": " ", "expires_on": {YEAR_3000}}}"#),
            &defaults,
            "`$.access_token` is empty",
        ),
        (
            "missing expiry",
            format!(r#"{{"access_token": "{TOKEN}"}}"#),
            &defaults,
            "`$.expires_on` not found",
        ),
        (
            "expired",
            format!(r#"{{"access_token": "{TOKEN}", "expires_on": 1699999000}}"#),
            &defaults,
            "`$.expires_on` is in the past: the token expired 1000 s ago",
        ),
        (
            "expires now",
            format!(r#"{{"access_token": "{TOKEN}", "expires_on": "2023-11-14T22:13:20Z"}}"#),
            &defaults,
            "is in the past",
        ),
        (
            "garbage expiry",
            format!(r#"{{"access_token": "{TOKEN}", "expires_on": "soon"}}"#),
            &defaults,
            "neither unix seconds nor an RFC 3339 timestamp",
        ),
        (
            "expiry path at the token",
            doc(TOKEN),
            &expires_at_token,
            "`$.access_token` is null",
        ),
        (
            "username holds the token",
            format!(r#"{{"u": "{TOKEN}", "access_token": "{TOKEN}", "expires_on": {YEAR_3000}}}"#),
            &username_at_token,
            "`$.u` holds the access token",
        ),
        (
            "username not a string",
            format!(r#"{{"u": 7, "access_token": "{TOKEN}", "expires_on": {YEAR_3000}}}"#),
            &username_at_token,
            "`$.u` is a number, not a string",
        ),
    ];
    for (name, json, fields, want) in cases {
        let err = parse_token_at(json.as_bytes(), fields, now).expect_err(name);
        let msg = err.to_string();
        assert!(matches!(err, CredentialError::Source(_)), "{name}: {err:?}");
        assert!(msg.contains(want), "{name}: {msg}");
        assert_no_token(&msg, name);
        assert_no_token(&format!("{err:?}"), name);
    }
}

#[tokio::test]
async fn missing_file_is_an_io_error_and_its_appearance_a_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token.json");
    let src = source(&path);
    let err = src.fetch().await.expect_err("missing file");
    assert!(matches!(err, CredentialError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("token.json"), "{err}");

    std::fs::write(&path, doc(TOKEN)).expect("write");
    assert_changes(&src, "file appeared").await;
    assert_eq!(fetch_token(&src).await, TOKEN);
}

#[tokio::test]
async fn file_errors_name_the_file_and_hide_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token.json");
    std::fs::write(&path, &doc(TOKEN)[..50]).expect("write");
    let err = source(&path).fetch().await.expect_err("half-written");
    let msg = err.to_string();
    assert!(msg.contains("token.json: is not complete JSON"), "{msg}");
    assert_no_token(&msg, "half-written file");

    let big = vec![b' '; MAX_TOKEN_JSON_BYTES + 1];
    std::fs::write(&path, big).expect("write");
    let err = source(&path).fetch().await.expect_err("too large");
    assert!(err.to_string().contains("larger than"), "{err}");
}

#[tokio::test]
async fn in_place_rewrite_is_noticed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token.json");
    std::fs::write(&path, doc("token-one")).expect("write");
    let src = source(&path);
    assert_eq!(fetch_token(&src).await, "token-one");

    // Same length, written within the same timestamp tick as likely as not: only the content
    // comparison of a recently modified file can see this one.
    let writer = async {
        tokio::time::sleep(FAST_POLL * 3).await;
        std::fs::write(&path, doc("token-two")).expect("rewrite");
    };
    tokio::join!(writer, assert_changes(&src, "rewrite"));
    assert_eq!(fetch_token(&src).await, "token-two");
}

#[tokio::test]
async fn unchanged_content_does_not_wake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token.json");
    std::fs::write(&path, doc(TOKEN)).expect("write");
    let src = source(&path);
    assert_eq!(fetch_token(&src).await, TOKEN);
    // Rewriting the same bytes changes the times but not the token.
    std::fs::write(&path, doc(TOKEN)).expect("rewrite");
    let woke = tokio::time::timeout(FAST_POLL * 15, src.changed()).await;
    assert!(woke.is_err(), "changed() resolved for identical content");

    // A broken file that was already fetched does not wake the refresher again either.
    std::fs::write(&path, "{").expect("break");
    assert!(src.fetch().await.is_err());
    let woke = tokio::time::timeout(FAST_POLL * 15, src.changed()).await;
    assert!(
        woke.is_err(),
        "changed() resolved for the same broken content"
    );
    std::fs::write(&path, doc("repaired")).expect("repair");
    assert_changes(&src, "repaired").await;
    assert_eq!(fetch_token(&src).await, "repaired");
}

#[tokio::test]
async fn atomic_rename_is_noticed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token.json");
    std::fs::write(&path, doc("token-one")).expect("write");
    let src = source(&path);
    assert_eq!(fetch_token(&src).await, "token-one");

    let tmp = dir.path().join(".token.json.tmp");
    std::fs::write(&tmp, doc("token-two")).expect("write temp");
    std::fs::rename(&tmp, &path).expect("rename");
    assert_changes(&src, "rename").await;
    assert_eq!(fetch_token(&src).await, "token-two");
}

/// Lays out a directory as the kubelet does for a secret volume: `token.json ->
/// ..data/token.json`, `..data -> ..<timestamp>`, the real file in the timestamped directory.
fn kubelet_write(dir: &Path, version: &str, json: &str) -> PathBuf {
    let versioned = dir.join(format!("..{version}"));
    std::fs::create_dir(&versioned).expect("versioned dir");
    std::fs::write(versioned.join("token.json"), json).expect("write");
    let staged = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &staged).expect("symlink");
    // rename(2) replaces the old `..data` link atomically: readers see the old or new file.
    std::fs::rename(&staged, dir.join("..data")).expect("swap ..data");
    let link = dir.join("token.json");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/token.json", &link).expect("file symlink");
    }
    link
}

#[tokio::test]
async fn kubernetes_symlink_swap_is_noticed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = kubelet_write(dir.path(), "2024_01_01_00_00_00.1", &doc("token-one"));
    let src = source(&path);
    assert_eq!(fetch_token(&src).await, "token-one");

    let writer = async {
        tokio::time::sleep(FAST_POLL * 3).await;
        kubelet_write(dir.path(), "2024_01_01_00_45_00.2", &doc("token-two"));
        // The kubelet removes the old version after the swap.
        std::fs::remove_dir_all(dir.path().join("..2024_01_01_00_00_00.1")).expect("cleanup");
    };
    tokio::join!(writer, assert_changes(&src, "symlink swap"));
    assert_eq!(fetch_token(&src).await, "token-two");
}

#[tokio::test]
async fn debug_shows_no_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token.json");
    std::fs::write(&path, doc(TOKEN)).expect("write");
    let src = source(&path);
    let token = src.fetch().await.expect("fetch");
    let shown = format!("{src:?} {token:?}");
    assert!(shown.contains("token.json"), "{shown}");
    assert_no_token(&shown, "debug");
}

/// The refresher and the file source together: a rewritten file reaches the `watch` channel
/// long before the scheduled refresh.
#[tokio::test]
async fn refresher_follows_the_file() {
    use std::sync::Arc;

    use crate::credentials::refresh::{run, Policy};

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token.json");
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + 3600;
    let write = |token: &str| {
        let json = format!(
            r#"{{"username": "oid-1", "access_token": "{token}", "expires_on": {expiry}}}"#
        );
        std::fs::write(&path, json).expect("write");
    };
    write("token-one");
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refresher = tokio::spawn(run(
        Arc::new(source(&path)),
        None,
        Policy::default(),
        tx,
        Default::default(),
        shutdown.clone(),
    ));
    let first = wait_for(&mut rx, "token-one").await;
    assert_eq!(first.username, "oid-1");
    write("token-two");
    let second = wait_for(&mut rx, "token-two").await;
    assert_eq!(second.generation, first.generation + 1);
    shutdown.cancel();
    tokio::time::timeout(WAIT, refresher)
        .await
        .expect("refresher stops")
        .expect("refresher task");
}

async fn wait_for(
    rx: &mut crate::credentials::refresh::CredentialsRx,
    want: &str,
) -> std::sync::Arc<crate::credentials::Credentials> {
    let published = rx.wait_for(|c| c.as_ref().is_some_and(|c| c.token.expose() == want));
    let creds = tokio::time::timeout(WAIT, published)
        .await
        .unwrap_or_else(|_| panic!("{want} not published within {WAIT:?}"))
        .expect("refresher alive");
    creds.clone().expect("credentials")
}

/// A FIFO where the token file should be (a mistake, or a writer that never comes) fails the
/// fetch at once instead of blocking it, and a blocking thread, for good.
#[tokio::test]
async fn a_fifo_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("token.json");
    crate::testing::mkfifo(&fifo);
    let err = tokio::time::timeout(WAIT, source(&fifo).fetch())
        .await
        .expect("the fetch does not block")
        .expect_err("refused");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}
