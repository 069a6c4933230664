//! The certificate authority itself, without I/O: trust anchors, the issuer, and signing.
//!
//! An [`Authority`] is immutable and only exists once its material passed every check a peer
//! will make: the issuer is a CA, is valid now, its key fits its certificate, and a certificate
//! it signs verifies against the trust anchors with the same path building (rustls-webpki) the
//! proxies use. Replacing the issuer means building a new `Authority`; a material that fails
//! never replaces a working one.

pub mod csr;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use trellis_api::Identity;
pub use trellis_api::time::rfc3339;
use x509_parser::certificate::X509Certificate;

use self::csr::CheckedCsr;

/// How far `notBefore` is set in the past, so that a peer whose clock is a little behind
/// ours does not see a certificate that is "not yet valid".
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("trust anchors: {0}")]
    Anchors(String),
    #[error("issuer: {0}")]
    Issuer(String),
    #[error("cannot sign a certificate: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("cannot sign a certificate: {0}")]
    Other(String),
}

/// The PEM text the authority is built from, as stored in files or in a Secret
/// (`ca.crt`, `tls.crt`, `tls.key`).
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// One or more root certificates: every peer trusts each of them.
    pub anchors_pem: String,
    /// The issuer's certificate, optionally followed by further intermediates up to a root.
    pub issuer_cert_pem: String,
    /// The issuer's PKCS#8 private key.
    pub issuer_key_pem: String,
}

/// Keeps the issuer key out of logs.
impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("anchors_pem", &self.anchors_pem)
            .field("issuer_cert_pem", &self.issuer_cert_pem)
            .finish_non_exhaustive()
    }
}

/// The roots every peer trusts. Several are allowed so that a new root can be distributed
/// before the old one is retired.
#[derive(Clone, Debug)]
pub struct TrustAnchors {
    pem: String,
    certs: Vec<CertificateDer<'static>>,
}

impl TrustAnchors {
    pub fn from_pem(pem: &str) -> Result<Self, CaError> {
        let certs = parse_certs(pem).map_err(CaError::Anchors)?;
        for (i, der) in certs.iter().enumerate() {
            let cert = parse_x509(der).map_err(|e| CaError::Anchors(format!("#{}: {e}", i + 1)))?;
            if !is_ca(&cert) {
                return Err(CaError::Anchors(format!(
                    "#{} ({}) is not a CA certificate (basic constraints cA is not set)",
                    i + 1,
                    cert.subject()
                )));
            }
            webpki::anchor_from_trusted_cert(der)
                .map_err(|e| CaError::Anchors(format!("#{}: {e}", i + 1)))?;
        }
        Ok(TrustAnchors {
            pem: pem.to_string(),
            certs,
        })
    }

    /// The bundle as it was given: what proxies are configured with.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Verifies `leaf` through `intermediates` to one of the anchors at `now`, as a mesh peer
    /// does when it checks a client certificate.
    pub fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<(), webpki::Error> {
        let anchors = self
            .certs
            .iter()
            .map(webpki::anchor_from_trusted_cert)
            .collect::<Result<Vec<_>, _>>()?;
        let leaf = webpki::EndEntityCert::try_from(leaf)?;
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            unix_time(now),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
    }
}

/// A certificate the authority signed.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub not_after: SystemTime,
    /// Hex, for logs: a certificate can be found again by its serial.
    pub serial: String,
}

/// Checked trust anchors and issuer, ready to sign.
pub struct Authority {
    trust_domain: String,
    anchors: TrustAnchors,
    issuer: Issuer<'static, KeyPair>,
    /// The issuer and any further intermediates, without roots that are anchors anyway.
    chain: Vec<CertificateDer<'static>>,
    issuer_not_after: SystemTime,
    lifetime: Duration,
    material: Material,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("issuer_not_after", &self.issuer_not_after)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Checks `material` and builds the authority that signs for `trust_domain`, issuing
    /// certificates valid for `lifetime` (never beyond the issuer's own expiry).
    pub fn new(
        material: &Material,
        trust_domain: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let anchors = TrustAnchors::from_pem(&material.anchors_pem)?;
        let presented = parse_certs(&material.issuer_cert_pem).map_err(CaError::Issuer)?;
        let issuer_der = presented[0].clone();
        let issuer_cert = parse_x509(&issuer_der).map_err(CaError::Issuer)?;
        let subject = issuer_cert.subject().to_string();
        if !is_ca(&issuer_cert) {
            return Err(CaError::Issuer(format!(
                "{subject} is not a CA certificate (basic constraints cA is not set)"
            )));
        }
        if let Ok(Some(usage)) = issuer_cert.key_usage()
            && !usage.value.key_cert_sign()
        {
            return Err(CaError::Issuer(format!(
                "{subject} may not sign certificates (key usage lacks keyCertSign)"
            )));
        }
        let (not_before, not_after) = validity(&issuer_cert);
        if now >= not_after {
            return Err(CaError::Issuer(format!(
                "{subject} expired at {}",
                rfc3339(not_after)
            )));
        }
        if now < not_before {
            return Err(CaError::Issuer(format!(
                "{subject} is not valid before {}",
                rfc3339(not_before)
            )));
        }
        let key = KeyPair::from_pem(&material.issuer_key_pem).map_err(|e| {
            CaError::Issuer(format!(
                "the key is not a usable PKCS#8 PEM private key (BEGIN PRIVATE KEY; ECDSA or \
                 Ed25519): {e}"
            ))
        })?;
        if key.subject_public_key_info() != issuer_cert.public_key().raw {
            return Err(CaError::Issuer(format!(
                "the key does not belong to the certificate {subject}"
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&issuer_der, key)
            .map_err(|e| CaError::Issuer(format!("{subject}: {e}")))?;
        let chain: Vec<_> = presented
            .into_iter()
            .filter(|der| !anchors.certs.contains(der))
            .collect();
        let authority = Authority {
            trust_domain: trust_domain.to_string(),
            anchors,
            issuer,
            chain,
            issuer_not_after: not_after,
            lifetime,
            material: material.clone(),
        };
        // The decisive check: sign a throwaway certificate and verify it as a peer would.
        // This catches an issuer under another root, a broken intermediate, an expired root.
        let probe_key = KeyPair::generate()?;
        let probe_id = Identity::new(trust_domain, "trellis-probe", "trellis-probe");
        let probe = authority.sign(&probe_id, &probe_key, now)?;
        authority
            .anchors
            .verify(&probe.cert_der, &authority.chain, now)
            .map_err(|e| {
                CaError::Issuer(format!(
                    "{subject} does not chain to the trust anchors: a certificate it signs \
                     fails verification ({e})"
                ))
            })?;
        Ok(authority)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn anchors(&self) -> &TrustAnchors {
        &self.anchors
    }

    pub fn material(&self) -> &Material {
        &self.material
    }

    pub fn issuer_not_after(&self) -> SystemTime {
        self.issuer_not_after
    }

    /// The intermediates (PEM), issuer first, sent with every certificate.
    pub fn chain_pem(&self) -> Vec<String> {
        self.chain
            .iter()
            .map(|der| pem("CERTIFICATE", der))
            .collect()
    }

    pub fn chain_der(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Signs the workload certificate a checked CSR asks for. The caller has already matched
    /// the CSR's identity against the token.
    pub fn certify(&self, csr: &CheckedCsr, now: SystemTime) -> Result<Issued, CaError> {
        self.sign(csr.identity(), csr.public_key(), now)
    }

    /// Fresh parameters on the CA side: nothing the requester chose (subject, validity,
    /// extensions) is copied.
    fn sign(
        &self,
        identity: &Identity,
        public_key: &impl PublicKeyData,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        let uri = identity.to_string();
        let mut params = CertificateParams::default();
        // Empty subject: the identity is the URI SAN alone (rcgen then marks the SAN critical,
        // as RFC 5280 requires).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let not_after = self.expiry(now);
        params.not_before = now.checked_sub(BACKDATE).unwrap_or(now).into();
        params.not_after = not_after.into();
        let serial = random_serial()?;
        let serial_hex = hex(&serial);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            not_after,
            serial: serial_hex,
        })
    }

    /// `now + lifetime`, but never past the issuer's expiry: a chain is only as valid as its
    /// shortest-lived link.
    pub fn expiry(&self, now: SystemTime) -> SystemTime {
        (now + self.lifetime).min(self.issuer_not_after)
    }

    /// Identity's own TLS certificate for `names` (DNS names or IP addresses), with a fresh
    /// key that never leaves memory.
    pub fn serving_cert(
        &self,
        names: &[String],
        now: SystemTime,
    ) -> Result<(Arc<CertifiedKey>, SystemTime), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(name.as_str().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let not_after = self.expiry(now);
        params.not_before = now.checked_sub(BACKDATE).unwrap_or(now).into();
        params.not_after = not_after.into();
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        let key_der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| CaError::Other(format!("the serving key cannot be used: {e}")))?;
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(chain, key_der, &provider)
            .map_err(|e| CaError::Other(format!("the serving certificate cannot be used: {e}")))?;
        Ok((Arc::new(certified), not_after))
    }
}

/// All certificates of a PEM text, at least one.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate (BEGIN CERTIFICATE) found".to_string());
    }
    Ok(certs)
}

fn parse_x509<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing data after the certificate".to_string()),
        Err(e) => Err(format!("not an X.509 certificate: {e}")),
    }
}

fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

/// `(notBefore, notAfter)` of a certificate.
pub fn validity(cert: &X509Certificate<'_>) -> (SystemTime, SystemTime) {
    let at = |secs: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    (
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    )
}

/// `notAfter` of the first certificate of a PEM text.
pub fn not_after(pem: &str) -> Result<SystemTime, String> {
    let certs = parse_certs(pem)?;
    Ok(validity(&parse_x509(&certs[0])?).1)
}

pub fn unix_time(at: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).unwrap_or_default())
}

pub fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// 16 random bytes from the crypto provider, positive as DER requires: serials must not be
/// predictable (RFC 5280 §4.1.2.2, CA/B Forum ≥ 64 bits of randomness).
pub(crate) fn random_serial() -> Result<Vec<u8>, CaError> {
    let mut serial = vec![0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut serial)
        .map_err(|_| CaError::Other("the system random generator failed".to_string()))?;
    serial[0] &= 0x7f;
    // A leading zero byte would be dropped by DER, changing the length; keep 16 bytes.
    serial[0] |= 0x01;
    Ok(serial)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// DER to PEM, 64 characters a line.
pub fn pem(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
#[path = "ca_tests.rs"]
mod tests;
