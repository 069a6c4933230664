//! The injector's checks: its webhook configuration's CA bundle, endpoints and reachability.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use super::checks::*;
use super::fixtures::*;

#[test]
fn the_webhook_and_its_ca_bundle() {
    let (soon, _) = ca("injector-ca", (2026, 1, 1), (2026, 12, 26), None);
    let (very_soon, _) = ca("injector-ca", (2026, 1, 1), (2026, 12, 9), None);
    let (expired, _) = ca("old-ca", (2025, 1, 1), (2026, 6, 1), None);
    let (fresh, _) = ca("new-ca", (2026, 6, 1), (2027, 12, 1), None);
    let rotating = format!("{expired}{fresh}");
    let cases: Vec<(&str, Fetched<_>, Status, &str)> = vec![
        (
            "missing",
            Fetched::Missing,
            Status::Fail,
            "MutatingWebhookConfiguration trellis-injector not found",
        ),
        (
            "no bundle",
            Fetched::Found(webhook_config(NS, None)),
            Status::Fail,
            "has no caBundle",
        ),
        (
            "garbage",
            Fetched::Found(webhook_config(NS, Some(b"hello"))),
            Status::Fail,
            "caBundle is unusable: no PEM certificate",
        ),
        (
            "20 days",
            Fetched::Found(webhook_config(NS, Some(soon.as_bytes()))),
            Status::Warn,
            "caBundle (1 certificate) expires 2026-12-26 (in 20 days); calls trellis-system/trellis-injector:443/inject; failurePolicy Fail",
        ),
        (
            "3 days",
            Fetched::Found(webhook_config(NS, Some(very_soon.as_bytes()))),
            Status::Fail,
            "expires 2026-12-09 (in 3 days)",
        ),
        (
            "expired",
            Fetched::Found(webhook_config(NS, Some(expired.as_bytes()))),
            Status::Fail,
            "expired 2026-06-01",
        ),
        (
            "rotating",
            Fetched::Found(webhook_config(NS, Some(rotating.as_bytes()))),
            Status::Ok,
            "caBundle (2 certificates) valid until 2027-12-01",
        ),
        (
            "other namespace",
            Fetched::Found(webhook_config("mesh", Some(fresh.as_bytes()))),
            Status::Warn,
            "calls mesh/trellis-injector:443/inject, not trellis-system/trellis-injector",
        ),
    ];
    for (what, webhook, status, words) in cases {
        let mut cluster = healthy_cluster();
        cluster.webhook = webhook;
        let c = find(&judge(&cluster, now()), "injector-webhook").clone();
        assert_eq!(c.status, status, "{what}: {c:#?}");
        assert!(c.message.contains(words), "{what}: {c:#?}");
        assert_eq!(c.hint.is_empty(), status == Status::Ok, "{what}: {c:#?}");
    }
}

#[test]
fn injector_reachability() {
    let cases: Vec<(Fetched<Vec<_>>, Option<&str>, Status, &str)> = vec![
        (
            Fetched::Found(vec![]),
            Some("Fail"),
            Status::Fail,
            "has no ready endpoint: pods of labelled namespaces cannot be created (failurePolicy Fail)",
        ),
        (
            Fetched::Found(vec![from(slice(&[Some(false)]))]),
            Some("Ignore"),
            Status::Fail,
            "has no ready endpoint: pods of labelled namespaces start without the proxy",
        ),
        (
            Fetched::Found(vec![from(slice(&[Some(true)]))]),
            None,
            Status::Ok,
            "1 ready endpoint",
        ),
        (
            Fetched::Denied(Access::new("list", "endpointslices.discovery.k8s.io").within(NS)),
            None,
            Status::Unknown,
            "forbidden",
        ),
    ];
    for (slices, policy, status, words) in cases {
        let mut cluster = healthy_cluster();
        cluster.injector_slices = slices;
        if let Some(policy) = policy {
            let Fetched::Found(config) = &mut cluster.webhook else {
                unreachable!()
            };
            config.webhooks.as_mut().unwrap()[0].failure_policy = Some(policy.to_string());
        }
        let c = find(&judge(&cluster, now()), "injector-endpoints").clone();
        assert_eq!(c.status, status, "{c:#?}");
        assert!(c.message.contains(words), "{c:#?}");
    }
    let ready: Vec<(Fetched<String>, Status, &str)> = vec![
        (Fetched::Found(String::new()), Status::Ok, "reached"),
        (
            Fetched::Denied(
                Access::new("get", "services/proxy")
                    .named("trellis-injector:admin")
                    .within(NS),
            ),
            Status::Unknown,
            "forbidden",
        ),
        (
            Fetched::Failed("503 ServiceUnavailable: no endpoints available".into()),
            Status::Warn,
            "503 ServiceUnavailable",
        ),
        (Fetched::Missing, Status::Warn, "not found"),
    ];
    for (answer, status, words) in ready {
        let mut cluster = healthy_cluster();
        cluster.injector_ready = answer;
        let checks = judge(&cluster, now());
        let c = find(&checks, "injector-ready");
        assert_eq!(c.status, status, "{c:#?}");
        assert!(c.message.contains(words), "{c:#?}");
        if status == Status::Unknown {
            assert_eq!(
                c.hint,
                "grant get services/proxy \"trellis-injector:admin\" in namespace trellis-system (see \
                 docs/reference/doctor.md, RBAC)"
            );
        }
    }
}
