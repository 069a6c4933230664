//! The model: cluster objects in, outbound policies and route statuses out. Pure, no I/O.
//!
//! Everything is computed once per change of the objects, so that answering a proxy is a map
//! lookup. A build after a change ([`Index::rebuild`]) recomputes the policies of only the
//! Service ports the change touches and shares the others, unchanged (the same `Arc`), with the
//! index before: the discovery server tells an unchanged policy by its pointer.

#[cfg(test)]
mod rebuild_tests;
mod routes;
mod services;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use gateway_api::experimental::httproutes::HttpRouteParentRefs;
use trellis_api::discovery::Target;
pub use trellis_api::policy::ObjectRef;
use trellis_api::policy::{
    Backend, BackendTarget, OutboundPolicy, RouteKind, Routing, ServicePolicy,
};

use crate::objects::Objects;
use crate::status::{
    self, CONTROLLER_NAME, Condition, ParentRef, ParentStatus, RouteStatus, reason,
};
use routes::{CompiledRoute, WireRoute};
pub use services::PROXY_VERSION_ANNOTATION;
use services::Services;

/// Settings of the model that do not come from cluster objects.
#[derive(Clone, Debug)]
pub struct Config {
    /// Trust domain of the SPIFFE identities given to endpoints.
    pub trust_domain: String,
    /// DNS suffix of Service names (`<svc>.<ns>.svc.<cluster_domain>`).
    pub cluster_domain: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            trust_domain: trellis_api::identity::DEFAULT_TRUST_DOMAIN.to_string(),
            cluster_domain: "cluster.local".to_string(),
        }
    }
}

/// The policies of one Service port: the producer routes' for every client, and the consumer
/// routes' for clients in namespaces that have their own routes to this port. Each is an
/// [`OutboundPolicy::Service`], shared with the streams that send it.
#[derive(Debug)]
struct PortPolicies {
    producer: Arc<OutboundPolicy>,
    consumers: BTreeMap<String, Arc<OutboundPolicy>>,
}

/// Everything a proxy or a status writer can ask, computed once per change of the objects.
#[derive(Debug, Default)]
pub struct Index {
    config: Config,
    services: Services,
    ports: HashMap<(ObjectRef, u16), Arc<PortPolicies>>,
    statuses: Vec<RouteStatus>,
    /// For each Service, the route parents whose policies embed its endpoints as a backend.
    parents_of_backend: HashMap<ObjectRef, BTreeSet<ObjectRef>>,
    /// How many Service ports the last build computed (the rest were shared), for metrics.
    recomputed: usize,
}

/// What changed in the objects since the index a [rebuild](Index::rebuild) starts from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Anything may have changed: a first build, a relist, a reload of the manifests.
    pub all: bool,
    /// An HTTPRoute or GRPCRoute changed.
    pub routes: bool,
    /// Services whose object or EndpointSlices changed.
    pub services: BTreeSet<ObjectRef>,
    /// Pods (namespace, name) that changed.
    pub pods: BTreeSet<(String, String)>,
}

impl Changes {
    pub fn everything() -> Changes {
        Changes {
            all: true,
            ..Changes::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }

    /// Adds `other`'s changes to these.
    pub fn merge(&mut self, other: Changes) {
        self.all |= other.all;
        self.routes |= other.routes;
        self.services.extend(other.services);
        self.pods.extend(other.pods);
    }
}

/// The routes of one kind-group (producers, or one namespace's consumers) on one Service port,
/// as indexes into the sorted route list.
#[derive(Debug, Default)]
struct Group {
    http: BTreeSet<usize>,
    grpc: BTreeSet<usize>,
}

/// The Service ports a parentRef attaches a route to, or why it cannot attach.
type Attachment = Result<(ObjectRef, Vec<u16>), (&'static str, String)>;

impl Index {
    /// Computes everything from the objects.
    pub fn build(objects: &Objects, config: &Config) -> Index {
        Index::compute(objects, config, None)
    }

    /// The index of `objects`, which differ from the objects of `self` by `changes`: the
    /// policies of Service ports the changes cannot have touched are shared with `self`.
    pub fn rebuild(&self, objects: &Objects, config: &Config, changes: &Changes) -> Index {
        if changes.all || changes.routes {
            return Index::build(objects, config);
        }
        Index::compute(objects, config, Some((self, changes)))
    }

    /// How many Service ports the build of this index computed rather than shared.
    pub fn recomputed_ports(&self) -> usize {
        self.recomputed
    }

    fn compute(objects: &Objects, config: &Config, before: Option<(&Index, &Changes)>) -> Index {
        let services = Services::build(
            &objects.services,
            &objects.endpoint_slices,
            &objects.pods,
            config,
        );
        let mut routes: Vec<CompiledRoute> = objects
            .http_routes
            .iter()
            .map(|r| routes::compile_http(r, &services))
            .chain(
                objects
                    .grpc_routes
                    .iter()
                    .map(|r| routes::compile_grpc(r, &services)),
            )
            .collect();
        routes.sort_by(|a, b| a.order_key().cmp(&b.order_key()).then(a.kind.cmp(&b.kind)));

        // Attach every route to the Service ports its parentRefs name.
        let mut groups: HashMap<(ObjectRef, u16), BTreeMap<Option<String>, Group>> = HashMap::new();
        let mut attachments: Vec<Vec<(ParentRef, Attachment)>> = Vec::with_capacity(routes.len());
        for (i, route) in routes.iter().enumerate() {
            let mut parents = Vec::new();
            for p in route.parents.iter().filter(|p| is_service_parent(p)) {
                let attachment = attach(p, &route.id.namespace, &services);
                // A route whose rules are all broken is not Accepted, yet still attached: the
                // requests its matches catch get a 500 instead of passing through without the
                // filter their author asked for.
                if let Ok((svc, ports)) = &attachment
                    && route.has_rules()
                {
                    // Producer routes live in the Service's namespace; any other is a consumer
                    // route of its own namespace.
                    let group =
                        (route.id.namespace != svc.namespace).then(|| route.id.namespace.clone());
                    for port in ports {
                        let g = groups
                            .entry((svc.clone(), *port))
                            .or_default()
                            .entry(group.clone())
                            .or_default();
                        match route.kind {
                            RouteKind::Http => g.http.insert(i),
                            RouteKind::Grpc => g.grpc.insert(i),
                        };
                    }
                }
                parents.push((parent_ref(p), attachment));
            }
            attachments.push(parents);
        }

        // Which backend Services each parent's policies embed, to follow endpoint changes.
        let mut parents_of_backend: HashMap<ObjectRef, BTreeSet<ObjectRef>> = HashMap::new();
        for ((parent, _), by_group) in &groups {
            for group in by_group.values() {
                for &i in group.http.iter().chain(&group.grpc) {
                    for backend in routes[i].backend_services() {
                        parents_of_backend
                            .entry(backend)
                            .or_default()
                            .insert(parent.clone());
                    }
                }
            }
        }
        // With an index before and no route change, only the Services touched (their object,
        // slices or pods), and the parents of routes that send to them, are computed again.
        let unchanged = before.map(|(before, changes)| {
            let mut touched: HashSet<&ObjectRef> = changes.services.iter().collect();
            for pod in &changes.pods {
                touched.extend(services.services_of_pod(pod));
                touched.extend(before.services.services_of_pod(pod));
            }
            let mut dirty: HashSet<ObjectRef> = touched.iter().map(|s| (*s).clone()).collect();
            for svc in &touched {
                for map in [&parents_of_backend, &before.parents_of_backend] {
                    dirty.extend(map.get(*svc).into_iter().flatten().cloned());
                }
            }
            (before, dirty)
        });

        let mut ports = HashMap::new();
        let mut recomputed = 0;
        for svc in services.all() {
            let Some(cluster_ip) = svc.cluster_ips.first() else {
                continue;
            };
            if let Some((before, dirty)) = &unchanged
                && !dirty.contains(&svc.id)
            {
                let kept = svc.ports.iter().filter_map(|sp| {
                    let key = (svc.id.clone(), sp.port);
                    let p = before.ports.get(&key)?.clone();
                    Some((key, p))
                });
                let kept: Vec<_> = kept.collect();
                if kept.len() == svc.ports.len() {
                    ports.extend(kept);
                    continue;
                }
            }
            recomputed += svc.ports.len();
            for sp in &svc.ports {
                // The Service's own endpoints: every request without routes, and the
                // connections that are not HTTP with them.
                let own = || Backend {
                    weight: 1,
                    target: BackendTarget::Service {
                        service: svc.id.clone(),
                        port: sp.port,
                        app_protocol: sp.app_protocol.clone(),
                        endpoints: services.endpoints(svc, sp),
                    },
                    filters: Vec::new(),
                };
                let policy = |group: Option<&Group>| {
                    let routing = routing(group, &routes, own);
                    let opaque =
                        (!matches!(routing, Routing::Passthrough { .. })).then(|| Box::new(own()));
                    Arc::new(OutboundPolicy::Service(ServicePolicy {
                        service: svc.id.clone(),
                        cluster_ip: cluster_ip.to_string(),
                        port: sp.port,
                        port_name: sp.name.clone(),
                        app_protocol: sp.app_protocol.clone(),
                        routing,
                        opaque,
                    }))
                };
                let port_groups = groups.get(&(svc.id.clone(), sp.port));
                let producer = policy(port_groups.and_then(|g| g.get(&None)));
                let consumers = port_groups
                    .into_iter()
                    .flatten()
                    .filter_map(|(ns, g)| Some((ns.clone()?, policy(Some(g)))))
                    .collect();
                ports.insert(
                    (svc.id.clone(), sp.port),
                    Arc::new(PortPolicies {
                        producer,
                        consumers,
                    }),
                );
            }
        }

        let mut statuses: Vec<RouteStatus> = routes
            .iter()
            .zip(attachments)
            .filter(|(_, parents)| !parents.is_empty())
            .map(|(route, parents)| route_status(route, parents, &routes, &groups))
            .collect();
        statuses
            .sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));

        Index {
            config: config.clone(),
            services,
            ports,
            statuses,
            parents_of_backend,
            recomputed,
        }
    }

    /// The policy for connections from a pod in `client_namespace` to `target`.
    pub fn outbound(&self, client_namespace: &str, target: &Target) -> OutboundPolicy {
        (*self.outbound_shared(client_namespace, target)).clone()
    }

    /// As [`Index::outbound`], shared: a Service port's policy is the same `Arc` in every
    /// index until a change touches it.
    pub fn outbound_shared(&self, client_namespace: &str, target: &Target) -> Arc<OutboundPolicy> {
        let svc = match target {
            Target::Addr(addr) => match self.services.by_ip(&addr.ip()) {
                Some(svc) => svc,
                None => {
                    return Arc::new(OutboundPolicy::NotAService {
                        identity: self.services.identity_of_ip(&addr.ip()).cloned(),
                    });
                }
            },
            Target::Name { host, .. } => {
                match self
                    .service_id_for_host(host, client_namespace)
                    .and_then(|id| self.services.get(&id))
                {
                    Some(svc) => svc,
                    None => return Arc::new(OutboundPolicy::NotAService { identity: None }),
                }
            }
        };
        match self.ports.get(&(svc.id.clone(), target.port())) {
            Some(p) => p
                .consumers
                .get(client_namespace)
                .unwrap_or(&p.producer)
                .clone(),
            None => Arc::new(OutboundPolicy::NotAService { identity: None }),
        }
    }

    /// The Service a DNS name means for a client in `client_namespace`: `svc`, `svc.ns`,
    /// `svc.ns.svc` or `svc.ns.svc.<cluster-domain>`.
    pub fn service_id_for_host(&self, host: &str, client_namespace: &str) -> Option<ObjectRef> {
        let host = host.trim_end_matches('.');
        let mut labels = host.splitn(4, '.');
        let name = labels.next().filter(|n| !n.is_empty())?;
        let namespace = labels.next().unwrap_or(client_namespace);
        match (labels.next(), labels.next()) {
            (None, None) | (Some("svc"), None) => {}
            (Some("svc"), Some(domain)) if domain == self.config.cluster_domain => {}
            _ => return None,
        }
        Some(ObjectRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// The status of every route that has at least one Service parent, sorted by kind,
    /// namespace and name.
    pub fn statuses(&self) -> &[RouteStatus] {
        &self.statuses
    }
}

fn is_service_parent(p: &HttpRouteParentRefs) -> bool {
    matches!(p.group.as_deref(), Some("" | "core")) && p.kind.as_deref() == Some("Service")
}

fn parent_ref(p: &HttpRouteParentRefs) -> ParentRef {
    ParentRef {
        group: p.group.clone().unwrap_or_default(),
        kind: p.kind.clone().unwrap_or_default(),
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        port: p.port,
        section_name: p.section_name.clone(),
    }
}

fn attach(p: &HttpRouteParentRefs, route_ns: &str, services: &Services) -> Attachment {
    let id = ObjectRef {
        namespace: p.namespace.clone().unwrap_or_else(|| route_ns.to_string()),
        name: p.name.clone(),
    };
    let Some(svc) = services.get(&id) else {
        return Err((
            reason::NO_MATCHING_PARENT,
            format!("Service {id} does not exist"),
        ));
    };
    if let Some(problem) = svc.parent_problem() {
        return Err((reason::UNSUPPORTED_VALUE, problem));
    }
    let ports: Vec<u16> = svc
        .ports
        .iter()
        .filter(|sp| p.port.is_none_or(|port| i32::from(sp.port) == port))
        .filter(|sp| {
            p.section_name
                .as_deref()
                .is_none_or(|s| sp.name.as_deref() == Some(s))
        })
        .map(|sp| sp.port)
        .collect();
    if ports.is_empty() {
        let wanted = match (p.port, &p.section_name) {
            (Some(port), Some(s)) => format!("port {port} named {s:?}"),
            (Some(port), None) => format!("port {port}"),
            (None, Some(s)) => format!("port named {s:?}"),
            (None, None) => "TCP port".to_string(),
        };
        return Err((
            reason::NO_MATCHING_PARENT,
            format!("Service {} has no {wanted}", svc.id),
        ));
    }
    Ok((svc.id.clone(), ports))
}

/// The routing of one Service port for one group of routes. GRPCRoutes take the port from
/// HTTPRoutes; no route at all means passthrough to the Service's own endpoints.
fn routing(
    group: Option<&Group>,
    routes: &[CompiledRoute],
    passthrough: impl FnOnce() -> Backend,
) -> Routing {
    let Some(group) = group else {
        return Routing::Passthrough {
            backend: passthrough(),
        };
    };
    if !group.grpc.is_empty() {
        let routes = group
            .grpc
            .iter()
            .filter_map(|&i| match &routes[i].wire {
                WireRoute::Grpc(r) => Some(r.clone()),
                WireRoute::Http(_) => None,
            })
            .collect();
        return Routing::Grpc { routes };
    }
    if !group.http.is_empty() {
        let routes = group
            .http
            .iter()
            .filter_map(|&i| match &routes[i].wire {
                WireRoute::Http(r) => Some(r.clone()),
                WireRoute::Grpc(_) => None,
            })
            .collect();
        return Routing::Http { routes };
    }
    Routing::Passthrough {
        backend: passthrough(),
    }
}

fn condition(type_: &'static str, ok: bool, reason: &'static str, message: String) -> Condition {
    Condition {
        type_,
        status: ok,
        reason,
        message,
    }
}

fn route_status(
    route: &CompiledRoute,
    parents: Vec<(ParentRef, Attachment)>,
    routes: &[CompiledRoute],
    groups: &HashMap<(ObjectRef, u16), BTreeMap<Option<String>, Group>>,
) -> RouteStatus {
    let resolved = if route.ref_problems.is_empty() {
        condition(
            status::RESOLVED_REFS,
            true,
            reason::RESOLVED_REFS,
            "all references resolved".to_string(),
        )
    } else {
        let messages: Vec<&str> = route.ref_problems.iter().map(|(_, m)| m.as_str()).collect();
        condition(
            status::RESOLVED_REFS,
            false,
            route.ref_problems[0].0,
            messages.join("; "),
        )
    };
    let parents = parents
        .into_iter()
        .map(|(parent_ref, attachment)| {
            let accepted = match attachment {
                Err((why, message)) => condition(status::ACCEPTED, false, why, message),
                Ok(_) if route.valid_rules == 0 => condition(
                    status::ACCEPTED,
                    false,
                    reason::UNSUPPORTED_VALUE,
                    format!("no rule can be used: {}", route.invalid_rules.join("; ")),
                ),
                Ok((svc, ports)) => accepted(route, &svc, &ports, routes, groups),
            };
            let mut conditions = vec![accepted, resolved.clone()];
            if route.valid_rules > 0 && !route.invalid_rules.is_empty() {
                conditions.push(condition(
                    status::PARTIALLY_INVALID,
                    true,
                    reason::UNSUPPORTED_VALUE,
                    format!(
                        "some rules cannot be used: {}",
                        route.invalid_rules.join("; ")
                    ),
                ));
            }
            ParentStatus {
                parent_ref,
                controller_name: CONTROLLER_NAME,
                conditions,
            }
        })
        .collect();
    RouteStatus {
        kind: route.kind,
        namespace: route.id.namespace.clone(),
        name: route.id.name.clone(),
        observed_generation: route.generation,
        parents,
    }
}

/// Accepted, unless a GRPCRoute of the same group takes every port this HTTPRoute names.
fn accepted(
    route: &CompiledRoute,
    svc: &ObjectRef,
    ports: &[u16],
    routes: &[CompiledRoute],
    groups: &HashMap<(ObjectRef, u16), BTreeMap<Option<String>, Group>>,
) -> Condition {
    let group = (route.id.namespace != svc.namespace).then(|| route.id.namespace.clone());
    let mut lost = Vec::new();
    if route.kind == RouteKind::Http {
        for port in ports {
            let winner = groups
                .get(&(svc.clone(), *port))
                .and_then(|g| g.get(&group))
                .and_then(|g| g.grpc.first());
            if let Some(&w) = winner {
                lost.push(format!("port {port} (GRPCRoute {})", routes[w].id));
            }
        }
    }
    let port_list = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if !lost.is_empty() && lost.len() == ports.len() {
        return condition(
            status::ACCEPTED,
            false,
            reason::CONFLICTED,
            format!(
                "a GRPCRoute takes precedence over this HTTPRoute on Service {svc}: {}",
                lost.join(", ")
            ),
        );
    }
    let mut message = format!("routes Service {svc} port {port_list}");
    if !lost.is_empty() {
        message.push_str(&format!(
            "; a GRPCRoute takes precedence on {}",
            lost.join(", ")
        ));
    }
    condition(status::ACCEPTED, true, reason::ACCEPTED, message)
}
