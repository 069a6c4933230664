//! `trellis-controller doctor`: a read-only health check of a cluster's Trellis installation,
//! the way `linkerd check` checks Linkerd's.
//!
//! [`fetch`] reads what the checks need with kube's client (only `get` and `list`, and the
//! injector's `/ready` through the API server's service proxy); [`checks`] judges those objects
//! in pure functions, at an instant given to it. A 403 leaves one check `unknown` with the
//! permission it needs; only an API server that cannot be read at all stops the run (exit 2).

pub mod certs;
pub mod checks;
pub mod fetch;
mod injector;
mod trust;
mod workloads;

use std::process::ExitCode;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

pub use checks::{Check, Status};

/// Exit codes: nothing fails (warnings allowed); some check fails; the API server unreadable.
pub const HEALTHY: u8 = 0;
pub const UNHEALTHY: u8 = 1;
pub const UNREADABLE: u8 = 2;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The control-plane namespace: where the chart was installed.
    #[arg(long, env = "TRELLIS_NAMESPACE", default_value = crate::identity::DEFAULT_NAMESPACE)]
    pub namespace: String,

    /// The Secret of the trust anchors (ca.crt) and the issuer (tls.crt), in the control-plane
    /// namespace: the chart's identity.externalIssuer.secretName when that is used.
    #[arg(
        long,
        env = "TRELLIS_ISSUER_SECRET",
        value_name = "NAME",
        default_value = checks::DEFAULT_ISSUER_SECRET
    )]
    pub issuer_secret: String,

    /// The kubeconfig context to use [default: the current context, or the pod's service
    /// account in a pod].
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,

    /// How long to wait for each answer of the API server (`500ms`, `10s`, `1m`).
    #[arg(
        long,
        env = "TRELLIS_REQUEST_TIMEOUT",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_timeout
    )]
    pub request_timeout: Duration,

    /// Output format.
    #[arg(short, long, value_name = "FORMAT", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub fn main(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(UNREADABLE);
        }
    };
    ExitCode::from(runtime.block_on(run(args)))
}

async fn run(args: Args) -> u8 {
    let client = match client(args.context.as_deref()).await {
        Ok(client) => client,
        Err(e) => {
            report(&unreadable(&e, args.output), UNREADABLE, args.output);
            return UNREADABLE;
        }
    };
    let settings = fetch::Settings {
        namespace: args.namespace,
        issuer_secret: args.issuer_secret,
        timeout: args.request_timeout,
    };
    let (text, code) = diagnose(&client, &settings, Timestamp::now(), args.output).await;
    report(&text, code, args.output);
    code
}

/// The report on stdout; in a table, "cannot read the cluster" is an error, on stderr.
fn report(text: &str, code: u8, format: Format) {
    if code == UNREADABLE && format == Format::Table {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
}

/// The answer when the cluster cannot be read at all.
fn unreadable(error: &str, format: Format) -> String {
    match format {
        Format::Json => json_error(error),
        Format::Table => format!("error: {error}\n"),
    }
}

/// Reads the cluster, judges it at `now` and renders the report: the text to print and the
/// exit code. The API server unreadable gives the error as the text.
pub async fn diagnose(
    client: &kube::Client,
    settings: &fetch::Settings,
    now: Timestamp,
    format: Format,
) -> (String, u8) {
    let cluster = match fetch::fetch(client, settings).await {
        Ok(cluster) => cluster,
        Err(e) => return (unreadable(&e.to_string(), format), UNREADABLE),
    };
    let checks = checks::judge(&cluster, now);
    let code = checks::exit_code(&checks);
    let text = match format {
        Format::Table => table(&checks),
        Format::Json => json(&checks, code),
    };
    (text, code)
}

async fn client(context: Option<&str>) -> Result<kube::Client, String> {
    let words = |e: &dyn std::fmt::Display| {
        format!(
            "cannot configure a Kubernetes client (KUBECONFIG, ~/.kube/config, or in a pod its \
             service account): {e}"
        )
    };
    let Some(context) = context else {
        return crate::kubernetes::client().await.map_err(|e| e.to_string());
    };
    let options = kube::config::KubeConfigOptions {
        context: Some(context.to_string()),
        ..Default::default()
    };
    let config = kube::Config::from_kubeconfig(&options)
        .await
        .map_err(|e| words(&e))?;
    kube::Client::try_from(config).map_err(|e| words(&e))
}

/// The JSON document: `{checks: [{name, status, message, hint}], summary: {ok, warn, fail,
/// unknown, exit_code}}`, plus `error` when the API server could not be read. Its shape is a
/// public interface (docs/reference/doctor.md).
#[derive(Debug, serde::Serialize)]
struct Report<'a> {
    checks: &'a [Check],
    summary: Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Debug, serde::Serialize)]
struct Summary {
    ok: usize,
    warn: usize,
    fail: usize,
    unknown: usize,
    exit_code: u8,
}

impl Summary {
    fn of(checks: &[Check], exit_code: u8) -> Summary {
        let n = |s: Status| checks.iter().filter(|c| c.status == s).count();
        Summary {
            ok: n(Status::Ok),
            warn: n(Status::Warn),
            fail: n(Status::Fail),
            unknown: n(Status::Unknown),
            exit_code,
        }
    }
}

pub fn json(checks: &[Check], exit_code: u8) -> String {
    render(&Report {
        checks,
        summary: Summary::of(checks, exit_code),
        error: None,
    })
}

/// With the API server unreadable: no checks, and why.
fn json_error(error: &str) -> String {
    render(&Report {
        checks: &[],
        summary: Summary::of(&[], UNREADABLE),
        error: Some(error),
    })
}

fn render(report: &Report<'_>) -> String {
    // Strings and numbers only: serializing cannot fail.
    serde_json::to_string_pretty(report).unwrap_or_default() + "\n"
}

/// The human table: one line per check, its hint under it, then the counts.
pub fn table(checks: &[Check]) -> String {
    let width = checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!("{:<7} {:<width$}  MESSAGE\n", "STATUS", "CHECK");
    for c in checks {
        out.push_str(&format!(
            "{:<7} {:<width$}  {}\n",
            c.status.as_str(),
            c.name,
            c.message
        ));
        if !c.hint.is_empty() {
            out.push_str(&format!("{:<7} {:<width$}  hint: {}\n", "", "", c.hint));
        }
    }
    let n = Summary::of(checks, 0);
    out.push_str(&format!(
        "\n{} checks: {} ok, {} warn, {} fail, {} unknown\n",
        checks.len(),
        n.ok,
        n.warn,
        n.fail,
        n.unknown
    ));
    out
}

/// `500ms`, `10s`, `2m`; more than zero.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit, e.g. 10s"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("{s:?}: the unit is ms, s or m")),
    };
    if d.is_zero() {
        return Err("must be more than zero".to_string());
    }
    Ok(d)
}

#[cfg(test)]
mod checks_tests;
#[cfg(test)]
mod fetch_tests;
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod injector_tests;
#[cfg(test)]
mod trust_tests;
#[cfg(test)]
mod workloads_tests;
