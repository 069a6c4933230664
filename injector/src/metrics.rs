//! The injector's own metrics, served on the admin port's `/metrics`.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `trellis_injector_admission_requests_total` | counter | `outcome` (`injected`, `skipped`, `denied`, `ignored`, `error`), `reason` (for `error`: `malformed`, `too_large` (413), `timeout` (408), `overloaded` (503, no room in the body buffer or no turn within the queue timeout)) |
//! | `trellis_injector_admission_duration_seconds` | histogram | |
//! | `trellis_injector_certificate_expiry_timestamp_seconds` | gauge | |
//! | `trellis_injector_ca_bundle_updates_total` | counter | |

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::admission::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
    reason: &'static str,
}

/// Cheap to clone: every field is a handle on shared atomics.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<OutcomeLabels, Counter>,
    duration: Histogram,
    certificate_expiry: Gauge<i64>,
    ca_bundle_updates: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis_injector");
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "admission_requests",
            "AdmissionReviews answered, by outcome and reason",
            requests.clone(),
        );
        // 50 µs to about 0.8 s: the webhook answers in well under a millisecond, and the API
        // server gives up after the webhook's timeoutSeconds (10 s by default).
        let duration = Histogram::new([
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0,
        ]);
        registry.register_with_unit(
            "admission_duration",
            "Time from a review's arrival to its answer",
            Unit::Seconds,
            duration.clone(),
        );
        let certificate_expiry = Gauge::<i64>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the serving certificate expires (Unix time)",
            certificate_expiry.clone(),
        );
        let ca_bundle_updates = Counter::default();
        registry.register(
            "ca_bundle_updates",
            "Times the MutatingWebhookConfiguration's caBundle was corrected",
            ca_bundle_updates.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            requests,
            duration,
            certificate_expiry,
            ca_bundle_updates,
        }
    }

    pub fn admission(&self, outcome: Outcome, elapsed: Duration) {
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.outcome,
                reason: outcome.reason,
            })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub fn certificate_expires(&self, not_after: SystemTime) {
        let secs = not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.certificate_expiry.set(secs);
    }

    pub fn ca_bundle_updated(&self) {
        self.ca_bundle_updates.inc();
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
        metrics.admission(
            Outcome {
                outcome: "skipped",
                reason: "opted_out",
            },
            Duration::from_micros(120),
        );
        metrics.ca_bundle_updated();
        let text = metrics.encode();
        for line in [
            "trellis_injector_admission_requests_total{outcome=\"skipped\",reason=\"opted_out\"} 1",
            "trellis_injector_admission_duration_seconds_count 1",
            "trellis_injector_admission_duration_seconds_bucket{le=\"0.00025\"} 1",
            "trellis_injector_ca_bundle_updates_total 1",
            "trellis_injector_certificate_expiry_timestamp_seconds 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
