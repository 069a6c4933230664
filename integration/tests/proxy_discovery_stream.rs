//! The discovery client against a scripted in-process controller: snapshots split across
//! frames, unchanged and invalid snapshots, oversized lines, error answers, stream ends, and a
//! controller address given by name.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod proxy_discovery_support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_discovery_support::{client_with, eventually, metric};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use trellis_api::Identity;
use trellis_api::policy::{
    HttpMatch, ObjectRef, OutboundPolicy, PathMatch, Route, RouteKind, Routing, Rule, ServicePolicy,
};
use trellis_proxy::discovery::DiscoveryConfig;
use trellis_proxy::policy::PolicyKind;

type Body = BoxBody<Bytes, Infallible>;

/// A request the fake controller received, waiting for the test to answer it.
struct Asked {
    uri: String,
    answer: oneshot::Sender<Response<Body>>,
}

/// A controller whose answers the test writes; counts the TCP connections it accepts.
struct Fake {
    port: u16,
    connections: Arc<AtomicUsize>,
    asked: mpsc::UnboundedReceiver<Asked>,
}

impl Fake {
    async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let (tx, asked) = mpsc::unbounded_channel();
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let (answer, answered) = oneshot::channel();
                        let uri = req.uri().to_string();
                        let _ = tx.send(Asked { uri, answer });
                        Ok::<_, Infallible>(
                            answered
                                .await
                                .unwrap_or_else(|_| status(StatusCode::SERVICE_UNAVAILABLE, "")),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Fake {
            port,
            connections,
            asked,
        }
    }

    async fn next(&mut self) -> Asked {
        tokio::time::timeout(Duration::from_secs(5), self.asked.recv())
            .await
            .expect("the client did not ask again")
            .unwrap()
    }

    /// Answers the next request with an open stream the test writes to.
    async fn stream(&mut self) -> (String, mpsc::Sender<Bytes>) {
        let asked = self.next().await;
        let (response, tx) = streaming();
        let _ = asked.answer.send(response);
        (asked.uri, tx)
    }
}

/// A body that sends each chunk as one DATA frame and ends when the sender is dropped.
struct Chunks(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
    }
}

/// A 200 NDJSON answer whose lines the test sends on the returned channel.
fn streaming() -> (Response<Body>, mpsc::Sender<Bytes>) {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let response = Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Chunks(rx).boxed())
        .unwrap();
    (response, tx)
}

fn status(code: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = code;
    r
}

fn line(policy: &OutboundPolicy) -> Bytes {
    let mut v = serde_json::to_vec(policy).unwrap();
    v.push(b'\n');
    Bytes::from(v)
}

fn not_a_service(sa: Option<&str>) -> OutboundPolicy {
    OutboundPolicy::NotAService {
        identity: sa.map(|sa| Identity::new("cluster.local", "shop", sa)),
    }
}

/// A Service policy whose route has a path regex the proxy cannot compile.
fn uncompilable() -> OutboundPolicy {
    let id = ObjectRef {
        namespace: "shop".into(),
        name: "web".into(),
    };
    OutboundPolicy::Service(ServicePolicy {
        service: id.clone(),
        cluster_ip: "10.96.0.10".into(),
        port: 80,
        port_name: None,
        app_protocol: None,
        opaque: None,
        routing: Routing::Http {
            routes: vec![Route {
                kind: RouteKind::Http,
                id,
                rules: vec![Rule {
                    index: 0,
                    name: None,
                    matches: vec![HttpMatch {
                        path: PathMatch::Regex("(unclosed".into()),
                        ..HttpMatch::default()
                    }],
                    filters: vec![],
                    backends: vec![],
                    timeouts: Default::default(),
                    retry: None,
                }],
            }],
        },
    })
}

fn config(port: u16) -> DiscoveryConfig {
    // By name: resolved on each connect, every address tried in turn.
    let mut cfg =
        DiscoveryConfig::new(format!("localhost:{port}"), "shop", Duration::from_secs(60));
    cfg.backoff_min = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(100);
    cfg.max_line = 4096;
    cfg
}

const APPLIED: &str = r#"trellis_discovery_updates_total{result="applied"}"#;
const UNCHANGED: &str = r#"trellis_discovery_updates_total{result="unchanged"}"#;
const INVALID: &str = r#"trellis_discovery_updates_total{result="invalid"}"#;

#[tokio::test]
async fn bad_snapshots_keep_the_last_good_policy_and_broken_streams_are_reopened() {
    let mut fake = Fake::start().await;
    let (discovery, registry) = client_with(config(fake.port));
    let mut sub = discovery.subscribe(&"10.0.0.1:80".parse().unwrap());

    let (uri, tx) = fake.stream().await;
    assert_eq!(
        uri,
        format!(
            "http://localhost:{}/v1/outbound?namespace=shop&target=10.0.0.1:80",
            fake.port
        )
    );
    // A snapshot cut anywhere across frames.
    let first = line(&not_a_service(Some("a")));
    for chunk in [&first[..3], &first[3..10], &first[10..]] {
        tx.send(Bytes::copy_from_slice(chunk)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let good = sub.wait(Duration::from_secs(2)).await.expect("no policy");
    assert!(matches!(
        &good.kind,
        PolicyKind::Forward { identity: Some(_) }
    ));
    assert_eq!(metric(&registry, APPLIED), Some(1.0));

    // The same snapshot again: counted, not republished.
    tx.send(first.clone()).await.unwrap();
    eventually("unchanged", Duration::from_secs(2), || {
        metric(&registry, UNCHANGED) == Some(1.0)
    })
    .await;
    // Not JSON, then JSON the proxy cannot compile: both counted, the good policy stays.
    tx.send(Bytes::from_static(b"{\"type\": \"garbage\"\n"))
        .await
        .unwrap();
    tx.send(line(&uncompilable())).await.unwrap();
    eventually("two invalid", Duration::from_secs(2), || {
        metric(&registry, INVALID) == Some(2.0)
    })
    .await;
    assert!(Arc::ptr_eq(&sub.current().unwrap(), &good));

    // A line over the cap drops the stream; the client asks again on the same connection.
    tx.send(Bytes::from(vec![b' '; 2000])).await.unwrap();
    tx.send(Bytes::from(vec![b'x'; 3000])).await.unwrap();
    let retry = fake.next().await;
    assert_eq!(metric(&registry, INVALID), Some(3.0));
    assert!(Arc::ptr_eq(&sub.current().unwrap(), &good));

    // A server error is retried too.
    retry
        .answer
        .send(status(StatusCode::SERVICE_UNAVAILABLE, "busy"))
        .unwrap();
    let (_, tx) = fake.stream().await;
    tx.send(line(&not_a_service(Some("b")))).await.unwrap();
    sub.changed().await;
    let second = sub.current().unwrap();
    assert!(
        matches!(&second.snapshot, OutboundPolicy::NotAService { identity: Some(id) } if id.to_string().ends_with("/sa/b"))
    );
    assert_eq!(metric(&registry, APPLIED), Some(2.0));

    // The controller ends the stream: the policy stays and the client asks again.
    drop(tx);
    let (_, _tx) = fake.stream().await;
    assert!(Arc::ptr_eq(&sub.current().unwrap(), &second));
    assert_eq!(fake.connections.load(Ordering::SeqCst), 1);
    assert_eq!(
        metric(&registry, "trellis_discovery_reconnects_total"),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_refused_destination_is_asked_about_again_slowly() {
    let mut fake = Fake::start().await;
    let mut cfg = config(fake.port);
    cfg.rejected_retry = Duration::from_millis(600);
    let (discovery, _registry) = client_with(cfg);
    let mut sub = discovery.subscribe(&"web.shop:80".parse().unwrap());

    let asked = fake.next().await;
    let refused = Instant::now();
    let body = r#"{"error":"no such namespace"}"#;
    asked
        .answer
        .send(status(StatusCode::BAD_REQUEST, body))
        .unwrap();
    let again = fake.next().await;
    let waited = refused.elapsed();
    // Half to all of `rejected_retry`, not the fast backoff of a broken stream.
    assert!(
        waited >= Duration::from_millis(250),
        "asked again after {waited:?}"
    );
    assert!(sub.wait(Duration::from_millis(10)).await.is_none());

    let (response, tx) = streaming();
    again.answer.send(response).unwrap();
    tx.send(line(&not_a_service(None))).await.unwrap();
    assert!(sub.wait(Duration::from_secs(2)).await.is_some());
}
