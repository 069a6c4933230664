//! The webhook under a flood of oversized reviews, over real HTTPS. Its own test binary: the
//! memory it measures is this process's resident set, and nothing else runs in it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use trellis_injector::cert::{self, Resolver, ServingCert};
use trellis_injector::config::{ReviewLimits, SidecarMode};
use trellis_injector::metrics::Metrics;
use trellis_injector::webhook::{self, Webhook};

use support::{read_json, settings};

const SERVER_NAME: &str = "trellis-injector.trellis-system.svc";

/// The tests of this file run one at a time: the flood test measures the whole process.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const MIB: usize = 1024 * 1024;

/// A body of `left` bytes sent in 64 KiB frames of one shared buffer, with no declared length:
/// the injector must read it to learn its size, while the client holds almost nothing. With a
/// `pause`, the sender stops for that long once only `pause_at` bytes are left, as a slow
/// client does, keeping what it sent so far buffered in the server.
struct Flood {
    chunk: Bytes,
    left: usize,
    pause_at: usize,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Flood {
    fn new(chunk: Bytes, len: usize) -> Self {
        Flood {
            chunk,
            left: len,
            pause_at: 0,
            pause: None,
        }
    }

    fn pausing(mut self, left: usize, pause: Duration) -> Self {
        self.pause_at = left;
        self.pause = Some(Box::pin(tokio::time::sleep(pause)));
        self
    }
}

impl Body for Flood {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        if self.left <= self.pause_at
            && let Some(pause) = self.pause.as_mut()
        {
            std::task::ready!(pause.as_mut().poll(cx));
            self.pause = None;
        }
        let n = self.left.min(self.chunk.len());
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
}

async fn start(limits: ReviewLimits) -> (SocketAddr, ServingCert, Metrics) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let serving = cert::generate(
        &cert::dns_names("trellis-injector", "trellis-system"),
        SystemTime::now(),
        None,
    )
    .unwrap();
    let resolver = Resolver::new(cert::certified_key(&serving.cert_pem, &serving.key_pem).unwrap());
    let tls = Arc::new(cert::server_config(resolver).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Metrics::new();
    let hook = Arc::new(Webhook::new(
        settings(SidecarMode::Native),
        metrics.clone(),
        limits,
    ));
    tokio::spawn(webhook::serve(listener, tls, hook, std::future::pending()));
    (addr, serving, metrics)
}

/// One POST over a fresh TLS connection; HTTP/2 when `h2`.
async fn send<B>(addr: SocketAddr, ca_pem: &str, h2: bool, body: B) -> StatusCode
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::error::Error + Send + Sync,
{
    try_send(addr, ca_pem, h2, body)
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"))
}

/// [`send`], where the connection may end before the answer is read.
async fn try_send<B>(
    addr: SocketAddr,
    ca_pem: &str,
    h2: bool,
    body: B,
) -> Result<StatusCode, String>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::error::Error + Send + Sync,
{
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await
        .unwrap();
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("https://{SERVER_NAME}/inject"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let io = TokioIo::new(tls);
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await
    };
    let response = response.map_err(|e| e.to_string())?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    Ok(status)
}

fn text_of(metrics: &Metrics) -> String {
    metrics.encode()
}

/// This process's resident set, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_4_mib_reviews_leave_the_injector_answering() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let limits = ReviewLimits::default();
    let (addr, serving, metrics) = start(limits).await;
    let review = Bytes::from(serde_json::to_vec(&read_json("reviews/plain-pod.json")).unwrap());
    // Warm up (TLS, allocator, the first review) before the baseline.
    let warm = send(addr, &serving.ca_pem, false, Full::new(review.clone())).await;
    assert_eq!(warm, StatusCode::OK);
    let baseline = rss();

    // Sample the resident set while the flood runs.
    let peak = Arc::new(AtomicU64::new(baseline));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    // Each sends 2.9 MiB at once (under the cap), waits two seconds as a slow client, then
    // the rest: without a bound on the reviews read at once, the injector would hold all 50
    // bodies together.
    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
    let flood: Vec<_> = (0..50)
        .map(|i| {
            let body = Flood::new(chunk.clone(), 4 * MIB)
                .pausing(4 * MIB - 2900 * 1024, Duration::from_secs(2));
            let ca = serving.ca_pem.clone();
            tokio::spawn(async move { try_send(addr, &ca, i % 2 == 0, body).await })
        })
        .collect();
    // A normal review in the middle of the flood, declared as the API server declares it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let status = send(addr, &serving.ca_pem, true, Full::new(review.clone())).await;
    let normal = started.elapsed();
    assert_eq!(status, StatusCode::OK);

    let mut statuses = Vec::new();
    for task in flood {
        statuses.push(task.await.unwrap());
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    // Every flood request was refused, too large or after waiting its turn in vain: the count
    // of each answer is in the metrics. An
    // HTTP/1.1 client still sending when the answer and the close come sees a write error
    // instead of the status, as it would from any server that refuses a body early.
    let count = |reason: &str| -> usize {
        let prefix = format!(
            "trellis_injector_admission_requests_total{{outcome=\"error\",reason=\"{reason}\"}} "
        );
        text_of(&metrics)
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |n| n.parse().unwrap())
    };
    let (too_large, busy) = (count("too_large"), count("overloaded"));
    eprintln!(
        "normal review answered in {normal:?} during the flood; flood: {too_large} × 413, \
         {busy} × 503 ({} read by the client, the others cut off mid-body); resident set grew \
         by at most {:.1} MiB",
        statuses.iter().filter(|s| s.is_ok()).count(),
        growth as f64 / MIB as f64
    );
    assert_eq!(too_large + busy, 50, "{statuses:?}");
    for status in statuses.iter().flatten() {
        assert!(
            [
                StatusCode::PAYLOAD_TOO_LARGE,
                StatusCode::SERVICE_UNAVAILABLE
            ]
            .contains(status),
            "{status}"
        );
    }
    assert!(normal < Duration::from_secs(1), "{normal:?}");
    // The documented bound: 4 reviews × (3 MiB body + parse) at once, plus what 25 waiting
    // HTTP/2 connections may send ahead (1 MiB window each) and TLS buffers.
    assert!(growth < 96 * MIB as u64, "grew by {growth} bytes");

    // Still answering after the flood.
    let after = send(addr, &serving.ca_pem, false, Full::new(review)).await;
    assert_eq!(after, StatusCode::OK);
}

/// A body that sends one byte and then nothing, declaring `declared` bytes when set (hyper
/// writes the Content-Length from an exact size hint).
struct Stall {
    sent: bool,
    declared: Option<u64>,
}

impl Body for Stall {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.sent {
            return Poll::Pending;
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{")))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self.declared {
            Some(n) => hyper::body::SizeHint::with_exact(n),
            None => hyper::body::SizeHint::default(),
        }
    }
}

#[tokio::test]
async fn stalled_clients_do_not_hold_up_reviews() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (addr, serving, metrics) = start(ReviewLimits::default()).await;
    // 40 clients start a body and stop after its first byte: half declare a pod-sized body,
    // half declare none. They hold one byte of buffer each, not a turn.
    let stalled: Vec<_> = (0..40u64)
        .map(|i| {
            let ca = serving.ca_pem.clone();
            let body = Stall {
                sent: false,
                declared: (i % 2 == 0).then_some(20_000),
            };
            tokio::spawn(async move { try_send(addr, &ca, i % 4 < 2, body).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let review = Bytes::from(serde_json::to_vec(&read_json("reviews/plain-pod.json")).unwrap());
    for h2 in [false, true] {
        let started = Instant::now();
        let status = send(addr, &serving.ca_pem, h2, Full::new(review.clone())).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    // A large body too: the stalled ones hold 20 bytes of its budget.
    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
    let status = send(addr, &serving.ca_pem, true, Flood::new(chunk, 2 * MIB)).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "read whole, then found not to be JSON"
    );
    for task in &stalled {
        assert!(
            !task.is_finished(),
            "a stalled client was answered before its deadline"
        );
    }
    assert!(!metrics.encode().contains("reason=\"overloaded\""));
    for task in stalled {
        task.abort();
    }
}

#[tokio::test]
async fn a_review_that_waits_too_long_for_room_gets_503() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let limits = ReviewLimits {
        max_buffered_bytes: 3 * MIB,
        max_concurrent: 4,
        queue_timeout: Duration::from_millis(200),
    };
    let (addr, serving, metrics) = start(limits).await;
    // A slow client sends the whole 3 MiB budget and then waits.
    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
    let holder = Flood::new(chunk.clone(), 4 * MIB).pausing(MIB, Duration::from_secs(30));
    let ca = serving.ca_pem.clone();
    let holder = tokio::spawn(async move { try_send(addr, &ca, true, holder).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another body without a declared length finds no room for its first chunk.
    let started = Instant::now();
    let status = send(addr, &serving.ca_pem, false, Flood::new(chunk, 256 * 1024)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() >= Duration::from_millis(200));
    let text = metrics.encode();
    assert!(
        text.contains("outcome=\"error\",reason=\"overloaded\"} 1"),
        "{text}"
    );
    // A pod's review has a budget of its own and is answered meanwhile.
    let review = serde_json::to_vec(&read_json("reviews/plain-pod.json")).unwrap();
    let status = send(addr, &serving.ca_pem, true, Full::new(Bytes::from(review))).await;
    assert_eq!(status, StatusCode::OK);
    holder.abort();
}
