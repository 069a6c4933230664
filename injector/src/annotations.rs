//! The pod annotations Trellis reads, parsed and validated before anything is injected.
//!
//! Every error names the annotation and says what is wrong with the value, because the message
//! ends up in the user's `kubectl apply` output when the pod is denied.

use std::collections::BTreeMap;
use std::fmt;

/// Turns injection off (`disabled`) or states it explicitly (`enabled`) for one pod.
pub const INJECT: &str = "trellis.dev/inject";
/// The marker on injected pods: the injector's version. Its presence makes injection idempotent.
pub const PROXY_VERSION: &str = "trellis.dev/proxy-version";
/// Inbound ports that bypass the proxy.
pub const SKIP_INBOUND_PORTS: &str = "trellis.dev/skip-inbound-ports";
/// Outbound ports that bypass the proxy.
pub const SKIP_OUTBOUND_PORTS: &str = "trellis.dev/skip-outbound-ports";
/// Inbound ports where the proxy also accepts plaintext, for clients outside the mesh; the
/// pod's probe ports are added to them.
pub const INBOUND_PLAINTEXT_PORTS: &str = "trellis.dev/inbound-plaintext-ports";
/// Ports the proxy delivers inbound traffic to besides the pod's declared container ports, for
/// Services whose numeric `targetPort` the pod does not declare.
pub const INBOUND_PORTS: &str = "trellis.dev/inbound-ports";
/// Ports whose traffic is TCP, never detected as HTTP, in and out of the pod (added to the
/// sidecar's server-first defaults): `TRELLIS_OPAQUE_PORTS`.
pub const OPAQUE_PORTS: &str = trellis_api::policy::OPAQUE_PORTS_ANNOTATION;
/// `disabled` keeps the kubelet's probes as written, their ports open to plaintext; by default
/// (`enabled`) they go through the proxy's admin port.
pub const REWRITE_PROBES: &str = "trellis.dev/rewrite-probes";
/// The proxy's log filter.
pub const PROXY_LOG_LEVEL: &str = "trellis.dev/proxy-log-level";
/// The proxy's access log: `off` or `json` (one JSON line per request on its standard output).
pub const ACCESS_LOG: &str = "trellis.dev/access-log";
/// The share of requests without a `traceparent` that start a trace (0 to 1), when the
/// injector gives proxies an OTLP endpoint: `TRELLIS_TRACE_SAMPLING`.
pub const TRACE_SAMPLING: &str = "trellis.dev/trace-sampling";
/// The proxy container's CPU request.
pub const PROXY_CPU_REQUEST: &str = "trellis.dev/proxy-cpu-request";
/// The proxy container's memory request.
pub const PROXY_MEMORY_REQUEST: &str = "trellis.dev/proxy-memory-request";
/// The proxy container's memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "trellis.dev/proxy-memory-limit";

/// Prometheus scrape annotations, added unless the pod already sets them.
pub const PROMETHEUS_SCRAPE: &str = "prometheus.io/scrape";
pub const PROMETHEUS_PORT: &str = "prometheus.io/port";
pub const PROMETHEUS_PATH: &str = "prometheus.io/path";
/// Which container `kubectl logs/exec` pick by default; set in classic mode, where the proxy
/// would otherwise be the first container.
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// What `trellis.dev/inject` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectMode {
    Enabled,
    Disabled,
}

/// The validated per-pod settings; `None` means "use the injector's default".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pub inject: Option<InjectMode>,
    pub skip_inbound_ports: Option<PortList>,
    pub skip_outbound_ports: Option<PortList>,
    pub inbound_plaintext_ports: Option<PortList>,
    pub inbound_ports: Option<PortList>,
    pub opaque_ports: Option<PortList>,
    pub rewrite_probes: Option<RewriteProbes>,
    pub log_level: Option<String>,
    pub access_log: Option<AccessLog>,
    pub trace_sampling: Option<f64>,
    pub cpu_request: Option<Quantity>,
    pub memory_request: Option<Quantity>,
    pub memory_limit: Option<Quantity>,
}

/// One bad annotation value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: {problem}")]
pub struct Invalid {
    pub annotation: &'static str,
    pub problem: String,
}

/// Every bad annotation of a pod, so the user fixes them in one round.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidAnnotations(pub Vec<Invalid>);

impl fmt::Display for InvalidAnnotations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, invalid) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{invalid}")?;
        }
        Ok(())
    }
}

/// Parses the Trellis annotations of a pod; unknown annotations are ignored.
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Overrides, InvalidAnnotations> {
    let mut errors = Vec::new();
    let mut field = |name: &'static str, parse: &dyn Fn(&str) -> Result<(), String>| {
        if let Some(value) = annotations.get(name)
            && let Err(problem) = parse(value)
        {
            errors.push(Invalid {
                annotation: name,
                problem,
            });
        }
    };
    // Validate everything first, collecting every problem; then build from valid values.
    field(INJECT, &|v| parse_inject(v).map(drop));
    field(SKIP_INBOUND_PORTS, &|v| PortList::parse(v).map(drop));
    field(SKIP_OUTBOUND_PORTS, &|v| PortList::parse(v).map(drop));
    field(INBOUND_PLAINTEXT_PORTS, &|v| PortList::parse(v).map(drop));
    field(INBOUND_PORTS, &|v| PortList::parse(v).map(drop));
    field(OPAQUE_PORTS, &|v| PortList::parse(v).map(drop));
    field(REWRITE_PROBES, &|v| parse_rewrite_probes(v).map(drop));
    field(PROXY_LOG_LEVEL, &|v| parse_log_level(v).map(drop));
    field(ACCESS_LOG, &|v| parse_access_log(v).map(drop));
    field(TRACE_SAMPLING, &|v| parse_trace_sampling(v).map(drop));
    field(PROXY_CPU_REQUEST, &|v| Quantity::cpu(v).map(drop));
    field(PROXY_MEMORY_REQUEST, &|v| Quantity::memory(v).map(drop));
    field(PROXY_MEMORY_LIMIT, &|v| Quantity::memory(v).map(drop));
    if !errors.is_empty() {
        return Err(InvalidAnnotations(errors));
    }
    let get = |name: &str| annotations.get(name).map(String::as_str);
    Ok(Overrides {
        inject: get(INJECT).and_then(|v| parse_inject(v).ok()),
        skip_inbound_ports: get(SKIP_INBOUND_PORTS).and_then(|v| PortList::parse(v).ok()),
        skip_outbound_ports: get(SKIP_OUTBOUND_PORTS).and_then(|v| PortList::parse(v).ok()),
        inbound_plaintext_ports: get(INBOUND_PLAINTEXT_PORTS).and_then(|v| PortList::parse(v).ok()),
        inbound_ports: get(INBOUND_PORTS).and_then(|v| PortList::parse(v).ok()),
        opaque_ports: get(OPAQUE_PORTS).and_then(|v| PortList::parse(v).ok()),
        rewrite_probes: get(REWRITE_PROBES).and_then(|v| parse_rewrite_probes(v).ok()),
        log_level: get(PROXY_LOG_LEVEL).and_then(|v| parse_log_level(v).ok()),
        access_log: get(ACCESS_LOG).and_then(|v| parse_access_log(v).ok()),
        trace_sampling: get(TRACE_SAMPLING).and_then(|v| parse_trace_sampling(v).ok()),
        cpu_request: get(PROXY_CPU_REQUEST).and_then(|v| Quantity::cpu(v).ok()),
        memory_request: get(PROXY_MEMORY_REQUEST).and_then(|v| Quantity::memory(v).ok()),
        memory_limit: get(PROXY_MEMORY_LIMIT).and_then(|v| Quantity::memory(v).ok()),
    })
}

/// What `trellis.dev/access-log` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Json,
}

impl AccessLog {
    /// The proxy's `TRELLIS_ACCESS_LOG` value.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLog::Off => "off",
            AccessLog::Json => "json",
        }
    }
}

/// `off` or `json`, as the proxy's `--access-log` takes them.
pub fn parse_access_log(value: &str) -> Result<AccessLog, String> {
    match value.trim() {
        "off" => Ok(AccessLog::Off),
        "json" => Ok(AccessLog::Json),
        other => Err(format!("{other:?} is not a valid value (use off or json)")),
    }
}

/// A share from 0 to 1 (`0.01`, `1`, `1e-3`), as the proxy's `--trace-sampling` takes it. A
/// percentage (`5%`, or `5` meaning it) is refused rather than read as a share.
pub fn parse_trace_sampling(value: &str) -> Result<f64, String> {
    let value = value.trim();
    match value.parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        Ok(share) if share > 1.0 && share.is_finite() => Err(format!(
            "{value:?} is above 1; the share is from 0 to 1 (0.05 for 5 %)"
        )),
        _ => Err(format!(
            "{value:?} is not a share from 0 to 1 (examples: 0, 0.01, 1)"
        )),
    }
}

/// `enabled` or `disabled`; anything else is refused rather than guessed, so a typo such as
/// `false` does not silently inject a pod its author meant to opt out.
pub fn parse_inject(value: &str) -> Result<InjectMode, String> {
    match value.trim() {
        "enabled" => Ok(InjectMode::Enabled),
        "disabled" => Ok(InjectMode::Disabled),
        other => Err(format!(
            "{other:?} is not a valid value (use enabled or disabled)"
        )),
    }
}

/// What `trellis.dev/rewrite-probes` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewriteProbes {
    Enabled,
    Disabled,
}

/// `enabled` or `disabled`, refused otherwise for the same reason as [`parse_inject`].
pub fn parse_rewrite_probes(value: &str) -> Result<RewriteProbes, String> {
    match value.trim() {
        "enabled" => Ok(RewriteProbes::Enabled),
        "disabled" => Ok(RewriteProbes::Disabled),
        other => Err(format!(
            "{other:?} is not a valid value (use enabled or disabled)"
        )),
    }
}

/// The log levels the proxy understands as a whole filter.
const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// A level (`info`) or a tracing `EnvFilter` (`warn,trellis_proxy=debug`).
///
/// A bare word that is not a level (`verbose`, `warning`) is refused even though `EnvFilter`
/// would read it as "everything from target `verbose`": that is almost always a typo, and the
/// proxy would then log nothing useful.
pub fn parse_log_level(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(format!("empty value (use one of {})", LEVELS.join(", ")));
    }
    for directive in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let lower = directive.to_ascii_lowercase();
        let bare_word = !directive.contains(['=', '[']);
        if bare_word && !LEVELS.contains(&lower.as_str()) {
            return Err(format!(
                "{directive:?} is not a log level ({}) nor a filter directive such as \
                 info,trellis_proxy=debug",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(value)
        .map_err(|e| format!("{value:?} is not a valid log filter: {e}"))?;
    Ok(value.to_string())
}

/// One port or an inclusive range, written `8080` or `8000-8100`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
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

/// A comma list of ports and ranges: `25, 8000-8100`. Rendered back without spaces, which is
/// the form the proxy reads from `TRELLIS_SKIP_*_PORTS`, `TRELLIS_INBOUND_PLAINTEXT_PORTS` and
/// `TRELLIS_INBOUND_PORTS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<PortRange>);

impl PortList {
    pub fn parse(value: &str) -> Result<Self, String> {
        value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(parse_port_range)
            .collect::<Result<_, _>>()
            .map(PortList)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sorted, with overlapping ranges (and ports inside a range) merged, so one set of ports
    /// always renders the same way whatever order its sources listed it in.
    pub fn normalized(mut self) -> Self {
        self.0.sort_by_key(|r| (r.first, r.last));
        let mut merged: Vec<PortRange> = Vec::with_capacity(self.0.len());
        for range in self.0 {
            match merged.last_mut() {
                Some(last) if range.first <= last.last => last.last = last.last.max(range.last),
                _ => merged.push(range),
            }
        }
        PortList(merged)
    }
}

impl fmt::Display for PortList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, range) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{range}")?;
        }
        Ok(())
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 is not a valid port (use 1-65535)".to_string()),
        Ok(port) => Ok(port),
        Err(_) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            Err(format!("port {s} is out of range (use 1-65535)"))
        }
        Err(_) => Err(format!("{s:?} is not a port number")),
    }
}

fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let (first, last) = match s.split_once('-') {
        None => {
            let port = parse_port(s)?;
            (port, port)
        }
        Some((first, last)) => {
            let (first, last) = (first.trim(), last.trim());
            if first.is_empty() || last.is_empty() {
                return Err(format!("range {s:?} needs a port on both sides of '-'"));
            }
            (parse_port(first)?, parse_port(last)?)
        }
    };
    if first > last {
        return Err(format!(
            "range {s:?} starts after it ends (write it as {last}-{first})"
        ));
    }
    Ok(PortRange { first, last })
}

/// A Kubernetes resource quantity, kept as written (the API server canonicalises it) along
/// with its value, so requests can be compared with limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantity {
    pub text: String,
    /// Cores for CPU, bytes for memory.
    pub value: f64,
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Quantity {
    /// A CPU amount: `100m`, `0.5`, `1`. At least `1m`, the smallest unit Kubernetes keeps.
    pub fn cpu(text: &str) -> Result<Self, String> {
        let q = Self::parse(text)?;
        if q.value < 0.001 {
            return Err(format!(
                "{text:?} is below 1m, the smallest CPU amount Kubernetes keeps"
            ));
        }
        Ok(q)
    }

    /// A memory amount in bytes: `64Mi`, `1Gi`, `500M`. Whole bytes only, which catches the
    /// classic `128m` (0.128 bytes) meant as `128Mi`.
    pub fn memory(text: &str) -> Result<Self, String> {
        let q = Self::parse(text)?;
        // Tolerate float rounding (`1.1M`), not a real fraction of a byte (`128m`).
        if (q.value - q.value.round()).abs() > 1e-9 * q.value.max(1.0) {
            let hint = match text.trim().strip_suffix('m') {
                Some(number) => format!("; did you mean {number}Mi?"),
                None => String::new(),
            };
            return Err(format!("{text:?} is not a whole number of bytes{hint}"));
        }
        Ok(q)
    }

    /// Kubernetes' grammar: a decimal number, then a binary (`Ki`…`Ei`), decimal (`m`, `k`,
    /// `M`…`E`) or exponent (`e3`) suffix. Zero and negative amounts are refused: neither is a
    /// meaningful proxy resource.
    pub fn parse(text: &str) -> Result<Self, String> {
        let s = text.trim();
        let bad = || {
            format!("{text:?} is not a Kubernetes quantity (examples: 100m, 0.5, 64Mi, 1Gi, 500M)")
        };
        if s.is_empty() {
            return Err(format!("empty value; {}", bad()));
        }
        if s.starts_with('-') {
            return Err(format!(
                "{text:?} is negative; use an amount greater than zero"
            ));
        }
        let s = s.strip_prefix('+').unwrap_or(s);
        let number_end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(number_end);
        let digits = number.chars().filter(char::is_ascii_digit).count();
        if digits == 0 || number.matches('.').count() > 1 {
            return Err(bad());
        }
        let mantissa: f64 = number.parse().map_err(|_| bad())?;
        let multiplier = match suffix {
            "" => 1.0,
            "Ki" => 1024f64,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            "Ei" => 1024f64.powi(6),
            "n" => 1e-9,
            "u" => 1e-6,
            "m" => 1e-3,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            exp if exp.starts_with(['e', 'E']) => {
                let exponent = &exp[1..];
                let unsigned = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
                if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let exponent: i32 = exponent.parse().map_err(|_| bad())?;
                10f64.powi(exponent)
            }
            _ => return Err(bad()),
        };
        let value = mantissa * multiplier;
        if !value.is_finite() {
            return Err(format!("{text:?} is too large"));
        }
        if value == 0.0 {
            return Err(format!("{text:?} is zero; use an amount greater than zero"));
        }
        Ok(Quantity {
            text: s.to_string(),
            value,
        })
    }
}

#[cfg(test)]
#[path = "annotations_tests.rs"]
mod tests;
