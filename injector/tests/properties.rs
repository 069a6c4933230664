//! Property tests of everything the injector reads from the API server: annotation values,
//! and whole AdmissionReview bodies (arbitrary bytes, arbitrary JSON, and a real review with
//! one field replaced by arbitrary JSON). Nothing panics; every answer is a v1 AdmissionReview
//! that is either a clear refusal or a patch that applies to the pod and injects it once.
//!
//! Case counts are fixed so the whole file runs in a few seconds of `cargo test`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use proptest::prelude::*;
use serde_json::{Value, json};
use trellis_injector::admission;
use trellis_injector::annotations::{self, PortList, Quantity};
use trellis_injector::config::SidecarMode;
use trellis_injector::patch::{self, Plan, Skip};

use support::{read_json, settings};

/// Field names of pods, so arbitrary objects reach deep into the code, and a few others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "apiVersion", "kind", "request", "uid", "operation", "object", "metadata", "spec",
            "annotations", "name", "generateName", "namespace", "containers", "initContainers",
            "ports", "containerPort", "protocol", "readinessProbe", "livenessProbe",
            "startupProbe", "httpGet", "tcpSocket", "grpc", "exec", "port", "path", "host",
            "scheme", "httpHeaders", "value", "service", "restartPolicy", "volumes",
            "hostNetwork", "resource", "group", "version", "subResource",
        ])
        .prop_map(str::to_string),
        1 => ".{0,8}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(4191),
            Just(8080),
            Just(65535),
            Just(65536),
            Just(-1)
        ]
        .prop_map(|n| json!(n)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop_oneof![
            Just("http".to_string()),
            Just("HTTPS".to_string()),
            Just("Always".to_string()),
            Just("CREATE".to_string()),
            Just("Pod".to_string()),
            Just("".to_string()),
            ".{0,12}",
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Checks one answer and returns the injected pod, if any.
fn check_answer(review: &Value, body: &[u8], mode: SidecarMode) -> Option<Value> {
    let reply = admission::review(body, &settings(mode));
    assert!(
        reply.status == 200 || reply.status == 400,
        "status {}",
        reply.status
    );
    let answer: Value = serde_json::from_slice(&reply.body).expect("the answer is JSON");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert!(response["uid"].is_string());
    let allowed = response["allowed"].as_bool().expect("allowed is a bool");
    if !allowed {
        let message = response["status"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "a refusal says why: {answer}");
        assert!(response.get("patch").is_none());
    }
    let patch = response.get("patch")?;
    assert_eq!(reply.status, 200);
    let bytes = BASE64.decode(patch.as_str().expect("base64")).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut pod = review["request"]["object"].clone();
    if let Err(e) = json_patch::patch(&mut pod, &patch) {
        panic!(
            "the patch does not apply: {e}\npod: {}",
            review["request"]["object"]
        );
    }
    // Injected once: the result is recognised as injected.
    assert_eq!(
        patch::plan(&pod, Some("shop"), &settings(mode)),
        Ok(Plan::Skip(Skip::AlreadyInjected))
    );
    Some(pod)
}

/// Where one arbitrary value goes in the real review.
const POINTERS: [&str; 22] = [
    "/request/object",
    "/request/object/metadata",
    "/request/object/metadata/annotations",
    "/request/object/metadata/annotations/trellis.dev~1inbound-ports",
    "/request/object/metadata/annotations/trellis.dev~1rewrite-probes",
    "/request/object/spec",
    "/request/object/spec/containers",
    "/request/object/spec/containers/0",
    "/request/object/spec/containers/0/ports",
    "/request/object/spec/containers/0/ports/0/containerPort",
    "/request/object/spec/containers/0/ports/0/protocol",
    "/request/object/spec/containers/0/readinessProbe",
    "/request/object/spec/containers/0/readinessProbe/httpGet",
    "/request/object/spec/containers/0/readinessProbe/httpGet/port",
    "/request/object/spec/containers/0/readinessProbe/httpGet/path",
    "/request/object/spec/containers/0/livenessProbe",
    "/request/object/spec/containers/0/livenessProbe/tcpSocket/port",
    "/request/object/spec/initContainers",
    "/request/object/spec/volumes",
    "/request/kind",
    "/request/operation",
    "/request/uid",
];

/// Sets `pointer` in `value`; its parent exists in the fixture (annotations are added first).
fn set(value: &mut Value, pointer: &str, new: Value) {
    if value
        .pointer("/request/object/metadata/annotations")
        .is_none()
    {
        value["request"]["object"]["metadata"]["annotations"] = json!({});
    }
    let (parent, last) = pointer.rsplit_once('/').unwrap();
    let last = last.replace("~1", "/").replace("~0", "~");
    match value.pointer_mut(parent).unwrap() {
        Value::Object(object) => {
            object.insert(last, new);
        }
        Value::Array(array) => array[last.parse::<usize>().unwrap()] = new,
        other => panic!("{pointer}: parent is {other}"),
    }
}

fn modes() -> impl Strategy<Value = SidecarMode> {
    prop_oneof![Just(SidecarMode::Native), Just(SidecarMode::Classic)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn annotation_parsers_never_panic(value in ".{0,24}") {
        let _ = annotations::parse_inject(&value);
        let _ = annotations::parse_rewrite_probes(&value);
        let _ = annotations::parse_log_level(&value);
        for q in [Quantity::cpu(&value), Quantity::memory(&value)].into_iter().flatten() {
            prop_assert!(q.value.is_finite() && q.value > 0.0);
        }
        if let Ok(list) = PortList::parse(&value) {
            // What is accepted renders back to a list that reads the same.
            let again = PortList::parse(&list.to_string()).unwrap();
            prop_assert_eq!(again, list.clone());
            for range in &list.0 {
                prop_assert!(range.first >= 1 && range.first <= range.last);
            }
        }
    }

    #[test]
    fn port_lists_round_trip(ranges in prop::collection::vec((1u16.., 0u16..100), 0..8), spaces in "[ ]{0,2}") {
        let written: Vec<String> = ranges
            .iter()
            .map(|(first, len)| {
                let last = first.saturating_add(*len);
                if last == *first { first.to_string() } else { format!("{first}{spaces}-{spaces}{last}") }
            })
            .collect();
        let list = PortList::parse(&written.join(&format!("{spaces},{spaces}"))).unwrap();
        prop_assert_eq!(list.0.len(), ranges.len());
        let normalized = list.clone().normalized();
        // Sorted, disjoint, and covering exactly the same ports.
        for pair in normalized.0.windows(2) {
            prop_assert!(pair[0].last < pair[1].first);
        }
        for port in [1u16, 80, 8080, 65535] {
            let inside = |l: &PortList| l.0.iter().any(|r| r.first <= port && port <= r.last);
            prop_assert_eq!(inside(&list), inside(&normalized));
        }
    }

    #[test]
    fn every_annotation_set_is_accepted_or_named(values in prop::collection::btree_map(
        prop::sample::select(vec![
            annotations::INJECT, annotations::SKIP_INBOUND_PORTS, annotations::SKIP_OUTBOUND_PORTS,
            annotations::INBOUND_PLAINTEXT_PORTS, annotations::INBOUND_PORTS,
            annotations::REWRITE_PROBES, annotations::PROXY_LOG_LEVEL,
            annotations::PROXY_CPU_REQUEST, annotations::PROXY_MEMORY_REQUEST,
            annotations::PROXY_MEMORY_LIMIT,
        ]),
        prop_oneof![".{0,10}", "[0-9, -]{0,10}", Just("disabled".to_string()), Just("64Mi".to_string())],
        0..6,
    )) {
        let map: BTreeMap<String, String> =
            values.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        if let Err(invalid) = annotations::parse(&map) {
            prop_assert!(!invalid.0.is_empty());
            for problem in &invalid.0 {
                prop_assert!(map.contains_key(problem.annotation));
                prop_assert!(invalid.to_string().contains(problem.annotation));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_get_an_error_review(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let review = json!({});
        let _ = check_answer(&review, &body, SidecarMode::Native);
    }

    #[test]
    fn arbitrary_json_gets_a_clear_answer(value in json_value(), mode in modes()) {
        let body = serde_json::to_vec(&value).unwrap();
        let _ = check_answer(&value, &body, mode);
    }

    #[test]
    fn a_review_with_an_arbitrary_object_is_answered(object in json_value(), mode in modes()) {
        let mut review = read_json("reviews/plain-pod.json");
        review["request"]["object"] = object;
        let body = serde_json::to_vec(&review).unwrap();
        let _ = check_answer(&review, &body, mode);
    }

    #[test]
    fn a_real_review_with_one_field_replaced_is_answered(
        pointer in prop::sample::select(POINTERS.to_vec()),
        value in json_value(),
        mode in modes(),
    ) {
        let mut review = read_json("reviews/plain-pod.json");
        set(&mut review, pointer, value);
        let body = serde_json::to_vec(&review).unwrap();
        if let Some(pod) = check_answer(&review, &body, mode) {
            // Probes that were rewritten point at the admin port.
            let app = pod["spec"]["containers"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["name"] == "catalog"));
            if let Some(app) = app {
                for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                    if let Some(get) = app[probe].get("httpGet").filter(|g| g["port"] == 4191) {
                        let path = get["path"].as_str().unwrap();
                        prop_assert!(path.starts_with("/app-health/catalog/"), "{path}");
                    }
                }
            }
        }
    }
}
