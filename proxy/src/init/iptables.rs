//! Running iptables: choosing the backend and applying each family's [`Table`]s with one
//! `iptables-restore --noflush` / `ip6tables-restore --noflush` process.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::InitError;
use super::restore;
use super::rules::{Family, Table};

/// Which iptables backend to program (`--iptables-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The backend that already holds rules in this namespace; nft when neither does.
    Auto,
    /// iptables over nf_tables (`iptables-nft`).
    Nft,
    /// The kernel's legacy x_tables (`iptables-legacy`).
    Legacy,
}

/// The two kernel interfaces iptables can drive. Rules installed through one are invisible to
/// the other's tools, so using the one the pod's node already uses keeps them in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nft,
    Legacy,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Nft => "nft",
            Kind::Legacy => "legacy",
        })
    }
}

/// Which iptables programs are installed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    pub nft: Option<PathBuf>,
    pub nft_save: Option<PathBuf>,
    pub legacy: Option<PathBuf>,
    pub legacy_save: Option<PathBuf>,
    /// Plain `iptables` and the backend its `--version` reports.
    pub plain: Option<(PathBuf, Kind)>,
}

/// The chosen program and why, for the message printed before installing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub kind: Kind,
    pub program: PathBuf,
    pub reason: String,
}

/// How many rules each backend's `-save` listed (auto mode only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleCounts {
    pub nft: usize,
    pub legacy: usize,
}

/// Picks the backend; `counts` is consulted only in auto mode when both variants exist.
pub fn choose(
    mode: Mode,
    installed: &Installed,
    counts: impl FnOnce() -> Result<RuleCounts, InitError>,
) -> Result<Backend, InitError> {
    let program = |kind: Kind| -> Option<PathBuf> {
        let variant = match kind {
            Kind::Nft => &installed.nft,
            Kind::Legacy => &installed.legacy,
        };
        variant.clone().or_else(|| match &installed.plain {
            Some((path, k)) if *k == kind => Some(path.clone()),
            _ => None,
        })
    };
    let wanted = match mode {
        Mode::Nft => Some(Kind::Nft),
        Mode::Legacy => Some(Kind::Legacy),
        Mode::Auto => None,
    };
    if let Some(kind) = wanted {
        return match program(kind) {
            Some(program) => Ok(Backend {
                kind,
                program,
                reason: format!("--iptables-mode {kind}"),
            }),
            None => Err(InitError::BackendMissing { kind }),
        };
    }
    match (program(Kind::Nft), program(Kind::Legacy)) {
        (None, None) => Err(InitError::IptablesMissing),
        (Some(program), None) => Ok(Backend {
            kind: Kind::Nft,
            program,
            reason: "auto: the only backend installed".to_string(),
        }),
        (None, Some(program)) => Ok(Backend {
            kind: Kind::Legacy,
            program,
            reason: "auto: the only backend installed".to_string(),
        }),
        (Some(nft), Some(legacy)) => {
            let c = counts()?;
            let (kind, program) = if c.legacy > c.nft {
                (Kind::Legacy, legacy)
            } else {
                (Kind::Nft, nft)
            };
            Ok(Backend {
                kind,
                program,
                reason: format!(
                    "auto: {} rules in iptables-nft-save, {} in iptables-legacy-save",
                    c.nft, c.legacy
                ),
            })
        }
    }
}

/// Counts the rules (`-A` lines) of a `-save` listing; table headers and comments do not
/// count, since merely listing a table creates it.
pub fn count_rules(save_output: &str) -> usize {
    save_output.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Reads the backend from `iptables --version`, e.g. `iptables v1.8.9 (nf_tables)`; versions
/// before 1.8 print no suffix and only had the legacy backend.
pub fn kind_from_version(version: &str) -> Kind {
    if version.contains("nf_tables") {
        Kind::Nft
    } else {
        Kind::Legacy
    }
}

/// Whether iptables' complaint means the process lacks root or NET_ADMIN/NET_RAW.
pub fn is_permission_error(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    [
        "permission denied",
        "you must be root",
        "operation not permitted",
    ]
    .iter()
    .any(|needle| s.contains(needle))
}

/// The outcome of one finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs programs; a trait so the install sequence can be tested without root.
pub trait Runner {
    /// Runs `program` with `args`, writing `input` to its standard input when given.
    fn run(
        &mut self,
        program: &Path,
        args: &[String],
        input: Option<&str>,
    ) -> Result<Outcome, InitError>;
}

/// Runs real processes.
#[derive(Debug, Default)]
pub struct System;

impl Runner for System {
    fn run(
        &mut self,
        program: &Path,
        args: &[String],
        input: Option<&str>,
    ) -> Result<Outcome, InitError> {
        let command = display_command(program, args);
        let spawn_error = |e: io::Error| {
            if e.kind() == io::ErrorKind::NotFound {
                InitError::IptablesMissing
            } else {
                InitError::Spawn {
                    command: command.clone(),
                    source: e,
                }
            }
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            // A program that exits early closes the pipe; its status and stderr say why.
            let _ = stdin.write_all(input.as_bytes());
        }
        let output = child.wait_with_output().map_err(spawn_error)?;
        let outcome = Outcome {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        };
        if !outcome.success && is_permission_error(&outcome.stderr) {
            return Err(InitError::PermissionDenied {
                command,
                stderr: outcome.stderr,
            });
        }
        Ok(outcome)
    }
}

/// The file name of a program, for messages.
pub fn program_name(program: &Path) -> String {
    program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned()
}

fn display_command(program: &Path, args: &[String]) -> String {
    let mut s = program_name(program);
    for arg in args {
        s.push(' ');
        s.push_str(arg);
    }
    s
}

/// Finds the installed iptables programs on `path` (the `PATH` value) and, when only plain
/// `iptables` exists, asks it which backend it drives.
pub fn discover(path: Option<OsString>, runner: &mut dyn Runner) -> Result<Installed, InitError> {
    let dirs = search_dirs(path);
    let find = |name: &str| find_on(&dirs, name);
    let mut installed = Installed {
        nft: find("iptables-nft"),
        nft_save: find("iptables-nft-save"),
        legacy: find("iptables-legacy"),
        legacy_save: find("iptables-legacy-save"),
        plain: None,
    };
    if (installed.nft.is_none() || installed.legacy.is_none())
        && let Some(plain) = find("iptables")
    {
        let out = runner.run(&plain, &["--version".to_string()], None)?;
        let kind = kind_from_version(&format!("{}{}", out.stdout, out.stderr));
        installed.plain = Some((plain, kind));
    }
    Ok(installed)
}

/// The directories of `path` (the `PATH` value).
pub fn search_dirs(path: Option<OsString>) -> Vec<PathBuf> {
    match path {
        Some(p) if !p.is_empty() => std::env::split_paths(&p).collect(),
        // A container started without PATH still has the usual places.
        _ => [
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ]
        .iter()
        .map(PathBuf::from)
        .collect(),
    }
}

fn find_on(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// The restore and save programs of one family for the chosen backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyTools {
    pub family: Family,
    pub restore: PathBuf,
    pub save: PathBuf,
}

/// Finds the family's `-restore` and `-save` programs of the backend `program` belongs to:
/// `iptables-nft` gives `ip6tables-nft-restore`, plain `iptables` gives `ip6tables-restore`.
/// Looks beside `program` first, then on `dirs`; `Err` names the first one missing.
pub fn family_tools(
    program: &Path,
    family: Family,
    dirs: &[PathBuf],
) -> Result<FamilyTools, String> {
    let name = program_name(program);
    let variant = name.strip_prefix("iptables").unwrap_or("");
    let find = |what: &str| -> Result<PathBuf, String> {
        let wanted = format!("{}{variant}-{what}", family.program());
        program
            .parent()
            .map(|dir| dir.join(&wanted))
            .filter(|p| p.is_file())
            .or_else(|| find_on(dirs, &wanted))
            .ok_or(wanted)
    };
    Ok(FamilyTools {
        family,
        restore: find("restore")?,
        save: find("save")?,
    })
}

/// Lists each variant's rules with its `-save` program (auto mode with both installed).
pub fn count_both(installed: &Installed, runner: &mut dyn Runner) -> Result<RuleCounts, InitError> {
    let mut count = |save: &Option<PathBuf>| -> Result<usize, InitError> {
        let Some(save) = save else { return Ok(0) };
        let out = runner.run(save, &[], None)?;
        // A kernel without one of the interfaces fails to list it: it holds no rules then.
        Ok(if out.success {
            count_rules(&out.stdout)
        } else {
            0
        })
    };
    Ok(RuleCounts {
        nft: count(&installed.nft_save)?,
        legacy: count(&installed.legacy_save)?,
    })
}

/// The current listing of `tables` (the part [`restore::input`] compares the jumps with).
fn listing(
    tables: &[Table],
    tools: &FamilyTools,
    runner: &mut dyn Runner,
) -> Result<String, InitError> {
    let mut save = String::new();
    for table in tables {
        let args = ["-t".to_string(), table.name.to_string()];
        let out = runner.run(&tools.save, &args, None)?;
        // A table the kernel cannot list holds nothing yet; if it cannot be written either,
        // the restore below fails and says why.
        if out.success {
            save.push_str(&out.stdout);
        }
    }
    Ok(save)
}

/// Applies `tables` of one family in one `-restore --noflush` run: owned chains created or
/// flushed and refilled, each jump from a built-in chain left exactly once, everything else in
/// the tables untouched. Any number of runs leave one set of rules.
pub fn apply(
    tables: &[Table],
    tools: &FamilyTools,
    runner: &mut dyn Runner,
) -> Result<(), InitError> {
    if tables.is_empty() {
        return Ok(());
    }
    let input = restore::input(tables, &listing(tables, tools, runner)?);
    // Wait for the x_tables lock instead of failing when another writer holds it.
    let args: Vec<String> = ["-w", "5", "--noflush"]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    let out = runner.run(&tools.restore, &args, Some(&input))?;
    if out.success {
        return Ok(());
    }
    let numbered: String = input
        .lines()
        .enumerate()
        .map(|(i, l)| format!("{:>3} {l}\n", i + 1))
        .collect();
    Err(InitError::Iptables {
        command: display_command(&tools.restore, &args),
        stderr: format!("{}\nits input was:\n{numbered}", out.stderr),
    })
}

/// The rules of `tables` that mention Trellis' chains, as the family's save program lists
/// them, each table under its `*name` line.
pub fn installed_rules(
    tables: &[Table],
    tools: &FamilyTools,
    runner: &mut dyn Runner,
) -> Result<String, InitError> {
    let mut text = String::new();
    for table in tables {
        let args = ["-t".to_string(), table.name.to_string()];
        let out = runner.run(&tools.save, &args, None)?;
        if !out.success {
            return Err(InitError::Iptables {
                command: display_command(&tools.save, &args),
                stderr: out.stderr,
            });
        }
        text.push_str(&format!("*{}\n", table.name));
        for line in out.stdout.lines() {
            if line.starts_with("-A ") && line.contains("TRELLIS_") {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    Ok(text)
}

#[cfg(test)]
#[path = "iptables_tests.rs"]
mod tests;
