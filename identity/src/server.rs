//! The certify endpoint: `POST /v1/certify` over HTTPS, HTTP/2 and HTTP/1.1 on one port.
//!
//! A request is checked in order of cost: the body and the CSR first (no API call for
//! garbage), then the token (a TokenReview), then whether the CSR asks for the token's
//! identity. Each refusal is a [`CertifyError`] with its code's status and a reason that
//! names what to fix. Slow clients are cut off (TLS handshake and request head within 10 s,
//! body within 30 s); on shutdown open requests may finish. How many requests are worked on
//! at once, and how many TokenReviews each caller may cause, is bounded ([`crate::limits`]).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use trellis_api::certify::{
    CERTIFY_PATH, CertifyError, CertifyRequest, CertifyResponse, ErrorCode, MAX_REQUEST_BYTES,
};

use crate::ca::{self, csr};
use crate::limits::{CertifyLimits, RateLimiter};
use crate::metrics::Metrics;
use crate::reload::Current;
use crate::tokens::Tokens;

const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// What every certify request needs.
#[derive(Debug)]
pub struct Certifier {
    pub current: Arc<Current>,
    pub tokens: Arc<Tokens>,
    pub metrics: Metrics,
    limits: CertifyLimits,
    turns: Semaphore,
    reviews: RateLimiter,
}

/// A refusal: the answer, and what the HTTP layer adds to it.
#[derive(Debug)]
pub struct Refusal {
    pub error: CertifyError,
    /// Set for a caller over its TokenReview rate: 429 with `Retry-After` instead of the
    /// code's own status.
    pub retry_after: Option<Duration>,
    /// Which limit refused it (`rate_limited`, `overloaded`), for the throttled metric instead
    /// of the rejected one.
    pub limit: Option<&'static str>,
}

impl From<CertifyError> for Refusal {
    fn from(error: CertifyError) -> Self {
        Refusal {
            error,
            retry_after: None,
            limit: None,
        }
    }
}

impl Certifier {
    pub fn new(
        current: Arc<Current>,
        tokens: Arc<Tokens>,
        metrics: Metrics,
        limits: CertifyLimits,
    ) -> Self {
        Certifier {
            current,
            tokens,
            metrics,
            turns: Semaphore::new(limits.max_concurrent.max(1)),
            reviews: RateLimiter::new(limits.reviews_per_second, limits.burst),
            limits,
        }
    }

    /// Answers one certify request body from `caller`.
    pub async fn certify(&self, caller: IpAddr, body: &[u8]) -> Result<CertifyResponse, Refusal> {
        let request: CertifyRequest = serde_json::from_slice(body).map_err(|e| {
            CertifyError::new(
                ErrorCode::BadRequest,
                format!(
                    "the body is not a certify request ({{\"csr\": ..., \"token\": ...}}): {e}"
                ),
            )
        })?;
        let checked =
            csr::parse(&request.csr).map_err(|e| CertifyError::new(e.code(), e.to_string()))?;
        // Only a TokenReview costs the API server anything; the bucket is taken just before one.
        if matches!(*self.tokens, Tokens::Review(_))
            && let Err(wait) = self.reviews.take(caller, Instant::now())
        {
            let seconds = wait.as_secs_f64().ceil().max(1.0);
            return Err(Refusal {
                error: CertifyError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "too many certify requests from {caller}: at most {} TokenReviews at \
                         once and {}/s after that; retry in {seconds}s",
                        self.limits.burst, self.limits.reviews_per_second
                    ),
                ),
                retry_after: Some(Duration::from_secs_f64(seconds)),
                limit: Some("rate_limited"),
            });
        }
        let account = self
            .tokens
            .check(&request.token)
            .await
            .map_err(|e| CertifyError::new(e.code(), e.to_string()))?;
        // One snapshot for the rest of the request: a rotation meanwhile does not mix issuers.
        let active = self.current.get();
        let authority = &active.authority;
        let identity = account.identity(authority.trust_domain());
        checked
            .check_identity(&identity)
            .map_err(|e| CertifyError::new(e.code(), e.to_string()))?;
        let issued = authority
            .certify(&checked, SystemTime::now())
            .map_err(|e| {
                tracing::error!("signing for {identity} failed: {e}");
                CertifyError::new(ErrorCode::Internal, e.to_string())
            })?;
        tracing::info!(
            identity = %identity,
            pod = account.pod.as_deref().unwrap_or("-"),
            serial = %issued.serial,
            "certificate issued, expires {}",
            ca::rfc3339(issued.not_after)
        );
        Ok(CertifyResponse {
            certificate: issued.cert_pem,
            chain: authority.chain_pem(),
            expires_at: ca::unix_seconds(issued.not_after),
        })
    }
}

/// Serves until `shutdown` resolves, then drains open connections.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    certifier: Arc<Certifier>,
    shutdown: impl Future<Output = ()>,
) {
    let handler = move |peer, request| {
        let certifier = certifier.clone();
        async move { handle(&certifier, peer, request).await }
    };
    trellis_admin::https::serve("certify", listener, tls, handler, shutdown).await;
}

async fn handle(
    certifier: &Certifier,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let result = match (request.method(), request.uri().path()) {
        (&Method::POST, CERTIFY_PATH) => {
            // The body (at most 64 KiB) is read before a turn is taken, so a client that stalls
            // mid-body holds no turn; the turn covers the work: CSR checks, the TokenReview and
            // signing.
            let limits = &certifier.limits;
            match read_body(request.into_body()).await {
                Err(e) => Err(e.into()),
                Ok(body) => {
                    let turn =
                        tokio::time::timeout(limits.queue_timeout, certifier.turns.acquire()).await;
                    match turn {
                        Ok(Ok(_turn)) => certifier.certify(peer.ip(), &body).await,
                        // The semaphore is never closed; only the wait can end this way.
                        Ok(Err(_)) | Err(_) => Err(Refusal {
                            error: CertifyError::new(
                                ErrorCode::Unavailable,
                                format!(
                                    "identity is busy: {} certify requests in progress and this \
                                     one waited {:?} for its turn; retry with backoff",
                                    limits.max_concurrent, limits.queue_timeout
                                ),
                            ),
                            retry_after: None,
                            limit: Some("overloaded"),
                        }),
                    }
                }
            }
        }
        (_, CERTIFY_PATH) => {
            let mut response = error_response(&CertifyError::new(
                ErrorCode::MethodNotAllowed,
                format!("{CERTIFY_PATH} takes POST"),
            ));
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            return response;
        }
        (_, path) => {
            return error_response(&CertifyError::new(
                ErrorCode::NotFound,
                format!("no endpoint {path:?}: certify is POST {CERTIFY_PATH}"),
            ));
        }
    };
    match result {
        Ok(answer) => {
            certifier.metrics.issued(started.elapsed());
            json_response(StatusCode::OK, &answer)
        }
        Err(Refusal {
            error,
            retry_after,
            limit,
        }) => {
            match limit {
                Some(reason) => certifier.metrics.throttled(reason, started.elapsed()),
                None => certifier.metrics.rejected(error.code, started.elapsed()),
            }
            if error.code.is_retryable() {
                tracing::warn!("certify from {peer} failed: {error}");
            } else {
                tracing::info!("certify from {peer} refused: {error}");
            }
            match retry_after {
                None => error_response(&error),
                Some(wait) => {
                    let mut response = json_response(StatusCode::TOO_MANY_REQUESTS, &error);
                    response.headers_mut().insert(
                        header::RETRY_AFTER,
                        header::HeaderValue::from(wait.as_secs()),
                    );
                    response
                }
            }
        }
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, CertifyError> {
    let limited = Limited::new(body, MAX_REQUEST_BYTES);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(CertifyError::new(
            ErrorCode::BadRequest,
            format!("the body is larger than {MAX_REQUEST_BYTES} bytes"),
        )),
        Ok(Err(e)) => Err(CertifyError::new(
            ErrorCode::BadRequest,
            format!("cannot read the body: {e}"),
        )),
        Err(_) => Err(CertifyError::new(
            ErrorCode::BadRequest,
            format!("the body did not arrive within {}s", BODY_TIMEOUT.as_secs()),
        )),
    }
}

fn error_response(error: &CertifyError) -> Response<Full<Bytes>> {
    json_response(error.code.status(), error)
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    // Serializing these plain structs cannot fail; an empty body would still carry the status.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// TLS 1.2 and 1.3 with ring; HTTP/2 preferred, HTTP/1.1 for simple clients such as curl.
pub fn tls_config(current: Arc<Current>) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(current);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
