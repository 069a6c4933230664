//! Local mode's input: a directory of ordinary Kubernetes manifests (what `kubectl get -o yaml`
//! prints or what one would `kubectl apply`), read into the same [`Objects`] the cluster
//! watches produce, so that the model cannot tell the two sources apart.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

use crate::objects::Objects;

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Why a manifest directory cannot be used. Every variant names the file, and the object when
/// one is involved, so that the message alone says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read manifest directory {}: {source}", dir.display())]
    Dir { dir: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The file is not YAML (or JSON) at all.
    #[error("{}{}: {message}", path.display(), line_suffix(*line))]
    Syntax {
        path: PathBuf,
        line: Option<u64>,
        message: String,
    },
    /// A document parses but is not a valid object of a kind Trellis reads.
    #[error("{}{}: {document}{}: {message}", path.display(), line_suffix(*line), object_suffix(object))]
    Object {
        path: PathBuf,
        /// Line where the document starts.
        line: Option<u64>,
        document: DocumentRef,
        /// `Kind namespace/name`, when the document got that far.
        object: Option<String>,
        message: String,
    },
    #[error("{object} is defined twice: {first} and {second}")]
    Duplicate {
        object: String,
        first: Origin,
        second: Origin,
    },
}

fn line_suffix(line: Option<u64>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}

fn object_suffix(object: &Option<String>) -> String {
    object
        .as_ref()
        .map(|o| format!(" ({o})"))
        .unwrap_or_default()
}

/// A document of a file, counted from 1 among its non-empty documents, and the position in a
/// `kind: List` when the object is one of its items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocumentRef {
    pub document: usize,
    pub item: Option<usize>,
}

impl fmt::Display for DocumentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        match self.item {
            Some(item) => write!(f, ", item {item}"),
            None => Ok(()),
        }
    }
}

/// Where an object was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub path: PathBuf,
    pub document: DocumentRef,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.path.display(), self.document)
    }
}

/// The kinds the model reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Service,
    Pod,
    EndpointSlice,
    HttpRoute,
    GrpcRoute,
}

impl Kind {
    /// The kind of a known `apiVersion`/`kind` pair. Older route versions share the v1 schema,
    /// so they are read as v1 rather than turned away.
    fn of(api_version: &str, kind: &str) -> Option<Kind> {
        match (api_version, kind) {
            ("v1", "Service") => Some(Kind::Service),
            ("v1", "Pod") => Some(Kind::Pod),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Kind::EndpointSlice),
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
                Some(Kind::HttpRoute)
            }
            (
                "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1alpha2",
                "GRPCRoute",
            ) => Some(Kind::GrpcRoute),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
        }
    }

    /// The apiVersion the typed object expects.
    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Pod => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::HttpRoute | Kind::GrpcRoute => "gateway.networking.k8s.io/v1",
        }
    }
}

/// Whether a kind we do not read is probably a typo'd version of one we do: worth a warning,
/// where a Deployment or a Knative `Service` is not.
fn looks_like_ours(api_version: &str, kind: &str) -> bool {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    matches!(
        (group, kind),
        ("", "Service" | "Pod")
            | ("discovery.k8s.io", "EndpointSlice")
            | (GATEWAY_GROUP, "HTTPRoute" | "GRPCRoute")
    )
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file directly in `dir`, in name order. Hidden
/// files (editor swap files, a ConfigMap volume's `..data`) and other names are ignored; kinds
/// the model does not read are skipped. Any bad file fails the whole load: a half-read
/// directory would publish a state nobody wrote.
pub fn load_dir(dir: &Path) -> Result<Objects, LoadError> {
    let mut loader = Loader::default();
    for path in manifest_files(dir)? {
        let text = fs::read_to_string(&path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        loader.load_file(&path, &text)?;
    }
    let mut objects = loader.objects;
    objects.assign_cluster_ips();
    Ok(objects)
}

/// What changes when a manifest file is added, removed or rewritten. Comparing two of these is
/// how the reload loop notices edits without a file-notification dependency.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

/// Takes the [`Fingerprint`] of the files [`load_dir`] would read. Follows symlinks, so that a
/// ConfigMap volume's atomic `..data` swap counts as a change.
pub fn fingerprint(dir: &Path) -> Result<Fingerprint, LoadError> {
    let mut files = Vec::new();
    for path in manifest_files(dir)? {
        let meta = fs::metadata(&path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        files.push((path, meta.len(), meta.modified().ok()));
    }
    Ok(Fingerprint(files))
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let dir_err = |source| LoadError::Dir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(dir_err)? {
        let path = entry.map_err(dir_err)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let wanted = [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        // A file that vanished since read_dir is simply not there any more.
        if name.starts_with('.') || !wanted || !path.is_file() {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

#[derive(Default)]
struct Loader {
    objects: Objects,
    seen: HashMap<(Kind, String, String), Origin>,
}

impl Loader {
    fn load_file(&mut self, path: &Path, text: &str) -> Result<(), LoadError> {
        let documents = if path.extension().is_some_and(|e| e == "json") {
            parse_json(path, text)?
        } else {
            parse_yaml(path, text)?
        };
        for (i, (line, value)) in documents.into_iter().enumerate() {
            let document = DocumentRef {
                document: i + 1,
                item: None,
            };
            self.load_value(path, line, document, value)?;
        }
        Ok(())
    }

    fn load_value(
        &mut self,
        path: &Path,
        line: Option<u64>,
        document: DocumentRef,
        mut value: Value,
    ) -> Result<(), LoadError> {
        let err = |object: Option<String>, message: String| LoadError::Object {
            path: path.to_path_buf(),
            line,
            document,
            object,
            message,
        };
        let Some(map) = value.as_object_mut() else {
            return Err(err(
                None,
                "expected a Kubernetes object (a mapping with apiVersion and kind)".into(),
            ));
        };
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
        let (api_version, kind_name) = (text(map.get("apiVersion")), text(map.get("kind")));
        if api_version.is_empty() || kind_name.is_empty() {
            return Err(err(
                None,
                "expected a Kubernetes object: apiVersion and kind must be set".into(),
            ));
        }

        if kind_name == "List" && api_version == "v1" {
            let items = match map.remove("items") {
                Some(Value::Array(items)) => items,
                None | Some(Value::Null) => Vec::new(),
                Some(_) => return Err(err(Some("List".into()), "items must be a list".into())),
            };
            for (i, item) in items.into_iter().enumerate() {
                let item_ref = DocumentRef {
                    item: Some(i + 1),
                    ..document
                };
                self.load_value(path, line, item_ref, item)?;
            }
            return Ok(());
        }

        let Some(kind) = Kind::of(&api_version, &kind_name) else {
            if looks_like_ours(&api_version, &kind_name) {
                tracing::warn!(file = %path.display(), %document, "skipping {kind_name}: apiVersion {api_version} is not supported");
            } else {
                tracing::debug!(file = %path.display(), %document, "skipping {api_version} {kind_name}");
            }
            return Ok(());
        };

        let meta = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        let Some(meta) = meta.as_object_mut() else {
            return Err(err(Some(kind_name), "metadata must be a mapping".into()));
        };
        let name = text(meta.get("name"));
        if name.is_empty() {
            return Err(err(Some(kind_name), "metadata.name must be set".into()));
        }
        let mut namespace = text(meta.get("namespace"));
        if namespace.is_empty() {
            namespace = "default".to_string();
            meta.insert("namespace".into(), Value::String(namespace.clone()));
        }
        map.insert(
            "apiVersion".into(),
            Value::String(kind.api_version().into()),
        );
        let object = format!("{} {namespace}/{name}", kind.as_str());

        let origin = Origin {
            path: path.to_path_buf(),
            document,
        };
        if let Some(first) = self.seen.get(&(kind, namespace.clone(), name.clone())) {
            return Err(LoadError::Duplicate {
                object,
                first: first.clone(),
                second: origin,
            });
        }

        let objects = &mut self.objects;
        let typed = match kind {
            Kind::Service => serde_json::from_value(value).map(|o| objects.services.push(o)),
            Kind::Pod => serde_json::from_value(value).map(|o| objects.pods.push(o)),
            Kind::EndpointSlice => {
                serde_json::from_value(value).map(|o| objects.endpoint_slices.push(o))
            }
            Kind::HttpRoute => serde_json::from_value(value).map(|o| objects.http_routes.push(o)),
            Kind::GrpcRoute => serde_json::from_value(value).map(|o| objects.grpc_routes.push(o)),
        };
        typed.map_err(|e| err(Some(object), e.to_string()))?;
        self.seen.insert((kind, namespace, name), origin);
        Ok(())
    }
}

/// The documents of a YAML file with the line each starts on. Empty documents are dropped.
fn parse_yaml(path: &Path, text: &str) -> Result<Vec<(Option<u64>, Value)>, LoadError> {
    let options = serde_saphyr::options! { with_snippet: false };
    let docs: Vec<serde_saphyr::Spanned<Value>> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
            let line = e.location().map(|l| l.line()).filter(|l| *l > 0);
            LoadError::Syntax {
                path: path.to_path_buf(),
                line,
                message: e.without_snippet().to_string(),
            }
        })?;
    Ok(docs
        .into_iter()
        .map(|d| {
            let line = Some(d.referenced.line()).filter(|l| *l > 0);
            (line, d.value)
        })
        .filter(|(_, v)| !v.is_null())
        .collect())
}

/// A JSON file is one document; serde_json gives better messages for JSON than a YAML parser.
fn parse_json(path: &Path, text: &str) -> Result<Vec<(Option<u64>, Value)>, LoadError> {
    let value: Value = serde_json::from_str(text).map_err(|e| LoadError::Syntax {
        path: path.to_path_buf(),
        line: Some(e.line() as u64),
        message: e.to_string(),
    })?;
    Ok(if value.is_null() {
        Vec::new()
    } else {
        vec![(Some(1), value)]
    })
}

// Kept beside the loader: they describe its contract.
#[cfg(test)]
#[path = "manifests_tests.rs"]
mod tests;
