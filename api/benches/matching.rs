//! Cost of choosing a rule: `RouteTable::find` on the tables a proxy holds per destination.
//!
//! Run with `cargo bench -p trellis-api --bench matching`. Every request is built once, outside
//! the timed loop, as the proxy receives it already parsed.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use trellis_api::matching::{RequestHead, RouteTable};
use trellis_api::policy::{
    GrpcMatch, GrpcMethodMatch, HttpMatch, NameMatch, ObjectRef, PathMatch, Route, RouteKind, Rule,
    ValueMatch,
};

fn route<M>(kind: RouteKind, name: &str, rules: Vec<Vec<M>>) -> Route<M> {
    Route {
        kind,
        id: ObjectRef {
            namespace: "shop".to_string(),
            name: name.to_string(),
        },
        rules: rules
            .into_iter()
            .enumerate()
            .map(|(index, matches)| Rule {
                index,
                name: None,
                matches,
                filters: Vec::new(),
                backends: Vec::new(),
                timeouts: Default::default(),
                retry: None,
            })
            .collect(),
    }
}

fn exact(v: &str) -> ValueMatch {
    ValueMatch::Exact(v.to_string())
}

fn regex(v: &str) -> ValueMatch {
    ValueMatch::Regex(v.to_string())
}

fn named(name: &str, value: ValueMatch) -> NameMatch {
    NameMatch {
        name: name.to_string(),
        value,
    }
}

fn http_match(path: PathMatch) -> HttpMatch {
    HttpMatch {
        path,
        ..HttpMatch::default()
    }
}

/// 20 routes × 5 rules, 140 compiled matches, no catch-all: the shape of a busy Service with
/// one route per team. Route `i` owns `/team-ii/…` and mixes every kind of match. All paths of
/// one kind have the same length, so precedence among routes is slice order and route 0's
/// exact match is the first entry of the table.
fn large_http_routes() -> Vec<Route<HttpMatch>> {
    (0..20)
        .map(|i| {
            let base = format!("/team-{i:02}");
            let rules = vec![
                // Exact health path.
                vec![http_match(PathMatch::Exact(format!("{base}/health")))],
                // Canary by header, two alternatives.
                vec![
                    HttpMatch {
                        headers: vec![named("x-canary", exact("always"))],
                        ..http_match(PathMatch::Prefix(format!("{base}/api/v2")))
                    },
                    HttpMatch {
                        headers: vec![
                            named("x-canary", exact("sometimes")),
                            named("x-user", regex("beta-[0-9]+")),
                        ],
                        ..http_match(PathMatch::Prefix(format!("{base}/api/v2")))
                    },
                ],
                // Debug traffic by query parameter and method.
                vec![HttpMatch {
                    query_params: vec![named("debug", exact("1"))],
                    method: Some("GET".to_string()),
                    ..http_match(PathMatch::Prefix(format!("{base}/api")))
                }],
                // Items by id.
                vec![http_match(PathMatch::Regex(format!(
                    "{base}/items/[0-9]+(/reviews)?"
                )))],
                // The rest of the team's prefix, per tenant header, or plain.
                vec![
                    HttpMatch {
                        headers: vec![named("x-tenant", regex("tenant-[a-z]+"))],
                        ..http_match(PathMatch::Prefix(base.clone()))
                    },
                    http_match(PathMatch::Prefix(base.clone())),
                ],
            ];
            route(RouteKind::Http, &format!("team-{i:02}"), rules)
        })
        .collect()
}

/// The Gateway API mesh conformance tables (matching, header matching, query matching) as one
/// route set: small, with a catch-all, as most real Services have.
fn conformance_http_table() -> RouteTable<HttpMatch> {
    let header = |pairs: &[(&str, &str)]| HttpMatch {
        headers: pairs.iter().map(|(n, v)| named(n, exact(v))).collect(),
        ..HttpMatch::default()
    };
    let matching = route(
        RouteKind::Http,
        "mesh-matching",
        vec![
            vec![http_match(PathMatch::Prefix("/".to_string()))],
            vec![http_match(PathMatch::Prefix("/v2".to_string()))],
            vec![header(&[("version", "one")])],
            vec![header(&[("version", "two")])],
        ],
    );
    let headers = route(
        RouteKind::Http,
        "mesh-header-matching",
        vec![
            vec![header(&[("version", "one"), ("color", "orange")])],
            vec![header(&[("version", "two"), ("color", "blue")])],
            vec![
                header(&[("color", "green")]),
                header(&[("color", "yellow")]),
            ],
            vec![header(&[("color", "purple"), ("size", "small")])],
        ],
    );
    let query = |name: &str, value: &str| HttpMatch {
        query_params: vec![named(name, exact(value))],
        ..HttpMatch::default()
    };
    let queries = route(
        RouteKind::Http,
        "mesh-query-matching",
        vec![
            vec![query("animal", "whale")],
            vec![HttpMatch {
                query_params: vec![
                    named("animal", exact("dolphin")),
                    named("color", exact("blue")),
                ],
                ..HttpMatch::default()
            }],
            vec![HttpMatch {
                query_params: vec![named("animal", exact("dolphin"))],
                ..http_match(PathMatch::Exact("/path3".to_string()))
            }],
            vec![query("animal", "kraken")],
        ],
    );
    RouteTable::<HttpMatch>::compile(&[matching, headers, queries]).unwrap()
}

/// 10 gRPC services with exact methods, a regex method family and a header-gated rule.
fn grpc_table() -> RouteTable<GrpcMatch> {
    let method = |service: Option<ValueMatch>, method: Option<ValueMatch>| GrpcMatch {
        method: Some(GrpcMethodMatch { service, method }),
        headers: Vec::new(),
    };
    let routes: Vec<Route<GrpcMatch>> = (0..10)
        .map(|i| {
            let service = format!("shop.catalog.v{i}.Catalog");
            let rules = vec![
                vec![method(Some(exact(&service)), Some(exact("GetItem")))],
                vec![method(Some(exact(&service)), Some(exact("ListItems")))],
                vec![method(Some(exact(&service)), Some(regex("Watch[A-Za-z]+")))],
                vec![GrpcMatch {
                    headers: vec![named("x-canary", exact("always"))],
                    ..method(Some(exact(&service)), None)
                }],
                vec![method(Some(exact(&service)), None)],
            ];
            route(RouteKind::Grpc, &format!("catalog-v{i}"), rules)
        })
        .collect();
    RouteTable::<GrpcMatch>::compile(&routes).unwrap()
}

/// A request as a client sends it, with the usual handful of headers.
fn request(method: Method, uri: &str, extra: &[(&str, &str)]) -> Request<()> {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "catalog.shop.svc.cluster.local"),
        ("user-agent", "shop-web/1.4"),
        ("accept", "application/json"),
        ("x-request-id", "3f1c9a5e-7b7e-4d8f-9a44-0f1f2c3d4e5f"),
    ]
    .iter()
    .chain(extra)
    {
        headers.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    let mut req = Request::builder().method(method).uri(uri).body(()).unwrap();
    *req.headers_mut() = headers;
    req
}

fn grpc_request(path: &str, extra: &[(&str, &str)]) -> Request<()> {
    let mut all = vec![("content-type", "application/grpc"), ("te", "trailers")];
    all.extend_from_slice(extra);
    request(Method::POST, path, &all)
}

/// A named request and the `(route, rule)` it must select.
type Case<'a> = (&'a str, Request<()>, Option<(usize, usize)>);

/// Times `find` on one request and checks, once, that it finds what the case name says.
fn bench_find<M>(c: &mut Criterion, group: &str, table: &RouteTable<M>, cases: &[Case<'_>]) {
    let mut g = c.benchmark_group(group);
    for (name, req, expected) in cases {
        let head = RequestHead::from(req);
        let found = table.find(&head).map(|f| (f.route, f.rule));
        assert_eq!(found, *expected, "{group}/{name}");
        g.bench_function(*name, |b| {
            b.iter(|| black_box(table.find(black_box(&head))).is_some())
        });
    }
    g.finish();
}

fn large_table(c: &mut Criterion) {
    let table = RouteTable::<HttpMatch>::compile(&large_http_routes()).unwrap();
    let cases = [
        (
            "first_entry_exact",
            request(Method::GET, "/team-00/health", &[]),
            Some((0, 0)),
        ),
        (
            "mid_table_header",
            request(
                Method::GET,
                "/team-10/api/v2/items",
                &[("x-canary", "sometimes"), ("x-user", "beta-42")],
            ),
            Some((10, 1)),
        ),
        (
            "query_param",
            request(Method::GET, "/team-15/api/orders?page=2&debug=1", &[]),
            Some((15, 2)),
        ),
        (
            "last_team_prefix",
            request(Method::GET, "/team-19/static/app.js", &[]),
            Some((19, 4)),
        ),
        (
            "no_match",
            request(
                Method::GET,
                "/checkout/cart?debug=1",
                &[("x-canary", "always"), ("x-tenant", "tenant-acme")],
            ),
            None,
        ),
    ];
    bench_find(c, "find_http_20x5", &table, &cases);
}

fn conformance_table(c: &mut Criterion) {
    let table = conformance_http_table();
    let cases = [
        (
            "path_v2",
            request(Method::GET, "/v2/example", &[]),
            Some((0, 1)),
        ),
        (
            "two_headers",
            request(Method::GET, "/", &[("version", "two"), ("color", "blue")]),
            Some((1, 1)),
        ),
        (
            "two_query_params",
            request(Method::GET, "/?animal=dolphin&color=blue", &[]),
            Some((2, 1)),
        ),
        ("catch_all", request(Method::GET, "/", &[]), Some((0, 0))),
    ];
    bench_find(c, "find_http_conformance", &table, &cases);
}

fn grpc(c: &mut Criterion) {
    let table = grpc_table();
    let cases = [
        (
            "exact_method",
            grpc_request("/shop.catalog.v0.Catalog/GetItem", &[]),
            Some((0, 0)),
        ),
        (
            "regex_method",
            grpc_request("/shop.catalog.v7.Catalog/WatchPrices", &[]),
            Some((7, 2)),
        ),
        (
            "header_gated_service",
            grpc_request("/shop.catalog.v9.Catalog/Delete", &[("x-canary", "always")]),
            Some((9, 3)),
        ),
        (
            "no_match",
            grpc_request("/shop.orders.v1.Orders/Place", &[]),
            None,
        ),
    ];
    bench_find(c, "find_grpc_10x5", &table, &cases);
}

/// The per-snapshot cost paid when a policy arrives: regexes and header names compiled, sorted.
fn compile(c: &mut Criterion) {
    let routes = large_http_routes();
    c.bench_function("compile_http_20x5", |b| {
        b.iter(|| RouteTable::<HttpMatch>::compile(black_box(&routes)).unwrap())
    });
}

criterion_group!(benches, large_table, conformance_table, grpc, compile);
criterion_main!(benches);
