//! The arithmetic of `stat`, apart from any I/O: which series count, deltas between two
//! scrapes, sums per row, success rates and latency percentiles.

use std::collections::BTreeMap;

use serde::Serialize;

use super::text::Sample;

/// The request counter and the latency histogram's buckets (proxy-metrics.md, "Requests").
pub const REQUESTS: &str = "trellis_requests_total";
pub const BUCKETS: &str = "trellis_request_duration_seconds_bucket";

/// The requests a table shows.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `outbound` or `inbound`.
    pub direction: String,
    /// `namespace/name` of a route.
    pub route: Option<String>,
    pub parent: Option<ParentFilter>,
}

impl Filter {
    pub fn matches(&self, label: impl Fn(&str) -> String) -> bool {
        label("direction") == self.direction
            && self.route.as_ref().is_none_or(|r| label("route") == *r)
            && self
                .parent
                .as_ref()
                .is_none_or(|p| p.matches(&label("parent")))
    }
}

/// A parent Service as users write it: `name.namespace`, optionally `:port`.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentFilter {
    pub namespace: String,
    pub name: String,
    pub port: Option<u16>,
}

impl ParentFilter {
    /// `SVC.NS` or `SVC.NS:PORT`; the metric's own spelling `NS/SVC[:PORT]` is taken too.
    pub fn parse(s: &str) -> Result<ParentFilter, String> {
        let bad = || format!("--parent {s:?}: expected SERVICE.NAMESPACE, optionally :PORT");
        let (service, port) = match s.rsplit_once(':') {
            Some((service, port)) => (service, Some(port.parse::<u16>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let (namespace, name) = if let Some((ns, name)) = service.split_once('/') {
            (ns, name)
        } else {
            let (name, ns) = service.split_once('.').ok_or_else(bad)?;
            (ns, name)
        };
        if namespace.is_empty() || name.is_empty() || namespace.contains(['.', '/']) {
            return Err(bad());
        }
        Ok(ParentFilter {
            namespace: namespace.to_string(),
            name: name.to_string(),
            port,
        })
    }

    /// Whether a `parent` label (`namespace/name:port`) is this Service.
    pub fn matches(&self, parent: &str) -> bool {
        let (service, port) = parent.rsplit_once(':').unwrap_or((parent, ""));
        service == format!("{}/{}", self.namespace, self.name)
            && self.port.is_none_or(|p| port == p.to_string())
    }
}

/// One series: its metric name and every label.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SeriesId {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl SeriesId {
    fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// The counters of one sidecar that a table reads: requests and latency buckets.
pub type Counters = BTreeMap<SeriesId, f64>;

/// The samples of `samples` that `filter` keeps.
pub fn counters(samples: &[Sample], filter: &Filter) -> Counters {
    samples
        .iter()
        .filter(|s| s.name == REQUESTS || s.name == BUCKETS)
        .filter(|s| filter.matches(|l| s.label(l).to_string()))
        .map(|s| {
            (
                SeriesId {
                    name: s.name.clone(),
                    labels: s.labels.clone(),
                },
                s.value,
            )
        })
        .collect()
}

/// What each series counted between two scrapes of one sidecar. A series that went down was
/// reset (the sidecar restarted): everything it counts now is new, as Prometheus' `rate` reads
/// it. A series missing from the first scrape started at zero.
pub fn delta(before: &Counters, after: &Counters) -> Counters {
    after
        .iter()
        .map(|(id, &now)| {
            let then = before.get(id).copied().unwrap_or(0.0);
            let d = if now < then { now } else { now - then };
            (id.clone(), d)
        })
        .collect()
}

/// A row of the table: where requests went.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RowKey {
    /// `namespace/name:port` of the Service the client addressed.
    pub parent: String,
    /// `namespace/name` of the route.
    pub route: String,
    pub rule: String,
    /// `namespace/name:port` of the backend Service.
    pub backend: String,
}

impl RowKey {
    pub fn of(label: impl Fn(&str) -> String) -> RowKey {
        RowKey {
            parent: label("parent"),
            route: label("route"),
            rule: label("rule"),
            backend: label("backend"),
        }
    }
}

/// Sums over every sidecar, for one row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    pub requests: f64,
    pub successes: f64,
    /// Requests per second; `None` for totals since the sidecars started.
    pub per_second: Option<f64>,
    /// Cumulative bucket counts by their `le` label: (upper bound, count).
    pub buckets: BTreeMap<String, (f64, f64)>,
}

/// Adds one sidecar's counters to `tallies`: deltas over `seconds`, or totals (`None`).
pub fn tally(tallies: &mut BTreeMap<RowKey, Tally>, counters: &Counters, seconds: Option<f64>) {
    for (id, &value) in counters {
        let row = tallies
            .entry(RowKey::of(|l| id.label(l).to_string()))
            .or_default();
        if id.name == REQUESTS {
            row.requests += value;
            if is_success(id.label("status"), id.label("grpc_status")) {
                row.successes += value;
            }
            if let Some(s) = seconds.filter(|s| *s > 0.0) {
                row.per_second = Some(row.per_second.unwrap_or(0.0) + value / s);
            }
        } else if let Some(le) = super::text::parse_value(id.label("le")) {
            let bucket = row
                .buckets
                .entry(id.label("le").to_string())
                .or_insert((le, 0.0));
            bucket.1 += value;
        }
    }
}

/// Whether a request succeeded: any HTTP status but 5xx; for a gRPC call with a status, any
/// code but those gRPC maps to a 5xx (UNKNOWN 2, DEADLINE_EXCEEDED 4, UNIMPLEMENTED 12,
/// INTERNAL 13, UNAVAILABLE 14, DATA_LOSS 15) and codes out of range.
pub fn is_success(status: &str, grpc_status: &str) -> bool {
    if !grpc_status.is_empty() {
        return !matches!(grpc_status, "2" | "4" | "12" | "13" | "14" | "15" | "other");
    }
    status
        .parse::<u16>()
        .is_ok_and(|s| !(500..600).contains(&s))
}

/// One line of the table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub key: RowKey,
    pub requests: f64,
    /// Share of requests that succeeded, 0 to 1; `None` without requests.
    pub success_rate: Option<f64>,
    pub requests_per_second: Option<f64>,
    pub p50_seconds: Option<f64>,
    pub p95_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
}

/// The rows of `tallies`, sorted by parent, route, rule and backend.
pub fn rows(tallies: &BTreeMap<RowKey, Tally>) -> Vec<Row> {
    tallies
        .iter()
        .map(|(key, t)| {
            let buckets: Vec<(f64, f64)> = t.buckets.values().copied().collect();
            let q = |q| histogram_quantile(q, &buckets);
            Row {
                key: key.clone(),
                requests: t.requests,
                success_rate: (t.requests > 0.0).then(|| t.successes / t.requests),
                requests_per_second: t.per_second,
                p50_seconds: q(0.5),
                p95_seconds: q(0.95),
                p99_seconds: q(0.99),
            }
        })
        .collect()
}

/// The `q`-quantile of a histogram given as cumulative buckets (upper bound, count), computed
/// as Prometheus' `histogram_quantile` does: find the bucket holding the rank and interpolate
/// linearly inside it; in the `+Inf` bucket, the highest finite bound. `None` where Prometheus
/// gives NaN: no `+Inf` bucket, fewer than two buckets, or no observations.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    if q.is_nan() {
        return None;
    }
    if q < 0.0 {
        return Some(f64::NEG_INFINITY);
    }
    if q > 1.0 {
        return Some(f64::INFINITY);
    }
    let mut b: Vec<(f64, f64)> = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    if b.len() < 2 || b.last().is_none_or(|l| l.0 != f64::INFINITY) {
        return None;
    }
    // Counts from different sidecars or scrapes can be slightly out of step: force them
    // monotonic, as Prometheus does.
    for i in 1..b.len() {
        if b[i].1 < b[i - 1].1 {
            b[i].1 = b[i - 1].1;
        }
    }
    let observations = b[b.len() - 1].1;
    if observations <= 0.0 {
        return None;
    }
    let mut rank = q * observations;
    let i = b.partition_point(|x| x.1 < rank);
    if i == b.len() - 1 {
        return Some(b[b.len() - 2].0);
    }
    if i == 0 && b[0].0 <= 0.0 {
        return Some(b[0].0);
    }
    let (mut start, end, mut count) = (0.0, b[i].0, b[i].1);
    if i > 0 {
        start = b[i - 1].0;
        count -= b[i - 1].1;
        rank -= b[i - 1].1;
    }
    if count <= 0.0 {
        // Only for q = 0 over leading empty buckets.
        return Some(start);
    }
    Some(start + (end - start) * (rank / count))
}
