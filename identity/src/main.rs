//! The Trellis identity service: the mesh CA that certifies workloads for mutual TLS.
//!
//! Not in this release yet: the subcommands exist so that their interface is fixed, and they
//! refuse to start rather than pretend to issue certificates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Serve the certify endpoint (HTTPS on :8080).
    Serve,
    /// Create the trust anchor and issuer when they do not exist.
    Bootstrap,
}

fn main() -> ExitCode {
    let what = match Cli::parse().command {
        Command::Serve => "the certify endpoint (trellis-identity serve)",
        Command::Bootstrap => "trust bootstrap (trellis-identity bootstrap)",
    };
    eprintln!("error: {what} is not available in this release of Trellis");
    ExitCode::from(2)
}
