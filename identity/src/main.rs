//! The Trellis identity service's command line.

use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};

use trellis_identity::bootstrap::{self, Done};
use trellis_identity::config::{BootstrapArgs, ServeArgs};
use trellis_identity::run;

/// The mesh certificate authority: turns a workload's CSR and service-account token into a
/// short-lived SPIFFE certificate.
#[derive(Debug, Parser)]
#[command(name = "trellis-identity", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the certify endpoint (HTTPS on :8080) and the admin server (:9990).
    Serve(Box<ServeArgs>),
    /// Create the trust anchor and issuer when they do not exist (exit 0 when they exist and
    /// are usable), or replace the issuer under the same root with --renew-issuer.
    Bootstrap(Box<BootstrapArgs>),
}

fn main() -> ExitCode {
    // kube's client and both TLS sides use rustls; with the provider chosen here, nothing
    // depends on which providers other crates happen to enable.
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("error: a TLS crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    match Cli::parse().command {
        Command::Serve(args) => run::main(*args),
        Command::Bootstrap(args) => bootstrap_main(&args),
    }
}

fn bootstrap_main(args: &BootstrapArgs) -> ExitCode {
    if !run::init_logging(&args.log_level) {
        return ExitCode::from(2);
    }
    let config = match args.validate() {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let Some(runtime) = run::runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(bootstrap::run(&config, SystemTime::now())) {
        Ok(done) => {
            let what = match done {
                Done::AlreadyPresent => "trust anchors and issuer already present and usable",
                Done::Created => "created a new trust anchor and issuer",
                Done::CreatedByAnother => "another replica created the trust anchor and issuer",
                Done::IssuerRenewed => "replaced the issuer under the same trust anchor",
            };
            tracing::info!("bootstrap: {what}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("bootstrap: {e:#}");
            ExitCode::FAILURE
        }
    }
}
