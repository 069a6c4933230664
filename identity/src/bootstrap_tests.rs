//! Bootstrap to files and to a Secret: created once, then left alone; the issuer renewed under
//! the same root; a lost creation race keeps the winner's root.

use std::path::PathBuf;

use http::{Method, StatusCode};

use super::*;
use crate::secret::material_to_secret;
use crate::test_support::{
    DAY, TD, WEB, assert_no_more_requests, csr_for, expect, failure, mock_client, respond,
};

const NS: &str = "trellis-system";
const NAME: &str = "trellis-identity-issuer";
const SECRET_PATH: &str = "/api/v1/namespaces/trellis-system/secrets/trellis-identity-issuer";
const SECRETS_PATH: &str = "/api/v1/namespaces/trellis-system/secrets";

struct Files {
    _dir: tempfile::TempDir,
    anchors: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    root_key: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join("pki").join(name);
    Files {
        anchors: at("ca.crt"),
        cert: at("tls.crt"),
        key: at("tls.key"),
        root_key: at("root.key"),
        _dir: dir,
    }
}

fn config(f: &Files, root_key: bool, renew: bool) -> BootstrapConfig {
    BootstrapConfig {
        trust_domain: TD.to_string(),
        material: MaterialSource::Files {
            anchors: f.anchors.clone(),
            cert: f.cert.clone(),
            key: f.key.clone(),
        },
        root_key: root_key.then(|| f.root_key.clone()),
        renew_issuer: renew,
        issuer_lifetime: 365 * DAY,
        root_lifetime: 3650 * DAY,
    }
}

fn run_files(f: &Files, config: &BootstrapConfig) -> Result<Done, BootstrapError> {
    to_files(config, &f.anchors, &f.cert, &f.key, SystemTime::now())
}

fn read_all(f: &Files) -> Material {
    Material {
        anchors_pem: std::fs::read_to_string(&f.anchors).unwrap(),
        issuer_cert_pem: std::fs::read_to_string(&f.cert).unwrap(),
        issuer_key_pem: std::fs::read_to_string(&f.key).unwrap(),
    }
}

#[test]
fn files_are_created_once_and_then_left_alone() {
    let f = files();
    assert_eq!(
        run_files(&f, &config(&f, false, false)).unwrap(),
        Done::Created
    );
    let first = read_all(&f);
    Authority::new(&first, TD, DAY, SystemTime::now()).unwrap();
    assert!(
        !f.root_key.exists(),
        "without --root-key the root key is discarded"
    );
    assert_eq!(
        run_files(&f, &config(&f, false, false)).unwrap(),
        Done::AlreadyPresent
    );
    assert_eq!(read_all(&f), first, "a second run changes nothing");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&f.key), 0o600);
        assert_eq!(mode(&f.anchors), 0o644);
    }
}

#[test]
fn the_root_is_a_ca_of_path_length_one_and_the_issuer_of_zero() {
    let (material, _) = generate(TD, 3650 * DAY, 365 * DAY, SystemTime::now()).unwrap();
    for (pem, path_len) in [(&material.anchors_pem, 1), (&material.issuer_cert_pem, 0)] {
        let der = ca::parse_certs(pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(path_len));
        assert!(cert.key_usage().unwrap().unwrap().value.key_cert_sign());
    }
}

#[test]
fn partial_or_broken_files_are_not_overwritten() {
    let f = files();
    run_files(&f, &config(&f, false, false)).unwrap();
    std::fs::remove_file(&f.key).unwrap();
    let err = run_files(&f, &config(&f, false, false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("only some of the files exist") && err.contains("tls.key"),
        "{err}"
    );

    std::fs::write(&f.key, pki_other_key()).unwrap();
    let before = read_all(&f);
    let err = format!(
        "{:#}",
        run_files(&f, &config(&f, false, false)).unwrap_err()
    );
    assert!(
        err.contains("cannot be used") && err.contains("does not belong"),
        "{err}"
    );
    assert_eq!(read_all(&f), before);
}

fn pki_other_key() -> String {
    rcgen::KeyPair::generate().unwrap().serialize_pem()
}

#[test]
fn the_issuer_is_renewed_under_the_same_root() {
    let f = files();
    assert_eq!(
        run_files(&f, &config(&f, true, false)).unwrap(),
        Done::Created
    );
    assert!(f.root_key.exists());
    let old = read_all(&f);
    assert_eq!(
        run_files(&f, &config(&f, true, true)).unwrap(),
        Done::IssuerRenewed
    );
    let new = read_all(&f);
    assert_eq!(new.anchors_pem, old.anchors_pem);
    assert_ne!(new.issuer_cert_pem, old.issuer_cert_pem);
    assert_ne!(new.issuer_key_pem, old.issuer_key_pem);

    // Certificates of both issuers verify against the unchanged anchors.
    let now = SystemTime::now();
    let (old, new) = (
        Authority::new(&old, TD, DAY, now).unwrap(),
        Authority::new(&new, TD, DAY, now).unwrap(),
    );
    for authority in [&old, &new] {
        let (pem, _) = csr_for(WEB);
        let issued = authority
            .certify(&ca::csr::parse(&pem).unwrap(), now)
            .unwrap();
        old.anchors()
            .verify(&issued.cert_der, authority.chain_der(), now)
            .unwrap();
    }
}

#[test]
fn renewal_needs_the_roots_key() {
    let f = files();
    run_files(&f, &config(&f, false, false)).unwrap();
    std::fs::write(&f.root_key, pki_other_key()).unwrap();
    let err = run_files(&f, &config(&f, true, true))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no trust anchor belongs to the root key"),
        "{err}"
    );
}

#[test]
fn an_existing_root_key_is_never_replaced() {
    let f = files();
    std::fs::create_dir_all(f.root_key.parent().unwrap()).unwrap();
    std::fs::write(&f.root_key, "keep me").unwrap();
    let err = run_files(&f, &config(&f, true, false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("refusing to replace a root key"), "{err}");
    assert_eq!(std::fs::read_to_string(&f.root_key).unwrap(), "keep me");
    assert!(!f.anchors.exists());
}

fn secret_config(root_key: Option<PathBuf>, renew: bool) -> BootstrapConfig {
    BootstrapConfig {
        trust_domain: TD.to_string(),
        material: MaterialSource::Secret {
            namespace: NS.into(),
            name: NAME.into(),
        },
        root_key,
        renew_issuer: renew,
        issuer_lifetime: 365 * DAY,
        root_lifetime: 3650 * DAY,
    }
}

#[tokio::test]
async fn secret_created_keeps_the_root_key_when_asked() {
    let f = files();
    let (client, mut handle) = mock_client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::NOT_FOUND, &failure(404, "NotFound"));
        let (body, send) = expect(&mut handle, Method::POST, SECRETS_PATH).await;
        respond(send, StatusCode::CREATED, &body);
        (body, handle)
    });
    let config = secret_config(Some(f.root_key.clone()), false);
    let done = to_secret(&config, &secrets, NS, NAME, SystemTime::now())
        .await
        .unwrap();
    let (body, handle) = server.await.unwrap();
    assert_eq!(done, Done::Created);
    let sent: Secret = serde_json::from_value(body).unwrap();
    let material = secret::secret_to_material(&sent).unwrap();
    let root_key = std::fs::read_to_string(&f.root_key).unwrap();
    // The kept key is the created root's: it can sign the next issuer.
    renew_issuer(&material.anchors_pem, &root_key, TD, DAY, SystemTime::now()).unwrap();
    drop(secrets);
    assert_no_more_requests(handle).await;
}

#[tokio::test]
async fn secret_race_lost_uses_the_winner_and_keeps_no_key() {
    let f = files();
    let (winner, _) = generate(TD, 3650 * DAY, 365 * DAY, SystemTime::now()).unwrap();
    let winners_secret = material_to_secret(NS, NAME, &winner);
    let (client, mut handle) = mock_client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::NOT_FOUND, &failure(404, "NotFound"));
        let (_, send) = expect(&mut handle, Method::POST, SECRETS_PATH).await;
        respond(send, StatusCode::CONFLICT, &failure(409, "AlreadyExists"));
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::OK, &winners_secret);
        handle
    });
    let config = secret_config(Some(f.root_key.clone()), false);
    let done = to_secret(&config, &secrets, NS, NAME, SystemTime::now())
        .await
        .unwrap();
    let _handle = server.await.unwrap();
    assert_eq!(done, Done::CreatedByAnother);
    assert!(
        !f.root_key.exists(),
        "our root lost: its key must not be kept"
    );
}

#[tokio::test]
async fn secret_issuer_renewal_replaces_at_the_read_version() {
    let f = files();
    let (material, root_key) = generate(TD, 3650 * DAY, 365 * DAY, SystemTime::now()).unwrap();
    std::fs::create_dir_all(f.root_key.parent().unwrap()).unwrap();
    std::fs::write(&f.root_key, &root_key).unwrap();
    let mut existing = material_to_secret(NS, NAME, &material);
    existing.metadata.resource_version = Some("42".into());
    let (client, mut handle) = mock_client();
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET_PATH).await;
        respond(send, StatusCode::OK, &existing);
        let (body, send) = expect(&mut handle, Method::PUT, SECRET_PATH).await;
        respond(send, StatusCode::OK, &body);
        body
    });
    let config = secret_config(Some(f.root_key.clone()), true);
    let done = to_secret(&config, &secrets, NS, NAME, SystemTime::now())
        .await
        .unwrap();
    let body = server.await.unwrap();
    assert_eq!(done, Done::IssuerRenewed);
    assert_eq!(body["metadata"]["resourceVersion"], "42");
    let sent: Secret = serde_json::from_value(body).unwrap();
    let renewed = secret::secret_to_material(&sent).unwrap();
    assert_eq!(renewed.anchors_pem, material.anchors_pem);
    assert_ne!(renewed.issuer_cert_pem, material.issuer_cert_pem);
}
