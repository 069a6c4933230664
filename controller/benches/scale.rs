//! The controller at scale: generated manifests for many Services, endpoints and meshed pods,
//! the real discovery server over mutual TLS, and simulated proxies (a child process) that
//! speak the real discovery protocol, each from its own loopback address with its own
//! HTTP/2 connection and one stream per destination.
//!
//! ```console
//! $ cargo bench -p trellis-controller --bench scale -- --services 10000 --endpoints 10 \
//!     --proxies 5000 --destinations 5
//! ```
//!
//! The controller side runs here: it loads the manifests with the local-mode loader, strips
//! them as Kubernetes mode does, and then applies changes one at a time the way Kubernetes
//! mode's rebuild loop does (a snapshot of the objects, an incremental rebuild, a publish).
//! It reports its RSS, the CPU and wall time of each change, the latency from each change to
//! every affected stream's new line (clocks compared within one machine), and how many
//! streams woke for changes that touched no stream's policy.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly by design

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::sync::watch;
use trellis_api::Identity;
use trellis_controller::discovery::{DiscoveryMetrics, Limits, Options, serve_with_options};
use trellis_controller::index::{Changes, Config, Index, ObjectRef};
use trellis_controller::kubernetes::strip;
use trellis_controller::manifests::load_dir;
use trellis_tls::{ALPN_H2, MeshTls};

const TD: &str = "cluster.local";
const NAMESPACES: usize = 10;

#[derive(Clone, Debug)]
struct Scale {
    services: usize,
    endpoints: usize,
    proxies: usize,
    destinations: usize,
    changes: usize,
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect(name))
}

fn scale(args: &[String]) -> Scale {
    Scale {
        services: arg(args, "--services", 10_000),
        endpoints: arg(args, "--endpoints", 10),
        proxies: arg(args, "--proxies", 5_000),
        destinations: arg(args, "--destinations", 5),
        changes: arg(args, "--changes", 30),
    }
}

fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn pod_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 128 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

fn namespace(i: usize) -> String {
    format!("ns{}", i % NAMESPACES)
}

/// The Service a proxy's `k`-th destination is: spread over the first half of the Services,
/// so that the other half has no stream and its changes are unrelated to every stream.
fn destination(s: &Scale, proxy: usize, k: usize) -> usize {
    ((proxy * s.destinations + k) * 7919) % (s.services / 2)
}

/// A route on every tenth Service `i`, sending 90 % to `i` and 10 % to `i + 10` (same
/// namespace).
fn routed(i: usize) -> bool {
    i.is_multiple_of(10)
}

fn route(s: &Scale, i: usize, weight: u32) -> Value {
    let ns = namespace(i);
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": format!("route{i}"), "namespace": ns},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": format!("svc{i}"), "port": 80}],
            "rules": [{"backendRefs": [
                {"name": format!("svc{i}"), "port": 80, "weight": weight},
                {"name": format!("svc{}", (i + 10) % s.services), "port": 80, "weight": 100 - weight}
            ]}]
        }
    })
}

fn slice(s: &Scale, i: usize, ready_first: bool) -> Value {
    let endpoints: Vec<Value> = (0..s.endpoints)
        .map(|j| {
            let n = i * s.endpoints + j;
            json!({"addresses": [pod_ip(n).to_string()],
                   "conditions": {"ready": j != 0 || ready_first},
                   "targetRef": {"kind": "Pod", "name": format!("svc{i}-{j}")}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc{i}-1"), "namespace": namespace(i),
                     "labels": {"kubernetes.io/service-name": format!("svc{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

/// Writes the manifests, one `v1 List` per kind, as JSON (what `kubectl get -o json` prints).
fn write_manifests(s: &Scale, dir: &Path) {
    let list = |items: Vec<Value>| json!({"apiVersion": "v1", "kind": "List", "items": items});
    let services = (0..s.services)
        .map(|i| {
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": format!("svc{i}"), "namespace": namespace(i)},
                   "spec": {"clusterIP": service_ip(i).to_string(),
                            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
        })
        .collect();
    let slices = (0..s.services).map(|i| slice(s, i, true)).collect();
    let pods = (0..s.services * s.endpoints)
        .map(|n| {
            let i = n / s.endpoints;
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": format!("svc{i}-{}", n % s.endpoints), "namespace": namespace(i),
                                "annotations": {"trellis.dev/proxy-version": "0.1.0"}},
                   "spec": {"serviceAccountName": format!("sa{i}"), "containers": [{"name": "app", "image": "app"}]},
                   "status": {"phase": "Running", "podIP": pod_ip(n).to_string()}})
        })
        .collect();
    let routes = (0..s.services)
        .filter(|&i| routed(i))
        .map(|i| route(s, i, 90))
        .collect();
    for (file, items) in [
        ("services.json", services),
        ("slices.json", slices),
        ("pods.json", pods),
        ("routes.json", routes),
    ] {
        std::fs::write(dir.join(file), serde_json::to_vec(&list(items)).unwrap()).unwrap();
    }
}

struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A workload certificate and key for `id`, as PEM.
    fn leaf(&self, id: &Identity) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.0).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn mesh(ca_pem: &str, cert_pem: &str, key_pem: &str) -> MeshTls {
    use rustls::pki_types::pem::PemObject;
    let tls = MeshTls::new(ca_pem, TD).unwrap();
    let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).unwrap());
    tls.credentials.set(&tls.provider, chain, key).unwrap();
    tls
}

fn controller_identity() -> Identity {
    Identity::new(TD, "trellis-system", "trellis-controller")
}

/// Resident and peak memory of this process, in MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time (user + system) this process has used.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeKind {
    /// The first endpoint of a Service some stream asks about turns not ready.
    Endpoint,
    /// The weights of a route whose parent some stream asks about.
    Route,
    /// The endpoints of a Service no stream asks about, nor routes to.
    Unrelated,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--clients") {
        return clients(&args);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = scale(&args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(controller(s));
}

async fn controller(s: Scale) {
    println!(
        "scale: {} Services, {} endpoints (meshed pods), {} routes, {} proxies x {} destinations",
        s.services,
        s.services * s.endpoints,
        s.services / 10,
        s.proxies,
        s.destinations
    );
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    write_manifests(&s, dir.path());
    let written = started.elapsed();
    let started = Instant::now();
    let mut objects = load_dir(dir.path()).unwrap();
    // What Kubernetes mode keeps of each object.
    objects.services.iter_mut().for_each(strip::service);
    objects
        .endpoint_slices
        .iter_mut()
        .for_each(strip::endpoint_slice);
    objects.pods.iter_mut().for_each(strip::pod);
    objects.http_routes.iter_mut().for_each(strip::http_route);
    let loaded = started.elapsed();
    let config = Config::default();
    let started = Instant::now();
    let index = Index::build(&objects, &config);
    let built = started.elapsed();
    println!(
        "manifests: written in {written:.1?}, loaded and stripped in {loaded:.1?}; \
         full index build {built:.1?}"
    );
    let slice_of: HashMap<String, usize> = objects
        .endpoint_slices
        .iter()
        .enumerate()
        .map(|(k, sl)| (sl.metadata.name.clone().unwrap(), k))
        .collect();
    let route_of: HashMap<String, usize> = objects
        .http_routes
        .iter()
        .enumerate()
        .map(|(k, r)| (r.metadata.name.clone().unwrap(), k))
        .collect();

    // The mesh CA, the controller's certificate, and one client certificate per namespace.
    let ca = Ca::new();
    let ca_pem = ca.0.pem();
    let (cert, key) = ca.leaf(&controller_identity());
    let server_tls = mesh(&ca_pem, &cert, &key);
    let pki = tempfile::tempdir().unwrap();
    std::fs::write(pki.path().join("ca.pem"), &ca_pem).unwrap();
    for n in 0..NAMESPACES {
        let (cert, key) = ca.leaf(&Identity::new(TD, format!("ns{n}"), "proxy"));
        std::fs::write(pki.path().join(format!("ns{n}.crt")), cert).unwrap();
        std::fs::write(pki.path().join(format!("ns{n}.key")), key).unwrap();
    }

    let (index_tx, index_rx) = watch::channel(Arc::new(index));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = DiscoveryMetrics::default();
    let options = Options {
        limits: Limits::default(),
        metrics: metrics.clone(),
        ..Options::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_with_options(
        listener,
        index_rx,
        Some(server_tls.server_config(&[ALPN_H2])),
        options,
        async {
            let _ = stop_rx.await;
        },
    ));
    let (rss_before, _) = rss_mib();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--clients",
            "--addr",
            &addr.to_string(),
            "--pki",
            pki.path().to_str().unwrap(),
        ])
        .args([
            "--services",
            &s.services.to_string(),
            "--proxies",
            &s.proxies.to_string(),
            "--destinations",
            &s.destinations.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child_out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let started = Instant::now();
    child_out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "ready",
        "the clients did not connect: {line:?}"
    );
    let connect_time = started.elapsed();
    // Let the server settle (TLS buffers, the allocator) before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_streams, _) = rss_mib();
    println!(
        "streams: {} open from {} proxies in {connect_time:.1?}; RSS {rss_before:.0} MiB \
         before the proxies, {rss_streams:.0} MiB with every stream open",
        s.proxies * s.destinations,
        s.proxies
    );

    // Which Services streams ask about, and how many streams each.
    let mut watchers: BTreeMap<usize, usize> = BTreeMap::new();
    for p in 0..s.proxies {
        for k in 0..s.destinations {
            *watchers.entry(destination(&s, p, k)).or_default() += 1;
        }
    }
    let watched: Vec<usize> = watchers.keys().copied().collect();
    let routed_watched: Vec<usize> = watched.iter().copied().filter(|&i| routed(i)).collect();

    // The changes, one at a time.
    let mut log = Vec::new();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut not_ready: HashMap<usize, bool> = HashMap::new();
    for c in 0..s.changes {
        let kind = match c % 3 {
            0 => ChangeKind::Endpoint,
            1 => ChangeKind::Route,
            _ => ChangeKind::Unrelated,
        };
        let (target, changes) = match kind {
            ChangeKind::Endpoint | ChangeKind::Unrelated => {
                let i = if kind == ChangeKind::Endpoint {
                    watched[rng.usize(..watched.len())]
                } else {
                    // The second half, skipping Services a route of the first half sends to.
                    loop {
                        let i = s.services / 2 + 10 + rng.usize(..s.services / 2 - 10);
                        if !routed(i) {
                            break i;
                        }
                    }
                };
                let k = slice_of[&format!("svc{i}-1")];
                // Flip the first endpoint's readiness, so that each change is a change.
                let flipped = not_ready.entry(i).or_insert(false);
                *flipped = !*flipped;
                let ready = !*flipped;
                let mut sl: k8s_openapi::api::discovery::v1::EndpointSlice =
                    serde_json::from_value(slice(&s, i, ready)).unwrap();
                strip::endpoint_slice(&mut sl);
                objects.endpoint_slices[k] = sl;
                let mut changes = Changes::default();
                changes.services.insert(ObjectRef {
                    namespace: namespace(i),
                    name: format!("svc{i}"),
                });
                (i, changes)
            }
            ChangeKind::Route => {
                let i = routed_watched[rng.usize(..routed_watched.len())];
                let k = route_of[&format!("route{i}")];
                let weight = 50 + (c as u32 % 40);
                let mut r: gateway_api::experimental::httproutes::HttpRoute =
                    serde_json::from_value(route(&s, i, weight)).unwrap();
                strip::http_route(&mut r);
                objects.http_routes[k] = r;
                (
                    i,
                    Changes {
                        routes: true,
                        ..Changes::default()
                    },
                )
            }
        };
        let updates_before = metrics.updates_sent();
        let cpu_before = cpu_time();
        let at = unix_nanos();
        let started = Instant::now();
        // What Kubernetes mode's rebuild loop does: a snapshot of the stores, a rebuild off
        // the async threads, a publish.
        let before = index_tx.borrow().clone();
        let snapshot = objects.clone();
        let snapshot_took = started.elapsed();
        let cfg = config.clone();
        let (rebuilt, snapshot) = tokio::task::spawn_blocking(move || {
            let rebuilt = before.rebuild(&snapshot, &cfg, &changes);
            (rebuilt, snapshot)
        })
        .await
        .unwrap();
        let recomputed = rebuilt.recomputed_ports();
        let old = index_tx.send_replace(Arc::new(rebuilt));
        let rebuild = started.elapsed();
        // Freeing the old state is off the path to the streams, as in Kubernetes mode.
        tokio::task::spawn_blocking(move || drop((old, snapshot)));
        // Long enough for every affected stream's line to arrive.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let cpu = cpu_time() - cpu_before;
        let woke = metrics.updates_sent() - updates_before;
        log.push((
            kind,
            target,
            at,
            rebuild,
            cpu,
            woke,
            recomputed,
            snapshot_took,
        ));
    }

    // The receive times of every update line, from the clients.
    writeln!(child.stdin.as_mut().unwrap(), "report").unwrap();
    let mut received: HashMap<usize, Vec<u128>> = HashMap::new();
    loop {
        line.clear();
        if child_out.read_line(&mut line).unwrap() == 0 || line.trim() == "done" {
            break;
        }
        let mut parts = line.split_whitespace();
        let (Some(svc), Some(t)) = (parts.next(), parts.next()) else {
            continue;
        };
        received
            .entry(svc.parse().unwrap())
            .or_default()
            .push(t.parse().unwrap());
    }
    let _ = child.wait();
    let (rss_end, rss_peak) = rss_mib();

    println!();
    println!(
        "| change | Service | snapshot + rebuild | of which snapshot | ports computed | CPU | streams woken | affected streams | slowest stream |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut latencies = Vec::new();
    let mut by_kind: BTreeMap<&str, (Vec<f64>, Vec<f64>, u64)> = BTreeMap::new();
    for (n, &(kind, svc, at, rebuild, cpu, woke, recomputed, snapshot)) in log.iter().enumerate() {
        let until = log.get(n + 1).map_or(u128::MAX, |next| next.2);
        let affected = if kind == ChangeKind::Unrelated {
            0
        } else {
            watchers.get(&svc).copied().unwrap_or(0)
        };
        let arrivals: Vec<f64> = received
            .get(&svc)
            .into_iter()
            .flatten()
            .filter(|&&t| t >= at && t < until)
            .map(|&t| (t - at) as f64 / 1e6)
            .collect();
        let slowest = arrivals.iter().copied().fold(f64::NAN, f64::max);
        latencies.extend(arrivals.iter().copied());
        let name = match kind {
            ChangeKind::Endpoint => "endpoint",
            ChangeKind::Route => "route",
            ChangeKind::Unrelated => "unrelated endpoint",
        };
        let e = by_kind.entry(name).or_default();
        e.0.push(rebuild.as_secs_f64() * 1e3);
        e.1.push(cpu.as_secs_f64() * 1e3);
        e.2 += woke;
        println!(
            "| {name} | svc{svc} | {:.0} ms | {:.0} ms | {recomputed} | {:.0} ms | {woke} | {affected} (got {}) | {slowest:.0} ms |",
            rebuild.as_secs_f64() * 1e3,
            snapshot.as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e3,
            arrivals.len()
        );
    }
    latencies.sort_by(f64::total_cmp);
    println!();
    for (name, (rebuilds, cpus, woke)) in &by_kind {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        println!(
            "{name}: {} changes, rebuild mean {:.0} ms, CPU per change mean {:.0} ms, streams woken {woke}",
            rebuilds.len(),
            mean(rebuilds),
            mean(cpus)
        );
    }
    println!(
        "change-to-stream latency over {} stream updates: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        latencies.len(),
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "controller RSS: {rss_streams:.0} MiB with every stream open, {rss_end:.0} MiB at the end, peak {rss_peak:.0} MiB"
    );
    let _ = stop_tx.send(());
    let _ = server.await;
}

/// The simulated proxies: each connects from its own loopback address with its namespace's
/// certificate, checks the controller's identity, and opens one stream per destination. Prints
/// `ready` once every stream has its first line; on `report` (stdin), prints one
/// `<service> <unix nanos>` line per later line received, then `done`.
fn clients(args: &[String]) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = scale(args);
    let value = |name: &str| {
        let i = args.iter().position(|a| a == name).unwrap();
        args[i + 1].clone()
    };
    let addr: SocketAddr = value("--addr").parse().unwrap();
    let pki = std::path::PathBuf::from(value("--pki"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let ca = std::fs::read_to_string(pki.join("ca.pem")).unwrap();
        let peers: Vec<_> = (0..NAMESPACES)
            .map(|n| {
                let cert = std::fs::read_to_string(pki.join(format!("ns{n}.crt"))).unwrap();
                let key = std::fs::read_to_string(pki.join(format!("ns{n}.key"))).unwrap();
                let tls = mesh(&ca, &cert, &key);
                Arc::new(tls.peer_client(&controller_identity(), &[ALPN_H2]).unwrap())
            })
            .collect();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u128)>();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        // Connect in waves, as proxies of a cluster do not all start in the same millisecond.
        let wave = Arc::new(tokio::sync::Semaphore::new(200));
        for p in 0..s.proxies {
            let peer = peers[p % NAMESPACES].clone();
            let (tx, ready_tx, wave) = (tx.clone(), ready_tx.clone(), wave.clone());
            let targets: Vec<usize> = (0..s.destinations).map(|k| destination(&s, p, k)).collect();
            tokio::spawn(async move {
                let permit = wave.acquire_owned().await.unwrap();
                let source =
                    IpAddr::V4(Ipv4Addr::new(127, 1, (p / 250) as u8, (p % 250 + 1) as u8));
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::new(source, 0)).unwrap();
                let tcp = socket.connect(addr).await.unwrap();
                let tls = peer.connect(tcp).await.unwrap();
                let (send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                for svc in targets {
                    let mut send = send.clone();
                    let (tx, ready_tx) = (tx.clone(), ready_tx.clone());
                    tokio::spawn(async move {
                        let uri = format!(
                            "https://controller/v1/outbound?target={}%3A80",
                            service_ip(svc)
                        );
                        let req = http::Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
                        let resp = send.send_request(req).await.unwrap();
                        assert_eq!(resp.status(), 200);
                        let mut body = resp.into_body();
                        let mut first = true;
                        while let Some(frame) = body.frame().await {
                            let Ok(frame) = frame else { break };
                            let Some(data) = frame.data_ref() else {
                                continue;
                            };
                            // Each snapshot is written as one frame (or a few for large ones);
                            // count each line end.
                            for _ in data.iter().filter(|b| **b == b'\n') {
                                if first {
                                    first = false;
                                    let _ = ready_tx.send(());
                                } else {
                                    let _ = tx.send((svc, unix_nanos()));
                                }
                            }
                        }
                    });
                }
                drop(permit);
                // The streams keep the connection open until the process exits.
                drop(send);
            });
        }
        drop(ready_tx);
        for _ in 0..s.proxies * s.destinations {
            ready_rx.recv().await.unwrap();
        }
        println!("ready");
        std::io::stdout().flush().unwrap();
        // `report` (or the end of stdin) from the controller side.
        let (report_tx, mut report) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 && line.trim() != "report"
            {
                line.clear();
            }
            let _ = report_tx.send(());
        });
        let mut got = Vec::new();
        loop {
            tokio::select! {
                Some(update) = rx.recv() => got.push(update),
                _ = &mut report => break,
            }
        }
        while let Ok(update) = rx.try_recv() {
            got.push(update);
        }
        let mut out = std::io::stdout().lock();
        for (svc, t) in got {
            writeln!(out, "{svc} {t}").unwrap();
        }
        writeln!(out, "done").unwrap();
        out.flush().unwrap();
        std::process::exit(0);
    });
}
