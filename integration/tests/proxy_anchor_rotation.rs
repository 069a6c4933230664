//! Trust anchors that change while the mesh runs: the controller follows its anchors file and
//! streams the bundle to the sidecars over the discovery connection, which verify new
//! connections with it; no process restarts. Real binaries: identity in local mode, the
//! controller certified by it, sidecars on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use trellis_integration::mesh::{Mesh, NS, ip};
use trellis_integration::{CONTROLLER_ACCOUNT, Ca, Sidecar, binary, empty, http1_client};

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
