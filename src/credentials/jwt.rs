//! Reads the claims the proxy needs (`oid`, `exp`) from a JWT access token, without checking
//! its signature: Redis validates the token; the proxy only needs the username and expiry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::Deserialize;

use crate::secret::Secret;

#[derive(Debug, Default, Deserialize)]
pub struct Claims {
    pub oid: Option<String>,
    pub exp: Option<u64>,
}

impl Claims {
    /// `None` when the token is not a JWT (three dot-separated parts with a JSON payload).
    pub fn decode(token: &Secret) -> Option<Claims> {
        let mut parts = token.expose().split('.');
        let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let payload = payload.trim_end_matches('=');
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn expires_at(&self) -> Option<SystemTime> {
        self.exp.map(|s| UNIX_EPOCH + Duration::from_secs(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> Secret {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        Secret::new(format!(
            "{}.{}.sig",
            e.encode("{\"alg\":\"none\"}"),
            e.encode(payload)
        ))
    }

    #[test]
    fn reads_oid_and_exp() {
        let c = Claims::decode(&jwt(r#"{"oid":"abc","exp":1700000000,"aud":"x"}"#)).unwrap();
        assert_eq!(c.oid.as_deref(), Some("abc"));
        assert_eq!(
            c.expires_at(),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
    }

    #[test]
    fn non_jwt_is_none() {
        for t in ["plainpassword", "a.b", "a.b.c.d", "a.!!!.c", "a.e30.c.d"] {
            assert!(Claims::decode(&Secret::new(t)).is_none(), "{t}");
        }
        assert!(Claims::decode(&jwt("not json")).is_none());
    }
}
