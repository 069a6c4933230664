//! The thin Kubernetes layer of certificate management: read or create the Secret, renew it,
//! and keep the webhook configuration's caBundle in sync. The decisions are the pure
//! functions of [`crate::cert`]; this only sequences API calls and handles races.
//!
//! Several injector replicas may start at once. Creation is race-safe because the API server
//! accepts only one `create` of a name: the others get 409 and load the winner's Secret.
//! Renewal replaces with the Secret's `resourceVersion`, so only one replica's renewal lands
//! and the rest reload it.

use std::time::SystemTime;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::cert::{self, CertError, ServingCert};

/// Load attempts before giving up when every attempt loses a race (it takes a pathological
/// amount of churn to lose three in a row).
const ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error(
        "Secret {namespace}/{name} exists but cannot be used ({problem}); fix it, or delete it \
         and the injector creates a new one"
    )]
    Foreign {
        namespace: String,
        name: String,
        problem: CertError,
    },
    #[error("{0}")]
    Cert(#[from] CertError),
    #[error("Secret {0}: still changing after {ATTEMPTS} attempts")]
    Contended(String),
}

/// What [`load_or_create`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Loaded,
    Created,
    Renewed(String),
    /// Another replica created or renewed it first.
    LostRace,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.is_conflict() || status.is_already_exists())
}

/// The serving certificate from the Secret, creating or renewing it when needed.
///
/// A Secret the injector did not create (no `app.kubernetes.io/managed-by: trellis-injector`
/// label) is used as it is, never overwritten; if it is unusable that is an error to fix.
pub async fn load_or_create(
    secrets: &Api<Secret>,
    namespace: &str,
    name: &str,
    dns_names: &[String],
    now: SystemTime,
) -> Result<(ServingCert, Source), ClusterError> {
    let mut lost_race = false;
    for _ in 0..ATTEMPTS {
        let Some(existing) = secrets.get_opt(name).await? else {
            let fresh = cert::generate(dns_names, now, None)?;
            match secrets
                .create(
                    &PostParams::default(),
                    &cert::to_secret(name, namespace, &fresh),
                )
                .await
            {
                Ok(_) => return Ok((fresh, Source::Created)),
                Err(e) if is_conflict(&e) => {
                    tracing::info!("Secret {namespace}/{name} was created by another replica");
                    lost_race = true;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let managed = cert::is_managed(&existing);
        let parsed = cert::from_secret(&existing);
        let reason = match &parsed {
            Ok(current) => cert::renewal_reason(current, dns_names, now),
            Err(e) => Some(e.to_string()),
        };
        match (parsed, reason, managed) {
            (Ok(current), None, _) => {
                let source = if lost_race {
                    Source::LostRace
                } else {
                    Source::Loaded
                };
                return Ok((current, source));
            }
            (Ok(current), Some(reason), false) => {
                tracing::warn!(
                    "Secret {namespace}/{name} should be renewed ({reason}), but the injector \
                     did not create it and leaves it to its owner"
                );
                return Ok((current, Source::Loaded));
            }
            (Err(problem), _, false) => {
                return Err(ClusterError::Foreign {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    problem,
                });
            }
            (current, Some(reason), true) => {
                let previous_ca = current.as_ref().ok().map(|c| c.ca_pem.as_str());
                let fresh = cert::generate(dns_names, now, previous_ca)?;
                let mut replacement = cert::to_secret(name, namespace, &fresh);
                // Optimistic concurrency: the replace only lands on the version we read.
                replacement.metadata.resource_version = existing.metadata.resource_version;
                match secrets
                    .replace(name, &PostParams::default(), &replacement)
                    .await
                {
                    Ok(_) => return Ok((fresh, Source::Renewed(reason))),
                    Err(e) if is_conflict(&e) => {
                        tracing::info!("Secret {namespace}/{name} was renewed by another replica");
                        lost_race = true;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            // An unusable managed Secret always has a reason, so this arm is never taken.
            (Err(problem), None, true) => return Err(problem.into()),
        }
    }
    Err(ClusterError::Contended(format!("{namespace}/{name}")))
}

/// What [`sync_ca_bundle`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaBundle {
    AlreadyCurrent,
    Patched,
    /// The configuration does not exist (yet): the chart may not have created it.
    Missing,
}

/// Makes every webhook of the configuration trust `ca_pem`; patches only when one differs.
pub async fn sync_ca_bundle(
    configs: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca_pem: &str,
) -> Result<CaBundle, ClusterError> {
    let Some(current) = configs.get_opt(name).await? else {
        return Ok(CaBundle::Missing);
    };
    match cert::ca_bundle_patch(&current, ca_pem) {
        None => Ok(CaBundle::AlreadyCurrent),
        Some(patch) => {
            configs
                .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
                .await?;
            Ok(CaBundle::Patched)
        }
    }
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
