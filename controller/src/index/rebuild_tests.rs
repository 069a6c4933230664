//! A rebuild after a change gives exactly the policies of a full build, and shares (the same
//! `Arc`) the policies of every Service port the change did not touch.

use std::sync::Arc;

use trellis_api::discovery::Target;
use trellis_api::policy::ObjectRef;

use super::{Changes, Config, Index};
use crate::manifests::load_dir;
use crate::objects::Objects;

/// `web` routes to `web-v2` (so its policy embeds web-v2's endpoints), `api` and `other` are
/// passthrough. `v2_ip` is web-v2's endpoint, `api_sa` api-0's service account, `other_ip`
/// other's endpoint.
fn cluster(v2_ip: &str, api_sa: &str, other_ip: &str) -> Objects {
    let svc = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n"
        )
    };
    let slice = |name: &str, ip: &str, pod: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: [{ip}], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {pod}}}}}]\n"
        )
    };
    let pod = |name: &str, sa: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\n\
             metadata: {{name: {name}, namespace: shop, annotations: {{trellis.dev/proxy-version: \"1\"}}}}\n\
             spec: {{serviceAccountName: {sa}, containers: [{{name: a, image: a}}]}}\n\
             status: {{phase: Running, podIP: {ip}}}\n"
        )
    };
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                 metadata: {name: canary, namespace: shop}\n\
                 spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n\
                 \x20 rules: [{backendRefs: [{name: web-v2, port: 80}]}]\n";
    let docs = [
        svc("web", "10.96.0.10"),
        svc("web-v2", "10.96.0.11"),
        svc("api", "10.96.0.12"),
        svc("other", "10.96.0.13"),
        slice("web", "10.1.0.1", "web-0"),
        slice("web-v2", v2_ip, "web-v2-0"),
        slice("api", "10.1.0.3", "api-0"),
        slice("other", other_ip, "other-0"),
        pod("web-0", "web", "10.1.0.1"),
        pod("web-v2-0", "web", v2_ip),
        pod("api-0", api_sa, "10.1.0.3"),
        pod("other-0", "other", other_ip),
        route.to_string(),
    ];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.yaml"), docs.join("---\n")).unwrap();
    load_dir(dir.path()).unwrap()
}

const TARGETS: [&str; 5] = [
    "10.96.0.10:80",
    "10.96.0.11:80",
    "10.96.0.12:80",
    "10.96.0.13:80",
    "10.1.0.3:8080",
];

fn policy(index: &Index, target: &str) -> Arc<trellis_api::policy::OutboundPolicy> {
    index.outbound_shared("shop", &target.parse::<Target>().unwrap())
}

fn shop(name: &str) -> ObjectRef {
    ObjectRef {
        namespace: "shop".to_string(),
        name: name.to_string(),
    }
}

#[test]
fn a_rebuild_equals_a_full_build_and_shares_what_it_did_not_touch() {
    let config = Config::default();
    let before = Index::build(&cluster("10.1.0.2", "api", "10.1.0.4"), &config);
    assert_eq!(before.recomputed_ports(), 4);

    // (changed objects, what changed, the targets whose policy must be a new one)
    let cases: [(Objects, Changes, &[&str]); 4] = [
        // web-v2's endpoint moves: web-v2 and web (which routes to it) are computed again.
        (
            cluster("10.1.0.9", "api", "10.1.0.4"),
            Changes {
                services: [shop("web-v2")].into(),
                ..Changes::default()
            },
            &["10.96.0.10:80", "10.96.0.11:80"],
        ),
        // api-0's service account changes: api's endpoint identity, and the pod IP's answer.
        (
            cluster("10.1.0.2", "api-new", "10.1.0.4"),
            Changes {
                pods: [("shop".to_string(), "api-0".to_string())].into(),
                ..Changes::default()
            },
            &["10.96.0.12:80", "10.1.0.3:8080"],
        ),
        // `other` changes: nothing that routes elsewhere is touched.
        (
            cluster("10.1.0.2", "api", "10.1.0.8"),
            Changes {
                services: [shop("other")].into(),
                ..Changes::default()
            },
            &["10.96.0.13:80"],
        ),
        // Nothing changed.
        (
            cluster("10.1.0.2", "api", "10.1.0.4"),
            Changes::default(),
            &[],
        ),
    ];
    for (objects, changes, renewed) in cases {
        let full = Index::build(&objects, &config);
        let rebuilt = before.rebuild(&objects, &config, &changes);
        for target in TARGETS {
            let (got, want, old) = (
                policy(&rebuilt, target),
                policy(&full, target),
                policy(&before, target),
            );
            assert_eq!(got, want, "{changes:?}: {target}");
            if renewed.contains(&target) {
                assert_ne!(got, old, "{changes:?}: {target} should have changed");
            } else if target.starts_with("10.96.") {
                assert!(
                    Arc::ptr_eq(&got, &old),
                    "{changes:?}: {target} should be shared"
                );
            }
        }
        assert!(rebuilt.recomputed_ports() <= renewed.len(), "{changes:?}");
    }
}
