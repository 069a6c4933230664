//! The access log and tracing through real sidecars over mutual TLS, with a real OTLP/HTTP
//! receiver on loopback that decodes what the sidecars export: a sampled `traceparent` reaches
//! the app with the same trace id and a new parent id, and the receiver gets the client and
//! server sidecars' spans, linked parent to child, with their route, backend, status and peer
//! identity; an unsampled one passes untouched and exports nothing; `--trace-sampling 1` starts
//! traces; the access log's lines are JSON naming route, backend, status and peer identity;
//! an access log nobody reads drops and counts lines instead of stalling requests; an export
//! endpoint that never answers costs requests nothing and its spans are counted as dropped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use tokio::net::TcpListener;
use trellis_integration::mesh::{Mesh, NS, ip, send};
use trellis_integration::netns::metric;
use trellis_integration::{Ca, empty, http1_client};

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs: [{name: echo-v1, port: 80}]
"#;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP receiver: decodes every `POST /v1/traces` and keeps its spans.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<Vec<(String, String)>>>,
}

impl Receiver {
    async fn start(addr: SocketAddr) -> (Receiver, SocketAddr) {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::default();
        let r = receiver.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let r = r.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let r = r.clone();
                        async move { Ok::<_, Infallible>(r.export(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (receiver, addr)
    }

    async fn export(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let content_type = req
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        self.requests.lock().unwrap().push((path, content_type));
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let export = ExportTraceServiceRequest::decode(body).unwrap();
        for rs in export.resource_spans {
            let resource = rs.resource.unwrap();
            assert!(
                resource
                    .attributes
                    .iter()
                    .any(|kv| kv.key == "service.name"),
                "{resource:?}"
            );
            for ss in rs.scope_spans {
                self.spans.lock().unwrap().extend(ss.spans);
            }
        }
        let answer = ExportTraceServiceResponse::default().encode_to_vec();
        Response::new(Full::new(Bytes::from(answer)))
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `n` spans have arrived (the exporter batches for up to a second).
    async fn wait_for(&self, n: usize) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.spans();
            if spans.len() >= n || Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    let kv = span.attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The access log lines a sidecar wrote to `path`, each parsed as JSON.
async fn log_lines(path: &Path, at_least: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if lines.len() >= at_least || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A mesh over mutual TLS whose sidecars export spans to `otlp` and write their access logs
/// to `<logs>/<pod>.log`; `extra` adds flags to every sidecar.
async fn mesh(block: u8, ca: &Ca, otlp: &str, logs: &Path, extra: &[&str]) -> Mesh {
    let controller = ca.controller_flags(trellis_integration::CONTROLLER_ACCOUNT.1);
    Mesh::start_with(block, ROUTE, &controller, |pod, sa| {
        let mut flags = ca.flags(NS, sa);
        flags.extend(["--otlp-endpoint".into(), otlp.into()]);
        flags.extend([
            "--access-log".into(),
            "json".into(),
            "--access-log-path".into(),
        ]);
        flags.push(logs.join(format!("{pod}.log")).display().to_string());
        flags.extend(extra.iter().map(|s| s.to_string()));
        flags
    })
    .await
}

fn ca(block: u8) -> Ca {
    let accounts = [(NS, "client"), (NS, "v1"), (NS, "v2"), (NS, "mirror")];
    Ca::new(ip(block, 100), "1h", &accounts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_trace_crosses_both_sidecars_and_the_log_says_where_it_went() {
    let block = 191;
    let ca = ca(block);
    let (receiver, otlp) = Receiver::start(SocketAddr::new(ip(block, 200), 0)).await;
    let logs = trellis_integration::scratch_dir();
    let mesh = mesh(block, &ca, &format!("http://{otlp}"), logs.path(), &[]).await;
    let client = http1_client();

    // Sampled: continued through both sidecars.
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let req = mesh
        .request("echo", "/traced?secret=1")
        .header("traceparent", &traceparent)
        .header("tracestate", "vendor=opaque")
        .body(empty())
        .unwrap();
    let (status, _, echoed) = send(&client, req).await;
    assert_eq!(status, StatusCode::OK);
    let echoed = echoed.unwrap();
    assert_eq!(echoed.pod, "echo-v1-0");
    let seen = echoed.header("traceparent").unwrap();
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", TRACE_ID, "01"),
        "{seen}"
    );
    assert_ne!(
        parts[2], CALLER_SPAN,
        "the app's parent is the server sidecar's span"
    );
    assert_eq!(
        echoed.header("tracestate").as_deref(),
        Some("vendor=opaque")
    );

    let spans = receiver.wait_for(2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let client_span = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap();
    let server_span = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    for span in &spans {
        assert_eq!(hex(&span.trace_id), TRACE_ID);
        assert_eq!(span.trace_state, "vendor=opaque");
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
        assert_eq!(
            attr(span, "http.response.status_code").as_deref(),
            Some("200")
        );
        assert_eq!(attr(span, "url.path").as_deref(), Some("/traced"));
    }
    // The chain: the caller's span → the client sidecar's → the server sidecar's → the app.
    assert_eq!(hex(&client_span.parent_span_id), CALLER_SPAN);
    assert_eq!(server_span.parent_span_id, client_span.span_id);
    assert_eq!(hex(&server_span.span_id), parts[2]);
    let peer = ip(block, 11).to_string();
    for (span, key, want) in [
        (client_span, "trellis.direction", "outbound"),
        (client_span, "trellis.route", "mesh/echo"),
        (client_span, "trellis.parent", "mesh/echo:80"),
        (client_span, "trellis.backend", "mesh/echo-v1:80"),
        (
            client_span,
            "trellis.peer_identity",
            "spiffe://cluster.local/ns/mesh/sa/v1",
        ),
        (client_span, "network.peer.address", peer.as_str()),
        (server_span, "trellis.direction", "inbound"),
        (
            server_span,
            "trellis.peer_identity",
            "spiffe://cluster.local/ns/mesh/sa/client",
        ),
    ] {
        assert_eq!(attr(span, key).as_deref(), Some(want), "{key}");
    }
    let posts = receiver.requests.lock().unwrap().clone();
    assert!(
        posts
            .iter()
            .all(|(path, ct)| path == "/v1/traces" && ct == "application/x-protobuf"),
        "{posts:?}"
    );

    // Unsampled: passed on as it came, nothing exported.
    let unsampled = format!("00-{TRACE_ID}-{CALLER_SPAN}-00");
    let req = mesh
        .request("echo", "/untraced")
        .header("traceparent", &unsampled)
        .body(empty())
        .unwrap();
    let (status, _, echoed) = send(&client, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echoed.unwrap().header("traceparent"), Some(unsampled));
    // No traceparent and the default sampling of 0: no trace is started.
    let (_, _, echoed) = send(
        &client,
        mesh.request("echo", "/plain").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(echoed.unwrap().header("traceparent"), None);
    // A malformed one is dropped, never passed on or crashed on.
    let req = mesh
        .request("echo", "/malformed")
        .header("traceparent", "00-zz-00f067aa0ba902b7-01")
        .header("tracestate", "vendor=opaque")
        .body(empty())
        .unwrap();
    let (status, _, echoed) = send(&client, req).await;
    assert_eq!(status, StatusCode::OK);
    let echoed = echoed.unwrap();
    assert_eq!(echoed.header("traceparent"), None);
    assert_eq!(echoed.header("tracestate"), None);

    // Every line is JSON; the client's names where the request went and whom it reached.
    let client_log = log_lines(&logs.path().join("client-0.log"), 4).await;
    assert_eq!(client_log.len(), 4, "{client_log:#?}");
    let traced = &client_log[0];
    assert_eq!(traced["direction"], "outbound");
    assert_eq!(traced["method"], "GET");
    assert_eq!(traced["authority"], "echo");
    assert_eq!(traced["path"], "/traced");
    assert_eq!(traced["status"], 200);
    assert_eq!(traced["parent"], "mesh/echo:80");
    assert_eq!(traced["route"], "mesh/echo");
    assert_eq!(traced["backend"], "mesh/echo-v1:80");
    assert_eq!(traced["endpoint"], format!("{}:8080", ip(block, 11)));
    assert_eq!(
        traced["peer_identity"],
        "spiffe://cluster.local/ns/mesh/sa/v1"
    );
    assert_eq!(traced["retries"], 0);
    assert_eq!(traced["trace_id"], TRACE_ID);
    assert!(traced["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(
        client_log[1].get("trace_id").is_none(),
        "{:?}",
        client_log[1]
    );
    let server_log = log_lines(&logs.path().join("echo-v1-0.log"), 4).await;
    assert_eq!(server_log.len(), 4, "{server_log:#?}");
    assert_eq!(server_log[0]["direction"], "inbound");
    assert_eq!(server_log[0]["status"], 200);
    assert_eq!(
        server_log[0]["peer_identity"],
        "spiffe://cluster.local/ns/mesh/sa/client"
    );
    assert_eq!(server_log[0]["trace_id"], TRACE_ID);

    // The unsampled, plain and malformed requests added no span.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.spans().len(), 2);
    let metrics = mesh.client.metrics().await;
    assert_eq!(metric(&metrics, "trellis_access_log_lines_total", &[]), 4.0);
    assert_eq!(
        metric(&metrics, "trellis_access_log_dropped_total", &[]),
        0.0
    );
    assert_eq!(
        metric(&metrics, "trellis_trace_spans_exported_total", &[]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_starts_traces_and_errors_are_marked() {
    let block = 192;
    let ca = ca(block);
    let (receiver, otlp) = Receiver::start(SocketAddr::new(ip(block, 200), 0)).await;
    let logs = trellis_integration::scratch_dir();
    let flags = ["--trace-sampling", "1"];
    let mesh = mesh(block, &ca, &format!("http://{otlp}"), logs.path(), &flags).await;
    let client = http1_client();
    let (status, _, echoed) = send(
        &client,
        mesh.request("echo", "/fail?status=503")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let seen = echoed.unwrap().header("traceparent").unwrap();
    let spans = receiver.wait_for(2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let client_span = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap();
    let server_span = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    // A trace the client sidecar started: it is the root.
    assert!(client_span.parent_span_id.is_empty());
    assert_eq!(server_span.parent_span_id, client_span.span_id);
    assert_eq!(server_span.trace_id, client_span.trace_id);
    assert!(seen.contains(&hex(&server_span.span_id)), "{seen}");
    for span in &spans {
        assert_eq!(
            attr(span, "http.response.status_code").as_deref(),
            Some("503")
        );
        assert_eq!(span.status.as_ref().unwrap().code, 2, "an error status");
    }

    // A request the sidecar answers itself carries its reason in the log and the span.
    let (status, _, _) = send(&client, mesh.request("empty", "/").body(empty()).unwrap()).await;
    assert!(status.is_server_error(), "{status}");
    let spans = receiver.wait_for(3).await;
    let local = spans
        .iter()
        .find(|s| attr(s, "trellis.parent").as_deref() == Some("mesh/empty:80"))
        .unwrap();
    assert!(attr(local, "error.type").is_some(), "{local:?}");
    let log = log_lines(&logs.path().join("client-0.log"), 2).await;
    assert_eq!(log[1]["parent"], "mesh/empty:80");
    assert!(log[1]["error"].is_string(), "{:?}", log[1]);
}

/// An OTLP endpoint that accepts connections but never answers: requests go on at full
/// speed, and the spans are dropped and counted once the export times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_costs_requests_nothing() {
    let block = 193;
    let ca = ca(block);
    let stalled = TcpListener::bind(SocketAddr::new(ip(block, 200), 0))
        .await
        .unwrap();
    let otlp = stalled.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = stalled.accept().await {
            keep.lock().unwrap().push(s);
        }
    });
    let logs = trellis_integration::scratch_dir();
    let flags = ["--trace-sampling", "1", "--otlp-timeout", "500ms"];
    let mesh = mesh(block, &ca, &format!("http://{otlp}"), logs.path(), &flags).await;
    let client = http1_client();
    let started = Instant::now();
    for _ in 0..50 {
        let (status, _, _) = send(&client, mesh.request("echo", "/").body(empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = mesh.client.metrics().await;
        let dropped = metric(
            &metrics,
            "trellis_trace_spans_dropped_total",
            &[("reason", "export_failed")],
        );
        if dropped == 50.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{dropped:?}\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An access log whose reader has stopped reading (a FIFO held open, never read): once the
/// pipe and the queue are full, lines are dropped and counted, and requests go on at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_access_log_drops_and_counts_lines() {
    let block = 194;
    let dir = trellis_integration::scratch_dir();
    let fifo = dir.path().join("access.fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    // Opening a FIFO for reading waits for its writer: the sidecar, once it starts.
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::File::open(fifo).unwrap())
    };
    let path = fifo.display().to_string();
    let mesh = Mesh::start_with(block, ROUTE, &[], |pod, _| match pod {
        "client-0" => vec![
            "--access-log".into(),
            "json".into(),
            "--access-log-path".into(),
            path.clone(),
        ],
        _ => Vec::new(),
    })
    .await;
    let held = reader.join().unwrap();
    // More lines than the pipe (64 KiB), one write batch and the queue (1024) hold. `empty`
    // has no endpoints: the client's sidecar answers each request itself, quickly.
    let requests = 2500;
    let client = http1_client();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let (client, outbound) = (client.clone(), mesh.client.outbound());
        tasks.push(tokio::spawn(async move {
            for _ in (worker..requests).step_by(4) {
                let req = Request::get(format!("http://{outbound}/"))
                    .header("host", "empty")
                    .body(empty())
                    .unwrap();
                let res = client.request(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
                res.into_body().collect().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "{took:?}");
    let metrics = mesh.client.metrics().await;
    let dropped = metric(&metrics, "trellis_access_log_dropped_total", &[]);
    let written = metric(&metrics, "trellis_access_log_lines_total", &[]);
    assert!(dropped >= 1.0, "dropped {dropped}, written {written}");
    // What is neither written nor dropped waits in the queue or the stalled write.
    assert!(
        dropped + written <= f64::from(requests)
            && dropped + written >= f64::from(requests) - 1024.0 - 256.0,
        "dropped {dropped}, written {written}"
    );
    // The sidecar still answers at once.
    let (status, _, echoed) = send(&client, mesh.request("echo", "/").body(empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echoed.unwrap().pod, "echo-v1-0");
    drop(held);
}
