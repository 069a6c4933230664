//! The watches against kube's real client and a scripted API server: lists and watch events
//! become an index, 410 Gone relists, missing route CRDs are tolerated.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use tokio::sync::watch as channel;
use tokio::task::JoinSet;
use trellis_api::discovery::Target;
use trellis_api::policy::{BackendTarget, OutboundPolicy, Routing};

use kube::runtime::watcher;

use super::fake_api::*;
use super::watch::{
    self, BACKOFF_MAX, BACKOFF_MIN, Backoff, BackoffPolicy, Diagnosis, Kind, StoreState, Stores,
    diagnose,
};
use crate::index::{Config, Index};

pub const SERVICES: &str = "/api/v1/services";
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const PODS: &str = "/api/v1/pods";
pub const HTTP_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
pub const GRPC_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/grpcroutes";
const GATEWAY_V1: &str = "gateway.networking.k8s.io/v1";

pub fn service(name: &str, ip: &str, rv: &str) -> Value {
    json!({
        "metadata": {
            "name": name, "namespace": "shop", "resourceVersion": rv, "uid": format!("uid-{name}"),
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"big\": true}"},
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
                               "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
        },
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
        },
        "status": {"loadBalancer": {}}
    })
}

/// An HTTPRoute in `shop` from Service `parent` port 80 to Service `backend` port 80.
pub fn http_route(name: &str, rv: &str, generation: i64, parent: &str, backend: &str) -> Value {
    json!({
        "apiVersion": GATEWAY_V1, "kind": "HTTPRoute",
        "metadata": {
            "name": name, "namespace": "shop", "resourceVersion": rv, "generation": generation,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [{"manager": "kubectl", "operation": "Apply",
                               "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
        },
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": [{"group": "", "kind": "Service", "name": backend, "port": 80, "weight": 1}]
            }]
        }
    })
}

fn meshed_pod(name: &str, ip: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": "5",
                     "annotations": {"trellis.dev/proxy-version": "0.1.0"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "web:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn slice(service: &str, pod: &str, ip: &str) -> Value {
    json!({
        "metadata": {"name": format!("{service}-abc"), "namespace": "shop", "resourceVersion": "6",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

pub fn empty_list(path: &str) -> Reply {
    match path {
        SERVICES => list("Service", "v1", "100", vec![]),
        SLICES => list("EndpointSlice", "discovery.k8s.io/v1", "100", vec![]),
        PODS => list("Pod", "v1", "100", vec![]),
        HTTP_ROUTES => list("HTTPRoute", GATEWAY_V1, "100", vec![]),
        _ => list("GRPCRoute", GATEWAY_V1, "100", vec![]),
    }
}

pub fn routes_list(items: Vec<Value>) -> Reply {
    list("HTTPRoute", GATEWAY_V1, "100", items)
}

/// The watches and the rebuild loop, running against `client`.
pub struct Watching {
    pub stores: Stores,
    pub index: channel::Receiver<Arc<Index>>,
    pub stop: channel::Sender<bool>,
    pub tasks: JoinSet<()>,
}

pub fn start(client: &kube::Client) -> Watching {
    start_with(client, BackoffPolicy::Fixed(Duration::from_millis(20)))
}

pub fn start_with(client: &kube::Client, backoff: BackoffPolicy) -> Watching {
    let (stop, stop_rx) = channel::channel(false);
    let mut tasks = JoinSet::new();
    let stores = watch::start(client, backoff, &mut tasks, &stop_rx);
    let (index_tx, index) = channel::channel(Arc::new(Index::default()));
    tasks.spawn(watch::publish(
        stores.clone(),
        Config::default(),
        Duration::from_millis(10),
        index_tx,
        stop_rx,
    ));
    Watching {
        stores,
        index,
        stop,
        tasks,
    }
}

impl Watching {
    /// Waits for a published index where `done` holds.
    pub async fn index_where(&mut self, what: &str, done: impl Fn(&Index) -> bool) -> Arc<Index> {
        let waited = tokio::time::timeout(PATIENCE, async {
            loop {
                let index = self.index.borrow_and_update().clone();
                if done(&index) {
                    return Some(index);
                }
                if self.index.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match waited {
            Ok(Some(index)) => index,
            _ => panic!(
                "timed out waiting for an index where {what}; last: {}",
                describe(&self.index.borrow(), "10.96.0.10:80")
            ),
        }
    }

    /// Stops every task and checks that they all end promptly.
    pub async fn shut_down(mut self) {
        self.stop.send_replace(true);
        let ended = tokio::time::timeout(PATIENCE, async {
            while let Some(done) = self.tasks.join_next().await {
                done.unwrap();
            }
        })
        .await;
        assert!(ended.is_ok(), "tasks did not stop");
    }
}

/// How a client in `shop` is routed to `addr`: `not a Service`, `passthrough [endpoints]`
/// or `HTTPRoute ns/name,...`.
pub fn describe(index: &Index, addr: &str) -> String {
    let target = Target::Addr(addr.parse().unwrap());
    match index.outbound("shop", &target) {
        OutboundPolicy::NotAService { .. } => "not a Service".to_string(),
        OutboundPolicy::Service(p) => match p.routing {
            Routing::Passthrough { backend } => match backend.target {
                BackendTarget::Service { endpoints, .. } => {
                    let eps: Vec<String> = endpoints
                        .iter()
                        .map(|e| match &e.identity {
                            Some(id) => format!("{} {id}", e.addr),
                            None => e.addr.to_string(),
                        })
                        .collect();
                    format!("passthrough [{}]", eps.join(", "))
                }
                BackendTarget::Invalid { reason, .. } => format!("invalid: {reason}"),
            },
            Routing::Http { routes } => {
                let names: Vec<String> = routes.iter().map(|r| r.id.to_string()).collect();
                format!("HTTPRoute {}", names.join(","))
            }
            Routing::Grpc { routes } => {
                let names: Vec<String> = routes.iter().map(|r| r.id.to_string()).collect();
                format!("GRPCRoute {}", names.join(","))
            }
        },
    }
}

#[tokio::test]
async fn lists_and_watch_events_become_policies() {
    let (client, api) = FakeApi::start();
    api.lists(
        SERVICES,
        vec![list(
            "Service",
            "v1",
            "100",
            vec![service("web", "10.96.0.10", "10")],
        )],
    );
    // One Service and the route arrive on the watches, after the lists.
    let mut added = service("web-v2", "10.96.0.11", "101");
    added["apiVersion"] = json!("v1");
    added["kind"] = json!("Service");
    api.watches(SERVICES, vec![Reply::Events(vec![event("ADDED", added)])]);
    api.lists(
        SLICES,
        vec![list(
            "EndpointSlice",
            "discovery.k8s.io/v1",
            "100",
            vec![slice("web-v2", "web-v2-1", "10.1.0.5")],
        )],
    );
    api.lists(
        PODS,
        vec![list(
            "Pod",
            "v1",
            "100",
            vec![meshed_pod("web-v2-1", "10.1.0.5")],
        )],
    );
    api.lists(HTTP_ROUTES, vec![routes_list(vec![])]);
    api.watches(
        HTTP_ROUTES,
        vec![Reply::Events(vec![event(
            "ADDED",
            http_route("canary", "102", 1, "web", "web-v2"),
        )])],
    );
    api.lists(GRPC_ROUTES, vec![empty_list(GRPC_ROUTES)]);

    let mut w = start(&client);
    let index = w
        .index_where("the route applies", |i| {
            describe(i, "10.96.0.10:80") == "HTTPRoute shop/canary"
        })
        .await;
    assert_eq!(
        describe(&index, "10.96.0.11:80"),
        "passthrough [10.1.0.5:8080 spiffe://cluster.local/ns/shop/sa/web]"
    );
    assert_eq!(describe(&index, "10.96.0.99:80"), "not a Service");

    // The watches resumed from the lists' resourceVersion, with bookmarks.
    let watch = api
        .seen_at(&Method::GET, SERVICES)
        .into_iter()
        .find(|s| s.is_watch())
        .unwrap();
    assert!(
        watch.query.contains("resourceVersion=100"),
        "{}",
        watch.query
    );
    assert!(
        watch.query.contains("allowWatchBookmarks=true"),
        "{}",
        watch.query
    );

    // What the stores hold is stripped.
    let objects = w.stores.snapshot().unwrap();
    let web = &objects.services[0].metadata;
    assert_eq!(web.name.as_deref(), Some("web"));
    assert!(web.managed_fields.is_none() && web.annotations.is_none() && web.uid.is_none());
    assert!(objects.http_routes[0].metadata.managed_fields.is_none());
    w.shut_down().await;
}

#[tokio::test]
async fn nothing_is_published_before_every_initial_list() {
    let (client, api) = FakeApi::start();
    for path in [SERVICES, SLICES, HTTP_ROUTES, GRPC_ROUTES] {
        api.lists(path, vec![empty_list(path)]);
    }
    // The Pods list never answers.
    let w = start(&client);
    api.wait_for("the Pods list", |seen| {
        seen.iter().any(|s| s.path == PODS && !s.is_watch())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!w.index.has_changed().unwrap(), "an index was published");
    assert_eq!(w.stores.progress().get(Kind::Service), StoreState::Synced);
    assert_eq!(w.stores.progress().get(Kind::Pod), StoreState::Pending);
    assert!(w.stores.snapshot().is_none());
    w.shut_down().await;
}

#[tokio::test]
async fn a_410_gone_relists_and_the_store_matches_the_new_list() {
    let (client, api) = FakeApi::start();
    api.lists(
        SERVICES,
        vec![
            list(
                "Service",
                "v1",
                "100",
                vec![
                    service("web", "10.96.0.10", "10"),
                    service("old", "10.96.0.13", "11"),
                ],
            ),
            // While the watch was away, `old` was deleted and `new` created.
            list(
                "Service",
                "v1",
                "250",
                vec![
                    service("web", "10.96.0.10", "10"),
                    service("new", "10.96.0.12", "240"),
                ],
            ),
        ],
    );
    api.watches(SERVICES, vec![Reply::Events(vec![gone()])]);
    for path in [SLICES, PODS, HTTP_ROUTES, GRPC_ROUTES] {
        api.lists(path, vec![empty_list(path)]);
    }

    let mut w = start(&client);
    let index = w
        .index_where("the relisted state", |i| {
            describe(i, "10.96.0.12:80") == "passthrough []"
        })
        .await;
    assert_eq!(describe(&index, "10.96.0.13:80"), "not a Service");
    assert_eq!(describe(&index, "10.96.0.10:80"), "passthrough []");
    let names: Vec<String> = w
        .stores
        .snapshot()
        .unwrap()
        .services
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names, ["new", "web"]);

    // Listed twice; the second watch starts from the second list's version.
    let seen = api.seen_at(&Method::GET, SERVICES);
    assert_eq!(seen.iter().filter(|s| !s.is_watch()).count(), 2);
    let watches: Vec<&Seen> = seen.iter().filter(|s| s.is_watch()).collect();
    assert!(watches[0].query.contains("resourceVersion=100"));
    let second = api
        .wait_for("the watch after the relist", |seen| {
            seen.iter()
                .filter(|s| s.path == SERVICES && s.is_watch())
                .count()
                == 2
        })
        .await;
    let second = second
        .iter()
        .filter(|s| s.path == SERVICES && s.is_watch())
        .nth(1)
        .unwrap();
    assert!(
        second.query.contains("resourceVersion=250"),
        "{}",
        second.query
    );
    w.shut_down().await;
}

#[tokio::test]
async fn a_failed_watch_backs_off_and_resumes() {
    let (client, api) = FakeApi::start();
    api.lists(
        SERVICES,
        vec![list(
            "Service",
            "v1",
            "100",
            vec![service("web", "10.96.0.10", "10")],
        )],
    );
    let mut added = service("web-v2", "10.96.0.11", "101");
    added["apiVersion"] = json!("v1");
    added["kind"] = json!("Service");
    api.watches(
        SERVICES,
        vec![
            failure(500, "InternalError", "etcd is unavailable"),
            Reply::Events(vec![event("ADDED", added)]),
        ],
    );
    for path in [SLICES, PODS, HTTP_ROUTES, GRPC_ROUTES] {
        api.lists(path, vec![empty_list(path)]);
    }
    let mut w = start(&client);
    w.index_where("the Service added after the error", |i| {
        describe(i, "10.96.0.11:80") == "passthrough []"
    })
    .await;
    // The failed watch was retried from the same version, without a relist.
    let seen = api.seen_at(&Method::GET, SERVICES);
    assert_eq!(seen.iter().filter(|s| !s.is_watch()).count(), 1);
    assert!(
        seen.iter()
            .filter(|s| s.is_watch())
            .take(2)
            .all(|s| s.query.contains("resourceVersion=100"))
    );
    w.shut_down().await;
}

#[tokio::test]
async fn missing_route_crds_are_tolerated_until_installed() {
    let (client, api) = FakeApi::start();
    api.lists(
        SERVICES,
        vec![list(
            "Service",
            "v1",
            "100",
            vec![
                service("web", "10.96.0.10", "10"),
                service("web-v2", "10.96.0.11", "11"),
            ],
        )],
    );
    api.lists(SLICES, vec![empty_list(SLICES)]);
    api.lists(PODS, vec![empty_list(PODS)]);
    api.always_list(HTTP_ROUTES, no_such_resource());
    api.always_list(GRPC_ROUTES, no_such_resource());

    let mut w = start(&client);
    w.index_where("Services served without routes", |i| {
        describe(i, "10.96.0.10:80") == "passthrough []"
    })
    .await;
    let progress = w.stores.progress();
    assert_eq!(progress.get(Kind::HttpRoute), StoreState::Missing);
    assert_eq!(progress.get(Kind::GrpcRoute), StoreState::Missing);
    // Still asking, with backoff.
    api.wait_for("another HTTPRoute list", |seen| {
        seen.iter().filter(|s| s.path == HTTP_ROUTES).count() >= 3
    })
    .await;

    // The HTTPRoute CRD gets installed.
    api.lists(
        HTTP_ROUTES,
        vec![routes_list(vec![http_route(
            "canary", "20", 1, "web", "web-v2",
        )])],
    );
    w.index_where("the route once its CRD exists", |i| {
        describe(i, "10.96.0.10:80") == "HTTPRoute shop/canary"
    })
    .await;
    let progress = w.stores.progress();
    assert_eq!(progress.get(Kind::HttpRoute), StoreState::Synced);
    assert_eq!(progress.get(Kind::GrpcRoute), StoreState::Missing);
    w.shut_down().await;
}

#[test]
fn backoff_doubles_to_30_s_and_restarts_after_progress() {
    let mut b = Backoff::new(BackoffPolicy::Default);
    let secs: Vec<f64> = (0..9).map(|_| b.failed(0.0).as_secs_f64()).collect();
    assert_eq!(secs, [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0]);
    // Jitter only ever shortens a pause, by at most a tenth.
    assert_eq!(b.failed(0.999_999).as_secs_f64().round(), 27.0);
    b.progressed();
    assert_eq!(b.failed(0.5), BACKOFF_MIN.mul_f64(0.95));
    // A very long outage neither overflows nor exceeds the cap.
    for _ in 0..100 {
        assert!(b.failed(0.0) <= BACKOFF_MAX);
    }
    let mut fixed = Backoff::new(BackoffPolicy::Fixed(Duration::from_millis(20)));
    assert_eq!(fixed.failed(0.7), Duration::from_millis(20));
}

#[test]
fn watch_errors_are_read_by_their_http_code() {
    use kube::core::Status;
    let api = |status: Status| Box::new(status);
    // What kube's client makes of kube-apiserver's plain-text 404 for an unserved resource.
    let unserved = || {
        api(Status::failure("404 page not found\n", "Failed to parse error data").with_code(404))
    };
    let status = |code: u16, reason: &str| api(Status::failure("x", reason).with_code(code));
    let list = |s: Box<Status>| watcher::Error::InitialListFailed(kube::Error::Api(s));
    let watch_start = |s: Box<Status>| watcher::Error::WatchStartFailed(kube::Error::Api(s));
    let cases = [
        (Kind::HttpRoute, list(unserved()), Diagnosis::Missing),
        (Kind::GrpcRoute, watch_start(unserved()), Diagnosis::Missing),
        (
            Kind::HttpRoute,
            list(status(404, "NotFound")),
            Diagnosis::Missing,
        ),
        // Services and Pods are always served: a 404 there is a fault, not a missing CRD.
        (Kind::Service, list(unserved()), Diagnosis::Other),
        // A 404 in the middle of a watch is not about the CRD.
        (
            Kind::HttpRoute,
            watcher::Error::WatchError(unserved()),
            Diagnosis::Other,
        ),
        (
            Kind::Pod,
            list(status(403, "Forbidden")),
            Diagnosis::Forbidden,
        ),
        (
            Kind::Pod,
            list(status(403, "Failed to parse error data")),
            Diagnosis::Forbidden,
        ),
        (
            Kind::Service,
            watcher::Error::WatchError(status(410, "Expired")),
            Diagnosis::Gone,
        ),
        (
            Kind::Service,
            list(status(500, "InternalError")),
            Diagnosis::Other,
        ),
        (
            Kind::Service,
            watcher::Error::NoResourceVersion,
            Diagnosis::Other,
        ),
    ];
    for (kind, error, want) in cases {
        assert_eq!(diagnose(kind, &error), want, "{kind}: {error}");
    }
}

/// The times of the requests of `path` (lists, or watches), as gaps in seconds.
fn gaps(api: &FakeApi, path: &str, watches: bool) -> Vec<f64> {
    let at: Vec<tokio::time::Instant> = api
        .seen_at(&Method::GET, path)
        .iter()
        .filter(|s| s.is_watch() == watches)
        .map(|s| s.at)
        .collect();
    at.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect()
}

/// Each gap is the doubling pause, shortened by at most a tenth of jitter.
fn assert_doubling(gaps: &[f64]) {
    for (i, gap) in gaps.iter().enumerate() {
        let want = (0.8 * 2f64.powi(i as i32)).min(30.0);
        assert!(
            (want * 0.9 - 0.01..=want + 0.01).contains(gap),
            "pause {i} is {gap:.3} s, expected {want} s less up to 10 %: {gaps:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_list_backs_off_doubling_to_30_s_and_a_success_resets_it() {
    let (client, api) = FakeApi::start();
    api.always_list(
        SERVICES,
        failure(
            403,
            "Forbidden",
            "services is forbidden: User \"system:serviceaccount:trellis-system:trellis-controller\" \
             cannot list resource \"services\" in API group \"\" at the cluster scope",
        ),
    );
    for path in [SLICES, PODS, HTTP_ROUTES, GRPC_ROUTES] {
        api.lists(path, vec![empty_list(path)]);
    }
    let mut w = start_with(&client, BackoffPolicy::Default);
    // Two virtual minutes: 0.8 + 1.6 + … + 25.6 + 30 + 30 s fit, so 8 or 9 attempts (jitter),
    // where a backoff reset by every list attempt would have made about a hundred.
    tokio::time::sleep(Duration::from_secs(120)).await;
    let lists = gaps(&api, SERVICES, false);
    assert!((7..=8).contains(&lists.len()), "{lists:?}");
    assert_doubling(&lists);

    // RBAC is fixed: the list succeeds, then the watch fails three times. The pauses start
    // again from 0.8 s.
    api.lists(
        SERVICES,
        vec![list(
            "Service",
            "v1",
            "100",
            vec![service("web", "10.96.0.10", "10")],
        )],
    );
    api.watches(
        SERVICES,
        vec![
            failure(500, "InternalError", "etcd is unavailable"),
            failure(500, "InternalError", "etcd is unavailable"),
            failure(500, "InternalError", "etcd is unavailable"),
        ],
    );
    // The next list comes within the current 30 s pause; the watches fail within 6 s after.
    tokio::time::sleep(Duration::from_secs(40)).await;
    w.index_where("the Services once listed", |i| {
        describe(i, "10.96.0.10:80") == "passthrough []"
    })
    .await;
    let watches = gaps(&api, SERVICES, true);
    assert_eq!(watches.len(), 3, "{watches:?}");
    assert_doubling(&watches);
    w.shut_down().await;
}
