//! The redirection rules, generated from the settings without touching the system.
//!
//! Everything lives in two chains of the `nat` table that Trellis owns, so a re-run can flush
//! and rebuild them and nothing else in the pod's namespace is touched; the built-in chains
//! get exactly one jump each. IPv4 only: IPv6 traffic is not redirected.
//!
//! ```text
//! PREROUTING -p tcp -> TRELLIS_INBOUND   traffic arriving from other pods
//! OUTPUT     -p tcp -> TRELLIS_OUTPUT    traffic the pod's own processes open
//! ```
//!
//! Loopback and the pod's own IP: a connection to any of the pod's own addresses leaves
//! through `lo` and never passes PREROUTING, so the inbound proxy would not see it.
//! - `127.0.0.0/8` is never redirected: the app talks to the proxy there, and the inbound
//!   proxy forwards to the app there.
//! - The proxy reaching its own pod IP (a Service whose chosen endpoint is this very pod) is
//!   sent through `TRELLIS_INBOUND`, so it lands on the inbound proxy, which terminates the
//!   mesh TLS it sent instead of the app receiving TLS bytes.
//! - The app reaching its own pod IP is left alone: it is talking to itself, and sending it to
//!   the outbound proxy would loop back to the app with mesh TLS.

use std::fmt;

use super::parse::{CidrList, PortList};

/// The chain that redirects inbound TCP to the proxy's inbound port.
pub const INBOUND_CHAIN: &str = "TRELLIS_INBOUND";
/// The chain that redirects the pod's outbound TCP to the proxy's outbound port.
pub const OUTPUT_CHAIN: &str = "TRELLIS_OUTPUT";
/// The table everything is installed in.
pub const TABLE: &str = "nat";

/// What the rules depend on; validated before any rule is generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    pub skip_inbound_ports: PortList,
    pub skip_outbound_ports: PortList,
    pub skip_outbound_cidrs: CidrList,
}

/// One rule: the chain it is appended to and the match and target that follow `-A <chain>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub spec: Vec<String>,
}

impl Rule {
    fn new(chain: &'static str, spec: &[&str]) -> Self {
        Rule {
            chain,
            spec: spec.iter().map(|s| (*s).to_string()).collect(),
        }
    }
}

/// Rendered as `iptables -S` shows it, so a dry run reads like the output of a real one.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} {}", self.chain, self.spec.join(" "))
    }
}

/// Everything a run installs in the `nat` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Chains Trellis owns, in creation order (`TRELLIS_OUTPUT` jumps to `TRELLIS_INBOUND`).
    pub chains: Vec<&'static str>,
    /// Rules of the owned chains, in order; the chains are flushed before these are appended.
    pub rules: Vec<Rule>,
    /// The jumps from built-in chains, each added only when missing.
    pub jumps: Vec<Rule>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chain in &self.chains {
            writeln!(f, "-N {chain}")?;
        }
        for rule in self.jumps.iter().chain(&self.rules) {
            writeln!(f, "{rule}")?;
        }
        Ok(())
    }
}

/// Generates the rules for `settings`.
pub fn plan(settings: &Settings) -> Plan {
    let uid = settings.proxy_uid.to_string();
    let inbound = settings.inbound_port.to_string();
    let outbound = settings.outbound_port.to_string();
    let admin = settings.admin_port.to_string();

    let mut rules = vec![
        // The admin port serves probes and metrics itself; the inbound port must keep the
        // destination the client chose rather than being rewritten to the interface address.
        Rule::new(
            INBOUND_CHAIN,
            &["-p", "tcp", "--dport", &admin, "-j", "RETURN"],
        ),
        Rule::new(
            INBOUND_CHAIN,
            &["-p", "tcp", "--dport", &inbound, "-j", "RETURN"],
        ),
    ];
    for ports in &settings.skip_inbound_ports.0 {
        let dport = ports.to_iptables();
        rules.push(Rule::new(
            INBOUND_CHAIN,
            &["-p", "tcp", "--dport", &dport, "-j", "RETURN"],
        ));
    }
    rules.push(Rule::new(
        INBOUND_CHAIN,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound],
    ));

    rules.extend([
        Rule::new(
            OUTPUT_CHAIN,
            &["-o", "lo", "-d", "127.0.0.0/8", "-j", "RETURN"],
        ),
        Rule::new(
            OUTPUT_CHAIN,
            &[
                "-o",
                "lo",
                "-m",
                "owner",
                "--uid-owner",
                &uid,
                "-j",
                INBOUND_CHAIN,
            ],
        ),
        Rule::new(OUTPUT_CHAIN, &["-o", "lo", "-j", "RETURN"]),
        Rule::new(
            OUTPUT_CHAIN,
            &["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
        ),
    ]);
    for ports in &settings.skip_outbound_ports.0 {
        let dport = ports.to_iptables();
        rules.push(Rule::new(
            OUTPUT_CHAIN,
            &["-p", "tcp", "--dport", &dport, "-j", "RETURN"],
        ));
    }
    for cidr in &settings.skip_outbound_cidrs.0 {
        let net = cidr.to_string();
        rules.push(Rule::new(OUTPUT_CHAIN, &["-d", &net, "-j", "RETURN"]));
    }
    rules.push(Rule::new(
        OUTPUT_CHAIN,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &outbound],
    ));

    Plan {
        chains: vec![INBOUND_CHAIN, OUTPUT_CHAIN],
        rules,
        jumps: vec![
            Rule::new("PREROUTING", &["-p", "tcp", "-j", INBOUND_CHAIN]),
            Rule::new("OUTPUT", &["-p", "tcp", "-j", OUTPUT_CHAIN]),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::parse::{parse_cidr_list, parse_port_list};

    fn settings(skip_in: &str, skip_out: &str, cidrs: &str) -> Settings {
        Settings {
            proxy_uid: 2102,
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            skip_inbound_ports: parse_port_list(skip_in).unwrap(),
            skip_outbound_ports: parse_port_list(skip_out).unwrap(),
            skip_outbound_cidrs: parse_cidr_list(cidrs).unwrap(),
        }
    }

    #[test]
    fn default_plan() {
        let want = "\
-N TRELLIS_INBOUND
-N TRELLIS_OUTPUT
-A PREROUTING -p tcp -j TRELLIS_INBOUND
-A OUTPUT -p tcp -j TRELLIS_OUTPUT
-A TRELLIS_INBOUND -p tcp --dport 4191 -j RETURN
-A TRELLIS_INBOUND -p tcp --dport 4143 -j RETURN
-A TRELLIS_INBOUND -p tcp -j REDIRECT --to-ports 4143
-A TRELLIS_OUTPUT -o lo -d 127.0.0.0/8 -j RETURN
-A TRELLIS_OUTPUT -o lo -m owner --uid-owner 2102 -j TRELLIS_INBOUND
-A TRELLIS_OUTPUT -o lo -j RETURN
-A TRELLIS_OUTPUT -m owner --uid-owner 2102 -j RETURN
-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 4140
";
        assert_eq!(plan(&settings("", "", "")).to_string(), want);
    }

    #[test]
    fn exclusions_come_before_the_redirect() {
        let cases: &[(Settings, &str, &[&str])] = &[
            (
                settings("22, 8000-8100", "", ""),
                INBOUND_CHAIN,
                &[
                    "-p tcp --dport 4191 -j RETURN",
                    "-p tcp --dport 4143 -j RETURN",
                    "-p tcp --dport 22 -j RETURN",
                    "-p tcp --dport 8000:8100 -j RETURN",
                    "-p tcp -j REDIRECT --to-ports 4143",
                ],
            ),
            (
                settings("", "3306,9000-9002", "10.0.0.0/8,169.254.169.254"),
                OUTPUT_CHAIN,
                &[
                    "-o lo -d 127.0.0.0/8 -j RETURN",
                    "-o lo -m owner --uid-owner 2102 -j TRELLIS_INBOUND",
                    "-o lo -j RETURN",
                    "-m owner --uid-owner 2102 -j RETURN",
                    "-p tcp --dport 3306 -j RETURN",
                    "-p tcp --dport 9000:9002 -j RETURN",
                    "-d 10.0.0.0/8 -j RETURN",
                    "-d 169.254.169.254/32 -j RETURN",
                    "-p tcp -j REDIRECT --to-ports 4140",
                ],
            ),
        ];
        for (settings, chain, want) in cases {
            let got: Vec<String> = plan(settings)
                .rules
                .iter()
                .filter(|r| r.chain == *chain)
                .map(|r| r.spec.join(" "))
                .collect();
            assert_eq!(got, *want, "{chain}");
        }
    }

    #[test]
    fn ports_and_uid_come_from_the_settings() {
        let s = Settings {
            proxy_uid: 999,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15020,
            ..settings("", "", "")
        };
        let text = plan(&s).to_string();
        for want in [
            "-A TRELLIS_INBOUND -p tcp --dport 15020 -j RETURN",
            "-A TRELLIS_INBOUND -p tcp --dport 15006 -j RETURN",
            "-A TRELLIS_INBOUND -p tcp -j REDIRECT --to-ports 15006",
            "-A TRELLIS_OUTPUT -o lo -m owner --uid-owner 999 -j TRELLIS_INBOUND",
            "-A TRELLIS_OUTPUT -m owner --uid-owner 999 -j RETURN",
            "-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("2102") && !text.contains("414"), "{text}");
    }

    #[test]
    fn jumps_do_not_depend_on_settings() {
        // A re-run with other settings must find its earlier jumps with `-C`.
        let a = plan(&settings("", "", ""));
        let b = plan(&Settings {
            proxy_uid: 1,
            ..settings("1-2", "3", "10.0.0.0/8")
        });
        assert_eq!(a.jumps, b.jumps);
        assert_eq!(a.chains, b.chains);
    }
}
