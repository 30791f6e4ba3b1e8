//! Builds the configured [`TokenSource`] from the validated configuration,
//! and decides what `--credential auto` means: an explicit token, file or command wins;
//! otherwise the Entra chain (environment service principal, workload identity, managed
//! identity, Azure CLI) picks from the environment.

use std::path::Path;
use std::sync::Arc;

use super::azure::{self, EntraConfig, EntraKind};
use super::exec::{ExecSource, EXEC_TIMEOUT};
use super::file::{FieldPaths, FileSource};
use super::fixed::FixedSource;
use super::TokenSource;
use crate::cli::CredentialKind;
use crate::config::{read_secret_file, Config, ConfigError, TOKEN_ENV};
use crate::secret::Secret;

/// Environment variables holding a service principal's secret, in order of preference.
pub(crate) const CLIENT_SECRET_ENVS: [&str; 2] =
    ["REDIS_ENTRA_PROXY_CLIENT_SECRET", "AZURE_CLIENT_SECRET"];

pub fn from_config(config: &Config) -> Result<Arc<dyn TokenSource>, ConfigError> {
    let s = &config.sources;
    let kind = match config.credential {
        CredentialKind::Auto if config.token.is_some() || config.token_file.is_some() => {
            CredentialKind::Fixed
        }
        CredentialKind::Auto if s.credential_file.is_some() => CredentialKind::File,
        CredentialKind::Auto if s.credential_command.is_some() => CredentialKind::Exec,
        other => other,
    };
    if config.credential == CredentialKind::Auto && kind != CredentialKind::Auto {
        tracing::info!(
            chosen = kind.name(),
            "credential auto: using the token source configured explicitly"
        );
    }
    // Settings of another source than the one in use: a mistake, most likely.
    let ignored = [
        (
            kind != CredentialKind::Fixed && config.token_file.is_some(),
            "--token-file",
        ),
        (
            kind != CredentialKind::Fixed && config.token.is_some(),
            TOKEN_ENV,
        ),
        (
            kind != CredentialKind::File && s.credential_file.is_some(),
            "--credential-file",
        ),
        (
            kind != CredentialKind::Exec && s.credential_command.is_some(),
            "--credential-command",
        ),
    ];
    for (_, what) in ignored.iter().filter(|(unused, _)| *unused) {
        tracing::warn!(
            source = kind.name(),
            "{what} is set but ignored: the token source is {}",
            kind.name()
        );
    }
    let entra = |kind: EntraKind| -> Result<Arc<dyn TokenSource>, ConfigError> {
        let config = EntraConfig {
            kind,
            scope: s.scope.clone(),
            tenant_id: s.tenant_id.clone(),
            client_id: s.client_id.clone(),
            object_id: s.object_id.clone(),
            resource_id: s.resource_id.clone(),
            client_secret: client_secret(s.client_secret_file.as_deref())?,
            client_certificate: s.client_certificate_file.clone(),
            authority_host: s.authority_host.clone(),
            transport: None,
        };
        azure::source(config).map_err(|e| ConfigError::Invalid {
            option: "credential",
            reason: e.to_string(),
        })
    };
    match kind {
        CredentialKind::Fixed => fixed(config),
        CredentialKind::File => {
            let path = s.credential_file.clone().ok_or(ConfigError::Missing {
                option: "credential-file",
                hint: " for --credential file",
            })?;
            Ok(Arc::new(FileSource::new(path, field_paths(config)?)))
        }
        CredentialKind::Exec => {
            let command = s
                .credential_command
                .clone()
                .filter(|c| !c.trim().is_empty())
                .ok_or(ConfigError::Missing {
                    option: "credential-command",
                    hint: " for --credential exec (a command that prints the token)",
                })?;
            Ok(Arc::new(ExecSource::new(
                command,
                field_paths(config)?,
                EXEC_TIMEOUT,
            )))
        }
        CredentialKind::ManagedIdentity => entra(EntraKind::ManagedIdentity),
        CredentialKind::WorkloadIdentity => entra(EntraKind::WorkloadIdentity),
        CredentialKind::ServicePrincipal => entra(EntraKind::ServicePrincipal),
        CredentialKind::AzureCli => entra(EntraKind::AzureCli),
        CredentialKind::Auto => entra(EntraKind::Auto),
    }
}

fn field_paths(config: &Config) -> Result<FieldPaths, ConfigError> {
    let s = &config.sources;
    let defaults = FieldPaths::default();
    let paths = FieldPaths {
        username: s.json_username_path.clone().unwrap_or(defaults.username),
        access_token: s.json_token_path.clone().unwrap_or(defaults.access_token),
        expires_on: s.json_expiry_path.clone().unwrap_or(defaults.expires_on),
    };
    paths.validate().map_err(|e| ConfigError::Invalid {
        option: "json-token-path",
        reason: e.to_string(),
    })?;
    Ok(paths)
}

/// The service principal secret: from its file, else from the environment; never a flag.
fn client_secret(file: Option<&Path>) -> Result<Option<Secret>, ConfigError> {
    if let Some(path) = file {
        return read_secret_file(path, "client-secret-file").map(Some);
    }
    Ok(CLIENT_SECRET_ENVS
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        .map(Secret::new))
}

fn fixed(config: &Config) -> Result<Arc<dyn TokenSource>, ConfigError> {
    let token = match (&config.token, &config.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => read_secret_file(path, "token-file")?,
        (None, None) => {
            return Err(ConfigError::Missing {
                option: "token-file",
                hint: " for --credential fixed (or set REDIS_ENTRA_PROXY_TOKEN)",
            })
        }
    };
    if token.is_empty() {
        return Err(ConfigError::Invalid {
            option: "token-file",
            reason: format!("the token (from {TOKEN_ENV} or --token-file) is empty"),
        });
    }
    // A fixed token never changes: a missing username is a start-up error, not a retry loop.
    if config.username.is_none()
        && super::jwt::Claims::decode(&token)
            .and_then(|c| c.oid)
            .is_none()
    {
        return Err(ConfigError::Missing {
            option: "username",
            hint: ": the token is not a JWT with an `oid` claim",
        });
    }
    Ok(Arc::new(FixedSource::new(token)))
}
