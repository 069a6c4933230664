//! `trellis-controller stat` against real sidecars carrying real traffic: the counts, success
//! rates and latencies it prints are the ones the requests made, since the sidecars started or
//! over a window; and the same through a real Prometheus scraping a sidecar.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_integration::mesh::{Mesh, send};
use trellis_integration::{Process, binary, empty, http1_client, scratch_dir};

const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - name: fast
    matches: [{path: {type: PathPrefix, value: /fast}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - name: slow
    matches: [{path: {type: PathPrefix, value: /slow}}]
    backendRefs: [{name: echo-v2, port: 80}]
"#;

/// Sends `n` GETs of `path` to Service `echo` through the client's sidecar.
async fn traffic(mesh: &Mesh, path: &str, n: usize) {
    let http = http1_client();
    for _ in 0..n {
        let (status, _, _) = send(&http, mesh.request("echo", path).body(empty()).unwrap()).await;
        assert!(status.is_success() || status.is_server_error(), "{status}");
    }
}

fn stat(args: &[String]) -> Output {
    Command::new(binary("trellis-controller"))
        .arg("stat")
        .args(args)
        .env_clear()
        .output()
        .unwrap()
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The row of rule `rule`.
fn row<'a>(report: &'a Value, rule: &str) -> &'a Value {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == rule)
        .unwrap_or_else(|| panic!("no row for rule {rule}: {report:#}"))
}

fn admins(mesh: &Mesh) -> Vec<String> {
    let mut args = vec!["--admin".to_string(), mesh.client.admin().to_string()];
    for b in &mesh.backends {
        args.extend(["--admin".to_string(), b.admin().to_string()]);
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_since_start_show_each_rule_with_its_success_rate_and_latency() {
    let mesh = Mesh::start(181, ROUTES).await;
    traffic(&mesh, "/fast", 30).await;
    traffic(&mesh, "/fast?status=503", 10).await;
    traffic(&mesh, "/slow?delay_ms=50", 20).await;

    // A sidecar that is not there: named on stderr, the others still counted.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut args = admins(&mesh);
    args.extend(["--admin".into(), closed.to_string()]);
    args.extend(["--window".into(), "0".into(), "-o".into(), "json".into()]);
    let out = stat(&args);
    let report = json_of(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("sidecar {closed}")),
        "stderr: {stderr}"
    );
    assert_eq!(report["direction"], "outbound");
    assert_eq!(report["window_seconds"], Value::Null);

    let fast = row(&report, "fast");
    assert_eq!(fast["parent"], "mesh/echo:80");
    assert_eq!(fast["route"], "mesh/echo");
    assert_eq!(fast["backend"], "mesh/echo-v1:80");
    assert_eq!(fast["requests"], 40.0);
    assert_eq!(fast["success_rate"], 0.75);
    assert_eq!(fast["requests_per_second"], Value::Null);
    let slow = row(&report, "slow");
    assert_eq!(slow["backend"], "mesh/echo-v2:80");
    assert_eq!(slow["requests"], 20.0);
    assert_eq!(slow["success_rate"], 1.0);
    // 50 ms answers fall in the 32–64 ms bucket; the fast ones well below.
    let p50 = slow["p50_seconds"].as_f64().unwrap();
    assert!((0.032..=0.064).contains(&p50), "{p50}");
    let p99 = slow["p99_seconds"].as_f64().unwrap();
    assert!((p50..=0.064).contains(&p99), "{p99}");
    assert!(fast["p50_seconds"].as_f64().unwrap() < 0.032, "{fast}");
    assert_eq!(report["rows"].as_array().unwrap().len(), 2, "{report:#}");

    // The backends' view: what their sidecars received, from the client's identity.
    let mut args = admins(&mesh);
    args.extend(["--window", "0", "--direction", "inbound", "-o", "json"].map(String::from));
    let inbound = json_of(&stat(&args));
    let total: f64 = inbound["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requests"].as_f64().unwrap())
        .sum();
    assert_eq!(total, 60.0, "{inbound:#}");

    // The table, filtered to one parent and route.
    let mut args = admins(&mesh);
    args.extend(
        [
            "--window",
            "0",
            "--route",
            "mesh/echo",
            "--parent",
            "echo.mesh:80",
        ]
        .map(String::from),
    );
    let out = stat(&args);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("PARENT"), "{table}");
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &cells[..6],
        [
            "mesh/echo:80",
            "mesh/echo",
            "fast",
            "mesh/echo-v1:80",
            "40",
            "75.00%"
        ],
        "{table}"
    );
    assert!(lines[2].contains(" slow "), "{table}");
    // Another route: nothing, said on stderr.
    let mut args = admins(&mesh);
    args.extend(["--window", "0", "--route", "mesh/other"].map(String::from));
    let out = stat(&args);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no outbound requests seen"));

    // No sidecar at all: exit 1.
    let out = stat(&[
        "--admin".into(),
        closed.to_string(),
        "--window".into(),
        "0".into(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    // Flags that cannot work together: exit 2, before any scrape.
    let bad: [&[&str]; 7] = [
        &["--admin", "127.0.0.1:1", "-n", "shop"],
        &["--admin", "127.0.0.1:1", "--kubernetes"],
        &["--admin", "127.0.0.1:1", "--route", "echo"],
        &["--admin", "127.0.0.1:1", "--parent", "echo"],
        &["--admin", "https://127.0.0.1:1"],
        &["--prometheus", "http://127.0.0.1:1", "--window", "0"],
        &[],
    ];
    for args in bad {
        let out = stat(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

/// A relay in front of a sidecar's admin port: each request is answered with what the sidecar
/// answers, and then announced on the returned channel, so a test knows when a scrape is done.
async fn announcing_relay(
    admin: SocketAddr,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                let tx = tx.clone();
                async move {
                    let _: &http::Request<hyper::body::Incoming> = &req;
                    let upstream = http::Request::get(format!("http://{admin}{}", req.uri()))
                        .body(empty())
                        .unwrap();
                    let res = http1_client().request(upstream).await.unwrap();
                    let (parts, body) = res.into_parts();
                    let bytes = body.collect().await.unwrap().to_bytes();
                    let _ = tx.send(());
                    Ok::<_, std::convert::Infallible>(http::Response::from_parts(
                        parts,
                        http_body_util::Full::new(bytes),
                    ))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_counts_only_the_requests_made_during_it() {
    let mesh = Mesh::start(182, ROUTES).await;
    // Before the window: not counted.
    traffic(&mesh, "/fast", 25).await;
    // Outbound requests are the client's sidecar's to count: it is the one scraped.
    let (relay, mut scrapes) = announcing_relay(mesh.client.admin()).await;
    let child = Command::new(binary("trellis-controller"))
        .arg("stat")
        .args([
            "--admin",
            &relay.to_string(),
            "--window",
            "4s",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Inside the window: after the first scrape, before the second.
    tokio::time::timeout(Duration::from_secs(10), scrapes.recv())
        .await
        .expect("no first scrape");
    traffic(&mesh, "/fast", 30).await;
    traffic(&mesh, "/slow?status=500", 6).await;
    assert!(
        scrapes.try_recv().is_err(),
        "the traffic took longer than the window"
    );
    let out = child.wait_with_output().unwrap();
    let report = json_of(&out);
    assert_eq!(report["window_seconds"], 4.0);
    let fast = row(&report, "fast");
    assert_eq!(fast["requests"], 30.0, "{report:#}");
    assert_eq!(fast["success_rate"], 1.0);
    // 30 over the time between the scrapes, 4 s and a little.
    let rps = fast["requests_per_second"].as_f64().unwrap();
    assert!((6.5..=7.5).contains(&rps), "{rps}");
    let slow = row(&report, "slow");
    assert_eq!(slow["requests"], 6.0);
    assert_eq!(slow["success_rate"], 0.0);
}

/// `/usr/bin/prometheus` (Debian's `prometheus` package, which scripts/test installs), or
/// another one named by `TRELLIS_TEST_PROMETHEUS`.
fn prometheus_binary() -> std::path::PathBuf {
    let path = std::env::var_os("TRELLIS_TEST_PROMETHEUS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/prometheus".into());
    assert!(
        path.is_file(),
        "{} not found: apt-get install -y prometheus (or name one with TRELLIS_TEST_PROMETHEUS)",
        path.display()
    );
    path
}

/// A free port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scraping_a_sidecar_gives_the_same_rows() {
    let prometheus = prometheus_binary();
    let mesh = Mesh::start(183, ROUTES).await;
    let dir = scratch_dir();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
scrape_configs:\n\
- job_name: sidecars\n  static_configs: [{{targets: ['{}']}}]\n",
            mesh.client.admin()
        ),
    )
    .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new(prometheus);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"));
    let server = Process::spawn(cmd);
    let url = format!("http://{addr}");

    // Prometheus reads no increase into the first sample of a series: start the traffic once
    // it has scraped the sidecar.
    let deadline = Instant::now() + Duration::from_secs(30);
    while query_value(&url, "up").await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the sidecar: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Steady traffic across several scrapes, then wait until Prometheus has them all.
    for _ in 0..5 {
        traffic(&mesh, "/fast", 10).await;
        traffic(&mesh, "/fast?status=503", 2).await;
        traffic(&mesh, "/slow?delay_ms=50", 2).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let args = ["--prometheus", &url, "--window", "1m", "-o", "json"].map(String::from);
        let out = stat(&args);
        if out.status.success() {
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            let seen = report["rows"].as_array().is_some_and(|rows| {
                rows.iter().any(|r| r["rule"] == "fast")
                    && rows
                        .iter()
                        .any(|r| r["rule"] == "slow" && !r["p50_seconds"].is_null())
            });
            // Scraped after the last request: the totals are all in.
            if seen && query_value(&url, TOTAL).await == Some(70.0) {
                // Once more, now that every request is in the range.
                break json_of(&stat(&args));
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never showed the traffic: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(report["window_seconds"], 60.0);
    let fast = row(&report, "fast");
    assert_eq!(fast["parent"], "mesh/echo:80");
    assert_eq!(fast["backend"], "mesh/echo-v1:80");
    // rate() extrapolates, so counts are near, not exact; the success rate is a ratio of the
    // same extrapolation and holds.
    let success = fast["success_rate"].as_f64().unwrap();
    assert!((success - 50.0 / 60.0).abs() < 0.02, "{success}");
    assert!(fast["requests_per_second"].as_f64().unwrap() > 0.0);
    let slow = row(&report, "slow");
    let p50 = slow["p50_seconds"].as_f64().unwrap();
    assert!((0.032..=0.064).contains(&p50), "{p50}");
    assert!(fast["p50_seconds"].as_f64().unwrap() < 0.032);

    // Nothing listening: exit 1 and the reason.
    let gone = format!("http://127.0.0.1:{}", free_port());
    let out = stat(&["--prometheus", &gone].map(String::from));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&gone));
    drop(server);
}

/// Every outbound request the client's sidecar counted, as PromQL.
const TOTAL: &str = "sum(trellis_requests_total{direction=\"outbound\"})";

/// The value of a query's first series, if there is one.
async fn query_value(url: &str, promql: &str) -> Option<f64> {
    use http_body_util::BodyExt;
    let http = http1_client();
    let mut encoded = String::new();
    for b in promql.bytes() {
        if b.is_ascii_alphanumeric() {
            encoded.push(b as char);
        } else {
            encoded += &format!("%{b:02X}");
        }
    }
    let req = http::Request::get(format!("{url}/api/v1/query?query={encoded}"))
        .body(empty())
        .unwrap();
    let res = http.request(req).await.ok()?;
    let body = res.into_body().collect().await.ok()?.to_bytes();
    let v: Value = serde_json::from_slice(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}
