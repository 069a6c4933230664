//! The discovery protocol between a proxy and the controller.
//!
//! A proxy opens one HTTP/2 connection to the controller and, for each destination it uses,
//! sends `GET /v1/outbound?namespace=<client namespace>&target=<host:port>`. The answer is a
//! `200` whose body never ends while the proxy listens: newline-delimited JSON, one full
//! [`OutboundPolicy`](crate::policy::OutboundPolicy) per line, a new line whenever the policy
//! changes. Errors are a non-200 status with an [`ErrorBody`].
//!
//! Over mutual TLS a proxy also sends `GET /v1/trust-anchors` on the same connection: the
//! answer is a stream of [`TrustAnchorsUpdate`] lines, the full bundle the controller trusts
//! at once and again whenever it changes, so that a root rotation reaches running proxies.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Path of the outbound policy stream.
pub const OUTBOUND_PATH: &str = "/v1/outbound";
/// Content type of the stream: one JSON document per line.
pub const NDJSON: &str = "application/x-ndjson";
/// Path of the trust anchors stream (mutual TLS only).
pub const TRUST_ANCHORS_PATH: &str = "/v1/trust-anchors";

/// One line of the trust anchors stream: the whole bundle, never a difference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustAnchorsUpdate {
    /// The root certificates, PEM.
    pub pem: String,
}

/// The body of a non-200 answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// What a proxy asks about: an address, or a host name when the app talked to the proxy
/// directly and only the `Host`/authority says where it meant to go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Addr(SocketAddr),
    /// A DNS name (`svc`, `svc.ns`, `svc.ns.svc.<cluster-domain>`) and a port.
    Name {
        host: String,
        port: u16,
    },
}

/// Why a `target` parameter cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidTarget {
    #[error("target {0:?} has no port: expected host:port or ip:port")]
    MissingPort(String),
    #[error("target {0:?} has an invalid port")]
    BadPort(String),
    #[error("target {0:?} has an empty or invalid host")]
    BadHost(String),
}

impl Target {
    /// Parses `host:port`, `ip:port` or `[v6]:port`; a bare host gets `default_port`.
    pub fn parse_with_default_port(s: &str, default_port: u16) -> Result<Self, InvalidTarget> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Target::Addr(addr));
        }
        if let Ok(ip) = s
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(Target::Addr(SocketAddr::new(ip, default_port)));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse::<u16>()
                    .map_err(|_| InvalidTarget::BadPort(s.to_string()))?,
            ),
            None => (s, default_port),
        };
        Self::name(host, port).ok_or_else(|| InvalidTarget::BadHost(s.to_string()))
    }

    fn name(host: &str, port: u16) -> Option<Self> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let valid = !host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        valid.then_some(Target::Name { host, port })
    }

    pub fn port(&self) -> u16 {
        match self {
            Target::Addr(a) => a.port(),
            Target::Name { port, .. } => *port,
        }
    }
}

impl FromStr for Target {
    type Err = InvalidTarget;

    /// Parses `host:port` or `ip:port`; the port is required.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Target::Addr(addr));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(InvalidTarget::MissingPort(s.to_string()));
        };
        if host.contains(':') && !host.starts_with('[') {
            // A bare IPv6 address without brackets has no unambiguous port.
            return Err(InvalidTarget::MissingPort(s.to_string()));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| InvalidTarget::BadPort(s.to_string()))?;
        Self::name(host, port).ok_or_else(|| InvalidTarget::BadHost(s.to_string()))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(a) => a.fmt(f),
            Target::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_names() {
        let cases: &[(&str, Result<Target, InvalidTarget>)] = &[
            (
                "10.0.0.1:80",
                Ok(Target::Addr("10.0.0.1:80".parse().unwrap())),
            ),
            (
                "[fd00::1]:8080",
                Ok(Target::Addr("[fd00::1]:8080".parse().unwrap())),
            ),
            (
                "Echo.NS.svc.cluster.local.:80",
                Ok(Target::Name {
                    host: "echo.ns.svc.cluster.local".into(),
                    port: 80,
                }),
            ),
            ("echo", Err(InvalidTarget::MissingPort("echo".into()))),
            ("echo:http", Err(InvalidTarget::BadPort("echo:http".into()))),
            (
                "echo:70000",
                Err(InvalidTarget::BadPort("echo:70000".into())),
            ),
            ("ec ho:80", Err(InvalidTarget::BadHost("ec ho:80".into()))),
            (":80", Err(InvalidTarget::BadHost(":80".into()))),
            ("a..b:80", Err(InvalidTarget::BadHost("a..b:80".into()))),
        ];
        for (input, want) in cases {
            assert_eq!(&input.parse::<Target>(), want, "{input}");
        }
    }

    #[test]
    fn default_port_applies_to_bare_hosts_only() {
        assert_eq!(
            Target::parse_with_default_port("echo.ns", 80),
            Ok(Target::Name {
                host: "echo.ns".into(),
                port: 80
            })
        );
        assert_eq!(
            Target::parse_with_default_port("echo.ns:8080", 80),
            Ok(Target::Name {
                host: "echo.ns".into(),
                port: 8080
            })
        );
        assert_eq!(
            Target::parse_with_default_port("10.1.2.3", 80),
            Ok(Target::Addr("10.1.2.3:80".parse().unwrap()))
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["10.0.0.1:80", "[fd00::1]:8080", "echo.ns:80"] {
            let t: Target = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(t.to_string(), s);
        }
    }
}
