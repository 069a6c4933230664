//! Certify over real HTTPS on loopback: identity's server in-process, a rustls client that
//! trusts only the anchors, HTTP/2 and HTTP/1.1; every refusal answers its status, code and
//! reason; the issuer is swapped under a running server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use rcgen::{BasicConstraints, IsCa, SanType};
use rustls_pki_types::pem::PemObject;
use tokio::sync::oneshot;
use trellis_api::certify::{CertifyError, CertifyResponse, ErrorCode, MAX_REQUEST_BYTES};
use trellis_identity::bootstrap;
use trellis_identity::ca::{Authority, Material};
use trellis_identity::limits::CertifyLimits;
use trellis_identity::metrics::Metrics;
use trellis_identity::reload::{self, Active, Current};
use trellis_identity::server::{self, Certifier};
use trellis_identity::tokens::{LocalTokens, Tokens};

use common::{SERVER_NAME, TD, Version, WEB, certify, certify_body, csr, send, uri, verify_answer};

const DAY: Duration = Duration::from_secs(86400);
const RSA_CSR: &str = include_str!("../src/ca/testdata/rsa.csr");

struct Server {
    addr: SocketAddr,
    material: Material,
    root_key: String,
    current: Arc<Current>,
    metrics: Metrics,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

fn settings() -> reload::Settings {
    reload::Settings {
        trust_domain: TD.into(),
        cert_lifetime: DAY,
        server_names: vec![SERVER_NAME.into()],
    }
}

async fn start() -> Server {
    let now = SystemTime::now();
    let (material, root_key) = bootstrap::generate(TD, 3650 * DAY, 365 * DAY, now).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokens_path = dir.path().join("tokens");
    std::fs::write(
        &tokens_path,
        "web-token shop web\nother-token billing web\n",
    )
    .unwrap();
    let authority = Authority::new(&material, TD, DAY, now).unwrap();
    let current =
        Current::new(Active::new(Arc::new(authority), &settings().server_names, now).unwrap());
    let metrics = Metrics::new();
    let certifier = Arc::new(Certifier::new(
        current.clone(),
        Arc::new(Tokens::Local(LocalTokens::load(&tokens_path).unwrap())),
        metrics.clone(),
        CertifyLimits::default(),
    ));
    let tls = Arc::new(server::tls_config(current.clone()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server::serve(listener, tls, certifier, async move {
        let _ = stopped.await;
    }));
    Server {
        addr,
        material,
        root_key,
        current,
        metrics,
        _stop: stop,
        _dir: dir,
    }
}

#[tokio::test]
async fn certifies_over_http2_and_http1() {
    let server = start().await;
    let anchors = &server.material.anchors_pem;
    for version in [Version::Http2, Version::Http1] {
        let (pem, key) = csr(vec![uri(WEB)], |_| {});
        let (status, body) = certify(server.addr, anchors, version, &pem, "web-token").await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{version:?}: {}",
            String::from_utf8_lossy(&body)
        );
        let answer: CertifyResponse = serde_json::from_slice(&body).unwrap();
        verify_answer(&answer, anchors, WEB, &key);
        assert_eq!(answer.chain, vec![server.material.issuer_cert_pem.clone()]);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            answer.expires_at.abs_diff(now + DAY.as_secs()) <= 5,
            "24 h by default"
        );
    }
    assert!(
        server
            .metrics
            .encode()
            .contains("trellis_identity_certificates_issued_total 2")
    );
}

#[tokio::test]
async fn refusals_answer_status_code_and_reason() {
    let server = start().await;
    let anchors = &server.material.anchors_pem;
    let (good, _) = csr(vec![uri(WEB)], |_| {});
    let dns = SanType::DnsName("web.shop.svc".try_into().unwrap());
    let tampered = {
        let (pem, _) = csr(vec![uri(WEB)], |_| {});
        let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes());
        let mut der = der.unwrap().as_ref().to_vec();
        let at = der.windows(3).position(|w| w == b"web").unwrap();
        der[at] = b'x';
        trellis_identity::ca::pem("CERTIFICATE REQUEST", &der)
    };
    let csr_pem = |names, f: fn(&mut rcgen::CertificateParams)| csr(names, f).0;
    let cases: Vec<(&str, String, &str, ErrorCode, &str)> = vec![
        (
            "someone else's identity",
            csr_pem(vec![uri("spiffe://cluster.local/ns/shop/sa/admin")], |_| {}),
            "web-token",
            ErrorCode::IdentityMismatch,
            "but the token belongs to spiffe://cluster.local/ns/shop/sa/web",
        ),
        (
            "another namespace's token",
            good.clone(),
            "other-token",
            ErrorCode::IdentityMismatch,
            "the token belongs to spiffe://cluster.local/ns/billing/sa/web",
        ),
        (
            "wrong trust domain",
            csr_pem(vec![uri("spiffe://prod.example/ns/shop/sa/web")], |_| {}),
            "web-token",
            ErrorCode::IdentityMismatch,
            "trust domain \"prod.example\"",
        ),
        (
            "extra DNS SAN",
            csr_pem(vec![uri(WEB), dns], |_| {}),
            "web-token",
            ErrorCode::BadCsr,
            "the DNS name \"web.shop.svc\"",
        ),
        (
            "two URIs",
            csr_pem(
                vec![uri(WEB), uri("spiffe://cluster.local/ns/shop/sa/x")],
                |_| {},
            ),
            "web-token",
            ErrorCode::BadCsr,
            "asks for 2 URIs",
        ),
        (
            "CA request",
            csr_pem(vec![uri(WEB)], |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
            }),
            "web-token",
            ErrorCode::BadCsr,
            "basic constraints (cA: true)",
        ),
        (
            "RSA key",
            RSA_CSR.to_string(),
            "web-token",
            ErrorCode::UnsupportedKey,
            "RSA",
        ),
        (
            "tampered CSR",
            tampered,
            "web-token",
            ErrorCode::BadCsr,
            "signature does not verify",
        ),
        (
            "not PEM",
            "hello".into(),
            "web-token",
            ErrorCode::BadCsr,
            "not PEM",
        ),
        (
            "unknown token",
            good.clone(),
            "who-knows",
            ErrorCode::BadToken,
            "the token is unknown",
        ),
        (
            "empty token",
            good.clone(),
            "",
            ErrorCode::BadToken,
            "the token is empty",
        ),
    ];
    for (name, pem, token, code, reason) in cases {
        let (status, body) = certify(server.addr, anchors, Version::Http2, &pem, token).await;
        let error: CertifyError = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "{name}: not an error body ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        assert_eq!(
            (status, error.code),
            (code.status(), code),
            "{name}: {}",
            error.error
        );
        assert!(
            error.error.contains(reason),
            "{name}: {:?} lacks {reason:?}",
            error.error
        );
    }
    let text = server.metrics.encode();
    assert!(
        text.contains("trellis_identity_certify_rejected_total{reason=\"identity_mismatch\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("trellis_identity_certify_rejected_total{reason=\"bad_token\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("trellis_identity_certificates_issued_total 0"),
        "{text}"
    );
}

/// name, method, path, body, expected code, part of the reason.
type MalformedCase = (
    &'static str,
    Method,
    &'static str,
    Vec<u8>,
    ErrorCode,
    &'static str,
);

#[tokio::test]
async fn malformed_requests() {
    let server = start().await;
    let anchors = &server.material.anchors_pem;
    let huge = certify_body(&"A".repeat(MAX_REQUEST_BYTES), "web-token");
    let cases: Vec<MalformedCase> = vec![
        (
            "not JSON",
            Method::POST,
            "/v1/certify",
            b"csr=x".to_vec(),
            ErrorCode::BadRequest,
            "not a certify request",
        ),
        (
            "no token",
            Method::POST,
            "/v1/certify",
            br#"{"csr":"x"}"#.to_vec(),
            ErrorCode::BadRequest,
            "missing field `token`",
        ),
        (
            "too large",
            Method::POST,
            "/v1/certify",
            huge,
            ErrorCode::BadRequest,
            "larger than 65536 bytes",
        ),
        (
            "GET",
            Method::GET,
            "/v1/certify",
            vec![],
            ErrorCode::MethodNotAllowed,
            "takes POST",
        ),
        (
            "unknown path",
            Method::POST,
            "/v1/sign",
            vec![],
            ErrorCode::NotFound,
            "no endpoint \"/v1/sign\"",
        ),
    ];
    for (name, method, path, body, code, reason) in cases {
        for version in [Version::Http2, Version::Http1] {
            let (status, headers, body) = send(
                server.addr,
                anchors,
                version,
                method.clone(),
                path,
                body.clone(),
            )
            .await;
            let error: CertifyError = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                (status, error.code),
                (code.status(), code),
                "{name} {version:?}"
            );
            assert!(error.error.contains(reason), "{name}: {}", error.error);
            assert_eq!(headers[http::header::CONTENT_TYPE], "application/json");
            if code == ErrorCode::MethodNotAllowed {
                assert_eq!(headers[http::header::ALLOW], "POST");
            }
        }
    }
}

#[tokio::test]
async fn issuer_swapped_under_a_running_server() {
    let server = start().await;
    let anchors = server.material.anchors_pem.clone();
    let (pem, key) = csr(vec![uri(WEB)], |_| {});
    let (_, body) = certify(server.addr, &anchors, Version::Http2, &pem, "web-token").await;
    let before: CertifyResponse = serde_json::from_slice(&body).unwrap();

    let renewed =
        bootstrap::renew_issuer(&anchors, &server.root_key, TD, 365 * DAY, SystemTime::now())
            .unwrap();
    let applied = reload::apply(&server.current, &renewed, &settings(), SystemTime::now()).unwrap();
    assert_eq!(applied, reload::Applied::Replaced);

    // New connections get a serving certificate from the new issuer, still trusted through
    // the same anchors; new workload certificates carry the new issuer in their chain.
    let (_, body) = certify(server.addr, &anchors, Version::Http2, &pem, "web-token").await;
    let after: CertifyResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(after.chain, vec![renewed.issuer_cert_pem.clone()]);
    assert_ne!(after.chain, before.chain);
    verify_answer(&before, &anchors, WEB, &key);
    verify_answer(&after, &anchors, WEB, &key);

    // A bad issuer is refused; the server keeps signing with the current one.
    let (other, _) = bootstrap::generate(TD, 3650 * DAY, 365 * DAY, SystemTime::now()).unwrap();
    let foreign = Material {
        anchors_pem: anchors.clone(),
        ..other
    };
    assert!(reload::apply(&server.current, &foreign, &settings(), SystemTime::now()).is_err());
    let (status, body) = certify(server.addr, &anchors, Version::Http1, &pem, "web-token").await;
    assert_eq!(status, StatusCode::OK);
    let still: CertifyResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(still.chain, after.chain);
}
