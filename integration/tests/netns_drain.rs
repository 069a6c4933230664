//! A server pod shuts down under load, as Kubernetes does it (see
//! `trellis_integration::netns`): its sidecar gets SIGTERM while the pod leaves the Service's
//! endpoints. The sidecar reports not-ready but keeps serving through its drain window, clients
//! move to the other endpoint as discovery tells them, and no idempotent request fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use trellis_integration::netns::{Mesh, PodSpec, Reply, ServiceSpec, available};

const LEAVING: &str = "server-1";

#[test]
fn a_terminating_server_pod_loses_no_request() {
    if !available() {
        return;
    }
    let mut mesh = Mesh::builder(6)
        .pod(PodSpec::meshed("server-0", "drain", "server").http(8080))
        .pod(
            PodSpec::meshed(LEAVING, "drain", "server")
                .http(8080)
                .proxy_flag("--drain-window", "3s"),
        )
        .pod(PodSpec::meshed("client-0", "drain", "client"))
        .service(
            ServiceSpec::new("echo", "drain")
                .port("http", 80, 8080)
                .endpoints(&["server-0", LEAVING]),
        )
        .start();
    let leaving_ip = mesh.pod(LEAVING).ip;

    // Four clients, back to back, for six seconds.
    let traffic = mesh.pod("client-0").traffic(&[
        "-c",
        "4",
        "--duration-ms",
        "6000",
        "--interval-ms",
        "2",
        "http://echo.drain.svc.cluster.local/",
    ]);
    std::thread::sleep(Duration::from_secs(1));

    // The pod is deleted: SIGTERM, and its endpoint goes.
    let terminated = Instant::now();
    mesh.pod(LEAVING).terminate_proxy();
    mesh.set_endpoints("echo", &["server-0"]);

    // Within the window: not ready, yet still serving new connections.
    std::thread::sleep(Duration::from_millis(300));
    let leaving = mesh.pod(LEAVING);
    let ready = leaving.get("http://127.0.0.1:4191/ready", &[]);
    assert_eq!(ready.status, Some(503), "{ready:?}");
    assert!(ready.body.contains("draining"), "{ready:?}");
    let direct = mesh
        .pod("client-0")
        .get(&format!("http://{leaving_ip}:8080/"), &[]);
    assert_eq!(direct.pod(), LEAVING, "{direct:?}");
    assert!(terminated.elapsed() < Duration::from_secs(3));

    let replies = traffic.finish();
    let failed: Vec<&Reply> = replies.iter().filter(|r| !r.ok()).collect();
    assert!(replies.len() > 500, "only {} requests", replies.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}\n{}",
        failed.len(),
        replies.len(),
        &failed[..failed.len().min(3)],
        mesh.logs()
    );
    // The leaving pod served its share until clients moved away.
    let served_by_leaving = replies.iter().filter(|r| r.pod() == LEAVING).count();
    assert!(served_by_leaving > 0);
}
