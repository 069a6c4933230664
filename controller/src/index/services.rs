//! Services, their endpoints and the identities behind them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use trellis_api::Identity;
use trellis_api::policy::{Endpoint, ObjectRef};

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
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace
        .clone()
        .unwrap_or_else(|| "default".to_string())
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
                    Some(ServicePort {
                        port: u16::try_from(p.port).ok()?,
                        name: p.name.filter(|n| !n.is_empty()),
                        app_protocol: p.app_protocol,
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
            let annotations = pod.metadata.annotations.as_ref();
            if !annotations.is_some_and(|a| a.contains_key(PROXY_VERSION_ANNOTATION)) {
                continue;
            }
            let Some(name) = pod.metadata.name.clone() else {
                continue;
            };
            let ns = namespace_of(&pod.metadata);
            let sa = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string());
            let identity = Identity::new(config.trust_domain.clone(), ns.clone(), sa);
            if let Some(status) = &pod.status {
                let ips = status
                    .pod_ips
                    .iter()
                    .flatten()
                    .map(|p| p.ip.clone())
                    .chain(status.pod_ip.clone());
                for ip in ips.filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                    this.ip_identity.insert(ip, identity.clone());
                }
            }
            this.pod_identity.insert((ns, name), identity);
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
            let list = this.endpoints.entry(id).or_default();
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
