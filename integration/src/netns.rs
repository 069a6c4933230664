//! Pods as network namespaces: the harness of the `netns_*` end-to-end tests.
//!
//! A [`Mesh`] is a small cluster on one machine, built only from namespaces it creates:
//!
//! * a **node** namespace holding a bridge (`br0`, `10.213.B.1/24` for the mesh's block `B`);
//! * a **control-plane** namespace on the bridge (`10.213.B.2`) running the real
//!   `trellis-identity` (local mode, a token per service account, certify on :8080) and the
//!   real `trellis-controller` (local mode, discovery on :8090) on a directory of manifests
//!   the harness writes from the test's description: Services with virtual cluster IPs
//!   (`10.214.B.X`), EndpointSlices pointing at the pods, Pods (meshed ones carry the
//!   `trellis.dev/proxy-version` annotation) and the test's routes; when the controller takes
//!   identity flags it is certified too (`trellis-system/trellis-controller`), so discovery is
//!   mutual TLS;
//! * one namespace per **pod** (`10.213.B.10` upwards), joined to the bridge by a veth pair,
//!   `lo` up, a default route through the node, and `/etc/netns/<ns>/hosts` naming every
//!   Service (`svc.ns.svc.cluster.local`, `svc.ns.svc`, `svc.ns`, and `svc` in the pod's own
//!   namespace) so `ip netns exec` gives the pod its own cluster DNS.
//!
//! A meshed pod gets what the injector would give it: `trellis-proxy init` programs its
//! iptables for real, then `trellis-proxy run` runs in it as uid 2102 (through `setpriv`)
//! with outbound 127.0.0.1:4140, inbound 0.0.0.0:4143, admin 0.0.0.0:4191, its identity
//! flags and the controller's address. Its app, `trellis-echo`, then starts in the namespace.
//! Clients are `trellis-curl` runs inside a pod's namespace ([`Pod::curl`], [`Pod::traffic`],
//! [`Pod::tcp`]): in a meshed pod their connections are intercepted like any app's.
//!
//! Every process runs with `setpriv --pdeathsig KILL`, so it dies with the thread that started
//! it even if the test process is killed; call the harness from the test's own thread (a plain
//! `#[test]`, or the body of a `#[tokio::test]`), not from a short-lived helper thread.
//! Dropping the [`Mesh`] — also while a test panics — kills every process, deletes every
//! namespace (the veths and the bridge go with them) and removes the hosts files; a panicking
//! test also gets the tail of every process's log on stderr. Namespaces left behind by a test
//! process that was killed outright are deleted by the next [`MeshBuilder::start`].
//!
//! Needs root, `ip` (iproute2), iptables and `setpriv` (util-linux).
//! `TRELLIS_SKIP_NETNS_TESTS=1` skips the tests knowingly (see [`available`]).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a harness fails loudly by design

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Echoed, Process, binary, on_path};

/// The proxy's user id: `trellis-proxy init` never redirects its connections.
pub const PROXY_UID: u32 = 2102;
/// Prefix of every namespace the harness creates: `trellis-pod-<pid>-<n>-<role>`.
const PREFIX: &str = "trellis-pod-";
/// How long any single start-up step may take before the harness gives up.
const STEP: Duration = Duration::from_secs(15);
/// The controller's namespace and service account, the identity sidecars expect by default.
const CONTROLLER_ACCOUNT: (&str, &str) = ("trellis-system", "trellis-controller");

/// Whether `trellis-controller serve` can be certified by identity (`--identity-addr`), which
/// makes discovery mutual TLS; sidecars with an identity then require it.
fn controller_takes_identity() -> bool {
    let mut cmd = Command::new(binary("trellis-controller"));
    cmd.args(["serve", "--help"]);
    let (_, out, err) = run_bounded(cmd, STEP);
    out.contains("--identity-addr") || err.contains("--identity-addr")
}

/// Deletes every namespace (and hosts file) this process created, for a signal handler that
/// ends the process without unwinding; the processes in them die with it (`--pdeathsig`).
pub fn remove_all_of_this_process() {
    let me = std::process::id();
    Netns::sweep(|pid| pid == me);
}

/// Whether pods can be made here: root, with `ip`, iptables and `setpriv`; otherwise the first
/// missing piece and how to get it.
pub fn missing() -> Option<String> {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if uid != Some(0) {
        return Some("pods are network namespaces with iptables rules: that needs root".into());
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("iptables", "iptables"),
        ("setpriv", "util-linux"),
    ] {
        if !on_path(tool) {
            return Some(format!(
                "`{tool}` is not on PATH: apt-get install -y {package}"
            ));
        }
    }
    None
}

/// Whether the namespace tests can run here; panics naming the missing piece, unless
/// `TRELLIS_SKIP_NETNS_TESTS=1` asks to skip (then false).
pub fn available() -> bool {
    if std::env::var("TRELLIS_SKIP_NETNS_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: TRELLIS_SKIP_NETNS_TESTS=1");
        return false;
    }
    if let Some(missing) = missing() {
        panic!(
            "the network-namespace tests cannot run: {missing} \
             (or set TRELLIS_SKIP_NETNS_TESTS=1 to skip them knowingly)"
        );
    }
    true
}

/// Runs a command to completion, or kills it after `within`; returns its status and output.
fn run_bounded(mut cmd: Command, within: Duration) -> (ExitStatus, String, String) {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {within:?}; stdout:\n{}\nstderr:\n{}",
                out.join().unwrap(),
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

/// Reads a pipe to its end on a thread of its own.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs a command that must succeed quickly; returns its stdout.
fn run(cmd: Command) -> String {
    let what = format!("{cmd:?}");
    let (status, out, err) = run_bounded(cmd, STEP);
    assert!(status.success(), "{what} failed ({status}):\n{out}{err}");
    out
}

fn ip(args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run(cmd)
}

/// A network namespace, deleted (with its hosts file) when dropped.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn add(role: &str) -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{role}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command running `program` inside the namespace as `uid` (0: root), killed when the
    /// thread that starts it ends. With `/etc/netns/<ns>/hosts`, names resolve through it.
    pub fn command(&self, uid: u32, program: &Path) -> Command {
        self.command_with(uid, program, false)
    }

    /// As [`Netns::command`]; with `log_to_stderr`, the program's stdout goes to its stderr.
    pub fn command_with(&self, uid: u32, program: &Path, log_to_stderr: bool) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.name,
            "setpriv",
            "--pdeathsig",
            "KILL",
        ]);
        if uid != 0 {
            cmd.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups");
        }
        cmd.arg("--");
        if log_to_stderr {
            // The sidecar logs to stdout; `Process` keeps stderr.
            cmd.args(["sh", "-c", "exec \"$0\" \"$@\" >&2"]);
        }
        cmd.arg(program);
        // Settings of the developer's shell must not leak into the binaries under test.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TRELLIS_") {
                cmd.env_remove(key);
            }
        }
        cmd
    }

    fn etc_dir(name: &str) -> PathBuf {
        Path::new("/etc/netns").join(name)
    }

    fn write_hosts(&self, hosts: &str) {
        let dir = Self::etc_dir(&self.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), hosts).unwrap();
    }

    fn delete(name: &str) {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(Self::etc_dir(name));
    }

    /// Deletes the namespaces of earlier processes that no longer exist.
    fn sweep_stale() {
        Self::sweep(|pid| !Path::new("/proc").join(pid.to_string()).exists());
    }

    /// Deletes the namespaces whose creator's pid passes `select`.
    fn sweep(select: impl Fn(u32) -> bool) {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or_default();
            if pid.parse::<u32>().is_ok_and(&select) {
                Self::delete(name);
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        Self::delete(&self.name);
    }
}

/// A pod to create: meshed (init, sidecar, identity) or not, with the echo app on some ports.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub meshed: bool,
    /// Ports where `trellis-echo` answers HTTP/1.1 and HTTP/2 with what it saw.
    pub http_ports: Vec<u16>,
    /// Ports where `trellis-echo` greets (`hello from <pod> ...`) and echoes TCP bytes.
    pub tcp_ports: Vec<u16>,
    /// Ports where `trellis-echo` answers HTTP on 127.0.0.1 only (not declared: a debug port).
    pub local_http_ports: Vec<u16>,
    /// Whether the pod has an IPv6 address beside its IPv4 one (dual-stack, the default).
    pub ipv6: bool,
    /// More `trellis-proxy run` flags.
    pub proxy_flags: Vec<String>,
}

impl PodSpec {
    pub fn meshed(name: &str, namespace: &str, service_account: &str) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            meshed: true,
            http_ports: Vec::new(),
            tcp_ports: Vec::new(),
            local_http_ports: Vec::new(),
            ipv6: true,
            proxy_flags: Vec::new(),
        }
    }

    /// A pod without a sidecar or iptables rules (outside the mesh).
    pub fn unmeshed(name: &str, namespace: &str) -> PodSpec {
        PodSpec {
            meshed: false,
            ..PodSpec::meshed(name, namespace, "default")
        }
    }

    pub fn http(mut self, port: u16) -> PodSpec {
        self.http_ports.push(port);
        self
    }

    pub fn tcp(mut self, port: u16) -> PodSpec {
        self.tcp_ports.push(port);
        self
    }

    /// An HTTP echo bound to 127.0.0.1 only, like a debug or admin listener of an app.
    pub fn local_http(mut self, port: u16) -> PodSpec {
        self.local_http_ports.push(port);
        self
    }

    /// A pod of an IPv4-only cluster: no IPv6 address, and `init` told so.
    pub fn ipv4_only(mut self) -> PodSpec {
        self.ipv6 = false;
        self
    }

    pub fn proxy_flag(mut self, flag: &str, value: &str) -> PodSpec {
        self.proxy_flags
            .extend([flag.to_string(), value.to_string()]);
        self
    }
}

/// A Service with a virtual cluster IP and an EndpointSlice listing its pods.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    /// (name, port, target port)
    pub ports: Vec<(String, u16, u16)>,
    pub pods: Vec<String>,
    /// Annotations of the Service object, such as `trellis.dev/opaque-ports`.
    pub annotations: Vec<(String, String)>,
}

impl ServiceSpec {
    pub fn new(name: &str, namespace: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            namespace: namespace.into(),
            ports: Vec::new(),
            pods: Vec::new(),
            annotations: Vec::new(),
        }
    }

    pub fn annotation(mut self, key: &str, value: &str) -> ServiceSpec {
        self.annotations.push((key.into(), value.into()));
        self
    }

    pub fn port(mut self, name: &str, port: u16, target: u16) -> ServiceSpec {
        self.ports.push((name.into(), port, target));
        self
    }

    pub fn endpoints(mut self, pods: &[&str]) -> ServiceSpec {
        self.pods.extend(pods.iter().map(|p| p.to_string()));
        self
    }
}

/// What `trellis-curl` reports for one HTTP request.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct Reply {
    /// Unix time in milliseconds when the request was sent.
    pub at_ms: u64,
    pub status: Option<u16>,
    /// Response headers, several values joined with `,`.
    pub headers: BTreeMap<String, String>,
    pub body: String,
    /// Why no response arrived (connection refused or closed, timeout...).
    pub error: Option<String>,
}

impl Reply {
    /// The echo app's account of the request, when it answered.
    pub fn echoed(&self) -> Option<Echoed> {
        serde_json::from_str(&self.body).ok()
    }

    /// The pod whose echo app answered; panics otherwise.
    pub fn pod(&self) -> String {
        self.echoed()
            .unwrap_or_else(|| panic!("not an echo answer: {self:?}"))
            .pod
    }

    pub fn ok(&self) -> bool {
        self.status == Some(200)
    }
}

/// What `trellis-curl --tcp` reports for one opaque TCP exchange.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct TcpReply {
    /// The server's first line (`hello from <pod> to <local addr> from <peer addr>`).
    pub greeting: String,
    /// What came back for the bytes sent.
    pub echo: String,
    pub error: Option<String>,
    /// Milliseconds from connecting to the greeting.
    #[serde(default)]
    pub greeting_ms: u64,
}

/// A pod: its namespace, address and processes.
#[derive(Debug)]
pub struct Pod {
    pub spec: PodSpec,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address, when it has one.
    pub ip6: Option<Ipv6Addr>,
    pub proxy: Option<Process>,
    pub app: Option<Process>,
    // Dropped after the processes.
    pub netns: Netns,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The pod's SPIFFE identity.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            self.spec.namespace, self.spec.service_account
        )
    }

    /// Runs `trellis-curl ARGS` in the pod (as root, so intercepted in a meshed pod) and
    /// returns one reply per request. Bounded: `trellis-curl` stops on its own (after
    /// `--duration-ms`, `--within-ms` or `--max-ms`, 30 s by default), and is killed if it
    /// runs 5 s past that and one request's timeout.
    pub fn curl(&self, args: &[&str]) -> Vec<Reply> {
        let (status, out, err) = run_bounded(self.curl_command(args), curl_bound(args));
        assert!(
            status.success(),
            "trellis-curl {args:?} in {} failed ({status}):\n{out}{err}",
            self.name()
        );
        parse_lines(&out)
    }

    /// One GET; the reply whatever it is.
    pub fn get(&self, url: &str, headers: &[&str]) -> Reply {
        let mut args = Vec::new();
        for h in headers {
            args.extend(["-H", h]);
        }
        args.push(url);
        self.curl(&args).pop().unwrap()
    }

    /// `trellis-curl ARGS` started in the background; [`Traffic::finish`] collects it.
    pub fn traffic(&self, args: &[&str]) -> Traffic {
        let mut cmd = self.curl_command(args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = drain(child.stdout.take().unwrap());
        let err = drain(child.stderr.take().unwrap());
        Traffic {
            child: Some(child),
            out: Some(out),
            err: Some(err),
            deadline: Instant::now() + curl_bound(args),
            what: format!("trellis-curl {args:?} in {}", self.name()),
        }
    }

    /// Opens a TCP connection to `addr` from the pod, reads the greeting, sends `text` and
    /// reads it back.
    pub fn tcp(&self, addr: &str, text: &str) -> TcpReply {
        let (status, out, err) = run_bounded(
            self.curl_command(&["--tcp", addr, "--send", text]),
            Duration::from_secs(20),
        );
        assert!(status.success(), "trellis-curl --tcp {addr}: {out}{err}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// As [`Pod::tcp`], but the client speaks first: `text` goes out before the greeting is
    /// read, as a client-first protocol (or TLS) would.
    pub fn tcp_first(&self, addr: &str, text: &str) -> TcpReply {
        let (status, out, err) = run_bounded(
            self.curl_command(&["--tcp", addr, "--send", text, "--send-first"]),
            Duration::from_secs(20),
        );
        assert!(status.success(), "trellis-curl --tcp {addr}: {out}{err}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// A WebSocket exchange from the pod with the app at `url` (`trellis-curl --ws`).
    pub fn websocket(&self, url: &str, text: &str) -> crate::WsReply {
        let (status, out, err) = run_bounded(
            self.curl_command(&["--ws", url, "--send", text]),
            Duration::from_secs(20),
        );
        assert!(status.success(), "trellis-curl --ws {url}: {out}{err}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// The sidecar's `/metrics` text.
    pub fn metrics(&self) -> String {
        assert!(self.spec.meshed, "{} has no sidecar", self.name());
        let reply = self.get("http://127.0.0.1:4191/metrics", &[]);
        assert!(reply.ok(), "metrics of {}: {reply:?}", self.name());
        reply.body
    }

    /// Sends SIGTERM to the pod's sidecar, as the kubelet does when the pod is deleted.
    pub fn terminate_proxy(&self) {
        let proxy = self.proxy.as_ref().expect("a meshed pod");
        let status = Command::new("kill")
            .args(["-TERM", &proxy.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Logs of the pod's processes.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (what, p) in [("proxy", &self.proxy), ("app", &self.app)] {
            if let Some(p) = p {
                out += &format!("--- {} {what}:\n{}", self.name(), tail(&p.log(), 80));
            }
        }
        out
    }

    fn curl_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.netns.command(0, &binary("trellis-curl"));
        cmd.args(args);
        cmd
    }
}

/// How long a `trellis-curl` run may take: its own bounds (see its `--help` text) plus a
/// margin.
fn curl_bound(args: &[&str]) -> Duration {
    let value = |flag: &str| -> Option<u64> {
        let at = args.iter().position(|a| *a == flag)?;
        args.get(at + 1)?.parse().ok()
    };
    let ms = value("--duration-ms")
        .or_else(|| value("--within-ms"))
        .or_else(|| value("--max-ms"))
        .unwrap_or(30_000)
        + value("--timeout-ms").unwrap_or(5_000);
    Duration::from_millis(ms) + Duration::from_secs(5)
}

fn parse_lines(out: &str) -> Vec<Reply> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    let from = all.len().saturating_sub(lines);
    all[from..].iter().map(|l| format!("{l}\n")).collect()
}

/// `trellis-curl` running in the background; killed if dropped unfinished.
#[derive(Debug)]
pub struct Traffic {
    child: Option<Child>,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
    deadline: Instant,
    what: String,
}

impl Traffic {
    /// Ends the run now (SIGTERM: requests in flight finish) and returns its replies.
    pub fn stop(self) -> Vec<Reply> {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        self.finish()
    }

    /// Waits for the run to end (bounded) and returns its replies.
    pub fn finish(mut self) -> Vec<Reply> {
        let mut child = self.child.take().unwrap();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= self.deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = self.out.take().unwrap().join().unwrap();
        let err = self.err.take().unwrap().join().unwrap();
        match status {
            Some(s) if s.success() => parse_lines(&out),
            Some(s) => panic!("{} failed ({s}):\n{out}{err}", self.what),
            None => panic!("{} did not finish in time:\n{out}{err}", self.what),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Describes a mesh; [`MeshBuilder::start`] creates it.
#[derive(Debug)]
pub struct MeshBuilder {
    block: u8,
    cert_lifetime: String,
    pods: Vec<PodSpec>,
    services: Vec<ServiceSpec>,
    routes: String,
}

impl MeshBuilder {
    /// Lifetime of workload certificates (`trellis-identity --cert-lifetime`), default `1h`.
    pub fn cert_lifetime(mut self, lifetime: &str) -> MeshBuilder {
        self.cert_lifetime = lifetime.into();
        self
    }

    pub fn pod(mut self, pod: PodSpec) -> MeshBuilder {
        self.pods.push(pod);
        self
    }

    pub fn service(mut self, service: ServiceSpec) -> MeshBuilder {
        self.services.push(service);
        self
    }

    /// The route manifests (`routes.yaml`).
    pub fn routes(mut self, yaml: &str) -> MeshBuilder {
        self.routes = yaml.into();
        self
    }

    pub fn start(self) -> Mesh {
        Mesh::start(self)
    }
}

/// A running mesh; everything in it goes away when it is dropped.
#[derive(Debug)]
pub struct Mesh {
    pub block: u8,
    pods: Vec<Pod>,
    services: Vec<ServiceSpec>,
    controller: Option<Process>,
    identity: Option<Process>,
    cert_lifetime: String,
    /// Whether the controller is certified too (discovery over mutual TLS).
    controller_identity: bool,
    control: Netns,
    node: Netns,
    /// The controller's manifests directory.
    pub manifests: tempfile::TempDir,
    /// Trust anchors, issuer, token file and one token file per service account.
    pub trust: tempfile::TempDir,
}

impl Mesh {
    /// A mesh on `10.213.<block>.0/24` with cluster IPs in `10.214.<block>.0/24`.
    pub fn builder(block: u8) -> MeshBuilder {
        MeshBuilder {
            block,
            cert_lifetime: "1h".into(),
            pods: Vec::new(),
            services: Vec::new(),
            routes: String::new(),
        }
    }

    fn start(spec: MeshBuilder) -> Mesh {
        let started = Instant::now();
        Netns::sweep_stale();
        let block = spec.block;
        let node = Netns::add(&format!("b{block}-node"));
        node.ip(&["link", "add", "br0", "type", "bridge"]);
        node.ip(&["addr", "add", &format!("10.213.{block}.1/24"), "dev", "br0"]);
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", node_ip6(block)),
            "dev",
            "br0",
            "nodad",
        ]);
        node.ip(&["link", "set", "br0", "up"]);
        let control = Netns::add(&format!("b{block}-control"));
        attach(&node, &control, 0, Ipv4Addr::new(10, 213, block, 2), block);

        // Trust material and tokens, readable by the proxies' uid.
        let trust = crate::scratch_dir();
        let t = trust.path();
        let mut cmd = Command::new(binary("trellis-identity"));
        cmd.arg("bootstrap")
            .args(trust_files(t))
            .arg("--root-key")
            .arg(t.join("root.key"));
        run(cmd);
        let mut tokens = String::new();
        let mut accounts: Vec<(&str, &str)> = spec
            .pods
            .iter()
            .filter(|p| p.meshed)
            .map(|p| (p.namespace.as_str(), p.service_account.as_str()))
            .collect();
        let controller_identity = controller_takes_identity();
        if controller_identity {
            accounts.push(CONTROLLER_ACCOUNT);
        }
        accounts.sort_unstable();
        accounts.dedup();
        for (ns, sa) in accounts {
            let token = format!("token-{ns}-{sa}");
            tokens += &format!("{token} {ns} {sa}\n");
            std::fs::write(t.join(&token), &token).unwrap();
            set_mode(&t.join(&token), 0o644);
        }
        std::fs::write(t.join("tokens"), tokens).unwrap();
        set_mode(t, 0o755);
        set_mode(&t.join("ca.crt"), 0o644);

        let manifests = crate::scratch_dir();
        let mut mesh = Mesh {
            block,
            pods: Vec::new(),
            services: spec.services,
            controller: None,
            identity: None,
            cert_lifetime: spec.cert_lifetime,
            controller_identity,
            control,
            node,
            manifests,
            trust,
        };
        let ips: Vec<Ipv4Addr> = (0..spec.pods.len())
            .map(|i| Ipv4Addr::new(10, 213, block, 10 + u8::try_from(i).unwrap()))
            .collect();
        let cluster = mesh.cluster_yaml(&spec.pods, &ips);
        std::fs::write(mesh.manifests.path().join("cluster.yaml"), cluster).unwrap();
        mesh.write_routes(&spec.routes);

        for (i, (pod, ip)) in spec.pods.into_iter().zip(ips).enumerate() {
            let netns = Netns::add(&format!("b{block}-{}", pod.name));
            attach(&mesh.node, &netns, i + 1, ip, block);
            let ip6 = pod.ipv6.then(|| {
                let ip6 = pod_ip6(block, ip.octets()[3]);
                netns.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{ip6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ]);
                netns.ip(&[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &node_ip6(block).to_string(),
                ]);
                ip6
            });
            netns.write_hosts(&mesh.hosts_for(&pod.namespace));
            mesh.pods.push(Pod {
                spec: pod,
                ip,
                ip6,
                proxy: None,
                app: None,
                netns,
            });
        }
        mesh.start_identity();
        mesh.start_controller();

        // Like the injector: the init container first, then the sidecar, then the app.
        let proxy = binary("trellis-proxy");
        for i in 0..mesh.pods.len() {
            if !mesh.pods[i].spec.meshed {
                continue;
            }
            // As the injector passes `status.podIPs`.
            let pod = &mesh.pods[i];
            let pod_ips = match pod.ip6 {
                Some(ip6) => format!("{},{ip6}", pod.ip),
                None => pod.ip.to_string(),
            };
            let mut init = pod.netns.command(0, &proxy);
            init.args(["init", "--pod-ips", &pod_ips]);
            run(init);
            let cmd = mesh.proxy_command(&mesh.pods[i]);
            mesh.pods[i].proxy = Some(Process::spawn(cmd));
        }
        let echo = binary("trellis-echo");
        for pod in &mut mesh.pods {
            if pod.spec.http_ports.is_empty()
                && pod.spec.tcp_ports.is_empty()
                && pod.spec.local_http_ports.is_empty()
            {
                continue;
            }
            let mut cmd = pod.netns.command(0, &echo);
            cmd.args(["--pod", &pod.spec.name]);
            for port in &pod.spec.http_ports {
                cmd.args(["--http", &port.to_string()]);
            }
            for port in &pod.spec.tcp_ports {
                cmd.args(["--tcp", &port.to_string()]);
            }
            for port in &pod.spec.local_http_ports {
                cmd.args(["--local-http", &port.to_string()]);
            }
            pod.app = Some(Process::spawn(cmd));
        }
        for pod in &mesh.pods {
            if let Some(app) = &pod.app {
                app.wait_for_log("echo ready", STEP);
            }
            if pod.spec.meshed {
                mesh.wait_ready(pod);
            }
        }
        eprintln!(
            "mesh 10.213.{block}.0/24 with {} pods up in {:?}",
            mesh.pods.len(),
            started.elapsed()
        );
        mesh
    }

    fn wait_ready(&self, pod: &Pod) {
        let replies = pod.curl(&[
            "--until",
            "200",
            "--within-ms",
            "15000",
            "http://127.0.0.1:4191/ready",
        ]);
        let ready = replies.last().is_some_and(Reply::ok);
        assert!(
            ready,
            "the sidecar of {} is not ready: {replies:?}\n{}",
            pod.name(),
            self.logs()
        );
    }

    fn proxy_command(&self, pod: &Pod) -> Command {
        let t = self.trust.path();
        let spec = &pod.spec;
        let mut cmd = pod
            .netns
            .command_with(PROXY_UID, &binary("trellis-proxy"), true);
        cmd.arg("run")
            .args(["--outbound-addr", "127.0.0.1:4140"])
            .args(["--inbound-addr", "0.0.0.0:4143"])
            .args(["--admin-addr", "0.0.0.0:4191"])
            .args(["--pod-ip", &pod.ip.to_string()])
            .args(["--controller-addr", &self.controller_addr().to_string()])
            .args(["--namespace", &spec.namespace])
            .args(["--pod-name", &spec.name])
            .args(["--identity-addr", &self.identity_addr().to_string()])
            .arg("--trust-anchors")
            .arg(t.join("ca.crt"))
            .arg("--token-path")
            .arg(t.join(format!("token-{}-{}", spec.namespace, spec.service_account)))
            .args(["--service-account", &spec.service_account])
            .args(&spec.proxy_flags)
            // As the injector sets it: the ports the pod's containers declare.
            .args(if spec.proxy_flags.iter().any(|f| f == "--inbound-ports") {
                Vec::new()
            } else {
                let declared: Vec<String> = (spec.http_ports.iter().chain(&spec.tcp_ports))
                    .map(u16::to_string)
                    .collect();
                vec!["--inbound-ports".to_string(), declared.join(",")]
            })
            .env("TRELLIS_LOG", "info")
            // Plain log lines: the sidecar colours its log unless told not to.
            .env("NO_COLOR", "1");
        cmd
    }

    fn control_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.block, 2)
    }

    pub fn controller_addr(&self) -> SocketAddr {
        SocketAddr::new(self.control_ip().into(), 8090)
    }

    pub fn identity_addr(&self) -> SocketAddr {
        SocketAddr::new(self.control_ip().into(), 8080)
    }

    /// Starts `trellis-controller serve` (again) in the control-plane namespace.
    pub fn start_controller(&mut self) {
        assert!(self.controller.is_none(), "the controller is running");
        let mut cmd = self.control.command(0, &binary("trellis-controller"));
        cmd.arg("serve")
            .arg("--manifests")
            .arg(self.manifests.path())
            .args(["--discovery-addr", &self.controller_addr().to_string()])
            // Identity holds 9990 in the same namespace.
            .args([
                "--admin-addr",
                &SocketAddr::new(self.controller_addr().ip(), 9991).to_string(),
            ])
            .env("TRELLIS_LOG", "info");
        if self.controller_identity {
            let t = self.trust.path();
            let (ns, sa) = CONTROLLER_ACCOUNT;
            cmd.args(["--identity-addr", &self.identity_addr().to_string()])
                .arg("--trust-anchors")
                .arg(t.join("ca.crt"))
                .arg("--token-path")
                .arg(t.join(format!("token-{ns}-{sa}")))
                .args(["--namespace", ns, "--service-account", sa]);
        }
        let process = Process::spawn(cmd);
        process.wait_for_log("listening on", STEP);
        self.controller = Some(process);
    }

    /// Kills the controller (SIGKILL: no goodbye to the proxies).
    pub fn kill_controller(&mut self) {
        self.controller
            .take()
            .expect("the controller is not running");
    }

    /// Starts `trellis-identity serve` (again) in the control-plane namespace.
    pub fn start_identity(&mut self) {
        assert!(self.identity.is_none(), "identity is running");
        let t = self.trust.path();
        let mut cmd = self.control.command(0, &binary("trellis-identity"));
        cmd.arg("serve")
            .args(["--certify-addr", &self.identity_addr().to_string()])
            .args(["--admin-addr", &format!("{}:9990", self.control_ip())])
            .args(["--server-name", &self.control_ip().to_string()])
            .arg("--token-file")
            .arg(t.join("tokens"))
            .args(["--cert-lifetime", &self.cert_lifetime])
            .args(["--reload-interval", "200ms"])
            .args(trust_files(t))
            .env("TRELLIS_LOG", "info");
        let process = Process::spawn(cmd);
        process.wait_for_log("certify on https://", STEP);
        self.identity = Some(process);
    }

    /// Kills identity.
    pub fn kill_identity(&mut self) {
        self.identity.take().expect("identity is not running");
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The cluster IP of Service `name` (any namespace).
    pub fn service_ip(&self, name: &str) -> Ipv4Addr {
        let i = self
            .services
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no Service {name}"));
        Ipv4Addr::new(10, 214, self.block, 10 + u8::try_from(i).unwrap())
    }

    /// Replaces `routes.yaml` in one step (write aside, rename), as a ConfigMap update would.
    /// Sets the ready endpoints of `service` to `pods`, as the EndpointSlice controller does
    /// when pods terminate; the controller reloads and the sidecars follow.
    pub fn set_endpoints(&mut self, service: &str, pods: &[&str]) {
        if let Some(svc) = self.services.iter_mut().find(|s| s.name == service) {
            svc.pods = pods.iter().map(|p| p.to_string()).collect();
        }
        let specs: Vec<PodSpec> = self.pods.iter().map(|p| p.spec.clone()).collect();
        let ips: Vec<Ipv4Addr> = self.pods.iter().map(|p| p.ip).collect();
        let yaml = self.cluster_yaml(&specs, &ips);
        let dir = self.manifests.path();
        std::fs::write(dir.join(".cluster.yaml.new"), yaml).unwrap();
        std::fs::rename(dir.join(".cluster.yaml.new"), dir.join("cluster.yaml")).unwrap();
    }

    pub fn write_routes(&self, yaml: &str) {
        let dir = self.manifests.path();
        std::fs::write(dir.join(".routes.yaml.new"), yaml).unwrap();
        std::fs::rename(dir.join(".routes.yaml.new"), dir.join("routes.yaml")).unwrap();
    }

    /// The tail of every process's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (what, p) in [
            ("controller", &self.controller),
            ("identity", &self.identity),
        ] {
            if let Some(p) = p {
                out += &format!("--- {what}:\n{}", tail(&p.log(), 40));
            }
        }
        for pod in &self.pods {
            out += &pod.logs();
        }
        out
    }

    fn cluster_yaml(&self, pods: &[PodSpec], ips: &[Ipv4Addr]) -> String {
        let mut out = String::new();
        for (pod, ip) in pods.iter().zip(ips) {
            let annotations = if pod.meshed {
                ", annotations: {trellis.dev/proxy-version: test}"
            } else {
                ""
            };
            let ip6 = match pod.ipv6 {
                true => format!(", {{ip: \"{}\"}}", pod_ip6(self.block, ip.octets()[3])),
                false => String::new(),
            };
            out += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {{app: {}}}{annotations}}}\nspec: {{serviceAccountName: {}, containers: [{{name: app, image: trellis-echo}}]}}\nstatus: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}{ip6}]}}\n",
                pod.name, pod.namespace, pod.name, pod.service_account
            );
        }
        for svc in &self.services {
            let cip = self.service_ip(&svc.name);
            out += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}, annotations: {{{}}}}}\nspec:\n  clusterIP: {cip}\n  clusterIPs: [{cip}]\n  ports:\n",
                svc.name,
                svc.namespace,
                svc.annotations
                    .iter()
                    .map(|(k, v)| format!("{k}: '{v}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for (name, port, target) in &svc.ports {
                out += &format!(
                    "  - {{name: {name}, port: {port}, targetPort: {target}, protocol: TCP}}\n"
                );
            }
            out += &format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {}-1, namespace: {}, labels: {{kubernetes.io/service-name: {}}}}}\naddressType: IPv4\nports:\n",
                svc.name, svc.namespace, svc.name
            );
            for (name, _, target) in &svc.ports {
                out += &format!("- {{name: {name}, port: {target}, protocol: TCP}}\n");
            }
            out += "endpoints:";
            if svc.pods.is_empty() {
                out += " []";
            }
            out += "\n";
            for name in &svc.pods {
                let i = pods
                    .iter()
                    .position(|p| &p.name == name)
                    .unwrap_or_else(|| panic!("Service {} names no pod {name}", svc.name));
                out += &format!(
                    "- {{addresses: ['{}'], conditions: {{ready: true, serving: true, terminating: false}}, targetRef: {{kind: Pod, name: {name}, namespace: {}}}}}\n",
                    ips[i], pods[i].namespace
                );
            }
        }
        out
    }

    /// `/etc/hosts` of a pod in `namespace`: every Service by its cluster names.
    fn hosts_for(&self, namespace: &str) -> String {
        let mut out = String::from("127.0.0.1 localhost\n");
        for svc in &self.services {
            let (n, ns) = (&svc.name, &svc.namespace);
            out += &format!(
                "{} {n}.{ns}.svc.cluster.local {n}.{ns}.svc {n}.{ns}",
                self.service_ip(n)
            );
            if ns == namespace {
                out += &format!(" {n}");
            }
            out += "\n";
        }
        out
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "=== logs of mesh 10.213.{}.0/24\n{}",
                self.block,
                self.logs()
            );
        }
        // Processes first (fields drop in order: pods, controller, identity), then the
        // namespaces: control, node (with the bridge and the node ends of the veths).
    }
}

/// The node's IPv6 address on the bridge: `fd13:<block>::1`.
fn node_ip6(block: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd13, u16::from(block), 0, 0, 0, 0, 0, 1)
}

/// A pod's IPv6 address: `fd13:<block>::<last octet of its IPv4 address>`.
pub fn pod_ip6(block: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd13, u16::from(block), 0, 0, 0, 0, 0, u16::from(host))
}

/// Joins `ns` to the node's bridge with a veth pair (`eth0` in the pod, `v<n>` on the node),
/// addresses it and routes everything through the node.
fn attach(node: &Netns, ns: &Netns, n: usize, ip: Ipv4Addr, block: u8) {
    let port = format!("v{n}");
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &node.name,
    ]);
    node.ip(&["link", "set", &port, "master", "br0", "up"]);
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        &format!("10.213.{block}.1"),
    ]);
}

fn trust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (flag, file) in [
        ("--trust-anchors", "ca.crt"),
        ("--issuer-cert", "issuer.crt"),
        ("--issuer-key", "issuer.key"),
    ] {
        out.push(PathBuf::from(flag));
        out.push(dir.join(file));
    }
    out
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Sum of the samples of metric `name` whose labels include every `(label, value)`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let end = l.find(['{', ' ']).unwrap_or(l.len());
            &l[..end] == name
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
