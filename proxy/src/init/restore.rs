//! The input of `iptables-restore --noflush` / `ip6tables-restore --noflush`, generated from
//! the wanted [`Table`]s and what the table holds now (an `iptables-save` listing).
//!
//! One restore process per family applies each table in one transaction: the pod never sees
//! half a rule set, and a failure leaves the table as it was. `--noflush` keeps everything
//! else in the table; declaring an owned chain (`:TRELLIS_OUTPUT - [0:0]`) creates it or, when
//! it exists, flushes it. The restore format cannot say "append unless present", so the jumps
//! from built-in chains are compared with the listing: a jump already there is kept, a missing
//! one added, and duplicates or stale jumps to an owned chain (another version's match) are
//! deleted, so every run leaves each jump exactly once.

use std::fmt::Write as _;

use super::rules::Table;

/// The chains the kernel defines; only jumps from these are ever deleted.
const BUILT_IN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// The restore input that brings `tables` about, given the current `save` listing of the same
/// family (any number of tables; an empty string for a fresh namespace or a dry run).
pub fn input(tables: &[Table], save: &str) -> String {
    let mut out = String::new();
    for table in tables {
        let existing = rules_of(save, table.name);
        let _ = writeln!(out, "*{}", table.name);
        for chain in &table.chains {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }

        // Decide per existing rule of a built-in chain that targets an owned chain.
        let mut keep = vec![false; table.jumps.len()];
        for (chain, spec) in &existing {
            if !BUILT_IN.contains(chain) || !targets_any(spec, &table.chains) {
                continue;
            }
            let wanted = table
                .jumps
                .iter()
                .position(|j| j.chain == *chain && j.spec_text() == *spec);
            match wanted {
                Some(i) if !keep[i] => keep[i] = true,
                _ => {
                    let _ = writeln!(out, "-D {chain} {spec}");
                }
            }
        }

        for rule in &table.rules {
            let _ = writeln!(out, "{rule}");
        }
        for (jump, _) in table.jumps.iter().zip(&keep).filter(|(_, kept)| !**kept) {
            if table.jumps_first {
                let _ = writeln!(out, "-I {} 1 {}", jump.chain, jump.spec_text());
            } else {
                let _ = writeln!(out, "{jump}");
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The `-A` rules of `table` in a save listing, as (chain, match and target).
fn rules_of<'a>(save: &'a str, table: &str) -> Vec<(&'a str, &'a str)> {
    let mut current = None;
    let mut rules = Vec::new();
    for line in save.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            current = Some(name);
        } else if line == "COMMIT" {
            current = None;
        } else if current == Some(table)
            && let Some(rest) = line.strip_prefix("-A ")
            && let Some((chain, spec)) = rest.split_once(' ')
        {
            rules.push((chain, spec.trim()));
        }
    }
    rules
}

/// Whether a rule's target (`-j` or `-g`) is one of `chains`.
fn targets_any(spec: &str, chains: &[&str]) -> bool {
    let words: Vec<&str> = spec.split_whitespace().collect();
    words
        .windows(2)
        .any(|w| (w[0] == "-j" || w[0] == "-g") && chains.contains(&w[1]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::parse::{parse_cidr_list, parse_port_list};
    use crate::init::rules::{Family, Settings, ipv6_drop, nat};

    fn settings(skip_out: &str, cidrs: &str) -> Settings {
        Settings {
            proxy_uid: 2102,
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            skip_inbound_ports: parse_port_list("22").unwrap(),
            skip_outbound_ports: parse_port_list(skip_out).unwrap(),
            skip_outbound_cidrs: parse_cidr_list(cidrs).unwrap(),
        }
    }

    #[test]
    fn fresh_namespace_both_families() {
        let s = settings("3306", "169.254.169.254,fd00:ec2::254");
        let v4 = "\
*nat
:TRELLIS_INBOUND - [0:0]
:TRELLIS_OUTPUT - [0:0]
-A TRELLIS_INBOUND -p tcp --dport 4191 -j RETURN
-A TRELLIS_INBOUND -p tcp --dport 4143 -j RETURN
-A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN
-A TRELLIS_INBOUND -p tcp -j REDIRECT --to-ports 4143
-A TRELLIS_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A TRELLIS_OUTPUT -o lo -d 127.0.0.0/8 -j RETURN
-A TRELLIS_OUTPUT -o lo -m owner --uid-owner 2102 -j TRELLIS_INBOUND
-A TRELLIS_OUTPUT -o lo -j RETURN
-A TRELLIS_OUTPUT -m owner --uid-owner 2102 -j RETURN
-A TRELLIS_OUTPUT -p tcp --dport 3306 -j RETURN
-A TRELLIS_OUTPUT -d 169.254.169.254/32 -j RETURN
-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 4140
-A PREROUTING -p tcp -j TRELLIS_INBOUND
-A OUTPUT -p tcp -j TRELLIS_OUTPUT
COMMIT
";
        let v6 = "\
*nat
:TRELLIS_INBOUND - [0:0]
:TRELLIS_OUTPUT - [0:0]
-A TRELLIS_INBOUND -p tcp --dport 4191 -j RETURN
-A TRELLIS_INBOUND -p tcp --dport 4143 -j RETURN
-A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN
-A TRELLIS_INBOUND -p tcp -j REDIRECT --to-ports 4143
-A TRELLIS_OUTPUT -o lo -s ::6/128 -j RETURN
-A TRELLIS_OUTPUT -o lo -d ::1/128 -j RETURN
-A TRELLIS_OUTPUT -o lo -m owner --uid-owner 2102 -j TRELLIS_INBOUND
-A TRELLIS_OUTPUT -o lo -j RETURN
-A TRELLIS_OUTPUT -m owner --uid-owner 2102 -j RETURN
-A TRELLIS_OUTPUT -p tcp --dport 3306 -j RETURN
-A TRELLIS_OUTPUT -d fd00:ec2::254/128 -j RETURN
-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 4140
-A PREROUTING -p tcp -j TRELLIS_INBOUND
-A OUTPUT -p tcp -j TRELLIS_OUTPUT
COMMIT
";
        assert_eq!(input(&[nat(&s, Family::V4)], ""), v4);
        assert_eq!(input(&[nat(&s, Family::V6)], ""), v6);
    }

    #[test]
    fn ipv6_off_fresh() {
        let want = "\
*filter
:TRELLIS_IPV6_DROP - [0:0]
-A TRELLIS_IPV6_DROP -j DROP
-I INPUT 1 ! -i lo -j TRELLIS_IPV6_DROP
-I FORWARD 1 -j TRELLIS_IPV6_DROP
-I OUTPUT 1 ! -o lo -j TRELLIS_IPV6_DROP
COMMIT
";
        assert_eq!(input(&[ipv6_drop()], ""), want);
    }

    /// The lines of the generated input that touch built-in chains.
    fn jump_lines(tables: &[Table], save: &str) -> Vec<String> {
        input(tables, save)
            .lines()
            .filter(|l| BUILT_IN.iter().any(|c| l.split(' ').nth(1) == Some(*c)))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn jumps_are_reconciled_with_the_listing() {
        let nat4 = [nat(&settings("", ""), Family::V4)];
        let drop6 = [ipv6_drop()];
        // A listing as iptables-save prints it, for the nat table and others.
        let listing = |nat_rules: &str| {
            format!(
                "# Generated by iptables-nft-save v1.8.9 (nf_tables)\n*filter\n:INPUT ACCEPT [0:0]\n\
                 -A INPUT -p tcp -j TRELLIS_OUTPUT\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n\
                 :TRELLIS_INBOUND - [0:0]\n{nat_rules}COMMIT\n# Completed\n"
            )
        };
        let cases: &[(&str, &[Table], String, &[&str])] = &[
            (
                "fresh",
                &nat4,
                listing(""),
                &[
                    "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
                    "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
                ],
            ),
            (
                "re-run: both jumps present, nothing added",
                &nat4,
                listing(
                    "-A PREROUTING -p tcp -j TRELLIS_INBOUND\n-A OUTPUT -p tcp -j TRELLIS_OUTPUT\n\
                     -A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 4140\n",
                ),
                &[],
            ),
            (
                "one missing",
                &nat4,
                listing("-A OUTPUT -p tcp -j TRELLIS_OUTPUT\n"),
                &["-A PREROUTING -p tcp -j TRELLIS_INBOUND"],
            ),
            (
                "duplicates and a stale jump are deleted, rules of others kept",
                &nat4,
                listing(
                    "-A PREROUTING -p tcp -j TRELLIS_INBOUND\n-A PREROUTING -p tcp -j TRELLIS_INBOUND\n\
                     -A OUTPUT -p udp -m udp --dport 53 -j RETURN\n-A OUTPUT -j TRELLIS_OUTPUT\n\
                     -A OUTPUT -p tcp -j TRELLIS_OUTPUT\n-A KEEP_ME -j TRELLIS_OUTPUT\n",
                ),
                &[
                    "-D PREROUTING -p tcp -j TRELLIS_INBOUND",
                    "-D OUTPUT -j TRELLIS_OUTPUT",
                ],
            ),
            (
                "another table's jumps do not count",
                &nat4,
                listing("-A PREROUTING -p tcp -j TRELLIS_INBOUND\n"),
                &["-A OUTPUT -p tcp -j TRELLIS_OUTPUT"],
            ),
            (
                "IPv6 off, re-run",
                &drop6,
                "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT ! -i lo -j TRELLIS_IPV6_DROP\n\
                 -A FORWARD -j TRELLIS_IPV6_DROP\n-A OUTPUT ! -o lo -j TRELLIS_IPV6_DROP\n\
                 -A TRELLIS_IPV6_DROP -j DROP\nCOMMIT\n"
                    .to_string(),
                &[],
            ),
            (
                "IPv6 off, one missing goes first",
                &drop6,
                "*filter\n-A INPUT ! -i lo -j TRELLIS_IPV6_DROP\n-A FORWARD -j TRELLIS_IPV6_DROP\n\
                 -A OUTPUT -j ACCEPT\nCOMMIT\n"
                    .to_string(),
                &["-I OUTPUT 1 ! -o lo -j TRELLIS_IPV6_DROP"],
            ),
        ];
        for (what, tables, save, want) in cases {
            assert_eq!(jump_lines(tables, save), *want, "{what}");
        }
    }

    #[test]
    fn owned_chains_are_declared_before_use() {
        // Declaring a chain creates or flushes it; rules only follow the declarations.
        let text = input(&[nat(&settings("", ""), Family::V6)], "");
        let first_rule = text.find("\n-").unwrap();
        assert!(
            text[..first_rule].contains(":TRELLIS_OUTPUT - [0:0]"),
            "{text}"
        );
        assert!(text.ends_with("COMMIT\n"));
    }
}
