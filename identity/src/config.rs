//! Identity's settings: flags and `TRELLIS_*` environment variables, parsed once by clap and
//! validated here, so that a bad setting stops identity at start with the flag to fix.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use trellis_api::certify::TOKEN_AUDIENCE;
use trellis_api::identity::DEFAULT_TRUST_DOMAIN;

use crate::limits::CertifyLimits;
use crate::tokens::{is_dns_label, is_dns_subdomain};

/// Where the trust anchors and the issuer are kept: three files, or one Secret.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct MaterialArgs {
    /// PEM bundle of trust anchors (root certificates); several roots may be listed while one
    /// replaces another. Use with --issuer-cert and --issuer-key.
    #[arg(long, env = "TRELLIS_TRUST_ANCHORS_FILE", value_name = "FILE")]
    pub trust_anchors: Option<PathBuf>,

    /// PEM certificate of the issuer (an intermediate CA under a trust anchor), optionally
    /// followed by further intermediates.
    #[arg(long, env = "TRELLIS_ISSUER_CERT_FILE", value_name = "FILE")]
    pub issuer_cert: Option<PathBuf>,

    /// PKCS#8 PEM private key of the issuer (`BEGIN PRIVATE KEY`).
    #[arg(long, env = "TRELLIS_ISSUER_KEY_FILE", value_name = "FILE")]
    pub issuer_key: Option<PathBuf>,

    /// Secret holding the same three as `ca.crt`, `tls.crt` and `tls.key`, instead of files.
    #[arg(long, env = "TRELLIS_ISSUER_SECRET", value_name = "NAMESPACE/NAME")]
    pub issuer_secret: Option<String>,
}

/// Where the trust anchors and the issuer are kept, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaterialSource {
    Files {
        anchors: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    Secret {
        namespace: String,
        name: String,
    },
}

/// `trellis-identity serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Address of the certify endpoint (HTTPS, HTTP/2 and HTTP/1.1). Proxies find identity
    /// through their own TRELLIS_IDENTITY_ADDR; this is where identity listens.
    #[arg(long, env = "TRELLIS_CERTIFY_ADDR", default_value = "0.0.0.0:8080")]
    pub certify_addr: SocketAddr,

    /// Address of the admin server: /live, /ready, /metrics (plain HTTP).
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "0.0.0.0:9990")]
    pub admin_addr: SocketAddr,

    /// Trust domain of the SPIFFE identities identity signs.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Identity's own namespace: its serving certificate is valid for
    /// `<service>.<namespace>.svc`.
    #[arg(long, env = "TRELLIS_NAMESPACE", default_value = "trellis-system")]
    pub namespace: String,

    /// Identity's Service name.
    #[arg(
        long,
        env = "TRELLIS_IDENTITY_SERVICE",
        default_value = "trellis-identity"
    )]
    pub service: String,

    /// More names (DNS names or IP addresses) for the serving certificate; repeat the flag or
    /// separate with commas.
    #[arg(
        long = "server-name",
        env = "TRELLIS_SERVER_NAMES",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub server_names: Vec<String>,

    /// Local mode: check tokens against this file (`token namespace serviceaccount` per
    /// line) instead of TokenReviews; the file is re-read when it changes.
    #[arg(long, env = "TRELLIS_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Audience a workload's token must be issued for.
    #[arg(long, env = "TRELLIS_TOKEN_AUDIENCE", default_value = TOKEN_AUDIENCE)]
    pub token_audience: String,

    /// Lifetime of workload certificates (e.g. `24h`, `90m`); never beyond the issuer's.
    #[arg(long, env = "TRELLIS_CERT_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    pub cert_lifetime: Duration,

    /// How often the issuer (files or Secret) and the token file are checked for changes.
    #[arg(long, env = "TRELLIS_RELOAD_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub reload_interval: Duration,

    /// Certify requests worked on (CSR checks, TokenReview, signing) at once; more wait for a
    /// turn.
    #[arg(long, env = "TRELLIS_MAX_CONCURRENT_CERTIFY", default_value_t = 64)]
    pub max_concurrent_certify: usize,

    /// How long a certify request waits for a turn before it is answered 503 (retryable).
    #[arg(long, env = "TRELLIS_CERTIFY_QUEUE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub certify_queue_timeout: Duration,

    /// TokenReviews each client IP may cause per second, after its burst; over it, 429.
    #[arg(long, env = "TRELLIS_TOKEN_REVIEWS_PER_SECOND", default_value_t = 1.0)]
    pub token_reviews_per_second: f64,

    /// TokenReviews each client IP may cause at once.
    #[arg(long, env = "TRELLIS_TOKEN_REVIEW_BURST", default_value_t = 10)]
    pub token_review_burst: u32,

    #[command(flatten)]
    pub material: MaterialArgs,

    /// Log filter, e.g. `info` or `info,trellis_identity=debug`.
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log_level: String,
}

/// Where tokens are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// TokenReviews against the API server, for this audience.
    Review { audience: String },
    /// Local mode: a token file.
    File(PathBuf),
}

/// The validated settings of `serve`.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub certify_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub trust_domain: String,
    pub server_names: Vec<String>,
    pub tokens: TokenSource,
    pub cert_lifetime: Duration,
    pub reload_interval: Duration,
    pub material: MaterialSource,
    pub limits: CertifyLimits,
}

/// `trellis-identity bootstrap`.
#[derive(Clone, Debug, clap::Args)]
pub struct BootstrapArgs {
    /// Trust domain, recorded in the generated certificates' names.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    #[command(flatten)]
    pub material: MaterialArgs,

    /// Keep the root's private key in this file (PKCS#8 PEM, mode 0600) when a root is
    /// created; with --renew-issuer, the key that signs the new issuer. Without it, a new
    /// root's key is discarded and the issuer can only be replaced together with the root.
    #[arg(long, env = "TRELLIS_ROOT_KEY_FILE", value_name = "FILE")]
    pub root_key: Option<PathBuf>,

    /// Replace the issuer with a new one signed by the root of --root-key, keeping the trust
    /// anchors as they are.
    #[arg(long, env = "TRELLIS_RENEW_ISSUER")]
    pub renew_issuer: bool,

    /// Validity of a new issuer.
    #[arg(long, env = "TRELLIS_ISSUER_LIFETIME", default_value = "8760h", value_parser = parse_duration)]
    pub issuer_lifetime: Duration,

    /// Validity of a new root.
    #[arg(long, env = "TRELLIS_ROOT_LIFETIME", default_value = "87600h", value_parser = parse_duration)]
    pub root_lifetime: Duration,

    /// Log filter.
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log_level: String,
}

/// The validated settings of `bootstrap`.
#[derive(Clone, Debug)]
pub struct BootstrapConfig {
    pub trust_domain: String,
    pub material: MaterialSource,
    pub root_key: Option<PathBuf>,
    pub renew_issuer: bool,
    pub issuer_lifetime: Duration,
    pub root_lifetime: Duration,
}

/// A setting that cannot be used, with the flag to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--{flag}: {problem}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub problem: String,
}

fn invalid(flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        problem: problem.into(),
    }
}

impl MaterialArgs {
    pub fn validate(&self) -> Result<MaterialSource, ConfigError> {
        let files = [&self.trust_anchors, &self.issuer_cert, &self.issuer_key];
        let given = files.iter().filter(|f| f.is_some()).count();
        match (&self.issuer_secret, given) {
            (Some(_), 1..) => Err(invalid(
                "issuer-secret",
                "give either --issuer-secret or the files (--trust-anchors, --issuer-cert, \
                 --issuer-key), not both",
            )),
            (Some(secret), 0) => {
                let (namespace, name) = secret
                    .split_once('/')
                    .filter(|(ns, name)| is_dns_label(ns) && is_dns_subdomain(name))
                    .ok_or_else(|| {
                        invalid("issuer-secret", format!("{secret:?} is not NAMESPACE/NAME"))
                    })?;
                Ok(MaterialSource::Secret {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })
            }
            (None, 0) => Err(invalid(
                "issuer-secret",
                "say where the trust anchors and the issuer are: --issuer-secret NAMESPACE/NAME, \
                 or --trust-anchors, --issuer-cert and --issuer-key",
            )),
            (None, _) => match (&self.trust_anchors, &self.issuer_cert, &self.issuer_key) {
                (Some(anchors), Some(cert), Some(key)) => Ok(MaterialSource::Files {
                    anchors: anchors.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                (None, _, _) => Err(invalid(
                    "trust-anchors",
                    "missing (the issuer files need it)",
                )),
                (_, None, _) => Err(invalid("issuer-cert", "missing (the other files need it)")),
                (_, _, None) => Err(invalid("issuer-key", "missing (the other files need it)")),
            },
        }
    }
}

impl ServeArgs {
    pub fn validate(&self) -> Result<ServeConfig, ConfigError> {
        let trust_domain = validate_trust_domain(&self.trust_domain)?;
        if !is_dns_label(&self.namespace) {
            return Err(invalid("namespace", "not a valid namespace name"));
        }
        if !is_dns_label(&self.service) {
            return Err(invalid("service", "not a valid Service name"));
        }
        let mut server_names = vec![
            self.service.clone(),
            format!("{}.{}", self.service, self.namespace),
            format!("{}.{}.svc", self.service, self.namespace),
        ];
        for name in &self.server_names {
            let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
            if name.is_empty() {
                continue;
            }
            if name.parse::<IpAddr>().is_err() && !is_dns_subdomain(&name) {
                return Err(invalid(
                    "server-name",
                    format!("{name:?} is neither a DNS name nor an IP address"),
                ));
            }
            if !server_names.contains(&name) {
                server_names.push(name);
            }
        }
        let tokens = match &self.token_file {
            Some(path) => TokenSource::File(path.clone()),
            None if self.token_audience.trim().is_empty() => {
                return Err(invalid("token-audience", "must not be empty"));
            }
            None => TokenSource::Review {
                audience: self.token_audience.trim().to_string(),
            },
        };
        // Seconds are allowed so renewal can be exercised; a cluster wants hours.
        if self.cert_lifetime < Duration::from_secs(5) {
            return Err(invalid("cert-lifetime", "must be at least 5s"));
        }
        if self.cert_lifetime > Duration::from_secs(365 * 24 * 3600) {
            return Err(invalid("cert-lifetime", "must be at most 8760h (a year)"));
        }
        if self.reload_interval < Duration::from_millis(100) {
            return Err(invalid("reload-interval", "must be at least 100ms"));
        }
        if self.max_concurrent_certify == 0 {
            return Err(invalid("max-concurrent-certify", "must be at least 1"));
        }
        if !(self.token_reviews_per_second.is_finite() && self.token_reviews_per_second > 0.0) {
            return Err(invalid(
                "token-reviews-per-second",
                "must be a number greater than 0",
            ));
        }
        if self.token_review_burst == 0 {
            return Err(invalid("token-review-burst", "must be at least 1"));
        }
        let limits = CertifyLimits {
            max_concurrent: self.max_concurrent_certify,
            queue_timeout: self.certify_queue_timeout,
            reviews_per_second: self.token_reviews_per_second,
            burst: self.token_review_burst,
        };
        Ok(ServeConfig {
            certify_addr: self.certify_addr,
            admin_addr: self.admin_addr,
            trust_domain,
            server_names,
            tokens,
            cert_lifetime: self.cert_lifetime,
            reload_interval: self.reload_interval,
            material: self.material.validate()?,
            limits,
        })
    }
}

impl BootstrapArgs {
    pub fn validate(&self) -> Result<BootstrapConfig, ConfigError> {
        let trust_domain = validate_trust_domain(&self.trust_domain)?;
        if self.renew_issuer && self.root_key.is_none() {
            return Err(invalid(
                "renew-issuer",
                "needs --root-key: the new issuer is signed by that root",
            ));
        }
        if self.issuer_lifetime < Duration::from_secs(3600) {
            return Err(invalid("issuer-lifetime", "must be at least 1h"));
        }
        if self.root_lifetime <= self.issuer_lifetime {
            return Err(invalid(
                "root-lifetime",
                "must be longer than --issuer-lifetime",
            ));
        }
        Ok(BootstrapConfig {
            trust_domain,
            material: self.material.validate()?,
            root_key: self.root_key.clone(),
            renew_issuer: self.renew_issuer,
            issuer_lifetime: self.issuer_lifetime,
            root_lifetime: self.root_lifetime,
        })
    }
}

/// SPIFFE trust domains: lowercase letters, digits, `.`, `-` and `_`.
fn validate_trust_domain(td: &str) -> Result<String, ConfigError> {
    let valid = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if valid {
        Ok(td.to_string())
    } else {
        Err(invalid(
            "trust-domain",
            format!("{td:?} is not a trust domain (lowercase letters, digits, '.', '-', '_')"),
        ))
    }
}

/// `90s`, `15m`, `24h`, `7d`, `500ms`, or a sum such as `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration such as 30s, 15m, 24h, 7d or 1h30m");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (number, after) = rest.split_at(digits);
        let number: u64 = number.parse().map_err(|_| bad())?;
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let part = match unit {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.saturating_mul(60)),
            "h" => Duration::from_secs(number.saturating_mul(3600)),
            "d" => Duration::from_secs(number.saturating_mul(86400)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
        rest = after;
    }
    Ok(total)
}

/// The inverse of [`parse_duration`], for logs: `24h`, `1h30m`, `90s`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let mut out = String::new();
    for (n, unit) in [
        (secs / 3600, "h"),
        (secs % 3600 / 60, "m"),
        (secs % 60, "s"),
    ] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn serve(args: &[&str]) -> Result<ServeConfig, ConfigError> {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(args);
        Serve::try_parse_from(argv).unwrap().args.validate()
    }

    #[test]
    fn durations() {
        for (text, secs) in [
            ("30s", 30),
            ("15m", 900),
            ("24h", 86400),
            ("1h30m", 5400),
            ("7d", 604800),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for (secs, text) in [
            (86400, "24h"),
            (5400, "1h30m"),
            (90, "1m30s"),
            (3661, "1h1m1s"),
        ] {
            assert_eq!(format_duration(Duration::from_secs(secs)), text);
            assert_eq!(parse_duration(text), Ok(Duration::from_secs(secs)));
        }
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        for bad in ["", "10", "h", "1x", "-1h", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn serve_defaults_with_a_secret() {
        let config = serve(&["--issuer-secret", "trellis-system/trellis-identity-issuer"]).unwrap();
        assert_eq!(config.certify_addr.port(), 8080);
        assert_eq!(config.admin_addr.port(), 9990);
        assert_eq!(config.trust_domain, "cluster.local");
        assert_eq!(config.cert_lifetime, Duration::from_secs(86400));
        assert_eq!(
            config.tokens,
            TokenSource::Review {
                audience: "identity.trellis.dev".into()
            }
        );
        assert_eq!(
            config.server_names,
            [
                "trellis-identity",
                "trellis-identity.trellis-system",
                "trellis-identity.trellis-system.svc"
            ]
        );
        assert_eq!(
            config.material,
            MaterialSource::Secret {
                namespace: "trellis-system".into(),
                name: "trellis-identity-issuer".into()
            }
        );
        assert_eq!(config.limits, CertifyLimits::default());
        assert_eq!(config.limits.max_concurrent, 64);
        assert_eq!(config.limits.burst, 10);
    }

    #[test]
    fn serve_local_mode_with_files() {
        let config = serve(&[
            "--trust-anchors",
            "ca.crt",
            "--issuer-cert",
            "tls.crt",
            "--issuer-key",
            "tls.key",
            "--token-file",
            "tokens",
            "--server-name",
            "localhost,127.0.0.1",
            "--cert-lifetime",
            "1h",
        ])
        .unwrap();
        assert_eq!(config.tokens, TokenSource::File("tokens".into()));
        assert!(config.server_names.contains(&"localhost".to_string()));
        assert!(config.server_names.contains(&"127.0.0.1".to_string()));
        assert!(matches!(config.material, MaterialSource::Files { .. }));
    }

    #[test]
    fn serve_refusals_name_the_flag() {
        let files = [
            "--trust-anchors",
            "a",
            "--issuer-cert",
            "b",
            "--issuer-key",
            "c",
        ];
        for (args, flag) in [
            (vec![], "issuer-secret"),
            (vec!["--issuer-secret", "no-slash"], "issuer-secret"),
            (
                vec!["--trust-anchors", "a", "--issuer-cert", "b"],
                "issuer-key",
            ),
            (
                vec!["--issuer-secret", "a/b", "--trust-anchors", "a"],
                "issuer-secret",
            ),
            (
                [&files[..], &["--trust-domain", "Bad Domain"]].concat(),
                "trust-domain",
            ),
            (
                [&files[..], &["--cert-lifetime", "4s"]].concat(),
                "cert-lifetime",
            ),
            (
                [&files[..], &["--server-name", "not a name"]].concat(),
                "server-name",
            ),
            (
                [&files[..], &["--max-concurrent-certify", "0"]].concat(),
                "max-concurrent-certify",
            ),
            (
                [&files[..], &["--token-reviews-per-second", "0"]].concat(),
                "token-reviews-per-second",
            ),
            (
                [&files[..], &["--token-reviews-per-second", "NaN"]].concat(),
                "token-reviews-per-second",
            ),
            (
                [&files[..], &["--token-review-burst", "0"]].concat(),
                "token-review-burst",
            ),
        ] {
            let err = serve(&args).unwrap_err();
            assert_eq!(err.flag, flag, "{args:?}: {err}");
        }
    }
}
