//! The real `trellis-controller` binary in local mode: load a manifest directory, stream
//! policies over one HTTP/2 connection, and follow edits of the directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use trellis_api::policy::{
    BackendTarget, HttpMatch, OutboundPolicy, PathMatch, RouteKind, Routing, ServicePolicy,
};
use trellis_integration::manifests::{SERVICE, route};
use trellis_integration::{Controller, binary};

/// Reads a newline-delimited body one policy at a time.
struct Lines {
    body: Incoming,
    buf: Vec<u8>,
}

impl Lines {
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8(line).unwrap());
            }
            let frame = self.body.frame().await?.expect("stream failed");
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }

    async fn policy_within(&mut self, within: Duration) -> OutboundPolicy {
        let line = tokio::time::timeout(within, self.next())
            .await
            .unwrap_or_else(|_| panic!("no snapshot within {within:?}"))
            .expect("stream ended");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }
}

async fn subscribe(send: &mut http2::SendRequest<Empty<Bytes>>, target: &str) -> Lines {
    let uri = format!("http://controller/v1/outbound?namespace=shop&target={target}");
    let resp = send
        .send_request(Request::get(uri).body(Empty::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    Lines {
        body: resp.into_body(),
        buf: Vec::new(),
    }
}

fn service_policy(policy: &OutboundPolicy) -> &ServicePolicy {
    match policy {
        OutboundPolicy::Service(p) => p,
        other => panic!("expected the policy of Service shop/web, got {other:?}"),
    }
}

/// The paths of the HTTP rules, or `None` for passthrough.
fn route_prefixes(policy: &ServicePolicy) -> Option<Vec<PathMatch>> {
    match &policy.routing {
        Routing::Passthrough { .. } => None,
        Routing::Http { routes } => {
            assert_eq!(routes.len(), 1, "{routes:?}");
            assert_eq!(
                (routes[0].kind, routes[0].id.to_string()),
                (RouteKind::Http, "shop/web".to_string())
            );
            let matches = routes[0].rules.iter().flat_map(|r| r.matches.iter());
            Some(matches.map(|m: &HttpMatch| m.path.clone()).collect())
        }
        Routing::Grpc { .. } => panic!("unexpected gRPC routing: {policy:?}"),
    }
}

/// Writes a file the way an editor that replaces files does, so the change is one event.
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[tokio::test]
async fn serves_the_directory_and_follows_its_edits() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", SERVICE);
    let controller = Controller::start(dir.path());
    let addr = controller.addr;

    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);

    // The Service alone: passthrough to its endpoints.
    let mut lines = subscribe(&mut send, "10.96.0.10:80").await;
    let first = lines.policy_within(Duration::from_secs(2)).await;
    let policy = service_policy(&first);
    assert_eq!(
        (policy.service.to_string(), policy.port),
        ("shop/web".to_string(), 80)
    );
    let Routing::Passthrough { backend } = &policy.routing else {
        panic!("expected passthrough: {policy:?}");
    };
    let BackendTarget::Service { endpoints, .. } = &backend.target else {
        panic!("expected the Service as backend: {backend:?}");
    };
    let endpoints: Vec<(String, Option<String>)> = endpoints
        .iter()
        .map(|e| {
            (
                e.addr.to_string(),
                e.identity.as_ref().map(ToString::to_string),
            )
        })
        .collect();
    let meshed = Some("spiffe://cluster.local/ns/shop/sa/web".to_string());
    assert_eq!(endpoints, [("10.1.0.5:8080".to_string(), meshed)]);

    // The same destination asked by name gets the same policy.
    let mut by_name = subscribe(&mut send, "web.shop.svc.cluster.local:80").await;
    assert_eq!(by_name.policy_within(Duration::from_secs(2)).await, first);

    // Adding a route reaches the open stream within a second.
    let start = Instant::now();
    write(dir.path(), "route.yaml", &route("/api"));
    let routed = lines.policy_within(Duration::from_secs(1)).await;
    eprintln!("route applied after {:?}", start.elapsed());
    assert_eq!(
        route_prefixes(service_policy(&routed)),
        Some(vec![PathMatch::Prefix("/api".into())])
    );

    // A broken edit is reported and changes nothing: no line on the open stream, and a new
    // subscription gets the last good state.
    write(
        dir.path(),
        "route.yaml",
        &route("/api").replace("PathPrefix", "FOO"),
    );
    let error = controller
        .process
        .wait_for_log("route.yaml", Duration::from_secs(2));
    assert!(error.contains("ERROR"), "{error}");
    assert!(
        error.contains("route.yaml:1: document 1 (HTTPRoute shop/web): unknown variant `FOO`"),
        "{error}"
    );
    if let Ok(line) = tokio::time::timeout(Duration::from_secs(1), lines.next()).await {
        panic!("a broken directory changed the policy: {line:?}");
    }
    let mut fresh = subscribe(&mut send, "10.96.0.10:80").await;
    assert_eq!(fresh.policy_within(Duration::from_secs(2)).await, routed);

    // Fixing the file brings the new state to both streams.
    write(dir.path(), "route.yaml", &route("/v2"));
    let fixed = lines.policy_within(Duration::from_secs(1)).await;
    assert_eq!(
        route_prefixes(service_policy(&fixed)),
        Some(vec![PathMatch::Prefix("/v2".into())])
    );
    assert_eq!(fresh.policy_within(Duration::from_secs(1)).await, fixed);

    // Removing the route goes back to passthrough.
    std::fs::remove_file(dir.path().join("route.yaml")).unwrap();
    let removed = lines.policy_within(Duration::from_secs(1)).await;
    assert_eq!(removed, first);
}

#[tokio::test]
async fn unknown_destinations_are_not_services() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", SERVICE);
    let controller = Controller::start(dir.path());
    let tcp = TcpStream::connect(controller.addr).await.unwrap();
    let (mut send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    for target in ["10.96.0.99:80", "10.96.0.10:81", "example.com:443"] {
        let mut lines = subscribe(&mut send, target).await;
        let policy = lines.policy_within(Duration::from_secs(2)).await;
        assert!(
            matches!(policy, OutboundPolicy::NotAService { .. }),
            "{target}: {policy:?}"
        );
    }
}

fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(binary("trellis-controller"))
        .args(args)
        .env("TRELLIS_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_directory_at_start_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", SERVICE);
    write(
        dir.path(),
        "route.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [x\n",
    );
    let path = dir.path().to_str().unwrap();
    let (code, log) = run_to_exit(&[
        "serve",
        "--manifests",
        path,
        "--discovery-addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("route.yaml:3: unclosed bracket '[' at line 3"),
        "{log}"
    );
    assert!(!log.contains("listening on"), "{log}");

    let missing = dir.path().join("missing");
    let (code, log) = run_to_exit(&["serve", "--manifests", missing.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("not a directory"), "{log}");
}
