//! Route status as the model computes it: what the status writer puts in `status.parents` and
//! what `trellis-controller check` prints.

use serde::Serialize;
use trellis_api::policy::RouteKind;

/// The controller name written in every status entry Trellis owns.
pub const CONTROLLER_NAME: &str = "trellis.dev/controller";

/// The status of one route object, for its Service parents only: entries for other parents
/// (Gateways) belong to other controllers and are never produced here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub parents: Vec<ParentStatus>,
}

impl RouteStatus {
    /// Whether every Service parent accepted the route and every reference resolved.
    pub fn is_healthy(&self) -> bool {
        self.parents.iter().all(|p| {
            p.condition(ACCEPTED).is_some_and(|c| c.status)
                && p.condition(RESOLVED_REFS).is_some_and(|c| c.status)
                && p.condition(PARTIALLY_INVALID).is_none_or(|c| !c.status)
        })
    }
}

/// A copy of the parentRef as written in the route, with defaults left unset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentStatus {
    pub parent_ref: ParentRef,
    pub controller_name: &'static str,
    pub conditions: Vec<Condition>,
}

impl ParentStatus {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// A condition without timestamps: the status writer adds `lastTransitionTime` and compares
/// without it, so an unchanged status is never rewritten.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: &'static str,
    #[serde(serialize_with = "as_k8s_bool")]
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

fn as_k8s_bool<S: serde::Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if *v { "True" } else { "False" })
}

pub const ACCEPTED: &str = "Accepted";
pub const RESOLVED_REFS: &str = "ResolvedRefs";
pub const PARTIALLY_INVALID: &str = "PartiallyInvalid";

/// Reasons, as named by the Gateway API.
pub mod reason {
    pub const ACCEPTED: &str = "Accepted";
    pub const NO_MATCHING_PARENT: &str = "NoMatchingParent";
    pub const UNSUPPORTED_VALUE: &str = "UnsupportedValue";
    pub const CONFLICTED: &str = "Conflicted";
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    pub const BACKEND_NOT_FOUND: &str = "BackendNotFound";
    pub const INVALID_KIND: &str = "InvalidKind";
    pub const REF_NOT_PERMITTED: &str = "RefNotPermitted";
}
