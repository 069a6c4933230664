//! The discovery server: streams each proxy the outbound policy of the destinations it asks
//! about, as documented in [`trellis_api::discovery`].
//!
//! Streams that ask the same question share a [subscription](crate::subscriptions): one task
//! follows the index and wakes a stream only when its policy changed, so an unrelated change
//! wakes no stream and sends no byte. Streams are capped per client and in total ([`Limits`]).
//!
//! With mutual TLS ([`serve_tls`]) the client's namespace is the one in its certificate: a
//! proxy cannot ask for the consumer routes of a namespace it does not run in. Over mutual TLS
//! the server also streams the trust anchors it holds ([`Options::anchors`]), so that a root
//! rotation reaches proxies without a restart.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use trellis_api::Identity;
use trellis_api::discovery::{
    ErrorBody, NDJSON, OUTBOUND_PATH, TRUST_ANCHORS_PATH, Target, TrustAnchorsUpdate,
};
use trellis_api::policy::OutboundPolicy;
use trellis_tls::AnchorSet;

use crate::index::Index;
use crate::subscriptions::{Answer, Permit, StreamCounter, Subscription, Subscriptions};
pub use crate::subscriptions::{DiscoveryMetrics, Limits, Refused};

/// How long shutdown waits for connections to close after their streams ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A proxy holds one stream per destination it uses, all on one connection: the h2 default
/// (a few hundred) would stall a busy proxy's new destinations.
const MAX_STREAMS_PER_CONNECTION: u32 = 10_000;
/// Pings find proxies that vanished without closing the connection (node loss), whose stream
/// tasks would otherwise wait forever.
const KEEPALIVE: Duration = Duration::from_secs(20);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server asks of the model; implemented by [`Index`], and by fakes in tests so that
/// the protocol can be tested apart from the compilation of routes.
pub trait Policies: Send + Sync + 'static {
    fn outbound(&self, client_namespace: &str, target: &Target) -> OutboundPolicy;

    /// As [`Policies::outbound`]; a model that keeps unchanged policies as the same `Arc`
    /// across versions lets the server skip comparing them.
    fn shared(&self, client_namespace: &str, target: &Target) -> Arc<OutboundPolicy> {
        Arc::new(self.outbound(client_namespace, target))
    }
}

impl Policies for Index {
    fn outbound(&self, client_namespace: &str, target: &Target) -> OutboundPolicy {
        Index::outbound(self, client_namespace, target)
    }

    fn shared(&self, client_namespace: &str, target: &Target) -> Arc<OutboundPolicy> {
        Index::outbound_shared(self, client_namespace, target)
    }
}

/// How the server runs, beyond where it listens.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub limits: Limits,
    pub metrics: DiscoveryMetrics,
    /// The trust anchors the controller holds, streamed to mutual TLS clients on
    /// [`TRUST_ANCHORS_PATH`]; `None`: that path answers 404.
    pub anchors: Option<watch::Receiver<Arc<AnchorSet>>>,
}

/// Who asks, and so where its namespace comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Client {
    /// Plaintext discovery (local development): the `namespace` parameter is believed.
    Unverified,
    /// Mutual TLS: the SPIFFE ID in the client's certificate.
    Mesh(Identity),
    /// Mutual TLS with a certificate from the trust anchors that carries no mesh identity.
    Unnamed,
}

/// Serves discovery on `listener` (HTTP/2 with prior knowledge and HTTP/1.1 on the same port)
/// until `shutdown` completes; then stops accepting, ends every stream and waits a bounded
/// time for connections to close. Plaintext: each client's `namespace` parameter is believed.
pub async fn serve<P: Policies>(
    listener: TcpListener,
    index: watch::Receiver<Arc<P>>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(listener, index, None, Options::default(), shutdown).await
}

/// As [`serve`], but mutual TLS only, with `tls` (which should require client certificates):
/// each client's namespace is the namespace of the SPIFFE ID in its certificate.
pub async fn serve_tls<P: Policies>(
    listener: TcpListener,
    index: watch::Receiver<Arc<P>>,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(
        listener,
        index,
        Some(TlsAcceptor::from(tls)),
        Options::default(),
        shutdown,
    )
    .await
}

/// As [`serve`] (`tls` unset) or [`serve_tls`], with `options`.
pub async fn serve_with_options<P: Policies>(
    listener: TcpListener,
    index: watch::Receiver<Arc<P>>,
    tls: Option<Arc<rustls::ServerConfig>>,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let tls = tls.map(TlsAcceptor::from);
    serve_with(listener, index, tls, options, shutdown).await
}

/// What every connection shares.
struct Shared<P> {
    index: watch::Receiver<Arc<P>>,
    subscriptions: Subscriptions,
    streams: Arc<StreamCounter>,
    anchors: Option<watch::Receiver<Arc<AnchorSet>>>,
}

async fn serve_with<P: Policies>(
    listener: TcpListener,
    index: watch::Receiver<Arc<P>>,
    tls: Option<TlsAcceptor>,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let shared = Arc::new(Shared {
        index: index.clone(),
        subscriptions: Subscriptions::default(),
        streams: StreamCounter::new(options.limits, options.metrics),
        anchors: options.anchors,
    });
    let fan_out = tokio::spawn(fan_out(index, shared.clone()));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE);
    let builder = Arc::new(builder);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let conn = accept(builder.clone(), stream, peer.ip(), tls.clone(), shared.clone(), stop_rx.clone());
                    connections.spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(%peer, "discovery connection ended: {e}");
                        }
                    });
                }
                // Resource exhaustion (EMFILE…) passes; a tight retry loop would not help it.
                Err(e) => {
                    tracing::warn!("discovery: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    drop(listener);
    fan_out.abort();
    stop_tx.send_replace(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "discovery: {} connections still open after {DRAIN_TIMEOUT:?}, closing them",
            connections.len()
        );
        connections.shutdown().await;
    }
    Ok(())
}

type ConnError = Box<dyn std::error::Error + Send + Sync>;

/// Follows the index and publishes each subscription's new answer, until the index loses its
/// writer (streams then stay open on their last answer) or the server stops.
async fn fan_out<P: Policies>(mut index: watch::Receiver<Arc<P>>, shared: Arc<Shared<P>>) {
    while index.changed().await.is_ok() {
        let snapshot = index.borrow_and_update().clone();
        let changed = shared.subscriptions.publish(&*snapshot);
        tracing::debug!(
            changed,
            asked = shared.subscriptions.len(),
            "index changed: streams updated"
        );
    }
}

/// One accepted connection from `peer_ip`: the TLS handshake when `tls` is set, then HTTP.
async fn accept<P: Policies>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer_ip: std::net::IpAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared<P>>,
    stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    // Snapshots are small and latency matters more than packet count.
    stream.set_nodelay(true)?;
    let Some(tls) = tls else {
        let client = (Client::Unverified, peer_ip);
        return serve_connection(builder, stream, client, shared, stop).await;
    };
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            // A plaintext client, one without a mesh certificate, or a stranger's.
            tracing::info!(%peer, "discovery: mutual TLS handshake failed: {e}");
            return Ok(());
        }
        Err(_) => {
            tracing::info!(
                %peer,
                "discovery: no TLS handshake within {HANDSHAKE_TIMEOUT:?}"
            );
            return Ok(());
        }
    };
    let client = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(trellis_tls::mesh::identity_of_cert)
        .map_or(Client::Unnamed, Client::Mesh);
    tracing::debug!(%peer, ?client, "discovery: mutual TLS connection");
    serve_connection(builder, stream, (client, peer_ip), shared, stop).await
}

async fn serve_connection<P: Policies, I>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: I,
    client: (Client, std::net::IpAddr),
    shared: Arc<Shared<P>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream_stop = stop.clone();
    let service = service_fn(move |req| {
        let response = handle(req, &client, &shared, &stream_stop);
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => return res,
        _ = stop.wait_for(|stop| *stop) => {}
    }
    // Streams end on their own (they watch `stop` too); this sends GOAWAY and lets them finish.
    conn.as_mut().graceful_shutdown();
    conn.await
}

fn handle<P: Policies>(
    req: Request<Incoming>,
    (client, peer_ip): &(Client, std::net::IpAddr),
    shared: &Shared<P>,
    stop: &watch::Receiver<bool>,
) -> Response<ResponseBody> {
    let path = req.uri().path();
    if path != OUTBOUND_PATH && path != TRUST_ANCHORS_PATH {
        return error(
            StatusCode::NOT_FOUND,
            format!("no such path {path:?}; try {OUTBOUND_PATH}"),
        );
    }
    if req.method() != Method::GET {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} only answers GET"),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return response;
    }
    if path == TRUST_ANCHORS_PATH {
        return trust_anchors(client, *peer_ip, shared, stop);
    }
    let (asked, target) = match parse_query(req.uri().query().unwrap_or_default()) {
        Ok(params) => params,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let namespace = match client_namespace(client, asked) {
        Ok(namespace) => namespace,
        Err((status, message)) => return error(status, message),
    };
    let permit = match shared.streams.open(*peer_ip) {
        Ok(permit) => permit,
        Err(why) => {
            let limits = shared.streams.limits();
            let message = match why {
                Refused::PerClient => format!(
                    "{peer_ip} has {} discovery streams open, the most one client may have \
                     (--max-streams-per-client)",
                    limits.per_client
                ),
                Refused::Total => format!(
                    "the controller has {} discovery streams open, the most it serves \
                     (--max-streams)",
                    limits.total
                ),
            };
            tracing::warn!(%peer_ip, %namespace, %target, "discovery stream refused: {message}");
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, message);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            return response;
        }
    };

    let newest = || shared.index.borrow().clone();
    let Some(subscription) = shared
        .subscriptions
        .subscribe(newest, (namespace.clone(), target.clone()))
    else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the policy".to_string(),
        );
    };
    let mut answers = subscription.watch();
    let first = answers.borrow_and_update().line.clone();
    // One slot: a proxy that reads slowly makes its task wait, and the changes made meanwhile
    // collapse into one snapshot instead of queueing.
    let (tx, rx) = mpsc::channel(1);
    // The channel is new and empty, so the first snapshot goes out with the headers.
    let _ = tx.try_send(first);
    tracing::debug!(%namespace, %target, "discovery stream opened");
    tokio::spawn(stream_updates(
        subscription,
        answers,
        tx,
        permit,
        shared.streams.clone(),
        stop.clone(),
    ));

    let mut response = Response::new(ResponseBody::Stream(rx));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(NDJSON),
    );
    response
}

/// `GET /v1/trust-anchors`: the bundle the controller holds, at once and after each change.
/// Only to a proxy that proved its mesh identity, and only when the controller has anchors.
fn trust_anchors<P>(
    client: &Client,
    peer_ip: std::net::IpAddr,
    shared: &Shared<P>,
    stop: &watch::Receiver<bool>,
) -> Response<ResponseBody> {
    let Some(anchors) = &shared.anchors else {
        return error(
            StatusCode::NOT_FOUND,
            format!("{TRUST_ANCHORS_PATH} is served over mutual TLS only"),
        );
    };
    if !matches!(client, Client::Mesh(_)) {
        return error(
            StatusCode::FORBIDDEN,
            "the trust anchors are streamed to mesh workloads only (a client certificate with \
             a spiffe:// URI SAN)"
                .to_string(),
        );
    }
    let permit = match shared.streams.open(peer_ip) {
        Ok(permit) => permit,
        Err(_) => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{peer_ip} has too many discovery streams open"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            return response;
        }
    };
    let mut anchors = anchors.clone();
    let first = anchors_line(&anchors.borrow_and_update());
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(first);
    tokio::spawn(stream_anchors(anchors, tx, permit, stop.clone()));
    let mut response = Response::new(ResponseBody::Stream(rx));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(NDJSON),
    );
    response
}

/// One line of the trust anchors stream.
fn anchors_line(set: &AnchorSet) -> Bytes {
    let update = TrustAnchorsUpdate {
        pem: set.pem().to_string(),
    };
    let mut line = serde_json::to_vec(&update).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Sends the bundle each time the controller's anchors change, until the client goes away or
/// the server stops.
async fn stream_anchors(
    mut anchors: watch::Receiver<Arc<AnchorSet>>,
    tx: mpsc::Sender<Bytes>,
    _permit: Permit,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let changed = tokio::select! {
            changed = anchors.changed() => changed.is_ok(),
            () = tx.closed() => break,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        if !changed {
            // The anchors lost their writer: nothing will change any more.
            tokio::select! {
                () = tx.closed() => {}
                _ = stop.wait_for(|stop| *stop) => {}
            }
            break;
        }
        let line = anchors_line(&anchors.borrow_and_update());
        tokio::select! {
            sent = tx.send(line) => if sent.is_err() { break },
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
}

/// Sends the stream's policy each time its subscription's answer changes, until the client
/// goes away or the server stops. The stream is counted (`_permit`) until it ends. If the index
/// loses its writer the stream stays open on the last answer: ending it would only make every
/// proxy reconnect to the same answer.
async fn stream_updates(
    subscription: Arc<Subscription>,
    mut answers: watch::Receiver<Answer>,
    tx: mpsc::Sender<Bytes>,
    _permit: Permit,
    streams: Arc<StreamCounter>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            // The subscription, and so the sender, lives as long as this task.
            _ = answers.changed() => {}
            () = tx.closed() => break,
            _ = stop.wait_for(|stop| *stop) => break,
        }
        let line = answers.borrow_and_update().line.clone();
        tokio::select! {
            sent = tx.send(line) => if sent.is_err() { break },
            _ = stop.wait_for(|stop| *stop) => break,
        }
        streams.metrics().update_sent();
    }
    let (namespace, target) = subscription.question();
    tracing::debug!(%namespace, %target, "discovery stream closed");
}

/// The namespace whose consumer routes apply to `client`, given the `namespace` parameter it
/// sent; the error is the status and message of the answer.
pub fn client_namespace(
    client: &Client,
    asked: Option<String>,
) -> Result<String, (StatusCode, String)> {
    match (client, asked) {
        (Client::Unverified, Some(namespace)) => Ok(namespace),
        (Client::Unverified, None) => Err((
            StatusCode::BAD_REQUEST,
            "missing parameter \"namespace\" (the client's namespace)".to_string(),
        )),
        (Client::Mesh(id), None) => Ok(id.namespace.clone()),
        (Client::Mesh(id), Some(namespace)) if namespace == id.namespace => Ok(namespace),
        // Refused rather than corrected: a proxy that asks for another namespace is
        // misconfigured, and its routes would silently differ from what it expects.
        (Client::Mesh(id), Some(namespace)) => Err((
            StatusCode::FORBIDDEN,
            format!(
                "namespace {namespace:?} is not the client's: its certificate is {id}; \
                 ask for namespace {:?} or leave the parameter out",
                id.namespace
            ),
        )),
        (Client::Unnamed, _) => Err((
            StatusCode::FORBIDDEN,
            "the client certificate carries no mesh identity (a spiffe:// URI SAN)".to_string(),
        )),
    }
}

/// Reads `namespace` (optional: with mutual TLS the certificate names it) and `target`; the
/// error is the message of the 400 answer.
pub fn parse_query(query: &str) -> Result<(Option<String>, Target), String> {
    let (mut namespace, mut target) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| format!("parameter {key:?} is not valid UTF-8"))?
            .into_owned();
        let slot = match key {
            "namespace" => &mut namespace,
            "target" => &mut target,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(format!("parameter {key:?} is given twice"));
        }
    }
    if let Some(namespace) = namespace.as_ref().filter(|ns| !is_dns_label(ns)) {
        return Err(format!(
            "namespace {namespace:?} is not a valid namespace name"
        ));
    }
    let target = target.ok_or("missing parameter \"target\" (host:port or ip:port)")?;
    let target = target.parse::<Target>().map_err(|e| e.to_string())?;
    Ok((namespace, target))
}

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn error(status: StatusCode, message: String) -> Response<ResponseBody> {
    let body = serde_json::to_vec(&ErrorBody { error: message }).unwrap_or_default();
    let mut response = Response::new(ResponseBody::Full(Some(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// An error document, or the stream of snapshots fed by a stream task.
#[derive(Debug)]
pub enum ResponseBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseBody::Stream(rx) => rx
                .poll_recv(cx)
                .map(|line| line.map(|l| Ok(Frame::data(l)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResponseBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Stream(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        let ok = parse_query("namespace=shop&target=web.shop%3A80&other=1").unwrap();
        assert_eq!(
            ok,
            (Some("shop".to_string()), "web.shop:80".parse().unwrap())
        );
        let ok = parse_query("target=web.shop%3A80").unwrap();
        assert_eq!(ok, (None, "web.shop:80".parse().unwrap()));
        let ok = parse_query("target=%5Bfd00%3A%3A1%5D%3A8080&namespace=default").unwrap();
        assert_eq!(ok.1, "[fd00::1]:8080".parse().unwrap());

        let cases = [
            ("", "missing parameter \"target\" (host:port or ip:port)"),
            (
                "namespace=shop",
                "missing parameter \"target\" (host:port or ip:port)",
            ),
            (
                "namespace=Shop&target=a:1",
                "namespace \"Shop\" is not a valid namespace name",
            ),
            (
                "namespace=a&namespace=b&target=a:1",
                "parameter \"namespace\" is given twice",
            ),
            (
                "namespace=a&target=web",
                "target \"web\" has no port: expected host:port or ip:port",
            ),
            (
                "namespace=a&target=%FF:80",
                "parameter \"target\" is not valid UTF-8",
            ),
        ];
        for (query, want) in cases {
            assert_eq!(parse_query(query).unwrap_err(), want, "{query}");
        }
    }

    #[test]
    fn the_namespace_comes_from_the_certificate_when_there_is_one() {
        let mesh = Client::Mesh(Identity::new("cluster.local", "shop", "web"));
        let ns = |s: &str| Some(s.to_string());
        let ok = |s: &str| Ok(s.to_string());
        assert_eq!(client_namespace(&Client::Unverified, ns("any")), ok("any"));
        assert_eq!(
            client_namespace(&Client::Unverified, None).unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(client_namespace(&mesh, None), ok("shop"));
        assert_eq!(client_namespace(&mesh, ns("shop")), ok("shop"));
        let (status, message) = client_namespace(&mesh, ns("other")).unwrap_err();
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(
            message,
            "namespace \"other\" is not the client's: its certificate is \
             spiffe://cluster.local/ns/shop/sa/web; ask for namespace \"shop\" or leave the \
             parameter out"
        );
        for asked in [None, ns("shop")] {
            assert_eq!(
                client_namespace(&Client::Unnamed, asked).unwrap_err().0,
                StatusCode::FORBIDDEN
            );
        }
    }
}
