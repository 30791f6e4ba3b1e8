//! Credentials for the upstream and the sources that produce them.
//!
//! [`Credentials`] is what every session authenticates with: a username (the object id of the
//! identity) and an access token. A [`TokenSource`] fetches tokens; the refresher
//! ([`refresh`]) keeps the current credentials in a `watch` channel that sessions follow.
//! Only `credentials/azure.rs` (a later addition) may touch `azure_identity`.

pub mod azure;
pub mod child;
pub mod exec;
pub mod fanout;
pub mod file;
pub mod fixed;
pub mod jwt;
pub mod refresh;
pub mod source;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::BufMut;

use crate::resp::encode;
use crate::secret::Secret;

/// Scope of tokens for Azure Cache for Redis and Azure Managed Redis.
pub const DEFAULT_SCOPE: &str = "https://redis.azure.com/.default";

/// What a [`TokenSource`] returns.
#[derive(Debug, Clone)]
pub struct Token {
    pub token: Secret,
    /// When the token stops being valid, if known (from the source or the `exp` claim).
    pub expires_at: Option<SystemTime>,
    /// A username supplied by the source itself (file and exec sources may carry one).
    pub username: Option<String>,
}

/// The credentials sessions authenticate with.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub token: Secret,
    pub expires_at: Option<SystemTime>,
    /// Increases by one with every new token; sessions compare it to know whether they are
    /// authenticated with the newest credentials.
    pub generation: u64,
}

impl Credentials {
    /// Appends `AUTH <username> <token>` to `out`.
    pub fn write_auth(&self, out: &mut impl BufMut) {
        let args: [&[u8]; 3] = [
            b"AUTH",
            self.username.as_bytes(),
            self.token.expose().as_bytes(),
        ];
        encode::command(out, args.into_iter());
    }

    /// Time left before expiry; `None` for a token that does not expire.
    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        self.expires_at
            .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.remaining(now) == Some(Duration::ZERO)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("token", &self.token)
            .field("expires_at", &self.expires_at)
            .field("generation", &self.generation)
            .finish()
    }
}

/// Why a token could not be had. Messages never contain token text.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{0}")]
    Config(String),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("token source failed: {0}")]
    Source(String),
    #[error("token has no usable username: set --username, or use a JWT carrying an `oid` claim")]
    NoUsername,
}

/// Most of a token source's error text kept in logs and on `/readyz` and `/startupz`: an
/// identity endpoint may answer with a page of HTML, or echo what it was sent.
pub const MAX_ERROR_TEXT: usize = 400;

/// `text` fit to log and show: each of `secrets` (8 characters or more: shorter ones would
/// blank ordinary words), every JWT-shaped word (tokens, assertions), the word after
/// `Bearer` or `Basic`, and the value of a key that names a secret (`access_token=…`,
/// `"client_secret": "…"`, `password: …`) replaced by `[redacted]`, cut to
/// [`MAX_ERROR_TEXT`] bytes. For text that comes from outside (an endpoint's answer, a
/// command's stderr), which may quote a secret.
pub fn redact<S: AsRef<str>>(text: &str, secrets: &[S]) -> String {
    let mut text = text.to_owned();
    for secret in secrets.iter().map(AsRef::as_ref).filter(|s| s.len() >= 8) {
        text = text.replace(secret, "[redacted]");
    }
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    // Not a file or host name (`token.json: No such file`), which has a dot.
    let names_secret = |word: &str| {
        let word = word.to_ascii_lowercase();
        !word.contains('.')
            && [
                "token",
                "secret",
                "password",
                "passwd",
                "key",
                "assertion",
                "credential",
            ]
            .iter()
            .any(|k| word.contains(k))
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    let (mut after_bearer, mut after_key) = (false, false);
    while !rest.is_empty() {
        let start = rest.find(|c: char| is_token_char(c)).unwrap_or(rest.len());
        let between = &rest[..start];
        out.push_str(between);
        rest = &rest[start..];
        // `key=value`, `key: value`, `"key": "value"`: the value runs to a space, a quote or
        // a separator, whatever it holds (base64 has `+`, `/` and `=`).
        let keyed = after_key
            && between.contains(['=', ':'])
            && between
                .chars()
                .all(|c| matches!(c, '=' | ':' | '"' | '\'') || c.is_whitespace());
        if keyed && !rest.is_empty() {
            // A quoted value runs to its closing quote, spaces and all.
            let end = match between.trim_end().chars().last() {
                Some(q @ ('"' | '\'')) => rest.find(q),
                _ => rest.find(|c: char| {
                    c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '&' | ';' | '}')
                }),
            }
            .unwrap_or(rest.len());
            out.push_str("[redacted]");
            rest = &rest[end..];
            (after_bearer, after_key) = (false, false);
            continue;
        }
        let end = rest.find(|c: char| !is_token_char(c)).unwrap_or(rest.len());
        let word = &rest[..end];
        // A JWT starts with a base64url JSON header (`eyJ`); one cut short (an excerpt) has
        // fewer than its two dots, and its start still goes.
        let jwt = word.starts_with("eyJ") && (word.matches('.').count() >= 2 || word.len() >= 16);
        out.push_str(if jwt || (after_bearer && !word.is_empty()) {
            "[redacted]"
        } else {
            word
        });
        after_bearer = word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic");
        after_key = names_secret(word);
        rest = &rest[end..];
    }
    cut(&mut out, MAX_ERROR_TEXT);
    out
}

/// Cuts `text` to at most `max` bytes (on a character boundary), marking the cut with `…`.
pub fn cut(text: &mut String, max: usize) {
    if text.len() > max {
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
        text.push('…');
    }
}

pub type ChangedFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Token, CredentialError>> + Send + 'a>>;

/// A place tokens come from. Implementations live in `credentials/`, one file each.
pub trait TokenSource: Send + Sync + fmt::Debug {
    /// A short name for logs and metrics (`fixed`, `managed-identity`, …).
    fn name(&self) -> &'static str;
    /// Fetches a token. Called again whenever the refresher decides a new one is due.
    fn fetch(&self) -> TokenFuture<'_>;
    /// Whether fetching again can yield a new token. A fixed token is fetched once.
    fn refreshable(&self) -> bool {
        true
    }
    /// Resolves when the source knows a new token is available before the scheduled refresh
    /// (the file source, when its file changes). Never resolves by default.
    fn changed(&self) -> ChangedFuture<'_> {
        Box::pin(std::future::pending())
    }
}

/// Turns a fetched token into credentials: the configured username wins, then the source's
/// own, then the token's `oid` claim.
pub fn credentials_from(
    token: Token,
    username: Option<&str>,
    generation: u64,
) -> Result<Credentials, CredentialError> {
    let claims = jwt::Claims::decode(&token.token);
    let username = username
        .map(str::to_owned)
        .or(token.username)
        .or_else(|| claims.as_ref().and_then(|c| c.oid.clone()))
        .ok_or(CredentialError::NoUsername)?;
    let expires_at = token
        .expires_at
        .or_else(|| claims.and_then(|c| c.expires_at()));
    Ok(Credentials {
        username,
        token: token.token,
        expires_at,
        generation,
    })
}
