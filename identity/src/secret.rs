//! The Secret that holds the trust anchors and the issuer: `ca.crt` (the anchors bundle),
//! `tls.crt` (the issuer certificate) and `tls.key` (its key), the layout cert-manager and
//! `kubectl create secret tls` use.
//!
//! [`secret_to_material`] and [`material_to_secret`] are the pure conversions; the rest is the
//! thin layer over the API (`get`, `create`, `replace`). Identity needs `get` on this Secret,
//! and `bootstrap` also `create` (and `update` for `--renew-issuer`).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

use crate::ca::{CaError, Material};

pub const CA_CRT: &str = "ca.crt";
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
/// Marks Secrets that `trellis-identity bootstrap` created.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "trellis-identity";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("Secret {secret}: {problem}")]
    Invalid { secret: String, problem: String },
    #[error("Secret {0} was changed by someone else meanwhile; run again")]
    Conflict(String),
    #[error("Secret {0} was deleted right after another replica created it; run again")]
    Vanished(String),
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// What [`create_or_load`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It existed already.
    Loaded,
    Created,
    /// Another replica created it between our read and our create; theirs is used.
    LostRace,
}

/// The three PEM texts of the Secret.
pub fn secret_to_material(secret: &Secret) -> Result<Material, String> {
    let data = secret.data.as_ref();
    let field = |key: &str| -> Result<String, String> {
        let bytes = data
            .and_then(|d| d.get(key))
            .ok_or_else(|| format!("it has no {key}"))?;
        let text =
            String::from_utf8(bytes.0.clone()).map_err(|_| format!("its {key} is not PEM text"))?;
        if text.trim().is_empty() {
            return Err(format!("its {key} is empty"));
        }
        Ok(text)
    };
    Ok(Material {
        anchors_pem: field(CA_CRT)?,
        issuer_cert_pem: field(TLS_CRT)?,
        issuer_key_pem: field(TLS_KEY)?,
    })
}

/// The Secret `bootstrap` writes.
pub fn material_to_secret(namespace: &str, name: &str, material: &Material) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY.to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(BTreeMap::from([
            (CA_CRT.to_string(), bytes(&material.anchors_pem)),
            (TLS_CRT.to_string(), bytes(&material.issuer_cert_pem)),
            (TLS_KEY.to_string(), bytes(&material.issuer_key_pem)),
        ])),
        ..Default::default()
    }
}

/// A read Secret: its material and the version a replace must name.
#[derive(Clone, Debug)]
pub struct Stored {
    pub material: Material,
    pub resource_version: Option<String>,
}

/// The Secret's material, or `None` when there is no such Secret.
pub async fn read(
    secrets: &Api<Secret>,
    namespace: &str,
    name: &str,
) -> Result<Option<Stored>, SecretError> {
    let Some(secret) = secrets.get_opt(name).await? else {
        return Ok(None);
    };
    let material = secret_to_material(&secret).map_err(|problem| SecretError::Invalid {
        secret: format!("{namespace}/{name}"),
        problem,
    })?;
    Ok(Some(Stored {
        material,
        resource_version: secret.metadata.resource_version,
    }))
}

/// The Secret's material, creating the Secret from `generate` when it does not exist.
///
/// Several replicas may bootstrap at once. The API server accepts only one `create` of a name:
/// the others get 409 AlreadyExists and use the winner's Secret, so every replica ends up
/// with the same trust anchors.
pub async fn create_or_load(
    secrets: &Api<Secret>,
    namespace: &str,
    name: &str,
    generate: impl FnOnce() -> Result<Material, CaError>,
) -> Result<(Material, Outcome), SecretError> {
    if let Some(existing) = read(secrets, namespace, name).await? {
        return Ok((existing.material, Outcome::Loaded));
    }
    let fresh = generate()?;
    match secrets
        .create(
            &PostParams::default(),
            &material_to_secret(namespace, name, &fresh),
        )
        .await
    {
        Ok(_) => Ok((fresh, Outcome::Created)),
        Err(e) if is_already_exists(&e) => {
            tracing::info!("Secret {namespace}/{name} was created by another replica; using it");
            match read(secrets, namespace, name).await? {
                Some(winner) => Ok((winner.material, Outcome::LostRace)),
                None => Err(SecretError::Vanished(format!("{namespace}/{name}"))),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Replaces the Secret's material, only if it is still at `resource_version`.
pub async fn replace(
    secrets: &Api<Secret>,
    namespace: &str,
    name: &str,
    material: &Material,
    resource_version: Option<String>,
) -> Result<(), SecretError> {
    let mut secret = material_to_secret(namespace, name, material);
    secret.metadata.resource_version = resource_version;
    match secrets.replace(name, &PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(e) if is_conflict(&e) => Err(SecretError::Conflict(format!("{namespace}/{name}"))),
        Err(e) => Err(e.into()),
    }
}

fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.is_already_exists())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.is_conflict())
}

#[cfg(test)]
#[path = "secret_tests.rs"]
mod tests;
