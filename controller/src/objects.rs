//! The cluster objects the model is computed from, whatever their source (a directory of
//! manifests or, in Kubernetes mode, the API server's watches).

use gateway_api::experimental::grpcroutes::GrpcRoute;
use gateway_api::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::HashSet;
use std::net::Ipv4Addr;

/// Every object the model reads. Routes are read with the experimental channel's types, a
/// superset of the standard ones, so that `retry` and other experimental fields are kept.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    pub http_routes: Vec<HttpRoute>,
    pub grpc_routes: Vec<GrpcRoute>,
}

impl Objects {
    /// Gives every Service that would get a cluster IP from the API server, but was written without
    /// one, an address in 10.96.0.0/16: FNV-1a of `namespace/name` picks it, the next free address
    /// replaces a taken one or one ending in .0 or .255. Written addresses are reserved first and
    /// Services are served in name order, so the result is the same on every run and reload,
    /// whatever the file order: `explain` output and `--to <cluster IP>` stay valid.
    pub fn assign_cluster_ips(&mut self) {
        assign_cluster_ips(&mut self.services);
    }
}

fn assign_cluster_ips(services: &mut [Service]) {
    let wants_ip = |svc: &Service| {
        svc.spec.as_ref().is_none_or(|spec| {
            spec.type_.as_deref() != Some("ExternalName")
                && spec.cluster_ip.as_deref().is_none_or(str::is_empty)
                && spec.cluster_ips.as_ref().is_none_or(Vec::is_empty)
        })
    };
    let mut taken: HashSet<Ipv4Addr> = services
        .iter()
        .filter_map(|svc| svc.spec.as_ref())
        .flat_map(|spec| spec.cluster_ips.iter().flatten().chain(&spec.cluster_ip))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let mut pending: Vec<&mut Service> = services.iter_mut().filter(|s| wants_ip(s)).collect();
    let key = |svc: &Service| {
        let meta = &svc.metadata;
        format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        )
    };
    pending.sort_by_key(|svc| key(svc));
    for svc in pending {
        let mut low = fnv1a(key(svc).as_bytes()) as u16;
        // 65536 candidates, at most 512 of them excluded: a free one exists unless the range
        // holds more Services than any local directory will.
        for _ in 0..=u16::MAX {
            let [third, fourth] = low.to_be_bytes();
            let ip = Ipv4Addr::new(10, 96, third, fourth);
            if fourth != 0 && fourth != 255 && taken.insert(ip) {
                let spec = svc.spec.get_or_insert_with(Default::default);
                spec.cluster_ip = Some(ip.to_string());
                spec.cluster_ips = Some(vec![ip.to_string()]);
                break;
            }
            low = low.wrapping_add(1);
        }
    }
}

/// 32-bit FNV-1a: tiny, and stable across Rust releases, unlike the standard hasher.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(ns: &str, name: &str, ty: Option<&str>, ip: Option<&str>) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: ty.map(Into::into),
                cluster_ip: ip.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ip_of(s: &Service) -> Option<String> {
        s.spec.as_ref()?.cluster_ip.clone()
    }

    #[test]
    fn allocates_stable_distinct_ips_only_where_missing() {
        let mut a = Objects {
            services: vec![
                svc("shop", "web", None, None),
                svc("shop", "api", Some("ClusterIP"), None),
                svc("shop", "fixed", None, Some("10.0.0.7")),
                svc("shop", "headless", None, Some("None")),
                svc("shop", "ext", Some("ExternalName"), None),
            ],
            ..Default::default()
        };
        let mut b = a.clone();
        b.services.reverse();
        a.assign_cluster_ips();
        b.assign_cluster_ips();
        let web = ip_of(&a.services[0]).unwrap();
        let api = ip_of(&a.services[1]).unwrap();
        assert!(web.starts_with("10.96."), "{web}");
        assert_ne!(web, api);
        assert_eq!(ip_of(&a.services[2]).as_deref(), Some("10.0.0.7"));
        assert_eq!(ip_of(&a.services[3]).as_deref(), Some("None"));
        assert_eq!(ip_of(&a.services[4]), None);
        // The order of the objects does not change the allocation.
        assert_eq!(ip_of(&b.services[4]), Some(web));
        assert_eq!(ip_of(&b.services[3]), Some(api));
    }
}
