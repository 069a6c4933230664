//! What every connection task shares: settings, discovery, upstream clients, metrics and the
//! shutdown signal.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::balance::EndpointRegistry;
use crate::config::Config;
use crate::discovery::Discovery;
use crate::hop::Hop;
use crate::http::Upstream;
use crate::metrics::{DirectionLabels, Metrics};

#[derive(Debug)]
pub struct Proxy {
    pub config: Config,
    pub discovery: Discovery,
    pub upstream: Upstream,
    pub hop: Hop,
    /// Identities of the endpoints in use, for the hop's verification.
    pub endpoints: Arc<EndpointRegistry>,
    pub metrics: Metrics,
    /// Held by every HTTP connection, so shutdown can wait for them to drain.
    pub drain: Drain,
    pub shutdown: Shutdown,
    /// Mirror copies in flight; see [`crate::mirror`].
    pub mirror_permits: Arc<tokio::sync::Semaphore>,
    /// The empty label value, shared so that requests without a route clone a pointer.
    pub empty_label: Arc<str>,
    /// The access log and tracing, when configured.
    pub observe: crate::observe::Observe,
}

impl Proxy {
    /// Whether `addr` is one of this sidecar's own listeners: a request sent there would come
    /// back to the sidecar, which would send it there again, without end.
    pub fn is_own_listener(&self, addr: std::net::SocketAddr) -> bool {
        let args = &self.config.args;
        let ip = addr.ip();
        // Connecting to 0.0.0.0 reaches the host itself.
        let local = ip.is_unspecified() || Some(ip) == args.pod_ip || ip == self.hop.app.host;
        [args.outbound_addr, args.inbound_addr, args.admin_addr]
            .iter()
            .filter(|l| l.port() == addr.port())
            .any(|l| {
                let bound = l.ip();
                ip == bound
                    || local
                    // Listeners on a wildcard or the loopback address have a twin of the other
                    // family (see `listen::bind`).
                    || (bound.is_unspecified() && ip.is_loopback())
                    || (bound.is_loopback()
                        && ip.is_loopback()
                        && crate::listen::is_canonical_loopback(bound)
                        && crate::listen::is_canonical_loopback(ip))
            })
    }

    /// Counts an accepted connection while the guard lives.
    pub fn tcp_guard(&self, direction: &'static str) -> OpenConnection {
        let labels = DirectionLabels { direction };
        self.metrics.tcp_total.get_or_create(&labels).inc();
        let open = self.metrics.tcp_open.get_or_create(&labels).clone();
        open.inc();
        OpenConnection(open)
    }
}

/// Decrements the open-connections gauge when a connection ends.
#[derive(Debug)]
pub struct OpenConnection(prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A signal every listener waits on to stop accepting.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    pub async fn cancelled(&self) {
        let mut rx = self.0.clone();
        // An error means the sender is gone, which also means shutting down.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// A token each connection holds; when every token is gone, the connections have drained.
#[derive(Clone, Debug)]
pub struct Drain(#[allow(dead_code)] mpsc::Sender<()>);

impl Drain {
    pub fn new() -> (Drain, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel(1);
        (Drain(tx), rx)
    }
}

/// The first phase of shutdown: the sidecar reports not-ready (so the pod leaves its Services'
/// endpoints) while it keeps serving. Started by SIGTERM, or earlier by `trellis-proxy drain`
/// from a classic sidecar's preStop hook.
#[derive(Debug, Default)]
pub struct Draining {
    flag: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Draining {
    pub fn start(&self) {
        if !self.flag.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    pub fn is_started(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once draining has started.
    pub async fn started(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_started() {
                return;
            }
            notified.await;
        }
    }
}
