//! Builds the configured [`TokenSource`](super::TokenSource) from the validated configuration.

use std::sync::Arc;

use super::fixed::FixedSource;
use super::TokenSource;
use crate::cli::CredentialKind;
use crate::config::{read_secret_file, Config, ConfigError, TOKEN_ENV};

pub fn from_config(config: &Config) -> Result<Arc<dyn TokenSource>, ConfigError> {
    match config.credential {
        CredentialKind::Fixed => {
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
            // A fixed token never changes: a missing username is a start-up error, not a
            // retry loop.
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
    }
}
