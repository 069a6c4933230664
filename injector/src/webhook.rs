//! The HTTPS server the API server calls: `POST /inject` with an AdmissionReview.
//!
//! HTTP/1.1 and HTTP/2 on one port. Slow or oversized clients are cut off (TLS handshake and
//! request head within 10 s, body within 30 s, at most [`MAX_BODY_BYTES`]); on shutdown the
//! server stops accepting and lets open requests finish.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tokio::net::TcpListener;

use crate::admission::{self, MAX_BODY_BYTES};
use crate::config::Settings;
use crate::metrics::Metrics;

/// The path the MutatingWebhookConfiguration's `clientConfig.service.path` points at.
pub const PATH: &str = "/inject";
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// What every request needs.
#[derive(Debug)]
pub struct Webhook {
    pub settings: Settings,
    pub metrics: Metrics,
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
    B::Error: std::error::Error + Send + Sync + 'static,
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
        let body = Limited::new(request.into_body(), MAX_BODY_BYTES);
        match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
            Ok(Ok(body)) => admission::review(&body.to_bytes(), &webhook.settings),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => too_large(),
            Ok(Err(e)) => admission::error(
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
