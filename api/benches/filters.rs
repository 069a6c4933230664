//! Cost of the filters a rule applies per request: header modifiers, URL rewrites, redirects.
//!
//! Run with `cargo bench -p trellis-api --bench filters`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use trellis_api::filters::{
    CompiledHeaderModifier, RedirectRequest, redirect_location, rewrite_path,
};
use trellis_api::policy::{Header, HeaderModifier, PathModifier, RequestRedirect};

fn headers(list: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in list {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn pairs(list: &[(&str, &str)]) -> Vec<Header> {
    list.iter()
        .map(|(name, value)| Header {
            name: name.to_string(),
            value: value.to_string(),
        })
        .collect()
}

/// A request head as a browser-facing service sends it on: ten headers.
fn request_headers() -> HeaderMap {
    headers(&[
        ("host", "catalog.shop.svc.cluster.local"),
        ("user-agent", "shop-web/1.4"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, br"),
        ("x-request-id", "3f1c9a5e-7b7e-4d8f-9a44-0f1f2c3d4e5f"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("x-user", "beta-42"),
        ("x-debug", "1"),
        ("x-internal-token", "secret"),
        ("content-length", "0"),
    ])
}

/// `apply` on a fresh copy of the headers each time; the copy is made outside the timing.
fn header_modifier(c: &mut Criterion) {
    let mut g = c.benchmark_group("header_modifier_apply");
    let cases = [
        (
            "set1",
            HeaderModifier {
                set: pairs(&[("x-route", "catalog")]),
                ..HeaderModifier::default()
            },
        ),
        (
            "set2_add2_remove2",
            HeaderModifier {
                set: pairs(&[("x-route", "catalog"), ("x-user", "anonymous")]),
                add: pairs(&[("x-via", "trellis"), ("x-debug", "2")]),
                remove: vec!["x-internal-token".to_string(), "x-absent".to_string()],
            },
        ),
    ];
    for (name, modifier) in cases {
        let compiled = CompiledHeaderModifier::compile(&modifier).unwrap();
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                request_headers,
                |h| compiled.apply(black_box(h)),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn rewrite(c: &mut Criterion) {
    let mut g = c.benchmark_group("rewrite_path");
    let prefix = PathModifier::ReplacePrefixMatch("/catalog/v2".to_string());
    let full = PathModifier::ReplaceFullPath("/healthz".to_string());
    g.bench_function("replace_prefix_match", |b| {
        b.iter(|| {
            rewrite_path(
                black_box(&prefix),
                black_box("/shop/items/42/reviews"),
                black_box(Some("/shop")),
            )
        })
    });
    g.bench_function("replace_full_path", |b| {
        b.iter(|| rewrite_path(black_box(&full), black_box("/shop/items/42"), None))
    });
    g.finish();
}

fn redirect(c: &mut Criterion) {
    let mut g = c.benchmark_group("redirect_location");
    let req = RedirectRequest {
        scheme: "http",
        host: "catalog.shop:8080",
        path: "/old/items/42",
        query: Some("page=2&sort=price"),
        matched_prefix: Some("/old"),
        service_port: 8080,
    };
    let cases = [
        (
            "hostname_and_prefix",
            RequestRedirect {
                scheme: None,
                hostname: Some("catalog-v2.shop".to_string()),
                path: Some(PathModifier::ReplacePrefixMatch("/new".to_string())),
                port: None,
                status: 301,
            },
        ),
        (
            "https_upgrade",
            RequestRedirect {
                scheme: Some("https".to_string()),
                hostname: None,
                path: None,
                port: None,
                status: 302,
            },
        ),
    ];
    for (name, r) in &cases {
        g.bench_function(*name, |b| {
            b.iter(|| redirect_location(black_box(r), black_box(&req)))
        });
    }
    g.finish();
}

criterion_group!(benches, header_modifier, rewrite, redirect);
criterion_main!(benches);
