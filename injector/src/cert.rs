//! The webhook's serving certificate: generated, checked, stored in a Secret, published in the
//! MutatingWebhookConfiguration's caBundle, and swapped into the TLS server without a restart.
//!
//! Everything here is pure; [`crate::cluster`] is the thin layer that talks to the API server.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, TestOperation};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

/// A generated certificate lives a year and is renewed in its last 30 days, so a renewal has
/// many reconcile rounds to succeed in.
pub const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Tolerates clocks of the API server and the injector that disagree a little.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Keys of the Secret, as cert-manager and `kubectl create secret tls` write them.
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
/// Marks Secrets the injector created and may therefore renew; anybody else's is only read.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "trellis-injector";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("the private key does not fit the certificate or cannot be used: {0}")]
    Key(#[from] rustls::Error),
}

/// A serving certificate, its key and the CA bundle clients should trust, all PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

/// Keeps the private key out of logs.
impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("cert_pem", &self.cert_pem)
            .field("ca_pem", &self.ca_pem)
            .finish_non_exhaustive()
    }
}

/// The names the API server may use for the webhook's Service; it uses `<svc>.<ns>.svc`.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
    ]
}

/// A fresh self-signed CA and a serving certificate it signs. `previous_ca` (the bundle being
/// replaced) keeps its first, current CA in the new bundle while it is still valid, so clients
/// that still hold the old caBundle keep verifying during a renewal.
pub fn generate(
    names: &[String],
    now: SystemTime,
    previous_ca: Option<&str>,
) -> Result<ServingCert, CertError> {
    let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
    let not_after = now + VALIDITY;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = name("trellis-injector CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = not_before.into();
    ca_params.not_after = not_after.into();
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name = name(
        names
            .last()
            .map(String::as_str)
            .unwrap_or("trellis-injector"),
    );
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let cert = params.signed_by(&key, &issuer)?;

    let mut ca_pem = ca_cert.pem();
    if let Some(previous) = previous_ca.and_then(|bundle| first_valid_cert(bundle, now)) {
        ca_pem.push_str(&previous);
    }
    Ok(ServingCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ca_pem,
    })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The first certificate of a bundle as PEM, if it is still valid at `now`.
fn first_valid_cert(bundle: &str, now: SystemTime) -> Option<String> {
    let der = CertificateDer::pem_slice_iter(bundle.as_bytes())
        .next()?
        .ok()?;
    let info = inspect_der(&der).ok()?;
    (info.not_after > now).then(|| pem("CERTIFICATE", &der))
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// What matters about a serving certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspection {
    pub not_after: SystemTime,
    pub dns_names: Vec<String>,
}

/// Reads the first certificate of a PEM chain.
pub fn inspect(cert_pem: &str) -> Result<Inspection, CertError> {
    let der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .next()
        .ok_or_else(|| CertError::Invalid("no PEM certificate found".to_string()))?
        .map_err(|e| CertError::Invalid(format!("not a PEM certificate: {e}")))?;
    inspect_der(&der)
}

fn inspect_der(der: &[u8]) -> Result<Inspection, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertError::Invalid(format!("not an X.509 certificate: {e}")))?;
    let secs = cert.validity().not_after.timestamp();
    let not_after = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(Inspection {
        not_after,
        dns_names,
    })
}

/// Why a certificate should be replaced, or `None` while it is fine.
pub fn renewal_reason(cert: &ServingCert, names: &[String], now: SystemTime) -> Option<String> {
    let info = match inspect(&cert.cert_pem) {
        Ok(info) => info,
        Err(e) => return Some(e.to_string()),
    };
    if info.not_after <= now + RENEW_BEFORE {
        return Some("it expires within 30 days".to_string());
    }
    if let Some(missing) = names.iter().find(|n| !info.dns_names.contains(n)) {
        return Some(format!("it is not valid for {missing}"));
    }
    None
}

/// The Secret that stores a generated certificate.
pub fn to_secret(name: &str, namespace: &str, cert: &ServingCert) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY.to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(BTreeMap::from([
            (TLS_CRT.to_string(), bytes(&cert.cert_pem)),
            (TLS_KEY.to_string(), bytes(&cert.key_pem)),
            (CA_CRT.to_string(), bytes(&cert.ca_pem)),
        ])),
        ..Default::default()
    }
}

/// Reads a certificate Secret (ours, cert-manager's or `kubectl create secret tls`'s) and checks
/// that the key fits the certificate.
pub fn from_secret(secret: &Secret) -> Result<ServingCert, CertError> {
    let data = secret.data.as_ref();
    let field = |key: &str| -> Result<String, CertError> {
        let bytes = data
            .and_then(|d| d.get(key))
            .ok_or_else(|| CertError::Invalid(format!("it has no {key}")))?;
        String::from_utf8(bytes.0.clone())
            .map_err(|_| CertError::Invalid(format!("its {key} is not PEM text")))
    };
    let cert = ServingCert {
        cert_pem: field(TLS_CRT)?,
        key_pem: field(TLS_KEY)?,
        ca_pem: field(CA_CRT).unwrap_or_default(),
    };
    certified_key(&cert.cert_pem, &cert.key_pem)?;
    Ok(cert)
}

/// Whether the injector created this Secret and so may replace it.
pub fn is_managed(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

/// The JSON patch that makes every webhook of the configuration trust `ca_pem`, or `None` when
/// each already does. Each change is guarded by a `test` of the webhook's name, so a
/// configuration reordered in the meantime makes the patch fail instead of fixing the wrong
/// entry.
pub fn ca_bundle_patch(
    current: &MutatingWebhookConfiguration,
    ca_pem: &str,
) -> Option<json_patch::Patch> {
    let mut ops = Vec::new();
    for (i, webhook) in current.webhooks.iter().flatten().enumerate() {
        let have = webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice());
        if have == Some(ca_pem.as_bytes()) {
            continue;
        }
        let index = i.to_string();
        ops.push(PatchOperation::Test(TestOperation {
            path: PointerBuf::from_tokens(["webhooks", index.as_str(), "name"]),
            value: Value::String(webhook.name.clone()),
        }));
        ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["webhooks", index.as_str(), "clientConfig", "caBundle"]),
            value: Value::String(BASE64.encode(ca_pem)),
        }));
    }
    (!ops.is_empty()).then_some(json_patch::Patch(ops))
}

/// Parses a PEM chain and key into what rustls serves, checking that they belong together.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, CertError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Invalid(format!("the certificate is not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(CertError::Invalid("no PEM certificate found".to_string()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CertError::Invalid(format!("the private key is not PEM: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider)?))
}

/// The certificate the TLS server presents; replaced in place on renewal or file change, so
/// new handshakes get the new certificate and open connections are not disturbed.
#[derive(Debug)]
pub struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Resolver {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Resolver {
            current: RwLock::new(key),
        })
    }

    pub fn set(&self, key: Arc<CertifiedKey>) {
        // A poisoned lock only means a writer panicked mid-assignment of an Arc: the value is
        // still a whole Arc, so keep going.
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        *current = key;
    }

    pub fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// TLS 1.2 and 1.3 with ring, HTTP/2 preferred (the API server speaks both).
pub fn server_config(resolver: Arc<Resolver>) -> Result<rustls::ServerConfig, CertError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
#[path = "cert_tests.rs"]
mod tests;
