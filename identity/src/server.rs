//! The certify endpoint: `POST /v1/certify` over HTTPS, HTTP/2 and HTTP/1.1 on one port.
//!
//! A request is checked in order of cost: the body and the CSR first (no API call for
//! garbage), then the token (a TokenReview), then whether the CSR asks for the token's
//! identity. Each refusal is a [`CertifyError`] with its code's status and a reason that
//! names what to fix. Slow clients are cut off (TLS handshake and request head within 10 s,
//! body within 30 s); on shutdown open requests may finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use trellis_api::certify::{
    CERTIFY_PATH, CertifyError, CertifyRequest, CertifyResponse, ErrorCode, MAX_REQUEST_BYTES,
};

use crate::ca::{self, csr};
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
}

impl Certifier {
    /// Answers one certify request body.
    pub async fn certify(&self, body: &[u8]) -> Result<CertifyResponse, CertifyError> {
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
        (&Method::POST, CERTIFY_PATH) => match read_body(request.into_body()).await {
            Ok(body) => certifier.certify(&body).await,
            Err(e) => Err(e),
        },
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
            json_response(http::StatusCode::OK, &answer)
        }
        Err(error) => {
            certifier.metrics.rejected(error.code, started.elapsed());
            if error.code.is_retryable() {
                tracing::warn!("certify from {peer} failed: {error}");
            } else {
                tracing::info!("certify from {peer} refused: {error}");
            }
            error_response(&error)
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

fn json_response(status: http::StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
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
