//! The cluster watches: one kube watcher per kind, each object stripped ([`super::strip`])
//! into a reflector store, and the loop that rebuilds the [`Index`] from the stores after each
//! burst of changes.
//!
//! A watcher lists, then watches from the list's resourceVersion; when the API server answers
//! 410 Gone (the version left its watch window) the watcher lists again, and the store swaps in
//! the new list whole at its end, so objects deleted during the gap disappear and nothing is
//! half-updated in between. Every error backs off ([`Backoff`]: 0.8 s doubling to 30 s, reset by
//! progress) and the watch resumes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gateway_api::experimental::grpcroutes::GrpcRoute;
use gateway_api::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, watcher as watch_kind};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::strip;
use crate::index::{Changes, Config, Index};
use crate::objects::Objects;

/// The kinds the model is computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    HttpRoute,
    GrpcRoute,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::HttpRoute,
        Kind::GrpcRoute,
    ];

    fn is_route(self) -> bool {
        matches!(self, Kind::HttpRoute | Kind::GrpcRoute)
    }

    /// The resource, as RBAC rules name it.
    fn resource(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices.discovery.k8s.io",
            Kind::Pod => "pods",
            Kind::HttpRoute => "httproutes.gateway.networking.k8s.io",
            Kind::GrpcRoute => "grpcroutes.gateway.networking.k8s.io",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Services",
            Kind::EndpointSlice => "EndpointSlices",
            Kind::Pod => "Pods",
            Kind::HttpRoute => "HTTPRoutes",
            Kind::GrpcRoute => "GRPCRoutes",
        })
    }
}

/// Where a kind's store stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StoreState {
    /// Not listed yet.
    #[default]
    Pending,
    /// Listed; kept current by the watch.
    Synced,
    /// The API server does not serve the kind (its CRD is not installed): read as empty.
    Missing,
}

/// The state of every store; each change of a store also bumps this channel, which is what
/// wakes the rebuild loop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    states: [StoreState; 5],
}

impl Progress {
    pub fn get(&self, kind: Kind) -> StoreState {
        self.states[kind as usize]
    }

    fn set(&mut self, kind: Kind, state: StoreState) -> bool {
        std::mem::replace(&mut self.states[kind as usize], state) != state
    }

    /// Whether the stores describe the cluster: Services, EndpointSlices and Pods listed, and
    /// each route kind listed or known to be missing. Before that, an index would tell proxies
    /// that Services do not exist.
    pub fn ready(&self) -> bool {
        Kind::ALL.iter().all(|&k| match self.get(k) {
            StoreState::Synced => true,
            StoreState::Missing => k.is_route(),
            StoreState::Pending => false,
        })
    }
}

/// How watchers wait after an error.
#[derive(Clone, Copy, Debug, Default)]
pub enum BackoffPolicy {
    /// 0.8 s doubling to 30 s, each pause shortened by up to a tenth at random so that
    /// replicas do not retry in step.
    #[default]
    Default,
    /// A fixed pause (tests).
    Fixed(Duration),
}

/// The first pause after an error, and the longest.
pub const BACKOFF_MIN: Duration = Duration::from_millis(800);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One watcher's backoff: it grows with every error and goes back to the start only when the
/// watch makes progress (a list page, an object, a watch event).
///
/// kube's own backoff stream cannot be used: it resets on every item the watcher yields, and
/// the watcher yields `Init` before each list attempt, so a list that keeps failing (403, a
/// down API server) would be retried every second forever.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Self {
        Backoff {
            policy,
            failures: 0,
        }
    }

    /// The pause after one more error; `jitter` in `[0, 1)` shortens it by up to a tenth.
    pub fn failed(&mut self, jitter: f64) -> Duration {
        if let BackoffPolicy::Fixed(d) = self.policy {
            return d;
        }
        let doubled = BACKOFF_MIN.saturating_mul(1 << self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        doubled
            .min(BACKOFF_MAX)
            .mul_f64(1.0 - jitter.clamp(0.0, 1.0) / 10.0)
    }

    /// The watch made progress: the next error starts again from the shortest pause.
    pub fn progressed(&mut self) {
        self.failures = 0;
    }
}

/// Read access to the watched objects.
#[derive(Clone, Debug)]
pub struct Stores {
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    http_routes: Store<HttpRoute>,
    grpc_routes: Store<GrpcRoute>,
    progress: watch::Receiver<Progress>,
    /// What changed since the last build took them, for an incremental rebuild.
    changes: Arc<std::sync::Mutex<Changes>>,
}

impl Stores {
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// The changes recorded since the last call.
    fn take_changes(&self) -> Changes {
        match self.changes.lock() {
            Ok(mut changes) => std::mem::take(&mut *changes),
            // A watcher panicked while recording: rebuild everything.
            Err(_) => Changes::everything(),
        }
    }

    /// Every object, sorted by namespace and name, once the stores are [ready](Progress::ready).
    /// Routes of a missing kind are left out even if a store still holds some from before
    /// their CRD was removed.
    pub fn snapshot(&self) -> Option<Objects> {
        let progress = self.progress();
        if !progress.ready() {
            return None;
        }
        let synced = |k| progress.get(k) == StoreState::Synced;
        Some(Objects {
            services: sorted(&self.services),
            endpoint_slices: sorted(&self.endpoint_slices),
            pods: sorted(&self.pods),
            http_routes: if synced(Kind::HttpRoute) {
                sorted(&self.http_routes)
            } else {
                Vec::new()
            },
            grpc_routes: if synced(Kind::GrpcRoute) {
                sorted(&self.grpc_routes)
            } else {
                Vec::new()
            },
        })
    }

    /// The HTTPRoutes, or `None` while their kind is not synced.
    pub fn http_routes(&self) -> Option<Vec<Arc<HttpRoute>>> {
        (self.progress().get(Kind::HttpRoute) == StoreState::Synced)
            .then(|| self.http_routes.state())
    }

    /// The GRPCRoutes, or `None` while their kind is not synced.
    pub fn grpc_routes(&self) -> Option<Vec<Arc<GrpcRoute>>> {
        (self.progress().get(Kind::GrpcRoute) == StoreState::Synced)
            .then(|| self.grpc_routes.state())
    }

    pub fn http_route(&self, namespace: &str, name: &str) -> Option<Arc<HttpRoute>> {
        self.http_routes
            .get(&ObjectRef::new(name).within(namespace))
    }

    pub fn grpc_route(&self, namespace: &str, name: &str) -> Option<Arc<GrpcRoute>> {
        self.grpc_routes
            .get(&ObjectRef::new(name).within(namespace))
    }
}

fn sorted<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<K> {
    let mut objects: Vec<K> = store.state().iter().map(|o| (**o).clone()).collect();
    objects.sort_by(|a, b| {
        let key = |o: &K| (o.meta().namespace.clone(), o.meta().name.clone());
        key(a).cmp(&key(b))
    });
    objects
}

/// Starts one watcher per kind, cluster-wide, on `tasks`; they run until `stop` is set.
pub fn start(
    client: &Client,
    backoff: BackoffPolicy,
    tasks: &mut JoinSet<()>,
    stop: &watch::Receiver<bool>,
) -> Stores {
    let progress = Arc::new(watch::Sender::new(Progress::default()));
    let (services, w_services) = reflector::store();
    let (endpoint_slices, w_slices) = reflector::store();
    let (pods, w_pods) = reflector::store();
    let (http_routes, w_http) = reflector::store();
    let (grpc_routes, w_grpc) = reflector::store();
    let stores = Stores {
        services,
        endpoint_slices,
        pods,
        http_routes,
        grpc_routes,
        progress: progress.subscribe(),
        changes: Arc::new(std::sync::Mutex::new(Changes::everything())),
    };
    let c = || client.clone();
    let s = || stop.clone();
    let p = || progress.clone();
    let b = || Backoff::new(backoff);
    let ch = || stores.changes.clone();
    let api = Api::<Service>::all(c());
    tasks.spawn(run(
        api,
        Kind::Service,
        w_services,
        strip::service,
        touch_service,
        ch(),
        p(),
        b(),
        s(),
    ));
    let api = Api::<EndpointSlice>::all(c());
    tasks.spawn(run(
        api,
        Kind::EndpointSlice,
        w_slices,
        strip::endpoint_slice,
        touch_slice,
        ch(),
        p(),
        b(),
        s(),
    ));
    let api = Api::<Pod>::all(c());
    tasks.spawn(run(
        api,
        Kind::Pod,
        w_pods,
        strip::pod,
        touch_pod,
        ch(),
        p(),
        b(),
        s(),
    ));
    let api = Api::<HttpRoute>::all(c());
    tasks.spawn(run(
        api,
        Kind::HttpRoute,
        w_http,
        strip::http_route,
        touch_route,
        ch(),
        p(),
        b(),
        s(),
    ));
    let api = Api::<GrpcRoute>::all(c());
    tasks.spawn(run(
        api,
        Kind::GrpcRoute,
        w_grpc,
        strip::grpc_route,
        touch_route,
        ch(),
        p(),
        b(),
        s(),
    ));
    stores
}

fn object_ref(meta: &kube::api::ObjectMeta, name: String) -> crate::index::ObjectRef {
    crate::index::ObjectRef {
        namespace: meta
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        name,
    }
}

fn touch_service(svc: &Service, changes: &mut Changes) {
    if let Some(name) = svc.metadata.name.clone() {
        changes.services.insert(object_ref(&svc.metadata, name));
    }
}

fn touch_slice(slice: &EndpointSlice, changes: &mut Changes) {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(strip::SERVICE_NAME_LABEL));
    if let Some(service) = service {
        changes
            .services
            .insert(object_ref(&slice.metadata, service.clone()));
    }
}

fn touch_pod(pod: &Pod, changes: &mut Changes) {
    if let Some(name) = pod.metadata.name.clone() {
        let ns = pod.metadata.namespace.clone();
        changes
            .pods
            .insert((ns.unwrap_or_else(|| "default".to_string()), name));
    }
}

fn touch_route<K>(_: &K, changes: &mut Changes) {
    changes.routes = true;
}

/// One kind's watch, until `stop` is set. Each object that changes is noted in `changes` by
/// `touch`; a completed (re)list notes that anything may have changed.
#[allow(clippy::too_many_arguments)]
async fn run<K>(
    api: Api<K>,
    kind: Kind,
    writer: reflector::store::Writer<K>,
    strip: fn(&mut K),
    touch: fn(&K, &mut Changes),
    changes: Arc<std::sync::Mutex<Changes>>,
    progress: Arc<watch::Sender<Progress>>,
    mut backoff: Backoff,
    mut stop: watch::Receiver<bool>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
{
    let events = watch_kind(api, watcher::Config::default())
        .modify(strip)
        .reflect(writer);
    let mut events = std::pin::pin!(events);
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = stop.wait_for(|s| *s) => return,
        };
        match event {
            // A watcher's stream never ends.
            None => return,
            Some(Ok(watcher::Event::InitDone)) => {
                backoff.progressed();
                note(&changes, |c| c.all = true);
                progress.send_modify(|p| {
                    if p.get(kind) == StoreState::Missing {
                        tracing::info!("{kind} are served by the API now; routes are read again");
                    }
                    p.set(kind, StoreState::Synced);
                });
                tracing::debug!("{kind} listed");
            }
            Some(Ok(watcher::Event::Apply(object) | watcher::Event::Delete(object))) => {
                backoff.progressed();
                note(&changes, |c| touch(&object, c));
                progress.send_modify(|_| {});
            }
            Some(Ok(watcher::Event::InitApply(_))) => backoff.progressed(),
            // Emitted before every list attempt, successful or not: no sign of progress.
            Some(Ok(watcher::Event::Init)) => {}
            Some(Err(e)) => {
                report(kind, &e, &progress, &changes);
                let pause = backoff.failed(fastrand::f64());
                tracing::debug!("{kind}: retrying in {pause:?}");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

fn note(changes: &std::sync::Mutex<Changes>, f: impl FnOnce(&mut Changes)) {
    match changes.lock() {
        Ok(mut changes) => f(&mut changes),
        Err(poisoned) => poisoned.into_inner().all = true,
    }
}

/// What a watch error means for the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Diagnosis {
    /// The API server does not serve this route kind: its CRD is not installed.
    Missing,
    /// RBAC does not allow the list or watch.
    Forbidden,
    /// The watch left the API server's history window; the watcher lists again.
    Gone,
    /// Anything else: retried with backoff.
    Other,
}

/// Reads a watch error. A kind the API server does not serve is answered `404` with a
/// `text/plain` body ("404 page not found"), not a Status; kube's client turns that into a
/// Status whose reason is "Failed to parse error data", so the HTTP code is what counts.
pub fn diagnose(kind: Kind, e: &watcher::Error) -> Diagnosis {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => s.as_ref(),
        _ => return Diagnosis::Other,
    };
    let listing = matches!(
        e,
        watcher::Error::InitialListFailed(_) | watcher::Error::WatchStartFailed(_)
    );
    if kind.is_route() && listing && (status.code == 404 || status.is_not_found()) {
        Diagnosis::Missing
    } else if status.code == 403 || status.is_forbidden() {
        Diagnosis::Forbidden
    } else if status.code == 410 {
        Diagnosis::Gone
    } else {
        Diagnosis::Other
    }
}

/// Logs a watch error (the caller backs off and the watcher retries) and notes a missing
/// route CRD.
fn report(
    kind: Kind,
    e: &watcher::Error,
    progress: &watch::Sender<Progress>,
    changes: &std::sync::Mutex<Changes>,
) {
    match diagnose(kind, e) {
        Diagnosis::Missing => {
            if progress.send_if_modified(|p| p.set(kind, StoreState::Missing)) {
                note(changes, |c| c.all = true);
                tracing::warn!(
                    "Gateway API CRDs not installed; routes ignored until they are (the API \
                     server has no {kind}; Services and endpoints are still served, and the \
                     controller checks again at most every 30 s)"
                );
            } else {
                tracing::debug!("{kind} still not served by the API: {e}");
            }
        }
        Diagnosis::Forbidden => tracing::error!(
            "cannot list or watch {kind}: forbidden; the controller's ServiceAccount needs list \
             and watch on {} (retrying): {e}",
            kind.resource()
        ),
        Diagnosis::Gone => {
            tracing::info!("{kind} watch expired (410 Gone); listing them again");
        }
        Diagnosis::Other => tracing::warn!("watching {kind} failed, retrying with backoff: {e}"),
    }
}

/// Rebuilds and publishes the index after each burst of changes, once the stores are ready,
/// until `stop` is set. The first change of a burst starts a `debounce` window; what arrives
/// within it goes into the same build, so a rollout touching many objects costs one build
/// and an edit reaches proxies within `debounce` plus the build time.
pub async fn publish(
    stores: Stores,
    config: Config,
    debounce: Duration,
    index: watch::Sender<Arc<Index>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut progress = stores.progress.clone();
    let mut published = false;
    loop {
        tokio::select! {
            changed = progress.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(debounce) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        progress.borrow_and_update();
        let Some(objects) = stores.snapshot() else {
            continue;
        };
        let mut changes = stores.take_changes();
        if !published {
            changes = Changes::everything();
        } else if changes.is_empty() {
            continue;
        }
        let summary = summary(&objects);
        let config = config.clone();
        let before = index.borrow().clone();
        // Compiling the index takes CPU time: keep it off the server's threads.
        let built = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let built = before.rebuild(&objects, &config, &changes);
            (built, started.elapsed(), objects)
        })
        .await;
        match built {
            Ok((built, took, objects)) => {
                let recomputed = built.recomputed_ports();
                let old = index.send_replace(Arc::new(built));
                // Freeing the snapshot and the old index takes time too: not before publishing,
                // and not on the server's threads.
                tokio::task::spawn_blocking(move || drop((old, objects)));
                if published {
                    tracing::debug!(
                        "index rebuilt in {took:?} ({recomputed} Service ports computed): \
                         {summary}"
                    );
                } else {
                    tracing::info!("cluster state loaded: {summary}");
                    published = true;
                }
            }
            Err(e) => {
                tracing::error!("building the index failed, still serving the last one: {e}");
                stores.changes.lock().map(|mut c| c.all = true).ok();
            }
        }
    }
}

fn summary(objects: &Objects) -> String {
    format!(
        "{} Services, {} EndpointSlices, {} Pods, {} HTTPRoutes, {} GRPCRoutes",
        objects.services.len(),
        objects.endpoint_slices.len(),
        objects.pods.len(),
        objects.http_routes.len(),
        objects.grpc_routes.len(),
    )
}
