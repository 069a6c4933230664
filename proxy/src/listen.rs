//! Accepting connections, once and correctly, for every listener of the sidecar: both address
//! families, TCP keep-alive and no-delay on every socket, a cap on open connections, and every
//! connection task counted and holding the drain token.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::proxy::Proxy;

/// Connections waiting to be accepted per listener.
const BACKLOG: i32 = 1024;

/// Binds `addr` and, when it is a wildcard or loopback address of one family, the same port
/// of the other family too: IPv6 traffic redirected by `init` arrives at `[::]` or `[::1]`.
/// The twin is best effort (a host without IPv6 has none); `addr` itself must bind.
pub fn bind(addr: SocketAddr) -> io::Result<Vec<TcpListener>> {
    let mut listeners = vec![listen(addr)?];
    let twin = match addr.ip() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED) => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        IpAddr::V4(Ipv4Addr::LOCALHOST) => Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED) => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        IpAddr::V6(Ipv6Addr::LOCALHOST) => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        _ => None,
    };
    if let Some(ip) = twin {
        match listen(SocketAddr::new(ip, addr.port())) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                tracing::debug!(%ip, port = addr.port(), error = %e, "no listener on the other address family")
            }
        }
    }
    Ok(listeners)
}

/// `127.0.0.1` or `::1`, the loopback addresses that [`bind`] pairs.
pub fn is_canonical_loopback(ip: IpAddr) -> bool {
    ip == IpAddr::V4(Ipv4Addr::LOCALHOST) || ip == IpAddr::V6(Ipv6Addr::LOCALHOST)
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        // The IPv4 twin holds the port for IPv4; a dual-stack socket would collide with it.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// The destination a connection had before `init`'s REDIRECT, if it was redirected: the
/// connection's own local address means it was not.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = SockRef::from(stream);
    let orig = match stream.local_addr().ok()? {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()
    .and_then(|a| a.as_socket())?;
    let here = stream.local_addr().ok()?;
    (orig != here).then_some(orig)
}

/// Keep-alive and no-delay, for accepted and dialed sockets alike: a peer that vanishes
/// without a FIN or RST is found within `idle` plus three probes ten seconds apart.
pub fn tune(stream: &TcpStream, idle: Duration) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle.min(Duration::from_secs(10)))
        .with_retries(3);
    if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keep-alive");
    }
}

/// Accepts on every listener until shutdown and runs `handle` for each connection in a task
/// of its own. At most `max_connections` are open across the listeners; one more is accepted
/// and closed at once, counted as `connection_limit`.
pub async fn serve<F, Fut>(
    proxy: Arc<Proxy>,
    listeners: Vec<TcpListener>,
    direction: &'static str,
    max_connections: usize,
    handle: F,
) where
    F: Fn(Arc<Proxy>, TcpStream) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        let (proxy, limit, handle) = (proxy.clone(), limit.clone(), handle.clone());
        loops.spawn(accept_loop(proxy, listener, direction, limit, handle));
    }
    while loops.join_next().await.is_some() {}
}

async fn accept_loop<F, Fut>(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    direction: &'static str,
    limit: Arc<Semaphore>,
    handle: F,
) where
    F: Fn(Arc<Proxy>, TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Resource exhaustion (EMFILE…) passes; a tight loop would not help it.
                    tracing::warn!(error = %e, direction, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = proxy.shutdown.cancelled() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            proxy.metrics.error(direction, "connection_limit");
            tracing::debug!(
                direction,
                "connection limit reached: a new connection was closed"
            );
            continue;
        };
        tune(&stream, proxy.config.args.tcp_keepalive);
        let task_proxy = proxy.clone();
        let fut = handle(task_proxy.clone(), stream);
        tokio::spawn(async move {
            let _permit = permit;
            let _drain = task_proxy.drain.clone();
            let _open = task_proxy.tcp_guard(direction);
            fut.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wildcard_and_loopback_listen_on_both_families() {
        let ls = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(ls[0].local_addr().unwrap().is_ipv4());
        // Port 0 picks a fresh port for each: the twin exists when the host has IPv6.
        if std::path::Path::new("/proc/net/if_inet6").exists() {
            assert_eq!(ls.len(), 2);
            assert!(ls[1].local_addr().unwrap().is_ipv6());
        }
        let ls = bind("127.0.0.9:0".parse().unwrap()).unwrap();
        assert_eq!(ls.len(), 1);
    }

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_no_original_destination() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        assert_eq!(original_dst(&accepted.unwrap().0), None);
    }
}
