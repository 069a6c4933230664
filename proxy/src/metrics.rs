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

/// One connection's last request series; see [`Metrics::request`].
#[derive(Debug, Default)]
pub struct RequestCache(Mutex<Option<RequestSeries>>);

#[derive(Debug)]
struct RequestSeries {
    labels: RequestLabels,
    count: Counter,
    duration: Histogram,
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
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub retries: Family<DirectionLabels, Counter>,
    pub timeouts: Family<DirectionLabels, Counter>,
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
            timeouts: Family::default(),
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
            "Requests sent again by a route's retry policy",
            m.retries.clone(),
        );
        r.register(
            "trellis_timeouts",
            "Requests answered 504 because a route timeout expired",
            m.timeouts.clone(),
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
        let mut last = match cache.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(series) = last.as_ref().filter(|s| s.labels == labels) {
            series.duration.observe(took.as_secs_f64());
            series.count.inc();
            return;
        }
        let series = RequestSeries {
            duration: self.request_duration.get_or_create(&labels).clone(),
            count: self.requests.get_or_create(&labels).clone(),
            labels,
        };
        series.duration.observe(took.as_secs_f64());
        series.count.inc();
        *last = Some(series);
    }

    pub fn error(&self, direction: &'static str, reason: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { direction, reason })
            .inc();
    }
}
