//! Where inbound traffic meets the app: the pod IP, dialed from a dedicated source address.
//!
//! Delivering to the pod IP rather than to loopback keeps the app's loopback-only listeners
//! (debug, pprof, JMX) private to the pod: the mesh reaches exactly what other pods could reach
//! without it. The sidecar's own traffic to its pod IP is otherwise sent back to its inbound
//! listener by `trellis-proxy init`; connections from [`SOURCE_V4`] / [`SOURCE_V6`] on `lo` are
//! exempt from redirection, so a delivery reaches the app instead of looping.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

use crate::config::Args;

/// The source address of IPv4 deliveries, exempt from redirection by `init`.
pub const SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The source address of IPv6 deliveries; `init` adds it to `lo`.
pub const SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
/// How long connecting to the app may take: it is on the same host, so a slow connect means a
/// full accept queue or a dropped SYN, not distance.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The app's address and how to dial it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct App {
    pub host: IpAddr,
    /// Set when the host is not loopback: the address deliveries are sent from.
    source: Option<IpAddr>,
}

impl App {
    pub fn new(args: &Args) -> Self {
        Self::at(
            args.app_host
                .or(args.pod_ip)
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        )
    }

    pub fn at(host: IpAddr) -> Self {
        let source = match host {
            _ if host.is_loopback() => None,
            IpAddr::V4(_) => Some(IpAddr::V4(SOURCE_V4)),
            IpAddr::V6(_) => Some(IpAddr::V6(SOURCE_V6)),
        };
        App { host, source }
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.host, port)
    }

    /// Whether `addr` is one of the app's ports (and so dialed from the delivery source).
    pub fn is_app(&self, addr: SocketAddr) -> bool {
        addr.ip() == self.host
    }

    /// Connects to the app's `port`.
    pub async fn connect(&self, port: u16) -> io::Result<TcpStream> {
        let addr = self.addr(port);
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(source) = self.source {
            socket.bind(SocketAddr::new(source, 0)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot send from {source} (is the pod's iptables set up by trellis-proxy init?): {e}"
                    ),
                )
            })?;
        }
        socket.set_nodelay(true)?;
        tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to the app at {addr} timed out"),
                )
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        assert_eq!(App::at("127.0.0.1".parse().unwrap()).source, None);
        assert_eq!(
            App::at("10.1.2.3".parse().unwrap()).source,
            Some(IpAddr::V4(SOURCE_V4))
        );
        assert_eq!(
            App::at("fd00::3".parse().unwrap()).source,
            Some(IpAddr::V6(SOURCE_V6))
        );
    }

    /// A delivery to a non-loopback host leaves from 127.0.0.6, which is what `init`'s rule
    /// matches on.
    #[tokio::test]
    async fn deliveries_leave_from_the_dedicated_source() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // 127.0.0.1 is loopback, so a stand-in with the source forced.
        let app = App {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            source: Some(IpAddr::V4(SOURCE_V4)),
        };
        let (client, accepted) = tokio::join!(app.connect(port), listener.accept());
        client.unwrap();
        assert_eq!(accepted.unwrap().1.ip(), IpAddr::V4(SOURCE_V4));
    }
}
