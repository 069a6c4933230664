use serde_json::{Value, json};

use super::*;

fn spec(value: Value) -> PodSpec {
    serde_json::from_value(value).unwrap()
}

/// One app container `app` with a port named `http` (8080) and `probes` merged in.
fn app(probes: Value) -> Value {
    let mut container = json!({
        "name": "app",
        "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9000}],
    });
    if let (Some(c), Some(p)) = (container.as_object_mut(), probes.as_object()) {
        c.extend(p.clone());
    }
    json!({"containers": [container]})
}

fn plaintext(spec_json: Value, annotation: &str) -> Result<String, String> {
    let annotation = PortList::parse(annotation).unwrap();
    inbound_plaintext_ports(&spec(spec_json), Some(&annotation))
        .map(|list| list.to_string())
        .map_err(|e| e.to_string())
}

#[test]
fn probe_ports_and_the_annotation_make_one_sorted_list() {
    let http = |port: Value| json!({"httpGet": {"path": "/ready", "port": port}});
    let tcp = |port: Value| json!({"tcpSocket": {"port": port}});
    let grpc = |port: i32| json!({"grpc": {"port": port}});
    let cases = [
        ("no probes", app(json!({})), "", ""),
        (
            "exec probes need no port",
            app(json!({"livenessProbe": {"exec": {"command": ["true"]}}})),
            "",
            "",
        ),
        (
            "numeric httpGet",
            app(json!({"readinessProbe": http(json!(8081))})),
            "",
            "8081",
        ),
        (
            "named httpGet",
            app(json!({"readinessProbe": http(json!("http"))})),
            "",
            "8080",
        ),
        (
            "numeric tcpSocket",
            app(json!({"livenessProbe": tcp(json!(9000))})),
            "",
            "9000",
        ),
        (
            "named tcpSocket",
            app(json!({"livenessProbe": tcp(json!("http"))})),
            "",
            "8080",
        ),
        ("grpc", app(json!({"startupProbe": grpc(9090)})), "", "9090"),
        (
            "every probe kind, one port named and numbered: de-duplicated and sorted",
            app(json!({
                "livenessProbe": tcp(json!(8080)),
                "readinessProbe": http(json!("http")),
                "startupProbe": grpc(7070),
            })),
            "",
            "7070,8080",
        ),
        (
            "native sidecars count, other init containers and the proxy do not",
            json!({
                "initContainers": [
                    {"name": "migrate", "readinessProbe": tcp(json!(1111))},
                    {"name": "log-shipper", "restartPolicy": "Always", "startupProbe": grpc(2222)},
                    {"name": "trellis-proxy", "restartPolicy": "Always", "readinessProbe": http(json!(4191))},
                ],
                "containers": [
                    {"name": "web", "readinessProbe": http(json!(80))},
                    {"name": "worker", "ports": [{"name": "metrics", "containerPort": 9102}],
                     "livenessProbe": http(json!("metrics"))},
                ],
            }),
            "",
            "80,2222,9102",
        ),
        (
            "annotation alone",
            app(json!({})),
            " 443, 15000-15010 ",
            "443,15000-15010",
        ),
        (
            "annotation and probes",
            app(json!({"readinessProbe": http(json!("http"))})),
            "15000-15010,443",
            "443,8080,15000-15010",
        ),
        (
            "a probe port inside an annotation range",
            app(json!({"readinessProbe": http(json!("http"))})),
            "8000-8100",
            "8000-8100",
        ),
        (
            "overlapping annotation ranges",
            app(json!({})),
            "9050-9200,9000-9100,9000",
            "9000-9200",
        ),
    ];
    for (name, spec_json, annotation, want) in cases {
        assert_eq!(
            plaintext(spec_json, annotation).as_deref(),
            Ok(want),
            "{name}"
        );
    }
    // Without the annotation at all.
    let ports = inbound_plaintext_ports(&spec(app(json!({"startupProbe": grpc(9090)}))), None);
    assert_eq!(ports.map(|l| l.to_string()).as_deref(), Ok("9090"));
}

#[test]
fn unresolvable_probe_ports_name_the_container_and_probe() {
    let http = |port: Value| json!({"httpGet": {"port": port}});
    let cases = [
        (
            app(json!({"readinessProbe": http(json!("htp"))})),
            "container \"app\": readinessProbe port \"htp\" is not a port name of the container \
             (its port names: http); use one of its port names or a number",
        ),
        (
            json!({"containers": [{"name": "app", "livenessProbe": {"tcpSocket": {"port": "http"}}}]}),
            "container \"app\": livenessProbe port \"http\" is not a port name of the container \
             (it has no named ports); use one of its port names or a number",
        ),
        (
            app(json!({"startupProbe": http(json!("8080"))})),
            "container \"app\": startupProbe port \"8080\" is not a port name of the container \
             (its port names: http); write the number without quotes, port: 8080",
        ),
        (
            app(json!({"readinessProbe": http(json!(70000))})),
            "container \"app\": readinessProbe port 70000 is not a valid port (use 1-65535)",
        ),
        (
            app(json!({"readinessProbe": {"grpc": {"port": 0}}})),
            "container \"app\": readinessProbe port 0 is not a valid port (use 1-65535)",
        ),
        // Every bad probe at once.
        (
            json!({
                "initContainers": [{"name": "agent", "restartPolicy": "Always",
                                    "startupProbe": http(json!("admin"))}],
                "containers": [{"name": "app", "livenessProbe": http(json!("live"))}],
            }),
            "container \"app\": livenessProbe port \"live\" is not a port name of the container \
             (it has no named ports); use one of its port names or a number; init container \
             \"agent\": startupProbe port \"admin\" is not a port name of the container (it has \
             no named ports); use one of its port names or a number",
        ),
    ];
    for (spec_json, want) in cases {
        assert_eq!(plaintext(spec_json, ""), Err(want.to_string()));
    }
}
