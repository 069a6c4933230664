//! `trellis-controller explain`: how one request from a namespace to a host would be routed.
//!
//! It runs the proxy's own matcher and filter functions (from `trellis-api`) on the policy the
//! controller would send, so its answer is the proxy's answer. With `--pod` or `--admin` it
//! runs them on the policy a sidecar really holds ([`crate::sidecar`]) as well, and says
//! whether that is still what the controller would send.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use serde::Serialize;
use trellis_api::Identity;
use trellis_api::discovery::Target;
use trellis_api::filters::{
    CompiledHeaderModifier, RedirectRequest, redirect_location, rewrite_path,
};
use trellis_api::matching::{RequestHead, RouteTable};
use trellis_api::policy::{
    Backend, BackendTarget, Endpoint, Filter, GrpcMatch, HttpMatch, ObjectRef, OutboundPolicy,
    Route, RouteKind, Routing, Rule, ServicePolicy,
};

use crate::index::{Config, Index};
use crate::manifests;
use crate::sidecar::{self, Held};
use crate::source;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").args(["manifests", "kubernetes"])))]
#[command(group(clap::ArgGroup::new("sidecar").args(["pod", "admin"])))]
pub struct Args {
    /// Directory of Kubernetes YAML manifests.
    #[arg(
        long,
        env = "TRELLIS_MANIFESTS",
        value_name = "DIR",
        required_unless_present_any = ["kubernetes", "pod", "admin"]
    )]
    pub manifests: Option<PathBuf>,
    /// Read the cluster from the Kubernetes API server instead (kubeconfig or in-cluster
    /// config; list only, nothing is written).
    #[arg(long)]
    pub kubernetes: bool,
    /// Also answer from what the sidecar of this pod holds, read from its admin port through
    /// the API server's port-forward.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub pod: Option<String>,
    /// Also answer from what the sidecar whose admin server is at this address holds (local
    /// mode, or the local end of `kubectl port-forward POD 4191`).
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Namespace of the client pod [default with --pod or --admin: the sidecar's].
    #[arg(long, required_unless_present_any = ["pod", "admin"])]
    pub from: Option<String>,
    /// Destination: a Service name (`svc`, `svc.ns`, `svc.ns.svc.cluster.local`) or a cluster
    /// or pod IP, with an optional `:PORT` (default 80).
    #[arg(long)]
    pub to: String,
    /// Request method.
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Request path, with an optional query string. For gRPC: `/package.Service/Method`.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// A request header, `Name: value`; repeat for more.
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// Trust domain of workload identities.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = trellis_api::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Cluster DNS domain.
    #[arg(long, env = "TRELLIS_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
}

pub fn main(args: Args) -> ExitCode {
    let answered = source::runtime().and_then(|rt| rt.block_on(run(args)));
    match answered {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The JSON `explain` prints, or the error that stops it.
pub async fn run(args: Args) -> Result<String, String> {
    run_with(args, None).await
}

/// As [`run`], talking to the API server through `client` when one is given rather than
/// through the kubeconfig's or the pod's.
pub async fn run_with(args: Args, mut client: Option<kube::Client>) -> Result<String, String> {
    let request = build_request(&args)?;
    let held = match (&args.pod, &args.admin) {
        (Some(pod), _) => {
            let (namespace, name) = sidecar::pod_name(pod).map_err(|e| e.to_string())?;
            let c = match client.take() {
                Some(c) => c,
                None => crate::kubernetes::client()
                    .await
                    .map_err(|e| e.to_string())?,
            };
            let held = sidecar::fetch_pod(&c, &namespace, &name)
                .await
                .map_err(|e| e.to_string())?;
            client = Some(c);
            Some((format!("pod {namespace}/{name}"), held))
        }
        (None, Some(admin)) => {
            let addr = sidecar::admin_addr(admin).map_err(|e| e.to_string())?;
            let held = sidecar::fetch_admin(&addr)
                .await
                .map_err(|e| e.to_string())?;
            Some((format!("admin {addr}"), held))
        }
        (None, None) => None,
    };
    let from = match (&args.from, &held) {
        (Some(from), Some((what, held))) if *from != held.namespace => {
            return Err(format!(
                "--from {from}: the sidecar ({what}) is in namespace {}; leave --from out to \
                 use it",
                held.namespace
            ));
        }
        (Some(from), _) => from.clone(),
        (None, Some((_, held))) => held.namespace.clone(),
        (None, None) => return Err("--from is required".to_string()),
    };
    let objects = if let Some(dir) = &args.manifests {
        Some(manifests::load_dir(dir).map_err(|e| e.to_string())?)
    } else if args.kubernetes {
        let c = match client {
            Some(c) => c,
            None => crate::kubernetes::client()
                .await
                .map_err(|e| e.to_string())?,
        };
        Some(source::list(&c).await?)
    } else {
        None
    };
    let config = Config {
        trust_domain: args.trust_domain.clone(),
        cluster_domain: args.cluster_domain.clone(),
    };
    let controller = objects.map(|o| Index::build(&o, &config).outbound(&from, &request.target));
    let printed = match held {
        Some((what, held)) => {
            let report = compare(&what, &held, &from, &request, &config, controller);
            serde_json::to_string_pretty(&report)
        }
        None => {
            // Without a sidecar, a source is required (clap makes sure of it).
            let policy = controller.ok_or("--manifests or --kubernetes is required")?;
            serde_json::to_string_pretty(&explain_policy(policy, &from, &request))
        }
    };
    printed.map_err(|e| format!("cannot print the explanation: {e}"))
}

/// A what-if request: the destination and the request head a client would send.
#[derive(Debug)]
pub struct WhatIf {
    pub target: Target,
    /// The destination as the user wrote it, used as the Host header.
    pub host: String,
    pub request: Request<()>,
}

/// Builds the request `explain` routes from its arguments.
pub fn build_request(args: &Args) -> Result<WhatIf, String> {
    what_if(&args.to, &args.method, &args.path, &args.headers)
}

/// Builds a what-if request from the same strings the command line takes.
pub fn what_if(to: &str, method: &str, path: &str, headers: &[String]) -> Result<WhatIf, String> {
    let target = Target::parse_with_default_port(to, 80).map_err(|e| e.to_string())?;
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("invalid method {method:?}"))?;
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with '/'"));
    }
    let uri: Uri = path
        .parse()
        .map_err(|e| format!("invalid path {path:?}: {e}"))?;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let host = match &target {
        Target::Name { host, port: 80 } if !to.ends_with(":80") => host.clone(),
        _ => to.to_string(),
    };
    let host_value = HeaderValue::from_str(&host).map_err(|_| format!("invalid host {host:?}"))?;
    request.headers_mut().insert(http::header::HOST, host_value);
    for h in headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("header {h:?} must be 'Name: value'"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("invalid header name in {h:?}"))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| format!("invalid header value in {h:?}"))?;
        // A Host given with -H replaces the one derived from --to, as with curl.
        if name == http::header::HOST {
            request.headers_mut().insert(name, value);
        } else {
            request.headers_mut().append(name, value);
        }
    }
    Ok(WhatIf {
        target,
        host,
        request,
    })
}

/// What the proxy would do with the request.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub destination: Destination,
    /// `passthrough`, `HTTPRoute`, `GRPCRoute` or `unrouted` (not a Service).
    pub routing: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleId>,
    pub answer: Answer,
    /// The rule's filters, in the order they run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    /// The request after the rule's filters (before backend filters).
    pub request: RequestView,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Destination {
    Service {
        service: ObjectRef,
        cluster_ip: String,
        port: u16,
        #[serde(skip_serializing_if = "Option::is_none")]
        port_name: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        app_protocol: Option<String>,
    },
    NotAService {
        #[serde(skip_serializing_if = "Option::is_none")]
        identity: Option<Identity>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteId {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleId {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Who answers the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Answer {
    /// Forwarded to one of `backends`, picked by weight.
    Forward,
    /// Answered by the proxy with a redirect.
    Redirect { status: u16, location: String },
    /// Answered by the proxy with an error.
    Error { status: u16, reason: String },
}

#[derive(Clone, Debug, Serialize)]
pub struct RequestView {
    pub method: String,
    pub host: String,
    pub path: String,
    /// Header values by lower-case name, in order.
    pub headers: BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendView {
    pub weight: u32,
    /// The share of requests this backend gets, between 0 and 1.
    pub share: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ObjectRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Set when requests sent here are answered by the proxy (500 invalid, 503 no endpoints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    pub endpoints: Vec<Endpoint>,
    /// Request headers as this backend receives them, after backend filters.
    pub request_headers: BTreeMap<String, Vec<String>>,
}

/// `explain --pod` / `--admin`: the answer from the policy a sidecar holds, beside the
/// controller's when its view was read.
#[derive(Clone, Debug, Serialize)]
pub struct SidecarReport {
    pub from: String,
    pub to: String,
    pub sidecar: SidecarView,
    /// What the controller would answer now (with `--manifests` or `--kubernetes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<Explanation>,
    /// Whether the sidecar holds exactly the policy the controller would send now; `false`
    /// means the sidecar is stale (or the controller's view was read from elsewhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_sync: Option<bool>,
    /// The fields of the two explanations that differ for this request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SidecarView {
    /// `pod NAMESPACE/NAME` or `admin ADDR`.
    pub source: String,
    /// The sidecar's namespace.
    pub namespace: String,
    /// Whether the sidecar holds a policy for the destination.
    pub holds: bool,
    /// The destination entry used, as the sidecar follows it (`host:port` or `ip:port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// What else `/config` says about that entry (a version or an age, when the proxy gives
    /// one), as is.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, serde_json::Value>,
    /// Why there is no explanation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Every destination the sidecar follows, when none is this one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub follows: Vec<String>,
    /// The answer from the sidecar's own policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Explanation>,
}

/// Explains `what_if` with the policy `held` has for its destination and, when given, with the
/// `controller`'s, and compares the two.
pub fn compare(
    source: &str,
    held: &Held,
    from: &str,
    what_if: &WhatIf,
    config: &Config,
    controller: Option<OutboundPolicy>,
) -> SidecarReport {
    let to = what_if.target.to_string();
    let mut view = SidecarView {
        source: source.to_string(),
        namespace: held.namespace.clone(),
        holds: false,
        destination: None,
        details: BTreeMap::new(),
        message: None,
        follows: Vec::new(),
        explanation: None,
    };
    let mut held_policy = None;
    match held.find(&what_if.target, &config.cluster_domain) {
        None => {
            view.message = Some(format!(
                "the sidecar holds no policy for {to}: it asks the controller for a destination \
                 when the app first connects to it, and drops it after a while unused"
            ));
            view.follows = held.destinations.iter().map(|d| d.target.clone()).collect();
        }
        Some(entry) => {
            view.destination = Some(entry.target.clone());
            view.details = entry.details.clone();
            match entry.policy() {
                None => {
                    view.message = Some(format!(
                        "the sidecar follows {} but has no policy for it yet: the controller \
                         has not answered",
                        entry.target
                    ));
                }
                Some(Err(e)) => {
                    view.message = Some(format!("cannot read the sidecar's policy: {e}"));
                }
                Some(Ok(policy)) => {
                    view.holds = true;
                    view.explanation = Some(explain_policy(policy.clone(), from, what_if));
                    held_policy = Some(policy);
                }
            }
        }
    }
    let controller_explanation = controller
        .as_ref()
        .map(|p| explain_policy(p.clone(), from, what_if));
    let (in_sync, differences) = match (
        &held_policy,
        &controller,
        &view.explanation,
        &controller_explanation,
    ) {
        (Some(held), Some(ours), Some(theirs), Some(mine)) => {
            (Some(held == ours), differences(theirs, mine))
        }
        _ => (None, Vec::new()),
    };
    SidecarReport {
        from: from.to_string(),
        to,
        sidecar: view,
        controller: controller_explanation,
        in_sync,
        differences,
    }
}

/// The top-level fields in which two explanations of the same request differ.
fn differences(a: &Explanation, b: &Explanation) -> Vec<String> {
    let fields = |e: &Explanation| match serde_json::to_value(e) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let (a, b) = (fields(a), fields(b));
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    names
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Routes `what_if` from a client in `from` exactly as the proxy would.
pub fn explain(index: &Index, from: &str, what_if: &WhatIf) -> Explanation {
    explain_policy(index.outbound(from, &what_if.target), from, what_if)
}

/// Routes `what_if` from a client in `from` with `policy` for its destination, exactly as the
/// proxy would.
pub fn explain_policy(policy: OutboundPolicy, from: &str, what_if: &WhatIf) -> Explanation {
    let mut request = what_if.request.clone();
    let mut out = Explanation {
        from: from.to_string(),
        to: what_if.target.to_string(),
        destination: Destination::NotAService { identity: None },
        routing: "unrouted",
        route: None,
        rule: None,
        answer: Answer::Forward,
        filters: Vec::new(),
        request: view(&request),
        backends: Vec::new(),
    };
    let svc = match policy {
        OutboundPolicy::NotAService { identity } => {
            out.destination = Destination::NotAService { identity };
            return out;
        }
        OutboundPolicy::Service(svc) => svc,
    };
    out.destination = Destination::Service {
        service: svc.service.clone(),
        cluster_ip: svc.cluster_ip.clone(),
        port: svc.port,
        port_name: svc.port_name.clone(),
        app_protocol: svc.app_protocol.clone(),
    };
    match &svc.routing {
        Routing::Passthrough { backend } => {
            out.routing = "passthrough";
            out.backends = backends(std::slice::from_ref(backend), &request);
            out.answer = answer_for(&out.backends);
        }
        Routing::Http { routes } => {
            out.routing = "HTTPRoute";
            let table = RouteTable::<HttpMatch>::compile(routes);
            route_request(&mut out, &svc, routes, table, &mut request);
        }
        Routing::Grpc { routes } => {
            out.routing = "GRPCRoute";
            let table = RouteTable::<GrpcMatch>::compile(routes);
            route_request(&mut out, &svc, routes, table, &mut request);
        }
    }
    out
}

fn route_request<M>(
    out: &mut Explanation,
    svc: &ServicePolicy,
    routes: &[Route<M>],
    table: Result<RouteTable<M>, trellis_api::matching::MatchError>,
    request: &mut Request<()>,
) {
    let table = match table {
        Ok(t) => t,
        Err(e) => {
            out.answer = Answer::Error {
                status: 500,
                reason: format!("the policy cannot be compiled: {e}"),
            };
            return;
        }
    };
    let found = {
        let head = RequestHead::from(&*request);
        table
            .find(&head)
            .map(|f| (f.route, f.rule, f.prefix.map(str::to_string)))
    };
    let Some((route_i, rule_i, prefix)) = found else {
        out.answer = Answer::Error {
            status: 404,
            reason: format!(
                "no rule of the routes on Service {} port {} matches",
                svc.service, svc.port
            ),
        };
        return;
    };
    let route = &routes[route_i];
    let rule: &Rule<M> = &route.rules[rule_i];
    out.route = Some(RouteId {
        kind: route.kind,
        namespace: route.id.namespace.clone(),
        name: route.id.name.clone(),
    });
    out.rule = Some(RuleId {
        index: rule.index,
        name: rule.name.clone(),
    });
    out.filters = rule.filters.clone();
    for filter in &rule.filters {
        match filter {
            Filter::RequestHeaderModifier(m) => apply_headers(m, request.headers_mut()),
            Filter::UrlRewrite(rw) => {
                if let Some(host) = rw
                    .hostname
                    .as_deref()
                    .and_then(|h| HeaderValue::from_str(h).ok())
                {
                    request.headers_mut().insert(http::header::HOST, host);
                }
                if let Some(path) = &rw.path {
                    let new_path = rewrite_path(path, request.uri().path(), prefix.as_deref());
                    let new_uri = match request.uri().query() {
                        Some(q) => format!("{new_path}?{q}"),
                        None => new_path,
                    };
                    if let Ok(uri) = new_uri.parse() {
                        *request.uri_mut() = uri;
                    }
                }
            }
            Filter::RequestRedirect(r) => {
                let host = request
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default();
                let location = redirect_location(
                    r,
                    &RedirectRequest {
                        scheme: "http",
                        host,
                        path: request.uri().path(),
                        query: request.uri().query(),
                        matched_prefix: prefix.as_deref(),
                        service_port: svc.port,
                    },
                );
                out.answer = Answer::Redirect {
                    status: r.status,
                    location,
                };
                out.request = view(request);
                return;
            }
            Filter::ResponseHeaderModifier(_) | Filter::RequestMirror(_) => {}
        }
    }
    out.request = view(request);
    out.backends = backends(&rule.backends, request);
    out.answer = answer_for(&out.backends);
}

fn apply_headers(m: &trellis_api::policy::HeaderModifier, headers: &mut HeaderMap) {
    // The controller validated every name and value; a failure here would be a bug in one of
    // the two, and `explain` then shows the headers unmodified.
    if let Ok(compiled) = CompiledHeaderModifier::compile(m) {
        compiled.apply(headers);
    }
}

fn backends(backends: &[Backend], request: &Request<()>) -> Vec<BackendView> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    backends
        .iter()
        .map(|b| {
            let mut headers = request.headers().clone();
            for f in &b.filters {
                if let Filter::RequestHeaderModifier(m) = f {
                    apply_headers(m, &mut headers);
                }
            }
            let share = if total == 0 {
                0.0
            } else {
                f64::from(b.weight) / total as f64
            };
            let (service, port, status, reason, endpoints) = match &b.target {
                BackendTarget::Service {
                    service,
                    port,
                    endpoints,
                    ..
                } => {
                    let (status, reason) = if endpoints.is_empty() {
                        (
                            Some(503),
                            Some(format!("Service {service} has no ready endpoints")),
                        )
                    } else {
                        (None, None)
                    };
                    (
                        Some(service.clone()),
                        Some(*port),
                        status,
                        reason,
                        endpoints.clone(),
                    )
                }
                BackendTarget::Invalid { status, reason } => {
                    (None, None, Some(*status), Some(reason.clone()), Vec::new())
                }
            };
            BackendView {
                weight: b.weight,
                share,
                service,
                port,
                status,
                reason,
                filters: b.filters.clone(),
                endpoints,
                request_headers: header_view(&headers),
            }
        })
        .collect()
}

/// Forward when some backend with weight can serve; otherwise the error every request gets.
fn answer_for(backends: &[BackendView]) -> Answer {
    let serving = backends.iter().any(|b| b.weight > 0 && b.status.is_none());
    if serving {
        return Answer::Forward;
    }
    match backends.iter().find(|b| b.weight > 0) {
        Some(b) => Answer::Error {
            status: b.status.unwrap_or(500),
            reason: b.reason.clone().unwrap_or_default(),
        },
        None => Answer::Error {
            status: 500,
            reason: "every backend has weight 0".to_string(),
        },
    }
}

fn header_view(headers: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        out.entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    out
}

fn view(request: &Request<()>) -> RequestView {
    RequestView {
        method: request.method().to_string(),
        host: request
            .headers()
            .get(http::header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .unwrap_or_default(),
        path: request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".to_string()),
        headers: header_view(request.headers()),
    }
}

#[cfg(test)]
mod sidecar_tests {
    use super::*;
    use serde_json::json;

    fn index(weights: (u32, u32)) -> Index {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
        let mut objects = manifests::load_dir(&dir).unwrap();
        let rule = &mut objects.http_routes[0].spec.rules.as_mut().unwrap()[1];
        let refs = rule.backend_refs.as_mut().unwrap();
        refs[0].weight = Some(weights.0 as i32);
        refs[1].weight = Some(weights.1 as i32);
        Index::build(&objects, &Config::default())
    }

    fn policy(index: &Index) -> OutboundPolicy {
        index.outbound("web", &what_if("/").target)
    }

    fn what_if(path: &str) -> WhatIf {
        super::what_if("catalog.shop", "GET", path, &[]).unwrap()
    }

    /// A sidecar following the catalog by its cluster IP, as intercepted connections do.
    fn held(policy: Option<&OutboundPolicy>) -> Held {
        held_as("10.96.178.161:80", policy)
    }

    fn held_as(target: &str, policy: Option<&OutboundPolicy>) -> Held {
        let doc = json!({"namespace": "web", "destinations": [
            {"target": target, "policy": policy},
        ]});
        Held::parse("test", doc.to_string().as_bytes()).unwrap()
    }

    fn report(held: &Held, path: &str, controller: Option<OutboundPolicy>) -> SidecarReport {
        compare(
            "admin x",
            held,
            "web",
            &what_if(path),
            &Config::default(),
            controller,
        )
    }

    #[test]
    fn a_sidecar_with_the_controllers_policy_is_in_sync() {
        let now = index((80, 20));
        let r = report(&held(Some(&policy(&now))), "/items", Some(policy(&now)));
        assert!(r.sidecar.holds);
        assert_eq!(r.sidecar.destination.as_deref(), Some("10.96.178.161:80"));
        let sidecar = r.sidecar.explanation.as_ref().unwrap();
        assert_eq!(
            sidecar.rule,
            Some(RuleId {
                index: 1,
                name: None
            })
        );
        assert_eq!((r.in_sync, r.differences.len()), (Some(true), 0));
        // Without the controller's view there is nothing to compare.
        let alone = report(&held(Some(&policy(&now))), "/items", None);
        assert!(alone.controller.is_none() && alone.in_sync.is_none());
    }

    #[test]
    fn a_stale_sidecar_differs_where_the_request_goes_or_only_elsewhere() {
        let before = held(Some(&policy(&index((80, 20)))));
        let now = Some(policy(&index((50, 50))));
        let r = report(&before, "/items", now.clone());
        assert_eq!(r.in_sync, Some(false));
        assert_eq!(r.differences, ["backends"]);
        let shares = |e: &Explanation| e.backends.iter().map(|b| b.share).collect::<Vec<_>>();
        assert_eq!(shares(r.sidecar.explanation.as_ref().unwrap()), [0.8, 0.2]);
        assert_eq!(shares(r.controller.as_ref().unwrap()), [0.5, 0.5]);
        // The redirect rule did not change: same answer, yet a stale policy.
        let r = report(&before, "/v0/items", now);
        assert_eq!(r.in_sync, Some(false));
        assert!(r.differences.is_empty(), "{:?}", r.differences);
    }

    #[test]
    fn a_destination_without_a_policy_is_said_so() {
        let now = index((80, 20));
        let r = report(&held_as("catalog.shop:80", None), "/", Some(policy(&now)));
        assert!(!r.sidecar.holds && r.sidecar.explanation.is_none());
        let message = r.sidecar.message.unwrap();
        assert!(message.contains("has no policy for it yet"), "{message}");
        assert!(r.in_sync.is_none() && r.controller.is_some());
        // Under its cluster IP, an entry without a policy cannot be told to be the catalog.
        let r = report(&held(None), "/", None);
        assert!(!r.sidecar.holds);
        assert_eq!(r.sidecar.follows, ["10.96.178.161:80"]);
        let message = r.sidecar.message.unwrap();
        assert!(
            message.starts_with("the sidecar holds no policy for catalog.shop:80"),
            "{message}"
        );
    }
}
