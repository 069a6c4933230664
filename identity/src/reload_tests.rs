//! Swapping the authority: a good new issuer replaces the old one whole, a bad one is refused
//! and the old one kept, requests already holding the old one finish with it.

use std::time::Instant;

use super::*;
use crate::bootstrap;
use crate::ca::csr;
use crate::config::{BootstrapConfig, MaterialSource};
use crate::test_support::{DAY, TD, WEB, authority, csr_for, pki};
use crate::tokens::LocalTokens;

fn settings() -> Settings {
    Settings {
        trust_domain: TD.to_string(),
        cert_lifetime: DAY,
        server_names: vec!["trellis-identity.trellis-system.svc".to_string()],
    }
}

fn current_for(material: &Material) -> Arc<Current> {
    let now = SystemTime::now();
    Current::new(Active::new(Arc::new(authority(material)), &settings().server_names, now).unwrap())
}

fn issuer_of(active: &Active) -> String {
    active.authority.material().issuer_cert_pem.clone()
}

#[test]
fn a_good_issuer_replaces_the_old_one_a_bad_one_is_refused() {
    let (old, root_key) = pki();
    let (other, _) = pki();
    let current = current_for(&old);
    let now = SystemTime::now();
    assert_eq!(
        apply(&current, &old, &settings(), now).unwrap(),
        Applied::Unchanged
    );

    let in_flight = current.get();
    let renewed = bootstrap::renew_issuer(&old.anchors_pem, &root_key, TD, 365 * DAY, now).unwrap();
    assert_eq!(
        apply(&current, &renewed, &settings(), now).unwrap(),
        Applied::Replaced
    );
    assert_eq!(issuer_of(&current.get()), renewed.issuer_cert_pem);

    // A request that took the old authority before the swap finishes with it, and what it
    // issues still verifies against the anchors, as does what the new one issues.
    let (pem, _) = csr_for(WEB);
    let checked = csr::parse(&pem).unwrap();
    let from_old = in_flight.authority.certify(&checked, now).unwrap();
    let fresh = current.get();
    let from_new = fresh.authority.certify(&checked, now).unwrap();
    let anchors = fresh.authority.anchors();
    anchors
        .verify(&from_old.cert_der, in_flight.authority.chain_der(), now)
        .unwrap();
    anchors
        .verify(&from_new.cert_der, fresh.authority.chain_der(), now)
        .unwrap();

    for bad in [
        Material {
            issuer_key_pem: other.issuer_key_pem.clone(),
            ..renewed.clone()
        },
        Material {
            anchors_pem: renewed.anchors_pem.clone(),
            ..other.clone()
        },
    ] {
        assert!(apply(&current, &bad, &settings(), now).is_err());
        assert_eq!(
            issuer_of(&current.get()),
            renewed.issuer_cert_pem,
            "old one kept"
        );
    }
}

#[test]
fn the_serving_certificate_is_renewed_at_half_life() {
    let (material, _) = pki();
    let now = SystemTime::now();
    let authority = Arc::new(authority(&material));
    let fresh = Active::new(authority.clone(), &settings().server_names, now).unwrap();
    assert!(!fresh.serving_needs_renewal(now));
    assert!(!fresh.serving_needs_renewal(now + DAY / 2 - Duration::from_secs(1)));
    assert!(fresh.serving_needs_renewal(now + DAY / 2));
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn files_are_watched() {
    let dir = tempfile::tempdir().unwrap();
    let (anchors, cert, key, root_key) = (
        dir.path().join("ca.crt"),
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        dir.path().join("root.key"),
    );
    let tokens_path = dir.path().join("tokens");
    std::fs::write(&tokens_path, "t1 shop web\n").unwrap();
    let boot = |renew| BootstrapConfig {
        trust_domain: TD.into(),
        material: MaterialSource::Files {
            anchors: anchors.clone(),
            cert: cert.clone(),
            key: key.clone(),
        },
        root_key: Some(root_key.clone()),
        renew_issuer: renew,
        issuer_lifetime: 365 * DAY,
        root_lifetime: 3650 * DAY,
    };
    bootstrap::to_files(&boot(false), &anchors, &cert, &key, SystemTime::now()).unwrap();
    let source = Source::Files {
        anchors: anchors.clone(),
        cert: cert.clone(),
        key: key.clone(),
    };
    let current = current_for(&source.read().await.unwrap());
    let tokens = Arc::new(Tokens::Local(LocalTokens::load(&tokens_path).unwrap()));
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run(
        source,
        settings(),
        current.clone(),
        tokens.clone(),
        metrics.clone(),
        Duration::from_millis(50),
        stop_rx,
    ));

    let first = issuer_of(&current.get());
    bootstrap::to_files(&boot(true), &anchors, &cert, &key, SystemTime::now()).unwrap();
    eventually("the renewed issuer", || issuer_of(&current.get()) != first).await;
    let second = issuer_of(&current.get());
    assert_eq!(second, std::fs::read_to_string(&cert).unwrap());

    // A key that does not fit is refused and counted once; the current issuer stays.
    std::fs::write(&key, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    eventually("the refusal", || {
        metrics
            .encode()
            .contains("trellis_identity_issuer_reloads_total{result=\"rejected\"} 1")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(issuer_of(&current.get()), second);
    assert!(
        metrics.encode().contains("{result=\"rejected\"} 1\n"),
        "logged once, not every poll"
    );

    // The token file is reloaded too.
    std::fs::write(&tokens_path, "t2 shop web\n").unwrap();
    eventually("the new token", || {
        let Tokens::Local(local) = tokens.as_ref() else {
            return false;
        };
        local.table().check("t2").is_ok()
    })
    .await;

    stop_tx.send_replace(true);
    task.await.unwrap();
}
