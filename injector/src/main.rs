//! The Trellis injector's command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use trellis_injector::{inject_cmd, serve};

/// Adds the Trellis sidecar to the pods of namespaces labelled `trellis.dev/inject=enabled`.
#[derive(Debug, Parser)]
#[command(name = "trellis-injector", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the admission webhook (HTTPS on :8443) and the admin server (:9990).
    Serve(Box<trellis_injector::config::ServeArgs>),
    /// Print a manifest with the sidecar injected into every pod template; exit 0 when printed,
    /// 1 when an object is refused (nothing is printed), 2 when the input cannot be read.
    Inject(Box<inject_cmd::Args>),
}

fn main() -> ExitCode {
    // kube's client and the webhook's TLS both use rustls; with a single provider chosen here,
    // nothing depends on which providers other crates happen to enable.
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("error: a TLS crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    match Cli::parse().command {
        Command::Serve(args) => serve::main(*args),
        Command::Inject(args) => inject_cmd::main(*args),
    }
}
