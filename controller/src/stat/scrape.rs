//! Reading sidecars' `/metrics`: straight from their admin ports, or through the API server's
//! pod proxy (`GET /api/v1/namespaces/NS/pods/NAME:PORT/proxy/metrics`), which needs nothing
//! but RBAC for `pods/proxy` since `/metrics` is public on the admin port.

use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

/// The marker the injector puts on every pod it gave a sidecar.
pub const MESHED_ANNOTATION: &str = "trellis.dev/proxy-version";
/// The proxy's admin port, unless the pod's `prometheus.io/port` says otherwise.
pub const ADMIN_PORT: u16 = 4191;
/// A metrics page larger than this is not a sidecar's.
const MAX_BODY: usize = 64 << 20;

/// An HTTP/1.1 client for admin ports and the Prometheus API.
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("{0}")]
    Http(String),
    /// Any answer but 200: its status and the first line of its body.
    #[error("answered {0}: {1}")]
    Status(http::StatusCode, String),
    #[error("through the API server: {0}")]
    Kubernetes(#[from] kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A sidecar `stat` reads.
#[derive(Clone, Debug)]
pub struct Sidecar {
    /// How it is named on stderr: the address, or `namespace/pod`.
    pub name: String,
    how: How,
}

#[derive(Clone)]
enum How {
    Admin(Box<HttpClient>, Uri),
    Pod(kube::Client, String),
}

impl std::fmt::Debug for How {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            How::Admin(_, uri) => write!(f, "Admin({uri})"),
            How::Pod(_, path) => write!(f, "Pod({path})"),
        }
    }
}

impl Sidecar {
    /// A sidecar's admin address, `HOST[:PORT]` (port 4191 by default) or an `http://` URL.
    pub fn admin(client: &HttpClient, addr: &str) -> Result<Sidecar, String> {
        let bad = |why: &str| format!("--admin {addr:?}: {why}");
        let base = addr.trim_end_matches('/');
        let base = match base.strip_prefix("http://") {
            Some(rest) => rest,
            None if base.contains("://") => return Err(bad("only http:// is served there")),
            None => base,
        };
        let base = base.strip_suffix("/metrics").unwrap_or(base);
        let authority: http::uri::Authority = base
            .parse()
            .map_err(|_| bad("expected HOST[:PORT], such as 10.1.0.5:4191"))?;
        let authority = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{authority}:{ADMIN_PORT}"),
        };
        let uri: Uri = format!("http://{authority}/metrics")
            .parse()
            .map_err(|_| bad("not an address"))?;
        Ok(Sidecar {
            name: authority,
            how: How::Admin(Box::new(client.clone()), uri),
        })
    }

    /// A pod's sidecar, through the API server's pod proxy.
    pub fn pod(client: &kube::Client, namespace: &str, name: &str, port: u16) -> Sidecar {
        Sidecar {
            name: format!("{namespace}/{name}"),
            how: How::Pod(
                client.clone(),
                format!("/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy/metrics"),
            ),
        }
    }

    /// The text of its `/metrics`, in the Prometheus text format.
    pub async fn metrics(&self, within: Duration) -> Result<String, ScrapeError> {
        let get = async {
            match &self.how {
                How::Admin(client, uri) => admin_get(client, uri.clone()).await,
                How::Pod(client, path) => {
                    let request = Request::get(path.as_str())
                        .header(http::header::ACCEPT, "text/plain")
                        .body(Vec::new())
                        .map_err(|e| ScrapeError::Http(e.to_string()))?;
                    Ok(client.request_text(request).await?)
                }
            }
        };
        tokio::time::timeout(within, get)
            .await
            .map_err(|_| ScrapeError::Timeout(within))?
    }
}

/// `GET uri` with `Accept: text/plain` (the text format, not OpenMetrics); any answer but 200
/// is an error.
pub async fn admin_get(client: &HttpClient, uri: Uri) -> Result<String, ScrapeError> {
    let request = Request::get(uri)
        .header(http::header::ACCEPT, "text/plain")
        .body(Empty::new())
        .map_err(|e| ScrapeError::Http(e.to_string()))?;
    let response = client
        .request(request)
        .await
        .map_err(|e| ScrapeError::Http(error_chain(&e)))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ScrapeError::Http(format!("reading the answer: {e}")))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        let first = match text.lines().next() {
            Some(line) if !line.trim().is_empty() => line.to_string(),
            _ => "(no body)".to_string(),
        };
        return Err(ScrapeError::Status(status, first));
    }
    Ok(text)
}

/// An error and its causes on one line ("client error (Connect): connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out += &format!(": {s}");
        source = s.source();
    }
    out
}

/// The meshed pods (those carrying [`MESHED_ANNOTATION`]) that run, in `namespace` or all
/// namespaces, optionally only those matching a label `selector`.
pub async fn meshed_pods(
    client: &kube::Client,
    namespace: Option<&str>,
    selector: Option<&str>,
) -> Result<Vec<Sidecar>, kube::Error> {
    let api: Api<Pod> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut params = ListParams::default();
    if let Some(selector) = selector {
        params = params.labels(selector);
    }
    let pods = api.list(&params).await?;
    let mut sidecars = Vec::new();
    for pod in pods.items {
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let running = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Running");
        if !annotations.contains_key(MESHED_ANNOTATION) || !running {
            continue;
        }
        let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            continue;
        };
        let port = annotations
            .get("prometheus.io/port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(ADMIN_PORT);
        sidecars.push(Sidecar::pod(client, ns, name, port));
    }
    sidecars.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(sidecars)
}

/// One scrape of a sidecar: its text, or why there is none, and when it came.
#[derive(Debug)]
pub struct Scrape {
    pub text: Result<String, ScrapeError>,
    pub at: Instant,
}

/// How many scrapes run at once: a cluster's pods all go through one API server.
const PARALLEL: usize = 32;

/// Scrapes every sidecar, [`PARALLEL`] at a time; the scrapes in the order of `sidecars`.
pub async fn scrape_all(sidecars: &[Sidecar], within: Duration) -> Vec<Scrape> {
    use futures::StreamExt;
    futures::stream::iter(sidecars)
        .map(|s| async move {
            let text = s.metrics(within).await;
            Scrape {
                text,
                at: Instant::now(),
            }
        })
        .buffered(PARALLEL)
        .collect()
        .await
}
