//! Retries, timeouts and failure accrual through real sidecars: a body fails over from an
//! endpoint that refuses connections (an app, or a peer sidecar that is gone) and arrives once;
//! a POST is not sent again after it may have reached the backend; a mirrored body is retried
//! whole and mirrored once; the retry budget bounds a retry storm; a stalled response stream
//! is cut at the rule's request timeout; an endpoint that fails every request is ejected and
//! comes back once it recovers; a GRPCRoute retries the statuses its annotation names.
//!
//! Most backends are apps outside the mesh (no sidecar), so the client's sidecar speaks to them
//! directly and each test controls exactly how they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::convert::Infallible;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use trellis_integration::netns::metric;
use trellis_integration::{
    Controller, Sidecar, TestBody, body, empty, http1_client, plain_service as service,
};

fn ip(block: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, block, host))
}

/// An HTTPRoute on `shop/<name>:80` to the Service itself, with `extra` added to its rule.
fn route(name: &str, extra: &str) -> String {
    format!(
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: {name}, port: 80}}]
  rules:
  - backendRefs: [{{name: {name}, port: 80}}]
    {extra}
"
    )
}

/// A controller on `manifests` and a client sidecar at `127.0.<block>.9`.
fn start(block: u8, manifests: &str, flags: &[&str]) -> (tempfile::TempDir, Controller, Sidecar) {
    let dir = trellis_integration::scratch_dir();
    std::fs::write(dir.path().join("cluster.yaml"), manifests).unwrap();
    let controller = Controller::start(dir.path());
    let sidecar = Sidecar::start(ip(block, 9), "shop", controller.addr, flags);
    (dir, controller, sidecar)
}

/// A backend app: records each request's method and body length, answers 503 while
/// `failing`, waits `delay` before answering, and on `/stall` answers a first chunk of a
/// body that never goes on.
struct App {
    seen: Arc<Mutex<Vec<(String, usize)>>>,
    failing: Arc<AtomicBool>,
    /// Requests still to answer 503 before the app answers normally.
    fail_next: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    async fn start(addr: SocketAddr, delay: Duration) -> App {
        let listener = TcpListener::bind(addr).await.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicBool::new(false));
        let fail_next = Arc::new(AtomicUsize::new(0));
        let (s, f, n) = (seen.clone(), failing.clone(), fail_next.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, f, n) = (s.clone(), f.clone(), n.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (s, f, n) = (s.clone(), f.clone(), n.clone());
                        async move { Ok::<_, Infallible>(answer(req, &s, &f, &n, delay).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        App {
            seen,
            failing,
            fail_next,
            task,
        }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<Incoming>,
    seen: &Mutex<Vec<(String, usize)>>,
    failing: &AtomicBool,
    fail_next: &AtomicUsize,
    delay: Duration,
) -> Response<BoxBody<Bytes, Infallible>> {
    let (parts, body) = req.into_parts();
    let len = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    seen.lock().unwrap().push((parts.method.to_string(), len));
    if parts.uri.path() == "/slow" {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tokio::time::sleep(delay).await;
    if parts.uri.path() == "/stall" {
        return Response::new(Stall(false).boxed());
    }
    let mut res = Response::new(http_body_util::Full::new(Bytes::from(len.to_string())).boxed());
    let fail_now = fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing.load(Ordering::SeqCst) || fail_now {
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    res
}

/// A response body that sends one chunk, then nothing, ever.
struct Stall(bool);

impl hyper::body::Body for Stall {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0 {
            return Poll::Pending;
        }
        self.0 = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first")))))
    }
}

/// A backend that reads each request (head and `content-length` body) and closes the
/// connection without answering: the request reached it, and the client gets no response.
fn closer(addr: SocketAddr) -> Arc<AtomicUsize> {
    let seen = Arc::new(AtomicUsize::new(0));
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let count = seen.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                // Dropped: the connection closes with the request unanswered.
            });
        }
    });
    seen
}

fn request(
    sidecar: &Sidecar,
    method: &str,
    host: &str,
    path: &str,
    b: TestBody,
) -> Request<TestBody> {
    Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", sidecar.outbound()))
        .header("host", host)
        .body(b)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_body_fails_over_from_a_refusing_endpoint_and_arrives_once() {
    let block = 90;
    // .11 refuses connections (nothing listens); .12 answers.
    let (_dir, _controller, sidecar) = start(block, &service(block, "web", &[11, 12]), &[]);
    let app = App::start(SocketAddr::new(ip(block, 12), 8080), Duration::ZERO).await;
    let client = http1_client();
    let payload = Bytes::from(vec![b'x'; 10 * 1024]);
    for i in 0..20 {
        let req = request(&sidecar, "POST", "web", "/", body(payload.clone()));
        let res = client.request(req).await.unwrap();
        let status = res.status();
        let text = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, StatusCode::OK, "request {i}: {text:?}");
        assert_eq!(text, "10240");
    }
    // Every body arrived once, whole.
    let seen = app.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 20, "{seen:?}");
    assert!(seen.iter().all(|(m, len)| m == "POST" && *len == 10 * 1024));
    let text = sidecar.metrics().await;
    assert!(
        metric(&text, "trellis_retries_total", &[("reason", "connect")]) >= 1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_idempotent_request_is_not_sent_again_after_it_was_sent() {
    let block = 91;
    let manifests = service(block, "web", &[11])
        + &route("web", "retry: {codes: [503], attempts: 3, backoff: 1ms}");
    let (_dir, _controller, sidecar) = start(block, &manifests, &[]);
    let seen = closer(SocketAddr::new(ip(block, 11), 8080));
    let client = http1_client();
    // Empty and non-empty POSTs: the connection broke after the request reached the backend.
    for b in [empty(), body("a small body")] {
        let before = seen.load(Ordering::SeqCst);
        let res = client
            .request(request(&sidecar, "POST", "web", "/", b))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            seen.load(Ordering::SeqCst) - before,
            1,
            "the POST was sent again"
        );
    }
    // The same failure of a GET is retried: three retries after the first attempt.
    let before = seen.load(Ordering::SeqCst);
    let res = client
        .request(request(&sidecar, "GET", "web", "/", empty()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(seen.load(Ordering::SeqCst) - before, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_stops_a_retry_storm() {
    let block = 92;
    let manifests = service(block, "web", &[11])
        + &route("web", "retry: {codes: [503], attempts: 3, backoff: 1ms}");
    let flags = [
        "--retry-budget-ratio",
        "0.2",
        "--retry-budget-min-per-second",
        "1",
        "--retry-budget-window",
        "10s",
    ];
    let (_dir, _controller, sidecar) = start(block, &manifests, &flags);
    let app = App::start(SocketAddr::new(ip(block, 11), 8080), Duration::ZERO).await;
    app.failing.store(true, Ordering::SeqCst);
    let client = http1_client();
    let sent = 200;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (client, uri) = (client.clone(), format!("http://{}/", sidecar.outbound()));
        tasks.spawn(async move {
            for _ in (worker..sent).step_by(8) {
                let req = Request::get(&uri)
                    .header("host", "web")
                    .body(empty())
                    .unwrap();
                let res = client.request(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
                res.into_body().collect().await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the window must still hold"
    );
    // Without a budget: 4 attempts each, 800. With it: the originals, 20 % more, and the
    // minimum of 1 retry per second over the 10 s window.
    let seen = app.count();
    assert!(seen >= sent, "{seen}");
    assert!(
        seen <= sent + sent / 5 + 10,
        "the backend saw {seen} attempts for {sent} requests"
    );
    let text = sidecar.metrics().await;
    assert!(
        metric(
            &text,
            "trellis_retry_budget_exhausted_total",
            &[("backend", "shop/web:80")]
        ) >= 1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_response_stream_is_cut_at_the_request_timeout() {
    let block = 93;
    let manifests = service(block, "web", &[11])
        + &route("web", "timeouts: {request: 1s, backendRequest: 300ms}");
    let (_dir, _controller, sidecar) = start(block, &manifests, &[]);
    let _app = App::start(SocketAddr::new(ip(block, 11), 8080), Duration::ZERO).await;
    let client = http1_client();

    // The headers and a first chunk come at once; then the body stalls until the deadline.
    let started = Instant::now();
    let res = client
        .request(request(&sidecar, "GET", "web", "/stall", empty()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let read = tokio::time::timeout(Duration::from_secs(10), res.into_body().collect()).await;
    let took = started.elapsed();
    let read = read.expect("the stalled response stream was not cut");
    assert!(
        read.is_err(),
        "the cut body must end with an error, not look complete"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "cut after {took:?}"
    );

    // backendRequest bounds one attempt, until the response headers.
    let started = Instant::now();
    let res = client
        .request(request(&sidecar, "GET", "web", "/slow", empty()))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(took < Duration::from_millis(900), "answered after {took:?}");

    let text = sidecar.metrics().await;
    for (timeout, want) in [("request", 1.0), ("backend_request", 1.0)] {
        assert_eq!(
            metric(&text, "trellis_timeouts_total", &[("timeout", timeout)]),
            want,
            "{text}"
        );
    }
}

/// Sends `n` GETs to `host`, 16 at a time.
async fn load(sidecar: &Sidecar, host: &str, n: usize) {
    let client = http1_client();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (client, uri, host) = (
            client.clone(),
            format!("http://{}/", sidecar.outbound()),
            host.to_string(),
        );
        tasks.spawn(async move {
            for _ in (worker..n).step_by(16) {
                let req = Request::get(&uri)
                    .header("host", &host)
                    .body(empty())
                    .unwrap();
                let res = client.request(req).await.unwrap();
                res.into_body().collect().await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_and_returns_after_it_recovers() {
    let block = 94;
    let flags = [
        "--failure-accrual-probation",
        "500ms",
        "--failure-accrual-max-probation",
        "2s",
    ];
    let (_dir, _controller, sidecar) = start(block, &service(block, "web", &[11, 12]), &flags);
    // A healthy endpoint that takes a little time, and one that fails at once: without
    // failure accrual the fast failures make it the cheaper endpoint.
    let good = App::start(
        SocketAddr::new(ip(block, 11), 8080),
        Duration::from_millis(5),
    )
    .await;
    let bad = App::start(SocketAddr::new(ip(block, 12), 8080), Duration::ZERO).await;
    bad.failing.store(true, Ordering::SeqCst);

    load(&sidecar, "web", 1600).await;
    let (g, b) = (good.count(), bad.count());
    assert!(
        b * 20 < g + b,
        "the failing endpoint got {b} of {} requests",
        g + b
    );
    let text = sidecar.metrics().await;
    assert!(
        metric(
            &text,
            "trellis_endpoint_ejections_total",
            &[("backend", "shop/web:80")]
        ) >= 1.0,
        "{text}"
    );

    // Recovered: after its probation it takes its share again.
    bad.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    load(&sidecar, "web", 1600).await;
    let (g2, b2) = (good.count() - g, bad.count() - b);
    assert!(
        b2 * 10 >= g2 + b2,
        "the recovered endpoint got {b2} of {} requests",
        g2 + b2
    );
}

/// A gRPC server whose calls fail, answering trailers-only `UNAVAILABLE`, except every third,
/// which answers one message and `grpc-status: 0` in trailers.
async fn flaky_grpc(addr: SocketAddr) -> Arc<AtomicUsize> {
    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    trellis_integration::h2c_server(addr, move |req| {
        let n = count.fetch_add(1, Ordering::SeqCst);
        async move {
            let _ = req.into_body().collect().await;
            let mut res = if n % 3 == 2 {
                Response::new(GrpcOk(0).boxed())
            } else {
                let mut res = Response::new(http_body_util::Empty::new().boxed());
                res.headers_mut()
                    .insert("grpc-status", "14".parse().unwrap());
                res
            };
            res.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            res
        }
    })
    .await;
    calls
}

/// One empty gRPC message, then `grpc-status: 0` trailers.
struct GrpcOk(u8);

impl hyper::body::Body for GrpcOk {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0 += 1;
        Poll::Ready(match self.0 {
            1 => Some(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\0")))),
            2 => {
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                Some(Ok(Frame::trailers(t)))
            }
            _ => None,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_route_retries_the_statuses_its_annotation_names() {
    let block = 95;
    let manifests = service(block, "inventory", &[11])
        + r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: inventory
  namespace: shop
  annotations:
    retry.trellis.dev/grpc: '{"codes": ["unavailable"], "attempts": 2, "backoff": "1ms"}'
spec:
  parentRefs: [{group: '', kind: Service, name: inventory, port: 80}]
  rules:
  - backendRefs: [{name: inventory, port: 80}]
"#;
    let (_dir, _controller, sidecar) = start(block, &manifests, &[]);
    let calls = flaky_grpc(SocketAddr::new(ip(block, 11), 8080)).await;
    let client = trellis_integration::http2_client();
    for i in 0..3 {
        let req = Request::post(format!("http://{}/shop.Inventory/Get", sidecar.outbound()))
            .header("host", "inventory")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body(&b"\0\0\0\0\0"[..]))
            .unwrap();
        let res = client.request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            res.headers().get("grpc-status").is_none(),
            "call {i}: {res:?}"
        );
        let collected = res.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        assert_eq!(trailers.get("grpc-status").unwrap(), "0", "call {i}");
    }
    // Two UNAVAILABLE answers retried per call.
    assert_eq!(calls.load(Ordering::SeqCst), 9);
    let text = sidecar.metrics().await;
    assert_eq!(
        metric(&text, "trellis_retries_total", &[("reason", "status")]),
        6.0,
        "{text}"
    );
    // Counted by the status of their trailers.
    assert_eq!(
        metric(
            &text,
            "trellis_requests_total",
            &[("route_kind", "GRPCRoute"), ("grpc_status", "0")]
        ),
        3.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_body_is_retried_whole_and_mirrored_once() {
    let block = 96;
    let manifests = service(block, "web", &[11])
        + &service(block, "sink", &[12])
        + &route(
            "web",
            "retry: {codes: [503], attempts: 2, backoff: 1ms}
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: sink, port: 80}}}]",
        );
    let (_dir, _controller, sidecar) = start(block, &manifests, &[]);
    let web = App::start(SocketAddr::new(ip(block, 11), 8080), Duration::ZERO).await;
    let sink = App::start(SocketAddr::new(ip(block, 12), 8080), Duration::ZERO).await;
    web.fail_next.store(1, Ordering::SeqCst);
    let payload = Bytes::from(vec![b'm'; 10 * 1024]);
    let res = http1_client()
        .request(request(&sidecar, "POST", "web", "/", body(payload)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "10240");
    // The backend got the whole body twice (503, then 200), the mirror once.
    let seen = web.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [("POST".to_string(), 10240), ("POST".to_string(), 10240)]
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while sink.count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mirrored = sink.seen.lock().unwrap().clone();
    assert_eq!(mirrored, [("POST".to_string(), 10240)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_fails_over_between_sidecars_when_a_peer_is_gone() {
    let block = 97;
    // No route: requests to `echo` go to its two meshed pods.
    let mut mesh = trellis_integration::mesh::Mesh::start(block, "").await;
    // The sidecar of echo-v2-0 is gone: its endpoint refuses the hop's connections.
    mesh.backends[1].process.kill();
    let client = http1_client();
    let payload = Bytes::from(vec![b'z'; 10 * 1024]);
    for i in 0..20 {
        let req = mesh
            .request("echo", "/")
            .method("POST")
            .body(body(payload.clone()))
            .unwrap();
        let (status, _, echoed) = trellis_integration::mesh::send(&client, req).await;
        assert_eq!(status, StatusCode::OK, "request {i}");
        let echoed = echoed.unwrap();
        assert_eq!((echoed.pod.as_str(), echoed.body_len), ("echo-v1-0", 10240));
    }
    assert_eq!(mesh.apps["echo-v1-0"].count(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_the_cap_is_not_retried_but_still_fails_over() {
    let block = 98;
    // .11 refuses connections; .12 answers, with a 503 when told.
    let manifests = service(block, "web", &[11, 12])
        + &route("web", "retry: {codes: [503], attempts: 2, backoff: 1ms}");
    // The default cap, `--retry-max-body-bytes` 65536.
    let (_dir, _controller, sidecar) = start(block, &manifests, &[]);
    let app = App::start(SocketAddr::new(ip(block, 12), 8080), Duration::ZERO).await;
    let client = http1_client();
    let big = Bytes::from(vec![b'b'; 100 * 1024]);
    // Past the cap, any body still goes elsewhere after a failed connect: none of it was sent.
    for i in 0..10 {
        let req = request(&sidecar, "POST", "web", "/", body(big.clone()));
        let res = client.request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "request {i}");
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "102400"
        );
    }
    // But an answer the route would retry is final: the body cannot be sent whole again.
    app.fail_next.store(1, Ordering::SeqCst);
    let before = app.count();
    let res = client
        .request(request(&sidecar, "POST", "web", "/", body(big.clone())))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.count() - before, 1);
    // Within the cap it is retried.
    app.fail_next.store(1, Ordering::SeqCst);
    let small = Bytes::from(vec![b's'; 60 * 1024]);
    let res = client
        .request(request(&sidecar, "POST", "web", "/", body(small)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(app.count() - before, 3);
    let seen = app.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|(_, len)| *len == 102_400 || *len == 61_440),
        "{seen:?}"
    );
}
