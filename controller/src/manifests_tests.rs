use std::fs;

use super::*;

const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

const ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
  namespace: shop
spec:
  parentRefs:
  - {group: '', kind: Service, name: web, port: 80}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
    backendRefs:
    - {name: web, port: 80}
";

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(path, text).unwrap();
    }
    dir
}

fn load_err(files: &[(&str, &str)]) -> String {
    let dir = dir_with(files);
    let err = load_dir(dir.path())
        .expect_err("load should fail")
        .to_string();
    // Messages name the file by its path; strip the temporary directory to compare.
    err.replace(&format!("{}/", dir.path().display()), "")
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("?"),
        meta.name.as_deref().unwrap_or("?")
    )
}

#[test]
fn reads_every_manifest_file_in_name_order() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop}\n";
    let slice = r#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "shop"}, "addressType": "IPv4", "endpoints": []}"#;
    let other_service = SERVICE.replace("name: web", "name: api");
    let dir = dir_with(&[
        ("b.yaml", &format!("{SERVICE}---\n{ROUTE}")),
        ("a.yml", &format!("{other_service}---\n{pod}")),
        ("c.json", slice),
        (".hidden.yaml", "not: [valid"),
        ("notes.txt", "not: [valid"),
        ("sub/d.yaml", "not: [valid"),
    ]);
    let objects = load_dir(dir.path()).unwrap();
    let services: Vec<_> = objects
        .services
        .iter()
        .map(|s| name_of(&s.metadata))
        .collect();
    assert_eq!(
        services,
        ["shop/api", "shop/web"],
        "a.yml is read before b.yaml"
    );
    assert_eq!(objects.pods.len(), 1);
    assert_eq!(objects.endpoint_slices.len(), 1);
    assert_eq!(objects.http_routes.len(), 1);
    assert_eq!(name_of(&objects.http_routes[0].metadata), "shop/web");
    assert!(objects.grpc_routes.is_empty());
}

#[test]
fn unwraps_lists() {
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}\n",
        serde_json::to_string(&serde_saphyr::from_str::<Value>(SERVICE).unwrap()).unwrap(),
        serde_json::to_string(&serde_saphyr::from_str::<Value>(ROUTE).unwrap()).unwrap(),
    );
    let dir = dir_with(&[("list.yaml", &list)]);
    let objects = load_dir(dir.path()).unwrap();
    assert_eq!(objects.services.len(), 1);
    assert_eq!(objects.http_routes.len(), 1);
}

#[test]
fn skips_other_kinds_and_empty_documents() {
    let text = format!(
        "---\n# nothing here\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec: {{}}\n---\n\
         apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {{name: web}}\n---\n\
         ---\n{SERVICE}---\n"
    );
    let dir = dir_with(&[
        ("all.yaml", &text),
        ("empty.yaml", ""),
        ("empty.json", "null"),
    ]);
    let objects = load_dir(dir.path()).unwrap();
    assert_eq!(objects.services.len(), 1, "only the core Service is read");
}

#[test]
fn namespace_defaults_and_older_route_versions_are_read() {
    let text = ROUTE.replace("  namespace: shop\n", "").replace(
        "gateway.networking.k8s.io/v1",
        "gateway.networking.k8s.io/v1beta1",
    );
    let grpc = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: GRPCRoute\n\
                metadata: {name: rpc}\nspec: {}\n";
    let dir = dir_with(&[("r.yaml", &format!("{text}---\n{grpc}"))]);
    let objects = load_dir(dir.path()).unwrap();
    assert_eq!(name_of(&objects.http_routes[0].metadata), "default/web");
    assert_eq!(name_of(&objects.grpc_routes[0].metadata), "default/rpc");
}

#[test]
fn invalid_objects_name_file_document_and_object() {
    let bad = ROUTE.replace("PathPrefix", "FOO");
    let err = load_err(&[("routes.yaml", &format!("{SERVICE}---\n{bad}"))]);
    assert!(
        err.starts_with("routes.yaml:13: document 2 (HTTPRoute shop/web): unknown variant `FOO`, expected one of"),
        "{err}"
    );
}

#[test]
fn list_items_are_named_by_position() {
    let list = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}}\n\
                - {apiVersion: v1, kind: Service, metadata: {name: b}, spec: {ports: 80}}\n";
    let err = load_err(&[("list.yaml", list)]);
    assert!(
        err.starts_with("list.yaml:1: document 1, item 2 (Service default/b): invalid type"),
        "{err}"
    );
}

#[test]
fn syntax_errors_name_file_and_line() {
    let err = load_err(&[
        ("a.yaml", SERVICE),
        (
            "b.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [x\n",
        ),
    ]);
    assert_eq!(err, "b.yaml:3: unclosed bracket '[' at line 3, column 18");

    let err = load_err(&[("c.json", "{\"apiVersion\": \"v1\",\n \"kind\": }")]);
    assert_eq!(err, "c.json:2: expected value at line 2 column 10");
}

#[test]
fn documents_that_are_not_objects_are_errors() {
    let cases = [
        (
            "- a\n- b\n",
            "x.yaml:1: document 1: expected a Kubernetes object (a mapping with apiVersion and kind)",
        ),
        (
            "metadata: {name: a}\n",
            "x.yaml:1: document 1: expected a Kubernetes object: apiVersion and kind must be set",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: a}\n",
            "x.yaml:1: document 1 (Service): metadata.name must be set",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: [a]\n",
            "x.yaml:1: document 1 (Service): metadata must be a mapping",
        ),
        (
            "apiVersion: v1\nkind: List\nitems: {a: b}\n",
            "x.yaml:1: document 1 (List): items must be a list",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(load_err(&[("x.yaml", text)]), want, "{text}");
    }
}

#[test]
fn duplicates_name_both_places() {
    let err = load_err(&[
        ("a.yaml", SERVICE),
        ("b.yaml", &format!("{ROUTE}---\n{SERVICE}")),
    ]);
    assert_eq!(
        err,
        "Service shop/web is defined twice: a.yaml (document 1) and b.yaml (document 2)"
    );
    // Same name, different kind or namespace: not a duplicate.
    let dir = dir_with(&[
        ("a.yaml", SERVICE),
        (
            "b.yaml",
            &format!("{ROUTE}---\n{}", SERVICE.replace("shop", "other")),
        ),
    ]);
    assert!(load_dir(dir.path()).is_ok());
}

#[test]
fn a_missing_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = load_dir(&missing).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "cannot read manifest directory {}: ",
            missing.display()
        )),
        "{err}"
    );
}

#[test]
fn fingerprint_changes_with_the_files_that_are_read() {
    let dir = dir_with(&[("a.yaml", SERVICE)]);
    let before = fingerprint(dir.path()).unwrap();
    fs::write(dir.path().join("notes.txt"), "x").unwrap();
    fs::write(dir.path().join(".a.yaml.swp"), "x").unwrap();
    assert_eq!(
        fingerprint(dir.path()).unwrap(),
        before,
        "ignored files do not count"
    );
    fs::write(dir.path().join("a.yaml"), format!("{SERVICE}\n")).unwrap();
    let edited = fingerprint(dir.path()).unwrap();
    assert_ne!(edited, before);
    fs::write(dir.path().join("b.yaml"), "").unwrap();
    assert_ne!(fingerprint(dir.path()).unwrap(), edited);
}

#[test]
fn services_without_a_cluster_ip_get_a_stable_one() {
    let svc = |ns: &str, name: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports: [{{port: 80}}]\n{extra}---\n"
        )
    };
    let files = [
        ("a.yaml", svc("shop", "catalog", "")),
        (
            "b.yaml",
            svc("shop", "fixed", "  clusterIP: 10.96.178.161\n"),
        ),
        ("c.yaml", svc("shop", "headless", "  clusterIP: None\n")),
        (
            "d.yaml",
            svc(
                "shop",
                "ext",
                "  type: ExternalName\n  externalName: example.com\n",
            ),
        ),
        ("e.yaml", svc("shop", "audit", "")),
    ];
    let ips = |order: &[usize]| {
        let files: Vec<(String, &str)> = order
            .iter()
            .enumerate()
            .map(|(i, &f)| (format!("{i}.yaml"), files[f].1.as_str()))
            .collect();
        let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let dir = dir_with(&files);
        let mut ips: Vec<(String, Option<String>, Option<Vec<String>>)> = load_dir(dir.path())
            .unwrap()
            .services
            .into_iter()
            .map(|s| {
                let spec = s.spec.unwrap();
                (s.metadata.name.unwrap(), spec.cluster_ip, spec.cluster_ips)
            })
            .collect();
        ips.sort();
        ips
    };
    let got = ips(&[0, 1, 2, 3, 4]);
    let ip_of = |name: &str| got.iter().find(|(n, ..)| n == name).unwrap().1.clone();
    // shop/catalog hashes to 10.96.178.161, which shop/fixed wrote: the next address is used.
    assert_eq!(ip_of("fixed").as_deref(), Some("10.96.178.161"));
    assert_eq!(ip_of("catalog").as_deref(), Some("10.96.178.162"));
    assert_eq!(ip_of("headless").as_deref(), Some("None"));
    assert_eq!(ip_of("ext"), None);
    let audit = ip_of("audit").unwrap();
    assert!(audit.starts_with("10.96."), "{audit}");
    let (_, _, ips_of_audit) = got.iter().find(|(n, ..)| n == "audit").unwrap();
    assert_eq!(ips_of_audit.as_deref(), Some(&[audit.clone()][..]));
    assert_eq!(ips(&[4, 3, 2, 1, 0]), got, "file order does not matter");
}
