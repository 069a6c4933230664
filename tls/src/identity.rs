//! A workload's identity (a sidecar's, or the controller's): a key pair made in memory,
//! certified by the mesh CA with the pod's service-account token, renewed at about 70 % of the
//! certificate's lifetime.
//!
//! The key never leaves the process. While identity is unreachable the current certificate
//! keeps serving; renewal retries with backoff until it succeeds. Once the certificate has
//! expired, `trellis_identity_certificate_valid` drops to 0 (and the proxy reports not-ready):
//! peers refuse an expired certificate, so the pod must leave its Services' endpoints.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use trellis_api::Identity;
use trellis_api::certify::{CERTIFY_PATH, CertifyError, CertifyRequest, CertifyResponse};

use crate::mesh::{Credentials, MeshTls};

/// Where identity is and how to prove who this pod is.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// `host:port` of the certify endpoint.
    pub addr: String,
    /// The DNS name identity's serving certificate carries.
    pub server_name: String,
    pub token_path: PathBuf,
    pub identity: Identity,
}

/// Why one certify attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum CertifyFailure {
    #[error("cannot read the service-account token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build the certificate request: {0}")]
    Csr(String),
    #[error("cannot reach identity at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("identity refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("identity's answer cannot be used: {0}")]
    BadAnswer(String),
}

#[derive(Clone, Debug, Default)]
struct IdentityMetrics {
    expiry: Gauge,
    renewals: Counter,
    failures: Counter,
}

/// Registers the identity metrics and returns the task that keeps the sidecar certified;
/// `ready` turns true with the first certificate.
pub fn start(
    cfg: IdentityConfig,
    tls: MeshTls,
    ready: Arc<AtomicBool>,
    registry: &mut Registry,
) -> impl Future<Output = ()> + use<> {
    let metrics = IdentityMetrics::default();
    registry.register(
        "trellis_identity_certificate_expiry_timestamp_seconds",
        "Unix time the sidecar's current certificate expires",
        metrics.expiry.clone(),
    );
    registry.register(
        "trellis_identity_renewals",
        "Certificates obtained from identity",
        metrics.renewals.clone(),
    );
    registry.register(
        "trellis_identity_failures",
        "Failed attempts to obtain a certificate",
        metrics.failures.clone(),
    );
    registry.register_collector(Box::new(CertificateValid(tls.credentials.clone())));
    tls.anchors.register(registry);
    async move {
        let mut backoff = Duration::from_millis(500);
        loop {
            match certify(&cfg, &tls).await {
                Ok(expires_at) => {
                    metrics.renewals.inc();
                    metrics
                        .expiry
                        .set(i64::try_from(expires_at).unwrap_or(i64::MAX));
                    ready.store(true, Ordering::Release);
                    backoff = Duration::from_millis(500);
                    let wait = renew_in(expires_at, now_secs());
                    tracing::info!(identity = %cfg.identity, expires_at, renew_in = ?wait, "certified");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    metrics.failures.inc();
                    tracing::warn!(error = %e, retry_in = ?backoff, "certification failed; the current certificate keeps serving");
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// `trellis_identity_certificate_valid`, read from the credentials at each scrape: a gauge
/// set by the renewal loop would lag behind an expiry that happens while the loop sleeps.
#[derive(Debug)]
struct CertificateValid(Arc<Credentials>);

impl Collector for CertificateValid {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(i64::from(self.0.state().is_valid()));
        let metric = encoder.encode_descriptor(
            "trellis_identity_certificate_valid",
            "1 while the sidecar holds a certificate that is valid now, else 0",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Renew at 65–75 % of the remaining lifetime: early enough to ride out an identity outage,
/// spread so that pods started together do not renew together.
pub fn renew_in(expires_at: u64, now: u64) -> Duration {
    let left = expires_at.saturating_sub(now);
    let share = 0.65 + fastrand::f64() * 0.10;
    Duration::from_secs_f64(left as f64 * share).max(Duration::from_millis(200))
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// One certification: new key, CSR, certify call, credentials installed. Returns the expiry.
pub async fn certify(cfg: &IdentityConfig, tls: &MeshTls) -> Result<u64, CertifyFailure> {
    let token = tokio::fs::read_to_string(&cfg.token_path)
        .await
        .map_err(|source| CertifyFailure::Token {
            path: cfg.token_path.clone(),
            source,
        })?;
    let key = rcgen::KeyPair::generate().map_err(|e| CertifyFailure::Csr(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| CertifyFailure::Csr(e.to_string()))?;
    let uri = rcgen::string::Ia5String::try_from(cfg.identity.to_string())
        .map_err(|e| CertifyFailure::Csr(e.to_string()))?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| CertifyFailure::Csr(e.to_string()))?;
    let body = serde_json::to_vec(&CertifyRequest {
        csr,
        token: token.trim().to_string(),
    })
    .map_err(|e| CertifyFailure::Csr(e.to_string()))?;
    let answer = post(cfg, tls, Bytes::from(body)).await?;
    let mut chain = vec![
        CertificateDer::from_pem_slice(answer.certificate.as_bytes())
            .map_err(|e| CertifyFailure::BadAnswer(e.to_string()))?,
    ];
    for pem in &answer.chain {
        chain.push(
            CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| CertifyFailure::BadAnswer(e.to_string()))?,
        );
    }
    if crate::mesh::identity_of_cert(&chain[0]).as_ref() != Some(&cfg.identity) {
        return Err(CertifyFailure::BadAnswer(
            "the certificate is not for this pod's identity".to_string(),
        ));
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    tls.credentials
        .set(&tls.provider, chain, key)
        .map_err(|e| CertifyFailure::BadAnswer(e.to_string()))?;
    Ok(answer.expires_at)
}

/// POSTs the request over TLS to identity, trusting the mesh's anchors in use: after a root
/// rotation identity's serving certificate chains to the new root.
async fn post(
    cfg: &IdentityConfig,
    tls: &MeshTls,
    body: Bytes,
) -> Result<CertifyResponse, CertifyFailure> {
    let unreachable = |reason: String| CertifyFailure::Unreachable {
        addr: cfg.addr.clone(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in tls.anchors.current().certificates() {
        roots
            .add(cert.clone())
            .map_err(|e| unreachable(format!("bad trust anchor: {e}")))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::mesh::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| unreachable(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name =
        ServerName::try_from(cfg.server_name.clone()).map_err(|e| unreachable(e.to_string()))?;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(&cfg.addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(format!("TLS: {e}")))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::post(CERTIFY_PATH)
            .header(header::HOST, cfg.server_name.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| unreachable(e.to_string()))?;
        let res = send
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = res.status();
        let bytes = Limited::new(res.into_body(), 1024 * 1024)
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<CertifyError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(CertifyFailure::Refused {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice::<CertifyResponse>(&bytes)
            .map_err(|e| CertifyFailure::BadAnswer(e.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| unreachable("no answer within 10s".to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_about_seventy_percent() {
        for _ in 0..100 {
            let d = renew_in(1_000 + 100, 1_000);
            assert!((65..=75).contains(&d.as_secs()), "{d:?}");
        }
        // An expired or nearly expired certificate is renewed at once.
        assert_eq!(renew_in(10, 20), Duration::from_millis(200));
    }
}
