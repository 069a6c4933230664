//! The HTTPS server the API server calls: `POST /inject` with an AdmissionReview.
//!
//! HTTP/1.1 and HTTP/2 on one port. The webhook's `failurePolicy` is `Fail`, so a few crafted
//! requests that exhausted the injector's memory would block every pod creation; each request
//! is bounded instead:
//!
//! - a body larger than [`MAX_BODY_BYTES`] is answered 413, from its Content-Length without
//!   reading it, or as soon as the streamed bytes pass the cap;
//! - at most [`ReviewLimits::max_concurrent`] reviews are read and answered at once; a request
//!   beyond that waits up to [`ReviewLimits::queue_timeout`] for its turn, unread, then gets 503.
//!   Bodies declared at most [`SMALL_BODY_BYTES`] (every real pod) have a lane of their own of
//!   the same size, so a flood of large bodies does not delay them;
//! - TLS handshake and request head within 10 s, body within [`BODY_TIMEOUT`].
//!
//! So the bodies the injector holds at any time are at most `max_concurrent` × (3 MiB + 256 KiB)
//! (plus,
//! per waiting HTTP/2 connection, what its flow-control window lets the client send ahead). On
//! shutdown the server stops accepting and lets open requests finish.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

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
    pub settings: Settings,
    pub metrics: Metrics,
    limits: ReviewLimits,
    /// Turns for reviews declared no larger than [`SMALL_BODY_BYTES`]: every real pod. A flood
    /// of large or undeclared bodies waits on the other lane and cannot starve them.
    small: Semaphore,
    large: Semaphore,
}

/// Bodies declared at most this large take the small lane. A pod's review is a few KiB to a
/// few tens of KiB; hyper refuses a body longer than its declared length.
pub const SMALL_BODY_BYTES: usize = 256 * 1024;

impl Webhook {
    pub fn new(settings: Settings, metrics: Metrics, limits: ReviewLimits) -> Self {
        Webhook {
            settings,
            metrics,
            small: Semaphore::new(limits.max_concurrent.max(1)),
            large: Semaphore::new(limits.max_concurrent.max(1)),
            limits,
        }
    }
}

/// Why a body could not be read.
enum BodyError {
    TooLarge,
    Unreadable(String),
}

/// Reads a body of at most [`MAX_BODY_BYTES`], refusing it as soon as it grows past the cap.
/// The buffer is reserved once from the declared length when there is one.
async fn read_body<B>(body: B, declared: Option<usize>) -> Result<Vec<u8>, BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut buffer = Vec::with_capacity(declared.unwrap_or(0).min(MAX_BODY_BYTES));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Unreadable(e.to_string()))?;
        if let Ok(mut data) = frame.into_data() {
            if buffer.len() + data.remaining() > MAX_BODY_BYTES {
                return Err(BodyError::TooLarge);
            }
            while data.has_remaining() {
                let chunk = data.chunk();
                buffer.extend_from_slice(chunk);
                let n = chunk.len();
                data.advance(n);
            }
        }
    }
    Ok(buffer)
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
        // The turn is taken before the body is read: a request waiting here holds no body.
        let lane = match declared {
            Some(n) if n <= SMALL_BODY_BYTES => &webhook.small,
            _ => &webhook.large,
        };
        let permit = tokio::time::timeout(webhook.limits.queue_timeout, lane.acquire()).await;
        match permit {
            Ok(Ok(_permit)) => {
                let body = read_body(request.into_body(), declared);
                match tokio::time::timeout(BODY_TIMEOUT, body).await {
                    Ok(Ok(body)) => admission::review(&body, &webhook.settings),
                    Ok(Err(BodyError::TooLarge)) => too_large(),
                    Ok(Err(BodyError::Unreadable(e))) => admission::error(
                        StatusCode::BAD_REQUEST,
                        String::new(),
                        format!("cannot read the request body: {e}"),
                    ),
                    Err(_) => admission::error(
                        StatusCode::REQUEST_TIMEOUT,
                        String::new(),
                        format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
                    ),
                }
            }
            // Closed never happens (the semaphore is never closed); timed out does.
            Ok(Err(_)) | Err(_) => admission::error(
                StatusCode::SERVICE_UNAVAILABLE,
                String::new(),
                format!(
                    "trellis-injector is busy: {} reviews in progress and this one waited \
                     {:?} for its turn; the API server retries pod creation",
                    webhook.limits.max_concurrent, webhook.limits.queue_timeout
                ),
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
