//! Table tests of [`desired_parents`]: every way a current `status.parents` can differ from the
//! model's, written as the JSON the API server holds.

use serde_json::{Value, json};
use trellis_api::policy::RouteKind;

use super::*;
use crate::status::{ACCEPTED, Condition as ModelCondition, PARTIALLY_INVALID, RESOLVED_REFS};

const OLD: &str = "2026-01-01T00:00:00Z";
const NOW: &str = "2026-02-02T12:00:00Z";

fn now() -> Timestamp {
    NOW.parse().unwrap()
}

fn service_ref(name: &str, port: Option<i32>) -> ParentRef {
    ParentRef {
        group: String::new(),
        kind: "Service".to_string(),
        name: name.to_string(),
        namespace: None,
        port,
        section_name: None,
    }
}

fn cond(type_: &'static str, ok: bool, reason: &'static str, message: &str) -> ModelCondition {
    ModelCondition {
        type_,
        status: ok,
        reason,
        message: message.to_string(),
    }
}

fn accepted(message: &str) -> ModelCondition {
    cond(ACCEPTED, true, "Accepted", message)
}

fn resolved() -> ModelCondition {
    cond(
        RESOLVED_REFS,
        true,
        "ResolvedRefs",
        "all references resolved",
    )
}

fn model(generation: i64, parents: Vec<(ParentRef, Vec<ModelCondition>)>) -> RouteStatus {
    RouteStatus {
        kind: RouteKind::Http,
        namespace: "shop".to_string(),
        name: "r".to_string(),
        observed_generation: Some(generation),
        parents: parents
            .into_iter()
            .map(|(parent_ref, conditions)| ParentStatus {
                parent_ref,
                controller_name: CONTROLLER_NAME,
                conditions,
            })
            .collect(),
    }
}

/// A condition as the API holds it.
fn c(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    since: &str,
    generation: i64,
) -> Value {
    json!({
        "type": type_, "status": status, "reason": reason, "message": message,
        "lastTransitionTime": since, "observedGeneration": generation
    })
}

fn ours_entry(name: &str, port: Option<i32>, conditions: Vec<Value>) -> Value {
    let mut parent_ref = json!({"group": "", "kind": "Service", "name": name});
    if let Some(port) = port {
        parent_ref["port"] = json!(port);
    }
    json!({"parentRef": parent_ref, "controllerName": "trellis.dev/controller", "conditions": conditions})
}

fn gateway_entry(name: &str) -> Value {
    json!({
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": name},
        "controllerName": "example.com/gateway",
        "conditions": [c("Accepted", "True", "Accepted", "", OLD, 1)]
    })
}

/// The healthy entry the model gives `web:80` at `generation`, with times `since`.
fn healthy(generation: i64, since: &str) -> Value {
    ours_entry(
        "web",
        Some(80),
        vec![
            c(
                "Accepted",
                "True",
                "Accepted",
                "routes web",
                since,
                generation,
            ),
            c(
                "ResolvedRefs",
                "True",
                "ResolvedRefs",
                "all references resolved",
                since,
                generation,
            ),
        ],
    )
}

fn healthy_model(generation: i64) -> RouteStatus {
    model(
        generation,
        vec![(
            service_ref("web", Some(80)),
            vec![accepted("routes web"), resolved()],
        )],
    )
}

struct Case {
    name: &'static str,
    current: Vec<Value>,
    ours: RouteStatus,
    want: Option<Vec<Value>>,
}

fn cases() -> Vec<Case> {
    let many_gateways: Vec<Value> = (0..31).map(|i| gateway_entry(&format!("gw{i}"))).collect();
    vec![
        Case {
            name: "first write: our entry, every time is now",
            current: vec![],
            ours: healthy_model(1),
            want: Some(vec![healthy(1, NOW)]),
        },
        Case {
            name: "unchanged: no write",
            current: vec![healthy(1, OLD)],
            ours: healthy_model(1),
            want: None,
        },
        Case {
            name: "unchanged beside a Gateway's entry: no write",
            current: vec![gateway_entry("gw"), healthy(1, OLD)],
            ours: healthy_model(1),
            want: None,
        },
        Case {
            name: "new generation, same conditions: observedGeneration moves, times stay",
            current: vec![healthy(1, OLD)],
            ours: healthy_model(2),
            want: Some(vec![healthy(2, OLD)]),
        },
        Case {
            name: "message only changed: rewritten, time stays",
            current: vec![healthy(1, OLD)],
            ours: model(
                1,
                vec![(
                    service_ref("web", Some(80)),
                    vec![accepted("routes web port 80"), resolved()],
                )],
            ),
            want: Some(vec![ours_entry(
                "web",
                Some(80),
                vec![
                    c("Accepted", "True", "Accepted", "routes web port 80", OLD, 1),
                    c(
                        "ResolvedRefs",
                        "True",
                        "ResolvedRefs",
                        "all references resolved",
                        OLD,
                        1,
                    ),
                ],
            )]),
        },
        Case {
            name: "status changed: that condition's time is now, the other's stays",
            current: vec![healthy(1, OLD)],
            ours: model(
                2,
                vec![(
                    service_ref("web", Some(80)),
                    vec![
                        accepted("routes web"),
                        cond(
                            RESOLVED_REFS,
                            false,
                            "BackendNotFound",
                            "no Service shop/v2",
                        ),
                    ],
                )],
            ),
            want: Some(vec![ours_entry(
                "web",
                Some(80),
                vec![
                    c("Accepted", "True", "Accepted", "routes web", OLD, 2),
                    c(
                        "ResolvedRefs",
                        "False",
                        "BackendNotFound",
                        "no Service shop/v2",
                        NOW,
                        2,
                    ),
                ],
            )]),
        },
        Case {
            name: "reason changed, status the same: time is now",
            current: vec![ours_entry(
                "web",
                Some(80),
                vec![c("Accepted", "False", "NoMatchingParent", "m", OLD, 1)],
            )],
            ours: model(
                1,
                vec![(
                    service_ref("web", Some(80)),
                    vec![cond(ACCEPTED, false, "UnsupportedValue", "m")],
                )],
            ),
            want: Some(vec![ours_entry(
                "web",
                Some(80),
                vec![c("Accepted", "False", "UnsupportedValue", "m", NOW, 1)],
            )]),
        },
        Case {
            name: "a condition appears (time now) and one disappears",
            current: vec![healthy(1, OLD)],
            ours: model(
                1,
                vec![(
                    service_ref("web", Some(80)),
                    vec![
                        accepted("routes web"),
                        cond(PARTIALLY_INVALID, true, "UnsupportedValue", "rule 1"),
                    ],
                )],
            ),
            want: Some(vec![ours_entry(
                "web",
                Some(80),
                vec![
                    c("Accepted", "True", "Accepted", "routes web", OLD, 1),
                    c(
                        "PartiallyInvalid",
                        "True",
                        "UnsupportedValue",
                        "rule 1",
                        NOW,
                        1,
                    ),
                ],
            )]),
        },
        Case {
            name: "foreign entries before and after ours keep their place and content",
            current: vec![gateway_entry("a"), healthy(1, OLD), gateway_entry("b")],
            ours: healthy_model(2),
            want: Some(vec![
                gateway_entry("a"),
                healthy(2, OLD),
                gateway_entry("b"),
            ]),
        },
        Case {
            name: "a new parent is appended after the foreign entries",
            current: vec![gateway_entry("a")],
            ours: healthy_model(1),
            want: Some(vec![gateway_entry("a"), healthy(1, NOW)]),
        },
        Case {
            name: "our entry for a parent the route no longer names is removed",
            current: vec![
                gateway_entry("a"),
                ours_entry(
                    "old",
                    None,
                    vec![c("Accepted", "True", "Accepted", "", OLD, 1)],
                ),
                healthy(1, OLD),
            ],
            ours: healthy_model(1),
            want: Some(vec![gateway_entry("a"), healthy(1, OLD)]),
        },
        Case {
            name: "no Service parent any more: all of ours removed, foreign kept",
            current: vec![healthy(1, OLD), gateway_entry("a")],
            ours: model(2, vec![]),
            want: Some(vec![gateway_entry("a")]),
        },
        Case {
            name: "no Service parent and none of ours: no write",
            current: vec![gateway_entry("a")],
            ours: model(2, vec![]),
            want: None,
        },
        Case {
            name: "nothing at all: no write",
            current: vec![],
            ours: model(1, vec![]),
            want: None,
        },
        Case {
            name: "a duplicate of our entry is dropped",
            current: vec![healthy(1, OLD), healthy(1, "2026-01-05T00:00:00Z")],
            ours: healthy_model(1),
            want: Some(vec![healthy(1, OLD)]),
        },
        Case {
            name: "another port of the same Service is another parent",
            current: vec![ours_entry("web", Some(81), vec![])],
            ours: healthy_model(1),
            want: Some(vec![healthy(1, NOW)]),
        },
        Case {
            name: "a foreign entry for the same Service is not ours to update",
            current: vec![json!({
                "parentRef": {"group": "", "kind": "Service", "name": "web", "port": 80},
                "controllerName": "example.com/other-mesh",
                "conditions": [c("Accepted", "False", "NotAllowed", "", OLD, 1)]
            })],
            ours: healthy_model(1),
            want: Some(vec![
                json!({
                    "parentRef": {"group": "", "kind": "Service", "name": "web", "port": 80},
                    "controllerName": "example.com/other-mesh",
                    "conditions": [c("Accepted", "False", "NotAllowed", "", OLD, 1)]
                }),
                healthy(1, NOW),
            ]),
        },
        Case {
            name: "an entry of ours without group or kind means a Gateway: replaced",
            current: vec![json!({
                "parentRef": {"name": "web", "port": 80},
                "controllerName": "trellis.dev/controller",
                "conditions": []
            })],
            ours: healthy_model(1),
            want: Some(vec![healthy(1, NOW)]),
        },
        Case {
            name: "two parents, one changed: only its entry changes",
            current: vec![
                healthy(1, OLD),
                ours_entry(
                    "api",
                    None,
                    vec![c("Accepted", "True", "Accepted", "routes api", OLD, 1)],
                ),
            ],
            ours: model(
                1,
                vec![
                    (
                        service_ref("web", Some(80)),
                        vec![accepted("routes web"), resolved()],
                    ),
                    (
                        service_ref("api", None),
                        vec![cond(ACCEPTED, false, "NoMatchingParent", "gone")],
                    ),
                ],
            ),
            want: Some(vec![
                healthy(1, OLD),
                ours_entry(
                    "api",
                    None,
                    vec![c("Accepted", "False", "NoMatchingParent", "gone", NOW, 1)],
                ),
            ]),
        },
        Case {
            name: "the list is full: ours is not added past 32 entries",
            current: many_gateways.clone(),
            ours: model(
                1,
                vec![
                    (
                        service_ref("web", Some(80)),
                        vec![accepted("routes web"), resolved()],
                    ),
                    (service_ref("api", None), vec![accepted("routes api")]),
                ],
            ),
            want: Some(
                many_gateways
                    .iter()
                    .cloned()
                    .chain([healthy(1, NOW)])
                    .collect(),
            ),
        },
    ]
}

fn parse(values: &[Value]) -> Vec<HttpRouteStatusParents> {
    values
        .iter()
        .map(|v| serde_json::from_value(v.clone()).unwrap())
        .collect()
}

#[test]
fn desired_parents_table() {
    let mut failures = Vec::new();
    for case in cases() {
        let got = desired_parents(&parse(&case.current), &case.ours, now());
        let want = case.want.as_deref().map(parse);
        if got != want {
            failures.push(format!(
                "{}:\n  got  {}\n  want {}",
                case.name,
                serde_json::to_string(&got).unwrap(),
                serde_json::to_string(&want).unwrap()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn writing_the_desired_list_back_is_a_fixed_point() {
    // Whatever was written, computing again from it (later) asks for no write.
    for case in cases() {
        let Some(written) = case.want.as_deref().map(parse) else {
            continue;
        };
        let later: Timestamp = "2026-03-03T00:00:00Z".parse().unwrap();
        assert_eq!(
            desired_parents(&written, &case.ours, later),
            None,
            "{}",
            case.name
        );
    }
}

#[test]
fn service_parents_are_recognised_in_the_spec() {
    let refs = |v: Value| -> Vec<HttpRouteParentRefs> { serde_json::from_value(v).unwrap() };
    assert!(names_a_service(&refs(
        json!([{"group": "", "kind": "Service", "name": "web"}])
    )));
    assert!(names_a_service(&refs(
        json!([{"group": "core", "kind": "Service", "name": "web"}])
    )));
    assert!(!names_a_service(&refs(json!([{"name": "gw"}]))));
    assert!(!names_a_service(&refs(json!([
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}
    ]))));
    assert!(!names_a_service(&[]));
}
