//! Pure injection: a pod (or pod template) and the settings in, a decision and a JSONPatch out.
//!
//! The webhook and `trellis-injector inject` both call [`plan`]; the webhook sends the patch,
//! `inject` applies it. The patch *adds* (containers, volumes, annotations) at paths computed
//! from the pod's raw JSON and, for rewritten probes, swaps only the probe's handler; it never
//! replaces whole lists or objects, so fields this build of Kubernetes types does not know are
//! left exactly as they were.

use std::collections::BTreeMap;
use std::fmt;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde::Deserialize as _;
use serde_json::{Map, Value, json};

use crate::annotations::{self, InjectMode, InvalidAnnotations, RewriteProbes};
use crate::config::{Settings, SidecarMode};
use crate::probes::{self, InvalidProbes, ProbeMode, Rewrite};
use crate::sidecar::{self, ADMIN_PORT, Inbound};

/// Why a pod is left as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// It carries `trellis.dev/proxy-version`: injecting again would add a second proxy.
    AlreadyInjected,
    /// `trellis.dev/inject: disabled`.
    OptedOut,
    /// It shares the node's network namespace: iptables rules would redirect the node's
    /// traffic, not the pod's.
    HostNetwork,
    /// It belongs to the control plane, which must not depend on itself to start.
    ControlPlane,
}

impl Skip {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Skip::AlreadyInjected => "already_injected",
            Skip::OptedOut => "opted_out",
            Skip::HostNetwork => "host_network",
            Skip::ControlPlane => "control_plane",
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Skip::AlreadyInjected => "already injected",
            Skip::OptedOut => "opted out with trellis.dev/inject: disabled",
            Skip::HostNetwork => "uses hostNetwork",
            Skip::ControlPlane => "in the control plane's namespace",
        })
    }
}

/// What to do with a pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    Skip(Skip),
    Inject(Patch),
}

/// Why a pod is refused; the message is shown to whoever created it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Denied {
    #[error("{0}")]
    Annotations(#[from] InvalidAnnotations),
    #[error("{0}")]
    Probes(#[from] InvalidProbes),
    #[error(
        "the pod already has a {what} named {name:?}, a name Trellis injection adds; \
         rename it, or set the annotation trellis.dev/inject: disabled"
    )]
    NameTaken { what: &'static str, name: String },
    #[error("the object is not a pod: {0}")]
    NotAPod(String),
}

impl Denied {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Denied::Annotations(_) => "invalid_annotation",
            Denied::Probes(_) => "invalid_probe",
            Denied::NameTaken { .. } => "name_taken",
            Denied::NotAPod(_) => "not_a_pod",
        }
    }
}

/// Decides about a Pod or pod template (an object with `metadata` and `spec`) in `namespace`.
pub fn plan(pod: &Value, namespace: Option<&str>, settings: &Settings) -> Result<Plan, Denied> {
    if !pod.is_object() {
        return Err(Denied::NotAPod("expected a JSON object".to_string()));
    }
    let template = PodTemplateSpec::deserialize(pod).map_err(|e| Denied::NotAPod(e.to_string()))?;
    plan_template(&template, namespace, settings)
}

/// [`plan`] for a pod already read into its typed form (a Pod reads as a template: its
/// `metadata` and `spec`). The patch is computed from the typed pod alone; fields this build
/// does not know are not read, and the patch never touches them.
pub fn plan_template(
    template: &PodTemplateSpec,
    namespace: Option<&str>,
    settings: &Settings,
) -> Result<Plan, Denied> {
    let Some(spec) = &template.spec else {
        return Err(Denied::NotAPod("it has no spec".to_string()));
    };
    // Mutating webhooks run before the API server validates the pod, so an invalid one gets
    // here; without a container list the patch could not even be applied (classic mode adds
    // the proxy at /spec/containers/0).
    if spec.containers.is_empty() {
        return Err(Denied::NotAPod(
            "it has no containers (a pod needs at least one)".to_string(),
        ));
    }
    let no_annotations = BTreeMap::new();
    let pod_annotations = template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .unwrap_or(&no_annotations);

    if pod_annotations.contains_key(annotations::PROXY_VERSION) {
        return Ok(Plan::Skip(Skip::AlreadyInjected));
    }
    // The opt-out is read before anything else is validated: a pod that opts out is not
    // refused over, say, a bad proxy resource annotation it no longer needs.
    if let Some(value) = pod_annotations.get(annotations::INJECT) {
        match annotations::parse_inject(value) {
            Ok(InjectMode::Disabled) => return Ok(Plan::Skip(Skip::OptedOut)),
            Ok(InjectMode::Enabled) => {}
            Err(problem) => {
                return Err(InvalidAnnotations(vec![annotations::Invalid {
                    annotation: annotations::INJECT,
                    problem,
                }])
                .into());
            }
        }
    }
    if spec.host_network == Some(true) {
        return Ok(Plan::Skip(Skip::HostNetwork));
    }
    let namespace = namespace.or(template
        .metadata
        .as_ref()
        .and_then(|m| m.namespace.as_deref()));
    if namespace == Some(settings.control_plane_namespace.as_str()) {
        return Ok(Plan::Skip(Skip::ControlPlane));
    }

    let overrides = annotations::parse(pod_annotations)?;
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for container in containers {
        if sidecar::CONTAINER_NAMES.contains(&container.name.as_str()) {
            return Err(Denied::NameTaken {
                what: "container",
                name: container.name.clone(),
            });
        }
    }
    for volume in spec.volumes.iter().flatten() {
        if sidecar::VOLUME_NAMES.contains(&volume.name.as_str()) {
            return Err(Denied::NameTaken {
                what: "volume",
                name: volume.name.clone(),
            });
        }
    }
    let mode = ProbeMode {
        rewrite: overrides.rewrite_probes != Some(RewriteProbes::Disabled),
        native_sidecars: settings.sidecar_mode == SidecarMode::Native,
    };
    let probe_plan = probes::plan(spec, mode)?;
    let plaintext = probes::plaintext_ports(
        &probe_plan.plaintext_ports,
        overrides.inbound_plaintext_ports.as_ref(),
    );
    let inbound = Inbound {
        ports: probes::inbound_ports(spec, overrides.inbound_ports.as_ref(), &plaintext),
        plaintext,
        app_probes: probe_plan.app_probes,
    };
    let sidecar = sidecar::build(settings, &overrides, &inbound)?;
    let first_app_container = spec.containers.first().map(|c| c.name.as_str());
    Ok(Plan::Inject(operations(
        template,
        &probe_plan.rewrites,
        &sidecar,
        pod_annotations,
        first_app_container,
        settings,
    )))
}

/// Plans and applies in place; what `inject` and the tests use.
pub fn inject(
    pod: &mut Value,
    namespace: Option<&str>,
    settings: &Settings,
) -> Result<Option<Skip>, Denied> {
    match plan(pod, namespace, settings)? {
        Plan::Skip(skip) => Ok(Some(skip)),
        Plan::Inject(patch) => {
            // The patch was computed from this very value, so it cannot fail to apply; if it
            // ever did, the pod is reported as malformed rather than half-patched.
            let mut patched = pod.clone();
            json_patch::patch(&mut patched, &patch)
                .map_err(|e| Denied::NotAPod(format!("cannot apply the patch: {e}")))?;
            *pod = patched;
            Ok(None)
        }
    }
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    // k8s-openapi types serialize to JSON infallibly (no maps with non-string keys).
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The new handler of a rewritten probe: a GET on the proxy's admin port.
fn admin_http_get(path: &str) -> Value {
    json!({"path": path, "port": ADMIN_PORT, "scheme": "HTTP"})
}

fn operations(
    pod: &PodTemplateSpec,
    rewrites: &[Rewrite],
    sidecar: &sidecar::Sidecar,
    existing: &BTreeMap<String, String>,
    first_app_container: Option<&str>,
    settings: &Settings,
) -> Patch {
    let mut ops = Vec::new();
    // Probes first: their paths use the containers' indices as the pod arrived, before the
    // proxy is inserted into either list. Only the handler changes; every timing field (and
    // any field this build does not know) stays as written.
    for rewrite in rewrites {
        let index = rewrite.index.to_string();
        let probe = ["spec", rewrite.list.field(), &index, rewrite.field];
        let at = |handler: &str| pointer(&[probe[0], probe[1], probe[2], probe[3], handler]);
        let value = admin_http_get(&rewrite.path);
        if rewrite.handler == "httpGet" {
            ops.push(PatchOperation::Replace(ReplaceOperation {
                path: at("httpGet"),
                value,
            }));
        } else {
            ops.push(PatchOperation::Remove(RemoveOperation {
                path: at(rewrite.handler),
            }));
            ops.push(PatchOperation::Add(AddOperation {
                path: at("httpGet"),
                value,
            }));
        }
    }
    let init = to_json(&sidecar.init);
    let proxy = to_json(&sidecar.proxy);
    let spec = pod.spec.as_ref();

    match settings.sidecar_mode {
        // trellis-init, then the proxy, then the pod's own init containers, which so already
        // run with the mesh.
        SidecarMode::Native => {
            if spec.is_some_and(|s| s.init_containers.is_some()) {
                ops.push(add(&["spec", "initContainers", "0"], init));
                ops.push(add(&["spec", "initContainers", "1"], proxy));
            } else {
                ops.push(add(&["spec", "initContainers"], json!([init, proxy])));
            }
        }
        // trellis-init runs last among init containers: the proxy is not running yet, and
        // the pod's own init containers would otherwise find all their TCP traffic
        // redirected to a port nobody listens on.
        SidecarMode::Classic => {
            if spec.is_some_and(|s| s.init_containers.is_some()) {
                ops.push(add(&["spec", "initContainers", "-"], init));
            } else {
                ops.push(add(&["spec", "initContainers"], json!([init])));
            }
            ops.push(add(&["spec", "containers", "0"], proxy));
        }
    }

    let volumes: Vec<Value> = sidecar.volumes.iter().map(to_json).collect();
    if spec.is_some_and(|s| s.volumes.is_some()) {
        for volume in volumes {
            ops.push(add(&["spec", "volumes", "-"], volume));
        }
    } else {
        ops.push(add(&["spec", "volumes"], Value::Array(volumes)));
    }

    let admin_port = ADMIN_PORT.to_string();
    let mut wanted = vec![
        (annotations::PROMETHEUS_SCRAPE, "true"),
        (annotations::PROMETHEUS_PORT, admin_port.as_str()),
        (annotations::PROMETHEUS_PATH, "/metrics"),
    ];
    if settings.sidecar_mode == SidecarMode::Classic
        && let Some(app) = first_app_container
    {
        wanted.push((annotations::DEFAULT_CONTAINER, app));
    }
    // The user's own values win; the marker is always written.
    let mut new: Vec<(&str, &str)> = wanted
        .into_iter()
        .filter(|(key, _)| !existing.contains_key(*key))
        .collect();
    new.push((annotations::PROXY_VERSION, settings.version.as_str()));

    if pod
        .metadata
        .as_ref()
        .is_some_and(|m| m.annotations.is_some())
    {
        for (key, value) in new {
            ops.push(add(&["metadata", "annotations", key], json!(value)));
        }
    } else {
        let map: Map<String, Value> = new
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        if pod.metadata.is_some() {
            ops.push(add(&["metadata", "annotations"], Value::Object(map)));
        } else {
            ops.push(add(&["metadata"], json!({ "annotations": map })));
        }
    }
    Patch(ops)
}

#[cfg(test)]
#[path = "patch_tests.rs"]
mod tests;
