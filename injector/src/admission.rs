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
use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, META_API_VERSION_V1, META_KIND, Operation,
};
use kube::core::{DynamicObject, Status};
use serde_json::Value;

use crate::config::Settings;
use crate::patch::{self, Plan};

/// A body larger than this is refused with 413. An AdmissionReview carries the object (etcd
/// caps objects at about 1.5 MiB) and, for updates, the old object too.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

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

/// Answers one AdmissionReview body.
pub fn review(body: &[u8], settings: &Settings) -> Reply {
    let mut value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                String::new(),
                format!("the request body is not JSON: {e}"),
            );
        }
    };
    let uid = value
        .pointer("/request/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    let kind = value.get("kind").and_then(Value::as_str);
    if api_version != Some(META_API_VERSION_V1) || kind != Some(META_KIND) {
        return error(
            StatusCode::BAD_REQUEST,
            uid,
            format!(
                "expected an {META_API_VERSION_V1} {META_KIND}, got apiVersion {} kind {} \
                 (set admissionReviewVersions: [v1] in the webhook configuration)",
                api_version.unwrap_or("(none)"),
                kind.unwrap_or("(none)"),
            ),
        );
    }
    // The object is kept as raw JSON: the patch is computed against exactly what the API
    // server sent, including fields newer than this build's Kubernetes types.
    let object = value
        .pointer_mut("/request/object")
        .map(Value::take)
        .filter(|o| !o.is_null());
    let review: AdmissionReview<DynamicObject> = match serde_json::from_value(value) {
        Ok(review) => review,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                uid,
                format!("the AdmissionReview cannot be read: {e}"),
            );
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                uid,
                "the AdmissionReview has no request".to_string(),
            );
        }
    };
    decide(&request, object, settings)
}

fn decide(
    request: &AdmissionRequest<DynamicObject>,
    object: Option<Value>,
    settings: &Settings,
) -> Reply {
    let response = AdmissionResponse::from(request);
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
    let Some(object) = object else {
        let message = "the pod CREATE request carries no object".to_string();
        return denied(response, uid, "no_object", message);
    };
    let pod = describe(request, &object);
    match patch::plan(&object, request.namespace.as_deref(), settings) {
        Ok(Plan::Inject(patch)) => match response.with_patch(patch) {
            Ok(response) => reply(
                StatusCode::OK,
                response,
                Outcome::new("injected", ""),
                uid,
                format!("{pod}: injected"),
            ),
            Err(e) => denied(
                AdmissionResponse::from(request),
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
fn describe(request: &AdmissionRequest<DynamicObject>, object: &Value) -> String {
    let namespace = request.namespace.as_deref().unwrap_or("");
    let meta = |key: &str| {
        object
            .pointer(&format!("/metadata/{key}"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let name = match (meta("name"), meta("generateName")) {
        (Some(name), _) => name.to_string(),
        (None, Some(prefix)) => format!("{prefix}*"),
        (None, None) => request.name.clone(),
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
