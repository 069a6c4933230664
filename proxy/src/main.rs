//! The Trellis sidecar proxy.
//!
//! This release ships the control plane's model and discovery; the data plane (`run`) and the
//! pod's traffic redirection (`init`) are not in it yet. Both subcommands exist so that their
//! interface is fixed, and both refuse to start rather than pretend to proxy.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The Trellis sidecar: intercepts a pod's traffic and applies the mesh's routes to it.
#[derive(Debug, Parser)]
#[command(name = "trellis-proxy", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar (outbound :4140, inbound :4143, admin :4191).
    Run,
    /// Program the pod's iptables so its TCP traffic goes through the sidecar.
    Init,
}

fn main() -> ExitCode {
    let what = match Cli::parse().command {
        Command::Run => "the sidecar data plane (trellis-proxy run)",
        Command::Init => "traffic redirection (trellis-proxy init)",
    };
    eprintln!("error: {what} is not available in this release of Trellis");
    ExitCode::from(2)
}
