//! `trellis-proxy init`: programs the pod's iptables so its TCP traffic goes through the proxy.
//!
//! Runs once per pod, in the injected init container, before the app and the proxy start.
//! [`rules`] decides what to install and [`restore`] writes it as restore input (both pure);
//! [`iptables`] picks the backend and applies it, one restore process per IP family;
//! [`netlink`] adds the IPv6 delivery source `::6` to `lo`.

pub mod iptables;
pub mod netlink;
pub mod parse;
pub mod restore;
pub mod rules;

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use self::iptables::{Kind, Mode, System};
use self::parse::{CidrList, IpList, PortList};
use self::rules::{DELIVERY_SOURCE_V6, Family, Settings, Table};

/// What to do about IPv6 (`--ipv6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Mode {
    /// Redirect IPv6 when the kernel has it, unless `--pod-ips` lists no IPv6 address; then
    /// drop it.
    Auto,
    /// Redirect IPv6 like IPv4; fails when the kernel or ip6tables lacks it.
    On,
    /// Drop all IPv6 except on loopback (when the kernel has IPv6 at all).
    Off,
}

/// What a run does about IPv6, decided by [`ipv6_action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Action {
    /// The `nat` rules, as for IPv4, and `::6/128` on `lo`.
    Redirect,
    /// The `filter` rules that drop every IPv6 packet not on `lo`.
    Drop,
    /// Nothing: the kernel has no IPv6.
    Nothing,
}

impl Ipv6Action {
    /// The IPv6 tables to apply.
    pub fn tables(self, settings: &Settings) -> Vec<Table> {
        match self {
            Ipv6Action::Redirect => vec![rules::nat(settings, Family::V6)],
            Ipv6Action::Drop => vec![rules::ipv6_drop()],
            Ipv6Action::Nothing => Vec::new(),
        }
    }
}

impl std::fmt::Display for Ipv6Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ipv6Action::Redirect => "redirected like IPv4",
            Ipv6Action::Drop => "dropped except on lo",
            Ipv6Action::Nothing => "not programmed",
        })
    }
}

/// Decides what to do about IPv6 and says why. Whatever is decided, no IPv6 connection may
/// pass the pod's edge without the proxy: a kernel with IPv6 gets either redirection or drop.
pub fn ipv6_action(
    mode: Ipv6Mode,
    pod_ips: Option<&IpList>,
    kernel_has_ipv6: bool,
) -> Result<(Ipv6Action, String), InitError> {
    let pod_has_ipv6 = pod_ips
        .filter(|ips| !ips.0.is_empty())
        .map(|ips| ips.0.iter().any(std::net::IpAddr::is_ipv6));
    if !kernel_has_ipv6 {
        return match mode {
            Ipv6Mode::On => Err(InitError::Invalid(
                "--ipv6 on, but the kernel has no IPv6 (no /proc/net/if_inet6); \
                 use --ipv6 auto or off"
                    .to_string(),
            )),
            _ => Ok((
                Ipv6Action::Nothing,
                "the kernel has no IPv6 (no /proc/net/if_inet6)".to_string(),
            )),
        };
    }
    Ok(match (mode, pod_has_ipv6) {
        (Ipv6Mode::On, _) => (Ipv6Action::Redirect, "--ipv6 on".to_string()),
        (Ipv6Mode::Off, Some(true)) => {
            return Err(InitError::Invalid(
                "--ipv6 off, but --pod-ips lists an IPv6 address: dropping IPv6 would cut \
                 the pod off on it; use --ipv6 auto or on"
                    .to_string(),
            ));
        }
        (Ipv6Mode::Off, _) => (Ipv6Action::Drop, "--ipv6 off".to_string()),
        (Ipv6Mode::Auto, Some(true)) => (
            Ipv6Action::Redirect,
            "auto: --pod-ips lists an IPv6 address".to_string(),
        ),
        (Ipv6Mode::Auto, Some(false)) => (
            Ipv6Action::Drop,
            "auto: the kernel has IPv6 but --pod-ips lists no IPv6 address".to_string(),
        ),
        (Ipv6Mode::Auto, None) => (
            Ipv6Action::Redirect,
            "auto: the kernel has IPv6, no --pod-ips given".to_string(),
        ),
    })
}

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

    /// Networks the app reaches directly, IPv4 or IPv6, e.g. `169.254.169.254,fd00:ec2::254`.
    #[arg(long, env = "TRELLIS_SKIP_OUTBOUND_CIDRS", value_name = "CIDRS",
          value_parser = parse::parse_cidr_list)]
    pub skip_outbound_cidrs: Option<CidrList>,

    /// Backend: the one already holding rules (auto), nf_tables (nft) or x_tables (legacy).
    #[arg(long, env = "TRELLIS_IPTABLES_MODE", value_name = "MODE", value_enum,
          default_value_t = Mode::Auto)]
    pub iptables_mode: Mode,

    /// IPv6: redirect like IPv4 (on), drop all but loopback (off), or decide (auto).
    #[arg(long, env = "TRELLIS_IPV6", value_name = "MODE", value_enum,
          default_value_t = Ipv6Mode::Auto)]
    pub ipv6: Ipv6Mode,

    /// The pod's IPs (`status.podIPs`), e.g. `10.1.2.3,fd00::3`; in auto mode IPv6 is
    /// dropped rather than redirected when none of them is IPv6.
    #[arg(long, env = "TRELLIS_POD_IPS", value_name = "IPS",
          value_parser = parse::parse_ip_list)]
    pub pod_ips: Option<IpList>,

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
    #[error(
        "`{program}` is not installed, and IPv6 needs it ({why}): install the `iptables` \
         package in the init container's image (it ships ip6tables too)"
    )]
    Ip6tablesMissing { program: String, why: String },
    #[error(
        "could not add {DELIVERY_SOURCE_V6}/128 to lo, the source the proxy delivers to the \
         app from over IPv6: {source}"
    )]
    LoopbackAddress {
        #[source]
        source: io::Error,
    },
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
    let kernel_has_ipv6 = Path::new("/proc/net/if_inet6").exists();
    match run(&args, kernel_has_ipv6, &mut out) {
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
fn run(args: &Args, kernel_has_ipv6: bool, out: &mut dyn Write) -> Result<(), InitError> {
    let settings = args.settings()?;
    let (v6, why) = ipv6_action(args.ipv6, args.pod_ips.as_ref(), kernel_has_ipv6)?;
    let families = [
        (Family::V4, vec![rules::nat(&settings, Family::V4)]),
        (Family::V6, v6.tables(&settings)),
    ];
    if args.dry_run {
        let _ = write!(
            out,
            "# trellis-proxy init --dry-run: nothing changed, no backend detected. A real run\n\
             # feeds each family's input to its `-restore --noflush`, leaving out the jumps from\n\
             # built-in chains that are already there (and deleting duplicates of them).\n\
             # IPv6: {v6} ({why})\n"
        );
        for (family, tables) in &families {
            if !tables.is_empty() {
                let _ = write!(
                    out,
                    "# {family}: {}-restore --noflush\n{}",
                    family.program(),
                    restore::input(tables, "")
                );
            }
        }
        return Ok(());
    }

    let mut runner = System;
    let dirs = iptables::search_dirs(std::env::var_os("PATH"));
    let installed = iptables::discover(std::env::var_os("PATH"), &mut runner)?;
    let backend = iptables::choose(args.iptables_mode, &installed, || {
        iptables::count_both(&installed, &mut System)
    })?;
    // Every program is found before anything changes, so a missing one changes nothing.
    let mut tools = Vec::new();
    for (family, tables) in &families {
        if tables.is_empty() {
            continue;
        }
        let found = iptables::family_tools(&backend.program, *family, &dirs).map_err(
            |program| match family {
                Family::V4 => InitError::IptablesMissing,
                Family::V6 => InitError::Ip6tablesMissing {
                    program,
                    why: format!("{v6}, {why}"),
                },
            },
        )?;
        tools.push((found, tables));
    }
    let _ = writeln!(
        out,
        "# trellis-proxy init: using {} ({} backend; {})\n# IPv6: {v6} ({why})",
        iptables::program_name(&backend.program),
        backend.kind,
        backend.reason
    );
    if v6 == Ipv6Action::Redirect {
        netlink::add_loopback_address(DELIVERY_SOURCE_V6)
            .map_err(|source| InitError::LoopbackAddress { source })?;
        let _ = writeln!(
            out,
            "# {DELIVERY_SOURCE_V6}/128 is on lo (the proxy's IPv6 delivery source)"
        );
    }
    for (family_tools, tables) in &tools {
        iptables::apply(tables, family_tools, &mut runner)?;
    }
    for (family_tools, tables) in &tools {
        let listing = iptables::installed_rules(tables, family_tools, &mut runner)?;
        let _ = write!(
            out,
            "# installed ({}, as {} lists it):\n{listing}",
            family_tools.family,
            iptables::program_name(&family_tools.save)
        );
    }
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
            (&["--ipv6", "maybe"], ["--ipv6", "maybe"]),
            (
                &["--pod-ips", "10.1.2.3,pod"],
                ["--pod-ips", "'pod' is not an IP address"],
            ),
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
    fn dry_run_prints_both_families_and_touches_nothing() {
        let args = parse(&["--dry-run", "--skip-outbound-ports", "3306"]).unwrap();
        let mut out = Vec::new();
        run(&args, true, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("# trellis-proxy init --dry-run"), "{text}");
        let v4 = text
            .find("# IPv4: iptables-restore --noflush\n*nat\n")
            .unwrap();
        let v6 = text
            .find("# IPv6: ip6tables-restore --noflush\n*nat\n")
            .unwrap();
        assert!(v4 < v6, "{text}");
        for part in [&text[v4..v6], &text[v6..]] {
            assert!(
                part.contains("-A TRELLIS_OUTPUT -p tcp --dport 3306 -j RETURN\n"),
                "{text}"
            );
            assert!(
                part.ends_with("-A OUTPUT -p tcp -j TRELLIS_OUTPUT\nCOMMIT\n"),
                "{text}"
            );
        }
        assert!(text[v6..].contains("-A TRELLIS_OUTPUT -o lo -s ::6/128 -j RETURN\n"));

        let args = parse(&["--dry-run", "--pod-ips", "10.1.2.3"]).unwrap();
        let mut out = Vec::new();
        run(&args, true, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("# IPv6: ip6tables-restore --noflush\n*filter\n"),
            "{text}"
        );
        let mut out = Vec::new();
        run(&args, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            !text.contains("ip6tables") && text.contains("the kernel has no IPv6"),
            "{text}"
        );
    }

    #[test]
    fn ipv6_decisions() {
        use Ipv6Action::{Drop, Nothing, Redirect};
        let ips = |s: &str| parse::parse_ip_list(s).unwrap();
        let (v4, dual, v6, none) = (
            ips("10.1.2.3"),
            ips("10.1.2.3,fd00::3"),
            ips("fd00::3"),
            ips(""),
        );
        type Want = Result<Ipv6Action, &'static str>;
        let cases: &[(Ipv6Mode, Option<&IpList>, bool, Want)] = &[
            (Ipv6Mode::Auto, None, true, Ok(Redirect)),
            (Ipv6Mode::Auto, Some(&none), true, Ok(Redirect)),
            (Ipv6Mode::Auto, Some(&dual), true, Ok(Redirect)),
            (Ipv6Mode::Auto, Some(&v6), true, Ok(Redirect)),
            (Ipv6Mode::Auto, Some(&v4), true, Ok(Drop)),
            (Ipv6Mode::Auto, Some(&v4), false, Ok(Nothing)),
            (Ipv6Mode::Auto, None, false, Ok(Nothing)),
            (Ipv6Mode::On, Some(&v4), true, Ok(Redirect)),
            (Ipv6Mode::On, None, false, Err("the kernel has no IPv6")),
            (Ipv6Mode::Off, None, true, Ok(Drop)),
            (Ipv6Mode::Off, Some(&v4), true, Ok(Drop)),
            (Ipv6Mode::Off, None, false, Ok(Nothing)),
            (
                Ipv6Mode::Off,
                Some(&dual),
                true,
                Err("--pod-ips lists an IPv6 address"),
            ),
        ];
        for (mode, pod_ips, kernel, want) in cases {
            let got = ipv6_action(*mode, *pod_ips, *kernel);
            match (got, want) {
                (Ok((action, _)), Ok(want)) => {
                    assert_eq!(action, *want, "{mode:?} {pod_ips:?} {kernel}")
                }
                (Err(e), Err(msg)) => {
                    assert!(matches!(e, InitError::Invalid(_)));
                    assert!(e.to_string().contains(msg), "{e}");
                }
                (got, want) => panic!("{mode:?} {pod_ips:?} {kernel}: got {got:?}, want {want:?}"),
            }
        }
    }
}
