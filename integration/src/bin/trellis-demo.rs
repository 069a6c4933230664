//! A local mesh from `examples/mesh`, no cluster needed: identity, the controller in local
//! mode, an echo app and a sidecar per example pod on their loopback addresses, and a client
//! pod's sidecar. Sends traffic through the mesh and prints what happened.
//!
//! `trellis-demo [--keep] [EXAMPLES_DIR]`: with `--keep` it stays up until Ctrl-C.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a demo fails loudly by design

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use trellis_integration::{
    CONTROLLER_ACCOUNT, Ca, Controller, Echo, Echoed, Sidecar, empty, http1_client,
};

const NS: &str = "shop";
/// The example pods: name, loopback address, service account.
const PODS: [(&str, [u8; 4], &str); 3] = [
    ("catalog-v1-0", [127, 0, 10, 10], "catalog"),
    ("catalog-v2-0", [127, 0, 10, 20], "catalog"),
    ("audit-0", [127, 0, 10, 30], "audit"),
];
const CLIENT: [u8; 4] = [127, 0, 10, 5];
const REQUESTS: usize = 200;

fn heading(s: &str) {
    println!("\n== {s}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let keep = args.iter().any(|a| a == "--keep");
    args.retain(|a| a != "--keep");
    let examples = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("examples/mesh"));
    assert!(
        examples.join("routes.yaml").is_file(),
        "{} has no routes.yaml: run from the repository root or name the examples directory",
        examples.display()
    );

    heading("starting a local mesh");
    let manifests = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, manifests.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let ca = Ca::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 10, 100)),
        "1h",
        &[(NS, "catalog"), (NS, "audit"), (NS, "web")],
    );
    println!("  identity (mesh CA)      https://{}", ca.addr);
    let controller = Controller::start_with(
        manifests.path(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &ca.controller_flags(CONTROLLER_ACCOUNT.1),
    );
    println!(
        "  controller (local mode) https://{}  manifests: {}, identity spiffe://cluster.local/ns/{}/sa/{}",
        controller.addr,
        examples.display(),
        CONTROLLER_ACCOUNT.0,
        CONTROLLER_ACCOUNT.1
    );
    let mut apps = BTreeMap::new();
    let mut sidecars = Vec::new();
    for (pod, ip, sa) in PODS {
        let ip = IpAddr::from(ip);
        apps.insert(pod, Echo::start(SocketAddr::new(ip, 8080), pod).await);
        let flags = ca.flags(NS, sa);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        sidecars.push(Sidecar::start(ip, NS, controller.addr, &flags));
        println!(
            "  pod {pod:<14} app {ip}:8080, sidecar {ip}:4143, identity spiffe://cluster.local/ns/{NS}/sa/{sa}"
        );
    }
    let flags = ca.flags(NS, "web");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let client = Sidecar::start(IpAddr::from(CLIENT), NS, controller.addr, &flags);
    println!(
        "  client pod web-0        sidecar outbound {}",
        client.outbound()
    );

    let http = http1_client();
    let get = |path: &str, headers: &[(&str, &str)]| {
        let mut req =
            Request::get(format!("http://{}{path}", client.outbound())).header("host", "catalog");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(empty()).unwrap()
    };

    heading(&format!(
        "{REQUESTS} requests to http://catalog/items (80/20 split, header filter, mirror to audit)"
    ));
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    let mut last: Option<Echoed> = None;
    for _ in 0..REQUESTS {
        let res = http.request(get("/items", &[])).await.unwrap();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let echoed: Echoed = serde_json::from_slice(&bytes).unwrap();
        *by_pod.entry(echoed.pod.clone()).or_default() += 1;
        last = Some(echoed);
    }
    for (pod, n) in &by_pod {
        println!(
            "  {pod:<14} {n:>4} ({:.0} %)",
            100.0 * *n as f64 / REQUESTS as f64
        );
    }
    if let Some(e) = &last {
        println!(
            "  the backend saw  x-mesh-route: {}",
            e.header("x-mesh-route").unwrap_or_default()
        );
        println!(
            "  the backend saw  trellis-client-id: {}",
            e.header("trellis-client-id").unwrap_or_default()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!(
        "  mirror copies received by audit-0: {}",
        apps["audit-0"].count()
    );

    heading("a pinned tester: x-canary: always");
    let res = http
        .request(get("/items", &[("x-canary", "always")]))
        .await
        .unwrap();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let echoed: Echoed = serde_json::from_slice(&bytes).unwrap();
    println!("  answered by {}", echoed.pod);

    heading("the old API: GET /v0/items");
    let res = http.request(get("/v0/items", &[])).await.unwrap();
    println!(
        "  {} Location: {}",
        res.status(),
        res.headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    );

    heading(&format!(
        "the client sidecar's metrics (http://{}/metrics)",
        client.admin()
    ));
    let metrics = client.metrics().await;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("trellis_requests_total{"))
    {
        println!("  {line}");
    }
    for line in metrics.lines().filter(|l| {
        l.starts_with("trellis_mirrors_total") || l.starts_with("trellis_identity_renewals_total")
    }) {
        println!("  {line}");
    }

    if keep {
        heading("the mesh keeps running; Ctrl-C stops it");
        println!(
            "  curl -H 'host: catalog' http://{}/items\n  curl http://{}/metrics\n  curl http://{}/config\n  edit {} and watch the routes change",
            client.outbound(),
            client.admin(),
            client.admin(),
            manifests.path().join("routes.yaml").display()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    heading("stopping: every process of the demo ends with it");
    drop((client, sidecars, controller, ca, apps));
}
