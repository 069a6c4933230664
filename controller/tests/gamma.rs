//! The Gateway API mesh conformance scenarios (`conformance/tests/mesh`), request by request,
//! against `explain`'s logic: the upstream manifests plus the pods and EndpointSlices a cluster
//! would add, loaded by local mode's loader, routed by the proxy's matcher and filters.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;

use trellis_controller::explain::{Answer, Destination, Explanation, explain, what_if};
use trellis_controller::index::{Config, Index};
use trellis_controller::manifests::load_dir;
use trellis_controller::status::RouteStatus;

const MESH: &str = "gateway-conformance-mesh";
const CONSUMER: &str = "gateway-conformance-mesh-consumer";
const V1_POD: &str = "echo-v1-5d8c7b9f4-x2k4p";
const V2_POD: &str = "echo-v2-6f9d8c7b5-q7w8e";

struct Mesh {
    index: Index,
    _dir: tempfile::TempDir,
}

/// The base manifests, the cluster's pods and slices, and the named test manifests.
fn mesh(tests: &[&str]) -> Mesh {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gamma");
    let dir = tempfile::tempdir().unwrap();
    for name in ["base-mesh-manifests.yaml", "endpoints.yaml"]
        .iter()
        .chain(tests)
    {
        std::fs::copy(fixtures.join(name), dir.path().join(name)).unwrap();
    }
    let objects = load_dir(dir.path()).unwrap();
    Mesh {
        index: Index::build(&objects, &Config::default()),
        _dir: dir,
    }
}

impl Mesh {
    fn ask(&self, from: &str, to: &str, path: &str, headers: &[&str]) -> Explanation {
        let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
        let req = what_if(to, "GET", path, &headers).unwrap();
        explain(&self.index, from, &req)
    }

    fn get(&self, path: &str, headers: &[&str]) -> Explanation {
        self.ask(MESH, "echo", path, headers)
    }

    fn status(&self, name: &str) -> &RouteStatus {
        self.index
            .statuses()
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no status for route {name}"))
    }
}

/// The pods that can answer: the endpoints of every backend with weight, as pod names.
fn answering_pods(e: &Explanation) -> Vec<String> {
    let mut pods: Vec<String> = e
        .backends
        .iter()
        .filter(|b| b.weight > 0)
        .flat_map(|b| b.endpoints.iter().filter_map(|ep| ep.pod.clone()))
        .collect();
    pods.sort();
    pods.dedup();
    pods
}

/// Asserts a 200 served only by pods whose names start with `backend` (the suite's check).
#[track_caller]
fn assert_backend(e: &Explanation, backend: &str) {
    assert_eq!(e.answer, Answer::Forward, "{e:#?}");
    let pods = answering_pods(e);
    assert!(
        !pods.is_empty() && pods.iter().all(|p| p.starts_with(backend)),
        "expected only {backend} pods, got {pods:?} for {e:#?}"
    );
}

#[track_caller]
fn assert_status(e: &Explanation, status: u16) {
    match &e.answer {
        Answer::Error { status: s, .. } | Answer::Redirect { status: s, .. } => {
            assert_eq!(*s, status, "{e:#?}")
        }
        Answer::Forward => panic!("expected {status}, got forward: {e:#?}"),
    }
}

#[track_caller]
fn assert_redirect(e: &Explanation, status: u16, location: &str) {
    assert_eq!(
        e.answer,
        Answer::Redirect {
            status,
            location: location.to_string()
        },
        "{e:#?}"
    );
}

/// The joined values of a header at the (single) backend, as the suite compares them.
fn backend_header(e: &Explanation, name: &str) -> Option<String> {
    let b = e.backends.iter().find(|b| b.weight > 0)?;
    b.request_headers
        .get(&name.to_ascii_lowercase())
        .map(|v| v.join(","))
}

fn response_header_set(e: &Explanation, name: &str) -> Option<String> {
    use trellis_api::policy::Filter;
    e.filters.iter().find_map(|f| match f {
        Filter::ResponseHeaderModifier(m) => m
            .set
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.clone()),
        _ => None,
    })
}

fn all_healthy(m: &Mesh) {
    for s in m.index.statuses() {
        assert!(s.is_healthy(), "{s:#?}");
    }
}

#[test]
fn mesh_basic_passthrough() {
    let m = mesh(&[]);
    let e = m.get("/", &[]);
    assert_eq!(e.routing, "passthrough");
    assert_eq!(e.answer, Answer::Forward);
    assert_eq!(answering_pods(&e), vec![V1_POD, V2_POD]);
    assert!(m.index.statuses().is_empty());
}

#[test]
fn mesh_traffic_split() {
    let m = mesh(&["mesh-split.yaml"]);
    assert_backend(&m.get("/v1", &[]), "echo-v1");
    assert_backend(&m.get("/v2", &[]), "echo-v2");
    // Port-less parentRef: the route covers every port of the Service.
    assert_backend(&m.ask(MESH, "echo:8080", "/v2", &[]), "echo-v2");
    assert_status(&m.get("/v3", &[]), 404);
    all_healthy(&m);
}

#[test]
fn simple_same_namespace() {
    let m = mesh(&["httproute-simple-same-namespace.yaml"]);
    assert_backend(&m.get("/", &[]), "echo-v1");
    // parentRef port 80 only: 8080 stays passthrough to both versions.
    let e = m.ask(MESH, "echo:8080", "/", &[]);
    assert_eq!(e.routing, "passthrough");
    assert_eq!(answering_pods(&e), vec![V1_POD, V2_POD]);
    all_healthy(&m);
}

#[test]
fn matching() {
    let m = mesh(&["httproute-matching.yaml"]);
    let cases: &[(&str, &[&str], &str)] = &[
        ("/", &[], "echo-v1"),
        ("/example", &[], "echo-v1"),
        ("/", &["Version: one"], "echo-v1"),
        ("/v2", &[], "echo-v2"),
        ("/v2/example", &[], "echo-v2"),
        ("/", &["Version: two"], "echo-v2"),
        ("/v2/", &[], "echo-v2"),
        ("/v2example", &[], "echo-v1"),
        ("/foo/v2/example", &[], "echo-v1"),
    ];
    for (path, headers, backend) in cases {
        assert_backend(&m.get(path, headers), backend);
    }
    all_healthy(&m);
}

#[test]
fn query_param_matching() {
    let m = mesh(&["httproute-query-param-matching.yaml"]);
    let cases: &[(&str, &[&str], Option<&str>)] = &[
        ("/?animal=whale", &[], Some("echo-v1")),
        ("/?animal=dolphin", &[], Some("echo-v2")),
        ("/?animal=whale&otherparam=irrelevant", &[], Some("echo-v1")),
        ("/?animal=dolphin&color=yellow", &[], Some("echo-v2")),
        ("/?color=blue", &[], None),
        ("/?animal=dog", &[], None),
        ("/?animal=whaledolphin", &[], None),
        ("/", &[], None),
        ("/path1?animal=whale", &[], Some("echo-v1")),
        ("/?animal=whale", &["version: one"], Some("echo-v2")),
        ("/path3?animal=shark", &[], Some("echo-v1")),
        ("/path4?animal=kraken", &["version: three"], Some("echo-v1")),
        ("/?animal=shark", &[], None),
        ("/path4?animal=kraken", &[], None),
        ("/path5?animal=hydra", &[], Some("echo-v1")),
    ];
    for (path, headers, backend) in cases {
        let e = m.get(path, headers);
        match backend {
            Some(b) => assert_backend(&e, b),
            None => assert_status(&e, 404),
        }
    }
}

#[test]
fn redirect_host_and_status() {
    let m = mesh(&["httproute-redirect-host-and-status.yaml"]);
    assert_redirect(
        &m.get("/hostname-redirect", &[]),
        302,
        "http://example.org/hostname-redirect",
    );
    assert_redirect(
        &m.get("/host-and-status", &[]),
        301,
        "http://example.org/host-and-status",
    );
    all_healthy(&m);
}

#[test]
fn redirect_path() {
    let m = mesh(&["httproute-redirect-path.yaml"]);
    let cases = [
        (
            "/original-prefix/lemon",
            302,
            "http://echo/replacement-prefix/lemon",
        ),
        (
            "/full/path/original",
            302,
            "http://echo/full-path-replacement",
        ),
        (
            "/path-and-host",
            302,
            "http://example.org/replacement-prefix",
        ),
        ("/path-and-status", 301, "http://echo/replacement-prefix"),
        (
            "/full-path-and-host",
            302,
            "http://example.org/replacement-full",
        ),
        ("/full-path-and-status", 301, "http://echo/replacement-full"),
    ];
    for (path, status, location) in cases {
        assert_redirect(&m.get(path, &[]), status, location);
    }
    all_healthy(&m);
}

#[test]
fn redirect_port() {
    let m = mesh(&["httproute-redirect-port.yaml"]);
    let cases = [
        ("/port", 302, "http://echo:8083/port"),
        (
            "/port-and-host",
            302,
            "http://example.org:8083/port-and-host",
        ),
        ("/port-and-status", 301, "http://echo:8083/port-and-status"),
        (
            "/port-and-host-and-status",
            302,
            "http://example.org:8083/port-and-host-and-status",
        ),
    ];
    for (path, status, location) in cases {
        assert_redirect(&m.get(path, &[]), status, location);
    }
}

#[test]
fn scheme_redirect() {
    let m = mesh(&["httproute-redirect-scheme.yaml"]);
    let cases = [
        ("/scheme", 302, "https://echo/scheme"),
        (
            "/scheme-and-host",
            302,
            "https://example.org/scheme-and-host",
        ),
        ("/scheme-and-status", 301, "https://echo/scheme-and-status"),
        (
            "/scheme-and-host-and-status",
            302,
            "https://example.org/scheme-and-host-and-status",
        ),
    ];
    for (path, status, location) in cases {
        assert_redirect(&m.get(path, &[]), status, location);
    }
}

#[test]
fn redirect_303_307_308() {
    let m = mesh(&[
        "httproute-303-redirect.yaml",
        "httproute-307-redirect.yaml",
        "httproute-308-redirect.yaml",
    ]);
    assert_redirect(&m.get("/redirect", &[]), 303, "http://echo/redirect");
    assert_redirect(&m.get("/temporary", &[]), 307, "http://echo/temporary");
    assert_redirect(&m.get("/permanent", &[]), 308, "http://echo/permanent");
    all_healthy(&m);
}

/// The suite's header table (GAMMA.md §3.6), shared by the rule- and backend-level variants.
fn check_header_modifier(m: &Mesh) {
    struct Case {
        path: &'static str,
        sent: &'static [&'static str],
        want: &'static [(&'static str, &'static str)],
        absent: &'static [&'static str],
    }
    let cases = [
        Case {
            path: "/set",
            sent: &["Some-Other-Header: val"],
            want: &[
                ("Some-Other-Header", "val"),
                ("X-Header-Set", "set-overwrites-values"),
            ],
            absent: &[],
        },
        Case {
            path: "/set",
            sent: &["Some-Other-Header: val", "X-Header-Set: some-other-value"],
            want: &[
                ("Some-Other-Header", "val"),
                ("X-Header-Set", "set-overwrites-values"),
            ],
            absent: &[],
        },
        Case {
            path: "/add",
            sent: &["Some-Other-Header: val"],
            want: &[
                ("Some-Other-Header", "val"),
                ("X-Header-Add", "add-appends-values"),
            ],
            absent: &[],
        },
        Case {
            path: "/add",
            sent: &["Some-Other-Header: val", "X-Header-Add: some-other-value"],
            want: &[
                ("Some-Other-Header", "val"),
                ("X-Header-Add", "some-other-value,add-appends-values"),
            ],
            absent: &[],
        },
        Case {
            path: "/remove",
            sent: &["X-Header-Remove: val"],
            want: &[],
            absent: &["X-Header-Remove"],
        },
        Case {
            path: "/multiple",
            sent: &[
                "X-Header-Set-2: set-val-2",
                "X-Header-Add-2: add-val-2",
                "X-Header-Remove-2: remove-val-2",
                "Another-Header: another-header-val",
            ],
            want: &[
                ("X-Header-Set-1", "header-set-1"),
                ("X-Header-Set-2", "header-set-2"),
                ("X-Header-Add-1", "header-add-1"),
                ("X-Header-Add-2", "add-val-2,header-add-2"),
                ("X-Header-Add-3", "header-add-3"),
                ("Another-Header", "another-header-val"),
            ],
            absent: &["X-Header-Remove-1", "X-Header-Remove-2"],
        },
        Case {
            path: "/case-insensitivity",
            sent: &[
                "x-header-set: original-val-set",
                "x-header-add: original-val-add",
                "x-header-remove: original-val-remove",
                "Another-Header: another-header-val",
            ],
            want: &[
                ("X-Header-Set", "header-set"),
                ("X-Header-Add", "original-val-add,header-add"),
                ("Another-Header", "another-header-val"),
            ],
            absent: &["X-Header-Remove"],
        },
    ];
    for case in cases {
        let e = m.get(case.path, case.sent);
        assert_backend(&e, "echo-v1");
        for (name, value) in case.want {
            assert_eq!(
                backend_header(&e, name).as_deref(),
                Some(*value),
                "{} {name}",
                case.path
            );
        }
        for name in case.absent {
            assert_eq!(backend_header(&e, name), None, "{} {name}", case.path);
        }
    }
    all_healthy(m);
}

#[test]
fn request_header_modifier() {
    check_header_modifier(&mesh(&["httproute-request-header-modifier.yaml"]));
}

#[test]
fn backend_request_header_modifier() {
    let m = mesh(&["httproute-request-header-modifier-backend.yaml"]);
    check_header_modifier(&m);
    // The filter runs for the backend, not the rule.
    let e = m.get("/set", &[]);
    assert!(e.filters.is_empty(), "{e:#?}");
    assert_eq!(e.request.headers.get("x-header-set"), None);
}

#[test]
fn rewrite_path() {
    let m = mesh(&["httproute-rewrite-path.yaml"]);
    let cases = [
        ("/prefix/one/two", "/one/two"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/full/one/two", "/one"),
    ];
    for (sent, backend_path) in cases {
        let e = m.get(sent, &[]);
        assert_backend(&e, "echo-v1");
        assert_eq!(e.request.path, backend_path, "{sent}");
    }
    let headers = [
        "X-Header-Remove: remove-val",
        "X-Header-Add-Append: append-val-1",
        "X-Header-Set: set-val",
    ];
    for (sent, backend_path) in [
        ("/full/rewrite-path-and-modify-headers/test", "/test"),
        ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
    ] {
        let e = m.get(sent, &headers);
        assert_backend(&e, "echo-v1");
        assert_eq!(e.request.path, backend_path, "{sent}");
        assert_eq!(
            backend_header(&e, "X-Header-Add").as_deref(),
            Some("header-val-1")
        );
        assert_eq!(
            backend_header(&e, "X-Header-Add-Append").as_deref(),
            Some("append-val-1,header-val-2")
        );
        assert_eq!(
            backend_header(&e, "X-Header-Set").as_deref(),
            Some("set-overwrites-values")
        );
        assert_eq!(backend_header(&e, "X-Header-Remove"), None);
    }
    all_healthy(&m);
}

#[test]
fn named_rule() {
    let m = mesh(&["httproute-named-rule.yaml"]);
    let e = m.get("/named", &[]);
    assert_backend(&e, "echo-v1");
    assert_eq!(
        e.rule.as_ref().and_then(|r| r.name.as_deref()),
        Some("named-rule")
    );
    let e = m.get("/unnamed", &[]);
    assert_backend(&e, "echo-v2");
    assert_eq!(e.rule.as_ref().map(|r| r.name.clone()), Some(None));
}

#[test]
fn weight_70_30() {
    let m = mesh(&["httproute-weight.yaml"]);
    let e = m.get("/", &[]);
    assert_eq!(e.answer, Answer::Forward);
    let shares: Vec<(String, f64)> = e
        .backends
        .iter()
        .map(|b| (b.service.as_ref().unwrap().name.clone(), b.share))
        .collect();
    assert_eq!(
        shares,
        vec![("echo-v1".to_string(), 0.7), ("echo-v2".to_string(), 0.3)]
    );
    all_healthy(&m);
}

#[test]
fn consumer_route_applies_only_to_its_namespace() {
    let m = mesh(&["mesh-consumer-route.yaml"]);
    let to = "echo-v1.gateway-conformance-mesh";
    let consumer = m.ask(CONSUMER, to, "/", &[]);
    assert_backend(&consumer, "echo-v1");
    assert_eq!(
        response_header_set(&consumer, "X-Header-Set").as_deref(),
        Some("set")
    );
    let producer_side = m.ask(MESH, to, "/", &[]);
    assert_backend(&producer_side, "echo-v1");
    assert_eq!(producer_side.routing, "passthrough");
    assert_eq!(response_header_set(&producer_side, "X-Header-Set"), None);
    // Cross-namespace backendRef without a ReferenceGrant is fine in the mesh.
    all_healthy(&m);
}

#[test]
fn frontend_versus_pod_ip() {
    let m = mesh(&["mesh-frontend.yaml"]);
    let e = m.get_to("echo-v2");
    assert_backend(&e, "echo-v2");
    assert_eq!(
        response_header_set(&e, "X-Header-Set").as_deref(),
        Some("set")
    );
    // Traffic to a pod IP is not Service traffic: unrouted, but its identity is known.
    let e = m.ask(MESH, "10.244.0.12:8080", "/", &[]);
    assert_eq!(e.routing, "unrouted");
    match &e.destination {
        Destination::NotAService { identity } => assert_eq!(
            identity.as_ref().map(ToString::to_string).as_deref(),
            Some("spiffe://cluster.local/ns/gateway-conformance-mesh/sa/default")
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn frontend_hostname_routes_by_cluster_ip_not_host() {
    let m = mesh(&["mesh-frontend.yaml"]);
    let ip_of = |name: &str| match m.get_to(name).destination {
        Destination::Service { cluster_ip, .. } => cluster_ip,
        other => panic!("{other:?}"),
    };
    let (v1_ip, v2_ip) = (ip_of("echo-v1"), ip_of("echo-v2"));
    let e = m.ask(MESH, &format!("{v2_ip}:80"), "/", &["Host: echo-v1"]);
    assert_backend(&e, "echo-v2");
    assert_eq!(
        response_header_set(&e, "X-Header-Set").as_deref(),
        Some("set")
    );
    let e = m.ask(MESH, &format!("{v1_ip}:80"), "/", &["Host: echo-v2"]);
    assert_backend(&e, "echo-v1");
    assert_eq!(response_header_set(&e, "X-Header-Set"), None);
}

#[test]
fn ports() {
    let m = mesh(&["mesh-ports.yaml"]);
    let cases = [
        ("echo-v1", "echo-v1", Some("v1")),
        ("echo-v1:8080", "echo-v1", None),
        ("echo-v2", "echo-v2", Some("v2")),
        ("echo-v2:8080", "echo-v2", Some("v2")),
    ];
    for (to, backend, header) in cases {
        let e = m.ask(MESH, to, "/", &[]);
        assert_backend(&e, backend);
        assert_eq!(
            response_header_set(&e, "X-Header-Set").as_deref(),
            header,
            "{to}"
        );
    }
    all_healthy(&m);
}

#[test]
fn grpc_weight_ignores_missing_zero_weight_backend() {
    let m = mesh(&["grpcroute-weight.yaml"]);
    let e = m.ask(MESH, "echo:7070", "/proto.EchoTestService/Echo", &[]);
    assert_eq!(e.routing, "GRPCRoute");
    assert_eq!(e.answer, Answer::Forward);
    let weights: Vec<(u32, Option<u16>)> =
        e.backends.iter().map(|b| (b.weight, b.status)).collect();
    assert_eq!(weights, vec![(70, None), (30, None), (0, Some(500))]);
    assert_eq!(answering_pods(&e), vec![V1_POD, V2_POD]);
    // The route is Accepted; the missing echo-v3 is reported, not fatal.
    let status = m.status("mesh-grpc-weighted-backends");
    let parent = &status.parents[0];
    assert!(parent.condition("Accepted").unwrap().status);
    let refs = parent.condition("ResolvedRefs").unwrap();
    assert!(!refs.status);
    assert_eq!(refs.reason, "BackendNotFound");
    assert!(refs.message.contains("echo-v3"), "{}", refs.message);
}

#[test]
fn grpc_request_header_modifier() {
    let m = mesh(&["grpcroute-request-header-modifier.yaml"]);
    let call = |headers: &[&str]| m.ask(MESH, "echo:7070", "/proto.EchoTestService/Echo", headers);
    let e = call(&[
        "x-test-case: set",
        "some-other-header: this-header-should-be-set",
        "x-header-set: this-value-should-be-overwritten",
    ]);
    assert_backend(&e, "echo-v1");
    assert_eq!(
        backend_header(&e, "x-header-set").as_deref(),
        Some("set-overwrites-values")
    );
    assert_eq!(
        backend_header(&e, "some-other-header").as_deref(),
        Some("this-header-should-be-set")
    );
    let e = call(&[
        "x-test-case: add",
        "x-header-add: this-value-should-be-appended",
    ]);
    assert_backend(&e, "echo-v1");
    assert_eq!(
        backend_header(&e, "x-header-add").as_deref(),
        Some("this-value-should-be-appended,add-appends-values")
    );
    let e = call(&[
        "x-test-case: remove",
        "x-header-remove: this-should-be-removed",
    ]);
    assert_backend(&e, "echo-v1");
    assert_eq!(backend_header(&e, "x-header-remove"), None);
    let e = call(&[
        "x-test-case: multi",
        "x-header-set-2: set-header-2",
        "x-header-add-2: add-header-2",
        "x-header-remove-2: should-be-removed-2",
    ]);
    assert_backend(&e, "echo-v2");
    assert_eq!(
        backend_header(&e, "x-header-set-1").as_deref(),
        Some("header-set-1")
    );
    assert_eq!(
        backend_header(&e, "x-header-set-2").as_deref(),
        Some("header-set-2")
    );
    assert_eq!(
        backend_header(&e, "x-header-add-1").as_deref(),
        Some("header-add-1")
    );
    assert_eq!(
        backend_header(&e, "x-header-add-2").as_deref(),
        Some("add-header-2,header-add-2")
    );
    assert_eq!(backend_header(&e, "x-header-remove-1"), None);
    assert_eq!(backend_header(&e, "x-header-remove-2"), None);
    // No rule matches a call without x-test-case.
    assert_status(&call(&[]), 404);
    all_healthy(&m);
}

#[test]
fn every_route_gets_status_from_trellis() {
    let m = mesh(&["httproute-matching.yaml", "mesh-consumer-route.yaml"]);
    for s in m.index.statuses() {
        for p in &s.parents {
            assert_eq!(p.controller_name, "trellis.dev/controller");
            assert_eq!(p.parent_ref.kind, "Service");
        }
    }
    let consumer = m.status("mesh-echo-add-header");
    assert_eq!(consumer.namespace, CONSUMER);
    assert_eq!(
        consumer.parents[0].parent_ref.namespace.as_deref(),
        Some(MESH)
    );
}

impl Mesh {
    fn get_to(&self, to: &str) -> Explanation {
        self.ask(MESH, to, "/", &[])
    }
}
