//! Shared by the integration tests: fixed settings and AdmissionReview helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;
use trellis_injector::annotations::{AccessLog, Quantity};
use trellis_injector::config::{Settings, SidecarMode};

/// Settings with fixed values, so expected pods do not change with the release.
pub fn settings(mode: SidecarMode) -> Settings {
    Settings {
        proxy_image: "ghcr.io/trellis-mesh/trellis-proxy:v0.0.0-test".to_string(),
        sidecar_mode: mode,
        control_plane_namespace: "trellis-system".to_string(),
        controller_addr: "trellis-controller.trellis-system.svc:8090".to_string(),
        identity_addr: "trellis-identity.trellis-system.svc:8080".to_string(),
        trust_domain: "cluster.local".to_string(),
        trust_anchors_pem: "-----BEGIN CERTIFICATE-----\nTEST-ANCHOR\n-----END CERTIFICATE-----\n"
            .to_string(),
        proxy_log_level: "info".to_string(),
        access_log: AccessLog::Off,
        otlp_endpoint: None,
        trace_sampling: 0.0,
        cpu_request: Quantity::cpu("100m").unwrap(),
        memory_request: Quantity::memory("64Mi").unwrap(),
        memory_limit: Quantity::memory("256Mi").unwrap(),
        version: "0.0.0-test".to_string(),
    }
}

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn read_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture_path(name)).expect(name);
    serde_json::from_str(&text).expect(name)
}

/// Writes expected output when `TRELLIS_UPDATE_FIXTURES=1`, then compares with it.
pub fn assert_matches_fixture(name: &str, actual: &Value) {
    let path = fixture_path(name);
    if std::env::var_os("TRELLIS_UPDATE_FIXTURES").is_some() {
        let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
        std::fs::write(&path, text).unwrap();
    }
    let expected = read_json(name);
    assert!(
        &expected == actual,
        "{name} differs; got:\n{}",
        serde_json::to_string_pretty(actual).unwrap()
    );
}

/// The answer's `response`, and the pod the answer's patch makes of the request's object
/// (`None` when there is no patch). Also checks that the answer is a v1 AdmissionReview that
/// echoes the uid.
pub fn apply_answer(review: &Value, answer: &[u8]) -> (Value, Option<Value>) {
    let answer: Value = serde_json::from_slice(answer).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = answer["response"].clone();
    assert_eq!(response["uid"], review["request"]["uid"]);
    let patched = response.get("patch").map(|patch| {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = BASE64
            .decode(patch.as_str().expect("base64 patch"))
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut pod = review["request"]["object"].clone();
        json_patch::patch(&mut pod, &patch).unwrap();
        pod
    });
    (response, patched)
}
