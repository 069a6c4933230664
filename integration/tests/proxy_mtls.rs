//! Mutual TLS between real sidecars certified by a real `trellis-identity` in local mode:
//! traffic over mTLS, the client's identity at the server, plaintext refused, renewal under
//! load, an identity outage and an issuer replaced under the same root.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use trellis_integration::mesh::{Mesh, NS, ip, send};
use trellis_integration::{CONTROLLER_ACCOUNT, Ca, body, empty, http1_client, http2_client};

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs: [{name: echo-v1, port: 80}]
"#;

const SERVICE_ACCOUNTS: [&str; 4] = ["client", "v1", "v2", "mirror"];

fn ca(block: u8, lifetime: &str) -> Ca {
    let accounts: Vec<(&str, &str)> = SERVICE_ACCOUNTS.iter().map(|sa| (NS, *sa)).collect();
    Ca::new(ip(block, 100), lifetime, &accounts)
}

async fn mesh(block: u8, ca: &Ca) -> Mesh {
    let controller = ca.controller_flags(CONTROLLER_ACCOUNT.1);
    Mesh::start_with(block, ROUTE, &controller, |_, sa| ca.flags(NS, sa)).await
}

/// Sends requests back to back for `how_long`; returns (sent, failed).
async fn load(mesh: &Mesh, how_long: Duration) -> (usize, Vec<String>) {
    let client = http1_client();
    let (mut sent, mut failed) = (0, Vec::new());
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        let res = client
            .request(mesh.request("echo", "/").body(empty()).unwrap())
            .await;
        sent += 1;
        match res {
            Ok(r) if r.status() == 200 => {}
            Ok(r) => failed.push(format!("status {}", r.status())),
            Err(e) => failed.push(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (sent, failed)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_speak_mutual_tls_and_name_the_client() {
    let ca = ca(61, "1h");
    let mesh = mesh(61, &ca).await;
    let (status, _, echoed) = send(
        &http1_client(),
        mesh.request("echo", "/").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let echoed = echoed.unwrap();
    assert_eq!(echoed.pod, "echo-v1-0");
    assert_eq!(
        echoed.header("trellis-client-id").as_deref(),
        Some("spiffe://cluster.local/ns/mesh/sa/client")
    );
    // A client cannot claim an identity: its own copy of the header is replaced.
    let req = mesh
        .request("echo", "/")
        .header("trellis-client-id", "spiffe://forged")
        .body(empty())
        .unwrap();
    let (_, _, echoed) = send(&http1_client(), req).await;
    assert_eq!(
        echoed.unwrap().header("trellis-client-id").as_deref(),
        Some("spiffe://cluster.local/ns/mesh/sa/client")
    );
    // HTTP/2 end to end (gRPC-style) over the same mTLS hop.
    let req = http::Request::post(format!("http://{}/proto.Echo/Echo", mesh.client.outbound()))
        .header("host", "echo:7070")
        .header("content-type", "application/grpc")
        .body(body(&b"\0\0\0\0\0"[..]))
        .unwrap();
    let (status, _, echoed) = send(&http2_client(), req).await;
    assert_eq!(status, 200);
    assert_eq!(echoed.unwrap().version, "HTTP/2.0");
    // The server side counts requests by client identity.
    let server_metrics = mesh.backends[0].metrics().await;
    assert!(
        server_metrics.contains("peer_identity=\"spiffe://cluster.local/ns/mesh/sa/client\""),
        "{server_metrics}"
    );
    assert!(
        metric(
            &mesh.client.metrics().await,
            "trellis_identity_certificate_expiry_timestamp_seconds"
        ) > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_on_mesh_only_ports() {
    let ca = ca(62, "1h");
    let mesh = mesh(62, &ca).await;
    let inbound = SocketAddr::new(ip(62, 11), 4143);
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(inbound).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"TRELLIS/1 8080\r\nGET / HTTP/1.1\r\nhost: echo\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    let metrics = mesh.backends[0].metrics().await;
    assert!(
        metrics.contains("reason=\"plaintext_refused\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_and_a_new_issuer_under_load_fail_no_request() {
    let ca = ca(63, "6s");
    let mesh = mesh(63, &ca).await;
    let traffic = load(&mesh, Duration::from_secs(13));
    let rotate = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        ca.renew_issuer();
    };
    let ((sent, failed), ()) = tokio::join!(traffic, rotate);
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(sent > 100, "{sent}");
    // Certificates of 6 s over 13 s: every sidecar renewed at least twice.
    let renewals = metric(
        &mesh.client.metrics().await,
        "trellis_identity_renewals_total",
    );
    assert!(renewals >= 3.0, "{renewals}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_down_past_a_renewal_does_not_fail_traffic() {
    let mut ca = ca(64, "20s");
    let mesh = mesh(64, &ca).await;
    ca.stop();
    // Renewal is due after 13–15 s; the certificates stay valid for 20 s.
    let (sent, failed) = load(&mesh, Duration::from_secs(16)).await;
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let failures = metric(
        &mesh.client.metrics().await,
        "trellis_identity_failures_total",
    );
    assert!(failures >= 1.0, "{failures}");
}
