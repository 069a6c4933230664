use std::process::ExitCode;

use clap::{Parser, Subcommand};

use trellis_controller::{check, doctor, explain, serve, stat};

/// The Trellis control plane: compiles Gateway API mesh routes (GAMMA) into per-destination
/// policies and streams them to proxies.
#[derive(Debug, Parser)]
#[command(name = "trellis-controller", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve discovery to proxies.
    Serve(serve::Args),
    /// Print the status every route in a manifest directory (or the cluster, with --kubernetes)
    /// would get; exit 0 when every route is Accepted with resolved references, 1 otherwise, 2
    /// when the input cannot be read.
    Check(check::Args),
    /// Show, as JSON, how a request from a namespace to a host would be routed: by the policy
    /// the controller would send, and (--pod, --admin) by the one a sidecar holds.
    Explain(explain::Args),
    /// Check the health of Trellis in a cluster (read-only); exit 0 when nothing fails
    /// (warnings allowed), 1 when a check fails, 2 when the API server cannot be read.
    Doctor(doctor::Args),
    /// Show what routes are doing: success rate, requests per second and latency percentiles
    /// per parent Service, route, rule and backend, from the sidecars' metrics.
    Stat(stat::Args),
}

fn main() -> ExitCode {
    // Both rustls providers are linked (ring for kube's client, aws-lc-rs for the mesh, which
    // names its own explicitly): without a process default, rustls cannot pick one.
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("error: a TLS crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::main(args),
        Command::Check(args) => {
            warnings_to_stderr();
            check::main(args)
        }
        Command::Explain(args) => {
            warnings_to_stderr();
            explain::main(args)
        }
        Command::Doctor(args) => doctor::main(args),
        Command::Stat(args) => stat::main(args),
    }
}

/// The offline tools print their answer on stdout; what the loader skips (an object with an
/// apiVersion Trellis does not read, say) is worth a line on stderr.
fn warnings_to_stderr() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
}
