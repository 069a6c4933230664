//! Checks on a workload's certificate signing request.
//!
//! [`parse`] checks what can be checked without knowing who asks (the CSR is well-formed,
//! self-signed by its key, the key type is allowed, it asks for exactly one SPIFFE URI and
//! nothing else); [`CheckedCsr::check_identity`] then compares that URI with the identity the
//! token proved. Only the public key and the identity are used afterwards: everything else the
//! requester put in the CSR is ignored.

use rcgen::SubjectPublicKeyInfo;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use trellis_api::Identity;
use trellis_api::certify::ErrorCode;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

const EXPECTED: &str = "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>";

/// The key types a workload may use. RSA is refused: proxies generate ECDSA P-256 keys, and
/// RSA keys are larger and slower on every handshake for no gain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

/// Why a CSR is refused; [`CsrError::code`] maps it to the answer's code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is not PEM (expected -----BEGIN CERTIFICATE REQUEST-----): {0}")]
    NotPem(String),
    #[error("the CSR is not a valid PKCS#10 request: {0}")]
    Malformed(String),
    #[error("the CSR's signature does not verify with its own public key (tampered or corrupt)")]
    BadSignature,
    #[error("the CSR's key is {0}; only ECDSA P-256, ECDSA P-384 and Ed25519 keys are accepted")]
    UnsupportedKey(String),
    #[error("the CSR has no subject alternative name; it must ask for the URI {EXPECTED}")]
    NoSan,
    #[error("the CSR asks for {0}; the only name allowed is one URI {EXPECTED}")]
    OtherName(String),
    #[error("the CSR asks for {0} URIs; exactly one URI {EXPECTED} is allowed")]
    SeveralUris(usize),
    #[error("the CSR asks for the URI {0:?}, which is not of the form {EXPECTED}")]
    NotSpiffe(String),
    #[error(
        "the CSR asks for basic constraints ({0}); leave them out: identity only issues \
         end-entity certificates"
    )]
    BasicConstraints(String),
    #[error(
        "the CSR asks for trust domain {requested:?}, but this identity service signs for \
         {expected:?} (the CSR asks for {uri})"
    )]
    WrongTrustDomain {
        requested: String,
        expected: String,
        uri: String,
    },
    #[error("the CSR asks for {requested}, but the token belongs to {expected}")]
    WrongIdentity { requested: String, expected: String },
}

impl CsrError {
    pub fn code(&self) -> ErrorCode {
        match self {
            CsrError::UnsupportedKey(_) => ErrorCode::UnsupportedKey,
            CsrError::WrongTrustDomain { .. } | CsrError::WrongIdentity { .. } => {
                ErrorCode::IdentityMismatch
            }
            _ => ErrorCode::BadCsr,
        }
    }
}

/// A CSR that passed [`parse`]: its key and the identity it asks for.
#[derive(Clone, Debug)]
pub struct CheckedCsr {
    identity: Identity,
    key_type: KeyType,
    public_key: SubjectPublicKeyInfo,
}

impl CheckedCsr {
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    pub fn public_key(&self) -> &SubjectPublicKeyInfo {
        &self.public_key
    }

    /// The CSR must ask for exactly the identity the token proved.
    pub fn check_identity(&self, expected: &Identity) -> Result<(), CsrError> {
        if self.identity.trust_domain != expected.trust_domain {
            return Err(CsrError::WrongTrustDomain {
                requested: self.identity.trust_domain.clone(),
                expected: expected.trust_domain.clone(),
                uri: self.identity.to_string(),
            });
        }
        if &self.identity != expected {
            return Err(CsrError::WrongIdentity {
                requested: self.identity.to_string(),
                expected: expected.to_string(),
            });
        }
        Ok(())
    }
}

/// Checks a PEM CSR's form, signature, key type and requested names.
pub fn parse(pem: &str) -> Result<CheckedCsr, CsrError> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CsrError::NotPem(e.to_string()))?;
    let csr = match X509CertificationRequest::from_der(der.as_ref()) {
        Ok(([], csr)) => csr,
        Ok(_) => {
            return Err(CsrError::Malformed(
                "trailing data after the request".into(),
            ));
        }
        Err(e) => return Err(CsrError::Malformed(e.to_string())),
    };
    let spki = &csr.certification_request_info.subject_pki;
    let key_type = key_type(spki)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut names = Vec::new();
    for extension in csr.requested_extensions().into_iter().flatten() {
        match extension {
            ParsedExtension::SubjectAlternativeName(san) => {
                names.extend(san.general_names.iter().cloned());
            }
            ParsedExtension::BasicConstraints(bc) => {
                let what = if bc.ca { "cA: true" } else { "cA: false" };
                return Err(CsrError::BasicConstraints(what.to_string()));
            }
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::Malformed(format!(
                    "a requested extension cannot be parsed: {error}"
                )));
            }
            // Key usages and anything else requested are decided by identity, not copied.
            _ => {}
        }
    }
    let identity = requested_identity(&names)?;
    let public_key = SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| CsrError::UnsupportedKey(format!("unreadable ({e})")))?;
    Ok(CheckedCsr {
        identity,
        key_type,
        public_key,
    })
}

fn key_type(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<KeyType, CsrError> {
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok(KeyType::EcdsaP256),
            Some(c) if c == OID_NIST_EC_P384 => Ok(KeyType::EcdsaP384),
            Some(c) => Err(CsrError::UnsupportedKey(format!("ECDSA on curve {c}"))),
            None => Err(CsrError::UnsupportedKey(
                "ECDSA without a named curve".into(),
            )),
        };
    }
    if *algorithm == OID_SIG_ED25519 {
        return Ok(KeyType::Ed25519);
    }
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        return Err(CsrError::UnsupportedKey("RSA".into()));
    }
    Err(CsrError::UnsupportedKey(format!(
        "of algorithm {algorithm}"
    )))
}

fn requested_identity(names: &[GeneralName<'_>]) -> Result<Identity, CsrError> {
    if names.is_empty() {
        return Err(CsrError::NoSan);
    }
    if let Some(other) = names.iter().find(|n| !matches!(n, GeneralName::URI(_))) {
        return Err(CsrError::OtherName(describe(other)));
    }
    let [GeneralName::URI(uri)] = names else {
        return Err(CsrError::SeveralUris(names.len()));
    };
    uri.parse::<Identity>()
        .map_err(|_| CsrError::NotSpiffe(uri.to_string()))
}

fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(dns) => format!("the DNS name {dns:?}"),
        GeneralName::RFC822Name(mail) => format!("the email address {mail:?}"),
        GeneralName::IPAddress(ip) => {
            if let Ok(v4) = <[u8; 4]>::try_from(*ip) {
                format!("the IP address {}", std::net::Ipv4Addr::from(v4))
            } else if let Ok(v6) = <[u8; 16]>::try_from(*ip) {
                format!("the IP address {}", std::net::Ipv6Addr::from(v6))
            } else {
                "an IP address".to_string()
            }
        }
        other => format!("the name {other}"),
    }
}

#[cfg(test)]
#[path = "csr_tests.rs"]
mod tests;
