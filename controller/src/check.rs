//! `trellis-controller check`: the status every route of a manifest directory would get.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::index::{Config, Index};
use crate::manifests;
use crate::status::RouteStatus;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory of Kubernetes YAML manifests (Services, EndpointSlices, Pods, HTTPRoutes,
    /// GRPCRoutes).
    #[arg(long, env = "TRELLIS_MANIFESTS")]
    pub manifests: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Yaml)]
    pub output: Format,
    /// Trust domain of workload identities.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = trellis_api::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Cluster DNS domain.
    #[arg(long, env = "TRELLIS_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Yaml,
    Json,
}

/// Exit codes: every route healthy, some route not, input unreadable.
pub const HEALTHY: u8 = 0;
pub const UNHEALTHY: u8 = 1;
pub const UNREADABLE: u8 = 2;

pub fn main(args: Args) -> ExitCode {
    let objects = match manifests::load_dir(&args.manifests) {
        Ok(objects) => objects,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(UNREADABLE);
        }
    };
    let config = Config {
        trust_domain: args.trust_domain,
        cluster_domain: args.cluster_domain,
    };
    let index = Index::build(&objects, &config);
    let statuses = index.statuses();
    match render(statuses, args.output) {
        Ok(text) => print!("{text}"),
        Err(e) => {
            eprintln!("error: cannot print the status: {e}");
            return ExitCode::from(UNREADABLE);
        }
    }
    ExitCode::from(exit_code(statuses))
}

pub fn exit_code(statuses: &[RouteStatus]) -> u8 {
    if statuses.iter().all(RouteStatus::is_healthy) {
        HEALTHY
    } else {
        UNHEALTHY
    }
}

/// The statuses as a document `{routes: [...]}`, so the output stays one valid YAML/JSON value
/// even when there are no routes.
pub fn render(statuses: &[RouteStatus], format: Format) -> Result<String, String> {
    #[derive(serde::Serialize)]
    struct Doc<'a> {
        routes: &'a [RouteStatus],
    }
    let doc = Doc { routes: statuses };
    match format {
        Format::Json => serde_json::to_string_pretty(&doc)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string()),
        Format::Yaml => serde_saphyr::to_string(&doc).map_err(|e| e.to_string()),
    }
}
