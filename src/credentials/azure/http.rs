//! What the Entra credentials run on: the production HTTP client (reqwest over the proxy's
//! ring-based rustls configuration, so no second crypto library and no OpenSSL), the runner of
//! `az`, and the conversion of `azure_core` errors into messages that never carry a secret.

use std::ffi::OsStr;
use std::io;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::error::ErrorKind;
use azure_core::http::{AsyncRawResponse, HttpClient, Request};
use azure_identity::Executor;

use crate::credentials::CredentialError;

/// Connecting to IMDS or Entra takes milliseconds when it works; a black-holed address should
/// fail well within [`super::FETCH_TIMEOUT`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-request bound of the HTTP client, below [`super::FETCH_TIMEOUT`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// The client used when the configuration names none: reqwest with the rustls configuration of
/// `tls.rs` (public roots, ring). Redirects are not followed: identity endpoints do not send
/// them, and following one would carry a secret elsewhere.
///
/// `local_endpoint`: the requests go to an endpoint on the machine (managed identity: IMDS at
/// a link-local address, the App Service or Arc endpoint on localhost), in clear HTTP with
/// the identity header. Those never go through `HTTP_PROXY`/`HTTPS_PROXY`, which would hand the
/// header and the token to the proxy, and let it answer with a token of its choice. Requests
/// to Entra (service principal, workload identity) follow them: that may be the only way out.
pub(super) fn production_client(
    local_endpoint: bool,
) -> Result<Arc<dyn HttpClient>, CredentialError> {
    let tls = crate::tls::client_config(None)
        .map_err(|e| CredentialError::Config(format!("TLS for Entra endpoints: {e}")))?;
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured((*tls).clone())
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none());
    if local_endpoint {
        builder = builder.no_proxy();
    }
    let client = builder
        .build()
        .map_err(|e| CredentialError::Config(format!("HTTP client for Entra endpoints: {e}")))?;
    Ok(Arc::new(client))
}

/// Wraps the client of one fetch to remember the last HTTP status: azure_identity drops the
/// status when an error answer is not the JSON it expects (a proxy's HTML 502, say).
#[derive(Debug)]
pub(super) struct Observed {
    inner: Arc<dyn HttpClient>,
    last_status: Mutex<Option<u16>>,
}

impl Observed {
    pub(super) fn new(inner: Arc<dyn HttpClient>) -> Self {
        Observed {
            inner,
            last_status: Mutex::new(None),
        }
    }

    pub(super) fn last_status(&self) -> Option<u16> {
        self.last_status.lock().ok().and_then(|s| *s)
    }
}

#[async_trait::async_trait]
impl HttpClient for Observed {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let response = self.inner.execute_request(request).await?;
        if let Ok(mut last) = self.last_status.lock() {
            *last = Some(response.status().into());
        }
        Ok(response)
    }
}

/// Runs `az` for `AzureCliCredential`. Unlike azure_identity's runners it kills the child, and
/// what it started (`az` is a script that starts Python), when the fetch is abandoned
/// (timeout), so a hung `az` does not pile up.
#[derive(Debug)]
pub(super) struct CliExecutor;

#[async_trait::async_trait]
impl Executor for CliExecutor {
    async fn run(&self, program: &OsStr, args: &[&OsStr]) -> io::Result<Output> {
        let (child, group) = crate::credentials::child::spawn(
            crate::credentials::child::command(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )?;
        let output = child.wait_with_output().await?;
        group.finished();
        Ok(output)
    }
}

/// A one-line description of `err`: azure_identity's message, plus the HTTP status, Entra's
/// error codes and its `error` field when the endpoint answered (`last_status` when the error
/// itself does not carry the status). `secrets` and anything shaped like a JWT (tokens,
/// assertions) are replaced by `[redacted]`.
pub(super) fn describe(
    err: &azure_core::Error,
    secrets: &[String],
    last_status: Option<u16>,
) -> String {
    let mut message = err
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    // azure_identity quotes some error answers whole (a page of HTML): enough of it to
    // recognise, and room for the status and codes behind. Redacted before it is cut, so
    // that the cut cannot leave the beginning of a secret.
    message = super::super::redact(&message, secrets);
    super::super::cut(&mut message, 240);
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(ErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        }) = e.downcast_ref::<azure_core::Error>().map(|e| e.kind())
        {
            message.push_str(&format!(" (HTTP {}", u16::from(*status)));
            if let Some(code) = error_code {
                message.push_str(&format!(", error codes {code}"));
            }
            let error = raw_response.as_ref().and_then(|r| {
                serde_json::from_slice::<serde_json::Value>(r.body().as_ref())
                    .ok()?
                    .get("error")?
                    .as_str()
                    .map(str::to_owned)
            });
            if let Some(error) = error {
                message.push_str(&format!(", error {error}"));
            }
            message.push(')');
            return super::super::redact(&message, secrets);
        }
        cause = e.source();
    }
    // No HTTP answer: the transport's own causes (refused, reset, timed out) say why.
    let mut cause = std::error::Error::source(err);
    while let Some(e) = cause {
        let text = e.to_string();
        if !text.is_empty() && !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = e.source();
    }
    if let Some(status) = last_status {
        message.push_str(&format!(" (HTTP {status})"));
    }
    super::super::redact(&message, secrets)
}
