//! Kubernetes mode: the thin shell between the API server and the pure model.
//!
//! * [`watch`]: watchers and reflector stores of Services, EndpointSlices, Pods, HTTPRoutes
//!   and GRPCRoutes, each object [stripped](strip) to what the model reads; the index is
//!   rebuilt from the stores after each burst of changes and published to the discovery server.
//! * [`status_writer`]: writes route status ([`route_status`] merges it into other
//!   controllers' entries), on one replica at a time.
//! * [`leader`]: which replica that is, over a Lease ([`lease`] decides, purely).
//! * [`snapshot`]: one list of every kind, for `check --kubernetes` and `explain --kubernetes`.
//!
//! Everything the model computes is the same code as local mode's; only where objects come
//! from and where status goes differ.

pub mod leader;
pub mod lease;
pub mod route_status;
pub mod snapshot;
pub mod status_writer;
pub mod strip;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use tokio::sync::watch as channel;
use tokio::task::{JoinHandle, JoinSet};

use crate::index::{Config, Index};
pub use leader::LeaseTiming;
pub use watch::BackoffPolicy;

/// Name of the Lease that elects the status writer, in the controller's namespace.
pub const LEASE_NAME: &str = "trellis-controller";
/// How long changes are collected before the index is rebuilt.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// Flags of Kubernetes mode. The controller's namespace, where its Lease lives, is the
/// `--namespace` of `serve` (`TRELLIS_NAMESPACE`).
#[derive(Clone, Debug, clap::Args)]
pub struct KubernetesArgs {
    /// This replica's name in the leader-election Lease, normally the pod name from the
    /// downward API [default: $HOSTNAME] (Kubernetes mode).
    #[arg(long, env = "TRELLIS_POD_NAME")]
    pub pod_name: Option<String>,
}

/// Why Kubernetes mode cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--namespace {0:?}: not a namespace name (lower-case letters, digits and '-')")]
    Namespace(String),
    #[error(
        "no replica name for the Lease: set --pod-name or TRELLIS_POD_NAME (the chart sets it \
         from the pod's metadata.name)"
    )]
    NoPodName,
    #[error(
        "cannot configure a Kubernetes client (in a pod: its service account; elsewhere: \
         KUBECONFIG or ~/.kube/config): {0}"
    )]
    // Not a `#[source]`: the message already holds kube's whole chain.
    Client(kube::Error),
}

/// Settings of Kubernetes mode, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    /// This replica's identity in the Lease.
    pub identity: String,
    pub lease: LeaseTiming,
    pub debounce: Duration,
    pub backoff: BackoffPolicy,
}

impl KubernetesArgs {
    /// The settings for a controller running in `namespace`.
    pub fn settings(&self, namespace: &str) -> Result<Settings, Error> {
        let ns = namespace.trim();
        let label_ok = !ns.is_empty()
            && ns.len() <= 63
            && ns
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !ns.starts_with('-')
            && !ns.ends_with('-');
        if !label_ok {
            return Err(Error::Namespace(namespace.to_string()));
        }
        let named = |s: Option<String>| s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let identity = named(self.pod_name.clone())
            .or_else(|| named(std::env::var("HOSTNAME").ok()))
            .ok_or(Error::NoPodName)?;
        Ok(Settings {
            namespace: ns.to_string(),
            identity,
            lease: LeaseTiming::default(),
            debounce: DEBOUNCE,
            backoff: BackoffPolicy::Default,
        })
    }
}

/// A client for the cluster the controller runs in (or the current kubeconfig context).
pub async fn client() -> Result<kube::Client, Error> {
    // kube's client speaks rustls; naming the provider here means nothing depends on which
    // providers other crates enable. An error only means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    kube::Client::try_default().await.map_err(Error::Client)
}

/// Kubernetes mode, started by [`start`].
#[derive(Debug)]
pub struct Started {
    /// The index: the first one built from the cluster, then one after every change.
    pub index: channel::Receiver<Arc<Index>>,
    /// Ends once `stop` is set and every task has stopped.
    pub task: JoinHandle<()>,
}

impl Started {
    /// Waits for the first index built from the cluster. `false` when `shutdown` completed
    /// first: serving before then would tell proxies that no Service exists.
    pub async fn synced(&mut self, shutdown: impl Future<Output = ()>) -> bool {
        tokio::select! {
            changed = self.index.changed() => changed.is_ok(),
            () = shutdown => false,
        }
    }
}

/// Connects to the cluster and starts Kubernetes mode for a controller in `namespace`, until
/// `stop` is set.
pub async fn start(
    args: &KubernetesArgs,
    namespace: &str,
    config: Config,
    stop: channel::Receiver<bool>,
) -> Result<Started, Error> {
    let settings = args.settings(namespace)?;
    let client = client().await?;
    tracing::info!(
        "watching the Kubernetes API; route status is written by the holder of Lease \
         {}/{LEASE_NAME} (this replica: {})",
        settings.namespace,
        settings.identity
    );
    let (index_tx, index) = channel::channel(Arc::new(Index::default()));
    let task = tokio::spawn(run(client, settings, config, index_tx, stop));
    Ok(Started { index, task })
}

/// Runs Kubernetes mode until `stop` is set: publishes an index on `index` once the initial
/// lists are in and after every change, and writes route status while this replica holds the
/// Lease. Returns when every task has stopped (the Lease released if held).
pub async fn run(
    client: kube::Client,
    settings: Settings,
    config: Config,
    index: channel::Sender<Arc<Index>>,
    stop: channel::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    let stores = watch::start(&client, settings.backoff, &mut tasks, &stop);
    let index_rx = index.subscribe();
    tasks.spawn(watch::publish(
        stores.clone(),
        config,
        settings.debounce,
        index,
        stop.clone(),
    ));
    let (leader_tx, leader_rx) = channel::channel(false);
    tasks.spawn(leader::run(
        Api::namespaced(client.clone(), &settings.namespace),
        LEASE_NAME.to_string(),
        settings.identity,
        settings.lease,
        leader_tx,
        stop.clone(),
    ));
    tasks.spawn(status_writer::run(
        client, stores, index_rx, leader_rx, stop,
    ));
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!("a Kubernetes task failed: {e}");
        }
    }
}

#[cfg(test)]
mod settings_tests {
    use super::*;

    #[test]
    fn settings_need_a_namespace_name_and_a_replica_name() {
        let args = KubernetesArgs {
            pod_name: Some("trellis-controller-7d9f-x2".to_string()),
        };
        let s = args.settings("trellis-system").unwrap();
        assert_eq!(s.namespace, "trellis-system");
        assert_eq!(s.identity, "trellis-controller-7d9f-x2");
        assert_eq!(s.lease.duration, Duration::from_secs(15));
        assert_eq!(s.debounce, Duration::from_millis(100));
        for bad in ["", "Trellis", "-a", "a_b", "a.b"] {
            assert!(
                matches!(args.settings(bad), Err(Error::Namespace(_))),
                "{bad:?}"
            );
        }
        let blank = KubernetesArgs {
            pod_name: Some("  ".to_string()),
        };
        // A blank name falls back to $HOSTNAME, which tests do not control: only check that
        // it is not taken as the name.
        if let Ok(s) = blank.settings("ns") {
            assert!(!s.identity.trim().is_empty());
        }
    }

    /// `serve`'s flags as the binary parses them.
    #[derive(Debug, clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: crate::serve::Args,
    }

    fn parse(argv: &[&str]) -> Result<crate::serve::Args, clap::Error> {
        use clap::Parser as _;
        let argv = std::iter::once("serve").chain(argv.iter().copied());
        Serve::try_parse_from(argv).map(|s| s.args)
    }

    #[test]
    fn serve_takes_either_manifests_or_kubernetes() {
        use clap::CommandFactory as _;
        Serve::command().debug_assert();
        let k = parse(&["--kubernetes", "--pod-name", "p-1", "--namespace", "mesh"]).unwrap();
        assert!(k.kubernetes && k.manifests.is_none());
        assert_eq!(k.cluster.pod_name.as_deref(), Some("p-1"));
        assert_eq!(
            k.cluster.settings(&k.identity.namespace).unwrap().namespace,
            "mesh"
        );
        let local = parse(&["--manifests", "."]).unwrap();
        assert!(!local.kubernetes && local.manifests.is_some());
        for bad in [&[][..], &["--kubernetes", "--manifests", "."][..]] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
    }
}

#[cfg(test)]
pub(crate) mod fake_api;
#[cfg(test)]
mod leader_tests;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod status_writer_tests;
#[cfg(test)]
mod watch_tests;
