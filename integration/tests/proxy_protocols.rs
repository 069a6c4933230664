//! What apps speak besides request/response HTTP/1.1, through a pair of real sidecars over
//! mutual TLS: HTTP/2's `:authority` kept end to end (and changed by a hostname rewrite),
//! WebSockets and other HTTP/1.1 upgrades, TLS and other non-HTTP bytes to a routed Service
//! port, and server-first protocols without a detection delay.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::net::SocketAddr;

use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use trellis_integration::mesh::{Mesh, NS, ip};
use trellis_integration::{CONTROLLER_ACCOUNT, Ca, Echoed, empty};

const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-h2, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /rewrite}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: rewritten.example}}]
    backendRefs: [{name: echo-v1, port: 7070}]
  - backendRefs: [{name: echo-v1, port: 7070}]
"#;

const SERVICE_ACCOUNTS: [&str; 4] = ["client", "v1", "v2", "mirror"];

async fn mesh(block: u8) -> (Ca, Mesh) {
    let accounts: Vec<(&str, &str)> = SERVICE_ACCOUNTS.iter().map(|sa| (NS, *sa)).collect();
    let ca = Ca::new(ip(block, 100), "1h", &accounts);
    let controller = ca.controller_flags(CONTROLLER_ACCOUNT.1);
    let mesh = Mesh::start_with(block, ROUTES, &controller, |_, sa| ca.flags(NS, sa)).await;
    (ca, mesh)
}

/// Sends one HTTP/2 request (prior knowledge) with `authority` to the sidecar's outbound port,
/// as a gRPC client that talks to it directly does.
async fn h2_get(outbound: SocketAddr, authority: &str, path: &str) -> Echoed {
    let io = TokioIo::new(tokio::net::TcpStream::connect(outbound).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://{authority}{path}"))
        .body(empty())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_is_kept_and_rewritten_as_authority() {
    let (_ca, mesh) = mesh(91).await;
    let out = mesh.client.outbound();
    let seen = h2_get(out, "echo.mesh.svc.cluster.local:7070", "/x").await;
    assert_eq!(seen.pod, "echo-v1-0");
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(
        seen.authority.as_deref(),
        Some("echo.mesh.svc.cluster.local:7070")
    );
    assert_eq!(seen.header("host"), None);
    // A hostname rewrite changes `:authority`, and adds no conflicting `host` header.
    let seen = h2_get(out, "echo:7070", "/rewrite").await;
    assert_eq!(seen.authority.as_deref(), Some("rewritten.example"));
    assert_eq!(seen.header("host"), None);
}
