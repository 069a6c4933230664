//! W3C trace context and the sidecar's own spans, exported over OTLP/HTTP.
//!
//! With `--otlp-endpoint` set, each request the sidecar handles becomes one span per direction
//! (kind CLIENT outbound, SERVER inbound) when it is sampled: an incoming `traceparent` with the
//! sampled flag is continued (same trace id, the sidecar's span is the child of the caller's
//! and becomes the parent id of the request it sends on); an unsampled one passes through
//! untouched; without one, `--trace-sampling` decides whether to start a trace. `tracestate`
//! is forwarded as it came. Without an endpoint the sidecar leaves both headers alone and does
//! no work per request.
//!
//! Spans leave the request path through a bounded queue to one exporter task, which batches
//! them into OTLP `ExportTraceServiceRequest`s (protobuf) and `POST`s them to `/v1/traces`
//! with a timeout. A full queue or a failed export drops spans and counts them: tracing never
//! slows a request down. Only the protobuf messages of `opentelemetry-proto` are used, sent with
//! the hyper client the proxy already has: the OpenTelemetry SDK and its exporters would bring
//! a second HTTP or gRPC stack and a batch processor of their own for what is here one channel.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::observe::Record;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Spans waiting for the exporter; more are dropped and counted.
pub const QUEUE: usize = 2048;
/// The most spans in one export request.
pub const BATCH: usize = 512;
/// How long a span waits for its batch to fill before it is sent anyway.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// A `traceparent` header's fields (W3C Trace Context, version 00).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The caller's span.
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` for anything the specification calls invalid
    /// (which the sidecar then ignores, as if the header were absent). A later version is read
    /// by its version-00 prefix, as the specification asks.
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        if value.len() < 55 {
            return None;
        }
        let version = hex_byte(&value[0..2])?;
        match version {
            0xff => return None,
            0 if value.len() != 55 => return None,
            _ if value.len() > 55 && value[55] != b'-' => return None,
            _ => {}
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent_id = [0u8; 8];
        for (i, b) in parent_id.iter_mut().enumerate() {
            *b = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&value[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The version-00 header for this trace, with `span_id` as the parent of what follows.
    pub fn header(&self) -> HeaderValue {
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id, &mut out[3..35]);
        out[35] = b'-';
        hex_into(&self.parent_id, &mut out[36..52]);
        out[52] = b'-';
        // Only the sampled flag is known to version 00.
        hex_into(&[self.flags & 1], &mut out[53..55]);
        HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static(""))
    }
}

/// Lowercase hex only: the specification forbids uppercase.
fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// The span of one sampled request: the trace it belongs to, its own id, and its caller's.
#[derive(Clone, Debug)]
pub struct Active {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// `None`: the sidecar started the trace.
    pub parent_id: Option<[u8; 8]>,
    pub tracestate: Option<HeaderValue>,
}

/// Decides per request whether it is traced, and rewrites its `traceparent` if so.
#[derive(Debug)]
pub struct Tracer {
    sampling: f64,
    spans: mpsc::Sender<(Record, Active)>,
    dropped: Family<DropLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

fn nonzero<const N: usize>(mut fill: impl FnMut() -> [u8; N]) -> [u8; N] {
    loop {
        let id = fill();
        if id != [0; N] {
            return id;
        }
    }
}

impl Tracer {
    /// The request's span, if it is traced; its `traceparent` then names that span as the
    /// parent of the request the sidecar sends on. Invalid `traceparent` headers (or several)
    /// are removed with their `tracestate`, and the request is treated as the start of a trace.
    pub fn start(&self, headers: &mut HeaderMap) -> Option<Active> {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let incoming = match (values.next(), values.next()) {
            (None, _) => None,
            (Some(v), None) => match TraceParent::parse(v.as_bytes()) {
                Some(tp) => Some(tp),
                None => {
                    headers.remove(TRACEPARENT);
                    headers.remove(TRACESTATE);
                    None
                }
            },
            (Some(_), Some(_)) => {
                headers.remove(TRACEPARENT);
                headers.remove(TRACESTATE);
                None
            }
        };
        let span_id = || nonzero(|| fastrand::u64(..).to_ne_bytes());
        let active = match incoming {
            // The caller decided not to record this trace: pass it on as it is.
            Some(tp) if !tp.sampled() => return None,
            Some(tp) => Active {
                trace_id: tp.trace_id,
                span_id: span_id(),
                parent_id: Some(tp.parent_id),
                tracestate: headers.get(TRACESTATE).cloned(),
            },
            None if self.sampling > 0.0 && fastrand::f64() < self.sampling => Active {
                trace_id: nonzero(|| fastrand::u128(..).to_ne_bytes()),
                span_id: span_id(),
                parent_id: None,
                tracestate: None,
            },
            None => return None,
        };
        let ours = TraceParent {
            trace_id: active.trace_id,
            parent_id: active.span_id,
            flags: 1,
        };
        headers.insert(TRACEPARENT, ours.header());
        Some(active)
    }

    /// Queues the finished span for export, or drops and counts it when the queue is full.
    pub fn finish(&self, record: Record, active: Active) {
        if self.spans.try_send((record, active)).is_err() {
            self.dropped
                .get_or_create(&DropLabels {
                    reason: "queue_full",
                })
                .inc();
        }
    }
}

/// Where and how spans are exported.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// `http://host:port/v1/traces`.
    pub endpoint: Uri,
    pub timeout: Duration,
    pub sampling: f64,
    /// Resource attributes: `service.name`, the pod and its namespace.
    pub pod_name: String,
    pub namespace: String,
    pub queue: usize,
}

/// The URI spans are posted to: `--otlp-endpoint` as given, with `/v1/traces` when it names no
/// path. Only `http`: the collector is expected on the node or in the cluster's network.
pub fn endpoint_uri(endpoint: &str) -> Result<Uri, String> {
    let uri: Uri = endpoint
        .parse()
        .map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(format!(
            "{endpoint:?} must be an http:// URL such as http://otel-collector:4318"
        ));
    }
    if matches!(uri.path(), "" | "/") {
        let mut parts = uri.into_parts();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/v1/traces"));
        return Uri::from_parts(parts).map_err(|e| format!("{endpoint:?}: {e}"));
    }
    Ok(uri)
}

/// Starts the exporter task; the tracer decides and queues, the task batches and sends. The
/// task ends (after a last export) once every [`Tracer`] is dropped.
pub fn start(
    config: ExportConfig,
    registry: &mut Registry,
) -> (Tracer, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let dropped = Family::<DropLabels, Counter>::default();
    let exported = Counter::default();
    registry.register(
        "trellis_trace_spans_dropped",
        "Spans not exported: the queue to the exporter was full, or the export failed",
        dropped.clone(),
    );
    registry.register(
        "trellis_trace_spans_exported",
        "Spans the OTLP endpoint accepted",
        exported.clone(),
    );
    let tracer = Tracer {
        sampling: config.sampling,
        spans: tx,
        dropped: dropped.clone(),
    };
    let exporter = Exporter {
        client: Client::builder(TokioExecutor::new()).build_http(),
        resource: resource(&config),
        config,
        dropped,
        exported,
    };
    (tracer, tokio::spawn(exporter.run(rx)))
}

struct Exporter {
    client: Client<HttpConnector, Full<Bytes>>,
    config: ExportConfig,
    resource: Resource,
    dropped: Family<DropLabels, Counter>,
    exported: Counter,
}

impl Exporter {
    async fn run(self, mut rx: mpsc::Receiver<(Record, Active)>) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            // The first span of a batch waits as long as it takes; the rest at most the flush
            // interval after it.
            let Some(first) = rx.recv().await else { break };
            batch.push(span_of(first));
            let deadline = tokio::time::Instant::now() + FLUSH_INTERVAL;
            let mut closed = false;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => batch.push(span_of(s)),
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.export(std::mem::take(&mut batch)).await;
            if closed {
                break;
            }
        }
    }

    async fn export(&self, spans: Vec<Span>) {
        let n = spans.len() as u64;
        let body = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "trellis-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
        .encode_to_vec();
        let req = Request::post(self.config.endpoint.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)));
        let Ok(req) = req else { return };
        let result = tokio::time::timeout(self.config.timeout, async {
            let res = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = res.status();
            // Read the (small) answer so the connection is reused.
            let _ = res.into_body().collect().await;
            match status {
                StatusCode::OK => Ok(()),
                s => Err(format!("the endpoint answered {s}")),
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.config.timeout)));
        match result {
            Ok(()) => {
                self.exported.inc_by(n);
            }
            Err(e) => {
                tracing::debug!(error = %e, endpoint = %self.config.endpoint, spans = n, "span export failed");
                self.dropped
                    .get_or_create(&DropLabels {
                        reason: "export_failed",
                    })
                    .inc_by(n);
            }
        }
    }
}

fn resource(config: &ExportConfig) -> Resource {
    let mut attributes = vec![string("service.name", "trellis-proxy")];
    if !config.pod_name.is_empty() {
        attributes.push(string("k8s.pod.name", &config.pod_name));
    }
    attributes.push(string("k8s.namespace.name", &config.namespace));
    Resource {
        attributes,
        ..Default::default()
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The OTLP span of a request (built on the exporter task, off the request path).
fn span_of((r, active): (Record, Active)) -> Span {
    let mut attributes = vec![
        string("trellis.direction", r.direction),
        string("http.request.method", r.method.as_str()),
        string("url.path", &r.path),
        int("http.response.status_code", i64::from(r.status)),
    ];
    if let Some(a) = &r.authority {
        attributes.push(string("server.address", a));
    }
    for (key, value) in [
        ("trellis.parent", &r.parent),
        ("trellis.route", &r.route),
        ("trellis.rule", &r.rule),
        ("trellis.backend", &r.backend),
    ] {
        if !value.is_empty() {
            attributes.push(string(key, value));
        }
    }
    if let Some(ep) = r.endpoint {
        attributes.push(string("network.peer.address", &ep.ip().to_string()));
        attributes.push(int("network.peer.port", i64::from(ep.port())));
    }
    if let Some(peer) = &r.peer_identity {
        attributes.push(string("trellis.peer_identity", peer));
    }
    if r.retries > 0 {
        attributes.push(int("trellis.retries", i64::from(r.retries)));
    }
    if let Some(e) = &r.error {
        attributes.push(string("error.type", e));
    }
    let failed = r.status >= 500 || r.error.is_some();
    let name = match (&r.route, r.direction) {
        (route, _) if !route.is_empty() => format!("{} {route}", r.method),
        (_, direction) => format!("{} {direction}", r.method),
    };
    Span {
        trace_id: active.trace_id.to_vec(),
        span_id: active.span_id.to_vec(),
        trace_state: active
            .tracestate
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .into(),
        parent_span_id: active.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags: 1,
        name,
        kind: match r.direction {
            "inbound" => span::SpanKind::Server,
            _ => span::SpanKind::Client,
        } as i32,
        start_time_unix_nano: unix_nanos(r.time),
        end_time_unix_nano: unix_nanos(r.time + r.took),
        attributes,
        status: Some(Status {
            message: r.error.as_deref().unwrap_or_default().into(),
            code: if failed {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            } as i32,
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `traceparent` that names `active`'s span as the parent.
    fn traceparent_of(active: &Active) -> String {
        format!("00-{}-{}-01", hex(&active.trace_id), hex(&active.span_id))
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_specifications_example() {
        let tp = TraceParent::parse(VALID.as_bytes()).unwrap();
        assert_eq!(hex(&tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&tp.parent_id), "00f067aa0ba902b7");
        assert!(tp.sampled());
        assert_eq!(tp.header(), VALID);
        let unsampled = VALID.replace("-01", "-00");
        assert!(!TraceParent::parse(unsampled.as_bytes()).unwrap().sampled());
    }

    #[test]
    fn refuses_what_the_specification_calls_invalid() {
        for bad in [
            "",
            "00",
            // Uppercase hex, an all-zero trace or parent id, version ff.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Version 00 is exactly 55 characters.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            // A later version must separate what it adds with a dash.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad}");
        }
        // A later version is read by its version-00 prefix.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-adds";
        assert!(TraceParent::parse(later.as_bytes()).is_some());
    }

    fn tracer(sampling: f64) -> (Tracer, mpsc::Receiver<(Record, Active)>) {
        let (spans, rx) = mpsc::channel(4);
        let dropped = Family::default();
        (
            Tracer {
                sampling,
                spans,
                dropped,
            },
            rx,
        )
    }

    #[test]
    fn continues_a_sampled_trace_with_a_new_parent() {
        let (tracer, _rx) = tracer(0.0);
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        headers.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        let active = tracer.start(&mut headers).unwrap();
        assert_eq!(hex(&active.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            active.parent_id.map(|p| hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_ne!(active.span_id, [0; 8]);
        assert_eq!(headers[TRACEPARENT], traceparent_of(&active).as_str());
        assert_eq!(headers[TRACESTATE], "vendor=x");
    }

    #[test]
    fn leaves_an_unsampled_trace_alone_and_starts_by_ratio() {
        let (never, _rx) = tracer(0.0);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(unsampled));
        assert!(never.start(&mut headers).is_none());
        assert_eq!(headers[TRACEPARENT], unsampled);
        assert!(never.start(&mut HeaderMap::new()).is_none());

        let (always, _rx) = tracer(1.0);
        assert!(
            always.start(&mut headers).is_none(),
            "the caller's choice wins"
        );
        let mut fresh = HeaderMap::new();
        let active = always.start(&mut fresh).unwrap();
        assert_eq!(active.parent_id, None);
        assert_eq!(fresh[TRACEPARENT], traceparent_of(&active).as_str());
    }

    #[test]
    fn drops_invalid_or_repeated_headers() {
        let (tracer, _rx) = tracer(0.0);
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static("00-garbage"));
        headers.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        assert!(tracer.start(&mut headers).is_none());
        assert!(headers.is_empty());
        headers.append(TRACEPARENT, HeaderValue::from_static(VALID));
        headers.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(tracer.start(&mut headers).is_none());
        assert!(headers.is_empty());
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint_uri("http://collector:4318").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            endpoint_uri("http://collector:4318/custom/traces").unwrap(),
            "http://collector:4318/custom/traces"
        );
        for bad in ["collector:4318", "https://collector:4318", "http://", "::"] {
            assert!(endpoint_uri(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Whatever a peer sends as `traceparent`, parsing ends without a panic, and what it
        /// accepts it writes back as the same ids.
        #[test]
        fn any_header_is_safe(value in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            if let Some(tp) = TraceParent::parse(&value) {
                let again = TraceParent::parse(tp.header().as_bytes()).unwrap();
                proptest::prop_assert_eq!(again.trace_id, tp.trace_id);
                proptest::prop_assert_eq!(again.parent_id, tp.parent_id);
            }
        }

        #[test]
        fn near_valid_headers_are_safe(pos in 0usize..55, byte in proptest::num::u8::ANY) {
            let mut value = VALID.as_bytes().to_vec();
            value[pos] = byte;
            let _ = TraceParent::parse(&value);
            let mut headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&value) {
                headers.insert(TRACEPARENT, v);
                let (tracer, _rx) = tracer(0.5);
                let _ = tracer.start(&mut headers);
            }
        }
    }
}
