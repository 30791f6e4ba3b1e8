//! Microsoft Entra ID token sources: managed identity, workload identity, service principal
//! (secret or certificate), Azure CLI, and an automatic choice among them. This is the only
//! module that touches `azure_identity` and `azure_core`, whose APIs change often; the rest of
//! the proxy sees a [`TokenSource`].
//!
//! # A fresh credential per fetch
//!
//! `azure_identity` credentials cache their token and hand out the cached one until it is
//! within 5 minutes of expiry. The refresher asks for a new token at 75 % of the lifetime, so a
//! long-lived credential object would answer with the old token. Every [`TokenSource::fetch`]
//! therefore builds a new credential object (cheap: no I/O besides reading a small file) and
//! really asks the endpoint.
//!
//! # What is decided when
//!
//! [`source`] resolves everything that comes from the configuration and the environment once,
//! at start-up (so a missing variable is a start-up error that names it): which kind `Auto`
//! picks, tenant, client id, authority host, certificate validity. It never touches the
//! network. Each fetch is bounded by [`FETCH_TIMEOUT`].
//!
//! # Layout
//! `azure/plan.rs` turns configuration and environment into a `Plan`, including the
//! `Auto` chain; `azure/assertion.rs` signs certificate client assertions with ring (no
//! OpenSSL); `azure/http.rs` builds the production HTTP client and the `az` runner, and turns
//! `azure_core` errors into messages without secrets.

mod assertion;
mod http;
mod plan;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{AccessToken, TokenCredential};
use azure_core::http::{ClientOptions, HttpClient, RetryOptions, Transport, Url};
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, ClientAssertionCredential,
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    Executor, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};

use super::{CredentialError, Token, TokenFuture, TokenSource, DEFAULT_SCOPE};
use crate::secret::Secret;
pub use plan::Environment;
use plan::Plan;

/// One fetch may take this long. Below the refresher's 30 s attempt timeout so that the error
/// names this source; long enough for IMDS's first retries and for `az` (a Python program that
/// takes seconds to start).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(25);

/// Which Entra source to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntraKind {
    ManagedIdentity,
    WorkloadIdentity,
    ServicePrincipal,
    AzureCli,
    /// Service principal from the environment, then workload identity, then managed identity,
    /// then Azure CLI; decided once from the environment (see `azure/plan.rs`).
    Auto,
}

/// Which Entra source and its parameters. Fields left `None` fall back to the usual
/// environment variables (`AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`,
/// `AZURE_CLIENT_CERTIFICATE_PATH`, `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_AUTHORITY_HOST`)
/// where the source uses them; managed identity takes its user-assigned id from here only.
pub struct EntraConfig {
    pub kind: EntraKind,
    /// The scope tokens are requested for; [`DEFAULT_SCOPE`] for Azure Managed Redis.
    pub scope: String,
    pub tenant_id: Option<String>,
    /// Service principal or workload identity application id, or user-assigned managed
    /// identity client id.
    pub client_id: Option<String>,
    /// User-assigned managed identity by object (principal) id.
    pub object_id: Option<String>,
    /// User-assigned managed identity by Azure resource id (IMDS only).
    pub resource_id: Option<String>,
    /// Service principal secret.
    pub client_secret: Option<Secret>,
    /// PEM file holding the certificate and its RSA private key (PKCS#8 or PKCS#1).
    pub client_certificate: Option<PathBuf>,
    /// Entra authority, e.g. `https://login.microsoftonline.us/` for a sovereign cloud.
    pub authority_host: Option<String>,
    /// Test hook: the HTTP client every request goes through (loopback mocks). `None` in
    /// production, where a reqwest client with the proxy's rustls configuration is used.
    pub transport: Option<Arc<dyn HttpClient>>,
}

impl Default for EntraConfig {
    fn default() -> Self {
        EntraConfig {
            kind: EntraKind::Auto,
            scope: DEFAULT_SCOPE.to_owned(),
            tenant_id: None,
            client_id: None,
            object_id: None,
            resource_id: None,
            client_secret: None,
            client_certificate: None,
            authority_host: None,
            transport: None,
        }
    }
}

impl fmt::Debug for EntraConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraConfig")
            .field("kind", &self.kind)
            .field("scope", &self.scope)
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("object_id", &self.object_id)
            .field("resource_id", &self.resource_id)
            .field("client_secret", &self.client_secret)
            .field("client_certificate", &self.client_certificate)
            .field("authority_host", &self.authority_host)
            .field("transport", &self.transport.as_ref().map(|_| "custom"))
            .finish()
    }
}

/// Builds the Entra token source, reading the environment of this process.
pub fn source(config: EntraConfig) -> Result<Arc<dyn TokenSource>, CredentialError> {
    source_in(config, &Environment::process())
}

/// [`source`] with the environment given: tests pass their own so they never read or change
/// the process environment. (`azure_identity` itself still reads the process environment for
/// the managed identity endpoint and the `az` command.)
pub fn source_in(
    config: EntraConfig,
    env: &Environment,
) -> Result<Arc<dyn TokenSource>, CredentialError> {
    Ok(Arc::new(EntraSource::new(config, env)?))
}

/// A [`TokenSource`] that builds an `azure_identity` credential for every fetch.
struct EntraSource {
    plan: Plan,
    scope: String,
    /// Every request of every credential goes through this client.
    http: Arc<dyn HttpClient>,
    /// Runs `az` for the Azure CLI source; replaced by a fake in tests.
    executor: Arc<dyn Executor>,
    /// [`FETCH_TIMEOUT`]; shortened in tests.
    fetch_timeout: Duration,
}

impl fmt::Debug for EntraSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraSource")
            .field("kind", &self.plan.name())
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl EntraSource {
    fn new(config: EntraConfig, env: &Environment) -> Result<Self, CredentialError> {
        if config.scope.is_empty() {
            return Err(CredentialError::Config("the token scope is empty".into()));
        }
        let plan = plan::resolve(&config, env)?;
        let http = match config.transport {
            Some(client) => client,
            None => http::production_client(matches!(plan, Plan::ManagedIdentity { .. }))?,
        };
        Ok(EntraSource {
            plan,
            scope: config.scope,
            http,
            executor: Arc::new(http::CliExecutor),
            fetch_timeout: FETCH_TIMEOUT,
        })
    }

    async fn fetch_now(&self) -> Result<Token, CredentialError> {
        let http = Arc::new(http::Observed::new(self.http.clone()));
        let credential = self.credential(&http).await?;
        let access = credential
            .get_token(&[self.scope.as_str()], None)
            .await
            .map_err(|err| {
                let status = http.last_status();
                CredentialError::Source(http::describe(&err, &self.secrets(), status))
            })?;
        token_from(access)
    }

    /// A new credential object sending through `http`: see the module documentation for why
    /// it is not reused.
    async fn credential(
        &self,
        http: &Arc<http::Observed>,
    ) -> Result<Arc<dyn TokenCredential>, CredentialError> {
        let failed = |err: azure_core::Error| {
            CredentialError::Source(http::describe(&err, &self.secrets(), None))
        };
        Ok(match &self.plan {
            Plan::ManagedIdentity { id } => {
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: id.clone(),
                    client_options: self.client_options(http, None),
                }))
                .map_err(failed)?
            }
            Plan::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
                authority,
            } => {
                // azure_identity reads the (small, local) token file synchronously, on every
                // fetch: a FIFO or a device there would block or exhaust memory.
                crate::secret::check_regular_file_async(token_file)
                    .await
                    .map_err(|e| {
                        CredentialError::Source(format!(
                            "federated token file {}: {e}",
                            token_file.display()
                        ))
                    })?;
                WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                    credential_options: ClientAssertionCredentialOptions {
                        client_options: self.client_options(http, Some(authority)),
                    },
                    client_id: Some(client_id.clone()),
                    tenant_id: Some(tenant_id.clone()),
                    token_file_path: Some(token_file.clone()),
                }))
                .map_err(failed)?
            }
            Plan::ClientSecret {
                tenant_id,
                client_id,
                secret,
                authority,
            } => ClientSecretCredential::new(
                tenant_id,
                client_id.clone(),
                azure_core::credentials::Secret::new(secret.expose().to_owned()),
                Some(ClientSecretCredentialOptions {
                    client_options: self.client_options(http, Some(authority)),
                }),
            )
            .map_err(failed)?,
            Plan::ClientCertificate {
                tenant_id,
                client_id,
                path,
                authority,
            } => {
                // Reread on every fetch so that a rotated certificate is picked up.
                let signer = assertion::CertificateSigner::read(path)
                    .await
                    .map_err(CredentialError::Source)?;
                let endpoint =
                    plan::token_endpoint(authority, tenant_id).map_err(CredentialError::Source)?;
                let jwt = signer
                    .assertion(client_id, endpoint.as_str(), SystemTime::now())
                    .map_err(CredentialError::Source)?;
                ClientAssertionCredential::new(
                    tenant_id.clone(),
                    client_id.clone(),
                    assertion::SignedAssertion(jwt),
                    Some(ClientAssertionCredentialOptions {
                        client_options: self.client_options(http, Some(authority)),
                    }),
                )
                .map_err(failed)?
            }
            Plan::AzureCli { tenant_id } => {
                AzureCliCredential::new(Some(AzureCliCredentialOptions {
                    tenant_id: tenant_id.clone(),
                    executor: Some(self.executor.clone()),
                    ..Default::default()
                }))
                .map_err(failed)?
            }
        })
    }

    fn client_options(&self, http: &Arc<http::Observed>, authority: Option<&Url>) -> ClientOptions {
        let cloud = authority.map(|url| {
            let mut custom = CustomConfiguration::default();
            custom.authority_host = url.as_str().to_owned();
            Arc::new(CloudConfiguration::Custom(custom))
        });
        ClientOptions {
            transport: Some(Transport::new(http.clone())),
            cloud,
            // The refresher retries with backoff for as long as the process lives; retries
            // inside one fetch would only hide the endpoint's error behind our timeout. (The
            // IMDS credential imposes its own retry policy regardless.)
            retry: RetryOptions::none(),
            ..Default::default()
        }
    }

    /// Known secret texts, scrubbed from every error message: the client secret, and the
    /// header App Service and Azure Arc managed identity endpoints require (an endpoint's
    /// error may echo the request).
    fn secrets(&self) -> Vec<String> {
        let mut secrets: Vec<String> = ["IDENTITY_HEADER", "MSI_SECRET"]
            .into_iter()
            .filter_map(|name| std::env::var(name).ok())
            .collect();
        if let Plan::ClientSecret { secret, .. } = &self.plan {
            secrets.push(secret.expose().to_owned());
        }
        secrets
    }
}

impl TokenSource for EntraSource {
    fn name(&self) -> &'static str {
        self.plan.name()
    }

    fn fetch(&self) -> TokenFuture<'_> {
        Box::pin(async move {
            match tokio::time::timeout(self.fetch_timeout, self.fetch_now()).await {
                Ok(result) => result,
                Err(_) => Err(CredentialError::Source(format!(
                    "{}: no token within {:?}",
                    self.name(),
                    self.fetch_timeout
                ))),
            }
        })
    }
}

fn token_from(access: AccessToken) -> Result<Token, CredentialError> {
    let text = access.token.secret();
    if text.is_empty() {
        return Err(CredentialError::Source(
            "the token endpoint answered without an access token".into(),
        ));
    }
    Ok(Token {
        token: Secret::new(text),
        expires_at: Some(SystemTime::from(access.expires_on)),
        username: None,
    })
}
