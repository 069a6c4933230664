//! The outbound policy the controller streams to a proxy for one destination.
//!
//! Every message is a full snapshot: a proxy replaces what it had and never merges. The types
//! are plain data (strings, numbers, lists) so that the wire format stays readable JSON and the
//! proxy compiles what it needs (regexes, header names) once per snapshot, not per request.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::identity::Identity;

/// What a proxy should do with connections to one destination `IP:port` or host name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutboundPolicy {
    /// The destination is a port of a Service's cluster IP: routes apply.
    Service(ServicePolicy),
    /// The destination is not a Service frontend (a pod IP, an address outside the cluster, or a
    /// Service port that does not exist): forward as is, unrouted. `identity` is set when the
    /// address belongs to a meshed pod, so the hop can still be mutual TLS.
    NotAService {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identity: Option<Identity>,
    },
}

/// A namespaced object name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The policy of one Service port as seen by clients of one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePolicy {
    pub service: ObjectRef,
    /// The Service's cluster IP (the first one for dual-stack Services).
    pub cluster_ip: String,
    /// The Service port number (not the target port).
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    /// The port's `appProtocol`, when set: lets the proxy skip protocol detection. `tcp` also
    /// for ports the Service lists in [`OPAQUE_PORTS_ANNOTATION`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    pub routing: Routing,
    /// Where connections that are not HTTP go when routes are attached (which only route
    /// HTTP): the Service's own endpoints, as without a mesh. Unset without routes, where the
    /// passthrough backend serves both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opaque: Option<Box<Backend>>,
}

/// Ports whose servers speak first (SMTP, MySQL, NATS, PostgreSQL, Redis, Elasticsearch
/// transport, memcached): waiting for the client to speak would only add the detection timeout.
pub const DEFAULT_OPAQUE_PORTS: &str = "25,587,3306,4222,5432,6379,9300,11211";

/// The Service (and pod) annotation listing ports whose traffic is TCP, never detected as
/// HTTP: a comma list, ranges `a-b` allowed.
pub const OPAQUE_PORTS_ANNOTATION: &str = "trellis.dev/opaque-ports";

/// Whether `port` is in a port list such as `25,8000-8100`. Entries that are not ports are
/// ignored, so a typo never turns detection off for other ports.
pub fn port_list_contains(list: &str, port: u16) -> bool {
    list.split(',').map(str::trim).any(|part| {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
            (Ok(lo), Ok(hi)) => lo <= port && port <= hi,
            _ => false,
        }
    })
}

/// How requests to a Service port are routed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Routing {
    /// No route is attached: every request and connection goes to the Service's own endpoints.
    Passthrough { backend: Backend },
    /// HTTPRoutes are attached, in precedence order across routes (oldest first, then by
    /// namespace/name). A request that matches no rule is answered 404.
    Http { routes: Vec<Route<HttpMatch>> },
    /// GRPCRoutes are attached (they win over HTTPRoutes on the same port). A call that matches
    /// no rule is answered 404 (gRPC UNIMPLEMENTED).
    Grpc { routes: Vec<Route<GrpcMatch>> },
}

/// Which kind of route object a rule came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RouteKind {
    #[serde(rename = "HTTPRoute")]
    Http,
    #[serde(rename = "GRPCRoute")]
    Grpc,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
}

/// One route object's valid rules. Invalid rules are left out by the controller and reported in
/// the route's status instead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route<M> {
    pub kind: RouteKind,
    #[serde(flatten)]
    pub id: ObjectRef,
    pub rules: Vec<Rule<M>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule<M> {
    /// The rule's position in the route's `rules` list, kept for metrics and `explain`.
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Alternatives (OR). The controller always sends at least one: a rule without matches
    /// gets the default match (`PathPrefix /` for HTTP, any method for gRPC).
    pub matches: Vec<M>,
    /// Rule-level filters, in the order they are listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    /// Weighted backends. Empty only when a filter answers the request (a redirect).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    #[serde(default, skip_serializing_if = "Timeouts::is_empty")]
    pub timeouts: Timeouts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// One alternative of an HTTPRoute rule: every present field must match (AND).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpMatch {
    pub path: PathMatch,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NameMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<NameMatch>,
    /// An upper-case HTTP method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

impl Default for HttpMatch {
    /// The match the Gateway API gives a rule without matches: every request.
    fn default() -> Self {
        Self {
            path: PathMatch::Prefix("/".to_string()),
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Exact(String),
    /// Matches whole path segments: `/abc` matches `/abc`, `/abc/` and `/abc/x`, not `/abcd`.
    Prefix(String),
    /// A regular expression that must match the whole path.
    Regex(String),
}

/// A header or query parameter match. Header names compare case-insensitively, query parameter
/// names exactly; values always compare exactly (or by a whole-value regex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueMatch {
    Exact(String),
    Regex(String),
}

/// One alternative of a GRPCRoute rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcMatch {
    /// Service and method, matched against the request path `/<service>/<method>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NameMatch>,
}

/// At least one of `service` and `method` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcMethodMatch {
    /// Exact or whole-name regex match on the fully qualified service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ValueMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<ValueMatch>,
}

/// A filter, in the Gateway API's semantics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    RequestRedirect(RequestRedirect),
    UrlRewrite(UrlRewrite),
    RequestMirror(RequestMirror),
}

/// `set` replaces every value of a header, `add` appends a value, `remove` drops the header.
/// Names compare case-insensitively.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<Header>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Header>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// Answer the request locally with a redirect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRedirect {
    /// `http` or `https`; unset keeps the request's scheme.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Unset keeps the request's Host (without its port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    /// Unset: the scheme's well-known port when `scheme` is set, else the Service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the part of the path matched by the rule's (single) `PathPrefix` match.
    ReplacePrefixMatch(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

/// Send a copy of the request to another backend and ignore its answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMirror {
    pub backend: Backend,
    /// The share of requests mirrored, `numerator / denominator` (100 / 100 when unset).
    pub numerator: u32,
    pub denominator: u32,
}

/// A weighted backend of a rule, or the Service itself for passthrough.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// Relative weight; 0 means the backend is never chosen.
    pub weight: u32,
    pub target: BackendTarget,
    /// Filters that apply only to requests sent to this backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BackendTarget {
    /// A port of a Service. Requests picked for a Service with no endpoints are answered 503.
    Service {
        service: ObjectRef,
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        app_protocol: Option<String>,
        endpoints: Vec<Endpoint>,
    },
    /// A reference that cannot be used (missing Service, wrong kind…): the share of requests
    /// picked for it is answered with `status` (500).
    Invalid { status: u16, reason: String },
}

/// One ready address of a backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The identity the endpoint's proxy must present; unset for pods outside the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    /// The pod behind the address, when known (for logs and metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Set for endpoints that are terminating but still serving: used only when no endpoint of
    /// the backend is ready.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminating: bool,
}

/// Rule timeouts in milliseconds; unset means no timeout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// Whole request, from the proxy receiving it to the response headers, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_ms: Option<u64>,
    /// Each attempt sent to a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request_ms: Option<u64>,
}

impl Timeouts {
    pub fn is_empty(&self) -> bool {
        self.request_ms.is_none() && self.backend_request_ms.is_none()
    }
}

/// The GRPCRoute annotation that sets a retry policy for every rule of the route (the
/// Gateway API has no retry field for gRPC): `{"codes": ["unavailable"], "attempts": 2,
/// "backoff": "50ms"}`, the shape of an HTTPRoute rule's `retry` with gRPC status codes.
pub const GRPC_RETRY_ANNOTATION: &str = "retry.trellis.dev/grpc";

/// Retry policy of a rule (Gateway API experimental channel).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    /// Response codes that are retried; connection errors are always retried.
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Minimum wait between attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
    /// GRPCRoute rules: gRPC status codes (`0`…`16`) that are retried when a call's answer
    /// carries its status in the headers (a trailers-only answer). From the route's
    /// `retry.trellis.dev/grpc` annotation; the Gateway API has no retry field for gRPC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_codes: Vec<u16>,
}
