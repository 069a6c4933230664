//! The proxy's admin server over real sockets: metrics in both exposition formats (checked by a
//! strict reading of each format), probes, `/config` with destinations from the real
//! controller, errors, HTTP/2, and shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod proxy_discovery_support;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Unit;
use proxy_discovery_support::{client, policy_where, prefixes, write};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use trellis_api::time::rfc3339_millis as rfc3339;
use trellis_integration::manifests::{SERVICE, route};
use trellis_integration::{Controller, empty, http1_client, http2_client};
use trellis_proxy::admin::{self, AdminState, OPENMETRICS_TEXT, PROMETHEUS_TEXT};
use trellis_proxy::app::App;
use trellis_proxy::discovery::{Discovery, Subscription};
use trellis_proxy::probes::{self, AppHealth};

/// Accept header of a Prometheus server, which prefers OpenMetrics.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";

struct Admin {
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    discovery: Discovery,
    controller: Controller,
    /// The controller's manifests.
    dir: tempfile::TempDir,
}

/// An admin server over a discovery client of a real controller, with data-path-like metrics
/// beside the discovery ones (every kind the proxy registers, awkward label values included).
async fn start() -> Admin {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", SERVICE);
    let controller = Controller::start(dir.path());
    let (discovery, mut registry) = client(
        &controller.addr.to_string(),
        "shop",
        Duration::from_secs(60),
    );

    let requests = Family::<Vec<(String, String)>, Counter>::default();
    registry.register("trellis_requests", "Requests.", requests.clone());
    requests
        .get_or_create(&vec![
            ("route".into(), "shop/web".into()),
            ("odd".into(), "a \"quoted\" # {x} \\ value".into()),
        ])
        .inc();
    let latency = Histogram::new([0.01, 0.1, 1.0]);
    latency.observe(0.05);
    registry.register_with_unit(
        "trellis_request_duration",
        "Latency.",
        Unit::Seconds,
        latency,
    );
    let bytes: Counter = Counter::default();
    bytes.inc_by(42);
    registry.register_with_unit("trellis_tcp_read", "Bytes read.", Unit::Bytes, bytes);
    registry.register(
        "trellis_build",
        "Build.",
        Info::new(vec![("version".to_string(), "0.1.0".to_string())]),
    );

    // No app probes here: proxy_admin_security.rs tests them.
    let app_health = AppHealth::new(
        Default::default(),
        App::at(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        probes::DEFAULT_TIMEOUT,
        &mut registry,
    );

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ready = Arc::new(AtomicBool::new(false));
    let (stop, stopped) = oneshot::channel::<()>();
    let state = AdminState {
        registry: Arc::new(registry),
        ready: ready.clone(),
        discovery: discovery.clone(),
        credentials: None,
        app_health: Arc::new(app_health),
        config_public: false,
        draining: Default::default(),
    };
    let task = tokio::spawn(admin::serve(listener, state, async {
        let _ = stopped.await;
    }));
    Admin {
        addr,
        ready,
        stop: Some(stop),
        task,
        discovery,
        controller,
        dir,
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn call(admin: &Admin, method: Method, path: &str, accept: Option<&str>, h2: bool) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", admin.addr));
    if let Some(accept) = accept {
        req = req.header(header::ACCEPT, accept);
    }
    let req = req.body(empty()).unwrap();
    let client = if h2 { http2_client() } else { http1_client() };
    let res = client.request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn get(admin: &Admin, path: &str) -> Answer {
    call(admin, Method::GET, path, None, false).await
}

fn content_type(a: &Answer) -> &str {
    a.headers[header::CONTENT_TYPE].to_str().unwrap()
}

/// Reads the Prometheus text format 0.0.4 as strictly as Prometheus's own parser: known types
/// only, a `TYPE` before its family's samples, sample names that belong to the family, label
/// values with only the three escapes, numeric values, no other comments.
fn check_prometheus_text(text: &str) {
    let mut families: HashSet<String> = HashSet::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        macro_rules! ensure {
            ($ok:expr, $why:expr) => {
                if !$ok {
                    panic!("{}: {line:?}\n{text}", $why)
                }
            };
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            ensure!(check_name(name), "bad name");
            ensure!(helps.insert(name.to_string()), "second HELP");
            let mut chars = rest[name.len()..].chars();
            while let Some(c) = chars.next() {
                ensure!(
                    c != '\\' || matches!(chars.next(), Some('\\' | 'n')),
                    "bad escape in HELP"
                );
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE without a type");
            ensure!(check_name(name), "bad name");
            let known = ["counter", "gauge", "histogram", "summary", "untyped"];
            ensure!(known.contains(&kind), "type unknown to the text format");
            ensure!(families.insert(name.to_string()), "second TYPE");
            current = Some((name.to_string(), kind.to_string()));
        } else {
            ensure!(
                !line.starts_with('#'),
                "comment the text format does not have"
            );
            let sample = split_sample(line);
            ensure!(sample.is_some(), "bad sample");
            let (name, labels, rest) = sample.unwrap();
            ensure!(current.is_some(), "sample before any TYPE");
            let (family, kind) = current.as_ref().unwrap();
            let belongs = match kind.as_str() {
                "histogram" => {
                    (name == format!("{family}_bucket") && labels.iter().any(|(k, _)| k == "le"))
                        || name == format!("{family}_sum")
                        || name == format!("{family}_count")
                }
                _ => name == *family,
            };
            ensure!(belongs, "sample name does not belong to its family");
            let mut fields = rest.split(' ');
            let value = fields.next().unwrap_or_default();
            let numeric = value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value);
            ensure!(numeric, "value");
            if let Some(ts) = fields.next() {
                ensure!(ts.parse::<i64>().is_ok(), "timestamp");
            }
            ensure!(fields.next().is_none(), "trailing text");
        }
    }
}

fn check_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

type Labels = Vec<(String, String)>;

/// `name{k="v",…} rest` → (name, labels, rest).
fn split_sample(line: &str) -> Option<(String, Labels, &str)> {
    let end = line.find(['{', ' '])?;
    let name = &line[..end];
    check_name(name).then_some(())?;
    let mut labels = Vec::new();
    let mut rest = &line[end..];
    if let Some(mut s) = rest.strip_prefix('{') {
        loop {
            s = s.trim_start_matches(',');
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = s.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let close = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        _ => return None,
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_string(), value));
            s = &after[close + 1..];
        }
    }
    Some((name.to_string(), labels, rest.strip_prefix(' ')?))
}

#[tokio::test]
async fn metrics_are_served_as_prometheus_text_and_openmetrics() {
    let admin = start().await;
    let mut sub: Subscription = admin.discovery.subscribe(&"web.shop:80".parse().unwrap());
    sub.wait(Duration::from_secs(5)).await.unwrap();

    for accept in [None, Some("*/*"), Some("text/plain")] {
        let text = call(&admin, Method::GET, "/metrics", accept, false).await;
        assert_eq!(text.status, StatusCode::OK);
        assert_eq!(content_type(&text), PROMETHEUS_TEXT);
        check_prometheus_text(&text.body);
        for want in [
            "# TYPE trellis_discovery_updates_total counter\n",
            "trellis_discovery_updates_total{result=\"applied\"} 1\n",
            "trellis_discovery_updates_total{result=\"invalid\"} 0\n",
            "# TYPE trellis_discovery_streams gauge\ntrellis_discovery_streams 1\n",
            "trellis_discovery_connected 1\n",
            "trellis_discovery_reconnects_total 0\n",
            "# TYPE trellis_discovery_last_update_timestamp_seconds gauge\n",
            "# TYPE trellis_request_duration_seconds histogram\n",
            "trellis_request_duration_seconds_bucket{le=\"0.1\"} 1\n",
            "trellis_tcp_read_bytes_total 42\n",
            "# TYPE trellis_build_info gauge\ntrellis_build_info{version=\"0.1.0\"} 1\n",
        ] {
            assert!(
                text.body.contains(want),
                "{want:?} missing from:\n{}",
                text.body
            );
        }
        assert!(!text.body.contains("# EOF") && !text.body.contains("# UNIT"));
    }

    let om = call(
        &admin,
        Method::GET,
        "/metrics",
        Some(PROMETHEUS_ACCEPT),
        false,
    )
    .await;
    assert_eq!(om.status, StatusCode::OK);
    assert_eq!(content_type(&om), OPENMETRICS_TEXT);
    assert!(om.body.ends_with("# EOF\n") && om.body.matches("# EOF").count() == 1);
    for want in [
        "# TYPE trellis_discovery_updates counter\n",
        "trellis_discovery_updates_total{result=\"applied\"} 1\n",
        "# UNIT trellis_discovery_last_update_timestamp_seconds seconds\n",
        "# TYPE trellis_build info\n",
    ] {
        assert!(
            om.body.contains(want),
            "{want:?} missing from:\n{}",
            om.body
        );
    }
    // Same samples in both formats.
    let samples = |body: &str| -> Vec<String> {
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    let text = get(&admin, "/metrics").await;
    assert_eq!(samples(&text.body), samples(&om.body));
}

#[tokio::test]
async fn probes_config_and_errors_over_http1_and_http2() {
    let admin = start().await;

    let ready = get(&admin, "/ready").await;
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    );
    admin.ready.store(true, Ordering::Release);
    let ready = get(&admin, "/ready").await;
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (StatusCode::OK, "ready\n")
    );
    admin.ready.store(false, Ordering::Release);
    assert_eq!(
        get(&admin, "/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(&admin, "/live").await.status, StatusCode::OK);

    // No destination yet, then the ones in use with their snapshots.
    let config = get(&admin, "/config").await;
    assert_eq!(config.status, StatusCode::OK);
    assert_eq!(content_type(&config), "application/json");
    let doc: serde_json::Value = serde_json::from_str(&config.body).unwrap();
    assert_eq!(
        doc,
        serde_json::json!({"namespace": "shop", "destinations": []})
    );
    let mut web = admin.discovery.subscribe(&"10.96.0.10:80".parse().unwrap());
    let _pending = admin.discovery.subscribe(&"10.96.0.99:80".parse().unwrap());
    web.wait(Duration::from_secs(5)).await.unwrap();
    let doc: serde_json::Value = serde_json::from_str(&get(&admin, "/config").await.body).unwrap();
    let destinations = doc["destinations"].as_array().unwrap();
    assert_eq!(destinations.len(), 2, "{doc:#}");
    assert_eq!(destinations[0]["target"], "10.96.0.10:80");
    assert_eq!(destinations[0]["policy"]["type"], "service");
    assert_eq!(destinations[0]["policy"]["service"]["name"], "web");
    assert_eq!(destinations[1]["target"], "10.96.0.99:80");

    let missing = get(&admin, "/nope").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    for path in ["/metrics", "/ready", "/config"] {
        let post = call(&admin, Method::POST, path, None, false).await;
        assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(post.headers[header::ALLOW], "GET");
    }

    // HTTP/2 with prior knowledge on the same port.
    let live = call(&admin, Method::GET, "/live", None, true).await;
    assert_eq!(
        (live.status, live.body.as_str()),
        (StatusCode::OK, "live\n")
    );
    let metrics = call(&admin, Method::GET, "/metrics", None, true).await;
    check_prometheus_text(&metrics.body);
}

/// `received_at` and `age_seconds` of `/config`'s entry for `target`.
async fn received(admin: &Admin, target: &str) -> (serde_json::Value, serde_json::Value) {
    let doc: serde_json::Value = serde_json::from_str(&get(admin, "/config").await.body).unwrap();
    let entry = doc["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == target)
        .unwrap_or_else(|| panic!("no {target} in {doc:#}"))
        .clone();
    (entry["received_at"].clone(), entry["age_seconds"].clone())
}

/// The value of the sample `name` (with its labels) in the admin's `/metrics`.
async fn sample(admin: &Admin, name: &str) -> Option<f64> {
    let text = get(admin, "/metrics").await.body;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn config_says_when_each_policy_was_received() {
    let mut admin = start().await;
    let web_target = "10.96.0.10:80";
    let before = rfc3339(SystemTime::now());
    let mut web = admin.discovery.subscribe(&web_target.parse().unwrap());
    web.wait(Duration::from_secs(5)).await.unwrap();
    let after = rfc3339(SystemTime::now());

    // RFC 3339 with milliseconds, UTC: such strings sort as the times they name.
    let (at, age) = received(&admin, web_target).await;
    let first = at.as_str().unwrap().to_string();
    assert!(
        before <= first && first <= after,
        "{before} <= {first} <= {after}"
    );
    let age = age.as_f64().unwrap();
    assert!((0.0..5.0).contains(&age), "{age}");

    // A new route is a new policy: a later time, and its age counts from then.
    tokio::time::sleep(Duration::from_millis(50)).await; // apart on a millisecond clock
    let (_, old_age) = received(&admin, web_target).await;
    assert!(old_age.as_f64().unwrap() >= 0.05, "{old_age}");
    let written = std::time::Instant::now();
    let written_at = rfc3339(SystemTime::now());
    write(admin.dir.path(), "route.yaml", &route("/v2"));
    policy_where(&mut web, Duration::from_secs(10), "the /v2 route", |p| {
        prefixes(p).is_some()
    })
    .await;
    let (at, age) = received(&admin, web_target).await;
    let second = at.as_str().unwrap().to_string();
    assert!(
        second >= written_at && second > first,
        "{first} then {second}"
    );
    assert!(
        age.as_f64().unwrap() <= written.elapsed().as_secs_f64(),
        "{age} is older than the route"
    );

    // While the controller is down, a new destination has no policy, so no time.
    let addr = admin.controller.addr;
    admin.controller.process.kill();
    let unanswered = "10.96.0.77:80";
    let mut other = admin.discovery.subscribe(&unanswered.parse().unwrap());
    let (at, age) = received(&admin, unanswered).await;
    assert_eq!(
        (at, age),
        (serde_json::Value::Null, serde_json::Value::Null)
    );

    // Back, the controller sends web's policy again: the same policy, not a new one.
    let unchanged = r#"trellis_discovery_updates_total{result="unchanged"}"#;
    let unchanged_before = sample(&admin, unchanged).await.unwrap();
    let _restarted = Controller::start_on(admin.dir.path(), addr);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sample(&admin, unchanged).await.unwrap() <= unchanged_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the controller did not send web's policy again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (at, _) = received(&admin, web_target).await;
    assert_eq!(
        at.as_str(),
        Some(second.as_str()),
        "an unchanged policy was taken as new"
    );
    other.wait(Duration::from_secs(10)).await.unwrap();
    let (at, _) = received(&admin, unanswered).await;
    assert!(at.as_str().unwrap() > second.as_str(), "{at}");
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let mut admin = start().await;
    assert_eq!(get(&admin, "/live").await.status, StatusCode::OK);
    admin.stop.take().unwrap().send(()).unwrap();
    let served = tokio::time::timeout(Duration::from_secs(2), &mut admin.task)
        .await
        .expect("the admin server did not stop");
    served.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(admin.addr).await.is_err());
}
