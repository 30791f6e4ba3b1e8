//! `mint_token`: unsigned JWTs for the mock token issuer. The proxy reads claims (`oid`, `exp`)
//! but never verifies signatures, so `alg: none` is faithful enough; Redis treats the whole
//! token as an opaque password.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::{random_bytes, random_hex};

/// An unsigned JWT (`alg: none`) with the claims the proxy reads, and a random signature part
/// so it looks like a real three-part token and differs on every call.
pub fn mint_token(oid: &str, exp_unix: u64) -> String {
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = r#"{"alg":"none","typ":"JWT"}"#;
    let payload = serde_json::json!({
        "oid": oid,
        "exp": exp_unix,
        "iat": iat,
        "aud": "https://redis.azure.com",
        "tid": "dev-tenant",
        "jti": random_hex(16),
    });
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        URL_SAFE_NO_PAD.encode(random_bytes(32)),
    )
}
