//! `trellis-proxy init`: programs the pod's iptables so its TCP traffic goes through the proxy.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> ExitCode {
    eprintln!("error: traffic redirection (trellis-proxy init) is not available in this release of Trellis");
    ExitCode::from(2)
}
