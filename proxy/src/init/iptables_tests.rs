use std::collections::BTreeMap;

use super::*;
use crate::init::parse::PortList;
use crate::init::rules::{Settings, plan};

/// An in-memory `nat` table that answers the subset of iptables the installer uses.
#[derive(Debug, Default)]
struct FakeTable {
    chains: BTreeMap<String, Vec<String>>,
    log: Vec<String>,
    refuse: bool,
}

impl FakeTable {
    fn new() -> Self {
        let mut t = FakeTable::default();
        for c in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
            t.chains.insert(c.to_string(), Vec::new());
        }
        t
    }

    fn answer(&mut self, args: &[String]) -> Outcome {
        let ok = |stdout: String| Outcome {
            success: true,
            stdout,
            stderr: String::new(),
        };
        let fail = |stderr: &str| Outcome {
            success: false,
            stdout: String::new(),
            stderr: stderr.to_string(),
        };
        assert_eq!(&args[..4], ["-w", "5", "-t", "nat"], "{args:?}");
        let op = args[4].as_str();
        if op == "-S" {
            let mut s = String::new();
            for (chain, rules) in &self.chains {
                if !["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"].contains(&chain.as_str()) {
                    s += &format!("-N {chain}\n");
                }
                for r in rules {
                    s += &format!("-A {chain} {r}\n");
                }
            }
            return ok(s);
        }
        let chain = args[5].clone();
        let spec = args[6..].join(" ");
        match (op, self.chains.get_mut(&chain)) {
            ("-N", Some(_)) => fail("iptables: Chain already exists."),
            ("-N", None) => {
                self.chains.insert(chain, Vec::new());
                ok(String::new())
            }
            ("-F", Some(rules)) => {
                rules.clear();
                ok(String::new())
            }
            ("-A", Some(rules)) => {
                rules.push(spec);
                ok(String::new())
            }
            ("-C", Some(rules)) if rules.contains(&spec) => ok(String::new()),
            ("-C", Some(_)) => {
                fail("iptables: Bad rule (does a matching rule exist in that chain?).")
            }
            _ => fail("iptables: No chain/target/match by that name."),
        }
    }
}

impl Runner for FakeTable {
    fn run(&mut self, _program: &Path, args: &[String]) -> Result<Outcome, InitError> {
        self.log.push(args.join(" "));
        if self.refuse {
            return Err(InitError::PermissionDenied {
                command: args.join(" "),
                stderr: "Permission denied (you must be root)".to_string(),
            });
        }
        Ok(self.answer(args))
    }
}

fn settings(skip_out: &[u16]) -> Settings {
    Settings {
        proxy_uid: 2102,
        inbound_port: 4143,
        outbound_port: 4140,
        admin_port: 4191,
        skip_inbound_ports: PortList::default(),
        skip_outbound_ports: PortList(
            skip_out
                .iter()
                .map(|p| crate::init::parse::PortRange {
                    first: *p,
                    last: *p,
                })
                .collect(),
        ),
        skip_outbound_cidrs: Default::default(),
    }
}

#[test]
fn install_twice_leaves_one_set_and_foreign_rules_alone() {
    let program = Path::new("iptables");
    let mut table = FakeTable::new();
    table
        .chains
        .get_mut("OUTPUT")
        .unwrap()
        .push("-p udp --dport 53 -j ACCEPT".into());
    table
        .chains
        .insert("OTHER".into(), vec!["-j RETURN".into()]);

    install(&plan(&settings(&[])), program, &mut table).unwrap();
    let first = installed_rules(program, &mut table).unwrap();
    // A second run with a changed setting replaces the chains' rules, not the jumps.
    install(&plan(&settings(&[9090])), program, &mut table).unwrap();
    install(&plan(&settings(&[9090])), program, &mut table).unwrap();
    let second = installed_rules(program, &mut table).unwrap();

    assert_eq!(first.matches("-j TRELLIS_INBOUND").count(), 2, "{first}");
    assert_eq!(second.matches("-A PREROUTING").count(), 1, "{second}");
    assert_eq!(
        second.matches("-A OUTPUT -p tcp -j TRELLIS_OUTPUT").count(),
        1
    );
    assert_eq!(second.matches("--dport 9090").count(), 1, "{second}");
    assert_eq!(
        second.lines().count(),
        first.lines().count() + 1,
        "{first}\n{second}"
    );
    assert_eq!(table.chains["OUTPUT"][0], "-p udp --dport 53 -j ACCEPT");
    assert_eq!(table.chains["OTHER"], ["-j RETURN"]);
    assert!(
        !first.contains("OTHER") && !first.contains("udp"),
        "{first}"
    );
}

#[test]
fn install_creates_inbound_chain_before_output_refers_to_it() {
    let mut table = FakeTable::new();
    install(&plan(&settings(&[])), Path::new("iptables"), &mut table).unwrap();
    let order: Vec<&str> = table.log.iter().map(String::as_str).take(2).collect();
    assert_eq!(
        order,
        [
            "-w 5 -t nat -N TRELLIS_INBOUND",
            "-w 5 -t nat -N TRELLIS_OUTPUT"
        ]
    );
}

#[test]
fn install_stops_at_the_first_refusal() {
    let mut table = FakeTable::new();
    table.refuse = true;
    let err = install(&plan(&settings(&[])), Path::new("iptables"), &mut table).unwrap_err();
    assert!(matches!(err, InitError::PermissionDenied { .. }), "{err}");
    assert_eq!(table.log.len(), 1);
}

#[test]
fn unexpected_failure_names_the_command() {
    #[derive(Debug)]
    struct Broken;
    impl Runner for Broken {
        fn run(&mut self, _: &Path, _: &[String]) -> Result<Outcome, InitError> {
            Ok(Outcome {
                success: false,
                stdout: String::new(),
                stderr: "iptables: No chain/target/match by that name.".into(),
            })
        }
    }
    let err = install(
        &plan(&settings(&[])),
        Path::new("/usr/sbin/iptables-nft"),
        &mut Broken,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("iptables-nft -w 5 -t nat -N TRELLIS_INBOUND") && err.contains("No chain"),
        "{err}"
    );
}

#[test]
fn backend_choice() {
    let p = |s: &str| Some(PathBuf::from(s));
    let both = Installed {
        nft: p("/usr/sbin/iptables-nft"),
        nft_save: p("/usr/sbin/iptables-nft-save"),
        legacy: p("/usr/sbin/iptables-legacy"),
        legacy_save: p("/usr/sbin/iptables-legacy-save"),
        plain: None,
    };
    let plain = |kind| Installed {
        plain: Some((PathBuf::from("/sbin/iptables"), kind)),
        ..Default::default()
    };
    let counts = |nft, legacy| RuleCounts { nft, legacy };
    type Want = Result<(Kind, &'static str), &'static str>;
    let cases: &[(Mode, &Installed, RuleCounts, Want)] = &[
        (
            Mode::Auto,
            &both,
            counts(0, 0),
            Ok((Kind::Nft, "/usr/sbin/iptables-nft")),
        ),
        (
            Mode::Auto,
            &both,
            counts(3, 3),
            Ok((Kind::Nft, "/usr/sbin/iptables-nft")),
        ),
        (
            Mode::Auto,
            &both,
            counts(0, 12),
            Ok((Kind::Legacy, "/usr/sbin/iptables-legacy")),
        ),
        (
            Mode::Auto,
            &both,
            counts(12, 2),
            Ok((Kind::Nft, "/usr/sbin/iptables-nft")),
        ),
        (
            Mode::Legacy,
            &both,
            counts(9, 0),
            Ok((Kind::Legacy, "/usr/sbin/iptables-legacy")),
        ),
        (
            Mode::Nft,
            &both,
            counts(0, 9),
            Ok((Kind::Nft, "/usr/sbin/iptables-nft")),
        ),
        (
            Mode::Auto,
            &plain(Kind::Nft),
            counts(0, 9),
            Ok((Kind::Nft, "/sbin/iptables")),
        ),
        (
            Mode::Auto,
            &plain(Kind::Legacy),
            counts(9, 0),
            Ok((Kind::Legacy, "/sbin/iptables")),
        ),
        (
            Mode::Nft,
            &plain(Kind::Nft),
            counts(0, 0),
            Ok((Kind::Nft, "/sbin/iptables")),
        ),
        (
            Mode::Legacy,
            &plain(Kind::Nft),
            counts(0, 0),
            Err("iptables-legacy is not installed"),
        ),
        (
            Mode::Nft,
            &plain(Kind::Legacy),
            counts(0, 0),
            Err("iptables-nft is not installed"),
        ),
        (
            Mode::Auto,
            &Installed::default(),
            counts(0, 0),
            Err("iptables is not installed"),
        ),
    ];
    for (mode, installed, c, want) in cases {
        let got = choose(*mode, installed, || Ok(*c));
        match (got, want) {
            (Ok(b), Ok((kind, program))) => {
                assert_eq!(
                    (b.kind, b.program.as_path()),
                    (*kind, Path::new(program)),
                    "{mode:?} {c:?}"
                )
            }
            (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{e}"),
            (got, want) => panic!("{mode:?} {installed:?} {c:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn auto_reason_names_the_counts() {
    let installed = Installed {
        nft: Some("iptables-nft".into()),
        legacy: Some("iptables-legacy".into()),
        ..Default::default()
    };
    let b = choose(Mode::Auto, &installed, || {
        Ok(RuleCounts { nft: 1, legacy: 7 })
    })
    .unwrap();
    assert_eq!(
        b.reason,
        "auto: 1 rules in iptables-nft-save, 7 in iptables-legacy-save"
    );
    // Counting is skipped when the mode is explicit.
    let b = choose(Mode::Nft, &installed, || panic!("counted")).unwrap();
    assert_eq!(b.reason, "--iptables-mode nft");
}

#[test]
fn save_output_and_version_parsing() {
    let save = "# Generated by iptables-save v1.8.9\n*nat\n:PREROUTING ACCEPT [0:0]\n\
                -A PREROUTING -p tcp -j X\n-A X -j RETURN\nCOMMIT\n";
    assert_eq!(count_rules(save), 2);
    assert_eq!(count_rules("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"), 0);
    assert_eq!(kind_from_version("iptables v1.8.9 (nf_tables)"), Kind::Nft);
    assert_eq!(kind_from_version("iptables v1.8.9 (legacy)"), Kind::Legacy);
    assert_eq!(kind_from_version("iptables v1.6.1"), Kind::Legacy);
}

#[test]
fn permission_errors_are_recognised() {
    for (stderr, want) in [
        (
            "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)",
            true,
        ),
        (
            "Fatal: can't open lock file /run/xtables.lock: Permission denied",
            true,
        ),
        (
            "iptables v1.8.9 (legacy): can't initialize iptables table `nat': Operation not permitted",
            true,
        ),
        ("iptables: Chain already exists.", false),
        (
            "iptables: Bad rule (does a matching rule exist in that chain?).",
            false,
        ),
    ] {
        assert_eq!(is_permission_error(stderr), want, "{stderr}");
    }
}

#[test]
fn discover_finds_programs_on_path() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["iptables-nft", "iptables-nft-save", "iptables"] {
        std::fs::write(dir.path().join(name), "").unwrap();
    }
    #[derive(Debug)]
    struct Version;
    impl Runner for Version {
        fn run(&mut self, program: &Path, args: &[String]) -> Result<Outcome, InitError> {
            assert!(program.ends_with("iptables") && args == ["--version"]);
            Ok(Outcome {
                success: true,
                stdout: "iptables v1.8.9 (nf_tables)\n".into(),
                stderr: String::new(),
            })
        }
    }
    let found = discover(Some(dir.path().as_os_str().to_owned()), &mut Version).unwrap();
    assert_eq!(found.nft, Some(dir.path().join("iptables-nft")));
    assert_eq!(found.legacy, None);
    assert_eq!(found.plain, Some((dir.path().join("iptables"), Kind::Nft)));

    let empty = tempfile::tempdir().unwrap();
    let found = discover(Some(empty.path().as_os_str().to_owned()), &mut Version).unwrap();
    assert_eq!(found, Installed::default());
}
