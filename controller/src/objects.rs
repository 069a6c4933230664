//! The cluster objects the model is computed from, whatever their source (a directory of
//! manifests or, in Kubernetes mode, the API server's watches).

use gateway_api::experimental::grpcroutes::GrpcRoute;
use gateway_api::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

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

/// The range local mode allocates cluster IPs from: the usual default of a cluster's Service CIDR.
const LOCAL_SERVICE_NET: [u8; 2] = [10, 96];

impl Objects {
    /// Gives every Service that needs a cluster IP and has none a stable one, as the API server
    /// would. Local manifests are usually written without `clusterIP`; deriving it from the
    /// Service's name keeps it the same across reloads and runs.
    pub fn assign_cluster_ips(&mut self) {
        use std::collections::HashSet;
        use std::net::Ipv4Addr;

        let needs_ip = |svc: &Service| {
            let spec = svc.spec.as_ref();
            let ty = spec.and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP");
            let ip = spec.and_then(|s| s.cluster_ip.as_deref()).unwrap_or("");
            ty != "ExternalName" && ip.is_empty()
        };
        let mut taken: HashSet<String> = self
            .services
            .iter()
            .filter_map(|s| s.spec.as_ref()?.cluster_ip.clone())
            .collect();
        let mut order: Vec<usize> = (0..self.services.len())
            .filter(|&i| needs_ip(&self.services[i]))
            .collect();
        let key = |s: &Service| {
            format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap_or("default"),
                s.metadata.name.as_deref().unwrap_or("")
            )
        };
        order.sort_by_key(|&i| key(&self.services[i]));
        for i in order {
            // FNV-1a: stable across runs and Rust versions, unlike the std hasher.
            let mut h: u32 = 0x811c_9dc5;
            for b in key(&self.services[i]).bytes() {
                h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
            }
            let mut n = h & 0xffff;
            let ip = loop {
                // Skip the network and broadcast-like addresses .0 and .255.
                let [hi, lo] = u16::try_from(n).unwrap_or(1).to_be_bytes();
                let candidate =
                    Ipv4Addr::new(LOCAL_SERVICE_NET[0], LOCAL_SERVICE_NET[1], hi, lo).to_string();
                if lo != 0 && lo != 255 && !taken.contains(&candidate) {
                    break candidate;
                }
                n = (n + 1) & 0xffff;
            };
            taken.insert(ip.clone());
            let spec = self.services[i].spec.get_or_insert_with(Default::default);
            spec.cluster_ip = Some(ip.clone());
            spec.cluster_ips = Some(vec![ip]);
        }
    }
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
