//! The rules, generated from the settings without touching the system.
//!
//! Everything lives in chains Trellis owns, so a re-run can flush and rebuild them and nothing
//! else in the pod's namespace is touched; the built-in chains get exactly one jump each.
//! IPv4 and IPv6 get the same `nat` rules, each family with its own loopback and delivery
//! source; [`ipv6_drop`] is the `filter` table for a pod whose IPv6 is switched off.
//!
//! ```text
//! PREROUTING -p tcp -> TRELLIS_INBOUND   traffic arriving from other pods
//! OUTPUT     -p tcp -> TRELLIS_OUTPUT    traffic the pod's own processes open
//! ```
//!
//! Loopback and the pod's own IP: a connection to any of the pod's own addresses leaves
//! through `lo` and never passes PREROUTING, so the inbound proxy would not see it.
//! - The inbound proxy delivers to the app at the pod IP from the dedicated source address
//!   127.0.0.6 (`::6`). Those connections are returned first: without that rule the next ones
//!   would send the proxy's own connection to its pod IP back into the inbound proxy, a loop.
//! - The loopback network is never redirected: the app talks to the proxy there.
//! - The proxy reaching its own pod IP from any other source (a Service whose chosen endpoint
//!   is this very pod) is sent through `TRELLIS_INBOUND`, so it lands on the inbound proxy,
//!   which terminates the mesh TLS it sent instead of the app receiving TLS bytes.
//! - The app reaching its own pod IP is left alone: it is talking to itself, and sending it to
//!   the outbound proxy would loop back to the app with mesh TLS.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::parse::{CidrList, PortList};

/// The chain that redirects inbound TCP to the proxy's inbound port.
pub const INBOUND_CHAIN: &str = "TRELLIS_INBOUND";
/// The chain that redirects the pod's outbound TCP to the proxy's outbound port.
pub const OUTPUT_CHAIN: &str = "TRELLIS_OUTPUT";
/// The `filter` chain that drops IPv6 when the pod's IPv6 is switched off.
pub const IPV6_DROP_CHAIN: &str = "TRELLIS_IPV6_DROP";

/// The source address the inbound proxy dials the app from over IPv4: local in every
/// namespace (all of 127/8 is), and exempt from redirection.
pub const DELIVERY_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The IPv6 delivery source; not local by default, so init adds it to `lo`.
pub const DELIVERY_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// An IP family: each has its own tables, programs and rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family's loopback network, never redirected.
    pub fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    /// The inbound proxy's delivery source as a match.
    pub fn delivery_source(self) -> String {
        match self {
            Family::V4 => format!("{DELIVERY_SOURCE_V4}/32"),
            Family::V6 => format!("{DELIVERY_SOURCE_V6}/128"),
        }
    }

    /// The prefix of the family's programs: `iptables` or `ip6tables`.
    pub fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// What the rules depend on; validated before any rule is generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    pub skip_inbound_ports: PortList,
    pub skip_outbound_ports: PortList,
    /// Networks of both families; each family's rules take its own.
    pub skip_outbound_cidrs: CidrList,
}

/// One rule: the chain it goes to and the match and target that follow `-A <chain>`.
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

    /// The match and target as one string, as `iptables-save` prints them.
    pub fn spec_text(&self) -> String {
        self.spec.join(" ")
    }
}

/// Rendered as `iptables-save` shows it.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} {}", self.chain, self.spec_text())
    }
}

/// Everything a run installs in one table of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `nat` or `filter`.
    pub name: &'static str,
    /// Chains Trellis owns; each is created, or flushed when it exists.
    pub chains: Vec<&'static str>,
    /// Rules of the owned chains, in order.
    pub rules: Vec<Rule>,
    /// The jumps from built-in chains, each present exactly once after a run.
    pub jumps: Vec<Rule>,
    /// Whether missing jumps go first in their built-in chain (so an earlier ACCEPT of
    /// someone else cannot skip them) rather than last.
    pub jumps_first: bool,
}

/// Generates the `nat` rules of `family` for `settings`.
pub fn nat(settings: &Settings, family: Family) -> Table {
    let uid = settings.proxy_uid.to_string();
    let inbound = settings.inbound_port.to_string();
    let outbound = settings.outbound_port.to_string();
    let admin = settings.admin_port.to_string();
    let source = family.delivery_source();

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
        // First: the inbound proxy's delivery to the app at the pod IP.
        Rule::new(OUTPUT_CHAIN, &["-o", "lo", "-s", &source, "-j", "RETURN"]),
        Rule::new(
            OUTPUT_CHAIN,
            &["-o", "lo", "-d", family.loopback(), "-j", "RETURN"],
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
    let own_family = |c: &&super::parse::Cidr| c.addr.is_ipv4() == (family == Family::V4);
    for cidr in settings.skip_outbound_cidrs.0.iter().filter(own_family) {
        let net = cidr.to_string();
        rules.push(Rule::new(OUTPUT_CHAIN, &["-d", &net, "-j", "RETURN"]));
    }
    rules.push(Rule::new(
        OUTPUT_CHAIN,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &outbound],
    ));

    Table {
        name: "nat",
        chains: vec![INBOUND_CHAIN, OUTPUT_CHAIN],
        rules,
        jumps: vec![
            Rule::new("PREROUTING", &["-p", "tcp", "-j", INBOUND_CHAIN]),
            Rule::new("OUTPUT", &["-p", "tcp", "-j", OUTPUT_CHAIN]),
        ],
        jumps_first: false,
    }
}

/// The IPv6 `filter` rules of a pod whose IPv6 is switched off while the kernel has it: every
/// packet that does not stay on `lo` is dropped, so nothing reaches or leaves the pod over IPv6
/// past the proxy, in clear text.
pub fn ipv6_drop() -> Table {
    Table {
        name: "filter",
        chains: vec![IPV6_DROP_CHAIN],
        rules: vec![Rule::new(IPV6_DROP_CHAIN, &["-j", "DROP"])],
        jumps: vec![
            Rule::new("INPUT", &["!", "-i", "lo", "-j", IPV6_DROP_CHAIN]),
            Rule::new("FORWARD", &["-j", IPV6_DROP_CHAIN]),
            Rule::new("OUTPUT", &["!", "-o", "lo", "-j", IPV6_DROP_CHAIN]),
        ],
        jumps_first: true,
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

    fn chain(table: &Table, chain: &str) -> Vec<String> {
        table
            .rules
            .iter()
            .filter(|r| r.chain == chain)
            .map(Rule::spec_text)
            .collect()
    }

    #[test]
    fn rules_of_each_family() {
        let s = settings(
            "22, 8000-8100",
            "3306,9000-9002",
            "10.0.0.0/8,fd00::/8,169.254.169.254",
        );
        let cases: &[(Family, &str, &[&str])] = &[
            (
                Family::V4,
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
                Family::V6,
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
                Family::V4,
                OUTPUT_CHAIN,
                &[
                    "-o lo -s 127.0.0.6/32 -j RETURN",
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
            (
                Family::V6,
                OUTPUT_CHAIN,
                &[
                    "-o lo -s ::6/128 -j RETURN",
                    "-o lo -d ::1/128 -j RETURN",
                    "-o lo -m owner --uid-owner 2102 -j TRELLIS_INBOUND",
                    "-o lo -j RETURN",
                    "-m owner --uid-owner 2102 -j RETURN",
                    "-p tcp --dport 3306 -j RETURN",
                    "-p tcp --dport 9000:9002 -j RETURN",
                    "-d fd00::/8 -j RETURN",
                    "-p tcp -j REDIRECT --to-ports 4140",
                ],
            ),
        ];
        for (family, name, want) in cases {
            let table = nat(&s, *family);
            assert_eq!(table.name, "nat");
            assert_eq!(chain(&table, name), *want, "{family} {name}");
            assert_eq!(
                table.rules.len(),
                chain(&table, INBOUND_CHAIN).len() + chain(&table, OUTPUT_CHAIN).len()
            );
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
        for family in [Family::V4, Family::V6] {
            let text: String = nat(&s, family)
                .rules
                .iter()
                .map(|r| format!("{r}\n"))
                .collect();
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
    }

    #[test]
    fn jumps_do_not_depend_on_settings() {
        // A re-run with other settings must recognise its earlier jumps.
        for family in [Family::V4, Family::V6] {
            let a = nat(&settings("", "", ""), family);
            let b = nat(
                &Settings {
                    proxy_uid: 1,
                    ..settings("1-2", "3", "10.0.0.0/8,fd00::/8")
                },
                family,
            );
            assert_eq!(a.jumps, b.jumps);
            assert_eq!(a.chains, b.chains);
            assert!(!a.jumps_first);
        }
    }

    #[test]
    fn ipv6_drop_keeps_loopback_and_goes_first() {
        let t = ipv6_drop();
        assert_eq!(
            (t.name, t.chains.as_slice()),
            ("filter", &[IPV6_DROP_CHAIN][..])
        );
        assert_eq!(chain(&t, IPV6_DROP_CHAIN), ["-j DROP"]);
        let jumps: Vec<String> = t.jumps.iter().map(Rule::to_string).collect();
        assert_eq!(
            jumps,
            [
                "-A INPUT ! -i lo -j TRELLIS_IPV6_DROP",
                "-A FORWARD -j TRELLIS_IPV6_DROP",
                "-A OUTPUT ! -o lo -j TRELLIS_IPV6_DROP",
            ]
        );
        assert!(t.jumps_first);
    }
}
