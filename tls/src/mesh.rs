//! Mutual TLS between mesh workloads: TLS 1.3 only, the post-quantum hybrid key exchange first,
//! and peers identified by the SPIFFE ID in their certificate's URI SAN.
//!
//! A client does not dial a DNS name but a peer whose identity it already knows (from discovery
//! for an endpoint, from configuration for the controller), so the server name it sends (SNI)
//! encodes that identity; the verifier turns it back into the SPIFFE ID the certificate must
//! carry exactly, after checking the chain to the trust anchors.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use trellis_api::Identity;

use crate::anchors::{LiveClientVerifier, Offered, TrustAnchors, client_sessions, server_sessions};

/// The ALPN protocol id of HTTP/2, which the controller's discovery port speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Why TLS cannot be set up or a peer is not who it must be.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the trust anchors hold no certificate")]
    NoAnchors,
    #[error("a trust anchor cannot be used: {0}")]
    Anchor(String),
    #[error("the certificate or key cannot be used: {0}")]
    Credentials(String),
    #[error("{peer} is not in the mesh's trust domain {trust_domain}")]
    ForeignPeer {
        peer: Identity,
        trust_domain: String,
    },
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// The crypto the mesh uses: aws-lc-rs, with X25519MLKEM768 preferred over X25519 and P-256.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.kx_groups = vec![
        rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
        rustls::crypto::aws_lc_rs::kx_group::X25519,
        rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
    ];
    Arc::new(p)
}

const SNI_SUFFIX: &str = "serviceaccount.identity";

/// The server name a client sends to reach `id`: `<sa>.<ns>.serviceaccount.identity.<td>`.
pub fn server_name(id: &Identity) -> Result<ServerName<'static>, TlsError> {
    let name = format!(
        "{}.{}.{SNI_SUFFIX}.{}",
        id.service_account, id.namespace, id.trust_domain
    );
    ServerName::try_from(name).map_err(|e| TlsError::Credentials(e.to_string()))
}

/// The identity a server name stands for (namespaces hold no dots; service accounts may).
fn identity_of_server_name(name: &ServerName<'_>, trust_domain: &str) -> Option<Identity> {
    let ServerName::DnsName(dns) = name else {
        return None;
    };
    let rest = dns
        .as_ref()
        .strip_suffix(trust_domain)?
        .strip_suffix('.')?
        .strip_suffix(SNI_SUFFIX)?
        .strip_suffix('.')?;
    let (sa, ns) = rest.rsplit_once('.')?;
    Some(Identity::new(trust_domain, ns, sa))
}

/// The SPIFFE ID in a certificate's URI SAN, when it has exactly one.
pub fn identity_of_cert(cert: &CertificateDer<'_>) -> Option<Identity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return None;
    };
    uri.parse().ok()
}

/// The workload's current certificate: replaced on renewal without rebuilding any config, so
/// new handshakes use the new one while established connections keep theirs.
#[derive(Debug)]
pub struct Credentials {
    /// A watch rather than a lock so that a client can wait for the first certificate.
    current: watch::Sender<Option<Installed>>,
}

/// A certificate in use, with its validity read from the leaf itself (not from what identity
/// said about it), so that readiness follows what peers will accept.
#[derive(Clone, Debug)]
struct Installed {
    key: Arc<CertifiedKey>,
    not_before: i64,
    not_after: i64,
}

/// Whether the workload holds a certificate peers accept now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateState {
    /// No certificate yet: identity has not answered.
    Missing,
    /// The certificate's validity starts at this Unix time (a clock behind the CA's).
    NotYetValid { not_before: i64 },
    /// The certificate expired at this Unix time and has not been renewed.
    Expired { not_after: i64 },
    /// Valid until this Unix time.
    Valid { not_after: i64 },
}

impl CertificateState {
    pub fn is_valid(&self) -> bool {
        matches!(self, CertificateState::Valid { .. })
    }
}

impl std::fmt::Display for CertificateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertificateState::Missing => f.write_str("no workload certificate yet"),
            CertificateState::NotYetValid { not_before } => write!(
                f,
                "the workload certificate is not valid before {not_before} (Unix time; is the clock behind?)"
            ),
            CertificateState::Expired { not_after } => write!(
                f,
                "the workload certificate expired at {not_after} (Unix time) and identity has not renewed it"
            ),
            CertificateState::Valid { not_after } => {
                write!(
                    f,
                    "the workload certificate is valid until {not_after} (Unix time)"
                )
            }
        }
    }
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            current: watch::Sender::new(None),
        }
    }
}

impl Credentials {
    /// Installs a chain (leaf first) and its key.
    pub fn set(
        &self,
        provider: &CryptoProvider,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::Credentials("the chain is empty".to_string()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| TlsError::Credentials(format!("the certificate does not parse: {e}")))?;
        let validity = parsed.validity();
        let (not_before, not_after) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Credentials(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signer);
        self.current.send_replace(Some(Installed {
            key: Arc::new(certified),
            not_before,
            not_after,
        }));
        Ok(())
    }

    /// Completes once a certificate is installed. Before that a client could only fail its
    /// handshakes, so one that must present a certificate (to the controller) waits here.
    pub async fn certified(&self) {
        // Cannot fail: `self` holds the sender.
        let _ = self.current.subscribe().wait_for(Option::is_some).await;
    }

    /// The state of the current certificate at Unix time `now`.
    pub fn state_at(&self, now: i64) -> CertificateState {
        match &*self.current.borrow() {
            None => CertificateState::Missing,
            Some(c) if now < c.not_before => CertificateState::NotYetValid {
                not_before: c.not_before,
            },
            // X.509's notAfter is the last valid second, as webpki counts it.
            Some(c) if now > c.not_after => CertificateState::Expired {
                not_after: c.not_after,
            },
            Some(c) => CertificateState::Valid {
                not_after: c.not_after,
            },
        }
    }

    /// The state of the current certificate now.
    pub fn state(&self) -> CertificateState {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.state_at(now)
    }

    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current.borrow().as_ref().map(|c| c.key.clone())
    }

    /// The current chain, leaf first, if a certificate is installed.
    pub fn chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.get().map(|k| k.cert.clone())
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

/// Checks a server's chain to the trust anchors in use and that its URI SAN is the identity the
/// client asked for.
#[derive(Debug)]
struct IdentityVerifier {
    anchors: Arc<TrustAnchors>,
    algs: WebPkiSupportedAlgorithms,
    trust_domain: String,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("bad peer certificate: {e}")))?;
        cert.verify_for_usage(
            self.algs.all,
            &self.anchors.current().anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        let expected =
            identity_of_server_name(server_name, &self.trust_domain).ok_or_else(|| {
                rustls::Error::General("the server name is not a mesh identity".to_string())
            })?;
        match identity_of_cert(end_entity) {
            Some(id) if id == expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext {
                    expected: server_name.to_owned(),
                    presented: vec![id.to_string()],
                },
            )),
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The mesh speaks TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client and server configurations for the hop between sidecars, sharing one set of
/// credentials.
#[derive(Clone, Debug)]
pub struct MeshTls {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
    pub credentials: Arc<Credentials>,
    /// What both sides verify peers with, replaceable while connections are open.
    pub anchors: Arc<TrustAnchors>,
    pub provider: Arc<CryptoProvider>,
    trust_domain: String,
}

impl MeshTls {
    /// Configurations trusting the PEM bundle `anchors_pem` (until
    /// [`MeshTls::offer_anchors`] replaces it); credentials are installed later.
    pub fn new(anchors_pem: &str, trust_domain: &str) -> Result<MeshTls, TlsError> {
        let provider = provider();
        let anchors = Arc::new(TrustAnchors::new(anchors_pem, provider.clone())?);
        let credentials = Arc::new(Credentials::default());
        let verifier = Arc::new(IdentityVerifier {
            anchors: anchors.clone(),
            algs: provider.signature_verification_algorithms,
            trust_domain: trust_domain.to_string(),
        });
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(credentials.clone());
        client.resumption = rustls::client::Resumption::store(client_sessions(anchors.clone()));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(LiveClientVerifier(anchors.clone())))
            .with_cert_resolver(credentials.clone());
        server.session_storage = server_sessions(anchors.clone());
        Ok(MeshTls {
            client: Arc::new(client),
            server: Arc::new(server),
            credentials,
            anchors,
            provider,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// Replaces the trust anchors of every configuration made from this one with the PEM
    /// bundle `pem`, for new handshakes, unless it is unusable or would not verify this
    /// workload's current certificate (see [`TrustAnchors::offer`]). `source` names where the
    /// bundle came from, for the log.
    pub fn offer_anchors(&self, pem: &str, source: &str) -> Offered {
        self.anchors.offer(pem, &self.credentials, source)
    }

    /// The configuration of a plain TLS server of the mesh, such as the controller's discovery
    /// port: no preamble, a client certificate that chains to the trust anchors required, this
    /// workload's certificate presented (renewals included), `alpn` offered in order.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let mut config = (*self.server).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A client for one mesh peer known by its identity rather than through discovery (the
    /// controller): it presents this workload's certificate and accepts only a server whose
    /// SPIFFE ID is exactly `peer`.
    pub fn peer_client(&self, peer: &Identity, alpn: &[&[u8]]) -> Result<PeerClient, TlsError> {
        // The verifier reads the expected identity back from the server name, in this
        // workload's trust domain only.
        if peer.trust_domain != self.trust_domain {
            return Err(TlsError::ForeignPeer {
                peer: peer.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let mut config = (*self.client).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(PeerClient {
            config: Arc::new(config),
            server_name: server_name(peer)?,
            peer: peer.clone(),
            credentials: self.credentials.clone(),
        })
    }
}

/// Mutual TLS to one peer of a known identity, with this workload's certificate.
#[derive(Clone, Debug)]
pub struct PeerClient {
    pub config: Arc<ClientConfig>,
    /// The name sent in the handshake; it encodes [`PeerClient::peer`].
    pub server_name: ServerName<'static>,
    pub peer: Identity,
    credentials: Arc<Credentials>,
}

impl PeerClient {
    /// Completes once this workload holds a certificate to present.
    pub async fn certified(&self) {
        self.credentials.certified().await;
    }

    /// The handshake over `io`; fails unless the server is [`PeerClient::peer`] and accepts
    /// this workload's certificate.
    pub async fn connect<IO>(&self, io: IO) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), io)
            .await
    }
}

#[cfg(test)]
#[path = "mesh_tests.rs"]
mod tests;
