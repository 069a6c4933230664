//! The control plane changing under traffic, pods as network namespaces (see
//! `trellis_integration::netns`): a route edited while requests flow, and the controller
//! killed and restarted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use trellis_integration::netns::{Mesh, Pod, PodSpec, Reply, ServiceSpec, available, metric};

const V1: &str = "echo-v1-0";
const V2: &str = "echo-v2-0";
const CLIENT: &str = "client-0";
const URL: &str = "http://echo.mesh.svc.cluster.local/";

fn route_to(backend: &str) -> String {
    format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo, namespace: mesh}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo, port: 80}}]
  rules:
  - backendRefs: [{{name: {backend}, port: 80}}]
"#
    )
}

fn mesh() -> Mesh {
    Mesh::builder(3)
        .pod(PodSpec::meshed(V1, "mesh", "v1").http(8080))
        .pod(PodSpec::meshed(V2, "mesh", "v2").http(8080))
        .pod(PodSpec::meshed(CLIENT, "mesh", "client"))
        .service(
            ServiceSpec::new("echo", "mesh")
                .port("http", 80, 8080)
                .endpoints(&[V1, V2]),
        )
        .service(
            ServiceSpec::new("echo-v1", "mesh")
                .port("http", 80, 8080)
                .endpoints(&[V1]),
        )
        .service(
            ServiceSpec::new("echo-v2", "mesh")
                .port("http", 80, 8080)
                .endpoints(&[V2]),
        )
        .routes(&route_to("echo-v1"))
        .start()
}

fn all_ok(replies: &[Reply]) {
    let failed: Vec<&Reply> = replies.iter().filter(|r| !r.ok()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        replies.len(),
        &failed[..failed.len().min(3)]
    );
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Background traffic from the client: two workers, a request every 5 ms each.
fn traffic(client: &Pod, ms: u64) -> trellis_integration::netns::Traffic {
    client.traffic(&[
        "--duration-ms",
        &ms.to_string(),
        "--interval-ms",
        "5",
        "-c",
        "2",
        URL,
    ])
}

/// When the replies moved from `from` to `to` for good: the send time of the first reply
/// from `to` after which `from` never answers a request sent 100 ms or more later.
fn switch_time(replies: &[Reply], from: &str, to: &str) -> u64 {
    let first = replies
        .iter()
        .find(|r| r.pod() == to)
        .unwrap_or_else(|| panic!("{to} never answered"))
        .at_ms;
    let late_old = replies
        .iter()
        .filter(|r| r.pod() == from && r.at_ms >= first + 100)
        .count();
    assert_eq!(late_old, 0, "{from} still answered after {to} did");
    first
}

fn discovery(client: &Pod, name: &str) -> f64 {
    metric(&client.metrics(), name, &[])
}

#[test]
fn routes_and_controller_change_under_traffic() {
    if !available() {
        return;
    }
    let started = Instant::now();
    let mut mesh = mesh();
    let mut sent = 0;

    // A route edited while requests flow: none fails, and the new backend takes over within
    // a second of the write.
    let client = mesh.pod(CLIENT);
    let flow = traffic(client, 3_500);
    std::thread::sleep(Duration::from_millis(1_000));
    let written = now_ms();
    mesh.write_routes(&route_to("echo-v2"));
    let replies = flow.finish();
    all_ok(&replies);
    sent += replies.len();
    assert_eq!(replies[0].pod(), V1);
    let switched = switch_time(&replies, V1, V2);
    assert!(
        switched.saturating_sub(written) < 1_000,
        "the edit took {} ms to apply",
        switched.saturating_sub(written)
    );
    assert_eq!(replies.last().unwrap().pod(), V2);

    // The controller killed: the sidecar notices, keeps the last policy (echo-v2) and fails
    // nothing, even though the route changes meanwhile.
    mesh.kill_controller();
    mesh.write_routes(&route_to("echo-v1"));
    let client = mesh.pod(CLIENT);
    let replies = client.curl(&[
        "--duration-ms",
        "2000",
        "--interval-ms",
        "5",
        "-c",
        "2",
        URL,
    ]);
    all_ok(&replies);
    sent += replies.len();
    assert!(
        replies.iter().all(|r| r.pod() == V2),
        "the last policy changed"
    );
    assert_eq!(discovery(client, "trellis_discovery_connected"), 0.0);

    // Restarted: the sidecar reconnects with backoff and gets the edit it missed, still
    // without a failed request.
    let flow = traffic(client, 20_000);
    std::thread::sleep(Duration::from_millis(500));
    let restarted = now_ms();
    mesh.start_controller();
    let client = mesh.pod(CLIENT);
    // Reconnection delays grow up to 10 s; the controller was away for about 2.5 s.
    let deadline = Instant::now() + Duration::from_secs(12);
    while discovery(client, "trellis_discovery_connected") != 1.0 {
        assert!(
            Instant::now() < deadline,
            "no reconnection\n{}",
            mesh.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The snapshots come with the new connection; give them a moment, then stop.
    std::thread::sleep(Duration::from_millis(1_000));
    let replies = flow.stop();
    all_ok(&replies);
    sent += replies.len();
    let switched = switch_time(&replies, V2, V1);
    assert!(
        switched >= restarted,
        "applied before the controller was back"
    );
    assert_eq!(replies.last().unwrap().pod(), V1);
    assert!(discovery(client, "trellis_discovery_reconnects_total") >= 1.0);

    // The client's sidecar counted every request on the route, and each backend its share.
    let m = client.metrics();
    let on_route = metric(
        &m,
        "trellis_requests_total",
        &[
            ("direction", "outbound"),
            ("route", "mesh/echo"),
            ("status", "200"),
        ],
    );
    assert_eq!(on_route, sent as f64, "{m}");
    let inbound: f64 = [V1, V2]
        .iter()
        .map(|pod| {
            metric(
                &mesh.pod(pod).metrics(),
                "trellis_requests_total",
                &[("direction", "inbound")],
            )
        })
        .sum();
    assert_eq!(inbound, sent as f64);
    eprintln!(
        "{sent} requests across a route edit and a controller restart; the missed edit applied {} ms after the restart; {:?} in all",
        switched.saturating_sub(restarted),
        started.elapsed()
    );
}
