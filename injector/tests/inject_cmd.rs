//! `trellis-injector inject` through the real binary: every workload kind, standard input,
//! Lists, exit codes and messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use support::fixture_path;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn anchors(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("ca.pem");
    let ca =
        trellis_injector::cert::generate(&["ca".to_string()], std::time::SystemTime::now(), None)
            .unwrap();
    std::fs::write(&path, ca.ca_pem).unwrap();
    path
}

fn inject(args: &[&str], stdin: Option<&str>) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let anchors = anchors(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis-injector"))
        .arg("inject")
        .args(args)
        .arg("--trust-anchors-file")
        .arg(&anchors)
        .arg("--proxy-image")
        .arg("ghcr.io/trellis-mesh/trellis-proxy:test")
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn documents(output: &Output) -> Vec<Value> {
    let text = String::from_utf8(output.stdout.clone()).unwrap();
    serde_saphyr::from_multiple(&text).unwrap()
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|l| l.iter().map(|c| c["name"].as_str().unwrap()).collect())
        .unwrap_or_default()
}

fn workloads() -> String {
    fixture_path("inject/workloads.yaml").display().to_string()
}

#[test]
fn every_workload_kind() {
    let output = inject(&["-f", &workloads()], None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr,
        "Namespace shop: unchanged (no pod template)\n\
         Service shop/web: unchanged (no pod template)\n\
         Pod shop/debug: injected\n\
         Deployment shop/web: injected\n\
         StatefulSet shop/db: injected\n\
         DaemonSet shop/node-agent: skipped (uses hostNetwork)\n\
         ReplicaSet shop/legacy: skipped (opted out with trellis.dev/inject: disabled)\n\
         Job shop/report: injected\n\
         CronJob shop/nightly: injected\n\
         ConfigMap shop/settings: unchanged (no pod template)\n"
    );
    let docs = documents(&output);
    let input: Vec<Value> =
        serde_saphyr::from_multiple(&std::fs::read_to_string(workloads()).unwrap()).unwrap();
    assert_eq!(docs.len(), input.len());
    // Kinds without a pod template, and skipped templates, come out exactly as they went in.
    for i in [0, 1, 5, 6, 9] {
        assert_eq!(docs[i], input[i], "document {i}");
    }
    let injected = [
        ("Pod", ""),
        ("Deployment", "/spec/template"),
        ("StatefulSet", "/spec/template"),
        ("Job", "/spec/template"),
        ("CronJob", "/spec/jobTemplate/spec/template"),
    ];
    for (kind, path) in injected {
        let doc = docs.iter().find(|d| d["kind"] == kind).unwrap();
        let template = doc.pointer(path).unwrap();
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(annotations["trellis.dev/proxy-version"], VERSION, "{kind}");
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{kind}");
        let init = names(&template["spec"]["initContainers"]);
        assert_eq!(&init[..2], ["trellis-init", "trellis-proxy"], "{kind}");
        assert_eq!(
            names(&template["spec"]["volumes"]),
            [
                "trellis-identity-token",
                "trellis-secrets",
                "trellis-xtables-lock"
            ],
            "{kind}"
        );
        // The workload's own fields are untouched.
        let mut stripped = doc.clone();
        let mut original = input.iter().find(|d| d["kind"] == kind).unwrap().clone();
        for value in [&mut stripped, &mut original] {
            *value.pointer_mut(path).unwrap() = Value::Null;
        }
        assert_eq!(stripped, original, "{kind}");
    }
    let stateful = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    assert_eq!(
        names(&stateful["spec"]["template"]["spec"]["initContainers"]),
        ["trellis-init", "trellis-proxy", "init-schema"]
    );
    // Per-pod annotations of a template apply to its pods.
    let web = &docs[3]["spec"]["template"]["spec"];
    let env = &web["initContainers"][1]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "TRELLIS_LOG" && e["value"] == "debug")
    );
    // Its probe goes through the proxy's admin port, and its port stays mutual-TLS-only.
    let has = |name: &str| env.as_array().unwrap().iter().any(|e| e["name"] == name);
    assert!(has("TRELLIS_APP_PROBES") && !has("TRELLIS_INBOUND_PLAINTEXT_PORTS"));
    assert_eq!(
        web["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/app-health/web/readiness"
    );
    // The init container gets the pod's IPs, then the skipped ports.
    assert_eq!(
        web["initContainers"][0]["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIPs"
    );
    assert_eq!(web["initContainers"][0]["env"][1]["value"], "5432");
    // Strings that look like other YAML types stay strings.
    let text = String::from_utf8(output.stdout.clone()).unwrap();
    assert!(text.contains("prometheus.io/scrape: \"true\""), "{text}");
    assert!(text.contains("mode: \"on\""), "{text}");
}

#[test]
fn standard_input_lists_and_classic_mode() {
    let list = r#"{"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}, "spec": {"containers": [{"name": "app", "image": "x"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}, "spec": {}}
    ]}"#;
    let output = inject(&["-f", "-", "--sidecar-mode", "classic"], Some(list));
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let docs = documents(&output);
    assert_eq!(docs.len(), 1);
    let pod = &docs[0]["items"][0];
    assert_eq!(names(&pod["spec"]["containers"]), ["trellis-proxy", "app"]);
    assert_eq!(names(&pod["spec"]["initContainers"]), ["trellis-init"]);
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "app"
    );
    assert_eq!(docs[0]["items"][1]["kind"], "Service");
}

#[test]
fn injecting_the_output_again_changes_nothing() {
    let first = inject(&["-f", &workloads()], None);
    let text = String::from_utf8(first.stdout).unwrap();
    let second = inject(&["-f", "-"], Some(&text));
    assert_eq!(second.status.code(), Some(0));
    assert_eq!(String::from_utf8(second.stdout).unwrap(), text);
    assert!(
        String::from_utf8_lossy(&second.stderr)
            .contains("Deployment shop/web: unchanged (already injected)")
    );
}

#[test]
fn refusals_and_unreadable_input() {
    let bad = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  template:\n    metadata:\n      annotations: {trellis.dev/proxy-memory-limit: lots}\n    spec:\n      containers: [{name: web, image: x}]\n";
    let output = inject(&["-f", "-"], Some(bad));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        output.stdout.is_empty(),
        "nothing is printed when an object is refused"
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "error: Deployment shop/web: annotation trellis.dev/proxy-memory-limit: \"lots\" is not a \
         Kubernetes quantity (examples: 100m, 0.5, 64Mi, 1Gi, 500M)\n"
    );

    let no_template = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {}\n";
    let output = inject(&["-f", "-"], Some(no_template));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("Deployment web: the object is not a pod: it has no /spec/template")
    );

    let output = inject(&["-f", "-"], Some("kind: [unclosed\n"));
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).starts_with("error: cannot read the manifest:")
    );

    let output = inject(&["-f", "/nonexistent/manifest.yaml"], None);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .starts_with("error: cannot read /nonexistent/manifest.yaml:")
    );
}

#[test]
fn bad_settings_are_reported_before_reading_anything() {
    let output = inject(&["-f", "-", "--proxy-memory-limit", "128m"], Some(""));
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "error: --proxy-memory-limit: \"128m\" is not a whole number of bytes; did you mean 128Mi?\n"
    );
}
