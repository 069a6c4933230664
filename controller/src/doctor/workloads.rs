//! The checks of meshed workloads: Pod Security of labelled namespaces, pods without the proxy,
//! and pods with another proxy than the injector gives.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod};

use super::checks::{
    Check, Fetched, INJECT_ANNOTATION, InjectorSettings, PROXY_CONTAINER, PROXY_VERSION_ANNOTATION,
    PSS_AUDIT, PSS_ENFORCE, PSS_WARN, Status, count, listing, pod_name,
};

/// The pods of each labelled namespace, as fetched.
pub type NamespacePods = [(String, Fetched<Vec<Pod>>)];

fn ns_name(ns: &Namespace) -> &str {
    ns.metadata.name.as_deref().unwrap_or("?")
}

/// The labelled namespaces the webhook serves (the control plane's own is excluded by it).
fn served_namespaces<'a>(labelled: &'a [Namespace], control_plane: &str) -> Vec<&'a Namespace> {
    labelled
        .iter()
        .filter(|ns| ns_name(ns) != control_plane)
        .collect()
}

pub(super) fn pod_security(labelled: &Fetched<Vec<Namespace>>, control_plane: &str) -> Check {
    const NAME: &str = "pod-security";
    let labelled = match labelled {
        Fetched::Found(l) => served_namespaces(l, control_plane),
        Fetched::Missing => Vec::new(),
        other => {
            return other.unknown(NAME, "the namespaces labelled trellis.dev/inject=enabled");
        }
    };
    let level = |ns: &Namespace, key: &str| -> Option<String> {
        let v = ns.metadata.labels.as_ref()?.get(key)?;
        matches!(v.as_str(), "baseline" | "restricted").then(|| v.clone())
    };
    let enforced: Vec<String> = labelled
        .iter()
        .filter_map(|ns| level(ns, PSS_ENFORCE).map(|l| format!("{} ({l})", ns_name(ns))))
        .collect();
    let names: Vec<String> = enforced
        .iter()
        .filter_map(|e| e.split(' ').next().map(str::to_string))
        .collect();
    if !enforced.is_empty() {
        let first = names.first().cloned().unwrap_or_default();
        return Check::new(
            NAME,
            Status::Fail,
            format!(
                "Pod Security forbids the init container's NET_ADMIN and NET_RAW in {}: \
                 injected pods are rejected",
                listing(&enforced)
            ),
        )
        .hint(format!(
            "Trellis has no CNI mode without them: label the namespace privileged (kubectl \
             label ns {first} {PSS_ENFORCE}=privileged --overwrite) or exempt it in the API \
             server's PodSecurity admission configuration"
        ));
    }
    let warned: Vec<String> = labelled
        .iter()
        .filter_map(|ns| {
            level(ns, PSS_WARN)
                .or_else(|| level(ns, PSS_AUDIT))
                .map(|l| format!("{} ({l})", ns_name(ns)))
        })
        .collect();
    if !warned.is_empty() {
        return Check::new(
            NAME,
            Status::Warn,
            format!(
                "Pod Security warns or audits injected pods (NET_ADMIN, NET_RAW) in {}",
                listing(&warned)
            ),
        )
        .hint(format!(
            "set {PSS_WARN} and {PSS_AUDIT} to privileged on these namespaces to silence it"
        ));
    }
    Check::ok(
        NAME,
        format!(
            "{}: none enforces baseline or restricted, which forbid the init container's \
             NET_ADMIN and NET_RAW (the cluster-wide default is not visible here)",
            count(labelled.len(), "labelled namespace")
        ),
    )
}

/// The proxy container of a pod, in either sidecar mode.
fn proxy_container(pod: &Pod) -> Option<&Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == PROXY_CONTAINER)
}

/// Pods the webhook would have injected: running or about to, not on the host network, not
/// opted out.
fn should_be_meshed(pod: &Pod) -> bool {
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let opted_out = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .is_some_and(|v| v == "disabled");
    !finished && !host_network && !opted_out
}

/// The pods of the served labelled namespaces (with their namespace), and the lists that could
/// not be read.
type LabelledPods<'a> = (Vec<(&'a str, &'a Pod)>, Vec<&'a Fetched<Vec<Pod>>>);

/// Splits what was fetched into [`LabelledPods`].
fn labelled_pods<'a>(
    labelled: &[Namespace],
    pods: &'a NamespacePods,
    control_plane: &str,
) -> LabelledPods<'a> {
    let served: Vec<&str> = served_namespaces(labelled, control_plane)
        .into_iter()
        .map(ns_name)
        .collect();
    let mut found = Vec::new();
    let mut unread = Vec::new();
    for (ns, fetched) in pods.iter().filter(|(ns, _)| served.contains(&ns.as_str())) {
        match fetched {
            Fetched::Found(list) => found.extend(list.iter().map(|p| (ns.as_str(), p))),
            Fetched::Missing => {}
            other => unread.push(other),
        }
    }
    (found, unread)
}

/// The `unknown` part of a message about pods that could not be listed.
fn unread_note(unread: &[&Fetched<Vec<Pod>>]) -> Option<(String, String)> {
    let first = unread.first()?;
    let hint = match first {
        Fetched::Denied(access) => format!("grant {access} (see docs/reference/doctor.md, RBAC)"),
        _ => "run doctor again".to_string(),
    };
    let why = match first {
        Fetched::Failed(why) => why.clone(),
        _ => "forbidden".to_string(),
    };
    Some((
        format!(
            "the pods of {} could not be read ({why})",
            count(unread.len(), "labelled namespace")
        ),
        hint,
    ))
}

pub(super) fn injected_pods(
    labelled: &Fetched<Vec<Namespace>>,
    pods: &NamespacePods,
    control_plane: &str,
) -> Check {
    const NAME: &str = "injected-pods";
    let labelled = match labelled {
        Fetched::Found(l) => l.as_slice(),
        Fetched::Missing => &[],
        other => {
            return other.unknown(NAME, "the namespaces labelled trellis.dev/inject=enabled");
        }
    };
    let (pods, unread) = labelled_pods(labelled, pods, control_plane);
    let candidates: Vec<&(&str, &Pod)> = pods.iter().filter(|(_, p)| should_be_meshed(p)).collect();
    let bare: Vec<String> = candidates
        .iter()
        .filter(|(_, p)| proxy_container(p).is_none())
        .map(|(ns, p)| format!("{ns}/{}", pod_name(p)))
        .collect();
    if !bare.is_empty() {
        let mut message = format!(
            "{} of {} pods in labelled namespaces run without the proxy: {} (created before the \
             label, or while the injector was down)",
            bare.len(),
            candidates.len(),
            listing(&bare)
        );
        if let Some((note, _)) = unread_note(&unread) {
            message.push_str("; ");
            message.push_str(&note);
        }
        return Check::new(NAME, Status::Warn, message).hint(
            "restart their workloads so the webhook injects them (kubectl -n <namespace> rollout \
             restart deploy/<name>)",
        );
    }
    if let Some((note, hint)) = unread_note(&unread) {
        return Check::new(NAME, Status::Unknown, note).hint(hint);
    }
    Check::ok(
        NAME,
        format!(
            "{} in {}, all with the proxy",
            count(candidates.len(), "pod"),
            count(
                served_namespaces(labelled, control_plane).len(),
                "labelled namespace"
            )
        ),
    )
}

pub(super) fn proxy_versions(
    labelled: &Fetched<Vec<Namespace>>,
    pods: &NamespacePods,
    control_plane: &str,
    injector: Option<&Fetched<Deployment>>,
) -> Check {
    const NAME: &str = "proxy-versions";
    let labelled = match labelled {
        Fetched::Found(l) => l.as_slice(),
        Fetched::Missing => &[],
        other => {
            return other.unknown(NAME, "the namespaces labelled trellis.dev/inject=enabled");
        }
    };
    let expected = match injector {
        Some(Fetched::Found(d)) => InjectorSettings::of(d).proxy_image,
        _ => None,
    };
    let Some(expected) = expected else {
        return Check::new(
            NAME,
            Status::Unknown,
            "cannot tell which proxy image the injector gives: its Deployment was not read",
        )
        .hint("see control-plane-injector");
    };
    let (pods, unread) = labelled_pods(labelled, pods, control_plane);
    let meshed: Vec<(&str, &Pod, &Container)> = pods
        .iter()
        .filter(|(_, p)| should_be_meshed(p))
        .filter_map(|(ns, p)| proxy_container(p).map(|c| (*ns, *p, c)))
        .collect();
    let stale: Vec<String> = meshed
        .iter()
        .filter(|(_, _, c)| c.image.as_deref() != Some(expected.as_str()))
        .map(|(ns, p, c)| {
            let version = p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(PROXY_VERSION_ANNOTATION))
                .map(|v| format!(", {PROXY_VERSION_ANNOTATION} {v}"))
                .unwrap_or_default();
            format!(
                "{ns}/{} ({}{version})",
                pod_name(p),
                c.image.as_deref().unwrap_or("no image")
            )
        })
        .collect();
    if !stale.is_empty() {
        let mut message = format!(
            "{} of {} meshed pods run another proxy than {expected}: {}",
            stale.len(),
            meshed.len(),
            listing(&stale)
        );
        if let Some((note, _)) = unread_note(&unread) {
            message.push_str("; ");
            message.push_str(&note);
        }
        return Check::new(NAME, Status::Warn, message).hint(
            "restart their workloads after an upgrade so they get the current proxy (kubectl -n \
             <namespace> rollout restart deploy/<name>)",
        );
    }
    if let Some((note, hint)) = unread_note(&unread) {
        return Check::new(NAME, Status::Unknown, note).hint(hint);
    }
    Check::ok(
        NAME,
        format!("{}, all on {expected}", count(meshed.len(), "meshed pod")),
    )
}
