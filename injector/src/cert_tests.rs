use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};
use serde_json::json;

use super::*;

fn names() -> Vec<String> {
    dns_names("trellis-injector", "trellis-system")
}

#[test]
fn generated_certificate_serves_the_service_names_for_a_year() {
    let now = SystemTime::now();
    let cert = generate(&names(), now, None).unwrap();
    let info = inspect(&cert.cert_pem).unwrap();
    assert_eq!(
        info.dns_names,
        [
            "trellis-injector",
            "trellis-injector.trellis-system",
            "trellis-injector.trellis-system.svc"
        ]
    );
    let lifetime = info.not_after.duration_since(now).unwrap();
    assert!(
        lifetime > VALIDITY - Duration::from_secs(5) && lifetime <= VALIDITY,
        "{lifetime:?}"
    );
    assert_eq!(
        CertificateDer::pem_slice_iter(cert.ca_pem.as_bytes()).count(),
        1
    );
    certified_key(&cert.cert_pem, &cert.key_pem).unwrap();
    assert_eq!(renewal_reason(&cert, &names(), now), None);
    assert!(!format!("{cert:?}").contains("PRIVATE KEY"));
}

#[test]
fn renewal_reasons() {
    let now = SystemTime::now();
    let cert = generate(&names(), now, None).unwrap();
    let later = now + VALIDITY - RENEW_BEFORE + Duration::from_secs(1);
    assert_eq!(
        renewal_reason(&cert, &names(), later).as_deref(),
        Some("it expires within 30 days")
    );
    let other = dns_names("trellis-injector", "elsewhere");
    assert_eq!(
        renewal_reason(&cert, &other, now).as_deref(),
        Some("it is not valid for trellis-injector.elsewhere")
    );
    let garbage = ServingCert {
        cert_pem: "nope".into(),
        ..cert
    };
    assert_eq!(
        renewal_reason(&garbage, &names(), now).as_deref(),
        Some("no PEM certificate found")
    );
}

#[test]
fn renewal_keeps_the_previous_ca_in_the_bundle_while_it_is_valid() {
    let now = SystemTime::now();
    let old = generate(&names(), now, None).unwrap();
    let new = generate(&names(), now, Some(&old.ca_pem)).unwrap();
    let bundle: Vec<_> = CertificateDer::pem_slice_iter(new.ca_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let old_ca = CertificateDer::from_pem_slice(old.ca_pem.as_bytes()).unwrap();
    assert_eq!(bundle.len(), 2);
    assert_eq!(bundle[1], old_ca);
    // An expired previous CA is dropped.
    let much_later = now + VALIDITY + Duration::from_secs(60);
    let newer = generate(&names(), much_later, Some(&old.ca_pem)).unwrap();
    assert_eq!(
        CertificateDer::pem_slice_iter(newer.ca_pem.as_bytes()).count(),
        1
    );
}

#[test]
fn secret_round_trip_and_ownership() {
    let cert = generate(&names(), SystemTime::now(), None).unwrap();
    let secret = to_secret("trellis-injector-tls", "trellis-system", &cert);
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert!(is_managed(&secret));
    assert_eq!(from_secret(&secret).unwrap(), cert);

    let mut foreign = secret.clone();
    foreign.metadata.labels = None;
    assert!(!is_managed(&foreign));
    // cert-manager may omit ca.crt; the certificate is still usable.
    if let Some(data) = foreign.data.as_mut() {
        data.remove(CA_CRT);
    }
    assert_eq!(from_secret(&foreign).unwrap().ca_pem, "");
}

#[test]
fn unusable_secrets_say_why() {
    let a = generate(&names(), SystemTime::now(), None).unwrap();
    let b = generate(&names(), SystemTime::now(), None).unwrap();
    let mismatched = ServingCert {
        key_pem: b.key_pem.clone(),
        ..a.clone()
    };
    let mut no_key = to_secret("s", "ns", &a);
    if let Some(data) = no_key.data.as_mut() {
        data.remove(TLS_KEY);
    }
    let cases = [
        (
            to_secret("s", "ns", &mismatched),
            "does not fit the certificate",
        ),
        (no_key, "it has no tls.key"),
        (Secret::default(), "it has no tls.crt"),
    ];
    for (secret, want) in cases {
        let error = from_secret(&secret).unwrap_err().to_string();
        assert!(error.contains(want), "{error}");
    }
}

fn configuration(bundles: &[Option<&str>]) -> MutatingWebhookConfiguration {
    MutatingWebhookConfiguration {
        webhooks: Some(
            bundles
                .iter()
                .enumerate()
                .map(|(i, bundle)| MutatingWebhook {
                    name: format!("hook{i}.trellis.dev"),
                    client_config: WebhookClientConfig {
                        ca_bundle: bundle.map(|b| ByteString(b.as_bytes().to_vec())),
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    }
}

#[test]
fn ca_bundle_patch_touches_only_webhooks_that_differ() {
    let ca = "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n";
    assert_eq!(
        ca_bundle_patch(&configuration(&[Some(ca), Some(ca)]), ca),
        None
    );
    assert_eq!(ca_bundle_patch(&configuration(&[]), ca), None);

    let patch = ca_bundle_patch(&configuration(&[Some(ca), None, Some("old")]), ca).unwrap();
    let encoded = BASE64.encode(ca);
    assert_eq!(
        serde_json::to_value(&patch).unwrap(),
        json!([
            {"op": "test", "path": "/webhooks/1/name", "value": "hook1.trellis.dev"},
            {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": encoded},
            {"op": "test", "path": "/webhooks/2/name", "value": "hook2.trellis.dev"},
            {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": encoded},
        ])
    );
    // Applied to the configuration, every webhook then trusts the CA and a second pass is a
    // no-op.
    let mut value = serde_json::to_value(configuration(&[Some(ca), None, Some("old")])).unwrap();
    json_patch::patch(&mut value, &patch).unwrap();
    let fixed: MutatingWebhookConfiguration = serde_json::from_value(value).unwrap();
    assert_eq!(ca_bundle_patch(&fixed, ca), None);
}

#[test]
fn resolver_swaps_the_served_certificate() {
    let a = generate(&names(), SystemTime::now(), None).unwrap();
    let b = generate(&names(), SystemTime::now(), None).unwrap();
    let resolver = Resolver::new(certified_key(&a.cert_pem, &a.key_pem).unwrap());
    let b_key = certified_key(&b.cert_pem, &b.key_pem).unwrap();
    resolver.set(b_key.clone());
    assert_eq!(resolver.get().cert, b_key.cert);
    server_config(resolver).unwrap();
}
