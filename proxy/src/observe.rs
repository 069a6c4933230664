//! What the access log and the sidecar's spans say about a request, gathered once for both.
//!
//! Both are off by default, and then [`Observe::begin`] returns `None` after two checks: the
//! request path allocates nothing and reads no clock for them. When one is on, the request's
//! method, authority and path are kept as it arrives (before a route rewrites them), and where
//! it went is added when its response head is ready.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, Method, Request, header};

use crate::access_log::AccessLog;
use crate::balance::EndpointState;
use crate::trace::{Active, Tracer};

/// The access log and the tracer, each when configured.
#[derive(Debug, Default)]
pub struct Observe {
    pub access_log: Option<AccessLog>,
    pub tracer: Option<Tracer>,
}

/// One request, as the access log writes it and its span describes it.
#[derive(Clone, Debug)]
pub struct Record {
    /// When the request arrived.
    pub time: SystemTime,
    pub direction: &'static str,
    pub method: Method,
    pub authority: Option<Box<str>>,
    /// The path the client asked for, without the query (which may carry secrets).
    pub path: Box<str>,
    pub status: u16,
    /// Until the response head was ready.
    pub took: Duration,
    pub parent: Arc<str>,
    pub route: Arc<str>,
    pub rule: Arc<str>,
    pub backend: Arc<str>,
    /// The endpoint of the last attempt (outbound).
    pub endpoint: Option<SocketAddr>,
    /// The client's identity inbound, the server's (the endpoint's) outbound.
    pub peer_identity: Option<Box<str>>,
    /// Attempts after the first: retries and fail-overs.
    pub retries: u32,
    /// Why the sidecar answered itself (its `trellis-proxy-error` header).
    pub error: Option<Box<str>>,
    /// Set when the request is traced.
    pub trace_id: Option<[u8; 16]>,
}

/// A request as it arrived, kept until its response head is ready.
#[derive(Debug)]
pub struct Begun {
    time: SystemTime,
    started: Instant,
    method: Method,
    authority: Option<Box<str>>,
    path: Box<str>,
    span: Option<Active>,
}

/// Where a request went, as the direction knows it.
#[derive(Debug)]
pub struct Done {
    pub parent: Arc<str>,
    pub route: Arc<str>,
    pub rule: Arc<str>,
    pub backend: Arc<str>,
    pub endpoint: Option<SocketAddr>,
    pub peer_identity: Option<Box<str>>,
    pub retries: u32,
}

impl Observe {
    pub fn is_on(&self) -> bool {
        self.access_log.is_some() || self.tracer.is_some()
    }

    /// Starts observing a request, `None` when neither is on or it is neither logged nor
    /// sampled. With tracing, the request's `traceparent` is rewritten here (see
    /// [`crate::trace`]), before routing copies its headers for the upstream request. Boxed:
    /// the request's future holds it across every await, and stays small when observing is
    /// off.
    pub fn begin<B>(&self, req: &mut Request<B>) -> Option<Box<Begun>> {
        if !self.is_on() {
            return None;
        }
        let span = self
            .tracer
            .as_ref()
            .and_then(|t| t.start(req.headers_mut()));
        if span.is_none() && self.access_log.is_none() {
            return None;
        }
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .map(Box::from);
        Some(Box::new(Begun {
            time: SystemTime::now(),
            started: Instant::now(),
            method: req.method().clone(),
            authority,
            path: req.uri().path().into(),
            span,
        }))
    }

    /// Logs and queues the span of a request whose response head is `status` and `headers`.
    pub fn end(
        &self,
        begun: Begun,
        direction: &'static str,
        done: Done,
        status: u16,
        headers: &HeaderMap,
    ) {
        let error = headers
            .get(crate::http::PROXY_ERROR)
            .and_then(|v| v.to_str().ok())
            .map(Box::from);
        let record = Record {
            time: begun.time,
            direction,
            method: begun.method,
            authority: begun.authority,
            path: begun.path,
            status,
            took: begun.started.elapsed(),
            parent: done.parent,
            route: done.route,
            rule: done.rule,
            backend: done.backend,
            endpoint: done.endpoint,
            peer_identity: done.peer_identity,
            retries: done.retries,
            error,
            trace_id: begun.span.as_ref().map(|s| s.trace_id),
        };
        match (&self.access_log, &self.tracer, begun.span) {
            (Some(log), Some(tracer), Some(span)) => {
                tracer.finish(record.clone(), span);
                log.log(record);
            }
            (None, Some(tracer), Some(span)) => tracer.finish(record, span),
            (Some(log), _, _) => log.log(record),
            (None, _, None) | (None, None, Some(_)) => {}
        }
    }
}

/// What the outbound path learns while it sends a request: the endpoint of the last attempt
/// and how many attempts followed the first. Kept only when observing.
#[derive(Debug, Default)]
pub struct Attempts {
    on: bool,
    retries: AtomicU32,
    endpoint: Mutex<Option<Arc<EndpointState>>>,
}

impl Attempts {
    pub fn new(on: bool) -> Self {
        Attempts {
            on,
            ..Default::default()
        }
    }

    /// Attempt `attempt` (0 for the first) goes to `ep`.
    pub fn picked(&self, ep: &Arc<EndpointState>, attempt: u32) {
        if !self.on {
            return;
        }
        self.retries.store(attempt, Ordering::Relaxed);
        if let Ok(mut last) = self.endpoint.lock() {
            *last = Some(ep.clone());
        }
    }

    pub fn retries(&self) -> u32 {
        self.retries.load(Ordering::Relaxed)
    }

    /// The last attempt's endpoint address and identity.
    pub fn endpoint(&self) -> (Option<SocketAddr>, Option<Box<str>>) {
        let last = self.endpoint.lock().ok().and_then(|l| l.clone());
        match last {
            Some(ep) => (
                Some(ep.addr),
                ep.identity.as_ref().map(|id| id.to_string().into()),
            ),
            None => (None, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::trace::TRACEPARENT;

    const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn request() -> Request<()> {
        let mut req = Request::get("/cart?id=7").body(()).unwrap();
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("web.shop"));
        req.headers_mut()
            .insert(TRACEPARENT, HeaderValue::from_static(SAMPLED));
        req
    }

    #[test]
    fn off_does_nothing() {
        let mut req = request();
        assert!(Observe::default().begin(&mut req).is_none());
        assert_eq!(req.headers()[TRACEPARENT], SAMPLED);
        let attempts = Attempts::new(false);
        let ep = Arc::new(EndpointState::new(
            "10.0.0.1:80".parse().unwrap(),
            None,
            None,
        ));
        attempts.picked(&ep, 2);
        assert_eq!(attempts.retries(), 0);
        assert_eq!(attempts.endpoint(), (None, None));
    }

    #[tokio::test]
    async fn the_access_log_alone_leaves_trace_headers_alone() {
        let mut registry = prometheus_client::registry::Registry::default();
        let (log, _task) = crate::access_log::start(tokio::io::sink(), 8, &mut registry);
        let observe = Observe {
            access_log: Some(log),
            tracer: None,
        };
        let mut req = request();
        let begun = observe.begin(&mut req).unwrap();
        assert_eq!(req.headers()[TRACEPARENT], SAMPLED);
        assert_eq!(begun.authority.as_deref(), Some("web.shop"));
        assert_eq!(&*begun.path, "/cart");
        assert!(begun.span.is_none());

        let attempts = Attempts::new(true);
        let id: trellis_api::Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let ep = Arc::new(EndpointState::new(
            "10.0.0.1:80".parse().unwrap(),
            Some(id),
            None,
        ));
        attempts.picked(&ep, 1);
        assert_eq!(attempts.retries(), 1);
        assert_eq!(
            attempts.endpoint(),
            (
                Some("10.0.0.1:80".parse().unwrap()),
                Some("spiffe://cluster.local/ns/shop/sa/web".into())
            )
        );
    }
}
