//! `trellis-injector serve`: the admission webhook, its admin server and its certificate.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use crate::admin::{self, Admin};
use crate::cert::{self, Resolver, ServingCert};
use crate::cluster::{self, CaBundle, Source};
use crate::config::{ServeArgs, ServeConfig, TlsSource};
use crate::metrics::Metrics;
use crate::webhook::{self, Webhook};

/// How often the Secret and the caBundle are checked: a `helm upgrade` that resets the caBundle,
/// or a renewal by another replica, is picked up within this time.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(60);
/// How often user-provided certificate files are checked for changes.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_secs(30);
/// How often the trust anchors file is read again: the controller reads the same Secret at the
/// same pace, so new pods and running ones learn a new root within about the same time.
pub const TRUST_ANCHORS_POLL_INTERVAL: Duration = Duration::from_secs(10);

pub fn main(args: ServeArgs) -> ExitCode {
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
    let config = match args.validate() {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    tracing::debug!(?config, "settings");
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
    match runtime.block_on(run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs until `shutdown` resolves.
pub async fn run(config: ServeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let admin = Admin::new(metrics.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let admin_listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("cannot listen on {} (--admin-addr)", config.admin_addr))?;
    tracing::info!("admin server on {}", admin_listener.local_addr()?);
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin.clone(),
        stopped(stop_rx.clone()),
    ));

    let resolver = match &config.tls {
        TlsSource::Files { cert, key } => {
            let resolver = Resolver::new(read_files(cert, key, &metrics).await?);
            tokio::spawn(watch_files(
                cert.clone(),
                key.clone(),
                resolver.clone(),
                metrics.clone(),
                FILE_POLL_INTERVAL,
                stop_rx.clone(),
            ));
            resolver
        }
        TlsSource::Secret {
            namespace,
            name,
            service,
            webhook_configuration,
        } => {
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the Kubernetes API to manage the serving certificate")?;
            let reconciler = Reconciler::new(
                client,
                namespace,
                name,
                service,
                webhook_configuration,
                metrics.clone(),
            );
            let current = reconciler.certificate().await?;
            let resolver = Resolver::new(cert::certified_key(&current.cert_pem, &current.key_pem)?);
            reconciler.publish(&current).await;
            tokio::spawn(reconciler.run(current, resolver.clone(), stop_rx.clone()));
            resolver
        }
    };

    let tls = Arc::new(cert::server_config(resolver)?);
    let listener = tokio::net::TcpListener::bind(config.webhook_addr)
        .await
        .with_context(|| format!("cannot listen on {} (--webhook-addr)", config.webhook_addr))?;
    tracing::info!(
        "webhook on https://{}{} ({:?} sidecars, proxy image {})",
        listener.local_addr()?,
        webhook::PATH,
        config.settings.sidecar_mode,
        config.settings.proxy_image
    );
    let webhook = Arc::new(Webhook::new(config.settings, metrics, config.limits));
    if let Some(path) = config.trust_anchors_file {
        tokio::spawn(follow_trust_anchors(
            path,
            webhook.clone(),
            TRUST_ANCHORS_POLL_INTERVAL,
            stop_rx.clone(),
        ));
    }
    admin.set_ready(true);
    let admin_for_shutdown = admin.clone();
    webhook::serve(listener, tls, webhook, async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, open requests may finish");
        admin_for_shutdown.set_ready(false);
    })
    .await;
    stop_tx.send_replace(true);
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Loads a user-provided pair and records its expiry.
async fn read_files(
    cert: &Path,
    key: &Path,
    metrics: &Metrics,
) -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
    let cert_pem = tokio::fs::read_to_string(cert)
        .await
        .with_context(|| format!("--tls-cert-file {}", cert.display()))?;
    let key_pem = tokio::fs::read_to_string(key)
        .await
        .with_context(|| format!("--tls-key-file {}", key.display()))?;
    let certified = cert::certified_key(&cert_pem, &key_pem).with_context(|| {
        format!(
            "--tls-cert-file {} / --tls-key-file {}",
            cert.display(),
            key.display()
        )
    })?;
    if let Ok(info) = cert::inspect(&cert_pem) {
        metrics.certificate_expires(info.not_after);
    }
    Ok(certified)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reloads user-provided files when they change (cert-manager renews them in place). A pair
/// caught mid-update fails to load and is retried at the next poll; the old one stays.
pub async fn watch_files(
    cert: PathBuf,
    key: PathBuf,
    resolver: Arc<Resolver>,
    metrics: Metrics,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = (modified(&cert), modified(&key));
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = (modified(&cert), modified(&key));
        if now == seen {
            continue;
        }
        match read_files(&cert, &key, &metrics).await {
            Ok(key) => {
                resolver.set(key);
                seen = now;
                tracing::info!("serving certificate reloaded from {}", cert.display());
            }
            Err(e) => tracing::warn!("serving certificate files changed but cannot be used: {e:#}"),
        }
    }
}

/// Keeps the Secret's certificate served and the caBundle in sync.
struct Reconciler {
    secrets: Api<Secret>,
    configs: Api<MutatingWebhookConfiguration>,
    namespace: String,
    secret: String,
    webhook_configuration: String,
    dns_names: Vec<String>,
    metrics: Metrics,
}

impl Reconciler {
    fn new(
        client: kube::Client,
        namespace: &str,
        secret: &str,
        service: &str,
        webhook_configuration: &str,
        metrics: Metrics,
    ) -> Self {
        Reconciler {
            secrets: Api::namespaced(client.clone(), namespace),
            configs: Api::all(client),
            dns_names: cert::dns_names(service, namespace),
            namespace: namespace.to_string(),
            secret: secret.to_string(),
            webhook_configuration: webhook_configuration.to_string(),
            metrics,
        }
    }

    async fn certificate(&self) -> anyhow::Result<ServingCert> {
        let (current, source) = cluster::load_or_create(
            &self.secrets,
            &self.namespace,
            &self.secret,
            &self.dns_names,
            SystemTime::now(),
        )
        .await
        .with_context(|| {
            format!(
                "serving certificate from Secret {}/{}",
                self.namespace, self.secret
            )
        })?;
        let what = match &source {
            Source::Loaded => "loaded".to_string(),
            Source::Created => "created".to_string(),
            Source::Renewed(reason) => format!("renewed because {reason}"),
            Source::LostRace => "loaded (another replica wrote it first)".to_string(),
        };
        if source != Source::Loaded {
            tracing::info!(
                "serving certificate {what}: Secret {}/{}",
                self.namespace,
                self.secret
            );
        }
        if let Ok(info) = cert::inspect(&current.cert_pem) {
            self.metrics.certificate_expires(info.not_after);
        }
        Ok(current)
    }

    /// Errors are logged, not fatal: the webhook can serve while RBAC or the configuration is
    /// being fixed, and the next round retries.
    async fn publish(&self, current: &ServingCert) {
        if current.ca_pem.is_empty() {
            tracing::warn!(
                "Secret {}/{} has no ca.crt: the caBundle of {} is left as it is",
                self.namespace,
                self.secret,
                self.webhook_configuration
            );
            return;
        }
        match cluster::sync_ca_bundle(&self.configs, &self.webhook_configuration, &current.ca_pem)
            .await
        {
            Ok(CaBundle::Patched) => {
                self.metrics.ca_bundle_updated();
                tracing::info!(
                    "caBundle of MutatingWebhookConfiguration {} updated",
                    self.webhook_configuration
                );
            }
            Ok(CaBundle::AlreadyCurrent) => {}
            Ok(CaBundle::Missing) => tracing::warn!(
                "MutatingWebhookConfiguration {} not found; its caBundle will be set once it exists",
                self.webhook_configuration
            ),
            Err(e) => tracing::warn!(
                "cannot update the caBundle of MutatingWebhookConfiguration {}: {e}",
                self.webhook_configuration
            ),
        }
    }

    async fn run(
        self,
        mut current: ServingCert,
        resolver: Arc<Resolver>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(RECONCILE_INTERVAL) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.certificate().await {
                Ok(fresh) if fresh != current => {
                    match cert::certified_key(&fresh.cert_pem, &fresh.key_pem) {
                        Ok(key) => {
                            // Publish the new CA before serving the new certificate: the bundle
                            // still holds the previous CA, so both verify in between.
                            self.publish(&fresh).await;
                            resolver.set(key);
                            current = fresh;
                            tracing::info!("now serving the renewed certificate");
                        }
                        Err(e) => tracing::warn!("the renewed certificate cannot be used: {e}"),
                    }
                }
                Ok(_) => self.publish(&current).await,
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops the injector");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Reads the trust anchors file every `interval` until `stop`, so that pods created after a root
/// rotation get the new bundle in `TRELLIS_TRUST_ANCHORS` (running proxies get it from the
/// controller). A file that cannot be read or holds no certificate is logged once per problem,
/// and pods keep getting the last good bundle.
pub async fn follow_trust_anchors(
    path: PathBuf,
    webhook: Arc<Webhook>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut reported: Option<String> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let read = tokio::task::spawn_blocking({
            let path = path.clone();
            move || crate::config::read_trust_anchors(&path)
        })
        .await;
        match read {
            Ok(Ok(pem)) => {
                reported = None;
                if webhook.set_trust_anchors(&pem) {
                    tracing::info!(file = %path.display(), "trust anchors changed: new pods get the new bundle");
                }
            }
            Ok(Err(e)) => {
                let message = e.to_string();
                if reported.as_ref() != Some(&message) {
                    tracing::warn!("{message}; new pods keep getting the last good trust anchors");
                    reported = Some(message);
                }
            }
            Err(e) => tracing::warn!("reading the trust anchors failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReviewLimits;

    fn pem(body: &str) -> String {
        format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")
    }

    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[tokio::test]
    async fn new_pods_get_the_trust_anchors_in_the_file_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        let (old, new) = (pem("T0xE"), format!("{}{}", pem("T0xE"), pem("TkVX")));
        replace(&path, &old);
        let mut settings = crate::config::tests::settings();
        settings.trust_anchors_pem = old.clone();
        let webhook = Arc::new(Webhook::new(
            settings,
            Metrics::new(),
            ReviewLimits::default(),
        ));
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(follow_trust_anchors(
            path.clone(),
            webhook.clone(),
            Duration::from_millis(10),
            stop,
        ));
        let anchors = || webhook.settings().trust_anchors_pem.clone();

        replace(&path, &new);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while anchors() != new {
            assert!(std::time::Instant::now() < deadline, "{}", anchors());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A file without certificates, then none at all: the last good bundle stays.
        replace(&path, "not a certificate\n");
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(anchors(), new);
        stop_tx.send_replace(true);
        task.await.unwrap();
    }
}
