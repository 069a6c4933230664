//! The pod's probes and inbound ports.
//!
//! The kubelet probes from the node, outside the mesh and so in plaintext, while a proxy with a
//! mesh identity refuses plaintext inbound except on the ports of
//! `TRELLIS_INBOUND_PLAINTEXT_PORTS`. Opening a probe port to plaintext opens it to every pod
//! (the probe port is usually the app's main port), so by default each HTTP, TCP and gRPC probe
//! is rewritten to `GET :4191/app-health/<container>/<probe>` on the proxy's admin port and the
//! original check travels to the proxy in `TRELLIS_APP_PROBES`
//! ([`trellis_api::probes::AppProbes`]). Only probes the proxy cannot perform for the kubelet
//! (HTTPS, a `tcpSocket` with a `host`) keep their port in the plaintext list, as every probe
//! does with `trellis.dev/rewrite-probes: disabled`.

use std::fmt;

use k8s_openapi::api::core::v1::{Container, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use trellis_api::probes::{AppProbe, AppProbes, ProbeHeader, app_health_path, probe_key};

use crate::annotations::{PortList, PortRange};
use crate::sidecar::PROXY_CONTAINER;
/// A probe whose port cannot be known. The kubelet could not resolve it either, so the pod
/// would never pass that probe; refusing it now says why, at `kubectl apply`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {container:?}: {probe} {problem}")]
pub struct InvalidProbe {
    /// `container` or `init container`.
    pub kind: &'static str,
    pub container: String,
    /// The field, as written in the manifest: `readinessProbe`.
    pub probe: &'static str,
    pub problem: String,
}

/// Every bad probe of a pod, so the user fixes them in one round.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidProbes(pub Vec<InvalidProbe>);

impl fmt::Display for InvalidProbes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, invalid) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{invalid}")?;
        }
        Ok(())
    }
}

/// Which list of the pod spec a container is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerList {
    Containers,
    InitContainers,
}

impl ContainerList {
    /// The field name, for JSON pointers.
    pub fn field(self) -> &'static str {
        match self {
            ContainerList::Containers => "containers",
            ContainerList::InitContainers => "initContainers",
        }
    }
}

/// One probe to point at the proxy's admin port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub list: ContainerList,
    /// The container's index in its list, in the pod as it arrived.
    pub index: usize,
    /// `readinessProbe`, `livenessProbe` or `startupProbe`.
    pub field: &'static str,
    /// The handler the probe has now (`httpGet`, `tcpSocket`, `grpc`), replaced by an `httpGet`.
    pub handler: &'static str,
    /// The admin-port path of the new `httpGet`.
    pub path: String,
}

/// What the pod's probes need from the proxy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbePlan {
    /// Ports the kubelet still reaches in plaintext: the probes that are not rewritten.
    pub plaintext_ports: Vec<u16>,
    /// The original checks of the rewritten probes, for `TRELLIS_APP_PROBES`.
    pub app_probes: AppProbes,
    pub rewrites: Vec<Rewrite>,
}

/// How probes are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeMode {
    /// `false` with `trellis.dev/rewrite-probes: disabled`.
    pub rewrite: bool,
    /// Whether native sidecars' probes are rewritten too: only when the proxy starts before
    /// them (native mode). In classic mode the proxy is an ordinary container that starts after
    /// every init container, so a native sidecar's startup probe through it would never pass.
    pub native_sidecars: bool,
}

/// The kubelet's name for each probe field: the `<probe>` of the admin path.
const PROBES: [(&str, &str); 3] = [
    ("readinessProbe", "readiness"),
    ("livenessProbe", "liveness"),
    ("startupProbe", "startup"),
];

/// The app's containers and native sidecars (init containers with `restartPolicy: Always`, the
/// only init containers that may have probes or serve), without the proxy, with their place.
fn app_containers(spec: &PodSpec) -> impl Iterator<Item = (ContainerList, usize, &Container)> {
    let containers = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| (ContainerList::Containers, i, c));
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
        .map(|(i, c)| (ContainerList::InitContainers, i, c));
    // The proxy's own probes go to the admin port, which iptables never redirects.
    containers
        .chain(sidecars)
        .filter(|(_, _, c)| c.name != PROXY_CONTAINER)
}

/// Decides about every httpGet, tcpSocket and grpc probe of the app's containers and native
/// sidecars. Exec probes run inside the container and need nothing.
pub fn plan(spec: &PodSpec, mode: ProbeMode) -> Result<ProbePlan, InvalidProbes> {
    let mut plan = ProbePlan::default();
    let mut errors = Vec::new();
    for (list, index, container) in app_containers(spec) {
        let kind = match list {
            ContainerList::Containers => "container",
            ContainerList::InitContainers => "init container",
        };
        let rewrite = mode.rewrite && (list == ContainerList::Containers || mode.native_sidecars);
        let probes = [
            &container.readiness_probe,
            &container.liveness_probe,
            &container.startup_probe,
        ];
        for ((field, probe_kind), probe) in PROBES.into_iter().zip(probes) {
            let Some(probe) = probe else { continue };
            match check(container, probe) {
                Ok(Check::None) => {}
                Ok(Check::Plaintext(port)) => plan.plaintext_ports.push(port),
                Ok(Check::Proxy(handler, app_probe)) if rewrite => {
                    plan.rewrites.push(Rewrite {
                        list,
                        index,
                        field,
                        handler,
                        path: app_health_path(&container.name, probe_kind),
                    });
                    plan.app_probes
                        .insert(probe_key(&container.name, probe_kind), app_probe);
                }
                Ok(Check::Proxy(_, app_probe)) => plan.plaintext_ports.push(port_of(&app_probe)),
                Err(problem) => errors.push(InvalidProbe {
                    kind,
                    container: container.name.clone(),
                    probe: field,
                    problem,
                }),
            }
        }
    }
    if errors.is_empty() {
        Ok(plan)
    } else {
        Err(InvalidProbes(errors))
    }
}

/// What one probe needs.
enum Check {
    /// No port: exec, or no handler.
    None,
    /// The kubelet must reach this port itself.
    Plaintext(u16),
    /// The proxy can perform the check; the handler it replaces.
    Proxy(&'static str, AppProbe),
}

fn port_of(probe: &AppProbe) -> u16 {
    match probe {
        AppProbe::Http { port, .. } | AppProbe::Tcp { port } | AppProbe::Grpc { port, .. } => *port,
    }
}

fn check(container: &Container, probe: &Probe) -> Result<Check, String> {
    if let Some(http) = &probe.http_get {
        let port = resolve(container, &http.port)?;
        // The kubelet does not verify the app's certificate; the proxy has no such check, so
        // an HTTPS probe keeps going to the app directly.
        if http
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
        {
            return Ok(Check::Plaintext(port));
        }
        let path = match http.path.as_deref().unwrap_or_default() {
            "" => "/".to_string(),
            p if p.starts_with('/') => p.to_string(),
            p => format!("/{p}"),
        };
        let headers = http
            .http_headers
            .iter()
            .flatten()
            .map(|h| ProbeHeader {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect();
        let host = http.host.clone().filter(|h| !h.is_empty());
        return Ok(Check::Proxy(
            "httpGet",
            AppProbe::Http {
                port,
                path,
                host,
                headers,
            },
        ));
    }
    if let Some(tcp) = &probe.tcp_socket {
        let port = resolve(container, &tcp.port)?;
        // A host other than the pod: the kubelet connects there, not to this pod, and the
        // proxy only checks its own pod's app; the probe stays as it is.
        if tcp.host.as_deref().is_some_and(|h| !h.is_empty()) {
            return Ok(Check::Plaintext(port));
        }
        return Ok(Check::Proxy("tcpSocket", AppProbe::Tcp { port }));
    }
    if let Some(grpc) = &probe.grpc {
        let port = port_number(grpc.port)?;
        let service = grpc.service.clone().filter(|s| !s.is_empty());
        return Ok(Check::Proxy("grpc", AppProbe::Grpc { port, service }));
    }
    Ok(Check::None)
}

/// The ports where the proxy accepts plaintext: the probe ports that are not rewritten and those
/// of the `trellis.dev/inbound-plaintext-ports` annotation, sorted and de-duplicated.
pub fn plaintext_ports(probe_ports: &[u16], annotation: Option<&PortList>) -> PortList {
    let mut ranges: Vec<PortRange> = probe_ports.iter().map(|&p| PortRange::single(p)).collect();
    ranges.extend(annotation.iter().flat_map(|list| list.0.iter().copied()));
    PortList(ranges).normalized()
}

/// The ports the proxy delivers inbound traffic to: every TCP `containerPort` of the app's
/// containers and native sidecars, the `trellis.dev/inbound-ports` annotation's, and, so
/// nothing that works today is cut off, the plaintext ports. `None` when the pod declares no
/// port and has no annotation: the proxy then delivers to any port (still to the pod IP).
pub fn inbound_ports(
    spec: &PodSpec,
    annotation: Option<&PortList>,
    plaintext: &PortList,
) -> Option<PortList> {
    let mut ranges: Vec<PortRange> = app_containers(spec)
        .flat_map(|(_, _, c)| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| port_number(p.container_port).ok())
        .map(PortRange::single)
        .collect();
    ranges.extend(annotation.iter().flat_map(|list| list.0.iter().copied()));
    if ranges.is_empty() {
        return None;
    }
    ranges.extend(plaintext.0.iter().copied());
    Some(PortList(ranges).normalized())
}

/// A number, or a name the kubelet looks up in the same container's `ports`.
fn resolve(container: &Container, port: &IntOrString) -> Result<u16, String> {
    let name = match port {
        IntOrString::Int(number) => return port_number(*number),
        IntOrString::String(name) => name,
    };
    let ports = container.ports.iter().flatten();
    if let Some(found) = ports
        .clone()
        .find(|p| p.name.as_deref() == Some(name.as_str()))
    {
        return port_number(found.container_port);
    }
    let names: Vec<&str> = ports.filter_map(|p| p.name.as_deref()).collect();
    let known = if names.is_empty() {
        "it has no named ports".to_string()
    } else {
        format!("its port names: {}", names.join(", "))
    };
    // `port: "8080"` is a name to Kubernetes, not a number.
    let hint = if name.parse::<u16>().is_ok() {
        format!("; write the number without quotes, port: {name}")
    } else {
        "; use one of its port names or a number".to_string()
    };
    Err(format!(
        "port {name:?} is not a port name of the container ({known}){hint}"
    ))
}

fn port_number(number: i32) -> Result<u16, String> {
    u16::try_from(number)
        .ok()
        .filter(|port| *port > 0)
        .ok_or_else(|| format!("port {number} is not a valid port (use 1-65535)"))
}

#[cfg(test)]
#[path = "probes_tests.rs"]
mod tests;
