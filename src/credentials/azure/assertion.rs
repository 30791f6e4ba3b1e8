//! Service-principal certificate assertions, signed with ring: azure_identity's own certificate
//! credential needs OpenSSL, so the proxy builds the JWT itself and hands it to
//! `ClientAssertionCredential`.
//!
//! The assertion follows Entra's format: header `{"alg":"RS256","typ":"JWT","x5t":…,
//! "x5t#S256":…}` (SHA-1 and SHA-256 thumbprints of the DER certificate, base64url), claims
//! `aud` = the token endpoint, `iss` = `sub` = the client id, a random `jti`, `nbf` = `iat` =
//! now, `exp` = now + 10 minutes. Owns nothing else: reading the configuration is `plan.rs`'s job.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use azure_core::http::ClientMethodOptions;
use azure_identity::ClientAssertion;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{KeyPair, RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How long an assertion is valid: it is used within seconds, and 10 minutes is what
/// azure_identity and MSAL use.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

/// An RSA key and the thumbprints of its certificate.
pub(super) struct CertificateSigner {
    key: RsaKeyPair,
    /// base64url SHA-1 thumbprint of the DER certificate (`x5t`, understood everywhere).
    x5t: String,
    /// base64url SHA-256 thumbprint (`x5t#S256`, what Entra documents today).
    x5t_s256: String,
}

impl fmt::Debug for CertificateSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateSigner")
            .field("x5t#S256", &self.x5t_s256)
            .finish_non_exhaustive()
    }
}

/// A certificate and key file: a regular file of at most 1 MiB (a chain of certificates is a
/// few KiB).
fn read_pem(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    crate::secret::read_small_file(path, 1 << 20)
        .map_err(|e| format!("reading client certificate {}: {e}", path.display()))
}

impl CertificateSigner {
    /// Reads a PEM file holding the certificate and its private key.
    pub(super) async fn read(path: &Path) -> Result<Self, String> {
        let owned = path.to_owned();
        let pem = tokio::task::spawn_blocking(move || read_pem(&owned))
            .await
            .map_err(|e| format!("reading client certificate {}: {e}", path.display()))??;
        Self::from_pem(&pem, path)
    }

    /// [`read`](Self::read) for start-up, outside any runtime-sensitive path.
    pub(super) fn read_blocking(path: &Path) -> Result<Self, String> {
        Self::from_pem(&read_pem(path)?, path)
    }

    pub(super) fn from_pem(pem: &[u8], path: &Path) -> Result<Self, String> {
        let shown = path.display();
        if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(format!(
                "client certificate {shown} is not PEM; PKCS#12 (.pfx) files are not supported: \
                 convert with `openssl pkcs12 -in FILE.pfx -nodes -out FILE.pem`"
            ));
        }
        if pem.windows(21).any(|w| w == b"ENCRYPTED PRIVATE KEY") {
            return Err(format!(
                "client certificate {shown}: encrypted private keys are not supported"
            ));
        }
        let key = match PrivateKeyDer::from_pem_slice(pem) {
            Ok(PrivateKeyDer::Pkcs8(der)) => {
                RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| e.to_string())
            }
            Ok(PrivateKeyDer::Pkcs1(der)) => {
                RsaKeyPair::from_der(der.secret_pkcs1_der()).map_err(|e| e.to_string())
            }
            Ok(_) => Err("an EC key".to_owned()),
            Err(_) => return Err(format!("client certificate {shown} holds no private key")),
        }
        .map_err(|why| {
            format!(
                "client certificate {shown}: not a usable RSA private key ({why}); Entra ID \
                 certificate credentials need an RSA key"
            )
        })?;
        // The file may carry a chain: use the certificate holding this key's public key. The
        // certificate's SubjectPublicKeyInfo embeds the DER RSAPublicKey byte for byte.
        let public = key.public_key().as_ref();
        let mut certs = CertificateDer::pem_slice_iter(pem).peekable();
        if certs.peek().is_none() {
            return Err(format!("client certificate {shown} holds no CERTIFICATE"));
        }
        let cert = certs
            .filter_map(Result::ok)
            .find(|cert| cert.windows(public.len()).any(|w| w == public))
            .ok_or_else(|| {
                format!("client certificate {shown}: no certificate matches the private key")
            })?;
        Ok(CertificateSigner {
            x5t: URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &cert)),
            x5t_s256: URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, &cert)),
            key,
        })
    }

    /// A signed assertion for `client_id` to present to the token endpoint `audience`.
    pub(super) fn assertion(
        &self,
        client_id: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<String, String> {
        let rng = SystemRandom::new();
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the system clock is before 1970".to_owned())?
            .as_secs();
        let mut id = [0u8; 16];
        rng.fill(&mut id)
            .map_err(|_| "no randomness for the assertion id".to_owned())?;
        let header = serde_json::json!({
            "alg": "RS256",
            "typ": "JWT",
            "x5t": self.x5t,
            "x5t#S256": self.x5t_s256,
        });
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": uuid_v4(id),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &rng, signed.as_bytes(), &mut signature)
            .map_err(|_| "signing the client assertion failed".to_owned())?;
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// Random bytes formatted as a version-4 UUID, the customary `jti`.
fn uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// One assertion, made just before the credential that presents it.
pub(super) struct SignedAssertion(pub String);

impl fmt::Debug for SignedAssertion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SignedAssertion([redacted])")
    }
}

#[async_trait::async_trait]
impl ClientAssertion for SignedAssertion {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        Ok(self.0.clone())
    }
}
