//! The workload identity every meshed pod proves with its certificate.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A SPIFFE identity of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Kept as its parts so that policy code can compare namespaces without reparsing, and
/// serialized as the URI so that it reads the same in JSON, logs and certificates.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a string is not a mesh SPIFFE identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{input:?} is not a mesh identity: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
)]
pub struct InvalidIdentity {
    input: String,
}

impl Identity {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = InvalidIdentity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidIdentity {
            input: s.to_string(),
        };
        let rest = s.strip_prefix("spiffe://").ok_or_else(err)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(err());
        };
        if td.is_empty() || ns.is_empty() || sa.is_empty() {
            return Err(err());
        }
        Ok(Identity::new(td, ns, sa))
    }
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_uri() {
        let id = Identity::new("cluster.local", "shop", "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.to_string().parse::<Identity>(), Ok(id.clone()));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/shop/sa/web\"");
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/a/ns/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns//sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} parsed");
        }
    }
}
