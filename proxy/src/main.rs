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
    /// Wait until the sidecar in this pod is ready (a classic sidecar's postStart hook).
    AwaitReady(AwaitReady),
    /// Start the sidecar's drain and wait out the window (a classic sidecar's preStop hook).
    Drain(Drain),
}

#[derive(Debug, clap::Args)]
struct Drain {
    /// The sidecar's admin address.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    admin_addr: std::net::SocketAddr,
    /// How long to wait after draining starts: the sidecar's drain window.
    #[arg(long, env = "TRELLIS_DRAIN_WINDOW", default_value = "5s", value_parser = config::parse_duration)]
    wait: std::time::Duration,
}

/// Asks the sidecar to drain (`POST /drain`), then waits `--wait`, so that the kubelet's
/// SIGTERM comes once clients have moved away. The wait happens even if the sidecar cannot be
/// reached: the app's own shutdown still needs it.
fn drain(args: &Drain) -> ExitCode {
    use std::io::{Read, Write};
    use std::time::Duration;
    let addr = local_admin(args.admin_addr);
    let asked = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"POST /drain HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out.starts_with(b"HTTP/1.1 202"))
    });
    if !matches!(asked, Ok(true)) {
        eprintln!("warning: the sidecar at {addr} did not start draining: {asked:?}");
    }
    std::thread::sleep(args.wait);
    ExitCode::SUCCESS
}

/// A wildcard admin address is reached on loopback.
fn local_admin(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip().is_unspecified() {
        true => std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())),
        false => addr,
    }
}

#[derive(Debug, clap::Args)]
struct AwaitReady {
    /// The sidecar's admin address.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    admin_addr: std::net::SocketAddr,
    /// Give up after this long.
    #[arg(long, default_value = "120s", value_parser = config::parse_duration)]
    timeout: std::time::Duration,
}

/// Polls `/ready` until it answers 200; exit 0 then, 1 at the timeout.
fn await_ready(args: &AwaitReady) -> ExitCode {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + args.timeout;
    let addr = local_admin(args.admin_addr);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut out = Vec::new();
            if s.write_all(b"GET /ready HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
                .is_ok()
                && s.read_to_end(&mut out).is_ok()
                && out.starts_with(b"HTTP/1.1 200")
            {
                return ExitCode::SUCCESS;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "error: the sidecar at {addr} was not ready within {:?}",
        args.timeout
    );
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => run::main(*args),
        Command::Init(args) => init::main(args),
        Command::AwaitReady(args) => await_ready(&args),
        Command::Drain(args) => drain(&args),
    }
}
