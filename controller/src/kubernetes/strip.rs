//! What Kubernetes mode keeps of each watched object: only the fields the model reads, so that
//! the in-memory copy of a large cluster stays small. Every object passes through one of these
//! functions before it reaches a reflector store.
//!
//! Dropped everywhere: `managedFields` (often the larger half of an object), annotations
//! (`kubectl.kubernetes.io/last-applied-configuration` holds a second copy of the object),
//! labels, owner references, finalizers and UIDs. What each kind keeps is listed on its
//! function; `docs/reference/controller.md` gives the same list to users.

use gateway_api::experimental::grpcroutes::GrpcRoute;
use gateway_api::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{
    ObjectReference, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::index::PROXY_VERSION_ANNOTATION;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Name, namespace and resourceVersion (the watch resumes from it and the status writer's
/// patches are conditional on it), plus the one label and annotation a kind needs.
fn meta(meta: &mut ObjectMeta, label: Option<&str>, annotation: Option<&str>) {
    let keep = |map: Option<std::collections::BTreeMap<String, String>>, key: Option<&str>| {
        let key = key?;
        let value = map?.remove(key)?;
        Some([(key.to_string(), value)].into())
    };
    let old = std::mem::take(meta);
    *meta = ObjectMeta {
        name: old.name,
        namespace: old.namespace,
        resource_version: old.resource_version,
        labels: keep(old.labels, label),
        annotations: keep(old.annotations, annotation),
        ..Default::default()
    };
}

/// Services keep `type`, `clusterIP(s)`, each port's name, number, protocol and appProtocol,
/// and the `trellis.dev/opaque-ports` annotation.
pub fn service(svc: &mut Service) {
    meta(
        &mut svc.metadata,
        None,
        Some(trellis_api::policy::OPAQUE_PORTS_ANNOTATION),
    );
    svc.status = None;
    svc.spec = svc.spec.take().map(|spec| ServiceSpec {
        type_: spec.type_,
        cluster_ip: spec.cluster_ip,
        cluster_ips: spec.cluster_ips,
        ports: spec.ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| ServicePort {
                    name: p.name,
                    port: p.port,
                    protocol: p.protocol,
                    app_protocol: p.app_protocol,
                    ..Default::default()
                })
                .collect()
        }),
        ..Default::default()
    });
}

/// EndpointSlices keep the `kubernetes.io/service-name` label, `addressType`, the ports, and
/// each endpoint's addresses, conditions and target (kind and name).
pub fn endpoint_slice(slice: &mut EndpointSlice) {
    meta(&mut slice.metadata, Some(SERVICE_NAME_LABEL), None);
    for ep in &mut slice.endpoints {
        let old = std::mem::take(ep);
        *ep = Endpoint {
            addresses: old.addresses,
            conditions: old.conditions,
            target_ref: old.target_ref.map(|t| ObjectReference {
                kind: t.kind,
                name: t.name,
                ..Default::default()
            }),
            ..Default::default()
        };
    }
    if let Some(ports) = &mut slice.ports {
        for p in ports {
            *p = EndpointPort {
                name: p.name.take(),
                port: p.port,
                protocol: p.protocol.take(),
                app_protocol: None,
            };
        }
    }
}

/// Meshed pods (those with the `trellis.dev/proxy-version` annotation) keep that annotation,
/// `spec.serviceAccountName`, `spec.hostNetwork`, `status.phase` and `status.podIP(s)` (a
/// finished or host-network pod does not own its IP); other pods keep only their name, since
/// the model gives them no identity.
pub fn pod(pod: &mut Pod) {
    meta(&mut pod.metadata, None, Some(PROXY_VERSION_ANNOTATION));
    if pod.metadata.annotations.is_none() {
        pod.spec = None;
        pod.status = None;
        return;
    }
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        service_account_name: spec.service_account_name,
        host_network: spec.host_network,
        ..Default::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status
            .pod_ips
            .map(|ips| ips.into_iter().map(|p| PodIP { ip: p.ip }).collect()),
        ..Default::default()
    });
}

/// Routes keep their whole spec, `generation` and `creationTimestamp` (precedence between
/// routes), and their status: the status writer merges into the entries other controllers
/// wrote.
pub fn http_route(route: &mut HttpRoute) {
    route_meta(&mut route.metadata, None);
}

/// As [`http_route`], keeping the `retry.trellis.dev/grpc` annotation.
pub fn grpc_route(route: &mut GrpcRoute) {
    route_meta(
        &mut route.metadata,
        Some(trellis_api::policy::GRPC_RETRY_ANNOTATION),
    );
}

fn route_meta(m: &mut ObjectMeta, annotation: Option<&str>) {
    let generation = m.generation;
    let created = m.creation_timestamp.take();
    meta(m, None, annotation);
    m.generation = generation;
    m.creation_timestamp = created;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// Runs `strip` on an object given as API JSON and returns the JSON that stays.
    fn stripped<K: serde::de::DeserializeOwned + serde::Serialize>(
        strip: fn(&mut K),
        object: Value,
    ) -> Value {
        let mut k: K = serde_json::from_value(object).unwrap();
        strip(&mut k);
        serde_json::to_value(&k).unwrap()
    }

    fn noisy_meta(extra: Value) -> Value {
        let mut m = json!({
            "name": "x", "namespace": "ns", "resourceVersion": "7", "uid": "u-1",
            "generation": 3, "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app": "x", "kubernetes.io/service-name": "web"},
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{...}",
                "trellis.dev/proxy-version": "0.1.0"
            },
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {}}],
            "ownerReferences": [{"apiVersion": "v1", "kind": "ReplicaSet", "name": "rs", "uid": "u-2"}],
            "finalizers": ["f"]
        });
        if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                m.insert(k.clone(), v.clone());
            }
        }
        m
    }

    #[test]
    fn services_keep_type_ips_and_ports() {
        let got = stripped(
            service,
            json!({
                "apiVersion": "v1", "kind": "Service", "metadata": noisy_meta(json!({})),
                "spec": {
                    "type": "ClusterIP", "clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1"],
                    "selector": {"app": "x"}, "sessionAffinity": "None", "ipFamilies": ["IPv4"],
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "appProtocol": "http"}]
                },
                "status": {"loadBalancer": {}}
            }),
        );
        assert_eq!(
            got,
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "x", "namespace": "ns", "resourceVersion": "7"},
                "spec": {
                    "type": "ClusterIP", "clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1"],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "appProtocol": "http"}]
                }
            })
        );
    }

    #[test]
    fn endpoint_slices_keep_the_service_label_addresses_conditions_and_ports() {
        let got = stripped(
            endpoint_slice,
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": noisy_meta(json!({})),
                "addressType": "IPv4",
                "endpoints": [{
                    "addresses": ["10.1.0.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": "node-1", "zone": "a", "hostname": "h", "hints": {"forZones": [{"name": "a"}]},
                    "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "ns", "uid": "u-3", "resourceVersion": "9"}
                }],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]
            }),
        );
        assert_eq!(
            got,
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "x", "namespace": "ns", "resourceVersion": "7",
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "endpoints": [{
                    "addresses": ["10.1.0.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
                    "targetRef": {"kind": "Pod", "name": "web-1"}
                }],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
            })
        );
    }

    fn pod_json(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": noisy_meta(json!({"annotations": annotations})),
            "spec": {
                "serviceAccountName": "web", "nodeName": "node-1", "hostNetwork": false,
                "containers": [{"name": "app", "image": "web:1", "env": [{"name": "A", "value": "b"}]}]
            },
            "status": {
                "phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}],
                "hostIP": "192.168.0.1",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "app", "image": "web:1", "imageID": "", "ready": true, "restartCount": 0}]
            }
        })
    }

    #[test]
    fn meshed_pods_keep_the_marker_service_account_network_phase_and_ips() {
        let got = stripped(
            pod,
            pod_json(json!({"trellis.dev/proxy-version": "0.1.0", "other": "x"})),
        );
        assert_eq!(
            got,
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "x", "namespace": "ns", "resourceVersion": "7",
                             "annotations": {"trellis.dev/proxy-version": "0.1.0"}},
                "spec": {"serviceAccountName": "web", "hostNetwork": false, "containers": []},
                "status": {"phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}]}
            })
        );
    }

    #[test]
    fn other_pods_keep_only_their_name() {
        let got = stripped(pod, pod_json(json!({"other": "x"})));
        assert_eq!(
            got,
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "x", "namespace": "ns", "resourceVersion": "7"}
            })
        );
    }

    #[test]
    fn routes_keep_spec_status_generation_and_creation_time() {
        let spec = json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [{"backendRefs": [{"group": "", "kind": "Service", "name": "web-v2", "port": 80, "weight": 1}]}]
        });
        let status = json!({"parents": [{
            "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"},
            "controllerName": "example.com/gateway",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3}]
        }]});
        let meta_out = json!({"name": "x", "namespace": "ns", "resourceVersion": "7",
                              "generation": 3, "creationTimestamp": "2026-01-01T00:00:00Z"});
        let route = |api_version: &str, kind: &str| {
            json!({
                "apiVersion": api_version, "kind": kind, "metadata": noisy_meta(json!({})),
                "spec": spec, "status": status
            })
        };
        let http = stripped(
            http_route,
            route("gateway.networking.k8s.io/v1", "HTTPRoute"),
        );
        assert_eq!(http["metadata"], meta_out);
        assert_eq!(http["spec"]["parentRefs"], spec["parentRefs"]);
        assert_eq!(http["status"], status);
        let grpc = stripped(
            grpc_route,
            route("gateway.networking.k8s.io/v1", "GRPCRoute"),
        );
        assert_eq!(grpc["metadata"], meta_out);
        assert_eq!(grpc["status"], status);
    }
}
