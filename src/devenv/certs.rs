//! `DevCerts`: a CA and a server certificate signed by it, generated fresh for every run so no
//! key material is ever checked in. Owns nothing else: writing the files is `server.rs`'s job.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::DevError;

/// CA + server certificate generated at run time with rcgen.
#[derive(Clone)]
pub struct DevCerts {
    /// The CA certificate clients trust.
    pub ca_pem: String,
    /// The server certificate, signed by the CA.
    pub cert_pem: String,
    /// The server's private key (PKCS#8); hidden from `Debug`.
    pub key_pem: String,
}

impl std::fmt::Debug for DevCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCerts")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl DevCerts {
    /// A fresh CA and a server cert signed by it, valid for exactly the given DNS names and IP
    /// addresses.
    pub fn generate(dns_names: &[&str], ips: &[IpAddr]) -> Result<DevCerts, DevError> {
        Self::build(dns_names, ips, &[ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// Like [`DevCerts::generate`], but the certificate is also valid as a TLS client
    /// certificate: cluster nodes present it to each other on the cluster bus, where Redis
    /// always asks the dialling node for a certificate (whatever `tls-auth-clients` says) and
    /// OpenSSL rejects one without the clientAuth purpose.
    pub fn generate_for_cluster(dns_names: &[&str], ips: &[IpAddr]) -> Result<DevCerts, DevError> {
        Self::build(
            dns_names,
            ips,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    fn build(
        dns_names: &[&str],
        ips: &[IpAddr],
        purposes: &[ExtendedKeyUsagePurpose],
    ) -> Result<DevCerts, DevError> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "redis-entra-proxy dev CA");
        let ca = ca_params.self_signed(&ca_key)?;

        let key = KeyPair::generate()?;
        let names: Vec<String> = dns_names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names)?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let cn = dns_names
            .first()
            .copied()
            .unwrap_or("redis-entra-proxy dev server");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = purposes.to_vec();
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        Ok(DevCerts {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
