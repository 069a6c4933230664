//! Mutual TLS end to end, pods as network namespaces (see `trellis_integration::netns`):
//! the server app sees the client's identity, opaque TCP crosses the sidecar pair over mTLS,
//! a pod outside the mesh reaches only the ports opened to plaintext, and identity can be
//! down when a renewal falls due without failing a request.
//!
//! Certificates live 8 s here, so every sidecar renews every 5–6 s throughout the test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use trellis_integration::Process;
use trellis_integration::netns::{Mesh, Pod, PodSpec, Reply, ServiceSpec, available, metric};

const SERVER: &str = "server-0";
const CLIENT: &str = "client-0";
const OUTSIDER: &str = "outsider-0";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/mesh/sa/client";

fn mesh() -> Mesh {
    Mesh::builder(2)
        .cert_lifetime("8s")
        .pod(
            PodSpec::meshed(SERVER, "mesh", "server")
                .http(8080)
                .http(8081)
                .tcp(5432)
                .proxy_flag("--inbound-plaintext-ports", "8081"),
        )
        .pod(PodSpec::meshed(CLIENT, "mesh", "client"))
        .pod(PodSpec::unmeshed(OUTSIDER, "outside"))
        .service(
            ServiceSpec::new("server", "mesh")
                .port("http", 80, 8080)
                .port("plain", 81, 8081)
                .port("db", 5432, 5432)
                .endpoints(&[SERVER]),
        )
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

/// Waits for the sidecar's next `certified` log line and returns when it falls due for
/// renewal, from the line's `renew_in`.
fn next_certification(proxy: &Process) -> Instant {
    let seen = proxy.log().matches(" certified").count();
    for _ in 0..seen {
        proxy.wait_for_log(" certified", Duration::from_secs(1));
    }
    let line = proxy.wait_for_log(" certified", Duration::from_secs(10));
    let now = Instant::now();
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("renew_in="))
        .unwrap_or_else(|| panic!("no renew_in in {line:?}"));
    let renew_in = if let Some(ms) = value.strip_suffix("ms") {
        Duration::from_secs_f64(ms.parse::<f64>().unwrap() / 1000.0)
    } else {
        Duration::from_secs_f64(value.strip_suffix('s').unwrap().parse().unwrap())
    };
    now + renew_in
}

fn identity_metric(pod: &Pod, name: &str) -> f64 {
    metric(&pod.metrics(), name, &[])
}

#[test]
fn mutual_tls_between_pods_in_network_namespaces() {
    if !available() {
        return;
    }
    let started = Instant::now();
    let mut mesh = mesh();
    let server_ip = mesh.pod(SERVER).ip;

    // The server app sees the client's identity; a forged copy is replaced.
    let client = mesh.pod(CLIENT);
    let replies = client.curl(&[
        "-H",
        "trellis-client-id: spiffe://forged",
        "http://server.mesh.svc.cluster.local/",
    ]);
    all_ok(&replies);
    let seen = replies[0].echoed().unwrap();
    assert_eq!(seen.pod, SERVER);
    assert_eq!(seen.header("trellis-client-id").as_deref(), Some(CLIENT_ID));

    // Opaque TCP (5432 is a server-speaks-first port) through the pair: the app's peer is
    // its own sidecar, delivering to the pod IP from the dedicated source address.
    let tcp = client.tcp("server.mesh:5432", "bytes over mutual TLS");
    assert_eq!(tcp.error, None, "{tcp:?}");
    assert!(
        tcp.greeting.starts_with(&format!(
            "hello from server-0 to {server_ip}:5432 from 127.0.0.6:"
        )),
        "{tcp:?}"
    );
    assert_eq!(tcp.echo, "bytes over mutual TLS");

    // Outside the mesh: mesh-only ports are closed to plaintext, HTTP and TCP alike; the
    // port listed in --inbound-plaintext-ports answers, without a client identity.
    let outsider = mesh.pod(OUTSIDER);
    let refused = outsider.get(&format!("http://{server_ip}:8080/"), &[]);
    assert_eq!(refused.status, None, "{refused:?}");
    let refused_tcp = outsider.tcp(&format!("{server_ip}:5432"), "plaintext");
    assert!(refused_tcp.error.is_some(), "{refused_tcp:?}");
    assert_eq!(refused_tcp.greeting, "");
    let plain = outsider.curl(&[&format!("http://{server_ip}:8081/")]);
    all_ok(&plain);
    let seen = plain[0].echoed().unwrap();
    assert_eq!(seen.pod, SERVER);
    assert_eq!(seen.header("trellis-client-id"), None);
    // A meshed client reaches the plaintext port too, over mTLS, and is named.
    let meshed_plain = client.curl(&["http://server.mesh:81/"]);
    all_ok(&meshed_plain);
    assert_eq!(
        meshed_plain[0]
            .echoed()
            .unwrap()
            .header("trellis-client-id")
            .as_deref(),
        Some(CLIENT_ID)
    );

    let m = mesh.pod(SERVER).metrics();
    assert_eq!(
        metric(
            &m,
            "trellis_proxy_errors_total",
            &[("reason", "plaintext_refused")]
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "trellis_requests_total",
            &[("direction", "inbound"), ("peer_identity", CLIENT_ID)]
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "trellis_requests_total",
            &[("direction", "inbound"), ("peer_identity", "")]
        ),
        1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "trellis_tcp_connections_total",
            &[("direction", "inbound")]
        ) >= 3.0,
        "{m}"
    );

    // Identity down exactly when the client's sidecar must renew: it keeps serving with its
    // certificate (valid 2 s more), retries, and renews once identity is back. Traffic flows
    // throughout without a failure.
    let proxy = mesh.pod(CLIENT).proxy.as_ref().unwrap();
    let renew_at = next_certification(proxy);
    let client = mesh.pod(CLIENT);
    let (failures_before, renewals_before) = (
        identity_metric(client, "trellis_identity_failures_total"),
        identity_metric(client, "trellis_identity_renewals_total"),
    );
    let run_for = renew_at.saturating_duration_since(Instant::now()) + Duration::from_secs(3);
    let traffic = client.traffic(&[
        "--duration-ms",
        &run_for.as_millis().to_string(),
        "--interval-ms",
        "10",
        "-c",
        "2",
        "http://server.mesh.svc.cluster.local/",
    ]);
    std::thread::sleep(
        renew_at.saturating_duration_since(Instant::now() + Duration::from_millis(1_500)),
    );
    mesh.kill_identity();
    let down_at = Instant::now();
    let client = mesh.pod(CLIENT);
    let deadline = renew_at + Duration::from_secs(2);
    while identity_metric(client, "trellis_identity_failures_total") == failures_before {
        assert!(
            Instant::now() < deadline,
            "no renewal attempt while identity was down\n{}",
            mesh.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    mesh.start_identity();
    let down_for = down_at.elapsed();
    let client = mesh.pod(CLIENT);
    let deadline = Instant::now() + Duration::from_secs(5);
    while identity_metric(client, "trellis_identity_renewals_total") == renewals_before {
        assert!(
            Instant::now() < deadline,
            "no renewal after identity came back\n{}",
            mesh.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let replies = traffic.finish();
    all_ok(&replies);
    assert!(replies.len() > 100, "only {} requests", replies.len());
    for r in &replies {
        assert_eq!(
            r.echoed().unwrap().header("trellis-client-id").as_deref(),
            Some(CLIENT_ID)
        );
    }
    let expiry = identity_metric(
        client,
        "trellis_identity_certificate_expiry_timestamp_seconds",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        expiry > now,
        "the client's certificate expired: {expiry} <= {now}"
    );
    eprintln!(
        "identity was down {down_for:?} across a renewal; {} requests, none failed; {:?} in all",
        replies.len(),
        started.elapsed()
    );
}
