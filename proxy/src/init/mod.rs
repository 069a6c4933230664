//! `trellis-proxy init`: programs the pod's iptables so its TCP traffic goes through the proxy.
//!
//! Runs once per pod, in the injected init container, before the app and the proxy start.
//! [`rules`] decides what to install (pure), [`iptables`] picks the backend and installs it.

pub mod iptables;
pub mod parse;
pub mod rules;

use std::io::{self, Write};
use std::process::ExitCode;

use self::iptables::{Kind, Mode, System};
use self::parse::{CidrList, PortList};
use self::rules::Settings;

/// Settings of `trellis-proxy init`; each flag can also be set through its `TRELLIS_` variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// User id the proxy runs as; its own connections are never redirected.
    #[arg(
        long,
        env = "TRELLIS_PROXY_UID",
        value_name = "UID",
        default_value_t = 2102
    )]
    pub proxy_uid: u32,

    /// Port of the proxy's inbound listener: TCP arriving at the pod is redirected here.
    #[arg(long, env = "TRELLIS_INBOUND_PORT", value_name = "PORT", default_value_t = 4143,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,

    /// Port of the proxy's outbound listener: TCP the pod opens is redirected here.
    #[arg(long, env = "TRELLIS_OUTBOUND_PORT", value_name = "PORT", default_value_t = 4140,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,

    /// Port of the proxy's admin server (probes, metrics); never redirected.
    #[arg(long, env = "TRELLIS_ADMIN_PORT", value_name = "PORT", default_value_t = 4191,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub admin_port: u16,

    /// Inbound ports that reach the app directly, e.g. `22,8000-8100`.
    #[arg(long, env = "TRELLIS_SKIP_INBOUND_PORTS", value_name = "PORTS",
          value_parser = parse::parse_port_list)]
    pub skip_inbound_ports: Option<PortList>,

    /// Destination ports the app reaches directly, e.g. `3306,9000-9100`.
    #[arg(long, env = "TRELLIS_SKIP_OUTBOUND_PORTS", value_name = "PORTS",
          value_parser = parse::parse_port_list)]
    pub skip_outbound_ports: Option<PortList>,

    /// IPv4 networks the app reaches directly, e.g. `169.254.169.254/32,10.10.0.0/16`.
    #[arg(long, env = "TRELLIS_SKIP_OUTBOUND_CIDRS", value_name = "CIDRS",
          value_parser = parse::parse_cidr_list)]
    pub skip_outbound_cidrs: Option<CidrList>,

    /// Backend: the one already holding rules (auto), nf_tables (nft) or x_tables (legacy).
    #[arg(long, env = "TRELLIS_IPTABLES_MODE", value_name = "MODE", value_enum,
          default_value_t = Mode::Auto)]
    pub iptables_mode: Mode,

    /// Print the rules without detecting the backend or changing anything.
    #[arg(long, env = "TRELLIS_DRY_RUN")]
    pub dry_run: bool,
}

impl Args {
    /// Checks what clap cannot see flag by flag and returns the rule settings.
    pub fn settings(&self) -> Result<Settings, InitError> {
        if self.proxy_uid == 0 {
            return Err(InitError::Invalid(
                "invalid value '0' for '--proxy-uid': excluding uid 0 would let every process \
                 running as root bypass the proxy; run the proxy as its own user (2102)"
                    .to_string(),
            ));
        }
        let ports = [
            ("--inbound-port", self.inbound_port),
            ("--outbound-port", self.outbound_port),
            ("--admin-port", self.admin_port),
        ];
        for (i, (a, pa)) in ports.iter().enumerate() {
            for (b, pb) in &ports[i + 1..] {
                if pa == pb {
                    return Err(InitError::Invalid(format!(
                        "'{a}' and '{b}' are both {pa}: the proxy needs a separate port for each"
                    )));
                }
            }
        }
        Ok(Settings {
            proxy_uid: self.proxy_uid,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            admin_port: self.admin_port,
            skip_inbound_ports: self.skip_inbound_ports.clone().unwrap_or_default(),
            skip_outbound_ports: self.skip_outbound_ports.clone().unwrap_or_default(),
            skip_outbound_cidrs: self.skip_outbound_cidrs.clone().unwrap_or_default(),
        })
    }
}

/// Why `trellis-proxy init` could not program the pod.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "iptables is not installed (looked for iptables-nft, iptables-legacy and iptables on PATH): \
         install the `iptables` package in the init container's image \
         (Debian/Ubuntu: apt-get install iptables; Alpine: apk add iptables)"
    )]
    IptablesMissing,
    #[error(
        "--iptables-mode {kind}: iptables-{kind} is not installed; install the `iptables` package \
         (Debian's ships both iptables-nft and iptables-legacy) or use --iptables-mode auto"
    )]
    BackendMissing { kind: Kind },
    #[error(
        "`{command}` was refused: {stderr}\n\
         trellis-proxy init must run as root with the NET_ADMIN and NET_RAW capabilities \
         (securityContext: runAsUser: 0, capabilities.add: [NET_ADMIN, NET_RAW])"
    )]
    PermissionDenied { command: String, stderr: String },
    #[error("`{command}` failed: {stderr}")]
    Iptables { command: String, stderr: String },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
}

/// Runs `trellis-proxy init`: exit 0 when the rules are in place (or printed in a dry run),
/// 2 for invalid settings, 1 when iptables is missing, refused or failed.
pub fn main(args: Args) -> ExitCode {
    let mut out = io::stdout().lock();
    match run(&args, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                InitError::Invalid(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Progress goes to `out`; a failed write there (a closed pipe) cannot change what was
/// installed, so it is ignored rather than reported as a failure.
fn run(args: &Args, out: &mut dyn Write) -> Result<(), InitError> {
    let plan = rules::plan(&args.settings()?);
    if args.dry_run {
        let _ = write!(
            out,
            "# trellis-proxy init --dry-run: nothing changed, no backend detected. A real run\n\
             # creates or flushes these chains of the nat table, appends their rules and adds\n\
             # each jump from a built-in chain unless it is already there. IPv4 only.\n{plan}"
        );
        return Ok(());
    }

    let mut runner = System;
    let installed = iptables::discover(std::env::var_os("PATH"), &mut runner)?;
    let backend = iptables::choose(args.iptables_mode, &installed, || {
        iptables::count_both(&installed, &mut System)
    })?;
    let _ = writeln!(
        out,
        "# trellis-proxy init: using {} ({} backend; {})",
        iptables::program_name(&backend.program),
        backend.kind,
        backend.reason
    );
    iptables::install(&plan, &backend.program, &mut runner)?;
    let listing = iptables::installed_rules(&backend.program, &mut runner)?;
    let _ = write!(
        out,
        "# installed in the nat table (IPv4 only; IPv6 is not redirected):\n{listing}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, String> {
        Cli::try_parse_from(std::iter::once("init").chain(argv.iter().copied()))
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let s = parse(&[]).unwrap().settings().unwrap();
        assert_eq!(
            (s.proxy_uid, s.inbound_port, s.outbound_port, s.admin_port),
            (2102, 4143, 4140, 4191)
        );
        assert!(s.skip_inbound_ports.0.is_empty() && s.skip_outbound_cidrs.0.is_empty());
    }

    #[test]
    fn bad_values_name_the_flag_and_the_value() {
        let cases = [
            (
                &["--skip-inbound-ports", "22,ssh"][..],
                ["--skip-inbound-ports", "'ssh' is not a port number"],
            ),
            (
                &["--skip-outbound-ports", "9000-8000"],
                ["--skip-outbound-ports", "9000-8000"],
            ),
            (
                &["--skip-outbound-cidrs", "10.0.0.1/8"],
                ["--skip-outbound-cidrs", "did you mean 10.0.0.0/8"],
            ),
            (&["--inbound-port", "0"], ["--inbound-port", "'0'"]),
            (&["--admin-port", "70000"], ["--admin-port", "70000"]),
            (&["--proxy-uid=-1"], ["--proxy-uid", "-1"]),
            (&["--iptables-mode", "ebpf"], ["--iptables-mode", "ebpf"]),
        ];
        for (argv, wants) in cases {
            let err = parse(argv).unwrap_err();
            for want in wants {
                assert!(err.contains(want), "{argv:?}: {err}");
            }
        }
    }

    #[test]
    fn conflicting_settings_are_rejected() {
        let cases = [
            (
                &["--proxy-uid", "0"][..],
                "invalid value '0' for '--proxy-uid'",
            ),
            (
                &["--outbound-port", "4143"],
                "'--inbound-port' and '--outbound-port' are both 4143",
            ),
            (
                &["--admin-port", "4140"],
                "'--outbound-port' and '--admin-port' are both 4140",
            ),
        ];
        for (argv, want) in cases {
            let err = parse(argv).unwrap().settings().unwrap_err();
            assert!(matches!(err, InitError::Invalid(_)));
            assert!(err.to_string().contains(want), "{argv:?}: {err}");
        }
    }

    #[test]
    fn dry_run_prints_the_plan_and_touches_nothing() {
        let args = parse(&["--dry-run", "--skip-outbound-ports", "3306"]).unwrap();
        let mut out = Vec::new();
        run(&args, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("# trellis-proxy init --dry-run"), "{text}");
        assert!(
            text.contains("-A TRELLIS_OUTPUT -p tcp --dport 3306 -j RETURN\n"),
            "{text}"
        );
        assert!(text.ends_with("-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 4140\n"));
    }
}
