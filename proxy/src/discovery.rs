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

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpStream;
use tokio::sync::watch;
use trellis_api::discovery::{ErrorBody, NDJSON, OUTBOUND_PATH, Target};
use trellis_api::policy::OutboundPolicy;

use crate::balance::EndpointRegistry;
use crate::config::Config;
use crate::policy::Policy;

/// A connection attempt that takes longer than this is abandoned and retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pings find a controller that vanished without closing the connection (node loss, partition).
const KEEPALIVE: Duration = Duration::from_secs(20);
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
        }
    }

    /// The client settings of `trellis-proxy run`.
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
    /// When the last [`Subscription`] was dropped (ms on [`now_ms`]'s clock).
    released_ms: AtomicU64,
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

    /// The policy in force, if one arrived yet.
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

    /// Every followed destination with the raw snapshot in force, sorted, for `/config`.
    pub fn snapshot(&self) -> Vec<(String, Option<OutboundPolicy>)> {
        let states: Vec<Arc<TargetState>> = self.inner.targets().values().cloned().collect();
        let mut out: Vec<_> = states
            .iter()
            .map(|s| {
                let policy = s.tx.borrow().as_ref().map(|p| p.snapshot.clone());
                (s.target.to_string(), policy)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
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
                state.tx.send_replace(Some(Arc::new(policy)));
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
                if inner.controller.is_connected() {
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
    let mut send = inner.controller.get().await;
    let mut uri = format!(
        "http://{}{OUTBOUND_PATH}?namespace=",
        inner.cfg.controller_addr
    );
    push_query_value(&mut uri, &inner.cfg.namespace);
    uri.push_str("&target=");
    push_query_value(&mut uri, &state.target.to_string());
    let request = Request::get(uri)
        .header(header::ACCEPT, NDJSON)
        .body(Empty::new())?;
    let response = send
        .send_request(request)
        .await
        .map_err(StreamError::Send)?;
    let status = response.status();
    if status.is_client_error() {
        let message = error_message(response.into_body()).await;
        return Err(StreamError::Rejected { status, message });
    }
    if status != StatusCode::OK {
        return Err(StreamError::Status(status));
    }
    let mut body = response.into_body();
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

/// The `error` of an [`ErrorBody`], or the body as text.
async fn error_message(body: hyper::body::Incoming) -> String {
    let read = tokio::time::timeout(
        CONNECT_TIMEOUT,
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

/// The one connection to the controller, opened on demand and again after it ends.
struct Controller {
    addr: String,
    backoff: (Duration, Duration),
    slot: tokio::sync::Mutex<Slot>,
    /// Generation of the open connection (0: none), so that the end of an old connection does
    /// not mark a newer one as down.
    live: Arc<Mutex<u64>>,
    metrics: Metrics,
}

#[derive(Default)]
struct Slot {
    send: Option<http2::SendRequest<Empty<Bytes>>>,
    connected_at: Option<Instant>,
    /// Connection attempts since the last connection that stayed up for a while.
    attempts: u32,
    generation: u64,
}

impl Controller {
    fn new(cfg: &DiscoveryConfig, metrics: Metrics) -> Self {
        Self {
            addr: cfg.controller_addr.clone(),
            backoff: (cfg.backoff_min, cfg.backoff_max),
            slot: tokio::sync::Mutex::new(Slot::default()),
            live: Arc::new(Mutex::new(0)),
            metrics,
        }
    }

    fn is_connected(&self) -> bool {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) != 0
    }

    /// A handle on the open connection, connecting (with backoff) until that succeeds. Callers
    /// queue on the slot, so all destinations share one connection and one retry schedule.
    async fn get(&self) -> http2::SendRequest<Empty<Bytes>> {
        let mut slot = self.slot.lock().await;
        loop {
            if let Some(send) = &slot.send {
                if !send.is_closed() {
                    return send.clone();
                }
                slot.send = None;
                if slot
                    .connected_at
                    .is_some_and(|t| t.elapsed() >= self.backoff.1)
                {
                    slot.attempts = 0;
                }
            }
            if slot.generation > 0 || slot.attempts > 0 {
                let cap = backoff_cap(slot.attempts, self.backoff.0, self.backoff.1);
                tokio::time::sleep(jittered(cap)).await;
            }
            slot.attempts = slot.attempts.saturating_add(1);
            match connect_controller(&self.addr).await {
                Ok((send, connection)) => {
                    if slot.generation > 0 {
                        self.metrics.reconnects.inc();
                    }
                    slot.generation += 1;
                    slot.connected_at = Some(Instant::now());
                    slot.send = Some(send);
                    self.up(slot.generation, connection);
                    tracing::info!(controller = %self.addr, "discovery: connected to the controller");
                }
                Err(error) => {
                    tracing::warn!(controller = %self.addr, %error, attempt = slot.attempts, "discovery: cannot connect to the controller");
                }
            }
        }
    }

    /// Marks the connection up and drives it; marks it down when it ends.
    fn up<F>(&self, generation: u64, connection: F)
    where
        F: Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = generation;
        self.metrics.connected.set(1);
        let (live, metrics, addr) = (self.live.clone(), self.metrics.clone(), self.addr.clone());
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => {
                    tracing::info!(controller = %addr, "discovery: connection to the controller closed")
                }
                Err(error) => {
                    tracing::warn!(controller = %addr, %error, "discovery: connection to the controller lost")
                }
            }
            let mut live = live.lock().unwrap_or_else(|p| p.into_inner());
            if *live == generation {
                *live = 0;
                metrics.connected.set(0);
            }
        });
    }
}

/// Why the controller could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, #[source] std::io::Error),
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(std::net::SocketAddr, #[source] std::io::Error),
    #[error("timed out after {CONNECT_TIMEOUT:?}")]
    Timeout,
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
}

/// The whole hop to the controller: resolve, connect, HTTP/2 handshake. Mutual TLS wraps the
/// `TcpStream` here, between connect and handshake.
async fn connect_controller(
    addr: &str,
) -> Result<
    (
        http2::SendRequest<Empty<Bytes>>,
        impl Future<Output = Result<(), hyper::Error>> + Send + 'static,
    ),
    ConnectError,
> {
    let hop = async {
        let addrs = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| ConnectError::Resolve(addr.to_string(), e))?;
        let mut last = ConnectError::NoAddress(addr.to_string());
        let mut tcp = None;
        for sa in addrs {
            match TcpStream::connect(sa).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(e) => last = ConnectError::Connect(sa, e),
            }
        }
        let tcp = tcp.ok_or(last)?;
        // Snapshots are latency-sensitive and the requests tiny.
        let _ = tcp.set_nodelay(true);
        http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(ConnectError::Handshake)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, hop)
        .await
        .map_err(|_| ConnectError::Timeout)?
}

/// The upper bound of the `attempt`-th retry delay (from 0): doubling from `min`, capped.
pub(crate) fn backoff_cap(attempt: u32, min: Duration, max: Duration) -> Duration {
    min.saturating_mul(1u32 << attempt.min(30)).min(max)
}

/// Full jitter: uniform in `[0, cap]`.
fn jittered(cap: Duration) -> Duration {
    cap.mul_f64(fastrand::f64())
}

/// A snapshot line exceeded the configured cap.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a snapshot line is longer than {0} bytes")]
pub struct LineTooLong(pub usize);

/// Splits a byte stream into lines, whatever the frame boundaries.
#[derive(Debug)]
pub(crate) struct LineBuffer {
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no newline, so a long line is scanned once.
    scanned: usize,
    max: usize,
}

impl LineBuffer {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            max,
        }
    }

    pub(crate) fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete line without its `\n` (or `\r\n`); blank lines are skipped.
    pub(crate) fn next_line(&mut self) -> Result<Option<Bytes>, LineTooLong> {
        loop {
            let Some(i) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') else {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max {
                    return Err(LineTooLong(self.max));
                }
                return Ok(None);
            };
            let end = self.scanned + i;
            let mut line = self.buf.split_to(end + 1);
            self.scanned = 0;
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            if line.len() > self.max {
                return Err(LineTooLong(self.max));
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                return Ok(Some(line.freeze()));
            }
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

    fn lines(max: usize, frames: &[&[u8]]) -> Result<Vec<String>, LineTooLong> {
        let mut buf = LineBuffer::new(max);
        let mut out = Vec::new();
        for frame in frames {
            buf.extend(frame);
            while let Some(line) = buf.next_line()? {
                out.push(String::from_utf8(line.to_vec()).unwrap());
            }
        }
        Ok(out)
    }

    #[test]
    fn lines_across_frames() {
        assert_eq!(
            lines(100, &[b"{\"a\"", b":1}\n{\"b\":2}\n{", b"\"c\":3}", b"\n"]).unwrap(),
            ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]
        );
        // CRLF, blank and whitespace-only lines (keep-alives) are tolerated.
        assert_eq!(lines(100, &[b"a\r\n\n \r\nb\n"]).unwrap(), ["a", "b"]);
        // An unterminated tail is not a line yet.
        assert_eq!(lines(100, &[b"a\nb"]).unwrap(), ["a"]);
        // One byte per frame.
        let text = b"{\"x\":[1,2,3]}\n{}\n";
        let frames: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(lines(100, &frames).unwrap(), ["{\"x\":[1,2,3]}", "{}"]);
    }

    #[test]
    fn line_cap() {
        assert_eq!(lines(4, &[b"1234\n"]).unwrap(), ["1234"]);
        assert_eq!(lines(4, &[b"1234\r\n"]).unwrap(), ["1234"]);
        assert_eq!(lines(4, &[b"12345\n"]), Err(LineTooLong(4)));
        // Caught while still unterminated, before it grows further.
        assert_eq!(lines(4, &[b"123", b"45"]), Err(LineTooLong(4)));
        // A long line split over many frames is scanned incrementally and still accepted.
        let long = vec![b'x'; 10_000];
        let mut frames: Vec<&[u8]> = long.chunks(7).collect();
        frames.push(b"\n");
        assert_eq!(lines(10_000, &frames).unwrap()[0].len(), 10_000);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_stays_below() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
        let caps: Vec<u128> = (0..10)
            .map(|a| backoff_cap(a, min, max).as_millis())
            .collect();
        assert_eq!(
            caps,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        assert_eq!(backoff_cap(u32::MAX, min, max), max);
        let draws: Vec<Duration> = (0..1000).map(|_| jittered(max)).collect();
        assert!(draws.iter().all(|d| *d <= max));
        // Full jitter spreads over the whole range.
        assert!(draws.iter().any(|d| *d < max / 4) && draws.iter().any(|d| *d > max * 3 / 4));
    }

    #[test]
    fn query_values_are_encoded() {
        let mut s = String::new();
        push_query_value(&mut s, "[fd00::1]:80 a&b=c/é");
        assert_eq!(s, "%5Bfd00::1%5D:80%20a%26b%3Dc%2F%C3%A9");
    }
}
