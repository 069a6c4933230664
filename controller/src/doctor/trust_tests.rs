//! Certificate dates and the trust anchors and issuer, judged at a fixed instant.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use k8s_openapi::jiff::SignedDuration;
use rcgen::KeyPair;

use k8s_openapi::api::core::v1::Secret;

use super::certs;
use super::checks::*;
use super::fixtures::*;

#[test]
fn certificates_are_graded_at_thirty_and_seven_days() {
    let cases = [
        (
            "2026-01-01T00:00:00Z",
            "2027-12-06T00:00:00Z",
            Status::Ok,
            "valid until 2027-12-06 (in 365 days)",
        ),
        (
            "2026-01-01T00:00:00Z",
            "2027-01-05T00:00:00Z",
            Status::Ok,
            "valid until 2027-01-05 (in 30 days)",
        ),
        (
            "2026-01-01T00:00:00Z",
            "2027-01-04T23:00:00Z",
            Status::Warn,
            "expires 2027-01-04 (in 29 days)",
        ),
        (
            "2026-01-01T00:00:00Z",
            "2026-12-13T00:00:00Z",
            Status::Warn,
            "expires 2026-12-13 (in 7 days)",
        ),
        (
            "2026-01-01T00:00:00Z",
            "2026-12-12T23:00:00Z",
            Status::Fail,
            "expires 2026-12-12 (in 6 days)",
        ),
        (
            "2026-01-01T00:00:00Z",
            "2026-12-07T00:00:00Z",
            Status::Fail,
            "expires 2026-12-07 (in 24 hours)",
        ),
        (
            "2026-01-01T00:00:00Z",
            "2026-12-06T00:00:00Z",
            Status::Fail,
            "expired 2026-12-06 (0 hours ago)",
        ),
        (
            "2026-01-01T00:00:00Z",
            "2026-12-01T00:00:00Z",
            Status::Fail,
            "expired 2026-12-01 (5 days ago)",
        ),
        (
            "2026-12-08T00:00:00Z",
            "2027-12-08T00:00:00Z",
            Status::Fail,
            "not valid before 2026-12-08",
        ),
    ];
    for (before, after, status, phrase) in cases {
        let (got, words) = certs::grade(&dated(before, after), now());
        assert_eq!(got, status, "{after}: {words}");
        assert!(
            words.starts_with(phrase),
            "{after}: {words:?} is not {phrase:?}…"
        );
    }
    assert_eq!(certs::days(SignedDuration::from_hours(47)), "47 hours");
    assert_eq!(
        certs::days(SignedDuration::from_hours(24 * 400)),
        "400 days"
    );
}

#[test]
fn pem_bundles_parse_or_say_why() {
    let (root, _) = ca("root", (2026, 1, 1), (2036, 1, 1), None);
    let (other, _) = ca("other", (2026, 1, 1), (2027, 1, 1), None);
    let key = KeyPair::generate().unwrap().serialize_pem();
    let bundle = format!("{root}{key}{other}");
    let certs = certs::parse_bundle(bundle.as_bytes()).unwrap();
    assert_eq!(certs.len(), 2, "the key is skipped");
    assert_eq!(certs[0].subject, "CN=root");
    assert_eq!(certs[0].subject_der, certs[0].issuer_der, "self-signed");
    assert_eq!(certs[1].not_after, "2027-01-01T00:00:00Z".parse().unwrap());
    assert!(certs[0].is_ca);
    for bad in [&b""[..], b"not pem", key.as_bytes()] {
        let e = certs::parse_bundle(bad).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
    let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let e = certs::parse_bundle(broken.as_bytes()).unwrap_err();
    assert!(e.contains("certificate 1 is not valid X.509"), "{e}");
}

#[test]
fn trust_anchors_and_issuer() {
    let (root, root_issuer) = ca("root.trellis", (2026, 1, 1), (2036, 1, 1), None);
    let (old_root, old_issuer) = ca("old-root", (2016, 1, 1), (2026, 12, 1), None);
    let (ending_root, ending_issuer) = ca("ending-root", (2016, 1, 1), (2026, 12, 20), None);
    let (issuer, _) = ca(
        "issuer.trellis",
        (2026, 1, 1),
        (2027, 12, 1),
        Some(&root_issuer),
    );
    let (expiring, _) = ca(
        "issuer.trellis",
        (2026, 1, 1),
        (2026, 12, 20),
        Some(&root_issuer),
    );
    let (under_old, _) = ca(
        "issuer.old",
        (2026, 1, 1),
        (2026, 12, 30),
        Some(&old_issuer),
    );
    let (under_ending, _) = ca(
        "issuer.e",
        (2026, 1, 1),
        (2026, 12, 19),
        Some(&ending_issuer),
    );
    let (stranger, _) = ca("issuer.stranger", (2026, 1, 1), (2027, 12, 1), None);
    let both = format!("{old_root}{root}");
    let denied = Access::new("get", "secrets")
        .named(DEFAULT_ISSUER_SECRET)
        .within(NS);
    // What the Secret holds, and the verdicts on the anchors and the issuer.
    type Case<'a> = (
        &'a str,
        Fetched<Secret>,
        (Status, &'a str),
        (Status, &'a str),
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "healthy",
            Fetched::Found(secret(Some(&root), Some(&issuer))),
            (Status::Ok, "1 anchor; the last valid until 2036-01-01"),
            (Status::Ok, "CN=issuer.trellis valid until 2027-12-01"),
        ),
        (
            "issuer expiring",
            Fetched::Found(secret(Some(&root), Some(&expiring))),
            (Status::Ok, "1 anchor"),
            (
                Status::Warn,
                "CN=issuer.trellis expires 2026-12-20 (in 14 days)",
            ),
        ),
        (
            "old anchor expired beside a new one",
            Fetched::Found(secret(Some(&both), Some(&issuer))),
            (
                Status::Warn,
                "2 anchors; CN=old-root expired 2026-12-01 (5 days ago)",
            ),
            (Status::Ok, "valid until"),
        ),
        (
            "every anchor expired",
            Fetched::Found(secret(Some(&old_root), Some(&under_old))),
            (Status::Fail, "1 anchor; CN=old-root expired 2026-12-01"),
            (Status::Warn, "CN=issuer.old expires 2026-12-30"),
        ),
        (
            "the only anchor ends in 14 days",
            Fetched::Found(secret(Some(&ending_root), Some(&under_ending))),
            (Status::Warn, "CN=ending-root expires 2026-12-20"),
            (Status::Warn, "expires 2026-12-19"),
        ),
        (
            "issuer from another root",
            Fetched::Found(secret(Some(&root), Some(&stranger))),
            (Status::Ok, "1 anchor"),
            (
                Status::Fail,
                "CN=issuer.stranger was not issued by any trust anchor",
            ),
        ),
        (
            "no tls.crt",
            Fetched::Found(secret(Some(&root), None)),
            (Status::Ok, "1 anchor"),
            (
                Status::Fail,
                "Secret trellis-system/trellis-identity-issuer has no tls.crt",
            ),
        ),
        (
            "garbage ca.crt",
            Fetched::Found(secret(Some("junk"), Some(&issuer))),
            (Status::Fail, "ca.crt: no PEM certificate in it"),
            (Status::Ok, "valid until"),
        ),
        (
            "missing",
            Fetched::Missing,
            (Status::Fail, "not found: identity cannot sign"),
            (Status::Fail, "not found: identity cannot sign"),
        ),
        (
            "forbidden",
            Fetched::Denied(denied),
            (
                Status::Unknown,
                "cannot read Secret trellis-system/trellis-identity-issuer: forbidden",
            ),
            (Status::Unknown, "forbidden"),
        ),
    ];
    for (what, fetched, anchors, issuer) in cases {
        let mut cluster = healthy_cluster();
        cluster.issuer_secret = fetched;
        let checks = judge(&cluster, now());
        for (name, (status, words)) in [("trust-anchors", anchors), ("issuer", issuer)] {
            let c = find(&checks, name);
            assert_eq!(c.status, status, "{what}: {c:#?}");
            assert!(c.message.contains(words), "{what}: {c:#?}");
        }
    }
    let mut cluster = healthy_cluster();
    cluster.issuer_secret = Fetched::Found(secret(Some(&root), Some(&expiring)));
    let c = find(&judge(&cluster, now()), "issuer").clone();
    assert!(c.hint.contains("--renew-issuer"), "{c:#?}");
}
