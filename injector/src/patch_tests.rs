use serde_json::json;

use super::*;
use crate::config::tests::settings;

fn pod(extra_spec: Value, annotations: Value) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    });
    if !annotations.is_null() {
        pod["metadata"]["annotations"] = annotations;
    }
    if let (Some(spec), Some(extra)) = (pod["spec"].as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    pod
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

#[test]
fn skips() {
    let cases = [
        (
            pod(json!({}), json!({"trellis.dev/proxy-version": "0.0.1"})),
            Skip::AlreadyInjected,
        ),
        (
            pod(json!({}), json!({"trellis.dev/inject": "disabled"})),
            Skip::OptedOut,
        ),
        // The opt-out wins over annotations that would otherwise be refused.
        (
            pod(
                json!({}),
                json!({"trellis.dev/inject": " disabled ", "trellis.dev/proxy-memory-limit": "x"}),
            ),
            Skip::OptedOut,
        ),
        (
            pod(
                json!({"hostNetwork": true}),
                json!({"trellis.dev/inject": "enabled"}),
            ),
            Skip::HostNetwork,
        ),
    ];
    for (pod, want) in cases {
        assert_eq!(
            plan(&pod, Some("shop"), &settings()),
            Ok(Plan::Skip(want)),
            "{pod}"
        );
    }
    let control_plane = pod(json!({}), Value::Null);
    assert_eq!(
        plan(&control_plane, Some("trellis-system"), &settings()),
        Ok(Plan::Skip(Skip::ControlPlane))
    );
    // Without a request namespace (offline), the pod's own namespace counts.
    let mut own = pod(json!({}), Value::Null);
    own["metadata"]["namespace"] = json!("trellis-system");
    assert_eq!(
        plan(&own, None, &settings()),
        Ok(Plan::Skip(Skip::ControlPlane))
    );
}

#[test]
fn refusals_name_the_problem() {
    let cases = [
        (
            pod(json!({}), json!({"trellis.dev/inject": "no"})),
            "invalid_annotation",
            "annotation trellis.dev/inject: \"no\" is not a valid value",
        ),
        (
            pod(
                json!({"initContainers": [{"name": "trellis-init", "image": "x"}]}),
                Value::Null,
            ),
            "name_taken",
            "the pod already has a container named \"trellis-init\"",
        ),
        (
            pod(
                json!({"containers": [{"name": "trellis-proxy", "image": "x"}]}),
                Value::Null,
            ),
            "name_taken",
            "the pod already has a container named \"trellis-proxy\"",
        ),
        (
            pod(
                json!({"volumes": [{"name": "trellis-secrets", "emptyDir": {}}]}),
                Value::Null,
            ),
            "name_taken",
            "the pod already has a volume named \"trellis-secrets\"",
        ),
        (
            pod(
                json!({}),
                json!({"trellis.dev/proxy-memory-request": "512Mi"}),
            ),
            "invalid_annotation",
            "annotation trellis.dev/proxy-memory-request: 512Mi is above the default memory limit 256Mi; set trellis.dev/proxy-memory-limit too",
        ),
        (
            pod(json!({}), json!({"trellis.dev/proxy-memory-limit": "32Mi"})),
            "invalid_annotation",
            "annotation trellis.dev/proxy-memory-limit: 32Mi is below the memory request 64Mi",
        ),
        (
            pod(
                json!({}),
                json!({"trellis.dev/proxy-memory-limit": "32Mi", "trellis.dev/proxy-memory-request": "64Mi"}),
            ),
            "invalid_annotation",
            "annotation trellis.dev/proxy-memory-request: 64Mi is above the memory limit 32Mi",
        ),
        (
            pod(
                json!({"containers": [{"name": "app", "readinessProbe": {"httpGet": {"port": "web"}}}]}),
                Value::Null,
            ),
            "invalid_probe",
            "container \"app\": readinessProbe port \"web\" is not a port name of the container",
        ),
        (
            pod(
                json!({}),
                json!({"trellis.dev/inbound-plaintext-ports": "8080,metrics"}),
            ),
            "invalid_annotation",
            "annotation trellis.dev/inbound-plaintext-ports: \"metrics\" is not a port number",
        ),
        (
            json!({"metadata": {}}),
            "not_a_pod",
            "the object is not a pod: it has no spec",
        ),
        (
            json!([1]),
            "not_a_pod",
            "the object is not a pod: expected a JSON object",
        ),
        // Found by the property tests: in classic mode the patch added the proxy at
        // /spec/containers/0 of a spec without that list, a patch the API server cannot apply.
        (
            json!({"spec": {}}),
            "not_a_pod",
            "the object is not a pod: it has no containers (a pod needs at least one)",
        ),
        (
            json!({"spec": {"containers": []}}),
            "not_a_pod",
            "the object is not a pod: it has no containers",
        ),
        (
            json!({"spec": {"containers": "app"}}),
            "not_a_pod",
            "the object is not a pod: invalid type",
        ),
    ];
    for (pod, label, want) in cases {
        let denied = plan(&pod, Some("shop"), &settings()).unwrap_err();
        assert_eq!(denied.label(), label, "{pod}");
        assert!(denied.to_string().starts_with(want), "{pod}: {denied}");
    }
}

#[test]
fn native_mode_puts_init_then_proxy_before_the_pods_init_containers() {
    let mut pod = pod(
        json!({"initContainers": [{"name": "migrate", "image": "m"}], "volumes": [{"name": "data", "emptyDir": {}}]}),
        json!({"prometheus.io/port": "9100"}),
    );
    assert_eq!(inject(&mut pod, Some("shop"), &settings()), Ok(None));
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["trellis-init", "trellis-proxy", "migrate"]
    );
    assert_eq!(names(&pod["spec"]["containers"]), ["app"]);
    assert_eq!(
        names(&pod["spec"]["volumes"]),
        [
            "data",
            "trellis-identity-token",
            "trellis-secrets",
            "trellis-xtables-lock"
        ]
    );
    assert_eq!(pod["spec"]["initContainers"][1]["restartPolicy"], "Always");
    // The pod's own Prometheus port is kept; the others are added.
    assert_eq!(
        pod["metadata"]["annotations"],
        json!({
            "prometheus.io/port": "9100",
            "prometheus.io/scrape": "true",
            "prometheus.io/path": "/metrics",
            "trellis.dev/proxy-version": "0.0.0-test",
        })
    );
    // Injecting the result again changes nothing.
    let before = pod.clone();
    assert_eq!(
        inject(&mut pod, Some("shop"), &settings()),
        Ok(Some(Skip::AlreadyInjected))
    );
    assert_eq!(pod, before);
}

#[test]
fn classic_mode_puts_the_proxy_first_and_init_last() {
    let mut settings = settings();
    settings.sidecar_mode = crate::config::SidecarMode::Classic;
    let mut pod = pod(
        json!({"initContainers": [{"name": "migrate", "image": "m"}]}),
        Value::Null,
    );
    assert_eq!(inject(&mut pod, Some("shop"), &settings), Ok(None));
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["migrate", "trellis-init"]
    );
    assert_eq!(names(&pod["spec"]["containers"]), ["trellis-proxy", "app"]);
    assert!(pod["spec"]["containers"][0].get("restartPolicy").is_none());
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "app"
    );
}

#[test]
fn missing_or_null_lists_are_created() {
    for spec in [json!({}), json!({"initContainers": null, "volumes": null})] {
        let mut pod = pod(spec, Value::Null);
        pod["metadata"]["annotations"] = Value::Null;
        assert_eq!(inject(&mut pod, Some("shop"), &settings()), Ok(None));
        assert_eq!(
            names(&pod["spec"]["initContainers"]),
            ["trellis-init", "trellis-proxy"]
        );
        assert_eq!(names(&pod["spec"]["volumes"]).len(), 3);
        assert_eq!(
            pod["metadata"]["annotations"]["trellis.dev/proxy-version"],
            "0.0.0-test"
        );
    }
    // A template without metadata at all gets some.
    let mut template = json!({"spec": {"containers": [{"name": "app"}]}});
    assert_eq!(inject(&mut template, None, &settings()), Ok(None));
    assert_eq!(
        template["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
}

#[test]
fn fields_unknown_to_this_build_are_kept() {
    let mut pod = pod(json!({"futureField": {"x": 1}}), Value::Null);
    pod["spec"]["containers"][0]["futureContainerField"] = json!(true);
    pod["metadata"]["futureMeta"] = json!("y");
    inject(&mut pod, Some("shop"), &settings()).unwrap();
    assert_eq!(pod["spec"]["futureField"], json!({"x": 1}));
    assert_eq!(
        pod["spec"]["containers"][0]["futureContainerField"],
        json!(true)
    );
    assert_eq!(pod["metadata"]["futureMeta"], json!("y"));
}

#[test]
fn the_patch_only_adds() {
    let Ok(Plan::Inject(patch)) = plan(
        &pod(json!({}), json!({"a": "b"})),
        Some("shop"),
        &settings(),
    ) else {
        panic!("expected a patch");
    };
    let paths: Vec<String> = patch
        .iter()
        .map(|op| match op {
            PatchOperation::Add(add) => add.path.to_string(),
            other => panic!("unexpected {other}"),
        })
        .collect();
    assert_eq!(
        paths,
        [
            "/spec/initContainers",
            "/spec/volumes",
            "/metadata/annotations/prometheus.io~1scrape",
            "/metadata/annotations/prometheus.io~1port",
            "/metadata/annotations/prometheus.io~1path",
            "/metadata/annotations/trellis.dev~1proxy-version",
        ]
    );
}

/// The proxy's environment variable `name`, whichever list the proxy was put in.
fn proxy_env<'a>(pod: &'a Value, name: &str) -> Option<&'a str> {
    let proxy = ["/spec/initContainers", "/spec/containers"]
        .iter()
        .filter_map(|path| pod.pointer(path).and_then(Value::as_array))
        .flatten()
        .find(|c| c["name"] == "trellis-proxy")
        .unwrap();
    proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e["value"].as_str().unwrap())
}

fn app<'a>(pod: &'a Value, name: &str) -> &'a Value {
    ["/spec/initContainers", "/spec/containers"]
        .iter()
        .filter_map(|path| pod.pointer(path).and_then(Value::as_array))
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap()
}

fn probed() -> Value {
    json!({
        "initContainers": [{
            "name": "agent", "restartPolicy": "Always",
            "ports": [{"containerPort": 7070}],
            "startupProbe": {"tcpSocket": {"port": 7070}, "periodSeconds": 2},
        }],
        "containers": [{
            "name": "app",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"},
                               "initialDelaySeconds": 3, "periodSeconds": 4, "timeoutSeconds": 5,
                               "successThreshold": 1, "failureThreshold": 6},
            "livenessProbe": {"tcpSocket": {"port": 8080}, "terminationGracePeriodSeconds": 7},
            "startupProbe": {"grpc": {"port": 9090}, "failureThreshold": 30},
        }],
    })
}

#[test]
fn probes_go_through_the_admin_port_in_both_modes() {
    for mode in [
        crate::config::SidecarMode::Native,
        crate::config::SidecarMode::Classic,
    ] {
        let mut settings = settings();
        settings.sidecar_mode = mode;
        let mut pod = pod(
            probed(),
            json!({"trellis.dev/inbound-plaintext-ports": "15000-15010"}),
        );
        assert_eq!(inject(&mut pod, Some("shop"), &settings), Ok(None));
        // Only what the annotation opens is plaintext now.
        assert_eq!(
            proxy_env(&pod, "TRELLIS_INBOUND_PLAINTEXT_PORTS"),
            Some(match mode {
                crate::config::SidecarMode::Native => "15000-15010",
                // The native sidecar's probe stays direct: the proxy starts after it.
                crate::config::SidecarMode::Classic => "7070,15000-15010",
            }),
            "{mode:?}"
        );
        assert_eq!(
            proxy_env(&pod, "TRELLIS_INBOUND_PORTS"),
            Some("7070,8080,15000-15010"),
            "{mode:?}"
        );
        let admin = |path: &str| json!({"path": path, "port": 4191, "scheme": "HTTP"});
        let app_container = app(&pod, "app");
        assert_eq!(
            app_container["readinessProbe"],
            json!({"httpGet": admin("/app-health/app/readiness"),
                   "initialDelaySeconds": 3, "periodSeconds": 4, "timeoutSeconds": 5,
                   "successThreshold": 1, "failureThreshold": 6}),
            "{mode:?}"
        );
        assert_eq!(
            app_container["livenessProbe"],
            json!({"httpGet": admin("/app-health/app/liveness"), "terminationGracePeriodSeconds": 7}),
            "{mode:?}"
        );
        assert_eq!(
            app_container["startupProbe"],
            json!({"httpGet": admin("/app-health/app/startup"), "failureThreshold": 30}),
            "{mode:?}"
        );
        let probes: trellis_api::probes::AppProbes =
            serde_json::from_str(proxy_env(&pod, "TRELLIS_APP_PROBES").unwrap()).unwrap();
        let mut keys: Vec<&str> = probes.keys().map(String::as_str).collect();
        keys.sort_unstable();
        match mode {
            crate::config::SidecarMode::Native => {
                assert_eq!(
                    keys,
                    [
                        "agent/startup",
                        "app/liveness",
                        "app/readiness",
                        "app/startup"
                    ]
                );
                assert_eq!(
                    app(&pod, "agent")["startupProbe"],
                    json!({"httpGet": admin("/app-health/agent/startup"), "periodSeconds": 2})
                );
            }
            crate::config::SidecarMode::Classic => {
                assert_eq!(keys, ["app/liveness", "app/readiness", "app/startup"]);
                assert_eq!(
                    app(&pod, "agent")["startupProbe"],
                    json!({"tcpSocket": {"port": 7070}, "periodSeconds": 2})
                );
            }
        }
        // Injecting again changes nothing.
        let before = pod.clone();
        assert_eq!(
            inject(&mut pod, Some("shop"), &settings),
            Ok(Some(Skip::AlreadyInjected))
        );
        assert_eq!(pod, before);

        // Nothing to open or deliver: no variables, so the proxy keeps its defaults.
        let mut plain = self::pod(json!({}), Value::Null);
        assert_eq!(inject(&mut plain, Some("shop"), &settings), Ok(None));
        for name in [
            "TRELLIS_INBOUND_PLAINTEXT_PORTS",
            "TRELLIS_INBOUND_PORTS",
            "TRELLIS_APP_PROBES",
        ] {
            assert_eq!(proxy_env(&plain, name), None, "{mode:?} {name}");
        }
    }
}

#[test]
fn rewrite_probes_disabled_keeps_probe_ports_plaintext() {
    let mut pod = pod(
        probed(),
        json!({"trellis.dev/rewrite-probes": "disabled", "trellis.dev/inbound-ports": "9443"}),
    );
    let original = pod.clone();
    assert_eq!(inject(&mut pod, Some("shop"), &settings()), Ok(None));
    assert_eq!(
        proxy_env(&pod, "TRELLIS_INBOUND_PLAINTEXT_PORTS"),
        Some("7070,8080,9090")
    );
    assert_eq!(
        proxy_env(&pod, "TRELLIS_INBOUND_PORTS"),
        Some("7070,8080,9090,9443")
    );
    assert_eq!(proxy_env(&pod, "TRELLIS_APP_PROBES"), None);
    assert_eq!(
        app(&pod, "app")["readinessProbe"],
        original["spec"]["containers"][0]["readinessProbe"]
    );
    let denied = plan(
        &self::pod(json!({}), json!({"trellis.dev/rewrite-probes": "off"})),
        Some("shop"),
        &settings(),
    )
    .unwrap_err();
    assert_eq!(
        denied.to_string(),
        "annotation trellis.dev/rewrite-probes: \"off\" is not a valid value (use enabled or disabled)"
    );
}

#[test]
fn the_access_log_annotation_sets_the_proxys_env() {
    for (value, want) in [("json", Some("json")), ("off", Some("off"))] {
        let mut pod = pod(json!({}), json!({"trellis.dev/access-log": value}));
        assert_eq!(inject(&mut pod, Some("shop"), &settings()), Ok(None));
        assert_eq!(proxy_env(&pod, "TRELLIS_ACCESS_LOG"), want, "{value}");
    }
    let mut plain = pod(json!({}), Value::Null);
    assert_eq!(inject(&mut plain, Some("shop"), &settings()), Ok(None));
    assert_eq!(proxy_env(&plain, "TRELLIS_ACCESS_LOG"), None);
    let refused = plan(
        &pod(json!({}), json!({"trellis.dev/access-log": "yes"})),
        Some("shop"),
        &settings(),
    );
    assert!(refused.is_err());
}

#[test]
fn the_injectors_access_log_applies_unless_the_pod_chooses() {
    let mut json_default = settings();
    json_default.access_log = crate::annotations::AccessLog::Json;
    for (annotations, want) in [
        (Value::Null, Some("json")),
        (json!({"trellis.dev/access-log": "off"}), Some("off")),
        (json!({"trellis.dev/access-log": "json"}), Some("json")),
    ] {
        let mut pod = pod(json!({}), annotations.clone());
        assert_eq!(inject(&mut pod, Some("shop"), &json_default), Ok(None));
        assert_eq!(proxy_env(&pod, "TRELLIS_ACCESS_LOG"), want, "{annotations}");
    }
}

#[test]
fn tracing_comes_with_the_injectors_endpoint_and_the_pods_sampling() {
    let mut tracing = settings();
    tracing.otlp_endpoint = Some("http://otel-collector.observability:4318".to_string());
    tracing.trace_sampling = 0.01;
    for (annotations, sampling) in [
        (Value::Null, "0.01"),
        (json!({"trellis.dev/trace-sampling": "0.5"}), "0.5"),
        (json!({"trellis.dev/trace-sampling": "0"}), "0"),
        (json!({"trellis.dev/trace-sampling": "1"}), "1"),
    ] {
        let mut pod = pod(json!({}), annotations.clone());
        assert_eq!(inject(&mut pod, Some("shop"), &tracing), Ok(None));
        assert_eq!(
            proxy_env(&pod, "TRELLIS_OTLP_ENDPOINT"),
            Some("http://otel-collector.observability:4318"),
            "{annotations}"
        );
        assert_eq!(
            proxy_env(&pod, "TRELLIS_TRACE_SAMPLING"),
            Some(sampling),
            "{annotations}"
        );
    }
    // Without an endpoint the proxy does not trace, and the pod's share is not passed on.
    let mut pod = pod(json!({}), json!({"trellis.dev/trace-sampling": "0.5"}));
    assert_eq!(inject(&mut pod, Some("shop"), &settings()), Ok(None));
    assert_eq!(proxy_env(&pod, "TRELLIS_OTLP_ENDPOINT"), None);
    assert_eq!(proxy_env(&pod, "TRELLIS_TRACE_SAMPLING"), None);
    let refused = plan(
        &self::pod(json!({}), json!({"trellis.dev/trace-sampling": "5%"})),
        Some("shop"),
        &tracing,
    )
    .unwrap_err();
    assert_eq!(
        refused.to_string(),
        "annotation trellis.dev/trace-sampling: \"5%\" is not a share from 0 to 1 (examples: 0, 0.01, 1)"
    );
}
