//! The webhook over real sockets: a real TLS server on loopback with a generated certificate,
//! real hyper clients over rustls (HTTP/1.1 and HTTP/2) that verify it as the API server does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use trellis_injector::admin::{self, Admin};
use trellis_injector::cert::{self, Resolver, ServingCert};
use trellis_injector::config::{ReviewLimits, ServeConfig, SidecarMode, TlsSource};
use trellis_injector::metrics::Metrics;
use trellis_injector::serve;
use trellis_injector::webhook::{self, Webhook};

use support::{apply_answer, read_json, settings};

const SERVER_NAME: &str = "trellis-injector.trellis-system.svc";

fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn generate() -> ServingCert {
    cert::generate(
        &cert::dns_names("trellis-injector", "trellis-system"),
        SystemTime::now(),
        None,
    )
    .unwrap()
}

/// A webhook on 127.0.0.1:0; dropping the sender stops it.
async fn start_webhook(serving: &ServingCert) -> (SocketAddr, Metrics, oneshot::Sender<()>) {
    let resolver = Resolver::new(cert::certified_key(&serving.cert_pem, &serving.key_pem).unwrap());
    let tls = Arc::new(cert::server_config(resolver).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Metrics::new();
    let hook = Arc::new(Webhook::new(
        settings(SidecarMode::Native),
        metrics.clone(),
        ReviewLimits::default(),
    ));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(webhook::serve(listener, tls, hook, async {
        let _ = stopped.await;
    }));
    (addr, metrics, stop)
}

#[derive(Clone, Copy, Debug)]
enum Version {
    Http1,
    Http2,
}

/// One request over a fresh TLS connection that trusts only `ca_pem` and checks the Service
/// name, as the API server does with the caBundle.
async fn send(
    addr: SocketAddr,
    ca_pem: &str,
    version: Version,
    request: Request<Full<Bytes>>,
) -> (StatusCode, Bytes) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = match version {
        Version::Http1 => vec![b"http/1.1".to_vec()],
        Version::Http2 => vec![b"h2".to_vec()],
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await
        .unwrap();
    let io = TokioIo::new(tls);
    let response = match version {
        Version::Http1 => {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        }
        Version::Http2 => {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        }
    };
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

fn post(body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("https://{SERVER_NAME}/inject"))
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

#[tokio::test]
async fn reviews_over_https_http1_and_http2() {
    install_provider();
    let serving = generate();
    let (addr, metrics, _stop) = start_webhook(&serving).await;
    let review = read_json("reviews/plain-pod.json");
    let expected = read_json("expected/plain-pod.native.json");
    for version in [Version::Http1, Version::Http2] {
        let (status, body) = send(
            addr,
            &serving.ca_pem,
            version,
            post(serde_json::to_vec(&review).unwrap()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{version:?}");
        let (response, pod) = apply_answer(&review, &body);
        assert_eq!(response["allowed"], true);
        assert_eq!(pod.as_ref(), Some(&expected), "{version:?}");
    }
    let text = metrics.encode();
    assert!(
        text.contains(
            "trellis_injector_admission_requests_total{outcome=\"injected\",reason=\"\"} 2"
        ),
        "{text}"
    );
    assert!(
        text.contains("trellis_injector_admission_duration_seconds_count 2"),
        "{text}"
    );
}

#[tokio::test]
async fn bad_requests_get_clear_answers() {
    install_provider();
    let serving = generate();
    let (addr, metrics, _stop) = start_webhook(&serving).await;
    let ca = &serving.ca_pem;

    let (status, body) = send(addr, ca, Version::Http1, post("{\"apiVersion\": ")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], false);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .starts_with("the request body is not JSON")
    );

    // The uid survives a request that cannot be read otherwise.
    let broken = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u-1", "operation": 7}});
    let (status, body) = send(
        addr,
        ca,
        Version::Http2,
        post(serde_json::to_vec(&broken).unwrap()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["uid"], "u-1");

    // Too large: refused from Content-Length and, without it, while streaming.
    let huge = vec![b' '; 5 * 1024 * 1024];
    let (status, body) = send(addr, ca, Version::Http1, post(huge.clone())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["status"]["code"], 413);
    let mut streamed = post(huge);
    streamed.headers_mut().remove("content-length");
    let (status, _) = send(addr, ca, Version::Http2, streamed).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let mut get = post("");
    *get.method_mut() = Method::GET;
    let (status, _) = send(addr, ca, Version::Http1, get).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let mut elsewhere = post("{}");
    *elsewhere.uri_mut() = format!("https://{SERVER_NAME}/mutate").parse().unwrap();
    let (status, _) = send(addr, ca, Version::Http1, elsewhere).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let text = metrics.encode();
    assert!(
        text.contains("outcome=\"error\",reason=\"malformed\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("outcome=\"error\",reason=\"too_large\"} 2"),
        "{text}"
    );

    // Still serving after all that.
    let review = read_json("reviews/plain-pod.json");
    let (status, _) = send(
        addr,
        ca,
        Version::Http1,
        post(serde_json::to_vec(&review).unwrap()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_is_refused() {
    install_provider();
    let serving = generate();
    let (addr, _, _stop) = start_webhook(&serving).await;
    let other = generate();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(other.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let result = connector
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await;
    assert!(result.is_err());
}

async fn http_get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get(format!("http://{addr}{path}"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn admin_server_reports_liveness_readiness_and_metrics() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin = Admin::new(Metrics::new());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(admin::serve(listener, admin.clone(), async {
        let _ = stopped.await;
    }));
    assert_eq!(http_get(addr, "/live").await.0, StatusCode::OK);
    assert_eq!(
        http_get(addr, "/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    admin.set_ready(true);
    assert_eq!(http_get(addr, "/ready").await.0, StatusCode::OK);
    let (status, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains("# TYPE trellis_injector_admission_duration_seconds histogram"),
        "{metrics}"
    );
    assert!(metrics.ends_with("# EOF\n"));
    assert_eq!(http_get(addr, "/nope").await.0, StatusCode::NOT_FOUND);
    drop(stop);
    server.await.unwrap();
}

async fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `serve` end to end with user-provided certificate files: ready once serving, answers
/// reviews, picks up new files, and stops cleanly.
#[tokio::test]
async fn serve_with_certificate_files() {
    install_provider();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let first = generate();
    std::fs::write(&cert_file, &first.cert_pem).unwrap();
    std::fs::write(&key_file, &first.key_pem).unwrap();
    let (webhook_addr, admin_addr) = (free_port().await, free_port().await);
    let config = ServeConfig {
        settings: settings(SidecarMode::Native),
        webhook_addr,
        admin_addr,
        tls: TlsSource::Files {
            cert: cert_file,
            key: key_file,
        },
        limits: ReviewLimits::default(),
        trust_anchors_file: None,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve::run(config, async {
        let _ = stopped.await;
    }));
    let mut ready = false;
    for _ in 0..100 {
        if TcpStream::connect(admin_addr).await.is_ok()
            && http_get(admin_addr, "/ready").await.0 == StatusCode::OK
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "the injector never became ready");
    let review = read_json("reviews/plain-pod.json");
    let (status, body) = send(
        webhook_addr,
        &first.ca_pem,
        Version::Http2,
        post(serde_json::to_vec(&review).unwrap()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(apply_answer(&review, &body).0["allowed"], true);
    let (_, metrics) = http_get(admin_addr, "/metrics").await;
    assert!(metrics.contains("outcome=\"injected\""), "{metrics}");
    drop(stop);
    tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(webhook_addr).await.is_err(),
        "still listening after shutdown"
    );
}

#[tokio::test]
async fn serve_refuses_unusable_certificate_files() {
    install_provider();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (a, b) = (generate(), generate());
    std::fs::write(&cert_file, &a.cert_pem).unwrap();
    std::fs::write(&key_file, &b.key_pem).unwrap();
    let config = ServeConfig {
        settings: settings(SidecarMode::Native),
        webhook_addr: free_port().await,
        admin_addr: free_port().await,
        tls: TlsSource::Files {
            cert: cert_file,
            key: key_file,
        },
        limits: ReviewLimits::default(),
        trust_anchors_file: None,
    };
    let error = serve::run(config, std::future::pending())
        .await
        .unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("does not fit the certificate"),
        "{message}"
    );
}

#[tokio::test]
async fn certificate_files_are_reloaded_when_they_change() {
    install_provider();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (first, second) = (generate(), generate());
    std::fs::write(&cert_file, &first.cert_pem).unwrap();
    std::fs::write(&key_file, &first.key_pem).unwrap();
    let resolver = Resolver::new(cert::certified_key(&first.cert_pem, &first.key_pem).unwrap());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(serve::watch_files(
        cert_file.clone(),
        key_file.clone(),
        resolver.clone(),
        Metrics::new(),
        Duration::from_millis(20),
        stop_rx,
    ));
    let served = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Half an update (new certificate, old key) is not taken; the old pair stays.
    std::fs::write(&cert_file, &second.cert_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(resolver.get().cert[0], served(&first.cert_pem));
    std::fs::write(&key_file, &second.key_pem).unwrap();
    let mut reloaded = false;
    for _ in 0..100 {
        if resolver.get().cert[0] == served(&second.cert_pem) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reloaded, "the new certificate was never served");
    stop.send_replace(true);
    watcher.await.unwrap();
}
