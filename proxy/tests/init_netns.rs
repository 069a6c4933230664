//! `trellis-proxy init` in real dual-stack network namespaces, proven with real TCP
//! connections over IPv4 and IPv6.
//!
//! Needs root, `ip` (Debian: iproute2) and iptables-nft/iptables-legacy and their ip6tables
//! counterparts (Debian: iptables);
//! without them the tests fail and say what is missing. `TRELLIS_SKIP_NETNS_TESTS=1` skips
//! them knowingly (for a developer machine without root; CI never sets it).
//!
//! Listeners and clients must live inside the namespaces, so the test re-runs its own
//! executable there (`ip netns exec NS <this test binary> netns_helper_process`) with
//! `TRELLIS_NETNS_HELPER` saying which part to play; without that variable the helper test
//! does nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");
const HELPER: &str = "TRELLIS_NETNS_HELPER";
const HELPER_PORTS: &str = "TRELLIS_NETNS_HELPER_PORTS";
const HELPER_ADDR: &str = "TRELLIS_NETNS_HELPER_ADDR";
const HELPER_TOKEN: &str = "TRELLIS_NETNS_HELPER_TOKEN";
const HELPER_UID: &str = "TRELLIS_NETNS_HELPER_UID";
const HELPER_SRC: &str = "TRELLIS_NETNS_HELPER_SRC";
const HELPER_ARGS: [&str; 4] = [
    "netns_helper_process",
    "--exact",
    "--nocapture",
    "--test-threads=1",
];
const PROXY_UID: u32 = 2102;
const APP_UID: u32 = 1000;
const STEP: Duration = Duration::from_secs(3);

/// Whether to run; panics with the missing piece unless skipping was asked for.
fn netns_available() -> bool {
    if std::env::var("TRELLIS_SKIP_NETNS_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: TRELLIS_SKIP_NETNS_TESTS=1");
        return false;
    }
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    assert_eq!(
        uid,
        Some(0),
        "these tests create network namespaces and run iptables, so they need root; \
         run them as root or set TRELLIS_SKIP_NETNS_TESTS=1 to skip them knowingly"
    );
    for (tool, package) in [
        ("ip", "iproute2"),
        ("iptables-nft", "iptables"),
        ("iptables-legacy", "iptables"),
        ("ip6tables-nft-save", "iptables"),
    ] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|dir| dir.join(tool).is_file());
        assert!(
            found,
            "`{tool}` is not on PATH: apt-get install -y {package} \
             (or set TRELLIS_SKIP_NETNS_TESTS=1 to skip these tests knowingly)"
        );
    }
    true
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace that is deleted when dropped, even when the test panics.
#[derive(Debug)]
struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str) -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("trellis-{role}-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command that runs this test binary inside the namespace as a helper.
    fn helper(&self, role: &str) -> Command {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(exe)
            .args(HELPER_ARGS)
            .env(HELPER, role);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A pod namespace (10.211.0.1, fd11::1) linked by a veth pair to a peer namespace
/// (10.211.0.2 and 10.211.0.130, fd11::2 and fd11::82): rarely used ranges that exist only
/// inside these namespaces. IPv6 addresses skip duplicate address detection, so they are
/// usable at once.
fn pod_and_peer() -> (Netns, Netns) {
    let pod = Netns::new("pod");
    let peer = Netns::new("peer");
    pod.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &peer.name,
    ]);
    pod.ip(&["addr", "add", "10.211.0.1/24", "dev", "veth0"]);
    pod.ip(&["link", "set", "veth0", "up"]);
    peer.ip(&["addr", "add", "10.211.0.2/24", "dev", "veth1"]);
    peer.ip(&["addr", "add", "10.211.0.130/24", "dev", "veth1"]);
    pod.ip(&["addr", "add", "fd11::1/64", "dev", "veth0", "nodad"]);
    peer.ip(&["addr", "add", "fd11::2/64", "dev", "veth1", "nodad"]);
    peer.ip(&["addr", "add", "fd11::82/64", "dev", "veth1", "nodad"]);
    peer.ip(&["link", "set", "veth1", "up"]);
    (pod, peer)
}

/// What a listener saw: the address it accepted on and the pre-NAT destination.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    local: SocketAddr,
    orig: Option<SocketAddr>,
}

/// Listeners inside a namespace, reporting every connection by the token the client sent.
#[derive(Debug)]
struct Server {
    child: Child,
    lines: Receiver<String>,
    seen: HashMap<String, Seen>,
}

impl Server {
    fn start(ns: &Netns, ports: &[u16]) -> Server {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let mut child = ns
            .helper("serve")
            .env(HELPER_PORTS, ports.join(","))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest may print `test netns_helper_process ... ` before the first line.
                if let Some(at) = line.find("HELPER ") {
                    let _ = tx.send(line[at + "HELPER ".len()..].to_string());
                }
            }
        });
        let server = Server {
            child,
            lines,
            seen: HashMap::new(),
        };
        let ready = server.lines.recv_timeout(Duration::from_secs(10));
        assert_eq!(
            ready.as_deref(),
            Ok("ready"),
            "listeners in {} did not start",
            ns.name
        );
        server
    }

    /// Waits for the report of `token`, or None when this server never saw it.
    fn take(&mut self, token: &str, wait: Duration) -> Option<Seen> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(seen) = self.seen.remove(token) {
                return Some(seen);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            let mut words = line.split(' ');
            let (Some("got"), Some(tok), Some(local), Some(orig)) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                panic!("unexpected helper line {line:?}");
            };
            self.seen.insert(
                tok.to_string(),
                Seen {
                    local: local.parse().unwrap(),
                    orig: orig.parse().ok(),
                },
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects from `ns` as `uid` to `addr` (from source address `src` unless empty), sending
/// `token`; the client's output when it failed.
fn try_connect(ns: &Netns, uid: u32, src: &str, addr: &str, token: &str) -> Result<(), String> {
    let out = ns
        .helper("connect")
        .env(HELPER_ADDR, addr)
        .env(HELPER_TOKEN, token)
        .env(HELPER_UID, uid.to_string())
        .env(HELPER_SRC, src)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Like [`try_connect`] from any source; panics when the client fails.
fn connect(ns: &Netns, uid: u32, addr: &str, token: &str) {
    if let Err(out) = try_connect(ns, uid, "", addr, token) {
        panic!(
            "client in {} as uid {uid} to {addr} failed:\n{out}",
            ns.name
        );
    }
}

/// One connection and where it must land: what, from which namespace, as which uid, from
/// which source address ("" for the kernel's choice), to where; the listener it must land on
/// (`pod:PORT`, or `pod:ADDR:PORT` to check the address too); and the destination
/// SO_ORIGINAL_DST must give back ("" where the peer has no conntrack).
type Case<'a> = (&'a str, &'a Netns, u32, &'a str, &'a str, &'a str, &'a str);

/// Makes each connection of `cases` and checks where it landed.
fn check(in_pod: &mut Server, in_peer: &mut Server, cases: &[Case<'_>]) {
    for (i, (what, from, uid, src, to, lands, orig)) in cases.iter().enumerate() {
        let token = format!("t{i}");
        if let Err(out) = try_connect(from, *uid, src, to, &token) {
            panic!("{what}: client as uid {uid} to {to} failed:\n{out}");
        }
        let (server, want) = lands.split_once(':').unwrap();
        let (here, there) = if server == "pod" {
            (&mut *in_pod, &mut *in_peer)
        } else {
            (&mut *in_peer, &mut *in_pod)
        };
        let seen = here
            .take(&token, STEP)
            .unwrap_or_else(|| panic!("{what}: {to} did not reach the {server} namespace"));
        match want.parse::<SocketAddr>() {
            Ok(addr) => assert_eq!(seen.local, addr, "{what}: {to} landed on {seen:?}"),
            Err(_) => assert_eq!(
                seen.local.port().to_string(),
                want,
                "{what}: {to} landed on {seen:?}"
            ),
        }
        if !orig.is_empty() {
            assert_eq!(
                seen.orig,
                Some(orig.parse().unwrap()),
                "{what}: original destination"
            );
        }
        assert_eq!(there.take(&token, Duration::ZERO), None, "{what}");
    }
}

/// Connections that must fail (dropped): the client times out and no listener sees them.
fn check_dropped(in_pod: &mut Server, in_peer: &mut Server, cases: &[(&str, &Netns, u32, &str)]) {
    for (i, (what, from, uid, to)) in cases.iter().enumerate() {
        let token = format!("dropped{i}");
        let got = try_connect(from, *uid, "", to, &token);
        assert!(got.is_err(), "{what}: {to} was not dropped");
        assert_eq!(in_pod.take(&token, Duration::ZERO), None, "{what}");
        assert_eq!(in_peer.take(&token, Duration::ZERO), None, "{what}");
    }
}

/// The lines of a `-save` listing equal to `line`, counted.
fn count_lines(save: &str, line: &str) -> usize {
    save.lines().filter(|l| *l == line).count()
}

/// Runs `trellis-proxy init` in `ns` and returns its stdout.
fn init(ns: &Netns, args: &[&str]) -> String {
    let mut all = vec!["init"];
    all.extend_from_slice(args);
    text(&ns.exec(BIN, &all))
}

/// Runs `program -t nat RULE` in `ns`, the rule written as one string.
fn nat(ns: &Netns, program: &str, rule: &str) {
    let mut args = vec!["-t", "nat"];
    args.extend(rule.split_whitespace());
    ns.exec(program, &args);
}

/// The rules of a `-save` listing, without counters and comments, for comparing runs.
fn rules_of(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.starts_with('-') || l.starts_with(':'))
        .map(|l| l.split(" [").next().unwrap_or(l).to_string())
        .collect()
}

#[test]
fn init_redirects_real_connections() {
    if !netns_available() {
        return;
    }
    let (pod, peer) = pod_and_peer();
    // Rules of others, which must survive both runs untouched.
    nat(
        &pod,
        "iptables-nft",
        "-A OUTPUT -p udp --dport 53 -j RETURN",
    );
    nat(&pod, "iptables-nft", "-N KEEP_ME");
    nat(&pod, "iptables-nft", "-A KEEP_ME -j RETURN");

    let args = [
        "--skip-inbound-ports",
        "7000-7001",
        "--skip-outbound-ports",
        " 9090 ",
        "--skip-outbound-cidrs",
        "10.211.0.128/25",
    ];
    let first = init(&pod, &args);
    assert!(first.contains("using iptables-nft"), "{first}");
    let save_first = text(&pod.exec("iptables-nft-save", &["-t", "nat"]));
    let second = init(&pod, &args);
    let save = text(&pod.exec("iptables-nft-save", &["-t", "nat"]));
    assert_eq!(
        rules_of(&save_first),
        rules_of(&save),
        "a second run changed the rules"
    );
    assert_eq!(
        first.lines().skip(1).collect::<Vec<_>>(),
        second.lines().skip(1).collect::<Vec<_>>()
    );
    for (line, count) in [
        ("-A PREROUTING -p tcp -j TRELLIS_INBOUND", 1),
        ("-A OUTPUT -p tcp -j TRELLIS_OUTPUT", 1),
        ("-A OUTPUT -p udp -m udp --dport 53 -j RETURN", 1),
        (":TRELLIS_INBOUND", 1),
        ("-A TRELLIS_INBOUND -p tcp -j REDIRECT --to-ports 4143", 1),
        ("-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 4140", 1),
        ("-A KEEP_ME -j RETURN", 1),
    ] {
        assert_eq!(save.matches(line).count(), count, "{line:?} in\n{save}");
    }
    let legacy = Command::new("ip")
        .args(["netns", "exec", &pod.name, "iptables-legacy-save"])
        .output()
        .unwrap();
    assert!(
        !text(&legacy).contains("TRELLIS"),
        "rules went to both backends"
    );

    let mut in_pod = Server::start(&pod, &[4140, 4143, 4191, 7001, 8080]);
    let mut in_peer = Server::start(&peer, &[80, 9090]);
    #[rustfmt::skip]
    let cases: [Case<'_>; 13] = [
        ("app outbound", &pod, APP_UID, "", "10.211.0.2:80", "pod:4140", "10.211.0.2:80"),
        ("root outbound", &pod, 0, "", "10.211.0.2:80", "pod:4140", "10.211.0.2:80"),
        ("proxy outbound bypasses", &pod, PROXY_UID, "", "10.211.0.2:80", "peer:80", ""),
        ("skipped outbound port", &pod, APP_UID, "", "10.211.0.2:9090", "peer:9090", ""),
        ("skipped outbound cidr", &pod, APP_UID, "", "10.211.0.130:80", "peer:80", ""),
        ("app to loopback", &pod, APP_UID, "", "127.0.0.1:8080", "pod:8080", "127.0.0.1:8080"),
        ("app to own pod ip", &pod, APP_UID, "", "10.211.0.1:8080", "pod:8080", "10.211.0.1:8080"),
        ("proxy to app on loopback", &pod, PROXY_UID, "", "127.0.0.1:8080", "pod:8080", "127.0.0.1:8080"),
        ("proxy to own pod ip", &pod, PROXY_UID, "", "10.211.0.1:8080", "pod:4143", "10.211.0.1:8080"),
        ("inbound", &peer, 0, "", "10.211.0.1:8080", "pod:4143", "10.211.0.1:8080"),
        ("inbound to the inbound port", &peer, 0, "", "10.211.0.1:4143", "pod:4143", "10.211.0.1:4143"),
        ("inbound admin port", &peer, 0, "", "10.211.0.1:4191", "pod:4191", "10.211.0.1:4191"),
        ("skipped inbound port", &peer, 0, "", "10.211.0.1:7001", "pod:7001", "10.211.0.1:7001"),
    ];
    check(&mut in_pod, &mut in_peer, &cases);
}

#[test]
fn init_redirects_ipv6_connections() {
    if !netns_available() {
        return;
    }
    let (pod, peer) = pod_and_peer();
    let out = init(
        &pod,
        &[
            "--skip-inbound-ports",
            "7001",
            "--skip-outbound-ports",
            "9090",
            "--skip-outbound-cidrs",
            "10.211.0.128/25,fd11::80/121",
        ],
    );
    assert!(out.contains("# IPv6: redirected like IPv4"), "{out}");
    let save = text(&pod.exec("ip6tables-nft-save", &["-t", "nat"]));
    assert_eq!(
        count_lines(&save, "-A TRELLIS_OUTPUT -d fd11::80/121 -j RETURN"),
        1,
        "{save}"
    );
    assert!(!save.contains("10.211.0.128"), "{save}");

    let mut in_pod = Server::start(&pod, &[4140, 4143, 4191, 7001, 8080]);
    let mut in_peer = Server::start(&peer, &[80, 9090]);
    #[rustfmt::skip]
    let cases: [Case<'_>; 11] = [
        ("inbound", &peer, 0, "", "[fd11::1]:8080", "pod:[fd11::1]:4143", "[fd11::1]:8080"),
        ("inbound admin port", &peer, 0, "", "[fd11::1]:4191", "pod:[fd11::1]:4191", "[fd11::1]:4191"),
        ("skipped inbound port", &peer, 0, "", "[fd11::1]:7001", "pod:[fd11::1]:7001", ""),
        ("app outbound", &pod, APP_UID, "", "[fd11::2]:80", "pod:[::1]:4140", "[fd11::2]:80"),
        ("root outbound", &pod, 0, "", "[fd11::2]:80", "pod:[::1]:4140", "[fd11::2]:80"),
        ("proxy outbound bypasses", &pod, PROXY_UID, "", "[fd11::2]:80", "peer:[fd11::2]:80", ""),
        ("skipped outbound port", &pod, APP_UID, "", "[fd11::2]:9090", "peer:9090", ""),
        ("skipped outbound cidr", &pod, APP_UID, "", "[fd11::82]:80", "peer:[fd11::82]:80", ""),
        ("app to loopback", &pod, APP_UID, "", "[::1]:8080", "pod:[::1]:8080", ""),
        ("app to own pod ip", &pod, APP_UID, "", "[fd11::1]:8080", "pod:[fd11::1]:8080", ""),
        ("proxy to own pod ip", &pod, PROXY_UID, "", "[fd11::1]:8080", "pod:4143", "[fd11::1]:8080"),
    ];
    check(&mut in_pod, &mut in_peer, &cases);
}

#[test]
fn init_delivery_source_is_not_redirected() {
    if !netns_available() {
        return;
    }
    let (pod, peer) = pod_and_peer();
    let out = init(&pod, &[]);
    assert!(out.contains("::6/128 is on lo"), "{out}");
    // The address is there once, whatever the number of runs.
    init(&pod, &[]);
    let addrs = text(&pod.exec("ip", &["-6", "addr", "show", "dev", "lo"]));
    assert_eq!(addrs.matches("inet6 ::6/128").count(), 1, "{addrs}");

    let mut in_pod = Server::start(&pod, &[4143, 8080]);
    let mut in_peer = Server::start(&peer, &[80]);
    // The inbound proxy delivers to the app at the pod IP from 127.0.0.6 / ::6: that reaches
    // the app; the proxy's other connections to its pod IP still go to the inbound port.
    #[rustfmt::skip]
    let cases: [Case<'_>; 4] = [
        ("delivery from 127.0.0.6", &pod, PROXY_UID, "127.0.0.6", "10.211.0.1:8080", "pod:10.211.0.1:8080", ""),
        ("proxy to own pod ip", &pod, PROXY_UID, "", "10.211.0.1:8080", "pod:4143", "10.211.0.1:8080"),
        ("delivery from ::6", &pod, PROXY_UID, "::6", "[fd11::1]:8080", "pod:[fd11::1]:8080", ""),
        ("proxy to own pod ip over IPv6", &pod, PROXY_UID, "", "[fd11::1]:8080", "pod:4143", "[fd11::1]:8080"),
    ];
    check(&mut in_pod, &mut in_peer, &cases);
}

#[test]
fn init_rerun_keeps_one_jump_per_builtin_chain() {
    if !netns_available() {
        return;
    }
    let (pod, _peer) = pod_and_peer();
    let first = init(&pod, &[]);
    let saves = || {
        (
            text(&pod.exec("iptables-nft-save", &["-t", "nat"])),
            text(&pod.exec("ip6tables-nft-save", &["-t", "nat"])),
        )
    };
    let (v4_first, v6_first) = saves();
    // A duplicate jump, as a broken earlier run might have left, is removed too.
    nat(&pod, "ip6tables-nft", "-A OUTPUT -p tcp -j TRELLIS_OUTPUT");
    init(&pod, &[]);
    let third = init(&pod, &[]);
    let (v4, v6) = saves();
    assert_eq!(
        rules_of(&v4_first),
        rules_of(&v4),
        "a re-run changed the IPv4 rules"
    );
    assert_eq!(
        rules_of(&v6_first),
        rules_of(&v6),
        "a re-run changed the IPv6 rules"
    );
    assert_eq!(
        first.lines().skip(1).collect::<Vec<_>>(),
        third.lines().skip(1).collect::<Vec<_>>()
    );
    for save in [&v4, &v6] {
        for line in [
            "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
            "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
        ] {
            assert_eq!(count_lines(save, line), 1, "{line:?} in\n{save}");
        }
        assert_eq!(save.matches("-j REDIRECT").count(), 2, "{save}");
    }
    assert_eq!(
        count_lines(&v6, "-A TRELLIS_OUTPUT -s ::6/128 -o lo -j RETURN"),
        1,
        "{v6}"
    );
    assert_eq!(
        count_lines(&v4, "-A TRELLIS_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN"),
        1,
        "{v4}"
    );
}

#[test]
fn init_ipv6_off_drops_ipv6_but_not_ipv4() {
    if !netns_available() {
        return;
    }
    let (pod, peer) = pod_and_peer();
    // The pod's IPs say IPv4 only: auto drops IPv6; an explicit --ipv6 off keeps one set.
    let out = init(&pod, &["--pod-ips", "10.211.0.1"]);
    assert!(out.contains("# IPv6: dropped except on lo"), "{out}");
    let out = init(&pod, &["--ipv6", "off"]);
    assert!(
        out.contains("# IPv6: dropped except on lo (--ipv6 off)"),
        "{out}"
    );
    let filter = text(&pod.exec("ip6tables-nft-save", &["-t", "filter"]));
    for line in [
        "-A INPUT ! -i lo -j TRELLIS_IPV6_DROP",
        "-A FORWARD -j TRELLIS_IPV6_DROP",
        "-A OUTPUT ! -o lo -j TRELLIS_IPV6_DROP",
        "-A TRELLIS_IPV6_DROP -j DROP",
    ] {
        assert_eq!(count_lines(&filter, line), 1, "{line:?} in\n{filter}");
    }
    let v4_filter = text(&pod.exec("iptables-nft-save", &["-t", "filter"]));
    assert!(!v4_filter.contains("TRELLIS"), "{v4_filter}");

    let mut in_pod = Server::start(&pod, &[4140, 4143, 8080]);
    let mut in_peer = Server::start(&peer, &[80]);
    check_dropped(
        &mut in_pod,
        &mut in_peer,
        &[
            ("inbound over IPv6", &peer, 0, "[fd11::1]:8080"),
            ("app outbound over IPv6", &pod, APP_UID, "[fd11::2]:80"),
            ("proxy outbound over IPv6", &pod, PROXY_UID, "[fd11::2]:80"),
        ],
    );
    #[rustfmt::skip]
    let cases: [Case<'_>; 3] = [
        ("inbound over IPv4", &peer, 0, "", "10.211.0.1:8080", "pod:4143", "10.211.0.1:8080"),
        ("app outbound over IPv4", &pod, APP_UID, "", "10.211.0.2:80", "pod:4140", "10.211.0.2:80"),
        ("IPv6 loopback", &pod, APP_UID, "", "[::1]:8080", "pod:[::1]:8080", ""),
    ];
    check(&mut in_pod, &mut in_peer, &cases);
}

#[test]
fn init_auto_mode_follows_existing_legacy_rules() {
    if !netns_available() {
        return;
    }
    let (ns, _peer) = pod_and_peer();
    ns.exec(
        "iptables-legacy",
        &["-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN"],
    );

    let first = init(&ns, &[]);
    assert!(first.contains("using iptables-legacy"), "{first}");
    assert!(first.contains("1 in iptables-legacy-save"), "{first}");
    init(&ns, &[]);
    let save = text(&ns.exec("iptables-legacy-save", &["-t", "nat"]));
    assert_eq!(save.matches("-j TRELLIS_OUTPUT").count(), 1, "{save}");
    assert_eq!(save.matches("-j REDIRECT").count(), 2, "{save}");
    let nft = text(&ns.exec("iptables-nft-save", &[]));
    assert!(!nft.contains("TRELLIS"), "{nft}");

    let mut server = Server::start(&ns, &[4140]);
    connect(&ns, APP_UID, "10.211.0.2:80", "legacy");
    let seen = server
        .take("legacy", STEP)
        .expect("no redirect through iptables-legacy");
    assert_eq!(
        seen.orig,
        Some("10.211.0.2:80".parse().unwrap()),
        "{seen:?}"
    );
}

#[test]
fn init_without_privileges_fails_clearly() {
    if !netns_available() {
        return;
    }
    let out = Command::new(BIN)
        .arg("init")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(stderr.contains("NET_ADMIN and NET_RAW"), "{stderr}");
}

#[test]
fn init_without_iptables_names_the_package() {
    let out = Command::new(BIN)
        .arg("init")
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("install the `iptables` package"),
        "{stderr}"
    );
}

/// The helper entry point: a no-op unless a test started this executable as a helper.
#[test]
fn netns_helper_process() {
    let Ok(role) = std::env::var(HELPER) else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    match role.as_str() {
        "serve" => serve(&var(HELPER_PORTS)),
        "connect" => match std::env::var(HELPER_UID) {
            // Drop to the wanted user inside the namespace, then connect from there.
            Ok(uid) if uid != "0" => {
                let uid: u32 = uid.parse().unwrap();
                let status = Command::new(std::env::current_exe().unwrap())
                    .args(HELPER_ARGS)
                    .env_remove(HELPER_UID)
                    .uid(uid)
                    .gid(uid)
                    .status()
                    .unwrap();
                assert!(status.success(), "client as uid {uid} failed");
            }
            _ => client(
                &std::env::var(HELPER_SRC).unwrap_or_default(),
                &var(HELPER_ADDR),
                &var(HELPER_TOKEN),
            ),
        },
        other => panic!("unknown helper role {other}"),
    }
}

/// A listener on `[::]:port` for IPv6 only, beside the IPv4 one on the same port.
fn listen_v6_only(port: u16) -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
    socket.set_only_v6(true).unwrap();
    socket.set_reuse_address(true).unwrap();
    let addr: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
    socket.bind(&addr.into()).unwrap();
    socket.listen(128).unwrap();
    socket.into()
}

/// Accepts on every port of both families, reports `got TOKEN LOCAL ORIGINAL-DST` per connection and answers
/// `ok`; exits after 30 s at the latest, in case the test that started it is gone.
fn serve(ports: &str) {
    for port in ports.split(',') {
        let port: u16 = port.parse().unwrap();
        for listener in [
            TcpListener::bind(("0.0.0.0", port)).unwrap(),
            listen_v6_only(port),
        ] {
            std::thread::spawn(move || {
                for stream in listener.incoming().map_while(Result::ok) {
                    std::thread::spawn(move || report(stream));
                }
            });
        }
    }
    println!("HELPER ready");
    std::thread::sleep(Duration::from_secs(30));
}

fn report(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(STEP));
    let mut token = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        token.push(byte[0]);
    }
    let local = stream.local_addr().unwrap();
    let sock = socket2::SockRef::from(&stream);
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let orig = orig
        .ok()
        .and_then(|a| a.as_socket())
        .map_or_else(|| "none".to_string(), |a| a.to_string());
    println!(
        "HELPER got {} {local} {orig}",
        String::from_utf8_lossy(&token)
    );
    let _ = stream.write_all(b"ok\n");
}

/// Connects to `addr` from source address `src` (any when empty), sends `token` and waits
/// for the answer; panics when any of it fails.
fn client(src: &str, addr: &str, token: &str) {
    use socket2::{Domain, Socket, Type};
    let addr: SocketAddr = addr.parse().unwrap();
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    if !src.is_empty() {
        let src: std::net::IpAddr = src.parse().unwrap();
        socket
            .bind(&SocketAddr::new(src, 0).into())
            .unwrap_or_else(|e| panic!("bind to {src}: {e}"));
    }
    socket
        .connect_timeout(&addr.into(), STEP)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(STEP)).unwrap();
    stream.write_all(format!("{token}\n").as_bytes()).unwrap();
    let mut reply = [0u8; 3];
    stream
        .read_exact(&mut reply)
        .unwrap_or_else(|e| panic!("no answer from {addr}: {e}"));
    assert_eq!(&reply, b"ok\n");
}
