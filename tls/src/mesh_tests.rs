use super::*;
use crate::anchors::{Offered, RefusedBundle};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TD: &str = "cluster.local";

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A workload certificate for `id` (or with no SAN at all).
    fn leaf(
        &self,
        id: Option<&Identity>,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        if let Some(id) = id {
            params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        }
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], der)
    }
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa)
}

fn mesh(ca: &Ca, who: Option<&Identity>) -> MeshTls {
    let tls = MeshTls::new(&ca.pem(), TD).unwrap();
    if let Some(who) = who {
        let (chain, key) = ca.leaf(Some(who));
        tls.credentials.set(&tls.provider, chain, key).unwrap();
    }
    tls
}

/// Runs a handshake and one exchange; returns the server's view of the client's identity.
async fn handshake(
    client: &MeshTls,
    server: &MeshTls,
    expect: ServerName<'static>,
) -> Result<Option<Identity>, String> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server.clone());
    let connector = tokio_rustls::TlsConnector::from(client.client.clone());
    let server_side = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(identity_of_cert);
        let mut buf = [0; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let client_side = async {
        let mut tls = connector
            .connect(expect, c)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        let mut buf = [0; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(
            tls.get_ref()
                .1
                .negotiated_key_exchange_group()
                .map(|g| g.name()),
        )
    };
    let kx = client_side.await?;
    assert_eq!(
        kx,
        Some(rustls::NamedGroup::X25519MLKEM768),
        "the hybrid group is preferred"
    );
    server_side.await.map_err(|e| e.to_string())?
}

#[test]
fn server_names_round_trip_identities() {
    for who in [id("shop", "web"), id("shop", "dotted.name")] {
        let name = server_name(&who).unwrap();
        assert_eq!(identity_of_server_name(&name, TD), Some(who));
    }
    let other = ServerName::try_from("web.shop.svc.cluster.local").unwrap();
    assert_eq!(identity_of_server_name(&other, TD), None);
}

#[tokio::test]
async fn mutual_tls_between_two_identities() {
    let ca = Ca::new();
    let (web, api) = (id("shop", "web"), id("shop", "api"));
    let client = mesh(&ca, Some(&web));
    let server = mesh(&ca, Some(&api));
    let peer = handshake(&client, &server, server_name(&api).unwrap())
        .await
        .unwrap();
    assert_eq!(peer, Some(web));
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let ca = Ca::new();
    let client = mesh(&ca, Some(&id("shop", "web")));
    let server = mesh(&ca, Some(&id("shop", "impostor")));
    let err = handshake(&client, &server, server_name(&id("shop", "api")).unwrap())
        .await
        .unwrap_err();
    assert!(err.contains("impostor") || err.contains("name"), "{err}");
}

#[tokio::test]
async fn a_client_without_a_mesh_certificate_is_refused() {
    let ca = Ca::new();
    let api = id("shop", "api");
    let server = mesh(&ca, Some(&api));
    let anonymous = mesh(&ca, None);
    assert!(
        handshake(&anonymous, &server, server_name(&api).unwrap())
            .await
            .is_err()
    );
    // A certificate from another CA is no better.
    let stranger_ca = Ca::new();
    let stranger = MeshTls::new(&ca.pem(), TD).unwrap();
    let (chain, key) = stranger_ca.leaf(Some(&id("shop", "web")));
    stranger
        .credentials
        .set(&stranger.provider, chain, key)
        .unwrap();
    assert!(
        handshake(&stranger, &server, server_name(&api).unwrap())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_server_outside_the_trust_anchors_is_refused() {
    let (ca, other) = (Ca::new(), Ca::new());
    let api = id("shop", "api");
    let client = mesh(&ca, Some(&id("shop", "web")));
    let server = MeshTls::new(&ca.pem(), TD).unwrap();
    let (chain, key) = other.leaf(Some(&api));
    server
        .credentials
        .set(&server.provider, chain, key)
        .unwrap();
    assert!(
        handshake(&client, &server, server_name(&api).unwrap())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn renewed_credentials_serve_new_handshakes() {
    let ca = Ca::new();
    let api = id("shop", "api");
    let client = mesh(&ca, Some(&id("shop", "web")));
    let server = mesh(&ca, Some(&id("shop", "old")));
    assert!(
        handshake(&client, &server, server_name(&api).unwrap())
            .await
            .is_err()
    );
    let (chain, key) = ca.leaf(Some(&api));
    server
        .credentials
        .set(&server.provider, chain, key)
        .unwrap();
    assert!(
        handshake(&client, &server, server_name(&api).unwrap())
            .await
            .is_ok()
    );
}

#[test]
fn identities_come_only_from_a_single_uri_san() {
    let ca = Ca::new();
    let (chain, _) = ca.leaf(Some(&id("a", "b")));
    assert_eq!(identity_of_cert(&chain[0]), Some(id("a", "b")));
    let (chain, _) = ca.leaf(None);
    assert_eq!(identity_of_cert(&chain[0]), None);
    assert!(matches!(MeshTls::new("", TD), Err(TlsError::NoAnchors)));
}

/// A peer client against a plain server config: the handshake's ALPN and the server's view of
/// the client, or the client's error.
async fn peer_handshake(
    client: &PeerClient,
    server: &MeshTls,
) -> Result<(Option<Vec<u8>>, Option<Identity>), String> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config(&[ALPN_H2]));
    let server_side = tokio::spawn(async move {
        let tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(
            tls.get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(identity_of_cert),
        )
    });
    let tls = client.connect(c).await.map_err(|e| e.to_string())?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let peer = server_side.await.map_err(|e| e.to_string())??;
    Ok((alpn, peer))
}

#[tokio::test]
async fn a_peer_client_reaches_a_plain_server_of_that_identity_over_h2() {
    let ca = Ca::new();
    let (proxy, controller) = (
        id("shop", "web"),
        id("trellis-system", "trellis-controller"),
    );
    let client = mesh(&ca, Some(&proxy))
        .peer_client(&controller, &[ALPN_H2])
        .unwrap();
    let server = mesh(&ca, Some(&controller));
    let (alpn, peer) = peer_handshake(&client, &server).await.unwrap();
    assert_eq!(alpn.as_deref(), Some(ALPN_H2));
    assert_eq!(peer, Some(proxy));
}

#[tokio::test]
async fn a_peer_client_refuses_another_identity_and_needs_a_certificate() {
    let ca = Ca::new();
    let controller = id("trellis-system", "trellis-controller");
    let client = mesh(&ca, Some(&id("shop", "web")))
        .peer_client(&controller, &[ALPN_H2])
        .unwrap();
    let impostor = mesh(&ca, Some(&id("trellis-system", "impostor")));
    let err = peer_handshake(&client, &impostor).await.unwrap_err();
    assert!(err.contains("impostor"), "{err}");
    // The server requires a client certificate from the mesh.
    let anonymous = mesh(&ca, None)
        .peer_client(&controller, &[ALPN_H2])
        .unwrap();
    let server = mesh(&ca, Some(&controller));
    assert!(peer_handshake(&anonymous, &server).await.is_err());
    // A peer outside the trust domain cannot be named.
    let foreign = Identity::new("other.domain", "trellis-system", "trellis-controller");
    assert!(matches!(
        server.peer_client(&foreign, &[ALPN_H2]),
        Err(TlsError::ForeignPeer { .. })
    ));
}

#[tokio::test]
async fn certified_waits_for_the_first_certificate() {
    let ca = Ca::new();
    let tls = mesh(&ca, None);
    let client = tls.peer_client(&id("shop", "api"), &[ALPN_H2]).unwrap();
    let wait = std::time::Duration::from_millis(50);
    assert!(
        tokio::time::timeout(wait, client.certified())
            .await
            .is_err()
    );
    let (chain, key) = ca.leaf(Some(&id("shop", "web")));
    tls.credentials.set(&tls.provider, chain, key).unwrap();
    assert!(tokio::time::timeout(wait, client.certified()).await.is_ok());
}

#[test]
fn the_certificate_state_follows_the_leafs_own_validity() {
    let ca = Ca::new();
    let tls = MeshTls::new(&ca.pem(), TD).unwrap();
    assert_eq!(tls.credentials.state(), CertificateState::Missing);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(id("a", "b").to_string().try_into().unwrap())];
    params.not_before = rcgen::date_time_ymd(2030, 1, 1);
    params.not_after = rcgen::date_time_ymd(2030, 1, 2);
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    tls.credentials
        .set(&tls.provider, vec![cert.der().clone()], der)
        .unwrap();
    // 2030-01-01T00:00:00Z and 2030-01-02T00:00:00Z.
    let (start, end) = (1_893_456_000, 1_893_542_400);
    let c = &tls.credentials;
    assert_eq!(
        c.state_at(start - 1),
        CertificateState::NotYetValid { not_before: start }
    );
    assert_eq!(
        c.state_at(start),
        CertificateState::Valid { not_after: end }
    );
    assert_eq!(c.state_at(end), CertificateState::Valid { not_after: end });
    assert_eq!(
        c.state_at(end + 1),
        CertificateState::Expired { not_after: end }
    );
    assert!(!c.state_at(end + 1).is_valid());
}

/// An open connection: the client writes `ping`, the server echoes it, and both ends stay up.
async fn open(
    client: &MeshTls,
    server: &MeshTls,
    expect: ServerName<'static>,
) -> (
    tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
    tokio::task::JoinHandle<()>,
) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server.clone());
    let echo = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await.unwrap();
        let mut buf = [0; 4];
        while tls.read_exact(&mut buf).await.is_ok() {
            tls.write_all(&buf).await.unwrap();
            tls.flush().await.unwrap();
        }
    });
    let mut tls = tokio_rustls::TlsConnector::from(client.client.clone())
        .connect(expect, c)
        .await
        .unwrap();
    // One exchange: in TLS 1.3 the server checks the client's certificate after the client
    // is done, so only an answer shows that both ends accepted the handshake.
    let mut buf = [0; 4];
    tls.write_all(b"ping").await.unwrap();
    tls.flush().await.unwrap();
    tls.read_exact(&mut buf).await.unwrap();
    (tls, echo)
}

#[tokio::test]
async fn new_anchors_serve_new_handshakes_and_spare_open_connections() {
    let (a, b) = (Ca::new(), Ca::new());
    let (web, api) = (id("shop", "web"), id("shop", "api"));
    let both = format!("{}{}", a.pem(), b.pem());
    // A server certified under A that trusts A only refuses a client certified under B.
    let server = mesh(&a, Some(&api));
    let client_b = MeshTls::new(&both, TD).unwrap();
    let (chain, key) = b.leaf(Some(&web));
    client_b
        .credentials
        .set(&client_b.provider, chain, key)
        .unwrap();
    let api_name = server_name(&api).unwrap();
    assert!(
        handshake(&client_b, &server, api_name.clone())
            .await
            .is_err()
    );
    assert_eq!(server.offer_anchors(&both, "test"), Offered::Applied);
    assert_eq!(
        handshake(&client_b, &server, api_name.clone()).await,
        Ok(Some(web.clone()))
    );
    assert_eq!(server.offer_anchors(&both, "again"), Offered::Unchanged);

    // The client side: a client trusting A only refuses a server certified under B.
    let client_a = mesh(&a, Some(&web));
    let server_b = MeshTls::new(&both, TD).unwrap();
    let (chain, key) = b.leaf(Some(&api));
    server_b
        .credentials
        .set(&server_b.provider, chain, key)
        .unwrap();
    assert!(
        handshake(&client_a, &server_b, api_name.clone())
            .await
            .is_err()
    );
    assert_eq!(client_a.offer_anchors(&both, "test"), Offered::Applied);
    let (mut conn, _echo) = open(&client_a, &server_b, api_name.clone()).await;

    // A server under B that drops A refuses new handshakes from A's clients (the session the
    // client could resume is forgotten, so its certificate is checked again), while the
    // connection made before keeps working.
    assert_eq!(server_b.offer_anchors(&b.pem(), "test"), Offered::Applied);
    assert!(
        handshake(&client_a, &server_b, api_name.clone())
            .await
            .is_err()
    );
    let mut buf = [0; 4];
    conn.write_all(b"ping").await.unwrap();
    conn.flush().await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn unusable_bundles_are_refused_counted_once_and_change_nothing() {
    let (a, b) = (Ca::new(), Ca::new());
    let (web, api) = (id("shop", "web"), id("shop", "api"));
    let client = mesh(&a, Some(&web));
    let server = mesh(&a, Some(&api));
    let mut registry = prometheus_client::registry::Registry::default();
    client.anchors.register(&mut registry);
    let before = client.anchors.current().expires_at();
    let bad_der = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    for bundle in ["", "garbage", bad_der] {
        assert!(
            matches!(
                client.offer_anchors(bundle, "test"),
                Offered::Refused(RefusedBundle::Invalid(_))
            ),
            "{bundle:?}"
        );
    }
    // B alone would not verify the client's own certificate, issued under A: peers that trust
    // only B would refuse it.
    for _ in 0..2 {
        assert!(matches!(
            client.offer_anchors(&b.pem(), "test"),
            Offered::Refused(RefusedBundle::NotOwnChain(_))
        ));
    }
    assert!(
        handshake(&client, &server, server_name(&api).unwrap())
            .await
            .is_ok()
    );
    assert_eq!(client.anchors.current().pem(), a.pem());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("trellis_identity_trust_anchor_updates_total{result=\"refused\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("trellis_identity_trust_anchor_updates_total{result=\"applied\"} 0"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "trellis_identity_trust_anchor_expiry_timestamp_seconds {before}"
        )),
        "{text}"
    );
    assert!(before > 0);
}
