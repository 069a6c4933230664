//! Upstream connections to endpoints, chosen by the endpoint's address. HTTP/2: one
//! multiplexed connection per endpoint, so that each request's `:authority` can be the
//! client's own. HTTP/1.1: a list of keep-alive connections per endpoint, each carrying one
//! request at a time.
//!
//! A generic client pools by the URI's authority and sends that same authority on the wire,
//! which would make every gRPC and HTTP/2 backend see an endpoint address (or, after the hop,
//! `127.0.0.1:port`) instead of the authority the client asked for (RFC 9113 §8.3.1). Here the
//! endpoint travels in the request's URI (as for the HTTP/1 client) and the authority to send
//! in a [`RequestAuthority`] extension; the URI is rewritten just before the request goes out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::uri::{Authority, Parts};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use crate::hop::{self, Connector, MESH_SCHEME};
use crate::http::{Body, UpstreamError};

/// The authority a request is for (the client's, or a URLRewrite's): sent as `:authority`
/// to HTTP/2 upstreams.
#[derive(Clone, Debug)]
pub struct RequestAuthority(pub Authority);

/// Connections kept per endpoint, and when each was last used.
#[derive(Debug)]
pub struct H2Pool {
    connector: Connector,
    idle: Duration,
    conns: Mutex<HashMap<(SocketAddr, bool), Entry>>,
}

#[derive(Debug)]
struct Entry {
    sender: SendRequest<Body>,
    used: Instant,
}

impl H2Pool {
    pub fn new(connector: Connector, idle: Duration) -> Self {
        Self {
            connector,
            idle,
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `req` to the endpoint its URI names (meshed when the scheme says so), with the
    /// `:authority` of its [`RequestAuthority`], if any.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        let (addr, meshed) = endpoint(req.uri()).ok_or(UpstreamError::NoEndpoint)?;
        let mut sender = self.sender(addr, meshed).await?;
        if let Some(RequestAuthority(authority)) = req.extensions_mut().remove() {
            let mut parts = Parts::from(std::mem::take(req.uri_mut()));
            parts.authority = Some(authority);
            *req.uri_mut() = Uri::from_parts(parts).map_err(|_| UpstreamError::NoEndpoint)?;
        }
        sender.ready().await.map_err(UpstreamError::Http2)?;
        sender.send_request(req).await.map_err(UpstreamError::Http2)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, bool), Entry>> {
        match self.conns.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A connection to the endpoint: the open one, or a new one. Requests that find none at
    /// the same moment may each open one; the last stays pooled, the others finish their
    /// requests and close.
    async fn sender(
        &self,
        addr: SocketAddr,
        meshed: bool,
    ) -> Result<SendRequest<Body>, UpstreamError> {
        let key = (addr, meshed);
        let now = Instant::now();
        if let Some(entry) = self.lock().get_mut(&key)
            && !entry.sender.is_closed()
        {
            entry.used = now;
            return Ok(entry.sender.clone());
        }
        let identity = meshed
            .then(|| self.connector.endpoints.identity_of(addr))
            .flatten();
        let io = hop::connect(addr, meshed, identity.as_ref(), &self.connector.hop)
            .await
            .map_err(UpstreamError::Connect)?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .adaptive_window(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Connect(std::io::Error::other(e)))?;
        // The connection runs until its peer closes it or every handle is dropped (the pool's
        // when it goes idle or closed, each request's when it ends).
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %addr, "HTTP/2 upstream connection ended");
            }
        });
        let mut conns = self.lock();
        let idle = self.idle;
        conns.retain(|_, e| !e.sender.is_closed() && now.duration_since(e.used) < idle);
        conns.insert(
            key,
            Entry {
                sender: sender.clone(),
                used: now,
            },
        );
        Ok(sender)
    }
}

/// HTTP/1.1 connections kept per endpoint, busy or idle: at most one per request in flight, so
/// this bounds only what a burst leaves behind.
const MAX_H1_PER_ENDPOINT: usize = 256;

/// HTTP/1.1 keep-alive connections per endpoint (apps behind the inbound side, and endpoints
/// without a sidecar). A connection goes back on its endpoint's list as soon as its response
/// head arrives, and is taken again once its connection says it is ready for the next request
/// (its previous response has been read). Nothing is spawned per request and the lock is held
/// only to push or scan a short list.
#[derive(Debug)]
pub struct H1Pool {
    connector: Connector,
    idle: Duration,
    state: Mutex<H1State>,
}

#[derive(Debug)]
struct H1State {
    conns: HashMap<(SocketAddr, bool), Vec<H1Entry>>,
    /// When closed and idle connections of every endpoint were last dropped.
    swept: Instant,
}

#[derive(Debug)]
struct H1Entry {
    sender: http1::SendRequest<Body>,
    used: Instant,
}

impl H1Pool {
    pub fn new(connector: Connector, idle: Duration) -> Self {
        Self {
            connector,
            idle,
            state: Mutex::new(H1State {
                conns: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    /// Sends `req` (its URI names the endpoint) on a ready pooled connection, or a new one.
    /// A pooled connection the endpoint closed before taking the request (a keep-alive race)
    /// hands the request back, and it goes out on a new connection instead.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        let (addr, meshed) = endpoint(req.uri()).ok_or(UpstreamError::NoEndpoint)?;
        let mut req = origin_form(req)?;
        let key = (addr, meshed);
        if let Some(mut sender) = self.take(key) {
            match sender.try_send_request(req).await {
                Ok(res) => {
                    self.put(key, sender);
                    return Ok(res);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(UpstreamError::Http1(e.into_error())),
                },
            }
        }
        let identity = meshed
            .then(|| self.connector.endpoints.identity_of(addr))
            .flatten();
        let io = hop::connect(addr, meshed, identity.as_ref(), &self.connector.hop)
            .await
            .map_err(UpstreamError::Connect)?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Connect(std::io::Error::other(e)))?;
        // The connection runs until either side closes it or every handle is dropped.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %addr, "HTTP/1.1 upstream connection ended");
            }
        });
        sender.ready().await.map_err(UpstreamError::Http1)?;
        let res = sender
            .send_request(req)
            .await
            .map_err(UpstreamError::Http1)?;
        self.put(key, sender);
        Ok(res)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, H1State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The most recently used connection that is ready, dropping closed and idle ones met on
    /// the way.
    fn take(&self, key: (SocketAddr, bool)) -> Option<http1::SendRequest<Body>> {
        let now = Instant::now();
        let mut state = self.lock();
        let list = state.conns.get_mut(&key)?;
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let entry = &list[i];
            if entry.sender.is_closed() || now.duration_since(entry.used) >= self.idle {
                // The entry moved here was seen already (busy): the scan goes on below it.
                list.swap_remove(i);
            } else if entry.sender.is_ready() {
                return Some(list.swap_remove(i).sender);
            }
        }
        None
    }

    fn put(&self, key: (SocketAddr, bool), sender: http1::SendRequest<Body>) {
        let now = Instant::now();
        let idle = self.idle;
        let mut state = self.lock();
        // Endpoints that went away keep no connections for longer than the idle timeout.
        if now.duration_since(state.swept) >= idle.min(Duration::from_secs(10)) {
            state.swept = now;
            state.conns.retain(|_, list| {
                list.retain(|e| !e.sender.is_closed() && now.duration_since(e.used) < idle);
                !list.is_empty()
            });
        }
        let list = state.conns.entry(key).or_default();
        if list.len() < MAX_H1_PER_ENDPOINT {
            list.push(H1Entry { sender, used: now });
        }
    }
}

/// HTTP/1.1 requests name only the path on the request line; the endpoint is the connection.
fn origin_form(mut req: Request<Body>) -> Result<Request<Body>, UpstreamError> {
    let pq = req.uri().path_and_query().cloned();
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(pq.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| UpstreamError::NoEndpoint)?;
    Ok(req)
}

/// The endpoint in an upstream URI: its address, and whether it is meshed.
fn endpoint(uri: &Uri) -> Option<(SocketAddr, bool)> {
    let a = uri.authority()?;
    let host = a.host().trim_start_matches('[').trim_end_matches(']');
    let addr = SocketAddr::new(host.parse().ok()?, a.port_u16()?);
    Some((addr, uri.scheme_str() == Some(MESH_SCHEME)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_from_uris() {
        let uri: Uri = "https://10.0.0.1:8080/x".parse().unwrap();
        assert_eq!(
            endpoint(&uri),
            Some(("10.0.0.1:8080".parse().unwrap(), true))
        );
        let uri: Uri = "http://[fd00::1]:80/".parse().unwrap();
        assert_eq!(
            endpoint(&uri),
            Some(("[fd00::1]:80".parse().unwrap(), false))
        );
        let uri: Uri = "http://web:80/".parse().unwrap();
        assert_eq!(endpoint(&uri), None);
    }
}

#[cfg(test)]
mod h1_tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::hop::Hop;

    /// An HTTP/1.1 app on loopback answering every request on a connection with `body`,
    /// keep-alive; counts the connections it accepts. `close_after` answers that many
    /// requests per connection and then closes it without a word, as an app whose keep-alive
    /// timeout ran out does.
    async fn app(close_after: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut answered = 0;
                    let mut chunk = [0u8; 4096];
                    while answered < close_after {
                        let n = match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let res = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(res).await.is_err() {
                                return;
                            }
                            answered += 1;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn pool() -> H1Pool {
        let hop = Hop {
            peer_inbound_port: 4143,
            app: crate::app::App::at("127.0.0.9".parse().unwrap()),
            handshake_timeout: Duration::from_secs(1),
            tcp_keepalive: Duration::from_secs(60),
            tls: None,
        };
        let connector = Connector {
            hop: Arc::new(hop),
            endpoints: Default::default(),
        };
        H1Pool::new(connector, Duration::from_secs(60))
    }

    async fn get(pool: &H1Pool, addr: SocketAddr) -> Result<Bytes, UpstreamError> {
        let req = Request::get(format!("http://{addr}/x"))
            .header("host", "app")
            .body(crate::http::empty())
            .unwrap();
        let res = pool.send(req).await?;
        assert_eq!(res.status(), 200);
        Ok(res.into_body().collect().await.unwrap().to_bytes())
    }

    use bytes::Bytes;

    #[tokio::test(flavor = "current_thread")]
    async fn sequential_requests_share_one_connection() {
        let (addr, accepted) = app(usize::MAX).await;
        let pool = pool();
        for _ in 0..200 {
            assert_eq!(get(&pool, addr).await.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_requests_open_one_connection_each_and_reuse_them() {
        let (addr, accepted) = app(usize::MAX).await;
        let pool = Arc::new(pool());
        for _ in 0..20 {
            let calls: Vec<_> = (0..8)
                .map(|_| {
                    let pool = pool.clone();
                    tokio::spawn(async move { get(&pool, addr).await.map(|_| ()) })
                })
                .collect();
            for call in calls {
                call.await.unwrap().unwrap();
            }
        }
        let n = accepted.load(Ordering::SeqCst);
        assert!(
            (1..=8).contains(&n),
            "{n} connections for 8 concurrent callers"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_app_closed_is_not_used_again() {
        let (addr, accepted) = app(1).await;
        let pool = pool();
        for _ in 0..5 {
            assert_eq!(get(&pool, addr).await.unwrap(), "ok");
            // Let the connection see the close, as an idle pooled one would.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }
}
