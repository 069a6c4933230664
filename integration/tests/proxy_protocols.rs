//! What apps speak besides request/response HTTP/1.1, through a pair of real sidecars over
//! mutual TLS: HTTP/2's `:authority` kept end to end (and changed by a hostname rewrite),
//! WebSockets and other HTTP/1.1 upgrades, TLS and other non-HTTP bytes to a routed Service
//! port, and server-first protocols without a detection delay.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
#![allow(clippy::result_large_err)] // tungstenite's handshake callback returns its own type

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

/// A Service `ws` whose one pod (meshed, at `.20`) runs a WebSocket app, routed by an
/// HTTPRoute that adds a header on `/chat`.
fn ws_cluster(block: u8) -> String {
    let pod = ip(block, 20);
    format!(
        "---
apiVersion: v1
kind: Pod
metadata: {{name: ws-0, namespace: mesh, annotations: {{trellis.dev/proxy-version: test}}}}
spec: {{serviceAccountName: ws, containers: [{{name: app, image: ws}}]}}
status: {{podIP: {pod}}}
---
apiVersion: v1
kind: Service
metadata: {{name: ws, namespace: mesh}}
spec:
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: ws-1, namespace: mesh, labels: {{kubernetes.io/service-name: ws}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- {{addresses: ['{pod}'], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: ws-0}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: ws, namespace: mesh}}
spec:
  parentRefs: [{{group: '', kind: Service, name: ws, port: 80}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /chat}}}}]
    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-routed, value: chat}}]}}}}]
    backendRefs: [{{name: ws, port: 80}}]
"
    )
}

/// A WebSocket app: greets, then echoes every message; reports the handshake's headers.
async fn ws_app(addr: SocketAddr) -> tokio::sync::mpsc::UnboundedReceiver<http::HeaderMap> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let callback =
                    |req: &tokio_tungstenite::tungstenite::handshake::server::Request, res| {
                        let _ = tx.send(req.headers().clone());
                        Ok(res)
                    };
                let mut ws = tokio_tungstenite::accept_hdr_async(stream, callback)
                    .await
                    .unwrap();
                ws.send(Message::text("hello from ws-0")).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    ws.send(msg).await.unwrap();
                }
            });
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_cross_the_mesh_routed_both_ways_and_idle() {
    use futures_util::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio_tungstenite::tungstenite::Message;
    use trellis_integration::{Controller, Sidecar};

    let block = 92;
    let dir = trellis_integration::scratch_dir();
    std::fs::write(dir.path().join("cluster.yaml"), ws_cluster(block)).unwrap();
    let ca = Ca::new(ip(block, 100), "1h", &[(NS, "client"), (NS, "ws")]);
    let controller = trellis_integration::Controller::start_with(
        dir.path(),
        SocketAddr::new(ip(block, 1), 0),
        &ca.controller_flags(CONTROLLER_ACCOUNT.1),
    );
    let _: &Controller = &controller;
    let mut headers = ws_app(SocketAddr::new(ip(block, 20), 8080)).await;
    // HTTP connections idle for a second are closed: an upgraded one is not HTTP any more.
    let sidecar = |host: u8, sa: &str| {
        let mut flags = ca.flags(NS, sa);
        flags.extend(["--http-idle-timeout".into(), "1s".into()]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Sidecar::start(ip(block, host), NS, controller.addr, &flags)
    };
    let _server = sidecar(20, "ws");
    let client = sidecar(9, "client");

    let stream = tokio::net::TcpStream::connect(client.outbound())
        .await
        .unwrap();
    let (mut ws, res) =
        tokio_tungstenite::client_async("ws://ws.mesh.svc.cluster.local/chat", stream)
            .await
            .unwrap();
    assert_eq!(res.status(), 101);
    let seen = headers.recv().await.unwrap();
    assert_eq!(seen["x-routed"], "chat", "routed by the HTTPRoute");
    assert_eq!(
        seen["trellis-client-id"], "spiffe://cluster.local/ns/mesh/sa/client",
        "over mutual TLS"
    );
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello from ws-0")
    );
    for text in ["one", "two"] {
        ws.send(Message::text(text)).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    // Long-lived and idle past the HTTP idle timeout: still open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3])
    );
    // The close handshake goes through and ends the stream.
    ws.close(None).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Close(_)) | Err(_)) | None => {}
        Some(Ok(other)) => panic!("after close: {other:?}"),
    }
    let text = client.metrics().await;
    assert!(
        text.contains("route=\"mesh/ws\"") && text.contains("status=\"101\""),
        "{text}"
    );
}
