//! A real controller in local mode and real sidecars: a client pod's sidecar routes requests to
//! backend pods' sidecars (HTTP/2 with the mesh preamble between them), which deliver to echo
//! apps. Every pod is a loopback address of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use http::Request;
use trellis_integration::mesh::{Mesh, ip, send};
use trellis_integration::{body, empty, http1_client, http2_client};

const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /split}}]
    backendRefs: [{name: echo-v1, port: 80, weight: 70}, {name: echo-v2, port: 80, weight: 30}]
  - matches: [{path: {type: PathPrefix, value: /headers}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-rule, value: "yes"}], add: [{name: x-multi, value: added}], remove: [x-secret]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-resp, value: rule}]}
    backendRefs:
    - name: echo-v1
      port: 80
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-backend, value: v1}]}
  - matches: [{path: {type: PathPrefix, value: /redirect}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: example.org, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /moved}}
  - matches: [{path: {type: PathPrefix, value: /rewrite}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /rewritten}}
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: mirror, port: 80}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /mirror-broken}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: empty, port: 80}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /invalid}}]
    backendRefs: [{name: missing, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /empty}}]
    backendRefs: [{name: empty, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /retry}}]
    retry: {codes: [503], attempts: 2}
    backendRefs: [{name: echo-v2, port: 80}]
"#;

const GRPC_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo-grpc, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
  - backendRefs:
    - {name: echo-v1, port: 7070, weight: 70}
    - {name: echo-v2, port: 7070, weight: 30}
    - {name: echo-v3, port: 7070, weight: 0}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_filters_and_errors_through_a_pair_of_sidecars() {
    let mesh = Mesh::start(31, ROUTES).await;
    let client = http1_client();

    // Weighted split per request, over one reused HTTP/1.1 connection.
    let mut v1 = 0;
    for _ in 0..500 {
        let (status, _, echoed) = send(
            &client,
            mesh.request("echo", "/split").body(empty()).unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        match echoed.unwrap().pod.as_str() {
            "echo-v1-0" => v1 += 1,
            "echo-v2-0" => {}
            other => panic!("{other}"),
        }
    }
    assert!((325..=375).contains(&v1), "echo-v1 answered {v1} of 500");

    // Header filters on the rule and the backend; HTTP/1 downgraded again for the app.
    let req = mesh
        .request("echo.mesh.svc.cluster.local", "/headers")
        .header("x-multi", "original")
        .header("x-secret", "s")
        .body(empty())
        .unwrap();
    let (status, headers, echoed) = send(&client, req).await;
    let echoed = echoed.unwrap();
    assert_eq!(status, 200);
    assert_eq!(echoed.pod, "echo-v1-0");
    assert_eq!(echoed.version, "HTTP/1.1");
    assert_eq!(echoed.header("x-rule").as_deref(), Some("yes"));
    assert_eq!(echoed.header("x-multi").as_deref(), Some("original,added"));
    assert_eq!(echoed.header("x-backend").as_deref(), Some("v1"));
    assert_eq!(echoed.header("x-secret"), None);
    assert_eq!(echoed.header("trellis-orig-proto"), None);
    assert_eq!(
        echoed.header("host").as_deref(),
        Some("echo.mesh.svc.cluster.local")
    );
    assert_eq!(headers["x-resp"], "rule");

    // Redirect, answered by the sidecar with the exact Location.
    let (status, headers, _) = send(
        &client,
        mesh.request("echo", "/redirect/a?b=c")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, 301);
    assert_eq!(headers["location"], "http://example.org/moved/a?b=c");

    // Rewrite seen by the backend.
    let (_, _, echoed) = send(
        &client,
        mesh.request("echo", "/rewrite/x?q=1")
            .body(empty())
            .unwrap(),
    )
    .await;
    let echoed = echoed.unwrap();
    assert_eq!(echoed.path, "/rewritten/x?q=1");
    assert_eq!(echoed.header("host").as_deref(), Some("rewritten.example"));

    // Mirror: the copy arrives, the client's answer comes from the real backend.
    let before = mesh.apps["mirror-0"].count();
    let req = mesh
        .request("echo", "/mirror")
        .method("POST")
        .body(body("payload"))
        .unwrap();
    let (status, _, echoed) = send(&client, req).await;
    assert_eq!(status, 200);
    let echoed = echoed.unwrap();
    assert_eq!((echoed.pod.as_str(), echoed.body_len), ("echo-v1-0", 7));
    let deadline = Instant::now() + Duration::from_secs(2);
    while mesh.apps["mirror-0"].count() == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(mesh.apps["mirror-0"].count(), before + 1);
    // A mirror that cannot be reached changes nothing for the client.
    let (status, _, echoed) = send(
        &client,
        mesh.request("echo", "/mirror-broken")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(echoed.unwrap().pod, "echo-v1-0");

    // The error answers.
    for (path, want) in [
        ("/invalid", 500),
        ("/empty", 503),
        ("/nomatch", 404),
        ("/slow?delay_ms=2000", 504),
    ] {
        let (status, headers, _) =
            send(&client, mesh.request("echo", path).body(empty()).unwrap()).await;
        assert_eq!(status, want, "{path}");
        assert!(headers.contains_key("trellis-proxy-error"), "{path}");
    }

    // Retries: 503 retried twice, so the app sees three attempts.
    let before = mesh.apps["echo-v2-0"].count();
    let (status, _, _) = send(
        &client,
        mesh.request("echo", "/retry?status=503")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(mesh.apps["echo-v2-0"].count(), before + 3);

    // Per-route metrics match the traffic.
    let metrics = mesh.client.metrics().await;
    let split_ok = metrics
        .lines()
        .filter(|l| {
            l.starts_with("trellis_requests_total{")
                && l.contains("route=\"mesh/echo\"")
                && l.contains("rule=\"0\"")
                && l.contains("status=\"200\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum::<u64>();
    assert_eq!(split_ok, 500, "{metrics}");
    assert!(
        metrics.contains("trellis_mirrors_total{result=\"sent\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_mirrors_total{result=\"failed\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_ip_traffic_is_not_routed() {
    let mesh = Mesh::start(32, ROUTES).await;
    let client = http1_client();
    // Straight to echo-v2's pod IP: no route applies, the hop is still the mesh's.
    let host = format!("{}:8080", ip(32, 12));
    let (status, _, echoed) = send(
        &client,
        mesh.request(&host, "/split").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let echoed = echoed.unwrap();
    assert_eq!(echoed.pod, "echo-v2-0");
    // Port 7070 of echo has no route: passthrough to the Service's pods, spread by load.
    let mut pods = std::collections::BTreeSet::new();
    let mut calls = Vec::new();
    for _ in 0..40 {
        let req = mesh
            .request("echo.mesh:7070", "/any?delay_ms=100")
            .body(empty())
            .unwrap();
        let client = client.clone();
        calls.push(tokio::spawn(async move { send(&client, req).await }));
    }
    for call in calls {
        let (status, _, e) = call.await.unwrap();
        assert_eq!(status, 200);
        pods.insert(e.unwrap().pod);
    }
    assert_eq!(pods.len(), 2, "{pods:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_weights_per_stream_on_one_http2_connection() {
    let mesh = Mesh::start(33, GRPC_ROUTE).await;
    let client = http2_client();
    let mut v1 = 0;
    for _ in 0..500 {
        let req = Request::post(format!(
            "http://{}/proto.EchoTestService/Echo",
            mesh.client.outbound()
        ))
        .header("host", "echo:7070")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body(&b"\0\0\0\0\0"[..]))
        .unwrap();
        let (status, headers, echoed) = send(&client, req).await;
        assert_eq!(status, 200);
        assert_eq!(headers["grpc-status"], "0");
        let echoed = echoed.unwrap();
        assert_eq!(echoed.version, "HTTP/2.0");
        if echoed.pod == "echo-v1-0" {
            v1 += 1;
        }
    }
    assert!((325..=375).contains(&v1), "echo-v1 answered {v1} of 500");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_change_applies_within_a_second_without_failed_requests() {
    let only_v1 = ROUTES.replace(
        "weight: 70}, {name: echo-v2, port: 80, weight: 30}",
        "weight: 1}",
    );
    let mesh = Mesh::start(34, &only_v1).await;
    let client = http1_client();
    let (_, _, e) = send(
        &client,
        mesh.request("echo", "/split").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(e.unwrap().pod, "echo-v1-0");
    let only_v2 = ROUTES.replace(
        "{name: echo-v1, port: 80, weight: 70}, {name: echo-v2, port: 80, weight: 30}",
        "{name: echo-v2, port: 80}",
    );
    let written = Instant::now();
    std::fs::write(mesh.dir.path().join("routes.yaml"), only_v2).unwrap();
    let switched = loop {
        let (status, _, e) = send(
            &client,
            mesh.request("echo", "/split").body(empty()).unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        if e.unwrap().pod == "echo-v2-0" {
            break written.elapsed();
        }
        assert!(
            written.elapsed() < Duration::from_secs(3),
            "the new route never applied; controller log:\n{}",
            mesh.controller.process.log()
        );
    };
    assert!(switched < Duration::from_secs(1), "took {switched:?}");
}

/// A refused connection carried no byte: the sidecar tries the Service's other endpoint, even
/// without a retry policy, and the app never sees the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_fails_over_to_another_endpoint() {
    let mut mesh = Mesh::start(35, ROUTES).await;
    // echo-v2-0's sidecar goes away; discovery still lists the pod, whose port now refuses.
    drop(mesh.backends.remove(1));
    let client = http1_client();
    for _ in 0..20 {
        let req = mesh
            .request("echo.mesh:7070", "/any")
            .body(empty())
            .unwrap();
        let (status, _, echoed) = send(&client, req).await;
        assert_eq!(status, 200);
        assert_eq!(echoed.unwrap().pod, "echo-v1-0");
    }
    // The refused pod was picked, and each time the request went on to echo-v1-0.
    let metrics = mesh.client.metrics().await;
    let failed_over = trellis_integration::netns::metric(
        &metrics,
        "trellis_retries_total",
        &[("direction", "outbound")],
    );
    assert!(failed_over >= 1.0, "{metrics}");
}
