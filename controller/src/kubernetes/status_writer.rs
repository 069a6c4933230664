//! Writes the model's route status to HTTPRoutes and GRPCRoutes, on the leader only.
//!
//! After each index build, every route's `status.parents` is compared with what the model says
//! ([`desired_parents`]); only routes that differ are patched. The patch is a JSON merge patch
//! of the `status` subresource that carries the route's `resourceVersion`: `parents` is one
//! list shared with other controllers, so the patch must replace it whole, and the
//! resourceVersion makes the API server refuse it (409) if anyone changed the route since it
//! was read. Then the route is read again and the merge redone. Uses `patch` on
//! `httproutes/status` and `grpcroutes/status`, and `get` on the routes for the re-read.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use gateway_api::experimental::grpcroutes::GrpcRoute;
use gateway_api::experimental::httproutes::{HttpRoute, HttpRouteStatusParents};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::watch;
use trellis_api::policy::RouteKind;

use super::route_status::{self, desired_parents};
use super::watch::Stores;
use crate::index::Index;
use crate::status::RouteStatus;

/// The field manager named in every patch.
pub const FIELD_MANAGER: &str = "trellis-controller";
/// Attempts at one route's patch when each loses a race (409) with another writer.
const ATTEMPTS: usize = 4;
/// Pause before trying again after a pass in which some write failed.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A route object of either kind, as the writer needs it.
trait RouteObject:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + fmt::Debug
    + Send
    + Sync
    + 'static
{
    const KIND: RouteKind;
    /// `status.parents`, in the HTTPRoute types (GRPCRoute's have the same shape). An error
    /// means the entries cannot be carried over intact, so nothing may be written.
    fn parents(&self) -> Result<Vec<HttpRouteStatusParents>, serde_json::Error>;
    fn names_a_service(&self) -> bool;
}

impl RouteObject for HttpRoute {
    const KIND: RouteKind = RouteKind::Http;
    fn parents(&self) -> Result<Vec<HttpRouteStatusParents>, serde_json::Error> {
        Ok(self
            .status
            .as_ref()
            .map(|s| s.parents.clone())
            .unwrap_or_default())
    }
    fn names_a_service(&self) -> bool {
        route_status::names_a_service(self.spec.parent_refs.as_deref().unwrap_or_default())
    }
}

impl RouteObject for GrpcRoute {
    const KIND: RouteKind = RouteKind::Grpc;
    fn parents(&self) -> Result<Vec<HttpRouteStatusParents>, serde_json::Error> {
        match &self.status {
            Some(s) => serde_json::from_value(serde_json::to_value(&s.parents)?),
            None => Ok(Vec::new()),
        }
    }
    fn names_a_service(&self) -> bool {
        self.spec.parent_refs.iter().flatten().any(|p| {
            matches!(p.group.as_deref(), Some("" | "core")) && p.kind.as_deref() == Some("Service")
        })
    }
}

/// What happened to one route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Written,
    Unchanged,
    /// The route changed since the index was built; the next build covers it.
    Stale,
    /// Deleted meanwhile.
    Gone,
    /// Leadership was lost: nothing more is written.
    NotLeader,
    /// Lost the race [`ATTEMPTS`] times; tried again later.
    Contended,
    /// Our last write is not in the store yet.
    Awaiting,
}

/// Routes whose status we patched but whose new version the watch has not delivered yet:
/// route → the resourceVersion the patch replaced. While the store still holds that version,
/// its status predates our write; merging into it again would only earn a 409.
type Unseen = HashMap<(RouteKind, String, String), String>;

/// Writes status after each index build while this replica leads, until `stop` is set.
pub async fn run(
    client: Client,
    stores: Stores,
    mut index: watch::Receiver<Arc<Index>>,
    mut leader: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    // Before the first index built from the cluster, every route would look as if it had
    // lost its Service parents.
    tokio::select! {
        changed = index.changed() => if changed.is_err() { return },
        _ = stop.wait_for(|s| *s) => return,
    }
    let mut retry = false;
    let mut unseen = Unseen::new();
    loop {
        let current = index.borrow_and_update().clone();
        let leading = *leader.borrow_and_update();
        if leading {
            tokio::select! {
                failed = pass(&client, &stores, &current, &leader, &mut unseen) => retry = failed,
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        tokio::select! {
            changed = index.changed() => if changed.is_err() { return },
            changed = leader.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RETRY_AFTER), if retry && leading => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Brings every route's status in line with `index`. Returns whether some write failed.
async fn pass(
    client: &Client,
    stores: &Stores,
    index: &Index,
    leader: &watch::Receiver<bool>,
    unseen: &mut Unseen,
) -> bool {
    unseen.retain(|(kind, ns, name), _| match kind {
        RouteKind::Http => stores.http_route(ns, name).is_some(),
        RouteKind::Grpc => stores.grpc_route(ns, name).is_some(),
    });
    let mut failed = false;
    let mut written = 0;
    let mut note = |kind: RouteKind, ns: &str, name: &str, r: Result<Outcome, kube::Error>| match r
    {
        Ok(Outcome::Written) => written += 1,
        Ok(Outcome::Contended) => {
            failed = true;
            tracing::warn!(
                "{} {ns}/{name}: status changed by others {ATTEMPTS} times while being \
                     written; trying again in {} s",
                kind.as_str(),
                RETRY_AFTER.as_secs()
            );
        }
        Ok(_) => {}
        Err(e) => {
            failed = true;
            tracing::warn!("{} {ns}/{name}: cannot write status: {e}", kind.as_str());
        }
    };
    let mut modeled = HashSet::new();
    for status in index.statuses() {
        if !*leader.borrow() {
            return false;
        }
        let (ns, name) = (status.namespace.as_str(), status.name.as_str());
        modeled.insert((status.kind, ns, name));
        let result = match status.kind {
            RouteKind::Http => match stores.http_route(ns, name) {
                Some(route) => write(client, status, route, leader, unseen).await,
                None => Ok(Outcome::Gone),
            },
            RouteKind::Grpc => match stores.grpc_route(ns, name) {
                Some(route) => write(client, status, route, leader, unseen).await,
                None => Ok(Outcome::Gone),
            },
        };
        note(status.kind, ns, name, result);
    }
    // Routes that stopped naming a Service get no status from the model, but may still
    // carry entries of ours.
    let http = stores.http_routes().unwrap_or_default();
    let grpc = stores.grpc_routes().unwrap_or_default();
    for route in http {
        let result = clear_stale(client, &modeled, route, leader, unseen).await;
        if let Some((ns, name, result)) = result {
            note(RouteKind::Http, &ns, &name, result);
        }
    }
    for route in grpc {
        let result = clear_stale(client, &modeled, route, leader, unseen).await;
        if let Some((ns, name, result)) = result {
            note(RouteKind::Grpc, &ns, &name, result);
        }
    }
    if written > 0 {
        tracing::debug!("route status written to {written} routes");
    }
    failed
}

/// Removes our entries from a route that names no Service parent.
async fn clear_stale<R: RouteObject>(
    client: &Client,
    modeled: &HashSet<(RouteKind, &str, &str)>,
    route: Arc<R>,
    leader: &watch::Receiver<bool>,
    unseen: &mut Unseen,
) -> Option<(String, String, Result<Outcome, kube::Error>)> {
    let ns = route.meta().namespace.clone()?;
    let name = route.meta().name.clone()?;
    if modeled.contains(&(R::KIND, ns.as_str(), name.as_str()))
        || route.names_a_service()
        || !route.parents().is_ok_and(|p| route_status::has_ours(&p))
    {
        return None;
    }
    let empty = RouteStatus {
        kind: R::KIND,
        namespace: ns.clone(),
        name: name.clone(),
        observed_generation: route.meta().generation,
        parents: Vec::new(),
    };
    let result = write(client, &empty, route, leader, unseen).await;
    Some((ns, name, result))
}

/// Writes one route's status, re-reading it after each conflict.
async fn write<R: RouteObject>(
    client: &Client,
    ours: &RouteStatus,
    cached: Arc<R>,
    leader: &watch::Receiver<bool>,
    unseen: &mut Unseen,
) -> Result<Outcome, kube::Error> {
    let key = (R::KIND, ours.namespace.clone(), ours.name.clone());
    match unseen.get(&key) {
        Some(replaced) if cached.meta().resource_version.as_ref() == Some(replaced) => {
            return Ok(Outcome::Awaiting);
        }
        Some(_) => {
            unseen.remove(&key);
        }
        None => {}
    }
    let api: Api<R> = Api::namespaced(client.clone(), &ours.namespace);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    let mut route = cached;
    for _ in 0..ATTEMPTS {
        // The index was built from another version of the route (its status says which):
        // writing now would report a generation it did not read.
        if route.meta().generation != ours.observed_generation {
            return Ok(Outcome::Stale);
        }
        let current = match route.parents() {
            Ok(current) => current,
            Err(e) => {
                tracing::error!(
                    "{} {}/{}: status.parents cannot be read, so it is not written: {e}",
                    R::KIND.as_str(),
                    ours.namespace,
                    ours.name
                );
                return Ok(Outcome::Unchanged);
            }
        };
        let Some(parents) = desired_parents(&current, ours, Timestamp::now()) else {
            return Ok(Outcome::Unchanged);
        };
        if !*leader.borrow() {
            return Ok(Outcome::NotLeader);
        }
        let patch = json!({
            "metadata": {"resourceVersion": route.meta().resource_version},
            "status": {"parents": parents},
        });
        match api
            .patch_status(&ours.name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                if let Some(version) = route.meta().resource_version.clone() {
                    unseen.insert(key, version);
                }
                return Ok(Outcome::Written);
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                tracing::debug!(
                    "{} {}/{} changed while its status was written; reading it again",
                    R::KIND.as_str(),
                    ours.namespace,
                    ours.name
                );
                match api.get_opt(&ours.name).await? {
                    Some(fresh) => route = Arc::new(fresh),
                    None => return Ok(Outcome::Gone),
                }
            }
            Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(Outcome::Gone),
            Err(e) => return Err(e),
        }
    }
    Ok(Outcome::Contended)
}
