//! Opaque TCP: bytes copied both ways, each direction closed on its own (half-close), counted.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use trellis_api::Identity;

use crate::hop;
use crate::metrics::DirectionLabels;
use crate::proxy::Proxy;

/// Copies `client` to and from `addr` (through the peer sidecar when `meshed`, verifying
/// `identity`) until both sides are done.
pub async fn forward<C>(
    proxy: &Proxy,
    direction: &'static str,
    mut client: C,
    addr: SocketAddr,
    meshed: bool,
    identity: Option<&Identity>,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = match hop::connect(addr, meshed, identity, &proxy.hop).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(error = %e, %addr, direction, "opaque connection: upstream unreachable");
            proxy.metrics.error(direction, "connect");
            return;
        }
    };
    let labels = DirectionLabels { direction };
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
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
