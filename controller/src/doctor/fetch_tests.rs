//! `doctor` end to end through kube's real client, against the scripted API server: the
//! requests it makes, what a 403, a missing object, a resource not served and no answer do to
//! the checks, and the exit codes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::fetch::Settings;
use super::fixtures::{base64_encode, ca, deployment, now, pod, slice};
use super::{Format, diagnose};
use crate::kubernetes::fake_api::*;

const NS: &str = "trellis-system";
const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
const WEBHOOK: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/trellis-injector";
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/trellis-system/endpointslices";
const READY: &str = "/api/v1/namespaces/trellis-system/services/trellis-injector:admin/proxy/ready";
const SECRET: &str = "/api/v1/namespaces/trellis-system/secrets/trellis-identity-issuer";
const NAMESPACES: &str = "/api/v1/namespaces";
const CONTROL_PLANE_PODS: &str = "/api/v1/namespaces/trellis-system/pods";
const SHOP_PODS: &str = "/api/v1/namespaces/shop/pods";

fn settings() -> Settings {
    Settings {
        namespace: NS.to_string(),
        issuer_secret: "trellis-identity-issuer".to_string(),
        timeout: Duration::from_secs(5),
    }
}

fn version() -> Reply {
    ok(json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.1", "gitCommit": "abc",
        "gitTreeState": "clean", "buildDate": "2026-05-15T00:00:00Z", "goVersion": "go1.24",
        "compiler": "gc", "platform": "linux/amd64"
    }))
}

fn crd(plural: &str) -> Reply {
    ok(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.gateway.networking.k8s.io"),
                     "annotations": {"gateway.networking.k8s.io/bundle-version": "v1.5.1"}},
        "spec": {"group": "gateway.networking.k8s.io", "scope": "Namespaced",
                 "names": {"plural": plural, "kind": "X"},
                 "versions": [{"name": "v1", "served": true, "storage": true}]}
    }))
}

fn secret(issuer_until: (i32, u8, u8)) -> Reply {
    let (root, signer) = ca("root", (2026, 1, 1), (2036, 1, 1), None);
    let (issuer, _) = ca("issuer", (2026, 1, 1), issuer_until, Some(&signer));
    ok(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "trellis-identity-issuer", "namespace": NS},
        "data": {"ca.crt": base64_encode(root.as_bytes()), "tls.crt": base64_encode(issuer.as_bytes()),
                 "tls.key": base64_encode(b"key")}
    }))
}

fn labelled(labels: Value) -> Reply {
    let mut all = json!({"trellis.dev/inject": "enabled", "kubernetes.io/metadata.name": "shop"});
    all.as_object_mut()
        .unwrap()
        .extend(labels.as_object().unwrap().clone());
    list(
        "Namespace",
        "v1",
        "10",
        vec![json!({"metadata": {"name": "shop", "labels": all}})],
    )
}

/// A fake API server with a healthy Trellis installation on it.
fn healthy() -> (kube::Client, FakeApi) {
    healthy_except(None)
}

/// The same, with `unanswered` never answered.
fn healthy_except(unanswered: Option<&str>) -> (kube::Client, FakeApi) {
    let (client, fake) = FakeApi::start();
    let api = Rules {
        fake: &fake,
        unanswered,
    };
    api.always(Method::GET, "/version", version());
    for plural in ["httproutes", "grpcroutes"] {
        api.always(
            Method::GET,
            &format!("{CRDS}/{plural}.gateway.networking.k8s.io"),
            crd(plural),
        );
    }
    for c in ["controller", "identity", "injector"] {
        api.always(
            Method::GET,
            &format!("/apis/apps/v1/namespaces/{NS}/deployments/trellis-{c}"),
            ok(deployment(
                c,
                2,
                2,
                json!([
                    "serve",
                    "--proxy-image=ghcr.io/trellis-mesh/trellis-proxy:v0.4.0"
                ]),
                json!([]),
            )),
        );
    }
    api.always_list(
        CONTROL_PLANE_PODS,
        list(
            "Pod",
            "v1",
            "10",
            vec![pod(NS, "trellis-x", &[], "Running", true)],
        ),
    );
    let (webhook_ca, _) = ca("injector-ca", (2026, 1, 1), (2027, 12, 1), None);
    api.always(
        Method::GET,
        WEBHOOK,
        ok(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "trellis-injector"},
            "webhooks": [{
                "name": "inject.trellis.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "failurePolicy": "Fail",
                "clientConfig": {
                    "service": {"name": "trellis-injector", "namespace": NS, "path": "/inject", "port": 443},
                    "caBundle": base64_encode(webhook_ca.as_bytes())
                }
            }]
        })),
    );
    api.always_list(
        SLICES,
        list(
            "EndpointSlice",
            "discovery.k8s.io/v1",
            "10",
            vec![slice(&[Some(true), Some(true)])],
        ),
    );
    api.always(Method::GET, READY, Reply::Text(StatusCode::OK, "ok\n"));
    api.always(Method::GET, SECRET, secret((2027, 12, 1)));
    api.always_list(NAMESPACES, labelled(json!({})));
    api.always_list(
        SHOP_PODS,
        list(
            "Pod",
            "v1",
            "10",
            vec![pod("shop", "web-0", &["trellis-proxy"], "Running", true)],
        ),
    );
    (client, fake)
}

/// Adds rules to a fake, except for one path.
struct Rules<'a> {
    fake: &'a FakeApi,
    unanswered: Option<&'a str>,
}

impl Rules<'_> {
    fn always(&self, method: Method, path: &str, reply: Reply) {
        if self.unanswered != Some(path) {
            self.fake.always(method, path, reply);
        }
    }

    fn always_list(&self, path: &str, reply: Reply) {
        if self.unanswered != Some(path) {
            self.fake.always_list(path, reply);
        }
    }
}

async fn doctor(client: &kube::Client) -> (Value, u8) {
    doctor_with(client, settings()).await
}

async fn doctor_with(client: &kube::Client, settings: Settings) -> (Value, u8) {
    let (text, code) = diagnose(client, &settings, now(), Format::Json).await;
    (serde_json::from_str(&text).unwrap(), code)
}

fn check<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {doc:#}"))
}

/// The checks that are not ok, as `name: status`.
fn not_ok(doc: &Value) -> Vec<String> {
    doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] != "ok")
        .map(|c| {
            format!(
                "{}: {}",
                c["name"].as_str().unwrap(),
                c["status"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn a_healthy_cluster_exits_0_after_reading_only() {
    let (client, api) = healthy();
    let (doc, code) = doctor(&client).await;
    assert_eq!(code, 0, "{doc:#}");
    assert!(not_ok(&doc).is_empty(), "{doc:#}");
    assert_eq!(doc["summary"]["ok"], 14);
    assert_eq!(
        check(&doc, "injector-endpoints")["message"],
        "Service trellis-system/trellis-injector: 2 ready endpoints"
    );
    let seen = api.seen();
    assert!(
        seen.iter().all(|s| s.method == Method::GET),
        "{:?}",
        api.summary()
    );
    // The lists are narrowed by label to what the checks read.
    let query = |path: &str| {
        seen.iter()
            .find(|s| s.path == path)
            .map(|s| s.query.clone())
            .unwrap_or_default()
    };
    assert!(
        query(NAMESPACES).contains("labelSelector=trellis.dev%2Finject%3Denabled"),
        "{}",
        query(NAMESPACES)
    );
    assert!(
        query(SLICES).contains("kubernetes.io%2Fservice-name%3Dtrellis-injector"),
        "{}",
        query(SLICES)
    );
    let control_plane: Vec<String> = api
        .seen_at(&Method::GET, CONTROL_PLANE_PODS)
        .iter()
        .map(|s| s.query.clone())
        .collect();
    assert_eq!(control_plane.len(), 3, "{control_plane:?}");
    assert!(
        control_plane
            .iter()
            .any(|q| q.contains("app.kubernetes.io%2Fname%3Dtrellis-identity")),
        "{control_plane:?}"
    );
}

#[tokio::test]
async fn an_expiring_issuer_warns() {
    let (client, api) = healthy();
    api.always(Method::GET, SECRET, secret((2026, 12, 26)));
    let (doc, code) = doctor(&client).await;
    assert_eq!(code, 0, "a warning does not fail: {doc:#}");
    assert_eq!(not_ok(&doc), ["issuer: warn"]);
    assert_eq!(
        check(&doc, "issuer")["message"],
        "CN=issuer expires 2026-12-26 (in 20 days)"
    );
}

#[tokio::test]
async fn a_restricted_namespace_fails() {
    let (client, api) = healthy();
    api.always_list(
        NAMESPACES,
        labelled(json!({"pod-security.kubernetes.io/enforce": "restricted"})),
    );
    let (doc, code) = doctor(&client).await;
    assert_eq!(code, 1, "{doc:#}");
    assert_eq!(not_ok(&doc), ["pod-security: fail"]);
    let c = check(&doc, "pod-security");
    assert!(
        c["message"].as_str().unwrap().contains("shop (restricted)"),
        "{c:#}"
    );
    assert!(c["hint"].as_str().unwrap().contains("privileged"), "{c:#}");
}

#[tokio::test]
async fn a_missing_grpcroute_crd_warns() {
    let (client, api) = healthy();
    api.always(
        Method::GET,
        &format!("{CRDS}/grpcroutes.gateway.networking.k8s.io"),
        not_found(
            "customresourcedefinitions",
            "apiextensions.k8s.io",
            "grpcroutes.gateway.networking.k8s.io",
        ),
    );
    let (doc, code) = doctor(&client).await;
    assert_eq!(code, 0, "{doc:#}");
    assert_eq!(not_ok(&doc), ["gateway-api-grpcroute: warn"]);
}

#[tokio::test]
async fn forbidden_and_unserved_resources_leave_their_checks_unknown() {
    let (client, api) = healthy();
    api.always(
        Method::GET,
        SECRET,
        failure(
            403,
            "Forbidden",
            "secrets \"trellis-identity-issuer\" is forbidden: User \"dev\" cannot get resource \
             \"secrets\" in API group \"\" in the namespace \"trellis-system\"",
        ),
    );
    // An API server without discovery.k8s.io answers with its mux's plain 404.
    api.always_list(SLICES, no_such_resource());
    api.always(
        Method::GET,
        READY,
        failure(
            403,
            "Forbidden",
            "services \"trellis-injector:admin\" is forbidden",
        ),
    );
    let (doc, code) = doctor(&client).await;
    assert_eq!(code, 0, "{doc:#}");
    assert_eq!(
        not_ok(&doc),
        [
            "injector-endpoints: unknown",
            "injector-ready: unknown",
            "trust-anchors: unknown",
            "issuer: unknown"
        ]
    );
    let issuer = check(&doc, "issuer");
    assert_eq!(
        issuer["message"],
        "cannot read Secret trellis-system/trellis-identity-issuer: forbidden"
    );
    assert_eq!(
        issuer["hint"],
        "grant get secrets \"trellis-identity-issuer\" in namespace trellis-system (see \
         docs/reference/doctor.md, RBAC)"
    );
    assert_eq!(
        check(&doc, "injector-ready")["hint"],
        "grant get services/proxy \"trellis-injector:admin\" in namespace trellis-system (see \
         docs/reference/doctor.md, RBAC)"
    );
    assert_eq!(
        check(&doc, "injector-endpoints")["message"],
        "cannot read the EndpointSlices of trellis-system/trellis-injector: the API server does \
         not serve endpointslices.discovery.k8s.io (404 page not found)"
    );
    assert_eq!(doc["summary"]["unknown"], 4);
}

#[tokio::test]
async fn an_unready_injector_fails_and_its_probe_warns() {
    let (client, api) = healthy();
    api.always(
        Method::GET,
        &format!("/apis/apps/v1/namespaces/{NS}/deployments/trellis-injector"),
        ok(deployment("injector", 1, 0, json!([]), json!([]))),
    );
    api.always_list(
        SLICES,
        list(
            "EndpointSlice",
            "discovery.k8s.io/v1",
            "10",
            vec![slice(&[Some(false)])],
        ),
    );
    api.always(
        Method::GET,
        READY,
        failure(
            503,
            "ServiceUnavailable",
            "no endpoints available for service \"trellis-injector:admin\"",
        ),
    );
    let (doc, code) = doctor(&client).await;
    assert_eq!(code, 1, "{doc:#}");
    assert_eq!(
        not_ok(&doc),
        [
            "control-plane-injector: fail",
            "injector-endpoints: fail",
            "injector-ready: warn"
        ],
        "{doc:#}"
    );
    assert_eq!(
        check(&doc, "injector-ready")["message"],
        "the API server could not get the injector's /ready through its service proxy: 503 \
         ServiceUnavailable: no endpoints available for service \"trellis-injector:admin\""
    );
}

#[tokio::test]
async fn an_api_server_that_does_not_answer_in_time_leaves_checks_unknown() {
    // The webhook configuration is never answered.
    let (client, _api) = healthy_except(Some(WEBHOOK));
    let mut s = settings();
    s.timeout = Duration::from_millis(300);
    let (doc, code) = doctor_with(&client, s).await;
    assert_eq!(code, 0, "{doc:#}");
    assert_eq!(not_ok(&doc), ["injector-webhook: unknown"]);
    assert_eq!(
        check(&doc, "injector-webhook")["message"],
        "cannot read MutatingWebhookConfiguration trellis-injector: no answer within 300ms"
    );
}

#[tokio::test]
async fn an_unreadable_api_server_exits_2() {
    // Credentials refused.
    let (client, api) = healthy();
    api.always(
        Method::GET,
        "/version",
        failure(401, "Unauthorized", "Unauthorized"),
    );
    let (doc, code) = doctor(&client).await;
    assert_eq!(code, 2, "{doc:#}");
    assert_eq!(doc["checks"], json!([]));
    assert_eq!(doc["summary"]["exit_code"], 2);
    assert!(
        doc["error"].as_str().unwrap().contains("401 Unauthorized"),
        "{doc:#}"
    );
    assert_eq!(
        api.seen().len(),
        1,
        "nothing else is asked: {:?}",
        api.summary()
    );

    // No connection at all: the transport fails.
    let (service, handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    drop(handle);
    let client = kube::Client::new(service, "default");
    let (text, code) = diagnose(&client, &settings(), now(), Format::Table).await;
    assert_eq!(code, 2);
    assert!(
        text.starts_with("error: cannot read the Kubernetes API server: "),
        "{text}"
    );
}
