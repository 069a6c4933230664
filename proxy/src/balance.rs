//! Endpoint choice: power of two choices over a peak-EWMA latency estimate, with failure
//! accrual.
//!
//! Each endpoint's cost is its (peak-sensitive, decaying) round-trip estimate times its
//! requests in flight plus one. Two endpoints are drawn at random and the cheaper one wins: this
//! avoids both the herd behaviour of "always the least loaded" and a slow endpoint keeping its
//! share. State is in atomics so that picking and recording never take a lock; concurrent
//! updates may lose a sample, which an estimate tolerates.
//!
//! A failure (no connection, a broken exchange, a timeout, a 5xx answer) counts as a round
//! trip of twice the endpoint's current estimate (at most [`MAX_FAILURE_PENALTY`]), so an
//! endpoint that fails fast does not look cheap: each failure in a row doubles its cost, and
//! the estimate's decay brings it back to be tried again. After
//! `--failure-accrual-consecutive` failures in a row an endpoint is ejected: not picked for a
//! probation that starts at `--failure-accrual-probation` and doubles with each ejection in a
//! row up to `--failure-accrual-max-probation`. When the probation ends the endpoint gets
//! requests again with a newcomer's estimate; one more failure ejects it for the next, longer
//! probation, one success clears its record. Ejection never empties a backend: when every endpoint is ejected the
//! balancer picks among them all as if none were.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use trellis_api::Identity;

/// The estimate for an endpoint never measured: optimistic enough to try it, high enough not to
/// send it everything.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast a peak fades: after about this long, old samples weigh 1/e.
const DECAY: Duration = Duration::from_secs(10);
/// The most a failure's doubled estimate can reach.
pub const MAX_FAILURE_PENALTY: Duration = Duration::from_secs(10);

/// Failure accrual settings (`--failure-accrual-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accrual {
    /// Consecutive failures that eject an endpoint; 0 turns ejection off.
    pub failures: u32,
    pub probation: Duration,
    pub max_probation: Duration,
}

impl Default for Accrual {
    fn default() -> Self {
        Self {
            failures: 5,
            probation: Duration::from_secs(1),
            max_probation: Duration::from_secs(60),
        }
    }
}

fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One endpoint, shared by every policy snapshot that lists it so that its estimate survives
/// policy updates.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, made once rather than per request.
    pub authority: http::uri::Authority,
    pub identity: Option<Identity>,
    pub pod: Option<String>,
    pending: AtomicU32,
    /// f64 nanoseconds, as bits.
    rtt_ns: AtomicU64,
    stamp_ns: AtomicU64,
    /// Failures since the last success.
    failures: AtomicU32,
    /// Ejections in a row, for the probation's length.
    ejections: AtomicU32,
    /// Not picked before this (`now_ns` time); 0 when never ejected.
    ejected_until_ns: AtomicU64,
}

impl EndpointState {
    pub fn new(addr: SocketAddr, identity: Option<Identity>, pod: Option<String>) -> Self {
        Self {
            addr,
            authority: crate::hop::authority(addr),
            identity,
            pod,
            pending: AtomicU32::new(0),
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(now_ns()),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
        }
    }

    fn is_ejected_at(&self, now: u64) -> bool {
        self.ejected_until_ns.load(Ordering::Relaxed) > now
    }

    /// Whether the endpoint is ejected now (for `/config` and tests).
    pub fn is_ejected(&self) -> bool {
        self.is_ejected_at(now_ns())
    }

    fn succeeded(&self) {
        // Loads first: most answers are successes of an endpoint with a clean record, and a
        // store would bounce the cache line between threads for nothing.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure at `now`; `true` when it ejects the endpoint.
    fn failed_at(&self, now: u64, accrual: &Accrual) -> bool {
        if accrual.failures == 0 || self.is_ejected_at(now) {
            // Answers to requests sent before the ejection say nothing new.
            return false;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < accrual.failures {
            return false;
        }
        let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let probation = accrual
            .probation
            .saturating_mul(1 << k)
            .min(accrual.max_probation.max(accrual.probation));
        let until = now.saturating_add(u64::try_from(probation.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until_ns.store(until, Ordering::Relaxed);
        // The ejection stands in for the failures' penalty: back from probation the endpoint
        // starts with a newcomer's estimate, so that it is tried rather than left out until
        // a doubled estimate has decayed.
        self.rtt_ns
            .store((DEFAULT_RTT.as_nanos() as f64).to_bits(), Ordering::Relaxed);
        self.stamp_ns.store(now, Ordering::Relaxed);
        // Back from probation, one more failure ejects it again.
        self.failures
            .store(accrual.failures.saturating_sub(1), Ordering::Relaxed);
        true
    }

    /// The estimate decays towards zero while an endpoint gets no answers, so one that lost
    /// to a faster peer is tried again after a while instead of never.
    fn cost_at(&self, now: u64) -> f64 {
        self.estimate_at(now) * f64::from(self.pending.load(Ordering::Relaxed) + 1)
    }

    /// The round-trip estimate in nanoseconds, decayed for the time without answers.
    fn estimate_at(&self, now: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let idle = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
        rtt * (-idle / DECAY.as_nanos() as f64).exp()
    }

    fn observe(&self, rtt: Duration) {
        let now = now_ns();
        let sample = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.stamp_ns.swap(now, Ordering::Relaxed)) as f64;
        let next = if sample > prev {
            // Peak: a slow answer counts at once.
            sample
        } else {
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            prev * w + sample * (1.0 - w)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Marks a request in flight; the latency is recorded when the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: Arc::clone(self),
            started: Instant::now(),
            failed: false,
        }
    }

    pub fn rtt_estimate(&self) -> Duration {
        Duration::from_nanos(f64::from_bits(self.rtt_ns.load(Ordering::Relaxed)) as u64)
    }
}

/// A request in flight to an endpoint.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<EndpointState>,
    started: Instant,
    failed: bool,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }

    /// The request succeeded: the endpoint's failure record is cleared.
    pub fn success(&mut self) {
        self.endpoint.succeeded();
    }

    /// The request failed: its round trip counts as twice the endpoint's estimate, and the
    /// failure towards ejection. `true` when this failure ejected the endpoint.
    pub fn failure(&mut self, accrual: &Accrual) -> bool {
        self.failed = true;
        self.endpoint.failed_at(now_ns(), accrual)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        self.endpoint.observe(match self.failed {
            true => {
                let doubled = 2.0 * self.endpoint.estimate_at(now_ns());
                let penalty = Duration::from_nanos(doubled as u64).min(MAX_FAILURE_PENALTY);
                took.max(penalty)
            }
            false => took,
        });
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of one backend, and its retry budget.
#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Vec<Arc<EndpointState>>,
    /// Retries to this backend (see [`crate::retry`]). It lives with the policy snapshot: a new
    /// snapshot of the destination starts a fresh window.
    pub budget: crate::retry::Budget,
}

impl Balancer {
    pub fn new(endpoints: Vec<Arc<EndpointState>>) -> Self {
        Self {
            endpoints,
            budget: crate::retry::Budget::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn endpoints(&self) -> &[Arc<EndpointState>] {
        &self.endpoints
    }

    /// The cheaper of two random endpoints, or `None` when there is none.
    pub fn pick(&self) -> Option<&Arc<EndpointState>> {
        self.pick_excluding(None)
    }

    /// As [`Balancer::pick`], avoiding `avoid` when another endpoint exists (for retrying a
    /// failed attempt elsewhere). Ejected endpoints are skipped unless every endpoint is.
    pub fn pick_excluding(&self, avoid: Option<SocketAddr>) -> Option<&Arc<EndpointState>> {
        self.pick_at(avoid, now_ns())
    }

    fn pick_at(&self, avoid: Option<SocketAddr>, now: u64) -> Option<&Arc<EndpointState>> {
        let n = self.endpoints.len();
        match n {
            0 => None,
            1 => self.endpoints.first(),
            _ => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                let usable = |e: &EndpointState| Some(e.addr) != avoid && !e.is_ejected_at(now);
                match (usable(ea), usable(eb)) {
                    (true, true) => Some(cheaper(ea, eb, now)),
                    (true, false) => Some(ea),
                    (false, true) => Some(eb),
                    (false, false) => {
                        // Both draws unusable: any usable endpoint, from a random start.
                        let start = fastrand::usize(..n);
                        let any = (0..n)
                            .map(|i| &self.endpoints[(start + i) % n])
                            .find(|e| usable(e));
                        // Every endpoint ejected: ejection gives way rather than fail requests.
                        any.or_else(|| {
                            Some(match (Some(ea.addr) == avoid, Some(eb.addr) == avoid) {
                                (true, _) => eb,
                                (_, true) => ea,
                                _ => cheaper(ea, eb, now),
                            })
                        })
                    }
                }
            }
        }
    }
}

/// Costs within 1 % are a tie, won by the first draw: endpoints set up together differ by
/// microseconds of decay, which must not order them for good.
fn cheaper<'a>(
    a: &'a Arc<EndpointState>,
    b: &'a Arc<EndpointState>,
    now: u64,
) -> &'a Arc<EndpointState> {
    if b.cost_at(now) < a.cost_at(now) * 0.99 {
        b
    } else {
        a
    }
}

/// Endpoint states by address, so that a new policy snapshot reuses the estimates of the last.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    by_addr: Mutex<HashMap<SocketAddr, Weak<EndpointState>>>,
}

impl EndpointRegistry {
    /// The identity of a known endpoint: the connector asks it when it opens a connection.
    pub fn identity_of(&self, addr: SocketAddr) -> Option<Identity> {
        let map = match self.by_addr.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.get(&addr)?.upgrade()?.identity.clone()
    }

    /// Called when a policy is compiled, never per request.
    pub fn get(
        &self,
        addr: SocketAddr,
        identity: Option<&Identity>,
        pod: Option<&String>,
    ) -> Arc<EndpointState> {
        let mut map = match self.by_addr.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(existing) = map.get(&addr).and_then(Weak::upgrade)
            && existing.identity.as_ref() == identity
        {
            return existing;
        }
        let state = Arc::new(EndpointState::new(addr, identity.cloned(), pod.cloned()));
        map.insert(addr, Arc::downgrade(&state));
        // Forget addresses no snapshot holds any more.
        if map.len() > 64 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Arc<EndpointState> {
        Arc::new(EndpointState::new(
            SocketAddr::from(([127, 0, 0, 1], port)),
            None,
            None,
        ))
    }

    #[test]
    fn empty_and_single() {
        assert!(Balancer::default().pick().is_none());
        let b = Balancer::new(vec![ep(1)]);
        assert_eq!(b.pick().map(|e| e.addr.port()), Some(1));
    }

    #[test]
    fn prefers_the_faster_endpoint_but_still_uses_both() {
        let (fast, slow) = (ep(1), ep(2));
        fast.observe(Duration::from_millis(1));
        // Let the fast estimate decay towards its samples.
        for _ in 0..50 {
            fast.observe(Duration::from_millis(1));
        }
        slow.observe(Duration::from_millis(200));
        let b = Balancer::new(vec![fast.clone(), slow.clone()]);
        let picks_fast = (0..1000)
            .filter(|_| b.pick().unwrap().addr.port() == 1)
            .count();
        // With two endpoints, P2C compares both every time: the cheaper one always wins.
        assert_eq!(picks_fast, 1000);
        // Load moves the choice: many requests in flight make the fast one costlier.
        let guards: Vec<InFlight> = (0..1000).map(|_| fast.start()).collect();
        assert_eq!(b.pick().unwrap().addr.port(), 2);
        drop(guards);
        assert_eq!(fast.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn spreads_over_equal_endpoints() {
        let eps: Vec<_> = (1..=4).map(ep).collect();
        let b = Balancer::new(eps);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            let e = b.pick().unwrap();
            counts[usize::from(e.addr.port()) - 1] += 1;
        }
        for c in counts {
            assert!((700..=1300).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn avoids_a_failed_endpoint() {
        let b = Balancer::new(vec![ep(1), ep(2), ep(3)]);
        let avoid = SocketAddr::from(([127, 0, 0, 1], 2));
        for _ in 0..200 {
            assert_ne!(b.pick_excluding(Some(avoid)).unwrap().addr, avoid);
        }
    }

    #[test]
    fn an_idle_endpoint_becomes_cheaper_over_time() {
        let e = ep(1);
        let stamp = e.stamp_ns.load(Ordering::Relaxed);
        let fresh = e.cost_at(stamp);
        let later = e.cost_at(stamp + DECAY.as_nanos() as u64);
        assert!(later < fresh * 0.4, "{later} vs {fresh}");
    }

    #[test]
    fn a_failure_costs_more_than_a_slow_success() {
        let (failing, slow) = (ep(1), ep(2));
        for _ in 0..20 {
            slow.start().success();
            slow.observe(Duration::from_millis(100));
            // Fails at once: without the penalty it would look the cheaper one.
            let mut g = failing.start();
            g.failure(&Accrual {
                failures: 0,
                ..Accrual::default()
            });
        }
        assert!(failing.rtt_estimate() > slow.rtt_estimate());
        assert!(failing.rtt_estimate() <= MAX_FAILURE_PENALTY);
        let b = Balancer::new(vec![failing, slow]);
        assert!((0..100).all(|_| b.pick().unwrap().addr.port() == 2));
    }

    #[test]
    fn ejection_after_consecutive_failures_with_doubling_probation() {
        let accrual = Accrual {
            failures: 3,
            probation: Duration::from_secs(1),
            max_probation: Duration::from_secs(4),
        };
        let s = Duration::from_secs(1).as_nanos() as u64;
        let e = ep(1);
        let t0 = 1_000 * s;
        // A success in between resets the count.
        assert!(!e.failed_at(t0, &accrual));
        assert!(!e.failed_at(t0, &accrual));
        e.succeeded();
        assert!(!e.failed_at(t0, &accrual));
        assert!(!e.failed_at(t0, &accrual));
        assert!(e.failed_at(t0, &accrual));
        assert!(e.is_ejected_at(t0 + s - 1));
        // Failures of requests already in flight do not extend it.
        assert!(!e.failed_at(t0 + 1, &accrual));
        assert!(!e.is_ejected_at(t0 + s));
        // Back on probation: one failure ejects again, for twice as long, then four times,
        // then at most `max_probation`.
        let mut t = t0 + s;
        for probation in [2, 4, 4, 4] {
            assert!(e.failed_at(t, &accrual));
            assert!(e.is_ejected_at(t + probation * s - 1));
            assert!(!e.is_ejected_at(t + probation * s));
            t += probation * s;
        }
        // A success clears the record: the next ejection takes `failures` again and starts over.
        e.succeeded();
        assert!(!e.failed_at(t, &accrual));
        assert!(!e.failed_at(t, &accrual));
        assert!(e.failed_at(t, &accrual));
        assert!(!e.is_ejected_at(t + s));
        // Ejection off.
        let off = Accrual {
            failures: 0,
            ..accrual
        };
        let e = ep(2);
        assert!((0..100).all(|_| !e.failed_at(t0, &off)));
    }

    #[test]
    fn ejected_endpoints_are_skipped_but_never_all() {
        let accrual = Accrual {
            failures: 1,
            ..Accrual::default()
        };
        let eps: Vec<_> = (1..=4).map(ep).collect();
        let b = Balancer::new(eps.clone());
        let now = now_ns();
        assert!(eps[0].failed_at(now, &accrual));
        assert!(eps[1].failed_at(now, &accrual));
        for _ in 0..500 {
            let port = b.pick_at(None, now + 1).unwrap().addr.port();
            assert!(port == 3 || port == 4, "{port}");
        }
        // Avoiding one of the two left: always the other.
        let avoid = Some(eps[2].addr);
        assert!((0..200).all(|_| b.pick_at(avoid, now + 1).unwrap().addr.port() == 4));
        // All ejected: every endpoint is picked again.
        assert!(eps[2].failed_at(now, &accrual));
        assert!(eps[3].failed_at(now, &accrual));
        let mut seen = [false; 4];
        for _ in 0..500 {
            seen[usize::from(b.pick_at(None, now + 1).unwrap().addr.port()) - 1] = true;
        }
        assert_eq!(seen, [true; 4]);
    }

    #[test]
    fn registry_reuses_state_while_identity_is_unchanged() {
        let reg = EndpointRegistry::default();
        let addr = SocketAddr::from(([10, 0, 0, 1], 80));
        let id = Identity::new("td", "ns", "sa");
        let a = reg.get(addr, Some(&id), None);
        let b = reg.get(addr, Some(&id), None);
        assert!(Arc::ptr_eq(&a, &b));
        let c = reg.get(addr, None, None);
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
