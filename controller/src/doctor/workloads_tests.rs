//! Pod Security of labelled namespaces, pods without the proxy, pods with another proxy.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use super::checks::*;
use super::fixtures::*;
use serde_json::{Value, json};

#[test]
fn pod_security_levels_of_labelled_namespaces() {
    let cases = [
        (
            vec![namespace("shop", &[(PSS_ENFORCE, "restricted")])],
            Status::Fail,
            "in shop (restricted)",
        ),
        (
            vec![
                namespace("a", &[]),
                namespace("b", &[(PSS_ENFORCE, "baseline")]),
            ],
            Status::Fail,
            "in b (baseline)",
        ),
        (
            vec![namespace(
                "shop",
                &[(PSS_ENFORCE, "privileged"), (PSS_WARN, "restricted")],
            )],
            Status::Warn,
            "warns or audits injected pods (NET_ADMIN, NET_RAW) in shop (restricted)",
        ),
        (
            vec![namespace("shop", &[(PSS_ENFORCE, "privileged")])],
            Status::Ok,
            "1 labelled namespace: none enforces",
        ),
        // The webhook never injects the control plane's own namespace.
        (
            vec![namespace(NS, &[(PSS_ENFORCE, "restricted")])],
            Status::Ok,
            "0 labelled namespaces: none enforces",
        ),
    ];
    for (labelled, status, words) in cases {
        let mut cluster = healthy_cluster();
        cluster.labelled = Fetched::Found(labelled);
        let checks = judge(&cluster, now());
        let c = find(&checks, "pod-security");
        assert_eq!(c.status, status, "{c:#?}");
        assert!(c.message.contains(words), "{c:#?}");
        if status == Status::Fail {
            assert!(
                c.hint
                    .contains("pod-security.kubernetes.io/enforce=privileged --overwrite"),
                "{c:#?}"
            );
            assert!(c.hint.contains("exempt"), "{c:#?}");
            assert_eq!(exit_code(&checks), 1);
        }
    }
}

#[test]
fn pods_without_the_proxy_or_with_another_one() {
    let mut old: Value = pod("shop", "api-0", &["trellis-proxy"], "Running", true);
    old["spec"]["initContainers"][0]["image"] = json!("ghcr.io/trellis-mesh/trellis-proxy:v0.3.0");
    old["metadata"]["annotations"] = json!({"trellis.dev/proxy-version": "0.3.0"});
    let mut classic = pod("shop", "classic-0", &[], "Running", true);
    classic["spec"]["containers"] = json!([
        {"name": "trellis-proxy", "image": "ghcr.io/trellis-mesh/trellis-proxy:v0.4.0"},
        {"name": "app", "image": "app"}
    ]);
    let mut opted_out = pod("shop", "batch-0", &[], "Running", true);
    opted_out["metadata"]["annotations"] = json!({"trellis.dev/inject": "disabled"});
    let mut host = pod("shop", "node-agent", &[], "Running", true);
    host["spec"]["hostNetwork"] = json!(true);
    let bare: Vec<Value> = (0..7)
        .map(|i| pod("shop", &format!("web-{i}"), &[], "Running", true))
        .collect();

    let mut pods = vec![old, classic, opted_out, host];
    pods.extend(bare);
    let mut cluster = healthy_cluster();
    cluster.labelled_pods = vec![
        (
            "shop".to_string(),
            Fetched::Found(pods.into_iter().map(from).collect()),
        ),
        (
            "other".to_string(),
            Fetched::Found(vec![from(pod("other", "x", &[], "Running", true))]),
        ),
    ];
    let checks = judge(&cluster, now());
    let injected = find(&checks, "injected-pods");
    assert_eq!(injected.status, Status::Warn);
    assert_eq!(
        injected.message,
        "7 of 9 pods in labelled namespaces run without the proxy: shop/web-0, shop/web-1, \
         shop/web-2, shop/web-3, shop/web-4 and 2 more (created before the label, or while the \
         injector was down)",
        "opted-out and host-network pods and unlabelled namespaces are left out"
    );
    assert!(injected.hint.contains("rollout restart"));
    let versions = find(&checks, "proxy-versions");
    assert_eq!(versions.status, Status::Warn);
    assert_eq!(
        versions.message,
        "1 of 2 meshed pods run another proxy than ghcr.io/trellis-mesh/trellis-proxy:v0.4.0: \
         shop/api-0 (ghcr.io/trellis-mesh/trellis-proxy:v0.3.0, trellis.dev/proxy-version 0.3.0)"
    );
    assert_eq!(exit_code(&checks), 0, "warnings do not fail the run");

    // A namespace whose pods cannot be listed leaves the check unknown.
    let mut cluster = healthy_cluster();
    cluster.labelled_pods[0].1 = Fetched::Denied(Access::new("list", "pods").within("shop"));
    let checks = judge(&cluster, now());
    for name in ["injected-pods", "proxy-versions"] {
        let c = find(&checks, name);
        assert_eq!(c.status, Status::Unknown, "{c:#?}");
        assert_eq!(
            c.hint,
            "grant list pods in namespace shop (see docs/reference/doctor.md, RBAC)"
        );
    }
    // Without the injector's Deployment there is nothing to compare with.
    let mut cluster = healthy_cluster();
    cluster.control_plane[2].deployment = Fetched::Missing;
    let c = find(&judge(&cluster, now()), "proxy-versions").clone();
    assert_eq!(c.status, Status::Unknown, "{c:#?}");
}
