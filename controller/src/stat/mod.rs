//! `trellis-controller stat`: what routes are doing — success rate, requests per second and
//! latency percentiles per parent Service, route, rule and backend, from the sidecars' own
//! request metrics (`trellis_requests_total`, `trellis_request_duration_seconds`).
//!
//! Three sources, one table: sidecars' admin ports scraped directly ([`scrape`]), the same
//! through the API server's pod proxy, or PromQL against Prometheus ([`prometheus`]). Scraped
//! sources take two scrapes a window apart and read the deltas; [`compute`] holds the
//! arithmetic, apart from any I/O.

pub mod compute;
pub mod prometheus;
pub mod scrape;
pub mod text;

#[cfg(test)]
mod compute_tests;
#[cfg(test)]
mod prometheus_tests;
#[cfg(test)]
mod scrape_tests;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use compute::{Filter, ParentFilter, Row, RowKey, Tally};
use scrape::Sidecar;

/// How long scraped sources wait between their two scrapes, unless `--window` says.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// The range of Prometheus' `rate`, unless `--window` says: several of its scrape intervals.
pub const DEFAULT_PROMETHEUS_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub source: Source,
    /// With --kubernetes: only pods of this namespace (default: every namespace).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// With --kubernetes: only pods matching this label selector (`app=web,tier!=db`).
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// The period measured: `10s`, `500ms`, `2m`. Scraped sources scrape twice this far apart
    /// (default 10s); `0` reads totals since each sidecar started, with no rate. With
    /// --prometheus it is the range of `rate` (default 1m).
    #[arg(long, value_parser = parse_duration)]
    pub window: Option<Duration>,
    /// Whose view: `outbound` (clients' sidecars, the default) or `inbound` (servers').
    #[arg(long, default_value = "outbound", value_parser = ["outbound", "inbound"])]
    pub direction: String,
    /// Only this route, `NAMESPACE/NAME`.
    #[arg(long)]
    pub route: Option<String>,
    /// Only requests to this Service, `NAME.NAMESPACE` (optionally `:PORT`).
    #[arg(long, value_parser = ParentFilter::parse)]
    pub parent: Option<ParentFilter>,
    /// Output: an aligned `table` or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
    /// How long each scrape or query may take.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Where the numbers come from: exactly one.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Source {
    /// A sidecar's admin address, `HOST[:PORT]` (port 4191 by default); repeat for more.
    #[arg(long, value_name = "ADDR")]
    pub admin: Vec<String>,
    /// Every meshed pod the API server lists (kubeconfig or in-cluster credentials), each
    /// scraped through its `pods/proxy` subresource.
    #[arg(long)]
    pub kubernetes: bool,
    /// A Prometheus server's URL (`http://prometheus:9090`) that scrapes the sidecars.
    #[arg(long, value_name = "URL")]
    pub prometheus: Option<String>,
}

/// Durations as `0`, `250ms`, `10s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let bad = || format!("{s:?} is not a duration like 500ms, 10s or 2m");
    let n: u64 = n.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(bad()),
    }
}

/// What `-o json` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub direction: String,
    /// The period measured; `null` for totals since the sidecars started.
    pub window_seconds: Option<f64>,
    pub rows: Vec<Row>,
}

pub fn main(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(run(&args)) {
        Ok(report) => report,
        Err(Failure::Usage(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        Err(Failure::Source(e)) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = match args.output.as_str() {
        "json" => match serde_json::to_string_pretty(&report) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("error: cannot print the table: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => table(&report.rows),
    };
    if report.rows.is_empty() {
        eprintln!(
            "no {} requests seen{}",
            report.direction,
            if args.route.is_some() || args.parent.is_some() {
                " that match the filters"
            } else {
                ""
            }
        );
    }
    // A closed pipe (`| head`) is not worth a panic.
    let _ = std::io::stdout().write_all(out.as_bytes());
    ExitCode::SUCCESS
}

#[derive(Debug)]
enum Failure {
    /// The flags cannot work (exit 2).
    Usage(String),
    /// Nothing could be read (exit 1).
    Source(String),
}

async fn run(args: &Args) -> Result<Report, Failure> {
    let filter = Filter {
        direction: args.direction.clone(),
        route: args.route.clone(),
        parent: args.parent.clone(),
    };
    if let Some(route) = &args.route
        && route
            .split_once('/')
            .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
    {
        return Err(Failure::Usage(format!(
            "--route {route:?}: expected NAMESPACE/NAME"
        )));
    }
    // Not clap's `requires`: a flag that is off still counts as present to it.
    if (args.namespace.is_some() || args.selector.is_some()) && !args.source.kubernetes {
        return Err(Failure::Usage(
            "--namespace and --selector choose pods for --kubernetes".into(),
        ));
    }
    let http = scrape::http_client();
    if let Some(url) = &args.source.prometheus {
        let window = args.window.unwrap_or(DEFAULT_PROMETHEUS_WINDOW);
        if window.is_zero() {
            return Err(Failure::Usage(
                "--prometheus needs a window over which to take rates; --window 0 is for scraped sources".into(),
            ));
        }
        if !url.starts_with("http://") {
            return Err(Failure::Usage(format!(
                "--prometheus {url:?}: expected an http:// URL (TLS is not supported: reach the server through kubectl port-forward to its plain HTTP port)"
            )));
        }
        let rows = prometheus::stat(&http, url, &filter, window, args.timeout)
            .await
            .map_err(|e| Failure::Source(format!("{url}: {e}")))?;
        return Ok(Report {
            direction: args.direction.clone(),
            window_seconds: Some(window.as_secs_f64()),
            rows,
        });
    }
    let sidecars = if args.source.kubernetes {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| Failure::Source(format!("cannot reach the Kubernetes API server: {e}")))?;
        let pods =
            scrape::meshed_pods(&client, args.namespace.as_deref(), args.selector.as_deref())
                .await
                .map_err(|e| Failure::Source(format!("cannot list pods: {e}")))?;
        if pods.is_empty() {
            return Err(Failure::Source(
                "no running meshed pods (with the trellis.dev/proxy-version annotation) found"
                    .into(),
            ));
        }
        pods
    } else {
        args.source
            .admin
            .iter()
            .map(|a| Sidecar::admin(&http, a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Failure::Usage)?
    };
    let window = args.window.unwrap_or(DEFAULT_WINDOW);
    let (tallies, read) = scrape_window(&sidecars, &filter, window, args.timeout).await;
    if read == 0 {
        return Err(Failure::Source(format!(
            "none of the {} sidecars could be read",
            sidecars.len()
        )));
    }
    Ok(Report {
        direction: args.direction.clone(),
        window_seconds: (!window.is_zero()).then_some(window.as_secs_f64()),
        rows: compute::rows(&tallies),
    })
}

/// Scrapes every sidecar (twice, `window` apart, unless it is zero) and sums what they
/// counted; a sidecar that cannot be read or parsed is reported on stderr and left out. Also
/// returns how many sidecars were read.
async fn scrape_window(
    sidecars: &[Sidecar],
    filter: &Filter,
    window: Duration,
    within: Duration,
) -> (BTreeMap<RowKey, Tally>, usize) {
    let first = scrape::scrape_all(sidecars, within).await;
    let second = if window.is_zero() {
        None
    } else {
        tokio::time::sleep(window).await;
        Some(scrape::scrape_all(sidecars, within).await)
    };
    let mut tallies = BTreeMap::new();
    let mut read = 0;
    for (i, sidecar) in sidecars.iter().enumerate() {
        let counters = |s: &scrape::Scrape| -> Result<compute::Counters, String> {
            let text = s.text.as_ref().map_err(|e| e.to_string())?;
            let samples = text::parse(text).map_err(|e| format!("unreadable metrics: {e}"))?;
            Ok(compute::counters(&samples, filter))
        };
        let result = match &second {
            None => counters(&first[i]).map(|c| (c, None)),
            Some(second) => counters(&first[i]).and_then(|before| {
                let after = counters(&second[i])?;
                let seconds = second[i].at.duration_since(first[i].at).as_secs_f64();
                Ok((compute::delta(&before, &after), Some(seconds)))
            }),
        };
        match result {
            Ok((counters, seconds)) => {
                compute::tally(&mut tallies, &counters, seconds);
                read += 1;
            }
            Err(e) => eprintln!("warning: sidecar {}: {e}", sidecar.name),
        }
    }
    (tallies, read)
}

/// The rows as an aligned table; empty labels show as `-`.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "PARENT", "ROUTE", "RULE", "BACKEND", "REQUESTS", "SUCCESS", "RPS", "P50", "P95", "P99",
    ];
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let mut lines: Vec<[String; 10]> = vec![header.map(String::from)];
    for r in rows {
        lines.push([
            dash(&r.key.parent),
            dash(&r.key.route),
            dash(&r.key.rule),
            dash(&r.key.backend),
            format_count(r.requests),
            r.success_rate
                .map_or("-".into(), |s| format!("{:.2}%", 100.0 * s)),
            r.requests_per_second
                .map_or("-".into(), |s| format!("{s:.1}")),
            format_latency(r.p50_seconds),
            format_latency(r.p95_seconds),
            format_latency(r.p99_seconds),
        ]);
    }
    let mut widths = [0; 10];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let mut cells = Vec::new();
        for (i, cell) in line.iter().enumerate() {
            // Names to the left, numbers to the right.
            if i < 4 {
                cells.push(format!("{cell:<w$}", w = widths[i]));
            } else {
                cells.push(format!("{cell:>w$}", w = widths[i]));
            }
        }
        out += cells.join("  ").trim_end();
        out.push('\n');
    }
    out
}

/// A request count: whole for scrapes, one decimal for Prometheus' extrapolated increases.
fn format_count(n: f64) -> String {
    if n.fract() == 0.0 {
        format!("{n:.0}")
    } else {
        format!("{n:.1}")
    }
}

/// A latency in the unit that reads best.
pub fn format_latency(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 0.01 => format!("{:.2}ms", s * 1000.0),
        Some(s) if s < 1.0 => format!("{:.0}ms", s * 1000.0),
        Some(s) => format!("{s:.2}s"),
    }
}
