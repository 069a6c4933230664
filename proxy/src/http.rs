//! HTTP pieces shared by the outbound and inbound paths: body types, the upstream clients,
//! answers the proxy gives itself, and header hygiene between hops.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::idle::Clock;
use crate::proxy::Proxy;

use crate::hop::Connector;

pub type BoxError = Box<dyn StdError + Send + Sync>;
/// Every body the proxy sends or answers with.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// The header a proxy adds when it carries an HTTP/1 request over HTTP/2 to another proxy, so
/// the receiving proxy speaks HTTP/1 to its app again.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("trellis-orig-proto");
/// The header on every answer the proxy gives itself, saying why.
pub const PROXY_ERROR: HeaderName = HeaderName::from_static("trellis-proxy-error");

pub fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|e| match e {}).boxed_unsync()
}

pub fn incoming(body: hyper::body::Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()
}

/// The two upstream clients: HTTP/1.1 (pooled connections, for endpoints without a sidecar
/// that speak HTTP/1) and HTTP/2 (one multiplexed connection per endpoint: every hop between
/// sidecars, and HTTP/2 endpoints). Both connect through [`crate::hop`].
#[derive(Clone, Debug)]
pub struct Upstream {
    pub h1: std::sync::Arc<crate::pool::H1Pool>,
    pub h2: std::sync::Arc<crate::pool::H2Pool>,
}

/// Why an upstream request got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream URI names no endpoint address")]
    NoEndpoint,
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error(transparent)]
    Http1(hyper::Error),
    #[error(transparent)]
    Http2(hyper::Error),
}

impl UpstreamError {
    /// The request was never processed upstream, so another endpoint may have it whatever
    /// its method: the connection was never made, the request was canceled before it was
    /// sent, or an HTTP/2 server refused the stream (REFUSED_STREAM, or a GOAWAY that it did
    /// not cover, as a draining server sends; RFC 9113 §8.7).
    pub fn is_connect(&self) -> bool {
        match self {
            UpstreamError::NoEndpoint | UpstreamError::Connect(_) => true,
            UpstreamError::Http1(e) => e.is_canceled(),
            UpstreamError::Http2(e) => {
                e.is_canceled()
                    || std::error::Error::source(e)
                        .and_then(|s| s.downcast_ref::<h2::Error>())
                        .and_then(h2::Error::reason)
                        .is_some_and(|r| r == h2::Reason::REFUSED_STREAM)
            }
        }
    }
}

impl Upstream {
    pub fn new(connector: Connector, idle: Duration) -> Self {
        let h1 = std::sync::Arc::new(crate::pool::H1Pool::new(connector.clone(), idle));
        let h2 = std::sync::Arc::new(crate::pool::H2Pool::new(connector, idle));
        Self { h1, h2 }
    }

    pub async fn send(
        &self,
        mut req: Request<Body>,
        http2: bool,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        if http2 {
            *req.version_mut() = Version::HTTP_2;
            self.h2.send(req).await
        } else {
            *req.version_mut() = Version::HTTP_11;
            self.h1.send(req).await
        }
    }
}

/// Serves HTTP/1 and HTTP/2 on an accepted connection until it ends, or until shutdown asks
/// it to finish its in-flight requests and close.
pub async fn serve_connection<I, S>(proxy: &Proxy, direction: &'static str, io: I, service: S)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<hyper::body::Incoming>, Response = Response<Body>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let limit = proxy.config.args.max_header_bytes;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Heads larger than this are answered 431.
        .max_buf_size(limit.max(8192))
        .timer(TokioTimer::new())
        // A client that never finishes its head is dropped.
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .max_header_list_size(u32::try_from(limit).unwrap_or(u32::MAX))
        // A peer that stops answering pings is gone, even if its socket is not.
        .keep_alive_interval(Some(H2_KEEPALIVE_INTERVAL))
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .timer(TokioTimer::new());
    let clock = Clock::default();
    let service = Busy {
        inner: service,
        clock: clock.clone(),
    };
    // With upgrades: a `101` answer hands the connection over (see `crate::upgrade`).
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = proxy.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = clock.idle_for(proxy.config.args.http_idle_timeout) => {
            proxy.metrics.error(direction, "idle_timeout");
            conn.as_mut().graceful_shutdown();
            // Nothing is in flight: a client that does not close within this is dropped.
            tokio::time::timeout(Duration::from_secs(5), conn)
                .await
                .unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// How often an HTTP/2 client is pinged, and how long its answer may take.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A service whose calls mark the connection busy, for the idle timeout.
#[derive(Clone)]
struct Busy<S> {
    inner: S,
    clock: Clock,
}

impl<S, B> hyper::service::Service<Request<B>> for Busy<S>
where
    S: hyper::service::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BusyFuture<S::Future>;

    fn call(&self, req: Request<B>) -> Self::Future {
        BusyFuture {
            busy: Some(self.clock.begin()),
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// A call in flight; the connection is busy until it resolves.
    struct BusyFuture<F> {
        #[pin]
        inner: F,
        busy: Option<crate::idle::Busy>,
    }
}

impl<F: std::future::Future> std::future::Future for BusyFuture<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        this.busy.take();
        std::task::Poll::Ready(out)
    }
}

/// An upstream's response as it goes back to the client: without connection headers.
pub fn from_upstream(res: Response<hyper::body::Incoming>) -> Response<Body> {
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(ORIG_PROTO);
    Response::from_parts(parts, incoming(body))
}

/// Reads and throws away at most `limit` bytes of `body` within a second, so that a small
/// answer nobody needs leaves its connection reusable; a larger or slower one is dropped,
/// which closes its stream or connection instead.
pub async fn discard<B: hyper::body::Body + Unpin>(mut body: B, limit: usize) {
    let read = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                seen += bytes::Buf::remaining(d);
                if seen > limit {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIME, read).await;
}

const DISCARD_TIME: Duration = Duration::from_secs(1);

/// Whether a request is a gRPC call, whose errors are gRPC statuses rather than HTTP ones.
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status for an answer the proxy gives itself.
fn grpc_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "3",              // INVALID_ARGUMENT
        404 => "12",             // UNIMPLEMENTED
        500 | 502 | 503 => "14", // UNAVAILABLE
        504 => "4",              // DEADLINE_EXCEEDED
        _ => "2",                // UNKNOWN
    }
}

/// An answer from the proxy itself: plain text for HTTP, a trailers-only status for gRPC.
pub fn local(status: StatusCode, reason: &str, grpc: bool) -> Response<Body> {
    let reason_value =
        HeaderValue::from_str(reason).unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
    let mut res = if grpc {
        let mut res = Response::new(empty());
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(grpc_status(status)));
        h.insert("grpc-message", reason_value.clone());
        res
    } else {
        let mut res = Response::new(full(Bytes::from(format!("{reason}\n"))));
        *res.status_mut() = status;
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res
    };
    res.headers_mut().insert(PROXY_ERROR, reason_value);
    res
}

/// Removes the headers that describe one connection rather than the message (RFC 9110 §7.6.1),
/// which must not cross a proxy and which HTTP/2 forbids.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names costs less than the nine
    // lookups below.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(conn) = headers.get(header::CONNECTION).cloned()
        && let Ok(list) = conn.to_str()
    {
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                headers.remove(name);
            }
        }
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC needs it.
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// Whether `name` is one that [`strip_hop_by_hop`] may remove without being told by
/// `Connection`.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
    ]
    .contains(name)
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// The request's host: the Host header, else the URI authority (HTTP/2).
pub fn host_of<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("web"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        let mut h = HeaderMap::new();
        h.insert("proxy-connection", HeaderValue::from_static("close"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn local_answers() {
        let r = local(StatusCode::NOT_FOUND, "no route", false);
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()[PROXY_ERROR], "no route");
        let r = local(StatusCode::GATEWAY_TIMEOUT, "timeout", true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "4");
        let r = local(StatusCode::SERVICE_UNAVAILABLE, "bad\nvalue", false);
        assert_eq!(r.headers()[PROXY_ERROR], "proxy error");
    }
}
