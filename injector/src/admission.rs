//! One AdmissionReview in, one AdmissionReview out: the webhook's logic without the server.
//!
//! Failure behaviour, chosen so a misconfiguration never blocks the cluster and bad input never
//! crashes the injector:
//!
//! | input | answer |
//! |---|---|
//! | pod CREATE | allowed, with a JSONPatch when injected; denied (400) for a bad annotation or a name clash |
//! | not a Pod, a subresource, or not CREATE | allowed unchanged, with a warning: the webhook's rules are wrong, and denying would block every such request in the cluster |
//! | body not JSON, not an `admission.k8s.io/v1` AdmissionReview, or without `request` | HTTP 400 with an AdmissionReview error; the API server never sends these |
//! | CREATE without `object` | denied (400) |
//!
//! The request `uid` is echoed whenever the body has one, even when the rest is unreadable.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::StatusCode;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::core::admission::{
    AdmissionResponse, AdmissionReview, META_API_VERSION_V1, META_KIND, Operation,
};
use kube::core::{DynamicObject, GroupVersionKind, GroupVersionResource, Status};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::config::Settings;
use crate::patch::{self, Denied, Plan};

/// A body larger than this is refused with 413, without reading the rest.
///
/// A pod CREATE review carries one object, and the API server refuses objects it could not
/// store: etcd keeps at most 1.5 MiB per object, and the API server reads request bodies of at
/// most 3 MiB. 3 MiB leaves room for the review around the pod (user info, options) and for
/// JSON escaping, while keeping what a request can make the injector hold small.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// How a review ended, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `injected`, `skipped`, `denied`, `ignored` (allowed unchanged, with a warning) or
    /// `error` (the request could not be read).
    pub outcome: &'static str,
    /// Why, when there is more than one way to get the outcome; empty otherwise.
    pub reason: &'static str,
}

impl Outcome {
    const fn new(outcome: &'static str, reason: &'static str) -> Self {
        Outcome { outcome, reason }
    }
}

/// What the HTTP layer sends back.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: StatusCode,
    /// A JSON AdmissionReview.
    pub body: Vec<u8>,
    pub outcome: Outcome,
    /// The request's uid, for logs.
    pub uid: String,
    /// A one-line account for logs.
    pub detail: String,
}

/// The parts of an AdmissionReview the injector reads, parsed in one pass over the body. The
/// object is borrowed as raw JSON and read into a typed pod only for a pod CREATE; everything
/// else (`userInfo`, `oldObject`, `options`) is skipped without being kept.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(borrow)]
    request: Option<Request<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request<'a> {
    uid: String,
    kind: GroupVersionKind,
    resource: GroupVersionResource,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    operation: Operation,
    #[serde(default, borrow)]
    object: Option<&'a RawValue>,
}

/// What is left to say about a body that is JSON but not a readable review.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Loose {
    api_version: Option<Value>,
    kind: Option<Value>,
    request: Option<LooseRequest>,
}

#[derive(Default, Deserialize)]
struct LooseRequest {
    uid: Option<Value>,
}

/// `Some(error)` unless the review is an `admission.k8s.io/v1` AdmissionReview.
fn wrong_type(api_version: Option<&str>, kind: Option<&str>, uid: &str) -> Option<Reply> {
    if api_version == Some(META_API_VERSION_V1) && kind == Some(META_KIND) {
        return None;
    }
    Some(error(
        StatusCode::BAD_REQUEST,
        uid.to_string(),
        format!(
            "expected an {META_API_VERSION_V1} {META_KIND}, got apiVersion {} kind {} \
             (set admissionReviewVersions: [v1] in the webhook configuration)",
            api_version.unwrap_or("(none)"),
            kind.unwrap_or("(none)"),
        ),
    ))
}

/// Answers one AdmissionReview body.
pub fn review(body: &[u8], settings: &Settings) -> Reply {
    let envelope: Envelope<'_> = match serde_json::from_slice(body) {
        Ok(envelope) => envelope,
        // Some mistyped values (an integer for an enum) are syntax errors to serde_json too;
        // a pass that keeps nothing tells a body that is not JSON from one that is.
        Err(e) if serde_json::from_slice::<IgnoredAny>(body).is_err() => {
            return error(
                StatusCode::BAD_REQUEST,
                String::new(),
                format!("the request body is not JSON: {e}"),
            );
        }
        Err(e) => {
            // JSON, but not a review this build can read: a second, lenient look finds the
            // uid to echo and whether it is a review at all. Only bad input pays for it.
            let loose: Loose = serde_json::from_slice(body).unwrap_or_default();
            let uid = loose
                .request
                .and_then(|r| r.uid)
                .and_then(|uid| uid.as_str().map(str::to_string))
                .unwrap_or_default();
            let text = |v: &Option<Value>| v.as_ref().and_then(Value::as_str).map(str::to_string);
            let (api_version, kind) = (text(&loose.api_version), text(&loose.kind));
            if let Some(reply) = wrong_type(api_version.as_deref(), kind.as_deref(), &uid) {
                return reply;
            }
            return error(
                StatusCode::BAD_REQUEST,
                uid,
                format!("the AdmissionReview cannot be read: {e}"),
            );
        }
    };
    let uid = envelope.request.as_ref().map_or("", |r| r.uid.as_str());
    if let Some(reply) = wrong_type(
        envelope.api_version.as_deref(),
        envelope.kind.as_deref(),
        uid,
    ) {
        return reply;
    }
    let Some(request) = envelope.request else {
        return error(
            StatusCode::BAD_REQUEST,
            String::new(),
            "the AdmissionReview has no request".to_string(),
        );
    };
    decide(request, settings)
}

/// An allowing response to the request `uid`, for an `admission.k8s.io/v1` review.
fn allow(uid: &str) -> AdmissionResponse {
    let mut response = AdmissionResponse::invalid("");
    response.uid = uid.to_string();
    response.allowed = true;
    response.result = Status::default();
    response
}

fn decide(request: Request<'_>, settings: &Settings) -> Reply {
    let response = allow(&request.uid);
    let uid = request.uid.clone();
    let kind = &request.kind;
    if !kind.group.is_empty() || kind.kind != "Pod" || request.sub_resource.is_some() {
        let what = match &request.sub_resource {
            Some(sub) => format!("{}/{sub}", request.resource.resource),
            None => format!("{}/{} {}", kind.group, kind.version, kind.kind),
        };
        let warning = format!(
            "trellis-injector only mutates Pods; it was called for {what} and let it through \
             unchanged (check the rules of its MutatingWebhookConfiguration)"
        );
        return allowed_with_warning(response, uid, "not_a_pod", warning);
    }
    if request.operation != Operation::Create {
        let warning = format!(
            "trellis-injector only injects on CREATE; it was called for {:?} and let it \
             through unchanged (check the rules of its MutatingWebhookConfiguration)",
            request.operation
        );
        return allowed_with_warning(response, uid, "not_create", warning);
    }
    let Some(object) = request.object.filter(|o| o.get() != "null") else {
        let message = "the pod CREATE request carries no object".to_string();
        return denied(response, uid, "no_object", message);
    };
    // The one parse of the pod, into the typed form the plan reads.
    let template = if object.get().starts_with('{') {
        serde_json::from_str::<PodTemplateSpec>(object.get())
            .map_err(|e| Denied::NotAPod(e.to_string()))
    } else {
        Err(Denied::NotAPod("expected a JSON object".to_string()))
    };
    let namespace = request.namespace.as_deref();
    let pod = describe(namespace, &request.name, template.as_ref().ok());
    let planned = template.and_then(|t| patch::plan_template(&t, namespace, settings));
    match planned {
        Ok(Plan::Inject(patch)) => match response.clone().with_patch(patch) {
            Ok(response) => reply(
                StatusCode::OK,
                response,
                Outcome::new("injected", ""),
                uid,
                format!("{pod}: injected"),
            ),
            Err(e) => denied(
                response,
                uid,
                "internal",
                format!("cannot encode the patch: {e}"),
            ),
        },
        Ok(Plan::Skip(skip)) => reply(
            StatusCode::OK,
            response,
            Outcome::new("skipped", skip.label()),
            uid,
            format!("{pod}: not injected, {skip}"),
        ),
        Err(denial) => denied(
            response,
            uid,
            denial.label(),
            format!("trellis-injector: {pod}: {denial}"),
        ),
    }
}

/// `namespace/name` for messages; pods created by controllers only have a `generateName`.
fn describe(namespace: Option<&str>, request_name: &str, pod: Option<&PodTemplateSpec>) -> String {
    let namespace = namespace.unwrap_or("");
    let meta = pod.and_then(|p| p.metadata.as_ref());
    let name = meta
        .and_then(|m| m.name.as_deref())
        .filter(|s| !s.is_empty());
    let prefix = meta
        .and_then(|m| m.generate_name.as_deref())
        .filter(|s| !s.is_empty());
    let name = match (name, prefix) {
        (Some(name), _) => name.to_string(),
        (None, Some(prefix)) => format!("{prefix}*"),
        (None, None) => request_name.to_string(),
    };
    format!("pod {namespace}/{name}")
}

fn allowed_with_warning(
    mut response: AdmissionResponse,
    uid: String,
    reason: &'static str,
    warning: String,
) -> Reply {
    response.warnings = Some(vec![warning.clone()]);
    reply(
        StatusCode::OK,
        response,
        Outcome::new("ignored", reason),
        uid,
        warning,
    )
}

fn denied(
    response: AdmissionResponse,
    uid: String,
    reason: &'static str,
    message: String,
) -> Reply {
    let mut response = response.deny(&message);
    response.result = Status::failure(&message, "BadRequest").with_code(400);
    reply(
        StatusCode::OK,
        response,
        Outcome::new("denied", reason),
        uid,
        message,
    )
}

/// An answer to a body that is not a usable AdmissionReview.
pub fn error(status: StatusCode, uid: String, message: String) -> Reply {
    let mut response = AdmissionResponse::invalid(&message);
    response.uid = uid.clone();
    response.result = Status::failure(&message, "BadRequest").with_code(status.as_u16());
    let reason = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        StatusCode::SERVICE_UNAVAILABLE => "overloaded",
        _ => "malformed",
    };
    reply(
        status,
        response,
        Outcome::new("error", reason),
        uid,
        message,
    )
}

fn reply(
    status: StatusCode,
    response: AdmissionResponse,
    outcome: Outcome,
    uid: String,
    detail: String,
) -> Reply {
    Reply {
        status,
        body: encode(response.into_review()),
        outcome,
        uid,
        detail,
    }
}

/// Serializes a review with the patch as base64, the form the Kubernetes API documents.
///
/// kube's `AdmissionResponse` serializes its `patch` bytes as a JSON array of numbers. The API
/// server happens to accept that too, but it is three to four times larger and not what the
/// documented `[]byte` wire format says, so the field is rewritten here.
pub fn encode(review: AdmissionReview<DynamicObject>) -> Vec<u8> {
    let fallback = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#;
    let Ok(mut value) = serde_json::to_value(&review) else {
        return fallback.to_vec();
    };
    if let Some(patch) = value.pointer_mut("/response/patch")
        && let Some(numbers) = patch.as_array()
    {
        let bytes: Option<Vec<u8>> = numbers
            .iter()
            .map(|n| n.as_u64().and_then(|n| u8::try_from(n).ok()))
            .collect();
        if let Some(bytes) = bytes {
            *patch = Value::String(BASE64.encode(bytes));
        }
    }
    serde_json::to_vec(&value).unwrap_or_else(|_| fallback.to_vec())
}

#[cfg(test)]
#[path = "admission_tests.rs"]
mod tests;
