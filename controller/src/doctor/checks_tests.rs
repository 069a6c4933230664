//! Table tests of the verdicts on the cluster as a whole, the injector's settings and the
//! output: objects as the API server sends them, judged at a fixed instant.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use serde_json::{Value, json};

use super::checks::*;
use super::fixtures::*;
use super::{json as render_json, parse_timeout, table};

#[test]
fn a_healthy_cluster_passes_every_check() {
    let checks = judge(&healthy_cluster(), now());
    let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            "kubernetes-version",
            "gateway-api-httproute",
            "gateway-api-grpcroute",
            "control-plane-controller",
            "control-plane-identity",
            "control-plane-injector",
            "injector-webhook",
            "injector-endpoints",
            "injector-ready",
            "trust-anchors",
            "issuer",
            "pod-security",
            "injected-pods",
            "proxy-versions",
        ]
    );
    for c in &checks {
        assert_eq!(c.status, Status::Ok, "{c:#?}");
        assert!(c.hint.is_empty(), "{c:#?}");
    }
    assert_eq!(exit_code(&checks), 0);
    assert_eq!(
        find(&checks, "gateway-api-httproute").message,
        "HTTPRoute served v1, v1beta1; storage v1; bundle v1.5.1 (standard)"
    );
    assert_eq!(
        find(&checks, "injector-endpoints").message,
        "Service trellis-system/trellis-injector: 2 ready endpoints",
        "an endpoint without a ready condition counts as ready"
    );
    assert_eq!(
        find(&checks, "issuer").message,
        "CN=issuer.trellis valid until 2027-12-01 (in 360 days)"
    );
    assert_eq!(
        find(&checks, "injected-pods").message,
        "1 pod in 1 labelled namespace, all with the proxy",
        "the finished job is not counted"
    );
}

#[test]
fn gateway_api_crds() {
    let cases: Vec<(&str, Fetched<_>, &str, Status, &str)> = vec![
        (
            "http missing",
            Fetched::Missing,
            "http",
            Status::Fail,
            "is not installed",
        ),
        (
            "http v1 not served",
            crd(
                "httproutes",
                &[("v1", false, false), ("v1beta1", true, true)],
            ),
            "http",
            Status::Fail,
            "HTTPRoute v1 is not served (served v1beta1; storage v1beta1",
        ),
        (
            "http forbidden",
            Fetched::Denied(
                Access::new("get", "customresourcedefinitions.apiextensions.k8s.io")
                    .named("httproutes.gateway.networking.k8s.io"),
            ),
            "http",
            Status::Unknown,
            "cannot read CRD httproutes",
        ),
        (
            "grpc missing",
            Fetched::Missing,
            "grpc",
            Status::Warn,
            "GRPCRoutes cannot be used",
        ),
        (
            "grpc v1alpha2 only",
            crd("grpcroutes", &[("v1alpha2", true, true)]),
            "grpc",
            Status::Warn,
            "GRPCRoute v1 is not served",
        ),
        (
            "grpc no answer",
            Fetched::Failed("no answer within 10s".into()),
            "grpc",
            Status::Unknown,
            "no answer within 10s",
        ),
    ];
    for (what, fetched, kind, status, words) in cases {
        let mut cluster = healthy_cluster();
        let name = if kind == "http" {
            cluster.httproute_crd = fetched;
            "gateway-api-httproute"
        } else {
            cluster.grpcroute_crd = fetched;
            "gateway-api-grpcroute"
        };
        let checks = judge(&cluster, now());
        let c = find(&checks, name);
        assert_eq!(c.status, status, "{what}: {c:#?}");
        assert!(c.message.contains(words), "{what}: {c:#?}");
        assert!(!c.hint.is_empty(), "{what}");
        let others_ok = checks
            .iter()
            .filter(|o| o.name != name)
            .all(|o| o.status == Status::Ok);
        assert!(others_ok, "{what}: {checks:#?}");
    }
    let mut cluster = healthy_cluster();
    cluster.httproute_crd = Fetched::Denied(
        Access::new("get", "customresourcedefinitions.apiextensions.k8s.io")
            .named("httproutes.gateway.networking.k8s.io"),
    );
    let checks = judge(&cluster, now());
    assert_eq!(
        find(&checks, "gateway-api-httproute").hint,
        "grant get customresourcedefinitions.apiextensions.k8s.io \
         \"httproutes.gateway.networking.k8s.io\" (cluster-wide) (see docs/reference/doctor.md, RBAC)"
    );
    assert_eq!(exit_code(&checks), 0, "unknown does not fail the run");
}

#[test]
fn control_plane_replicas() {
    let crashing = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "trellis-identity-7d-x"},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}],
                   "containerStatuses": [{"name": "identity", "ready": false, "restartCount": 5, "image": "i", "imageID": "",
                                          "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}
    });
    let cases = [
        (
            Fetched::Missing,
            Fetched::Found(vec![]),
            Status::Fail,
            "Deployment trellis-system/trellis-identity not found",
        ),
        (
            Fetched::Found(from(deployment("identity", 0, 0, json!([]), json!([])))),
            Fetched::Found(vec![]),
            Status::Fail,
            "Deployment trellis-system/trellis-identity is scaled to 0",
        ),
        (
            Fetched::Found(from(deployment("identity", 1, 0, json!([]), json!([])))),
            Fetched::Found(vec![from(crashing.clone())]),
            Status::Fail,
            "trellis-identity: 0/1 replicas ready; not ready: trellis-identity-7d-x (identity: CrashLoopBackOff, 5 restarts)",
        ),
        (
            Fetched::Found(from(deployment("identity", 2, 1, json!([]), json!([])))),
            Fetched::Denied(Access::new("list", "pods").within(NS)),
            Status::Warn,
            "trellis-identity: 1/2 replicas ready",
        ),
        (
            Fetched::Found(from(deployment("identity", 2, 2, json!([]), json!([])))),
            Fetched::Found(vec![]),
            Status::Ok,
            "trellis-identity: 2/2 replicas ready (ghcr.io/trellis-mesh/trellis-identity:v0.4.0)",
        ),
        (
            Fetched::Denied(
                Access::new("get", "deployments.apps")
                    .named("trellis-identity")
                    .within(NS),
            ),
            Fetched::Found(vec![]),
            Status::Unknown,
            "cannot read Deployment trellis-system/trellis-identity: forbidden",
        ),
    ];
    for (deployment, pods, status, words) in cases {
        let mut cluster = healthy_cluster();
        cluster.control_plane[1] = ControlPlane {
            component: Component::Identity,
            deployment,
            pods,
        };
        let checks = judge(&cluster, now());
        let c = find(&checks, "control-plane-identity");
        assert_eq!(c.status, status, "{c:#?}");
        assert_eq!(c.message, words);
        assert_eq!(exit_code(&checks), u8::from(status == Status::Fail));
    }
}

#[test]
fn the_injectors_settings_come_from_its_args_or_env() {
    let of = |args: Value, env: Value| {
        InjectorSettings::of(&from(deployment("injector", 1, 1, args, env)))
    };
    let s = of(
        json!(["serve", "--proxy-image", "r/p:1", "--sidecar-mode=classic"]),
        json!([]),
    );
    assert_eq!(s.proxy_image.as_deref(), Some("r/p:1"));
    assert_eq!(s.sidecar_mode, "classic");
    let s = of(
        json!(["serve"]),
        json!([{"name": "TRELLIS_PROXY_IMAGE", "value": "r/p:2"}]),
    );
    assert_eq!(s.proxy_image.as_deref(), Some("r/p:2"));
    assert_eq!(s.sidecar_mode, "native");
    // Unset: the injector's default, the proxy of its own release.
    let s = of(json!(["serve"]), json!([]));
    assert_eq!(
        s.proxy_image.as_deref(),
        Some("ghcr.io/trellis-mesh/trellis-proxy:v0.4.0")
    );
}

#[test]
fn native_sidecars_need_kubernetes_1_29() {
    let version = |minor: &str| {
        Fetched::Found(from(json!({
            "major": "1", "minor": minor, "gitVersion": format!("v1.{}.0", minor.trim_end_matches('+')),
            "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "", "compiler": "", "platform": ""
        })))
    };
    let cases = [
        ("28", "native", Status::Fail),
        ("28", "classic", Status::Ok),
        ("29+", "native", Status::Ok),
        ("33", "native", Status::Ok),
    ];
    for (minor, mode, status) in cases {
        let mut cluster = healthy_cluster();
        cluster.version = version(minor);
        cluster.control_plane[2].deployment = Fetched::Found(from(deployment(
            "injector",
            1,
            1,
            json!([format!("--sidecar-mode={mode}")]),
            json!([]),
        )));
        let c = find(&judge(&cluster, now()), "kubernetes-version").clone();
        assert_eq!(c.status, status, "{minor} {mode}: {c:#?}");
        assert!(
            c.message
                .starts_with(&format!("Kubernetes v1.{}", minor.trim_end_matches('+'))),
            "{c:#?}"
        );
    }
}

#[test]
fn json_and_table_output() {
    let mut cluster = healthy_cluster();
    cluster.grpcroute_crd = Fetched::Missing;
    cluster.labelled = Fetched::Found(vec![namespace("shop", &[(PSS_ENFORCE, "restricted")])]);
    let checks = judge(&cluster, now());
    let code = exit_code(&checks);
    assert_eq!(code, 1);
    let text = render_json(&checks, code);
    let doc: Value = serde_json::from_str(&text).unwrap();
    let keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["checks", "summary"]);
    // Fields in the documented order.
    assert!(
        text.contains(
            "\"name\": \"kubernetes-version\",\n      \"status\": \"ok\",\n      \"message\": \
             \"Kubernetes v1.33.1\",\n      \"hint\": \"\"\n"
        ),
        "{text}"
    );
    assert!(
        text.ends_with(
            "\"summary\": {\n    \"ok\": 12,\n    \"warn\": 1,\n    \"fail\": 1,\n    \
             \"unknown\": 0,\n    \"exit_code\": 1\n  }\n}\n"
        ),
        "{text}"
    );
    assert_eq!(
        doc["summary"],
        json!({"ok": 12, "warn": 1, "fail": 1, "unknown": 0, "exit_code": 1})
    );
    let grpc = &doc["checks"][2];
    let mut keys: Vec<&String> = grpc.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["hint", "message", "name", "status"]);
    assert_eq!(grpc["name"], "gateway-api-grpcroute");
    assert_eq!(grpc["status"], "warn");
    assert_eq!(
        doc["checks"][0]["hint"], "",
        "an ok check has an empty hint"
    );

    let text = table(&checks);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "STATUS  CHECK                     MESSAGE");
    assert!(
        lines[1].starts_with("ok      kubernetes-version        Kubernetes v1.33.1"),
        "{text}"
    );
    assert!(lines.contains(&"warn    gateway-api-grpcroute     CRD grpcroutes.gateway.networking.k8s.io is not installed: GRPCRoutes cannot be used (HTTPRoutes work)"), "{text}");
    assert!(
        text.contains("\n                                  hint: install the Gateway API CRDs"),
        "{text}"
    );
    assert_eq!(
        lines.last(),
        Some(&"14 checks: 12 ok, 1 warn, 1 fail, 0 unknown")
    );
}

#[test]
fn request_timeouts() {
    assert_eq!(parse_timeout("10s"), Ok(std::time::Duration::from_secs(10)));
    assert_eq!(
        parse_timeout("500ms"),
        Ok(std::time::Duration::from_millis(500))
    );
    assert_eq!(parse_timeout("2m"), Ok(std::time::Duration::from_secs(120)));
    assert_eq!(parse_timeout("3"), Ok(std::time::Duration::from_secs(3)));
    for bad in ["", "0s", "s", "1h", "-1s", "1.5s"] {
        assert!(parse_timeout(bad).is_err(), "{bad}");
    }
}
