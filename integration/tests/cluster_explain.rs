//! `trellis-controller explain --admin` and `explain --pod` against a real sidecar: the answer
//! comes from the policy the sidecar holds (its admin `/config`), beside the controller's, and
//! a stale sidecar shows as one.
//!
//! `--pod` goes through the API server's port-forward subresource. Here the API server is a
//! small one on a real socket (kube's client upgrades the connection, which in-process mocks
//! cannot do), speaking the kubelet's port-forward WebSocket protocol: subprotocol
//! `v4.channel.k8s.io`, each binary frame led by its channel (0 data, 1 error), and the first
//! frame of each channel carrying the port, two bytes little-endian. Its data channel is
//! bridged to the sidecar's admin port on loopback, where the kubelet would deliver it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use trellis_integration::mesh::{Mesh, NS, send};
use trellis_integration::{binary, empty, http1_client};

/// The loopback blocks of the two tests' meshes (`127.0.<block>.X`).
const ADMIN_BLOCK: u8 = 171;
const POD_BLOCK: u8 = 172;

/// `/v2` goes to echo-v2, the rest to echo-v1.
const ROUTES: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-split, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs: [{name: echo-v1, port: 80}]
";

/// Runs `trellis-controller explain` with `args`: exit code, stdout as JSON (or null), stderr.
async fn explain(args: Vec<String>, kubeconfig: Option<&Path>) -> (i32, Value, String) {
    let kubeconfig = kubeconfig.map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(binary("trellis-controller"));
        cmd.arg("explain")
            .args(&args)
            .env_remove("TRELLIS_MANIFESTS")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT");
        match &kubeconfig {
            Some(path) => cmd.env("KUBECONFIG", path),
            // No cluster at all: a stray kubeconfig must not be read.
            None => cmd.env("KUBECONFIG", "/nonexistent"),
        };
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        (out.status.code().unwrap_or(-1), json, stderr)
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The backend Services of an explanation, in order.
fn backends(explanation: &Value) -> Vec<String> {
    explanation["backends"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|b| {
            b["service"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// A mesh whose client sidecar has sent one request to `echo`, so that it follows it.
async fn mesh_following_echo(block: u8) -> Mesh {
    let mesh = Mesh::start(block, ROUTES).await;
    let (status, _, echoed) = send(
        &http1_client(),
        mesh.request("echo", "/v2/items").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(echoed.unwrap().pod, "echo-v2-0");
    mesh
}

/// A copy of the mesh's manifests where `/v2` goes to echo-v1 too: what the controller would
/// say after an edit the sidecar has not received.
fn edited_copy(mesh: &Mesh) -> tempfile::TempDir {
    let dir = trellis_integration::scratch_dir();
    for name in ["cluster.yaml", "routes.yaml"] {
        let text = std::fs::read_to_string(mesh.dir.path().join(name)).unwrap();
        let text = text.replace(
            "backendRefs: [{name: echo-v2",
            "backendRefs: [{name: echo-v1",
        );
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_admin_answers_from_the_sidecars_own_policy() {
    const BLOCK: u8 = ADMIN_BLOCK;
    let mesh = mesh_following_echo(BLOCK).await;
    let admin = mesh.client.admin().to_string();
    let dir = mesh.dir.path().to_str().unwrap().to_string();

    // The sidecar and the controller's directory agree.
    let (code, out, err) = explain(
        args(&[
            "--admin",
            &admin,
            "--to",
            "echo",
            "--path",
            "/v2/items",
            "--manifests",
            &dir,
        ]),
        None,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let sidecar = &out["sidecar"];
    assert_eq!(sidecar["source"], format!("admin {admin}"));
    assert_eq!(sidecar["namespace"], NS);
    assert_eq!(sidecar["holds"], true);
    assert_eq!(sidecar["destination"], "echo:80");
    assert_eq!(
        out["from"], NS,
        "--from defaults to the sidecar's namespace"
    );
    assert_eq!(sidecar["explanation"]["route"]["name"], "echo-split");
    assert_eq!(sidecar["explanation"]["rule"]["index"], 0);
    assert_eq!(backends(&sidecar["explanation"]), ["echo-v2"]);
    assert_eq!(
        sidecar["explanation"]["backends"][0]["endpoints"][0]["addr"],
        format!("127.0.{BLOCK}.12:8080")
    );
    assert_eq!(backends(&out["controller"]), ["echo-v2"]);
    assert_eq!(out["in_sync"], true);
    assert!(out.get("differences").is_none(), "{out:#}");

    // The same Service by its cluster IP finds the same entry.
    let cluster_ip = sidecar["explanation"]["destination"]["cluster_ip"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, by_ip, err) = explain(
        args(&["--admin", &admin, "--to", &cluster_ip, "--path", "/other"]),
        None,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(by_ip["sidecar"]["destination"], "echo:80");
    assert_eq!(backends(&by_ip["sidecar"]["explanation"]), ["echo-v1"]);
    assert!(by_ip.get("controller").is_none() && by_ip.get("in_sync").is_none());

    // A controller view the sidecar does not have: the sidecar is stale, and says what it
    // would do anyway.
    let edited = edited_copy(&mesh);
    let edited = edited.path().to_str().unwrap();
    let (code, out, err) = explain(
        args(&[
            "--admin",
            &admin,
            "--to",
            "echo",
            "--path",
            "/v2/items",
            "--manifests",
            edited,
        ]),
        None,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out["in_sync"], false, "{out:#}");
    assert_eq!(backends(&out["sidecar"]["explanation"]), ["echo-v2"]);
    assert_eq!(backends(&out["controller"]), ["echo-v1"]);
    let differences: Vec<&str> = out["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(differences.contains(&"backends"), "{differences:?}");
    assert!(!differences.contains(&"route"), "{differences:?}");

    // A destination the sidecar never used: said plainly, with what it does follow.
    let (code, out, err) = explain(
        args(&["--admin", &admin, "--to", "mirror", "--manifests", &dir]),
        None,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out["sidecar"]["holds"], false);
    let message = out["sidecar"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("the sidecar holds no policy for mirror:80"),
        "{message}"
    );
    assert_eq!(out["sidecar"]["follows"], json!(["echo:80"]));
    assert!(out["sidecar"].get("explanation").is_none());
    assert_eq!(backends(&out["controller"]), ["mirror"]);
    assert!(out.get("in_sync").is_none());

    // --from must be the sidecar's namespace; nothing listening is a clear error.
    let (code, out, err) = explain(
        args(&["--admin", &admin, "--from", "shop", "--to", "echo"]),
        None,
    )
    .await;
    assert_eq!((code, out), (2, Value::Null));
    assert!(err.contains("is in namespace mesh"), "{err}");
    let (code, _, err) = explain(
        args(&["--admin", &format!("127.0.{BLOCK}.99:4191"), "--to", "echo"]),
        None,
    )
    .await;
    assert_eq!(code, 2);
    assert!(
        err.starts_with(&format!(
            "error: cannot reach the admin server at 127.0.{BLOCK}.99:4191:"
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_pod_reads_the_sidecar_through_the_port_forward() {
    const BLOCK: u8 = POD_BLOCK;
    let mesh = mesh_following_echo(BLOCK).await;
    let api = FakeKube::start(HashMap::from([
        (("mesh", "client-0"), Some(mesh.client.admin())),
        (("mesh", "plain-0"), None),
        // Meshed, but nothing listens on its admin port.
        (
            ("mesh", "gone-0"),
            Some(format!("127.0.{BLOCK}.98:4191").parse().unwrap()),
        ),
    ]))
    .await;
    let dir = mesh.dir.path().to_str().unwrap().to_string();

    let (code, out, err) = explain(
        args(&[
            "--pod",
            "mesh/client-0",
            "--to",
            "echo",
            "--path",
            "/v2/items",
            "--manifests",
            &dir,
        ]),
        Some(&api.kubeconfig),
    )
    .await;
    assert_eq!(code, 0, "{err}\nAPI requests: {:?}", api.seen());
    let sidecar = &out["sidecar"];
    assert_eq!(sidecar["source"], "pod mesh/client-0");
    assert_eq!(sidecar["holds"], true);
    assert_eq!(sidecar["destination"], "echo:80");
    assert_eq!(backends(&sidecar["explanation"]), ["echo-v2"]);
    assert_eq!(out["in_sync"], true);
    // It went through the port-forward subresource, to the admin port.
    let seen = api.seen();
    assert!(
        seen.iter().any(|r| r
            .starts_with("GET /api/v1/namespaces/mesh/pods/client-0/portforward?")
            && r.split(['?', '&']).any(|p| p == "ports=4191")),
        "{seen:?}"
    );
    assert_eq!(*api.forwarded.lock().unwrap(), 1);

    // The same answer as --admin on the same sidecar.
    let (_, direct, _) = explain(
        args(&[
            "--admin",
            &mesh.client.admin().to_string(),
            "--to",
            "echo",
            "--path",
            "/v2/items",
            "--manifests",
            &dir,
        ]),
        None,
    )
    .await;
    assert_eq!(sidecar["explanation"], direct["sidecar"]["explanation"]);

    // --kubernetes reads the cluster through the same kubeconfig: refused here, which stops
    // check and explain with the API server's words and exit code 2.
    let check = tokio::task::spawn_blocking({
        let kubeconfig = api.kubeconfig.clone();
        move || {
            Command::new(binary("trellis-controller"))
                .args(["check", "--kubernetes"])
                .env_remove("TRELLIS_MANIFESTS")
                .env_remove("KUBERNETES_SERVICE_HOST")
                .env("KUBECONFIG", kubeconfig)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{err}");
    assert!(check.stdout.is_empty());
    assert!(
        err.starts_with(
            "error: cannot list Services: forbidden; the caller needs `list` on services"
        ),
        "{err}"
    );
    assert!(err.contains("User \"tester\" cannot list"), "{err}");
    let (code, out, err) = explain(
        args(&["--pod", "mesh/client-0", "--kubernetes", "--to", "echo"]),
        Some(&api.kubeconfig),
    )
    .await;
    assert_eq!((code, out), (2, Value::Null), "{err}");
    assert!(
        err.starts_with("error: cannot list Services: forbidden"),
        "{err}"
    );

    // Pods that cannot answer: each error says why, exit code 2.
    let cases = [
        ("mesh/missing-0", "error: pod mesh/missing-0 does not exist"),
        (
            "mesh/plain-0",
            "error: pod mesh/plain-0 has no Trellis sidecar",
        ),
        (
            "mesh/gone-0",
            "error: cannot reach the sidecar of pod mesh/gone-0: port-forward: error forwarding port 4191",
        ),
        (
            "client-0",
            "error: --pod \"client-0\": expected NAMESPACE/NAME",
        ),
    ];
    for (pod, want) in cases {
        let (code, out, err) =
            explain(args(&["--pod", pod, "--to", "echo"]), Some(&api.kubeconfig)).await;
        assert_eq!((code, out), (2, Value::Null), "{pod}: {err}");
        assert!(err.starts_with(want), "{pod}: {err}");
    }
}

/// The API server's part in `explain --pod`: `GET` of a pod, and its port-forward.
struct FakeKube {
    kubeconfig: PathBuf,
    seen: Arc<Mutex<Vec<String>>>,
    /// Port-forward streams bridged to a sidecar.
    forwarded: Arc<Mutex<usize>>,
    _dir: tempfile::TempDir,
}

type Pods = HashMap<(&'static str, &'static str), Option<SocketAddr>>;

impl FakeKube {
    /// Serves `pods`: a meshed pod has its sidecar's admin address, a plain one `None`.
    async fn start(pods: Pods) -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = trellis_integration::scratch_dir();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster: {{server: 'http://{addr}'}}
users:
- name: tester
  user: {{token: test-token}}
contexts:
- name: fake
  context: {{cluster: fake, user: tester, namespace: default}}
current-context: fake
"
            ),
        )
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let forwarded = Arc::new(Mutex::new(0));
        let state = Arc::new((pods, seen.clone(), forwarded.clone()));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(req, &state.0, &state.1, &state.2)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        FakeKube {
            kubeconfig,
            seen,
            forwarded,
            _dir: dir,
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Answers as kube-apiserver does: a pod, a `Status` for a missing one, the port-forward
/// upgrade, and the mux's plain-text 404 for anything else.
fn answer(
    mut req: Request<Incoming>,
    pods: &Pods,
    seen: &Mutex<Vec<String>>,
    forwarded: &Arc<Mutex<usize>>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    seen.lock()
        .unwrap()
        .push(format!("{} {path}?{query}", req.method()));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (ns, name, sub) = match parts.as_slice() {
        // The tester may read pods and forward ports, not list the cluster.
        ["api", "v1", "services"] => {
            return json_response(
                StatusCode::FORBIDDEN,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                       "status": "Failure", "reason": "Forbidden", "code": 403,
                       "message": "services is forbidden: User \"tester\" cannot list \
                                   resource \"services\" in API group \"\" at the cluster scope"}),
            );
        }
        ["api", "v1", "namespaces", ns, "pods", name] => (*ns, *name, None),
        ["api", "v1", "namespaces", ns, "pods", name, sub] => (*ns, *name, Some(*sub)),
        _ => {
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header("content-type", "text/plain; charset=utf-8")
                .body(Full::new(Bytes::from_static(b"404 page not found\n")))
                .unwrap();
        }
    };
    let Some((_, admin)) = pods.iter().find(|((n, p), _)| *n == ns && *p == name) else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": format!("pods \"{name}\" not found"), "reason": "NotFound",
                   "details": {"name": name, "kind": "pods"}, "code": 404}),
        );
    };
    match sub {
        None => {
            let mut pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "resourceVersion": "7"},
                "spec": {"containers": [{"name": "app", "image": "echo"}]},
                "status": {"phase": "Running"}
            });
            if admin.is_some() {
                pod["metadata"]["annotations"] = json!({"trellis.dev/proxy-version": "test"});
            }
            json_response(StatusCode::OK, pod)
        }
        Some("portforward") => {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            let protocols = header("sec-websocket-protocol");
            let key = header("sec-websocket-key");
            let port: Option<u16> = query
                .split('&')
                .find_map(|p| p.strip_prefix("ports="))
                .and_then(|p| p.parse().ok());
            let ok = header("upgrade").eq_ignore_ascii_case("websocket")
                && protocols
                    .split(',')
                    .any(|p| p.trim() == "v4.channel.k8s.io")
                && !key.is_empty();
            let (Some(port), true, Some(admin)) = (port, ok, *admin) else {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                           "status": "Failure", "message": "bad port-forward request",
                           "reason": "BadRequest", "code": 400}),
                );
            };
            let upgrade = hyper::upgrade::on(&mut req);
            let forwarded = forwarded.clone();
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                bridge(ws, port, admin, &forwarded).await;
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("upgrade", "websocket")
                .header("connection", "Upgrade")
                .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
                .header("sec-websocket-protocol", "v4.channel.k8s.io")
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
        Some(_) => json_response(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "the server could not find the requested resource",
                   "reason": "NotFound", "code": 404}),
        ),
    }
}

/// The kubelet's side of one forwarded port: the port on both channels first, then channel 0
/// to and from `admin` (the pod's loopback), or the reason on channel 1 when it cannot connect.
async fn bridge<S>(ws: WebSocketStream<S>, port: u16, admin: SocketAddr, forwarded: &Mutex<usize>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let [low, high] = port.to_le_bytes();
    for channel in [0u8, 1] {
        if sink
            .send(Message::binary(vec![channel, low, high]))
            .await
            .is_err()
        {
            return;
        }
    }
    let tcp = match TcpStream::connect(admin).await {
        Ok(tcp) => tcp,
        Err(e) => {
            let mut frame = vec![1u8];
            frame.extend(
                format!("error forwarding port {port} to pod, uid : failed to connect: {e}")
                    .into_bytes(),
            );
            let _ = sink.send(Message::binary(frame)).await;
            let _ = sink.send(Message::Close(None)).await;
            return;
        }
    };
    *forwarded.lock().unwrap() += 1;
    let (mut from_pod, mut to_pod) = tcp.into_split();
    let upstream = async move {
        while let Some(Ok(message)) = stream.next().await {
            let written = match message {
                Message::Binary(data) if data.first() == Some(&0) => {
                    to_pod.write_all(&data[1..]).await
                }
                Message::Close(_) => break,
                _ => Ok(()),
            };
            if written.is_err() {
                break;
            }
        }
        let _ = to_pod.shutdown().await;
    };
    let downstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_pod.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut frame = Vec::with_capacity(n + 1);
                    frame.push(0u8);
                    frame.extend_from_slice(&buf[..n]);
                    if sink.send(Message::binary(frame)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    };
    tokio::join!(upstream, downstream);
}
