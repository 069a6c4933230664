//! The Trellis sidecar proxy's command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use trellis_proxy::{config, init, run};

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
    Run(Box<config::Args>),
    /// Program the pod's iptables so its TCP traffic goes through the sidecar.
    Init(init::Args),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => run::main(*args),
        Command::Init(args) => init::main(args),
    }
}
