//! Property tests of the CSR checks and of a certify request as a whole: arbitrary bytes,
//! arbitrary PEM, byte-mutated valid CSRs, and properly signed CSRs asking for arbitrary names
//! never panic; every one is either accepted for exactly the SPIFFE ID it asks for, or refused
//! with a code and a reason.
//!
//! Case counts are fixed so the whole file runs in a few seconds of `cargo test`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use proptest::prelude::*;
use rcgen::SanType;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use trellis_api::Identity;
use trellis_api::certify::ErrorCode;
use trellis_identity::bootstrap;
use trellis_identity::ca::{Authority, csr};
use trellis_identity::limits::CertifyLimits;
use trellis_identity::metrics::Metrics;
use trellis_identity::reload::{Active, Current};
use trellis_identity::server::Certifier;
use trellis_identity::tokens::{LocalTokens, Tokens};

use common::{SERVER_NAME, TD, WEB, certify_body, uri};

const DAY: Duration = Duration::from_secs(86400);

/// A valid CSR for [`WEB`], made once: key generation is the slow part.
fn valid_der() -> &'static Vec<u8> {
    static DER: OnceLock<Vec<u8>> = OnceLock::new();
    DER.get_or_init(|| {
        let (pem, _) = common::csr(vec![uri(WEB)], |_| {});
        CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    })
}

fn pem(der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

/// Every refusal has a CSR code and a reason.
fn check(result: &Result<csr::CheckedCsr, csr::CsrError>) {
    if let Err(e) = result {
        assert!(matches!(
            e.code(),
            ErrorCode::BadCsr | ErrorCode::UnsupportedKey | ErrorCode::IdentityMismatch
        ));
        assert!(!e.to_string().is_empty());
    }
}

/// A byte-level change to a DER document.
#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: usize, bits: u8 },
    Truncate { to: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        any::<usize>().prop_map(|to| Mutation::Truncate { to }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Remove { at, len }),
    ]
}

fn apply(der: &mut Vec<u8>, mutation: &Mutation) {
    let n = der.len();
    match mutation {
        Mutation::Flip { at, bits } => der[at % n] ^= bits,
        Mutation::Truncate { to } => der.truncate(to % n),
        Mutation::Insert { at, bytes } => {
            let at = at % (n + 1);
            der.splice(at..at, bytes.iter().copied());
        }
        Mutation::Remove { at, len } => {
            let at = at % n;
            let end = (at + len).min(n);
            der.drain(at..end);
        }
    }
}

/// The names a signed CSR asks for: URIs near and far from a SPIFFE ID, DNS names, IPs.
fn san() -> impl Strategy<Value = SanType> {
    prop_oneof![
        4 => prop_oneof![
            Just(WEB.to_string()),
            "spiffe://[a-z.]{0,12}/ns/[a-z-]{0,8}/sa/[a-z.-]{0,8}",
            "spiffe://cluster.local/ns/shop/sa/[ -~]{0,10}",
            "[a-z]{1,6}://[ -~]{0,20}",
            "spiffe://cluster.local/[ -~]{0,24}",
        ]
        .prop_filter_map("an IA5 URI", |s| s.as_str().try_into().ok().map(SanType::URI)),
        1 => "[a-z0-9.-]{1,20}".prop_filter_map("an IA5 name", |s| s.as_str().try_into().ok().map(SanType::DnsName)),
        1 => any::<[u8; 4]>().prop_map(|ip| SanType::IpAddress(IpAddr::from(ip))),
    ]
}

/// One certifier for the certify-level property, with a local token table.
fn certifier() -> &'static (Arc<Certifier>, tokio::runtime::Runtime, tempfile::TempDir) {
    static CERTIFIER: OnceLock<(Arc<Certifier>, tokio::runtime::Runtime, tempfile::TempDir)> =
        OnceLock::new();
    CERTIFIER.get_or_init(|| {
        let now = SystemTime::now();
        let (material, _) = bootstrap::generate(TD, 3650 * DAY, 365 * DAY, now).unwrap();
        let authority = Authority::new(&material, TD, DAY, now).unwrap();
        let current = Current::new(
            Active::new(Arc::new(authority), &[SERVER_NAME.to_string()], now).unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "web-token shop web\n").unwrap();
        let certifier = Certifier::new(
            current,
            Arc::new(Tokens::Local(LocalTokens::load(&path).unwrap())),
            Metrics::new(),
            CertifyLimits::default(),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (Arc::new(certifier), runtime, dir)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_is_refused(text in prop_oneof![".{0,64}", "-----BEGIN CERTIFICATE REQUEST-----\n[A-Za-z0-9+/=\n]{0,200}\n-----END CERTIFICATE REQUEST-----\n"]) {
        let result = csr::parse(&text);
        check(&result);
        prop_assert!(result.is_err());
    }

    #[test]
    fn arbitrary_der_is_refused(der in prop::collection::vec(any::<u8>(), 0..300)) {
        let result = csr::parse(&pem(&der));
        check(&result);
        prop_assert!(result.is_err());
    }

    #[test]
    fn a_mutated_valid_csr_is_refused_or_still_asks_for_its_identity(
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut der = valid_der().clone();
        for m in &mutations {
            if der.is_empty() {
                break;
            }
            apply(&mut der, m);
        }
        let result = csr::parse(&pem(&der));
        check(&result);
        // The signature covers the request: a change that still parses and verifies can only
        // be outside it, and the identity asked for is the one signed.
        if let Ok(checked) = &result {
            prop_assert_eq!(checked.identity().to_string(), WEB);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_signed_csr_is_accepted_only_for_one_spiffe_id(names in prop::collection::vec(san(), 0..3)) {
        let uris: Vec<String> = names
            .iter()
            .filter_map(|n| match n {
                SanType::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        let (pem, _) = common::csr(names.clone(), |_| {});
        let result = csr::parse(&pem);
        check(&result);
        let only_uri = names.len() == 1 && uris.len() == 1;
        match &result {
            Ok(checked) => {
                prop_assert!(only_uri, "{names:?}");
                // What is accepted is exactly what was asked for, and reads back the same.
                let asked: Identity = uris[0].parse().unwrap();
                prop_assert_eq!(checked.identity(), &asked);
                prop_assert_eq!(checked.identity().to_string(), uris[0].clone());
            }
            Err(_) => prop_assert!(!only_uri || uris[0].parse::<Identity>().is_err()),
        }
    }

    #[test]
    fn any_certify_body_is_answered(body in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        ".{0,40}".prop_map(|csr| certify_body(&csr, "web-token")),
        "[ -~]{0,20}".prop_map(|token| certify_body(&pem(valid_der()), &token)),
    ]) {
        let (certifier, runtime, _) = certifier();
        let caller = IpAddr::V4(Ipv4Addr::LOCALHOST);
        match runtime.block_on(certifier.certify(caller, &body)) {
            // Only the valid CSR with the right token gets a certificate.
            Ok(answer) => prop_assert!(answer.certificate.contains("BEGIN CERTIFICATE")),
            Err(refusal) => {
                prop_assert!(!refusal.error.error.is_empty());
                prop_assert!(refusal.error.code.status().is_client_error(), "{:?}", refusal.error);
            }
        }
    }
}
