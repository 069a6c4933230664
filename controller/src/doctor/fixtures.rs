//! Objects as the API server sends them, certificates with chosen dates, and a healthy
//! cluster to spoil one thing of, for the tests of `doctor`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, date_time_ymd};
use serde_json::{Value, json};

use super::certs::Cert;
use super::checks::*;

/// The instant every verdict here is judged at.
pub(super) fn now() -> Timestamp {
    "2026-12-06T00:00:00Z".parse().unwrap()
}

pub(super) const NS: &str = "trellis-system";

pub(super) fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// A CA certificate valid over the given days, self-signed or signed by `signer`.
pub(super) fn ca(
    cn: &str,
    from: (i32, u8, u8),
    to: (i32, u8, u8),
    signer: Option<&Issuer<'static, KeyPair>>,
) -> (String, Issuer<'static, KeyPair>) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.not_before = date_time_ymd(from.0, from.1, from.2);
    p.not_after = date_time_ymd(to.0, to.1, to.2);
    let key = KeyPair::generate().unwrap();
    let cert = match signer {
        Some(issuer) => p.signed_by(&key, issuer).unwrap(),
        None => p.self_signed(&key).unwrap(),
    };
    (cert.pem(), Issuer::new(p, key))
}

pub(super) fn dated(not_before: &str, not_after: &str) -> Cert {
    Cert {
        subject: "CN=test".to_string(),
        subject_der: Vec::new(),
        issuer_der: Vec::new(),
        not_before: not_before.parse().unwrap(),
        not_after: not_after.parse().unwrap(),
        is_ca: true,
    }
}

pub(super) fn crd(
    plural: &str,
    versions: &[(&str, bool, bool)],
) -> Fetched<CustomResourceDefinition> {
    let versions: Vec<Value> = versions
        .iter()
        .map(|(name, served, storage)| json!({"name": name, "served": served, "storage": storage}))
        .collect();
    Fetched::Found(from(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{plural}.gateway.networking.k8s.io"),
            "annotations": {
                "gateway.networking.k8s.io/bundle-version": "v1.5.1",
                "gateway.networking.k8s.io/channel": "standard"
            }
        },
        "spec": {
            "group": "gateway.networking.k8s.io", "scope": "Namespaced",
            "names": {"plural": plural, "kind": "X"},
            "versions": versions
        }
    })))
}

pub(super) fn deployment(
    component: &str,
    wanted: i32,
    ready: i32,
    args: Value,
    env: Value,
) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": format!("trellis-{component}"), "namespace": NS},
        "spec": {
            "replicas": wanted,
            "selector": {"matchLabels": {"app.kubernetes.io/name": format!("trellis-{component}")}},
            "template": {"spec": {"containers": [{
                "name": component,
                "image": format!("ghcr.io/trellis-mesh/trellis-{component}:v0.4.0"),
                "args": args, "env": env
            }]}}
        },
        "status": {"readyReplicas": ready, "replicas": wanted}
    })
}

pub(super) fn healthy_cluster() -> Cluster {
    let (root, root_issuer) = ca("root.trellis", (2026, 1, 1), (2036, 1, 1), None);
    let (issuer, _) = ca(
        "issuer.trellis",
        (2026, 1, 1),
        (2027, 12, 1),
        Some(&root_issuer),
    );
    let (webhook_ca, _) = ca("injector-ca", (2026, 1, 1), (2027, 12, 1), None);
    let control_plane = Component::ALL
        .iter()
        .map(|c| ControlPlane {
            component: *c,
            deployment: Fetched::Found(from(deployment(
                c.short(),
                1,
                1,
                json!([
                    "serve",
                    "--proxy-image=ghcr.io/trellis-mesh/trellis-proxy:v0.4.0"
                ]),
                json!([]),
            ))),
            pods: Fetched::Found(vec![from(pod(NS, "p", &[], "Running", true))]),
        })
        .collect();
    Cluster {
        namespace: NS.to_string(),
        issuer_secret_name: DEFAULT_ISSUER_SECRET.to_string(),
        version: Fetched::Found(from(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.1", "gitCommit": "", "gitTreeState": "",
            "buildDate": "", "goVersion": "", "compiler": "", "platform": ""
        }))),
        httproute_crd: crd(
            "httproutes",
            &[("v1", true, true), ("v1beta1", true, false)],
        ),
        grpcroute_crd: crd("grpcroutes", &[("v1", true, true)]),
        control_plane,
        webhook: Fetched::Found(webhook_config(NS, Some(webhook_ca.as_bytes()))),
        injector_slices: Fetched::Found(vec![from(slice(&[Some(true), None]))]),
        injector_ready: Fetched::Found("ok".to_string()),
        issuer_secret: Fetched::Found(secret(Some(&root), Some(&issuer))),
        labelled: Fetched::Found(vec![namespace("shop", &[])]),
        labelled_pods: vec![(
            "shop".to_string(),
            Fetched::Found(vec![
                from(pod("shop", "web-1", &["trellis-proxy"], "Running", true)),
                from(pod("shop", "job-1", &[], "Succeeded", false)),
            ]),
        )],
    }
}

pub(super) fn webhook_config(
    service_ns: &str,
    ca_bundle: Option<&[u8]>,
) -> MutatingWebhookConfiguration {
    let mut config: MutatingWebhookConfiguration = from(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "trellis-injector"},
        "webhooks": [{
            "name": "inject.trellis.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail",
            "clientConfig": {"service": {"name": "trellis-injector", "namespace": service_ns, "path": "/inject", "port": 443}}
        }]
    }));
    if let Some(bundle) = ca_bundle {
        config.webhooks.as_mut().unwrap()[0].client_config.ca_bundle =
            Some(ByteString(bundle.to_vec()));
    }
    config
}

pub(super) fn slice(ready: &[Option<bool>]) -> Value {
    let endpoints: Vec<Value> = ready
        .iter()
        .enumerate()
        .map(|(i, r)| match r {
            Some(r) => json!({"addresses": [format!("10.0.0.{i}")], "conditions": {"ready": r}}),
            None => json!({"addresses": [format!("10.0.0.{i}")]}),
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "trellis-injector-abc", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": "trellis-injector"}},
        "endpoints": endpoints
    })
}

pub(super) fn secret(ca_crt: Option<&str>, tls_crt: Option<&str>) -> Secret {
    let mut data = serde_json::Map::new();
    let b64 = |s: &str| Value::String(base64_encode(s.as_bytes()));
    if let Some(ca) = ca_crt {
        data.insert("ca.crt".into(), b64(ca));
    }
    if let Some(tls) = tls_crt {
        data.insert("tls.crt".into(), b64(tls));
    }
    data.insert("tls.key".into(), b64("secret"));
    from(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": DEFAULT_ISSUER_SECRET, "namespace": NS},
        "data": data
    }))
}

/// Standard base64, as the API server encodes Secret data.
pub(super) fn base64_encode(bytes: &[u8]) -> String {
    serde_json::to_value(ByteString(bytes.to_vec()))
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

pub(super) fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    let mut all = serde_json::Map::new();
    all.insert("trellis.dev/inject".into(), "enabled".into());
    for (k, v) in labels {
        all.insert((*k).into(), (*v).into());
    }
    from(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": all}}),
    )
}

/// A pod with the named init containers (a native sidecar is one of them).
pub(super) fn pod(ns: &str, name: &str, init: &[&str], phase: &str, ready: bool) -> Value {
    let init: Vec<Value> = init
        .iter()
        .map(|c| json!({"name": c, "image": "ghcr.io/trellis-mesh/trellis-proxy:v0.4.0", "restartPolicy": "Always"}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"initContainers": init, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

pub(super) fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name}: {checks:#?}"))
}
