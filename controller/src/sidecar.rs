//! What a pod's sidecar really holds, for `explain --pod` and `explain --admin`: the proxy's
//! admin server answers `GET /config` (port 4191) with every destination it follows and the
//! policy in force for each.
//!
//! The admin server keeps `/config` to clients on the pod's loopback (see docs/security.md),
//! and this keeps it that way: `--pod` goes through the API server's port-forward subresource,
//! which the kubelet delivers on the pod's loopback, the way `kubectl port-forward` does;
//! `--admin` reads an address the caller can already reach (local mode, or the local end of a
//! `kubectl port-forward`). Fetching is the only I/O here; reading the answer and finding the
//! destination a request goes to ([`Held::find`]) are pure.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use trellis_api::discovery::Target;
use trellis_api::policy::OutboundPolicy;

use crate::index::PROXY_VERSION_ANNOTATION;

/// The proxy's admin port.
pub const ADMIN_PORT: u16 = 4191;
/// How long fetching `/config` may take, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(15);
/// The largest `/config` read: a sidecar following thousands of destinations stays below.
const MAX_BODY: usize = 64 << 20;

/// Why the sidecar's state cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("--pod {0:?}: expected NAMESPACE/NAME")]
    PodName(String),
    #[error("--admin {0:?}: expected HOST:PORT, or an IP address (port {ADMIN_PORT})")]
    AdminAddr(String),
    #[error("pod {namespace}/{name} does not exist")]
    NoPod { namespace: String, name: String },
    #[error(
        "pod {namespace}/{name} has no Trellis sidecar (no {PROXY_VERSION_ANNOTATION} \
         annotation): its traffic is not routed by the mesh"
    )]
    NotMeshed { namespace: String, name: String },
    // Not a `#[source]`: the message already holds kube's whole chain.
    #[error(
        "cannot read pod {namespace}/{name} (the caller needs `get` on pods and `create` on \
         pods/portforward): {error}"
    )]
    Api {
        namespace: String,
        name: String,
        error: Box<kube::Error>,
    },
    #[error("cannot reach {what}: {message}")]
    Connect { what: String, message: String },
    #[error("{what} answered {status} to GET /config: {body}")]
    Status {
        what: String,
        status: StatusCode,
        body: String,
    },
    #[error("{what} did not answer GET /config within {TIMEOUT:?}")]
    Timeout { what: String },
    #[error("{what}: /config is not the document a Trellis sidecar serves: {message}")]
    Document { what: String, message: String },
}

/// What `/config` says: the sidecar's namespace and each followed destination.
#[derive(Clone, Debug, Deserialize)]
pub struct Held {
    pub namespace: String,
    #[serde(default)]
    pub destinations: Vec<HeldDestination>,
}

/// One followed destination.
#[derive(Clone, Debug, Deserialize)]
pub struct HeldDestination {
    /// As the proxy asked for it: `host:port` or `ip:port`.
    pub target: String,
    /// `None` until the controller's first answer arrives. Kept as JSON and read on use, so
    /// that one destination a newer proxy describes differently does not hide the others.
    #[serde(default)]
    pub policy: Option<Value>,
    /// Whatever else the proxy says about the destination (a version, an age), shown as is.
    #[serde(flatten)]
    pub details: BTreeMap<String, Value>,
}

impl HeldDestination {
    /// The policy in force; an error says why it cannot be read.
    pub fn policy(&self) -> Option<Result<OutboundPolicy, String>> {
        let value = self.policy.as_ref()?;
        Some(serde_json::from_value(value.clone()).map_err(|e| e.to_string()))
    }
}

impl Held {
    /// Reads a `/config` body.
    pub fn parse(what: &str, body: &[u8]) -> Result<Held, SidecarError> {
        serde_json::from_slice(body).map_err(|e| SidecarError::Document {
            what: what.to_string(),
            message: e.to_string(),
        })
    }

    /// The destination a connection to `target` from this sidecar's namespace uses: the one
    /// the proxy asked for under that very name or address, else one whose policy is the same
    /// Service port (the proxy follows a destination under the name or address the app used,
    /// so `catalog`, `catalog.shop` and the cluster IP each have an entry of their own).
    pub fn find(&self, target: &Target, cluster_domain: &str) -> Option<&HeldDestination> {
        let parsed = |d: &HeldDestination| Target::parse_with_default_port(&d.target, 80).ok();
        if let Some(exact) = self
            .destinations
            .iter()
            .find(|d| parsed(d).as_ref() == Some(target))
        {
            return Some(exact);
        }
        let wanted = match target {
            Target::Addr(addr) => Wanted::Ip(addr.ip(), addr.port()),
            Target::Name { host, port } => {
                let (namespace, name) = service_of_host(host, &self.namespace, cluster_domain)?;
                Wanted::Service(namespace, name, *port)
            }
        };
        self.destinations.iter().find(|d| {
            let Some(Ok(OutboundPolicy::Service(svc))) = d.policy() else {
                return false;
            };
            match &wanted {
                Wanted::Ip(ip, port) => {
                    svc.port == *port && svc.cluster_ip.parse::<IpAddr>().ok() == Some(*ip)
                }
                Wanted::Service(namespace, name, port) => {
                    svc.port == *port
                        && svc.service.namespace == *namespace
                        && svc.service.name == *name
                }
            }
        })
    }
}

enum Wanted {
    Ip(IpAddr, u16),
    Service(String, String, u16),
}

/// The Service `svc`, `svc.ns`, `svc.ns.svc` or `svc.ns.svc.<cluster-domain>` names for a
/// client in `namespace`, as `(namespace, name)`; as the controller resolves names.
pub fn service_of_host(
    host: &str,
    namespace: &str,
    cluster_domain: &str,
) -> Option<(String, String)> {
    let host = host.trim_end_matches('.');
    let mut labels = host.splitn(4, '.');
    let name = labels.next().filter(|n| !n.is_empty())?;
    let ns = labels.next().unwrap_or(namespace);
    match (labels.next(), labels.next()) {
        (None, None) | (Some("svc"), None) => {}
        (Some("svc"), Some(domain)) if domain == cluster_domain => {}
        _ => return None,
    }
    Some((ns.to_string(), name.to_string()))
}

/// `NAMESPACE/NAME` of `--pod`.
pub fn pod_name(arg: &str) -> Result<(String, String), SidecarError> {
    match arg.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(SidecarError::PodName(arg.to_string())),
    }
}

/// `--admin`: `host:port`, `ip:port`, `[v6]:port`, or an address alone for port 4191.
pub fn admin_addr(arg: &str) -> Result<String, SidecarError> {
    if arg.parse::<SocketAddr>().is_ok() {
        return Ok(arg.to_string());
    }
    if let Ok(ip) = arg
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(SocketAddr::new(ip, ADMIN_PORT).to_string());
    }
    match arg.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(arg.to_string())
        }
        None if !arg.is_empty() => Ok(format!("{arg}:{ADMIN_PORT}")),
        _ => Err(SidecarError::AdminAddr(arg.to_string())),
    }
}

/// Reads `/config` from an admin address the caller reaches directly.
pub async fn fetch_admin(addr: &str) -> Result<Held, SidecarError> {
    let what = format!("the admin server at {addr}");
    let fetch = async {
        let stream =
            tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| SidecarError::Connect {
                    what: what.clone(),
                    message: e.to_string(),
                })?;
        get_config(&what, stream).await
    };
    tokio::time::timeout(TIMEOUT, fetch)
        .await
        .unwrap_or_else(|_| Err(SidecarError::Timeout { what: what.clone() }))
}

/// Reads `/config` from the sidecar of pod `namespace/name`, through the API server's
/// port-forward to the pod's port 4191.
pub async fn fetch_pod(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Held, SidecarError> {
    let what = format!("the sidecar of pod {namespace}/{name}");
    let api_error = |error| SidecarError::Api {
        namespace: namespace.to_string(),
        name: name.to_string(),
        error: Box::new(error),
    };
    let fetch = async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let pod = pods.get_opt(name).await.map_err(api_error)?;
        let pod = pod.ok_or_else(|| SidecarError::NoPod {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })?;
        let meshed = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(PROXY_VERSION_ANNOTATION));
        if !meshed {
            return Err(SidecarError::NotMeshed {
                namespace: namespace.to_string(),
                name: name.to_string(),
            });
        }
        let mut forward = pods
            .portforward(name, &[ADMIN_PORT])
            .await
            .map_err(api_error)?;
        let (Some(stream), Some(error)) = (
            forward.take_stream(ADMIN_PORT),
            forward.take_error(ADMIN_PORT),
        ) else {
            return Err(SidecarError::Connect {
                what: what.clone(),
                message: "the port-forward gave no stream".to_string(),
            });
        };
        let held = get_config(&what, stream).await;
        let held = match held {
            Err(SidecarError::Connect { what, message }) => {
                // The kubelet says on the error channel why the pod's port did not answer
                // (nothing listens on 4191, say); it comes with the closed stream or not at all.
                let why = tokio::time::timeout(Duration::from_secs(1), error)
                    .await
                    .ok()
                    .flatten();
                Err(SidecarError::Connect {
                    what,
                    message: why.map_or(message, |why| format!("port-forward: {why}")),
                })
            }
            other => other,
        };
        forward.abort();
        held
    };
    tokio::time::timeout(TIMEOUT, fetch)
        .await
        .unwrap_or_else(|_| Err(SidecarError::Timeout { what: what.clone() }))
}

/// `GET /config` over HTTP/1.1 on a connected stream.
pub async fn get_config<S>(what: &str, stream: S) -> Result<Held, SidecarError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connect = |e: hyper::Error| SidecarError::Connect {
        what: what.to_string(),
        message: e.to_string(),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(connect)?;
    let connection = tokio::spawn(connection);
    let request = Request::get("/config")
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| SidecarError::Connect {
            what: what.to_string(),
            message: e.to_string(),
        })?;
    let response = sender.send_request(request).await.map_err(connect)?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| SidecarError::Connect {
            what: what.to_string(),
            message: format!("reading the answer: {e}"),
        })?
        .to_bytes();
    connection.abort();
    if status != StatusCode::OK {
        return Err(SidecarError::Status {
            what: what.to_string(),
            status,
            body: String::from_utf8_lossy(&body).trim().to_string(),
        });
    }
    Held::parse(what, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn held() -> Held {
        let svc = |ns: &str, name: &str, ip: &str, port: u16| {
            json!({"type": "service", "service": {"namespace": ns, "name": name},
                   "cluster_ip": ip, "port": port,
                   "routing": {"kind": "passthrough", "backend": {"weight": 1,
                       "target": {"type": "invalid", "status": 500, "reason": "x"}}}})
        };
        Held::parse(
            "test",
            json!({"namespace": "web", "destinations": [
                {"target": "catalog.shop:80", "policy": svc("shop", "catalog", "10.96.0.7", 80)},
                {"target": "10.1.0.9:8080", "policy": {"type": "not_a_service"}},
                {"target": "pending:80", "policy": null, "version": "7"},
                {"target": "search:80", "policy": svc("web", "search", "10.96.0.8", 80)},
            ]})
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    fn target(s: &str) -> Target {
        Target::parse_with_default_port(s, 80).unwrap()
    }

    #[test]
    fn finds_the_destination_by_name_address_or_service() {
        let held = held();
        assert!(held.destinations[0].policy().unwrap().is_ok());
        let found = |to: &str| {
            held.find(&target(to), "cluster.local")
                .map(|d| d.target.as_str())
        };
        let cases = [
            ("catalog.shop", Some("catalog.shop:80")),
            ("catalog.shop.svc.cluster.local:80", Some("catalog.shop:80")),
            ("10.96.0.7", Some("catalog.shop:80")),
            ("10.96.0.7:81", None),
            ("catalog", None),
            ("search.web", Some("search:80")),
            ("search", Some("search:80")),
            ("search.web.svc.other.domain", None),
            ("10.1.0.9:8080", Some("10.1.0.9:8080")),
            ("pending", Some("pending:80")),
            ("elsewhere.shop", None),
        ];
        for (to, want) in cases {
            assert_eq!(found(to), want, "{to}");
        }
        assert_eq!(held.destinations[2].policy().map(|p| p.is_ok()), None);
        assert_eq!(held.destinations[2].details["version"], json!("7"));
    }

    #[test]
    fn a_document_that_is_not_config_is_an_error() {
        let e = Held::parse("the admin server at x", b"not found\n").unwrap_err();
        assert!(e.to_string().contains("not the document"), "{e}");
        let odd = Held::parse(
            "x",
            br#"{"namespace": "a", "destinations": [{"target": "b:80", "policy": {"type": "new"}}]}"#,
        )
        .unwrap();
        assert!(odd.destinations[0].policy().unwrap().is_err());
    }

    #[test]
    fn reads_pod_names_and_admin_addresses() {
        assert_eq!(
            pod_name("shop/web-1").unwrap(),
            ("shop".to_string(), "web-1".to_string())
        );
        for bad in ["web-1", "/web", "shop/", "a/b/c"] {
            assert!(pod_name(bad).is_err(), "{bad}");
        }
        let cases = [
            ("127.0.0.1:4191", "127.0.0.1:4191"),
            ("127.0.0.1", "127.0.0.1:4191"),
            ("::1", "[::1]:4191"),
            ("[::1]:9", "[::1]:9"),
            ("localhost", "localhost:4191"),
            ("localhost:14191", "localhost:14191"),
        ];
        for (arg, want) in cases {
            assert_eq!(admin_addr(arg).unwrap(), want, "{arg}");
        }
        for bad in ["", ":80", "host:port"] {
            assert!(admin_addr(bad).is_err(), "{bad}");
        }
    }
}
