//! Data-path metrics. Label values are `Arc<str>` built when a policy is compiled, so recording
//! a request clones pointers, never strings. Cardinality is bounded at the source: routes,
//! Services and status codes, never paths or pod IPs.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of one request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// The Service the client addressed, `namespace/name:port`; empty when not a Service.
    pub parent: Arc<str>,
    /// `HTTPRoute`, `GRPCRoute`, or empty without a route.
    pub route_kind: &'static str,
    /// `namespace/name` of the route.
    pub route: Arc<str>,
    /// The rule's name, or its index.
    pub rule: Arc<str>,
    /// The backend Service, `namespace/name:port`.
    pub backend: Arc<str>,
    /// The client's mesh identity (inbound), when known.
    pub peer_identity: Arc<str>,
    pub status: u16,
}

/// The series key of `trellis_requests` and `trellis_request_duration_seconds`: a request's
/// labels and, for gRPC calls, the call's status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestKey {
    #[prometheus(flatten)]
    pub labels: RequestLabels,
    /// The gRPC status code (`0`…`16`) of a gRPC call, from its trailers or trailers-only
    /// answer; empty for other requests and for calls that ended without a status.
    pub grpc_status: &'static str,
}

/// One connection's last request series; see [`Metrics::request`].
#[derive(Debug, Default)]
pub struct RequestCache(Mutex<Option<RequestSeries>>);

#[derive(Debug)]
struct RequestSeries {
    key: RequestKey,
    count: Counter,
    duration: Histogram,
}

/// Where a retry, timeout or ejection happened: the request's parent, route and backend
/// (pointers to the labels the policy built, never strings made per request).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteBackendLabels {
    pub direction: &'static str,
    pub parent: Arc<str>,
    pub route: Arc<str>,
    pub backend: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    #[prometheus(flatten)]
    pub at: RouteBackendLabels,
    /// What failed: `connect`, `connection`, `timeout` or `status`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    #[prometheus(flatten)]
    pub at: RouteBackendLabels,
    /// `request` (the rule's `timeouts.request`, headers or response stream) or
    /// `backend_request` (one attempt's `timeouts.backendRequest`).
    pub timeout: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    pub direction: &'static str,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// `sent`, `failed` or `skipped` (body too large).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub direction: &'static str,
    /// A short, fixed reason: `no_policy`, `connect`, `timeout`, `bad_request`, …
    pub reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s: a sidecar's added latency lives at the low end.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

#[derive(Clone, Debug)]
pub struct Metrics {
    pub requests: Family<RequestKey, Counter>,
    pub request_duration: Family<RequestKey, Histogram, fn() -> Histogram>,
    pub retries: Family<RetryLabels, Counter>,
    pub retry_budget_exhausted: Family<RouteBackendLabels, Counter>,
    pub timeouts: Family<TimeoutLabels, Counter>,
    pub ejections: Family<RouteBackendLabels, Counter>,
    pub mirrors: Family<MirrorLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub tcp_open: Family<DirectionLabels, Gauge>,
    pub tcp_total: Family<DirectionLabels, Counter>,
    pub tcp_read_bytes: Family<DirectionLabels, Counter>,
    pub tcp_write_bytes: Family<DirectionLabels, Counter>,
    pub detections: Family<DetectLabels, Counter>,
    pub detect_duration: Family<DirectionLabels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            retry_budget_exhausted: Family::default(),
            timeouts: Family::default(),
            ejections: Family::default(),
            mirrors: Family::default(),
            errors: Family::default(),
            tcp_open: Family::default(),
            tcp_total: Family::default(),
            tcp_read_bytes: Family::default(),
            tcp_write_bytes: Family::default(),
            detections: Family::default(),
            detect_duration: Family::new_with_constructor(latency_histogram),
        };
        let r = registry;
        r.register(
            "trellis_requests",
            "HTTP requests and gRPC calls by route, backend and status",
            m.requests.clone(),
        );
        r.register(
            "trellis_request_duration_seconds",
            "Time from receiving a request to its response headers",
            m.request_duration.clone(),
        );
        r.register(
            "trellis_retries",
            "Attempts after the first: route retries and fail-over after a failed connect",
            m.retries.clone(),
        );
        r.register(
            "trellis_retry_budget_exhausted",
            "Retries not made because the backend's retry budget was spent",
            m.retry_budget_exhausted.clone(),
        );
        r.register(
            "trellis_timeouts",
            "Requests answered 504, or response streams cut, because a route timeout expired",
            m.timeouts.clone(),
        );
        r.register(
            "trellis_endpoint_ejections",
            "Endpoints ejected from load balancing after consecutive failures",
            m.ejections.clone(),
        );
        r.register(
            "trellis_mirrors",
            "Copies of requests sent by RequestMirror filters",
            m.mirrors.clone(),
        );
        r.register(
            "trellis_proxy_errors",
            "Requests and connections the proxy answered or closed itself",
            m.errors.clone(),
        );
        r.register(
            "trellis_tcp_open_connections",
            "Client connections open",
            m.tcp_open.clone(),
        );
        r.register(
            "trellis_tcp_connections",
            "Client connections accepted",
            m.tcp_total.clone(),
        );
        r.register(
            "trellis_tcp_read_bytes",
            "Bytes read from clients of opaque TCP connections",
            m.tcp_read_bytes.clone(),
        );
        r.register(
            "trellis_tcp_write_bytes",
            "Bytes written to clients of opaque TCP connections",
            m.tcp_write_bytes.clone(),
        );
        r.register(
            "trellis_protocol_detections",
            "Connections by detected protocol",
            m.detections.clone(),
        );
        r.register(
            "trellis_protocol_detection_seconds",
            "Time spent detecting a connection's protocol",
            m.detect_duration.clone(),
        );
        m
    }

    /// Records a finished detection; `took` is `None` when none was needed (an opaque port).
    pub fn detected(
        &self,
        direction: &'static str,
        protocol: &'static str,
        took: Option<std::time::Duration>,
    ) {
        if let Some(took) = took {
            self.detect_duration
                .get_or_create(&DirectionLabels { direction })
                .observe(took.as_secs_f64());
        }
        self.detections
            .get_or_create(&DetectLabels {
                direction,
                protocol,
            })
            .inc();
    }

    /// Records a request whose response headers are going out. A connection's requests mostly
    /// share their labels: `cache` keeps the last labels' series, so that a repeat skips
    /// hashing the labels and locking both families.
    pub fn request(&self, cache: &RequestCache, labels: RequestLabels, took: std::time::Duration) {
        self.request_with_status(cache, labels, "", took);
    }

    /// As [`Metrics::request`], for a gRPC call whose status is known.
    pub fn request_with_status(
        &self,
        cache: &RequestCache,
        labels: RequestLabels,
        grpc_status: &'static str,
        took: std::time::Duration,
    ) {
        let key = RequestKey {
            labels,
            grpc_status,
        };
        let mut last = match cache.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(series) = last.as_ref().filter(|s| s.key == key) {
            series.duration.observe(took.as_secs_f64());
            series.count.inc();
            return;
        }
        let series = RequestSeries {
            duration: self.request_duration.get_or_create(&key).clone(),
            count: self.requests.get_or_create(&key).clone(),
            key,
        };
        series.duration.observe(took.as_secs_f64());
        series.count.inc();
        *last = Some(series);
    }

    /// Records a gRPC call whose status comes in the response's trailers: the returned body
    /// passes `body` on and counts the call when the trailers pass (or the body ends or is
    /// dropped without them, with an empty status). `took` is still the time to the headers.
    pub fn request_at_trailers(
        &self,
        labels: RequestLabels,
        took: std::time::Duration,
        body: crate::http::Body,
    ) -> crate::http::Body {
        use http_body_util::BodyExt as _;
        GrpcStatusBody {
            inner: body,
            record: Some(Record {
                requests: self.requests.clone(),
                durations: self.request_duration.clone(),
                labels,
                took,
            }),
        }
        .boxed_unsync()
    }

    pub fn error(&self, direction: &'static str, reason: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { direction, reason })
            .inc();
    }
}

/// The label value of a gRPC status header: `0`…`16`, `other` for anything else.
pub fn grpc_status_label(value: &[u8]) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .and_then(|n| CODES.get(n).copied())
        .unwrap_or("other")
}

/// A gRPC response body that counts its call once its status is known.
struct GrpcStatusBody {
    inner: crate::http::Body,
    record: Option<Record>,
}

struct Record {
    requests: Family<RequestKey, Counter>,
    durations: Family<RequestKey, Histogram, fn() -> Histogram>,
    labels: RequestLabels,
    took: std::time::Duration,
}

impl Record {
    fn done(self, grpc_status: &'static str) {
        let key = RequestKey {
            labels: self.labels,
            grpc_status,
        };
        self.durations
            .get_or_create(&key)
            .observe(self.took.as_secs_f64());
        self.requests.get_or_create(&key).inc();
    }
}

impl hyper::body::Body for GrpcStatusBody {
    type Data = bytes::Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(ready) = &polled {
            let status = match ready {
                Some(Ok(frame)) => frame.trailers_ref().map(|t| {
                    t.get("grpc-status")
                        .map_or("", |v| grpc_status_label(v.as_bytes()))
                }),
                Some(Err(_)) | None => Some(""),
            };
            if let Some(status) = status
                && let Some(record) = self.record.take()
            {
                record.done(status);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GrpcStatusBody {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.done("");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn labels(empty: &Arc<str>) -> RequestLabels {
        RequestLabels {
            direction: "outbound",
            parent: empty.clone(),
            route_kind: "GRPCRoute",
            route: empty.clone(),
            rule: empty.clone(),
            backend: empty.clone(),
            peer_identity: empty.clone(),
            status: 200,
        }
    }

    fn count(m: &Metrics, grpc_status: &'static str) -> u64 {
        let empty: Arc<str> = Arc::from("");
        m.requests
            .get_or_create(&RequestKey {
                labels: labels(&empty),
                grpc_status,
            })
            .get()
    }

    #[tokio::test]
    async fn a_grpc_call_is_counted_with_the_status_of_its_trailers() {
        let m = Metrics::new(&mut Registry::default());
        let empty: Arc<str> = Arc::from("");
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
        let body = Trailers(Some(trailers)).boxed_unsync();
        let body = m.request_at_trailers(labels(&empty), std::time::Duration::ZERO, body);
        assert_eq!(count(&m, "14"), 0);
        let collected = body.collect().await.unwrap();
        assert!(collected.trailers().is_some());
        assert_eq!(count(&m, "14"), 1);
        // Dropped before the trailers: counted without a status.
        let body = m.request_at_trailers(
            labels(&empty),
            std::time::Duration::ZERO,
            crate::http::full(bytes::Bytes::from_static(b"x")),
        );
        drop(body);
        assert_eq!(count(&m, ""), 1);
        assert_eq!(grpc_status_label(b"0"), "0");
        assert_eq!(grpc_status_label(b"16"), "16");
        assert_eq!(grpc_status_label(b"17"), "other");
        assert_eq!(grpc_status_label(b"x"), "other");
    }

    /// A body of one trailers frame.
    struct Trailers(Option<http::HeaderMap>);

    impl hyper::body::Body for Trailers {
        type Data = bytes::Bytes;
        type Error = crate::http::BoxError;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>>
        {
            std::task::Poll::Ready(self.0.take().map(|t| Ok(hyper::body::Frame::trailers(t))))
        }
    }
}
