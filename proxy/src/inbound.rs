//! The inbound path: connections to the pod, from other proxies (opened with the mesh
//! preamble) or redirected by iptables, delivered to the app at the port they were meant for.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use http::HeaderValue;
use http::uri::Authority;
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use trellis_api::Identity;

use crate::detect::{self, Prefixed, Protocol};
use crate::hop;
use crate::http::{self as h, Body, ORIG_PROTO};
use crate::metrics::{RequestCache, RequestLabels};
use crate::proxy::Proxy;
use crate::upgrade::Pending;
use crate::{listen, tcp};

const DIRECTION: &str = "inbound";
/// The header carrying the client's mesh identity to the app.
pub const CLIENT_ID: http::HeaderName = http::HeaderName::from_static("trellis-client-id");

/// Accepts inbound connections until shutdown.
pub async fn serve(proxy: Arc<Proxy>, listeners: Vec<TcpListener>) {
    let max = proxy.config.args.max_connections;
    listen::serve(proxy, listeners, DIRECTION, max, connection).await;
}

async fn connection(proxy: Arc<Proxy>, mut stream: TcpStream) {
    let started = Instant::now();
    let timeout = proxy.config.args.detect_timeout;
    let handshake = proxy.config.args.handshake_timeout;
    let mut buf = BytesMut::new();
    let redirected = listen::original_dst(&stream).map(|a| a.port());
    let preamble = if redirected.is_some() {
        // Sidecars dial the inbound port itself; a redirected connection is from outside the
        // mesh and has no preamble.
        None
    } else {
        match hop::read_preamble(&mut stream, &mut buf, timeout).await {
            Ok(p) => p,
            // Silence: nothing to deliver.
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => None,
            Err(e) => {
                tracing::debug!(error = %e, "inbound connection rejected");
                proxy.metrics.error(DIRECTION, "bad_preamble");
                return;
            }
        }
    };
    let mesh_tls = proxy.hop.tls.clone();
    if let (None, None, Some(tls)) = (redirected, preamble, &mesh_tls)
        && detect::classify(&buf) == Some(Protocol::Tls)
    {
        // A peer sidecar's mutual TLS; the preamble and the request follow inside.
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
        let accepted = tokio::time::timeout(handshake, async {
            // The whole ClientHello first, in a buffer that grows only with what arrives: the
            // TLS state (with its record buffers) exists only for peers that sent one.
            detect::read_first_record(&mut stream, &mut buf).await?;
            Box::pin(acceptor.accept(Prefixed::new(buf, stream))).await
        })
        .await;
        let mut tls_stream = match accepted {
            Ok(Ok(s)) => s,
            Err(_) => {
                tracing::debug!("inbound mutual TLS handshake did not finish in time");
                proxy.metrics.error(DIRECTION, "handshake_timeout");
                return;
            }
            Ok(Err(e)) => {
                tracing::info!(error = %e, "inbound mutual TLS handshake failed");
                proxy.metrics.error(DIRECTION, "tls_handshake");
                return;
            }
        };
        let peer = tls_stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(trellis_tls::mesh::identity_of_cert);
        let mut inner = BytesMut::new();
        match hop::read_preamble(&mut tls_stream, &mut inner, handshake).await {
            Ok(Some(port)) => {
                // Boxed: the serving state is allocated only for a connection that got this
                // far, so a stalled handshake holds a small task.
                Box::pin(deliver(proxy, tls_stream, inner, port, peer, started)).await;
            }
            _ => {
                proxy.metrics.error(DIRECTION, "bad_preamble");
                tracing::info!("a mutual TLS connection without the mesh preamble: closed");
            }
        }
        return;
    }
    let Some(port) = preamble.or(redirected) else {
        proxy.metrics.error(DIRECTION, "no_destination");
        tracing::info!("an inbound connection names no port (no preamble, not redirected): closed");
        return;
    };
    // With identity on, plaintext reaches only the ports configured for it.
    if mesh_tls.is_some() && !proxy.config.plaintext_ports.contains(port) {
        proxy.metrics.error(DIRECTION, "plaintext_refused");
        tracing::info!(port, "a plaintext connection to a mesh-only port: closed");
        return;
    }
    Box::pin(deliver(proxy, stream, buf, port, None, started)).await;
}

/// Detects the protocol of what follows and delivers it to the app's `port`.
async fn deliver<I>(
    proxy: Arc<Proxy>,
    mut io: I,
    mut buf: BytesMut,
    port: u16,
    peer: Option<Identity>,
    started: Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The proxy's own ports are not the app's: delivering there would loop or expose the
    // outbound listener to other pods.
    let args = &proxy.config.args;
    if [
        args.inbound_addr.port(),
        args.outbound_addr.port(),
        args.admin_addr.port(),
    ]
    .contains(&port)
    {
        proxy.metrics.error(DIRECTION, "loop");
        tracing::info!(
            port,
            "an inbound connection asks for one of the proxy's own ports: closed"
        );
        return;
    }
    // Only the ports the pod declares: anything else listening in the pod is not for the mesh.
    if let Some(allowed) = &proxy.config.inbound_ports
        && !allowed.contains(port)
    {
        proxy.metrics.error(DIRECTION, "port_not_allowed");
        tracing::info!(
            port,
            "an inbound connection asks for a port the pod does not declare: closed"
        );
        return;
    }
    // Server-first protocols speak before the client: the same opaque ports as outbound
    // (`--opaque-ports`, with the pod's `trellis.dev/opaque-ports`) skip detection.
    let (protocol, took) = if proxy.config.opaque_ports.contains(port) {
        (Protocol::Opaque, None)
    } else {
        match detect::detect(&mut io, &mut buf, args.detect_timeout).await {
            Ok(p) => (p, Some(started.elapsed())),
            Err(e) => {
                tracing::debug!(error = %e, "inbound connection failed during detection");
                return;
            }
        }
    };
    proxy.metrics.detected(DIRECTION, protocol.as_str(), took);
    let app = proxy.hop.app.addr(port);
    let io = Prefixed::new(buf, io);
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let peer: Option<(Arc<str>, HeaderValue)> = peer.and_then(|id| {
                let text = id.to_string();
                Some((Arc::from(text.as_str()), HeaderValue::from_str(&text).ok()?))
            });
            let svc_proxy = proxy.clone();
            // Made once per connection: each request clones it.
            let app = Arc::new(hop::authority(app));
            let cache = Arc::new(RequestCache::default());
            let service = hyper::service::service_fn(move |req| {
                let (proxy, peer) = (svc_proxy.clone(), peer.clone());
                let (app, cache) = (app.clone(), cache.clone());
                async move {
                    let res = handle(&proxy, &app, &cache, peer, req).await;
                    Ok::<_, std::convert::Infallible>(res)
                }
            });
            crate::http::serve_connection(&proxy, DIRECTION, io, service).await;
        }
        Protocol::Tls | Protocol::Opaque => {
            tcp::forward(&proxy, DIRECTION, io, app, false, None).await
        }
    }
}

async fn handle(
    proxy: &Arc<Proxy>,
    app: &Authority,
    cache: &RequestCache,
    peer: Option<(Arc<str>, HeaderValue)>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let grpc = h::is_grpc(&req);
    // Only the sidecar says who the client is: a copy the client sent is dropped.
    req.headers_mut().remove(CLIENT_ID);
    let peer_label = match peer {
        Some((label, value)) => {
            req.headers_mut().insert(CLIENT_ID, value);
            label
        }
        None => proxy.empty_label.clone(),
    };
    let begun = proxy.observe.begin(&mut req);
    let peer = begun
        .as_ref()
        .filter(|_| !peer_label.is_empty())
        .map(|_| Box::from(&*peer_label));
    let res = forward(proxy, app, req, grpc).await;
    if let Some(begun) = begun {
        let done = crate::observe::Done {
            parent: proxy.empty_label.clone(),
            route: proxy.empty_label.clone(),
            rule: proxy.empty_label.clone(),
            backend: proxy.empty_label.clone(),
            endpoint: None,
            peer_identity: peer,
            retries: 0,
        };
        let status = res.status().as_u16();
        proxy
            .observe
            .end(*begun, DIRECTION, done, status, res.headers());
    }
    let labels = RequestLabels {
        direction: DIRECTION,
        parent: proxy.empty_label.clone(),
        route_kind: "",
        route: proxy.empty_label.clone(),
        rule: proxy.empty_label.clone(),
        backend: proxy.empty_label.clone(),
        peer_identity: peer_label,
        status: res.status().as_u16(),
    };
    proxy.metrics.request(cache, labels, started.elapsed());
    res
}

/// Delivers a request to the app, in the HTTP version the original client spoke.
async fn forward(
    proxy: &Arc<Proxy>,
    app: &Authority,
    mut req: Request<Incoming>,
    grpc: bool,
) -> Response<Body> {
    let upgrade = Pending::take(&mut req);
    let (mut parts, body) = req.into_parts();
    // A proxy upgraded this request to HTTP/2 for the hop: the app gets HTTP/1.1 again.
    let downgrade = parts.headers.remove(ORIG_PROTO).is_some();
    let http2 = parts.version == Version::HTTP_2 && !downgrade;
    h::strip_hop_by_hop(&mut parts.headers);
    if !http2
        && !parts.headers.contains_key(http::header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = http::HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(http::header::HOST, v);
    }
    let uri = match hop::upstream_uri(app, false, parts.uri.path_and_query()) {
        Ok(u) => u,
        Err(_) => {
            return h::local(
                StatusCode::BAD_REQUEST,
                "the request cannot be forwarded",
                grpc,
            );
        }
    };
    // The client's `:authority`, which the URI's app address would otherwise replace.
    let authority = http2
        .then(|| parts.uri.authority().cloned())
        .flatten()
        .map(crate::pool::RequestAuthority);
    parts.uri = uri;
    let mut upstream_req = Request::from_parts(parts, h::incoming(body));
    if let Some(a) = authority {
        upstream_req.extensions_mut().insert(a);
    }
    if let Some(upgrade) = upgrade {
        let addr = proxy.hop.app.addr(app.port_u16().unwrap_or(80));
        return upgrade
            .forward(proxy, DIRECTION, upstream_req, addr, None, grpc)
            .await;
    }
    match proxy.upstream.send(upstream_req, http2).await {
        Ok(res) => h::from_upstream(res),
        Err(e) => {
            tracing::debug!(error = %e, %app, "the app could not be reached");
            proxy.metrics.error(DIRECTION, "app_unreachable");
            h::local(
                StatusCode::BAD_GATEWAY,
                "the application is not reachable",
                grpc,
            )
        }
    }
}
