//! The outbound path: the app's connections (redirected by iptables, or sent to the outbound
//! port directly), routed per request by the destination's policy.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use tokio::net::{TcpListener, TcpStream};
use trellis_api::Identity;
use trellis_api::discovery::Target as DiscoveryTarget;
use trellis_api::filters::{RedirectRequest, redirect_location, rewrite_path};
use trellis_api::matching::RequestHead;

use crate::detect::{self, Prefixed, Protocol};
use crate::discovery::Subscription;
use crate::http::{self as h, Body, ORIG_PROTO};
use crate::metrics::{RequestCache, RequestLabels};
use crate::observe::{Attempts, Done};
use crate::policy::{Backend, Filter, Policy, PolicyKind, Routing, Rule, Target};
use crate::pool::RequestAuthority;
use crate::proxy::Proxy;
use crate::upgrade::Pending;
use crate::{listen, tcp};
use trellis_api::filters::CompiledHeaderModifier;

const DIRECTION: &str = "outbound";
/// The most of a retried error response read (and thrown away) so its connection can be
/// reused; a longer one is dropped with its connection.
const DISCARD_LIMIT: usize = 64 * 1024;

/// Accepts outbound connections until shutdown.
pub async fn serve(proxy: Arc<Proxy>, listeners: Vec<TcpListener>) {
    let max = proxy.config.args.max_connections;
    listen::serve(proxy, listeners, DIRECTION, max, connection).await;
}

/// Per-connection state shared by the connection's requests (HTTP/2 streams run concurrently).
struct Conn {
    orig_dst: Option<SocketAddr>,
    sub: Option<Subscription>,
    /// Explicit mode: the last Host's subscription, since a connection rarely changes Host. The
    /// Host text is kept too, so that a repeated Host is found without parsing it again.
    by_host: Mutex<Option<ByHost>>,
    metrics: RequestCache,
}

struct ByHost {
    host: Box<str>,
    target: DiscoveryTarget,
    sub: Subscription,
}

async fn connection(proxy: Arc<Proxy>, mut stream: TcpStream) {
    // Not redirected: the app connected to the outbound port itself, and each request's Host
    // says where it goes.
    let orig_dst = listen::original_dst(&stream);
    let sub = orig_dst.map(|a| proxy.discovery.subscribe(&DiscoveryTarget::Addr(a)));

    let mut buf = BytesMut::new();
    let opaque_port = orig_dst.is_some_and(|a| proxy.config.opaque_ports.contains(a.port()));
    // A Service port that says what it speaks (`appProtocol`, or the opaque-ports annotation)
    // needs no detection: a server-first protocol would otherwise wait the detection timeout.
    let declared = match (&sub, opaque_port) {
        (Some(sub), false) => {
            let policy = match sub.current() {
                Some(p) => Some(p),
                None => sub.clone().wait(proxy.config.args.discovery_wait).await,
            };
            policy.and_then(|p| match &p.kind {
                PolicyKind::Service(svc) => svc.declared_protocol(),
                PolicyKind::Forward { .. } => None,
            })
        }
        _ => None,
    };
    let (protocol, took) = if opaque_port {
        (Protocol::Opaque, None)
    } else if let Some(p) = declared {
        (p, None)
    } else {
        let started = Instant::now();
        match detect::detect(&mut stream, &mut buf, proxy.config.args.detect_timeout).await {
            Ok(p) => (p, Some(started.elapsed())),
            Err(e) => {
                tracing::debug!(error = %e, "outbound connection failed during detection");
                return;
            }
        }
    };
    proxy.metrics.detected(DIRECTION, protocol.as_str(), took);
    let io = Prefixed::new(buf, stream);

    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let conn = Arc::new(Conn {
                orig_dst,
                sub,
                by_host: Mutex::new(None),
                metrics: RequestCache::default(),
            });
            let svc_proxy = proxy.clone();
            let service = hyper::service::service_fn(move |req| {
                let proxy = svc_proxy.clone();
                let conn = conn.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&proxy, &conn, req).await) }
            });
            // Boxed, like the opaque path below: a connection still in detection holds a small
            // task.
            Box::pin(crate::http::serve_connection(
                &proxy, DIRECTION, io, service,
            ))
            .await;
        }
        Protocol::Tls | Protocol::Opaque => {
            let Some(dst) = orig_dst else {
                proxy.metrics.error(DIRECTION, "no_destination");
                tracing::info!(
                    "an opaque connection to the outbound port has no destination: closed"
                );
                return;
            };
            let policy = match &sub {
                Some(s) => s.clone().wait(proxy.config.args.discovery_wait).await,
                None => None,
            };
            let (addr, identity) = tcp_upstream(policy.as_deref(), dst);
            if proxy.is_own_listener(addr) {
                proxy.metrics.error(DIRECTION, "self_call");
                tracing::info!(%addr, "an opaque connection to this sidecar's own listener: closed");
                return;
            }
            let meshed = identity.is_some();
            Box::pin(tcp::forward(
                &proxy,
                DIRECTION,
                io,
                addr,
                meshed,
                identity.as_ref(),
            ))
            .await;
        }
    }
}

/// Where an opaque connection goes, and the identity of the sidecar there if it has one: one
/// of a Service's own endpoints (HTTP routes do not apply to bytes that are not HTTP), load
/// balanced per connection; else the address the app asked for.
fn tcp_upstream(policy: Option<&Policy>, dst: SocketAddr) -> (SocketAddr, Option<Identity>) {
    let own = match policy.map(|p| &p.kind) {
        Some(PolicyKind::Forward { identity }) => return (dst, identity.clone()),
        Some(PolicyKind::Service(svc)) => match &svc.routing {
            Routing::Passthrough(b) => Some(&**b),
            Routing::Http(_) | Routing::Grpc(_) => svc.opaque.as_ref(),
        },
        None => None,
    };
    match own.map(|b| &b.target) {
        Some(Target::Service { balancer, .. }) => match balancer.pick() {
            Some(ep) => (ep.addr, ep.identity.clone()),
            None => (dst, None),
        },
        _ => (dst, None),
    }
}

/// What a request's metrics say about where it went.
struct Outcome {
    parent: Arc<str>,
    route_kind: &'static str,
    route: Arc<str>,
    rule: Arc<str>,
    backend: Arc<str>,
    /// For the access log and spans: the endpoint and the retries.
    attempts: Attempts,
}

impl Outcome {
    fn new(proxy: &Proxy) -> Self {
        Self {
            parent: proxy.empty_label.clone(),
            route_kind: "",
            route: proxy.empty_label.clone(),
            rule: proxy.empty_label.clone(),
            backend: proxy.empty_label.clone(),
            attempts: Attempts::new(proxy.observe.is_on()),
        }
    }

    fn done(&self) -> Done {
        let (endpoint, peer_identity) = self.attempts.endpoint();
        Done {
            parent: self.parent.clone(),
            route: self.route.clone(),
            rule: self.rule.clone(),
            backend: self.backend.clone(),
            endpoint,
            peer_identity,
            retries: self.attempts.retries(),
        }
    }
}

async fn handle(proxy: &Arc<Proxy>, conn: &Conn, mut req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let grpc = h::is_grpc(&req);
    let mut outcome = Outcome::new(proxy);
    let begun = proxy.observe.begin(&mut req);
    let res = route(proxy, conn, req, grpc, &mut outcome).await;
    if let Some(begun) = begun {
        let status = res.status().as_u16();
        proxy
            .observe
            .end(*begun, DIRECTION, outcome.done(), status, res.headers());
    }
    let labels = RequestLabels {
        direction: DIRECTION,
        parent: outcome.parent,
        route_kind: outcome.route_kind,
        route: outcome.route,
        rule: outcome.rule,
        backend: outcome.backend,
        peer_identity: proxy.empty_label.clone(),
        status: res.status().as_u16(),
    };
    let took = started.elapsed();
    if !grpc {
        proxy.metrics.request(&conn.metrics, labels, took);
        return res;
    }
    // A gRPC call's status is in a trailers-only answer's headers, else in its trailers: then
    // the call is counted when they pass.
    match res.headers().get("grpc-status") {
        Some(v) => {
            let status = crate::metrics::grpc_status_label(v.as_bytes());
            proxy
                .metrics
                .request_with_status(&conn.metrics, labels, status, took);
            res
        }
        None => res.map(|body| proxy.metrics.request_at_trailers(labels, took, body)),
    }
}

/// The subscription for this request: the connection's, or the one its Host names.
fn subscription(
    proxy: &Proxy,
    conn: &Conn,
    req: &Request<Incoming>,
) -> Result<(Subscription, Option<SocketAddr>), &'static str> {
    if let Some(sub) = &conn.sub {
        return Ok((sub.clone(), conn.orig_dst));
    }
    let host = h::host_of(req).ok_or("the request has no Host and no original destination")?;
    let mut cached = match conn.by_host.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    if let Some(c) = cached.as_ref()
        && *c.host == *host
    {
        return Ok((c.sub.clone(), None));
    }
    let target = DiscoveryTarget::parse_with_default_port(host, 80)
        .map_err(|_| "the request's Host is not a valid destination")?;
    let sub = match cached.as_ref() {
        // Another spelling of the same destination.
        Some(c) if c.target == target => c.sub.clone(),
        _ => proxy.discovery.subscribe(&target),
    };
    *cached = Some(ByHost {
        host: host.into(),
        target,
        sub: sub.clone(),
    });
    Ok((sub, None))
}

async fn route(
    proxy: &Arc<Proxy>,
    conn: &Conn,
    mut req: Request<Incoming>,
    grpc: bool,
    outcome: &mut Outcome,
) -> Response<Body> {
    let upgrade = Pending::take(&mut req);
    let (sub, orig_dst) = match subscription(proxy, conn, &req) {
        Ok(s) => s,
        Err(why) => {
            proxy.metrics.error(DIRECTION, "bad_request");
            return h::local(StatusCode::BAD_REQUEST, why, grpc);
        }
    };
    let policy = match sub.current() {
        Some(p) => p,
        None => match sub.clone().wait(proxy.config.args.discovery_wait).await {
            Some(p) => p,
            None => {
                proxy.metrics.error(DIRECTION, "no_policy");
                return h::local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no policy for this destination from the controller yet",
                    grpc,
                );
            }
        },
    };
    let svc = match &policy.kind {
        PolicyKind::Forward { identity } => {
            return forward_unrouted(proxy, req, orig_dst, identity.as_ref(), upgrade, grpc).await;
        }
        PolicyKind::Service(svc) => svc,
    };
    outcome.parent = svc.label.clone();
    let backend_and_rule: (Option<&Arc<Rule>>, Option<&str>) = match &svc.routing {
        Routing::Passthrough(backend) => {
            outcome.backend = backend_label(proxy, backend);
            if let Some(upgrade) = upgrade {
                return upgrade_to(proxy, upgrade, backend, req, grpc).await;
            }
            return send(proxy, backend, None, req, grpc, outcome).await;
        }
        Routing::Http(set) => {
            let head = RequestHead::from(&req);
            match set.select(&head) {
                Some(sel) => (Some(sel.rule), sel.prefix),
                None => (None, None),
            }
        }
        Routing::Grpc(set) => {
            let head = RequestHead::from(&req);
            match set.select(&head) {
                Some(sel) => (Some(sel.rule), sel.prefix),
                None => (None, None),
            }
        }
    };
    let (Some(rule), prefix) = backend_and_rule else {
        return h::local(
            StatusCode::NOT_FOUND,
            "no route rule matches the request",
            grpc,
        );
    };
    outcome.route_kind = rule.labels.kind;
    outcome.route = rule.labels.route.clone();
    outcome.rule = rule.labels.rule.clone();

    // Rule filters, in the order they are written.
    let mut mirrors = Vec::new();
    for filter in &rule.filters {
        match filter {
            Filter::RequestHeaders(m) => m.apply(req.headers_mut()),
            Filter::Rewrite(rw) => {
                // The host is `:authority` in HTTP/2 and `Host` in HTTP/1: a `host` header
                // beside a different `:authority` would make the request malformed.
                if let Some(host) = rw.hostname.as_deref() {
                    if req.version() == Version::HTTP_2 {
                        if let Ok(a) = host.parse::<Authority>() {
                            req.headers_mut().remove(header::HOST);
                            req.extensions_mut().insert(RequestAuthority(a));
                        }
                    } else if let Ok(v) = HeaderValue::from_str(host) {
                        req.headers_mut().insert(header::HOST, v);
                    }
                }
                if let Some(path) = &rw.path {
                    let new_path = rewrite_path(path, req.uri().path(), prefix);
                    let pq = match req.uri().query() {
                        Some(q) => format!("{new_path}?{q}"),
                        None => new_path,
                    };
                    if let Ok(pq) = pq.parse::<http::uri::PathAndQuery>() {
                        let mut parts = req.uri().clone().into_parts();
                        parts.path_and_query = Some(pq);
                        if let Ok(uri) = Uri::from_parts(parts) {
                            *req.uri_mut() = uri;
                        }
                    }
                }
            }
            Filter::Redirect(r) => {
                let location = redirect_location(
                    r,
                    &RedirectRequest {
                        scheme: "http",
                        host: h::host_of(&req).unwrap_or_default(),
                        path: req.uri().path(),
                        query: req.uri().query(),
                        matched_prefix: prefix,
                        service_port: svc.port,
                    },
                );
                let mut res = Response::new(h::empty());
                *res.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
                if let Ok(v) = HeaderValue::from_str(&location) {
                    res.headers_mut().insert(header::LOCATION, v);
                }
                apply_response_filters(rule, None, &mut res);
                return res;
            }
            Filter::Mirror { .. } => sample_mirror(filter, &mut mirrors),
            Filter::ResponseHeaders(_) => {}
        }
    }
    let Some(backend) = rule.backends.pick() else {
        return h::local(
            StatusCode::INTERNAL_SERVER_ERROR,
            "every backend of the rule has weight 0",
            grpc,
        );
    };
    outcome.backend = backend_label(proxy, backend);
    // An upgraded connection is a byte stream for one backend: not mirrored, not retried.
    if let Some(upgrade) = upgrade {
        let mut res = upgrade_to(proxy, upgrade, backend, req, grpc).await;
        apply_response_filters(rule, Some(backend), &mut res);
        return res;
    }
    for filter in &backend.mirrors {
        sample_mirror(filter, &mut mirrors);
    }
    let req = if mirrors.is_empty() {
        req.map(h::incoming)
    } else {
        crate::mirror::start(proxy, req, &mirrors)
    };
    // `timeouts.request` bounds the whole exchange: the response headers (every attempt and
    // backoff included) and then the response stream.
    let mut res = match rule.timeouts.request_ms {
        Some(ms) => {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
            let sent = send(proxy, backend, Some(rule), req, grpc, outcome);
            match tokio::time::timeout_at(deadline, sent).await {
                Ok(res) => res.map(|body| {
                    let labels = timeout_labels(outcome, "request");
                    let family = proxy.metrics.timeouts.clone();
                    crate::retry::Deadline::new(body, deadline, grpc, (family, labels))
                        .boxed_unsync()
                }),
                Err(_) => {
                    proxy
                        .metrics
                        .timeouts
                        .get_or_create(&timeout_labels(outcome, "request"))
                        .inc();
                    h::local(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the route's request timeout expired",
                        grpc,
                    )
                }
            }
        }
        None => send(proxy, backend, Some(rule), req, grpc, outcome).await,
    };
    apply_response_filters(rule, Some(backend), &mut res);
    res
}

/// Adds a `RequestMirror`'s backend to `mirrors` for this request, with the filter's share
/// (percent or fraction) of the requests.
fn sample_mirror<'a>(filter: &'a Filter, mirrors: &mut Vec<&'a Backend>) {
    if let Filter::Mirror {
        backend,
        numerator,
        denominator,
    } = filter
        && fastrand::u32(..*denominator) < *numerator
    {
        mirrors.push(backend);
    }
}

fn backend_label(proxy: &Proxy, backend: &Backend) -> Arc<str> {
    match &backend.target {
        Target::Service { label, .. } => label.clone(),
        Target::Answer { .. } => proxy.empty_label.clone(),
    }
}

fn apply_response_filters(rule: &Rule, backend: Option<&Backend>, res: &mut Response<Body>) {
    if let Some(m) = backend.and_then(|b| b.response_headers.as_ref()) {
        m.apply(res.headers_mut());
    }
    for f in &rule.filters {
        if let Filter::ResponseHeaders(m) = f {
            m.apply(res.headers_mut());
        }
    }
}

/// The request for one attempt to `authority`, with the backend's request filters applied.
/// `headers` are the client's, cloned by the caller only when another attempt may need them.
pub(crate) fn build_upstream(
    parts: &http::request::Parts,
    headers: HeaderMap,
    body: Body,
    authority: &Authority,
    meshed: bool,
    request_headers: Option<&CompiledHeaderModifier>,
) -> Result<Request<Body>, http::Error> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = crate::hop::upstream_uri(authority, meshed, parts.uri.path_and_query())?;
    *req.headers_mut() = headers;
    if parts.version != Version::HTTP_2
        && req.headers().get(header::HOST).is_none()
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    h::strip_hop_by_hop(req.headers_mut());
    if parts.version == Version::HTTP_2 {
        // The client's `:authority` (or a rewrite's) goes on to HTTP/2 upstreams as it was.
        let authority = match parts.extensions.get::<RequestAuthority>() {
            Some(a) => Some(a.clone()),
            None => parts.uri.authority().cloned().map(RequestAuthority),
        };
        if let Some(a) = authority {
            req.extensions_mut().insert(a);
        }
    } else if meshed {
        req.headers_mut()
            .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    }
    if let Some(m) = request_headers {
        m.apply(req.headers_mut());
    }
    Ok(req)
}

/// Forwards to a backend: picks an endpoint, applies retries and the per-attempt timeout.
async fn send(
    proxy: &Proxy,
    backend: &Backend,
    rule: Option<&Rule>,
    req: Request<impl hyper::body::Body<Data = Bytes, Error: Into<h::BoxError>> + Send + 'static>,
    grpc: bool,
    at: &Outcome,
) -> Response<Body> {
    let (status, reason) = match &backend.target {
        Target::Answer { status, reason } => (*status, reason.as_str()),
        Target::Service {
            balancer, http2, ..
        } => {
            if balancer.is_empty() {
                (503, "the backend has no ready endpoints")
            } else {
                let target = ServiceTarget {
                    backend,
                    balancer,
                    http2: *http2,
                };
                return send_to_service(proxy, &target, rule, req, grpc, at).await;
            }
        }
    };
    h::local(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        reason,
        grpc,
    )
}

/// A backend Service and its endpoints.
struct ServiceTarget<'a> {
    backend: &'a Backend,
    balancer: &'a crate::balance::Balancer,
    http2: bool,
}

/// Where each attempt's body comes from.
enum Bodies {
    /// An empty body: every attempt sends an empty one.
    Empty,
    /// A body sent once: no attempt can follow one that took it.
    Once(Option<Body>),
    /// A body kept while it streams, for attempts after the first.
    Replay(crate::replay::ReplayBody),
}

impl Bodies {
    fn next(&mut self) -> Option<Body> {
        match self {
            Bodies::Empty => Some(h::empty()),
            Bodies::Once(b) => b.take(),
            Bodies::Replay(r) => r.replay().map(BodyExt::boxed_unsync),
        }
    }

    /// Whether another attempt could send the body whole.
    fn can_resend(&self) -> bool {
        match self {
            Bodies::Empty => true,
            Bodies::Once(_) => false,
            Bodies::Replay(r) => r.is_replayable(),
        }
    }
}

fn at_labels(at: &Outcome) -> crate::metrics::RouteBackendLabels {
    crate::metrics::RouteBackendLabels {
        direction: DIRECTION,
        parent: at.parent.clone(),
        route: at.route.clone(),
        backend: at.backend.clone(),
    }
}

fn timeout_labels(at: &Outcome, timeout: &'static str) -> crate::metrics::TimeoutLabels {
    crate::metrics::TimeoutLabels {
        at: at_labels(at),
        timeout,
    }
}

/// Sends `req` to an endpoint of the backend, and again (elsewhere) while it is safe and
/// allowed: see [`crate::retry`] for the rules, [`crate::balance`] for failure accrual.
async fn send_to_service(
    proxy: &Proxy,
    target: &ServiceTarget<'_>,
    rule: Option<&Rule>,
    req: Request<impl hyper::body::Body<Data = Bytes, Error: Into<h::BoxError>> + Send + 'static>,
    grpc: bool,
    at: &Outcome,
) -> Response<Body> {
    use crate::retry::{Failure, MAX_RETRIES};
    let ServiceTarget {
        backend,
        balancer,
        http2,
    } = *target;
    let args = &proxy.config.args;
    let policy = rule.and_then(|r| r.retry.as_ref());
    let attempt_timeout = rule
        .and_then(|r| r.timeouts.backend_request_ms)
        .map(Duration::from_millis);
    let retries = policy.map_or(0, |r| r.attempts.min(MAX_RETRIES));
    let budget = args.retry_budget();
    if retries > 0 {
        balancer.budget.deposit(&budget);
    }
    // A failed connect carried nothing: another endpoint can take the request.
    let can_fail_over = balancer.endpoints().len() > 1;
    let (mut parts, body) = req.into_parts();
    let body = body.map_err(Into::into).boxed_unsync();
    let mut bodies = if body.is_end_stream() {
        Bodies::Empty
    } else if retries > 0 || can_fail_over {
        // Without retries only a body never read (a failed connect) is sent again: nothing
        // needs keeping.
        let cap = if retries > 0 {
            args.retry_max_body_bytes
        } else {
            0
        };
        Bodies::Replay(crate::replay::ReplayBody::new(body, cap))
    } else {
        Bodies::Once(Some(body))
    };
    let accrual = args.accrual();
    let mut avoid = None;
    // Attempts after the first, and those of them that were the route's retries.
    let (mut attempt, mut retried) = (0u32, 0u32);
    loop {
        let Some(ep) = balancer.pick_excluding(avoid) else {
            return h::local(
                StatusCode::SERVICE_UNAVAILABLE,
                "the backend has no ready endpoints",
                grpc,
            );
        };
        let Some(this_body) = bodies.next() else {
            // Replay was given up since the decision to try again (an earlier attempt's body
            // was still being read): nothing whole can be sent.
            return h::local(
                StatusCode::BAD_GATEWAY,
                "the backend failed and the request body is too large to send again",
                grpc,
            );
        };
        at.attempts.picked(ep, attempt);
        let meshed = ep.identity.is_some();
        // Only an attempt that may be followed by another needs its own copy of the headers.
        let may_follow =
            bodies.can_resend() && attempt < MAX_RETRIES && (retried < retries || can_fail_over);
        let headers = if may_follow {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let upstream_req = match build_upstream(
            &parts,
            headers,
            this_body,
            &ep.authority,
            meshed,
            backend.request_headers.as_ref(),
        ) {
            Ok(r) => r,
            Err(_) => {
                return h::local(
                    StatusCode::BAD_REQUEST,
                    "the request cannot be forwarded",
                    grpc,
                );
            }
        };
        let mut in_flight = ep.start();
        let sent = proxy.upstream.send(upstream_req, http2 || meshed);
        let result = match attempt_timeout {
            Some(t) => tokio::time::timeout(t, sent)
                .await
                .map_err(|_| AttemptError::Timeout),
            None => Ok(sent.await),
        }
        .and_then(|r| r.map_err(AttemptError::Upstream));
        // A 5xx answer, a broken exchange or a timeout counts against the endpoint.
        let endpoint_failed = result
            .as_ref()
            .map_or(true, |res| res.status().is_server_error());
        if endpoint_failed {
            if in_flight.failure(&accrual) {
                tracing::info!(endpoint = %ep.addr, backend = %at.backend, "endpoint ejected after consecutive failures");
                proxy.metrics.ejections.get_or_create(&at_labels(at)).inc();
            }
        } else {
            in_flight.success();
        }
        drop(in_flight);
        // What failed, keeping an answer the route asked to retry in case it is the last.
        let (failure, answer) = match result {
            Ok(res) if policy.is_some_and(|p| asks_retry(p, &res, grpc)) => {
                (Failure::Status, Some(res))
            }
            // A success, or a failure the route did not ask to retry: passed on as it is.
            Ok(res) => return h::from_upstream(res),
            Err(AttemptError::Timeout) => (Failure::Timeout, None),
            Err(AttemptError::Upstream(e)) => {
                tracing::debug!(error = %e, endpoint = %ep.addr, "upstream request failed");
                match e.is_connect() {
                    true => (Failure::Connect, None),
                    false => (Failure::Connection, None),
                }
            }
        };
        let allowed =
            bodies.can_resend() && attempt < MAX_RETRIES && failure.is_safe_to_retry(&parts.method);
        let fail_over = allowed && failure == Failure::Connect && can_fail_over;
        let mut retry = allowed && !fail_over && retried < retries;
        if retry && !balancer.budget.withdraw(&budget) {
            proxy
                .metrics
                .retry_budget_exhausted
                .get_or_create(&at_labels(at))
                .inc();
            retry = false;
        }
        if !(fail_over || retry) {
            return match (answer, failure) {
                (Some(res), _) => h::from_upstream(res),
                (None, Failure::Timeout) => {
                    proxy
                        .metrics
                        .timeouts
                        .get_or_create(&timeout_labels(at, "backend_request"))
                        .inc();
                    h::local(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the route's backend request timeout expired",
                        grpc,
                    )
                }
                (None, f) => {
                    let connect = f == Failure::Connect;
                    proxy
                        .metrics
                        .error(DIRECTION, if connect { "connect" } else { "upstream" });
                    h::local(
                        StatusCode::BAD_GATEWAY,
                        "the backend could not be reached",
                        grpc,
                    )
                }
            };
        }
        if let Some(res) = answer {
            // Read so the connection can be reused, within a bound.
            h::discard(res.into_body(), DISCARD_LIMIT).await;
        }
        proxy
            .metrics
            .retries
            .get_or_create(&crate::metrics::RetryLabels {
                at: at_labels(at),
                reason: failure.label(),
            })
            .inc();
        avoid = Some(ep.addr);
        attempt += 1;
        if retry {
            retried += 1;
            let base = policy.and_then(|p| p.backoff_ms).map(Duration::from_millis);
            tokio::time::sleep(crate::retry::backoff(base, retried, fastrand::f64())).await;
        }
    }
}

/// Whether a rule's retry policy asks for another attempt after this answer: its status is
/// in `codes`, or (gRPC) the status of a trailers-only answer is in `grpc_codes`.
fn asks_retry(policy: &trellis_api::policy::Retry, res: &Response<Incoming>, grpc: bool) -> bool {
    policy.codes.contains(&res.status().as_u16())
        || (grpc
            && !policy.grpc_codes.is_empty()
            && res
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u16>().ok())
                .is_some_and(|c| policy.grpc_codes.contains(&c)))
}

enum AttemptError {
    Timeout,
    Upstream(crate::http::UpstreamError),
}

/// An upgrade request to one endpoint of `backend`.
async fn upgrade_to(
    proxy: &Arc<Proxy>,
    upgrade: Pending,
    backend: &Backend,
    req: Request<Incoming>,
    grpc: bool,
) -> Response<Body> {
    let balancer = match &backend.target {
        Target::Service { balancer, .. } => balancer,
        Target::Answer { status, reason } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return h::local(status, reason, grpc);
        }
    };
    let Some(ep) = balancer.pick() else {
        return h::local(
            StatusCode::SERVICE_UNAVAILABLE,
            "the backend has no ready endpoints",
            grpc,
        );
    };
    let (mut parts, body) = req.into_parts();
    let headers = std::mem::take(&mut parts.headers);
    let meshed = ep.identity.is_some();
    let Ok(upstream_req) = build_upstream(
        &parts,
        headers,
        h::incoming(body),
        &ep.authority,
        meshed,
        backend.request_headers.as_ref(),
    ) else {
        return h::local(
            StatusCode::BAD_REQUEST,
            "the request cannot be forwarded",
            grpc,
        );
    };
    let _in_flight = ep.start();
    upgrade
        .forward(
            proxy,
            DIRECTION,
            upstream_req,
            ep.addr,
            ep.identity.as_ref(),
            grpc,
        )
        .await
}

/// Traffic that is not for a Service: to the address the app asked for, unrouted.
async fn forward_unrouted(
    proxy: &Arc<Proxy>,
    req: Request<Incoming>,
    orig_dst: Option<SocketAddr>,
    identity: Option<&Identity>,
    upgrade: Option<Pending>,
    grpc: bool,
) -> Response<Body> {
    let meshed = identity.is_some();
    let addr = match orig_dst {
        Some(a) => a,
        None => {
            let Some(host) = h::host_of(&req) else {
                return h::local(StatusCode::BAD_REQUEST, "the request has no Host", grpc);
            };
            let with_port = if host
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                host.to_string()
            } else {
                format!("{host}:80")
            };
            match tokio::net::lookup_host(with_port)
                .await
                .ok()
                .and_then(|mut a| a.next())
            {
                Some(a) => a,
                None => {
                    return h::local(
                        StatusCode::BAD_GATEWAY,
                        "the request's Host does not resolve",
                        grpc,
                    );
                }
            }
        }
    };
    if proxy.is_own_listener(addr) {
        proxy.metrics.error(DIRECTION, "self_call");
        return h::local(
            StatusCode::BAD_REQUEST,
            "the request's destination is this sidecar's own listener",
            grpc,
        );
    }
    // The connector finds the identity to verify in the registry: keep it there meanwhile.
    let _known = identity.map(|id| proxy.endpoints.get(addr, Some(id), None));
    let http2 = req.version() == Version::HTTP_2;
    let (mut parts, body) = req.into_parts();
    let headers = std::mem::take(&mut parts.headers);
    let authority = crate::hop::authority(addr);
    let Ok(upstream_req) =
        build_upstream(&parts, headers, h::incoming(body), &authority, meshed, None)
    else {
        return h::local(
            StatusCode::BAD_REQUEST,
            "the request cannot be forwarded",
            grpc,
        );
    };
    if let Some(upgrade) = upgrade {
        return upgrade
            .forward(proxy, DIRECTION, upstream_req, addr, identity, grpc)
            .await;
    }
    match proxy.upstream.send(upstream_req, http2 || meshed).await {
        Ok(res) => h::from_upstream(res),
        Err(e) => {
            tracing::debug!(error = %e, %addr, "unrouted request failed");
            proxy.metrics.error(DIRECTION, "upstream");
            h::local(
                StatusCode::BAD_GATEWAY,
                "the destination could not be reached",
                grpc,
            )
        }
    }
}
