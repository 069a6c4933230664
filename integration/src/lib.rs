//! The harness of the end-to-end tests: the real binaries as child processes (killed on drop,
//! their logs kept for failure messages) and a small echo app.
//!
//! Without network namespaces, "pods" are loopback addresses (`127.0.X.Y`): each pod's app
//! and sidecar bind that address, so several sidecars use the standard ports side by side.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a harness fails loudly by design

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub mod netns;

/// Manifests several tests share.
pub mod manifests {
    /// Service `shop/web` (cluster IP 10.96.0.10, port 80) with one meshed endpoint, pod `web-1`
    /// (service account `web`) at 10.1.0.5:8080.
    pub const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- addresses: [10.1.0.5]
  conditions: {ready: true, serving: true, terminating: false}
  targetRef: {kind: Pod, name: web-1, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
  annotations: {trellis.dev/proxy-version: 0.1.0}
spec:
  serviceAccountName: web
  containers: [{name: app, image: web}]
status:
  phase: Running
  podIP: 10.1.0.5
  podIPs: [{ip: 10.1.0.5}]
";

    /// An HTTPRoute on `shop/web:80` sending `prefix` to the Service itself.
    pub fn route(prefix: &str) -> String {
        format!(
            "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop}}
spec:
  parentRefs:
  - {{group: '', kind: Service, name: web, port: 80}}
  rules:
  - matches:
    - path: {{type: PathPrefix, value: {prefix}}}
    backendRefs:
    - {{name: web, port: 80}}
"
        )
    }
}

/// A binary of the workspace, built next to the running test or binary (`target/debug`).
///
/// `TRELLIS_TEST_PROXY_BINARY` names another `trellis-proxy` to test, such as the static build
/// of `scripts/build-sidecar`.
pub fn binary(name: &str) -> PathBuf {
    if name == "trellis-proxy"
        && let Some(path) = std::env::var_os("TRELLIS_TEST_PROXY_BINARY")
    {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "TRELLIS_TEST_PROXY_BINARY: no {}",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().unwrap();
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    // Tests run from target/debug/deps, binaries (the demo) from target/debug itself.
    let here = exe.parent().unwrap();
    let bin = if here.join(&file).is_file() {
        here.join(&file)
    } else {
        here.parent().unwrap().join(&file)
    };
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build --workspace --bins` before the integration tests",
        bin.display()
    );
    bin
}

/// Whether `tool` is a file in one of the `PATH` directories.
pub fn on_path(tool: &str) -> bool {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|dir| dir.join(tool).is_file())
}

/// A child process whose stderr is collected; killed when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    log: Arc<Mutex<String>>,
    lines: Mutex<mpsc::Receiver<String>>,
}

/// Set by [`processes_die_with_their_thread`].
static DIE_WITH_THREAD: AtomicBool = AtomicBool::new(false);

/// From now on every [`Process`] is started under `setpriv --pdeathsig KILL`, so it is killed
/// when the thread that started it ends, even if this process is killed outright (a demo
/// stopped by a signal leaves nothing running). Only for programs that start processes from a
/// thread that lives as long as they should.
pub fn processes_die_with_their_thread() {
    DIE_WITH_THREAD.store(true, Ordering::SeqCst);
}

/// Every directory made by [`scratch_dir`] in this process.
static SCRATCH: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A temporary directory, removed when dropped or by [`remove_scratch_dirs`].
pub fn scratch_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    SCRATCH.lock().unwrap().push(dir.path().to_path_buf());
    dir
}

/// Removes every [`scratch_dir`] left, for a signal handler that ends the process without
/// running destructors.
pub fn remove_scratch_dirs() {
    let dirs = std::mem::take(&mut *SCRATCH.lock().unwrap_or_else(|e| e.into_inner()));
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// `cmd` run through `setpriv --pdeathsig KILL`, with the same arguments, environment and
/// directory.
fn with_pdeathsig(cmd: &Command) -> Command {
    let mut out = Command::new("setpriv");
    out.args(["--pdeathsig", "KILL", "--"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => out.env(key, value),
            None => out.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        out.current_dir(dir);
    }
    out
}

impl Process {
    pub fn spawn(mut cmd: Command) -> Process {
        if DIE_WITH_THREAD.load(Ordering::SeqCst) && cmd.get_program() != "ip" {
            cmd = with_pdeathsig(&cmd);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let shared = log.clone();
        // Drain stderr for the child's whole life: a full pipe would block its logging.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                shared.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        Process {
            child,
            log,
            lines: Mutex::new(lines),
        }
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let lines = self.lines.lock().unwrap();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no log line with {needle:?} within {within:?}; log:\n{}",
                    self.log()
                ),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A line of `/proc/<pid>/status`, such as `VmHWM`, in KiB.
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The address in a `listening on ADDR` log line.
fn listening_addr(line: &str) -> SocketAddr {
    let at = line.find("listening on ").unwrap() + "listening on ".len();
    let addr: String = line[at..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    addr.trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap()
}

/// Manifests of a Service `shop/<name>` on port 80 with endpoints `127.0.<block>.<host>:8080`
/// and no sidecars.
pub fn plain_service(block: u8, name: &str, hosts: &[u8]) -> String {
    let mut out = format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
"
    );
    for host in hosts {
        out += &format!("- {{addresses: ['127.0.{block}.{host}'], conditions: {{ready: true}}}}\n");
    }
    out
}

/// An HTTP/2 server with prior knowledge on `addr`, as a gRPC server is; `handle` answers every
/// request. Runs until the test ends.
pub async fn h2c_server<F, Fut>(addr: SocketAddr, handle: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = handle(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// `trellis-controller serve` in local mode.
#[derive(Debug)]
pub struct Controller {
    pub process: Process,
    pub addr: SocketAddr,
}

impl Controller {
    pub fn start(manifests: &Path) -> Controller {
        Self::start_on(manifests, "127.0.0.1:0".parse().unwrap())
    }

    pub fn start_on(manifests: &Path, addr: SocketAddr) -> Controller {
        Self::start_with(manifests, addr, &[])
    }

    /// As [`Controller::start_on`], with more `serve` flags (such as [`Ca::controller_flags`]).
    pub fn start_with(manifests: &Path, addr: SocketAddr, extra: &[String]) -> Controller {
        let mut cmd = Command::new(binary("trellis-controller"));
        cmd.arg("serve")
            .arg("--manifests")
            .arg(manifests)
            .arg("--discovery-addr")
            .arg(addr.to_string())
            // Several controllers run side by side: an ephemeral admin port each.
            .args(["--admin-addr", &SocketAddr::new(addr.ip(), 0).to_string()])
            .args(extra)
            .env_remove("TRELLIS_TRUST_DOMAIN")
            .env_remove("TRELLIS_CLUSTER_DOMAIN")
            .env("TRELLIS_LOG", "info");
        let process = Process::spawn(cmd);
        let line = process.wait_for_log("listening on", Duration::from_secs(10));
        Controller {
            addr: listening_addr(&line),
            process,
        }
    }
}

/// `trellis-proxy run` for a pod at `ip` in `namespace`: outbound `ip:4140`, inbound
/// `ip:4143`, admin `ip:4191`, delivering inbound traffic to the app at `ip`.
#[derive(Debug)]
pub struct Sidecar {
    pub process: Process,
    pub ip: IpAddr,
}

impl Sidecar {
    pub fn start(ip: IpAddr, namespace: &str, controller: SocketAddr, extra: &[&str]) -> Sidecar {
        let mut cmd = Command::new(binary("trellis-proxy"));
        cmd.arg("run")
            .args(["--outbound-addr", &format!("{ip}:4140")])
            .args(["--inbound-addr", &format!("{ip}:4143")])
            .args(["--admin-addr", &format!("{ip}:4191")])
            .args(["--app-host", &ip.to_string()])
            .args(["--controller-addr", &controller.to_string()])
            .args(["--namespace", namespace])
            .args(extra)
            .env("TRELLIS_LOG", "info");
        let process = Process::spawn(cmd);
        let sidecar = Sidecar { process, ip };
        sidecar.wait_ready(Duration::from_secs(10));
        sidecar
    }

    pub fn outbound(&self) -> SocketAddr {
        SocketAddr::new(self.ip, 4140)
    }

    pub fn admin(&self) -> SocketAddr {
        SocketAddr::new(self.ip, 4191)
    }

    fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(mut s) =
                std::net::TcpStream::connect_timeout(&self.admin(), Duration::from_millis(200))
            {
                use std::io::{Read, Write};
                let _ =
                    s.write_all(b"GET /ready HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "sidecar at {} not ready within {within:?}; log:\n{}",
            self.ip,
            self.process.log()
        );
    }

    /// The admin server's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let client = http1_client();
        let res = client
            .request(
                Request::get(format!("http://{}/metrics", self.admin()))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }
}

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub fn empty() -> TestBody {
    Full::new(Bytes::new()).boxed()
}

pub fn body(s: impl Into<Bytes>) -> TestBody {
    Full::new(s.into()).boxed()
}

/// A pooled HTTP/1.1 client (keep-alive: one connection reused when requests are sequential).
pub fn http1_client()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, TestBody>
{
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge client: every request is a stream on one connection.
pub fn http2_client()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, TestBody>
{
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// `trellis-identity` in local mode: fresh trust material, a token per service account (and one
/// for the controller's, [`CONTROLLER_ACCOUNT`]), and the certify endpoint on `ip:8080`.
#[derive(Debug)]
pub struct Ca {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    process: Option<Process>,
}

impl Ca {
    pub fn new(ip: IpAddr, lifetime: &str, accounts: &[(&str, &str)]) -> Ca {
        let dir = scratch_dir();
        let status = Command::new(binary("trellis-identity"))
            .arg("bootstrap")
            .args(Self::files(dir.path()))
            .arg("--root-key")
            .arg(dir.path().join("root.key"))
            .status()
            .unwrap();
        assert!(status.success());
        let mut accounts = accounts.to_vec();
        accounts.push(CONTROLLER_ACCOUNT);
        let tokens: String = accounts
            .iter()
            .map(|(ns, sa)| format!("token-{ns}-{sa} {ns} {sa}\n"))
            .collect();
        std::fs::write(dir.path().join("tokens"), tokens).unwrap();
        for (ns, sa) in &accounts {
            let name = format!("token-{ns}-{sa}");
            std::fs::write(dir.path().join(&name), &name).unwrap();
        }
        let mut ca = Ca {
            addr: SocketAddr::new(ip, 8080),
            dir,
            process: None,
        };
        ca.start(lifetime);
        ca
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
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

    pub fn start(&mut self, lifetime: &str) {
        let mut cmd = Command::new(binary("trellis-identity"));
        cmd.arg("serve")
            .args(["--certify-addr", &self.addr.to_string()])
            .args([
                "--admin-addr",
                &SocketAddr::new(self.addr.ip(), 9990).to_string(),
            ])
            .args(["--server-name", &self.addr.ip().to_string()])
            .arg("--token-file")
            .arg(self.dir.path().join("tokens"))
            .args(["--cert-lifetime", lifetime, "--reload-interval", "200ms"])
            .args(Self::files(self.dir.path()));
        let process = Process::spawn(cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "identity did not start:\n{}",
                process.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.process = Some(process);
    }

    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Sidecar flags for a pod of service account `ns/sa`.
    pub fn flags(&self, ns: &str, sa: &str) -> Vec<String> {
        vec![
            "--identity-addr".into(),
            self.addr.to_string(),
            "--trust-anchors".into(),
            self.dir.path().join("ca.crt").display().to_string(),
            "--token-path".into(),
            self.dir
                .path()
                .join(format!("token-{ns}-{sa}"))
                .display()
                .to_string(),
            "--service-account".into(),
            sa.into(),
        ]
    }

    /// Controller flags: certified as `CONTROLLER_ACCOUNT`'s namespace and `sa` (another
    /// service account than the controller's needs its own token in `accounts`), so that
    /// discovery serves mutual TLS.
    pub fn controller_flags(&self, sa: &str) -> Vec<String> {
        let ns = CONTROLLER_ACCOUNT.0;
        let mut flags = self.flags(ns, sa);
        flags.extend(["--namespace".into(), ns.into()]);
        flags
    }

    pub fn renew_issuer(&self) {
        let status = Command::new(binary("trellis-identity"))
            .arg("bootstrap")
            .args(Self::files(self.dir.path()))
            .arg("--root-key")
            .arg(self.dir.path().join("root.key"))
            .arg("--renew-issuer")
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// The controller's namespace and service account, as proxies expect them by default.
pub const CONTROLLER_ACCOUNT: (&str, &str) = ("trellis-system", "trellis-controller");

/// What the echo app saw of a request: its answer body, as JSON.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct Echoed {
    pub pod: String,
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_len: usize,
    /// The request's URI authority: HTTP/2's `:authority`; none for an HTTP/1 origin-form URI.
    #[serde(default)]
    pub authority: Option<String>,
}

impl Echoed {
    /// Values of a header, joined with `,` as the conformance suite compares them.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|v| v.join(","))
    }
}

/// Switches a WebSocket handshake: the app greets (`hello from <pod>`), then echoes every
/// message until the client closes.
fn websocket(pod: &str, key: &[u8], mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, protocol::Role};
    let upgrade = hyper::upgrade::on(&mut req);
    let pod = pod.to_string();
    tokio::spawn(async move {
        let Ok(io) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(io),
            Role::Server,
            None,
        )
        .await;
        if ws
            .send(Message::text(format!("hello from {pod}")))
            .await
            .is_err()
        {
            return;
        }
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() || ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut res = Response::new(Full::new(Bytes::new()));
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert("connection", "upgrade".parse().unwrap());
    h.insert("upgrade", "websocket".parse().unwrap());
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
    h.insert("sec-websocket-accept", accept.parse().unwrap());
    res
}

/// What a WebSocket exchange showed: the app's greeting and what came back for `text`.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct WsReply {
    pub greeting: String,
    pub echo: String,
    pub error: Option<String>,
}

/// Opens a WebSocket to `url` over `stream` (a connection to a sidecar or to the Service),
/// reads the greeting, sends `text`, reads it back and closes.
pub async fn websocket_exchange(stream: tokio::net::TcpStream, url: &str, text: &str) -> WsReply {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut reply = WsReply::default();
    let exchange = async {
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        reply.greeting = next_text(&mut ws).await?;
        ws.send(Message::text(text))
            .await
            .map_err(|e| format!("send: {e}"))?;
        reply.echo = next_text(&mut ws).await?;
        ws.close(None).await.map_err(|e| format!("close: {e}"))?;
        Ok::<(), String>(())
    };
    if let Err(e) = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
    {
        reply.error = Some(e);
    }
    reply
}

async fn next_text(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> Result<String, String> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    match ws.next().await {
        Some(Ok(Message::Text(t))) => Ok(t.to_string()),
        other => Err(format!("expected a text message, got {other:?}")),
    }
}

/// An app that answers every request with what it saw (HTTP/1.1 and HTTP/2). Query parameters
/// steer it: `status=503`, `delay_ms=200`, `header=name:value`.
#[derive(Debug)]
pub struct Echo {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    pub async fn start(addr: SocketAddr, pod: &str) -> Echo {
        Echo::serve(TcpListener::bind(addr).await.unwrap(), pod)
    }

    /// Answers on a listener that is already bound.
    pub fn serve(listener: TcpListener, pod: &str) -> Echo {
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let (pod, count) = (pod.to_string(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (pod, count) = (pod.clone(), count.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (pod, count) = (pod.clone(), count.clone());
                        async move { Ok::<_, Infallible>(echo(&pod, &count, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Echo {
            addr,
            requests,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(pod: &str, count: &AtomicUsize, req: Request<Incoming>) -> Response<Full<Bytes>> {
    count.fetch_add(1, Ordering::SeqCst);
    if let Some(key) = req.headers().get("sec-websocket-key").cloned()
        && req
            .headers()
            .get("upgrade")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
    {
        return websocket(pod, key.as_bytes(), req);
    }
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in req.headers() {
        headers
            .entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let (parts, body) = req.into_parts();
    let body_len = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let echoed = Echoed {
        pod: pod.to_string(),
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        version: format!("{:?}", parts.version),
        headers,
        body_len,
        authority: parts.uri.authority().map(|a| a.to_string()),
    };
    let mut res = Response::new(Full::new(Bytes::from(serde_json::to_vec(&echoed).unwrap())));
    res.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    for (k, v) in &query {
        match k.as_str() {
            "status" => *res.status_mut() = StatusCode::from_u16(v.parse().unwrap()).unwrap(),
            "delay_ms" => tokio::time::sleep(Duration::from_millis(v.parse().unwrap())).await,
            "header" => {
                if let Some((n, val)) = v.split_once(':') {
                    res.headers_mut().append(
                        http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                        val.parse().unwrap(),
                    );
                }
            }
            _ => {}
        }
    }
    if parts
        .headers
        .get("content-type")
        .is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"))
    {
        res.headers_mut()
            .insert("grpc-status", "0".parse().unwrap());
    }
    res
}

/// A controller in local mode, three meshed backend pods (`echo-v1-0`, `echo-v2-0`,
/// `mirror-0`, each an echo app on 8080 with its sidecar) and a client pod's sidecar, all on
/// the loopback addresses `127.0.<block>.X`.
pub mod mesh {
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use http::{Request, StatusCode};
    use http_body_util::BodyExt;

    use super::{Controller, Echo, Echoed, Sidecar, TestBody};

    pub const NS: &str = "mesh";

    pub fn ip(block: u8, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, block, host))
    }

    /// Services `echo` (v1 and v2 pods), `echo-v1`, `echo-v2`, `mirror`, and `empty` (no pods),
    /// each with ports 80 (http) and 7070 (h2c), target port 8080.
    pub fn cluster(block: u8) -> String {
        let mut out = String::new();
        let pods = [
            ("echo-v1-0", 11, "v1"),
            ("echo-v2-0", 12, "v2"),
            ("mirror-0", 13, "mirror"),
        ];
        for (name, host, version) in pods {
            out += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}, annotations: {{trellis.dev/proxy-version: test}}}}\nspec: {{serviceAccountName: {version}, containers: [{{name: app, image: echo}}]}}\nstatus: {{podIP: {}}}\n",
                ip(block, host)
            );
        }
        let services: [(&str, &[(&str, u8)]); 5] = [
            ("echo", &[("echo-v1-0", 11), ("echo-v2-0", 12)]),
            ("echo-v1", &[("echo-v1-0", 11)]),
            ("echo-v2", &[("echo-v2-0", 12)]),
            ("mirror", &[("mirror-0", 13)]),
            ("empty", &[]),
        ];
        for (svc, endpoints) in services {
            out += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: {NS}}}\nspec:\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: grpc, port: 7070, targetPort: 8080, appProtocol: kubernetes.io/h2c}}\n"
            );
            out += &format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, namespace: {NS}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: grpc, port: 8080}}]\nendpoints:\n"
            );
            for (pod, host) in endpoints {
                out += &format!(
                    "- {{addresses: ['{}'], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {pod}}}}}\n",
                    ip(block, *host)
                );
            }
            if endpoints.is_empty() {
                out = out.trim_end_matches("endpoints:\n").to_string() + "endpoints: []\n";
            }
        }
        out
    }

    /// A controller, three meshed backend pods and a client pod's sidecar.
    #[derive(Debug)]
    pub struct Mesh {
        pub dir: tempfile::TempDir,
        pub controller: Controller,
        pub client: Sidecar,
        pub apps: HashMap<&'static str, Echo>,
        pub backends: Vec<Sidecar>,
    }

    impl Mesh {
        pub async fn start(block: u8, routes: &str) -> Mesh {
            Self::start_with(block, routes, &[], |_, _| Vec::new()).await
        }

        /// As [`Mesh::start`], with extra controller flags, and extra sidecar flags per pod
        /// (name, service account).
        pub async fn start_with(
            block: u8,
            routes: &str,
            controller: &[String],
            extra: impl Fn(&str, &str) -> Vec<String>,
        ) -> Mesh {
            let dir = super::scratch_dir();
            std::fs::write(dir.path().join("cluster.yaml"), cluster(block)).unwrap();
            std::fs::write(dir.path().join("routes.yaml"), routes).unwrap();
            let any_port = "127.0.0.1:0".parse().unwrap();
            let controller = Controller::start_with(dir.path(), any_port, controller);
            let mut apps = HashMap::new();
            let mut backends = Vec::new();
            let args = |pod: &str, sa: &str| extra(pod, sa);
            for (pod, host, sa) in [
                ("echo-v1-0", 11, "v1"),
                ("echo-v2-0", 12, "v2"),
                ("mirror-0", 13, "mirror"),
            ] {
                let app = Echo::start(SocketAddr::new(ip(block, host), 8080), pod).await;
                apps.insert(pod, app);
                let flags = args(pod, sa);
                let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
                backends.push(Sidecar::start(ip(block, host), NS, controller.addr, &flags));
            }
            let flags = args("client-0", "client");
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let client = Sidecar::start(ip(block, 9), NS, controller.addr, &flags);
            Mesh {
                dir,
                controller,
                client,
                apps,
                backends,
            }
        }

        pub fn request(&self, host: &str, path: &str) -> http::request::Builder {
            Request::get(format!("http://{}{path}", self.client.outbound())).header("host", host)
        }
    }

    pub async fn send(
        client: &hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            TestBody,
        >,
        req: Request<TestBody>,
    ) -> (StatusCode, http::HeaderMap, Option<Echoed>) {
        let res = client.request(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).ok(),
        )
    }
}
