//! The fault benchmark: steady load through meshed sidecars on loopback while faults happen,
//! with the requests sent, failed and retried during each. Run it with `bench/faults`.
//!
//! Layout (`127.0.99.X`, as the end-to-end tests): identity (certificates of `LIFETIME`), a
//! controller in local mode, three meshed pods (echo apps `echo-v1-0`, `echo-v2-0`,
//! `mirror-0` behind their sidecars) and a client pod's sidecar. The load is `RATE` GETs per
//! second from `WORKERS` connections to Service `echo` (both echo pods), through an HTTPRoute
//! with `retry: {codes: [502, 503], attempts: 2}`. Every phase runs `PHASE` seconds (10):
//!
//! 1. `baseline`: no fault.
//! 2. `kill-endpoint`: the sidecar of `echo-v2-0` is killed (its endpoint refuses
//!    connections), then started again at the end of the phase.
//! 3. `edit-routes`: the route file is rewritten every second, alternating between the Service
//!    itself and a 50/50 split between `echo-v1` and `echo-v2`.
//! 4. `restart-controller`: the controller is killed, and started again on the same address
//!    after half the phase.
//! 5. `identity-down`: identity is stopped just before the sidecars' certificates are due for
//!    renewal and started again before they expire.
//!
//! Failed means a status other than 200 or a connection error. Retried is the growth of the
//! client sidecar's `trellis_retries_total` (fail-over after a failed connect included).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark harness fails loudly

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use trellis_integration::mesh::{self, Mesh, NS};
use trellis_integration::netns::metric;
use trellis_integration::{Ca, Controller, Sidecar, empty, http1_client};

const BLOCK: u8 = 99;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The route on Service `echo`: to the Service itself (both pods), or split by weight
/// between `echo-v1` and `echo-v2` (one pod each).
fn routes(split: bool) -> String {
    let backends = if split {
        "[{name: echo-v1, port: 80, weight: 50}, {name: echo-v2, port: 80, weight: 50}]"
    } else {
        "[{name: echo, port: 80}]"
    };
    format!(
        "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo, namespace: {NS}}}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo, port: 80}}]
  rules:
  - retry: {{codes: [502, 503], attempts: 2}}
    backendRefs: {backends}
"
    )
}

/// Counts of the load, read at phase boundaries.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    failed: AtomicU64,
}

/// What the client sidecar's metrics say so far.
struct Scrape {
    retries: f64,
    fail_overs: f64,
    budget: f64,
    ejections: f64,
}

async fn scrape(sidecar: &Sidecar) -> Scrape {
    let text = sidecar.metrics().await;
    Scrape {
        retries: metric(&text, "trellis_retries_total", &[]),
        fail_overs: metric(&text, "trellis_retries_total", &[("reason", "connect")]),
        budget: metric(&text, "trellis_retry_budget_exhausted_total", &[]),
        ejections: metric(&text, "trellis_endpoint_ejections_total", &[]),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rate: u64 = env("RATE", 400);
    let workers: u64 = env("WORKERS", 8);
    let phase = Duration::from_secs(env("PHASE", 10));
    let lifetime: u64 = env("LIFETIME", 30);

    let accounts = [(NS, "v1"), (NS, "v2"), (NS, "mirror"), (NS, "client")];
    let mut ca = Ca::new(mesh::ip(BLOCK, 100), &format!("{lifetime}s"), &accounts);
    let controller_flags = ca.controller_flags(trellis_integration::CONTROLLER_ACCOUNT.1);
    let sidecar_flags = {
        let ca_flags: Vec<(String, Vec<String>)> = ["v1", "v2", "mirror", "client"]
            .iter()
            .map(|sa| (sa.to_string(), ca.flags(NS, sa)))
            .collect();
        move |_pod: &str, sa: &str| {
            ca_flags
                .iter()
                .find(|(s, _)| s == sa)
                .map(|(_, f)| f.clone())
                .unwrap_or_default()
        }
    };
    let mut m = Mesh::start_with(BLOCK, &routes(false), &controller_flags, &sidecar_flags).await;
    let route_file = m.dir.path().join("routes.yaml");

    // The load: `workers` loops, paced to `rate` in all.
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    let interval = Duration::from_secs_f64(workers as f64 / rate as f64);
    for _ in 0..workers {
        let (counts, stop) = (counts.clone(), stop.clone());
        let uri = format!("http://{}/", m.client.outbound());
        load.push(tokio::spawn(async move {
            let client = http1_client();
            let mut next = tokio::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                next += interval;
                tokio::time::sleep_until(next).await;
                let req = Request::get(&uri)
                    .header("host", "echo")
                    .body(empty())
                    .unwrap();
                counts.sent.fetch_add(1, Ordering::Relaxed);
                let ok = match client.request(req).await {
                    Ok(res) => {
                        let status = res.status();
                        res.into_body().collect().await.is_ok() && status == 200
                    }
                    Err(_) => false,
                };
                if !ok {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    println!(
        "| fault | seconds | sent | failed | retried | of them fail-over | budget refusals | ejections |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let report = |name: &str, started: Instant, before: (u64, u64, Scrape), after: Scrape| {
        let (sent0, failed0, s0) = before;
        println!(
            "| {name} | {:.1} | {} | {} | {} | {} | {} | {} |",
            started.elapsed().as_secs_f64(),
            counts.sent.load(Ordering::Relaxed) - sent0,
            counts.failed.load(Ordering::Relaxed) - failed0,
            after.retries - s0.retries,
            after.fail_overs - s0.fail_overs,
            after.budget - s0.budget,
            after.ejections - s0.ejections,
        );
    };
    let mark = |counts: &Counts, s: Scrape| {
        (
            counts.sent.load(Ordering::Relaxed),
            counts.failed.load(Ordering::Relaxed),
            s,
        )
    };

    // 1. Baseline.
    let (started, before) = (Instant::now(), mark(&counts, scrape(&m.client).await));
    tokio::time::sleep(phase).await;
    report("baseline", started, before, scrape(&m.client).await);

    // 2. One endpoint killed for the phase, then back.
    let (started, before) = (Instant::now(), mark(&counts, scrape(&m.client).await));
    m.backends[1].process.kill();
    tokio::time::sleep(phase).await;
    let flags = sidecar_flags("echo-v2-0", "v2");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    m.backends[1] = Sidecar::start(mesh::ip(BLOCK, 12), NS, m.controller.addr, &flags);
    report("kill-endpoint", started, before, scrape(&m.client).await);

    // 3. Route edits every second.
    let (started, before) = (Instant::now(), mark(&counts, scrape(&m.client).await));
    let mut flip = false;
    while started.elapsed() < phase {
        flip = !flip;
        let text = routes(flip);
        std::fs::write(&route_file, text).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    report("edit-routes", started, before, scrape(&m.client).await);

    // 4. The controller restarted on the same address.
    let (started, before) = (Instant::now(), mark(&counts, scrape(&m.client).await));
    let addr: SocketAddr = m.controller.addr;
    m.controller.process.kill();
    tokio::time::sleep(phase / 2).await;
    m.controller = Controller::start_with(m.dir.path(), addr, &controller_flags);
    tokio::time::sleep(phase / 2).await;
    report(
        "restart-controller",
        started,
        before,
        scrape(&m.client).await,
    );

    // 5. Identity down across a renewal: wait for a renewal, stop identity before the next
    // one is due (about 70 % of the lifetime), start it again before the certificate expires.
    let renewals = |text: &str| metric(text, "trellis_identity_renewals_total", &[]);
    let seen = renewals(&m.client.metrics().await);
    while renewals(&m.client.metrics().await) <= seen {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewed = Instant::now();
    let lifetime = Duration::from_secs(lifetime);
    tokio::time::sleep(lifetime.mul_f64(0.45)).await;
    let (started, before) = (Instant::now(), mark(&counts, scrape(&m.client).await));
    ca.stop();
    tokio::time::sleep_until(tokio::time::Instant::from_std(
        renewed + lifetime.mul_f64(0.8),
    ))
    .await;
    ca.start(&format!("{}s", lifetime.as_secs()));
    let during = renewals(&m.client.metrics().await);
    tokio::time::sleep(lifetime.mul_f64(0.15)).await;
    report("identity-down", started, before, scrape(&m.client).await);
    let after = renewals(&m.client.metrics().await);
    println!(
        "\nidentity: stopped {:.1} s after a renewal for {:.1} s; renewals while down: {}, after: {}",
        lifetime.mul_f64(0.45).as_secs_f64(),
        lifetime.mul_f64(0.35).as_secs_f64(),
        during - seen - 1.0,
        after - during,
    );

    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    println!(
        "total: sent {}, failed {}",
        counts.sent.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed)
    );
}
