//! Cost of the sidecar's per-request and per-connection functions outside the HTTP and TLS
//! libraries: protocol detection, header hygiene between hops, the upstream URI, endpoint
//! choice, the request metrics and the trace context. A regression here is paid by every
//! request of every pod; `bench/run` measures the pair as a whole.
//!
//! Run with `cargo bench -p trellis-proxy --bench hot_path`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus_client::registry::Registry;
use trellis_proxy::balance::{Balancer, EndpointState};
use trellis_proxy::metrics::{Metrics, RequestCache, RequestLabels};
use trellis_proxy::trace::TraceParent;

const HTTP1_HEAD: &[u8] =
    b"GET /items?id=3 HTTP/1.1\r\nHost: catalog\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\n\r\n";
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const TLS_HELLO_START: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
];

fn detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("detect");
    for (name, bytes) in [
        ("http1", HTTP1_HEAD),
        ("http2", HTTP2_PREFACE),
        ("tls", TLS_HELLO_START),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| trellis_proxy::detect::classify(black_box(bytes)))
        });
    }
    g.finish();
}

fn request_headers(extra: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in [
        ("host", "catalog"),
        ("user-agent", "curl/8.5"),
        ("accept", "*/*"),
        ("x-request-id", "4bf92f3577b34da6a3ce929d0e0e4736"),
    ]
    .iter()
    .chain(extra)
    {
        h.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn hop_by_hop(c: &mut Criterion) {
    let mut g = c.benchmark_group("strip_hop_by_hop");
    let plain = request_headers(&[]);
    g.bench_function("none present", |b| {
        b.iter_batched_ref(
            || plain.clone(),
            trellis_proxy::http::strip_hop_by_hop,
            BatchSize::SmallInput,
        )
    });
    let listed = request_headers(&[("connection", "keep-alive, x-debug"), ("x-debug", "1")]);
    g.bench_function("connection list", |b| {
        b.iter_batched_ref(
            || listed.clone(),
            trellis_proxy::http::strip_hop_by_hop,
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn upstream_uri(c: &mut Criterion) {
    let authority = trellis_proxy::hop::authority("10.0.3.7:8080".parse().unwrap());
    let pq = PathAndQuery::from_static("/items?id=3");
    c.bench_function("upstream_uri", |b| {
        b.iter(|| trellis_proxy::hop::upstream_uri(black_box(&authority), true, Some(&pq)))
    });
}

fn balancing(c: &mut Criterion) {
    let endpoints: Vec<_> = (0..10u8)
        .map(|i| {
            let addr = SocketAddr::from(([10, 0, 3, i], 8080));
            Arc::new(EndpointState::new(addr, None, None))
        })
        .collect();
    let balancer = Balancer::new(endpoints);
    c.bench_function("balancer pick of 10 endpoints", |b| {
        b.iter(|| balancer.pick().map(|ep| ep.addr))
    });
}

fn request_metrics(c: &mut Criterion) {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let cache = RequestCache::default();
    let label = |s: &str| Arc::<str>::from(s);
    let (parent, route, rule, backend, empty) = (
        label("shop/catalog:80"),
        label("shop/catalog-canary"),
        label("1"),
        label("shop/catalog-v1:80"),
        label(""),
    );
    let labels = move || RequestLabels {
        direction: "outbound",
        parent: parent.clone(),
        route_kind: "HTTPRoute",
        route: route.clone(),
        rule: rule.clone(),
        backend: backend.clone(),
        peer_identity: empty.clone(),
        status: 200,
    };
    // The same series as the connection's last request: the common case.
    c.bench_function("request metrics, same series", |b| {
        b.iter(|| metrics.request(&cache, labels(), Duration::from_micros(180)))
    });
}

fn trace_context(c: &mut Criterion) {
    let value = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    c.bench_function("traceparent parse", |b| {
        b.iter(|| TraceParent::parse(black_box(value)).map(|t| t.sampled()))
    });
}

criterion_group!(
    benches,
    detection,
    hop_by_hop,
    upstream_uri,
    balancing,
    request_metrics,
    trace_context
);
criterion_main!(benches);
