//! One read of the cluster for the offline tools (`check --kubernetes`, `explain
//! --kubernetes`): a list of every kind the model reads, no watch, nothing written.
//!
//! The requests are the only I/O here; what is done with the lists ([`objects`]) is pure and
//! the same as what the watches feed `serve`: each object [stripped](super::strip), sorted by
//! namespace and name. A route kind the API server does not serve (its Gateway API CRD is not
//! installed: a `404` with a `text/plain` body) is read as no routes of that kind and named in
//! [`Snapshot::missing`], as `serve --kubernetes` does.

use std::fmt;

use gateway_api::experimental::grpcroutes::GrpcRoute;
use gateway_api::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use super::strip;
use super::watch::Kind;
use crate::objects::Objects;

/// Objects per list request: a large cluster is read in pages rather than one huge answer.
const PAGE: u32 = 500;

/// What one read of the cluster gave.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub objects: Objects,
    /// Route kinds the API server does not serve, read as none.
    pub missing: Vec<Kind>,
}

/// Why the cluster cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "cannot list {kind}: forbidden; the caller needs `list` on {} (see the RBAC section \
         of docs/reference/controller.md): {message}",
        resource(*kind)
    )]
    Forbidden { kind: Kind, message: String },
    #[error("cannot list {kind}: the API server answered {code}: {message}")]
    Api {
        kind: Kind,
        code: u16,
        message: String,
    },
    // Not a `#[source]`: the message already holds kube's whole chain.
    #[error("cannot list {kind}: {error}")]
    Request { kind: Kind, error: Box<kube::Error> },
}

/// The resource as RBAC rules name it.
pub fn resource(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "services",
        Kind::EndpointSlice => "endpointslices.discovery.k8s.io",
        Kind::Pod => "pods",
        Kind::HttpRoute => "httproutes.gateway.networking.k8s.io",
        Kind::GrpcRoute => "grpcroutes.gateway.networking.k8s.io",
    }
}

/// The lists as the API server gave them.
#[derive(Clone, Debug, Default)]
pub struct Lists {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    /// `None`: the kind is not served.
    pub http_routes: Option<Vec<HttpRoute>>,
    pub grpc_routes: Option<Vec<GrpcRoute>>,
}

/// Lists every kind the model reads, cluster-wide, one kind after the other.
pub async fn take(client: &Client) -> Result<Snapshot, SnapshotError> {
    let lists = Lists {
        services: list_all(client, Kind::Service).await?.unwrap_or_default(),
        endpoint_slices: list_all(client, Kind::EndpointSlice)
            .await?
            .unwrap_or_default(),
        pods: list_all(client, Kind::Pod).await?.unwrap_or_default(),
        http_routes: list_all(client, Kind::HttpRoute).await?,
        grpc_routes: list_all(client, Kind::GrpcRoute).await?,
    };
    Ok(objects(lists))
}

/// Every object of a kind, page by page; `None` for a route kind the API server does not serve.
async fn list_all<K>(client: &Client, kind: Kind) -> Result<Option<Vec<K>>, SnapshotError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + fmt::Debug,
{
    let api = Api::<K>::all(client.clone());
    let mut items = Vec::new();
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = match api.list(&params).await {
            Ok(page) => page,
            Err(e) => return read_error(kind, e).map(|()| None),
        };
        items.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(Some(items)),
        }
    }
}

/// `Ok` when the error means the kind is not served (a route CRD not installed). kube reads the
/// API server's `text/plain` "404 page not found" into a Status it could not parse, so the
/// HTTP code is what counts.
fn read_error(kind: Kind, e: kube::Error) -> Result<(), SnapshotError> {
    let kube::Error::Api(status) = &e else {
        return Err(SnapshotError::Request {
            kind,
            error: Box::new(e),
        });
    };
    let is_route = matches!(kind, Kind::HttpRoute | Kind::GrpcRoute);
    if is_route && status.code == 404 {
        Ok(())
    } else if status.code == 403 || status.is_forbidden() {
        Err(SnapshotError::Forbidden {
            kind,
            message: status.message.clone(),
        })
    } else {
        Err(SnapshotError::Api {
            kind,
            code: status.code,
            message: status.message.clone(),
        })
    }
}

/// The model's input from the lists: each object stripped as the watches strip it, sorted by
/// namespace and name, and a missing route kind read as empty.
pub fn objects(lists: Lists) -> Snapshot {
    let missing = [
        (Kind::HttpRoute, lists.http_routes.is_none()),
        (Kind::GrpcRoute, lists.grpc_routes.is_none()),
    ]
    .into_iter()
    .filter_map(|(kind, missing)| missing.then_some(kind))
    .collect();
    let http_routes = lists.http_routes.unwrap_or_default();
    let grpc_routes = lists.grpc_routes.unwrap_or_default();
    let mut objects = Objects {
        services: prepared(lists.services, strip::service),
        endpoint_slices: prepared(lists.endpoint_slices, strip::endpoint_slice),
        pods: prepared(lists.pods, strip::pod),
        http_routes: prepared(http_routes, strip::http_route),
        grpc_routes: prepared(grpc_routes, strip::grpc_route),
    };
    // The API server gives every Service its address; this only matters for a Service that
    // somehow has none, which then gets the address local mode would give it.
    objects.assign_cluster_ips();
    Snapshot { objects, missing }
}

fn prepared<K: Resource<DynamicType = ()>>(mut items: Vec<K>, strip: fn(&mut K)) -> Vec<K> {
    items.iter_mut().for_each(strip);
    items.sort_by(|a, b| {
        let key = |o: &K| (o.meta().namespace.clone(), o.meta().name.clone());
        key(a).cmp(&key(b))
    });
    items
}
