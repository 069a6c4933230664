//! Parsers for the list settings of `trellis-proxy init`.
//!
//! Each returns a message that names the bad element; clap adds the flag and the whole value,
//! so a typo in a pod annotation is reported as e.g.
//! `invalid value '80,8o' for '--skip-outbound-ports <PORTS>': '8o' is not a port number`.

use std::fmt;
use std::net::Ipv4Addr;

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

/// An IPv4 network in CIDR notation; a bare address means `/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A comma-separated list of IPv4 networks; empty means none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Ipv4Cidr>);

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

/// Parses `10.0.0.0/8` or `10.1.2.3` (= `/32`). Host bits must be zero, so a typo such as
/// `10.0.0.1/8` is caught instead of silently widened.
pub fn parse_ipv4_cidr(s: &str) -> Result<Ipv4Cidr, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty network".to_string());
    }
    let (addr, prefix) = match s.split_once('/') {
        Some((addr, prefix)) => (addr.trim(), Some(prefix.trim())),
        None => (s, None),
    };
    if addr.contains(':') {
        return Err(format!(
            "'{s}' is an IPv6 network; trellis-proxy init programs IPv4 only"
        ));
    }
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("'{addr}' is not an IPv4 address"))?;
    let prefix = match prefix {
        None => 32,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= 32 => p,
            _ => return Err(format!("'/{p}' is not a prefix length (use /0 to /32)")),
        },
    };
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    let network = Ipv4Addr::from(u32::from(addr) & mask);
    if network != addr {
        return Err(format!(
            "'{s}' has host bits set (did you mean {network}/{prefix}?)"
        ));
    }
    Ok(Ipv4Cidr { addr, prefix })
}

/// Parses `10.0.0.0/8, 192.168.1.10`; an empty or blank value is the empty list.
pub fn parse_cidr_list(s: &str) -> Result<CidrList, String> {
    split_list(s)
        .map(parse_ipv4_cidr)
        .collect::<Result<_, _>>()
        .map(CidrList)
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
        let c = |a: [u8; 4], prefix| Ipv4Cidr {
            addr: Ipv4Addr::from(a),
            prefix,
        };
        let ok: &[(&str, &[Ipv4Cidr])] = &[
            ("", &[]),
            ("10.0.0.0/8", &[c([10, 0, 0, 0], 8)]),
            (
                "10.0.0.0/8, 192.168.1.10",
                &[c([10, 0, 0, 0], 8), c([192, 168, 1, 10], 32)],
            ),
            (" 169.254.169.254/32 ,", &[c([169, 254, 169, 254], 32)]),
            ("0.0.0.0/0", &[c([0, 0, 0, 0], 0)]),
            ("10.0.0.0 / 16", &[c([10, 0, 0, 0], 16)]),
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
            ("10.0.0.0/33", "'/33' is not a prefix length"),
            ("10.0.0.0/x", "'/x' is not a prefix length"),
            ("10.0.0/8", "'10.0.0' is not an IPv4 address"),
            ("example.com", "'example.com' is not an IPv4 address"),
            ("fd00::/8", "IPv6"),
            ("10.0.0.0/8,300.1.1.1", "'300.1.1.1' is not an IPv4 address"),
        ];
        for (input, want) in bad {
            let err = parse_cidr_list(input).expect_err(input);
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }
}
