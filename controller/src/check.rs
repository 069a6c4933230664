//! `trellis-controller check`: the status every route of a manifest directory, or of the
//! cluster (`--kubernetes`), would get.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::index::{Config, Index};
use crate::objects::Objects;
use crate::source::{self, Source};
use crate::status::RouteStatus;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["manifests", "kubernetes"])))]
pub struct Args {
    /// Directory of Kubernetes YAML manifests (Services, EndpointSlices, Pods, HTTPRoutes,
    /// GRPCRoutes).
    #[arg(long, env = "TRELLIS_MANIFESTS", value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Read the same kinds from the Kubernetes API server instead (kubeconfig or in-cluster
    /// config; list only, nothing is written).
    #[arg(long)]
    pub kubernetes: bool,
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
    let source = match &args.manifests {
        Some(dir) => Source::Manifests(dir),
        None => Source::Kubernetes,
    };
    let config = Config {
        trust_domain: args.trust_domain,
        cluster_domain: args.cluster_domain,
    };
    let outcome = outcome(source::load(source), &config, args.output);
    print!("{}", outcome.stdout);
    eprint!("{}", outcome.stderr);
    ExitCode::from(outcome.code)
}

/// What `check` prints and how it exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub code: u8,
}

/// `check`'s answer for the cluster as read (or the reason it could not be read).
pub fn outcome(loaded: Result<Objects, String>, config: &Config, format: Format) -> Outcome {
    let failed = |message: String| Outcome {
        stdout: String::new(),
        stderr: format!("error: {message}\n"),
        code: UNREADABLE,
    };
    let objects = match loaded {
        Ok(objects) => objects,
        Err(e) => return failed(e),
    };
    let index = Index::build(&objects, config);
    let statuses = index.statuses();
    match render(statuses, format) {
        Ok(text) => Outcome {
            stdout: text,
            stderr: String::new(),
            code: exit_code(statuses),
        },
        Err(e) => failed(format!("cannot print the status: {e}")),
    }
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
