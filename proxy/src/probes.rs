//! The app's kubelet probes, performed by the sidecar on the kubelet's behalf.
//!
//! The injector rewrites each HTTP, TCP and gRPC probe to `GET :4191/app-health/<container>/
//! <probe>` and passes the original checks in `TRELLIS_APP_PROBES` ([`trellis_api::probes`]),
//! so the app's ports stay mutual-TLS-only while the kubelet still learns what the app says.
//! Each check dials the app the way inbound deliveries do ([`App`]), under a deadline, reading
//! at most a few KiB of the answer. The admin port is open to the pod network, so the number
//! of checks in flight is bounded: nobody can use it to flood the app.

use std::fmt::Write as _;
use std::pin::pin;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use trellis_api::probes::{AppProbe, AppProbes};

use crate::app::App;

/// How long one check may take unless `--app-probe-timeout` says otherwise: the kubelet's own
/// default `timeoutSeconds`. The kubelet's timeout bounds the whole request from outside.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Checks in flight at once; more wait for a slot until their deadline, then fail as busy.
/// A pod has at most three probes per container, and the kubelet runs each one at a time.
pub const MAX_CONCURRENT: usize = 8;
/// The most of an answer read: hyper's smallest HTTP/1 read buffer (the response head), and
/// the cap on a gRPC answer's body and headers.
const MAX_ANSWER_BYTES: usize = 8 * 1024;
/// The User-Agent the kubelet sends, which some apps look for.
const USER_AGENT: &str = "kube-probe/trellis";
const GRPC_HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";

/// Why a probe description cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbesError {
    #[error("not the JSON the injector writes: {0}")]
    Json(String),
    #[error("probe {key:?}: {reason}")]
    Probe { key: String, reason: String },
}

/// Parses and checks `TRELLIS_APP_PROBES`, so that a bad path or header stops the proxy at
/// start instead of failing every probe later.
pub fn parse(json: &str) -> Result<AppProbes, ProbesError> {
    let probes: AppProbes =
        serde_json::from_str(json).map_err(|e| ProbesError::Json(e.to_string()))?;
    for (key, probe) in &probes {
        let bad = |reason: String| ProbesError::Probe {
            key: key.clone(),
            reason,
        };
        if key.split('/').count() != 2 || key.split('/').any(str::is_empty) {
            return Err(bad("the key must be <container>/<probe>".to_string()));
        }
        if let AppProbe::Http {
            path,
            host,
            headers,
            ..
        } = probe
        {
            http::uri::PathAndQuery::try_from(request_path(path).as_str())
                .map_err(|e| bad(format!("path {path:?}: {e}")))?;
            if let Some(host) = host {
                HeaderValue::try_from(host.as_str())
                    .map_err(|e| bad(format!("host {host:?}: {e}")))?;
            }
            for h in headers {
                HeaderName::try_from(h.name.as_str())
                    .map_err(|e| bad(format!("header name {:?}: {e}", h.name)))?;
                HeaderValue::try_from(h.value.as_str())
                    .map_err(|e| bad(format!("header {:?} value: {e}", h.name)))?;
            }
        }
    }
    Ok(probes)
}

/// A probe's path as a request target: `/` when empty, and always absolute.
fn request_path(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    }
}

/// Why a check failed: the 503 body the kubelet logs in the pod's events.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{MAX_CONCURRENT} app-health checks already in flight")]
    Busy,
    #[error("no answer from the app within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to the app: {0}")]
    Connect(String),
    #[error("the app answered HTTP {0}")]
    Status(StatusCode),
    #[error("the app's answer cannot be read: {0}")]
    Answer(String),
    #[error("gRPC health check: {0}")]
    Grpc(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    probe: String,
    result: &'static str,
}

/// The app's probes and what is needed to perform them.
#[derive(Debug)]
pub struct AppHealth {
    probes: AppProbes,
    app: App,
    timeout: Duration,
    slots: Semaphore,
    checks: Family<CheckLabels, Counter>,
}

impl AppHealth {
    pub fn new(probes: AppProbes, app: App, timeout: Duration, registry: &mut Registry) -> Self {
        let checks = Family::<CheckLabels, Counter>::default();
        registry.register(
            "trellis_app_health_checks",
            "Checks of the app's kubelet probes made on the admin port, by probe and result",
            checks.clone(),
        );
        AppHealth {
            probes,
            app,
            timeout,
            slots: Semaphore::new(MAX_CONCURRENT),
            checks,
        }
    }

    /// Performs the probe `key` (`<container>/<probe>`) against the app; `Ok` carries a short
    /// description of the success. `None` when there is no such probe.
    pub async fn check(&self, key: &str) -> Option<Result<String, CheckError>> {
        let probe = self.probes.get(key)?;
        let deadline = Instant::now() + self.timeout;
        let result = match tokio::time::timeout_at(deadline, self.slots.acquire()).await {
            // A slot handed over as the deadline passed (slots freed by checks timing out
            // go to waiters whose own deadline is up) is no slot.
            Ok(Ok(_)) if Instant::now() >= deadline => Err(CheckError::Busy),
            Ok(Ok(_slot)) => tokio::time::timeout_at(deadline, self.run(probe))
                .await
                .unwrap_or(Err(CheckError::Timeout(self.timeout))),
            // The semaphore is never closed; a closed one is as good as a full one.
            Ok(Err(_)) | Err(_) => Err(CheckError::Busy),
        };
        let label = match &result {
            Ok(_) => "success",
            Err(CheckError::Busy) => "busy",
            Err(CheckError::Timeout(_)) => "timeout",
            Err(_) => "failure",
        };
        self.checks
            .get_or_create(&CheckLabels {
                probe: key.to_string(),
                result: label,
            })
            .inc();
        if let Err(e) = &result {
            tracing::debug!(probe = key, "app-health check failed: {e}");
        }
        Some(result)
    }

    async fn run(&self, probe: &AppProbe) -> Result<String, CheckError> {
        match probe {
            AppProbe::Tcp { port } => {
                self.app
                    .connect(*port)
                    .await
                    .map_err(|e| CheckError::Connect(e.to_string()))?;
                Ok(format!("port {port} accepts connections"))
            }
            AppProbe::Http {
                port,
                path,
                host,
                headers,
            } => {
                let host = host.as_ref().map_or_else(
                    || self.app.addr(*port).to_string(),
                    |h| host_with_port(h, *port),
                );
                let mut req = Request::get(request_path(path))
                    .header(header::HOST, host)
                    .header(header::USER_AGENT, USER_AGENT)
                    .header(header::ACCEPT, "*/*")
                    .header(header::CONNECTION, "close")
                    .body(Empty::<Bytes>::new())
                    .map_err(|e| CheckError::Answer(e.to_string()))?;
                // The probe's own headers win, Host and User-Agent included, as with the kubelet.
                let mut named = std::collections::HashSet::new();
                for h in headers {
                    let (Ok(name), Ok(value)) = (
                        HeaderName::try_from(h.name.as_str()),
                        HeaderValue::try_from(h.value.as_str()),
                    ) else {
                        continue; // checked at start
                    };
                    if named.insert(name.clone()) {
                        req.headers_mut().insert(name, value);
                    } else {
                        req.headers_mut().append(name, value);
                    }
                }
                let status = self.http(*port, req).await?;
                if (200..400).contains(&status.as_u16()) {
                    Ok(format!("HTTP {}", status.as_u16()))
                } else {
                    Err(CheckError::Status(status))
                }
            }
            AppProbe::Grpc { port, service } => {
                self.grpc(*port, service.as_deref().unwrap_or_default())
                    .await
            }
        }
    }

    /// One HTTP/1.1 request; only the response head is read.
    async fn http(&self, port: u16, req: Request<Empty<Bytes>>) -> Result<StatusCode, CheckError> {
        let stream = self
            .app
            .connect(port)
            .await
            .map_err(|e| CheckError::Connect(e.to_string()))?;
        let (mut send, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_ANSWER_BYTES)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| CheckError::Answer(e.to_string()))?;
        let mut conn = pin!(conn);
        let mut response = pin!(send.send_request(req));
        // The connection is driven here, not spawned, so the deadline ends it with the check.
        let response = tokio::select! {
            biased;
            res = &mut response => res,
            done = &mut conn => match done {
                // The answer, if one came, is in: the connection ends once it is read.
                Ok(()) => response.await,
                Err(e) => return Err(CheckError::Answer(e.to_string())),
            },
        };
        response
            .map(|r| r.status())
            .map_err(|e| CheckError::Answer(e.to_string()))
    }

    /// `grpc.health.v1.Health/Check` over HTTP/2 with prior knowledge, as the kubelet's gRPC
    /// probe does: success is `SERVING` with `grpc-status` 0.
    async fn grpc(&self, port: u16, service: &str) -> Result<String, CheckError> {
        let stream = self
            .app
            .connect(port)
            .await
            .map_err(|e| CheckError::Connect(e.to_string()))?;
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .max_header_list_size(MAX_ANSWER_BYTES as u32)
            .initial_stream_window_size(MAX_ANSWER_BYTES as u32)
            .initial_connection_window_size(MAX_ANSWER_BYTES as u32)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| CheckError::Answer(e.to_string()))?;
        let uri = Uri::builder()
            .scheme("http")
            .authority(self.app.addr(port).to_string())
            .path_and_query(GRPC_HEALTH_PATH)
            .build()
            .map_err(|e| CheckError::Answer(e.to_string()))?;
        let req = Request::post(uri)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .header(header::USER_AGENT, USER_AGENT)
            .body(Full::new(health_request(service)))
            .map_err(|e| CheckError::Answer(e.to_string()))?;
        let exchange = async {
            let res = send
                .send_request(req)
                .await
                .map_err(|e| CheckError::Answer(e.to_string()))?;
            let (parts, body) = res.into_parts();
            if parts.status != StatusCode::OK {
                return Err(CheckError::Status(parts.status));
            }
            // A trailers-only answer (an error) carries grpc-status in the headers.
            if let Some(status) = grpc_status(&parts.headers)? {
                return Err(status);
            }
            let collected = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| CheckError::Answer(e.to_string()))?;
            let trailers = collected.trailers().cloned().unwrap_or_default();
            match grpc_status(&trailers)? {
                Some(status) => return Err(status),
                None if !trailers.contains_key("grpc-status") => {
                    return Err(CheckError::Grpc("no grpc-status in the answer".to_string()));
                }
                None => {}
            }
            let status = health_status(collected.to_bytes()).map_err(CheckError::Grpc)?;
            match status {
                SERVING => Ok("SERVING".to_string()),
                other => Err(CheckError::Grpc(format!(
                    "the app is {}",
                    serving_status_name(other)
                ))),
            }
        };
        let mut conn = pin!(conn);
        let mut exchange = pin!(exchange);
        tokio::select! {
            biased;
            result = &mut exchange => result,
            done = &mut conn => match done {
                Ok(()) => exchange.await,
                Err(e) => Err(CheckError::Answer(e.to_string())),
            },
        }
    }
}

/// `host:port` for the Host header, as the kubelet builds it from the probe's `host`.
fn host_with_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `grpc-status` when present and not OK, as an error naming it and its message.
fn grpc_status(headers: &http::HeaderMap) -> Result<Option<CheckError>, CheckError> {
    let Some(code) = headers.get("grpc-status") else {
        return Ok(None);
    };
    let code = code
        .to_str()
        .ok()
        .and_then(|c| c.trim().parse::<u32>().ok())
        .ok_or_else(|| CheckError::Grpc(format!("bad grpc-status {code:?}")))?;
    if code == 0 {
        return Ok(None);
    }
    let mut reason = format!("grpc-status {code}");
    if let Some(message) = headers.get("grpc-message").and_then(|m| m.to_str().ok()) {
        let _ = write!(
            reason,
            ": {}",
            message.chars().take(200).collect::<String>()
        );
    }
    Ok(Some(CheckError::Grpc(reason)))
}

/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

fn serving_status_name(status: u64) -> String {
    match status {
        0 => "UNKNOWN".to_string(),
        1 => "SERVING".to_string(),
        2 => "NOT_SERVING".to_string(),
        3 => "SERVICE_UNKNOWN (the app has no such service)".to_string(),
        other => format!("in status {other}"),
    }
}

/// A gRPC message frame holding `HealthCheckRequest { string service = 1; }`.
pub fn health_request(service: &str) -> Bytes {
    let mut message = BytesMut::new();
    if !service.is_empty() {
        message.put_u8(0x0a); // field 1, length-delimited
        put_varint(&mut message, service.len() as u64);
        message.put_slice(service.as_bytes());
    }
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0); // not compressed
    frame.put_u32(message.len() as u32);
    frame.put_slice(&message);
    frame.freeze()
}

/// The `status` of the `HealthCheckResponse` in a gRPC answer body (one message frame); an
/// absent field is its default, `UNKNOWN`.
pub fn health_status(mut body: Bytes) -> Result<u64, String> {
    if body.len() < 5 {
        return Err("the answer holds no message".to_string());
    }
    if body.get_u8() != 0 {
        return Err("the answer is compressed, which the probe did not ask for".to_string());
    }
    let len = body.get_u32() as usize;
    if body.len() < len {
        return Err("the answer's message is cut short".to_string());
    }
    let mut message = body.split_to(len);
    let mut status = 0;
    while message.has_remaining() {
        let tag = get_varint(&mut message)?;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                let value = get_varint(&mut message)?;
                if field == 1 {
                    status = value;
                }
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if message.remaining() < n {
                    return Err("the answer's message is cut short".to_string());
                }
                message.advance(n);
            }
            2 => {
                let n = usize::try_from(get_varint(&mut message)?).unwrap_or(usize::MAX);
                if message.remaining() < n {
                    return Err("the answer's message is cut short".to_string());
                }
                message.advance(n);
            }
            _ => {
                return Err(format!(
                    "the answer is not a HealthCheckResponse (wire type {wire})"
                ));
            }
        }
    }
    Ok(status)
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn get_varint(buf: &mut Bytes) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        if !buf.has_remaining() {
            return Err("the answer's message is cut short".to_string());
        }
        let b = buf.get_u8();
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a varint in the answer is too long".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_the_probes() {
        let probes = parse(
            r#"{"app/readiness":{"kind":"http","port":8080,"path":"healthz?x=1","headers":[{"name":"x-a","value":"b"}]},"app/liveness":{"kind":"tcp","port":8080}}"#,
        )
        .unwrap();
        assert_eq!(probes.len(), 2);
        assert_eq!(request_path("healthz?x=1"), "/healthz?x=1");
        assert_eq!(request_path(""), "/");
        assert!(matches!(parse("{bad"), Err(ProbesError::Json(_))));
        assert!(matches!(
            parse(r#"{"app/readiness":{"kind":"exec"}}"#),
            Err(ProbesError::Json(_))
        ));
        for bad in [
            r#"{"app":{"kind":"tcp","port":1}}"#,
            r#"{"a/b/c":{"kind":"tcp","port":1}}"#,
            r#"{"a/b":{"kind":"http","port":1,"path":"/a b"}}"#,
            r#"{"a/b":{"kind":"http","port":1,"path":"/","headers":[{"name":"bad name","value":"x"}]}}"#,
            r#"{"a/b":{"kind":"http","port":1,"path":"/","headers":[{"name":"x","value":"a\nb"}]}}"#,
        ] {
            assert!(
                matches!(parse(bad), Err(ProbesError::Probe { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn health_messages() {
        assert_eq!(&health_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &health_request("shop")[..],
            &[0, 0, 0, 0, 6, 0x0a, 4, b's', b'h', b'o', b'p']
        );
        let long = "s".repeat(200);
        assert_eq!(&health_request(&long)[5..8], &[0x0a, 0xc8, 0x01]);
        // status = SERVING; an unknown field before it is skipped.
        let body = Bytes::from_static(&[0, 0, 0, 0, 5, 0x12, 1, b'x', 0x08, 1]);
        assert_eq!(health_status(body), Ok(1));
        assert_eq!(health_status(Bytes::from_static(&[0, 0, 0, 0, 0])), Ok(0));
        assert_eq!(
            health_status(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 2])),
            Ok(2)
        );
        assert!(health_status(Bytes::from_static(&[1, 0, 0, 0, 0])).is_err());
        assert!(health_status(Bytes::from_static(&[0, 0, 0, 0, 9, 0x08])).is_err());
        assert!(health_status(Bytes::from_static(&[0, 0, 0, 0, 1, 0x08])).is_err());
        assert!(health_status(Bytes::from_static(&[0, 0, 0])).is_err());
    }

    #[test]
    fn host_headers() {
        assert_eq!(host_with_port("example.com", 80), "example.com:80");
        assert_eq!(host_with_port("fd00::1", 8080), "[fd00::1]:8080");
    }
}
