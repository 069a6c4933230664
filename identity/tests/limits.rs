//! Certify's bounds over real HTTPS: a caller over its TokenReview rate is answered 429 and
//! causes no TokenReview; a request that finds every turn taken waits, then gets 503.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use trellis_api::certify::{CERTIFY_PATH, CertifyError, ErrorCode};
use trellis_identity::bootstrap;
use trellis_identity::ca::{Authority, Material};
use trellis_identity::limits::CertifyLimits;
use trellis_identity::metrics::Metrics;
use trellis_identity::reload::{Active, Current};
use trellis_identity::server::{self, Certifier};
use trellis_identity::tokens::{LocalTokens, TokenReviewer, Tokens};

use common::{SERVER_NAME, TD, Version, WEB, certify, csr, uri};

const DAY: Duration = Duration::from_secs(86400);
const AUDIENCE: &str = "identity.trellis.dev";

/// A scripted API server that authenticates every token as shop/web after `delay`, counting
/// TokenReviews.
fn api_server(delay: Duration) -> (kube::Client, Arc<AtomicUsize>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let reviews = Arc::new(AtomicUsize::new(0));
    let counted = reviews.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            assert_eq!(request.method(), Method::POST);
            assert_eq!(
                request.uri().path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let asked: Value =
                    serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap())
                        .unwrap();
                tokio::time::sleep(delay).await;
                let answer = json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {},
                    "spec": asked["spec"],
                    "status": {"authenticated": true, "audiences": [AUDIENCE],
                               "user": {"username": "system:serviceaccount:shop:web"}},
                });
                send.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            });
        }
    });
    (kube::Client::new(service, "default"), reviews)
}

async fn start(tokens: Tokens, limits: CertifyLimits) -> (SocketAddr, Material, Metrics) {
    let now = SystemTime::now();
    let (material, _) = bootstrap::generate(TD, 3650 * DAY, 365 * DAY, now).unwrap();
    let authority = Authority::new(&material, TD, DAY, now).unwrap();
    let current =
        Current::new(Active::new(Arc::new(authority), &[SERVER_NAME.to_string()], now).unwrap());
    let metrics = Metrics::new();
    let certifier = Arc::new(Certifier::new(
        current.clone(),
        Arc::new(tokens),
        metrics.clone(),
        limits,
    ));
    let tls = Arc::new(server::tls_config(current).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve(
        listener,
        tls,
        certifier,
        std::future::pending(),
    ));
    (addr, material, metrics)
}

#[tokio::test]
async fn a_caller_over_its_token_review_rate_gets_429_and_sends_no_review() {
    let (client, reviews) = api_server(Duration::ZERO);
    let limits = CertifyLimits {
        reviews_per_second: 0.5,
        burst: 3,
        ..CertifyLimits::default()
    };
    let tokens = Tokens::Review(TokenReviewer::new(client, AUDIENCE));
    let (addr, material, metrics) = start(tokens, limits).await;
    let anchors = &material.anchors_pem;
    let (pem, _) = csr(vec![uri(WEB)], |_| {});
    for i in 0..3 {
        let (status, body) = certify(addr, anchors, Version::Http2, &pem, "t").await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{i}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(reviews.load(Ordering::SeqCst), 3);
    // The burst is spent: a loop of requests causes no more TokenReviews.
    for version in [Version::Http2, Version::Http1, Version::Http2] {
        let (status, headers, body) = common::send(
            addr,
            anchors,
            version,
            Method::POST,
            CERTIFY_PATH,
            common::certify_body(&pem, "t"),
        )
        .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after"], "2");
        let error: CertifyError = serde_json::from_slice(&body).unwrap();
        assert_eq!(error.code, ErrorCode::Unavailable);
        assert!(
            error
                .error
                .starts_with("too many certify requests from 127.0.0.1"),
            "{}",
            error.error
        );
    }
    assert_eq!(reviews.load(Ordering::SeqCst), 3);
    // Garbage is refused before the bucket: it costs no TokenReview and no token.
    let (status, _) = certify(addr, anchors, Version::Http1, "not a csr", "t").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Two seconds refill one review.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _) = certify(addr, anchors, Version::Http2, &pem, "t").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reviews.load(Ordering::SeqCst), 4);
    let text = metrics.encode();
    for line in [
        "trellis_identity_certify_throttled_total{reason=\"rate_limited\"} 3",
        "trellis_identity_certify_rejected_total{reason=\"bad_csr\"} 1",
        "trellis_identity_certificates_issued_total 4",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    // A limit is not the API server failing: it is not counted as `unavailable`.
    assert!(!text.contains("reason=\"unavailable\""), "{text}");
}

/// Opens a TLS connection and sends a request head with a body that never comes.
async fn stalled_request(addr: SocketAddr, anchors_pem: &str) -> impl Drop {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(anchors_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await
        .unwrap();
    let head = format!(
        "POST {CERTIFY_PATH} HTTP/1.1\r\nhost: {SERVER_NAME}\r\ncontent-length: 100\r\n\r\n{{"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    Box::new(tls)
}

#[tokio::test]
async fn a_request_without_a_turn_waits_then_gets_503() {
    // TokenReviews that take a second hold both turns.
    let (client, reviews) = api_server(Duration::from_secs(1));
    let limits = CertifyLimits {
        max_concurrent: 2,
        queue_timeout: Duration::from_millis(300),
        ..CertifyLimits::default()
    };
    let tokens = Tokens::Review(TokenReviewer::new(client, AUDIENCE));
    let (addr, material, metrics) = start(tokens, limits).await;
    let anchors = material.anchors_pem.clone();
    let (pem, _) = csr(vec![uri(WEB)], |_| {});
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (anchors, pem) = (anchors.clone(), pem.clone());
            tokio::spawn(async move { certify(addr, &anchors, Version::Http2, &pem, "t").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let (status, body) = certify(addr, &anchors, Version::Http1, &pem, "t").await;
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    let error: CertifyError = serde_json::from_slice(&body).unwrap();
    assert_eq!(error.code, ErrorCode::Unavailable);
    assert!(
        error.error.starts_with("identity is busy"),
        "{}",
        error.error
    );
    // The two in progress finish normally; the refused one caused no TokenReview.
    for task in slow {
        assert_eq!(task.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(reviews.load(Ordering::SeqCst), 2);
    let text = metrics.encode();
    assert!(
        text.contains("trellis_identity_certify_throttled_total{reason=\"overloaded\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn stalled_bodies_hold_no_turn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens");
    std::fs::write(&path, "web-token shop web\n").unwrap();
    let limits = CertifyLimits {
        max_concurrent: 2,
        queue_timeout: Duration::from_millis(300),
        ..CertifyLimits::default()
    };
    let tokens = Tokens::Local(LocalTokens::load(&path).unwrap());
    let (addr, material, metrics) = start(tokens, limits).await;
    let anchors = &material.anchors_pem;
    // Ten clients send a request head and one byte of body, then nothing.
    let mut stalled = Vec::new();
    for _ in 0..10 {
        stalled.push(stalled_request(addr, anchors).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (pem, _) = csr(vec![uri(WEB)], |_| {});
    for version in [Version::Http2, Version::Http1] {
        let started = Instant::now();
        let (status, _) = certify(addr, anchors, version, &pem, "web-token").await;
        assert_eq!(status, StatusCode::OK);
        assert!(started.elapsed() < Duration::from_millis(300));
    }
    assert!(!metrics.encode().contains("certify_throttled_total{"));
    drop(stalled);
}
