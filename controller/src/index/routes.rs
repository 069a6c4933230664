//! Compiling HTTPRoute and GRPCRoute objects into wire routes, collecting every problem the
//! route status must report.
//!
//! GRPCRoute filters, backendRefs and parentRefs have exactly the JSON shape of their HTTPRoute
//! counterparts, so they are converted once into the HTTPRoute types and share one compiler.

use std::collections::HashSet;
use std::str::FromStr;

use gateway_api::experimental::grpcroutes::{GrpcRoute, GrpcRouteRulesMatches};
use gateway_api::experimental::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefs,
    HttpRouteRulesFilters, HttpRouteRulesFiltersRequestRedirectPathType, HttpRouteRulesFiltersType,
    HttpRouteRulesFiltersUrlRewritePathType, HttpRouteRulesMatches, HttpRouteRulesMatchesPathType,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Serialize;
use serde::de::DeserializeOwned;
use trellis_api::matching::validate_regex;
use trellis_api::policy::{
    Backend, BackendTarget, Filter, GrpcMatch, GrpcMethodMatch, Header, HeaderModifier, HttpMatch,
    NameMatch, ObjectRef, PathMatch, PathModifier, RequestMirror, RequestRedirect, Retry, Route,
    RouteKind, Rule, Timeouts, UrlRewrite, ValueMatch,
};

use super::services::Services;
use crate::status::reason;
use trellis_api::policy::GRPC_RETRY_ANNOTATION;

/// A route of either kind, compiled once per index build.
#[derive(Clone, Debug)]
pub struct CompiledRoute {
    pub kind: RouteKind,
    pub id: ObjectRef,
    pub created: Option<Time>,
    pub generation: Option<i64>,
    /// Every parentRef as written (Service ones and others).
    pub parents: Vec<HttpRouteParentRefs>,
    pub wire: WireRoute,
    /// Rules that serve traffic exactly as written.
    pub valid_rules: usize,
    /// Why each other rule does not.
    pub invalid_rules: Vec<String>,
    /// Backend references that do not resolve: (reason, message).
    pub ref_problems: Vec<(&'static str, String)>,
}

#[derive(Clone, Debug)]
pub enum WireRoute {
    Http(Route<HttpMatch>),
    Grpc(Route<GrpcMatch>),
}

impl CompiledRoute {
    /// Whether any rule reaches the proxy (valid, or answering 500 because it is broken).
    pub fn has_rules(&self) -> bool {
        match &self.wire {
            WireRoute::Http(r) => !r.rules.is_empty(),
            WireRoute::Grpc(r) => !r.rules.is_empty(),
        }
    }

    /// The Services whose endpoints this route's policy carries: its backends and mirror
    /// backends.
    pub fn backend_services(&self) -> Vec<ObjectRef> {
        fn of_rules<M>(rules: &[Rule<M>], out: &mut Vec<ObjectRef>) {
            let mut add = |b: &Backend| {
                if let BackendTarget::Service { service, .. } = &b.target {
                    out.push(service.clone());
                }
            };
            for rule in rules {
                let backend_filters = rule.backends.iter().flat_map(|b| &b.filters);
                for f in rule.filters.iter().chain(backend_filters) {
                    if let Filter::RequestMirror(m) = f {
                        add(&m.backend);
                    }
                }
                rule.backends.iter().for_each(&mut add);
            }
        }
        let mut out = Vec::new();
        match &self.wire {
            WireRoute::Http(r) => of_rules(&r.rules, &mut out),
            WireRoute::Grpc(r) => of_rules(&r.rules, &mut out),
        }
        out.sort();
        out.dedup();
        out
    }

    /// Precedence across routes: oldest first; routes without a creation time (local
    /// manifests) after those with one; then by namespace/name.
    pub fn order_key(&self) -> (bool, Option<Time>, &ObjectRef) {
        (self.created.is_none(), self.created.clone(), &self.id)
    }
}

/// What makes a rule unusable.
enum RuleError {
    /// The rule's matches cannot be evaluated: it is left out, so requests fall through to
    /// other rules.
    Unmatchable(String),
    /// The matches are fine but the rest of the rule is not: matching requests get a 500
    /// rather than being served without a filter the author asked for.
    Broken(String),
}

fn id_of(meta: &ObjectMeta) -> ObjectRef {
    ObjectRef {
        namespace: meta
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Converts between the identically shaped GRPCRoute and HTTPRoute types.
fn reshape<A: Serialize, B: DeserializeOwned>(a: &A) -> Result<B, String> {
    serde_json::to_value(a)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("unsupported field: {e}"))
}

struct Ctx<'a> {
    route_ns: &'a str,
    services: &'a Services,
    ref_problems: Vec<(&'static str, String)>,
}

pub fn compile_http(route: &HttpRoute, services: &Services) -> CompiledRoute {
    let id = id_of(&route.metadata);
    let mut ctx = Ctx {
        route_ns: &id.namespace,
        services,
        ref_problems: Vec::new(),
    };
    let mut rules = Vec::new();
    let mut invalid = Vec::new();
    let mut valid_rules = 0;
    for (index, rule) in route.spec.rules.iter().flatten().enumerate() {
        match http_rule(index, rule, &mut ctx) {
            Ok(r) => {
                valid_rules += 1;
                rules.push(r);
            }
            Err(RuleError::Unmatchable(why)) => {
                invalid.push(rule_msg(index, rule.name.as_ref(), &why))
            }
            Err(RuleError::Broken(why)) => {
                invalid.push(rule_msg(index, rule.name.as_ref(), &why));
                if let Ok(matches) = rule.matches.iter().flatten().map(http_match).collect() {
                    rules.push(broken_rule(
                        index,
                        rule.name.clone(),
                        non_empty(matches),
                        &why,
                    ));
                }
            }
        }
    }
    CompiledRoute {
        kind: RouteKind::Http,
        created: route.metadata.creation_timestamp.clone(),
        generation: route.metadata.generation,
        parents: route.spec.parent_refs.clone().unwrap_or_default(),
        wire: WireRoute::Http(Route {
            kind: RouteKind::Http,
            id: id.clone(),
            rules,
        }),
        valid_rules,
        invalid_rules: invalid,
        ref_problems: ctx.ref_problems,
        id,
    }
}

pub fn compile_grpc(route: &GrpcRoute, services: &Services) -> CompiledRoute {
    let id = id_of(&route.metadata);
    let mut ctx = Ctx {
        route_ns: &id.namespace,
        services,
        ref_problems: Vec::new(),
    };
    let mut rules = Vec::new();
    let mut invalid = Vec::new();
    let mut valid_rules = 0;
    // The Gateway API gives GRPCRoute rules no retry field: an annotation sets one for all.
    let retry = grpc_retry(&route.metadata);
    for (index, rule) in route.spec.rules.iter().flatten().enumerate() {
        let matches: Result<Vec<GrpcMatch>, String> =
            rule.matches.iter().flatten().map(grpc_match).collect();
        let matches = match matches {
            Ok(m) => non_empty(m),
            Err(why) => {
                invalid.push(rule_msg(index, rule.name.as_ref(), &why));
                continue;
            }
        };
        let body =
            reshape::<_, Option<Vec<HttpRouteRulesFilters>>>(&rule.filters).and_then(|filters| {
                let backends =
                    reshape::<_, Option<Vec<HttpRouteRulesBackendRefs>>>(&rule.backend_refs)?;
                rule_body(filters.as_deref(), backends.as_deref(), None, &mut ctx)
            });
        match body.and_then(|b| Ok((b, retry.clone()?))) {
            Ok(((filters, backends), retry)) => {
                valid_rules += 1;
                rules.push(Rule {
                    index,
                    name: rule.name.clone(),
                    matches,
                    filters,
                    backends,
                    timeouts: Timeouts::default(),
                    retry,
                });
            }
            Err(why) => {
                invalid.push(rule_msg(index, rule.name.as_ref(), &why));
                rules.push(broken_rule(index, rule.name.clone(), matches, &why));
            }
        }
    }
    let parents = route
        .spec
        .parent_refs
        .iter()
        .flatten()
        .filter_map(|p| reshape(p).ok())
        .collect();
    CompiledRoute {
        kind: RouteKind::Grpc,
        created: route.metadata.creation_timestamp.clone(),
        generation: route.metadata.generation,
        parents,
        wire: WireRoute::Grpc(Route {
            kind: RouteKind::Grpc,
            id: id.clone(),
            rules,
        }),
        valid_rules,
        invalid_rules: invalid,
        ref_problems: ctx.ref_problems,
        id,
    }
}

fn rule_msg(index: usize, name: Option<&String>, why: &str) -> String {
    match name {
        Some(name) => format!("rule {index} ({name}): {why}"),
        None => format!("rule {index}: {why}"),
    }
}

/// A rule without matches matches every request.
fn non_empty<M: Default>(mut matches: Vec<M>) -> Vec<M> {
    if matches.is_empty() {
        matches.push(M::default());
    }
    matches
}

fn broken_rule<M>(index: usize, name: Option<String>, matches: Vec<M>, why: &str) -> Rule<M> {
    Rule {
        index,
        name,
        matches,
        filters: Vec::new(),
        backends: vec![Backend {
            weight: 1,
            target: BackendTarget::Invalid {
                status: 500,
                reason: why.to_string(),
            },
            filters: Vec::new(),
        }],
        timeouts: Timeouts::default(),
        retry: None,
    }
}

const NO_BACKENDS: &str = "the rule has no backendRefs";

fn http_rule(
    index: usize,
    rule: &HttpRouteRules,
    ctx: &mut Ctx<'_>,
) -> Result<Rule<HttpMatch>, RuleError> {
    let matches: Vec<HttpMatch> = rule
        .matches
        .iter()
        .flatten()
        .map(http_match)
        .collect::<Result<_, _>>()
        .map_err(RuleError::Unmatchable)?;
    let matches = non_empty(matches);
    let (filters, backends) = rule_body(
        rule.filters.as_deref(),
        rule.backend_refs.as_deref(),
        Some(&matches),
        ctx,
    )
    .map_err(RuleError::Broken)?;
    let timeouts = timeouts(rule).map_err(RuleError::Broken)?;
    let retry = match &rule.retry {
        None => None,
        Some(r) => Some(retry(r).map_err(RuleError::Broken)?),
    };
    Ok(Rule {
        index,
        name: rule.name.clone(),
        matches,
        filters,
        backends,
        timeouts,
        retry,
    })
}

fn http_match(m: &HttpRouteRulesMatches) -> Result<HttpMatch, String> {
    let path = match &m.path {
        None => PathMatch::Prefix("/".to_string()),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".to_string());
            match p
                .r#type
                .clone()
                .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix)
            {
                HttpRouteRulesMatchesPathType::Exact
                | HttpRouteRulesMatchesPathType::PathPrefix
                    if !value.starts_with('/') =>
                {
                    return Err(format!("path {value:?} must start with '/'"));
                }
                HttpRouteRulesMatchesPathType::Exact => PathMatch::Exact(value),
                HttpRouteRulesMatchesPathType::PathPrefix => PathMatch::Prefix(value),
                HttpRouteRulesMatchesPathType::RegularExpression => {
                    validate_regex(&value).map_err(|e| e.to_string())?;
                    PathMatch::Regex(value)
                }
            }
        }
    };
    let mut seen = HashSet::new();
    let mut headers = Vec::new();
    for h in m.headers.iter().flatten() {
        // The spec: only the first of several entries with an equivalent name counts.
        if !seen.insert(h.name.to_ascii_lowercase()) {
            continue;
        }
        http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("invalid header name {:?} in a match", h.name))?;
        let regex = matches!(h.r#type, Some(gateway_api::experimental::httproutes::HttpRouteRulesMatchesHeadersType::RegularExpression));
        headers.push(NameMatch {
            name: h.name.clone(),
            value: value_match(regex, &h.value)?,
        });
    }
    let mut seen = HashSet::new();
    let mut query_params = Vec::new();
    for q in m.query_params.iter().flatten() {
        if !seen.insert(q.name.clone()) {
            continue;
        }
        let regex = matches!(q.r#type, Some(gateway_api::experimental::httproutes::HttpRouteRulesMatchesQueryParamsType::RegularExpression));
        query_params.push(NameMatch {
            name: q.name.clone(),
            value: value_match(regex, &q.value)?,
        });
    }
    let method = match &m.method {
        None => None,
        Some(method) => Some(enum_name(method)?),
    };
    Ok(HttpMatch {
        path,
        headers,
        query_params,
        method,
    })
}

fn value_match(regex: bool, value: &str) -> Result<ValueMatch, String> {
    if regex {
        validate_regex(value).map_err(|e| e.to_string())?;
        Ok(ValueMatch::Regex(value.to_string()))
    } else {
        Ok(ValueMatch::Exact(value.to_string()))
    }
}

/// The wire name of a generated enum (e.g. `GET`), as the API server writes it.
fn enum_name<T: Serialize>(v: &T) -> Result<String, String> {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        _ => Err("unsupported enum value".to_string()),
    }
}

fn grpc_match(m: &GrpcRouteRulesMatches) -> Result<GrpcMatch, String> {
    let method = match &m.method {
        None => None,
        Some(mm) => {
            let regex = mm
                .r#type
                .as_ref()
                .is_some_and(|t| enum_name(t).as_deref() == Ok("RegularExpression"));
            if mm.service.is_none() && mm.method.is_none() {
                return Err("a gRPC method match needs a service or a method".to_string());
            }
            Some(GrpcMethodMatch {
                service: mm
                    .service
                    .as_deref()
                    .map(|s| value_match(regex, s))
                    .transpose()?,
                method: mm
                    .method
                    .as_deref()
                    .map(|s| value_match(regex, s))
                    .transpose()?,
            })
        }
    };
    let mut seen = HashSet::new();
    let mut headers = Vec::new();
    for h in m.headers.iter().flatten() {
        if !seen.insert(h.name.to_ascii_lowercase()) {
            continue;
        }
        http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("invalid header name {:?} in a match", h.name))?;
        let regex = h
            .r#type
            .as_ref()
            .is_some_and(|t| enum_name(t).as_deref() == Ok("RegularExpression"));
        headers.push(NameMatch {
            name: h.name.clone(),
            value: value_match(regex, &h.value)?,
        });
    }
    Ok(GrpcMatch { method, headers })
}

/// Filters and backends of a rule. `matches` is set for HTTP rules, whose path modifiers need
/// to know the rule's prefix match.
fn rule_body(
    filters: Option<&[HttpRouteRulesFilters]>,
    backend_refs: Option<&[HttpRouteRulesBackendRefs]>,
    matches: Option<&[HttpMatch]>,
    ctx: &mut Ctx<'_>,
) -> Result<(Vec<Filter>, Vec<Backend>), String> {
    let filters = compile_filters(filters.unwrap_or_default(), matches, ctx)?;
    let redirects = filters
        .iter()
        .any(|f| matches!(f, Filter::RequestRedirect(_)));
    let refs = backend_refs.unwrap_or_default();
    if redirects {
        if !refs.is_empty() {
            return Err("a RequestRedirect filter cannot be combined with backendRefs".to_string());
        }
        if filters.iter().any(|f| matches!(f, Filter::UrlRewrite(_))) {
            return Err(
                "RequestRedirect and URLRewrite cannot be used in the same rule".to_string(),
            );
        }
        return Ok((filters, Vec::new()));
    }
    let mut backends = Vec::new();
    for r in refs {
        let backend_filters: Vec<HttpRouteRulesFilters> =
            reshape(&r.filters.clone().unwrap_or_default())?;
        let filters = compile_filters(&backend_filters, matches, ctx)?;
        if let Some(f) = filters
            .iter()
            .find(|f| matches!(f, Filter::RequestRedirect(_) | Filter::UrlRewrite(_)))
        {
            let name = match f {
                Filter::RequestRedirect(_) => "RequestRedirect",
                _ => "URLRewrite",
            };
            return Err(format!(
                "{name} is not supported on a backendRef; put it on the rule"
            ));
        }
        let r_ = BackendRefIn {
            group: r.group.as_deref(),
            kind: r.kind.as_deref(),
            name: &r.name,
            namespace: r.namespace.as_deref(),
            port: r.port,
        };
        let mut backend = resolve_backend(&r_, ctx);
        backend.weight = u32::try_from(r.weight.unwrap_or(1)).unwrap_or(0);
        backend.filters = filters;
        backends.push(backend);
    }
    if backends.is_empty() {
        backends.push(Backend {
            weight: 1,
            target: BackendTarget::Invalid {
                status: 500,
                reason: NO_BACKENDS.to_string(),
            },
            filters: Vec::new(),
        });
    }
    Ok((filters, backends))
}

struct BackendRefIn<'a> {
    group: Option<&'a str>,
    kind: Option<&'a str>,
    name: &'a str,
    namespace: Option<&'a str>,
    port: Option<i32>,
}

/// A backend with weight 1; invalid references become a 500 backend and a status problem.
fn resolve_backend(r: &BackendRefIn<'_>, ctx: &mut Ctx<'_>) -> Backend {
    let ns = r.namespace.unwrap_or(ctx.route_ns);
    let target = match check_backend(r, ns, ctx.services) {
        Ok(target) => target,
        Err((why, message)) => {
            ctx.ref_problems.push((why, message.clone()));
            BackendTarget::Invalid {
                status: 500,
                reason: message,
            }
        }
    };
    Backend {
        weight: 1,
        target,
        filters: Vec::new(),
    }
}

fn check_backend(
    r: &BackendRefIn<'_>,
    ns: &str,
    services: &Services,
) -> Result<BackendTarget, (&'static str, String)> {
    let group = r.group.unwrap_or("");
    let kind = r.kind.unwrap_or("Service");
    if !matches!(group, "" | "core") || kind != "Service" {
        return Err((
            reason::INVALID_KIND,
            format!(
                "backendRef {ns}/{} has kind {kind:?} in group {group:?}: only core Services are supported",
                r.name
            ),
        ));
    }
    let id = ObjectRef {
        namespace: ns.to_string(),
        name: r.name.to_string(),
    };
    let Some(svc) = services.get(&id) else {
        return Err((
            reason::BACKEND_NOT_FOUND,
            format!("backendRef Service {id} does not exist"),
        ));
    };
    if svc.external_name {
        return Err((
            reason::REF_NOT_PERMITTED,
            format!(
                "backendRef Service {id} is of type ExternalName, which the mesh does not route to"
            ),
        ));
    }
    let Some(port) = r.port else {
        return Err((
            reason::BACKEND_NOT_FOUND,
            format!("backendRef Service {id} needs a port"),
        ));
    };
    let Some(sp) = u16::try_from(port).ok().and_then(|p| svc.port(p)) else {
        return Err((
            reason::BACKEND_NOT_FOUND,
            format!("backendRef Service {id} has no port {port}"),
        ));
    };
    Ok(BackendTarget::Service {
        service: id,
        port: sp.port,
        app_protocol: sp.app_protocol.clone(),
        endpoints: services.endpoints(svc, sp),
    })
}

fn compile_filters(
    filters: &[HttpRouteRulesFilters],
    matches: Option<&[HttpMatch]>,
    ctx: &mut Ctx<'_>,
) -> Result<Vec<Filter>, String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for f in filters {
        let ty = enum_name(&f.r#type)?;
        // Every filter but RequestMirror may appear once per rule.
        if f.r#type != HttpRouteRulesFiltersType::RequestMirror && !seen.insert(ty.clone()) {
            return Err(format!("filter {ty} is listed twice"));
        }
        let missing = || format!("filter {ty} has no {ty} configuration");
        let filter = match f.r#type {
            HttpRouteRulesFiltersType::RequestHeaderModifier => {
                let m = f.request_header_modifier.as_ref().ok_or_else(missing)?;
                Filter::RequestHeaderModifier(header_modifier(reshape(m)?)?)
            }
            HttpRouteRulesFiltersType::ResponseHeaderModifier => {
                let m = f.response_header_modifier.as_ref().ok_or_else(missing)?;
                Filter::ResponseHeaderModifier(header_modifier(reshape(m)?)?)
            }
            HttpRouteRulesFiltersType::RequestRedirect => {
                let r = f.request_redirect.as_ref().ok_or_else(missing)?;
                let path = match &r.path {
                    None => None,
                    Some(p) => Some(path_modifier(
                        p.r#type
                            == HttpRouteRulesFiltersRequestRedirectPathType::ReplacePrefixMatch,
                        p.replace_full_path.as_deref(),
                        p.replace_prefix_match.as_deref(),
                        matches,
                    )?),
                };
                let status = u16::try_from(r.status_code.unwrap_or(302)).unwrap_or(0);
                if ![301, 302, 303, 307, 308].contains(&status) {
                    return Err(format!(
                        "redirect status code {status} is not one of 301, 302, 303, 307, 308"
                    ));
                }
                let port = match r.port {
                    None => None,
                    Some(p) => Some(
                        u16::try_from(p)
                            .ok()
                            .filter(|p| *p > 0)
                            .ok_or_else(|| format!("redirect port {p} is out of range"))?,
                    ),
                };
                Filter::RequestRedirect(RequestRedirect {
                    scheme: r
                        .scheme
                        .as_ref()
                        .map(enum_name)
                        .transpose()?
                        .map(|s| s.to_ascii_lowercase()),
                    hostname: r.hostname.clone(),
                    path,
                    port,
                    status,
                })
            }
            HttpRouteRulesFiltersType::UrlRewrite => {
                let r = f.url_rewrite.as_ref().ok_or_else(missing)?;
                let path = match &r.path {
                    None => None,
                    Some(p) => Some(path_modifier(
                        p.r#type == HttpRouteRulesFiltersUrlRewritePathType::ReplacePrefixMatch,
                        p.replace_full_path.as_deref(),
                        p.replace_prefix_match.as_deref(),
                        matches,
                    )?),
                };
                Filter::UrlRewrite(UrlRewrite {
                    hostname: r.hostname.clone(),
                    path,
                })
            }
            HttpRouteRulesFiltersType::RequestMirror => {
                let m = f.request_mirror.as_ref().ok_or_else(missing)?;
                let b = &m.backend_ref;
                let r = BackendRefIn {
                    group: b.group.as_deref(),
                    kind: b.kind.as_deref(),
                    name: &b.name,
                    namespace: b.namespace.as_deref(),
                    port: b.port,
                };
                let backend = resolve_backend(&r, ctx);
                let (numerator, denominator) = match (&m.fraction, m.percent) {
                    (Some(f), _) => (f.numerator, f.denominator.unwrap_or(100)),
                    (None, Some(p)) => (p, 100),
                    (None, None) => (100, 100),
                };
                let numerator = u32::try_from(numerator)
                    .map_err(|_| "mirror fraction must not be negative".to_string())?;
                let denominator = u32::try_from(denominator)
                    .ok()
                    .filter(|d| *d > 0 && *d >= numerator)
                    .ok_or_else(|| {
                        "mirror fraction needs a denominator ≥ numerator and > 0".to_string()
                    })?;
                if matches!(backend.target, BackendTarget::Invalid { .. }) {
                    // Mirrored traffic never affects the client: an unusable mirror is only
                    // reported (ResolvedRefs) and left out.
                    continue;
                }
                Filter::RequestMirror(RequestMirror {
                    backend,
                    numerator,
                    denominator,
                })
            }
            HttpRouteRulesFiltersType::ExtensionRef
            | HttpRouteRulesFiltersType::Cors
            | HttpRouteRulesFiltersType::ExternalAuth => {
                return Err(format!("filter {ty} is not supported"));
            }
        };
        out.push(filter);
    }
    Ok(out)
}

fn path_modifier(
    prefix: bool,
    full: Option<&str>,
    replacement: Option<&str>,
    matches: Option<&[HttpMatch]>,
) -> Result<PathModifier, String> {
    if !prefix {
        let full = full.ok_or("ReplaceFullPath needs replaceFullPath")?;
        return Ok(PathModifier::ReplaceFullPath(full.to_string()));
    }
    let replacement = replacement.ok_or("ReplacePrefixMatch needs replacePrefixMatch")?;
    match matches {
        Some([m]) if matches!(m.path, PathMatch::Prefix(_)) => {}
        _ => {
            return Err(
                "ReplacePrefixMatch needs exactly one match, with a PathPrefix path".to_string(),
            );
        }
    }
    Ok(PathModifier::ReplacePrefixMatch(replacement.to_string()))
}

/// The shape shared by every header modifier type of the API.
#[derive(serde::Deserialize)]
struct HeaderModifierIn {
    #[serde(default)]
    set: Vec<Header>,
    #[serde(default)]
    add: Vec<Header>,
    #[serde(default)]
    remove: Vec<String>,
}

fn header_modifier(m: HeaderModifierIn) -> Result<HeaderModifier, String> {
    for h in m.set.iter().chain(&m.add) {
        http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("invalid header name {:?}", h.name))?;
        http::HeaderValue::from_str(&h.value)
            .map_err(|_| format!("invalid value for header {:?}", h.name))?;
    }
    for name in &m.remove {
        http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
    }
    Ok(HeaderModifier {
        set: m.set,
        add: m.add,
        remove: m.remove,
    })
}

/// A Gateway API duration in milliseconds; zero means "no timeout".
fn duration_ms(field: &str, s: &str) -> Result<Option<u64>, String> {
    let d = gateway_api::Duration::from_str(s)
        .map_err(|e| format!("{field} {s:?} is not a valid duration: {e}"))?;
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Ok((ms > 0).then_some(ms))
}

fn timeouts(rule: &HttpRouteRules) -> Result<Timeouts, String> {
    let Some(t) = &rule.timeouts else {
        return Ok(Timeouts::default());
    };
    let request_ms = t
        .request
        .as_deref()
        .map(|s| duration_ms("timeouts.request", s))
        .transpose()?
        .flatten();
    let backend_request_ms = t
        .backend_request
        .as_deref()
        .map(|s| duration_ms("timeouts.backendRequest", s))
        .transpose()?
        .flatten();
    if let (Some(req), Some(backend)) = (request_ms, backend_request_ms)
        && backend > req
    {
        return Err(format!(
            "timeouts.backendRequest ({backend} ms) must not exceed timeouts.request ({req} ms)"
        ));
    }
    Ok(Timeouts {
        request_ms,
        backend_request_ms,
    })
}

fn retry(r: &gateway_api::experimental::httproutes::HttpRouteRulesRetry) -> Result<Retry, String> {
    let mut codes = Vec::new();
    for c in r.codes.iter().flatten() {
        match u16::try_from(*c) {
            Ok(code @ 400..=599) => codes.push(code),
            _ => return Err(format!("retry code {c} is not a 4xx or 5xx status")),
        }
    }
    let attempts = u32::try_from(r.attempts.unwrap_or(1))
        .map_err(|_| "retry attempts must not be negative".to_string())?;
    let backoff_ms = r
        .backoff
        .as_deref()
        .map(|s| duration_ms("retry.backoff", s))
        .transpose()?
        .flatten();
    Ok(Retry {
        codes,
        attempts,
        backoff_ms,
        grpc_codes: Vec::new(),
    })
}

/// gRPC status names, by code.
const GRPC_CODES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// A GRPCRoute's retry policy from its [`GRPC_RETRY_ANNOTATION`]: the JSON shape of an
/// HTTPRoute rule's `retry`, with gRPC status codes (names such as `unavailable` or
/// `RESOURCE_EXHAUSTED`, or numbers 1–16) in `codes`.
fn grpc_retry(meta: &ObjectMeta) -> Result<Option<Retry>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Spec {
        codes: Vec<serde_json::Value>,
        #[serde(default)]
        attempts: Option<i64>,
        #[serde(default)]
        backoff: Option<String>,
    }
    let key = GRPC_RETRY_ANNOTATION;
    let Some(text) = meta.annotations.as_ref().and_then(|a| a.get(key)) else {
        return Ok(None);
    };
    let spec: Spec = serde_json::from_str(text).map_err(|e| {
        format!(
            "annotation {key}: {e} (expected e.g. {{\"codes\": [\"unavailable\"], \"attempts\": 2, \"backoff\": \"50ms\"}})"
        )
    })?;
    let mut grpc_codes = Vec::new();
    for c in &spec.codes {
        let code = match c {
            serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            serde_json::Value::String(name) => {
                let name = name.trim().to_ascii_lowercase().replace('_', "-");
                GRPC_CODES
                    .iter()
                    .position(|n| *n == name)
                    .and_then(|i| u16::try_from(i).ok())
            }
            _ => None,
        };
        match code {
            Some(code @ 1..=16) => grpc_codes.push(code),
            _ => return Err(format!("annotation {key}: {c} is not a gRPC error status")),
        }
    }
    let attempts = u32::try_from(spec.attempts.unwrap_or(1))
        .map_err(|_| format!("annotation {key}: attempts must not be negative"))?;
    let backoff_ms = spec
        .backoff
        .as_deref()
        .map(|s| duration_ms(&format!("annotation {key}: backoff"), s))
        .transpose()?
        .flatten();
    Ok(Some(Retry {
        codes: Vec::new(),
        attempts,
        backoff_ms,
        grpc_codes,
    }))
}

#[cfg(test)]
mod grpc_retry_tests {
    use super::*;

    fn meta(value: &str) -> ObjectMeta {
        ObjectMeta {
            annotations: Some([(GRPC_RETRY_ANNOTATION.to_string(), value.to_string())].into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_annotation_gives_grpc_routes_a_retry_policy() {
        assert_eq!(grpc_retry(&ObjectMeta::default()), Ok(None));
        let r = grpc_retry(&meta(
            r#"{"codes": ["unavailable", "RESOURCE_EXHAUSTED", 4], "attempts": 3, "backoff": "50ms"}"#,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(r.grpc_codes, [14, 8, 4]);
        assert_eq!((r.attempts, r.backoff_ms), (3, Some(50)));
        assert!(r.codes.is_empty());
        let r = grpc_retry(&meta(r#"{"codes": [14]}"#)).unwrap().unwrap();
        assert_eq!((r.attempts, r.backoff_ms), (1, None));
        for bad in [
            "unavailable",
            r#"{"codes": ["ok"]}"#,
            r#"{"codes": [17]}"#,
            r#"{"codes": ["sometimes"]}"#,
            r#"{"codes": [14], "attempts": -1}"#,
            r#"{"codes": [14], "backoff": "soon"}"#,
            r#"{"codes": [14], "retries": 2}"#,
        ] {
            let err = grpc_retry(&meta(bad)).unwrap_err();
            assert!(
                err.starts_with("annotation retry.trellis.dev/grpc"),
                "{bad}: {err}"
            );
        }
    }
}
