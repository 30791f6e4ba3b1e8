//! Turns an [`EntraConfig`] and the environment into a [`Plan`]: which credential, with which
//! tenant, client id, files and authority. Runs once at start-up and never touches the network,
//! so every missing or contradictory setting is reported then, naming the variable.
//!
//! The `Auto` chain, in order: a service principal (a client secret or certificate is
//! configured or in `AZURE_CLIENT_SECRET` / `AZURE_CLIENT_CERTIFICATE_PATH`), workload identity
//! (`AZURE_FEDERATED_TOKEN_FILE`), managed identity, Azure CLI. Without probing the network,
//! managed identity is chosen when `IDENTITY_ENDPOINT` is set (App Service, Functions, Container
//! Apps), when a user-assigned object or resource id is configured, when the machine carries
//! Azure's DMI asset tag (a VM or an AKS node, which reach IMDS), or when `az` is not on `PATH`;
//! otherwise (a developer machine with `az`) Azure CLI.

use std::path::PathBuf;

use azure_core::http::Url;
use azure_identity::UserAssignedId;

use super::{assertion, EntraConfig, EntraKind};
use crate::credentials::CredentialError;
use crate::secret::Secret;

const AZURE_TENANT_ID: &str = "AZURE_TENANT_ID";
const AZURE_CLIENT_ID: &str = "AZURE_CLIENT_ID";
const AZURE_CLIENT_SECRET: &str = "AZURE_CLIENT_SECRET";
const AZURE_CLIENT_CERTIFICATE_PATH: &str = "AZURE_CLIENT_CERTIFICATE_PATH";
const AZURE_FEDERATED_TOKEN_FILE: &str = "AZURE_FEDERATED_TOKEN_FILE";
const AZURE_AUTHORITY_HOST: &str = "AZURE_AUTHORITY_HOST";
const IDENTITY_ENDPOINT: &str = "IDENTITY_ENDPOINT";
/// Public-cloud Entra authority, used when neither the configuration nor the environment
/// names another.
const PUBLIC_AUTHORITY: &str = "https://login.microsoftonline.com/";
/// Every Azure VM (and so every AKS node) reports this DMI chassis asset tag; reading it is
/// how a process learns offline that IMDS should be reachable.
const AZURE_ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";
const ASSET_TAG_FILE: &str = "/sys/class/dmi/id/chassis_asset_tag";

/// Looks up an environment variable.
type Lookup = dyn Fn(&str) -> Option<String>;

/// What the start-up decisions look at. Tests build their own so that they never read or
/// change the process environment.
pub struct Environment {
    vars: Box<Lookup>,
    azure_vm: bool,
}

impl Environment {
    /// The environment variables of this process and its DMI asset tag.
    pub fn process() -> Self {
        let azure_vm = std::fs::read_to_string(ASSET_TAG_FILE)
            .map(|tag| tag.trim() == AZURE_ASSET_TAG)
            .unwrap_or(false);
        Environment {
            vars: Box::new(|key| std::env::var(key).ok()),
            azure_vm,
        }
    }

    /// An environment given by a lookup function, on an Azure VM or not.
    pub fn from_fn(vars: impl Fn(&str) -> Option<String> + 'static, azure_vm: bool) -> Self {
        Environment {
            vars: Box::new(vars),
            azure_vm,
        }
    }

    /// A variable's value; set-but-empty counts as unset, as in the Azure SDKs.
    fn var(&self, key: &str) -> Option<String> {
        (self.vars)(key).filter(|v| !v.is_empty())
    }

    /// Whether an `az` executable is in one of the `PATH` directories.
    fn az_on_path(&self) -> bool {
        let names: &[&str] = if cfg!(windows) {
            &["az.cmd", "az.exe"]
        } else {
            &["az"]
        };
        self.var("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| names.iter().any(|n| dir.join(n).is_file()))
        })
    }
}

/// Everything a fetch needs, resolved at start-up.
pub(super) enum Plan {
    ManagedIdentity {
        id: Option<UserAssignedId>,
    },
    WorkloadIdentity {
        tenant_id: String,
        client_id: String,
        token_file: PathBuf,
        authority: Url,
    },
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret: Secret,
        authority: Url,
    },
    ClientCertificate {
        tenant_id: String,
        client_id: String,
        path: PathBuf,
        authority: Url,
    },
    AzureCli {
        tenant_id: Option<String>,
    },
}

impl Plan {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Plan::ManagedIdentity { .. } => "managed-identity",
            Plan::WorkloadIdentity { .. } => "workload-identity",
            Plan::ClientSecret { .. } | Plan::ClientCertificate { .. } => "service-principal",
            Plan::AzureCli { .. } => "azure-cli",
        }
    }
}

/// Which kind `Auto` picks, and why each earlier one was passed over.
#[derive(Debug)]
pub(super) struct AutoChoice {
    pub kind: EntraKind,
    pub why: String,
    /// `(kind, reason)` for each kind tried before `kind`.
    pub skipped: Vec<(&'static str, String)>,
}

pub(super) fn auto_choice(config: &EntraConfig, env: &Environment) -> AutoChoice {
    let mut skipped = Vec::new();
    let chosen = |kind, why: &str, skipped| AutoChoice {
        kind,
        why: why.to_owned(),
        skipped,
    };
    if config.client_secret.is_some() || config.client_certificate.is_some() {
        return chosen(
            EntraKind::ServicePrincipal,
            "a client secret or certificate is configured",
            skipped,
        );
    }
    if env.var(AZURE_CLIENT_SECRET).is_some() || env.var(AZURE_CLIENT_CERTIFICATE_PATH).is_some() {
        return chosen(
            EntraKind::ServicePrincipal,
            "AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH is set",
            skipped,
        );
    }
    skipped.push((
        "service-principal",
        "neither AZURE_CLIENT_SECRET nor AZURE_CLIENT_CERTIFICATE_PATH is set".to_owned(),
    ));
    if env.var(AZURE_FEDERATED_TOKEN_FILE).is_some() {
        return chosen(
            EntraKind::WorkloadIdentity,
            "AZURE_FEDERATED_TOKEN_FILE is set",
            skipped,
        );
    }
    skipped.push((
        "workload-identity",
        "AZURE_FEDERATED_TOKEN_FILE not set".to_owned(),
    ));
    let why = if env.var(IDENTITY_ENDPOINT).is_some() {
        Some("IDENTITY_ENDPOINT is set")
    } else if config.object_id.is_some() || config.resource_id.is_some() {
        Some("a user-assigned identity object or resource id is configured")
    } else if env.azure_vm {
        Some("this machine is an Azure VM (DMI asset tag): IMDS")
    } else if !env.az_on_path() {
        Some("az is not on PATH: IMDS is the last resort")
    } else {
        None
    };
    if let Some(why) = why {
        return chosen(EntraKind::ManagedIdentity, why, skipped);
    }
    skipped.push((
        "managed-identity",
        "IDENTITY_ENDPOINT not set, not an Azure VM (no Azure DMI asset tag), and az is on PATH"
            .to_owned(),
    ));
    chosen(EntraKind::AzureCli, "az is on PATH", skipped)
}

pub(super) fn resolve(config: &EntraConfig, env: &Environment) -> Result<Plan, CredentialError> {
    let kind = match config.kind {
        EntraKind::Auto => {
            let choice = auto_choice(config, env);
            for (kind, reason) in &choice.skipped {
                tracing::info!(source = kind, why = %reason, "entra auto: skipped");
            }
            let chosen = match choice.kind {
                EntraKind::ServicePrincipal => "service-principal",
                EntraKind::WorkloadIdentity => "workload-identity",
                EntraKind::AzureCli => "azure-cli",
                EntraKind::ManagedIdentity | EntraKind::Auto => "managed-identity",
            };
            tracing::info!(source = chosen, why = %choice.why, "entra auto: chosen");
            choice.kind
        }
        kind => kind,
    };
    match kind {
        // `auto_choice` never answers `Auto`.
        EntraKind::ManagedIdentity | EntraKind::Auto => managed_identity(config, env),
        EntraKind::WorkloadIdentity => Ok(Plan::WorkloadIdentity {
            tenant_id: required(&config.tenant_id, env, AZURE_TENANT_ID, "workload identity")?,
            client_id: required(&config.client_id, env, AZURE_CLIENT_ID, "workload identity")?,
            token_file: env
                .var(AZURE_FEDERATED_TOKEN_FILE)
                .map(PathBuf::from)
                .ok_or_else(|| missing(AZURE_FEDERATED_TOKEN_FILE, "workload identity"))?,
            authority: authority(config, env)?,
        }),
        EntraKind::ServicePrincipal => service_principal(config, env),
        EntraKind::AzureCli => Ok(Plan::AzureCli {
            tenant_id: config.tenant_id.clone(),
        }),
    }
}

fn managed_identity(config: &EntraConfig, env: &Environment) -> Result<Plan, CredentialError> {
    let ids = [
        config.client_id.clone().map(UserAssignedId::ClientId),
        config.object_id.clone().map(UserAssignedId::ObjectId),
        config.resource_id.clone().map(UserAssignedId::ResourceId),
    ];
    let mut ids = ids.into_iter().flatten();
    let id = ids.next();
    if ids.next().is_some() {
        return Err(CredentialError::Config(
            "managed identity: give at most one of client id, object id and resource id".into(),
        ));
    }
    // azure_identity sends resource ids in the wrong parameter to App Service and refuses
    // them there; say so at start-up rather than on every fetch.
    if matches!(id, Some(UserAssignedId::ResourceId(_))) && env.var(IDENTITY_ENDPOINT).is_some() {
        return Err(CredentialError::Config(
            "managed identity: App Service (IDENTITY_ENDPOINT is set) does not accept a \
             resource id here; use the client id or object id"
                .into(),
        ));
    }
    Ok(Plan::ManagedIdentity { id })
}

fn service_principal(config: &EntraConfig, env: &Environment) -> Result<Plan, CredentialError> {
    let what = "service principal";
    let tenant_id = required(&config.tenant_id, env, AZURE_TENANT_ID, what)?;
    let client_id = required(&config.client_id, env, AZURE_CLIENT_ID, what)?;
    let authority = authority(config, env)?;
    let certificate = |path: PathBuf| -> Result<Plan, CredentialError> {
        // Read once now so that a wrong path or format stops the start; every fetch rereads it.
        assertion::CertificateSigner::read_blocking(&path).map_err(CredentialError::Config)?;
        Ok(Plan::ClientCertificate {
            tenant_id: tenant_id.clone(),
            client_id: client_id.clone(),
            path,
            authority: authority.clone(),
        })
    };
    let secret = |secret: Secret| Plan::ClientSecret {
        tenant_id: tenant_id.clone(),
        client_id: client_id.clone(),
        secret,
        authority: authority.clone(),
    };
    match (&config.client_secret, &config.client_certificate) {
        (Some(_), Some(_)) => Err(CredentialError::Config(
            "service principal: configure a client secret or a certificate, not both".into(),
        )),
        (Some(s), None) => Ok(secret(s.clone())),
        (None, Some(path)) => certificate(path.clone()),
        (None, None) => {
            if let Some(s) = env.var(AZURE_CLIENT_SECRET) {
                Ok(secret(Secret::new(s)))
            } else if let Some(path) = env.var(AZURE_CLIENT_CERTIFICATE_PATH) {
                certificate(PathBuf::from(path))
            } else {
                Err(CredentialError::Config(
                    "service principal: no client secret or certificate: set \
                     AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH, or configure one"
                        .into(),
                ))
            }
        }
    }
}

fn required(
    configured: &Option<String>,
    env: &Environment,
    var: &'static str,
    what: &str,
) -> Result<String, CredentialError> {
    configured
        .clone()
        .filter(|v| !v.is_empty())
        .or_else(|| env.var(var))
        .ok_or_else(|| missing(var, what))
}

fn missing(var: &str, what: &str) -> CredentialError {
    CredentialError::Config(format!(
        "{what}: {var} is not set and no value was configured"
    ))
}

/// The Entra authority: configured, else `AZURE_AUTHORITY_HOST`, else the public cloud. It
/// must be HTTPS (azure_identity refuses anything else; checked here to fail at start-up).
fn authority(config: &EntraConfig, env: &Environment) -> Result<Url, CredentialError> {
    let text = config
        .authority_host
        .clone()
        .filter(|v| !v.is_empty())
        .or_else(|| env.var(AZURE_AUTHORITY_HOST))
        .unwrap_or_else(|| PUBLIC_AUTHORITY.to_owned());
    let url = Url::parse(&text)
        .map_err(|e| CredentialError::Config(format!("authority host {text:?}: {e}")))?;
    if url.scheme() != "https" || url.host_str().is_none() {
        return Err(CredentialError::Config(format!(
            "authority host {text:?} must be an https:// URL"
        )));
    }
    Ok(url)
}

/// `{authority}/{tenant}/oauth2/v2.0/token`, built exactly as azure_identity builds it (any
/// path of the authority is replaced), so that a certificate assertion's `aud` matches.
pub(super) fn token_endpoint(authority: &Url, tenant_id: &str) -> Result<Url, String> {
    authority
        .join(&format!("/{tenant_id}/oauth2/v2.0/token"))
        .map_err(|e| format!("tenant id {tenant_id:?} does not fit in a URL: {e}"))
}
