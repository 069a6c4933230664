//! The HTTPS server the API server calls: `POST /inject` with an AdmissionReview.
//!
//! HTTP/1.1 and HTTP/2 on one port. The webhook's `failurePolicy` is `Fail`, so a few crafted
//! requests that exhausted the injector's memory would block every pod creation; each request
//! is bounded instead:
//!
//! - a body larger than [`MAX_BODY_BYTES`] is answered 413, from its Content-Length without
//!   reading it, or as soon as the streamed bytes pass the cap;
//! - the bodies being read share a buffer budget of [`ReviewLimits::max_buffered_bytes`]: each
//!   chunk takes its bytes from it as it arrives and the review gives them back when answered.
//!   A body's first chunk that finds no room waits up to [`ReviewLimits::queue_timeout`]; a
//!   later one does not wait (a body never holds room while waiting for more); either way the
//!   review then gets 503. A client holds only what it really sent, so stalled connections cost nothing
//!   and a flood must send (and keep sending) the whole budget. Bodies declared at most
//!   [`SMALL_BODY_BYTES`] (every real pod) have a budget of their own of the same size, so a
//!   flood of large or undeclared bodies does not delay them;
//! - at most [`ReviewLimits::max_concurrent`] bodies are parsed and answered at once (that work
//!   is CPU-bound and takes milliseconds), waiting likewise;
//! - TLS handshake and request head within 10 s, body within [`BODY_TIMEOUT`].
//!
//! So the bodies the injector holds at any time are at most twice `max_buffered_bytes`, plus,
//! per HTTP/2 connection, what its flow-control window lets a client send before it is read.
//! On shutdown the server stops accepting and lets open requests finish.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::admission::{self, MAX_BODY_BYTES};
use crate::config::{ReviewLimits, Settings};
use crate::metrics::Metrics;

/// The path the MutatingWebhookConfiguration's `clientConfig.service.path` points at.
pub const PATH: &str = "/inject";
/// The API server gives up on a webhook after its timeoutSeconds (10 s by default, 30 s at
/// most), and sends the body at once: a body still arriving after this is not from it.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What every request needs.
#[derive(Debug)]
pub struct Webhook {
    /// Replaced whole when the trust anchors file changes; a review takes it once.
    settings: RwLock<Arc<Settings>>,
    pub metrics: Metrics,
    limits: ReviewLimits,
    /// Buffer budgets in bytes: one for bodies declared no larger than [`SMALL_BODY_BYTES`]
    /// (every real pod), one for the rest, so a flood of large or undeclared bodies cannot
    /// starve real reviews.
    small: Semaphore,
    large: Semaphore,
    /// Turns to parse and answer.
    parses: Semaphore,
}

/// Bodies declared at most this large use the small budget. A pod's review is a few KiB to a
/// few tens of KiB; hyper refuses a body longer than its declared length.
pub const SMALL_BODY_BYTES: usize = 256 * 1024;

impl Webhook {
    pub fn new(settings: Settings, metrics: Metrics, limits: ReviewLimits) -> Self {
        // Room for at least one body of the largest size, or it could never be read.
        let budget = limits.max_buffered_bytes.max(MAX_BODY_BYTES);
        Webhook {
            settings: RwLock::new(Arc::new(settings)),
            metrics,
            small: Semaphore::new(budget),
            large: Semaphore::new(budget),
            parses: Semaphore::new(limits.max_concurrent.max(1)),
            limits,
        }
    }
}

impl Webhook {
    /// The settings new pods get.
    pub fn settings(&self) -> Arc<Settings> {
        // A poisoned lock still holds a whole Arc.
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Gives pods created from now on the trust anchors `pem`; returns whether they changed.
    pub fn set_trust_anchors(&self, pem: &str) -> bool {
        let mut settings = self.settings.write().unwrap_or_else(|p| p.into_inner());
        if settings.trust_anchors_pem == pem {
            return false;
        }
        let mut next = (**settings).clone();
        next.trust_anchors_pem = pem.to_string();
        *settings = Arc::new(next);
        true
    }
}

/// Why a body could not be read.
enum BodyError {
    TooLarge,
    Unreadable(String),
    /// The budget had no room for the next chunk within the queue timeout.
    NoRoom,
}

/// Reads a body of at most [`MAX_BODY_BYTES`], refusing it as soon as it grows past the cap.
/// Every chunk takes its bytes from `budget` before it is kept; the returned permit holds
/// them until the review is answered. The buffer is reserved once from the declared length
/// when there is one (reserved pages cost nothing until written).
async fn read_body<'a, B>(
    body: B,
    declared: Option<usize>,
    budget: &'a Semaphore,
    wait: Duration,
) -> Result<(Vec<u8>, Option<SemaphorePermit<'a>>), BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut buffer = Vec::with_capacity(declared.unwrap_or(0).min(MAX_BODY_BYTES));
    let mut held: Option<SemaphorePermit<'a>> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Unreadable(e.to_string()))?;
        if let Ok(mut data) = frame.into_data() {
            let n = data.remaining();
            if buffer.len() + n > MAX_BODY_BYTES {
                return Err(BodyError::TooLarge);
            }
            // n <= MAX_BODY_BYTES, which fits in a u32.
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            match held.as_mut() {
                // Only a body that holds nothing yet waits for room (in arrival order). One
                // that already holds some never waits for more: bodies holding room while
                // waiting for each other's would stall until every one timed out.
                None => match tokio::time::timeout(wait, budget.acquire_many(n)).await {
                    Ok(Ok(permit)) => held = Some(permit),
                    // The semaphore is never closed; only the wait can end this way.
                    Ok(Err(_)) | Err(_) => return Err(BodyError::NoRoom),
                },
                Some(held) => match budget.try_acquire_many(n) {
                    Ok(permit) => held.merge(permit),
                    Err(_) => return Err(BodyError::NoRoom),
                },
            }
            while data.has_remaining() {
                let chunk = data.chunk();
                buffer.extend_from_slice(chunk);
                let n = chunk.len();
                data.advance(n);
            }
        }
    }
    Ok((buffer, held))
}

/// Serves until `shutdown` resolves, then drains open connections.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    webhook: Arc<Webhook>,
    shutdown: impl Future<Output = ()>,
) {
    let handler = move |_peer, request| {
        let webhook = webhook.clone();
        async move { handle(&webhook, request).await }
    };
    trellis_admin::https::serve("webhook", listener, tls, handler, shutdown).await;
}

/// A 503: the API server fails this pod creation and its creator retries.
fn busy(why: String) -> admission::Reply {
    admission::error(
        StatusCode::SERVICE_UNAVAILABLE,
        String::new(),
        format!("trellis-injector is busy: {why}; the pod's creation is retried"),
    )
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json(reply: admission::Reply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = reply.status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Answers one HTTP request; never fails, every problem is an HTTP answer.
pub async fn handle<B>(webhook: &Webhook, request: Request<B>) -> Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    if request.uri().path() != PATH {
        return text(
            StatusCode::NOT_FOUND,
            &format!("not found: AdmissionReviews go to POST {PATH}"),
        );
    }
    if request.method() != Method::POST {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use POST");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return response;
    }
    let start = Instant::now();
    let too_large = || {
        admission::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            String::new(),
            format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let reply = if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        too_large()
    } else {
        let budget = match declared {
            Some(n) if n <= SMALL_BODY_BYTES => &webhook.small,
            _ => &webhook.large,
        };
        let limits = &webhook.limits;
        let body = read_body(request.into_body(), declared, budget, limits.queue_timeout);
        match tokio::time::timeout(BODY_TIMEOUT, body).await {
            Ok(Ok((body, _room))) => {
                match tokio::time::timeout(limits.queue_timeout, webhook.parses.acquire()).await {
                    Ok(Ok(_turn)) => admission::review(&body, &webhook.settings()),
                    Ok(Err(_)) | Err(_) => busy(format!(
                        "{} reviews are being answered and this one waited {:?} for its turn",
                        limits.max_concurrent, limits.queue_timeout
                    )),
                }
            }
            Ok(Err(BodyError::TooLarge)) => too_large(),
            Ok(Err(BodyError::Unreadable(e))) => admission::error(
                StatusCode::BAD_REQUEST,
                String::new(),
                format!("cannot read the request body: {e}"),
            ),
            Ok(Err(BodyError::NoRoom)) => busy(format!(
                "the request bodies being read fill its {} MiB buffer and this one waited {:?} \
                 for room",
                limits.max_buffered_bytes.max(MAX_BODY_BYTES) / (1024 * 1024),
                limits.queue_timeout
            )),
            Err(_) => admission::error(
                StatusCode::REQUEST_TIMEOUT,
                String::new(),
                format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
            ),
        }
    };
    webhook.metrics.admission(reply.outcome, start.elapsed());
    log(&reply);
    json(reply)
}

fn log(reply: &admission::Reply) {
    let (uid, detail) = (&reply.uid, &reply.detail);
    match reply.outcome.outcome {
        "injected" => tracing::info!(uid, "{detail}"),
        "skipped" => tracing::debug!(uid, "{detail}"),
        _ => tracing::warn!(uid, "{detail}"),
    }
}
