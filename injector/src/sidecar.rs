//! What injection adds to a pod: the `trellis-init` and `trellis-proxy` containers and their
//! volumes, built as typed Kubernetes objects from the settings and the pod's annotations.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use trellis_api::probes::{APP_PROBES_ENV, AppProbes};

use crate::annotations::{
    self, AccessLog, Invalid, InvalidAnnotations, Overrides, PortList, Quantity,
};
use crate::config::{Settings, SidecarMode};

pub const PROXY_CONTAINER: &str = "trellis-proxy";
pub const INIT_CONTAINER: &str = "trellis-init";
/// The projected service-account token the proxy presents to identity.
pub const TOKEN_VOLUME: &str = "trellis-identity-token";
/// Memory-backed scratch space for anything secret the proxy writes (never on the node's disk).
pub const SECRETS_VOLUME: &str = "trellis-secrets";
/// Writable `/run` for iptables' lock file, so `trellis-init` keeps a read-only root.
pub const XTABLES_VOLUME: &str = "trellis-xtables-lock";
/// Every container and volume name injection adds; a pod already using one is refused.
pub const CONTAINER_NAMES: [&str; 2] = [INIT_CONTAINER, PROXY_CONTAINER];
pub const VOLUME_NAMES: [&str; 3] = [TOKEN_VOLUME, SECRETS_VOLUME, XTABLES_VOLUME];

pub const TOKEN_DIR: &str = "/var/run/secrets/trellis.dev/identity";
pub const TOKEN_PATH: &str = "/var/run/secrets/trellis.dev/identity/token";
pub const SECRETS_DIR: &str = "/var/run/trellis";
pub const TOKEN_AUDIENCE: &str = "identity.trellis.dev";
/// A day: the kubelet refreshes a projected token at 80 % of its life.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 86_400;
/// The proxy's user and group; `trellis-proxy init` exempts this uid from redirection.
pub const PROXY_UID: i64 = 2102;
pub const ADMIN_PORT: i32 = 4191;
pub const ADMIN_PORT_NAME: &str = "trellis-admin";
/// The ports the proxy delivers inbound traffic to; unset means any port.
pub const INBOUND_PORTS_ENV: &str = "TRELLIS_INBOUND_PORTS";

/// The proxy may take this long (1 s × 120) to become ready — it needs its certificate from
/// identity — before the kubelet restarts it.
const STARTUP_PERIOD_SECONDS: i32 = 1;
const STARTUP_FAILURE_THRESHOLD: i32 = 120;

/// The objects injection adds.
#[derive(Clone, Debug)]
pub struct Sidecar {
    pub init: Container,
    pub proxy: Container,
    pub volumes: Vec<Volume>,
}

/// What the proxy is told about inbound traffic.
#[derive(Clone, Debug, Default)]
pub struct Inbound {
    /// Where it accepts plaintext ([`crate::probes::plaintext_ports`]).
    pub plaintext: PortList,
    /// Where it delivers; `None` for any port ([`crate::probes::inbound_ports`]).
    pub ports: Option<PortList>,
    /// The app probes it performs for the kubelet.
    pub app_probes: AppProbes,
}

/// Builds the sidecar for a pod whose annotations have already been parsed.
pub fn build(
    settings: &Settings,
    overrides: &Overrides,
    inbound: &Inbound,
) -> Result<Sidecar, InvalidAnnotations> {
    let resources = resources(settings, overrides)?;
    Ok(Sidecar {
        init: init_container(settings, overrides, resources.clone()),
        proxy: proxy_container(settings, overrides, inbound, resources),
        volumes: volumes(),
    })
}

/// Requests and the memory limit from the annotations, else the injector's defaults. No CPU
/// limit: throttling a proxy adds latency to every request of the app.
fn resources(
    settings: &Settings,
    overrides: &Overrides,
) -> Result<ResourceRequirements, InvalidAnnotations> {
    let cpu = overrides
        .cpu_request
        .as_ref()
        .unwrap_or(&settings.cpu_request);
    let memory_request = overrides
        .memory_request
        .as_ref()
        .unwrap_or(&settings.memory_request);
    let memory_limit = overrides
        .memory_limit
        .as_ref()
        .unwrap_or(&settings.memory_limit);
    if memory_request.value > memory_limit.value {
        // Name the annotation the user wrote; if both are defaults the settings are invalid,
        // which `Settings` validation already prevents.
        let problem = match (&overrides.memory_request, &overrides.memory_limit) {
            (Some(_), Some(_)) => Invalid {
                annotation: annotations::PROXY_MEMORY_REQUEST,
                problem: format!(
                    "{memory_request} is above the memory limit {memory_limit} \
                     ({})",
                    annotations::PROXY_MEMORY_LIMIT
                ),
            },
            (Some(_), None) => Invalid {
                annotation: annotations::PROXY_MEMORY_REQUEST,
                problem: format!(
                    "{memory_request} is above the default memory limit {memory_limit}; \
                     set {} too",
                    annotations::PROXY_MEMORY_LIMIT
                ),
            },
            _ => Invalid {
                annotation: annotations::PROXY_MEMORY_LIMIT,
                problem: format!(
                    "{memory_limit} is below the memory request {memory_request}; \
                     set {} too",
                    annotations::PROXY_MEMORY_REQUEST
                ),
            },
        };
        return Err(InvalidAnnotations(vec![problem]));
    }
    let quantity = |q: &Quantity| K8sQuantity(q.text.clone());
    Ok(ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), quantity(cpu)),
            ("memory".to_string(), quantity(memory_request)),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            quantity(memory_limit),
        )])),
        ..Default::default()
    })
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_field(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".to_string()),
                field_path: field_path.to_string(),
            }),
            ..Default::default()
        }),
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

/// Runs `trellis-proxy init` to program iptables. Root with NET_ADMIN and NET_RAW is what
/// iptables needs; every other capability is dropped and the root filesystem stays read-only.
fn init_container(
    settings: &Settings,
    overrides: &Overrides,
    resources: ResourceRequirements,
) -> Container {
    // Every address of the pod: a pod without IPv6 gets IPv6 dropped rather than bypassing the
    // sidecar.
    let mut env_vars = vec![env_field("TRELLIS_POD_IPS", "status.podIPs")];
    for (name, ports) in [
        ("TRELLIS_SKIP_INBOUND_PORTS", &overrides.skip_inbound_ports),
        (
            "TRELLIS_SKIP_OUTBOUND_PORTS",
            &overrides.skip_outbound_ports,
        ),
    ] {
        if let Some(ports) = ports.as_ref().filter(|p| !p.is_empty()) {
            env_vars.push(env(name, ports.to_string()));
        }
    }
    Container {
        name: INIT_CONTAINER.to_string(),
        image: Some(settings.proxy_image.clone()),
        args: Some(vec!["init".to_string()]),
        env: Some(env_vars),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()]),
                drop: Some(vec!["ALL".to_string()]),
            }),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(false),
            run_as_user: Some(0),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        volume_mounts: Some(vec![mount(XTABLES_VOLUME, "/run", false)]),
        ..Default::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_string(),
        localhost_profile: None,
    }
}

fn admin_probe(path: &str, period_seconds: i32, failure_threshold: Option<i32>) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(ADMIN_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold,
        ..Default::default()
    }
}

fn proxy_container(
    settings: &Settings,
    overrides: &Overrides,
    inbound: &Inbound,
    resources: ResourceRequirements,
) -> Container {
    let log = overrides
        .log_level
        .clone()
        .unwrap_or_else(|| settings.proxy_log_level.clone());
    let native = settings.sidecar_mode == SidecarMode::Native;
    let mut env_vars = vec![
        env_field("TRELLIS_POD_NAME", "metadata.name"),
        env_field("TRELLIS_POD_NAMESPACE", "metadata.namespace"),
        env_field("TRELLIS_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env_field("TRELLIS_POD_IP", "status.podIP"),
        env("TRELLIS_CONTROLLER_ADDR", &settings.controller_addr),
        env("TRELLIS_IDENTITY_ADDR", &settings.identity_addr),
        env("TRELLIS_TRUST_DOMAIN", &settings.trust_domain),
        env("TRELLIS_TRUST_ANCHORS", &settings.trust_anchors_pem),
        env("TRELLIS_TOKEN_PATH", TOKEN_PATH),
        env("TRELLIS_LOG", log),
    ];
    // With identity on, the proxy refuses plaintext inbound elsewhere, kubelet probes included.
    if !inbound.plaintext.is_empty() {
        env_vars.push(env(
            "TRELLIS_INBOUND_PLAINTEXT_PORTS",
            inbound.plaintext.to_string(),
        ));
    }
    if let Some(ports) = &inbound.ports {
        env_vars.push(env(INBOUND_PORTS_ENV, ports.to_string()));
    }
    if !inbound.app_probes.is_empty() {
        // A BTreeMap of plain strings and numbers always serializes.
        let json = serde_json::to_string(&inbound.app_probes).unwrap_or_default();
        env_vars.push(env(APP_PROBES_ENV, json));
    }
    // Only what differs from the proxy's own defaults (no access log, no tracing), or what the
    // pod asked for, so a pod of a default install carries no extra variables.
    match overrides.access_log {
        Some(format) => env_vars.push(env("TRELLIS_ACCESS_LOG", format.as_str())),
        None if settings.access_log != AccessLog::Off => {
            env_vars.push(env("TRELLIS_ACCESS_LOG", settings.access_log.as_str()));
        }
        None => {}
    }
    // The sampling share means nothing without an endpoint, so it comes only with one.
    if let Some(endpoint) = &settings.otlp_endpoint {
        env_vars.push(env("TRELLIS_OTLP_ENDPOINT", endpoint));
        let sampling = overrides.trace_sampling.unwrap_or(settings.trace_sampling);
        env_vars.push(env("TRELLIS_TRACE_SAMPLING", sampling.to_string()));
    }
    if let Some(ports) = overrides.opaque_ports.as_ref().filter(|p| !p.is_empty()) {
        env_vars.push(env(
            "TRELLIS_OPAQUE_PORTS",
            format!("{},{ports}", trellis_api::policy::DEFAULT_OPAQUE_PORTS),
        ));
    }
    Container {
        name: PROXY_CONTAINER.to_string(),
        image: Some(settings.proxy_image.clone()),
        args: Some(vec!["run".to_string()]),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.to_string()),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".to_string()),
            ..Default::default()
        }]),
        // Native sidecar: the kubelet starts the next init container (and so the app) only
        // once the startup probe passes, so the app never runs without its proxy.
        restart_policy: native.then(|| "Always".to_string()),
        // Classic sidecar: the kubelet starts the next container only once postStart returns,
        // so waiting here for readiness keeps the app from starting before its proxy.
        lifecycle: (!native).then(|| Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec!["trellis-proxy".to_string(), "await-ready".to_string()]),
                }),
                ..Default::default()
            }),
            // The app gets SIGTERM at once; the proxy only after this hook, which starts its
            // drain (not ready, still serving) and waits out the window, so the app's last
            // requests still have a proxy and clients move away before it stops.
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec!["trellis-proxy".to_string(), "drain".to_string()]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        startup_probe: Some(admin_probe(
            "/ready",
            STARTUP_PERIOD_SECONDS,
            Some(STARTUP_FAILURE_THRESHOLD),
        )),
        readiness_probe: Some(admin_probe("/ready", 5, None)),
        liveness_probe: Some(admin_probe("/live", 10, None)),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".to_string()]),
            }),
            read_only_root_filesystem: Some(true),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            run_as_user: Some(PROXY_UID),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount(TOKEN_VOLUME, TOKEN_DIR, true),
            mount(SECRETS_VOLUME, SECRETS_DIR, false),
        ]),
        ..Default::default()
    }
}

fn volumes() -> Vec<Volume> {
    vec![
        Volume {
            name: TOKEN_VOLUME.to_string(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_string()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                        path: "token".to_string(),
                    }),
                    ..Default::default()
                }]),
                default_mode: None,
            }),
            ..Default::default()
        },
        Volume {
            name: SECRETS_VOLUME.to_string(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_string()),
                size_limit: None,
            }),
            ..Default::default()
        },
        Volume {
            name: XTABLES_VOLUME.to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ]
}
