//! The controller's own mesh identity, and the mutual TLS of the discovery port.
//!
//! The controller certifies itself with identity exactly as a sidecar does (same code, from
//! `trellis-tls`, renewal included), as `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
//! Proxies check that identity before they trust a policy, and the controller reads each
//! proxy's namespace from the proxy's certificate instead of believing what it asks for.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_api::Identity;
use trellis_tls::identity::{self as certify, IdentityConfig};
use trellis_tls::{ALPN_H2, MeshTls, TlsError};

use crate::discovery::{self, Policies};

/// Where the controller's own namespace and service account are, unless flags say otherwise.
pub const DEFAULT_NAMESPACE: &str = "trellis-system";
pub const DEFAULT_SERVICE_ACCOUNT: &str = "trellis-controller";
/// The projected token the chart mounts, as for proxies.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/trellis.dev/identity/token";

/// Flags of `serve` that give the controller an identity.
#[derive(Clone, Debug, clap::Args)]
pub struct IdentityArgs {
    /// The mesh CA's certify endpoint, `host:port`. Set: discovery serves mutual TLS only and
    /// takes each proxy's namespace from its certificate. Unset: plaintext discovery, for local
    /// development only.
    #[arg(long, env = "TRELLIS_IDENTITY_ADDR")]
    pub identity_addr: Option<String>,

    /// The name on identity's serving certificate; by default the host of `--identity-addr`.
    #[arg(long, env = "TRELLIS_IDENTITY_SERVER_NAME")]
    pub identity_server_name: Option<String>,

    /// The trust anchors: PEM text, or the path of a PEM file.
    #[arg(long, env = "TRELLIS_TRUST_ANCHORS")]
    pub trust_anchors: Option<String>,

    /// The projected service-account token (audience `identity.trellis.dev`) sent to identity.
    #[arg(long, env = "TRELLIS_TOKEN_PATH", default_value = DEFAULT_TOKEN_PATH)]
    pub token_path: PathBuf,

    /// The controller's service account: with its namespace and the trust domain, its identity.
    #[arg(long, env = "TRELLIS_SERVICE_ACCOUNT", default_value = DEFAULT_SERVICE_ACCOUNT)]
    pub service_account: String,

    /// The controller's own namespace.
    #[arg(long, env = "TRELLIS_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
}

impl IdentityArgs {
    /// The file `--trust-anchors` names, if it names one rather than giving PEM text.
    pub fn anchors_file(&self) -> Option<PathBuf> {
        self.trust_anchors
            .as_deref()
            .filter(|v| !is_pem(v))
            .map(PathBuf::from)
    }
}

fn is_pem(value: &str) -> bool {
    value.trim_start().starts_with("-----BEGIN")
}

/// Why the controller cannot take its identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("--identity-addr {0:?} must be host:port")]
    Addr(String),
    #[error("--identity-addr needs --trust-anchors (PEM text or a file)")]
    NoAnchors,
    #[error("--trust-anchors: cannot read {path}: {source}")]
    AnchorsFile {
        path: String,
        source: std::io::Error,
    },
    #[error("--{flag} {value:?} is not a valid name")]
    Name { flag: &'static str, value: String },
    #[error("cannot set up mutual TLS: {0}")]
    Tls(#[from] TlsError),
}

/// The controller's certificate, kept certified by a background task, and the TLS server
/// configuration of the discovery port.
#[derive(Debug)]
pub struct DiscoveryTls {
    pub identity: Identity,
    /// TLS 1.3, a mesh client certificate required, ALPN `h2` then `http/1.1`.
    pub server: Arc<rustls::ServerConfig>,
    tls: MeshTls,
    task: JoinHandle<()>,
}

impl DiscoveryTls {
    /// Starts certification when `--identity-addr` is set; `None` means plaintext discovery.
    /// Needs a Tokio runtime. The certificate metrics go to `registry`.
    pub fn start(
        args: &IdentityArgs,
        trust_domain: &str,
        registry: &mut Registry,
    ) -> Result<Option<DiscoveryTls>, IdentityError> {
        let Some(addr) = &args.identity_addr else {
            return Ok(None);
        };
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Err(IdentityError::Addr(addr.clone()));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(IdentityError::Addr(addr.clone()));
        }
        for (flag, value) in [
            ("namespace", &args.namespace),
            ("service-account", &args.service_account),
        ] {
            if !is_name(value) {
                return Err(IdentityError::Name {
                    flag,
                    value: value.clone(),
                });
            }
        }
        let anchors_pem = read_anchors(args.trust_anchors.as_deref())?;
        let tls = MeshTls::new(&anchors_pem, trust_domain)?;
        let identity = Identity::new(trust_domain, &args.namespace, &args.service_account);
        let cfg = IdentityConfig {
            addr: addr.clone(),
            server_name: args
                .identity_server_name
                .clone()
                .unwrap_or_else(|| host.to_string()),
            token_path: args.token_path.clone(),
            identity: identity.clone(),
        };
        // Readiness is `certified`; the flag the sidecar's /ready reads is not needed here.
        let ready = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(certify::start(cfg, tls.clone(), ready, registry));
        // HTTP/1.1 stays available for tools such as curl; proxies ask for h2.
        let server = tls.server_config(&[ALPN_H2, b"http/1.1"]);
        Ok(Some(DiscoveryTls {
            identity,
            server,
            tls,
            task,
        }))
    }

    /// Completes once the controller holds its first certificate: until then every handshake
    /// would fail, so the discovery port does not accept.
    pub async fn certified(&self) {
        self.tls.credentials.certified().await;
    }

    /// The credentials, to wait for the first certificate from another task.
    pub fn credentials(&self) -> Arc<trellis_tls::mesh::Credentials> {
        self.tls.credentials.clone()
    }

    /// The mutual TLS of the discovery port, whose trust anchors can be replaced.
    pub fn mesh(&self) -> &MeshTls {
        &self.tls
    }
}

/// Serves discovery on `listener` until `shutdown`: with `tls`, mutual TLS only and from the
/// first certificate on; without, plaintext. Logs `listening on <addr>` once it answers.
pub async fn serve_discovery<P: Policies>(
    listener: TcpListener,
    index: watch::Receiver<Arc<P>>,
    tls: Option<&DiscoveryTls>,
    options: discovery::Options,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let addr = listener.local_addr()?;
    let Some(tls) = tls else {
        tracing::warn!(
            "no --identity-addr: discovery is plaintext and believes the namespace each client \
             names (local development only)"
        );
        tracing::info!("listening on {addr}");
        return discovery::serve_with_options(listener, index, None, options, shutdown).await;
    };
    tokio::pin!(shutdown);
    tracing::info!(identity = %tls.identity, "waiting for the controller's certificate");
    tokio::select! {
        () = tls.certified() => {}
        () = &mut shutdown => return Ok(()),
    }
    tracing::info!("listening on {addr} (mutual TLS as {})", tls.identity);
    let server = Some(tls.server.clone());
    discovery::serve_with_options(listener, index, server, options, shutdown).await
}

impl Drop for DiscoveryTls {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// PEM text as given, or the content of the file it names.
fn read_anchors(value: Option<&str>) -> Result<String, IdentityError> {
    match value {
        None => Err(IdentityError::NoAnchors),
        Some(pem) if is_pem(pem) => Ok(pem.to_string()),
        Some(path) => std::fs::read_to_string(path).map_err(|source| IdentityError::AnchorsFile {
            path: path.to_string(),
            source,
        }),
    }
}

/// A namespace or service-account name as Kubernetes allows it (a DNS subdomain), which is
/// what the SPIFFE ID and the TLS server name can carry.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(addr: Option<&str>, anchors: Option<&str>) -> IdentityArgs {
        IdentityArgs {
            identity_addr: addr.map(str::to_string),
            identity_server_name: None,
            trust_anchors: anchors.map(str::to_string),
            token_path: DEFAULT_TOKEN_PATH.into(),
            service_account: DEFAULT_SERVICE_ACCOUNT.to_string(),
            namespace: DEFAULT_NAMESPACE.to_string(),
        }
    }

    #[tokio::test]
    async fn flags_are_checked_before_anything_starts() {
        let mut registry = Registry::default();
        let mut start = |a: IdentityArgs| DiscoveryTls::start(&a, "cluster.local", &mut registry);
        assert!(start(args(None, None)).unwrap().is_none());
        assert!(matches!(
            start(args(Some("identity:8080"), None)),
            Err(IdentityError::NoAnchors)
        ));
        assert!(matches!(
            start(args(Some("identity"), Some("x"))),
            Err(IdentityError::Addr(_))
        ));
        assert!(matches!(
            start(args(Some("identity:8080"), Some("/nonexistent/ca.crt"))),
            Err(IdentityError::AnchorsFile { .. })
        ));
        let mut bad = args(Some("identity:8080"), Some("x"));
        bad.namespace = "Trellis".to_string();
        assert!(matches!(
            start(bad),
            Err(IdentityError::Name {
                flag: "namespace",
                ..
            })
        ));
        assert!(matches!(
            start(args(
                Some("identity:8080"),
                Some("-----BEGIN CERTIFICATE-----\n")
            )),
            Err(IdentityError::Tls(_))
        ));
    }

    #[test]
    fn names() {
        for good in ["trellis-system", "a", "sa.with.dots", "x1-y"] {
            assert!(is_name(good), "{good}");
        }
        for bad in ["", "Upper", "-a", "a-", "a..b", "a_b", "a/b"] {
            assert!(!is_name(bad), "{bad}");
        }
    }
}
