//! The `fixed` source: one token given at start-up (from `REDIS_ENTRA_PROXY_TOKEN` or
//! `--token-file`), for development and for tokens managed entirely outside the proxy.

use super::{Token, TokenFuture, TokenSource};
use crate::secret::Secret;

#[derive(Debug)]
pub struct FixedSource {
    token: Secret,
}

impl FixedSource {
    pub fn new(token: Secret) -> Self {
        FixedSource { token }
    }
}

impl TokenSource for FixedSource {
    fn name(&self) -> &'static str {
        "fixed"
    }

    fn fetch(&self) -> TokenFuture<'_> {
        let token = Token {
            token: self.token.clone(),
            expires_at: None,
            username: None,
        };
        Box::pin(async move { Ok(token) })
    }

    fn refreshable(&self) -> bool {
        false
    }
}
