//! A destination's policy as the proxy runs it: the controller's snapshot compiled once
//! (match tables, header names, weights, endpoint states) so that a request only looks things up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use trellis_api::Identity;
use trellis_api::filters::{CompiledHeaderModifier, FilterError};
use trellis_api::matching::{MatchError, RequestHead, RouteTable};
use trellis_api::policy::{
    self as wire, BackendTarget, GrpcMatch, HttpMatch, ObjectRef, OutboundPolicy, RequestRedirect,
    Retry, Timeouts, UrlRewrite,
};

use crate::balance::{Balancer, EndpointRegistry};

/// Why a snapshot cannot be used. The controller validates everything first, so this means the
/// two disagree; the proxy keeps its last good policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Match(#[from] MatchError),
    #[error(transparent)]
    Filter(#[from] FilterError),
}

/// A compiled snapshot, with the snapshot itself for `/config`.
#[derive(Debug)]
pub struct Policy {
    pub snapshot: OutboundPolicy,
    pub kind: PolicyKind,
}

#[derive(Debug)]
pub enum PolicyKind {
    /// Not a Service: forward unrouted; `identity` says whether the peer is meshed.
    Forward {
        identity: Option<Identity>,
    },
    Service(Box<ServiceRoutes>),
}

#[derive(Debug)]
pub struct ServiceRoutes {
    pub service: ObjectRef,
    /// `namespace/name:port`, for metrics.
    pub label: Arc<str>,
    pub port: u16,
    pub app_protocol: Option<String>,
    pub routing: Routing,
    /// With routes: where connections that are not HTTP go (the Service's own endpoints).
    pub opaque: Option<Backend>,
}

impl ServiceRoutes {
    /// What the port's `appProtocol` says the connection speaks, when it says: HTTP (either
    /// version; the server tells them apart) or anything else, carried as TCP.
    pub fn declared_protocol(&self) -> Option<crate::detect::Protocol> {
        use crate::detect::Protocol;
        let p = self.app_protocol.as_deref()?;
        Some(match p.to_ascii_lowercase().as_str() {
            "http" | "http2" | "h2c" | "grpc" | "kubernetes.io/h2c" | "kubernetes.io/ws" => {
                Protocol::Http1
            }
            _ => Protocol::Opaque,
        })
    }
}

#[derive(Debug)]
pub enum Routing {
    Passthrough(Box<Backend>),
    Http(RouteSet<HttpMatch>),
    Grpc(RouteSet<GrpcMatch>),
}

/// The routes of one kind with their match table.
#[derive(Debug)]
pub struct RouteSet<M> {
    table: RouteTable<M>,
    /// `[route][rule]`, in the order of the snapshot.
    rules: Vec<Vec<Arc<Rule>>>,
}

/// The rule serving a request, and the prefix its match used (for `ReplacePrefixMatch`).
#[derive(Debug)]
pub struct Selected<'p> {
    pub rule: &'p Arc<Rule>,
    pub prefix: Option<&'p str>,
}

impl<M> RouteSet<M> {
    pub fn select(&self, head: &RequestHead<'_>) -> Option<Selected<'_>> {
        let found = self.table.find(head)?;
        let rule = self.rules.get(found.route)?.get(found.rule)?;
        Some(Selected {
            rule,
            prefix: found.prefix,
        })
    }
}

/// Metric labels of a rule, built once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteLabels {
    pub kind: &'static str,
    /// `namespace/name`.
    pub route: Arc<str>,
    /// The rule's name, or its index.
    pub rule: Arc<str>,
}

#[derive(Debug)]
pub struct Rule {
    pub labels: RouteLabels,
    pub filters: Vec<Filter>,
    pub backends: Backends,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
}

#[derive(Debug)]
pub enum Filter {
    RequestHeaders(CompiledHeaderModifier),
    ResponseHeaders(CompiledHeaderModifier),
    Redirect(RequestRedirect),
    Rewrite(UrlRewrite),
    Mirror {
        backend: Box<Backend>,
        numerator: u32,
        denominator: u32,
    },
}

/// Weighted backends of a rule.
///
/// Picks follow a golden-ratio (Weyl) sequence rather than independent random draws: any run
/// of N consecutive requests lands within a few requests of the weights (a random draw over
/// 500 requests at 70/30 strays by ±10 one time in three), yet picks interleave instead of
/// coming in blocks, and a pick costs one relaxed atomic add.
#[derive(Debug)]
pub struct Backends {
    list: Vec<Backend>,
    /// Running sums of the weights, for a binary search on the draw.
    cumulative: Vec<u64>,
    /// Position in the sequence; starts at random so that sidecars do not move in step.
    next: AtomicU64,
}

/// 2^64 divided by the golden ratio: successive multiples spread evenly over the u64 range.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl Backends {
    fn new(list: Vec<Backend>) -> Self {
        let mut sum = 0;
        let cumulative = list
            .iter()
            .map(|b| {
                sum += u64::from(b.weight);
                sum
            })
            .collect();
        Self {
            list,
            cumulative,
            next: AtomicU64::new(fastrand::u64(..)),
        }
    }

    /// A backend chosen by weight; `None` when every weight is 0.
    pub fn pick(&self) -> Option<&Backend> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // The fraction n·φ⁻¹ mod 1, scaled to [0, total).
        let unit = n.wrapping_mul(GOLDEN);
        let draw = ((u128::from(unit) * u128::from(total)) >> 64) as u64;
        let i = self.cumulative.partition_point(|&c| c <= draw);
        self.list.get(i)
    }

    pub fn list(&self) -> &[Backend] {
        &self.list
    }
}

#[derive(Debug)]
pub struct Backend {
    pub weight: u32,
    pub target: Target,
    pub request_headers: Option<CompiledHeaderModifier>,
    pub response_headers: Option<CompiledHeaderModifier>,
    /// `RequestMirror` filters of this backendRef: requests sent to this backend are also
    /// mirrored there ([`Filter::Mirror`] entries only).
    pub mirrors: Vec<Filter>,
}

#[derive(Debug)]
pub enum Target {
    Service {
        service: ObjectRef,
        port: u16,
        /// `namespace/name:port`, built once for metrics.
        label: Arc<str>,
        /// The upstream speaks HTTP/2 (gRPC or an `h2c` appProtocol).
        http2: bool,
        balancer: Balancer,
    },
    /// Requests picked for this backend are answered by the proxy with `status`.
    Answer { status: u16, reason: String },
}

impl Policy {
    pub fn compile(
        snapshot: OutboundPolicy,
        endpoints: &EndpointRegistry,
    ) -> Result<Policy, PolicyError> {
        let kind = match &snapshot {
            OutboundPolicy::NotAService { identity } => PolicyKind::Forward {
                identity: identity.clone(),
            },
            OutboundPolicy::Service(svc) => {
                let routing = match &svc.routing {
                    wire::Routing::Passthrough { backend } => {
                        Routing::Passthrough(Box::new(compile_backend(backend, false, endpoints)?))
                    }
                    wire::Routing::Http { routes } => Routing::Http(RouteSet {
                        table: RouteTable::<HttpMatch>::compile(routes)?,
                        rules: compile_rules(routes, false, endpoints)?,
                    }),
                    wire::Routing::Grpc { routes } => Routing::Grpc(RouteSet {
                        table: RouteTable::<GrpcMatch>::compile(routes)?,
                        rules: compile_rules(routes, true, endpoints)?,
                    }),
                };
                let opaque = match &svc.opaque {
                    Some(b) => Some(compile_backend(b, false, endpoints)?),
                    None => None,
                };
                PolicyKind::Service(Box::new(ServiceRoutes {
                    label: Arc::from(format!("{}:{}", svc.service, svc.port)),
                    service: svc.service.clone(),
                    port: svc.port,
                    app_protocol: svc.app_protocol.clone(),
                    routing,
                    opaque,
                }))
            }
        };
        Ok(Policy { snapshot, kind })
    }
}

fn compile_rules<M>(
    routes: &[wire::Route<M>],
    grpc: bool,
    endpoints: &EndpointRegistry,
) -> Result<Vec<Vec<Arc<Rule>>>, PolicyError> {
    routes
        .iter()
        .map(|route| {
            route
                .rules
                .iter()
                .map(|rule| {
                    let filters = rule
                        .filters
                        .iter()
                        .map(|f| compile_filter(f, grpc, endpoints))
                        .collect::<Result<_, _>>()?;
                    let backends = rule
                        .backends
                        .iter()
                        .map(|b| compile_backend(b, grpc, endpoints))
                        .collect::<Result<_, _>>()?;
                    Ok(Arc::new(Rule {
                        labels: RouteLabels {
                            kind: route.kind.as_str(),
                            route: Arc::from(route.id.to_string()),
                            rule: Arc::from(
                                rule.name.clone().unwrap_or_else(|| rule.index.to_string()),
                            ),
                        },
                        filters,
                        backends: Backends::new(backends),
                        timeouts: rule.timeouts.clone(),
                        retry: rule.retry.clone(),
                    }))
                })
                .collect()
        })
        .collect()
}

fn compile_filter(
    f: &wire::Filter,
    grpc: bool,
    endpoints: &EndpointRegistry,
) -> Result<Filter, PolicyError> {
    Ok(match f {
        wire::Filter::RequestHeaderModifier(m) => {
            Filter::RequestHeaders(CompiledHeaderModifier::compile(m)?)
        }
        wire::Filter::ResponseHeaderModifier(m) => {
            Filter::ResponseHeaders(CompiledHeaderModifier::compile(m)?)
        }
        wire::Filter::RequestRedirect(r) => Filter::Redirect(r.clone()),
        wire::Filter::UrlRewrite(r) => Filter::Rewrite(r.clone()),
        wire::Filter::RequestMirror(m) => Filter::Mirror {
            backend: Box::new(compile_backend(&m.backend, grpc, endpoints)?),
            numerator: m.numerator,
            denominator: m.denominator.max(1),
        },
    })
}

fn compile_backend(
    b: &wire::Backend,
    grpc: bool,
    endpoints: &EndpointRegistry,
) -> Result<Backend, PolicyError> {
    let mut request_headers = None;
    let mut response_headers = None;
    let mut mirrors = Vec::new();
    for f in &b.filters {
        match f {
            wire::Filter::RequestHeaderModifier(m) => {
                request_headers = Some(CompiledHeaderModifier::compile(m)?);
            }
            wire::Filter::ResponseHeaderModifier(m) => {
                response_headers = Some(CompiledHeaderModifier::compile(m)?);
            }
            wire::Filter::RequestMirror(_) => mirrors.push(compile_filter(f, grpc, endpoints)?),
            // The controller accepts no other backend filter.
            _ => {}
        }
    }
    let target = match &b.target {
        BackendTarget::Service {
            service,
            port,
            app_protocol,
            endpoints: eps,
        } => Target::Service {
            label: Arc::from(format!("{service}:{port}")),
            service: service.clone(),
            port: *port,
            http2: grpc || is_http2(app_protocol.as_deref()),
            balancer: Balancer::new(
                eps.iter()
                    .map(|e| endpoints.get(e.addr, e.identity.as_ref(), e.pod.as_ref()))
                    .collect(),
            ),
        },
        BackendTarget::Invalid { status, reason } => Target::Answer {
            status: *status,
            reason: reason.clone(),
        },
    };
    Ok(Backend {
        weight: b.weight,
        target,
        request_headers,
        response_headers,
        mirrors,
    })
}

/// Whether an `appProtocol` means HTTP/2 without TLS.
pub fn is_http2(app_protocol: Option<&str>) -> bool {
    matches!(
        app_protocol,
        Some("kubernetes.io/h2c" | "h2c" | "grpc" | "http2")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::policy::{Endpoint, Route, RouteKind, Rule as WireRule, ServicePolicy};

    fn backend(name: &str, weight: u32, eps: &[u16]) -> wire::Backend {
        wire::Backend {
            weight,
            target: BackendTarget::Service {
                service: ObjectRef {
                    namespace: "ns".into(),
                    name: name.into(),
                },
                port: 80,
                app_protocol: None,
                endpoints: eps
                    .iter()
                    .map(|p| Endpoint {
                        addr: ([127, 0, 0, 1], *p).into(),
                        identity: None,
                        pod: None,
                        terminating: false,
                    })
                    .collect(),
            },
            filters: vec![],
        }
    }

    #[test]
    fn weighted_picks_follow_weights_and_skip_zero() {
        let reg = EndpointRegistry::default();
        let b = Backends::new(
            [
                backend("a", 70, &[1]),
                backend("z", 0, &[2]),
                backend("b", 30, &[3]),
            ]
            .iter()
            .map(|b| compile_backend(b, false, &reg).unwrap())
            .collect(),
        );
        let picks: Vec<bool> = (0..100_000)
            .map(|_| match &b.pick().unwrap().target {
                Target::Service { service, .. } if service.name == "a" => true,
                Target::Service { service, .. } => {
                    assert_eq!(service.name, "b");
                    false
                }
                Target::Answer { .. } => panic!(),
            })
            .collect();
        // Every window of consecutive requests, wherever it starts, is within a few picks of
        // 70 %: the split holds per request, not only on average.
        for len in [10, 100, 500, 10_000] {
            for window in picks.windows(len).step_by(97) {
                let a = window.iter().filter(|&&a| a).count() as f64;
                let want = 0.7 * len as f64;
                assert!((a - want).abs() <= 3.0, "{a} of {len}");
            }
        }
        // Interleaved, not in blocks: never more than a few of the 30 % backend in a row.
        let longest_b = picks.split(|&a| a).map(<[bool]>::len).max().unwrap();
        assert!(longest_b <= 2, "{longest_b}");
        let none = Backends::new(vec![
            compile_backend(&backend("z", 0, &[1]), false, &reg).unwrap(),
        ]);
        assert!(none.pick().is_none());
    }

    #[test]
    fn compiles_a_snapshot_and_selects_rules() {
        let snapshot = http_snapshot(WireRule {
            index: 3,
            name: None,
            matches: vec![HttpMatch::default()],
            filters: vec![],
            backends: vec![backend("a", 1, &[1])],
            timeouts: Timeouts::default(),
            retry: None,
        });
        let policy = Policy::compile(snapshot, &EndpointRegistry::default()).unwrap();
        let PolicyKind::Service(svc) = &policy.kind else {
            panic!()
        };
        let Routing::Http(set) = &svc.routing else {
            panic!()
        };
        let req = http::Request::new(());
        let sel = set.select(&RequestHead::from(&req)).unwrap();
        assert_eq!(&*sel.rule.labels.rule, "3");
        assert_eq!(sel.prefix, Some("/"));
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Snapshot lines come from the network: a mangled one is refused, never a panic.
        #[test]
        fn mangled_snapshots_are_refused_or_compiled(
            edits in proptest::collection::vec(
                (0usize..4096, proptest::prop_oneof![
                    proptest::strategy::Just(None),
                    proptest::num::u8::ANY.prop_map(Some),
                    proptest::sample::select(b"{}[]\",:0123456789-.e\\/*^$()?+|".to_vec()).prop_map(Some),
                ]),
                1..6,
            ),
        ) {
            let mut json = serde_json::to_vec(&rich_snapshot()).unwrap();
            for (at, byte) in edits {
                let at = at % (json.len() + 1);
                match byte {
                    None if at < json.len() => {
                        json.remove(at);
                    }
                    None => {}
                    Some(b) => json.insert(at, b),
                }
            }
            if let Ok(snapshot) = serde_json::from_slice::<OutboundPolicy>(&json) {
                let _ = Policy::compile(snapshot, &EndpointRegistry::default());
            }
        }
    }

    /// A snapshot using most of what the wire format can say, for the mangling test above.
    fn rich_snapshot() -> OutboundPolicy {
        let mut rule = WireRule {
            index: 0,
            name: Some("r0".into()),
            matches: vec![HttpMatch::default()],
            filters: vec![],
            backends: vec![backend("a", 1, &[1]), backend("b", 2, &[2, 3])],
            timeouts: Timeouts::default(),
            retry: None,
        };
        rule.timeouts.request_ms = Some(100);
        http_snapshot(rule)
    }

    /// The policy of `ns/web:80` with one HTTPRoute `ns/r` of one rule.
    fn http_snapshot(rule: WireRule<HttpMatch>) -> OutboundPolicy {
        OutboundPolicy::Service(ServicePolicy {
            service: ObjectRef {
                namespace: "ns".into(),
                name: "web".into(),
            },
            cluster_ip: "10.96.0.1".into(),
            port: 80,
            port_name: None,
            app_protocol: None,
            opaque: None,
            routing: wire::Routing::Http {
                routes: vec![Route {
                    kind: RouteKind::Http,
                    id: ObjectRef {
                        namespace: "ns".into(),
                        name: "r".into(),
                    },
                    rules: vec![rule],
                }],
            },
        })
    }
}
