//! Identity's metrics, served on the admin port's `/metrics`.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `trellis_identity_certificates_issued_total` | counter | |
//! | `trellis_identity_certify_rejected_total` | counter | `reason` (the answer's error code) |
//! | `trellis_identity_certify_throttled_total` | counter | `reason` (`rate_limited`: a caller over its TokenReview rate, answered 429; `overloaded`: no turn within the queue timeout, answered 503); not counted in `certify_rejected_total` |
//! | `trellis_identity_certify_duration_seconds` | histogram | |
//! | `trellis_identity_issuer_expiry_timestamp_seconds` | gauge | |
//! | `trellis_identity_issuer_reloads_total` | counter | `result` (`applied`, `rejected`) |

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use trellis_api::certify::ErrorCode;

use crate::ca::unix_seconds;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Cheap to clone: every field is a handle on shared atomics.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
    issued: Counter,
    rejected: Family<ReasonLabels, Counter>,
    throttled: Family<ReasonLabels, Counter>,
    duration: Histogram,
    issuer_expiry: Gauge<i64>,
    reloads: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis_identity");
        let issued = Counter::default();
        registry.register(
            "certificates_issued",
            "Workload certificates signed",
            issued.clone(),
        );
        let rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "certify_rejected",
            "Certify requests refused, by the answer's error code",
            rejected.clone(),
        );
        let throttled = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "certify_throttled",
            "Certify requests refused by a limit: rate_limited (per caller) or overloaded",
            throttled.clone(),
        );
        // 1 ms to 10 s: signing takes about a millisecond, a TokenReview a few; the upper
        // buckets show a slow or unreachable API server.
        let duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register_with_unit(
            "certify_duration",
            "Time from a certify request's arrival to its answer",
            Unit::Seconds,
            duration.clone(),
        );
        let issuer_expiry = Gauge::<i64>::default();
        registry.register(
            "issuer_expiry_timestamp_seconds",
            "When the current issuer certificate expires (Unix time)",
            issuer_expiry.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "issuer_reloads",
            "Changed trust anchors or issuer seen, applied or rejected",
            reloads.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            issued,
            rejected,
            throttled,
            duration,
            issuer_expiry,
            reloads,
        }
    }

    pub fn issued(&self, elapsed: Duration) {
        self.issued.inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub fn rejected(&self, code: ErrorCode, elapsed: Duration) {
        self.rejected
            .get_or_create(&ReasonLabels {
                reason: code.as_str(),
            })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub fn throttled(&self, reason: &'static str, elapsed: Duration) {
        self.throttled.get_or_create(&ReasonLabels { reason }).inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub fn issuer_expires(&self, not_after: SystemTime) {
        self.issuer_expiry
            .set(i64::try_from(unix_seconds(not_after)).unwrap_or(i64::MAX));
    }

    pub fn reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        trellis_admin::encode(&self.registry)
    }
}

impl trellis_admin::Exposition for Metrics {
    fn encode(&self) -> String {
        Metrics::encode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let metrics = Metrics::new();
        metrics.issued(Duration::from_millis(2));
        metrics.rejected(ErrorCode::IdentityMismatch, Duration::from_millis(3));
        metrics.issuer_expires(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        metrics.reload(false);
        let text = metrics.encode();
        for line in [
            "trellis_identity_certificates_issued_total 1",
            "trellis_identity_certify_rejected_total{reason=\"identity_mismatch\"} 1",
            "trellis_identity_certify_duration_seconds_count 2",
            "trellis_identity_certify_duration_seconds_bucket{le=\"0.0025\"} 1",
            "trellis_identity_issuer_expiry_timestamp_seconds 1800000000",
            "trellis_identity_issuer_reloads_total{result=\"rejected\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
