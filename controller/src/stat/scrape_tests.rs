//! The scraped sources over real clients: kube's client against the scripted API server
//! (pod list, then `pods/proxy` per meshed pod), and admin ports over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::compute::{Filter, rows};
use super::scrape::{self, Sidecar};
use super::scrape_window;
use crate::kubernetes::fake_api::{FakeApi, Reply, failure, list};

fn outbound() -> Filter {
    Filter {
        direction: "outbound".into(),
        ..Filter::default()
    }
}

/// A sidecar's page: `n` requests of route `shop/catalog` to `backend`, all fast.
fn page(backend: &str, n: u64, failed: u64) -> String {
    let labels = format!(
        "direction=\"outbound\",parent=\"shop/catalog:80\",route_kind=\"HTTPRoute\",route=\"shop/catalog\",rule=\"0\",backend=\"{backend}\",peer_identity=\"\""
    );
    format!(
        "# HELP trellis_requests_total HTTP requests\n# TYPE trellis_requests_total counter\n\
trellis_requests_total{{{labels},status=\"200\",grpc_status=\"\"}} {n}\n\
trellis_requests_total{{{labels},status=\"503\",grpc_status=\"\"}} {failed}\n\
trellis_request_duration_seconds_bucket{{{labels},status=\"200\",grpc_status=\"\",le=\"0.001\"}} {n}\n\
trellis_request_duration_seconds_bucket{{{labels},status=\"200\",grpc_status=\"\",le=\"+Inf\"}} {n}\n\
trellis_requests_total{{direction=\"inbound\",parent=\"\",route_kind=\"\",route=\"\",rule=\"\",backend=\"\",peer_identity=\"spiffe://x\",status=\"200\",grpc_status=\"\"}} 999\n# EOF\n"
    )
}

fn pod(ns: &str, name: &str, meshed: bool, phase: &str) -> Value {
    let mut annotations = json!({});
    if meshed {
        annotations = json!({"trellis.dev/proxy-version": "0.1.0", "prometheus.io/port": "4191"});
    }
    json!({
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": phase, "podIP": "10.1.0.5"}
    })
}

fn metrics(text: String) -> Reply {
    Reply::Text(StatusCode::OK, text.leak())
}

#[tokio::test(start_paused = true)]
async fn kubernetes_lists_meshed_pods_and_reads_each_through_the_pod_proxy() {
    let (client, api) = FakeApi::start();
    api.always_list(
        "/api/v1/namespaces/shop/pods",
        list(
            "Pod",
            "v1",
            "7",
            vec![
                pod("shop", "web-0", true, "Running"),
                pod("shop", "web-1", true, "Running"),
                pod("shop", "gone-0", true, "Running"),
                pod("shop", "plain-0", false, "Running"),
                pod("shop", "new-0", true, "Pending"),
            ],
        ),
    );
    let proxy = |name: &str| format!("/api/v1/namespaces/shop/pods/{name}:4191/proxy/metrics");
    // Two scrapes each: the deltas are what the window saw.
    api.answers(
        Method::GET,
        &proxy("web-0"),
        vec![
            metrics(page("shop/catalog-v1:80", 100, 0)),
            metrics(page("shop/catalog-v1:80", 190, 10)),
        ],
    );
    api.answers(
        Method::GET,
        &proxy("web-1"),
        vec![
            metrics(page("shop/catalog-v2:80", 5, 0)),
            metrics(page("shop/catalog-v2:80", 25, 0)),
        ],
    );
    // What the API server says when the pod's port does not answer.
    let unreachable = failure(
        503,
        "ServiceUnavailable",
        "error trying to reach service: dial tcp 10.1.0.7:4191: connect: connection refused",
    );
    api.answers(
        Method::GET,
        &proxy("gone-0"),
        vec![unreachable.clone(), unreachable],
    );

    let sidecars = scrape::meshed_pods(&client, Some("shop"), Some("app=web"))
        .await
        .unwrap();
    let names: Vec<&str> = sidecars.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["shop/gone-0", "shop/web-0", "shop/web-1"]);
    let listed = api.seen_at(&Method::GET, "/api/v1/namespaces/shop/pods");
    assert_eq!(listed.len(), 1);
    assert!(
        listed[0].query.contains("labelSelector=app%3Dweb"),
        "{}",
        listed[0].query
    );

    let (tallies, read) = scrape_window(
        &sidecars,
        &outbound(),
        Duration::from_secs(10),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(read, 2);
    let table = rows(&tallies);
    assert_eq!(table.len(), 2, "{table:?}");
    assert_eq!(table[0].key.backend, "shop/catalog-v1:80");
    assert_eq!(table[0].requests, 100.0);
    assert_eq!(table[0].success_rate, Some(0.9));
    let rps = table[0].requests_per_second.unwrap();
    assert!((rps - 10.0).abs() < 0.01, "{rps}");
    assert_eq!(table[0].p99_seconds.map(|s| s <= 0.001), Some(true));
    assert_eq!(table[1].key.backend, "shop/catalog-v2:80");
    assert_eq!(table[1].requests, 20.0);
    assert_eq!(api.seen_at(&Method::GET, &proxy("web-0")).len(), 2);
    assert_eq!(api.seen_at(&Method::GET, &proxy("plain-0")).len(), 0);
}

#[tokio::test(start_paused = true)]
async fn kubernetes_lists_every_namespace_without_n() {
    let (client, api) = FakeApi::start();
    api.always_list(
        "/api/v1/pods",
        list(
            "Pod",
            "v1",
            "7",
            vec![
                pod("a", "x-0", true, "Running"),
                pod("b", "y-0", true, "Running"),
            ],
        ),
    );
    api.always(
        Method::GET,
        "/api/v1/namespaces/b/pods/y-0:4191/proxy/metrics",
        metrics(page("b/svc:80", 3, 1)),
    );
    let sidecars = scrape::meshed_pods(&client, None, None).await.unwrap();
    assert_eq!(sidecars.len(), 2);
    // Totals since start: one scrape; x-0's never answers and is left out after the timeout.
    let (tallies, read) = scrape_window(
        &sidecars,
        &outbound(),
        Duration::ZERO,
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(read, 1);
    let table = rows(&tallies);
    assert_eq!(table.len(), 1);
    assert_eq!(table[0].requests, 4.0);
    assert_eq!(table[0].requests_per_second, None);
}

/// Serves `body` as `/metrics` on a loopback port, for every request.
async fn metrics_server(body: String) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    let body = body.clone();
                    async move {
                        let _: &http::Request<hyper::body::Incoming> = &req;
                        let res = if req.uri().path() == "/metrics" {
                            Response::new(Full::new(Bytes::from(body)))
                        } else {
                            let mut r = Response::new(Full::new(Bytes::from("not found\n")));
                            *r.status_mut() = StatusCode::NOT_FOUND;
                            r
                        };
                        Ok::<_, Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn admin_addresses_are_scraped_and_one_that_fails_leaves_the_others() {
    let good = metrics_server(page("shop/catalog-v1:80", 7, 0)).await;
    let garbage = metrics_server("this is not{ a metrics page\n".into()).await;
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let http = scrape::http_client();
    let sidecars = vec![
        Sidecar::admin(&http, &good.to_string()).unwrap(),
        Sidecar::admin(&http, &format!("http://{garbage}/metrics")).unwrap(),
        Sidecar::admin(&http, &closed.to_string()).unwrap(),
    ];
    let (tallies, read) = scrape_window(
        &sidecars,
        &outbound(),
        Duration::ZERO,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(read, 1);
    assert_eq!(rows(&tallies)[0].requests, 7.0);
    let e = sidecars[2]
        .metrics(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("onnection refused"), "{e}");
}

#[test]
fn admin_addresses_take_the_default_port_and_refuse_other_schemes() {
    let http = scrape::http_client();
    let name = |a: &str| Sidecar::admin(&http, a).map(|s| s.name);
    assert_eq!(name("10.1.0.5").unwrap(), "10.1.0.5:4191");
    assert_eq!(name("10.1.0.5:9999").unwrap(), "10.1.0.5:9999");
    assert_eq!(name("http://web-0:4191/").unwrap(), "web-0:4191");
    assert_eq!(name("[::1]").unwrap(), "[::1]:4191");
    assert!(name("https://10.1.0.5:4191").is_err());
    assert!(name("").is_err());
    assert!(name("a b").is_err());
}
