//! When a request may be sent again, how long to wait first, and how many retries a backend
//! can take: the pure parts of retries, apart from the I/O in `outbound`.
//!
//! - **Safety.** Another attempt is made only when its body can be sent whole again (see
//!   [`crate::replay`]) and one of: nothing reached the endpoint (the connect failed), the
//!   route's retry codes name the response's status (the Gateway API's semantics: the route's
//!   author asked for it, whatever the method), or the method is idempotent and the attempt
//!   failed on the connection or timed out. A POST that failed after bytes were sent is never
//!   sent again.
//! - **Attempts** are capped at [`MAX_RETRIES`] retries, whatever the route asks.
//! - **Backoff** is exponential from the route's `backoff` ([`DEFAULT_BACKOFF`] when unset),
//!   with jitter that only ever lengthens the wait, so `backoff` stays a minimum.
//! - **Budget.** Retries to a backend may add at most a ratio of its original requests over a
//!   sliding window, plus a minimum rate so that a quiet backend can still be retried (Finagle's
//!   and Linkerd's retry budget). When the budget is spent the failed answer goes to the client.
//!
//! [`Deadline`] is the other half of a rule's resilience settings: the request timeout's bound
//! on the response stream.

use std::sync::Mutex;
use std::time::Duration;

use http::Method;
use tokio::time::Instant;

/// The most retries after the first attempt, whatever a route's `attempts` says.
pub const MAX_RETRIES: u32 = 5;
/// The first wait when the route gives no `backoff`.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// Waits double up to this (or the route's `backoff`, if longer) before jitter.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Methods RFC 9110 §9.2.2 calls idempotent: sending one twice has the effect of sending it
/// once, so it may be retried even when the first attempt may have reached the server.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// How an attempt failed, for the retry decision and the `reason` label of `trellis_retries`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection was made: nothing was sent.
    Connect,
    /// The connection failed after the request may have been (partly) sent.
    Connection,
    /// The backend request timeout expired before the response headers.
    Timeout,
    /// A response whose status (or gRPC status) the route's retry policy names.
    Status,
}

impl Failure {
    pub fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Connection => "connection",
            Failure::Timeout => "timeout",
            Failure::Status => "status",
        }
    }

    /// Whether the request may be sent again after this failure, given its method. The body's
    /// replayability and the attempt count are checked by the caller.
    pub fn is_safe_to_retry(self, method: &Method) -> bool {
        match self {
            Failure::Connect | Failure::Status => true,
            Failure::Connection | Failure::Timeout => is_idempotent(method),
        }
    }
}

/// The wait before retry `n` (1 for the first retry): `base·2^(n−1)`, at most
/// `max(base, MAX_BACKOFF)`, times a uniform factor in [1, 1.5).
pub fn backoff(base: Option<Duration>, n: u32, jitter: f64) -> Duration {
    let base = base.unwrap_or(DEFAULT_BACKOFF);
    let cap = base.max(MAX_BACKOFF);
    let exp = base.saturating_mul(1u32 << n.saturating_sub(1).min(16));
    exp.min(cap).mul_f64(1.0 + jitter.clamp(0.0, 1.0) * 0.5)
}

/// Budget settings: `--retry-budget-ratio`, `--retry-budget-min-per-second`,
/// `--retry-budget-window`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetSettings {
    pub ratio: f64,
    pub min_per_second: f64,
    pub window: Duration,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10.0,
            window: Duration::from_secs(10),
        }
    }
}

/// Slots of the sliding window: deposits and withdrawals older than the window fall out a
/// slot at a time.
const SLOTS: usize = 10;

/// A retry budget over a sliding window: original requests deposit, retries withdraw.
#[derive(Debug)]
pub struct Budget(Mutex<Window>);

#[derive(Debug)]
struct Window {
    /// The slot `head` covers `[start, start + slot)`.
    start: Instant,
    head: usize,
    requests: [u32; SLOTS],
    retries: [u32; SLOTS],
}

impl Default for Budget {
    fn default() -> Self {
        Budget(Mutex::new(Window {
            start: Instant::now(),
            head: 0,
            requests: [0; SLOTS],
            retries: [0; SLOTS],
        }))
    }
}

impl Budget {
    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Records an original request.
    pub fn deposit(&self, settings: &BudgetSettings) {
        let mut w = self.lock();
        w.advance(settings.window);
        let h = w.head;
        w.requests[h] = w.requests[h].saturating_add(1);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn withdraw(&self, settings: &BudgetSettings) -> bool {
        let mut w = self.lock();
        w.advance(settings.window);
        let requests: u32 = w.requests.iter().sum();
        let retries: u32 = w.retries.iter().sum();
        let allowed = settings.ratio * f64::from(requests)
            + settings.min_per_second * settings.window.as_secs_f64();
        if f64::from(retries) + 1.0 > allowed {
            return false;
        }
        let h = w.head;
        w.retries[h] += 1;
        true
    }
}

impl Window {
    fn advance(&mut self, window: Duration) {
        let slot = (window / SLOTS as u32).max(Duration::from_millis(1));
        let now = Instant::now();
        let mut moved = 0;
        while now.duration_since(self.start) >= slot {
            self.start += slot;
            self.head = (self.head + 1) % SLOTS;
            self.requests[self.head] = 0;
            self.retries[self.head] = 0;
            moved += 1;
            if moved == SLOTS {
                // Idle for a whole window: every slot is clear; catch up at once.
                let behind = now.duration_since(self.start);
                let skip = behind.as_nanos() / slot.as_nanos();
                self.start += slot * u32::try_from(skip).unwrap_or(u32::MAX);
                break;
            }
        }
    }
}

/// A response body cut at the rule's request deadline (`timeouts.request` bounds the whole
/// exchange, the response stream included). An HTTP body ends with an error, which the client
/// sees as a reset stream or a response cut before its end; a gRPC body ends with trailers
/// carrying `DEADLINE_EXCEEDED` (4), as a gRPC server's own deadline would.
pub struct Deadline {
    inner: crate::http::Body,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    grpc: bool,
    done: bool,
    /// Counted when the deadline cuts the body.
    expired: Option<(
        prometheus_client::metrics::family::Family<
            crate::metrics::TimeoutLabels,
            prometheus_client::metrics::counter::Counter,
        >,
        crate::metrics::TimeoutLabels,
    )>,
}

impl std::fmt::Debug for Deadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadline")
            .field("grpc", &self.grpc)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Deadline {
    pub fn new(
        inner: crate::http::Body,
        at: Instant,
        grpc: bool,
        expired: (
            prometheus_client::metrics::family::Family<
                crate::metrics::TimeoutLabels,
                prometheus_client::metrics::counter::Counter,
            >,
            crate::metrics::TimeoutLabels,
        ),
    ) -> Self {
        Self {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(at)),
            grpc,
            done: false,
            expired: Some(expired),
        }
    }
}

/// The error a response body cut at the request deadline ends with.
#[derive(Debug, thiserror::Error)]
#[error("the route's request timeout expired while the response was streaming")]
pub struct StreamTimedOut;

impl hyper::body::Body for Deadline {
    type Data = bytes::Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            if frame.is_none() {
                self.done = true;
            }
            return Poll::Ready(frame);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.done = true;
        if let Some((family, labels)) = self.expired.take() {
            family.get_or_create(&labels).inc();
        }
        if self.grpc {
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("4"));
            t.insert(
                "grpc-message",
                http::HeaderValue::from_static("the route's request timeout expired"),
            );
            return Poll::Ready(Some(Ok(hyper::body::Frame::trailers(t))));
        }
        Poll::Ready(Some(Err(Box::new(StreamTimedOut))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safety_by_method_and_failure() {
        for m in [Method::GET, Method::PUT, Method::DELETE, Method::HEAD] {
            assert!(Failure::Connection.is_safe_to_retry(&m), "{m}");
            assert!(Failure::Timeout.is_safe_to_retry(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!Failure::Connection.is_safe_to_retry(&m), "{m}");
            assert!(!Failure::Timeout.is_safe_to_retry(&m), "{m}");
            assert!(Failure::Connect.is_safe_to_retry(&m), "{m}");
            assert!(Failure::Status.is_safe_to_retry(&m), "{m}");
        }
    }

    #[test]
    fn backoff_doubles_is_capped_and_never_under_the_base() {
        let ms = Duration::from_millis;
        assert_eq!(backoff(None, 1, 0.0), ms(25));
        assert_eq!(backoff(None, 2, 0.0), ms(50));
        assert_eq!(backoff(None, 3, 0.999_999).as_millis(), 149);
        assert_eq!(backoff(Some(ms(100)), 5, 0.0), ms(1000));
        assert_eq!(backoff(Some(ms(100)), 50, 0.0), ms(1000));
        assert_eq!(backoff(Some(ms(100)), 6, 1.0), ms(1500));
        // A backoff above the cap is still a minimum.
        assert_eq!(backoff(Some(ms(3000)), 3, 0.0), ms(3000));
        for _ in 0..100 {
            let d = backoff(Some(ms(10)), 1, fastrand::f64());
            assert!(d >= ms(10) && d < ms(15), "{d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_the_ratio_plus_the_minimum_and_refills() {
        let s = BudgetSettings {
            ratio: 0.2,
            min_per_second: 1.0,
            window: Duration::from_secs(10),
        };
        let b = Budget::default();
        for _ in 0..100 {
            b.deposit(&s);
        }
        // 0.2 × 100 + 1/s × 10 s.
        let granted = (0..1000).filter(|_| b.withdraw(&s)).count();
        assert_eq!(granted, 30);
        // Half a window later the spent retries still count.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!b.withdraw(&s));
        // A whole window later everything has fallen out but the minimum.
        tokio::time::advance(Duration::from_secs(6)).await;
        let granted = (0..1000).filter(|_| b.withdraw(&s)).count();
        assert_eq!(granted, 10);
    }

    fn expired_counter() -> (
        prometheus_client::metrics::family::Family<
            crate::metrics::TimeoutLabels,
            prometheus_client::metrics::counter::Counter,
        >,
        crate::metrics::TimeoutLabels,
    ) {
        let empty: std::sync::Arc<str> = std::sync::Arc::from("");
        let labels = crate::metrics::TimeoutLabels {
            at: crate::metrics::RouteBackendLabels {
                direction: "outbound",
                parent: empty.clone(),
                route: empty.clone(),
                backend: empty,
            },
            timeout: "request",
        };
        (Default::default(), labels)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_response_is_cut_at_the_deadline() {
        use http_body_util::BodyExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let stalled = http_body_util::BodyExt::boxed_unsync(Chunks(rx));
        let (family, labels) = expired_counter();
        let at = Instant::now() + Duration::from_secs(2);
        let mut body = Deadline::new(stalled, at, false, (family.clone(), labels.clone()));
        tx.send(bytes::Bytes::from_static(b"first")).await.unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "first");
        // Nothing more comes: the next read ends at the deadline, with an error.
        let started = Instant::now();
        assert!(body.frame().await.unwrap().is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert!(body.frame().await.is_none());
        assert_eq!(family.get_or_create(&labels).get(), 1);
        // gRPC: DEADLINE_EXCEEDED trailers instead.
        let (_tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let at = Instant::now() + Duration::from_secs(1);
        let grpc = Deadline::new(Chunks(rx).boxed_unsync(), at, true, expired_counter());
        let collected = grpc.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "4");
        drop(tx);
    }

    /// A response body fed chunk by chunk; it ends when the sender is dropped.
    struct Chunks(tokio::sync::mpsc::Receiver<bytes::Bytes>);

    impl hyper::body::Body for Chunks {
        type Data = bytes::Bytes;
        type Error = crate::http::BoxError;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>>
        {
            self.0
                .poll_recv(cx)
                .map(|c| c.map(|c| Ok(hyper::body::Frame::data(c))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_slides_slot_by_slot() {
        let s = BudgetSettings {
            ratio: 1.0,
            min_per_second: 0.0,
            window: Duration::from_secs(10),
        };
        let b = Budget::default();
        for _ in 0..10 {
            b.deposit(&s);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..10 {
            b.deposit(&s);
        }
        // The first ten leave the window after 10 s, the others 5 s later.
        tokio::time::advance(Duration::from_millis(5500)).await;
        assert_eq!((0..100).filter(|_| b.withdraw(&s)).count(), 10);
        // Idle for a long time: nothing left, and no slow catch-up.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!b.withdraw(&s));
        b.deposit(&s);
        assert!(b.withdraw(&s));
    }
}
