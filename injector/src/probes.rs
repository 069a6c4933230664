//! The pod's probe ports. The kubelet probes from the node, outside the mesh and so in
//! plaintext, while a proxy with a mesh identity refuses plaintext inbound except on the ports
//! of `TRELLIS_INBOUND_PLAINTEXT_PORTS`; without its probe ports there, a pod never gets Ready.

use std::fmt;

use k8s_openapi::api::core::v1::{Container, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

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

/// The ports where the proxy must accept plaintext: the pod's probe ports and those of the
/// `trellis.dev/inbound-plaintext-ports` annotation, sorted and de-duplicated.
pub fn inbound_plaintext_ports(
    spec: &PodSpec,
    annotation: Option<&PortList>,
) -> Result<PortList, InvalidProbes> {
    let mut ranges: Vec<PortRange> = probe_ports(spec)?
        .into_iter()
        .map(|port| PortRange {
            first: port,
            last: port,
        })
        .collect();
    ranges.extend(annotation.iter().flat_map(|list| list.0.iter().copied()));
    Ok(PortList(ranges).normalized())
}

/// The ports of every httpGet, tcpSocket and grpc probe of the app's containers and native
/// sidecars (init containers with `restartPolicy: Always`, the only init containers that may
/// have probes), in no particular order. Exec probes run inside the container and need none.
pub fn probe_ports(spec: &PodSpec) -> Result<Vec<u16>, InvalidProbes> {
    let containers = spec.containers.iter().map(|c| ("container", c));
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .map(|c| ("init container", c));
    let mut ports = Vec::new();
    let mut errors = Vec::new();
    for (kind, container) in containers.chain(sidecars) {
        // Its probes go to the admin port, which iptables never redirects.
        if container.name == PROXY_CONTAINER {
            continue;
        }
        let probes = [
            ("livenessProbe", &container.liveness_probe),
            ("readinessProbe", &container.readiness_probe),
            ("startupProbe", &container.startup_probe),
        ];
        for (probe, value) in probes {
            let Some(value) = value else { continue };
            match probe_port(container, value) {
                Ok(Some(port)) => ports.push(port),
                Ok(None) => {}
                Err(problem) => errors.push(InvalidProbe {
                    kind,
                    container: container.name.clone(),
                    probe,
                    problem,
                }),
            }
        }
    }
    if errors.is_empty() {
        Ok(ports)
    } else {
        Err(InvalidProbes(errors))
    }
}

/// The port a probe connects to; `None` for a probe without one (exec, or no handler).
fn probe_port(container: &Container, probe: &Probe) -> Result<Option<u16>, String> {
    if let Some(http) = &probe.http_get {
        return resolve(container, &http.port).map(Some);
    }
    if let Some(tcp) = &probe.tcp_socket {
        return resolve(container, &tcp.port).map(Some);
    }
    if let Some(grpc) = &probe.grpc {
        return port_number(grpc.port).map(Some);
    }
    Ok(None)
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
