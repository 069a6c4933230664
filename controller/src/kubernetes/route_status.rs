//! Route status as written to the API: the model's [`RouteStatus`] merged into a route's
//! current `status.parents`. Pure; the status writer only reads, calls [`desired_parents`] and
//! patches.
//!
//! `status.parents` is shared by every controller that handles one of the route's parents
//! (a Gateway's controller, another mesh). Trellis owns exactly the entries whose
//! `controllerName` is [`CONTROLLER_NAME`] and never changes another entry, nor their order.

use gateway_api::experimental::httproutes::{
    HttpRouteParentRefs, HttpRouteStatusParents, HttpRouteStatusParentsParentRef,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::status::{self, CONTROLLER_NAME, ParentRef, ParentStatus, RouteStatus};

/// The most entries `status.parents` may hold (the Gateway API CRDs validate `maxItems: 32`).
pub const MAX_PARENTS: usize = 32;

/// The `status.parents` to write so that the route shows `ours`, or `None` when the current
/// list already does and nothing must be written.
///
/// Other controllers' entries stay as they are, where they are. Each of our entries replaces
/// the current one for the same parentRef in place; new ones are appended; ours for parents
/// the model no longer lists (the route stopped naming that Service) are removed. A
/// condition's `lastTransitionTime` is `now` only when its status or reason changed (or it is
/// new), so rewriting an unchanged status yields exactly the current list, and `None`.
pub fn desired_parents(
    current: &[HttpRouteStatusParents],
    ours: &RouteStatus,
    now: Timestamp,
) -> Option<Vec<HttpRouteStatusParents>> {
    let mut wanted: Vec<Option<HttpRouteStatusParents>> = ours
        .parents
        .iter()
        .map(|p| {
            let previous = current.iter().find(|c| {
                c.controller_name == CONTROLLER_NAME && same_ref(&c.parent_ref, &p.parent_ref)
            });
            Some(entry(p, previous, ours.observed_generation, now))
        })
        .collect();
    let foreign = current
        .iter()
        .filter(|c| c.controller_name != CONTROLLER_NAME)
        .count();
    let mut room = MAX_PARENTS.saturating_sub(foreign);

    let mut desired = Vec::with_capacity(current.len() + wanted.len());
    for c in current {
        if c.controller_name != CONTROLLER_NAME {
            desired.push(c.clone());
            continue;
        }
        // The first of our entries for a parent is replaced in place; any later duplicate,
        // and any entry for a parent we no longer have, is dropped.
        let slot = ours
            .parents
            .iter()
            .position(|p| same_ref(&c.parent_ref, &p.parent_ref))
            .and_then(|i| wanted[i].take());
        if let Some(e) = slot
            && room > 0
        {
            desired.push(e);
            room -= 1;
        }
    }
    for e in wanted.into_iter().flatten() {
        if room == 0 {
            break;
        }
        desired.push(e);
        room -= 1;
    }
    (desired != current).then_some(desired)
}

/// Our entry for one parent, with timestamps carried over from `previous` where a condition
/// did not transition.
fn entry(
    parent: &ParentStatus,
    previous: Option<&HttpRouteStatusParents>,
    generation: Option<i64>,
    now: Timestamp,
) -> HttpRouteStatusParents {
    let conditions = parent
        .conditions
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = previous
                .and_then(|p| p.conditions.iter().find(|old| old.type_ == c.type_))
                .filter(|old| old.status == status && old.reason == c.reason)
                .map(|old| old.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: c.type_.to_string(),
                status: status.to_string(),
                reason: c.reason.to_string(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect();
    HttpRouteStatusParents {
        conditions,
        controller_name: parent.controller_name.to_string(),
        parent_ref: status_ref(&parent.parent_ref),
    }
}

/// The parentRef as the model copied it from the route. The group is written even when empty:
/// left out, the API server would default it to the Gateway API group.
pub fn status_ref(p: &ParentRef) -> HttpRouteStatusParentsParentRef {
    HttpRouteStatusParentsParentRef {
        group: Some(p.group.clone()),
        kind: Some(p.kind.clone()),
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        port: p.port,
        section_name: p.section_name.clone(),
    }
}

/// Whether a written parentRef names the model's parent, reading an absent group and kind as
/// the API's defaults (a Gateway).
fn same_ref(written: &HttpRouteStatusParentsParentRef, ours: &status::ParentRef) -> bool {
    let group = written
        .group
        .as_deref()
        .unwrap_or("gateway.networking.k8s.io");
    let kind = written.kind.as_deref().unwrap_or("Gateway");
    group == ours.group
        && kind == ours.kind
        && written.name == ours.name
        && written.namespace == ours.namespace
        && written.port == ours.port
        && written.section_name == ours.section_name
}

/// Whether the route names a Service parent, read from its spec. A route that names none
/// gets no status from the model, and any entries of ours it still carries are stale.
pub fn names_a_service(parents: &[HttpRouteParentRefs]) -> bool {
    parents.iter().any(|p| {
        matches!(p.group.as_deref(), Some("" | "core")) && p.kind.as_deref() == Some("Service")
    })
}

/// Whether any entry is ours.
pub fn has_ours(current: &[HttpRouteStatusParents]) -> bool {
    current.iter().any(|c| c.controller_name == CONTROLLER_NAME)
}

#[cfg(test)]
#[path = "route_status_tests.rs"]
mod tests;
