//! Mutual TLS on the discovery connection, with a real `trellis-identity` in local mode, a real
//! controller certified as `trellis-system/trellis-controller` and real sidecars: routing works
//! end to end; a plaintext client gets nothing; a proxy cannot ask for another namespace's
//! routes; a controller with another identity is refused by the proxies.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use trellis_api::Identity;
use trellis_api::discovery::{ErrorBody, OUTBOUND_PATH};
use trellis_integration::mesh::{Mesh, NS, ip, send};
use trellis_integration::{CONTROLLER_ACCOUNT, Ca, empty, http1_client};
use trellis_tls::identity::{IdentityConfig, certify};
use trellis_tls::{ALPN_H2, MeshTls};

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs: [{name: echo-v2, port: 80}]
"#;

const TD: &str = "cluster.local";

/// Identity with tokens for the mesh's pods, for `other/intruder`, and for an impostor
/// controller (beside the real controller's, which every [`Ca`] has).
fn ca(block: u8) -> Ca {
    let accounts = [
        (NS, "client"),
        (NS, "v1"),
        (NS, "v2"),
        (NS, "mirror"),
        ("other", "intruder"),
        (CONTROLLER_ACCOUNT.0, "impostor"),
    ];
    Ca::new(ip(block, 100), "1h", &accounts)
}

/// A mesh whose controller is certified as `controller_sa`; sidecars expect the default
/// controller identity.
async fn mesh(block: u8, ca: &Ca, controller_sa: &str) -> Mesh {
    let controller = ca.controller_flags(controller_sa);
    Mesh::start_with(block, ROUTE, &controller, |_, sa| ca.flags(NS, sa)).await
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A certificate for `ns/sa` from the real identity, as a sidecar gets one.
async fn certified(ca: &Ca, ns: &str, sa: &str) -> MeshTls {
    let anchors = std::fs::read_to_string(ca.dir.path().join("ca.crt")).unwrap();
    let tls = MeshTls::new(&anchors, TD).unwrap();
    let cfg = IdentityConfig {
        addr: ca.addr.to_string(),
        server_name: ca.addr.ip().to_string(),
        token_path: ca.dir.path().join(format!("token-{ns}-{sa}")),
        identity: Identity::new(TD, ns, sa),
    };
    certify(&cfg, &tls).await.unwrap();
    tls
}

/// One discovery request over mutual TLS as `tls`'s identity: the status and the first line
/// of the body (a snapshot, or the error document).
async fn ask(tls: &MeshTls, controller: SocketAddr, query: &str) -> (StatusCode, String) {
    let peer = Identity::new(TD, CONTROLLER_ACCOUNT.0, CONTROLLER_ACCOUNT.1);
    let client = tls.peer_client(&peer, &[ALPN_H2]).unwrap();
    let tcp = TcpStream::connect(controller).await.unwrap();
    let stream = client.connect(tcp).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(ALPN_H2));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://{controller}{OUTBOUND_PATH}?{query}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    let status = res.status();
    let mut body = res.into_body();
    let mut text = Vec::new();
    while !text.contains(&b'\n') {
        match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
            Ok(Some(Ok(frame))) => text.extend_from_slice(&frame.into_data().unwrap_or_default()),
            _ => break,
        }
    }
    (status, String::from_utf8(text).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_over_mutual_tls_routes_end_to_end() {
    let ca = ca(71);
    let mesh = mesh(71, &ca, CONTROLLER_ACCOUNT.1).await;
    let log = mesh.controller.process.log();
    assert!(
        log.contains(
            "(mutual TLS as spiffe://cluster.local/ns/trellis-system/sa/trellis-controller)"
        ),
        "{log}"
    );
    let (status, _, echoed) = send(
        &http1_client(),
        mesh.request("echo", "/").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{}", mesh.client.process.log());
    // The route applied: only the controller knows it sends `echo` to v2.
    let echoed = echoed.unwrap();
    assert_eq!(echoed.pod, "echo-v2-0");
    assert_eq!(
        echoed.header("trellis-client-id").as_deref(),
        Some("spiffe://cluster.local/ns/mesh/sa/client")
    );
    let metrics = mesh.client.metrics().await;
    assert_eq!(metric(&metrics, "trellis_discovery_connected"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_gets_no_policy() {
    let ca = ca(72);
    let mesh = mesh(72, &ca, CONTROLLER_ACCOUNT.1).await;
    // What a proxy without identity would send: HTTP/2 with prior knowledge, no TLS.
    let tcp = TcpStream::connect(mesh.controller.addr).await.unwrap();
    let handshake =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await;
    let outcome = match handshake {
        Err(e) => Err(e.to_string()),
        Ok((mut send, conn)) => {
            tokio::spawn(conn);
            let req = Request::get(format!(
                "http://{}{OUTBOUND_PATH}?namespace={NS}&target=echo.mesh:80",
                mesh.controller.addr
            ))
            .body(Empty::<Bytes>::new())
            .unwrap();
            let sent = tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await;
            match sent {
                Ok(Ok(res)) => Ok(res.status()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer".to_string()),
            }
        }
    };
    assert!(
        outcome.is_err(),
        "a plaintext client was answered: {outcome:?}"
    );
    mesh.controller
        .process
        .wait_for_log("mutual TLS handshake failed", Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_namespace_comes_from_the_client_certificate() {
    let ca = ca(73);
    let mesh = mesh(73, &ca, CONTROLLER_ACCOUNT.1).await;
    let controller = mesh.controller.addr;
    let intruder = certified(&ca, "other", "intruder").await;

    // Asking for another namespace's routes is refused, with a reason.
    let (status, body) = ask(
        &intruder,
        controller,
        &format!("namespace={NS}&target=echo.mesh:80"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let error: ErrorBody = serde_json::from_str(&body).unwrap();
    assert_eq!(
        error.error,
        "namespace \"mesh\" is not the client's: its certificate is \
         spiffe://cluster.local/ns/other/sa/intruder; ask for namespace \"other\" or leave the \
         parameter out"
    );

    // Its own namespace, named or left out, is answered: the Service is still reachable, but
    // with the producer route only as a client from `other` sees it.
    for query in ["namespace=other&target=echo.mesh:80", "target=echo.mesh:80"] {
        let (status, line) = ask(&intruder, controller, query).await;
        assert_eq!(status, StatusCode::OK, "{query}: {line}");
        assert!(line.contains(r#""name":"echo""#), "{query}: {line}");
    }
    // A mesh client gets its namespace without naming it.
    let client = certified(&ca, NS, "client").await;
    let (status, line) = ask(&client, controller, "target=echo:80").await;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert!(line.contains(r#""name":"echo""#), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_with_another_identity_is_refused() {
    let ca = ca(74);
    let mesh = mesh(74, &ca, "impostor").await;
    let (status, headers, _) = send(
        &http1_client(),
        mesh.request("echo", "/").body(empty()).unwrap(),
    )
    .await;
    // No policy arrives within --discovery-wait.
    assert_eq!(status, 503);
    assert!(headers.contains_key("trellis-proxy-error"), "{headers:?}");
    let metrics = mesh.client.metrics().await;
    assert_eq!(metric(&metrics, "trellis_discovery_connected"), Some(0.0));
    assert_eq!(
        metric(&metrics, "trellis_discovery_reconnects_total"),
        Some(0.0)
    );
    // The proxy hung up during the handshake, telling the controller why.
    let line = mesh
        .controller
        .process
        .wait_for_log("mutual TLS handshake failed", Duration::from_secs(5));
    assert!(line.contains("BadCertificate"), "{line}");
}
