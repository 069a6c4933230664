//! The Prometheus source: the same table from PromQL over Prometheus' HTTP API
//! (`/api/v1/query`): `rate` of the request counter by status, and `histogram_quantile` of the
//! latency buckets, both summed over every sidecar Prometheus scrapes.

use std::collections::BTreeMap;
use std::time::Duration;

use http::Uri;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use super::compute::{BUCKETS, Filter, REQUESTS, Row, RowKey, Tally, is_success, rows};
use super::scrape::{HttpClient, ScrapeError, admin_get};

/// One series of a query's answer: its labels and value (`None` for NaN).
pub type Series = (BTreeMap<String, String>, Option<f64>);

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Http(#[from] ScrapeError),
    #[error("not a Prometheus API answer: {0}")]
    Answer(String),
    #[error("Prometheus refused {query}: {error}")]
    Refused { query: String, error: String },
}

/// The label matchers of `filter`, as PromQL writes them.
pub fn matchers(filter: &Filter) -> String {
    let mut m = vec![format!("direction=\"{}\"", escape(&filter.direction))];
    if let Some(route) = &filter.route {
        m.push(format!("route=\"{}\"", escape(route)));
    }
    if let Some(p) = &filter.parent {
        let service = regex::escape(&format!("{}/{}", p.namespace, p.name));
        let port = p.port.map_or(".*".to_string(), |p| p.to_string());
        m.push(format!(
            "parent=~\"{}\"",
            escape(&format!("{service}:{port}"))
        ));
    }
    m.join(", ")
}

/// A PromQL string literal's content.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// A range as PromQL writes it: `10s`, `1500ms`.
pub fn range(window: Duration) -> String {
    if window.subsec_millis() == 0 {
        format!("{}s", window.as_secs())
    } else {
        format!("{}ms", window.as_millis())
    }
}

/// The PromQL of the request rates, by row and status.
pub fn requests_query(filter: &Filter, window: Duration) -> String {
    format!(
        "sum by (parent, route, rule, backend, status, grpc_status) (rate({REQUESTS}{{{}}}[{}]))",
        matchers(filter),
        range(window)
    )
}

/// The PromQL of one latency quantile, by row.
pub fn quantile_query(q: f64, filter: &Filter, window: Duration) -> String {
    format!(
        "histogram_quantile({q}, sum by (parent, route, rule, backend, le) (rate({BUCKETS}{{{}}}[{}])))",
        matchers(filter),
        range(window)
    )
}

/// The table over the last `window`, as Prometheus sees it.
pub async fn stat(
    client: &HttpClient,
    base: &str,
    filter: &Filter,
    window: Duration,
    within: Duration,
) -> Result<Vec<Row>, QueryError> {
    let secs = window.as_secs_f64();
    let mut tallies: BTreeMap<RowKey, Tally> = BTreeMap::new();
    for (labels, rate) in query(client, base, &requests_query(filter, window), within).await? {
        let label = |l: &str| labels.get(l).cloned().unwrap_or_default();
        let row = tallies.entry(RowKey::of(label)).or_default();
        let Some(rate) = rate else { continue };
        row.requests += rate * secs;
        if is_success(&label("status"), &label("grpc_status")) {
            row.successes += rate * secs;
        }
        row.per_second = Some(row.per_second.unwrap_or(0.0) + rate);
    }
    let mut table = rows(&tallies);
    for (q, set) in [
        (
            0.5,
            (|r: &mut Row, v| r.p50_seconds = v) as fn(&mut Row, Option<f64>),
        ),
        (0.95, |r: &mut Row, v| r.p95_seconds = v),
        (0.99, |r: &mut Row, v| r.p99_seconds = v),
    ] {
        let found = query(client, base, &quantile_query(q, filter, window), within).await?;
        for (labels, value) in found {
            let key = RowKey::of(|l| labels.get(l).cloned().unwrap_or_default());
            if let Some(row) = table.iter_mut().find(|r| r.key == key) {
                set(row, value);
            }
        }
    }
    Ok(table)
}

/// One instant query: each series' labels and value (`None` for NaN). Prometheus leaves out
/// labels whose value is empty; readers take a missing label as empty.
pub async fn query(
    client: &HttpClient,
    base: &str,
    promql: &str,
    within: Duration,
) -> Result<Vec<Series>, QueryError> {
    let url = format!(
        "{}/api/v1/query?query={}",
        base.trim_end_matches('/'),
        utf8_percent_encode(promql, NON_ALPHANUMERIC)
    );
    let uri: Uri = url
        .parse()
        .map_err(|e| QueryError::Answer(format!("{url}: {e}")))?;
    let text = tokio::time::timeout(within, admin_get(client, uri))
        .await
        .map_err(|_| ScrapeError::Timeout(within))?;
    let text = match text {
        Ok(t) => t,
        // A refused query comes back 400 or 422 with the reason in a JSON body.
        Err(ScrapeError::Status(status, body)) => {
            return match parse_answer(promql, &body) {
                Err(refused @ QueryError::Refused { .. }) => Err(refused),
                _ => Err(ScrapeError::Status(status, body).into()),
            };
        }
        Err(e) => return Err(e.into()),
    };
    parse_answer(promql, &text)
}

/// The vector of an `/api/v1/query` answer.
pub fn parse_answer(promql: &str, text: &str) -> Result<Vec<Series>, QueryError> {
    let answer: Value =
        serde_json::from_str(text).map_err(|e| QueryError::Answer(e.to_string()))?;
    if answer["status"] != "success" {
        return Err(QueryError::Refused {
            query: promql.to_string(),
            error: answer["error"].as_str().unwrap_or("no reason given").into(),
        });
    }
    let Some(result) = answer["data"]["result"].as_array() else {
        return Err(QueryError::Answer("no data.result".into()));
    };
    let mut out = Vec::new();
    for series in result {
        let labels = series["metric"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let value = series["value"][1]
            .as_str()
            .and_then(super::text::parse_value)
            .filter(|v| v.is_finite());
        out.push((labels, value));
    }
    Ok(out)
}
