//! Tests of the Entra sources against loopback mocks: managed identity here (IMDS and App
//! Service), Entra token endpoints in `entra.rs`, the `Auto` chain and Azure CLI in `auto.rs`,
//! the doubles in `mock.rs`.
//!
//! NEVER call `source(...)`/`source_in(...)` with `transport: None` and then `fetch()`: that is
//! the production HTTP client and would go to the real IMDS or Entra. Every fetch here goes
//! through `mock::Redirect`, which only connects to a mock on 127.0.0.1.

mod auto;
mod e2e;
mod entra;
mod mock;

use std::future::Future;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::*;
use mock::{MockServer, Recorded, Redirect};

/// Bound on each test's whole body, so a bug can only fail a test, never hang it.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound")
}

/// An unsigned JWT-shaped token (the shape matters for redaction checks, not the signature).
fn jwt(marker: &str) -> String {
    let part = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.c2ln",
        part(serde_json::json!({"alg": "none", "typ": "JWT"})),
        part(serde_json::json!({"oid": "00000000-0000-0000-0000-00000000000a", "m": marker}))
    )
}

/// An environment holding exactly `pairs`, not an Azure VM.
fn env(pairs: &[(&str, &str)]) -> Environment {
    let vars: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Environment::from_fn(
        move |key| vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()),
        false,
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// What IMDS and App Service answer.
fn msi_answer(token: &str, expires_on: u64) -> String {
    serde_json::json!({
        "access_token": token,
        "expires_on": expires_on.to_string(),
        "resource": "https://redis.azure.com",
        "token_type": "Bearer",
    })
    .to_string()
}

fn managed_identity(id: &str, redirect: Arc<Redirect>) -> EntraConfig {
    let mut config = EntraConfig {
        kind: EntraKind::ManagedIdentity,
        transport: Some(redirect),
        ..Default::default()
    };
    match id {
        "client" => config.client_id = Some("mi-client-id".into()),
        "object" => config.object_id = Some("mi-object-id".into()),
        "resource" => config.resource_id = Some("/subscriptions/s/mi".into()),
        _ => {}
    }
    config
}

/// The query parameter that names the user-assigned identity, for each case.
fn id_param(id: &str) -> Option<(&'static str, &'static str)> {
    match id {
        "client" => Some(("client_id", "mi-client-id")),
        "object" => Some(("object_id", "mi-object-id")),
        "resource" => Some(("msi_res_id", "/subscriptions/s/mi")),
        _ => None,
    }
}

fn assert_msi_request(request: &Recorded, id: &str) {
    assert_eq!(request.method, "GET");
    assert_eq!(request.query("api-version").as_deref(), Some("2019-08-01"));
    assert_eq!(
        request.query("resource").as_deref(),
        Some("https://redis.azure.com"),
        "the scope is sent as its resource"
    );
    for key in ["client_id", "object_id", "msi_res_id"] {
        let want = id_param(id).filter(|(k, _)| *k == key).map(|(_, v)| v);
        assert_eq!(request.query(key).as_deref(), want, "{key} for {id}");
    }
}

#[tokio::test]
async fn imds_request_and_token() {
    bounded(async {
        for id in ["system", "client", "object", "resource"] {
            let token = jwt(id);
            let expires_on = unix_now() + 3600;
            let server = MockServer::answering(200, msi_answer(&token, expires_on)).await;
            let redirect = Redirect::to(&server);
            let source = source_in(managed_identity(id, redirect.clone()), &env(&[])).unwrap();
            assert_eq!(source.name(), "managed-identity");
            let got = source.fetch().await.unwrap();
            assert_eq!(got.token.expose(), token);
            assert_eq!(
                got.expires_at,
                Some(UNIX_EPOCH + Duration::from_secs(expires_on))
            );
            assert_eq!(got.username, None);

            let sent = redirect.sent();
            assert_eq!(sent.len(), 1, "{id}: one request");
            // The URL the real code built: IMDS, which the redirect never contacted.
            let url = &sent[0].url;
            assert_eq!(
                (url.scheme(), url.host_str(), url.path()),
                (
                    "http",
                    Some("169.254.169.254"),
                    "/metadata/identity/oauth2/token"
                ),
                "{id}"
            );
            assert_eq!(sent[0].header("metadata"), Some("true"));
            assert_msi_request(&sent[0], id);
            // And the mock really received it.
            assert_eq!(server.requests().len(), 1);
        }
    })
    .await
}

#[test]
fn at_most_one_user_assigned_id() {
    let config = EntraConfig {
        kind: EntraKind::ManagedIdentity,
        client_id: Some("c".into()),
        object_id: Some("o".into()),
        ..Default::default()
    };
    let err = source_in(config, &env(&[])).unwrap_err();
    assert!(err.to_string().contains("at most one"), "{err}");
    // App Service does not take resource ids through azure_identity: a start-up error.
    let config = EntraConfig {
        kind: EntraKind::ManagedIdentity,
        resource_id: Some("/subscriptions/s/mi".into()),
        ..Default::default()
    };
    let app_service = env(&[("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi/token")]);
    let err = source_in(config, &app_service).unwrap_err();
    assert!(err.to_string().contains("resource id"), "{err}");
}

/// Marks the child process that runs [`app_service_child`]; the value is the case.
const CHILD_CASE: &str = "REDIS_ENTRA_PROXY_AZURE_TEST_CASE";
const IDENTITY_HEADER_VALUE: &str = "x-identity-header-test-value";

/// azure_identity reads `IDENTITY_ENDPOINT` from the process environment only, and tests must
/// not change their own. So the App Service path runs in a child copy of this test binary
/// (running only [`app_service_child`]) whose environment points at the loopback mock.
/// The last cases: an endpoint failing with an answer that echoes the identity header; the
/// production HTTP client with `HTTP_PROXY` set, which the local endpoint must not go through.
#[tokio::test]
async fn app_service_request_and_token() {
    bounded(async {
        let proxy =
            MockServer::answering(200, msi_answer(&jwt("from-the-proxy"), unix_now() + 3600)).await;
        for id in ["system", "client", "object", "echo", "proxied"] {
            let expires_on = unix_now() + 3600;
            let server = if id == "echo" {
                let body = format!(
                    "internal error; request headers: x-identity-header: {IDENTITY_HEADER_VALUE}"
                );
                MockServer::answering(500, body).await
            } else {
                MockServer::answering(200, msi_answer(&jwt(id), expires_on)).await
            };
            let exe = std::env::current_exe().expect("test binary path");
            let output = tokio::process::Command::new(exe)
                .args(["--exact", "credentials::azure::tests::app_service_child"])
                .args(["--nocapture", "--test-threads=1"])
                .env(CHILD_CASE, format!("{id} {expires_on}"))
                .env(
                    "IDENTITY_ENDPOINT",
                    format!("http://{}/msi/token", server.addr),
                )
                .env("IDENTITY_HEADER", IDENTITY_HEADER_VALUE)
                .env("HTTP_PROXY", format!("http://{}", proxy.addr))
                .env("http_proxy", format!("http://{}", proxy.addr))
                .env_remove("NO_PROXY")
                .env_remove("no_proxy")
                .env_remove("IDENTITY_SERVER_THUMBPRINT")
                .env_remove("IMDS_ENDPOINT")
                .env_remove("MSI_ENDPOINT")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .expect("run the child test");
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success() && stdout.contains("1 passed"),
                "child for {id} failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let received = server.requests();
            assert!(!received.is_empty(), "{id}");
            assert_eq!(received[0].url.path(), "/msi/token");
            assert_eq!(
                received[0].header("x-identity-header"),
                Some(IDENTITY_HEADER_VALUE)
            );
            if id != "echo" {
                assert_eq!(received.len(), 1, "{id}");
                assert_msi_request(&received[0], if id == "proxied" { "system" } else { id });
            }
            assert!(proxy.requests().is_empty(), "{id}: sent through HTTP_PROXY");
        }
    })
    .await
}

/// Does nothing unless started by [`app_service_request_and_token`] with its environment.
#[tokio::test]
async fn app_service_child() {
    let Ok(case) = std::env::var(CHILD_CASE) else {
        return;
    };
    let (id, expires_on) = case.split_once(' ').expect("case format");
    let expires_on: u64 = expires_on.parse().expect("expiry");
    let endpoint = Url::parse(&std::env::var("IDENTITY_ENDPOINT").expect("endpoint")).unwrap();
    bounded(async {
        let addr = endpoint.socket_addrs(|| None).expect("mock address")[0];
        assert!(addr.ip().is_loopback(), "the mock is on loopback");
        // The redirect sends to the endpoint's own loopback address: the URL is unchanged.
        let redirect = Redirect::to_addr(addr);
        if id == "proxied" {
            let config = EntraConfig {
                transport: None,
                ..managed_identity("system", redirect.clone())
            };
            let got = source(config).unwrap().fetch().await.unwrap();
            assert_eq!(got.token.expose(), jwt("proxied"));
            return;
        }
        if id == "echo" {
            let source = source(managed_identity("system", redirect.clone())).unwrap();
            let err = source.fetch().await.unwrap_err().to_string();
            assert!(!err.contains(IDENTITY_HEADER_VALUE), "{err}");
            assert!(err.contains("[redacted]") && err.contains("500"), "{err}");
            return;
        }
        let source = source(managed_identity(id, redirect.clone())).unwrap();
        let got = source.fetch().await.unwrap();
        assert_eq!(got.token.expose(), jwt(id));
        assert_eq!(
            got.expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(expires_on))
        );
        let sent = redirect.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].url.origin(), endpoint.origin());
    })
    .await
}

/// An error text is redacted before it is cut: a cut through a secret leaves none of it.
#[test]
fn errors_are_redacted_before_they_are_cut() {
    let secret = "IDHDR-SECRET-0123456789".to_owned();
    for pad in 200..260 {
        let text = format!(
            "{} headers: x-identity-header={secret} more",
            "x ".repeat(pad / 2)
        );
        let err = azure_core::Error::with_message(azure_core::error::ErrorKind::Other, text);
        let described = super::http::describe(&err, std::slice::from_ref(&secret), Some(500));
        for n in 4..=secret.len() {
            assert!(!described.contains(&secret[..n]), "{pad}: {described}");
        }
    }
    // A token cut short by an excerpt is still recognised.
    let cut = crate::credentials::redact::<&str>("token eyJhbGciOiJub25lIn0.eyJvaWQiOi", &[]);
    assert_eq!(cut, "token [redacted]");
}

/// The value of a key that names a secret goes, whatever its shape: a helper that fails
/// with `access_token=…` in its message, or an endpoint echoing a JSON body.
#[test]
fn values_of_secret_keys_are_redacted() {
    let redact = |t: &str| crate::credentials::redact::<&str>(t, &[]);
    for (given, want) in [
        (
            "error: access_token=s3cr3tvalue-not-jwt rejected",
            "error: access_token=[redacted] rejected",
        ),
        (
            r#"{"client_secret": "ab+/cd==", "tenant": "t1"}"#,
            r#"{"client_secret": "[redacted]", "tenant": "t1"}"#,
        ),
        (
            "PASSWORD: hunter2!x, user: bob",
            "PASSWORD: [redacted], user: bob",
        ),
        ("x-api-key:abc&y=1", "x-api-key:[redacted]&y=1"),
        // A quoted value, spaces and all.
        (r#"password="two words" ok"#, r#"password="[redacted]" ok"#),
        (
            "Authorization: Basic dXNlcjpwYXNz",
            "Authorization: Basic [redacted]",
        ),
        // No value: nothing to take.
        ("the token expired", "the token expired"),
        ("token=", "token="),
        ("user: bob", "user: bob"),
        // A file name is not a key.
        (
            "token file /run/token.json: No such file",
            "token file /run/token.json: No such file",
        ),
    ] {
        assert_eq!(redact(given), want, "{given}");
    }
}
