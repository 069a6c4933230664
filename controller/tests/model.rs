//! The GAMMA rules the conformance suite does not exercise: consumer routes replacing producer
//! routes, kind conflicts, invalid rules and references, endpoints and status details.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use trellis_api::discovery::Target;
use trellis_api::policy::{BackendTarget, OutboundPolicy, Routing, ServicePolicy};
use trellis_controller::explain::{Answer, Explanation, explain, what_if};
use trellis_controller::index::{Config, Index};
use trellis_controller::manifests::load_dir;
use trellis_controller::status::{ParentStatus, RouteStatus};

/// Two Services in `shop` (`web` with ports 80/http and 9090/admin, `api` on 80) with one
/// meshed pod each, and `client` namespace pods.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec:
  clusterIP: None
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, annotations: {trellis.dev/proxy-version: "1"}}
spec: {serviceAccountName: web-sa, containers: [{name: a, image: a}]}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: shop}
spec: {containers: [{name: a, image: a}]}
status: {podIP: 10.1.0.2}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: admin, port: 9090}]
endpoints:
  - {addresses: [10.1.0.1], conditions: {ready: true}, targetRef: {kind: Pod, name: web-0}}
  - {addresses: [10.1.0.9], conditions: {ready: false, serving: true, terminating: true}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.1.0.2], conditions: {ready: false, serving: true, terminating: true}, targetRef: {kind: Pod, name: api-0}}
  - {addresses: [10.1.0.3], conditions: {ready: false, serving: false, terminating: true}}
"#;

fn index(routes: &str) -> Index {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).unwrap();
    std::fs::write(dir.path().join("routes.yaml"), routes).unwrap();
    Index::build(&load_dir(dir.path()).unwrap(), &Config::default())
}

fn service_policy(index: &Index, from: &str, target: &str) -> ServicePolicy {
    match index.outbound(from, &target.parse::<Target>().unwrap()) {
        OutboundPolicy::Service(p) => p,
        other => panic!("{target}: {other:?}"),
    }
}

fn ask(index: &Index, from: &str, to: &str, path: &str) -> Explanation {
    explain(index, from, &what_if(to, "GET", path, &[]).unwrap())
}

fn status<'a>(index: &'a Index, name: &str) -> &'a RouteStatus {
    index
        .statuses()
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no status for {name}"))
}

/// (type, status, reason) of every condition of the first parent.
fn conditions(p: &ParentStatus) -> Vec<(&str, bool, &str)> {
    p.conditions
        .iter()
        .map(|c| (c.type_, c.status, c.reason))
        .collect()
}

fn route(name: &str, ns: &str, parent: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs: [{parent}]\n  rules:\n{rules}\n"
    )
}

const TO_API: &str = "    - backendRefs: [{name: api, namespace: shop, port: 80}]";

#[test]
fn consumer_routes_replace_producer_routes_for_their_namespace_only() {
    let producer = route("p", "shop", "{group: '', kind: Service, name: web}", TO_API);
    let consumer = route(
        "c",
        "client",
        "{group: '', kind: Service, name: web, namespace: shop, port: 80}",
        "    - matches: [{path: {type: Exact, value: /only}}]\n      backendRefs: [{name: web, namespace: shop, port: 80}]",
    );
    let idx = index(&(producer + &consumer));
    // From the consumer namespace: only the consumer route, whose single rule misses /x.
    assert_eq!(
        ask(&idx, "client", "web.shop", "/only").route.unwrap().name,
        "c"
    );
    assert!(matches!(
        ask(&idx, "client", "web.shop", "/x").answer,
        Answer::Error { status: 404, .. }
    ));
    // The consumer route names port 80 only: port 9090 keeps the producer route.
    assert_eq!(
        ask(&idx, "client", "web.shop:9090", "/x")
            .route
            .unwrap()
            .name,
        "p"
    );
    // Everyone else: the producer route.
    assert_eq!(
        ask(&idx, "other", "web.shop", "/only").route.unwrap().name,
        "p"
    );
    assert_eq!(ask(&idx, "shop", "web", "/only").route.unwrap().name, "p");
}

#[test]
fn precedence_across_routes_oldest_then_name() {
    let rules = TO_API;
    let mut routes = String::new();
    for (name, created) in [
        ("b", Some("2024-01-02T00:00:00Z")),
        ("a", None),
        ("c", Some("2024-01-01T00:00:00Z")),
    ] {
        let meta = match created {
            Some(t) => format!("{{name: {name}, namespace: shop, creationTimestamp: '{t}'}}"),
            None => format!("{{name: {name}, namespace: shop}}"),
        };
        routes += &format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {meta}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: web}}]\n  rules:\n{rules}\n"
        );
    }
    let idx = index(&routes);
    let Routing::Http { routes } = service_policy(&idx, "shop", "10.96.0.10:80").routing else {
        panic!("expected HTTP routing");
    };
    let order: Vec<&str> = routes.iter().map(|r| r.id.name.as_str()).collect();
    assert_eq!(order, ["c", "b", "a"]);
    // Identical matches: the oldest route wins.
    assert_eq!(ask(&idx, "shop", "web", "/").route.unwrap().name, "c");
}

#[test]
fn grpc_route_beats_http_route_on_the_same_port() {
    let http = route(
        "h",
        "shop",
        "{group: '', kind: Service, name: web, port: 80}",
        TO_API,
    );
    let http_all = route(
        "h-all",
        "shop",
        "{group: '', kind: Service, name: web}",
        TO_API,
    );
    let grpc = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web, port: 80}]\n  rules:\n    - backendRefs: [{name: api, port: 80}]\n";
    let idx = index(&(http + &http_all + grpc));
    assert!(matches!(
        service_policy(&idx, "shop", "10.96.0.10:80").routing,
        Routing::Grpc { .. }
    ));
    assert!(matches!(
        service_policy(&idx, "shop", "10.96.0.10:9090").routing,
        Routing::Http { .. }
    ));
    let h = &status(&idx, "h").parents[0];
    let accepted = h.condition("Accepted").unwrap();
    assert_eq!((accepted.status, accepted.reason), (false, "Conflicted"));
    assert!(accepted.message.contains("shop/g"), "{}", accepted.message);
    // Still accepted where it is not shadowed (port 9090).
    let all = &status(&idx, "h-all").parents[0];
    assert!(all.condition("Accepted").unwrap().status);
    assert!(status(&idx, "g").is_healthy());
}

#[test]
fn invalid_rules_are_reported_and_the_rest_serves() {
    let rules = "    - matches: [{path: {type: RegularExpression, value: '/(unclosed'}}]\n      backendRefs: [{name: api, port: 80}]
    - matches: [{path: {type: Exact, value: /redirect-with-backend}}]
      filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]
      backendRefs: [{name: api, port: 80}]
    - matches: [{path: {type: Exact, value: /rewrite}}]
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}}]
      backendRefs: [{name: api, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /ok}}]
      backendRefs: [{name: api, port: 80}]";
    let idx = index(&route(
        "mixed",
        "shop",
        "{group: '', kind: Service, name: web}",
        rules,
    ));
    let p = &status(&idx, "mixed").parents[0];
    assert_eq!(
        conditions(p),
        vec![
            ("Accepted", true, "Accepted"),
            ("ResolvedRefs", true, "ResolvedRefs"),
            ("PartiallyInvalid", true, "UnsupportedValue"),
        ]
    );
    let msg = &p.condition("PartiallyInvalid").unwrap().message;
    for needle in [
        "rule 0",
        "regular expression",
        "rule 1",
        "backendRefs",
        "rule 2",
        "PathPrefix",
    ] {
        assert!(msg.contains(needle), "{needle} not in {msg}");
    }
    assert!(!status(&idx, "mixed").is_healthy());
    // The regex rule is gone; the broken ones answer 500; the good one serves.
    assert!(matches!(
        ask(&idx, "shop", "web", "/redirect-with-backend").answer,
        Answer::Error { status: 500, .. }
    ));
    assert!(matches!(
        ask(&idx, "shop", "web", "/rewrite").answer,
        Answer::Error { status: 500, .. }
    ));
    assert!(matches!(
        ask(&idx, "shop", "web", "/(unclosed").answer,
        Answer::Error { status: 404, .. }
    ));
    assert_eq!(ask(&idx, "shop", "web", "/ok").answer, Answer::Forward);
}

#[test]
fn a_route_with_no_usable_rule_is_not_accepted_and_not_attached() {
    let rules = "    - matches: [{headers: [{type: RegularExpression, name: x, value: '['}]}]\n      backendRefs: [{name: api, port: 80}]";
    let idx = index(&route(
        "bad",
        "shop",
        "{group: '', kind: Service, name: web}",
        rules,
    ));
    let p = &status(&idx, "bad").parents[0];
    let accepted = p.condition("Accepted").unwrap();
    assert_eq!(
        (accepted.status, accepted.reason),
        (false, "UnsupportedValue")
    );
    assert_eq!(ask(&idx, "shop", "web", "/").routing, "passthrough");
}

#[test]
fn backend_problems_answer_their_share_and_set_resolved_refs() {
    let rules = "    - backendRefs:
        - {name: api, port: 80, weight: 1}
        - {name: missing, port: 80, weight: 1}
        - {name: api, port: 81, weight: 1}
        - {name: api, kind: ConfigMap, weight: 1}
        - {name: gone, port: 80, weight: 0}";
    let idx = index(&route(
        "r",
        "shop",
        "{group: core, kind: Service, name: web, sectionName: http}",
        rules,
    ));
    let e = ask(&idx, "shop", "web", "/");
    assert_eq!(e.answer, Answer::Forward);
    let statuses: Vec<(u32, Option<u16>)> =
        e.backends.iter().map(|b| (b.weight, b.status)).collect();
    // api's only endpoint is terminating but serving: used, since none is ready.
    assert_eq!(
        statuses,
        [
            (1, None),
            (1, Some(500)),
            (1, Some(500)),
            (1, Some(500)),
            (0, Some(500))
        ]
    );
    assert!(e.backends[0].endpoints[0].terminating);
    assert!((e.backends[1].share - 0.25).abs() < 1e-9);
    let refs = status(&idx, "r").parents[0]
        .condition("ResolvedRefs")
        .unwrap()
        .clone();
    assert_eq!((refs.status, refs.reason), (false, "BackendNotFound"));
    for needle in [
        "shop/missing does not exist",
        "has no port 81",
        "ConfigMap",
        "shop/gone",
    ] {
        assert!(
            refs.message.contains(needle),
            "{needle} not in {}",
            refs.message
        );
    }
    // sectionName "http" is port 80 only.
    assert_eq!(ask(&idx, "shop", "web:9090", "/").routing, "passthrough");
}

#[test]
fn a_backend_without_endpoints_answers_503_and_all_invalid_answers_500() {
    let rules = "    - matches: [{path: {value: /empty}}]
      backendRefs: [{name: headless, port: 80}]
    - matches: [{path: {value: /none}}]
      backendRefs: [{name: nope, port: 80}]
    - matches: [{path: {value: /zero}}]
      backendRefs: [{name: api, port: 80, weight: 0}]";
    let idx = index(&route(
        "r",
        "shop",
        "{group: '', kind: Service, name: web}",
        rules,
    ));
    assert!(matches!(
        ask(&idx, "shop", "web", "/empty").answer,
        Answer::Error { status: 503, .. }
    ));
    assert!(matches!(
        ask(&idx, "shop", "web", "/none").answer,
        Answer::Error { status: 500, .. }
    ));
    assert!(matches!(
        ask(&idx, "shop", "web", "/zero").answer,
        Answer::Error { status: 500, .. }
    ));
}

#[test]
fn parents_that_do_not_attach() {
    let routes = [
        route(
            "no-svc",
            "shop",
            "{group: '', kind: Service, name: nope}",
            TO_API,
        ),
        route(
            "no-port",
            "shop",
            "{group: '', kind: Service, name: web, port: 81}",
            TO_API,
        ),
        route(
            "no-section",
            "shop",
            "{group: '', kind: Service, name: web, sectionName: grpc}",
            TO_API,
        ),
        route(
            "mismatch",
            "shop",
            "{group: '', kind: Service, name: web, port: 80, sectionName: admin}",
            TO_API,
        ),
        route(
            "headless",
            "shop",
            "{group: '', kind: Service, name: headless}",
            TO_API,
        ),
        route("gateway", "shop", "{name: some-gateway}", TO_API),
    ]
    .concat();
    let idx = index(&routes);
    for (name, reason) in [
        ("no-svc", "NoMatchingParent"),
        ("no-port", "NoMatchingParent"),
        ("no-section", "NoMatchingParent"),
        ("mismatch", "NoMatchingParent"),
        ("headless", "UnsupportedValue"),
    ] {
        let a = status(&idx, name).parents[0]
            .condition("Accepted")
            .unwrap()
            .clone();
        assert_eq!(
            (a.status, a.reason),
            (false, reason),
            "{name}: {}",
            a.message
        );
    }
    // A Gateway parent belongs to another controller: no status from us at all.
    assert!(idx.statuses().iter().all(|s| s.name != "gateway"));
    assert_eq!(ask(&idx, "shop", "web", "/").routing, "passthrough");
}

#[test]
fn endpoints_carry_identities_of_meshed_pods_only() {
    let idx = index("");
    let p = service_policy(&idx, "shop", "web.shop.svc.cluster.local:80");
    let Routing::Passthrough { backend } = p.routing else {
        panic!("expected passthrough");
    };
    let BackendTarget::Service { endpoints, .. } = backend.target else {
        panic!("expected a Service backend");
    };
    // The ready endpoint only (the terminating one is a fallback), at the target port.
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].addr.to_string(), "10.1.0.1:8080");
    assert_eq!(
        endpoints[0].identity.as_ref().unwrap().to_string(),
        "spiffe://cluster.local/ns/shop/sa/web-sa"
    );
    // api-0 has no proxy: no identity, so the hop stays plaintext.
    let api = ask(&idx, "shop", "api", "/");
    assert_eq!(api.backends[0].endpoints[0].identity, None);
    // Names outside the cluster domain and unknown addresses are not Services.
    for target in [
        "web.shop.svc.other.domain:80",
        "example.com:80",
        "10.9.9.9:80",
        "10.96.0.10:81",
    ] {
        assert!(
            matches!(
                idx.outbound("shop", &target.parse().unwrap()),
                OutboundPolicy::NotAService { identity: None }
            ),
            "{target}"
        );
    }
}

#[test]
fn timeouts_retries_and_observed_generation() {
    let routes = "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: t, namespace: shop, generation: 7}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  rules:
    - matches: [{path: {value: /slow}}]
      timeouts: {request: 10s, backendRequest: 2s}
      retry: {codes: [503], attempts: 2, backoff: 100ms}
      backendRefs: [{name: api, port: 80}]
    - matches: [{path: {value: /bad}}]
      timeouts: {request: 1s, backendRequest: 2s}
      backendRefs: [{name: api, port: 80}]
";
    let idx = index(routes);
    let Routing::Http { routes } = service_policy(&idx, "shop", "10.96.0.10:80").routing else {
        panic!();
    };
    let rule = &routes[0].rules[0];
    assert_eq!(
        (rule.timeouts.request_ms, rule.timeouts.backend_request_ms),
        (Some(10_000), Some(2_000))
    );
    let retry = rule.retry.as_ref().unwrap();
    assert_eq!(
        (retry.codes.as_slice(), retry.attempts, retry.backoff_ms),
        (&[503][..], 2, Some(100))
    );
    let s = status(&idx, "t");
    assert_eq!(s.observed_generation, Some(7));
    let msg = &s.parents[0].condition("PartiallyInvalid").unwrap().message;
    assert!(msg.contains("backendRequest"), "{msg}");
}

#[test]
fn a_route_whose_rules_are_all_broken_is_not_accepted_but_answers_500() {
    let rules = "    - filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Auth, name: a}}]\n      backendRefs: [{name: api, port: 80}]";
    let idx = index(&route(
        "ext",
        "shop",
        "{group: '', kind: Service, name: web}",
        rules,
    ));
    let accepted = status(&idx, "ext").parents[0]
        .condition("Accepted")
        .unwrap()
        .clone();
    assert_eq!(
        (accepted.status, accepted.reason),
        (false, "UnsupportedValue")
    );
    assert!(
        accepted.message.contains("ExtensionRef"),
        "{}",
        accepted.message
    );
    // The filter is never skipped: the request is refused rather than passed through.
    let e = ask(&idx, "shop", "web", "/");
    assert_eq!(e.routing, "HTTPRoute");
    assert!(
        matches!(e.answer, Answer::Error { status: 500, .. }),
        "{e:#?}"
    );
}

/// A completed Job's pod keeps its `podIP` in the API after the IP went to a new pod. Whichever
/// order the pods come in, the IP means the live pod, in "not a Service" answers and endpoints.
#[test]
fn a_finished_pods_ip_belongs_to_the_live_pod_that_reuses_it() {
    let pod = |name: &str, sa: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\n\
             metadata: {{name: {name}, namespace: shop, annotations: {{trellis.dev/proxy-version: \"1\"}}}}\n\
             spec: {{serviceAccountName: {sa}, containers: [{{name: a, image: a}}]{extra}}}\n"
        )
    };
    let cluster = |job: &str, live: &str| {
        [
            pod(job, "batch", "}\nstatus: {phase: Succeeded, podIP: 10.1.0.50"),
            pod(
                "node-agent",
                "agent",
                ", hostNetwork: true}\nstatus: {phase: Running, podIP: 10.1.0.50",
            ),
            pod(live, "cart", "}\nstatus: {phase: Running, podIP: 10.1.0.50"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.30, ports: [{name: http, port: 80}]}\n"
                .to_string(),
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: cart-1, namespace: shop, labels: {{kubernetes.io/service-name: cart}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
                 endpoints: [{{addresses: [10.1.0.50], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {live}}}}}]\n"
            ),
        ]
        .join("---\n")
    };
    // Pods are read in name order: the finished one first, then last.
    for (job, live) in [("a-job", "cart-0"), ("z-job", "cart-0")] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster.yaml"), cluster(job, live)).unwrap();
        let idx = Index::build(&load_dir(dir.path()).unwrap(), &Config::default());
        let want = "spiffe://cluster.local/ns/shop/sa/cart";
        match idx.outbound("shop", &"10.1.0.50:8080".parse().unwrap()) {
            OutboundPolicy::NotAService { identity: Some(id) } => {
                assert_eq!(id.to_string(), want, "{job}")
            }
            other => panic!("{job}: {other:?}"),
        }
        let p = service_policy(&idx, "shop", "10.96.0.30:80");
        let Routing::Passthrough { backend } = p.routing else {
            panic!("expected passthrough");
        };
        let BackendTarget::Service { endpoints, .. } = backend.target else {
            panic!("expected a Service backend");
        };
        assert_eq!(endpoints.len(), 1);
        assert_eq!(
            endpoints[0].identity.as_ref().map(ToString::to_string),
            Some(want.to_string()),
            "{job}"
        );
    }
}
