//! Who listens to which destination, and how many may.
//!
//! Streams that ask the same question (client namespace and target) share one
//! [`Subscription`]. One fan-out task follows the index: on each new index it asks every live
//! subscription's question again and publishes the answer only when it differs, so a change
//! wakes only the streams whose policy it changed, and the snapshot is encoded once for all
//! the streams that share it. Unchanged Service policies are the same `Arc` in the new index
//! ([`crate::index::Index::rebuild`]), so asking again is a map lookup and a pointer compare.
//!
//! [`Limits`] caps the streams of one client (its IP address: one pod) and of the whole
//! server; a stream over a cap is refused and counted ([`DiscoveryMetrics`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use trellis_api::discovery::Target;
use trellis_api::policy::OutboundPolicy;

use crate::discovery::Policies;

/// A question streams ask: the client's namespace and the destination.
pub type Question = (String, Target);

/// The current answer to a question, and its line on the wire.
#[derive(Clone, Debug)]
pub struct Answer {
    pub policy: Arc<OutboundPolicy>,
    pub line: Bytes,
}

/// One question and its answer, shared by every stream that asks it; gone with the last one.
#[derive(Debug)]
pub struct Subscription {
    question: Question,
    answer: watch::Sender<Answer>,
}

impl Subscription {
    /// The answers, starting with the current one (already seen: the stream sends it first).
    pub fn watch(&self) -> watch::Receiver<Answer> {
        self.answer.subscribe()
    }

    pub fn question(&self) -> &Question {
        &self.question
    }
}

/// Every live subscription.
#[derive(Debug, Default)]
pub struct Subscriptions {
    by_question: Mutex<HashMap<Question, Weak<Subscription>>>,
}

impl Subscriptions {
    /// The subscription to `question`, created with its answer in the `newest` index if no
    /// stream asks it yet. `None` when the answer cannot be encoded.
    ///
    /// The index is read under the subscriptions' lock, and [`Subscriptions::publish`] takes
    /// the lock after reading its index: either the new subscription is published to, or it
    /// was created from that index or a newer one. No change falls in between.
    pub fn subscribe<P: Policies>(
        &self,
        newest: impl FnOnce() -> Arc<P>,
        question: Question,
    ) -> Option<Arc<Subscription>> {
        let mut by_question = self.by_question.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = by_question.get(&question).and_then(Weak::upgrade) {
            return Some(live);
        }
        let policy = newest().shared(&question.0, &question.1);
        let line = encode(&policy)?;
        let (answer, _) = watch::channel(Answer { policy, line });
        let sub = Arc::new(Subscription {
            question: question.clone(),
            answer,
        });
        by_question.insert(question, Arc::downgrade(&sub));
        Some(sub)
    }

    /// Asks every live question of `index` and publishes the answers that changed; returns how
    /// many did. Forgets the questions nobody asks any more.
    pub fn publish<P: Policies>(&self, index: &P) -> usize {
        let live: Vec<Arc<Subscription>> = {
            let mut by_question = self.by_question.lock().unwrap_or_else(|p| p.into_inner());
            by_question.retain(|_, sub| sub.strong_count() > 0);
            by_question.values().filter_map(Weak::upgrade).collect()
        };
        let mut changed = 0;
        for sub in live {
            let (ns, target) = &sub.question;
            let policy = index.shared(ns, target);
            let same = {
                let current = sub.answer.borrow();
                Arc::ptr_eq(&current.policy, &policy) || current.policy == policy
            };
            if same {
                continue;
            }
            let Some(line) = encode(&policy) else {
                continue;
            };
            sub.answer.send_replace(Answer { policy, line });
            changed += 1;
        }
        changed
    }

    /// How many distinct questions are asked.
    pub fn len(&self) -> usize {
        let by_question = self.by_question.lock().unwrap_or_else(|p| p.into_inner());
        by_question
            .values()
            .filter(|s| s.strong_count() > 0)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A policy as one line of the stream.
pub fn encode(policy: &OutboundPolicy) -> Option<Bytes> {
    match serde_json::to_vec(policy) {
        Ok(mut line) => {
            line.push(b'\n');
            Some(Bytes::from(line))
        }
        Err(e) => {
            tracing::error!("cannot encode an outbound policy: {e}");
            None
        }
    }
}

/// How many discovery streams may be open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// In total.
    pub total: usize,
    /// From one client IP address (one pod).
    pub per_client: usize,
}

impl Limits {
    pub const DEFAULT_TOTAL: usize = 100_000;
    pub const DEFAULT_PER_CLIENT: usize = 1_000;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            total: Limits::DEFAULT_TOTAL,
            per_client: Limits::DEFAULT_PER_CLIENT,
        }
    }
}

/// Which cap refused a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `Limits::total`.
    Total,
    /// `Limits::per_client`.
    PerClient,
}

impl Refused {
    fn label(self) -> &'static str {
        match self {
            Refused::Total => "total",
            Refused::PerClient => "per_client",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

/// The discovery server's metrics.
#[derive(Clone, Debug, Default)]
pub struct DiscoveryMetrics {
    streams: Gauge,
    refused: Family<LimitLabel, Counter>,
    updates: Counter,
}

impl DiscoveryMetrics {
    /// Metrics registered in `registry` under `trellis_controller_discovery_*`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = DiscoveryMetrics::default();
        let r = registry.sub_registry_with_prefix("trellis_controller_discovery");
        r.register("streams", "Open discovery streams", m.streams.clone());
        // Both labels from the start, so that a rate over them is defined before a refusal.
        for why in [Refused::Total, Refused::PerClient] {
            let _ = m.refused.get_or_create(&LimitLabel { limit: why.label() });
        }
        r.register(
            "streams_refused",
            "Discovery streams refused by a cap (limit: total or per_client)",
            m.refused.clone(),
        );
        r.register(
            "updates",
            "Snapshots sent on open streams after their first, each for a change of the stream's policy",
            m.updates.clone(),
        );
        m
    }

    pub fn update_sent(&self) {
        self.updates.inc();
    }

    /// Snapshots sent after the first, on every stream so far.
    pub fn updates_sent(&self) -> u64 {
        self.updates.get()
    }

    /// Streams open now.
    pub fn open_streams(&self) -> i64 {
        self.streams.get()
    }

    /// Streams refused so far by the cap `why`.
    pub fn refused(&self, why: Refused) -> u64 {
        self.refused
            .get_or_create(&LimitLabel { limit: why.label() })
            .get()
    }
}

/// Counts open streams against [`Limits`].
#[derive(Debug)]
pub struct StreamCounter {
    limits: Limits,
    total: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    metrics: DiscoveryMetrics,
}

/// One open stream; counted until dropped.
#[derive(Debug)]
pub struct Permit {
    counter: Arc<StreamCounter>,
    client: IpAddr,
}

impl StreamCounter {
    pub fn new(limits: Limits, metrics: DiscoveryMetrics) -> Arc<Self> {
        Arc::new(StreamCounter {
            limits,
            total: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// A permit for one more stream from `client`, or the cap that refuses it (counted).
    pub fn open(self: &Arc<Self>, client: IpAddr) -> Result<Permit, Refused> {
        let mut per_client = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let refused = if self.total.load(Ordering::Relaxed) >= self.limits.total {
            Some(Refused::Total)
        } else if per_client.get(&client).copied().unwrap_or(0) >= self.limits.per_client {
            Some(Refused::PerClient)
        } else {
            None
        };
        if let Some(why) = refused {
            self.metrics
                .refused
                .get_or_create(&LimitLabel { limit: why.label() })
                .inc();
            return Err(why);
        }
        *per_client.entry(client).or_default() += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        self.metrics.streams.inc();
        Ok(Permit {
            counter: self.clone(),
            client,
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn metrics(&self) -> &DiscoveryMetrics {
        &self.metrics
    }

    /// Open streams.
    pub fn open_streams(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let c = &self.counter;
        let mut per_client = c.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                per_client.remove(&self.client);
            }
        }
        c.total.fetch_sub(1, Ordering::Relaxed);
        c.metrics.streams.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use trellis_api::Identity;

    use super::*;

    /// Answers `NotAService` with the identity listed for a target, if any.
    struct Fake(HashMap<String, String>);

    impl Policies for Fake {
        fn outbound(&self, ns: &str, target: &Target) -> OutboundPolicy {
            OutboundPolicy::NotAService {
                identity: self
                    .0
                    .get(&target.to_string())
                    .map(|sa| Identity::new("cluster.local", ns, sa)),
            }
        }
    }

    fn fake(entries: &[(&str, &str)]) -> Fake {
        Fake(
            entries
                .iter()
                .map(|(t, sa)| (t.to_string(), sa.to_string()))
                .collect(),
        )
    }

    fn question(target: &str) -> Question {
        ("shop".to_string(), target.parse().unwrap())
    }

    #[test]
    fn a_change_wakes_only_the_streams_whose_answer_it_changes() {
        let subs = Subscriptions::default();
        let before = Arc::new(fake(&[("10.1.0.1:80", "a"), ("10.1.0.2:80", "b")]));
        let newest = || before.clone();
        let one = subs.subscribe(newest, question("10.1.0.1:80")).unwrap();
        let two = subs.subscribe(newest, question("10.1.0.2:80")).unwrap();
        // A second stream asking the same question shares the subscription.
        let one_again = subs.subscribe(newest, question("10.1.0.1:80")).unwrap();
        assert!(Arc::ptr_eq(&one, &one_again));
        assert_eq!(subs.len(), 2);
        let (mut rx1, mut rx2, mut rx1b) = (one.watch(), two.watch(), one_again.watch());

        // The same answers: nobody wakes.
        assert_eq!(
            subs.publish(&fake(&[("10.1.0.1:80", "a"), ("10.1.0.2:80", "b")])),
            0
        );
        // An unrelated change (a target nobody asks about): nobody wakes.
        let unrelated = fake(&[
            ("10.1.0.1:80", "a"),
            ("10.1.0.2:80", "b"),
            ("10.1.0.3:80", "c"),
        ]);
        assert_eq!(subs.publish(&unrelated), 0);
        for rx in [&rx1, &rx2, &rx1b] {
            assert!(!rx.has_changed().unwrap());
        }
        // Only the streams of the changed answer wake, with the new line.
        assert_eq!(
            subs.publish(&fake(&[("10.1.0.1:80", "a"), ("10.1.0.2:80", "b2")])),
            1
        );
        assert!(!rx1.has_changed().unwrap() && !rx1b.has_changed().unwrap());
        assert!(rx2.has_changed().unwrap());
        let line = rx2.borrow_and_update().line.clone();
        assert!(
            String::from_utf8_lossy(&line).contains("/sa/b2"),
            "{line:?}"
        );
        let _ = (&mut rx1, &mut rx1b);

        // The last stream of a question gone, the question is forgotten.
        drop((two, rx2));
        subs.publish(&unrelated);
        assert_eq!(subs.len(), 1);
    }

    #[test]
    fn streams_are_capped_per_client_and_in_total() {
        let metrics = DiscoveryMetrics::default();
        let counter = StreamCounter::new(
            Limits {
                total: 3,
                per_client: 2,
            },
            metrics.clone(),
        );
        let a: IpAddr = "10.1.0.1".parse().unwrap();
        let b: IpAddr = "10.1.0.2".parse().unwrap();
        let a1 = counter.open(a).unwrap();
        let _a2 = counter.open(a).unwrap();
        assert_eq!(counter.open(a).unwrap_err(), Refused::PerClient);
        let b1 = counter.open(b).unwrap();
        assert_eq!(counter.open(b).unwrap_err(), Refused::Total);
        assert_eq!(counter.open_streams(), 3);
        drop(a1);
        let _a3 = counter.open(a).unwrap();
        drop(b1);
        assert_eq!(counter.open_streams(), 2);
        assert_eq!(metrics.refused(Refused::PerClient), 1);
        assert_eq!(metrics.refused(Refused::Total), 1);
    }
}
