//! The reference pages and the binaries agree on every flag: each flag a command's `--help`
//! lists (with its `TRELLIS_*` variable) is in a `| flag | env | …` table of the command's
//! section of its page, with the same variable, and each flag those tables document exists.
//!
//! Runs the real binaries (`cargo build --workspace --bins` first), with an empty environment
//! so that `--help` shows no value taken from the caller's variables.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use trellis_integration::binary;

/// One command and where its flags are documented: the page under `docs/reference/` and the
/// headings (without `#`s and backticks) of the sections whose tables list them. A section
/// includes its subsections.
struct Documented {
    command: &'static [&'static str],
    page: &'static str,
    sections: &'static [&'static str],
}

/// A flag as `--help` shows it.
#[derive(Debug)]
struct HelpFlag {
    env: Option<String>,
}

/// A row of a `| flag | env | …` table.
#[derive(Debug)]
struct Row {
    flag: String,
    env: Option<String>,
    section: String,
    line: usize,
}

/// The long flags of `binary <command> --help` and their variables (`--help` and `--version`
/// left out).
fn help_flags(bin: &str, command: &[&str]) -> BTreeMap<String, HelpFlag> {
    let out = Command::new(binary(bin))
        .args(command)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{bin} {} --help: {}",
        command.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut flags = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim_start();
        if trimmed.is_empty() {
            continue;
        }
        if indent == 0 {
            // A heading such as "Options:" or "Arguments:" ends the previous option.
            current = None;
            continue;
        }
        if indent <= 6 && trimmed.starts_with('-') {
            current = long_flag(trimmed.split("  ").next().unwrap_or_default());
            if let Some(flag) = &current {
                flags.insert(flag.clone(), HelpFlag { env: None });
            }
        }
        if let (Some(flag), Some(env)) = (&current, env_of(line)) {
            flags.get_mut(flag).unwrap().env = Some(env);
        }
    }
    flags.remove("help");
    flags.remove("version");
    flags
}

/// The first `--name` in `text`, without the dashes.
fn long_flag(text: &str) -> Option<String> {
    let start = text.find("--")? + 2;
    let name: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    name.starts_with(|c: char| c.is_ascii_alphanumeric())
        .then_some(name)
}

/// `NAME` from clap's `[env: NAME=…]`.
fn env_of(line: &str) -> Option<String> {
    let start = line.find("[env: ")? + "[env: ".len();
    let name: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

fn page_path(page: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/reference")
        .join(page)
}

/// Every row of every `| flag | env | …` table in the named sections of `page`; a section that
/// does not exist is an error.
fn documented_rows(page: &str, sections: &[&str]) -> Result<Vec<Row>, String> {
    let path = page_path(page);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut rows = Vec::new();
    let mut found = BTreeSet::new();
    // The section being read, with its heading level.
    let mut inside: Option<(String, usize)> = None;
    let mut in_code = false;
    let mut in_flag_table = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        if let Some(level) = heading_level(line) {
            let title = line[level..].trim().replace('`', "");
            if inside.as_ref().is_some_and(|(_, l)| level <= *l) {
                inside = None;
            }
            if inside.is_none() && sections.contains(&title.as_str()) {
                found.insert(title.clone());
                inside = Some((title, level));
            }
            in_flag_table = false;
            continue;
        }
        let Some((section, _)) = &inside else {
            continue;
        };
        if !line.starts_with('|') {
            in_flag_table = false;
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() >= 2 && cells[0] == "flag" && cells[1] == "env" {
            in_flag_table = true;
            continue;
        }
        if !in_flag_table || cells.len() < 2 {
            continue;
        }
        let Some(flag) = long_flag(cells[0]) else {
            continue;
        };
        let env = cells[1].trim_matches('`').trim();
        rows.push(Row {
            flag,
            env: (!env.is_empty()).then(|| env.to_string()),
            section: section.clone(),
            line: i + 1,
        });
    }
    let missing: Vec<&&str> = sections.iter().filter(|s| !found.contains(**s)).collect();
    if !missing.is_empty() {
        return Err(format!("docs/reference/{page}: no section {missing:?}"));
    }
    Ok(rows)
}

fn heading_level(line: &str) -> Option<usize> {
    let level = line.bytes().take_while(|b| *b == b'#').count();
    (level > 0 && line[level..].starts_with(' ')).then_some(level)
}

fn show(env: &Option<String>) -> &str {
    env.as_deref().unwrap_or("no variable")
}

/// Every disagreement between the commands of `bin` and their pages, one line each.
fn mismatches(bin: &str, commands: &[Documented]) -> Vec<String> {
    let mut problems = Vec::new();
    // Per (page, section): the flags of every command documented there.
    let mut offered: BTreeMap<(&str, String), BTreeMap<String, Option<String>>> = BTreeMap::new();
    let mut all_rows: BTreeMap<&str, Vec<Row>> = BTreeMap::new();
    for c in commands {
        let name = format!("{bin} {}", c.command.join(" "));
        let help = help_flags(bin, c.command);
        let rows = match documented_rows(c.page, c.sections) {
            Ok(rows) => rows,
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                Vec::new()
            }
        };
        for (flag, h) in &help {
            let documented: Vec<&Row> = rows.iter().filter(|r| &r.flag == flag).collect();
            if documented.is_empty() {
                problems.push(format!(
                    "{name}: --{flag} ({}) is not in a flag table of docs/reference/{} § {:?}",
                    show(&h.env),
                    c.page,
                    c.sections
                ));
            }
            for r in documented {
                if r.env != h.env {
                    problems.push(format!(
                        "{name}: docs/reference/{}:{} gives --{flag} {}, --help says {}",
                        c.page,
                        r.line,
                        show(&r.env),
                        show(&h.env)
                    ));
                }
            }
        }
        for section in c.sections {
            let flags = offered.entry((c.page, section.to_string())).or_default();
            flags.extend(help.iter().map(|(f, h)| (f.clone(), h.env.clone())));
        }
        all_rows.entry(c.page).or_default().extend(rows);
    }
    // A documented flag must exist in some command documented in its section.
    let mut reported = BTreeSet::new();
    for (page, rows) in &all_rows {
        for r in rows {
            let exists = offered
                .get(&(*page, r.section.clone()))
                .is_some_and(|flags| flags.contains_key(&r.flag));
            if !exists && reported.insert((*page, r.line)) {
                problems.push(format!(
                    "docs/reference/{page}:{} documents --{} ({}) in § {:?}, but no command \
                     documented there has it",
                    r.line,
                    r.flag,
                    show(&r.env),
                    r.section
                ));
            }
        }
    }
    problems
}

fn check(bin: &str, commands: &[Documented]) {
    let problems = mismatches(bin, commands);
    assert!(
        problems.is_empty(),
        "{} mismatch(es) between {bin} --help and its reference pages:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn the_parsers_read_clap_help_and_flag_tables() {
    assert_eq!(long_flag("  -o, --output <FORMAT>"), Some("output".into()));
    assert_eq!(
        long_flag("`--trust-anchors <PEM or FILE>`"),
        Some("trust-anchors".into())
    );
    assert_eq!(long_flag("-h"), None);
    assert_eq!(long_flag("---"), None);
    assert_eq!(
        env_of("      --a <A>  Text [env: TRELLIS_A=] [default: 1]"),
        Some("TRELLIS_A".into())
    );
    assert_eq!(env_of("[default: x]"), None);
    assert_eq!(heading_level("## serve"), Some(2));
    assert_eq!(heading_level("#!/bin/sh"), None);
    // The controller's page has sections for each subcommand; a wrong name is an error.
    assert!(documented_rows("controller.md", &["no such section"]).is_err());
    let rows = documented_rows("controller.md", &["check"]).unwrap();
    let flags: Vec<&str> = rows.iter().map(|r| r.flag.as_str()).collect();
    assert!(
        flags.contains(&"manifests") && flags.contains(&"output"),
        "{flags:?}"
    );
}

#[test]
fn controller_flags_match_the_reference() {
    check(
        "trellis-controller",
        &[
            Documented {
                command: &["serve"],
                page: "controller.md",
                sections: &["serve", "Kubernetes mode"],
            },
            Documented {
                command: &["check"],
                page: "controller.md",
                sections: &["check"],
            },
            Documented {
                command: &["explain"],
                page: "controller.md",
                sections: &["explain"],
            },
            Documented {
                command: &["stat"],
                page: "controller.md",
                sections: &["stat"],
            },
            Documented {
                command: &["doctor"],
                page: "doctor.md",
                sections: &["Flags"],
            },
        ],
    );
}

#[test]
fn proxy_flags_match_the_reference() {
    check(
        "trellis-proxy",
        &[
            Documented {
                command: &["run"],
                page: "proxy.md",
                sections: &["Settings"],
            },
            Documented {
                command: &["init"],
                page: "proxy-init.md",
                sections: &["Settings"],
            },
            Documented {
                command: &["await-ready"],
                page: "proxy.md",
                sections: &["await-ready"],
            },
            Documented {
                command: &["drain"],
                page: "proxy.md",
                sections: &["drain"],
            },
        ],
    );
}

#[test]
fn identity_flags_match_the_reference() {
    const ISSUER: &str = "Where the trust anchors and issuer come from";
    check(
        "trellis-identity",
        &[
            Documented {
                command: &["serve"],
                page: "identity.md",
                sections: &[ISSUER, "serve"],
            },
            Documented {
                command: &["bootstrap"],
                page: "identity.md",
                sections: &[ISSUER, "bootstrap"],
            },
        ],
    );
}

#[test]
fn injector_flags_match_the_reference() {
    check(
        "trellis-injector",
        &[
            Documented {
                command: &["serve"],
                page: "injector.md",
                sections: &["Settings", "serve"],
            },
            Documented {
                command: &["inject"],
                page: "injector.md",
                sections: &["Settings", "inject"],
            },
        ],
    );
}
