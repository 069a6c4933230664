//! `trellis-controller serve`: serve discovery to proxies from a directory of manifests
//! (local mode), reloading it when it changes, or from the cluster's API server
//! (`--kubernetes`, see [`crate::kubernetes`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use crate::discovery::{DiscoveryMetrics, Limits, Options};
use crate::identity::{DiscoveryTls, IdentityArgs};
use crate::index::{Config, Index};
use crate::manifests::{self, Fingerprint, LoadError};
use crate::objects::Objects;
use crate::status;

mod anchors;

/// How often the manifest directory is checked for changes. A change is published after it has
/// been stable for one interval, so an edit reaches proxies within about two intervals.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory of Kubernetes manifests (*.yaml, *.yml, *.json: Services, EndpointSlices,
    /// Pods, HTTPRoutes, GRPCRoutes) to serve; reloaded when a file changes.
    #[arg(
        long,
        env = "TRELLIS_MANIFESTS",
        value_name = "DIR",
        required_unless_present = "kubernetes"
    )]
    pub manifests: Option<PathBuf>,

    /// Watch the Kubernetes API server instead of reading --manifests, and write route status.
    #[arg(long, env = "TRELLIS_KUBERNETES", conflicts_with = "manifests")]
    pub kubernetes: bool,

    #[command(flatten)]
    pub cluster: crate::kubernetes::KubernetesArgs,

    /// Address of the discovery server (HTTP/2 and HTTP/1.1).
    #[arg(long, env = "TRELLIS_DISCOVERY_ADDR", default_value = "0.0.0.0:8090")]
    pub discovery_addr: SocketAddr,

    /// Address of the admin server: `/live`, `/ready` (ready once discovery serves) and
    /// `/metrics`.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "0.0.0.0:9990")]
    pub admin_addr: SocketAddr,

    /// The most discovery streams open at once; one more is refused (429) and counted.
    #[arg(long, env = "TRELLIS_MAX_STREAMS", default_value_t = Limits::DEFAULT_TOTAL)]
    pub max_streams: usize,

    /// The most discovery streams one client (an IP address: one pod) may have open.
    #[arg(
        long,
        env = "TRELLIS_MAX_STREAMS_PER_CLIENT",
        default_value_t = Limits::DEFAULT_PER_CLIENT
    )]
    pub max_streams_per_client: usize,

    /// Trust domain of the SPIFFE identities expected from endpoints.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = trellis_api::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// DNS suffix of Service names (`<svc>.<ns>.svc.<cluster-domain>`).
    #[arg(long, env = "TRELLIS_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Log filter, in RUST_LOG syntax (e.g. `info` or `info,trellis_controller=debug`).
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log_level: String,

    /// The controller's own identity, which turns on mutual TLS for discovery.
    #[command(flatten)]
    pub identity: IdentityArgs,

    /// How often the --trust-anchors file is read again; a changed bundle replaces the
    /// controller's anchors and is streamed to every proxy (e.g. `10s`, `500ms`).
    #[arg(
        long,
        env = "TRELLIS_TRUST_ANCHORS_POLL_INTERVAL",
        default_value = "10s",
        value_parser = parse_interval
    )]
    pub trust_anchors_poll_interval: Duration,
}

/// `500ms`, `10s`, `2m`: at least 100 ms.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let bad = || format!("{s:?} is not an interval such as 500ms, 10s or 2m (at least 100ms)");
    let n: u64 = n.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(bad()),
    };
    if d < Duration::from_millis(100) {
        return Err(bad());
    }
    Ok(d)
}

/// Runs the controller until SIGTERM or Ctrl-C.
///
/// If the manifests cannot be loaded at start, the controller logs why and exits with code 1
/// rather than serving an empty index: an empty index would tell every proxy that reconnects
/// that no Service exists, replacing the last good policy each proxy keeps while the
/// controller is down. Once running, a bad edit is logged and the last good index stays.
pub fn main(args: Args) -> ExitCode {
    let filter = match EnvFilter::try_new(&args.log_level) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("error: invalid --log-level {:?}: {e}", args.log_level);
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = validate(&args)?;
    let Some(dir) = args.manifests.clone() else {
        return run_kubernetes(args, config).await;
    };

    let fingerprint = manifests::fingerprint(&dir)?;
    let objects = manifests::load_dir(&dir).context("cannot load the manifests")?;
    tracing::info!(
        "manifests loaded from {}: {}",
        dir.display(),
        summary(&objects)
    );
    let index = Index::build(&objects, &config);
    log_route_problems(&index);
    let (index_tx, index_rx) = watch::channel(Arc::new(index));

    let mut registry = prometheus_client::registry::Registry::default();
    let tls = DiscoveryTls::start(&args.identity, &config.trust_domain, &mut registry)?;
    let options = discovery_options(&args, tls.as_ref(), &mut registry);
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(args.discovery_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.discovery_addr))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = start_admin(args.admin_addr, registry, stop_rx.clone()).await?;
    mark_ready_when_serving(&admin, tls.as_ref());
    follow_anchors(&args, tls.as_ref(), stop_rx.clone());
    let reload = tokio::spawn(reload(dir, config, fingerprint, index_tx, stop_rx));
    crate::identity::serve_discovery(listener, index_rx, tls.as_ref(), options, shutdown).await?;
    admin.admin.set_ready(false);
    stop_tx.send_replace(true);
    let _ = reload.await;
    let _ = admin.task.await;
    tracing::info!("stopped");
    Ok(())
}

/// `--kubernetes`: the index comes from the cluster's watches. The discovery port opens only
/// once the initial lists are in, for the reason local mode exits on unreadable manifests.
async fn run_kubernetes(args: Args, config: Config) -> anyhow::Result<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    let tls = DiscoveryTls::start(&args.identity, &config.trust_domain, &mut registry)?;
    let options = discovery_options(&args, tls.as_ref(), &mut registry);
    let mut shutdown = std::pin::pin!(shutdown_signal()?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = start_admin(args.admin_addr, registry, stop_rx.clone()).await?;
    follow_anchors(&args, tls.as_ref(), stop_rx.clone());
    let namespace = &args.identity.namespace;
    let mut cluster = crate::kubernetes::start(&args.cluster, namespace, config, stop_rx).await?;
    if cluster.synced(&mut shutdown).await {
        let listener = tokio::net::TcpListener::bind(args.discovery_addr)
            .await
            .with_context(|| format!("cannot listen on {}", args.discovery_addr))?;
        let index = cluster.index.clone();
        mark_ready_when_serving(&admin, tls.as_ref());
        crate::identity::serve_discovery(listener, index, tls.as_ref(), options, shutdown).await?;
    }
    admin.admin.set_ready(false);
    stop_tx.send_replace(true);
    let _ = cluster.task.await;
    let _ = admin.task.await;
    tracing::info!("stopped");
    Ok(())
}

fn discovery_options(
    args: &Args,
    tls: Option<&DiscoveryTls>,
    registry: &mut prometheus_client::registry::Registry,
) -> Options {
    Options {
        limits: Limits {
            total: args.max_streams,
            per_client: args.max_streams_per_client,
        },
        metrics: DiscoveryMetrics::new(registry),
        anchors: tls.map(|tls| tls.mesh().anchors.subscribe()),
    }
}

/// With mutual TLS and `--trust-anchors` naming a file, follows that file until `stop`: a
/// changed bundle replaces the anchors the controller verifies with and streams to proxies.
fn follow_anchors(args: &Args, tls: Option<&DiscoveryTls>, stop: watch::Receiver<bool>) {
    let (Some(tls), Some(path)) = (tls, args.identity.anchors_file()) else {
        return;
    };
    tracing::info!(
        file = %path.display(),
        every = ?args.trust_anchors_poll_interval,
        "following the trust anchors file"
    );
    tokio::spawn(anchors::follow(
        path,
        tls.mesh().clone(),
        args.trust_anchors_poll_interval,
        stop,
    ));
}

/// The controller's metrics for the admin server.
#[derive(Debug)]
struct Exposition(prometheus_client::registry::Registry);

impl trellis_admin::Exposition for Exposition {
    fn encode(&self) -> String {
        trellis_admin::encode(&self.0)
    }
}

struct AdminServer {
    admin: Arc<trellis_admin::Admin<Exposition>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_admin(
    addr: SocketAddr,
    registry: prometheus_client::registry::Registry,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<AdminServer> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the admin server"))?;
    let admin = trellis_admin::Admin::new(Exposition(registry));
    let task = tokio::spawn(trellis_admin::serve(listener, admin.clone(), async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    }));
    Ok(AdminServer { admin, task })
}

/// Ready once discovery can answer: at once in plaintext, after the first certificate with
/// mutual TLS.
fn mark_ready_when_serving(admin: &AdminServer, tls: Option<&DiscoveryTls>) {
    let admin = admin.admin.clone();
    match tls.map(DiscoveryTls::credentials) {
        None => admin.set_ready(true),
        Some(credentials) => {
            tokio::spawn(async move {
                credentials.certified().await;
                admin.set_ready(true);
            });
        }
    }
}

fn validate(args: &Args) -> anyhow::Result<Config> {
    if let Some(dir) = &args.manifests
        && !dir.is_dir()
    {
        bail!("--manifests {}: not a directory", dir.display());
    }
    let domain_ok = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    if !domain_ok(&args.trust_domain) || args.trust_domain.bytes().any(|b| b.is_ascii_uppercase()) {
        bail!(
            "--trust-domain {:?}: expected a lower-case DNS name such as cluster.local",
            args.trust_domain
        );
    }
    if args.max_streams == 0 || args.max_streams_per_client == 0 {
        bail!("--max-streams and --max-streams-per-client must be at least 1");
    }
    if !domain_ok(&args.cluster_domain) {
        bail!(
            "--cluster-domain {:?}: expected a DNS name such as cluster.local",
            args.cluster_domain
        );
    }
    Ok(Config {
        trust_domain: args.trust_domain.clone(),
        cluster_domain: args.cluster_domain.to_ascii_lowercase(),
    })
}

/// Polls `dir` and publishes a new index after each change, until `stop` is set. `loaded` is
/// the fingerprint taken just before the directory was last loaded, so an edit made during that
/// load is still seen. A load error is logged once and the last good index stays.
pub async fn reload(
    dir: PathBuf,
    config: Config,
    loaded: Fingerprint,
    index: watch::Sender<Arc<Index>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut poller = Some(Poller {
        dir,
        config,
        previous: loaded.clone(),
        loaded,
    });
    let mut reported: Option<String> = None;
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while let Some(mut p) = poller.take() {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        // Reading files and compiling the index block: keep them off the server's threads.
        let polled = tokio::task::spawn_blocking(move || {
            let outcome = p.poll();
            (p, outcome)
        })
        .await;
        let outcome = match polled {
            Ok((p, outcome)) => {
                poller = Some(p);
                outcome
            }
            Err(e) => {
                tracing::error!("manifest reload panicked, reloading stops: {e}");
                return;
            }
        };
        match outcome {
            None => {}
            Some(Ok((new_index, summary))) => {
                tracing::info!("manifests reloaded: {summary}");
                log_route_problems(&new_index);
                reported = None;
                index.send_replace(Arc::new(new_index));
            }
            Some(Err(e)) => {
                // Once per distinct error: the directory is polled five times a second.
                let message = e.to_string();
                if reported.as_ref() != Some(&message) {
                    tracing::error!(
                        "manifests not reloaded, still serving the last good state: {message}"
                    );
                    reported = Some(message);
                }
            }
        }
    }
}

/// The reload loop's view of the directory.
struct Poller {
    dir: PathBuf,
    config: Config,
    /// What the last poll saw.
    previous: Fingerprint,
    /// What the last load attempt read, good or bad.
    loaded: Fingerprint,
}

impl Poller {
    /// Loads the directory when it changed, but only once it looks the same on two polls in a
    /// row and did not change while being read: a file caught half written (truncated, then
    /// filled) would otherwise be published as a state nobody wrote.
    fn poll(&mut self) -> Option<Result<(Index, String), LoadError>> {
        let now = match manifests::fingerprint(&self.dir) {
            Ok(now) => now,
            Err(e) => {
                self.previous = Fingerprint::default();
                return Some(Err(e));
            }
        };
        if now != self.previous {
            self.previous = now;
            return None;
        }
        if now == self.loaded {
            return None;
        }
        let objects = manifests::load_dir(&self.dir);
        if manifests::fingerprint(&self.dir).ok().as_ref() != Some(&now) {
            self.previous = Fingerprint::default();
            return None;
        }
        self.loaded = now;
        Some(objects.map(|objects| (Index::build(&objects, &self.config), summary(&objects))))
    }
}

fn summary(objects: &Objects) -> String {
    format!(
        "{} Services, {} EndpointSlices, {} Pods, {} HTTPRoutes, {} GRPCRoutes",
        objects.services.len(),
        objects.endpoint_slices.len(),
        objects.pods.len(),
        objects.http_routes.len(),
        objects.grpc_routes.len(),
    )
}

/// In local mode nobody reads route status, so say in the log what `check` would report.
fn log_route_problems(index: &Index) {
    for route in index.statuses().iter().filter(|r| !r.is_healthy()) {
        for parent in &route.parents {
            for c in &parent.conditions {
                let bad = if c.type_ == status::PARTIALLY_INVALID {
                    c.status
                } else {
                    !c.status
                };
                if bad {
                    tracing::warn!(
                        "{} {}/{} (parent {}): {} is {}: {}: {}",
                        route.kind.as_str(),
                        route.namespace,
                        route.name,
                        parent.parent_ref.name,
                        c.type_,
                        if c.status { "True" } else { "False" },
                        c.reason,
                        c.message
                    );
                }
            }
        }
    }
}

/// Completes on SIGTERM (what Kubernetes sends) or Ctrl-C. The handlers are installed when
/// this is called, not when the future is first polled, so a signal sent as soon as the
/// controller logs that it listens is not lost.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::warn!("cannot handle Ctrl-C: {e}");
                std::future::pending::<()>().await;
            }
            tracing::info!("shutting down");
        })
    }
}
