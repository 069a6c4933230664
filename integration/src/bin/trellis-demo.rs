//! A local mesh from `examples/mesh`, no cluster needed: identity, the controller in local
//! mode, an echo app and a sidecar per example pod, and a client pod `web-0`. Sends traffic
//! through the mesh and prints what happened.
//!
//! As root (with `ip`, iptables and `setpriv`), every pod is a network namespace on a bridge
//! with its iptables programmed by `trellis-proxy init`, and the client calls
//! `http://catalog/items` as any app would. Otherwise, or with `--loopback`, the pods are
//! loopback addresses and the client talks to its sidecar's outbound port.
//!
//! `trellis-demo [--keep] [--loopback] [EXAMPLES_DIR]`: with `--keep` it stays up until
//! Ctrl-C. Ctrl-C, SIGTERM or a failure removes every namespace and process it made.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a demo fails loudly by design

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use trellis_integration::netns::{self, Mesh, PodSpec, ServiceSpec, metric};
use trellis_integration::{
    CONTROLLER_ACCOUNT, Ca, Controller, Echo, Echoed, Sidecar, binary, empty, http1_client,
    on_path, processes_die_with_their_thread, remove_scratch_dirs, scratch_dir,
};

const NS: &str = "shop";
/// The example pods: name, loopback address, service account.
const PODS: [(&str, [u8; 4], &str); 3] = [
    ("catalog-v1-0", [127, 0, 10, 10], "catalog"),
    ("catalog-v2-0", [127, 0, 10, 20], "catalog"),
    ("audit-0", [127, 0, 10, 30], "audit"),
];
/// The example's Services and their pods: the namespace mesh makes them again with cluster IPs
/// of its own.
const SERVICES: [(&str, &[&str]); 4] = [
    ("catalog", &["catalog-v1-0", "catalog-v2-0"]),
    ("catalog-v1", &["catalog-v1-0"]),
    ("catalog-v2", &["catalog-v2-0"]),
    ("audit", &["audit-0"]),
];
const CLIENT_POD: &str = "web-0";
const CLIENT_LOOPBACK: [u8; 4] = [127, 0, 10, 5];
const REQUESTS: usize = 200;
/// What the demo sends over its WebSocket.
const WS_TEXT: &str = "hello over the mesh";

fn heading(s: &str) {
    println!("\n== {s}");
}

struct Args {
    keep: bool,
    loopback: bool,
    examples: PathBuf,
}

/// What the traffic showed, whichever way the mesh runs.
struct Outcome {
    by_pod: BTreeMap<String, usize>,
    last: Option<Echoed>,
    mirrored: usize,
    pinned: String,
    redirect: (StatusCode, String),
    /// The WebSocket exchange: who greeted, and what came back.
    websocket: trellis_integration::WsReply,
    metrics_at: String,
    metrics: String,
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |args: &mut Vec<String>, name: &str| {
        let set = args.iter().any(|a| a == name);
        args.retain(|a| a != name);
        set
    };
    let args = Args {
        keep: flag(&mut args, "--keep"),
        loopback: flag(&mut args, "--loopback"),
        examples: args
            .first()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("examples/mesh")),
    };
    if !args.examples.join("routes.yaml").is_file() {
        eprintln!(
            "error: {} has no routes.yaml: run from the repository root or name the examples directory",
            args.examples.display()
        );
        std::process::exit(2);
    }
    processes_die_with_their_thread();
    on_signal_clean_up_and_exit();
    let pods_missing = if args.loopback {
        Some("--loopback".to_string())
    } else {
        netns::missing()
    };
    match pods_missing {
        None => in_namespaces(&args),
        Some(why) => {
            println!("(pods on loopback addresses: {why})");
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(on_loopback(&args));
        }
    }
}

/// On Ctrl-C or SIGTERM: delete this process's namespaces and temporary directories and exit;
/// every process the demo started runs under `--pdeathsig KILL` and dies with it.
fn on_signal_clean_up_and_exit() {
    std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut int = signal(SignalKind::interrupt()).unwrap();
            let mut term = signal(SignalKind::terminate()).unwrap();
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        });
        heading("stopping: every namespace and process of the demo goes with it");
        netns::remove_all_of_this_process();
        remove_scratch_dirs();
        std::process::exit(130);
    });
}

/// Pods as network namespaces with real interception.
fn in_namespaces(args: &Args) {
    heading(
        "starting a local mesh: pods are network namespaces, iptables send their traffic to their sidecars",
    );
    let routes = std::fs::read_to_string(args.examples.join("routes.yaml")).unwrap();
    let mut builder = Mesh::builder(10);
    for (pod, _, sa) in PODS {
        builder = builder.pod(PodSpec::meshed(pod, NS, sa).http(8080));
    }
    for (svc, endpoints) in SERVICES {
        builder = builder.service(
            ServiceSpec::new(svc, NS)
                .port("http", 80, 8080)
                .endpoints(endpoints),
        );
    }
    let mesh = builder
        .pod(PodSpec::meshed(CLIENT_POD, NS, "web"))
        .routes(&routes)
        .start();
    println!(
        "  identity (mesh CA)      https://{}  (control-plane namespace)",
        mesh.identity_addr()
    );
    println!(
        "  controller (local mode) https://{}  routes: {}, identity spiffe://cluster.local/ns/{}/sa/{}",
        mesh.controller_addr(),
        args.examples.join("routes.yaml").display(),
        CONTROLLER_ACCOUNT.0,
        CONTROLLER_ACCOUNT.1
    );
    for pod in mesh.pods() {
        let app = if pod.spec.http_ports.is_empty() {
            "the client"
        } else {
            "app :8080"
        };
        println!(
            "  pod {:<14} {:<13} {app:<11} sidecar uid {} ({})",
            pod.name(),
            pod.ip,
            netns::PROXY_UID,
            pod.identity()
        );
    }
    for (svc, _) in SERVICES {
        println!(
            "  Service {svc}.{NS} cluster IP {} (virtual: the sidecars resolve it)",
            mesh.service_ip(svc)
        );
    }

    let client = mesh.pod(CLIENT_POD);
    heading(&format!(
        "{REQUESTS} requests from {CLIENT_POD}: GET http://catalog/items (80/20 split, header filter, mirror to audit)"
    ));
    let replies = client.curl(&["-n", &REQUESTS.to_string(), "http://catalog/items"]);
    let mut by_pod = BTreeMap::new();
    for r in &replies {
        *by_pod.entry(r.pod()).or_default() += 1;
    }
    let audit = mesh.pod("audit-0");
    let mirrored = wait_for(REQUESTS, || {
        metric(
            &audit.metrics(),
            "trellis_requests_total",
            &[("direction", "inbound")],
        ) as usize
    });
    let pinned = client
        .get("http://catalog/items", &["x-canary: always"])
        .pod();
    let moved = client.get("http://catalog/v0/items", &[]);
    let websocket = client.websocket("ws://catalog/chat", WS_TEXT);
    let outcome = Outcome {
        by_pod,
        last: replies.last().and_then(|r| r.echoed()),
        mirrored,
        pinned,
        redirect: (
            StatusCode::from_u16(moved.status.unwrap_or(0)).unwrap_or(StatusCode::BAD_GATEWAY),
            moved.headers.get("location").cloned().unwrap_or_default(),
        ),
        websocket,
        metrics_at: format!("{CLIENT_POD} :4191/metrics"),
        metrics: client.metrics(),
    };
    report(&outcome);
    // From the client pod, as the proxy's user: iptables leave its connections alone, so the
    // scrapes go straight to each pod's admin port.
    let admins: Vec<String> = mesh
        .pods()
        .iter()
        .filter(|p| p.spec.meshed)
        .map(|p| format!("{}:4191", p.ip))
        .collect();
    print_stat(
        client
            .netns
            .command(netns::PROXY_UID, &binary("trellis-controller")),
        &admins,
        &format!(" (from {CLIENT_POD}'s namespace)"),
    );

    if args.keep {
        let curl = if on_path("curl") {
            "curl".to_string()
        } else {
            binary("trellis-curl").display().to_string()
        };
        let ns = &client.netns.name;
        heading("the mesh keeps running; Ctrl-C stops it and removes every namespace");
        println!(
            "  ip netns exec {ns} {curl} http://catalog/items\n  ip netns exec {ns} {curl} -H 'x-canary: always' http://catalog/items\n  ip netns exec {ns} {curl} http://127.0.0.1:4191/metrics\n  ip netns exec {ns} iptables-save -t nat\n  edit {} and watch the routes change",
            mesh.manifests.path().join("routes.yaml").display()
        );
        loop {
            std::thread::park();
        }
    }
    heading("stopping: every namespace and process of the demo goes with it");
    drop(mesh);
}

/// Pods as loopback addresses; the client talks to its sidecar's outbound port.
async fn on_loopback(args: &Args) {
    heading("starting a local mesh on loopback addresses");
    let manifests = scratch_dir();
    for entry in std::fs::read_dir(&args.examples).unwrap() {
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
        args.examples.display(),
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
    let client = Sidecar::start(IpAddr::from(CLIENT_LOOPBACK), NS, controller.addr, &flags);
    println!(
        "  pod {CLIENT_POD:<14} the client, sidecar outbound {}",
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
    let echoed = |res: http::Response<hyper::body::Incoming>| async move {
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice::<Echoed>(&bytes).unwrap()
    };

    heading(&format!(
        "{REQUESTS} requests from {CLIENT_POD}: GET http://catalog/items (80/20 split, header filter, mirror to audit)"
    ));
    let mut by_pod = BTreeMap::new();
    let mut last = None;
    for _ in 0..REQUESTS {
        let e = echoed(http.request(get("/items", &[])).await.unwrap()).await;
        *by_pod.entry(e.pod.clone()).or_default() += 1;
        last = Some(e);
    }
    // A blocking wait: this worker's tasks, the echo apps', move to the other worker meanwhile.
    let mirrored = tokio::task::block_in_place(|| wait_for(REQUESTS, || apps["audit-0"].count()));
    let pinned = echoed(
        http.request(get("/items", &[("x-canary", "always")]))
            .await
            .unwrap(),
    )
    .await
    .pod;
    let moved = http.request(get("/v0/items", &[])).await.unwrap();
    // The sidecar's outbound port, as the app would reach it; the URL's host routes it.
    let stream = tokio::net::TcpStream::connect(client.outbound())
        .await
        .unwrap();
    let websocket =
        trellis_integration::websocket_exchange(stream, "ws://catalog/chat", WS_TEXT).await;
    let outcome = Outcome {
        by_pod,
        last,
        mirrored,
        pinned,
        redirect: (
            moved.status(),
            moved
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        ),
        websocket,
        metrics_at: format!("http://{}/metrics", client.admin()),
        metrics: client.metrics().await,
    };
    report(&outcome);
    let admins: Vec<String> = std::iter::once(&client)
        .chain(&sidecars)
        .map(|s| s.admin().to_string())
        .collect();
    tokio::task::block_in_place(|| {
        print_stat(
            std::process::Command::new(binary("trellis-controller")),
            &admins,
            "",
        )
    });

    if args.keep {
        heading("the mesh keeps running; Ctrl-C stops it");
        println!(
            "  curl -H 'host: catalog' http://{}/items\n  curl http://{}/metrics\n  curl http://{}/config\n  {} stat --admin {}\n  edit {} and watch the routes change",
            client.outbound(),
            client.admin(),
            client.admin(),
            binary("trellis-controller").display(),
            client.admin(),
            manifests.path().join("routes.yaml").display()
        );
        std::future::pending::<()>().await;
    }
    heading("stopping: every process of the demo ends with it");
    drop((client, sidecars, controller, ca, apps));
}

fn report(o: &Outcome) {
    for (pod, n) in &o.by_pod {
        println!(
            "  {pod:<14} {n:>4} ({:.0} %)",
            100.0 * *n as f64 / REQUESTS as f64
        );
    }
    if let Some(e) = &o.last {
        for header in ["x-mesh-route", "trellis-client-id"] {
            println!(
                "  the backend saw  {header}: {}",
                e.header(header).unwrap_or_default()
            );
        }
    }
    println!("  mirror copies received by audit-0: {}", o.mirrored);

    heading("a pinned tester: x-canary: always");
    println!("  answered by {}", o.pinned);

    heading("the old API: GET /v0/items");
    println!("  {} Location: {}", o.redirect.0, o.redirect.1);

    heading("a WebSocket through the mesh: ws://catalog/chat");
    match &o.websocket.error {
        None => println!(
            "  {} (greeting); sent {WS_TEXT:?}, echoed back {:?}",
            o.websocket.greeting, o.websocket.echo
        ),
        Some(e) => println!("  failed: {e}"),
    }

    heading(&format!("the client sidecar's metrics ({})", o.metrics_at));
    for line in o.metrics.lines().filter(|l| {
        l.starts_with("trellis_requests_total{")
            || l.starts_with("trellis_mirrors_total")
            || l.starts_with("trellis_identity_renewals_total")
    }) {
        println!("  {line}");
    }
}

/// Runs `trellis-controller stat` on every sidecar's admin port and prints its table: what each
/// route, rule and backend did, as the client's sidecar counted it since it started.
fn print_stat(mut cmd: std::process::Command, admins: &[String], from: &str) {
    let mut args = vec!["stat".to_string()];
    for a in admins {
        args.extend(["--admin".to_string(), a.clone()]);
    }
    args.extend(["--window".to_string(), "0".to_string()]);
    heading(&format!(
        "what the routes did: trellis-controller {}{from}",
        args.join(" ")
    ));
    let out = cmd.args(&args).output().unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !stderr.trim().is_empty() {
        println!("  ({}) {}", out.status, stderr.trim());
    }
}

/// Polls `count` until it reaches `want` or 5 s pass; the last value.
fn wait_for(want: usize, count: impl Fn() -> usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = count();
        if n >= want || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
