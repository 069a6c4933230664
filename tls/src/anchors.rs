//! The trust anchors a workload verifies peers with, replaceable while it runs.
//!
//! Rotating the mesh's root (add the new root to the bundle, switch the issuer, remove the old
//! root) must not need a restart of every pod. The verifiers of [`MeshTls`](crate::MeshTls)
//! read the current set at each handshake, so a new set applies to new connections while
//! established ones keep the handshake they made.
//!
//! A new set is refused, and the old one stays, when it holds no certificate, does not parse,
//! or would not verify this workload's own current certificate: peers that trust what this
//! workload trusts must still accept it, or the mesh would split in two.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use rustls::DigitallySignedStruct;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier};
use rustls::{DistinguishedName, NamedGroup, RootCertStore, SignatureScheme};
use tokio::sync::watch;

use crate::mesh::{Credentials, TlsError};

/// One parsed bundle of trust anchors, and the client-certificate verifier built from it.
pub struct AnchorSet {
    pem: String,
    certs: Vec<CertificateDer<'static>>,
    pub(crate) anchors: Vec<TrustAnchor<'static>>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    /// The earliest notAfter of the anchors (Unix time).
    expires_at: i64,
}

impl std::fmt::Debug for AnchorSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnchorSet")
            .field("certificates", &self.certs.len())
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl AnchorSet {
    /// Parses a PEM bundle: at least one certificate, each usable as a trust anchor.
    pub fn parse(pem: &str, provider: &Arc<CryptoProvider>) -> Result<AnchorSet, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Anchor(e.to_string()))?;
        if certs.is_empty() {
            return Err(TlsError::NoAnchors);
        }
        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        let mut expires_at = i64::MAX;
        for cert in &certs {
            roots
                .add(cert.clone())
                .map_err(|e| TlsError::Anchor(e.to_string()))?;
            anchors.push(
                webpki::anchor_from_trusted_cert(cert)
                    .map_err(|e| TlsError::Anchor(e.to_string()))?
                    .to_owned(),
            );
            let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
                .map_err(|e| TlsError::Anchor(e.to_string()))?;
            expires_at = expires_at.min(parsed.validity().not_after.timestamp());
        }
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Anchor(e.to_string()))?;
        Ok(AnchorSet {
            pem: pem.to_string(),
            certs,
            anchors,
            client_verifier,
            expires_at,
        })
    }

    /// The bundle as it was given.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The anchors' certificates.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// The earliest notAfter of the anchors, as Unix time.
    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }

    /// Whether `chain` (leaf first) chains to one of these anchors now, for a client.
    fn verifies(&self, chain: &[CertificateDer<'static>]) -> Result<(), String> {
        let (leaf, intermediates) = chain.split_first().ok_or("the chain is empty")?;
        let leaf = webpki::EndEntityCert::try_from(leaf).map_err(|e| e.to_string())?;
        let now = UnixTime::now();
        let algs = crate::mesh::provider().signature_verification_algorithms;
        leaf.verify_for_usage(
            algs.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }
}

/// What became of a bundle offered with [`TrustAnchors::offer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offered {
    /// The bundle is now in use.
    Applied,
    /// The bundle holds the certificates already in use.
    Unchanged,
    /// The bundle was refused; the anchors in use stay.
    Refused(RefusedBundle),
}

/// Why a bundle was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefusedBundle {
    /// Empty, not PEM, or a certificate that cannot be an anchor.
    #[error("the bundle cannot be used: {0}")]
    Invalid(String),
    /// It would not verify the workload's own current certificate: it may once the
    /// certificate is renewed by the new issuer, so offering it again later makes sense.
    #[error("the bundle does not verify this workload's own certificate: {0}")]
    NotOwnChain(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The trust anchors in use, shared by every verifier of a workload.
pub struct TrustAnchors {
    current: watch::Sender<Arc<AnchorSet>>,
    /// Counts replacements, so that session caches know when to forget.
    generation: AtomicU64,
    provider: Arc<CryptoProvider>,
    updates: Family<ResultLabel, Counter>,
    /// The last refused bundle and why, so that a bundle offered again and again (a polled file,
    /// a retry after renewal) is logged and counted once.
    last_refused: Mutex<Option<(String, RefusedBundle)>>,
}

impl std::fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("current", &*self.current.borrow())
            .finish_non_exhaustive()
    }
}

impl TrustAnchors {
    /// The bootstrap set, from the workload's configuration.
    pub fn new(pem: &str, provider: Arc<CryptoProvider>) -> Result<TrustAnchors, TlsError> {
        let set = AnchorSet::parse(pem, &provider)?;
        Ok(TrustAnchors {
            current: watch::Sender::new(Arc::new(set)),
            generation: AtomicU64::new(0),
            provider,
            updates: Family::default(),
            last_refused: Mutex::new(None),
        })
    }

    /// The set in use now; a handshake takes it once.
    pub fn current(&self) -> Arc<AnchorSet> {
        self.current.borrow().clone()
    }

    /// The set in use, and each new one, for a server that hands the bundle on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AnchorSet>> {
        self.current.subscribe()
    }

    /// Replaces the anchors with `pem` (from `source`, for the log) unless the bundle is
    /// unusable or would not verify `own`'s certificate. Applied and refused bundles are logged
    /// and counted; the same refusal twice in a row only once.
    pub fn offer(&self, pem: &str, own: &Credentials, source: &str) -> Offered {
        let outcome = self.check(pem, own);
        match &outcome {
            Ok(None) => Offered::Unchanged,
            Ok(Some(set)) => {
                let (count, expires_at) = (set.certs.len(), set.expires_at);
                self.current.send_replace(set.clone());
                self.generation.fetch_add(1, Ordering::AcqRel);
                *self.refused() = None;
                self.updates
                    .get_or_create(&ResultLabel { result: "applied" })
                    .inc();
                tracing::info!(
                    source,
                    anchors = count,
                    expires_at,
                    "trust anchors replaced: new connections verify peers with the new set"
                );
                Offered::Applied
            }
            Err(why) => {
                let mut last = self.refused();
                let repeated = last
                    .as_ref()
                    .is_some_and(|(p, w)| p.as_str() == pem && w == why);
                if !repeated {
                    self.updates
                        .get_or_create(&ResultLabel { result: "refused" })
                        .inc();
                    tracing::warn!(source, error = %why, "trust anchors refused; the anchors in use stay");
                    *last = Some((pem.to_string(), why.clone()));
                }
                Offered::Refused(why.clone())
            }
        }
    }

    /// Counts and logs a bundle that could not even be read (`why`), from `source`.
    pub fn refuse(&self, why: &str, source: &str) {
        self.updates
            .get_or_create(&ResultLabel { result: "refused" })
            .inc();
        tracing::warn!(
            source,
            error = why,
            "trust anchors refused; the anchors in use stay"
        );
    }

    /// The new set, `None` when it holds the same certificates as the current one.
    fn check(&self, pem: &str, own: &Credentials) -> Result<Option<Arc<AnchorSet>>, RefusedBundle> {
        let set = AnchorSet::parse(pem, &self.provider)
            .map_err(|e| RefusedBundle::Invalid(e.to_string()))?;
        if let Some(chain) = own.chain() {
            set.verifies(&chain).map_err(RefusedBundle::NotOwnChain)?;
        }
        if set.certs == self.current.borrow().certs {
            return Ok(None);
        }
        Ok(Some(Arc::new(set)))
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, Option<(String, RefusedBundle)>> {
        // Assigned whole: a panic cannot leave it half-written.
        self.last_refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `trellis_identity_trust_anchor_expiry_timestamp_seconds` (read at each
    /// scrape) and `trellis_identity_trust_anchor_updates_total{result}`.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        for result in ["applied", "refused"] {
            // Both series exist from the start, so that a rate over them is defined.
            let _ = self.updates.get_or_create(&ResultLabel { result });
        }
        registry.register(
            "trellis_identity_trust_anchor_updates",
            "Trust anchor bundles received that changed the anchors (applied) or were refused",
            self.updates.clone(),
        );
        registry.register_collector(Box::new(AnchorExpiry(self.clone())));
    }
}

/// `trellis_identity_trust_anchor_expiry_timestamp_seconds`, read from the set in use.
#[derive(Debug)]
struct AnchorExpiry(Arc<TrustAnchors>);

impl Collector for AnchorExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(self.0.current().expires_at);
        let metric = encoder.encode_descriptor(
            "trellis_identity_trust_anchor_expiry_timestamp_seconds",
            "Unix time the first of the trust anchors in use expires",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// Verifies client certificates with the set in use at each handshake.
#[derive(Debug)]
pub(crate) struct LiveClientVerifier(pub(crate) Arc<TrustAnchors>);

impl ClientCertVerifier for LiveClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would borrow from a set that may be replaced; mesh clients have one
        // certificate and ignore them.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().client_verifier.supported_verify_schemes()
    }
}

/// How many sessions each side keeps for resumption (rustls's default).
const SESSIONS: usize = 256;

/// A session cache that forgets every session when the anchors change: a resumed handshake
/// skips the peer's certificate, which the new anchors might refuse.
#[derive(Debug)]
struct Forgetful<C> {
    anchors: Arc<TrustAnchors>,
    cache: Mutex<(u64, Arc<C>)>,
    new: fn() -> Arc<C>,
}

impl<C> Forgetful<C> {
    fn new(anchors: Arc<TrustAnchors>, new: fn() -> Arc<C>) -> Self {
        let generation = anchors.generation();
        Forgetful {
            anchors,
            cache: Mutex::new((generation, new())),
            new,
        }
    }

    fn get(&self) -> Arc<C> {
        let generation = self.anchors.generation();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != generation {
            *cache = (generation, (self.new)());
        }
        cache.1.clone()
    }
}

/// The client's session cache, emptied when the anchors change.
pub(crate) fn client_sessions(anchors: Arc<TrustAnchors>) -> Arc<dyn ClientSessionStore> {
    Arc::new(Forgetful::new(anchors, || {
        Arc::new(ClientSessionMemoryCache::new(SESSIONS))
    }))
}

/// The server's session cache, emptied when the anchors change.
pub(crate) fn server_sessions(anchors: Arc<TrustAnchors>) -> Arc<dyn StoresServerSessions> {
    Arc::new(Forgetful::new(anchors, || {
        ServerSessionMemoryCache::new(SESSIONS)
    }))
}

impl ClientSessionStore for Forgetful<ClientSessionMemoryCache> {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.get().set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.get().kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.get().set_tls12_session(server_name, value);
    }

    fn tls12_session(
        &self,
        server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.get().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.get().remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.get().insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.get().take_tls13_ticket(server_name)
    }
}

impl StoresServerSessions for Forgetful<ServerSessionMemoryCache> {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.get().put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        Forgetful::get(self).get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        Forgetful::get(self).take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}
