//! The status writer against kube's real client and a scripted API server: the exact patch,
//! no request when nothing changed, retries on 409, nothing written without the Lease.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::watch as channel;

use super::fake_api::*;
use super::watch_tests::*;
use super::{BackoffPolicy, LeaseTiming, Settings, status_writer};
use crate::index::{Config, Index};

const ROUTE_PATH: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes";
const GRPC_PATH: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/grpcroutes";
const OLD: &str = "2026-01-01T00:00:00Z";

/// API times have whole seconds.
fn whole_seconds_now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap()
}

fn status_of(name: &str) -> String {
    format!("{ROUTE_PATH}/{name}/status")
}

fn with_status(mut route: Value, parents: Vec<Value>) -> Value {
    route["status"] = json!({"parents": parents});
    route
}

fn gateway_entry(name: &str) -> Value {
    json!({
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": name},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                        "lastTransitionTime": OLD, "observedGeneration": 1}]
    })
}

/// Our entry for Service `parent` port 80, healthy, at `generation`, with times `since`.
fn ours(parent: &str, generation: i64, since: &str) -> Value {
    json!({
        "parentRef": {"group": "", "kind": "Service", "name": parent, "port": 80},
        "controllerName": "trellis.dev/controller",
        "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted",
             "message": format!("routes Service shop/{parent} port 80"),
             "lastTransitionTime": since, "observedGeneration": generation},
            {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs",
             "message": "all references resolved",
             "lastTransitionTime": since, "observedGeneration": generation}
        ]
    })
}

fn grpc_route(name: &str, rv: &str, parent: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": rv, "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
            "rules": [{"backendRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}]}]
        }
    })
}

/// Every `lastTransitionTime` set to "now" (checked to be a time after `after`) becomes
/// "NOW", so that bodies can be compared whole.
fn normalize_times(body: &mut Value, after: Timestamp) {
    match body {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k == "lastTransitionTime"
                    && let Some(t) = v.as_str().and_then(|s| s.parse::<Timestamp>().ok())
                    && t >= after
                {
                    *v = json!("NOW");
                } else {
                    normalize_times(v, after);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| normalize_times(v, after)),
        _ => {}
    }
}

fn services() -> Reply {
    list(
        "Service",
        "v1",
        "100",
        vec![
            service("web", "10.96.0.10", "10"),
            service("web-v2", "10.96.0.11", "11"),
            service("api", "10.96.0.12", "12"),
        ],
    )
}

fn cluster(api: &FakeApi, http: Vec<Value>, grpc: Vec<Value>) {
    api.lists(SERVICES, vec![services()]);
    api.lists(SLICES, vec![empty_list(SLICES)]);
    api.lists(PODS, vec![empty_list(PODS)]);
    api.lists(HTTP_ROUTES, vec![routes_list(http)]);
    api.lists(
        GRPC_ROUTES,
        vec![list(
            "GRPCRoute",
            "gateway.networking.k8s.io/v1",
            "100",
            grpc,
        )],
    );
}

fn patches(api: &FakeApi) -> Vec<Seen> {
    api.seen()
        .into_iter()
        .filter(|s| s.method == Method::PATCH)
        .collect()
}

#[tokio::test]
async fn patches_only_what_differs_keeping_other_controllers_entries() {
    let began = whole_seconds_now();
    let (client, api) = FakeApi::start();
    let canary = with_status(
        http_route("canary", "5", 2, "web", "web-v2"),
        vec![gateway_entry("gw")],
    );
    // Already showing exactly what the model says.
    let steady = with_status(
        http_route("steady", "7", 1, "web", "web-v2"),
        vec![ours("web", 1, OLD)],
    );
    // Moved from the Service to a Gateway: our entry is stale.
    let mut moved = with_status(
        http_route("moved", "9", 3, "web", "web-v2"),
        vec![ours("web", 2, OLD), gateway_entry("gw")],
    );
    moved["spec"]["parentRefs"] =
        json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}]);
    let rpc = grpc_route("rpc", "8", "api");
    cluster(
        &api,
        vec![canary.clone(), steady, moved.clone()],
        vec![rpc.clone()],
    );
    api.answers(Method::PATCH, &status_of("canary"), vec![ok(canary)]);
    api.answers(Method::PATCH, &status_of("moved"), vec![ok(moved)]);
    api.answers(
        Method::PATCH,
        &format!("{GRPC_PATH}/rpc/status"),
        vec![ok(rpc)],
    );

    let mut w = start(&client);
    let (leader_tx, leader) = channel::channel(false);
    w.tasks.spawn(status_writer::run(
        client.clone(),
        w.stores.clone(),
        w.index.clone(),
        leader,
        w.stop.subscribe(),
    ));
    w.index_where("the routes apply", |i| {
        describe(i, "10.96.0.10:80") == "HTTPRoute shop/canary,shop/steady"
    })
    .await;

    // Not the leader: nothing is written.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(patches(&api).is_empty(), "{:?}", api.summary());

    leader_tx.send_replace(true);
    api.wait_for("three patches", |seen| {
        seen.iter().filter(|s| s.method == Method::PATCH).count() == 3
    })
    .await;
    // Settle: no further request comes (`steady` is already right).
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another pass before the watch delivers the patched routes: the store's status predates
    // the patches, and they are not sent again.
    leader_tx.send_replace(false);
    leader_tx.send_replace(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = patches(&api);
    let paths: Vec<&str> = sent.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            status_of("canary").as_str(),
            &format!("{GRPC_PATH}/rpc/status"),
            status_of("moved").as_str(),
        ],
        "{:?}",
        api.summary()
    );
    for s in &sent {
        assert_eq!(
            s.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        let params: Vec<&str> = s.query.split('&').filter(|p| !p.is_empty()).collect();
        assert_eq!(params, ["fieldManager=trellis-controller"]);
    }

    let mut canary_body = sent[0].body.clone();
    normalize_times(&mut canary_body, began);
    assert_eq!(
        canary_body,
        json!({
            "metadata": {"resourceVersion": "5"},
            "status": {"parents": [gateway_entry("gw"), ours("web", 2, "NOW")]}
        })
    );
    assert_eq!(
        sent[2].body,
        json!({
            "metadata": {"resourceVersion": "9"},
            "status": {"parents": [gateway_entry("gw")]}
        })
    );
    let mut rpc_body = sent[1].body.clone();
    normalize_times(&mut rpc_body, began);
    assert_eq!(
        rpc_body,
        json!({
            "metadata": {"resourceVersion": "8"},
            "status": {"parents": [ours("api", 1, "NOW")]}
        })
    );
    w.shut_down().await;
}

#[tokio::test]
async fn a_conflict_reads_the_route_again_and_merges_into_the_new_status() {
    let began = whole_seconds_now();
    let (client, api) = FakeApi::start();
    let canary = with_status(
        http_route("canary", "5", 2, "web", "web-v2"),
        vec![gateway_entry("a")],
    );
    // Meanwhile another controller added its entry.
    let updated = with_status(
        http_route("canary", "6", 2, "web", "web-v2"),
        vec![gateway_entry("a"), gateway_entry("b")],
    );
    cluster(&api, vec![canary], vec![]);
    api.answers(
        Method::PATCH,
        &status_of("canary"),
        vec![
            failure(
                409,
                "Conflict",
                "Operation cannot be fulfilled on httproutes.gateway.networking.k8s.io \
                 \"canary\": the object has been modified; please apply your changes to the \
                 latest version and try again",
            ),
            ok(updated.clone()),
        ],
    );
    api.answers(
        Method::GET,
        &format!("{ROUTE_PATH}/canary"),
        vec![ok(updated)],
    );

    let mut w = start(&client);
    let (_leader_tx, leader) = channel::channel(true);
    w.tasks.spawn(status_writer::run(
        client.clone(),
        w.stores.clone(),
        w.index.clone(),
        leader,
        w.stop.subscribe(),
    ));
    api.wait_for("the second patch", |seen| {
        seen.iter().filter(|s| s.method == Method::PATCH).count() == 2
    })
    .await;
    let requests: Vec<(Method, String)> = api
        .seen()
        .into_iter()
        .filter(|s| s.path.starts_with(ROUTE_PATH))
        .map(|s| (s.method, s.path))
        .collect();
    assert_eq!(
        requests,
        [
            (Method::PATCH, status_of("canary")),
            (Method::GET, format!("{ROUTE_PATH}/canary")),
            (Method::PATCH, status_of("canary")),
        ]
    );
    let sent = patches(&api);
    assert_eq!(sent[0].body["metadata"]["resourceVersion"], "5");
    let mut second = sent[1].body.clone();
    normalize_times(&mut second, began);
    assert_eq!(
        second,
        json!({
            "metadata": {"resourceVersion": "6"},
            "status": {"parents": [gateway_entry("a"), gateway_entry("b"), ours("web", 2, "NOW")]}
        })
    );
    w.shut_down().await;
}

#[tokio::test]
async fn kubernetes_mode_publishes_the_index_and_writes_status_while_it_holds_the_lease() {
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases";
    let lease_path = format!("{LEASES}/trellis-controller");
    let (client, api) = FakeApi::start();
    let canary = http_route("canary", "5", 1, "web", "web-v2");
    cluster(&api, vec![canary.clone()], vec![]);
    api.answers(Method::PATCH, &status_of("canary"), vec![ok(canary)]);
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "trellis-controller", "namespace": "trellis-system", "resourceVersion": "1"},
        "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 1, "leaseTransitions": 0}
    });
    api.answers(
        Method::GET,
        &lease_path,
        vec![not_found(
            "leases",
            "coordination.k8s.io",
            "trellis-controller",
        )],
    );
    api.answers(
        Method::POST,
        LEASES,
        vec![Reply::Json(http::StatusCode::CREATED, lease.clone())],
    );
    api.always(Method::PUT, &lease_path, ok(lease));

    let settings = Settings {
        namespace: "trellis-system".to_string(),
        identity: "pod-a".to_string(),
        lease: LeaseTiming {
            duration: Duration::from_secs(1),
            renew_every: Duration::from_millis(100),
            retry_every: Duration::from_millis(50),
        },
        debounce: Duration::from_millis(10),
        backoff: BackoffPolicy::Fixed(Duration::from_millis(20)),
    };
    let (index_tx, mut index) = channel::channel(Arc::new(Index::default()));
    let (stop, stop_rx) = channel::channel(false);
    let task = tokio::spawn(super::run(
        client,
        settings,
        Config::default(),
        index_tx,
        stop_rx,
    ));
    tokio::time::timeout(PATIENCE, index.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        describe(&index.borrow(), "10.96.0.10:80"),
        "HTTPRoute shop/canary"
    );
    api.wait_for("the status patch", |seen| {
        seen.iter().any(|s| s.method == Method::PATCH)
    })
    .await;
    let created = api.seen_at(&Method::POST, LEASES);
    assert_eq!(created[0].body["spec"]["holderIdentity"], "pod-a");

    // Stopping releases the Lease and ends every task.
    stop.send_replace(true);
    tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
    let last = api.seen_at(&Method::PUT, &lease_path).pop().unwrap();
    assert!(
        last.body["spec"].get("holderIdentity").is_none(),
        "{}",
        last.body
    );
    assert_eq!(patches(&api).len(), 1, "{:?}", api.summary());
}
