//! The thin layer of `doctor`: the requests to the API server, each answer (or the reason for
//! none) kept as a [`Fetched`] for the verdicts. Only reads: `get` and `list`, and one `get`
//! through the service proxy.

use std::fmt::Debug;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use serde::de::DeserializeOwned;

use super::checks::{
    Access, Cluster, Component, ControlPlane, Fetched, INJECT_ENABLED, INJECT_LABEL,
    INJECTOR_SERVICE, WEBHOOK_CONFIGURATION,
};

/// Where to look and how long to wait.
#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    pub issuer_secret: String,
    /// For each request; an API server that does not answer in time leaves that check unknown.
    pub timeout: Duration,
}

/// Why doctor could not read the API server at all (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("cannot read the Kubernetes API server: {0}")]
pub struct Unreachable(pub String);

/// Reads everything the checks judge. Fails only when the API server cannot be read at all:
/// no answer, or credentials it refuses (401) on `/version`, which every authenticated user may
/// read. After that, each request that fails leaves its own check unknown.
pub async fn fetch(client: &kube::Client, s: &Settings) -> Result<Cluster, Unreachable> {
    let version = match tokio::time::timeout(s.timeout, client.apiserver_version()).await {
        Err(_) => {
            return Err(Unreachable(format!(
                "no answer to GET /version within {:?}",
                s.timeout
            )));
        }
        Ok(Err(kube::Error::Api(status))) if status.code == 401 => {
            return Err(Unreachable(format!(
                "401 Unauthorized: the credentials were refused ({})",
                status.message.trim()
            )));
        }
        Ok(Err(kube::Error::Api(status))) => Fetched::Failed(api_words(&status)),
        Ok(Err(e)) => return Err(Unreachable(e.to_string())),
        Ok(Ok(info)) => Fetched::Found(info),
    };
    let ns = s.namespace.as_str();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = |name: &'static str| {
        let crds = crds.clone();
        let access =
            Access::new("get", "customresourcedefinitions.apiextensions.k8s.io").named(name);
        async move { get(s, &crds, name, access).await }
    };
    let control_plane = join_all(Component::ALL.map(|c| control_plane(client, s, c)));
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let slice_labels = format!("kubernetes.io/service-name={INJECTOR_SERVICE}");
    let inject_labels = format!("{INJECT_LABEL}={INJECT_ENABLED}");
    let (
        httproute_crd,
        grpcroute_crd,
        control_plane,
        webhook,
        injector_slices,
        injector_ready,
        issuer_secret,
        labelled,
    ) = tokio::join!(
        crd("httproutes.gateway.networking.k8s.io"),
        crd("grpcroutes.gateway.networking.k8s.io"),
        control_plane,
        get(
            s,
            &webhooks,
            WEBHOOK_CONFIGURATION,
            Access::new(
                "get",
                "mutatingwebhookconfigurations.admissionregistration.k8s.io"
            )
            .named(WEBHOOK_CONFIGURATION),
        ),
        list(
            s,
            &slices,
            &slice_labels,
            Access::new("list", "endpointslices.discovery.k8s.io").within(ns),
        ),
        injector_ready(client, s),
        get(
            s,
            &secrets,
            &s.issuer_secret,
            Access::new("get", "secrets")
                .named(&s.issuer_secret)
                .within(ns),
        ),
        list(
            s,
            &namespaces,
            &inject_labels,
            Access::new("list", "namespaces"),
        ),
    );
    let labelled_names: Vec<String> = labelled
        .found()
        .into_iter()
        .flatten()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let labelled_pods = join_all(labelled_names.into_iter().map(|name| async move {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &name);
        let fetched = list(s, &pods, "", Access::new("list", "pods").within(&name)).await;
        (name, fetched)
    }))
    .await;
    Ok(Cluster {
        namespace: s.namespace.clone(),
        issuer_secret_name: s.issuer_secret.clone(),
        version,
        httproute_crd,
        grpcroute_crd,
        control_plane,
        webhook,
        injector_slices,
        injector_ready,
        issuer_secret,
        labelled,
        labelled_pods,
    })
}

async fn control_plane(client: &kube::Client, s: &Settings, c: Component) -> ControlPlane {
    let ns = s.namespace.as_str();
    let name = c.name();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let labels = format!(
        "app.kubernetes.io/name={name},app.kubernetes.io/component={}",
        c.short()
    );
    let (deployment, pods) = tokio::join!(
        get(
            s,
            &deployments,
            &name,
            Access::new("get", "deployments.apps")
                .named(&name)
                .within(ns),
        ),
        list(s, &pods, &labels, Access::new("list", "pods").within(ns),),
    );
    ControlPlane {
        component: c,
        deployment,
        pods,
    }
}

/// `GET /api/v1/namespaces/<ns>/services/trellis-injector:admin/proxy/ready`: the API server
/// itself calls the injector's admin port, over the path its webhook calls take.
async fn injector_ready(client: &kube::Client, s: &Settings) -> Fetched<String> {
    let ns = &s.namespace;
    // The name RBAC sees is the service with its port, as in the path.
    let service = format!("{INJECTOR_SERVICE}:admin");
    let access = Access::new("get", "services/proxy")
        .named(&service)
        .within(ns);
    let path = format!("/api/v1/namespaces/{ns}/services/{service}/proxy/ready");
    let request = match http::Request::get(path).body(Vec::new()) {
        Ok(r) => r,
        Err(e) => return Fetched::Failed(e.to_string()),
    };
    match tokio::time::timeout(s.timeout, client.request_text(request)).await {
        Err(_) => Fetched::Failed(format!("no answer within {:?}", s.timeout)),
        Ok(result) => classify(result, access),
    }
}

async fn get<K>(s: &Settings, api: &Api<K>, name: &str, access: Access) -> Fetched<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug,
{
    match tokio::time::timeout(s.timeout, api.get(name)).await {
        Err(_) => Fetched::Failed(format!("no answer within {:?}", s.timeout)),
        Ok(result) => classify(result, access),
    }
}

async fn list<K>(s: &Settings, api: &Api<K>, labels: &str, access: Access) -> Fetched<Vec<K>>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug,
{
    let params = if labels.is_empty() {
        ListParams::default()
    } else {
        ListParams::default().labels(labels)
    };
    match tokio::time::timeout(s.timeout, api.list(&params)).await {
        Err(_) => Fetched::Failed(format!("no answer within {:?}", s.timeout)),
        Ok(result) => classify(result.map(|l| l.items), access),
    }
}

/// An answer in the checks' terms. A missing object is the API server's NotFound Status; a
/// bare 404 (its mux's "404 page not found": the resource is not served) is a failure to read.
fn classify<T>(result: Result<T, kube::Error>, access: Access) -> Fetched<T> {
    match result {
        Ok(t) => Fetched::Found(t),
        Err(kube::Error::Api(status)) if status.is_forbidden() => Fetched::Denied(access),
        Err(kube::Error::Api(status)) if status.code == 404 && status.reason == "NotFound" => {
            Fetched::Missing
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Fetched::Failed(format!(
            "the API server does not serve {} (404 page not found)",
            access.resource
        )),
        Err(kube::Error::Api(status)) => Fetched::Failed(api_words(&status)),
        Err(e) => Fetched::Failed(e.to_string()),
    }
}

/// `503 ServiceUnavailable: no endpoints available for service "trellis-injector:admin"`.
fn api_words(status: &kube::core::Status) -> String {
    let reason = if status.reason.is_empty() || status.reason == "Failed to parse error data" {
        String::new()
    } else {
        format!(" {}", status.reason)
    };
    format!("{}{reason}: {}", status.code, status.message.trim())
}
