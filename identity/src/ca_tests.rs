//! Signing and issuer checks: what a leaf contains, that it chains to the anchors, and which
//! issuers are refused.

use rcgen::KeyPair;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME};

use super::*;
use crate::bootstrap;
use crate::test_support::{DAY, TD, WEB, authority, csr_for, csr_with, pki, uri};

fn issue(authority: &Authority, uri: &str, now: SystemTime) -> Issued {
    let (pem, _) = csr_for(uri);
    authority.certify(&csr::parse(&pem).unwrap(), now).unwrap()
}

#[test]
fn leaf_fields() {
    let (material, _) = pki();
    let authority = authority(&material);
    let now = SystemTime::now();
    let (pem, key) = csr_for(WEB);
    let issued = authority.certify(&csr::parse(&pem).unwrap(), now).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&issued.cert_der).unwrap();

    assert!(
        cert.subject().iter().next().is_none(),
        "subject must be empty"
    );
    let san = cert
        .get_extension_unique(&OID_X509_EXT_SUBJECT_ALT_NAME)
        .unwrap()
        .unwrap();
    assert!(san.critical, "with an empty subject the SAN is critical");
    let ParsedExtension::SubjectAlternativeName(names) = san.parsed_extension() else {
        panic!("SAN not parsed");
    };
    assert_eq!(names.general_names, vec![GeneralName::URI(WEB)]);

    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca, "not a CA");
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.value.digital_signature() && !ku.value.key_cert_sign());
    assert!(
        cert.get_extension_unique(&OID_X509_EXT_KEY_USAGE)
            .unwrap()
            .unwrap()
            .critical
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any && !eku.code_signing);

    let (not_before, not_after) = validity(&cert);
    let secs = |t: SystemTime| unix_seconds(t);
    assert_eq!(secs(not_before), secs(now - BACKDATE));
    assert_eq!(secs(not_after), secs(now + DAY));
    assert_eq!(issued.not_after, now + DAY);

    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    assert_eq!(cert.raw_serial().len(), 16);
    assert_eq!(issued.serial.len(), 32);

    // Chains to the root: through webpki as peers verify, and by signature with x509-parser.
    authority
        .anchors()
        .verify(&issued.cert_der, authority.chain_der(), now)
        .unwrap();
    let (_, issuer) = x509_parser::parse_x509_certificate(&authority.chain_der()[0]).unwrap();
    cert.verify_signature(Some(issuer.public_key())).unwrap();
    assert_eq!(cert.issuer(), issuer.subject());
    assert_eq!(
        authority.chain_pem().len(),
        1,
        "the chain is the issuer; roots are anchors"
    );
}

#[test]
fn serials_differ() {
    let (material, _) = pki();
    let authority = authority(&material);
    let now = SystemTime::now();
    let a = issue(&authority, WEB, now);
    let b = issue(&authority, WEB, now);
    assert_ne!(a.serial, b.serial);
}

#[test]
fn lifetime_never_exceeds_the_issuer() {
    let (material, root_key) = pki();
    let now = SystemTime::now();
    let short = bootstrap::renew_issuer(
        &material.anchors_pem,
        &root_key,
        TD,
        Duration::from_secs(2 * 3600),
        now,
    )
    .unwrap();
    let authority = Authority::new(&short, TD, DAY, now).unwrap();
    let issued = issue(&authority, WEB, now);
    assert_eq!(issued.not_after, authority.issuer_not_after());
    assert!(issued.not_after < now + DAY);
}

#[test]
fn serving_certificate_is_valid_for_its_names() {
    let (material, _) = pki();
    let authority = authority(&material);
    let now = SystemTime::now();
    let names = vec![
        "trellis-identity.trellis-system.svc".to_string(),
        "127.0.0.1".to_string(),
    ];
    let (key, _) = authority.serving_cert(&names, now).unwrap();
    assert_eq!(key.cert.len(), 2, "leaf and issuer");
    let anchors: Vec<_> = authority
        .anchors()
        .certs()
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).unwrap())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&key.cert[0]).unwrap();
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &key.cert[1..],
        unix_time(now),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .unwrap();
    for name in &names {
        let name = rustls_pki_types::ServerName::try_from(name.as_str()).unwrap();
        leaf.verify_is_valid_for_subject_name(&name).unwrap();
    }
}

#[test]
fn rotation_under_the_same_root() {
    let (old, root_key) = pki();
    let now = SystemTime::now();
    let new = bootstrap::renew_issuer(&old.anchors_pem, &root_key, TD, 365 * DAY, now).unwrap();
    assert_eq!(new.anchors_pem, old.anchors_pem);
    assert_ne!(new.issuer_cert_pem, old.issuer_cert_pem);
    let (old, new) = (authority(&old), authority(&new));
    let from_old = issue(&old, WEB, now);
    let from_new = issue(&new, WEB, now);
    // Each verifies against the one set of anchors, with its own issuer in the chain.
    old.anchors()
        .verify(&from_old.cert_der, old.chain_der(), now)
        .unwrap();
    old.anchors()
        .verify(&from_new.cert_der, new.chain_der(), now)
        .unwrap();
    assert!(
        old.anchors()
            .verify(&from_new.cert_der, old.chain_der(), now)
            .is_err()
    );
}

#[test]
fn several_anchors_while_a_root_is_replaced() {
    let (old, _) = pki();
    let (next, _) = pki();
    let mut both = next.clone();
    both.anchors_pem = format!("{}{}", old.anchors_pem, next.anchors_pem);
    let now = SystemTime::now();
    let old_authority = authority(&old);
    let next_authority = Authority::new(&both, TD, DAY, now).unwrap();
    assert_eq!(next_authority.anchors().certs().len(), 2);
    let from_old = issue(&old_authority, WEB, now);
    let from_next = issue(&next_authority, WEB, now);
    let anchors = next_authority.anchors();
    anchors
        .verify(&from_old.cert_der, old_authority.chain_der(), now)
        .unwrap();
    anchors
        .verify(&from_next.cert_der, next_authority.chain_der(), now)
        .unwrap();
}

#[test]
fn bad_issuers_are_refused() {
    let (good, root_key) = pki();
    let (other, _) = pki();
    let now = SystemTime::now();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_csr = csr_with(vec![uri(WEB)], &leaf_key, |_| {});
    let leaf = authority(&good)
        .certify(&csr::parse(&leaf_csr).unwrap(), now)
        .unwrap();
    let long_ago = now - 400 * DAY;
    let expired =
        bootstrap::renew_issuer(&good.anchors_pem, &root_key, TD, 365 * DAY, long_ago).unwrap();

    let with = |f: &dyn Fn(&mut Material)| {
        let mut m = good.clone();
        f(&mut m);
        m
    };
    let cases: Vec<(&str, Material, &str)> = vec![
        (
            "issuer under another root",
            with(&|m| m.anchors_pem = other.anchors_pem.clone()),
            "does not chain to the trust anchors",
        ),
        (
            "key of another issuer",
            with(&|m| m.issuer_key_pem = other.issuer_key_pem.clone()),
            "the key does not belong to the certificate",
        ),
        ("expired issuer", expired, "expired at"),
        (
            "a workload certificate as issuer",
            with(&|m| {
                m.issuer_cert_pem = leaf.cert_pem.clone();
                m.issuer_key_pem = leaf_key.serialize_pem();
            }),
            "is not a CA certificate",
        ),
        (
            "key not PEM",
            with(&|m| m.issuer_key_pem = "nope".into()),
            "not a usable PKCS#8 PEM private key",
        ),
        (
            "no issuer certificate",
            with(&|m| m.issuer_cert_pem = String::new()),
            "no PEM certificate",
        ),
        (
            "no anchors",
            with(&|m| m.anchors_pem = "\n".into()),
            "trust anchors: no PEM certificate",
        ),
        (
            "a workload certificate as anchor",
            with(&|m| m.anchors_pem = leaf.cert_pem.clone()),
            "is not a CA certificate",
        ),
    ];
    for (name, material, expected) in cases {
        let err = Authority::new(&material, TD, DAY, now)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{name}: {err}");
    }
}

#[test]
fn times_read_as_rfc3339() {
    for (secs, text) in [
        (0, "1970-01-01T00:00:00Z"),
        (951_782_400, "2000-02-29T00:00:00Z"),
        (1_795_432_834, "2026-11-23T11:20:34Z"),
    ] {
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(secs)), text);
    }
}
