//! The discovery protocol over real loopback sockets with real hyper clients, against a fake
//! model so that these tests do not depend on route compilation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use trellis_api::Identity;
use trellis_api::discovery::{ErrorBody, NDJSON, Target};
use trellis_api::policy::OutboundPolicy;
use trellis_controller::discovery::{
    DiscoveryMetrics, Limits, Options, Policies, Refused, serve_with_options,
};

/// Answers `NotAService` for every target, with the identity listed for it, if any: enough to
/// tell snapshots apart.
#[derive(Default)]
struct Fake(HashMap<String, String>);

impl Fake {
    fn with(entries: &[(&str, &str)]) -> Arc<Self> {
        Arc::new(Fake(
            entries
                .iter()
                .map(|(t, sa)| (t.to_string(), sa.to_string()))
                .collect(),
        ))
    }
}

impl Policies for Fake {
    fn outbound(&self, ns: &str, target: &Target) -> OutboundPolicy {
        let identity = self
            .0
            .get(&target.to_string())
            .map(|sa| Identity::new("cluster.local", ns, sa));
        OutboundPolicy::NotAService { identity }
    }
}

fn not_a_service(ns: &str, sa: Option<&str>) -> OutboundPolicy {
    OutboundPolicy::NotAService {
        identity: sa.map(|sa| Identity::new("cluster.local", ns, sa)),
    }
}

struct Server {
    addr: SocketAddr,
    index: watch::Sender<Arc<Fake>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    metrics: DiscoveryMetrics,
}

async fn start(fake: Arc<Fake>) -> Server {
    start_with(fake, Limits::default()).await
}

async fn start_with(fake: Arc<Fake>, limits: Limits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (index, rx) = watch::channel(fake);
    let (shutdown, stop) = oneshot::channel::<()>();
    let metrics = DiscoveryMetrics::default();
    let options = Options {
        limits,
        metrics: metrics.clone(),
        ..Options::default()
    };
    let task = tokio::spawn(serve_with_options(listener, rx, None, options, async {
        let _ = stop.await;
    }));
    Server {
        addr,
        index,
        shutdown: Some(shutdown),
        task,
        metrics,
    }
}

async fn h2(addr: SocketAddr) -> http2::SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    // HTTP/2 requests carry an absolute URI (scheme and authority become pseudo-headers).
    Request::get(format!("http://controller{path}"))
        .body(Empty::new())
        .unwrap()
}

/// Reads a newline-delimited body line by line.
struct Lines {
    body: Incoming,
    buf: Vec<u8>,
}

impl Lines {
    fn new(body: Incoming) -> Self {
        Lines {
            body,
            buf: Vec::new(),
        }
    }

    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8(line).unwrap());
            }
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Err(e) => panic!("stream failed: {e}"),
            }
        }
    }

    async fn policy(&mut self) -> OutboundPolicy {
        let line = tokio::time::timeout(Duration::from_secs(2), self.next())
            .await
            .expect("no snapshot within 2s")
            .expect("stream ended");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    async fn nothing_for(&mut self, wait: Duration) {
        if let Ok(line) = tokio::time::timeout(wait, self.next()).await {
            panic!("expected no snapshot, got {line:?}");
        }
    }
}

async fn subscribe(send: &mut http2::SendRequest<Empty<Bytes>>, ns: &str, target: &str) -> Lines {
    let resp = send
        .send_request(get(&format!("/v1/outbound?namespace={ns}&target={target}")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], NDJSON);
    Lines::new(resp.into_body())
}

/// Waits until `cond` holds, polling: for effects that have no event to wait on.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn first_snapshot_then_a_line_per_change_of_this_streams_policy() {
    let server = start(Fake::with(&[])).await;
    let mut send = h2(server.addr).await;
    let mut lines = subscribe(&mut send, "shop", "10.0.0.1%3A80").await;
    assert_eq!(lines.policy().await, not_a_service("shop", None));

    // Another destination changed: the stream is not woken, and sends nothing.
    server
        .index
        .send_replace(Fake::with(&[("10.0.0.2:80", "other")]));
    lines.nothing_for(Duration::from_millis(200)).await;
    assert_eq!(server.metrics.updates_sent(), 0);

    server
        .index
        .send_replace(Fake::with(&[("10.0.0.1:80", "web")]));
    assert_eq!(lines.policy().await, not_a_service("shop", Some("web")));
    assert_eq!(server.metrics.updates_sent(), 1);

    // A second subscription on the same connection starts from the current state.
    let mut other = subscribe(&mut send, "shop", "10.0.0.1:80").await;
    assert_eq!(other.policy().await, not_a_service("shop", Some("web")));
}

#[tokio::test]
async fn many_streams_share_one_connection() {
    let server = start(Fake::with(&[])).await;
    let mut send = h2(server.addr).await;
    // One round trip first, so that the client knows the server's stream limit.
    let mut first = subscribe(&mut send, "shop", "10.0.0.1:80").await;
    first.policy().await;
    let streams = (0..300).map(|i| {
        let mut send = send.clone();
        async move {
            let mut lines = subscribe(
                &mut send,
                "shop",
                &format!("10.0.1.{}:{}", i % 250, 1000 + i),
            )
            .await;
            lines.policy().await;
            lines
        }
    });
    let mut all = Vec::new();
    for stream in streams {
        all.push(tokio::spawn(stream));
    }
    // Keep every stream open until all have their first snapshot.
    let mut open = Vec::new();
    for stream in all {
        let lines = tokio::time::timeout(Duration::from_secs(5), stream).await;
        open.push(
            lines
                .expect("a stream got no snapshot: stream limit too low?")
                .unwrap(),
        );
    }
    assert_eq!(open.len(), 300);
}

#[tokio::test]
async fn invalid_requests_get_json_errors() {
    let server = start(Fake::with(&[])).await;
    let mut send = h2(server.addr).await;
    let cases = [
        (
            Method::GET,
            "/v1/outbound?namespace=shop",
            StatusCode::BAD_REQUEST,
            "missing parameter \"target\"",
        ),
        (
            Method::GET,
            "/v1/outbound?namespace=shop&target=web",
            StatusCode::BAD_REQUEST,
            "has no port",
        ),
        (
            Method::GET,
            "/v1/outbound?target=web:80",
            StatusCode::BAD_REQUEST,
            "missing parameter \"namespace\"",
        ),
        (
            Method::GET,
            "/v2/outbound",
            StatusCode::NOT_FOUND,
            "no such path",
        ),
        (
            Method::POST,
            "/v1/outbound?namespace=shop&target=web:80",
            StatusCode::METHOD_NOT_ALLOWED,
            "only answers GET",
        ),
    ];
    for (method, path, status, message) in cases {
        let mut req = get(path);
        *req.method_mut() = method.clone();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), status, "{method} {path}");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert_eq!(resp.headers()[header::ALLOW], "GET");
        }
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert!(
            body.error.contains(message),
            "{method} {path}: {}",
            body.error
        );
    }
}

#[tokio::test]
async fn http1_clients_are_served_on_the_same_port() {
    let server = start(Fake::with(&[("web.shop:80", "web")])).await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (mut send, conn) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/v1/outbound?namespace=shop&target=web.shop:80")
        .header(header::HOST, "controller")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut lines = Lines::new(resp.into_body());
    assert_eq!(lines.policy().await, not_a_service("shop", Some("web")));
    server.index.send_replace(Fake::with(&[]));
    assert_eq!(lines.policy().await, not_a_service("shop", None));
}

#[tokio::test]
async fn a_stream_ends_when_its_client_goes_away() {
    let server = start(Fake::with(&[])).await;
    let streams = || server.metrics.open_streams();
    let mut send = h2(server.addr).await;
    let mut lines = subscribe(&mut send, "shop", "10.0.0.1:80").await;
    lines.policy().await;
    let mut again = subscribe(&mut send, "shop", "10.0.0.1:80").await;
    again.policy().await;
    assert_eq!(streams(), 2);

    drop(lines);
    eventually("the stream task to end", || streams() == 1).await;
    drop(send);
    drop(again);
    eventually("the other stream to end", || streams() == 0).await;
}

#[tokio::test]
async fn streams_over_a_cap_are_refused_and_counted() {
    let limits = Limits {
        total: 3,
        per_client: 2,
    };
    let server = start_with(Fake::with(&[]), limits).await;
    let ask = |send: &mut http2::SendRequest<Empty<Bytes>>, target: &str| {
        let req = get(&format!("/v1/outbound?namespace=shop&target={target}"));
        let fut = send.send_request(req);
        async move { fut.await.unwrap() }
    };
    // Two clients: 127.0.0.1, and 127.0.0.2 (the source address picks the client).
    let mut a = h2(server.addr).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let (mut b, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);

    let mut open = vec![
        subscribe(&mut a, "shop", "10.0.0.1:80").await,
        subscribe(&mut a, "shop", "10.0.0.2:80").await,
    ];
    let refused = ask(&mut a, "10.0.0.3:80").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()[header::RETRY_AFTER], "5");
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    let body: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body.error,
        "127.0.0.1 has 2 discovery streams open, the most one client may have \
         (--max-streams-per-client)"
    );
    open.push(subscribe(&mut b, "shop", "10.0.0.1:80").await);
    assert_eq!(
        ask(&mut b, "10.0.0.4:80").await.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the total cap"
    );
    assert_eq!(server.metrics.refused(Refused::PerClient), 1);
    assert_eq!(server.metrics.refused(Refused::Total), 1);

    // A stream that ends makes room.
    drop(open.remove(0));
    eventually("the stream to end", || server.metrics.open_streams() == 2).await;
    let mut lines = subscribe(&mut a, "shop", "10.0.0.3:80").await;
    assert_eq!(lines.policy().await, not_a_service("shop", None));
}

#[tokio::test]
async fn shutdown_ends_streams_and_stops_accepting() {
    let mut server = start(Fake::with(&[])).await;
    let mut send = h2(server.addr).await;
    let mut lines = subscribe(&mut send, "shop", "10.0.0.1:80").await;
    lines.policy().await;

    server.shutdown.take().unwrap().send(()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(2), lines.next()).await;
    assert_eq!(ended.expect("stream still open after shutdown"), None);
    tokio::time::timeout(Duration::from_secs(2), server.task)
        .await
        .expect("serve did not return")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "still accepting"
    );
}

#[tokio::test]
async fn a_stream_outlives_the_index_writer() {
    let server = start(Fake::with(&[])).await;
    let mut send = h2(server.addr).await;
    let mut lines = subscribe(&mut send, "shop", "10.0.0.1:80").await;
    lines.policy().await;
    // Ending streams here would only make every proxy reconnect to the same answer.
    drop(server.index);
    lines.nothing_for(Duration::from_millis(200)).await;
    let mut again = subscribe(&mut send, "shop", "10.0.0.1:80").await;
    assert_eq!(again.policy().await, not_a_service("shop", None));
}
