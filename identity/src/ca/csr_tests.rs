//! Table tests of the CSR checks: every refusal names what is wrong.

use rcgen::{BasicConstraints, DnType, IsCa, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;

use super::*;
use crate::test_support::{WEB, csr_for, csr_with, uri};

const RSA_CSR: &str = include_str!("testdata/rsa.csr");
const P521_CSR: &str = include_str!("testdata/p521.csr");

fn p256() -> KeyPair {
    KeyPair::generate().unwrap()
}

/// The CSR's DER with `edit` applied, back in PEM.
fn tampered(pem: &str, edit: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    edit(&mut der);
    crate::ca::pem("CERTIFICATE REQUEST", &der)
}

#[test]
fn accepted_key_types() {
    for (name, alg) in [
        ("P-256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("P-384", &rcgen::PKCS_ECDSA_P384_SHA384),
        ("Ed25519", &rcgen::PKCS_ED25519),
    ] {
        let key = KeyPair::generate_for(alg).unwrap();
        let checked = parse(&csr_with(vec![uri(WEB)], &key, |_| {}))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(checked.identity().to_string(), WEB, "{name}");
    }
    let (pem, _) = csr_for(WEB);
    assert_eq!(parse(&pem).unwrap().key_type(), KeyType::EcdsaP256);
}

#[test]
fn refusals() {
    let (good, _) = csr_for(WEB);
    let dns = SanType::DnsName("web.shop.svc".try_into().unwrap());
    let ip = SanType::IpAddress("10.0.0.1".parse().unwrap());
    let mail = SanType::Rfc822Name("web@shop".try_into().unwrap());
    let cases: Vec<(&str, String, CsrError)> = vec![
        ("no SAN", csr_with(vec![], &p256(), |_| {}), CsrError::NoSan),
        (
            "extra DNS SAN",
            csr_with(vec![uri(WEB), dns.clone()], &p256(), |_| {}),
            CsrError::OtherName("the DNS name \"web.shop.svc\"".into()),
        ),
        (
            "DNS SAN only",
            csr_with(vec![dns], &p256(), |_| {}),
            CsrError::OtherName("the DNS name \"web.shop.svc\"".into()),
        ),
        (
            "IP SAN",
            csr_with(vec![uri(WEB), ip], &p256(), |_| {}),
            CsrError::OtherName("the IP address 10.0.0.1".into()),
        ),
        (
            "email SAN",
            csr_with(vec![mail, uri(WEB)], &p256(), |_| {}),
            CsrError::OtherName("the email address \"web@shop\"".into()),
        ),
        (
            "two URIs",
            csr_with(
                vec![uri(WEB), uri("spiffe://cluster.local/ns/shop/sa/admin")],
                &p256(),
                |_| {},
            ),
            CsrError::SeveralUris(2),
        ),
        (
            "a URI that is not SPIFFE",
            csr_with(vec![uri("https://web.shop")], &p256(), |_| {}),
            CsrError::NotSpiffe("https://web.shop".into()),
        ),
        (
            "a SPIFFE URI of another shape",
            csr_with(vec![uri("spiffe://cluster.local/web")], &p256(), |_| {}),
            CsrError::NotSpiffe("spiffe://cluster.local/web".into()),
        ),
        (
            "CA request",
            csr_with(vec![uri(WEB)], &p256(), |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
            }),
            CsrError::BasicConstraints("cA: true".into()),
        ),
        (
            "explicit basic constraints",
            csr_with(vec![uri(WEB)], &p256(), |p| p.is_ca = IsCa::ExplicitNoCa),
            CsrError::BasicConstraints("cA: false".into()),
        ),
        (
            "RSA key",
            RSA_CSR.to_string(),
            CsrError::UnsupportedKey("RSA".into()),
        ),
        (
            "P-521 key",
            P521_CSR.to_string(),
            CsrError::UnsupportedKey("ECDSA on curve 1.3.132.0.35".into()),
        ),
        (
            "signature flipped",
            tampered(&good, |der| {
                if let Some(last) = der.last_mut() {
                    *last ^= 0x01;
                }
            }),
            CsrError::BadSignature,
        ),
        (
            "name changed after signing",
            tampered(&good, |der| {
                let at = der.windows(3).position(|w| w == b"web").unwrap();
                der[at + 2] = b'x';
            }),
            CsrError::BadSignature,
        ),
        (
            "trailing data",
            tampered(&good, |der| der.push(0)),
            CsrError::Malformed("trailing data after the request".into()),
        ),
    ];
    for (name, pem, expected) in cases {
        let got = parse(&pem).map(|c| c.identity().to_string());
        assert_eq!(got, Err(expected), "{name}");
    }
}

#[test]
fn unreadable_input() {
    let (good, _) = csr_for(WEB);
    let garbled = good.replacen("MII", "M!I", 1);
    for (name, pem) in [
        ("empty", String::new()),
        ("not PEM", "hello".to_string()),
        (
            "a certificate instead",
            good.replace("CERTIFICATE REQUEST", "CERTIFICATE"),
        ),
        ("garbled base64", garbled),
    ] {
        let err = parse(&pem).unwrap_err();
        assert!(
            matches!(err, CsrError::NotPem(_) | CsrError::Malformed(_)),
            "{name}: {err:?}"
        );
        assert_eq!(err.code(), ErrorCode::BadCsr, "{name}");
    }
    let truncated = tampered(&good, |der| der.truncate(der.len() / 2));
    assert!(matches!(parse(&truncated), Err(CsrError::Malformed(_))));
}

#[test]
fn requested_subject_and_usages_are_ignored() {
    let pem = csr_with(vec![uri(WEB)], &p256(), |p| {
        p.distinguished_name.push(DnType::CommonName, "admin");
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
    });
    assert_eq!(parse(&pem).unwrap().identity().to_string(), WEB);
}

#[test]
fn identity_must_be_the_tokens() {
    let (pem, _) = csr_for(WEB);
    let checked = parse(&pem).unwrap();
    assert_eq!(
        checked.check_identity(&Identity::new("cluster.local", "shop", "web")),
        Ok(())
    );
    let cases = [
        (
            Identity::new("cluster.local", "shop", "admin"),
            "the CSR asks for spiffe://cluster.local/ns/shop/sa/web, but the token belongs to \
             spiffe://cluster.local/ns/shop/sa/admin",
        ),
        (
            Identity::new("cluster.local", "billing", "web"),
            "the CSR asks for spiffe://cluster.local/ns/shop/sa/web, but the token belongs to \
             spiffe://cluster.local/ns/billing/sa/web",
        ),
        (
            Identity::new("prod.example", "shop", "web"),
            "the CSR asks for trust domain \"cluster.local\", but this identity service signs \
             for \"prod.example\" (the CSR asks for spiffe://cluster.local/ns/shop/sa/web)",
        ),
    ];
    for (expected, message) in cases {
        let err = checked.check_identity(&expected).unwrap_err();
        assert_eq!(err.code(), ErrorCode::IdentityMismatch);
        assert_eq!(err.to_string(), message);
    }
}

#[test]
fn codes() {
    assert_eq!(CsrError::BadSignature.code(), ErrorCode::BadCsr);
    assert_eq!(
        CsrError::UnsupportedKey("RSA".into()).code(),
        ErrorCode::UnsupportedKey
    );
    assert_eq!(
        CsrError::BasicConstraints("cA: true".into()).code(),
        ErrorCode::BadCsr
    );
}
