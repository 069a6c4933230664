//! `trellis-identity bootstrap`: creates a root (the trust anchor) and an issuer signed by it
//! when none exist, to files or to a Secret; with `--renew-issuer`, replaces the issuer under
//! the same root.
//!
//! Running it again is harmless: existing material is checked and left alone, so it can run
//! as an init step of every identity replica.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};

use crate::ca::{self, Authority, CaError, Material, TrustAnchors};
use crate::config::{BootstrapConfig, MaterialSource};
use crate::secret::{self, Outcome, SecretError};

/// Roots and issuers start an hour in the past: clocks across a cluster disagree.
const CA_BACKDATE: Duration = Duration::from_secs(3600);
/// Lifetime used only to check material (any valid value works).
const CHECK_LIFETIME: Duration = Duration::from_secs(3600);

/// What `bootstrap` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// Everything existed and is usable; nothing was written.
    AlreadyPresent,
    Created,
    /// Another replica created the Secret first; it is usable.
    CreatedByAnother,
    IssuerRenewed,
}

/// A new self-signed root, path length 1 (one issuer below it).
pub fn new_root(
    trust_domain: &str,
    lifetime: Duration,
    now: SystemTime,
) -> Result<CertifiedIssuer<'static, KeyPair>, CaError> {
    let mut params = ca_params(&format!("Trellis root CA ({trust_domain})"), now)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.not_after = (now + lifetime).into();
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

/// A new issuer signed by `root` (certificate PEM, key PEM): path length 0, so it signs
/// workload certificates and nothing that could sign further; it never outlives the root.
/// No name constraints: peers verify with rustls-webpki, which refuses URI name constraints
/// rather than evaluating them.
pub fn new_issuer(
    root: &Issuer<'_, KeyPair>,
    root_not_after: SystemTime,
    trust_domain: &str,
    lifetime: Duration,
    now: SystemTime,
) -> Result<(String, String), CaError> {
    let mut params = ca_params(&format!("Trellis issuer ({trust_domain})"), now)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.use_authority_key_identifier_extension = true;
    params.not_after = (now + lifetime).min(root_not_after).into();
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, root)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn ca_params(common_name: &str, now: SystemTime) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Trellis");
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now.checked_sub(CA_BACKDATE).unwrap_or(now).into();
    params.serial_number = Some(SerialNumber::from_slice(&ca::random_serial()?));
    Ok(params)
}

/// A fresh root and issuer: the material, and the root's key PEM.
pub fn generate(
    trust_domain: &str,
    root_lifetime: Duration,
    issuer_lifetime: Duration,
    now: SystemTime,
) -> Result<(Material, String), CaError> {
    let root = new_root(trust_domain, root_lifetime, now)?;
    let (issuer_cert_pem, issuer_key_pem) = new_issuer(
        &root,
        now + root_lifetime,
        trust_domain,
        issuer_lifetime,
        now,
    )?;
    let material = Material {
        anchors_pem: root.pem(),
        issuer_cert_pem,
        issuer_key_pem,
    };
    Ok((material, root.key().serialize_pem()))
}

/// A new issuer for `anchors`, signed by the anchor whose key is `root_key_pem`.
pub fn renew_issuer(
    anchors_pem: &str,
    root_key_pem: &str,
    trust_domain: &str,
    lifetime: Duration,
    now: SystemTime,
) -> Result<Material, CaError> {
    let anchors = TrustAnchors::from_pem(anchors_pem)?;
    let root_key = KeyPair::from_pem(root_key_pem)
        .map_err(|e| CaError::Anchors(format!("the root key is not a PKCS#8 PEM key: {e}")))?;
    let spki = root_key.subject_public_key_info();
    let root_der = anchors
        .certs()
        .iter()
        .find(|der| {
            x509_parser::parse_x509_certificate(der)
                .is_ok_and(|(_, cert)| cert.public_key().raw == spki.as_slice())
        })
        .ok_or_else(|| CaError::Anchors("no trust anchor belongs to the root key".to_string()))?
        .clone();
    let root_not_after =
        ca::not_after(&ca::pem("CERTIFICATE", &root_der)).map_err(CaError::Anchors)?;
    let root = Issuer::from_ca_cert_der(&root_der, root_key)?;
    let (issuer_cert_pem, issuer_key_pem) =
        new_issuer(&root, root_not_after, trust_domain, lifetime, now)?;
    Ok(Material {
        anchors_pem: anchors_pem.to_string(),
        issuer_cert_pem,
        issuer_key_pem,
    })
}

/// Why `bootstrap` stopped; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot read {flag} {path}: {source}")]
    Read {
        flag: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the existing trust anchors and issuer in {place} cannot be used; fix or remove them: {source}"
    )]
    Unusable { place: String, source: CaError },
    #[error(
        "only some of the files exist ({present}), {missing} missing: remove them to start \
         afresh, or complete them"
    )]
    Partial { present: String, missing: String },
    #[error(
        "--root-key {0} exists but the trust anchors do not: refusing to replace a root key; \
         move it away, or give the trust anchors it belongs to"
    )]
    RootKeyExists(String),
    #[error("Secret {0} does not exist: nothing to renew (run bootstrap without --renew-issuer)")]
    NothingToRenew(String),
    #[error("--renew-issuer needs --root-key")]
    NeedsRootKey,
    #[error("cannot reach the Kubernetes API to bootstrap the issuer Secret: {0}")]
    Cluster(#[from] kube::Error),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// Runs `bootstrap` to its end.
pub async fn run(config: &BootstrapConfig, now: SystemTime) -> Result<Done, BootstrapError> {
    match &config.material {
        MaterialSource::Files { anchors, cert, key } => to_files(config, anchors, cert, key, now),
        MaterialSource::Secret { namespace, name } => {
            let client = kube::Client::try_default().await?;
            to_secret(
                config,
                &Api::namespaced(client, namespace),
                namespace,
                name,
                now,
            )
            .await
        }
    }
}

fn check(material: &Material, config: &BootstrapConfig, now: SystemTime) -> Result<(), CaError> {
    Authority::new(material, &config.trust_domain, CHECK_LIFETIME, now).map(|_| ())
}

/// Bootstrap to three files.
pub fn to_files(
    config: &BootstrapConfig,
    anchors: &Path,
    cert: &Path,
    key: &Path,
    now: SystemTime,
) -> Result<Done, BootstrapError> {
    if config.renew_issuer {
        let root_key = config
            .root_key
            .as_ref()
            .ok_or(BootstrapError::NeedsRootKey)?;
        let anchors_pem = read(anchors, "--trust-anchors")?;
        let root_key_pem = read(root_key, "--root-key")?;
        let fresh = renew_issuer(
            &anchors_pem,
            &root_key_pem,
            &config.trust_domain,
            config.issuer_lifetime,
            now,
        )?;
        check(&fresh, config, now)?;
        // Key first: a reader that sees the new key with the old certificate refuses the pair
        // and retries, instead of running with a mismatched issuer.
        write_file(key, &fresh.issuer_key_pem, true)?;
        write_file(cert, &fresh.issuer_cert_pem, false)?;
        return Ok(Done::IssuerRenewed);
    }

    let (present, missing): (Vec<&Path>, Vec<&Path>) =
        [anchors, cert, key].into_iter().partition(|p| p.exists());
    match present.len() {
        3 => {
            let material = Material {
                anchors_pem: read(anchors, "--trust-anchors")?,
                issuer_cert_pem: read(cert, "--issuer-cert")?,
                issuer_key_pem: read(key, "--issuer-key")?,
            };
            check(&material, config, now).map_err(|source| BootstrapError::Unusable {
                place: format!("{} and its neighbours", cert.display()),
                source,
            })?;
            Ok(Done::AlreadyPresent)
        }
        0 => {
            if let Some(root_key) = &config.root_key
                && root_key.exists()
            {
                return Err(BootstrapError::RootKeyExists(
                    root_key.display().to_string(),
                ));
            }
            let (material, root_key_pem) = generate(
                &config.trust_domain,
                config.root_lifetime,
                config.issuer_lifetime,
                now,
            )?;
            if let Some(root_key) = &config.root_key {
                write_file(root_key, &root_key_pem, true)?;
            }
            write_file(key, &material.issuer_key_pem, true)?;
            write_file(cert, &material.issuer_cert_pem, false)?;
            write_file(anchors, &material.anchors_pem, false)?;
            Ok(Done::Created)
        }
        _ => {
            let list = |paths: Vec<&Path>| {
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            Err(BootstrapError::Partial {
                present: list(present),
                missing: list(missing),
            })
        }
    }
}

/// Bootstrap to a Secret.
pub async fn to_secret(
    config: &BootstrapConfig,
    secrets: &Api<Secret>,
    namespace: &str,
    name: &str,
    now: SystemTime,
) -> Result<Done, BootstrapError> {
    if config.renew_issuer {
        let root_key = config
            .root_key
            .as_ref()
            .ok_or(BootstrapError::NeedsRootKey)?;
        let root_key_pem = read(root_key, "--root-key")?;
        let current = secret::read(secrets, namespace, name)
            .await?
            .ok_or_else(|| BootstrapError::NothingToRenew(format!("{namespace}/{name}")))?;
        let fresh = renew_issuer(
            &current.material.anchors_pem,
            &root_key_pem,
            &config.trust_domain,
            config.issuer_lifetime,
            now,
        )?;
        check(&fresh, config, now)?;
        secret::replace(secrets, namespace, name, &fresh, current.resource_version).await?;
        return Ok(Done::IssuerRenewed);
    }

    let mut root_key_pem = None;
    let (material, outcome) = secret::create_or_load(secrets, namespace, name, || {
        let (material, root_key) = generate(
            &config.trust_domain,
            config.root_lifetime,
            config.issuer_lifetime,
            now,
        )?;
        root_key_pem = Some(root_key);
        Ok(material)
    })
    .await?;
    match outcome {
        Outcome::Created => {
            // Only now is this root the cluster's: a lost race discards our root and its key.
            if let (Some(path), Some(pem)) = (&config.root_key, &root_key_pem) {
                write_file(path, pem, true)?;
            }
            Ok(Done::Created)
        }
        Outcome::Loaded | Outcome::LostRace => {
            check(&material, config, now).map_err(|source| BootstrapError::Unusable {
                place: format!("Secret {namespace}/{name}"),
                source,
            })?;
            Ok(if outcome == Outcome::Loaded {
                Done::AlreadyPresent
            } else {
                Done::CreatedByAnother
            })
        }
    }
}

fn read(path: &Path, flag: &'static str) -> Result<String, BootstrapError> {
    std::fs::read_to_string(path).map_err(|source| BootstrapError::Read {
        flag,
        path: path.display().to_string(),
        source,
    })
}

/// Writes through a temporary file and a rename, so a reader never sees half a file; keys are
/// created readable by the owner only.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), BootstrapError> {
    let failed = |source| BootstrapError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(failed)?;
    file.write_all(contents.as_bytes()).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(failed)?;
    Ok(())
}

#[cfg(test)]
#[path = "bootstrap_tests.rs"]
mod tests;
