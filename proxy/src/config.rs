//! The settings of `trellis-proxy run`: one typed struct, parsed once from flags and
//! `TRELLIS_*` environment variables, validated before anything starts.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use trellis_api::Identity;

pub use trellis_api::policy::DEFAULT_OPAQUE_PORTS;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Where the app's redirected (or explicit) outbound connections arrive.
    #[arg(long, env = "TRELLIS_OUTBOUND_ADDR", default_value = "127.0.0.1:4140")]
    pub outbound_addr: SocketAddr,
    /// Where connections to the pod arrive, from other proxies or redirected by iptables.
    #[arg(long, env = "TRELLIS_INBOUND_ADDR", default_value = "0.0.0.0:4143")]
    pub inbound_addr: SocketAddr,
    /// Admin server: /metrics, /ready, /live, /config.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "0.0.0.0:4191")]
    pub admin_addr: SocketAddr,
    /// The port other proxies' inbound listeners use; meshed endpoints are reached there.
    #[arg(long, env = "TRELLIS_PEER_INBOUND_PORT", default_value_t = 4143)]
    pub peer_inbound_port: u16,
    /// The controller's discovery address, `host:port`.
    #[arg(long, env = "TRELLIS_CONTROLLER_ADDR")]
    pub controller_addr: String,
    /// The pod's namespace: decides which consumer routes apply and what short names mean.
    #[arg(long, env = "TRELLIS_POD_NAMESPACE")]
    pub namespace: String,
    /// The pod's name, for logs.
    #[arg(long, env = "TRELLIS_POD_NAME", default_value = "")]
    pub pod_name: String,
    /// The pod's IP (downward API): inbound traffic is delivered to the app there, the address
    /// other pods reach it at, so listeners bound to loopback only stay private to the pod.
    #[arg(long, env = "TRELLIS_POD_IP")]
    pub pod_ip: Option<IpAddr>,
    /// Where inbound traffic is delivered to the app instead of the pod IP (local runs without
    /// a pod IP; a loopback address here exposes the app's loopback listeners to the mesh).
    /// Without either, 127.0.0.1.
    #[arg(long, env = "TRELLIS_APP_HOST")]
    pub app_host: Option<IpAddr>,
    /// The app ports inbound traffic may reach (the pod's declared ports; comma list, ranges
    /// allowed). Unset: every port but the proxy's own.
    #[arg(long, env = "TRELLIS_INBOUND_PORTS")]
    pub inbound_ports: Option<String>,
    /// Ports treated as opaque TCP without detection (comma list, ranges allowed).
    #[arg(long, env = "TRELLIS_OPAQUE_PORTS", default_value = DEFAULT_OPAQUE_PORTS)]
    pub opaque_ports: String,
    /// How long protocol detection waits for the client's first bytes.
    #[arg(long, env = "TRELLIS_DETECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub detect_timeout: Duration,
    /// How long a request waits for a destination's first policy before a 503.
    #[arg(long, env = "TRELLIS_DISCOVERY_WAIT", default_value = "3s", value_parser = parse_duration)]
    pub discovery_wait: Duration,
    /// Destinations unused for this long are dropped from the discovery cache.
    #[arg(long, env = "TRELLIS_DISCOVERY_IDLE", default_value = "60s", value_parser = parse_duration)]
    pub discovery_idle: Duration,
    /// The largest request head accepted; larger ones get 431.
    #[arg(long, env = "TRELLIS_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// The largest request body copied to a mirror; larger requests are not mirrored.
    #[arg(long, env = "TRELLIS_MIRROR_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub mirror_max_body_bytes: usize,
    /// Upstream connections idle this long are closed.
    #[arg(long, env = "TRELLIS_POOL_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    pub pool_idle_timeout: Duration,
    /// After SIGTERM (or `trellis-proxy drain`), how long the sidecar reports not-ready but
    /// keeps accepting and serving, while the pod leaves its Services' endpoints.
    #[arg(long, env = "TRELLIS_DRAIN_WINDOW", default_value = "5s", value_parser = parse_duration)]
    pub drain_window: Duration,
    /// After the drain window, in-flight requests get this long to finish.
    #[arg(long, env = "TRELLIS_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Open connections allowed per direction (inbound, outbound); one more is closed at once
    /// and counted.
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// How long a TLS handshake and the mesh preamble may take, on either side of the hop.
    #[arg(long, env = "TRELLIS_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// TCP keep-alive: a silent peer is probed after this long, and dropped after three
    /// unanswered probes.
    #[arg(long, env = "TRELLIS_TCP_KEEPALIVE", default_value = "30s", value_parser = parse_duration)]
    pub tcp_keepalive: Duration,
    /// An HTTP connection with no request in flight for this long is closed gracefully.
    #[arg(long, env = "TRELLIS_HTTP_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub http_idle_timeout: Duration,
    /// An opaque TCP connection that moves no byte either way for this long is closed.
    #[arg(long, env = "TRELLIS_TCP_IDLE_TIMEOUT", default_value = "60m", value_parser = parse_duration)]
    pub tcp_idle_timeout: Duration,
    /// Mirror copies in flight at once; a copy beyond this is dropped and counted.
    #[arg(long, env = "TRELLIS_MIRROR_MAX_IN_FLIGHT", default_value_t = 64)]
    pub mirror_max_in_flight: usize,
    /// How long a mirror copy may take, answer included, before it is abandoned and counted.
    #[arg(long, env = "TRELLIS_MIRROR_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub mirror_timeout: Duration,
    /// Worker threads (1 suits a sidecar).
    #[arg(long, env = "TRELLIS_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// The mesh CA's certify endpoint, `host:port`. Unset: no identity, and the hop between
    /// sidecars stays plaintext (local development only).
    #[arg(long, env = "TRELLIS_IDENTITY_ADDR")]
    pub identity_addr: Option<String>,
    /// The name on identity's serving certificate; by default the host of `--identity-addr`.
    #[arg(long, env = "TRELLIS_IDENTITY_SERVER_NAME")]
    pub identity_server_name: Option<String>,
    /// The trust anchors: PEM text, or the path of a PEM file.
    #[arg(long, env = "TRELLIS_TRUST_ANCHORS")]
    pub trust_anchors: Option<String>,
    /// The projected service-account token sent to identity.
    #[arg(
        long,
        env = "TRELLIS_TOKEN_PATH",
        default_value = "/var/run/secrets/trellis.dev/identity/token"
    )]
    pub token_path: std::path::PathBuf,
    /// The pod's service account: with the namespace and trust domain, its identity.
    #[arg(long, env = "TRELLIS_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// Trust domain of mesh identities.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = trellis_api::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// With identity on, the SPIFFE ID the controller must present on the discovery
    /// connection; by default `spiffe://<trust-domain>/ns/trellis-system/sa/trellis-controller`.
    #[arg(long, env = "TRELLIS_CONTROLLER_IDENTITY")]
    pub controller_identity: Option<String>,
    /// With identity on, inbound ports that still accept plaintext (clients outside the mesh,
    /// kubelet probes); every other port requires mutual TLS. Comma list, ranges allowed.
    #[arg(long, env = "TRELLIS_INBOUND_PLAINTEXT_PORTS", default_value = "")]
    pub inbound_plaintext_ports: String,
    /// The app's original kubelet probes (JSON, written by the injector), checked on the
    /// kubelet's behalf at `/app-health/<container>/<probe>` on the admin port.
    #[arg(long, env = trellis_api::probes::APP_PROBES_ENV)]
    pub app_probes: Option<String>,
    /// How long one app-health check may take (the kubelet's `timeoutSeconds` bounds the
    /// request to the admin port from outside).
    #[arg(long, env = "TRELLIS_APP_PROBE_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub app_probe_timeout: Duration,
    /// Serve `/config` on the admin port to every client, not only to loopback ones
    /// (`kubectl port-forward`, `kubectl exec`): it names every destination, endpoint,
    /// identity and header value the sidecar knows.
    #[arg(long, env = "TRELLIS_ADMIN_CONFIG_PUBLIC")]
    pub admin_config_public: bool,
    /// Log filter, e.g. `info` or `trellis_proxy=debug,info`.
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log: String,
    /// The most of a request body kept so the request can be retried or failed over; a longer
    /// body is still sent whole, once.
    #[arg(long, env = "TRELLIS_RETRY_MAX_BODY_BYTES", default_value_t = crate::replay::DEFAULT_MAX_BYTES)]
    pub retry_max_body_bytes: usize,
    /// Retries to a backend may add at most this share of its original requests (over
    /// `--retry-budget-window`), plus `--retry-budget-min-per-second`.
    #[arg(long, env = "TRELLIS_RETRY_BUDGET_RATIO", default_value_t = 0.2)]
    pub retry_budget_ratio: f64,
    /// Retries per second to a backend allowed whatever its request rate.
    #[arg(
        long,
        env = "TRELLIS_RETRY_BUDGET_MIN_PER_SECOND",
        default_value_t = 10.0
    )]
    pub retry_budget_min_per_second: f64,
    /// The sliding window over which the retry budget counts requests and retries.
    #[arg(long, env = "TRELLIS_RETRY_BUDGET_WINDOW", default_value = "10s", value_parser = parse_duration)]
    pub retry_budget_window: Duration,
    /// Consecutive failures (no connection, a broken exchange, a timeout or a 5xx answer) that
    /// eject an endpoint from load balancing; 0 never ejects.
    #[arg(long, env = "TRELLIS_FAILURE_ACCRUAL_CONSECUTIVE", default_value_t = 5)]
    pub failure_accrual_consecutive: u32,
    /// How long an endpoint's first ejection lasts; each ejection in a row doubles it.
    #[arg(long, env = "TRELLIS_FAILURE_ACCRUAL_PROBATION", default_value = "1s", value_parser = parse_duration)]
    pub failure_accrual_probation: Duration,
    /// The longest ejection.
    #[arg(long, env = "TRELLIS_FAILURE_ACCRUAL_MAX_PROBATION", default_value = "60s", value_parser = parse_duration)]
    pub failure_accrual_max_probation: Duration,
    /// An access log line per request: `off` or `json`.
    #[arg(long, env = "TRELLIS_ACCESS_LOG", value_enum, default_value_t = crate::access_log::Format::Off)]
    pub access_log: crate::access_log::Format,
    /// Where the access log goes (appended); standard output when unset.
    #[arg(long, env = "TRELLIS_ACCESS_LOG_PATH")]
    pub access_log_path: Option<std::path::PathBuf>,
    /// Where the sidecar's spans are sent, OTLP/HTTP protobuf: `http://host:4318` (spans are
    /// posted to `/v1/traces` unless the URL names a path). Unset: no tracing, and trace
    /// headers pass through untouched.
    #[arg(long, env = "TRELLIS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// How long one export of spans may take.
    #[arg(long, env = "TRELLIS_OTLP_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub otlp_timeout: Duration,
    /// The share of requests without a `traceparent` that start a trace (0 to 1); requests
    /// with one follow its sampled flag.
    #[arg(long, env = "TRELLIS_TRACE_SAMPLING", default_value_t = 0.0)]
    pub trace_sampling: f64,
}

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--opaque-ports: {0}")]
    Ports(String),
    #[error("--worker-threads must be at least 1")]
    Workers,
    #[error("--max-connections and --mirror-max-in-flight must be at least 1")]
    Limits,
    #[error("--controller-addr {0:?} must be host:port")]
    Controller(String),
    #[error("--namespace must not be empty")]
    Namespace,
    #[error("--max-header-bytes must be at least 1024")]
    HeaderBytes,
    #[error("--inbound-plaintext-ports: {0}")]
    PlaintextPorts(String),
    #[error("--inbound-ports: {0}")]
    InboundPorts(String),
    #[error("--app-probes (TRELLIS_APP_PROBES): {0}")]
    AppProbes(crate::probes::ProbesError),
    #[error("--identity-addr needs --trust-anchors (PEM text or a file)")]
    NoAnchors,
    #[error("--trust-anchors: cannot read {path}: {reason}")]
    AnchorsFile { path: String, reason: String },
    #[error("--controller-identity: {0}")]
    ControllerIdentity(String),
    #[error(
        "--retry-budget-ratio and --retry-budget-min-per-second must be 0 or more, and \
         --retry-budget-window at least 10ms"
    )]
    RetryBudget,
    #[error(
        "--failure-accrual-probation must be at least 1ms and at most --failure-accrual-max-probation"
    )]
    Probation,
    #[error("--otlp-endpoint: {0}")]
    OtlpEndpoint(String),
    #[error("--trace-sampling must be between 0 and 1")]
    TraceSampling,
    #[error("--access-log-path needs --access-log json")]
    AccessLogPath,
}

/// Where the controller runs unless `--controller-identity` says otherwise.
pub const DEFAULT_CONTROLLER_NAMESPACE: &str = "trellis-system";
pub const DEFAULT_CONTROLLER_SERVICE_ACCOUNT: &str = "trellis-controller";

/// The validated settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub args: Args,
    pub opaque_ports: PortSet,
    pub plaintext_ports: PortSet,
    /// The app ports inbound may deliver to; `None` allows every port but the proxy's own.
    pub inbound_ports: Option<PortSet>,
    /// The app's probes (`--app-probes`), by `<container>/<probe>`.
    pub app_probes: trellis_api::probes::AppProbes,
    /// Set when identity is on: the trust anchors' PEM text.
    pub anchors_pem: Option<String>,
    /// Set when identity is on: who the discovery connection must reach.
    pub controller_identity: Option<Identity>,
    /// Set when tracing is on: where spans are posted.
    pub otlp_endpoint: Option<http::Uri>,
}

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let opaque_ports = PortSet::parse(&self.opaque_ports).map_err(ConfigError::Ports)?;
        if self.worker_threads == 0 {
            return Err(ConfigError::Workers);
        }
        if self.max_connections == 0 || self.mirror_max_in_flight == 0 {
            return Err(ConfigError::Limits);
        }
        match self.controller_addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => return Err(ConfigError::Controller(self.controller_addr.clone())),
        }
        if self.namespace.is_empty() {
            return Err(ConfigError::Namespace);
        }
        if self.max_header_bytes < 1024 {
            return Err(ConfigError::HeaderBytes);
        }
        let plaintext_ports =
            PortSet::parse(&self.inbound_plaintext_ports).map_err(ConfigError::PlaintextPorts)?;
        let inbound_ports = self
            .inbound_ports
            .as_deref()
            .filter(|p| !p.trim().is_empty())
            .map(PortSet::parse)
            .transpose()
            .map_err(ConfigError::InboundPorts)?;
        let app_probes = match self.app_probes.as_deref().map(str::trim) {
            None | Some("") => Default::default(),
            Some(json) => crate::probes::parse(json).map_err(ConfigError::AppProbes)?,
        };
        let anchors_pem = match (&self.identity_addr, &self.trust_anchors) {
            (None, _) => None,
            (Some(_), None) => return Err(ConfigError::NoAnchors),
            (Some(_), Some(a)) if a.trim_start().starts_with("-----BEGIN") => Some(a.clone()),
            (Some(_), Some(path)) => {
                Some(
                    std::fs::read_to_string(path).map_err(|e| ConfigError::AnchorsFile {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?,
                )
            }
        };
        let controller_identity = match &anchors_pem {
            None => None,
            Some(_) => Some(self.controller_identity()?),
        };
        let budget_ok = |v: f64| v.is_finite() && v >= 0.0;
        if !budget_ok(self.retry_budget_ratio)
            || !budget_ok(self.retry_budget_min_per_second)
            || self.retry_budget_window < Duration::from_millis(10)
        {
            return Err(ConfigError::RetryBudget);
        }
        if self.failure_accrual_probation < Duration::from_millis(1)
            || self.failure_accrual_probation > self.failure_accrual_max_probation
        {
            return Err(ConfigError::Probation);
        }
        let otlp_endpoint = self
            .otlp_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(crate::trace::endpoint_uri)
            .transpose()
            .map_err(ConfigError::OtlpEndpoint)?;
        if !(0.0..=1.0).contains(&self.trace_sampling) {
            return Err(ConfigError::TraceSampling);
        }
        if self.access_log_path.is_some() && self.access_log == crate::access_log::Format::Off {
            return Err(ConfigError::AccessLogPath);
        }
        Ok(Config {
            args: self,
            opaque_ports,
            plaintext_ports,
            inbound_ports,
            app_probes,
            anchors_pem,
            controller_identity,
            otlp_endpoint,
        })
    }

    /// The retry budget's settings.
    pub fn retry_budget(&self) -> crate::retry::BudgetSettings {
        crate::retry::BudgetSettings {
            ratio: self.retry_budget_ratio,
            min_per_second: self.retry_budget_min_per_second,
            window: self.retry_budget_window,
        }
    }

    /// The failure accrual settings.
    pub fn accrual(&self) -> crate::balance::Accrual {
        crate::balance::Accrual {
            failures: self.failure_accrual_consecutive,
            probation: self.failure_accrual_probation,
            max_probation: self.failure_accrual_max_probation,
        }
    }

    fn controller_identity(&self) -> Result<Identity, ConfigError> {
        let Some(id) = &self.controller_identity else {
            return Ok(Identity::new(
                self.trust_domain.clone(),
                DEFAULT_CONTROLLER_NAMESPACE,
                DEFAULT_CONTROLLER_SERVICE_ACCOUNT,
            ));
        };
        let id: Identity = id
            .parse()
            .map_err(|e| ConfigError::ControllerIdentity(format!("{e}")))?;
        // Identity certifies one trust domain: a controller outside it could never be verified.
        if id.trust_domain != self.trust_domain {
            return Err(ConfigError::ControllerIdentity(format!(
                "{id} is not in the trust domain {} (--trust-domain)",
                self.trust_domain
            )));
        }
        Ok(id)
    }
}

/// A set of TCP ports from a comma list with ranges: `25,8000-8100`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(Vec<(u16, u16)>);

impl PortSet {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let port = |p: &str| {
                p.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{part:?} is not a port or a range of ports"))
            };
            let (lo, hi) = (port(lo)?, port(hi)?);
            if lo > hi {
                return Err(format!("{part:?} is an empty range"));
            }
            ranges.push((lo, hi));
        }
        Ok(PortSet(ranges))
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= port && port <= hi)
    }
}

/// Durations as `250ms`, `5s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?} is not a duration like 500ms, 5s or 2m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_sets() {
        let set = PortSet::parse(" 25, 8000-8100 ,9090").unwrap();
        for (port, inside) in [
            (25, true),
            (8000, true),
            (8050, true),
            (8100, true),
            (8101, false),
            (9090, true),
            (26, false),
        ] {
            assert_eq!(set.contains(port), inside, "{port}");
        }
        assert_eq!(PortSet::parse(""), Ok(PortSet::default()));
        for bad in ["0", "70000", "a", "10-5", "5-", "1,,x"] {
            assert!(PortSet::parse(bad).is_err(), "{bad}");
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn validate(extra: &[&str]) -> Result<Config, ConfigError> {
        use clap::Parser as _;
        let mut argv = vec!["trellis-proxy", "--controller-addr", "c:8090"];
        argv.extend(["--namespace", "shop"]);
        argv.extend(extra);
        Cli::try_parse_from(argv).unwrap().args.validate()
    }

    #[test]
    fn controller_identity() {
        let identity = ["--identity-addr", "id:8080", "--trust-anchors=-----BEGIN x"];
        assert_eq!(validate(&[]).unwrap().controller_identity, None);
        assert_eq!(
            validate(&identity).unwrap().controller_identity,
            Some(
                "spiffe://cluster.local/ns/trellis-system/sa/trellis-controller"
                    .parse()
                    .unwrap()
            )
        );
        let with = |id: &'static str, td: &'static str| {
            let mut args = identity.to_vec();
            args.extend(["--controller-identity", id, "--trust-domain", td]);
            validate(&args).map(|c| c.controller_identity)
        };
        assert_eq!(
            with("spiffe://mesh.example/ns/cp/sa/ctl", "mesh.example"),
            Ok(Some(Identity::new("mesh.example", "cp", "ctl")))
        );
        assert!(matches!(
            with("spiffe://other.example/ns/cp/sa/ctl", "mesh.example"),
            Err(ConfigError::ControllerIdentity(m)) if m.contains("not in the trust domain")
        ));
        assert!(matches!(
            with("trellis-controller", "cluster.local"),
            Err(ConfigError::ControllerIdentity(m)) if m.contains("not a mesh identity")
        ));
    }

    #[test]
    fn app_probes() {
        assert!(validate(&[]).unwrap().app_probes.is_empty());
        let json = r#"{"app/readiness":{"kind":"tcp","port":8080}}"#;
        assert_eq!(
            validate(&["--app-probes", json]).unwrap().app_probes.len(),
            1
        );
        let err = validate(&["--app-probes", "{bad"]).unwrap_err();
        assert!(matches!(err, ConfigError::AppProbes(_)), "{err}");
        assert!(
            err.to_string()
                .starts_with("--app-probes (TRELLIS_APP_PROBES): ")
        );
    }

    #[test]
    fn resilience_defaults_and_refusals() {
        let c = validate(&[]).unwrap();
        assert_eq!(
            c.args.retry_budget(),
            crate::retry::BudgetSettings::default()
        );
        assert_eq!(c.args.accrual(), crate::balance::Accrual::default());
        assert_eq!(c.args.retry_max_body_bytes, 64 * 1024);
        for bad in [
            &["--retry-budget-ratio=-1"][..],
            &["--retry-budget-ratio", "NaN"],
            &["--retry-budget-min-per-second=-0.5"],
            &["--retry-budget-window", "0s"],
        ] {
            assert_eq!(
                validate(bad).unwrap_err(),
                ConfigError::RetryBudget,
                "{bad:?}"
            );
        }
        for bad in [
            &["--failure-accrual-probation", "0s"][..],
            &["--failure-accrual-probation", "2m"],
        ] {
            assert_eq!(
                validate(bad).unwrap_err(),
                ConfigError::Probation,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn observability() {
        let c = validate(&[]).unwrap();
        assert_eq!(c.args.access_log, crate::access_log::Format::Off);
        assert_eq!(c.otlp_endpoint, None);
        let c = validate(&[
            "--access-log",
            "json",
            "--otlp-endpoint",
            "http://otel:4318",
        ])
        .unwrap();
        assert_eq!(c.args.access_log, crate::access_log::Format::Json);
        assert_eq!(c.otlp_endpoint.unwrap(), "http://otel:4318/v1/traces");
        assert_eq!(
            validate(&["--otlp-endpoint", " "]).unwrap().otlp_endpoint,
            None
        );
        assert!(matches!(
            validate(&["--otlp-endpoint", "otel:4317"]),
            Err(ConfigError::OtlpEndpoint(_))
        ));
        for bad in [
            "--trace-sampling=1.5",
            "--trace-sampling=-0.1",
            "--trace-sampling=NaN",
        ] {
            assert_eq!(
                validate(&[bad]).unwrap_err(),
                ConfigError::TraceSampling,
                "{bad}"
            );
        }
        assert_eq!(
            validate(&["--access-log-path", "/tmp/x"]).unwrap_err(),
            ConfigError::AccessLogPath
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "5h", "1.5s", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
