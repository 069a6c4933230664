//! Routing end to end, pods as network namespaces (see `trellis_integration::netns`): clients
//! in meshed pods call Services by name; their iptables hand the connections to their
//! sidecars, which apply the routes and reach the backend pods' sidecars over mutual TLS.
//!
//! One mesh serves every scenario of this file, in one test, to start it once: weighted
//! splits, header filters, redirects, rewrites, mirrors, producer and consumer routes, port
//! and port-less parentRefs, pod-IP traffic, per-route metrics, timeouts, retries and
//! GRPCRoute weights over one HTTP/2 connection.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use trellis_integration::netns::{Mesh, PodSpec, Reply, ServiceSpec, available, metric};

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
      responseHeaderModifier: {set: [{name: x-resp, value: rule}], remove: [x-drop]}
    backendRefs:
    - name: echo-v1
      port: 80
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-backend, value: v1}]}
      - type: ResponseHeaderModifier
        responseHeaderModifier: {add: [{name: x-backend-resp, value: v1}]}
  - matches: [{path: {type: PathPrefix, value: /redirect}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: example.org, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /moved}}
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
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /retry}}]
    retry: {codes: [503], attempts: 2}
    backendRefs: [{name: echo-v2, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo-grpc, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
  - backendRefs:
    - {name: echo-v1, port: 7070, weight: 70}
    - {name: echo-v2, port: 7070, weight: 30}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-pinned, namespace: consumer}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, namespace: mesh, port: 80}]
  rules:
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-consumer, value: "yes"}]}
    backendRefs: [{name: echo-v2, namespace: mesh, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: every-port, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: portless}]
  rules:
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: every-port}]}
    backendRefs: [{name: echo-v2, port: 80}]
"#;

const V1: &str = "echo-v1-0";
const V2: &str = "echo-v2-0";
const MIRROR: &str = "mirror-0";
const CLIENT: &str = "client-0";
const CONSUMER: &str = "consumer-0";

fn mesh() -> Mesh {
    Mesh::builder(1)
        .pod(PodSpec::meshed(V1, "mesh", "v1").http(8080))
        .pod(PodSpec::meshed(V2, "mesh", "v2").http(8080))
        .pod(PodSpec::meshed(MIRROR, "mesh", "mirror").http(8080))
        .pod(PodSpec::meshed(CLIENT, "mesh", "client"))
        .pod(PodSpec::meshed(CONSUMER, "consumer", "client"))
        .service(
            ServiceSpec::new("echo", "mesh")
                .port("http", 80, 8080)
                .port("alt", 9000, 8080)
                .port("grpc", 7070, 8080)
                .endpoints(&[V1, V2]),
        )
        .service(
            ServiceSpec::new("echo-v1", "mesh")
                .port("http", 80, 8080)
                .port("grpc", 7070, 8080)
                .endpoints(&[V1]),
        )
        .service(
            ServiceSpec::new("echo-v2", "mesh")
                .port("http", 80, 8080)
                .port("grpc", 7070, 8080)
                .endpoints(&[V2]),
        )
        .service(
            ServiceSpec::new("mirror", "mesh")
                .port("http", 80, 8080)
                .endpoints(&[MIRROR]),
        )
        .service(ServiceSpec::new("empty", "mesh").port("http", 80, 8080))
        .service(
            ServiceSpec::new("portless", "mesh")
                .port("http", 80, 8080)
                .port("alt", 81, 8080)
                .endpoints(&[V1]),
        )
        .routes(ROUTES)
        .start()
}

/// Requests each backend pod answered, to compare with the servers' own metrics.
#[derive(Debug, Default)]
struct Served(BTreeMap<String, usize>);

impl Served {
    fn count(&mut self, replies: &[Reply]) {
        for r in replies {
            assert!(r.ok(), "{r:?}");
            *self.0.entry(r.pod()).or_default() += 1;
        }
    }
}

fn all_ok(replies: &[Reply]) {
    let failed: Vec<&Reply> = replies.iter().filter(|r| !r.ok()).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
}

#[test]
fn routes_apply_between_pods_in_network_namespaces() {
    if !available() {
        return;
    }
    let started = Instant::now();
    let mesh = mesh();
    let client = mesh.pod(CLIENT);
    let consumer = mesh.pod(CONSUMER);
    let mut served = Served::default();
    let echo = "http://echo.mesh.svc.cluster.local";

    // Weighted split 70/30 per request over one HTTP/1.1 connection: within ±5 %.
    let split = client.curl(&["-n", "500", &format!("{echo}/split")]);
    all_ok(&split);
    served.count(&split);
    let v1 = split.iter().filter(|r| r.pod() == V1).count();
    assert!((325..=375).contains(&v1), "echo-v1 answered {v1} of 500");

    // Header modifiers of the rule and of the backend, both ways; the app sees HTTP/1.1 again.
    let headers = client.curl(&[
        "-H",
        "x-multi: original",
        "-H",
        "x-secret: s",
        &format!("{echo}/headers?header=x-drop:gone"),
    ]);
    served.count(&headers);
    let (reply, seen) = (&headers[0], headers[0].echoed().unwrap());
    assert_eq!(seen.pod, V1);
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.header("x-rule").as_deref(), Some("yes"));
    assert_eq!(seen.header("x-multi").as_deref(), Some("original,added"));
    assert_eq!(seen.header("x-backend").as_deref(), Some("v1"));
    assert_eq!(seen.header("x-secret"), None);
    assert_eq!(
        seen.header("host").as_deref(),
        Some("echo.mesh.svc.cluster.local")
    );
    assert_eq!(
        seen.header("trellis-client-id").as_deref(),
        Some("spiffe://cluster.local/ns/mesh/sa/client")
    );
    assert_eq!(
        reply.headers.get("x-resp").map(String::as_str),
        Some("rule")
    );
    assert_eq!(
        reply.headers.get("x-backend-resp").map(String::as_str),
        Some("v1")
    );
    assert_eq!(reply.headers.get("x-drop"), None, "{reply:?}");
    // The same over HTTP/2 prior knowledge, by the short name.
    let h2 = client.curl(&["--h2", "http://echo/headers"]);
    served.count(&h2);
    let seen = h2[0].echoed().unwrap();
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(seen.header("x-rule").as_deref(), Some("yes"));

    // Redirect answered by the client's sidecar, with the exact Location.
    let redirect = client.get(&format!("{echo}/redirect/a?b=c"), &[]);
    assert_eq!(redirect.status, Some(301), "{redirect:?}");
    assert_eq!(
        redirect.headers.get("location").map(String::as_str),
        Some("https://example.org/moved/a?b=c")
    );

    // Rewrite seen at the backend.
    let rewrite = client.curl(&[&format!("{echo}/rewrite/x?q=1")]);
    served.count(&rewrite);
    let seen = rewrite[0].echoed().unwrap();
    assert_eq!(
        (seen.pod.as_str(), seen.path.as_str()),
        (V2, "/rewritten/x?q=1")
    );
    assert_eq!(seen.header("host").as_deref(), Some("rewritten.example"));

    // Mirror: every copy arrives at the mirror pod; the client gets the real backend's answer.
    let mirrored = client.curl(&[
        "-n",
        "5",
        "-X",
        "POST",
        "-d",
        "payload",
        &format!("{echo}/mirror"),
    ]);
    served.count(&mirrored);
    for r in &mirrored {
        let seen = r.echoed().unwrap();
        assert_eq!((seen.pod.as_str(), seen.body_len), (V1, 7));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mirror_inbound = loop {
        let n = metric(
            &mesh.pod(MIRROR).metrics(),
            "trellis_requests_total",
            &[("direction", "inbound")],
        );
        if n >= 5.0 || Instant::now() >= deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(mirror_inbound, 5.0, "copies at the mirror pod");
    // A mirror that cannot be served (no endpoints) changes nothing for the client.
    let broken = client.curl(&["-n", "3", &format!("{echo}/mirror-broken")]);
    served.count(&broken);
    assert!(broken.iter().all(|r| r.pod() == V1), "{broken:?}");

    // Producer and consumer routes: the consumer namespace's route replaces the producer's
    // for its clients only, on port 80 only.
    let pinned = consumer.curl(&["-n", "20", &format!("{echo}/split")]);
    served.count(&pinned);
    for r in &pinned {
        let seen = r.echoed().unwrap();
        assert_eq!(seen.pod, V2);
        assert_eq!(seen.header("x-consumer").as_deref(), Some("yes"));
    }
    let not_redirected = consumer.curl(&["http://echo.mesh/redirect/a"]);
    served.count(&not_redirected);
    assert_eq!(not_redirected[0].pod(), V2);

    // Port-specific parentRef: port 9000 of echo has no route (passthrough to the Service's
    // pods, no filters); a port-less parentRef routes every port of its Service.
    let alt = client.curl(&["-n", "20", "http://echo.mesh:9000/headers"]);
    served.count(&alt);
    for r in &alt {
        assert_eq!(r.echoed().unwrap().header("x-rule"), None, "{r:?}");
    }
    // From the consumer namespace too (its route names port 80 only); concurrent slow
    // requests spread over both of the Service's pods.
    let from_consumer_alt =
        consumer.curl(&["-n", "40", "-c", "8", "http://echo.mesh:9000/?delay_ms=50"]);
    served.count(&from_consumer_alt);
    let pods: std::collections::BTreeSet<String> =
        from_consumer_alt.iter().map(Reply::pod).collect();
    assert_eq!(pods.len(), 2, "passthrough reached {pods:?}");
    for r in &from_consumer_alt {
        assert_eq!(r.echoed().unwrap().header("x-consumer"), None, "{r:?}");
    }
    for port in ["80", "81"] {
        let r = client.curl(&[&format!("http://portless.mesh:{port}/")]);
        served.count(&r);
        let seen = r[0].echoed().unwrap();
        assert_eq!(seen.pod, V2, "port {port}");
        assert_eq!(
            seen.header("x-route").as_deref(),
            Some("every-port"),
            "port {port}"
        );
    }

    // A pod IP is not a Service: no route applies, but the hop is still mutual TLS.
    let pod_ip = format!("http://{}:8080/split", mesh.pod(V2).ip);
    let direct = client.curl(&["-n", "20", &pod_ip]);
    served.count(&direct);
    for r in &direct {
        let seen = r.echoed().unwrap();
        assert_eq!(seen.pod, V2);
        assert_eq!(
            seen.header("trellis-client-id").as_deref(),
            Some("spiffe://cluster.local/ns/mesh/sa/client")
        );
    }

    // Every sidecar's metrics match the traffic sent.
    let m = client.metrics();
    let out = |labels: &[(&str, &str)]| {
        let mut all = vec![("direction", "outbound")];
        all.extend_from_slice(labels);
        metric(&m, "trellis_requests_total", &all)
    };
    assert_eq!(
        out(&[("route", "mesh/echo"), ("rule", "0"), ("status", "200")]),
        500.0,
        "{m}"
    );
    assert_eq!(
        out(&[
            ("route", "mesh/echo"),
            ("rule", "0"),
            ("backend", "mesh/echo-v1:80")
        ]),
        v1 as f64
    );
    assert_eq!(out(&[("route", "mesh/echo"), ("rule", "1")]), 2.0);
    assert_eq!(
        out(&[("route", "mesh/echo"), ("rule", "2"), ("status", "301")]),
        1.0
    );
    assert_eq!(out(&[("route", "mesh/echo"), ("rule", "3")]), 1.0);
    assert_eq!(out(&[("route", "mesh/echo"), ("rule", "4")]), 5.0);
    assert_eq!(out(&[("route", "mesh/every-port")]), 2.0);
    assert_eq!(out(&[("parent", "mesh/echo:9000"), ("route", "")]), 20.0);
    assert_eq!(out(&[("parent", ""), ("route", "")]), 20.0);
    assert_eq!(
        out(&[("route", "mesh/echo"), ("rule", "5"), ("status", "200")]),
        3.0
    );
    assert_eq!(
        metric(&m, "trellis_mirrors_total", &[("result", "sent")]),
        5.0
    );
    assert_eq!(
        metric(&m, "trellis_mirrors_total", &[("result", "failed")]),
        3.0
    );
    let m = consumer.metrics();
    let consumer_out = |labels: &[(&str, &str)]| {
        let mut all = vec![("direction", "outbound")];
        all.extend_from_slice(labels);
        metric(&m, "trellis_requests_total", &all)
    };
    assert_eq!(
        consumer_out(&[("route", "consumer/echo-pinned"), ("status", "200")]),
        21.0,
        "{m}"
    );
    assert_eq!(consumer_out(&[("route", "mesh/echo")]), 0.0);
    assert_eq!(
        consumer_out(&[("parent", "mesh/echo:9000"), ("route", "")]),
        40.0
    );
    for (pod, answered) in &served.0 {
        let m = mesh.pod(pod).metrics();
        let inbound = metric(&m, "trellis_requests_total", &[("direction", "inbound")]);
        assert_eq!(inbound, *answered as f64, "inbound requests at {pod}:\n{m}");
    }

    // A counter of the client's sidecar, outbound, read now.
    let client_outbound = |name: &str, labels: &[(&str, &str)]| {
        let mut all = vec![("direction", "outbound")];
        all.extend_from_slice(labels);
        metric(&client.metrics(), name, &all)
    };

    // Timeouts: a backend slower than the rule's 300 ms gets the client a 504 from its own
    // sidecar, in about that time.
    let asked = Instant::now();
    let slow = client.get(&format!("{echo}/slow?delay_ms=3000"), &[]);
    assert_eq!(slow.status, Some(504), "{slow:?}");
    assert!(slow.headers.contains_key("trellis-proxy-error"), "{slow:?}");
    assert!(asked.elapsed() < Duration::from_millis(2500), "{slow:?}");
    assert_eq!(client_outbound("trellis_timeouts_total", &[]), 1.0);

    // Retries: a 503 is sent again twice, so the backend pod sees three attempts.
    let v2_inbound = || {
        metric(
            &mesh.pod(V2).metrics(),
            "trellis_requests_total",
            &[("direction", "inbound")],
        )
    };
    let before = v2_inbound();
    let retried = client.get(&format!("{echo}/retry?status=503"), &[]);
    assert_eq!(retried.status, Some(503), "{retried:?}");
    assert_eq!(v2_inbound() - before, 3.0);
    assert_eq!(client_outbound("trellis_retries_total", &[]), 2.0);

    // GRPCRoute weights per call, 500 calls as streams of one HTTP/2 connection from the app.
    let h2_connections =
        || client_outbound("trellis_protocol_detections_total", &[("protocol", "h2")]);
    let connections_before = h2_connections();
    let calls = client.curl(&[
        "--h2",
        "-n",
        "500",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-d",
        "call",
        "http://echo.mesh:7070/proto.EchoTestService/Echo",
    ]);
    all_ok(&calls);
    assert_eq!(h2_connections() - connections_before, 1.0);
    let mut grpc_v1 = 0;
    for c in &calls {
        assert_eq!(c.headers.get("grpc-status").map(String::as_str), Some("0"));
        let seen = c.echoed().unwrap();
        assert_eq!(seen.version, "HTTP/2.0");
        if seen.pod == V1 {
            grpc_v1 += 1;
        }
    }
    assert!(
        (325..=375).contains(&grpc_v1),
        "echo-v1 answered {grpc_v1} of 500"
    );
    assert_eq!(
        client_outbound("trellis_requests_total", &[("route", "mesh/echo-grpc")]),
        500.0
    );
    eprintln!("routing scenarios done in {:?}", started.elapsed());
}
