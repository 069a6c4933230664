//! The Trellis injector: the mutating admission webhook that adds the sidecar to pods.
//!
//! Not in this release yet: the subcommands exist so that their interface is fixed, and they
//! refuse to start rather than pretend to inject.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Adds the Trellis sidecar to the pods of namespaces labelled `trellis.dev/inject=enabled`.
#[derive(Debug, Parser)]
#[command(name = "trellis-injector", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the admission webhook (HTTPS on :8443).
    Serve,
    /// Print a manifest with the sidecar injected.
    Inject,
}

fn main() -> ExitCode {
    let what = match Cli::parse().command {
        Command::Serve => "the admission webhook (trellis-injector serve)",
        Command::Inject => "offline injection (trellis-injector inject)",
    };
    eprintln!("error: {what} is not available in this release of Trellis");
    ExitCode::from(2)
}
