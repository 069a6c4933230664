//! Review → response latency for one request: the webhook's logic alone (parse the
//! AdmissionReview, decide, build the patch, serialize the answer), then the same over HTTPS on
//! loopback through the real server, with its percentiles over 2,000 requests.
//!
//! ```console
//! $ cargo bench -p trellis-injector --bench admission
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use trellis_injector::admission;
use trellis_injector::annotations::{AccessLog, Quantity};
use trellis_injector::cert::{self, Resolver};
use trellis_injector::config::{ReviewLimits, Settings, SidecarMode};
use trellis_injector::metrics::Metrics;
use trellis_injector::webhook::{self, Webhook};

fn settings() -> Settings {
    Settings {
        proxy_image: "ghcr.io/trellis-mesh/trellis-proxy:v0.1.0".to_string(),
        sidecar_mode: SidecarMode::Native,
        control_plane_namespace: "trellis-system".to_string(),
        controller_addr: "trellis-controller.trellis-system.svc:8090".to_string(),
        identity_addr: "trellis-identity.trellis-system.svc:8080".to_string(),
        trust_domain: "cluster.local".to_string(),
        // About the size of a real root certificate.
        trust_anchors_pem: format!(
            "-----BEGIN CERTIFICATE-----\n{}-----END CERTIFICATE-----\n",
            "MIIBkTCB+wIJAKHBfpegPjMCMA0GCSqGSIb3DQEBCwUAMBExDzANBgNVBAMMBnRl\n".repeat(10)
        ),
        proxy_log_level: "info".to_string(),
        access_log: AccessLog::Off,
        otlp_endpoint: None,
        trace_sampling: 0.0,
        cpu_request: Quantity::cpu("100m").unwrap(),
        memory_request: Quantity::memory("64Mi").unwrap(),
        memory_limit: Quantity::memory("256Mi").unwrap(),
        version: "0.1.0".to_string(),
    }
}

fn review() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/reviews/plain-pod.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn bench(c: &mut Criterion) {
    let settings = settings();
    let inject = serde_json::to_vec(&review()).unwrap();
    let mut opted_out = review();
    opted_out["request"]["object"]["metadata"]["annotations"] =
        json!({"trellis.dev/inject": "disabled"});
    let opted_out = serde_json::to_vec(&opted_out).unwrap();
    let mut group = c.benchmark_group("admission");
    group.bench_function("inject", |b| {
        b.iter(|| admission::review(black_box(&inject), &settings))
    });
    group.bench_function("skip", |b| {
        b.iter(|| admission::review(black_box(&opted_out), &settings))
    });
    group.bench_function("malformed", |b| {
        b.iter(|| admission::review(black_box(b"{\"apiVersion\": 1"), &settings))
    });
    group.finish();
}

type Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// The real webhook server on loopback and one HTTP/2 connection to it, as the API server keeps.
async fn https_client() -> Sender {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let serving = cert::generate(
        &cert::dns_names("trellis-injector", "trellis-system"),
        SystemTime::now(),
        None,
    )
    .unwrap();
    let resolver = Resolver::new(cert::certified_key(&serving.cert_pem, &serving.key_pem).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let hook = Arc::new(Webhook::new(
        settings(),
        Metrics::new(),
        ReviewLimits::default(),
    ));
    let tls = Arc::new(cert::server_config(resolver).unwrap());
    tokio::spawn(webhook::serve(listener, tls, hook, std::future::pending()));

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(serving.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // As the API server's Go client does.
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::try_from("trellis-injector.trellis-system.svc").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

async fn round_trip(sender: &mut Sender, body: &Bytes) {
    let request = http::Request::post("https://trellis-injector.trellis-system.svc/inject")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    black_box(response.into_body().collect().await.unwrap().to_bytes());
}

fn bench_https(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut sender = runtime.block_on(https_client());
    let body = Bytes::from(serde_json::to_vec(&review()).unwrap());
    c.bench_function("https/inject", |b| {
        b.iter(|| runtime.block_on(round_trip(&mut sender, &body)))
    });

    // Criterion reports central estimates; the webhook's budget is about the tail.
    let mut samples: Vec<Duration> = (0..2000)
        .map(|_| {
            let start = Instant::now();
            runtime.block_on(round_trip(&mut sender, &body));
            start.elapsed()
        })
        .collect();
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "https/inject over 2000 requests: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        at(0.50),
        at(0.90),
        at(0.99),
        samples[samples.len() - 1]
    );
}

criterion_group!(benches, bench, bench_https);
criterion_main!(benches);
