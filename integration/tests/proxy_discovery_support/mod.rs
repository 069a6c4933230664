//! What the discovery client and admin server tests share: manifests, a counting TCP relay,
//! metric reading and waiting helpers.

#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use trellis_api::policy::{ObjectRef, Routing as WireRouting};
use trellis_proxy::balance::EndpointRegistry;
use trellis_proxy::discovery::{Discovery, DiscoveryConfig, Subscription};
use trellis_proxy::policy::{Policy, PolicyKind};

/// Writes a file the way an editor that replaces files does, so the change is one event.
pub fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A discovery client with fast retries, and the registry holding its metrics.
pub fn client(controller: &str, namespace: &str, idle: Duration) -> (Discovery, Registry) {
    let mut cfg = DiscoveryConfig::new(controller, namespace, idle);
    cfg.backoff_min = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(300);
    client_with(cfg)
}

pub fn client_with(cfg: DiscoveryConfig) -> (Discovery, Registry) {
    let mut registry = Registry::default();
    let discovery = Discovery::new(cfg, Arc::new(EndpointRegistry::default()), &mut registry);
    (discovery, registry)
}

/// The value of one sample (`name{labels}` exactly as encoded), if present.
pub fn metric(registry: &Registry, sample: &str) -> Option<f64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// Waits until `cond` holds, polling: for effects that have no event to wait on.
pub async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the subscription's policy satisfies `pred`, and returns it.
pub async fn policy_where(
    sub: &mut Subscription,
    within: Duration,
    what: &str,
    pred: impl Fn(&Policy) -> bool,
) -> Arc<Policy> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(p) = sub.current().filter(|p| pred(p)) {
            return p;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, sub.changed()).await.is_err() {
            panic!(
                "no policy with {what} within {within:?}; last: {:?}",
                sub.current()
            );
        }
    }
}

/// The route prefixes of an HTTP-routed Service policy; `None` for passthrough or not a Service.
pub fn prefixes(policy: &Policy) -> Option<Vec<String>> {
    let trellis_api::policy::OutboundPolicy::Service(svc) = &policy.snapshot else {
        return None;
    };
    match &svc.routing {
        WireRouting::Http { routes } => Some(
            routes
                .iter()
                .flat_map(|r| r.rules.iter().flat_map(|rule| rule.matches.iter()))
                .map(|m| format!("{:?}", m.path))
                .collect(),
        ),
        _ => None,
    }
}

/// Whether the compiled policy is the Service `shop/web` port 80.
pub fn is_web_service(policy: &Policy) -> bool {
    let web = ObjectRef {
        namespace: "shop".into(),
        name: "web".into(),
    };
    matches!(&policy.kind, PolicyKind::Service(s) if s.service == web && s.port == 80)
}

/// A TCP relay to `upstream` that counts the connections it accepts.
pub struct Relay {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Relay {
            addr,
            connections,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
