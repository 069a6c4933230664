//! The admin server on :9990 (plain HTTP, inside the cluster only): `/live`, `/ready` and
//! `/metrics`.
//!
//! `/ready` turns true once identity has a checked issuer and listens, and false again when
//! shutdown starts, so the Service stops sending certify requests to a replica going away.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Shared with the certify side, which flips `ready`.
#[derive(Debug, Default)]
pub struct Admin {
    pub ready: AtomicBool,
    pub metrics: Metrics,
}

impl Admin {
    pub fn new(metrics: Metrics) -> Arc<Self> {
        Arc::new(Admin {
            ready: AtomicBool::new(false),
            metrics,
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!("admin: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let admin = admin.clone();
        let connection = builder
            .serve_connection(
                TokioIo::new(tcp),
                service_fn(move |request| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(handle(&admin, &request)) }
                }),
            )
            .into_owned();
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!("admin: connection: {e}");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
}

fn handle<B>(admin: &Admin, request: &Request<B>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/live" => (StatusCode::OK, "text/plain", "live\n".to_string()),
        "/ready" if admin.ready.load(Ordering::Acquire) => {
            (StatusCode::OK, "text/plain", "ready\n".to_string())
        }
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_string(),
        ),
        "/metrics" => (StatusCode::OK, OPENMETRICS, admin.metrics.encode()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /live, /ready or /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
