//! `trellis-proxy run`: binds the listeners, starts discovery and the admin server, and drains
//! on SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::admin::{self, AdminState};
use crate::balance::EndpointRegistry;
use crate::config::{Args, Config};
use crate::discovery::{Discovery, DiscoveryConfig};
use crate::hop::{Connector, Hop};
use crate::http::Upstream;
use crate::metrics::Metrics;
use crate::probes::AppHealth;
use crate::proxy::{Drain, Proxy, Shutdown};
use crate::{inbound, outbound};
use trellis_api::Identity;
use trellis_tls::identity::{self, IdentityConfig};
use trellis_tls::{ALPN_H2, MeshTls};

pub fn main(args: Args) -> ExitCode {
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        // Logs go to stderr, coloured only for a terminal: `kubectl logs` shows plain text.
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tracing::debug!(?config, "settings");
    raise_fd_limit();

    let runtime = if config.args.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.args.worker_threads)
            .enable_all()
            .build()
    };
    let result = runtime
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard one: every connection costs a descriptor on
/// each side of the proxy, and a default soft limit of 1024 would cap the sidecar far below
/// `--max-connections`.
pub fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the limit on open files");
        }
    }
}

fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<Vec<TcpListener>> {
    crate::listen::bind(addr).with_context(|| format!("cannot listen on {addr} for {what}"))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let outbound_listeners = bind(config.args.outbound_addr, "outbound traffic")?;
    let inbound_listeners = bind(config.args.inbound_addr, "inbound traffic")?;
    let admin_listeners = bind(config.args.admin_addr, "the admin server")?;

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let endpoints = Arc::new(EndpointRegistry::default());
    let mut discovery_config = DiscoveryConfig::new(
        config.args.controller_addr.clone(),
        config.args.namespace.clone(),
        config.args.discovery_idle,
    );
    let tls = match &config.anchors_pem {
        Some(anchors) => Some(
            MeshTls::new(anchors, &config.args.trust_domain).context("cannot set up mutual TLS")?,
        ),
        None => {
            tracing::warn!(
                "no --identity-addr: the hop between sidecars and discovery are plaintext"
            );
            None
        }
    };
    if let (Some(tls), Some(controller)) = (&tls, &config.controller_identity) {
        discovery_config.tls = Some(
            tls.peer_client(controller, &[ALPN_H2])
                .context("--controller-identity")?,
        );
    }
    let discovery = Discovery::new(discovery_config, endpoints.clone(), &mut registry);
    if let (Some(tls), Some(_)) = (&tls, &config.controller_identity) {
        // The controller hands on the trust anchors it holds, so that a root rotation needs no
        // restart; those from the configuration are the bootstrap set.
        discovery.follow_trust_anchors(tls.clone());
    }
    // Ready once listening, and, with identity on, once the first certificate is in.
    let ready = Arc::new(AtomicBool::new(false));
    let identity_task = match (&tls, &config.args.identity_addr) {
        (Some(tls), Some(addr)) => {
            let server_name = config.args.identity_server_name.clone().unwrap_or_else(|| {
                addr.rsplit_once(':')
                    .map_or(addr.as_str(), |(h, _)| h)
                    .to_string()
            });
            let cfg = IdentityConfig {
                addr: addr.clone(),
                server_name,
                token_path: config.args.token_path.clone(),
                identity: Identity::new(
                    config.args.trust_domain.clone(),
                    config.args.namespace.clone(),
                    config.args.service_account.clone(),
                ),
            };
            let task = identity::start(cfg, tls.clone(), ready.clone(), &mut registry);
            Some(tokio::spawn(task))
        }
        _ => None,
    };
    let app_health = Arc::new(AppHealth::new(
        config.app_probes.clone(),
        crate::app::App::new(&config.args),
        config.args.app_probe_timeout,
        &mut registry,
    ));
    let credentials = tls.as_ref().map(|t| t.credentials.clone());
    let hop = Hop {
        peer_inbound_port: config.args.peer_inbound_port,
        app: crate::app::App::new(&config.args),
        handshake_timeout: config.args.handshake_timeout,
        tcp_keepalive: config.args.tcp_keepalive,
        tls,
    };
    let upstream = Upstream::new(
        Connector {
            hop: Arc::new(hop.clone()),
            endpoints: endpoints.clone(),
        },
        config.args.pool_idle_timeout,
    );
    let (drain, mut drained) = Drain::new();
    let (stop, shutdown) = Shutdown::new();
    let grace = config.args.shutdown_grace;
    let mirror_permits = Arc::new(tokio::sync::Semaphore::new(
        config.args.mirror_max_in_flight,
    ));
    let (observe, observers) = observe(&config, &mut registry)?;
    let proxy = Arc::new(Proxy {
        config,
        discovery: discovery.clone(),
        upstream,
        hop,
        endpoints,
        metrics,
        drain,
        shutdown: shutdown.clone(),
        mirror_permits,
        empty_label: Arc::from(""),
        observe,
    });

    let draining = Arc::new(crate::proxy::Draining::default());
    let admin_state = AdminState {
        registry: Arc::new(registry),
        ready: ready.clone(),
        discovery,
        credentials,
        app_health,
        config_public: proxy.config.args.admin_config_public,
        draining: draining.clone(),
    };
    let mut admin = tokio::task::JoinSet::new();
    for listener in admin_listeners {
        let (state, admin_shutdown) = (admin_state.clone(), shutdown.clone());
        admin.spawn(async move {
            admin::serve(
                listener,
                state,
                async move { admin_shutdown.cancelled().await },
            )
            .await
        });
    }
    let outbound_task = tokio::spawn(outbound::serve(proxy.clone(), outbound_listeners));
    let inbound_task = tokio::spawn(inbound::serve(proxy.clone(), inbound_listeners));
    for (what, addr) in [
        ("outbound", proxy.config.args.outbound_addr),
        ("inbound", proxy.config.args.inbound_addr),
        ("admin", proxy.config.args.admin_addr),
    ] {
        tracing::info!("{what} listening on {addr}");
    }
    tracing::info!(
        pod = %proxy.config.args.pod_name,
        namespace = %proxy.config.args.namespace,
        controller = %proxy.config.args.controller_addr,
        "ready"
    );
    if identity_task.is_none() {
        ready.store(true, Ordering::Release);
    }

    // Shutdown, first phase: not ready, so the pod leaves its Services' endpoints, while every
    // listener keeps serving for the drain window (clients learn of the change meanwhile).
    let window = proxy.config.args.drain_window;
    let by_signal = tokio::select! {
        () = wait_for_signal() => true,
        () = draining.started() => false,
    };
    draining.start();
    let window_ends = tokio::time::Instant::now() + window;
    tracing::info!(window = ?window, "draining: not ready, still serving");
    if !by_signal {
        // `trellis-proxy drain` (a preStop hook) started it; the kubelet's SIGTERM follows.
        wait_for_signal().await;
    }
    tokio::select! {
        () = tokio::time::sleep_until(window_ends) => {}
        // A second signal: no more waiting.
        () = wait_for_signal() => {}
    }
    // Second phase: no new connections; HTTP/2 clients get GOAWAY, idle HTTP/1 connections
    // close, requests in flight finish within the grace period; opaque TCP ends with it.
    if let Some(task) = identity_task {
        task.abort();
    }
    tracing::info!(grace = ?grace, "shutting down: no new connections, draining in-flight requests");
    ready.store(false, Ordering::Release);
    let _ = stop.send(true);
    let _ = outbound_task.await;
    let _ = inbound_task.await;
    // Every connection holds a clone of the drain token; the proxy's own goes with it.
    drop(proxy);
    if tokio::time::timeout(grace, drained.recv()).await.is_err() {
        tracing::warn!("in-flight requests did not finish within the grace period");
    }
    // The access log's and the exporter's last lines and spans, within a bound.
    for task in observers {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }
    while admin.join_next().await.is_some() {}
    Ok(())
}

/// The access log writer and the span exporter, each when configured, and their tasks.
fn observe(
    config: &Config,
    registry: &mut Registry,
) -> anyhow::Result<(crate::observe::Observe, Vec<tokio::task::JoinHandle<()>>)> {
    use crate::access_log::{self, Format};
    let mut observe = crate::observe::Observe::default();
    let mut tasks = Vec::new();
    if config.args.access_log == Format::Json {
        let (log, task) = match &config.args.access_log_path {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| {
                        format!("--access-log-path: cannot open {}", path.display())
                    })?;
                let file = tokio::fs::File::from_std(file);
                access_log::start(file, access_log::QUEUE, registry)
            }
            None => access_log::start(tokio::io::stdout(), access_log::QUEUE, registry),
        };
        observe.access_log = Some(log);
        tasks.push(task);
    }
    if let Some(endpoint) = &config.otlp_endpoint {
        let export = crate::trace::ExportConfig {
            endpoint: endpoint.clone(),
            timeout: config.args.otlp_timeout,
            sampling: config.args.trace_sampling,
            pod_name: config.args.pod_name.clone(),
            namespace: config.args.namespace.clone(),
            queue: crate::trace::QUEUE,
        };
        let (tracer, task) = crate::trace::start(export, registry);
        observe.tracer = Some(tracer);
        tasks.push(task);
    }
    Ok((observe, tasks))
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
