//! Table tests on real AdmissionReview JSON: each answer's patch is applied to the pod the API
//! server sent, and the result is compared with the whole expected pod.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use trellis_injector::admission;
use trellis_injector::config::SidecarMode;

use support::{apply_answer, assert_matches_fixture, read_json, settings};

fn answer(review: &Value, mode: SidecarMode) -> (Value, Option<Value>) {
    let reply = admission::review(&serde_json::to_vec(review).unwrap(), &settings(mode));
    assert_eq!(reply.status, 200);
    apply_answer(review, &reply.body)
}

fn plain_pod() -> Value {
    read_json("reviews/plain-pod.json")
}

fn with_annotation(mut review: Value, key: &str, value: &str) -> Value {
    review["request"]["object"]["metadata"]["annotations"][key] = json!(value);
    review
}

#[test]
fn golden_pods() {
    let cases = [
        (
            "reviews/plain-pod.json",
            SidecarMode::Native,
            "expected/plain-pod.native.json",
        ),
        (
            "reviews/plain-pod.json",
            SidecarMode::Classic,
            "expected/plain-pod.classic.json",
        ),
        (
            "reviews/pod-with-init-containers.json",
            SidecarMode::Native,
            "expected/pod-with-init-containers.native.json",
        ),
        (
            "reviews/pod-with-init-containers.json",
            SidecarMode::Classic,
            "expected/pod-with-init-containers.classic.json",
        ),
    ];
    for (input, mode, expected) in cases {
        let review = read_json(input);
        let (response, pod) = answer(&review, mode);
        assert_eq!(response["allowed"], true, "{input}");
        assert_matches_fixture(expected, &pod.expect("a patch"));
    }
}

#[test]
fn pods_left_alone() {
    let mut host_network = plain_pod();
    host_network["request"]["object"]["spec"]["hostNetwork"] = json!(true);
    let mut control_plane = plain_pod();
    control_plane["request"]["namespace"] = json!("trellis-system");
    control_plane["request"]["object"]["metadata"]["namespace"] = json!("trellis-system");
    let cases = [
        (
            "opt-out",
            with_annotation(plain_pod(), "trellis.dev/inject", "disabled"),
        ),
        (
            "already injected",
            with_annotation(plain_pod(), "trellis.dev/proxy-version", "0.0.1"),
        ),
        ("hostNetwork", host_network),
        ("control plane", control_plane),
    ];
    for (name, review) in cases {
        for mode in [SidecarMode::Native, SidecarMode::Classic] {
            let (response, pod) = answer(&review, mode);
            assert_eq!(response["allowed"], true, "{name}");
            assert_eq!(pod, None, "{name}: no patch expected");
            assert!(response.get("warnings").is_none(), "{name}");
        }
    }
}

#[test]
fn an_already_injected_pod_is_not_injected_twice() {
    let review = plain_pod();
    let (_, pod) = answer(&review, SidecarMode::Native);
    let mut again = review.clone();
    again["request"]["object"] = pod.unwrap();
    let (response, pod) = answer(&again, SidecarMode::Native);
    assert_eq!(response["allowed"], true);
    assert_eq!(pod, None);
}

/// The plain pod's expected result with `edit` applied: each good annotation changes exactly
/// one thing of the injected pod.
fn expected_plain(annotation: (&str, &str), edit: impl Fn(&mut Value)) -> Value {
    let mut pod = read_json("expected/plain-pod.native.json");
    pod["metadata"]["annotations"][annotation.0] = json!(annotation.1);
    edit(&mut pod);
    pod
}

fn proxy(pod: &mut Value) -> &mut Value {
    &mut pod["spec"]["initContainers"][1]
}

fn init(pod: &mut Value) -> &mut Value {
    &mut pod["spec"]["initContainers"][0]
}

fn set_env(container: &mut Value, name: &str, value: &str) {
    let env = container["env"].as_array_mut().unwrap();
    match env.iter_mut().find(|e| e["name"] == name) {
        Some(var) => var["value"] = json!(value),
        None => env.push(json!({"name": name, "value": value})),
    }
}

/// The proxy's plaintext list set to `plaintext` (in its place, before the inbound ports) and
/// its inbound ports to `inbound`.
fn set_plaintext(p: &mut Value, plaintext: &str, inbound: &str) {
    set_env(proxy(p), "TRELLIS_INBOUND_PORTS", inbound);
    let env = proxy(p)["env"].as_array_mut().unwrap();
    let at = env
        .iter()
        .position(|e| e["name"] == "TRELLIS_INBOUND_PORTS")
        .unwrap();
    env.insert(
        at,
        json!({"name": "TRELLIS_INBOUND_PLAINTEXT_PORTS", "value": plaintext}),
    );
}

#[test]
fn each_good_annotation() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<((&str, &str), Edit)> = vec![
        (("trellis.dev/inject", "enabled"), Box::new(|_| {})),
        (
            ("trellis.dev/skip-inbound-ports", " 22, 9000-9100 "),
            Box::new(|p| set_env(init(p), "TRELLIS_SKIP_INBOUND_PORTS", "22,9000-9100")),
        ),
        (
            ("trellis.dev/skip-outbound-ports", "5432"),
            Box::new(|p| set_env(init(p), "TRELLIS_SKIP_OUTBOUND_PORTS", "5432")),
        ),
        (("trellis.dev/skip-outbound-ports", ""), Box::new(|_| {})),
        (
            ("trellis.dev/inbound-plaintext-ports", "15000-15010, 443"),
            Box::new(|p| set_plaintext(p, "443,15000-15010", "443,8080,15000-15010")),
        ),
        (
            ("trellis.dev/inbound-plaintext-ports", "8080"),
            Box::new(|p| set_plaintext(p, "8080", "8080")),
        ),
        (
            ("trellis.dev/inbound-plaintext-ports", "8000-8100"),
            Box::new(|p| set_plaintext(p, "8000-8100", "8000-8100")),
        ),
        (
            ("trellis.dev/inbound-plaintext-ports", ""),
            Box::new(|_| {}),
        ),
        (
            ("trellis.dev/inbound-ports", "9000-9100, 8443"),
            Box::new(|p| set_env(proxy(p), "TRELLIS_INBOUND_PORTS", "8080,8443,9000-9100")),
        ),
        (("trellis.dev/inbound-ports", ""), Box::new(|_| {})),
        (
            ("trellis.dev/opaque-ports", "7000, 8000-8100"),
            Box::new(|p| {
                set_env(
                    proxy(p),
                    "TRELLIS_OPAQUE_PORTS",
                    "25,587,3306,4222,5432,6379,9300,11211,7000,8000-8100",
                )
            }),
        ),
        (("trellis.dev/opaque-ports", ""), Box::new(|_| {})),
        (("trellis.dev/rewrite-probes", "enabled"), Box::new(|_| {})),
        (
            ("trellis.dev/rewrite-probes", "disabled"),
            Box::new(|p| {
                // The probes as the pod wrote them, their port open to plaintext as before.
                let original = plain_pod()["request"]["object"]["spec"]["containers"][0].clone();
                for probe in ["readinessProbe", "livenessProbe"] {
                    p["spec"]["containers"][0][probe] = original[probe].clone();
                }
                proxy(p)["env"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|e| e["name"] != "TRELLIS_APP_PROBES");
                set_plaintext(p, "8080", "8080");
            }),
        ),
        (
            ("trellis.dev/proxy-log-level", "debug"),
            Box::new(|p| set_env(proxy(p), "TRELLIS_LOG", "debug")),
        ),
        (
            (
                "trellis.dev/proxy-log-level",
                "warn,trellis_proxy::identity=trace",
            ),
            Box::new(|p| {
                set_env(
                    proxy(p),
                    "TRELLIS_LOG",
                    "warn,trellis_proxy::identity=trace",
                )
            }),
        ),
        (
            ("trellis.dev/proxy-cpu-request", "1"),
            Box::new(|p| {
                proxy(p)["resources"]["requests"]["cpu"] = json!("1");
                init(p)["resources"]["requests"]["cpu"] = json!("1");
            }),
        ),
        (
            ("trellis.dev/proxy-memory-request", "200M"),
            Box::new(|p| {
                proxy(p)["resources"]["requests"]["memory"] = json!("200M");
                init(p)["resources"]["requests"]["memory"] = json!("200M");
            }),
        ),
        (
            ("trellis.dev/proxy-memory-limit", "1Gi"),
            Box::new(|p| {
                proxy(p)["resources"]["limits"]["memory"] = json!("1Gi");
                init(p)["resources"]["limits"]["memory"] = json!("1Gi");
            }),
        ),
    ];
    for (annotation, edit) in cases {
        let review = with_annotation(plain_pod(), annotation.0, annotation.1);
        let (response, pod) = answer(&review, SidecarMode::Native);
        assert_eq!(response["allowed"], true, "{annotation:?}");
        let want = expected_plain(annotation, edit);
        assert!(
            pod.as_ref() == Some(&want),
            "{annotation:?}: got\n{}",
            serde_json::to_string_pretty(&pod).unwrap()
        );
    }
}

#[test]
fn each_bad_annotation_denies_with_its_name_and_problem() {
    let cases = [
        (
            "trellis.dev/inject",
            "yes",
            "annotation trellis.dev/inject: \"yes\" is not a valid value (use enabled or disabled)",
        ),
        (
            "trellis.dev/skip-inbound-ports",
            "80,http",
            "annotation trellis.dev/skip-inbound-ports: \"http\" is not a port number",
        ),
        (
            "trellis.dev/opaque-ports",
            "7000,mysql",
            "annotation trellis.dev/opaque-ports: \"mysql\" is not a port number",
        ),
        (
            "trellis.dev/skip-inbound-ports",
            "70000",
            "annotation trellis.dev/skip-inbound-ports: port 70000 is out of range (use 1-65535)",
        ),
        (
            "trellis.dev/skip-outbound-ports",
            "9000-8000",
            "annotation trellis.dev/skip-outbound-ports: range \"9000-8000\" starts after it ends (write it as 8000-9000)",
        ),
        (
            "trellis.dev/inbound-plaintext-ports",
            "8080,metrics",
            "annotation trellis.dev/inbound-plaintext-ports: \"metrics\" is not a port number",
        ),
        (
            "trellis.dev/inbound-plaintext-ports",
            "9100-9000",
            "annotation trellis.dev/inbound-plaintext-ports: range \"9100-9000\" starts after it ends (write it as 9000-9100)",
        ),
        (
            "trellis.dev/inbound-ports",
            "8080,http",
            "annotation trellis.dev/inbound-ports: \"http\" is not a port number",
        ),
        (
            "trellis.dev/inbound-ports",
            "0",
            "annotation trellis.dev/inbound-ports: port 0 is not a valid port (use 1-65535)",
        ),
        (
            "trellis.dev/rewrite-probes",
            "false",
            "annotation trellis.dev/rewrite-probes: \"false\" is not a valid value (use enabled or disabled)",
        ),
        (
            "trellis.dev/proxy-log-level",
            "verbose",
            "annotation trellis.dev/proxy-log-level: \"verbose\" is not a log level",
        ),
        (
            "trellis.dev/proxy-log-level",
            "trellis_proxy=chatty",
            "annotation trellis.dev/proxy-log-level: \"trellis_proxy=chatty\" is not a valid log filter",
        ),
        (
            "trellis.dev/proxy-cpu-request",
            "two",
            "annotation trellis.dev/proxy-cpu-request: \"two\" is not a Kubernetes quantity",
        ),
        (
            "trellis.dev/proxy-cpu-request",
            "-1",
            "annotation trellis.dev/proxy-cpu-request: \"-1\" is negative",
        ),
        (
            "trellis.dev/proxy-memory-request",
            "64m",
            "annotation trellis.dev/proxy-memory-request: \"64m\" is not a whole number of bytes; did you mean 64Mi?",
        ),
        (
            "trellis.dev/proxy-memory-request",
            "1Gi",
            "annotation trellis.dev/proxy-memory-request: 1Gi is above the default memory limit 256Mi",
        ),
        (
            "trellis.dev/proxy-memory-limit",
            "1GB",
            "annotation trellis.dev/proxy-memory-limit: \"1GB\" is not a Kubernetes quantity",
        ),
        (
            "trellis.dev/proxy-memory-limit",
            "16Mi",
            "annotation trellis.dev/proxy-memory-limit: 16Mi is below the memory request 64Mi",
        ),
    ];
    for (key, value, message) in cases {
        let review = with_annotation(plain_pod(), key, value);
        let (response, pod) = answer(&review, SidecarMode::Native);
        assert_eq!(pod, None, "{key}");
        assert_eq!(response["allowed"], false, "{key}");
        assert_eq!(response["status"]["code"], 400);
        let got = response["status"]["message"].as_str().unwrap();
        let prefix = "trellis-injector: pod shop/catalog-6c9f7d8b5-*: ";
        assert!(
            got.starts_with(&format!("{prefix}{message}")),
            "{key}={value}: {got}"
        );
    }
}

#[test]
fn name_collisions_are_denied_clearly() {
    let mut container = plain_pod();
    container["request"]["object"]["spec"]["containers"][0]["name"] = json!("trellis-proxy");
    let mut init = plain_pod();
    init["request"]["object"]["spec"]["initContainers"] =
        json!([{"name": "trellis-init", "image": "x"}]);
    let mut volume = plain_pod();
    volume["request"]["object"]["spec"]["volumes"][0]["name"] = json!("trellis-identity-token");
    let cases = [
        (
            container,
            "the pod already has a container named \"trellis-proxy\"",
        ),
        (
            init,
            "the pod already has a container named \"trellis-init\"",
        ),
        (
            volume,
            "the pod already has a volume named \"trellis-identity-token\"",
        ),
    ];
    for (review, message) in cases {
        let (response, pod) = answer(&review, SidecarMode::Native);
        assert_eq!(pod, None);
        assert_eq!(response["allowed"], false);
        let got = response["status"]["message"].as_str().unwrap();
        assert!(got.contains(message), "{got}");
        assert!(
            got.ends_with("rename it, or set the annotation trellis.dev/inject: disabled"),
            "{got}"
        );
    }
}

/// The plain pod with its app container's probes replaced by `probes`.
fn with_probes(probes: Value) -> Value {
    let mut review = plain_pod();
    let app = review["request"]["object"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap();
    app.retain(|key, _| !key.ends_with("Probe"));
    app.extend(probes.as_object().unwrap().clone());
    review
}

fn env(pod: &mut Value, name: &str) -> Option<String> {
    proxy(pod)["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e["value"].as_str().unwrap().to_string())
}

#[test]
fn probes_are_rewritten_to_the_admin_port() {
    let cases = [
        (
            "named httpGet port",
            json!({"readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}),
            json!({"catalog/readiness": {"kind": "http", "port": 8080, "path": "/ready"}}),
            None,
            "8080",
        ),
        (
            "numeric httpGet port, empty path, host and headers",
            json!({"readinessProbe": {"httpGet": {"port": 8081, "host": "catalog.local",
                   "httpHeaders": [{"name": "X-A", "value": "1"}]}}}),
            json!({"catalog/readiness": {"kind": "http", "port": 8081, "path": "/",
                   "host": "catalog.local", "headers": [{"name": "X-A", "value": "1"}]}}),
            None,
            "8080",
        ),
        (
            "tcpSocket",
            json!({"livenessProbe": {"tcpSocket": {"port": 9000}}}),
            json!({"catalog/liveness": {"kind": "tcp", "port": 9000}}),
            None,
            "8080",
        ),
        (
            "grpc",
            json!({"startupProbe": {"grpc": {"port": 9090}}}),
            json!({"catalog/startup": {"kind": "grpc", "port": 9090}}),
            None,
            "8080",
        ),
        (
            "HTTPS stays direct and plaintext",
            json!({"readinessProbe": {"httpGet": {"port": 8443, "scheme": "HTTPS"}}}),
            Value::Null,
            Some("8443"),
            "8080,8443",
        ),
        (
            "tcpSocket with a host stays direct",
            json!({"livenessProbe": {"tcpSocket": {"port": 9000, "host": "10.1.2.3"}}}),
            Value::Null,
            Some("9000"),
            "8080,9000",
        ),
        (
            "exec probe",
            json!({"livenessProbe": {"exec": {"command": ["/bin/check"]}}}),
            Value::Null,
            None,
            "8080",
        ),
        ("no probes", json!({}), Value::Null, None, "8080"),
    ];
    for (name, probes, app_probes, plaintext, inbound) in cases {
        for mode in [SidecarMode::Native, SidecarMode::Classic] {
            let (response, pod) = answer(&with_probes(probes.clone()), mode);
            assert_eq!(response["allowed"], true, "{name}");
            let mut pod = pod.expect("a patch");
            if mode == SidecarMode::Classic {
                // The same checks with the proxy first among the containers.
                let containers = pod["spec"]["containers"].as_array_mut().unwrap();
                containers.swap(0, 1);
                let proxy = containers.remove(1);
                pod["spec"]["initContainers"] = json!([Value::Null, proxy]);
            }
            assert_eq!(
                env(&mut pod, "TRELLIS_INBOUND_PLAINTEXT_PORTS").as_deref(),
                plaintext,
                "{name}"
            );
            assert_eq!(
                env(&mut pod, "TRELLIS_INBOUND_PORTS").as_deref(),
                Some(inbound),
                "{name}"
            );
            let got = env(&mut pod, "TRELLIS_APP_PROBES")
                .map(|json| serde_json::from_str::<Value>(&json).unwrap())
                .unwrap_or(Value::Null);
            assert_eq!(got, app_probes, "{name}");
            // Every rewritten probe points at the admin port, the others are as written.
            let app = &pod["spec"]["containers"][0];
            for (field, probe) in probes.as_object().unwrap() {
                let kind = field.trim_end_matches("Probe");
                if app_probes.get(format!("catalog/{kind}")).is_some() {
                    assert_eq!(
                        app[field],
                        json!({"httpGet": {"path": format!("/app-health/catalog/{kind}"),
                                           "port": 4191, "scheme": "HTTP"}}),
                        "{name}"
                    );
                } else {
                    assert_eq!(&app[field], probe, "{name}");
                }
            }
        }
    }

    // Without probes, the pod is the golden one minus its probes and the app probes.
    let (_, pod) = answer(&with_probes(json!({})), SidecarMode::Native);
    let mut want = read_json("expected/plain-pod.native.json");
    let app = want["spec"]["containers"][0].as_object_mut().unwrap();
    app.retain(|key, _| !key.ends_with("Probe"));
    proxy(&mut want)["env"]
        .as_array_mut()
        .unwrap()
        .retain(|e| e["name"] != "TRELLIS_APP_PROBES");
    assert_eq!(pod, Some(want));
}

#[test]
fn an_unresolvable_probe_port_denies_naming_the_container_and_probe() {
    let review = with_probes(json!({"readinessProbe": {"httpGet": {"port": "htp"}}}));
    let (response, pod) = answer(&review, SidecarMode::Native);
    assert_eq!(pod, None);
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 400);
    assert_eq!(
        response["status"]["message"],
        "trellis-injector: pod shop/catalog-6c9f7d8b5-*: container \"catalog\": readinessProbe \
         port \"htp\" is not a port name of the container (its port names: http); use one of its \
         port names or a number"
    );
}
