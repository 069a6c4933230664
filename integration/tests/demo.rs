//! The README's first command, end to end: the live demo runs, splits, mirrors and redirects,
//! with pods as network namespaces (as root) and on loopback addresses, and Ctrl-C leaves
//! nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use trellis_integration::{binary, netns};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mesh");

fn demo(args: &[&str]) -> String {
    succeeds(
        Command::new(binary("trellis-demo"))
            .args(args)
            .arg(EXAMPLES),
    )
}

/// Runs `cmd` to its end and returns its stdout; a failure shows both outputs.
fn succeeds(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn assert_story(stdout: &str) {
    let share = |pod: &str| -> usize {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(pod))
            .unwrap_or_else(|| panic!("no line for {pod}:\n{stdout}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    // 80/20 over 200 requests: the split holds per request, within a few.
    assert!((155..=165).contains(&share("catalog-v1-0")), "{stdout}");
    assert_eq!(share("catalog-v1-0") + share("catalog-v2-0"), 200);
    assert!(
        stdout.contains("mirror copies received by audit-0: 200"),
        "{stdout}"
    );
    assert!(stdout.contains("x-mesh-route: catalog-canary"), "{stdout}");
    assert!(
        stdout.contains("trellis-client-id: spiffe://cluster.local/ns/shop/sa/web"),
        "{stdout}"
    );
    assert!(
        stdout.contains("301 Moved Permanently Location: http://catalog/v1/items"),
        "{stdout}"
    );
    assert!(stdout.contains("answered by catalog-v2-0"), "{stdout}");
    assert!(
        stdout.contains(
            "(greeting); sent \"hello over the mesh\", echoed back \"hello over the mesh\""
        ),
        "{stdout}"
    );
    assert!(stdout.contains("  hello from catalog-v"), "{stdout}");
    assert!(
        stdout.contains("trellis_mirrors_total{result=\"sent\"} 200"),
        "{stdout}"
    );
    assert_stat_table(stdout);
}

/// The `trellis-controller stat` table after the traffic: the example route's rules with the
/// requests the demo sent.
fn assert_stat_table(stdout: &str) {
    let (_, after) = stdout
        .split_once("== what the routes did: trellis-controller stat --admin ")
        .unwrap_or_else(|| panic!("no stat table:\n{stdout}"));
    let table: Vec<Vec<&str>> = after
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        table.first().map(|h| &h[..5]),
        Some(&["PARENT", "ROUTE", "RULE", "BACKEND", "REQUESTS"][..]),
        "{stdout}"
    );
    let requests = |rule: &str, backend: &str| -> u64 {
        table
            .iter()
            .find(|r| r[..4] == ["shop/catalog:80", "shop/catalog-canary", rule, backend])
            .unwrap_or_else(|| panic!("no row for rule {rule} to {backend}:\n{stdout}"))[4]
            .parse()
            .unwrap()
    };
    // The 80/20 split of rule 1 (plus the WebSocket, also rule 1), the pinned request of rule
    // 0 and the redirect of rule 2, answered by the sidecar itself (no backend).
    let split = requests("1", "shop/catalog-v1:80") + requests("1", "shop/catalog-v2:80");
    assert!((200..=201).contains(&split), "{stdout}");
    assert!(requests("1", "shop/catalog-v1:80") >= 150, "{stdout}");
    assert_eq!(requests("0", "shop/catalog-v2:80"), 1, "{stdout}");
    assert_eq!(requests("2", "-"), 1, "{stdout}");
    assert!(table.iter().skip(1).all(|r| r[5] == "100.00%"), "{stdout}");
}

#[test]
fn the_demo_runs_the_example_mesh_on_loopback() {
    let stdout = demo(&["--loopback"]);
    assert!(stdout.contains("pods on loopback addresses"), "{stdout}");
    assert_story(&stdout);
}

/// As a normal user the demo needs no flag: it sees it cannot make namespaces and runs on
/// loopback addresses. Run as root, the test runs it as `nobody` from a directory `nobody` can
/// read, with copies of the binaries and the examples.
#[test]
fn as_a_normal_user_the_demo_picks_loopback_by_itself() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let examples = dir.path().join("examples");
    std::fs::create_dir(&examples).unwrap();
    for file in std::fs::read_dir(EXAMPLES).unwrap() {
        let file = file.unwrap().path();
        std::fs::copy(&file, examples.join(file.file_name().unwrap())).unwrap();
    }
    let names = [
        "trellis-demo",
        "trellis-proxy",
        "trellis-controller",
        "trellis-identity",
        "trellis-echo",
        "trellis-curl",
    ];
    for name in names {
        let to = dir.path().join(name);
        let from = binary(name);
        std::fs::hard_link(&from, &to)
            .or_else(|_| std::fs::copy(&from, &to).map(drop))
            .unwrap();
    }
    let mut cmd = if root {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ]);
        cmd.arg(dir.path().join("trellis-demo"));
        cmd
    } else {
        Command::new(dir.path().join("trellis-demo"))
    };
    let stdout = succeeds(
        cmd.arg(&examples)
            .current_dir(dir.path())
            .env_remove("TRELLIS_TEST_PROXY_BINARY")
            .env("HOME", dir.path()),
    );
    assert!(
        stdout.contains("(pods on loopback addresses: pods are network namespaces with iptables rules: that needs root)"),
        "{stdout}"
    );
    assert_story(&stdout);
}

/// The namespaces `trellis-demo` (pid `pid`) made that still exist.
fn namespaces_of(pid: u32) -> Vec<String> {
    // Without `ip` there can be none.
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("trellis-pod-{pid}-")))
        .map(String::from)
        .collect()
}

#[test]
fn as_root_the_demo_runs_pods_in_network_namespaces() {
    if !netns::available() {
        return;
    }
    let stdout = demo(&[]);
    assert!(stdout.contains("pods are network namespaces"), "{stdout}");
    assert!(
        stdout.contains("Service catalog.shop cluster IP"),
        "{stdout}"
    );
    assert_story(&stdout);
}

/// Starts `trellis-demo --keep ARGS`, interrupts it once it runs, and checks that every
/// namespace, hosts file, temporary directory and process it made is gone.
fn ctrl_c_cleans_up(args: &[&str], namespaces: usize) {
    let mut child = Command::new(binary("trellis-demo"))
        .arg("--keep")
        .args(args)
        .arg(EXAMPLES)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let scratch = loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "demo ended:\n{seen}");
        seen += &line;
        if let Some(path) = line.trim().strip_prefix("edit ") {
            let routes = path.split_whitespace().next().unwrap();
            break Path::new(routes).parent().unwrap().to_path_buf();
        }
    };
    assert!(scratch.is_dir());
    assert_eq!(namespaces_of(pid).len(), namespaces, "{seen}");
    // Every process the demo started (`ip netns exec` execs its command).
    let mut started = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let children = std::fs::read_to_string(task.unwrap().path().join("children")).unwrap();
        started.extend(children.split_whitespace().map(String::from));
    }
    // Controller, identity and 4 sidecars; in namespaces also 3 apps.
    assert!(started.len() >= 6, "{started:?}");

    // The shell's own `kill`: no procps needed.
    let killed = Command::new("sh")
        .args(["-c", &format!("kill -INT {pid}")])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_eq!(namespaces_of(pid), Vec::<String>::new());
    assert!(!scratch.exists(), "{} left behind", scratch.display());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive: Vec<&String> = started
            .iter()
            .filter(|p| Path::new("/proc").join(p).exists())
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running: {alive:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let hosts_left = std::fs::read_dir("/etc/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("trellis-pod-{pid}-"))
                })
                .count()
        })
        .unwrap_or(0);
    assert_eq!(hosts_left, 0);
}

#[test]
fn ctrl_c_removes_every_namespace_process_and_directory_of_the_demo() {
    if !netns::available() {
        return;
    }
    ctrl_c_cleans_up(&[], 6); // node, control plane, 4 pods
}

#[test]
fn ctrl_c_stops_every_process_of_the_loopback_demo() {
    ctrl_c_cleans_up(&["--loopback"], 0);
}
