//! The one HTTP/2 connection to the controller that every destination's stream shares.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use trellis_tls::PeerClient;

use super::{DiscoveryConfig, Metrics};

/// A connection attempt that takes longer than this is abandoned and retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pings find a controller that vanished without closing the connection (node loss, partition).
const KEEPALIVE: Duration = Duration::from_secs(20);

/// The one connection to the controller, opened on demand and again after it ends.
pub(super) struct Controller {
    addr: String,
    tls: Option<PeerClient>,
    backoff: (Duration, Duration),
    slot: tokio::sync::Mutex<Slot>,
    /// Generation of the open connection (0: none), so that the end of an old connection does
    /// not mark a newer one as down.
    live: Arc<Mutex<u64>>,
    metrics: Metrics,
}

#[derive(Default)]
struct Slot {
    send: Option<http2::SendRequest<Empty<Bytes>>>,
    connected_at: Option<Instant>,
    /// Connection attempts since the last connection that stayed up for a while.
    attempts: u32,
    generation: u64,
}

impl Controller {
    pub(super) fn new(cfg: &DiscoveryConfig, metrics: Metrics) -> Self {
        Self {
            addr: cfg.controller_addr.clone(),
            tls: cfg.tls.clone(),
            backoff: (cfg.backoff_min, cfg.backoff_max),
            slot: tokio::sync::Mutex::new(Slot::default()),
            live: Arc::new(Mutex::new(0)),
            metrics,
        }
    }

    pub(super) fn is_connected(&self) -> bool {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) != 0
    }

    /// A handle on the open connection, connecting (with backoff) until that succeeds. Callers
    /// queue on the slot, so all destinations share one connection and one retry schedule.
    pub(super) async fn get(&self) -> http2::SendRequest<Empty<Bytes>> {
        let mut slot = self.slot.lock().await;
        loop {
            if let Some(send) = &slot.send {
                if !send.is_closed() {
                    return send.clone();
                }
                slot.send = None;
                if slot
                    .connected_at
                    .is_some_and(|t| t.elapsed() >= self.backoff.1)
                {
                    slot.attempts = 0;
                }
            }
            if slot.generation > 0 || slot.attempts > 0 {
                let cap = backoff_cap(slot.attempts, self.backoff.0, self.backoff.1);
                tokio::time::sleep(jittered(cap)).await;
            }
            if let Some(tls) = &self.tls {
                // Without a certificate the controller would refuse the handshake: asking
                // before identity answered would only fill the log with failures.
                tls.certified().await;
            }
            slot.attempts = slot.attempts.saturating_add(1);
            match connect_controller(&self.addr, self.tls.as_ref()).await {
                Ok((send, connection)) => {
                    if slot.generation > 0 {
                        self.metrics.reconnects.inc();
                    }
                    slot.generation += 1;
                    slot.connected_at = Some(Instant::now());
                    slot.send = Some(send);
                    self.up(slot.generation, connection);
                    tracing::info!(controller = %self.addr, "discovery: connected to the controller");
                }
                Err(error) => {
                    tracing::warn!(controller = %self.addr, %error, attempt = slot.attempts, "discovery: cannot connect to the controller");
                }
            }
        }
    }

    /// Marks the connection up and drives it; marks it down when it ends.
    fn up<F>(&self, generation: u64, connection: F)
    where
        F: Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = generation;
        self.metrics.connected.set(1);
        let (live, metrics, addr) = (self.live.clone(), self.metrics.clone(), self.addr.clone());
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => {
                    tracing::info!(controller = %addr, "discovery: connection to the controller closed")
                }
                Err(error) => {
                    tracing::warn!(controller = %addr, %error, "discovery: connection to the controller lost")
                }
            }
            let mut live = live.lock().unwrap_or_else(|p| p.into_inner());
            if *live == generation {
                *live = 0;
                metrics.connected.set(0);
            }
        });
    }
}

/// Why the controller could not be reached.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, #[source] std::io::Error),
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(std::net::SocketAddr, #[source] std::io::Error),
    #[error("timed out after {CONNECT_TIMEOUT:?}")]
    Timeout,
    #[error("mutual TLS with {0} failed: {1}")]
    Tls(String, #[source] std::io::Error),
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
}

/// A connection to the controller, to be driven until it ends: over TLS or plaintext, so boxed
/// (once per connection).
type Connection = Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send + 'static>>;

/// The whole hop to the controller: resolve, connect, mutual TLS when the sidecar has an
/// identity (the controller must be `tls.peer`), HTTP/2 handshake.
async fn connect_controller(
    addr: &str,
    tls: Option<&PeerClient>,
) -> Result<(http2::SendRequest<Empty<Bytes>>, Connection), ConnectError> {
    let hop = async {
        let addrs = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| ConnectError::Resolve(addr.to_string(), e))?;
        let mut last = ConnectError::NoAddress(addr.to_string());
        let mut tcp = None;
        for sa in addrs {
            match TcpStream::connect(sa).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(e) => last = ConnectError::Connect(sa, e),
            }
        }
        let tcp = tcp.ok_or(last)?;
        // Snapshots are latency-sensitive and the requests tiny.
        let _ = tcp.set_nodelay(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        match tls {
            Some(tls) => {
                let stream = tls
                    .connect(tcp)
                    .await
                    .map_err(|e| ConnectError::Tls(tls.peer.to_string(), e))?;
                let (send, conn) = h2
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(ConnectError::Handshake)?;
                Ok((send, Box::pin(conn) as Connection))
            }
            None => {
                let (send, conn) = h2
                    .handshake(TokioIo::new(tcp))
                    .await
                    .map_err(ConnectError::Handshake)?;
                Ok((send, Box::pin(conn) as Connection))
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, hop)
        .await
        .map_err(|_| ConnectError::Timeout)?
}

/// The upper bound of the `attempt`-th retry delay (from 0): doubling from `min`, capped.
pub(super) fn backoff_cap(attempt: u32, min: Duration, max: Duration) -> Duration {
    min.saturating_mul(1u32 << attempt.min(30)).min(max)
}

/// Full jitter: uniform in `[0, cap]`.
pub(super) fn jittered(cap: Duration) -> Duration {
    cap.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_stays_below() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
        let caps: Vec<u128> = (0..10)
            .map(|a| backoff_cap(a, min, max).as_millis())
            .collect();
        assert_eq!(
            caps,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        assert_eq!(backoff_cap(u32::MAX, min, max), max);
        let draws: Vec<Duration> = (0..1000).map(|_| jittered(max)).collect();
        assert!(draws.iter().all(|d| *d <= max));
        // Full jitter spreads over the whole range.
        assert!(draws.iter().any(|d| *d < max / 4) && draws.iter().any(|d| *d > max * 3 / 4));
    }
}
