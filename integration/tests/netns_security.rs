//! What the mesh must not let through, attacked from pods in network namespaces (see
//! `trellis_integration::netns`): an app's loopback-only listener and its undeclared ports
//! stay out of reach of other meshed pods, IPv6 is intercepted like IPv4 (or dropped where a
//! pod has no IPv6), and a request naming the sidecar's own listener is refused instead of
//! looping.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use trellis_integration::netns::{Mesh, PodSpec, ServiceSpec, available, metric};

const VICTIM: &str = "victim-0";
const OPEN: &str = "open-0";
const V4ONLY: &str = "v4only-0";
const CLIENT: &str = "client-0";
const OUTSIDER: &str = "outsider-0";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/sec/sa/client";

fn mesh() -> Mesh {
    Mesh::builder(4)
        // Declares 8080 (as a containerPort); a debug listener on 127.0.0.1:6060.
        .pod(
            PodSpec::meshed(VICTIM, "sec", "victim")
                .http(8080)
                .local_http(6060),
        )
        // Declares no ports: every port is allowed, but delivery is to the pod IP.
        .pod(
            PodSpec::meshed(OPEN, "sec", "open")
                .http(8080)
                .local_http(6060)
                .proxy_flag("--inbound-ports", ""),
        )
        .pod(PodSpec::meshed(V4ONLY, "sec", "v4").http(8080).ipv4_only())
        .pod(PodSpec::meshed(CLIENT, "sec", "client"))
        .pod(PodSpec::unmeshed(OUTSIDER, "outside"))
        .service(
            ServiceSpec::new("victim", "sec")
                .port("http", 80, 8080)
                .endpoints(&[VICTIM]),
        )
        .start()
}

fn errors(text: &str, reason: &str) -> f64 {
    metric(
        text,
        "trellis_proxy_errors_total",
        &[("direction", "inbound"), ("reason", reason)],
    )
}

#[test]
fn what_the_mesh_must_not_let_through() {
    if !available() {
        return;
    }
    let mesh = mesh();
    let (victim, open, v4only) = (mesh.pod(VICTIM), mesh.pod(OPEN), mesh.pod(V4ONLY));
    let client = mesh.pod(CLIENT);
    let outsider = mesh.pod(OUTSIDER);

    // The declared port works through the mesh.
    let ok = client.get("http://victim.sec.svc.cluster.local/", &[]);
    assert!(ok.ok(), "{ok:?}");
    assert_eq!(ok.pod(), VICTIM);

    // A meshed peer asks for the victim's loopback-only debug port: its sidecar names the
    // port in the preamble, and the victim's sidecar refuses a port the pod does not declare.
    let refused = client.get(&format!("http://{}:6060/", victim.ip), &[]);
    assert!(refused.echoed().is_none(), "{refused:?}");
    assert_eq!(errors(&victim.metrics(), "port_not_allowed"), 1.0);

    // A pod that declares no ports: the port is allowed, but delivery is to the pod IP, where
    // a loopback-only listener does not answer; its declared app port still does.
    let refused = client.get(&format!("http://{}:6060/", open.ip), &[]);
    assert!(refused.echoed().is_none(), "{refused:?}");
    assert_eq!(refused.status, Some(502), "{refused:?}");
    let ok = client.get(&format!("http://{}:8080/", open.ip), &[]);
    assert_eq!(ok.pod(), OPEN, "{ok:?}");

    // IPv6, mesh to mesh: intercepted on both sides and carried over mutual TLS.
    let ip6 = victim.ip6.unwrap();
    let ok = client.get(&format!("http://[{ip6}]:8080/"), &[]);
    assert_eq!(ok.pod(), VICTIM, "{ok:?}");
    assert_eq!(
        ok.echoed().unwrap().header("trellis-client-id").as_deref(),
        Some(CLIENT_ID)
    );
    // IPv6 from outside the mesh: intercepted too, so a mesh-only port refuses plaintext.
    let before = errors(&victim.metrics(), "plaintext_refused");
    let refused = outsider.get(&format!("http://[{ip6}]:8080/"), &[]);
    assert_eq!(refused.status, None, "{refused:?}");
    assert_eq!(errors(&victim.metrics(), "plaintext_refused"), before + 1.0);

    // A pod without IPv6 in an IPv6-capable kernel: IPv6 is dropped rather than let through
    // in clear text. Its IPv4 traffic is unaffected.
    let v4only_ip6 = trellis_integration::netns::pod_ip6(4, v4only.ip.octets()[3]);
    v4only.netns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{v4only_ip6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    let dropped = outsider.curl(&[
        "--timeout-ms",
        "1500",
        &format!("http://[{v4only_ip6}]:8080/"),
    ]);
    assert_eq!(dropped[0].status, None, "{dropped:?}");
    let ok = client.get(&format!("http://{}:8080/", v4only.ip), &[]);
    assert_eq!(ok.pod(), V4ONLY, "{ok:?}");

    // A request that names the client's own outbound listener is answered at once instead
    // of being sent to itself again and again.
    let looped = client.get("http://127.0.0.1:4140/", &[]);
    assert_eq!(looped.status, Some(400), "{looped:?}");
    assert!(looped.body.contains("own listener"), "{looped:?}");
    let text = client.metrics();
    assert_eq!(
        metric(
            &text,
            "trellis_proxy_errors_total",
            &[("direction", "outbound"), ("reason", "self_call")]
        ),
        1.0
    );
}
