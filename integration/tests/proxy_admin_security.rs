//! What the sidecar's admin port (open to the pod network) gives away and what it checks, over
//! real sockets with the real binaries: the app's kubelet probes checked on the kubelet's
//! behalf (`/app-health/...`: HTTP, TCP and gRPC, each under a deadline, with a bound on checks
//! in flight), `/config` kept to clients inside the pod, and `/ready` turning 503 once the
//! workload certificate has expired.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use trellis_integration::netns::{self, Reply};
use trellis_integration::{Ca, Process, Sidecar, binary, empty, http1_client};

const NS: &str = "shop";

/// `127.0.<block>.<host>`: each test has a block of its own.
fn ip(block: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, block, host))
}

/// Nothing listens there: discovery retries in the background, which the admin port ignores.
fn no_controller() -> SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

fn sidecar(block: u8, probes: &str, extra: &[&str]) -> Sidecar {
    let mut flags = vec!["--app-probes", probes];
    flags.extend_from_slice(extra);
    Sidecar::start(ip(block, 10), NS, no_controller(), &flags)
}

struct Answer {
    status: StatusCode,
    body: String,
    took: Duration,
}

async fn call(admin: SocketAddr, method: Method, path: &str) -> Answer {
    let started = Instant::now();
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .body(empty())
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), http1_client().request(req))
        .await
        .expect("the admin port answers within 10 s")
        .unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        body: String::from_utf8_lossy(&body).into_owned(),
        took: started.elapsed(),
    }
}

async fn get(admin: SocketAddr, path: &str) -> Answer {
    call(admin, Method::GET, path).await
}

/// The sum of the samples of `name` whose line contains every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the probe app saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HeaderMap,
}

/// An HTTP app with the answers probes look for: `/ok` 200, `/moved` 302, `/fail` 500, `/hang`
/// never answers.
async fn probe_app(addr: SocketAddr) -> Arc<Mutex<Vec<Seen>>> {
    let listener = TcpListener::bind(addr).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        log.lock().unwrap().push(Seen {
                            path: req.uri().to_string(),
                            headers: req.headers().clone(),
                        });
                        let status = match req.uri().path() {
                            "/ok" => StatusCode::OK,
                            "/moved" => StatusCode::FOUND,
                            "/hang" => {
                                tokio::time::sleep(Duration::from_secs(60)).await;
                                StatusCode::OK
                            }
                            _ => StatusCode::INTERNAL_SERVER_ERROR,
                        };
                        let mut res = Response::new(Full::new(Bytes::from_static(b"body\n")));
                        *res.status_mut() = status;
                        Ok::<_, Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_health_performs_http_probes_like_the_kubelet() {
    let block = 201;
    let app = SocketAddr::new(ip(block, 10), 8080);
    let seen = probe_app(app).await;
    let probes = r#"{
        "app/readiness": {"kind": "http", "port": 8080, "path": "/ok?from=probe",
                          "headers": [{"name": "x-probe", "value": "ready"}]},
        "app/liveness": {"kind": "http", "port": 8080, "path": "/fail"},
        "app/startup": {"kind": "http", "port": 8080, "path": "/hang"},
        "side/readiness": {"kind": "http", "port": 8080, "path": "/moved", "host": "side.example"}
    }"#;
    let sidecar = sidecar(block, probes, &[]);
    let admin = sidecar.admin();

    let ok = get(admin, "/app-health/app/readiness").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.body, "ok: HTTP 200\n");
    {
        let seen = seen.lock().unwrap();
        let req = seen.last().unwrap();
        assert_eq!(req.path, "/ok?from=probe");
        assert_eq!(req.headers["x-probe"], "ready");
        assert_eq!(req.headers["host"], app.to_string());
        assert!(
            req.headers["user-agent"]
                .to_str()
                .unwrap()
                .starts_with("kube-probe/")
        );
    }

    // A redirect is a success for the kubelet; the probe's host is the Host header.
    let moved = get(admin, "/app-health/side/readiness").await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.body);
    assert_eq!(
        seen.lock().unwrap().last().unwrap().headers["host"],
        "side.example:8080"
    );

    let failed = get(admin, "/app-health/app/liveness").await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        failed.body,
        "app/liveness: the app answered HTTP 500 Internal Server Error\n"
    );

    // A hanging app fails the check at the default deadline of 1 s.
    let hung = get(admin, "/app-health/app/startup").await;
    assert_eq!(hung.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        hung.body.contains("no answer from the app within 1s"),
        "{}",
        hung.body
    );
    assert!(
        hung.took >= Duration::from_millis(900) && hung.took < Duration::from_secs(3),
        "{:?}",
        hung.took
    );

    let unknown = get(admin, "/app-health/app/other").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let post = call(admin, Method::POST, "/app-health/app/readiness").await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);

    let metrics = sidecar.metrics().await;
    for (probe, result) in [
        ("app/readiness", "success"),
        ("side/readiness", "success"),
        ("app/liveness", "failure"),
        ("app/startup", "timeout"),
    ] {
        let labels = [format!("probe=\"{probe}\""), format!("result=\"{result}\"")];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        assert_eq!(
            metric(&metrics, "trellis_app_health_checks_total", &labels),
            1.0,
            "{probe} {result}\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_health_performs_tcp_probes() {
    let block = 202;
    let open = TcpListener::bind(SocketAddr::new(ip(block, 10), 0))
        .await
        .unwrap();
    let open_port = open.local_addr().unwrap().port();
    let closed_port = {
        let l = std::net::TcpListener::bind(SocketAddr::new(ip(block, 10), 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let probes = format!(
        r#"{{"app/liveness": {{"kind": "tcp", "port": {open_port}}},
            "app/readiness": {{"kind": "tcp", "port": {closed_port}}}}}"#
    );
    let sidecar = sidecar(block, &probes, &[]);
    let admin = sidecar.admin();

    let ok = get(admin, "/app-health/app/liveness").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), open.accept())
            .await
            .is_ok(),
        "the check connected to the app"
    );
    let closed = get(admin, "/app-health/app/readiness").await;
    assert_eq!(closed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        closed
            .body
            .starts_with("app/readiness: cannot connect to the app"),
        "{}",
        closed.body
    );
}

/// A gRPC server with the standard health service, answering as grpc-go's does: `""` and
/// `shop.Cart` SERVING, `shop.Down` NOT_SERVING, anything else `NOT_FOUND` (trailers only).
async fn grpc_health_app(addr: SocketAddr) -> Arc<AtomicUsize> {
    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    trellis_integration::h2c_server(addr, move |req| {
        let count = count.clone();
        async move { grpc_health(req, &count).await }
    })
    .await;
    calls
}

type GrpcBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn grpc_health(req: Request<Incoming>, calls: &AtomicUsize) -> Response<GrpcBody> {
    calls.fetch_add(1, Ordering::SeqCst);
    assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
    assert_eq!(req.headers()["content-type"], "application/grpc");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    // One uncompressed frame holding `HealthCheckRequest { service = 1 }`.
    assert_eq!(body[0], 0);
    let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    let message = &body[5..5 + len];
    let service = if message.is_empty() {
        String::new()
    } else {
        assert_eq!(message[0], 0x0a);
        String::from_utf8(message[2..2 + usize::from(message[1])].to_vec()).unwrap()
    };
    let status: u8 = match service.as_str() {
        "" | "shop.Cart" => 1,
        "shop.Down" => 2,
        _ => {
            let mut res = Response::new(Full::new(Bytes::new()).boxed());
            let headers = res.headers_mut();
            headers.insert("content-type", "application/grpc".parse().unwrap());
            headers.insert("grpc-status", "5".parse().unwrap());
            headers.insert("grpc-message", "unknown service".parse().unwrap());
            return res;
        }
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let frame = Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]);
    let body = Full::new(frame)
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    let mut res = Response::new(body);
    res.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    res
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_health_performs_grpc_health_checks() {
    let block = 203;
    let calls = grpc_health_app(SocketAddr::new(ip(block, 10), 9090)).await;
    let probes = r#"{
        "app/readiness": {"kind": "grpc", "port": 9090},
        "app/startup": {"kind": "grpc", "port": 9090, "service": "shop.Cart"},
        "app/liveness": {"kind": "grpc", "port": 9090, "service": "shop.Down"},
        "other/readiness": {"kind": "grpc", "port": 9090, "service": "shop.Nothing"},
        "http/readiness": {"kind": "grpc", "port": 9091}
    }"#;
    let sidecar = sidecar(block, probes, &[]);
    let admin = sidecar.admin();

    for key in ["app/readiness", "app/startup"] {
        let ok = get(admin, &format!("/app-health/{key}")).await;
        assert_eq!(ok.status, StatusCode::OK, "{key}: {}", ok.body);
        assert_eq!(ok.body, "ok: SERVING\n");
    }
    let down = get(admin, "/app-health/app/liveness").await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        down.body,
        "app/liveness: gRPC health check: the app is NOT_SERVING\n"
    );
    let unknown = get(admin, "/app-health/other/readiness").await;
    assert_eq!(unknown.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        unknown.body,
        "other/readiness: gRPC health check: grpc-status 5: unknown service\n"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    let nothing = get(admin, "/app-health/http/readiness").await;
    assert_eq!(nothing.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(nothing.body.contains("cannot connect"), "{}", nothing.body);
}

/// The admin port is open to every pod: a flood of app-health requests must not become a
/// flood of connections to the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_health_checks_in_flight_are_bounded() {
    let block = 204;
    // An app that accepts and never answers, counting connections.
    let listener = TcpListener::bind(SocketAddr::new(ip(block, 10), 8080))
        .await
        .unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    let probes = r#"{"app/readiness": {"kind": "http", "port": 8080, "path": "/"}}"#;
    let sidecar = sidecar(block, probes, &["--app-probe-timeout", "3s"]);
    let admin = sidecar.admin();

    let started = Instant::now();
    let flood: Vec<_> = (0..40)
        .map(|_| tokio::spawn(get(admin, "/app-health/app/readiness")))
        .collect();
    // Every request has arrived and none has reached its deadline: the app sees the bound.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reached = accepted.load(Ordering::SeqCst);
    assert_eq!(reached, 8, "connections that reached the app");
    let mut busy = 0;
    for answer in flood {
        let answer = answer.await.unwrap();
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            answer.body
        );
        busy += usize::from(answer.body.contains("already in flight"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // The requests that waited for a slot until their deadline; a few may have taken one in
    // the last instant and timed out on the app instead.
    assert!(busy >= 24, "{busy} answered busy");
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "trellis_app_health_checks_total",
            &["result=\"busy\""]
        ),
        busy as f64,
        "{metrics}"
    );
}

#[test]
fn bad_app_probes_stop_the_proxy_at_start() {
    for (probes, why) in [
        ("{not json", "not the JSON the injector writes"),
        (
            r#"{"app/readiness": {"kind": "exec", "command": ["true"]}}"#,
            "unknown variant",
        ),
        (
            r#"{"app/readiness": {"kind": "http", "port": 80, "path": "/a b"}}"#,
            "probe \"app/readiness\": path",
        ),
    ] {
        let mut child = Command::new(binary("trellis-proxy"))
            .args(["run", "--controller-addr", "127.0.0.1:9", "--namespace", NS])
            .env("TRELLIS_APP_PROBES", probes)
            // Ports that are surely free: it must stop before binding anything.
            .args([
                "--admin-addr",
                "127.0.0.1:1",
                "--inbound-addr",
                "127.0.0.1:2",
            ])
            .args(["--outbound-addr", "127.0.0.1:3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A proxy that ignored the probes would run on: stop it and fail.
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("--app-probes (TRELLIS_APP_PROBES): ") && stderr.contains(why),
            "{stderr}"
        );
    }
}

/// A network namespace with loopback and the pod's (non-loopback) address, deleted when dropped. Named
/// like the harness's pods, so that its sweep removes one a killed test left behind.
struct Pod {
    name: String,
    addr: Ipv4Addr,
}

impl Pod {
    fn new(role: &str, addr: Ipv4Addr) -> Pod {
        let name = format!("trellis-pod-{}-0-{role}", std::process::id());
        let pod = Pod { name, addr };
        Self::ip(&["netns", "add", &pod.name]);
        pod.run_ip(&["link", "set", "lo", "up"]);
        // The pod's address on `lo`: a connection to it comes from it, as one from another
        // pod comes from that pod's address; only the addresses matter to the admin server.
        pod.run_ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        pod
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }

    fn run_ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        Self::ip(&all);
    }

    fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.name,
            "setpriv",
            "--pdeathsig",
            "KILL",
            "--",
        ])
        .arg(program);
        cmd
    }

    /// The sidecar, admin on every address of the pod.
    fn sidecar(&self, env: &[(&str, &str)]) -> Process {
        let mut cmd = self.command(&binary("trellis-proxy"));
        cmd.args(["run", "--controller-addr", "127.0.0.1:9", "--namespace", NS])
            .args(["--admin-addr", "0.0.0.0:4191"])
            .args([
                "--outbound-addr",
                "127.0.0.1:4140",
                "--inbound-addr",
                "127.0.0.1:4143",
            ])
            .env("TRELLIS_LOG", "info")
            .envs(env.iter().copied());
        let process = Process::spawn(cmd);
        let ready = self.curl(&[
            "--until",
            "200",
            "--within-ms",
            "10000",
            "http://127.0.0.1:4191/ready",
        ]);
        assert_eq!(ready.status, Some(200), "{ready:?}\n{}", process.log());
        process
    }

    /// One request from inside the pod; the client's address is the one the route to the
    /// URL's host picks: loopback for 127.0.0.1, the pod's own address for it.
    fn curl(&self, args: &[&str]) -> Reply {
        let out = self
            .command(&binary("trellis-curl"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "trellis-curl {args:?}: {out:?}");
        let line = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(line.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    fn get(&self, host: impl std::fmt::Display, path: &str) -> Reply {
        self.curl(&[&format!("http://{host}:4191{path}")])
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn config_is_served_only_to_clients_inside_the_pod() {
    if !netns::available() {
        return;
    }
    let pod = Pod::new("admin", Ipv4Addr::new(10, 219, 0, 10));
    let sidecar = pod.sidecar(&[]);

    // Another pod's view: the admin port through the pod's network address.
    let outside = pod.get(pod.addr, "/config");
    assert_eq!(outside.status, Some(403), "{outside:?}\n{}", sidecar.log());
    assert!(
        outside.body.contains("--admin-config-public"),
        "{outside:?}"
    );
    for path in ["/metrics", "/ready", "/live"] {
        let open = pod.get(pod.addr, path);
        assert_eq!(open.status, Some(200), "{path}: {open:?}");
    }
    let probe = pod.get(pod.addr, "/app-health/app/readiness");
    assert_eq!(probe.status, Some(404), "{probe:?}");

    // `kubectl port-forward` and `kubectl exec`: loopback.
    let inside = pod.get("127.0.0.1", "/config");
    assert_eq!(inside.status, Some(200), "{inside:?}");
    let doc: serde_json::Value = serde_json::from_str(&inside.body).unwrap();
    assert_eq!(doc["namespace"], NS);
    drop(sidecar);

    // Opened on purpose.
    let sidecar = pod.sidecar(&[("TRELLIS_ADMIN_CONFIG_PUBLIC", "true")]);
    let outside = pod.get(pod.addr, "/config");
    assert_eq!(outside.status, Some(200), "{outside:?}\n{}", sidecar.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_the_certificate_is_expired_and_200_with_the_next() {
    let block = 205;
    let mut ca = Ca::new(ip(block, 100), "5s", &[(NS, "web")]);
    let flags = ca.flags(NS, "web");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let sidecar = Sidecar::start(ip(block, 10), NS, no_controller(), &flags);
    // Identity goes away before the renewal is due (at 65–75 % of the 5 s).
    ca.stop();
    let admin = sidecar.admin();
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metric(&metrics, "trellis_identity_certificate_valid", &[]),
        1.0,
        "{metrics}"
    );
    let expiry = metric(
        &metrics,
        "trellis_identity_certificate_expiry_timestamp_seconds",
        &[],
    );
    let ready = get(admin, "/ready").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);

    let deadline = Instant::now() + Duration::from_secs(10);
    let not_ready = loop {
        let answer = get(admin, "/ready").await;
        if answer.status != StatusCode::OK {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "/ready still 200\n{}",
            sidecar.process.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(now >= expiry, "503 at {now}, before the expiry at {expiry}");
    assert_eq!(not_ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        not_ready
            .body
            .starts_with("not ready: the workload certificate expired at"),
        "{}",
        not_ready.body
    );
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metric(&metrics, "trellis_identity_certificate_valid", &[]),
        0.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "trellis_identity_failures_total", &[]) >= 1.0);

    // Identity back: the next attempt (backoff under 30 s) certifies the pod, ready again.
    ca.start("1h");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let answer = get(admin, "/ready").await;
        if answer.status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/ready still {}: {}",
            answer.status,
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metric(&metrics, "trellis_identity_certificate_valid", &[]),
        1.0
    );
}
