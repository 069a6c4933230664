//! When a connection last did something, for idle timeouts that cost two atomics per event
//! instead of a timer reset per read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Shared by everything that uses one connection: its two sides, or its requests.
#[derive(Clone, Debug)]
pub struct Clock(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    start: Instant,
    /// Milliseconds since `start` of the last activity.
    last_ms: AtomicU64,
    /// Work in flight (requests): never idle meanwhile.
    active: AtomicUsize,
}

impl Default for Clock {
    fn default() -> Self {
        Clock(Arc::new(Inner {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            active: AtomicUsize::new(0),
        }))
    }
}

impl Clock {
    pub fn touch(&self) {
        let ms = u64::try_from(self.0.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks work in flight until the guard drops.
    pub fn begin(&self) -> Busy {
        self.0.active.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    /// Resolves once nothing has been in flight or moved for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.0.start + Duration::from_millis(self.0.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if self.0.active.load(Ordering::Relaxed) == 0 && Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.max(Instant::now() + idle / 4)).await;
        }
    }
}

/// Work in flight; see [`Clock::begin`].
#[derive(Debug)]
pub struct Busy(Clock);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_means_nothing_moved_and_nothing_in_flight() {
        let clock = Clock::default();
        let idle = Duration::from_secs(10);
        let started = Instant::now();
        let waiter = clock.clone();
        let done = tokio::spawn(async move { waiter.idle_for(idle).await });
        tokio::time::sleep(Duration::from_secs(6)).await;
        clock.touch();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(!done.is_finished(), "bytes moved 6 s ago");
        let busy = clock.begin();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!done.is_finished(), "a request is in flight");
        drop(busy);
        done.await.unwrap();
        // Idle 10 s after the request ended at 42 s; checks run at most a quarter of the
        // timeout late.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(52) && took <= Duration::from_secs(55),
            "{took:?}"
        );
    }
}
