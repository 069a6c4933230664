//! The discovery client: follows the controller's policy stream of each destination in use.
//!
//! Every destination is one HTTP/2 stream on a single connection to the controller (see
//! [`trellis_api::discovery`]), so a proxy costs the controller one socket however many
//! destinations its app talks to. Each destination has a task that reads its stream, compiles
//! each new snapshot once and publishes it on a `watch` channel; requests only read the channel.
//! The last good policy stays in force through invalid snapshots and controller outages.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;
use trellis_api::discovery::{ErrorBody, NDJSON, OUTBOUND_PATH, Target};
use trellis_api::policy::OutboundPolicy;
use trellis_tls::PeerClient;

use crate::balance::EndpointRegistry;
use crate::config::Config;
use crate::policy::Policy;

mod anchors;
mod controller;
mod lines;

use controller::{Controller, backoff_cap, jittered};
use lines::{LineBuffer, LineTooLong};

/// The controller answers a stream with its first snapshot at once; waiting longer than this
/// for the answer's head means it is stuck, and asking again is the way out.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of an error answer read for the log.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Settings of the discovery client.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// The controller's discovery address, `host:port`; resolved again on every connect so that
    /// a moved controller Service is followed.
    pub controller_addr: String,
    /// The pod's namespace: selects consumer routes and resolves short names.
    pub namespace: String,
    /// A destination without a live [`Subscription`] for this long is dropped.
    pub idle: Duration,
    /// Reconnect delays grow from `backoff_min` to `backoff_max`, each drawn at random below
    /// the bound (full jitter) so that proxies do not reconnect in step after a restart.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Delay before asking again about a destination the controller refused (4xx): asking
    /// sooner would not change the answer.
    pub rejected_retry: Duration,
    /// The longest snapshot line accepted; a longer one drops the stream.
    pub max_line: usize,
    /// Mutual TLS to the controller, with the sidecar's certificate and the controller's
    /// identity; `None`: plaintext (no identity, local development).
    pub tls: Option<PeerClient>,
}

impl DiscoveryConfig {
    /// The given settings, and defaults for the rest.
    pub fn new(
        controller_addr: impl Into<String>,
        namespace: impl Into<String>,
        idle: Duration,
    ) -> Self {
        Self {
            controller_addr: controller_addr.into(),
            namespace: namespace.into(),
            idle,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            rejected_retry: Duration::from_secs(30),
            max_line: 16 * 1024 * 1024,
            tls: None,
        }
    }

    /// The client settings of `trellis-proxy run`, but for `tls`, which needs the sidecar's
    /// credentials.
    pub fn from_config(config: &Config) -> Self {
        Self::new(
            &config.args.controller_addr,
            &config.args.namespace,
            config.args.discovery_idle,
        )
    }
}

/// The discovery client; cheap to clone.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: DiscoveryConfig,
    endpoints: Arc<EndpointRegistry>,
    metrics: Metrics,
    controller: Controller,
    targets: Mutex<HashMap<Target, Arc<TargetState>>>,
}

/// One destination: the channel its task publishes on.
#[derive(Debug)]
struct TargetState {
    target: Target,
    tx: watch::Sender<Option<Arc<Policy>>>,
    /// When the policy on `tx` was received, for `/config`. Set under this lock together with
    /// `tx` (by the destination's one task), so a reader never pairs a policy with another's
    /// time; requests never take it.
    received: Mutex<Option<Received>>,
    /// When the last [`Subscription`] was dropped (ms on [`now_ms`]'s clock).
    released_ms: AtomicU64,
}

/// When a policy was received: the wall clock for people, a monotonic instant for its age.
#[derive(Clone, Copy, Debug)]
struct Received {
    at: SystemTime,
    instant: Instant,
}

/// One followed destination as `/config` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Held {
    pub target: String,
    /// The snapshot in force; `None` until the controller's first answer.
    pub policy: Option<OutboundPolicy>,
    /// When that snapshot arrived (a snapshot equal to the one in force does not count), and
    /// how long ago.
    pub received_at: Option<SystemTime>,
    pub age: Option<Duration>,
}

/// The policy of one destination as it changes. Keeping one alive keeps the destination
/// followed; dropping the last starts its idle timer.
#[derive(Debug)]
pub struct Subscription {
    rx: watch::Receiver<Option<Arc<Policy>>>,
    state: Arc<TargetState>,
}

impl Subscription {
    fn new(state: Arc<TargetState>) -> Self {
        Self {
            rx: state.tx.subscribe(),
            state,
        }
    }

    /// The policy in force, if one arrived yet. A read of the channel and an `Arc` clone: meant
    /// to be called per request.
    pub fn current(&self) -> Option<Arc<Policy>> {
        self.rx.borrow().clone()
    }

    /// The policy in force, waiting up to `max` for the first one.
    pub async fn wait(&mut self, max: Duration) -> Option<Arc<Policy>> {
        if let Ok(Ok(policy)) = tokio::time::timeout(max, self.rx.wait_for(Option::is_some)).await {
            return policy.clone();
        }
        self.current()
    }

    /// Completes when the policy changes, for holders that cache what they derived from it.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Clone for Subscription {
    fn clone(&self) -> Self {
        Self {
            rx: self.rx.clone(),
            state: self.state.clone(),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.state.released_ms.store(now_ms(), Ordering::Relaxed);
    }
}

impl Discovery {
    /// Registers the client's metrics; nothing connects until the first [`Discovery::subscribe`].
    pub fn new(
        cfg: DiscoveryConfig,
        endpoints: Arc<EndpointRegistry>,
        registry: &mut Registry,
    ) -> Discovery {
        let metrics = Metrics::register(registry);
        let controller = Controller::new(&cfg, metrics.clone());
        Discovery {
            inner: Arc::new(Inner {
                cfg,
                endpoints,
                metrics,
                controller,
                targets: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Follows `target`: the first subscription starts its stream, later ones share it. Takes a
    /// lock, so call it once per connection or cache, not per request. Needs a Tokio runtime.
    pub fn subscribe(&self, target: &Target) -> Subscription {
        let mut targets = self.inner.targets();
        if let Some(state) = targets.get(target) {
            return Subscription::new(state.clone());
        }
        let state = Arc::new(TargetState {
            target: target.clone(),
            tx: watch::Sender::new(None),
            received: Mutex::new(None),
            released_ms: AtomicU64::new(now_ms()),
        });
        // Subscribed before the task starts, so that it does not see an idle destination.
        let subscription = Subscription::new(state.clone());
        targets.insert(target.clone(), state.clone());
        self.inner.metrics.streams.set(gauge_len(targets.len()));
        drop(targets);
        tokio::spawn(run_target(self.inner.clone(), state));
        subscription
    }

    /// Every followed destination with the raw snapshot in force, sorted.
    pub fn snapshot(&self) -> Vec<(String, Option<OutboundPolicy>)> {
        self.held()
            .into_iter()
            .map(|h| (h.target, h.policy))
            .collect()
    }

    /// Every followed destination with the raw snapshot in force and when it was received,
    /// sorted, for `/config`.
    pub fn held(&self) -> Vec<Held> {
        let states: Vec<Arc<TargetState>> = self.inner.targets().values().cloned().collect();
        let mut out: Vec<_> = states
            .iter()
            .map(|s| {
                let received = lock(&s.received);
                let policy = s.tx.borrow().as_ref().map(|p| p.snapshot.clone());
                Held {
                    target: s.target.to_string(),
                    policy,
                    received_at: received.map(|r| r.at),
                    age: received.map(|r| r.instant.elapsed()),
                }
            })
            .collect();
        out.sort_by(|a, b| a.target.cmp(&b.target));
        out
    }

    pub fn namespace(&self) -> &str {
        &self.inner.cfg.namespace
    }
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("controller_addr", &self.inner.cfg.controller_addr)
            .field("namespace", &self.inner.cfg.namespace)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn targets(&self) -> MutexGuard<'_, HashMap<Target, Arc<TargetState>>> {
        // The map is consistent after any panic: entries are inserted or removed whole.
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one line of a stream; returns whether it was a valid snapshot.
    fn apply(&self, state: &TargetState, line: &[u8]) -> bool {
        let destination = &state.target;
        let snapshot = match serde_json::from_slice::<OutboundPolicy>(line) {
            Ok(snapshot) => snapshot,
            Err(error) => {
                tracing::warn!(%destination, %error, "discovery: invalid snapshot, keeping the last good policy");
                self.metrics.invalid.inc();
                return false;
            }
        };
        self.metrics.touch();
        let unchanged = state
            .tx
            .borrow()
            .as_ref()
            .is_some_and(|p| p.snapshot == snapshot);
        if unchanged {
            self.metrics.unchanged.inc();
            return true;
        }
        match Policy::compile(snapshot, &self.endpoints) {
            Ok(policy) => {
                tracing::debug!(%destination, "discovery: new policy");
                {
                    let mut received = lock(&state.received);
                    state.tx.send_replace(Some(Arc::new(policy)));
                    *received = Some(Received {
                        at: SystemTime::now(),
                        instant: Instant::now(),
                    });
                }
                self.metrics.applied.inc();
                true
            }
            Err(error) => {
                tracing::warn!(%destination, %error, "discovery: snapshot does not compile, keeping the last good policy");
                self.metrics.invalid.inc();
                false
            }
        }
    }
}

/// Follows one destination until it has been idle long enough.
async fn run_target(inner: Arc<Inner>, state: Arc<TargetState>) {
    tokio::select! {
        never = follow(&inner, &state) => match never {},
        () = until_idle(&inner, &state) => {}
    }
    // Dropping `follow` dropped its response body, which cancels the HTTP/2 stream.
    tracing::debug!(destination = %state.target, "discovery: idle destination dropped");
}

/// Completes once no subscription has existed for `idle`, after removing the destination.
async fn until_idle(inner: &Inner, state: &Arc<TargetState>) {
    let idle_ms = u64::try_from(inner.cfg.idle.as_millis()).unwrap_or(u64::MAX);
    loop {
        state.tx.closed().await;
        let unused = now_ms().saturating_sub(state.released_ms.load(Ordering::Relaxed));
        if unused < idle_ms {
            tokio::time::sleep(Duration::from_millis(idle_ms - unused)).await;
            continue;
        }
        // Checked again under the lock: `subscribe` may have just handed out a receiver.
        let mut targets = inner.targets();
        if state.tx.receiver_count() == 0 {
            if targets
                .get(&state.target)
                .is_some_and(|s| Arc::ptr_eq(s, state))
            {
                targets.remove(&state.target);
            }
            inner.metrics.streams.set(gauge_len(targets.len()));
            return;
        }
    }
}

/// Reads the destination's stream, opening it again after every end, forever.
async fn follow(inner: &Inner, state: &TargetState) -> Infallible {
    let mut failures = 0u32;
    loop {
        let mut received = false;
        let Err(error) = stream(inner, state, &mut received).await;
        if received {
            failures = 0;
        }
        let destination = &state.target;
        let delay = match &error {
            StreamError::Rejected { .. } => {
                tracing::warn!(%destination, %error, "discovery: the controller refused the destination");
                inner
                    .cfg
                    .rejected_retry
                    .mul_f64(0.5 + fastrand::f64() / 2.0)
            }
            _ => {
                if matches!(error, StreamError::LineTooLong(_)) {
                    inner.metrics.invalid.inc();
                }
                if matches!(error, StreamError::Ended) {
                    // The controller closes streams when it shuts down: routine.
                    tracing::info!(%destination, "discovery: the controller ended the stream, keeping the last policy");
                } else if inner.controller.is_connected() {
                    tracing::warn!(%destination, %error, "discovery: stream ended, keeping the last policy");
                } else {
                    tracing::debug!(%destination, %error, "discovery: stream ended with the connection");
                }
                failures = failures.saturating_add(1);
                jittered(backoff_cap(
                    failures - 1,
                    inner.cfg.backoff_min,
                    inner.cfg.backoff_max,
                ))
            }
        };
        tokio::time::sleep(delay).await;
    }
}

/// Why a destination's stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("cannot build the request: {0}")]
    Request(#[from] http::Error),
    #[error("request failed: {0}")]
    Send(#[source] hyper::Error),
    #[error("no answer within {RESPONSE_TIMEOUT:?}")]
    Timeout,
    #[error("the controller answered {status}: {message}")]
    Rejected { status: StatusCode, message: String },
    #[error("the controller answered {0}")]
    Status(StatusCode),
    #[error("stream failed: {0}")]
    Body(#[source] hyper::Error),
    #[error(transparent)]
    LineTooLong(#[from] LineTooLong),
    #[error("the controller ended the stream")]
    Ended,
}

/// One request for the destination's stream, read until it ends.
async fn stream(
    inner: &Inner,
    state: &TargetState,
    received: &mut bool,
) -> Result<Infallible, StreamError> {
    let scheme = if inner.cfg.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut uri = format!(
        "{scheme}://{}{OUTBOUND_PATH}?namespace=",
        inner.cfg.controller_addr
    );
    push_query_value(&mut uri, &inner.cfg.namespace);
    uri.push_str("&target=");
    push_query_value(&mut uri, &state.target.to_string());
    let mut body = open(inner, uri).await?;
    let mut lines = LineBuffer::new(inner.cfg.max_line);
    loop {
        let frame = match body.frame().await {
            None => return Err(StreamError::Ended),
            Some(frame) => frame.map_err(StreamError::Body)?,
        };
        if let Ok(data) = frame.into_data() {
            lines.extend(&data);
            while let Some(line) = lines.next_line()? {
                *received |= inner.apply(state, &line);
            }
        }
    }
}

/// Asks the controller for a stream at `uri` on the shared connection: its body once the
/// answer is `200`, or why not.
async fn open(inner: &Inner, uri: String) -> Result<hyper::body::Incoming, StreamError> {
    let mut send = inner.controller.get().await;
    let request = Request::get(uri)
        .header(header::ACCEPT, NDJSON)
        .body(Empty::new())?;
    let response = tokio::time::timeout(RESPONSE_TIMEOUT, send.send_request(request))
        .await
        .map_err(|_| StreamError::Timeout)?
        .map_err(StreamError::Send)?;
    let status = response.status();
    if status.is_client_error() {
        let message = error_message(response.into_body()).await;
        return Err(StreamError::Rejected { status, message });
    }
    if status != StatusCode::OK {
        return Err(StreamError::Status(status));
    }
    Ok(response.into_body())
}

/// The `error` of an [`ErrorBody`], or the body as text.
async fn error_message(body: hyper::body::Incoming) -> String {
    let read = tokio::time::timeout(
        RESPONSE_TIMEOUT,
        Limited::new(body, MAX_ERROR_BODY).collect(),
    );
    match read.await {
        Ok(Ok(collected)) => {
            let bytes = collected.to_bytes();
            serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
        }
        _ => "(no readable error message)".to_string(),
    }
}

/// Percent-encodes a query value (`:` is kept: it is legal there and keeps logs readable).
fn push_query_value(out: &mut String, value: &str) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// The client's metrics; see docs/reference/proxy-metrics.md.
#[derive(Clone, Debug)]
struct Metrics {
    applied: Counter,
    unchanged: Counter,
    invalid: Counter,
    streams: Gauge,
    connected: Gauge,
    reconnects: Counter,
    last_update: Gauge<f64, AtomicU64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let updates = Family::<ResultLabel, Counter>::default();
        let result = |result| updates.get_or_create(&ResultLabel { result }).clone();
        let metrics = Self {
            applied: result("applied"),
            unchanged: result("unchanged"),
            invalid: result("invalid"),
            streams: Gauge::default(),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            last_update: Gauge::default(),
        };
        registry.register(
            "trellis_discovery_updates",
            "Snapshots received from the controller, by result: applied, unchanged (same as the policy in force) or invalid (did not parse or compile; the last good policy stays)",
            updates,
        );
        registry.register(
            "trellis_discovery_streams",
            "Destinations followed (one discovery stream each)",
            metrics.streams.clone(),
        );
        registry.register(
            "trellis_discovery_connected",
            "1 while the connection to the controller is up, else 0",
            metrics.connected.clone(),
        );
        registry.register(
            "trellis_discovery_reconnects",
            "Connections to the controller opened after the first one",
            metrics.reconnects.clone(),
        );
        registry.register_with_unit(
            "trellis_discovery_last_update_timestamp",
            "Unix time of the last valid snapshot received (0: none yet)",
            Unit::Seconds,
            metrics.last_update.clone(),
        );
        metrics
    }

    fn touch(&self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_update.set(now);
    }
}

/// A lock whose value is whole after any panic (it is only ever replaced).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn gauge_len(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Milliseconds on a monotonic clock.
fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        let mut s = String::new();
        push_query_value(&mut s, "[fd00::1]:80 a&b=c/é");
        assert_eq!(s, "%5Bfd00::1%5D:80%20a%26b%3Dc%2F%C3%A9");
    }
}
