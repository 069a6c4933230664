//! Endpoint choice: power of two choices over a peak-EWMA latency estimate.
//!
//! Each endpoint's cost is its (peak-sensitive, decaying) round-trip estimate times its
//! requests in flight plus one. Two endpoints are drawn at random and the cheaper one wins: this
//! avoids both the herd behaviour of "always the least loaded" and a slow endpoint keeping its
//! share. State is in atomics so that picking and recording never take a lock; concurrent
//! updates may lose a sample, which an estimate tolerates.

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
        }
    }

    /// The estimate decays towards zero while an endpoint gets no answers, so one that lost
    /// to a faster peer is tried again after a while instead of never.
    fn cost(&self) -> f64 {
        self.cost_at(now_ns())
    }

    fn cost_at(&self, now: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let idle = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
        let decayed = rtt * (-idle / DECAY.as_nanos() as f64).exp();
        decayed * f64::from(self.pending.load(Ordering::Relaxed) + 1)
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
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.observe(self.started.elapsed());
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of one backend.
#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Vec<Arc<EndpointState>>,
}

impl Balancer {
    pub fn new(endpoints: Vec<Arc<EndpointState>>) -> Self {
        Self { endpoints }
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
    /// failed connection elsewhere).
    pub fn pick_excluding(&self, avoid: Option<SocketAddr>) -> Option<&Arc<EndpointState>> {
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
                if Some(ea.addr) == avoid {
                    return Some(eb);
                }
                if Some(eb.addr) == avoid {
                    return Some(ea);
                }
                // Costs within 1 % are a tie, won by the first draw: endpoints set up together
                // differ by microseconds of decay, which must not order them for good.
                Some(if eb.cost() < ea.cost() * 0.99 { eb } else { ea })
            }
        }
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
