use serde_json::json;

use super::*;
use crate::config::tests::settings;

fn pod_review(operation: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": operation,
            "userInfo": {"username": "admin"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "web-7d4b9c-", "namespace": "shop"},
                "spec": {"containers": [{"name": "app", "image": "app:1"}]},
            },
            "oldObject": null,
            "dryRun": false,
        },
    })
}

fn answer(reply: &Reply) -> Value {
    serde_json::from_slice(&reply.body).unwrap()
}

#[test]
fn an_injected_pod_gets_a_base64_json_patch() {
    let reply = review(
        &serde_json::to_vec(&pod_review("CREATE")).unwrap(),
        &settings(),
    );
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.outcome, Outcome::new("injected", ""));
    assert_eq!(reply.detail, "pod shop/web-7d4b9c-*: injected");
    let answer = answer(&reply);
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = BASE64.decode(response["patch"].as_str().unwrap()).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let paths: Vec<String> = patch.iter().map(|op| op.path().to_string()).collect();
    assert_eq!(
        paths,
        [
            "/spec/initContainers",
            "/spec/volumes",
            "/metadata/annotations"
        ]
    );
}

#[test]
fn unreadable_bodies_are_answered_with_an_error_review() {
    let mut no_request = pod_review("CREATE");
    no_request.as_object_mut().unwrap().remove("request");
    let mut v1beta1 = pod_review("CREATE");
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut bad_operation = pod_review("CREATE");
    bad_operation["request"]["operation"] = json!("EXPLODE");
    let cases: [(Vec<u8>, &str, &str); 6] = [
        (
            b"{not json".to_vec(),
            "",
            "the request body is not JSON: key must be a string",
        ),
        (b"".to_vec(), "", "the request body is not JSON"),
        (
            b"[]".to_vec(),
            "",
            "expected an admission.k8s.io/v1 AdmissionReview, got apiVersion (none) kind (none)",
        ),
        (
            serde_json::to_vec(&v1beta1).unwrap(),
            "705ab4f5-6393-11e8-b7cc-42010a800002",
            "expected an admission.k8s.io/v1 AdmissionReview, got apiVersion admission.k8s.io/v1beta1",
        ),
        (
            serde_json::to_vec(&no_request).unwrap(),
            "",
            "the AdmissionReview has no request",
        ),
        // The rest is unreadable, but the uid is still echoed.
        (
            serde_json::to_vec(&bad_operation).unwrap(),
            "705ab4f5-6393-11e8-b7cc-42010a800002",
            "the AdmissionReview cannot be read: unknown variant `EXPLODE`",
        ),
    ];
    for (body, uid, message) in cases {
        let reply = review(&body, &settings());
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{message}");
        assert_eq!(reply.outcome, Outcome::new("error", "malformed"));
        let answer = answer(&reply);
        let response = &answer["response"];
        assert_eq!(response["uid"], uid, "{message}");
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["code"], 400);
        let got = response["status"]["message"].as_str().unwrap();
        assert!(got.starts_with(message), "{got}");
    }
}

#[test]
fn requests_the_webhook_should_not_get_are_let_through_with_a_warning() {
    let mut deployment = pod_review("CREATE");
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let mut ephemeral = pod_review("UPDATE");
    ephemeral["request"]["subResource"] = json!("ephemeralcontainers");
    let cases = [
        (
            pod_review("UPDATE"),
            "not_create",
            "trellis-injector only injects on CREATE; it was called for Update",
        ),
        (
            pod_review("DELETE"),
            "not_create",
            "trellis-injector only injects on CREATE; it was called for Delete",
        ),
        (
            deployment,
            "not_a_pod",
            "trellis-injector only mutates Pods; it was called for apps/v1 Deployment",
        ),
        (
            ephemeral,
            "not_a_pod",
            "trellis-injector only mutates Pods; it was called for pods/ephemeralcontainers",
        ),
    ];
    for (body, reason, warning) in cases {
        let reply = review(&serde_json::to_vec(&body).unwrap(), &settings());
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.outcome, Outcome::new("ignored", reason));
        let answer = answer(&reply);
        let response = &answer["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert!(response.get("patch").is_none());
        let got = response["warnings"][0].as_str().unwrap();
        assert!(got.starts_with(warning), "{got}");
    }
}

#[test]
fn a_create_without_object_is_denied() {
    let mut body = pod_review("CREATE");
    body["request"]["object"] = Value::Null;
    let reply = review(&serde_json::to_vec(&body).unwrap(), &settings());
    assert_eq!(reply.outcome, Outcome::new("denied", "no_object"));
    let answer = answer(&reply);
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(
        answer["response"]["status"]["message"],
        "the pod CREATE request carries no object"
    );
}

#[test]
fn encode_leaves_reviews_without_patch_alone() {
    let response = AdmissionResponse::invalid("x");
    let value: Value = serde_json::from_slice(&encode(response.into_review())).unwrap();
    assert!(value["response"].get("patch").is_none());
    assert_eq!(value["response"]["allowed"], false);
}
