//! The verdicts of `doctor`: pure functions from what the API server gave (or why it gave
//! nothing) to named checks. No I/O and no clock here: the instant is an argument, so every
//! verdict is a table test.

use std::fmt;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::version::Info;
use k8s_openapi::jiff::Timestamp;

use super::{injector, trust, workloads};

/// The namespace label that turns injection on.
pub const INJECT_LABEL: &str = "trellis.dev/inject";
pub const INJECT_ENABLED: &str = "enabled";
/// The pod annotation that opts a pod out, and the marker injection leaves.
pub const INJECT_ANNOTATION: &str = "trellis.dev/inject";
pub const PROXY_VERSION_ANNOTATION: &str = "trellis.dev/proxy-version";
/// The proxy's container name, in `containers` (classic) or `initContainers` (native).
pub const PROXY_CONTAINER: &str = "trellis-proxy";
/// The chart's names (charts/trellis): the webhook configuration, the injector's Service.
pub const WEBHOOK_CONFIGURATION: &str = "trellis-injector";
pub const WEBHOOK_NAME: &str = "inject.trellis.dev";
pub const INJECTOR_SERVICE: &str = "trellis-injector";
pub const DEFAULT_ISSUER_SECRET: &str = "trellis-identity-issuer";
/// What `--proxy-image` defaults to in the injector, without the tag.
pub const DEFAULT_PROXY_REPOSITORY: &str = "ghcr.io/trellis-mesh/trellis-proxy";
pub const PSS_ENFORCE: &str = "pod-security.kubernetes.io/enforce";
pub const PSS_WARN: &str = "pod-security.kubernetes.io/warn";
pub const PSS_AUDIT: &str = "pod-security.kubernetes.io/audit";
/// Kubernetes' first release with native sidecars on by default.
pub const NATIVE_SIDECAR_MINOR: u32 = 29;
/// How many objects a message names before "and N more".
pub const LISTED: usize = 5;

/// A check's verdict. `Unknown`: doctor could not look (no right to read, no answer); it does
/// not fail the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Unknown,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Unknown => "unknown",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One named check: its verdict, why in one line, and what to do (empty when nothing).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
    pub hint: String,
}

impl Check {
    pub(super) fn new(name: &'static str, status: Status, message: impl Into<String>) -> Check {
        Check {
            name,
            status,
            message: message.into(),
            hint: String::new(),
        }
    }

    pub(super) fn ok(name: &'static str, message: impl Into<String>) -> Check {
        Check::new(name, Status::Ok, message)
    }

    pub(super) fn hint(mut self, hint: impl Into<String>) -> Check {
        self.hint = hint.into();
        self
    }
}

/// A request doctor makes, for naming the permission a 403 says is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub verb: &'static str,
    /// `secrets`, `deployments.apps`, `services/proxy`, …
    pub resource: String,
    pub name: Option<String>,
    /// `None`: cluster-wide.
    pub namespace: Option<String>,
}

impl Access {
    pub fn new(verb: &'static str, resource: &str) -> Access {
        Access {
            verb,
            resource: resource.to_string(),
            name: None,
            namespace: None,
        }
    }

    pub fn named(mut self, name: &str) -> Access {
        self.name = Some(name.to_string());
        self
    }

    pub fn within(mut self, namespace: &str) -> Access {
        self.namespace = Some(namespace.to_string());
        self
    }
}

impl fmt::Display for Access {
    /// `get secrets "trellis-identity-issuer" in namespace trellis-system`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if let Some(name) = &self.name {
            write!(f, " {name:?}")?;
        }
        match &self.namespace {
            Some(ns) => write!(f, " in namespace {ns}"),
            None => write!(f, " (cluster-wide)"),
        }
    }
}

/// What one request gave.
#[derive(Clone, Debug)]
pub enum Fetched<T> {
    Found(T),
    /// The object does not exist (the API server's NotFound Status).
    Missing,
    /// 403: the caller lacks this permission.
    Denied(Access),
    /// Anything else, in words: an error Status, a resource not served, no answer in time.
    Failed(String),
}

impl<T> Fetched<T> {
    pub fn found(&self) -> Option<&T> {
        match self {
            Fetched::Found(t) => Some(t),
            _ => None,
        }
    }

    /// The `unknown` check of a request that gave no object: forbidden (naming the permission)
    /// or failed. Each check judges `Found` and `Missing` itself and calls this for the rest.
    pub(super) fn unknown(&self, name: &'static str, what: &str) -> Check {
        match self {
            Fetched::Denied(access) => Check::new(
                name,
                Status::Unknown,
                format!("cannot read {what}: forbidden"),
            )
            .hint(format!(
                "grant {access} (see docs/reference/doctor.md, RBAC)"
            )),
            Fetched::Failed(why) => {
                Check::new(name, Status::Unknown, format!("cannot read {what}: {why}"))
                    .hint("run doctor again; if it persists, check the API server")
            }
            Fetched::Found(_) | Fetched::Missing => {
                Check::new(name, Status::Unknown, format!("cannot judge {what}"))
            }
        }
    }
}

/// A control-plane component, as the chart names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Controller,
    Identity,
    Injector,
}

impl Component {
    pub const ALL: [Component; 3] = [
        Component::Controller,
        Component::Identity,
        Component::Injector,
    ];

    /// `controller`: the chart's `app.kubernetes.io/component` and the container's name.
    pub fn short(self) -> &'static str {
        match self {
            Component::Controller => "controller",
            Component::Identity => "identity",
            Component::Injector => "injector",
        }
    }

    /// `trellis-controller`: the Deployment, its Service and `app.kubernetes.io/name`.
    pub fn name(self) -> String {
        format!("trellis-{}", self.short())
    }

    fn check_name(self) -> &'static str {
        match self {
            Component::Controller => "control-plane-controller",
            Component::Identity => "control-plane-identity",
            Component::Injector => "control-plane-injector",
        }
    }
}

/// One component's Deployment and pods.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    pub component: Component,
    pub deployment: Fetched<Deployment>,
    pub pods: Fetched<Vec<Pod>>,
}

/// Everything doctor read from the cluster.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// The control-plane namespace.
    pub namespace: String,
    pub issuer_secret_name: String,
    pub version: Fetched<Info>,
    pub httproute_crd: Fetched<CustomResourceDefinition>,
    pub grpcroute_crd: Fetched<CustomResourceDefinition>,
    pub control_plane: Vec<ControlPlane>,
    pub webhook: Fetched<MutatingWebhookConfiguration>,
    pub injector_slices: Fetched<Vec<EndpointSlice>>,
    /// The injector's `/ready` through the API server's service proxy: its body when 2xx.
    pub injector_ready: Fetched<String>,
    pub issuer_secret: Fetched<Secret>,
    /// Namespaces labelled `trellis.dev/inject=enabled`.
    pub labelled: Fetched<Vec<Namespace>>,
    /// The pods of each labelled namespace.
    pub labelled_pods: Vec<(String, Fetched<Vec<Pod>>)>,
}

/// Every verdict, in the order they are printed.
pub fn judge(cluster: &Cluster, now: Timestamp) -> Vec<Check> {
    let injector = cluster
        .control_plane
        .iter()
        .find(|c| c.component == Component::Injector)
        .map(|c| &c.deployment);
    let settings = injector.and_then(Fetched::found).map(InjectorSettings::of);
    let mut checks = vec![
        kubernetes_version(&cluster.version, settings.as_ref()),
        route_crd(&HTTPROUTE_CRD, &cluster.httproute_crd),
        route_crd(&GRPCROUTE_CRD, &cluster.grpcroute_crd),
    ];
    checks.extend(
        cluster
            .control_plane
            .iter()
            .map(|c| control_plane(c, &cluster.namespace)),
    );
    let failure_policy = cluster
        .webhook
        .found()
        .and_then(injector::trellis_webhook)
        .and_then(|w| w.failure_policy.clone());
    checks.extend([
        injector::webhook(&cluster.webhook, &cluster.namespace, now),
        injector::injector_endpoints(
            &cluster.injector_slices,
            &cluster.namespace,
            failure_policy.as_deref(),
        ),
        injector::injector_ready(&cluster.injector_ready, &cluster.namespace),
    ]);
    checks.extend(trust::trust(
        &cluster.issuer_secret,
        &cluster.namespace,
        &cluster.issuer_secret_name,
        now,
    ));
    checks.extend([
        workloads::pod_security(&cluster.labelled, &cluster.namespace),
        workloads::injected_pods(
            &cluster.labelled,
            &cluster.labelled_pods,
            &cluster.namespace,
        ),
        workloads::proxy_versions(
            &cluster.labelled,
            &cluster.labelled_pods,
            &cluster.namespace,
            injector,
        ),
    ]);
    checks
}

/// 0 when nothing fails, 1 otherwise (2, the API server unreadable, is decided before).
pub fn exit_code(checks: &[Check]) -> u8 {
    if checks.iter().any(|c| c.status == Status::Fail) {
        1
    } else {
        0
    }
}

/// What the injector gives pods, from its Deployment's arguments and environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectorSettings {
    /// `--proxy-image`, or the default it implies (the proxy of the injector's own tag).
    pub proxy_image: Option<String>,
    /// `--sidecar-mode`: `native` unless set.
    pub sidecar_mode: String,
}

impl InjectorSettings {
    pub fn of(deployment: &Deployment) -> InjectorSettings {
        let container = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| {
                s.containers
                    .iter()
                    .find(|c| c.name == Component::Injector.short())
                    .or(s.containers.first())
            });
        let setting = |flag: &str, env: &str| container.and_then(|c| setting(c, flag, env));
        let proxy_image = setting("--proxy-image", "TRELLIS_PROXY_IMAGE").or_else(|| {
            let image = container.and_then(|c| c.image.as_deref())?;
            Some(format!("{DEFAULT_PROXY_REPOSITORY}:{}", tag(image)?))
        });
        InjectorSettings {
            proxy_image,
            sidecar_mode: setting("--sidecar-mode", "TRELLIS_SIDECAR_MODE")
                .unwrap_or_else(|| "native".to_string()),
        }
    }
}

/// A flag's value from a container's args (`--flag=v` or `--flag v`), else its variable.
fn setting(container: &Container, flag: &str, env: &str) -> Option<String> {
    let args = container.args.as_deref().unwrap_or_default();
    for (i, arg) in args.iter().enumerate() {
        if let Some(v) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(v.to_string());
        }
        if arg == flag {
            return args.get(i + 1).cloned();
        }
    }
    container
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| e.name == env)
        .and_then(|e| e.value.clone())
}

/// The tag of an image reference, if it has one (not a digest).
fn tag(image: &str) -> Option<&str> {
    let name = image.split('@').next()?;
    let last = name.rsplit('/').next()?;
    last.split_once(':').map(|(_, tag)| tag)
}

fn kubernetes_version(version: &Fetched<Info>, injector: Option<&InjectorSettings>) -> Check {
    const NAME: &str = "kubernetes-version";
    let info = match version {
        Fetched::Found(info) => info,
        Fetched::Missing => {
            return Check::new(NAME, Status::Unknown, "the API server gave no /version");
        }
        other => {
            return other.unknown(NAME, "the API server's version");
        }
    };
    // "29+" on some distributions.
    let minor: Option<u32> = info
        .minor
        .trim_end_matches('+')
        .parse()
        .ok()
        .filter(|_| info.major == "1");
    let native = injector.is_none_or(|s| s.sidecar_mode == "native");
    match minor {
        Some(minor) if minor < NATIVE_SIDECAR_MINOR && native => Check::new(
            NAME,
            Status::Fail,
            format!(
                "Kubernetes {}: native sidecars (the injector's sidecar mode) need 1.{NATIVE_SIDECAR_MINOR}",
                info.git_version
            ),
        )
        .hint("upgrade the cluster, or install with proxy.sidecarMode=classic"),
        _ => Check::ok(NAME, format!("Kubernetes {}", info.git_version)),
    }
}

/// The versions of a CRD: served ones, and the stored one.
fn versions(crd: &CustomResourceDefinition) -> (Vec<&str>, Option<&str>) {
    let served = crd
        .spec
        .versions
        .iter()
        .filter(|v| v.served)
        .map(|v| v.name.as_str())
        .collect();
    let storage = crd
        .spec
        .versions
        .iter()
        .find(|v| v.storage)
        .map(|v| v.name.as_str());
    (served, storage)
}

/// "served v1, v1beta1; storage v1; bundle v1.5.1 (standard)".
fn describe_crd(crd: &CustomResourceDefinition) -> String {
    let (served, storage) = versions(crd);
    let annotations = crd.metadata.annotations.as_ref();
    let annotation = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);
    let bundle = annotation("gateway.networking.k8s.io/bundle-version").unwrap_or("unknown");
    let channel = annotation("gateway.networking.k8s.io/channel")
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    format!(
        "served {}; storage {}; bundle {bundle}{channel}",
        if served.is_empty() {
            "none".to_string()
        } else {
            served.join(", ")
        },
        storage.unwrap_or("none")
    )
}

const CRD_HINT: &str =
    "install the Gateway API CRDs (standard channel, v1.1 or later): see docs/install.md";

/// What a route CRD's absence means: HTTPRoutes are the mesh's routing, GRPCRoutes an extra.
struct RouteCrd {
    check: &'static str,
    crd: &'static str,
    kind: &'static str,
    /// How bad a missing or unserved v1 is.
    level: Status,
    missing: &'static str,
    unserved: &'static str,
}

const HTTPROUTE_CRD: RouteCrd = RouteCrd {
    check: "gateway-api-httproute",
    crd: "httproutes.gateway.networking.k8s.io",
    kind: "HTTPRoute",
    level: Status::Fail,
    missing: "no route applies",
    unserved: "the controller reads v1",
};

const GRPCROUTE_CRD: RouteCrd = RouteCrd {
    check: "gateway-api-grpcroute",
    crd: "grpcroutes.gateway.networking.k8s.io",
    kind: "GRPCRoute",
    level: Status::Warn,
    missing: "GRPCRoutes cannot be used (HTTPRoutes work)",
    unserved: "the controller reads v1 only",
};

fn route_crd(what: &RouteCrd, crd: &Fetched<CustomResourceDefinition>) -> Check {
    let crd = match crd {
        Fetched::Found(crd) => crd,
        Fetched::Missing => {
            return Check::new(
                what.check,
                what.level,
                format!("CRD {} is not installed: {}", what.crd, what.missing),
            )
            .hint(CRD_HINT);
        }
        other => return other.unknown(what.check, &format!("CRD {}", what.crd)),
    };
    let (served, _) = versions(crd);
    if !served.contains(&"v1") {
        return Check::new(
            what.check,
            what.level,
            format!(
                "{} v1 is not served ({}): {}",
                what.kind,
                describe_crd(crd),
                what.unserved
            ),
        )
        .hint(CRD_HINT);
    }
    Check::ok(what.check, format!("{} {}", what.kind, describe_crd(crd)))
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub(super) fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or("?")
}

/// Why a pod is not ready, in a few words: "CrashLoopBackOff, 5 restarts", "Pending".
fn why_not_ready(pod: &Pod) -> String {
    let Some(status) = &pod.status else {
        return "no status yet".to_string();
    };
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in containers {
        let waiting = c
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref());
        if let Some(reason) = waiting.filter(|r| *r != "PodInitializing") {
            return match c.restart_count {
                0 => format!("{}: {reason}", c.name),
                n => format!("{}: {reason}, {n} restarts", c.name),
            };
        }
        if !c.ready && c.restart_count > 0 {
            return format!("{}: not ready, {} restarts", c.name, c.restart_count);
        }
    }
    status
        .phase
        .clone()
        .unwrap_or_else(|| "not ready".to_string())
}

/// `1 pod`, `3 pods`.
pub(super) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `a, b, c and 4 more`.
pub(super) fn listing(items: &[String]) -> String {
    let shown = items
        .iter()
        .take(LISTED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > LISTED {
        format!("{shown} and {} more", items.len() - LISTED)
    } else {
        shown
    }
}

fn control_plane(c: &ControlPlane, namespace: &str) -> Check {
    let name = c.component.check_name();
    let deployment_name = c.component.name();
    let deployment = match &c.deployment {
        Fetched::Found(d) => d,
        Fetched::Missing => {
            return Check::new(
                name,
                Status::Fail,
                format!("Deployment {namespace}/{deployment_name} not found"),
            )
            .hint(format!(
                "install the chart in {namespace} (helm install trellis charts/trellis -n \
                 {namespace}), or pass --namespace where it is installed"
            ));
        }
        other => {
            return other.unknown(name, &format!("Deployment {namespace}/{deployment_name}"));
        }
    };
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let image = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| {
            s.containers
                .iter()
                .find(|k| k.name == c.component.short())
                .or(s.containers.first())
        })
        .and_then(|k| k.image.clone())
        .unwrap_or_else(|| "no image".to_string());
    let troubled: Vec<String> = c
        .pods
        .found()
        .into_iter()
        .flatten()
        .filter(|p| !is_ready(p))
        .map(|p| format!("{} ({})", pod_name(p), why_not_ready(p)))
        .collect();
    let detail = if troubled.is_empty() {
        String::new()
    } else {
        format!("; not ready: {}", listing(&troubled))
    };
    let logs = format!(
        "kubectl -n {namespace} describe deploy/{deployment_name}; kubectl -n {namespace} logs \
         deploy/{deployment_name} --all-containers"
    );
    if wanted == 0 {
        return Check::new(
            name,
            Status::Fail,
            format!("Deployment {namespace}/{deployment_name} is scaled to 0"),
        )
        .hint(format!(
            "kubectl -n {namespace} scale deploy/{deployment_name} --replicas=1"
        ));
    }
    if ready == 0 {
        return Check::new(
            name,
            Status::Fail,
            format!("{deployment_name}: 0/{wanted} replicas ready{detail}"),
        )
        .hint(logs);
    }
    if ready < wanted {
        return Check::new(
            name,
            Status::Warn,
            format!("{deployment_name}: {ready}/{wanted} replicas ready{detail}"),
        )
        .hint(logs);
    }
    Check::ok(
        name,
        format!("{deployment_name}: {ready}/{wanted} replicas ready ({image})"),
    )
}
