//! A real HTTPS client for certify: rustls trusting only the mesh's anchors, HTTP/2 or
//! HTTP/1.1 as negotiated by ALPN, and checks of what identity answers.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::TlsConnector;
use trellis_api::certify::{CERTIFY_PATH, CertifyResponse};
use x509_parser::extensions::GeneralName;

pub const TD: &str = "cluster.local";
pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub const SERVER_NAME: &str = "trellis-identity.trellis-system.svc";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http2,
    Http1,
}

/// Sends one request over a fresh TLS connection that trusts `anchors_pem` and expects
/// identity's certificate for [`SERVER_NAME`].
pub async fn send(
    addr: SocketAddr,
    anchors_pem: &str,
    version: Version,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(anchors_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![match version {
        Version::Http2 => b"h2".to_vec(),
        Version::Http1 => b"http/1.1".to_vec(),
    }];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await
        .expect("TLS with identity's serving certificate, trusted through the anchors");
    let request = Request::builder()
        .method(method)
        .uri(format!("https://{SERVER_NAME}{path}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = match version {
        Version::Http2 => {
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        }
        Version::Http1 => {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        }
    };
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

/// A P-256 CSR for these names, and its key.
pub fn csr(
    names: Vec<SanType>,
    customize: impl FnOnce(&mut CertificateParams),
) -> (String, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = names;
    customize(&mut params);
    (params.serialize_request(&key).unwrap().pem().unwrap(), key)
}

pub fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

pub fn certify_body(csr: &str, token: &str) -> Vec<u8> {
    serde_json::to_vec(&trellis_api::certify::CertifyRequest {
        csr: csr.to_string(),
        token: token.to_string(),
    })
    .unwrap()
}

pub async fn certify(
    addr: SocketAddr,
    anchors_pem: &str,
    version: Version,
    csr: &str,
    token: &str,
) -> (StatusCode, Bytes) {
    let (status, _, body) = send(
        addr,
        anchors_pem,
        version,
        Method::POST,
        CERTIFY_PATH,
        certify_body(csr, token),
    )
    .await;
    (status, body)
}

/// Checks an answer the way a proxy relies on it: the certificate is for `uri`, carries
/// `key`, chains through `chain` to the anchors for both TLS roles, and expires when it says.
pub fn verify_answer(answer: &CertifyResponse, anchors_pem: &str, uri: &str, key: &KeyPair) {
    let leaf = CertificateDer::from_pem_slice(answer.certificate.as_bytes()).unwrap();
    let chain: Vec<_> = answer
        .chain
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
        .collect();
    assert_eq!(chain.len(), 1, "the chain is the issuer");
    let anchor_ders: Vec<_> = CertificateDer::pem_slice_iter(anchors_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let anchors: Vec<_> = anchor_ders
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).unwrap())
        .collect();
    let end_entity = webpki::EndEntityCert::try_from(&leaf).unwrap();
    let now = UnixTime::now();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &chain,
                now,
                usage,
                None,
                None,
            )
            .expect("the certificate chains to the trust anchors");
    }
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names, vec![GeneralName::URI(uri)]);
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    assert!(!cert.is_ca());
    assert_eq!(
        u64::try_from(cert.validity().not_after.timestamp()).unwrap(),
        answer.expires_at
    );
    let now_secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(answer.expires_at > now_secs);
}
