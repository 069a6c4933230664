//! Opaque TCP: bytes copied both ways, each direction closed on its own (half-close), counted,
//! and cut when neither side has moved a byte for the idle timeout.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use trellis_api::Identity;

use crate::hop;
use crate::idle::Clock;
use crate::metrics::DirectionLabels;
use crate::proxy::Proxy;

/// Copies `client` to and from `addr` (through the peer sidecar when `meshed`, verifying
/// `identity`) until both sides are done, or until the connection has been idle for
/// `--tcp-idle-timeout`.
pub async fn forward<C>(
    proxy: &Proxy,
    direction: &'static str,
    client: C,
    addr: SocketAddr,
    meshed: bool,
    identity: Option<&Identity>,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let upstream = match hop::connect(addr, meshed, identity, &proxy.hop).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(error = %e, %addr, direction, "opaque connection: upstream unreachable");
            proxy.metrics.error(direction, "connect");
            return;
        }
    };
    splice(proxy, direction, client, upstream, addr).await;
}

/// Copies bytes both ways between two connections (an opaque one and its upstream, or an
/// upgraded HTTP connection and its upstream) until both sides are done or neither has moved
/// a byte for `--tcp-idle-timeout`; counts the bytes.
pub async fn splice<C, U>(
    proxy: &Proxy,
    direction: &'static str,
    client: C,
    upstream: U,
    addr: SocketAddr,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let idle = proxy.config.args.tcp_idle_timeout;
    let clock = Clock::default();
    let mut client = Tracked::new(client, &clock);
    let mut upstream = Tracked::new(upstream, &clock);
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r,
        () = clock.idle_for(idle) => {
            proxy.metrics.error(direction, "idle_timeout");
            tracing::debug!(%addr, direction, ?idle, "opaque connection idle: closed");
            Ok((client.read, upstream.read))
        }
    };
    let labels = DirectionLabels { direction };
    match copied {
        Ok((from_client, to_client)) => {
            proxy
                .metrics
                .tcp_read_bytes
                .get_or_create(&labels)
                .inc_by(from_client);
            proxy
                .metrics
                .tcp_write_bytes
                .get_or_create(&labels)
                .inc_by(to_client);
        }
        Err(e) => {
            tracing::debug!(error = %e, %addr, direction, "opaque connection ended with an error");
        }
    }
}

/// An I/O object that marks the clock whenever bytes move, and counts the bytes it read.
struct Tracked<T> {
    io: T,
    clock: Clock,
    read: u64,
}

impl<T> Tracked<T> {
    fn new(io: T, clock: &Clock) -> Self {
        Self {
            io,
            clock: clock.clone(),
            read: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read += n as u64;
            this.clock.touch();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
