//! `check` and `explain` as a user runs them: the real binary, real files, exit codes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-controller");

fn examples() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mesh"))
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_passes_on_the_examples_in_both_formats() {
    let dir = examples().to_str().unwrap();
    let yaml = run(&["check", "--manifests", dir]);
    assert_eq!(yaml.status.code(), Some(0), "{}", stderr(&yaml));
    assert!(
        stdout(&yaml).contains("reason: Accepted"),
        "{}",
        stdout(&yaml)
    );
    let json = run(&["check", "--manifests", dir, "-o", "json"]);
    assert_eq!(json.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let route = &doc["routes"][0];
    assert_eq!(route["name"], "catalog-canary");
    assert_eq!(
        route["parents"][0]["controllerName"],
        "trellis.dev/controller"
    );
    assert_eq!(route["parents"][0]["conditions"][0]["status"], "True");
}

#[test]
fn check_exits_1_for_an_invalid_regex_and_a_missing_service() {
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: catalog}]
  rules:
    - matches: [{path: {type: RegularExpression, value: "/items/(["}}]
      backendRefs: [{name: catalog-v1, port: 80}]
    - backendRefs: [{name: catalog-v3, port: 80}]
"#;
    let dir = dir_with(&[("broken.yaml", route)]);
    let out = run(&[
        "check",
        "--manifests",
        dir.path().to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let broken = doc["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "broken")
        .unwrap();
    let conditions = broken["parents"][0]["conditions"].as_array().unwrap();
    let by_type = |t: &str| conditions.iter().find(|c| c["type"] == t).unwrap().clone();
    assert_eq!(by_type("ResolvedRefs")["reason"], "BackendNotFound");
    assert!(
        by_type("ResolvedRefs")["message"]
            .as_str()
            .unwrap()
            .contains("shop/catalog-v3")
    );
    assert_eq!(by_type("PartiallyInvalid")["status"], "True");
    assert!(
        by_type("PartiallyInvalid")["message"]
            .as_str()
            .unwrap()
            .contains("regular expression")
    );
}

#[test]
fn unreadable_input_exits_2_naming_the_file_and_object() {
    let bad = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: typo, namespace: shop}\nspec:\n  rules:\n    - matches: [{method: FETCH}]\n";
    let dir = dir_with(&[("typo.yaml", bad)]);
    let out = run(&["check", "--manifests", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("typo.yaml") && err.contains("HTTPRoute shop/typo"),
        "{err}"
    );
    let out = run(&[
        "explain",
        "--manifests",
        dir.path().to_str().unwrap(),
        "--from",
        "shop",
        "--to",
        "catalog",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["check", "--manifests", "/nonexistent/trellis"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/trellis"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn explain_prints_route_rule_backends_and_redirects() {
    let dir = examples().to_str().unwrap();
    let out = run(&[
        "explain",
        "--manifests",
        dir,
        "--from",
        "shop",
        "--to",
        "catalog.shop.svc.cluster.local:80",
        "--path",
        "/items",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["destination"]["service"]["name"], "catalog");
    assert_eq!(e["route"]["name"], "catalog-canary");
    assert_eq!(e["rule"]["index"], 1);
    assert_eq!(e["answer"]["type"], "forward");
    assert_eq!(e["request"]["headers"]["x-mesh-route"][0], "catalog-canary");
    let weights: Vec<(String, f64)> = e["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["service"]["name"].as_str().unwrap().to_string(),
                b["share"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        weights,
        [
            ("catalog-v1".to_string(), 0.8),
            ("catalog-v2".to_string(), 0.2)
        ]
    );
    assert_eq!(e["filters"][1]["type"], "request_mirror");

    let out = run(&[
        "explain",
        "--manifests",
        dir,
        "--from",
        "shop",
        "--to",
        "catalog",
        "--path",
        "/v0/list?page=2",
    ]);
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        e["answer"],
        serde_json::json!({"type": "redirect", "status": 301, "location": "http://catalog/v1/list?page=2"})
    );

    let out = run(&[
        "explain",
        "--manifests",
        dir,
        "--from",
        "shop",
        "--to",
        "catalog",
        "-H",
        "X-Canary: always",
    ]);
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["backends"][0]["service"]["name"], "catalog-v2");
    assert_eq!(
        e["backends"][0]["endpoints"][0]["identity"],
        "spiffe://cluster.local/ns/shop/sa/catalog"
    );

    // A pod IP is unrouted; a bad header argument is a usage error.
    let out = run(&[
        "explain",
        "--manifests",
        dir,
        "--from",
        "shop",
        "--to",
        "127.0.10.20:8080",
    ]);
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["routing"], "unrouted");
    let out = run(&[
        "explain",
        "--manifests",
        dir,
        "--from",
        "shop",
        "--to",
        "catalog",
        "-H",
        "no-colon",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("Name: value"));
}
