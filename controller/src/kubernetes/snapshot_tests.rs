//! `check --kubernetes` and `explain --kubernetes` against kube's real client and a scripted API
//! server: the objects of a manifest directory, served by the API as it serves them (paged,
//! with the metadata it adds), give the same `check` and `explain` output as the directory.

use std::path::Path;

use serde_json::{Value, json};

use super::fake_api::*;
use super::snapshot::{self, SnapshotError};
use super::watch::Kind;
use super::watch_tests::{GRPC_ROUTES, HTTP_ROUTES, PODS, SERVICES, SLICES};
use crate::check::{self, Format};
use crate::explain;
use crate::index::Config;
use crate::manifests;
use crate::objects::Objects;

const GRPC_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: audit-writes, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: audit, port: 80}]
  rules:
  - matches: [{method: {service: audit.Log, method: Write}}]
    backendRefs: [{name: audit, port: 80}]
  - matches: [{method: {service: audit.Log, method: Read}}]
    backendRefs: [{name: missing, port: 80}]
";

/// `examples/mesh`, plus a GRPCRoute when `grpc`, in a directory of its own.
fn manifest_dir(grpc: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    if grpc {
        std::fs::write(dir.path().join("grpc.yaml"), GRPC_ROUTE).unwrap();
    }
    dir
}

/// An object as the API server lists it: with the metadata it adds (which the model must not
/// see), and without `apiVersion`/`kind` for the core kinds.
fn as_served<K: serde::Serialize>(object: &K, n: usize, core: bool) -> Value {
    let mut v = serde_json::to_value(object).unwrap();
    let map = v.as_object_mut().unwrap();
    if core {
        map.remove("apiVersion");
        map.remove("kind");
    }
    let meta = map.get_mut("metadata").unwrap().as_object_mut().unwrap();
    meta.insert("resourceVersion".into(), json!(format!("{}", 100 + n)));
    meta.insert("uid".into(), json!(format!("uid-{n}")));
    meta.insert(
        "managedFields".into(),
        json!([{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]),
    );
    let annotations = meta
        .entry("annotations")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .unwrap();
    annotations.insert(
        "kubectl.kubernetes.io/last-applied-configuration".into(),
        json!("{\"big\": true}"),
    );
    v
}

fn served<K: serde::Serialize>(objects: &[K], core: bool) -> Vec<Value> {
    objects
        .iter()
        .enumerate()
        .map(|(n, o)| as_served(o, n, core))
        .collect()
}

/// Serves `objects` on the fake API, each kind in one page; the GRPCRoute kind not at all
/// unless `grpc`.
fn serve(api: &FakeApi, objects: &Objects, grpc: bool) {
    api.always_list(
        SERVICES,
        list("Service", "v1", "900", served(&objects.services, true)),
    );
    api.always_list(
        SLICES,
        list(
            "EndpointSlice",
            "discovery.k8s.io/v1",
            "900",
            served(&objects.endpoint_slices, false),
        ),
    );
    api.always_list(PODS, list("Pod", "v1", "900", served(&objects.pods, true)));
    api.always_list(
        HTTP_ROUTES,
        list(
            "HTTPRoute",
            "gateway.networking.k8s.io/v1",
            "900",
            served(&objects.http_routes, false),
        ),
    );
    let grpc_routes = if grpc {
        list(
            "GRPCRoute",
            "gateway.networking.k8s.io/v1",
            "900",
            served(&objects.grpc_routes, false),
        )
    } else {
        no_such_resource()
    };
    api.always_list(GRPC_ROUTES, grpc_routes);
}

fn config() -> Config {
    Config {
        trust_domain: "cluster.local".to_string(),
        cluster_domain: "cluster.local".to_string(),
    }
}

/// The next list of Services in two pages.
fn page_services(api: &FakeApi, objects: &Objects) {
    let services = served(&objects.services, true);
    let (first, second) = services.split_at(services.len() / 2);
    let mut page = list("Service", "v1", "900", first.to_vec());
    if let Reply::Json(_, body) = &mut page {
        body["metadata"]["continue"] = json!("next-page");
    }
    api.lists(
        SERVICES,
        vec![page, list("Service", "v1", "900", second.to_vec())],
    );
}

/// `explain`'s flags for a request from `web` to the catalog.
fn explain_args(source: &[&str], extra: &[&str]) -> explain::Args {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: explain::Args,
    }
    use clap::Parser as _;
    let argv = ["explain", "--from", "web", "--to", "catalog.shop"]
        .into_iter()
        .chain(source.iter().copied())
        .chain(extra.iter().copied());
    Cli::try_parse_from(argv).unwrap().args
}

/// The requests both sources must explain alike.
const REQUESTS: &[&[&str]] = &[
    &["--path", "/items"],
    &["--path", "/items", "-H", "x-canary: always"],
    &["--path", "/v0/items?id=3"],
];

#[tokio::test]
async fn the_cluster_and_the_directory_give_the_same_answers() {
    let dir = manifest_dir(true);
    let from_dir = manifests::load_dir(dir.path()).unwrap();
    assert_eq!(from_dir.grpc_routes.len(), 1);
    let (client, api) = FakeApi::start();
    serve(&api, &from_dir, true);
    page_services(&api, &from_dir);

    let snapshot = snapshot::take(&client).await.unwrap();
    assert!(snapshot.missing.is_empty());
    let from_api = snapshot.objects;
    assert_eq!(from_api.services.len(), from_dir.services.len());
    // The second page was asked for with the first one's token.
    let pages = api.seen_at(&http::Method::GET, SERVICES);
    assert_eq!(pages.len(), 2, "{:?}", api.summary());
    assert!(pages[0].query.contains("limit=500"), "{}", pages[0].query);
    assert!(
        pages[1].query.contains("continue=next-page"),
        "{}",
        pages[1].query
    );
    // What the API server adds is gone, as in the watches.
    assert!(
        from_api
            .services
            .iter()
            .all(|s| s.metadata.managed_fields.is_none() && s.metadata.uid.is_none())
    );
    serve(&api, &from_dir, true);

    for format in [Format::Yaml, Format::Json] {
        let want = check::outcome(Ok(from_dir.clone()), &config(), format);
        let got = check::outcome(Ok(from_api.clone()), &config(), format);
        assert_eq!(got, want);
        // The GRPCRoute's missing backend makes the check fail, with its reason shown.
        assert_eq!(got.code, check::UNHEALTHY);
        assert!(got.stdout.contains("audit-writes"), "{}", got.stdout);
        assert!(got.stdout.contains("BackendNotFound"), "{}", got.stdout);
    }

    let dir_arg = dir.path().to_str().unwrap();
    for extra in REQUESTS {
        let want = explain::run_with(explain_args(&["--manifests", dir_arg], extra), None)
            .await
            .unwrap();
        let got = explain::run_with(explain_args(&["--kubernetes"], extra), Some(client.clone()))
            .await
            .unwrap();
        assert_eq!(got, want, "{extra:?}");
    }
    // Different requests get different answers: the comparison above is not vacuous.
    let canary = explain::run_with(explain_args(&["--kubernetes"], REQUESTS[1]), Some(client))
        .await
        .unwrap();
    assert!(canary.contains("catalog-v2"), "{canary}");
    assert!(!canary.contains("catalog-v1"), "{canary}");
}

#[tokio::test]
async fn a_missing_grpcroute_crd_reads_as_no_grpcroutes() {
    let dir = manifest_dir(false);
    let from_dir = manifests::load_dir(dir.path()).unwrap();
    let (client, api) = FakeApi::start();
    serve(&api, &from_dir, false);

    let snapshot = snapshot::take(&client).await.unwrap();
    assert_eq!(snapshot.missing, vec![Kind::GrpcRoute]);
    assert!(snapshot.objects.grpc_routes.is_empty());
    assert_eq!(snapshot.objects.http_routes.len(), 1);
    let want = check::outcome(Ok(from_dir.clone()), &config(), Format::Yaml);
    let got = check::outcome(Ok(snapshot.objects), &config(), Format::Yaml);
    assert_eq!(got, want);
    assert_eq!(got.code, check::HEALTHY, "{}", got.stdout);

    // A core kind that is not served is no such excuse.
    let (client, api) = FakeApi::start();
    serve(&api, &from_dir, true);
    api.always_list(PODS, no_such_resource());
    let e = snapshot::take(&client).await.unwrap_err();
    assert!(
        matches!(
            e,
            SnapshotError::Api {
                kind: Kind::Pod,
                code: 404,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_forbidden_list_is_a_clear_error_and_exit_code_2() {
    let (client, api) = FakeApi::start();
    serve(&api, &Objects::default(), true);
    api.always_list(
        SLICES,
        failure(
            403,
            "Forbidden",
            "endpointslices.discovery.k8s.io is forbidden: User \"alice\" cannot list resource \
             \"endpointslices\" in API group \"discovery.k8s.io\" at the cluster scope",
        ),
    );
    let e = snapshot::take(&client).await.unwrap_err();
    assert!(
        matches!(
            e,
            SnapshotError::Forbidden {
                kind: Kind::EndpointSlice,
                ..
            }
        ),
        "{e:?}"
    );
    let outcome = check::outcome(crate::source::list(&client).await, &config(), Format::Yaml);
    assert_eq!(outcome.code, check::UNREADABLE);
    assert_eq!(outcome.stdout, "");
    assert!(
        outcome.stderr.starts_with(
            "error: cannot list EndpointSlices: forbidden; the caller needs `list` on \
             endpointslices.discovery.k8s.io"
        ),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("User \"alice\" cannot list"),
        "{}",
        outcome.stderr
    );

    let e = explain::run_with(explain_args(&["--kubernetes"], &[]), Some(client))
        .await
        .unwrap_err();
    assert!(e.contains("cannot list EndpointSlices: forbidden"), "{e}");

    // Any other answer is an error too, with the API server's words.
    let (client, api) = FakeApi::start();
    serve(&api, &Objects::default(), true);
    api.always_list(
        HTTP_ROUTES,
        failure(500, "InternalError", "etcdserver: request timed out"),
    );
    let e = snapshot::take(&client).await.unwrap_err().to_string();
    assert_eq!(
        e,
        "cannot list HTTPRoutes: the API server answered 500: etcdserver: request timed out"
    );
}

#[test]
fn check_and_explain_take_one_source() {
    use clap::{CommandFactory as _, Parser as _};
    #[derive(clap::Parser)]
    struct Check {
        #[command(flatten)]
        args: check::Args,
    }
    #[derive(clap::Parser)]
    struct Explain {
        #[command(flatten)]
        args: explain::Args,
    }
    Check::command().debug_assert();
    Explain::command().debug_assert();
    let check =
        |argv: &[&str]| Check::try_parse_from(std::iter::once("check").chain(argv.iter().copied()));
    assert!(check(&["--kubernetes"]).unwrap().args.kubernetes);
    assert!(
        check(&["--manifests", "."])
            .unwrap()
            .args
            .manifests
            .is_some()
    );
    for bad in [&[][..], &["--kubernetes", "--manifests", "."][..]] {
        assert_eq!(check(bad).err().map(|e| e.exit_code()), Some(2), "{bad:?}");
    }
    let explain = |argv: &[&str]| {
        Explain::try_parse_from(
            ["explain", "--to", "catalog"]
                .into_iter()
                .chain(argv.iter().copied()),
        )
    };
    for good in [
        &["--from", "web", "--kubernetes"][..],
        &["--from", "web", "--manifests", "."][..],
        &["--pod", "web/client-0"][..],
        &["--admin", "127.0.0.1:4191", "--manifests", "."][..],
        &["--pod", "web/client-0", "--kubernetes"][..],
    ] {
        assert!(explain(good).is_ok(), "{good:?}");
    }
    for bad in [
        &["--from", "web"][..],
        &["--kubernetes"][..],
        &["--from", "web", "--kubernetes", "--manifests", "."][..],
        &["--pod", "web/a", "--admin", "127.0.0.1:4191"][..],
    ] {
        assert_eq!(
            explain(bad).err().map(|e| e.exit_code()),
            Some(2),
            "{bad:?}"
        );
    }
}
