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

const KEEP: ProbeMode = ProbeMode {
    rewrite: false,
    native_sidecars: true,
};
const NATIVE: ProbeMode = ProbeMode {
    rewrite: true,
    native_sidecars: true,
};
const CLASSIC: ProbeMode = ProbeMode {
    rewrite: true,
    native_sidecars: false,
};

/// The plaintext list with probes kept as written (`trellis.dev/rewrite-probes: disabled`).
fn plaintext(spec_json: Value, annotation: &str) -> Result<String, String> {
    let annotation = PortList::parse(annotation).unwrap();
    plan(&spec(spec_json), KEEP)
        .map(|plan| plaintext_ports(&plan.plaintext_ports, Some(&annotation)).to_string())
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
    let plan = plan(&spec(app(json!({"startupProbe": grpc(9090)}))), KEEP).unwrap();
    assert_eq!(
        plaintext_ports(&plan.plaintext_ports, None).to_string(),
        "9090"
    );
    assert!(plan.rewrites.is_empty() && plan.app_probes.is_empty());
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
        assert_eq!(plaintext(spec_json.clone(), ""), Err(want.to_string()));
        // Rewriting needs the same ports resolved.
        let rewritten = plan(&spec(spec_json), NATIVE).map_err(|e| e.to_string());
        assert_eq!(rewritten.map(drop), Err(want.to_string()));
    }
}

#[test]
fn http_tcp_and_grpc_probes_go_through_the_proxy() {
    let spec = spec(json!({
        "initContainers": [
            {"name": "migrate", "readinessProbe": {"tcpSocket": {"port": 1111}}},
            {"name": "agent", "restartPolicy": "Always", "ports": [{"name": "admin", "containerPort": 7070}],
             "startupProbe": {"httpGet": {"port": "admin"}}},
        ],
        "containers": [{
            "name": "app",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "ready?full=1", "port": "http", "host": "app.local",
                               "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]}},
            "livenessProbe": {"tcpSocket": {"port": "http"}},
            "startupProbe": {"grpc": {"port": 9090, "service": "app.Health"}},
        }, {
            "name": "tls",
            "readinessProbe": {"httpGet": {"port": 8443, "scheme": "HTTPS"}},
            "livenessProbe": {"tcpSocket": {"port": 8444, "host": "10.0.0.1"}},
            "startupProbe": {"exec": {"command": ["true"]}},
        }],
    }));
    let native = plan(&spec, NATIVE).unwrap();
    let json = serde_json::to_value(&native.app_probes).unwrap();
    assert_eq!(
        json,
        json!({
            "agent/startup": {"kind": "http", "port": 7070, "path": "/"},
            "app/readiness": {"kind": "http", "port": 8080, "path": "/ready?full=1", "host": "app.local",
                              "headers": [{"name": "X-Probe", "value": "kubelet"}]},
            "app/liveness": {"kind": "tcp", "port": 8080},
            "app/startup": {"kind": "grpc", "port": 9090, "service": "app.Health"},
        })
    );
    let rewrites: Vec<(&str, usize, &str, &str, &str)> = native
        .rewrites
        .iter()
        .map(|r| (r.list.field(), r.index, r.field, r.handler, r.path.as_str()))
        .collect();
    assert_eq!(
        rewrites,
        [
            (
                "containers",
                0,
                "readinessProbe",
                "httpGet",
                "/app-health/app/readiness"
            ),
            (
                "containers",
                0,
                "livenessProbe",
                "tcpSocket",
                "/app-health/app/liveness"
            ),
            (
                "containers",
                0,
                "startupProbe",
                "grpc",
                "/app-health/app/startup"
            ),
            (
                "initContainers",
                1,
                "startupProbe",
                "httpGet",
                "/app-health/agent/startup"
            ),
        ]
    );
    // HTTPS and a TCP probe of another host stay as written, their ports in plaintext.
    assert_eq!(native.plaintext_ports, [8443, 8444]);

    // Classic mode: the proxy starts after every init container, so a native sidecar's probe
    // stays direct.
    let classic = plan(&spec, CLASSIC).unwrap();
    assert!(!classic.app_probes.contains_key("agent/startup"));
    assert_eq!(classic.rewrites.len(), 3);
    assert_eq!(classic.plaintext_ports, [8443, 8444, 7070]);

    // Disabled: nothing rewritten, every probe port in plaintext.
    let kept = plan(&spec, KEEP).unwrap();
    assert!(kept.rewrites.is_empty() && kept.app_probes.is_empty());
    assert_eq!(
        plaintext_ports(&kept.plaintext_ports, None).to_string(),
        "7070,8080,8443,8444,9090"
    );
}

#[test]
fn inbound_ports_are_the_declared_tcp_ports() {
    let inbound = |spec_json: Value, annotation: &str, plaintext: &str| {
        let annotation = PortList::parse(annotation).unwrap();
        let annotation = (!annotation.is_empty()).then_some(annotation);
        let plaintext = PortList::parse(plaintext).unwrap();
        inbound_ports(&spec(spec_json), annotation.as_ref(), &plaintext).map(|l| l.to_string())
    };
    let ports = |ports: Value| json!({"containers": [{"name": "app", "ports": ports}]});
    let cases = [
        (
            "nothing declared: any port",
            json!({"containers": [{"name": "app"}]}),
            "",
            "",
            None,
        ),
        (
            "nothing declared, plaintext alone does not restrict",
            json!({"containers": [{"name": "app"}]}),
            "",
            "8443",
            None,
        ),
        (
            "TCP and unspecified protocols, not UDP",
            ports(json!([
                {"containerPort": 8080},
                {"containerPort": 9090, "protocol": "TCP"},
                {"containerPort": 53, "protocol": "UDP"},
            ])),
            "",
            "",
            Some("8080,9090"),
        ),
        (
            "the annotation alone",
            json!({"containers": [{"name": "app"}]}),
            "9000-9100, 80",
            "",
            Some("80,9000-9100"),
        ),
        (
            "ports, annotation and plaintext ports, merged",
            ports(json!([{"containerPort": 8080}])),
            "8081",
            "8443,15000-15010",
            Some("8080,8081,8443,15000-15010"),
        ),
        (
            "native sidecars count, other init containers and the proxy do not",
            json!({
                "initContainers": [
                    {"name": "migrate", "ports": [{"containerPort": 1111}]},
                    {"name": "agent", "restartPolicy": "Always", "ports": [{"containerPort": 2222}]},
                    {"name": "trellis-proxy", "restartPolicy": "Always", "ports": [{"containerPort": 4191}]},
                ],
                "containers": [{"name": "app", "ports": [{"containerPort": 80}]}],
            }),
            "",
            "",
            Some("80,2222"),
        ),
    ];
    for (name, spec_json, annotation, plaintext, want) in cases {
        assert_eq!(
            inbound(spec_json, annotation, plaintext).as_deref(),
            want,
            "{name}"
        );
    }
}
