//! `trellis-injector inject -f FILE`: prints a manifest with the sidecar injected, with the
//! webhook's own code, for clusters without the webhook, GitOps repositories and reviews.
//!
//! ```console
//! $ trellis-injector inject -f deploy.yaml --trust-anchors-file ca.pem | kubectl apply -f -
//! ```

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::Value;

use crate::config::{InjectionArgs, Settings};
use crate::patch::{self, Denied, Skip};

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Manifest to inject (YAML or JSON, several documents allowed); `-` reads standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,

    #[command(flatten)]
    pub injection: InjectionArgs,
}

/// Exit codes: everything printed, some object refused (nothing printed), input or settings
/// unusable.
pub const OK: u8 = 0;
pub const REFUSED: u8 = 1;
pub const UNUSABLE: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("cannot read the manifest: {0}")]
    Yaml(String),
    #[error("{object}: {denied}")]
    Denied { object: String, denied: Denied },
    #[error("cannot print the manifest: {0}")]
    Output(String),
}

/// What happened to one object, for the summary on standard error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `Deployment shop/web`.
    pub object: String,
    /// `injected`, `skipped: <why>` or `unchanged: <kind> has no pod template`.
    pub result: String,
}

pub fn main(args: Args) -> ExitCode {
    let settings = match args.injection.validate() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(UNUSABLE);
        }
    };
    let input = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map(|_| text)
    } else {
        std::fs::read_to_string(&args.file)
    };
    let input = match input {
        Ok(input) => input,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.file.display());
            return ExitCode::from(UNUSABLE);
        }
    };
    match inject_manifest(&input, &settings) {
        Ok((output, reports)) => {
            print!("{output}");
            for report in reports {
                eprintln!("{}: {}", report.object, report.result);
            }
            ExitCode::from(OK)
        }
        Err(e @ InjectError::Denied { .. }) => {
            eprintln!("error: {e}");
            ExitCode::from(REFUSED)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(UNUSABLE)
        }
    }
}

/// Injects every document of a manifest and renders the result as YAML documents.
pub fn inject_manifest(
    input: &str,
    settings: &Settings,
) -> Result<(String, Vec<Report>), InjectError> {
    let mut documents: Vec<Value> =
        serde_saphyr::from_multiple(input).map_err(|e| InjectError::Yaml(e.to_string()))?;
    documents.retain(|d| !d.is_null());
    let mut reports = Vec::new();
    for document in &mut documents {
        inject_object(document, settings, &mut reports)?;
    }
    let mut output = serde_saphyr::to_string_multiple(&documents)
        .map_err(|e| InjectError::Output(e.to_string()))?;
    if !output.is_empty() && !output.ends_with('\n') {
        output.push('\n');
    }
    Ok((output, reports))
}

/// Where a kind keeps its pod template.
fn template_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

/// Injects one object in place; a `List` (what `kubectl get -o yaml` prints) item by item.
fn inject_object(
    object: &mut Value,
    settings: &Settings,
    reports: &mut Vec<Report>,
) -> Result<(), InjectError> {
    let kind = str_at(object, "/kind").unwrap_or_default().to_string();
    let namespace = str_at(object, "/metadata/namespace").map(str::to_string);
    let name = str_at(object, "/metadata/name")
        .or_else(|| str_at(object, "/metadata/generateName"))
        .unwrap_or("(unnamed)");
    let label = match &namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    };
    if kind == "List" {
        if let Some(items) = object.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_object(item, settings, reports)?;
            }
        }
        return Ok(());
    }
    let Some(path) = template_path(&kind) else {
        reports.push(Report {
            object: label,
            result: "unchanged (no pod template)".to_string(),
        });
        return Ok(());
    };
    let Some(template) = object.pointer_mut(path) else {
        return Err(InjectError::Denied {
            object: label,
            denied: Denied::NotAPod(format!("it has no {path}")),
        });
    };
    let result = match patch::inject(template, namespace.as_deref(), settings) {
        Ok(None) => "injected".to_string(),
        Ok(Some(skip @ Skip::AlreadyInjected)) => format!("unchanged ({skip})"),
        Ok(Some(skip)) => format!("skipped ({skip})"),
        Err(denied) => {
            return Err(InjectError::Denied {
                object: label,
                denied,
            });
        }
    };
    reports.push(Report {
        object: label,
        result,
    });
    Ok(())
}
