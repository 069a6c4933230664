//! Parsers for the list settings of `trellis-proxy init`.
//!
//! Each returns a message that names the bad element; clap adds the flag and the whole value,
//! so a typo in a pod annotation is reported as e.g.
//! `invalid value '80,8o' for '--skip-outbound-ports <PORTS>': '8o' is not a port number`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One port or an inclusive range of ports, as written `8080` or `8000-8100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// The form iptables' `--dport` takes: `8080` or `8000:8100`.
    pub fn to_iptables(self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}:{}", self.first, self.last)
        }
    }

    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A comma-separated list of ports and port ranges; empty means none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<PortRange>);

/// An IPv4 or IPv6 network in CIDR notation; a bare address means `/32` or `/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A comma-separated list of networks of either family; empty means none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

/// A comma-separated list of the pod's own addresses (`status.podIPs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpList(pub Vec<IpAddr>);

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 is not a valid port (use 1-65535)".to_string()),
        Ok(port) => Ok(port),
        Err(_) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            Err(format!("port {s} is out of range (use 1-65535)"))
        }
        Err(_) => Err(format!("'{s}' is not a port number")),
    }
}

/// Parses `8080` or `8000-8100` (spaces around the dash tolerated).
pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty port".to_string());
    }
    let range = match s.split_once('-') {
        None => {
            let port = parse_port(s)?;
            PortRange {
                first: port,
                last: port,
            }
        }
        Some((first, last)) => {
            let (first, last) = (first.trim(), last.trim());
            if first.is_empty() || last.is_empty() {
                return Err(format!("range '{s}' needs a port on both sides of '-'"));
            }
            PortRange {
                first: parse_port(first)?,
                last: parse_port(last)?,
            }
        }
    };
    if range.first > range.last {
        return Err(format!(
            "range '{s}' starts after it ends (write it as {}-{})",
            range.last, range.first
        ));
    }
    Ok(range)
}

/// Parses `80, 443,8000-8100`; an empty or blank value is the empty list.
pub fn parse_port_list(s: &str) -> Result<PortList, String> {
    split_list(s)
        .map(parse_port_range)
        .collect::<Result<_, _>>()
        .map(PortList)
}

/// Parses `10.0.0.0/8`, `10.1.2.3` (= `/32`), `fd00::/8` or `fd00::1` (= `/128`). Host bits
/// must be zero, so a typo such as `10.0.0.1/8` is caught instead of silently widened.
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty network".to_string());
    }
    let (addr, prefix) = match s.split_once('/') {
        Some((addr, prefix)) => (addr.trim(), Some(prefix.trim())),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| {
        if addr.contains(':') {
            format!("'{addr}' is not an IPv6 address")
        } else {
            format!("'{addr}' is not an IPv4 address")
        }
    })?;
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= max => p,
            _ => return Err(format!("'/{p}' is not a prefix length (use /0 to /{max})")),
        },
    };
    let network = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    };
    if network != addr {
        return Err(format!(
            "'{s}' has host bits set (did you mean {network}/{prefix}?)"
        ));
    }
    Ok(Cidr { addr, prefix })
}

/// Parses `10.0.0.0/8, 192.168.1.10, fd00::/8`; an empty or blank value is the empty list.
pub fn parse_cidr_list(s: &str) -> Result<CidrList, String> {
    split_list(s)
        .map(parse_cidr)
        .collect::<Result<_, _>>()
        .map(CidrList)
}

/// Parses `10.1.2.3,fd00::3` (what the downward API gives for `status.podIPs`).
pub fn parse_ip_list(s: &str) -> Result<IpList, String> {
    split_list(s)
        .map(|e| {
            e.parse::<IpAddr>()
                .map_err(|_| format!("'{e}' is not an IP address"))
        })
        .collect::<Result<_, _>>()
        .map(IpList)
}

/// Splits on commas and drops blank elements, so `80,` and ` 80 , 443 ` both work.
fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|e| !e.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn port_lists() {
        let ok: &[(&str, &[PortRange])] = &[
            ("", &[]),
            ("   ", &[]),
            ("80", &[r(80, 80)]),
            ("80,443", &[r(80, 80), r(443, 443)]),
            (" 80 , 443 ,", &[r(80, 80), r(443, 443)]),
            ("8000-8100", &[r(8000, 8100)]),
            ("8000 - 8100, 22", &[r(8000, 8100), r(22, 22)]),
            ("1-65535", &[r(1, 65535)]),
            ("7-7", &[r(7, 7)]),
        ];
        for (input, want) in ok {
            assert_eq!(
                parse_port_list(input),
                Ok(PortList(want.to_vec())),
                "{input:?}"
            );
        }
        let bad = [
            ("8o", "'8o' is not a port number"),
            ("80,http", "'http' is not a port number"),
            ("0", "port 0 is not a valid port"),
            ("65536", "port 65536 is out of range"),
            ("8100-8000", "starts after it ends (write it as 8000-8100)"),
            ("80-", "range '80-' needs a port on both sides"),
            ("-80", "range '-80' needs a port on both sides"),
            ("1-2-3", "'2-3' is not a port number"),
        ];
        for (input, want) in bad {
            let err = parse_port_list(input).expect_err(input);
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }

    #[test]
    fn port_range_forms() {
        assert_eq!(r(80, 80).to_iptables(), "80");
        assert_eq!(r(8000, 8100).to_iptables(), "8000:8100");
        assert_eq!(r(8000, 8100).to_string(), "8000-8100");
        assert!(r(8000, 8100).contains(8100));
        assert!(!r(8000, 8100).contains(7999));
    }

    #[test]
    fn cidr_lists() {
        let c = |a: &str, prefix| Cidr {
            addr: a.parse().unwrap(),
            prefix,
        };
        let ok: &[(&str, &[Cidr])] = &[
            ("", &[]),
            ("10.0.0.0/8", &[c("10.0.0.0", 8)]),
            (
                "10.0.0.0/8, 192.168.1.10",
                &[c("10.0.0.0", 8), c("192.168.1.10", 32)],
            ),
            (" 169.254.169.254/32 ,", &[c("169.254.169.254", 32)]),
            ("0.0.0.0/0", &[c("0.0.0.0", 0)]),
            ("10.0.0.0 / 16", &[c("10.0.0.0", 16)]),
            ("fd00::/8", &[c("fd00::", 8)]),
            ("fd00::1", &[c("fd00::1", 128)]),
            ("::/0", &[c("::", 0)]),
            (
                "10.0.0.0/8,fd12:3456::/32",
                &[c("10.0.0.0", 8), c("fd12:3456::", 32)],
            ),
        ];
        for (input, want) in ok {
            assert_eq!(
                parse_cidr_list(input),
                Ok(CidrList(want.to_vec())),
                "{input:?}"
            );
        }
        let bad = [
            ("10.0.0.1/8", "host bits set (did you mean 10.0.0.0/8?)"),
            (
                "10.0.0.0/33",
                "'/33' is not a prefix length (use /0 to /32)",
            ),
            ("10.0.0.0/x", "'/x' is not a prefix length"),
            ("10.0.0/8", "'10.0.0' is not an IPv4 address"),
            ("example.com", "'example.com' is not an IPv4 address"),
            ("fd00::1/8", "host bits set (did you mean fd00::/8?)"),
            (
                "fd00::/129",
                "'/129' is not a prefix length (use /0 to /128)",
            ),
            ("fd00:::1", "'fd00:::1' is not an IPv6 address"),
            ("10.0.0.0/8,300.1.1.1", "'300.1.1.1' is not an IPv4 address"),
        ];
        for (input, want) in bad {
            let err = parse_cidr_list(input).expect_err(input);
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }

    #[test]
    fn ip_lists() {
        assert_eq!(parse_ip_list(""), Ok(IpList::default()));
        assert_eq!(
            parse_ip_list("10.1.2.3, fd00::3"),
            Ok(IpList(vec![
                "10.1.2.3".parse().unwrap(),
                "fd00::3".parse().unwrap()
            ]))
        );
        let err = parse_ip_list("10.1.2.3,pod").unwrap_err();
        assert!(err.contains("'pod' is not an IP address"), "{err}");
    }
}
