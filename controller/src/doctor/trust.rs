//! The trust anchors and the issuer identity signs with: present, parseable, chained, and far
//! enough from their end.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;

use super::certs::{self, Cert};
use super::checks::{Check, Fetched, Status, listing};

/// The trust anchors and the issuer of the Secret identity signs with.
pub(super) fn trust(
    secret: &Fetched<Secret>,
    namespace: &str,
    name: &str,
    now: Timestamp,
) -> [Check; 2] {
    const ANCHORS: &str = "trust-anchors";
    const ISSUER: &str = "issuer";
    let what = format!("Secret {namespace}/{name}");
    let secret = match secret {
        Fetched::Found(s) => s,
        Fetched::Missing => {
            let missing = |check| {
                Check::new(
                    check,
                    Status::Fail,
                    format!("{what} not found: identity cannot sign certificates"),
                )
                .hint(format!(
                    "identity's bootstrap init container creates it (kubectl -n {namespace} logs \
                     deploy/trellis-identity -c bootstrap); with identity.externalIssuer create \
                     it, or pass --issuer-secret"
                ))
            };
            return [missing(ANCHORS), missing(ISSUER)];
        }
        other => {
            let unknown = |check| other.unknown(check, &what);
            return [unknown(ANCHORS), unknown(ISSUER)];
        }
    };
    let field = |key: &str| -> Result<Vec<Cert>, String> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or_else(|| format!("{what} has no {key}"))?;
        certs::parse_bundle(&bytes.0).map_err(|why| format!("{what}: {key}: {why}"))
    };
    let anchors = field("ca.crt");
    let anchors_check = match &anchors {
        Err(why) => Check::new(ANCHORS, Status::Fail, why.clone())
            .hint("write PEM trust anchors to ca.crt (see docs/concepts/identity.md)"),
        Ok(anchors) => judge_anchors(anchors, now),
    };
    let issuer_check = match field("tls.crt") {
        Err(why) => Check::new(ISSUER, Status::Fail, why)
            .hint("write the issuer certificate to tls.crt (see docs/concepts/identity.md)"),
        Ok(issuer) => judge_issuer(&issuer[0], anchors.as_deref().ok(), now, namespace, name),
    };
    [anchors_check, issuer_check]
}

const ROTATE_ANCHORS: &str = "add a new root to ca.crt beside the old one, renew the issuer under it, then remove the old \
     root (docs/concepts/identity.md, rotation)";

fn judge_anchors(anchors: &[Cert], now: Timestamp) -> Check {
    const NAME: &str = "trust-anchors";
    let graded: Vec<(&Cert, Status, String)> = anchors
        .iter()
        .map(|c| {
            let (s, w) = certs::grade(c, now);
            (c, s, w)
        })
        .collect();
    let count = format!(
        "{} anchor{}",
        anchors.len(),
        if anchors.len() == 1 { "" } else { "s" }
    );
    // The anchor that lives longest keeps the mesh running; an older one ending is a
    // warning (take it out of ca.crt), unless nothing outlives it.
    let Some((newest, status, when)) = graded.iter().max_by_key(|(c, _, _)| c.not_after) else {
        return Check::new(NAME, Status::Fail, "no trust anchor");
    };
    if *status != Status::Ok {
        return Check::new(NAME, *status, format!("{count}; {} {when}", newest.subject))
            .hint(ROTATE_ANCHORS);
    }
    let ending: Vec<String> = graded
        .iter()
        .filter(|(_, s, _)| *s != Status::Ok)
        .map(|(c, _, w)| format!("{} {w}", c.subject))
        .collect();
    if !ending.is_empty() {
        return Check::new(NAME, Status::Warn, format!("{count}; {}", listing(&ending)))
            .hint("once no issuer chains to it, remove the old anchor from ca.crt");
    }
    Check::ok(NAME, format!("{count}; the last {when}"))
}

fn judge_issuer(
    issuer: &Cert,
    anchors: Option<&[Cert]>,
    now: Timestamp,
    namespace: &str,
    secret: &str,
) -> Check {
    const NAME: &str = "issuer";
    let renew = format!(
        "renew it under the same root: trellis-identity bootstrap --issuer-secret \
         {namespace}/{secret} --root-key <root.key> --renew-issuer (docs/concepts/identity.md)"
    );
    if !issuer.is_ca {
        return Check::new(
            NAME,
            Status::Fail,
            format!("{} is not a CA certificate: it cannot sign", issuer.subject),
        )
        .hint(renew);
    }
    if let Some(anchors) = anchors
        && !anchors.iter().any(|a| a.subject_der == issuer.issuer_der)
    {
        return Check::new(
            NAME,
            Status::Fail,
            format!(
                "{} was not issued by any trust anchor in ca.crt: proxies reject what it signs",
                issuer.subject
            ),
        )
        .hint("put the root that signed the issuer into ca.crt, or renew the issuer under one of the anchors");
    }
    let (status, when) = certs::grade(issuer, now);
    let check = Check::new(NAME, status, format!("{} {when}", issuer.subject));
    match status {
        Status::Ok => check,
        _ => check.hint(renew),
    }
}
