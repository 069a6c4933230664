//! Keeps the authority current: the issuer and trust anchors are re-read from their files or
//! Secret, a changed set that passes every check replaces the old one whole, and identity's
//! own serving certificate is renewed at half its life.
//!
//! The swap is an `Arc` behind a lock: a request takes the `Arc` once and finishes with the
//! authority it started with, while new requests and TLS handshakes get the new one. A
//! changed set that fails its checks is logged once and the old one stays.
//!
//! Files are compared by content rather than mtime, so a change within the same second (or a
//! Kubernetes volume's symlink swap) is never missed; three small reads per interval are cheap.
//! The Secret is polled with `get` for the same reason and so that identity needs no `watch`.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::ca::{self, Authority, CaError, Material};
use crate::metrics::Metrics;
use crate::secret;
use crate::tokens::Tokens;

/// After a change is seen, wait this long and read again before judging it: the files of a
/// rotation are written one after the other.
const SETTLE: Duration = Duration::from_millis(500);

/// An authority with the serving certificate it issued for identity itself.
#[derive(Debug)]
pub struct Active {
    pub authority: Arc<Authority>,
    pub serving: Arc<CertifiedKey>,
    serving_from: SystemTime,
    serving_until: SystemTime,
}

impl Active {
    pub fn new(
        authority: Arc<Authority>,
        names: &[String],
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let (serving, serving_until) = authority.serving_cert(names, now)?;
        Ok(Active {
            authority,
            serving,
            serving_from: now,
            serving_until,
        })
    }

    /// Past half of its life, like the workload certificates the proxies renew early.
    fn serving_needs_renewal(&self, now: SystemTime) -> bool {
        let life = self
            .serving_until
            .duration_since(self.serving_from)
            .unwrap_or_default();
        now >= self.serving_from + life / 2
    }
}

/// The authority in use; cloned out per request.
#[derive(Debug)]
pub struct Current {
    active: RwLock<Arc<Active>>,
}

impl Current {
    pub fn new(active: Active) -> Arc<Self> {
        Arc::new(Current {
            active: RwLock::new(Arc::new(active)),
        })
    }

    pub fn get(&self) -> Arc<Active> {
        // A poisoned lock still holds a whole Arc: a writer cannot leave it half-assigned.
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, active: Active) {
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(active);
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get().serving.clone())
    }
}

/// Where the material is read from.
#[derive(Clone, Debug)]
pub enum Source {
    Files {
        anchors: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    Secret {
        secrets: Api<Secret>,
        namespace: String,
        name: String,
    },
}

impl Source {
    pub async fn read(&self) -> Result<Material, String> {
        match self {
            Source::Files { anchors, cert, key } => {
                let read = |path: PathBuf| async move {
                    tokio::fs::read_to_string(&path)
                        .await
                        .map_err(|e| format!("{}: {e}", path.display()))
                };
                Ok(Material {
                    anchors_pem: read(anchors.clone()).await?,
                    issuer_cert_pem: read(cert.clone()).await?,
                    issuer_key_pem: read(key.clone()).await?,
                })
            }
            Source::Secret {
                secrets,
                namespace,
                name,
            } => match secret::read(secrets, namespace, name).await {
                Ok(Some(stored)) => Ok(stored.material),
                Ok(None) => Err(format!(
                    "Secret {namespace}/{name} not found; create it with `trellis-identity \
                     bootstrap --issuer-secret {namespace}/{name}`"
                )),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Files { cert, .. } => format!("files ({} and its neighbours)", cert.display()),
            Source::Secret {
                namespace, name, ..
            } => format!("Secret {namespace}/{name}"),
        }
    }
}

/// What identity needs to rebuild its authority.
#[derive(Clone, Debug)]
pub struct Settings {
    pub trust_domain: String,
    pub cert_lifetime: Duration,
    pub server_names: Vec<String>,
}

/// What [`apply`] did with a material.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Unchanged,
    Replaced,
}

/// Replaces the current authority with one built from `material`, unless it is the same or
/// fails its checks (the old one then stays).
pub fn apply(
    current: &Current,
    material: &Material,
    settings: &Settings,
    now: SystemTime,
) -> Result<Applied, CaError> {
    if current.get().authority.material() == material {
        return Ok(Applied::Unchanged);
    }
    let authority = Authority::new(
        material,
        &settings.trust_domain,
        settings.cert_lifetime,
        now,
    )?;
    current.set(Active::new(
        Arc::new(authority),
        &settings.server_names,
        now,
    )?);
    Ok(Applied::Replaced)
}

/// Polls the source, the serving certificate and the token file until `stop` turns true.
pub async fn run(
    source: Source,
    settings: Settings,
    current: Arc<Current>,
    tokens: Arc<Tokens>,
    metrics: Metrics,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_rejected: Option<Material> = None;
    let mut last_read_error: Option<String> = None;
    let mut last_token_error: Option<String> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match source.read().await {
            Ok(material) => {
                last_read_error = None;
                if &material != current.get().authority.material()
                    && last_rejected.as_ref() != Some(&material)
                {
                    tokio::time::sleep(SETTLE.min(interval)).await;
                    let settled = source.read().await.unwrap_or(material);
                    match apply(&current, &settled, &settings, SystemTime::now()) {
                        Ok(Applied::Replaced) => {
                            last_rejected = None;
                            metrics.reload(true);
                            let authority = &current.get().authority;
                            metrics.issuer_expires(authority.issuer_not_after());
                            tracing::info!(
                                "new trust anchors or issuer from {} in use; issuer expires {}",
                                source.describe(),
                                ca::rfc3339(authority.issuer_not_after())
                            );
                        }
                        Ok(Applied::Unchanged) => {}
                        Err(e) => {
                            metrics.reload(false);
                            tracing::error!(
                                "changed trust anchors or issuer in {} refused, keeping the \
                                 current ones: {e}",
                                source.describe()
                            );
                            last_rejected = Some(settled);
                        }
                    }
                }
            }
            Err(e) => {
                if last_read_error.as_ref() != Some(&e) {
                    tracing::warn!("cannot re-read the issuer, keeping the current one: {e}");
                    last_read_error = Some(e);
                }
            }
        }
        renew_serving(&current, &settings);
        if let Tokens::Local(local) = tokens.as_ref() {
            match local.reload() {
                Ok(changed) => {
                    if changed {
                        tracing::info!(
                            "token file {} reloaded: {} tokens",
                            local.path().display(),
                            local.table().len()
                        );
                    }
                    last_token_error = None;
                }
                Err(e) => {
                    let e = e.to_string();
                    if last_token_error.as_ref() != Some(&e) {
                        tracing::warn!("token file not reloaded, keeping the current tokens: {e}");
                        last_token_error = Some(e);
                    }
                }
            }
        }
    }
}

fn renew_serving(current: &Current, settings: &Settings) {
    let now = SystemTime::now();
    let active = current.get();
    if !active.serving_needs_renewal(now) {
        return;
    }
    match Active::new(active.authority.clone(), &settings.server_names, now) {
        Ok(fresh) => {
            current.set(fresh);
            tracing::info!("serving certificate renewed");
        }
        Err(e) => tracing::warn!("cannot renew the serving certificate: {e}"),
    }
}

#[cfg(test)]
#[path = "reload_tests.rs"]
mod tests;
