//! Bounds on what callers can make identity do: how many certify requests it works on at once,
//! and how many TokenReviews each caller can cause.
//!
//! Every certify with a token costs a TokenReview on the API server. Without a bound, one pod
//! sending garbage tokens in a loop turns identity into an amplifier against the API server,
//! and a burst of requests holds bodies and signing work without limit. So:
//!
//! - at most [`CertifyLimits::max_concurrent`] requests are worked on (CSR checks, TokenReview,
//!   signing) at once; one that waits longer than [`CertifyLimits::queue_timeout`] for its turn
//!   is answered 503 (`unavailable`, retryable). The body, at most 64 KiB, is read before the
//!   turn is taken, so a client that stalls mid-body holds none;
//! - each client IP has a token bucket of [`CertifyLimits::burst`] TokenReviews, refilled at
//!   [`CertifyLimits::reviews_per_second`]; a request over it is answered 429 with
//!   `Retry-After` and no TokenReview is sent. A proxy certifies once at start and renews about
//!   every 17 hours, so the defaults only ever stop a loop. Local mode (a token file) sends no
//!   TokenReview and is not limited per caller.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The settings; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CertifyLimits {
    pub max_concurrent: usize,
    pub queue_timeout: Duration,
    pub reviews_per_second: f64,
    pub burst: u32,
}

impl Default for CertifyLimits {
    fn default() -> Self {
        CertifyLimits {
            max_concurrent: 64,
            queue_timeout: Duration::from_secs(2),
            reviews_per_second: 1.0,
            burst: 10,
        }
    }
}

/// Callers tracked before idle ones (full buckets, which behave exactly like a fresh one) are
/// forgotten.
const PRUNE_AT: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Per-IP token buckets.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub fn new(reviews_per_second: f64, burst: u32) -> Self {
        RateLimiter {
            rate: reviews_per_second.max(0.0),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.updated = now;
    }

    /// Takes one TokenReview from `caller`'s bucket, or says how long until one is there.
    pub fn take(&self, caller: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= PRUNE_AT && !buckets.contains_key(&caller) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
                b.tokens + elapsed * rate < burst
            });
        }
        let bucket = buckets.entry(caller).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        self.refill(bucket, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - bucket.tokens;
        Err(if self.rate > 0.0 {
            Duration::from_secs_f64(missing / self.rate)
        } else {
            Duration::MAX
        })
    }

    /// Callers currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limiter = RateLimiter::new(2.0, 3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.take(a, t0), Ok(()));
        }
        assert_eq!(limiter.take(a, t0), Err(Duration::from_millis(500)));
        // Another caller has its own bucket.
        assert_eq!(limiter.take(b, t0), Ok(()));
        // Half a second later one review is back, not more.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(limiter.take(a, t1), Ok(()));
        assert!(limiter.take(a, t1).is_err());
        // A long pause refills to the burst, never beyond.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(limiter.take(a, t2), Ok(()));
        }
        assert!(limiter.take(a, t2).is_err());
    }

    #[test]
    fn idle_callers_are_forgotten() {
        let limiter = RateLimiter::new(1.0, 2);
        let t0 = Instant::now();
        for i in 0..PRUNE_AT as u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            limiter.take(ip, t0).unwrap();
        }
        assert_eq!(limiter.tracked(), PRUNE_AT);
        // Later every bucket is full again: a new caller prunes them all.
        let later = t0 + Duration::from_secs(10);
        limiter.take("192.168.0.1".parse().unwrap(), later).unwrap();
        assert_eq!(limiter.tracked(), 1);
    }
}
