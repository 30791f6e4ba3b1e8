//! Workload identity and service principals against a loopback Entra token endpoint (through
//! `Redirect`, so the real code path builds its real `https://login…` URL and the mock answers
//! over plain loopback TCP), plus error handling and the fetch bound.

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};

use super::*;

const TENANT: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT: &str = "app-client-id";
const SECRET: &str = "client-secret-value-do-not-print";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn entra_answer(token: &str) -> String {
    serde_json::json!({
        "token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600, "access_token": token,
    })
    .to_string()
}

fn service_principal(redirect: Arc<Redirect>) -> EntraConfig {
    EntraConfig {
        kind: EntraKind::ServicePrincipal,
        tenant_id: Some(TENANT.into()),
        client_id: Some(CLIENT.into()),
        client_secret: Some(Secret::new(SECRET)),
        transport: Some(redirect),
        ..Default::default()
    }
}

/// Fetches through a fresh mock answering `status`/`body`; returns the result and what the
/// real code path sent.
async fn fetch_with(
    config: impl FnOnce(Arc<Redirect>) -> EntraConfig,
    env: &Environment,
    status: u16,
    body: String,
) -> (Result<Token, CredentialError>, Vec<Recorded>) {
    let server = MockServer::answering(status, body).await;
    let redirect = Redirect::to(&server);
    let source = source_in(config(redirect.clone()), env).unwrap();
    (source.fetch().await, redirect.sent())
}

/// Checks the token request and the returned token's expiry (now + `expires_in`).
fn assert_token_request(sent: &[Recorded], host: &str, got: &Token, token: &str) {
    assert_eq!(sent.len(), 1);
    let request = &sent[0];
    assert_eq!(request.method, "POST");
    assert_eq!(
        request.url.as_str(),
        format!("https://{host}/{TENANT}/oauth2/v2.0/token")
    );
    assert_eq!(request.form("scope").as_deref(), Some(DEFAULT_SCOPE));
    assert_eq!(request.form("client_id").as_deref(), Some(CLIENT));
    assert_eq!(
        request.form("grant_type").as_deref(),
        Some("client_credentials")
    );
    assert_eq!(got.token.expose(), token);
    let left = got.expires_at.unwrap().duration_since(SystemTime::now());
    let left = left.expect("expiry in the future").as_secs();
    assert!((3590..=3600).contains(&left), "{left}");
}

#[tokio::test]
async fn workload_identity_posts_the_federated_token() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let federated = jwt("federated");
        std::fs::write(&file, &federated).unwrap();
        let file = file.to_str().unwrap().to_owned();
        // From the environment alone, and with the authority of a sovereign cloud.
        let vars = [
            ("AZURE_FEDERATED_TOKEN_FILE", file.as_str()),
            ("AZURE_CLIENT_ID", CLIENT),
            ("AZURE_TENANT_ID", TENANT),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.us/"),
        ];
        let config = |r: Arc<Redirect>| EntraConfig {
            kind: EntraKind::WorkloadIdentity,
            transport: Some(r),
            ..Default::default()
        };
        let token = jwt("wi");
        let (got, sent) = fetch_with(config, &env(&vars), 200, entra_answer(&token)).await;
        assert_token_request(&sent, "login.microsoftonline.us", &got.unwrap(), &token);
        assert_eq!(sent[0].form("client_assertion"), Some(federated));
        assert_eq!(
            sent[0].form("client_assertion_type").as_deref(),
            Some(ASSERTION_TYPE)
        );

        // Configured values win over the environment.
        let config = |r: Arc<Redirect>| EntraConfig {
            kind: EntraKind::WorkloadIdentity,
            tenant_id: Some(TENANT.into()),
            client_id: Some(CLIENT.into()),
            transport: Some(r),
            ..Default::default()
        };
        let vars = [
            ("AZURE_FEDERATED_TOKEN_FILE", file.as_str()),
            ("AZURE_CLIENT_ID", "other"),
            ("AZURE_TENANT_ID", "other"),
        ];
        let (got, sent) = fetch_with(config, &env(&vars), 200, entra_answer(&token)).await;
        assert_token_request(&sent, "login.microsoftonline.com", &got.unwrap(), &token);
    })
    .await
}

#[test]
fn workload_identity_names_the_missing_variable() {
    let all = [
        ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
        ("AZURE_CLIENT_ID", CLIENT),
        ("AZURE_TENANT_ID", TENANT),
    ];
    for missing in 0..all.len() {
        let vars: Vec<_> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != missing)
            .map(|(_, kv)| *kv)
            .collect();
        let config = EntraConfig {
            kind: EntraKind::WorkloadIdentity,
            ..Default::default()
        };
        let err = source_in(config, &env(&vars)).unwrap_err();
        assert!(err.to_string().contains(all[missing].0), "{err}");
    }
    let config = EntraConfig {
        kind: EntraKind::WorkloadIdentity,
        authority_host: Some("http://login.example".into()),
        ..Default::default()
    };
    let err = source_in(config, &env(&all)).unwrap_err();
    assert!(err.to_string().contains("https"), "{err}");
}

#[tokio::test]
async fn service_principal_with_secret() {
    bounded(async {
        let token = jwt("sp");
        let (got, sent) = fetch_with(service_principal, &env(&[]), 200, entra_answer(&token)).await;
        assert_token_request(&sent, "login.microsoftonline.com", &got.unwrap(), &token);
        assert_eq!(sent[0].form("client_secret").as_deref(), Some(SECRET));
    })
    .await
}

/// A 2048-bit RSA key (PKCS#8 PEM), generated once: ring cannot generate RSA keys.
fn rsa_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| {
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap()
            .to_string()
    })
}

/// A self-signed certificate for [`rsa_key`]: (PEM file with cert and key, cert DER, public
/// key as DER RSAPublicKey).
fn certificate_file(dir: &std::path::Path) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::from_pem(rsa_key()).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["sp.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let path = dir.join("sp.pem");
    let mut file = std::fs::File::create(&path).unwrap();
    write!(file, "{}{}", cert.pem(), rsa_key()).unwrap();
    (path, cert.der().to_vec(), key.public_key_raw().to_vec())
}

#[tokio::test]
async fn service_principal_with_certificate() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (path, cert_der, public_key) = certificate_file(dir.path());
        // The key verified below is the certificate's own.
        assert!(cert_der.windows(public_key.len()).any(|w| w == public_key));
        let config = |r: Arc<Redirect>| EntraConfig {
            client_secret: None,
            client_certificate: Some(path.clone()),
            ..service_principal(r)
        };
        let token = jwt("cert");
        let (got, sent) = fetch_with(config, &env(&[]), 200, entra_answer(&token)).await;
        assert_token_request(&sent, "login.microsoftonline.com", &got.unwrap(), &token);
        assert_eq!(sent[0].form("client_secret"), None);
        assert_eq!(
            sent[0].form("client_assertion_type").as_deref(),
            Some(ASSERTION_TYPE)
        );
        let assertion = sent[0].form("client_assertion").expect("assertion");
        let (signed, signature) = assertion.rsplit_once('.').unwrap();
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public_key)
            .verify(signed.as_bytes(), &signature)
            .expect("the assertion verifies with the certificate's key");

        let part = |p: &str| -> serde_json::Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
        };
        let (header, claims) = signed.split_once('.').unwrap();
        let (header, claims) = (part(header), part(claims));
        let sha256 = ring::digest::digest(&ring::digest::SHA256, &cert_der);
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &cert_der);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["x5t#S256"], URL_SAFE_NO_PAD.encode(sha256));
        assert_eq!(header["x5t"], URL_SAFE_NO_PAD.encode(sha1));
        assert_eq!(
            claims["aud"],
            format!("https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token")
        );
        assert_eq!(claims["iss"], CLIENT);
        assert_eq!(claims["sub"], CLIENT);
        assert_eq!(claims["jti"].as_str().map(str::len), Some(36));
        let now = unix_now();
        let nbf = claims["nbf"].as_u64().unwrap();
        assert!(nbf <= now && now - nbf < 60, "nbf {nbf}, now {now}");
        assert_eq!(claims["iat"].as_u64(), Some(nbf));
        assert_eq!(claims["exp"].as_u64(), Some(nbf + 600));
    })
    .await
}

#[test]
fn certificate_problems_are_start_up_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _, _) = certificate_file(dir.path());
    let good = std::fs::read_to_string(good).unwrap();
    let key_only = rsa_key().to_owned();
    let cert_only = good.replace(rsa_key(), "");
    let other_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let cases = [
        ("pfx", "\u{30}\u{82}binary".to_owned(), "PKCS#12"),
        ("no cert", key_only, "no CERTIFICATE"),
        ("no key", cert_only.clone(), "no private key"),
        (
            "ec key",
            format!("{cert_only}{other_key}"),
            "need an RSA key",
        ),
        ("missing", String::new(), "reading client certificate"),
    ];
    for (name, content, want) in cases {
        let path = dir.path().join(name.replace(' ', "_"));
        if name != "missing" {
            std::fs::write(&path, content).unwrap();
        }
        let config = EntraConfig {
            kind: EntraKind::ServicePrincipal,
            tenant_id: Some(TENANT.into()),
            client_id: Some(CLIENT.into()),
            client_certificate: Some(path),
            ..Default::default()
        };
        let err = source_in(config, &env(&[])).unwrap_err();
        assert!(err.to_string().contains(want), "{name}: {err}");
    }
}

#[tokio::test]
async fn endpoint_errors_name_the_code_but_no_secret() {
    bounded(async {
        let leaked = jwt("leaked");
        let rejection = serde_json::json!({
            "error": "invalid_client",
            "error_description": format!(
                "AADSTS7000215: Invalid client secret provided. Got {SECRET} and {leaked}"
            ),
            "error_codes": [7000215],
        })
        .to_string();
        let cases = [
            (
                "400 error JSON",
                400,
                rejection,
                &["7000215", "invalid_client", "400"][..],
            ),
            ("200 garbage", 200, "<html>not json</html>".into(), &[][..]),
            (
                "200 no token",
                200,
                "{}".into(),
                &["without an access token"][..],
            ),
            ("500 garbage", 500, "oops".into(), &["500"][..]),
        ];
        for (name, status, body, wants) in cases {
            let (got, _) = fetch_with(service_principal, &env(&[]), status, body).await;
            let err = got.expect_err(name).to_string();
            for want in wants {
                assert!(err.contains(want), "{name}: {err}");
            }
            assert!(!err.contains(SECRET), "{name}: {err}");
            assert!(!err.contains(&leaked), "{name}: {err}");
            assert!(!err.contains('\n'), "{name}: one line: {err}");
        }
    })
    .await
}

#[tokio::test]
async fn unreachable_endpoint_is_an_error() {
    bounded(async {
        // A loopback port nobody listens on any more.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let redirect = Redirect::to_addr(listener.local_addr().unwrap());
        drop(listener);
        let source = source_in(service_principal(redirect), &env(&[])).unwrap();
        let err = source.fetch().await.unwrap_err();
        assert!(err.to_string().contains("no answer from the mock"), "{err}");
    })
    .await
}

#[tokio::test]
async fn a_hanging_endpoint_is_bounded() {
    bounded(async {
        let server = MockServer::start(None).await;
        let config = service_principal(Redirect::to(&server));
        let mut source = EntraSource::new(config, &env(&[])).unwrap();
        source.fetch_timeout = Duration::from_millis(300);
        let err = source.fetch().await.unwrap_err();
        assert!(err.to_string().contains("no token within 300ms"), "{err}");
        assert_eq!(server.requests().len(), 1, "the request did arrive");
    })
    .await
}

/// azure_identity caches tokens until 5 minutes before expiry; the source must not, or the
/// refresher's fetch at 75 % of the lifetime would get the old token back.
#[tokio::test]
async fn every_fetch_asks_the_endpoint() {
    bounded(async {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c1, c2) = (calls.clone(), calls.clone());
        let entra = MockServer::start(Some(Arc::new(move |_: &Recorded| {
            let n = c1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (200, entra_answer(&jwt(&format!("entra {n}"))))
        })))
        .await;
        let imds = MockServer::start(Some(Arc::new(move |_: &Recorded| {
            let n = c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (
                200,
                msi_answer(&jwt(&format!("imds {n}")), unix_now() + 3600),
            )
        })))
        .await;
        let sources = [
            service_principal(Redirect::to(&entra)),
            managed_identity("system", Redirect::to(&imds)),
        ];
        for config in sources {
            let source = source_in(config, &env(&[])).unwrap();
            let first = source.fetch().await.unwrap();
            let second = source.fetch().await.unwrap();
            assert_ne!(first.token, second.token, "{}", source.name());
        }
        assert_eq!(entra.requests().len() + imds.requests().len(), 4);
    })
    .await
}
