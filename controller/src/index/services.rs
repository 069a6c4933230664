//! Services, their endpoints and the identities behind them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use trellis_api::Identity;
use trellis_api::policy::{Endpoint, OPAQUE_PORTS_ANNOTATION, ObjectRef, port_list_contains};

use super::Config;

/// The annotation the injector puts on every meshed pod; only such pods get an identity, since
/// only they can answer mutual TLS.
pub const PROXY_VERSION_ANNOTATION: &str = "trellis.dev/proxy-version";
/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Debug)]
pub struct ServiceInfo {
    pub id: ObjectRef,
    /// Cluster IPs; empty for headless and ExternalName Services, which cannot be parents.
    pub cluster_ips: Vec<IpAddr>,
    pub external_name: bool,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug)]
pub struct ServicePort {
    pub port: u16,
    pub name: Option<String>,
    pub app_protocol: Option<String>,
}

impl ServiceInfo {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Why this Service cannot be a route parent, if it cannot.
    pub fn parent_problem(&self) -> Option<String> {
        if self.external_name {
            Some(format!(
                "Service {} is of type ExternalName: only Services with a cluster IP can be route parents",
                self.id
            ))
        } else if self.cluster_ips.is_empty() {
            Some(format!(
                "Service {} is headless: only Services with a cluster IP can be route parents",
                self.id
            ))
        } else {
            None
        }
    }
}

/// One endpoint as read from a slice, before it is tied to a port.
#[derive(Clone, Debug)]
struct SliceEndpoint {
    ip: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    pod: Option<String>,
    /// Port name → target port number, from the slice that listed the endpoint.
    ports: Vec<(String, u16)>,
}

/// Services by name and cluster IP, and the endpoints of each Service.
#[derive(Debug, Default)]
pub struct Services {
    by_id: BTreeMap<ObjectRef, ServiceInfo>,
    by_ip: HashMap<IpAddr, ObjectRef>,
    endpoints: HashMap<ObjectRef, Vec<SliceEndpoint>>,
    /// Meshed pods: (namespace, pod name) → identity.
    pod_identity: HashMap<(String, String), Identity>,
    /// Meshed pods by IP, to give "not a Service" answers an identity.
    ip_identity: HashMap<IpAddr, Identity>,
    /// The Services whose EndpointSlices name each pod (namespace, name): what a change of
    /// the pod touches.
    pod_services: HashMap<(String, String), BTreeSet<ObjectRef>>,
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace
        .clone()
        .unwrap_or_else(|| "default".to_string())
}

/// A pod that answers mutual TLS with its identity, at the IPs it holds.
#[derive(Debug, PartialEq, Eq)]
pub struct MeshedPod {
    pub namespace: String,
    pub name: String,
    pub identity: Identity,
    pub ips: Vec<IpAddr>,
}

/// The pod as the model sees it: `None` unless it carries the injector's marker and still
/// holds its own IP. A finished pod (phase `Succeeded` or `Failed`: a completed Job, an
/// evicted pod) keeps its `podIP` in the API, but the IP goes back to the node's pool and is
/// given to a new pod; a `hostNetwork` pod's IP is its node's, shared with every other such
/// pod. Either would hand a live pod's IP the wrong identity, and mutual TLS to it would fail.
pub fn meshed_pod(pod: &Pod, config: &Config) -> Option<MeshedPod> {
    let annotations = pod.metadata.annotations.as_ref()?;
    if !annotations.contains_key(PROXY_VERSION_ANNOTATION) {
        return None;
    }
    let name = pod.metadata.name.clone()?;
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return None;
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let namespace = namespace_of(&pod.metadata);
    let sa = spec
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let identity = Identity::new(config.trust_domain.clone(), namespace.clone(), sa);
    let mut ips: Vec<IpAddr> = status
        .into_iter()
        .flat_map(|s| {
            s.pod_ips
                .iter()
                .flatten()
                .map(|p| p.ip.as_str())
                .chain(s.pod_ip.as_deref())
        })
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    Some(MeshedPod {
        namespace,
        name,
        identity,
        ips,
    })
}

impl Services {
    pub fn build(
        services: &[Service],
        slices: &[EndpointSlice],
        pods: &[Pod],
        config: &Config,
    ) -> Self {
        let mut this = Services::default();
        for svc in services {
            let Some(name) = svc.metadata.name.clone() else {
                continue;
            };
            let id = ObjectRef {
                namespace: namespace_of(&svc.metadata),
                name,
            };
            let spec = svc.spec.clone().unwrap_or_default();
            let opaque = svc
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(OPAQUE_PORTS_ANNOTATION));
            let external_name = spec.type_.as_deref() == Some("ExternalName");
            let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
            if ips.is_empty() {
                ips.extend(spec.cluster_ip.clone());
            }
            let cluster_ips: Vec<IpAddr> = if external_name {
                Vec::new()
            } else {
                ips.iter().filter_map(|ip| ip.parse().ok()).collect()
            };
            let ports = spec
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
                .filter_map(|p| {
                    let port = u16::try_from(p.port).ok()?;
                    // Listed as opaque: TCP, unless the port says what it speaks itself.
                    let app_protocol = p.app_protocol.or_else(|| {
                        opaque
                            .is_some_and(|list| port_list_contains(list, port))
                            .then(|| "tcp".to_string())
                    });
                    Some(ServicePort {
                        port,
                        name: p.name.filter(|n| !n.is_empty()),
                        app_protocol,
                    })
                })
                .collect();
            for ip in &cluster_ips {
                this.by_ip.insert(*ip, id.clone());
            }
            this.by_id.insert(
                id.clone(),
                ServiceInfo {
                    id,
                    cluster_ips,
                    external_name,
                    ports,
                },
            );
        }

        for pod in pods {
            let Some(meshed) = meshed_pod(pod, config) else {
                continue;
            };
            for ip in meshed.ips {
                this.ip_identity.insert(ip, meshed.identity.clone());
            }
            this.pod_identity
                .insert((meshed.namespace, meshed.name), meshed.identity);
        }

        for slice in slices {
            let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            let id = ObjectRef {
                namespace: namespace_of(&slice.metadata),
                name: service.clone(),
            };
            let ports: Vec<(String, u16)> = slice
                .ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
                .filter_map(|p| {
                    let port = u16::try_from(p.port?).ok()?;
                    Some((p.name.clone().unwrap_or_default(), port))
                })
                .collect();
            let list = this.endpoints.entry(id.clone()).or_default();
            for ep in &slice.endpoints {
                let cond = ep.conditions.clone().unwrap_or_default();
                // Kubernetes asks consumers to read an unknown readiness as ready.
                let ready = cond.ready.unwrap_or(true);
                let serving = cond.serving.unwrap_or(ready);
                let terminating = cond.terminating.unwrap_or(false);
                let pod = ep
                    .target_ref
                    .as_ref()
                    .filter(|t| t.kind.as_deref() == Some("Pod"))
                    .and_then(|t| t.name.clone());
                if let Some(pod) = &pod {
                    this.pod_services
                        .entry((id.namespace.clone(), pod.clone()))
                        .or_default()
                        .insert(id.clone());
                }
                for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                    list.push(SliceEndpoint {
                        ip,
                        ready,
                        serving,
                        terminating,
                        pod: pod.clone(),
                        ports: ports.clone(),
                    });
                }
            }
        }
        this
    }

    pub fn get(&self, id: &ObjectRef) -> Option<&ServiceInfo> {
        self.by_id.get(id)
    }

    pub fn by_ip(&self, ip: &IpAddr) -> Option<&ServiceInfo> {
        self.by_ip.get(ip).and_then(|id| self.by_id.get(id))
    }

    pub fn all(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.by_id.values()
    }

    /// The Services whose endpoints name the pod `namespace/name`.
    pub fn services_of_pod(&self, pod: &(String, String)) -> impl Iterator<Item = &ObjectRef> {
        self.pod_services.get(pod).into_iter().flatten()
    }

    /// The identity of a meshed pod at `ip`, if any.
    pub fn identity_of_ip(&self, ip: &IpAddr) -> Option<&Identity> {
        self.ip_identity.get(ip)
    }

    /// The endpoints of one Service port: the ready ones, or, when none is ready, those still
    /// serving while they terminate (so a rollout's last pods keep answering).
    pub fn endpoints(&self, service: &ServiceInfo, port: &ServicePort) -> Vec<Endpoint> {
        let Some(list) = self.endpoints.get(&service.id) else {
            return Vec::new();
        };
        let port_name = port.name.as_deref().unwrap_or("");
        let mut seen = HashSet::new();
        let mut ready = Vec::new();
        let mut fallback = Vec::new();
        for ep in list {
            let Some(&(_, target)) = ep.ports.iter().find(|(n, _)| n == port_name) else {
                continue;
            };
            let addr = SocketAddr::new(ep.ip, target);
            if !seen.insert(addr) {
                continue;
            }
            let identity = ep.pod.as_ref().and_then(|pod| {
                self.pod_identity
                    .get(&(service.id.namespace.clone(), pod.clone()))
                    .cloned()
            });
            let endpoint = Endpoint {
                addr,
                identity,
                pod: ep.pod.clone(),
                terminating: ep.terminating,
            };
            if ep.ready && !ep.terminating {
                ready.push(endpoint);
            } else if ep.serving {
                fallback.push(Endpoint {
                    terminating: true,
                    ..endpoint
                });
            }
        }
        let mut out = if ready.is_empty() { fallback } else { ready };
        out.sort_by_key(|e| e.addr);
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(annotated: bool, host_network: Option<bool>, phase: Option<&str>) -> Pod {
        let mut pod = json!({
            "metadata": {"name": "job-1", "namespace": "batch"},
            "spec": {"serviceAccountName": "worker", "containers": []},
            "status": {"podIP": "10.1.0.7", "podIPs": [{"ip": "10.1.0.7"}, {"ip": "fd00::7"}]}
        });
        if annotated {
            pod["metadata"]["annotations"] = json!({PROXY_VERSION_ANNOTATION: "0.1.0"});
        }
        if let Some(h) = host_network {
            pod["spec"]["hostNetwork"] = json!(h);
        }
        if let Some(p) = phase {
            pod["status"]["phase"] = json!(p);
        }
        serde_json::from_value(pod).unwrap()
    }

    #[test]
    fn only_live_meshed_pods_on_their_own_network_hold_an_identity() {
        let cases = [
            // annotated, hostNetwork, phase, has an identity
            (true, None, Some("Running"), true),
            (true, None, Some("Pending"), true),
            (true, None, Some("Unknown"), true),
            (true, None, None, true),
            (true, Some(false), Some("Running"), true),
            (true, None, Some("Succeeded"), false),
            (true, None, Some("Failed"), false),
            (true, Some(true), Some("Running"), false),
            (false, None, Some("Running"), false),
        ];
        let config = Config::default();
        for (annotated, host_network, phase, want) in cases {
            let got = meshed_pod(&pod(annotated, host_network, phase), &config);
            assert_eq!(
                got.is_some(),
                want,
                "annotated {annotated}, hostNetwork {host_network:?}, phase {phase:?}: {got:?}"
            );
        }
        let live = meshed_pod(&pod(true, None, Some("Running")), &config).unwrap();
        assert_eq!(
            live,
            MeshedPod {
                namespace: "batch".to_string(),
                name: "job-1".to_string(),
                identity: Identity::new("cluster.local", "batch", "worker"),
                ips: vec!["10.1.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
            }
        );
    }
}
