//! `trellis-identity serve`: loads and checks the issuer, then serves certify and the admin
//! server until SIGTERM, reloading the issuer and the token file as they change.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use kube::Api;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use crate::admin::{self, Admin};
use crate::ca::{self, Authority};
use crate::config::{MaterialSource, ServeArgs, ServeConfig, TokenSource, format_duration};
use crate::metrics::Metrics;
use crate::reload::{self, Active, Current, Settings, Source};
use crate::server::{self, Certifier};
use crate::tokens::{LocalTokens, TokenReviewer, Tokens};

/// Sets up logging to stderr with `filter`; false (after printing why) when it is invalid.
pub fn init_logging(filter: &str) -> bool {
    match EnvFilter::try_new(filter) {
        Ok(filter) => {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            true
        }
        Err(e) => {
            eprintln!("error: invalid --log-level {filter:?}: {e}");
            false
        }
    }
}

/// A multi-threaded runtime, or `None` after logging why not.
pub fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            None
        }
    }
}

pub fn main(args: ServeArgs) -> ExitCode {
    if !init_logging(&args.log_level) {
        return ExitCode::from(2);
    }
    let config = match args.validate() {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    tracing::debug!(?config, "settings");
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
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

    // One client for both Kubernetes uses, created on first need, so local mode runs
    // without a cluster.
    let mut client = None;
    let source = match &config.material {
        MaterialSource::Files { anchors, cert, key } => Source::Files {
            anchors: anchors.clone(),
            cert: cert.clone(),
            key: key.clone(),
        },
        MaterialSource::Secret { namespace, name } => Source::Secret {
            secrets: Api::namespaced(kube_client(&mut client).await?, namespace),
            namespace: namespace.clone(),
            name: name.clone(),
        },
    };
    let material = source
        .read()
        .await
        .map_err(anyhow::Error::msg)
        .context("cannot read the trust anchors and issuer")?;
    let now = SystemTime::now();
    let authority = Authority::new(&material, &config.trust_domain, config.cert_lifetime, now)
        .with_context(|| {
            format!(
                "the trust anchors and issuer from {} cannot be used",
                source.describe()
            )
        })?;
    tracing::info!(
        "issuer from {} checked: {} trust anchor(s), issuer expires {}, certificates live {}",
        source.describe(),
        authority.anchors().certs().len(),
        ca::rfc3339(authority.issuer_not_after()),
        format_duration(config.cert_lifetime)
    );
    metrics.issuer_expires(authority.issuer_not_after());
    let current = Current::new(Active::new(Arc::new(authority), &config.server_names, now)?);

    let tokens = Arc::new(match &config.tokens {
        TokenSource::File(path) => {
            let local = LocalTokens::load(path).context("--token-file")?;
            tracing::info!(
                "local mode: {} tokens from {}",
                local.table().len(),
                path.display()
            );
            Tokens::Local(local)
        }
        TokenSource::Review { audience } => {
            tracing::info!("tokens checked with TokenReviews for audience {audience:?}");
            Tokens::Review(TokenReviewer::new(
                kube_client(&mut client).await?,
                audience,
            ))
        }
    });

    let reload_task = tokio::spawn(reload::run(
        source,
        Settings {
            trust_domain: config.trust_domain.clone(),
            cert_lifetime: config.cert_lifetime,
            server_names: config.server_names.clone(),
        },
        current.clone(),
        tokens.clone(),
        metrics.clone(),
        config.reload_interval,
        stop_rx.clone(),
    ));

    let tls = Arc::new(server::tls_config(current.clone())?);
    let listener = tokio::net::TcpListener::bind(config.certify_addr)
        .await
        .with_context(|| format!("cannot listen on {} (--certify-addr)", config.certify_addr))?;
    tracing::info!(
        "certify on https://{}{} for trust domain {} (serving names: {})",
        listener.local_addr()?,
        trellis_api::certify::CERTIFY_PATH,
        config.trust_domain,
        config.server_names.join(", ")
    );
    let certifier = Arc::new(Certifier::new(current, tokens, metrics, config.limits));
    admin.set_ready(true);
    let admin_for_shutdown = admin.clone();
    server::serve(listener, tls, certifier, async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, open requests may finish");
        admin_for_shutdown.set_ready(false);
    })
    .await;
    stop_tx.send_replace(true);
    let _ = admin_task.await;
    let _ = reload_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// The Kubernetes client, created the first time one is needed.
async fn kube_client(slot: &mut Option<kube::Client>) -> anyhow::Result<kube::Client> {
    if let Some(client) = slot {
        return Ok(client.clone());
    }
    let client = kube::Client::try_default().await.context(
        "no Kubernetes configuration found (in local mode, give --token-file and the issuer files)",
    )?;
    *slot = Some(client.clone());
    Ok(client)
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
            tracing::warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops identity");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
