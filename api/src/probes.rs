//! The app's kubelet probes, checked by the sidecar on the kubelet's behalf.
//!
//! The kubelet probes from the node, outside the mesh. If the app's probe ports accepted
//! plaintext for it, they would accept plaintext from every pod too, and the most common pod
//! (one whose probe port is its main port) would not be mutual-TLS-only. So the injector
//! rewrites each HTTP, TCP and gRPC probe to `GET :4191/app-health/<container>/<probe>` on the
//! sidecar's admin port and passes the original checks to the sidecar in
//! `TRELLIS_APP_PROBES` (JSON, [`AppProbes`]); the sidecar performs each check locally against
//! the app and answers 200 or 503.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The path prefix of rewritten probes on the sidecar's admin port.
pub const APP_HEALTH_PREFIX: &str = "/app-health/";
/// The environment variable carrying [`AppProbes`] to the sidecar.
pub const APP_PROBES_ENV: &str = "TRELLIS_APP_PROBES";

/// Every rewritten probe of a pod, by [`probe_key`].
pub type AppProbes = BTreeMap<String, AppProbe>;

/// One original probe check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum AppProbe {
    /// `httpGet` with scheme HTTP: success is a status from 200 to 399, as the kubelet counts it.
    Http {
        port: u16,
        /// Path and query, as the probe wrote it (`/` when empty).
        path: String,
        /// The probe's `host` field, sent as the Host header when set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<ProbeHeader>,
    },
    /// `tcpSocket`: success is an accepted connection.
    Tcp { port: u16 },
    /// `grpc`: success is `SERVING` from the gRPC health service.
    Grpc {
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
    },
}

/// A header of an HTTP probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

/// The key of a probe in [`AppProbes`] and in its admin path: `<container>/<kind>`, where kind
/// is `readiness`, `liveness` or `startup`.
pub fn probe_key(container: &str, kind: &str) -> String {
    format!("{container}/{kind}")
}

/// The admin-port path the injector writes into the rewritten probe.
pub fn app_health_path(container: &str, kind: &str) -> String {
    format!("{APP_HEALTH_PREFIX}{}", probe_key(container, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form() {
        let mut probes = AppProbes::new();
        probes.insert(
            probe_key("app", "readiness"),
            AppProbe::Http {
                port: 8080,
                path: "/ready".into(),
                host: None,
                headers: vec![ProbeHeader {
                    name: "x-probe".into(),
                    value: "1".into(),
                }],
            },
        );
        probes.insert(probe_key("app", "liveness"), AppProbe::Tcp { port: 8080 });
        probes.insert(
            probe_key("app", "startup"),
            AppProbe::Grpc {
                port: 9090,
                service: None,
            },
        );
        let json = serde_json::to_string(&probes).unwrap();
        assert_eq!(
            json,
            r#"{"app/liveness":{"kind":"tcp","port":8080},"app/readiness":{"kind":"http","port":8080,"path":"/ready","headers":[{"name":"x-probe","value":"1"}]},"app/startup":{"kind":"grpc","port":9090}}"#
        );
        assert_eq!(serde_json::from_str::<AppProbes>(&json).unwrap(), probes);
        assert!(serde_json::from_str::<AppProbes>(r#"{"a/b":{"kind":"exec"}}"#).is_err());
        assert_eq!(app_health_path("app", "startup"), "/app-health/app/startup");
    }
}
