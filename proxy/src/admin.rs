//! The admin server (port 4191): metrics for Prometheus, probes for the kubelet, the app's own
//! probes checked on the kubelet's behalf, and the discovery state for people debugging routing.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text format 0.0.4, or OpenMetrics 1.0 when `Accept` prefers it |
//! | `GET /ready` | 200 `ready` once the proxy serves traffic with a valid certificate, else 503 and why |
//! | `GET /live` | 200 `live` while the process answers |
//! | `GET /app-health/<container>/<probe>` | the app's original probe, checked now: 200 or 503 and why |
//! | `GET /config` | JSON: the namespace and every followed destination's snapshot, with when it was received; loopback clients only unless `--admin-config-public` |
//!
//! Other paths answer 404, other methods 405. HTTP/1.1 and HTTP/2 (prior knowledge) share the
//! port. The port is open to the pod network (the kubelet and Prometheus reach it there), so
//! what would tell another pod about the mesh (`/config`: every destination, endpoint, identity
//! and header value) is kept to clients inside the pod: `kubectl port-forward` and
//! `kubectl exec` arrive on loopback.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use trellis_api::probes::APP_HEALTH_PREFIX;
use trellis_tls::Credentials;

use crate::discovery::Discovery;
use crate::probes::AppHealth;

/// Content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics text.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long shutdown waits for open admin connections (scrapes in flight) to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that sends its request head slower than this is cut off, so idle sockets do not pile
/// up on a port open to the pod network.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin server reports on.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// Every metric of the proxy, encoded on each scrape.
    pub registry: Arc<Registry>,
    /// Set once the listeners serve; cleared when draining so that the pod leaves endpoints.
    pub ready: Arc<AtomicBool>,
    pub discovery: Discovery,
    /// With identity on, the workload certificate: `/ready` needs one that is valid now, since
    /// peers refuse an expired one and the pod must leave its Services' endpoints.
    pub credentials: Option<Arc<Credentials>>,
    /// The app's probes, checked at `/app-health/...`.
    pub app_health: Arc<AppHealth>,
    /// Serve `/config` to every client, not only loopback ones (`--admin-config-public`).
    pub config_public: bool,
    /// Set when shutdown begins: `/ready` answers 503 from then on.
    pub draining: Arc<crate::proxy::Draining>,
}

/// Serves the admin routes on `listener` until `shutdown` completes, then stops accepting and
/// gives open connections a bounded time to finish.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let state = Arc::new(state);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Resource exhaustion (EMFILE…) passes; a tight retry loop would not help it.
                Err(e) => {
                    tracing::warn!("admin: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Both ends on loopback: a client inside the pod. The local address matters too: the
        // sidecar's own deliveries leave from 127.0.0.6 towards the pod IP.
        let local = stream.local_addr().ok();
        let inside = is_loopback(peer.ip()) && local.is_some_and(|l| is_loopback(l.ip()));
        let state = state.clone();
        let service = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(&req, &state, inside).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "admin connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("admin: connections still open after {DRAIN_TIMEOUT:?}, closing them");
    }
    Ok(())
}

/// Whether `ip` is a loopback address, IPv4-mapped ones included (a dual-stack listener).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

async fn handle<B>(req: &Request<B>, state: &AdminState, inside: bool) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let app_health = path.strip_prefix(APP_HEALTH_PREFIX);
    if !matches!(path, "/metrics" | "/ready" | "/live" | "/config" | "/drain")
        && app_health.is_none()
    {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if path == "/drain" {
        // From the pod only (`trellis-proxy drain`, a preStop hook): a peer must not be able
        // to take the pod out of its Services.
        if req.method() != Method::POST || !inside {
            return text(
                StatusCode::FORBIDDEN,
                "/drain takes a POST from inside the pod (trellis-proxy drain)\n",
            );
        }
        state.draining.start();
        return text(StatusCode::ACCEPTED, "draining\n");
    }
    if req.method() != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    if let Some(key) = app_health {
        return match state.app_health.check(key).await {
            None => owned_text(StatusCode::NOT_FOUND, format!("no app probe {key:?}\n")),
            Some(Ok(what)) => owned_text(StatusCode::OK, format!("ok: {what}\n")),
            Some(Err(e)) => owned_text(StatusCode::SERVICE_UNAVAILABLE, format!("{key}: {e}\n")),
        };
    }
    match path {
        "/metrics" => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            metrics(&state.registry, accept.is_some_and(prefers_openmetrics))
        }
        "/ready" => ready(state),
        "/live" => text(StatusCode::OK, "live\n"),
        _ if !inside && !state.config_public => text(
            StatusCode::FORBIDDEN,
            "/config is served to clients inside the pod only (kubectl port-forward, kubectl exec); \
             --admin-config-public serves it to every client\n",
        ),
        _ => config(&state.discovery),
    }
}

/// 200 while the proxy serves traffic and, with identity on, holds a certificate peers accept.
fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    if state.draining.is_started() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n");
    }
    if !state.ready.load(Ordering::Acquire) {
        return text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n");
    }
    match state.credentials.as_ref().map(|c| c.state()) {
        Some(cert) if !cert.is_valid() => owned_text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {cert}\n"),
        ),
        _ => text(StatusCode::OK, "ready\n"),
    }
}

fn owned_text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = text(status, "");
    *response.body_mut() = Full::new(Bytes::from(body));
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn metrics(registry: &Registry, openmetrics: bool) -> Response<Full<Bytes>> {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
        tracing::error!("admin: cannot encode the metrics: {e}");
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        );
    }
    let (body, content_type) = if openmetrics {
        (body, OPENMETRICS_TEXT)
    } else {
        (openmetrics_to_prometheus(&body), PROMETHEUS_TEXT)
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn config(discovery: &Discovery) -> Response<Full<Bytes>> {
    let destinations: Vec<_> = discovery
        .held()
        .into_iter()
        .map(|held| {
            serde_json::json!({
                "target": held.target,
                "policy": held.policy,
                "received_at": held.received_at.map(trellis_api::time::rfc3339_millis),
                // Milliseconds are plenty, and keep the number short.
                "age_seconds": held.age.map(|age| age.as_millis() as f64 / 1000.0),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "namespace": discovery.namespace(),
        "destinations": destinations,
    });
    match serde_json::to_vec_pretty(&doc) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => {
            tracing::error!("admin: cannot encode the configuration: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the configuration\n",
            )
        }
    }
}

/// Whether an `Accept` header ranks OpenMetrics at least as high as plain text. Prometheus asks
/// for both with weights (`application/openmetrics-text;version=1.0.0;q=0.5,…,text/plain;
/// version=0.0.4;q=0.3,*/*;q=0.2`); a bare `*/*` or no header gets plain text.
pub fn prefers_openmetrics(accept: &str) -> bool {
    let (mut openmetrics, mut plain) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let (mut q, mut version_ok) = (1.0f32, true);
        for param in parts {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key.trim().to_ascii_lowercase().as_str() {
                "q" => q = value.trim().parse().unwrap_or(0.0),
                "version" => version_ok = matches!(value.trim(), "1.0.0" | "0.0.1"),
                _ => {}
            }
        }
        match media.as_str() {
            "application/openmetrics-text" if version_ok => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => plain = plain.max(q),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= plain
}

/// Turns prometheus-client's OpenMetrics output into the Prometheus text format 0.0.4, which
/// names a family by its sample names: counters get `_total` (and info metrics `_info`) in
/// `HELP`/`TYPE`, types 0.0.4 lacks become `gauge` or `untyped`, and `# UNIT`, `# EOF` and
/// exemplars go.
pub fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    let mut types: HashMap<&str, &str> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            types.insert(name, kind.trim());
        }
    }
    let rename = |name: &str| -> (String, &'static str) {
        match types.get(name).copied() {
            Some("counter") => (format!("{name}_total"), "counter"),
            Some("info") => (format!("{name}_info"), "gauge"),
            Some("gauge" | "stateset") => (name.to_string(), "gauge"),
            Some("histogram") => (name.to_string(), "histogram"),
            Some("summary") => (name.to_string(), "summary"),
            _ => (name.to_string(), "untyped"),
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", rename(name).0));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map_or(rest, |(n, _)| n);
            let (name, kind) = rename(name);
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with('#') {
            continue;
        } else {
            out.push_str(without_exemplar(line));
            out.push('\n');
        }
    }
    out
}

/// A sample line without its OpenMetrics exemplar (`… # {labels} value`), which 0.0.4 lacks.
fn without_exemplar(line: &str) -> &str {
    // Skip the label set, whose quoted values may contain " # ".
    let mut after_labels = 0;
    if let Some(open) = line.find('{').filter(|i| !line[..*i].contains(' ')) {
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in line[open..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    after_labels = open + i;
                    break;
                }
                _ => {}
            }
        }
    }
    match line[after_labels..].find(" # ") {
        Some(i) => &line[..after_labels + i],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_clients() {
        for ip in ["127.0.0.1", "127.0.0.6", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.0.1", "::ffff:10.0.0.1", "fd00::1", "0.0.0.0"] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn accept_negotiation() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert!(prefers_openmetrics(prometheus));
        assert!(prefers_openmetrics("application/openmetrics-text"));
        assert!(prefers_openmetrics(
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        ));
        assert!(!prefers_openmetrics("*/*"));
        assert!(!prefers_openmetrics("text/plain"));
        assert!(!prefers_openmetrics(
            "text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5"
        ));
        assert!(!prefers_openmetrics("application/openmetrics-text;q=0"));
        assert!(!prefers_openmetrics(
            "application/openmetrics-text;version=2.0.0"
        ));
    }

    #[test]
    fn converts_to_the_prometheus_text_format() {
        let om = "\
# HELP reqs Requests.
# TYPE reqs counter
reqs_total{code=\"200\"} 3 # {trace=\"a # b\"} 1.0
# HELP up_time_seconds Uptime.
# TYPE up_time_seconds gauge
# UNIT up_time_seconds seconds
up_time_seconds 1.5
# HELP build Build.
# TYPE build info
build_info{version=\"x # y}\"} 1
# TYPE lat histogram
lat_bucket{le=\"+Inf\"} 1
lat_sum 0.1
lat_count 1
# TYPE odd unknown
odd 1
# EOF
";
        let want = "\
# HELP reqs_total Requests.
# TYPE reqs_total counter
reqs_total{code=\"200\"} 3
# HELP up_time_seconds Uptime.
# TYPE up_time_seconds gauge
up_time_seconds 1.5
# HELP build_info Build.
# TYPE build_info gauge
build_info{version=\"x # y}\"} 1
# TYPE lat histogram
lat_bucket{le=\"+Inf\"} 1
lat_sum 0.1
lat_count 1
# TYPE odd untyped
odd 1
";
        assert_eq!(openmetrics_to_prometheus(om), want);
    }
}
