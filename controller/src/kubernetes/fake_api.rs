//! A scripted API server behind kube's real client (`tower_test::mock`), for the Kubernetes
//! mode tests. Several tasks (five watchers, the status writer, the Lease) talk at once, so
//! requests are answered by rules rather than in a fixed order: the first rule whose method,
//! path and list/watch kind match, and that still has a reply, answers. A request no rule
//! answers is held open, as a watch with no news would be. Every request is recorded, with the
//! (Tokio) time it arrived, so tests on a paused clock can check how often a client retries.
//!
//! Errors are worded as kube-apiserver words them, because the client reads them differently:
//! a missing object is a `Status` document ([`not_found`]), a resource the server does not
//! serve at all (a CRD not installed) is a `text/plain` "404 page not found"
//! ([`no_such_resource`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::watch;
use tower_test::mock::{self, SendResponse};

/// How long any test waits for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub body: Value,
    pub at: tokio::time::Instant,
}

impl Seen {
    pub fn is_watch(&self) -> bool {
        self.query.split('&').any(|p| p == "watch=true")
    }
}

/// An answer.
#[derive(Clone, Debug)]
pub enum Reply {
    Json(StatusCode, Value),
    /// A `text/plain` answer, as the API server's mux gives for paths it does not serve.
    Text(StatusCode, &'static str),
    /// A watch response: the events, one JSON document a line, then the end of the stream.
    Events(Vec<Value>),
}

struct Rule {
    method: Method,
    path: String,
    watch: bool,
    replies: VecDeque<Reply>,
    /// The last reply answers every later request too.
    repeat: bool,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    seen: Vec<Seen>,
    held: Vec<SendResponse<Response<Body>>>,
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    requests: watch::Receiver<usize>,
}

impl FakeApi {
    /// A client whose requests this fake answers.
    pub fn start() -> (kube::Client, FakeApi) {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let state = Arc::new(Mutex::new(State::default()));
        let (count_tx, count_rx) = watch::channel(0);
        let server_state = state.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap();
                let seen = Seen {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string),
                    body: if bytes.is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_slice(&bytes).unwrap()
                    },
                    at: tokio::time::Instant::now(),
                };
                let mut state = server_state.lock().unwrap();
                let watch = seen.is_watch();
                let reply = state
                    .rules
                    .iter_mut()
                    .find(|r| {
                        r.method == seen.method
                            && r.path == seen.path
                            && r.watch == watch
                            && !r.replies.is_empty()
                    })
                    .and_then(|r| {
                        if r.repeat && r.replies.len() == 1 {
                            r.replies.front().cloned()
                        } else {
                            r.replies.pop_front()
                        }
                    });
                state.seen.push(seen);
                match reply {
                    Some(reply) => send.send_response(response(reply)),
                    None => state.held.push(send),
                }
                let n = state.seen.len();
                drop(state);
                count_tx.send_replace(n);
            }
        });
        (
            kube::Client::new(service, "default"),
            FakeApi {
                state,
                requests: count_rx,
            },
        )
    }

    fn add(&self, method: Method, path: &str, watch: bool, replies: Vec<Reply>, repeat: bool) {
        let mut state = self.state.lock().unwrap();
        // A new rule for the same request replaces the old one.
        state
            .rules
            .retain(|r| !(r.method == method && r.path == path && r.watch == watch));
        state.rules.push(Rule {
            method,
            path: path.to_string(),
            watch,
            replies: replies.into(),
            repeat,
        });
    }

    /// Answers the list requests of `path` with `replies`, in order.
    pub fn lists(&self, path: &str, replies: Vec<Reply>) {
        self.add(Method::GET, path, false, replies, false);
    }

    /// Answers every list request of `path` with `reply`.
    pub fn always_list(&self, path: &str, reply: Reply) {
        self.add(Method::GET, path, false, vec![reply], true);
    }

    /// Answers every such request (not a list or watch) with `reply`.
    pub fn always(&self, method: Method, path: &str, reply: Reply) {
        self.add(method, path, false, vec![reply], true);
    }

    /// Answers the watch requests of `path` with `replies`, in order; later ones stay open.
    pub fn watches(&self, path: &str, replies: Vec<Reply>) {
        self.add(Method::GET, path, true, replies, false);
    }

    /// Answers other requests (`get`, `patch`, `create`, `update`) in order.
    pub fn answers(&self, method: Method, path: &str, replies: Vec<Reply>) {
        self.add(method, path, false, replies, false);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// The recorded requests with this method and path.
    pub fn seen_at(&self, method: &Method, path: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == *method && s.path == path)
            .collect()
    }

    /// Waits until the recorded requests satisfy `done`; panics after [`PATIENCE`].
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let mut requests = self.requests.clone();
        let waited = tokio::time::timeout(PATIENCE, async {
            loop {
                let seen = self.seen();
                if done(&seen) {
                    return seen;
                }
                if requests.changed().await.is_err() {
                    return seen;
                }
            }
        })
        .await;
        match waited {
            Ok(seen) if done(&seen) => seen,
            _ => panic!(
                "timed out waiting for {what}; requests: {:#?}",
                self.summary()
            ),
        }
    }

    /// `METHOD path?query` of every recorded request, for failure messages.
    pub fn summary(&self) -> Vec<String> {
        self.seen()
            .iter()
            .map(|s| format!("{} {}?{}", s.method, s.path, s.query))
            .collect()
    }
}

fn response(reply: Reply) -> Response<Body> {
    let (status, bytes) = match reply {
        Reply::Json(status, value) => (status, serde_json::to_vec(&value).unwrap()),
        Reply::Text(status, text) => {
            return Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .header("x-content-type-options", "nosniff")
                .body(Body::from(text.as_bytes().to_vec()))
                .unwrap();
        }
        Reply::Events(events) => {
            let mut bytes = Vec::new();
            for e in events {
                bytes.extend(serde_json::to_vec(&e).unwrap());
                bytes.push(b'\n');
            }
            (StatusCode::OK, bytes)
        }
    };
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(bytes))
        .unwrap()
}

pub fn ok(value: Value) -> Reply {
    Reply::Json(StatusCode::OK, value)
}

/// A failure as the API server words it.
pub fn failure(code: u16, reason: &str, message: &str) -> Reply {
    Reply::Json(
        StatusCode::from_u16(code).unwrap(),
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": {}, "code": code
        }),
    )
}

/// The 404 the API server gives for a resource it does not serve (a CRD not installed): not a
/// Status, the plain text of its HTTP mux.
pub fn no_such_resource() -> Reply {
    Reply::Text(StatusCode::NOT_FOUND, "404 page not found\n")
}

/// The 404 for an object that does not exist, in a resource that is served: a Status.
/// `resource` is as the API names it (`leases`), `group` empty for the core group.
pub fn not_found(resource: &str, group: &str, name: &str) -> Reply {
    let qualified = if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    };
    Reply::Json(
        StatusCode::NOT_FOUND,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{qualified} \"{name}\" not found"), "reason": "NotFound",
            "details": {"name": name, "group": group, "kind": resource}, "code": 404
        }),
    )
}

/// A list response. Core lists carry no kind on their items, as the API server sends them.
pub fn list(kind: &str, api_version: &str, resource_version: &str, items: Vec<Value>) -> Reply {
    ok(json!({
        "kind": format!("{kind}List"), "apiVersion": api_version,
        "metadata": {"resourceVersion": resource_version},
        "items": items
    }))
}

pub fn event(type_: &str, object: Value) -> Value {
    json!({"type": type_, "object": object})
}

/// The watch event that says the requested resourceVersion left the watch window.
pub fn gone() -> Value {
    event(
        "ERROR",
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 100 (250)", "reason": "Expired", "code": 410
        }),
    )
}
