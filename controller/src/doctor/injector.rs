//! The injector's checks: its webhook configuration and CA bundle, its endpoints, and whether
//! the API server reaches it.

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, MutatingWebhookConfiguration};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;

use super::certs;
use super::checks::{
    Check, Fetched, INJECTOR_SERVICE, Status, WEBHOOK_CONFIGURATION, WEBHOOK_NAME,
};

/// The chart's webhook in the configuration (or its only one).
pub(super) fn trellis_webhook(config: &MutatingWebhookConfiguration) -> Option<&MutatingWebhook> {
    let hooks = config.webhooks.as_deref().unwrap_or_default();
    hooks
        .iter()
        .find(|w| w.name == WEBHOOK_NAME)
        .or(match hooks {
            [only] => Some(only),
            _ => None,
        })
}

pub(super) fn webhook(
    config: &Fetched<MutatingWebhookConfiguration>,
    namespace: &str,
    now: Timestamp,
) -> Check {
    const NAME: &str = "injector-webhook";
    let config = match config {
        Fetched::Found(c) => c,
        Fetched::Missing => {
            return Check::new(
                NAME,
                Status::Fail,
                format!(
                    "MutatingWebhookConfiguration {WEBHOOK_CONFIGURATION} not found: no pod is \
                     injected"
                ),
            )
            .hint("install or upgrade the chart (helm upgrade --install trellis charts/trellis)");
        }
        other => {
            return other.unknown(
                NAME,
                &format!("MutatingWebhookConfiguration {WEBHOOK_CONFIGURATION}"),
            );
        }
    };
    let Some(hook) = trellis_webhook(config) else {
        return Check::new(
            NAME,
            Status::Fail,
            format!(
                "MutatingWebhookConfiguration {WEBHOOK_CONFIGURATION} has no webhook {WEBHOOK_NAME}"
            ),
        )
        .hint("upgrade the chart to restore it");
    };
    let target = match &hook.client_config.service {
        Some(s) => format!(
            "{}/{}:{}{}",
            s.namespace,
            s.name,
            s.port.unwrap_or(443),
            s.path.as_deref().unwrap_or("")
        ),
        None => hook.client_config.url.clone().unwrap_or_default(),
    };
    let ours = hook
        .client_config
        .service
        .as_ref()
        .is_some_and(|s| s.namespace == namespace && s.name == INJECTOR_SERVICE);
    if !ours {
        return Check::new(
            NAME,
            Status::Warn,
            format!("webhook {WEBHOOK_NAME} calls {target}, not {namespace}/{INJECTOR_SERVICE}"),
        )
        .hint("pass --namespace where the chart is installed, or upgrade the chart");
    }
    let bundle = hook
        .client_config
        .ca_bundle
        .as_ref()
        .map(|b| b.0.as_slice())
        .unwrap_or_default();
    if bundle.is_empty() {
        return Check::new(
            NAME,
            Status::Fail,
            format!(
                "webhook {WEBHOOK_NAME} has no caBundle: the API server cannot verify the \
                 injector, so pods of labelled namespaces are not created"
            ),
        )
        .hint(format!(
            "the injector sets it when it starts (kubectl -n {namespace} logs \
             deploy/trellis-injector); with injector.tls.existingSecret set \
             injector.webhook.caBundle or cert-manager's inject-ca-from"
        ));
    }
    let certs = match certs::parse_bundle(bundle) {
        Ok(certs) => certs,
        Err(why) => {
            return Check::new(
                NAME,
                Status::Fail,
                format!("webhook {WEBHOOK_NAME}'s caBundle is unusable: {why}"),
            )
            .hint("delete the caBundle and restart the injector, which sets it again");
        }
    };
    // During a rotation the bundle holds the old CA and the new one: the newest decides.
    let newest = certs
        .iter()
        .max_by_key(|c| c.not_after)
        .unwrap_or(&certs[0]);
    let (status, when) = certs::grade(newest, now);
    let message = format!(
        "caBundle ({} certificate{}) {when}; calls {target}; failurePolicy {}",
        certs.len(),
        if certs.len() == 1 { "" } else { "s" },
        hook.failure_policy.as_deref().unwrap_or("Fail")
    );
    let hint = match status {
        Status::Ok => String::new(),
        _ => format!(
            "restart the injector to renew its certificate (kubectl -n {namespace} rollout \
             restart deploy/trellis-injector), or renew the CA that signs it"
        ),
    };
    Check::new(NAME, status, message).hint(hint)
}

pub(super) fn injector_endpoints(
    slices: &Fetched<Vec<EndpointSlice>>,
    namespace: &str,
    failure_policy: Option<&str>,
) -> Check {
    const NAME: &str = "injector-endpoints";
    let slices = match slices {
        Fetched::Found(s) => s,
        Fetched::Missing => &Vec::new(),
        other => {
            return other.unknown(
                NAME,
                &format!("the EndpointSlices of {namespace}/{INJECTOR_SERVICE}"),
            );
        }
    };
    // An endpoint with no `ready` condition counts as ready, as kube-proxy counts it.
    let ready = slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .count();
    if ready == 0 {
        let consequence = match failure_policy {
            Some("Ignore") => "pods of labelled namespaces start without the proxy",
            _ => "pods of labelled namespaces cannot be created (failurePolicy Fail)",
        };
        return Check::new(
            NAME,
            Status::Fail,
            format!("Service {namespace}/{INJECTOR_SERVICE} has no ready endpoint: {consequence}"),
        )
        .hint(format!(
            "see control-plane-injector; kubectl -n {namespace} get endpointslices -l \
             kubernetes.io/service-name={INJECTOR_SERVICE}"
        ));
    }
    Check::ok(
        NAME,
        format!(
            "Service {namespace}/{INJECTOR_SERVICE}: {ready} ready endpoint{}",
            if ready == 1 { "" } else { "s" }
        ),
    )
}

pub(super) fn injector_ready(answer: &Fetched<String>, namespace: &str) -> Check {
    const NAME: &str = "injector-ready";
    match answer {
        Fetched::Found(_) => Check::ok(
            NAME,
            "the API server reached the injector's /ready through its service proxy",
        ),
        Fetched::Denied(_) => {
            answer.unknown(NAME, "the injector's /ready through the service proxy")
        }
        Fetched::Missing => Check::new(
            NAME,
            Status::Warn,
            format!("Service {namespace}/{INJECTOR_SERVICE} not found"),
        )
        .hint("install or upgrade the chart"),
        Fetched::Failed(why) => Check::new(
            NAME,
            Status::Warn,
            format!(
                "the API server could not get the injector's /ready through its service proxy: \
                 {why}"
            ),
        )
        .hint(
            "webhook calls take the same path from the API server to the injector's pods: check \
             NetworkPolicies and firewall rules from the control plane to the pods (port 8443, \
             and 9990 for this probe)",
        ),
    }
}
