//! Trust anchors that change while the mesh runs: the controller follows its anchors file and
//! streams the bundle to the sidecars over the discovery connection, which verify new
//! connections with it; no process restarts. Real binaries: identity in local mode, the
//! controller certified by it, sidecars on loopback; and the sidecar's client alone against a
//! fake controller that sends what the real one never would.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use trellis_api::Identity;
use trellis_integration::mesh::{Mesh, NS, ip};
use trellis_integration::{CONTROLLER_ACCOUNT, Ca, Sidecar, binary, empty, http1_client};
use trellis_tls::{ALPN_H2, MeshTls};

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs: [{name: echo-v1, port: 80}]
"#;

const ACCOUNTS: [(&str, &str); 4] = [(NS, "client"), (NS, "v1"), (NS, "v2"), (NS, "mirror")];

/// Replaces a file in one step, as the kubelet swaps a Secret volume's content.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// `flags` with the value of `--trust-anchors` replaced by `anchors`.
fn with_anchors(mut flags: Vec<String>, anchors: &Path) -> Vec<String> {
    let at = flags.iter().position(|f| f == "--trust-anchors").unwrap();
    flags[at + 1] = anchors.display().to_string();
    flags
}

/// A second root with its own issuer (`ca.crt`, `issuer.crt`, `issuer.key` in `dir`), as an
/// operator makes one for a rotation.
fn new_root(dir: &Path) {
    let status = Command::new(binary("trellis-identity"))
        .arg("bootstrap")
        .arg("--trust-anchors")
        .arg(dir.join("ca.crt"))
        .arg("--issuer-cert")
        .arg(dir.join("issuer.crt"))
        .arg("--issuer-key")
        .arg(dir.join("issuer.key"))
        .arg("--root-key")
        .arg(dir.join("root.key"))
        .status()
        .unwrap();
    assert!(status.success());
}

/// The sum of the samples of `name` (with any labels) in `text`.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const APPLIED: &str = "trellis_identity_trust_anchor_updates_total{result=\"applied\"}";
const REFUSED: &str = "trellis_identity_trust_anchor_updates_total{result=\"refused\"}";
const EXPIRY: &str = "trellis_identity_trust_anchor_expiry_timestamp_seconds";

/// Waits until the sidecar's metric `name` reaches `at_least`.
async fn wait_metric(sidecar: &Sidecar, name: &str, at_least: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let text = sidecar.metrics().await;
        if metric(&text, name) >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} of {} below {at_least} after {within:?}:\n{text}\nlog:\n{}",
            sidecar.ip,
            sidecar.process.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One request through the client's sidecar to `echo`; its status (0: no answer).
async fn status(mesh: &Mesh) -> u16 {
    let req = mesh.request("echo", "/").body(empty()).unwrap();
    match http1_client().request(req).await {
        Ok(res) => res.status().as_u16(),
        Err(_) => 0,
    }
}

/// Requests until one succeeds (a refused endpoint may be in backoff for a moment).
async fn until_ok(mesh: &Mesh, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let s = status(mesh).await;
        if s == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no 200 within {within:?} (last {s}); client log:\n{}",
            mesh.client.process.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn eventually_logged(what: &str, log: impl Fn() -> String, within: Duration) {
    let deadline = Instant::now() + within;
    while !log().contains(what) {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in the log within {within:?}:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (a) A running sidecar learns a new root from the controller and then accepts peers under it,
/// which it refused before; (b) a garbage bundle, or one the controller's own certificate does
/// not chain to, is refused by the controller and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_root_reaches_running_sidecars_and_garbage_does_not() {
    let ca_a = Ca::new(ip(150, 100), "1h", &ACCOUNTS);
    let ca_b = Ca::new(ip(150, 101), "1h", &ACCOUNTS);
    let (root_a, root_b) = (
        read(&ca_a.dir.path().join("ca.crt")),
        read(&ca_b.dir.path().join("ca.crt")),
    );
    let files = trellis_integration::scratch_dir();
    let controller_anchors = files.path().join("controller-ca.crt");
    let both = files.path().join("both.crt");
    replace(&controller_anchors, &root_a);
    replace(&both, &format!("{root_a}{root_b}"));

    // The controller and the client are certified under A and trust A; the backends are
    // certified under B and trust both (so they accept the client).
    let mut controller = with_anchors(
        ca_a.controller_flags(CONTROLLER_ACCOUNT.1),
        &controller_anchors,
    );
    controller.extend(["--trust-anchors-poll-interval".into(), "200ms".into()]);
    let mesh = Mesh::start_with(150, ROUTE, &controller, |pod, sa| {
        if pod == "client-0" {
            ca_a.flags(NS, sa)
        } else {
            with_anchors(ca_b.flags(NS, sa), &both)
        }
    })
    .await;
    let text = mesh.client.metrics().await;
    assert_eq!(metric(&text, APPLIED), 0.0, "{text}");
    assert!(metric(&text, EXPIRY) > 0.0, "{text}");

    // Before: the client refuses the backend's certificate, which chains to B.
    for _ in 0..3 {
        assert_ne!(status(&mesh).await, 200);
    }

    // The controller's file gains B: the client receives it and accepts the backend, without
    // a restart.
    replace(&controller_anchors, &format!("{root_a}{root_b}"));
    wait_metric(&mesh.client, APPLIED, 1.0, Duration::from_secs(10)).await;
    until_ok(&mesh, Duration::from_secs(10)).await;

    // Garbage: the controller refuses it; nothing reaches the sidecars; traffic flows.
    replace(&controller_anchors, "this is not a certificate\n");
    let log = || mesh.controller.process.log();
    eventually_logged("trust anchors refused", log, Duration::from_secs(5)).await;
    // B alone: the controller's own certificate, from A, would not verify; refused too.
    replace(&controller_anchors, &root_b);
    eventually_logged(
        "does not verify this workload's own certificate",
        log,
        Duration::from_secs(5),
    )
    .await;
    for _ in 0..20 {
        assert_eq!(status(&mesh).await, 200);
    }
    let text = mesh.client.metrics().await;
    assert_eq!(metric(&text, APPLIED), 1.0, "{text}");
    assert_eq!(metric(&text, REFUSED), 0.0, "{text}");
}

/// Sends requests back to back until `stop`; counts them and keeps what failed.
fn load(mesh: Arc<Mesh>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let client = http1_client();
        let (mut sent, mut failed) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let req = mesh.request("echo", "/").body(empty()).unwrap();
            match client.request(req).await {
                Ok(r) if r.status() == 200 => {}
                Ok(r) => failed.push(format!("status {}", r.status())),
                Err(e) => failed.push(e.to_string()),
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (sent, failed)
    })
}

/// Copies B's issuer over the one identity serves, one file at a time as an operator would.
fn switch_issuer(ca: &Ca, b: &Path) {
    for file in ["issuer.crt", "issuer.key"] {
        replace(&ca.dir.path().join(file), &read(&b.join(file)));
    }
}

fn every_sidecar(mesh: &Mesh) -> Vec<&Sidecar> {
    let mut all: Vec<&Sidecar> = mesh.backends.iter().collect();
    all.push(&mesh.client);
    all
}

/// (c) The whole rotation, A → A+B → issuer under B → B only, with traffic between two
/// sidecars at every step and no process restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_needs_no_restart_and_fails_no_request() {
    // Short certificates, so that every workload is renewed by the new issuer within seconds.
    let ca = Ca::new(ip(152, 100), "6s", &ACCOUNTS);
    let anchors: PathBuf = ca.dir.path().join("ca.crt");
    let root_a = read(&anchors);
    let b = trellis_integration::scratch_dir();
    new_root(b.path());
    let root_b = read(&b.path().join("ca.crt"));

    let mut controller = ca.controller_flags(CONTROLLER_ACCOUNT.1);
    controller.extend(["--trust-anchors-poll-interval".into(), "200ms".into()]);
    let mesh = Arc::new(
        Mesh::start_with(152, ROUTE, &controller, |_, sa| {
            let mut flags = ca.flags(NS, sa);
            // New connections between sidecars during the test, not only the first ones.
            flags.extend(["--pool-idle-timeout".into(), "300ms".into()]);
            flags
        })
        .await,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(mesh.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 1. B joins the bundle (identity and the controller read the same file, as both mount
    //    the Secret's ca.crt); every sidecar receives it.
    replace(&anchors, &format!("{root_a}{root_b}"));
    for sidecar in every_sidecar(&mesh) {
        wait_metric(sidecar, APPLIED, 1.0, Duration::from_secs(10)).await;
    }

    // 2. Identity signs with B's issuer; wait for every certificate (6 s) to be renewed twice.
    switch_issuer(&ca, b.path());
    let renewals = |text: &str| metric(text, "trellis_identity_renewals_total");
    for sidecar in every_sidecar(&mesh) {
        let now = renewals(&sidecar.metrics().await);
        wait_metric(
            sidecar,
            "trellis_identity_renewals_total",
            now + 2.0,
            Duration::from_secs(20),
        )
        .await;
    }
    // The controller's certificate follows the same schedule.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 3. A leaves the bundle: once the controller's certificate is from B it takes the new
    //    bundle and hands it on; sidecars under B accept it.
    replace(&anchors, &root_b);
    for sidecar in every_sidecar(&mesh) {
        wait_metric(sidecar, APPLIED, 2.0, Duration::from_secs(15)).await;
    }
    // Traffic keeps flowing over new connections, and renewals (identity's serving certificate
    // now chains to B only) keep succeeding.
    let failures = metric(
        &mesh.client.metrics().await,
        "trellis_identity_failures_total",
    );
    let now = renewals(&mesh.client.metrics().await);
    wait_metric(
        &mesh.client,
        "trellis_identity_renewals_total",
        now + 1.0,
        Duration::from_secs(10),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = traffic.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(sent > 200, "{sent}");
    let text = mesh.client.metrics().await;
    assert_eq!(
        metric(&text, "trellis_identity_failures_total"),
        failures,
        "{text}"
    );
    assert_eq!(metric(&text, REFUSED), 0.0, "{text}");
    // After the rotation, only B is trusted: the expiry is B's.
    let only_b = metric(&text, EXPIRY);
    assert!(only_b > 0.0);

    // New connections after the rotation still work: idle connections closed, then requests.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ok = Arc::new(AtomicUsize::new(0));
    for _ in 0..10 {
        if status(&mesh).await == 200 {
            ok.fetch_add(1, Ordering::Relaxed);
        }
    }
    assert_eq!(ok.load(Ordering::Relaxed), 10);
}

/// A controller that answers `GET /v1/trust-anchors` over mutual TLS with the lines the test
/// sends, and `404` to anything else.
struct FakeController {
    addr: std::net::SocketAddr,
    lines: mpsc::Receiver<mpsc::Sender<Bytes>>,
}

/// A response body fed line by line.
struct LineBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for LineBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(hyper::body::Frame::data(l))))
    }
}

impl FakeController {
    async fn start(tls: &MeshTls) -> FakeController {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config(&[ALPN_H2]));
        let (streams_tx, streams) = mpsc::channel(8);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, streams_tx) = (acceptor.clone(), streams_tx.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: http::Request<_>| {
                        let streams_tx = streams_tx.clone();
                        async move {
                            let (tx, rx) = mpsc::channel(8);
                            let status = if req.uri().path() == "/v1/trust-anchors" {
                                let _ = streams_tx.send(tx).await;
                                200
                            } else {
                                404
                            };
                            let mut res = http::Response::new(LineBody(rx));
                            *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(res)
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        FakeController {
            addr,
            lines: streams,
        }
    }
}

/// A certificate for `ns/sa` from a real identity, on a workload that trusts `anchors`.
async fn certified(ca: &Ca, anchors: &str, ns: &str, sa: &str, tls: Option<MeshTls>) -> MeshTls {
    let tls = tls.unwrap_or_else(|| MeshTls::new(anchors, "cluster.local").unwrap());
    let cfg = trellis_tls::IdentityConfig {
        addr: ca.addr.to_string(),
        server_name: ca.addr.ip().to_string(),
        token_path: ca.dir.path().join(format!("token-{ns}-{sa}")),
        identity: Identity::new("cluster.local", ns, sa),
    };
    trellis_tls::identity::certify(&cfg, &tls).await.unwrap();
    tls
}

/// The sidecar's side alone, against a controller that sends what the real one never would:
/// lines that are not bundles and a bundle that would not verify the sidecar's own certificate
/// are refused and counted, and change nothing; the latter is applied once the sidecar holds a
/// certificate it verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_refuses_what_it_cannot_use_and_retries_after_renewal() {
    let ca_a = Ca::new(ip(151, 100), "1h", &ACCOUNTS);
    let ca_b = Ca::new(ip(151, 101), "1h", &ACCOUNTS);
    let root_a = read(&ca_a.dir.path().join("ca.crt"));
    let root_b = read(&ca_b.dir.path().join("ca.crt"));
    let both = format!("{root_a}{root_b}");
    let controller_id = Identity::new("cluster.local", CONTROLLER_ACCOUNT.0, CONTROLLER_ACCOUNT.1);
    let controller = certified(
        &ca_a,
        &root_a,
        CONTROLLER_ACCOUNT.0,
        CONTROLLER_ACCOUNT.1,
        None,
    )
    .await;
    let mut fake = FakeController::start(&controller).await;

    // The sidecar starts trusting both roots, certified under A.
    let sidecar = certified(&ca_a, &both, NS, "client", None).await;
    let mut registry = Registry::default();
    sidecar.anchors.register(&mut registry);
    let mut cfg = trellis_proxy::discovery::DiscoveryConfig::new(
        fake.addr.to_string(),
        NS,
        Duration::from_secs(60),
    );
    cfg.tls = Some(sidecar.peer_client(&controller_id, &[ALPN_H2]).unwrap());
    let discovery = trellis_proxy::discovery::Discovery::new(
        cfg,
        Arc::new(trellis_proxy::balance::EndpointRegistry::default()),
        &mut registry,
    );
    discovery.follow_trust_anchors(sidecar.clone());
    let stream = tokio::time::timeout(Duration::from_secs(10), fake.lines.recv())
        .await
        .expect("the sidecar opens the trust anchors stream at start")
        .unwrap();
    let counts = |registry: &Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        (metric(&text, APPLIED), metric(&text, REFUSED))
    };
    let send = |line: String| {
        let stream = stream.clone();
        async move { stream.send(Bytes::from(line + "\n")).await.unwrap() }
    };
    let wait_counts = async |want: (f64, f64)| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while counts(&registry) != want {
            assert!(
                Instant::now() < deadline,
                "{:?} != {want:?}",
                counts(&registry)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    // The bundle in force: nothing to count.
    send(serde_json::json!({ "pem": both }).to_string()).await;
    // Not a bundle, then not PEM: refused.
    send("garbage".to_string()).await;
    send(serde_json::json!({ "pem": "not a certificate" }).to_string()).await;
    wait_counts((0.0, 2.0)).await;
    assert_eq!(sidecar.anchors.current().pem(), both);
    // Traffic keeps working: a new mutual TLS connection to the controller.
    let tcp = tokio::net::TcpStream::connect(fake.addr).await.unwrap();
    sidecar
        .peer_client(&controller_id, &[ALPN_H2])
        .unwrap()
        .connect(tcp)
        .await
        .unwrap();

    // B alone does not verify the sidecar's certificate from A: refused once, kept aside.
    send(serde_json::json!({ "pem": root_b }).to_string()).await;
    wait_counts((0.0, 3.0)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        counts(&registry),
        (0.0, 3.0),
        "a retry is not counted again"
    );
    assert_eq!(sidecar.anchors.current().pem(), both);
    // Renewed under B, the sidecar takes the bundle it kept aside, with no new line.
    certified(&ca_b, &both, NS, "client", Some(sidecar.clone())).await;
    wait_counts((1.0, 3.0)).await;
    assert_eq!(sidecar.anchors.current().pem(), root_b);
}
