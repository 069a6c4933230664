//! Certificate dates for `doctor`: PEM bundles parsed into the few facts the checks judge, and
//! the grading of a validity period against a given instant (never the wall clock).

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use x509_parser::pem::Pem;

use super::checks::Status;

/// Closer to its end than this, a certificate is a warning.
pub const WARN_WITHIN: SignedDuration = SignedDuration::from_hours(30 * 24);
/// Closer than this (or past it), a failure.
pub const FAIL_WITHIN: SignedDuration = SignedDuration::from_hours(7 * 24);

/// What the checks read from one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cert {
    /// The subject as text, for messages.
    pub subject: String,
    /// The subject and issuer names as encoded, for matching an issuer to its anchor.
    pub subject_der: Vec<u8>,
    pub issuer_der: Vec<u8>,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    pub is_ca: bool,
}

/// Every certificate of a PEM bundle, in order. Blocks of other kinds (a key) are skipped; a
/// bundle with no certificate, or with a block that does not parse, is an error worded for a
/// message.
pub fn parse_bundle(pem: &[u8]) -> Result<Vec<Cert>, String> {
    let mut certs = Vec::new();
    for (i, block) in Pem::iter_from_buffer(pem).enumerate() {
        let block = block.map_err(|e| format!("PEM block {} does not parse ({e})", i + 1))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        let x509 = block
            .parse_x509()
            .map_err(|e| format!("certificate {} is not valid X.509 ({e})", certs.len() + 1))?;
        let time = |t: x509_parser::time::ASN1Time| {
            Timestamp::from_second(t.timestamp())
                .map_err(|_| format!("certificate {} has a date out of range", certs.len() + 1))
        };
        certs.push(Cert {
            subject: x509.subject().to_string(),
            subject_der: x509.subject().as_raw().to_vec(),
            issuer_der: x509.issuer().as_raw().to_vec(),
            not_before: time(x509.validity().not_before)?,
            not_after: time(x509.validity().not_after)?,
            is_ca: x509.is_ca(),
        });
    }
    if certs.is_empty() {
        return Err("no PEM certificate in it".to_string());
    }
    Ok(certs)
}

/// The status of a validity period at `now`, and a phrase for the message: "valid until
/// 2027-12-06 (365 days)", "expires 2026-12-10 (in 4 days)", "expired 2026-12-01 (5 days ago)".
pub fn grade(cert: &Cert, now: Timestamp) -> (Status, String) {
    let left = cert.not_after.duration_since(now);
    if now < cert.not_before {
        return (
            Status::Fail,
            format!(
                "not valid before {} (clock skew, or issued for later)",
                day(cert.not_before)
            ),
        );
    }
    if left <= SignedDuration::ZERO {
        return (
            Status::Fail,
            format!(
                "expired {} ({} ago)",
                day(cert.not_after),
                days(left.checked_neg().unwrap_or(SignedDuration::MAX))
            ),
        );
    }
    let phrase = |verb: &str| format!("{verb} {} (in {})", day(cert.not_after), days(left));
    if left < FAIL_WITHIN {
        (Status::Fail, phrase("expires"))
    } else if left < WARN_WITHIN {
        (Status::Warn, phrase("expires"))
    } else {
        (Status::Ok, phrase("valid until"))
    }
}

/// `2026-12-06`.
pub fn day(t: Timestamp) -> String {
    t.strftime("%Y-%m-%d").to_string()
}

/// Whole days, or hours under two days: "3 days", "1 day", "20 hours".
pub fn days(d: SignedDuration) -> String {
    let hours = d.as_hours();
    if hours < 48 {
        plural(hours, "hour")
    } else {
        plural(hours / 24, "day")
    }
}

fn plural(n: i64, unit: &str) -> String {
    if n == 1 {
        format!("1 {unit}")
    } else {
        format!("{n} {unit}s")
    }
}
