//! The hop between proxies, and every upstream connection: the one place where a connection to
//! an endpoint is made, so that mutual TLS wraps it here and nowhere else.
//!
//! A meshed endpoint (one with an identity in discovery) is reached at its pod IP on the peer
//! proxy's inbound port, whatever port the app listens on. The first bytes on the connection are
//! a preamble naming the app's port, `TRELLIS/1 <port>\r\n`; then HTTP/2 (or the opaque bytes of
//! a TCP connection) follows. This lets one connection per peer carry every request, and works
//! with or without iptables on the server's side. Requests for meshed endpoints carry the URI
//! scheme [`MESH_SCHEME`], which is how the connector tells them apart and keeps their pool
//! separate. It is a standard scheme because `http` stores any other scheme on the heap, which
//! would cost allocations on every clone of every request's URI, on both sides of the hop.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use trellis_api::Identity;
use trellis_tls::MeshTls;

use crate::balance::EndpointRegistry;
use tokio::net::TcpStream;

/// The URI scheme of requests to meshed endpoints (plain endpoints get `http`). It marks the
/// request for the connector; the transport is the hop's, mutual TLS or not.
pub const MESH_SCHEME: &str = "https";
const PREAMBLE: &[u8] = b"TRELLIS/1 ";
const MAX_PREAMBLE: usize = 32;
/// How long a connection attempt may take before the endpoint counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The preamble that opens a meshed connection for `port`.
pub fn preamble(port: u16) -> Vec<u8> {
    format!("TRELLIS/1 {port}\r\n").into_bytes()
}

/// Reads a preamble if the connection starts with one. `buf` receives every byte read; on
/// success the preamble is removed from it and the port returned. `Ok(None)` means the
/// connection does not start with a preamble (its bytes are left in `buf`).
pub async fn read_preamble<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut BytesMut,
    timeout: Duration,
) -> io::Result<Option<u16>> {
    let read = async {
        loop {
            let n = buf.len().min(PREAMBLE.len());
            if buf[..n] != PREAMBLE[..n] {
                return Ok(None);
            }
            if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                let port = std::str::from_utf8(&buf[PREAMBLE.len().min(end)..end])
                    .ok()
                    .and_then(|p| p.parse::<u16>().ok())
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid("the mesh preamble names no valid port"))?;
                buf.advance(end + 2);
                return Ok(Some(port));
            }
            if buf.len() >= MAX_PREAMBLE {
                return Err(invalid("the mesh preamble is too long"));
            }
            buf.reserve(MAX_PREAMBLE);
            if io.read_buf(buf).await? == 0 {
                return if buf.is_empty() {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed before any byte",
                    ))
                } else {
                    Ok(None)
                };
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no bytes before the timeout"))?
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// How this sidecar reaches meshed endpoints.
#[derive(Clone, Debug)]
pub struct Hop {
    pub peer_inbound_port: u16,
    /// The pod's own app, dialed from the delivery source address.
    pub app: crate::app::App,
    /// How long the TLS handshake and the preamble may take.
    pub handshake_timeout: Duration,
    pub tcp_keepalive: Duration,
    /// Mutual TLS, when the sidecar has an identity; plaintext otherwise.
    pub tls: Option<MeshTls>,
}

/// A connection to an endpoint: plain, or mutual TLS to a peer sidecar.
#[derive(Debug)]
pub enum HopStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Opens a connection to an endpoint: directly for plain ones; through the peer sidecar's
/// inbound port for meshed ones, with mutual TLS verifying `identity` when this sidecar has
/// one, then the preamble naming the app's port.
pub async fn connect(
    addr: SocketAddr,
    meshed: bool,
    identity: Option<&Identity>,
    hop: &Hop,
) -> io::Result<HopStream> {
    if !meshed && hop.app.is_app(addr) {
        let stream = hop.app.connect(addr.port()).await?;
        crate::listen::tune(&stream, hop.tcp_keepalive);
        return Ok(HopStream::Plain(stream));
    }
    let dial = if meshed {
        SocketAddr::new(addr.ip(), hop.peer_inbound_port)
    } else {
        addr
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dial))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {dial} timed out"),
            )
        })??;
    crate::listen::tune(&stream, hop.tcp_keepalive);
    if !meshed {
        return Ok(HopStream::Plain(stream));
    }
    let handshake = async {
        let mut stream = match &hop.tls {
            None => HopStream::Plain(stream),
            Some(tls) => {
                let identity =
                    identity.ok_or_else(|| invalid("a meshed endpoint without an identity"))?;
                let name = trellis_tls::mesh::server_name(identity)
                    .map_err(|e| invalid(&e.to_string()))?;
                let tls_stream = tokio_rustls::TlsConnector::from(tls.client.clone())
                    .connect(name, stream)
                    .await?;
                HopStream::Tls(Box::new(tls_stream))
            }
        };
        stream.write_all(&preamble(addr.port())).await?;
        Ok(stream)
    };
    tokio::time::timeout(hop.handshake_timeout, handshake)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the mesh handshake with {dial} timed out"),
            )
        })?
}

impl AsyncRead for HopStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HopStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            HopStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HopStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HopStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            HopStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    /// HTTP/2 hands a frame head and its payload as separate buffers: written together, they
    /// make one TLS record and one system call instead of two.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HopStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            HopStream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            HopStream::Plain(s) => s.is_write_vectored(),
            HopStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HopStream::Plain(s) => Pin::new(s).poll_flush(cx),
            HopStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HopStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            HopStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// What the upstream pools connect with: the hop, and the endpoint registry for each meshed
/// endpoint's expected identity.
#[derive(Clone, Debug)]
pub struct Connector {
    pub hop: Arc<Hop>,
    pub endpoints: Arc<EndpointRegistry>,
}

/// The URI authority of `addr`. Endpoints keep theirs, so that requests clone it instead of
/// formatting and parsing an address each time.
pub fn authority(addr: SocketAddr) -> Authority {
    // An IP address and a port always make a valid authority.
    Authority::from_maybe_shared(bytes::Bytes::from(addr.to_string()))
        .unwrap_or_else(|_| Authority::from_static("0.0.0.0:0"))
}

/// The URI of a request to `authority`, keeping the path and query. Every part is cloned by
/// reference count: building it allocates nothing.
pub fn upstream_uri(
    authority: &Authority,
    meshed: bool,
    path_and_query: Option<&PathAndQuery>,
) -> Result<Uri, http::Error> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if meshed { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(match path_and_query {
        Some(pq) => pq.clone(),
        None => PathAndQuery::from_static("/"),
    });
    Ok(Uri::from_parts(parts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (io::Result<Option<u16>>, BytesMut) {
        let mut io = bytes;
        let mut buf = BytesMut::new();
        let r = read_preamble(&mut io, &mut buf, Duration::from_secs(1)).await;
        (r, buf)
    }

    #[tokio::test]
    async fn preambles() {
        let (r, rest) = parse(b"TRELLIS/1 8080\r\nPRI * HTTP/2.0").await;
        assert_eq!(r.unwrap(), Some(8080));
        assert_eq!(&rest[..], b"PRI * HTTP/2.0");
        let (r, rest) = parse(b"GET / HTTP/1.1\r\n").await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n");
        assert!(parse(b"TRELLIS/1 0\r\n").await.0.is_err());
        assert!(parse(b"TRELLIS/1 99999\r\n").await.0.is_err());
        assert!(
            parse(b"TRELLIS/1 1111111111111111111111111111")
                .await
                .0
                .is_err()
        );
        assert_eq!(parse(&preamble(4143)).await.0.unwrap(), Some(4143));
    }

    #[test]
    fn upstream_uris_pick_the_scheme() {
        let addr = authority("10.0.0.1:8080".parse().unwrap());
        let pq = "/a?b=c".parse().unwrap();
        assert_eq!(
            upstream_uri(&addr, true, Some(&pq)).unwrap().to_string(),
            "https://10.0.0.1:8080/a?b=c"
        );
        assert_eq!(
            upstream_uri(&addr, false, None).unwrap().to_string(),
            "http://10.0.0.1:8080/"
        );
        let v6 = authority("[fd00::1]:4143".parse().unwrap());
        assert_eq!(
            upstream_uri(&v6, false, None).unwrap().to_string(),
            "http://[fd00::1]:4143/"
        );
    }

    proptest::proptest! {
        /// Whatever a peer sends first, reading the preamble never panics, keeps the bytes
        /// after it, and returns a port only for a well-formed preamble.
        #[test]
        fn preambles_from_arbitrary_peers(
            prefix in proptest::prop_oneof![
                proptest::strategy::Just(b"TRELLIS/1 ".to_vec()),
                proptest::strategy::Just(Vec::new()),
            ],
            rest in proptest::collection::vec(proptest::num::u8::ANY, 0..48),
        ) {
            let input = [prefix.clone(), rest].concat();
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            let (result, left) = rt.block_on(parse(&input));
            if let Ok(Some(port)) = result {
                let head = format!("TRELLIS/1 {port}\r\n");
                proptest::prop_assert!(port > 0);
                proptest::prop_assert!(input.starts_with(head.as_bytes()));
                proptest::prop_assert_eq!(&left[..], &input[head.len()..]);
            }
            // Not a preamble: what was read so far is kept, in order, for detection.
            if let Ok(None) = result {
                proptest::prop_assert!(!left.is_empty() && input.starts_with(&left));
            }
        }
    }
}
