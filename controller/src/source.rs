//! Where the offline tools (`check`, `explain`) read the cluster: a directory of manifests, or
//! one list of each kind from the API server (`--kubernetes`, read-only). Both give the same
//! [`Objects`], so the tools' answers do not depend on the source.

use std::path::Path;

use crate::kubernetes::snapshot::{self, resource};
use crate::manifests;
use crate::objects::Objects;

/// Where to read the cluster from.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    Manifests(&'a Path),
    Kubernetes,
}

/// Reads the cluster. What is read as empty (a route kind whose CRD is not installed) is said
/// on stderr; the error is the message to print.
pub fn load(source: Source<'_>) -> Result<Objects, String> {
    match source {
        Source::Manifests(dir) => manifests::load_dir(dir).map_err(|e| e.to_string()),
        Source::Kubernetes => runtime()?.block_on(async {
            let client = crate::kubernetes::client()
                .await
                .map_err(|e| e.to_string())?;
            list(&client).await
        }),
    }
}

/// One list of every kind from the API server behind `client`.
pub async fn list(client: &kube::Client) -> Result<Objects, String> {
    let snapshot = snapshot::take(client).await.map_err(|e| e.to_string())?;
    for kind in &snapshot.missing {
        eprintln!(
            "warning: the API server does not serve {kind} (the Gateway API CRD {} is not \
             installed): read as no {kind}",
            resource(*kind)
        );
    }
    Ok(snapshot.objects)
}

/// A runtime for the one-shot tools, whose `main` is synchronous.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}
