//! The injector's settings: flags and `TRELLIS_*` environment variables, parsed once by clap
//! and validated here before anything starts, so a bad setting stops the injector at start
//! instead of surfacing as a broken pod later.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::annotations::{self, AccessLog, Quantity};

/// The proxy image of this release; the chart normally sets `--proxy-image` explicitly.
pub const DEFAULT_PROXY_IMAGE: &str = concat!(
    "ghcr.io/trellis-mesh/trellis-proxy:v",
    env!("CARGO_PKG_VERSION")
);
/// The value of the `trellis.dev/proxy-version` marker this injector writes.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How the proxy runs beside the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29 and later): started
    /// and ready before the app, stopped after it.
    Native,
    /// A regular container, first in the list, for clusters without native sidecars.
    Classic,
}

/// What goes into every injected pod; shared by `serve` and `inject`.
#[derive(Clone, Debug, clap::Args)]
pub struct InjectionArgs {
    /// Image of the proxy; it also runs the `trellis-init` init container.
    #[arg(long, env = "TRELLIS_PROXY_IMAGE", default_value = DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,

    /// How the proxy is added: `native` sidecar (init container that keeps running) or
    /// `classic` container.
    #[arg(long, env = "TRELLIS_SIDECAR_MODE", value_enum, default_value_t = SidecarMode::Native)]
    pub sidecar_mode: SidecarMode,

    /// The control plane's namespace: its pods are never injected, the serving certificate's
    /// Secret lives there, and the controller and identity addresses default to its Services.
    #[arg(long, env = "TRELLIS_NAMESPACE", default_value = "trellis-system")]
    pub namespace: String,

    /// Discovery address given to proxies [default: trellis-controller.<namespace>.svc:8090].
    #[arg(long, env = "TRELLIS_CONTROLLER_ADDR", value_name = "HOST:PORT")]
    pub controller_addr: Option<String>,

    /// Identity (certificate authority) address given to proxies
    /// [default: trellis-identity.<namespace>.svc:8080].
    #[arg(long, env = "TRELLIS_IDENTITY_ADDR", value_name = "HOST:PORT")]
    pub identity_addr: Option<String>,

    /// Trust domain of workload identities.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = trellis_api::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// PEM file of the mesh's root certificates; its content becomes the proxies'
    /// `TRELLIS_TRUST_ANCHORS`. Read again every 10 s (by `serve`), so that pods created after
    /// a root rotation start with the new bundle.
    #[arg(long, env = "TRELLIS_TRUST_ANCHORS_FILE", value_name = "FILE")]
    pub trust_anchors_file: PathBuf,

    /// Proxy log filter unless a pod sets `trellis.dev/proxy-log-level`.
    #[arg(long, env = "TRELLIS_PROXY_LOG_LEVEL", default_value = "info")]
    pub proxy_log_level: String,

    /// Proxy access log unless a pod sets `trellis.dev/access-log`: `off`, or `json` (a line
    /// per request on the proxy's standard output).
    #[arg(
        long,
        env = "TRELLIS_PROXY_ACCESS_LOG",
        value_name = "FORMAT",
        value_parser = annotations::parse_access_log,
        default_value = "off"
    )]
    pub proxy_access_log: AccessLog,

    /// Where proxies send their spans (OTLP/HTTP), e.g.
    /// `http://otel-collector.observability:4318`. Unset: proxies do not trace.
    #[arg(long, env = "TRELLIS_PROXY_OTLP_ENDPOINT", value_name = "URL")]
    pub proxy_otlp_endpoint: Option<String>,

    /// With --proxy-otlp-endpoint: the share of requests without a `traceparent` that start a
    /// trace (0 to 1), unless a pod sets `trellis.dev/trace-sampling`.
    #[arg(
        long,
        env = "TRELLIS_PROXY_TRACE_SAMPLING",
        value_name = "SHARE",
        value_parser = annotations::parse_trace_sampling,
        default_value = "0"
    )]
    pub proxy_trace_sampling: f64,

    /// Proxy CPU request unless a pod sets `trellis.dev/proxy-cpu-request`.
    #[arg(long, env = "TRELLIS_PROXY_CPU_REQUEST", default_value = "100m")]
    pub proxy_cpu_request: String,

    /// Proxy memory request unless a pod sets `trellis.dev/proxy-memory-request`.
    #[arg(long, env = "TRELLIS_PROXY_MEMORY_REQUEST", default_value = "64Mi")]
    pub proxy_memory_request: String,

    /// Proxy memory limit unless a pod sets `trellis.dev/proxy-memory-limit`.
    #[arg(long, env = "TRELLIS_PROXY_MEMORY_LIMIT", default_value = "256Mi")]
    pub proxy_memory_limit: String,
}

/// The validated injection settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub proxy_image: String,
    pub sidecar_mode: SidecarMode,
    pub control_plane_namespace: String,
    pub controller_addr: String,
    pub identity_addr: String,
    pub trust_domain: String,
    /// PEM text, passed to proxies as is.
    pub trust_anchors_pem: String,
    pub proxy_log_level: String,
    /// The access log of pods that do not choose.
    pub access_log: AccessLog,
    /// `TRELLIS_OTLP_ENDPOINT` of every proxy; `None`: no tracing.
    pub otlp_endpoint: Option<String>,
    /// The sampling share of pods that do not choose; only given with an endpoint.
    pub trace_sampling: f64,
    pub cpu_request: Quantity,
    pub memory_request: Quantity,
    pub memory_limit: Quantity,
    /// Written to the `trellis.dev/proxy-version` marker.
    pub version: String,
}

/// Why the settings cannot be used; each names the flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag}: {problem}")]
    Invalid { flag: &'static str, problem: String },
    #[error("--trust-anchors-file {}: {problem}", path.display())]
    TrustAnchors { path: PathBuf, problem: String },
}

fn invalid(flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        problem: problem.into(),
    }
}

impl InjectionArgs {
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let namespace = self.namespace.trim();
        if !is_dns_label(namespace) {
            return Err(invalid(
                "namespace",
                format!("{namespace:?} is not a namespace name"),
            ));
        }
        let controller_addr = match &self.controller_addr {
            Some(addr) => host_port("controller-addr", addr)?,
            None => format!("trellis-controller.{namespace}.svc:8090"),
        };
        let identity_addr = match &self.identity_addr {
            Some(addr) => host_port("identity-addr", addr)?,
            None => format!("trellis-identity.{namespace}.svc:8080"),
        };
        if self.proxy_image.trim().is_empty() {
            return Err(invalid("proxy-image", "must not be empty"));
        }
        if self.trust_domain.trim().is_empty() {
            return Err(invalid("trust-domain", "must not be empty"));
        }
        let proxy_log_level = annotations::parse_log_level(&self.proxy_log_level)
            .map_err(|p| invalid("proxy-log-level", p))?;
        let otlp_endpoint = self
            .proxy_otlp_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(otlp_endpoint)
            .transpose()?;
        let cpu_request =
            Quantity::cpu(&self.proxy_cpu_request).map_err(|p| invalid("proxy-cpu-request", p))?;
        let memory_request = Quantity::memory(&self.proxy_memory_request)
            .map_err(|p| invalid("proxy-memory-request", p))?;
        let memory_limit = Quantity::memory(&self.proxy_memory_limit)
            .map_err(|p| invalid("proxy-memory-limit", p))?;
        if memory_request.value > memory_limit.value {
            return Err(invalid(
                "proxy-memory-request",
                format!("{memory_request} is above --proxy-memory-limit {memory_limit}"),
            ));
        }
        Ok(Settings {
            proxy_image: self.proxy_image.trim().to_string(),
            sidecar_mode: self.sidecar_mode,
            control_plane_namespace: namespace.to_string(),
            controller_addr,
            identity_addr,
            trust_domain: self.trust_domain.trim().to_string(),
            trust_anchors_pem: read_trust_anchors(&self.trust_anchors_file)?,
            proxy_log_level,
            access_log: self.proxy_access_log,
            otlp_endpoint,
            trace_sampling: self.proxy_trace_sampling,
            cpu_request,
            memory_request,
            memory_limit,
            version: VERSION.to_string(),
        })
    }
}

/// Reads the trust anchors and checks that they are PEM certificates, so a wrong file (a key,
/// an empty ConfigMap) stops the injector instead of producing proxies that trust nothing.
pub fn read_trust_anchors(path: &Path) -> Result<String, ConfigError> {
    let error = |problem: String| ConfigError::TrustAnchors {
        path: path.to_path_buf(),
        problem,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        cert.map_err(|e| error(format!("not a PEM certificate list: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(error("contains no PEM certificate".to_string()));
    }
    Ok(pem)
}

/// An `http://host:port[/path]` URL, what the proxy's `--otlp-endpoint` accepts: checked here
/// so that a typo stops the injector instead of every new proxy.
fn otlp_endpoint(endpoint: &str) -> Result<String, ConfigError> {
    let flag = "proxy-otlp-endpoint";
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| invalid(flag, format!("{endpoint:?} is not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
        return Err(invalid(
            flag,
            format!(
                "{endpoint:?} must be an http:// URL such as \
                 http://otel-collector.observability:4318 (proxies export in plaintext)"
            ),
        ));
    }
    Ok(endpoint.to_string())
}

fn host_port(flag: &'static str, addr: &str) -> Result<String, ConfigError> {
    let addr = addr.trim();
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(addr.to_string())
        }
        _ => Err(invalid(flag, format!("{addr:?} must be host:port"))),
    }
}

/// An RFC 1123 label, what Kubernetes requires of namespace and Service names.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `trellis-injector serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub injection: InjectionArgs,

    /// Address of the admission webhook (HTTPS).
    #[arg(long, env = "TRELLIS_WEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    pub webhook_addr: SocketAddr,

    /// Address of the admin server: /live, /ready, /metrics (plain HTTP).
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "0.0.0.0:9990")]
    pub admin_addr: SocketAddr,

    /// The injector's Service; the generated certificate is valid for
    /// `<service>.<namespace>.svc`.
    #[arg(
        long,
        env = "TRELLIS_INJECTOR_SERVICE",
        default_value = "trellis-injector"
    )]
    pub service: String,

    /// Secret (in --namespace) that holds the serving certificate; created when missing.
    #[arg(
        long,
        env = "TRELLIS_TLS_SECRET",
        default_value = "trellis-injector-tls"
    )]
    pub tls_secret: String,

    /// MutatingWebhookConfiguration whose caBundle is kept equal to the certificate's CA.
    #[arg(
        long,
        env = "TRELLIS_WEBHOOK_CONFIGURATION",
        default_value = "trellis-injector"
    )]
    pub webhook_configuration: String,

    /// PEM certificate chain to serve instead of the managed Secret (with --tls-key-file);
    /// re-read when the file changes. The caBundle is then left to whoever issued it.
    #[arg(
        long,
        env = "TRELLIS_TLS_CERT_FILE",
        value_name = "FILE",
        requires = "tls_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of --tls-cert-file.
    #[arg(
        long,
        env = "TRELLIS_TLS_KEY_FILE",
        value_name = "FILE",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,

    /// MiB of request bodies held while they are read, for declared pod-sized bodies and again
    /// for the rest; at least 3 (one largest body).
    #[arg(long, env = "TRELLIS_MAX_REVIEW_BUFFER_MIB", default_value_t = 16)]
    pub max_review_buffer_mib: usize,

    /// Reviews parsed and answered at once.
    #[arg(long, env = "TRELLIS_MAX_CONCURRENT_REVIEWS", default_value_t = 4)]
    pub max_concurrent_reviews: usize,

    /// How long a review waits for room in the buffer or for its turn before it is answered
    /// 503 (`500ms`, `3s`); well under the webhook's timeoutSeconds.
    #[arg(long, env = "TRELLIS_REVIEW_QUEUE_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub review_queue_timeout: Duration,

    /// Log filter, e.g. `info` or `info,trellis_injector=debug`.
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log_level: String,
}

/// `250ms`, `3s` or `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 500ms, 3s, 1m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?} is not a duration (examples: 500ms, 3s, 1m)")),
    }
}

/// How many body bytes the webhook holds while reading, how many reviews it answers at once,
/// and how long the rest wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReviewLimits {
    /// Per budget (pod-sized declared bodies, and the rest).
    pub max_buffered_bytes: usize,
    pub max_concurrent: usize,
    pub queue_timeout: Duration,
}

impl Default for ReviewLimits {
    fn default() -> Self {
        ReviewLimits {
            max_buffered_bytes: 16 * 1024 * 1024,
            max_concurrent: 4,
            queue_timeout: Duration::from_secs(3),
        }
    }
}

/// Where the serving certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSource {
    /// Files the user provides (for example from cert-manager).
    Files { cert: PathBuf, key: PathBuf },
    /// A Secret the injector creates, renews and publishes in the webhook's caBundle.
    Secret {
        namespace: String,
        name: String,
        service: String,
        webhook_configuration: String,
    },
}

/// The validated settings of `serve`.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub settings: Settings,
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tls: TlsSource,
    pub limits: ReviewLimits,
    /// Followed for changes of the trust anchors; `None`: the settings' anchors stay.
    pub trust_anchors_file: Option<PathBuf>,
}

impl ServeArgs {
    pub fn validate(&self) -> Result<ServeConfig, ConfigError> {
        let settings = self.injection.validate()?;
        if self.max_concurrent_reviews == 0 {
            return Err(invalid("max-concurrent-reviews", "must be at least 1"));
        }
        if !(3..=4096).contains(&self.max_review_buffer_mib) {
            return Err(invalid(
                "max-review-buffer-mib",
                "must be from 3 (one body of the largest size) to 4096",
            ));
        }
        let limits = ReviewLimits {
            max_buffered_bytes: self.max_review_buffer_mib * 1024 * 1024,
            max_concurrent: self.max_concurrent_reviews,
            queue_timeout: self.review_queue_timeout,
        };
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => TlsSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            (None, None) => {
                if !is_dns_label(&self.service) {
                    return Err(invalid(
                        "service",
                        format!("{:?} is not a Service name", self.service),
                    ));
                }
                for (flag, name) in [
                    ("tls-secret", &self.tls_secret),
                    ("webhook-configuration", &self.webhook_configuration),
                ] {
                    if name.trim().is_empty() {
                        return Err(invalid(flag, "must not be empty"));
                    }
                }
                TlsSource::Secret {
                    namespace: settings.control_plane_namespace.clone(),
                    name: self.tls_secret.trim().to_string(),
                    service: self.service.clone(),
                    webhook_configuration: self.webhook_configuration.trim().to_string(),
                }
            }
            _ => {
                return Err(invalid(
                    "tls-cert-file",
                    "--tls-cert-file and --tls-key-file go together",
                ));
            }
        };
        Ok(ServeConfig {
            settings,
            webhook_addr: self.webhook_addr,
            admin_addr: self.admin_addr,
            tls,
            limits,
            trust_anchors_file: Some(self.injection.trust_anchors_file.clone()),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Settings with fixed values, so expected patches do not change with the release.
    pub(crate) fn settings() -> Settings {
        Settings {
            proxy_image: "trellis-proxy:test".to_string(),
            sidecar_mode: SidecarMode::Native,
            control_plane_namespace: "trellis-system".to_string(),
            controller_addr: "trellis-controller.trellis-system.svc:8090".to_string(),
            identity_addr: "trellis-identity.trellis-system.svc:8080".to_string(),
            trust_domain: "cluster.local".to_string(),
            trust_anchors_pem: "-----BEGIN CERTIFICATE-----\nTEST\n-----END CERTIFICATE-----\n"
                .to_string(),
            proxy_log_level: "info".to_string(),
            access_log: AccessLog::Off,
            otlp_endpoint: None,
            trace_sampling: 0.0,
            cpu_request: Quantity::cpu("100m").unwrap(),
            memory_request: Quantity::memory("64Mi").unwrap(),
            memory_limit: Quantity::memory("256Mi").unwrap(),
            version: "0.0.0-test".to_string(),
        }
    }

    fn args(anchors: &Path) -> InjectionArgs {
        InjectionArgs {
            proxy_image: DEFAULT_PROXY_IMAGE.to_string(),
            sidecar_mode: SidecarMode::Native,
            namespace: "trellis-system".to_string(),
            controller_addr: None,
            identity_addr: None,
            trust_domain: "cluster.local".to_string(),
            trust_anchors_file: anchors.to_path_buf(),
            proxy_log_level: "info".to_string(),
            proxy_access_log: AccessLog::Off,
            proxy_otlp_endpoint: None,
            proxy_trace_sampling: 0.0,
            proxy_cpu_request: "100m".to_string(),
            proxy_memory_request: "64Mi".to_string(),
            proxy_memory_limit: "256Mi".to_string(),
        }
    }

    fn anchors_file(dir: &tempfile::TempDir) -> PathBuf {
        let path = dir.path().join("ca.pem");
        let ca =
            crate::cert::generate(&["ca".to_string()], std::time::SystemTime::now(), None).unwrap();
        std::fs::write(&path, ca.ca_pem).unwrap();
        path
    }

    #[test]
    fn defaults_derive_addresses_from_the_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = args(&anchors_file(&dir));
        args.namespace = "mesh".to_string();
        let settings = args.validate().unwrap();
        assert_eq!(settings.controller_addr, "trellis-controller.mesh.svc:8090");
        assert_eq!(settings.identity_addr, "trellis-identity.mesh.svc:8080");
        assert_eq!(settings.version, VERSION);
        assert!(
            settings
                .trust_anchors_pem
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let anchors = anchors_file(&dir);
        type Edit = fn(&mut InjectionArgs);
        let cases: [(Edit, &str); 10] = [
            (|a| a.namespace = "Bad_NS".into(), "--namespace"),
            (
                |a| a.controller_addr = Some("nohost".into()),
                "--controller-addr",
            ),
            (|a| a.identity_addr = Some("x:0".into()), "--identity-addr"),
            (
                |a| a.proxy_log_level = "verbose".into(),
                "--proxy-log-level",
            ),
            (
                |a| a.proxy_cpu_request = "lots".into(),
                "--proxy-cpu-request",
            ),
            (
                |a| a.proxy_memory_limit = "128m".into(),
                "--proxy-memory-limit",
            ),
            (
                |a| a.proxy_memory_request = "1Gi".into(),
                "--proxy-memory-request",
            ),
            (
                |a| a.proxy_otlp_endpoint = Some("otel:4318".into()),
                "--proxy-otlp-endpoint",
            ),
            (
                |a| a.proxy_otlp_endpoint = Some("https://otel:4318".into()),
                "--proxy-otlp-endpoint",
            ),
            (
                |a| a.proxy_otlp_endpoint = Some("http://".into()),
                "--proxy-otlp-endpoint",
            ),
        ];
        for (edit, flag) in cases {
            let mut args = args(&anchors);
            edit(&mut args);
            let error = args.validate().unwrap_err().to_string();
            assert!(error.starts_with(flag), "{flag}: {error}");
        }
    }

    #[derive(Debug, clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn review_limits() {
        use clap::Parser as _;
        let dir = tempfile::tempdir().unwrap();
        let anchors = anchors_file(&dir);
        let anchors = anchors.to_str().unwrap();
        let parse = |extra: &[&str]| {
            let mut argv = vec!["serve", "--trust-anchors-file", anchors];
            argv.extend_from_slice(extra);
            Serve::try_parse_from(argv).map(|s| s.args.validate())
        };
        let config = parse(&[]).unwrap().unwrap();
        assert_eq!(config.limits, ReviewLimits::default());
        let config = parse(&[
            "--max-concurrent-reviews",
            "2",
            "--review-queue-timeout",
            "500ms",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            config.limits,
            ReviewLimits {
                max_buffered_bytes: 16 * 1024 * 1024,
                max_concurrent: 2,
                queue_timeout: Duration::from_millis(500)
            }
        );
        let error = parse(&["--max-concurrent-reviews", "0"])
            .unwrap()
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "--max-concurrent-reviews: must be at least 1"
        );
        assert!(parse(&["--review-queue-timeout", "3 seconds"]).is_err());
        let error = parse(&["--max-review-buffer-mib", "2"])
            .unwrap()
            .unwrap_err();
        assert!(
            error.to_string().starts_with("--max-review-buffer-mib"),
            "{error}"
        );
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("").is_err() && parse_duration("5h").is_err());
    }

    #[test]
    fn access_log_and_tracing_of_proxies() {
        use clap::Parser as _;
        let dir = tempfile::tempdir().unwrap();
        let anchors = anchors_file(&dir);
        let anchors = anchors.to_str().unwrap();
        let parse = |extra: &[&str]| {
            let mut argv = vec!["serve", "--trust-anchors-file", anchors];
            argv.extend_from_slice(extra);
            Serve::try_parse_from(argv).map(|s| s.args.validate().map(|c| c.settings))
        };
        let settings = parse(&[]).unwrap().unwrap();
        assert_eq!(settings.access_log, AccessLog::Off);
        assert_eq!(settings.otlp_endpoint, None);
        assert_eq!(settings.trace_sampling, 0.0);
        let settings = parse(&[
            "--proxy-access-log",
            "json",
            "--proxy-otlp-endpoint",
            " http://otel-collector.observability:4318 ",
            "--proxy-trace-sampling",
            "0.05",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(settings.access_log, AccessLog::Json);
        assert_eq!(
            settings.otlp_endpoint.as_deref(),
            Some("http://otel-collector.observability:4318")
        );
        assert_eq!(settings.trace_sampling, 0.05);
        // An empty endpoint (a chart value left empty) is no endpoint.
        let settings = parse(&["--proxy-otlp-endpoint", ""]).unwrap().unwrap();
        assert_eq!(settings.otlp_endpoint, None);
        let path = parse(&["--proxy-otlp-endpoint", "http://otel:4318/custom/traces"])
            .unwrap()
            .unwrap();
        assert_eq!(
            path.otlp_endpoint.as_deref(),
            Some("http://otel:4318/custom/traces")
        );
        for bad in [
            &["--proxy-trace-sampling", "5%"][..],
            &["--proxy-trace-sampling", "1.5"],
            &["--proxy-access-log", "text"],
        ] {
            let error = parse(bad).unwrap_err().to_string();
            assert!(error.contains(bad[0]), "{bad:?}: {error}");
        }
    }

    #[test]
    fn trust_anchors_must_be_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let missing = dir.path().join("missing.pem");
        for (path, problem) in [
            (&empty, "contains no PEM certificate"),
            (&key, "contains no PEM certificate"),
            (&missing, "No such file"),
        ] {
            let error = args(path).validate().unwrap_err().to_string();
            assert!(error.contains("--trust-anchors-file"), "{error}");
            assert!(error.contains(problem), "{error}");
        }
    }
}
