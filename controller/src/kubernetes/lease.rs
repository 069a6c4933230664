//! Leader election over a `coordination.k8s.io/v1` Lease, as a pure state machine: what the
//! replica should do next given the Lease it last saw and the time. [`super::leader`] does the
//! API calls and feeds the results back.
//!
//! Only one replica writes route status, so that replicas never fight over it. Expiry is
//! judged on this replica's own clock, from the moment it saw the Lease last change (as
//! client-go does), never by comparing the holder's `renewTime` with our wall clock: the two
//! clocks may disagree by more than a lease duration.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

/// What the election reads from a Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// `holderIdentity`; `None` when empty or released.
    pub holder: Option<String>,
    /// `leaseDurationSeconds`, as the holder set it.
    pub duration: Option<Duration>,
    pub transitions: i32,
    /// `renewTime`: read only to see that the holder is still renewing.
    pub renewed: Option<Timestamp>,
}

impl Record {
    pub fn of(lease: &Lease) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            duration: spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
            transitions: spec.lease_transitions.unwrap_or(0),
            renewed: spec.renew_time.map(|t| t.0),
        }
    }
}

/// The next API call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// There is no Lease: create it, held by us.
    Create,
    /// The Lease is free, or its holder stopped renewing: take it, counting a transition.
    Acquire { transitions: i32 },
    /// We hold it: renew it.
    Renew,
    /// Another replica holds it; it expires at `expires` unless renewed meanwhile.
    Wait { expires: Instant },
}

/// One replica's view of the election.
#[derive(Clone, Debug)]
pub struct Election {
    identity: String,
    /// The duration we write, and assume for a Lease that names none.
    duration: Duration,
    /// The Lease as last seen and when it last changed; `None` before the first read and while
    /// no Lease exists.
    observed: Option<(Record, Instant)>,
    /// When our last write as holder succeeded; `None` whenever we are not the leader.
    renewed_at: Option<Instant>,
}

impl Election {
    pub fn new(identity: impl Into<String>, duration: Duration) -> Self {
        Self {
            identity: identity.into(),
            duration,
            observed: None,
            renewed_at: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Records a read of the Lease (`None`: it does not exist). Seeing another holder ends our
    /// leadership at once.
    pub fn observe(&mut self, lease: Option<Record>, now: Instant) {
        let Some(record) = lease else {
            self.observed = None;
            self.renewed_at = None;
            return;
        };
        if record.holder.as_deref() != Some(self.identity.as_str()) {
            self.renewed_at = None;
        }
        match &self.observed {
            Some((seen, _)) if *seen == record => {}
            _ => self.observed = Some((record, now)),
        }
    }

    /// Records a successful create or update that made us the holder.
    pub fn written(&mut self, record: Record, now: Instant) {
        let ours = record.holder.as_deref() == Some(self.identity.as_str());
        self.observed = Some((record, now));
        self.renewed_at = ours.then_some(now);
    }

    /// Records a failed read or write: we cannot know that we still hold the Lease, so we
    /// stop acting as the leader until a write succeeds again.
    pub fn failed(&mut self) {
        self.renewed_at = None;
    }

    /// Whether this replica may write status now: its last renewal succeeded less than a lease
    /// duration ago and nothing since said otherwise.
    pub fn is_leader(&self, now: Instant) -> bool {
        self.renewed_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.duration)
    }

    /// What to do next.
    pub fn next(&self, now: Instant) -> Action {
        let Some((record, seen)) = &self.observed else {
            return Action::Create;
        };
        let take = Action::Acquire {
            transitions: record.transitions.saturating_add(1),
        };
        match record.holder.as_deref() {
            None => take,
            Some(holder) if holder == self.identity => Action::Renew,
            Some(_) => {
                let expires = *seen + record.duration.unwrap_or(self.duration);
                if now >= expires {
                    take
                } else {
                    Action::Wait { expires }
                }
            }
        }
    }

    /// The spec to write for `action` (not `Wait`): us as holder, `now` as renewal time; the
    /// acquire time and transition count carried over on a renewal.
    pub fn spec(
        &self,
        action: Action,
        current: Option<&Lease>,
        now: Timestamp,
    ) -> k8s_openapi::api::coordination::v1::LeaseSpec {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let previous = current.and_then(|l| l.spec.clone()).unwrap_or_default();
        let (acquired, transitions) = match action {
            Action::Renew => (
                previous.acquire_time.unwrap_or(MicroTime(now)),
                previous.lease_transitions.unwrap_or(0),
            ),
            Action::Acquire { transitions } => (MicroTime(now), transitions),
            Action::Create | Action::Wait { .. } => (MicroTime(now), 0),
        };
        k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            // Whole seconds, rounded up: a shorter written duration would let others take
            // over before this replica stops leading.
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_millis().div_ceil(1000)).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn record(holder: Option<&str>, renewed: &str, transitions: i32) -> Record {
        Record {
            holder: holder.map(str::to_string),
            duration: Some(D),
            transitions,
            renewed: Some(renewed.parse().unwrap()),
        }
    }

    #[test]
    fn no_lease_means_create() {
        let e = Election::new("a", D);
        assert_eq!(e.next(Instant::now()), Action::Create);
        assert!(!e.is_leader(Instant::now()));
    }

    #[test]
    fn a_free_lease_is_taken_at_once_counting_a_transition() {
        let t0 = Instant::now();
        let mut e = Election::new("a", D);
        e.observe(Some(record(None, "2026-01-01T00:00:00Z", 4)), t0);
        assert_eq!(e.next(t0), Action::Acquire { transitions: 5 });
    }

    #[test]
    fn another_holder_is_waited_for_until_a_full_duration_without_change() {
        let t0 = Instant::now();
        let mut e = Election::new("a", D);
        e.observe(Some(record(Some("b"), "2026-01-01T00:00:00Z", 1)), t0);
        assert_eq!(e.next(t0), Action::Wait { expires: t0 + D });
        // The same record read again later does not restart the clock...
        let t1 = t0 + Duration::from_secs(10);
        e.observe(Some(record(Some("b"), "2026-01-01T00:00:00Z", 1)), t1);
        assert_eq!(e.next(t1), Action::Wait { expires: t0 + D });
        // ...and once it has not changed for a whole duration it is taken.
        assert_eq!(e.next(t0 + D), Action::Acquire { transitions: 2 });
        assert!(!e.is_leader(t0 + D));
    }

    #[test]
    fn a_renewal_by_the_holder_restarts_the_clock() {
        let t0 = Instant::now();
        let mut e = Election::new("a", D);
        e.observe(Some(record(Some("b"), "2026-01-01T00:00:00Z", 1)), t0);
        let t1 = t0 + Duration::from_secs(10);
        e.observe(Some(record(Some("b"), "2026-01-01T00:00:05Z", 1)), t1);
        assert_eq!(e.next(t0 + D), Action::Wait { expires: t1 + D });
    }

    #[test]
    fn the_holders_own_duration_counts() {
        let t0 = Instant::now();
        let mut e = Election::new("a", D);
        let mut r = record(Some("b"), "2026-01-01T00:00:00Z", 1);
        r.duration = Some(Duration::from_secs(60));
        e.observe(Some(r), t0);
        assert!(matches!(e.next(t0 + D), Action::Wait { .. }));
        assert_eq!(
            e.next(t0 + Duration::from_secs(60)),
            Action::Acquire { transitions: 2 }
        );
    }

    #[test]
    fn leading_lasts_while_renewals_succeed() {
        let t0 = Instant::now();
        let mut e = Election::new("a", D);
        e.written(record(Some("a"), "2026-01-01T00:00:00Z", 0), t0);
        assert!(e.is_leader(t0));
        assert_eq!(e.next(t0), Action::Renew);
        let t1 = t0 + Duration::from_secs(5);
        e.written(record(Some("a"), "2026-01-01T00:00:05Z", 0), t1);
        assert!(e.is_leader(t1 + Duration::from_secs(14)));
        // Without a renewal for a whole duration, leadership lapses by itself.
        assert!(!e.is_leader(t1 + D));
    }

    #[test]
    fn a_failed_renewal_stops_leading_at_once_but_the_lease_is_still_renewed() {
        let t0 = Instant::now();
        let mut e = Election::new("a", D);
        e.written(record(Some("a"), "2026-01-01T00:00:00Z", 0), t0);
        e.failed();
        assert!(!e.is_leader(t0));
        // The record still names us, so the next step renews (and may lead again).
        assert_eq!(e.next(t0), Action::Renew);
    }

    #[test]
    fn seeing_another_holder_stops_leading_at_once() {
        let t0 = Instant::now();
        let mut e = Election::new("a", D);
        e.written(record(Some("a"), "2026-01-01T00:00:00Z", 0), t0);
        e.observe(Some(record(Some("b"), "2026-01-01T00:00:03Z", 1)), t0);
        assert!(!e.is_leader(t0));
        assert_eq!(e.next(t0), Action::Wait { expires: t0 + D });
    }

    #[test]
    fn a_deleted_lease_is_created_again() {
        let t0 = Instant::now();
        let mut e = Election::new("a", D);
        e.written(record(Some("a"), "2026-01-01T00:00:00Z", 0), t0);
        e.observe(None, t0);
        assert!(!e.is_leader(t0));
        assert_eq!(e.next(t0), Action::Create);
    }

    #[test]
    fn a_lease_still_naming_us_after_a_restart_is_renewed_without_a_transition() {
        let t0 = Instant::now();
        let mut e = Election::new("a", D);
        e.observe(Some(record(Some("a"), "2026-01-01T00:00:00Z", 3)), t0);
        assert!(!e.is_leader(t0));
        assert_eq!(e.next(t0), Action::Renew);
    }

    #[test]
    fn specs_carry_over_acquire_time_on_renewal_only() {
        let e = Election::new("a", D);
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let earlier: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let current = Lease {
            spec: Some(e.spec(Action::Create, None, earlier)),
            ..Default::default()
        };
        let renew = e.spec(Action::Renew, Some(&current), now);
        assert_eq!(renew.acquire_time.map(|t| t.0), Some(earlier));
        assert_eq!(renew.renew_time.map(|t| t.0), Some(now));
        assert_eq!(renew.lease_transitions, Some(0));
        assert_eq!(renew.lease_duration_seconds, Some(15));
        assert_eq!(renew.holder_identity.as_deref(), Some("a"));
        let take = e.spec(Action::Acquire { transitions: 7 }, Some(&current), now);
        assert_eq!(take.acquire_time.map(|t| t.0), Some(now));
        assert_eq!(take.lease_transitions, Some(7));
    }

    #[test]
    fn records_read_empty_holders_as_free() {
        let lease = Lease {
            spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: Some(String::new()),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = Record::of(&lease);
        assert_eq!(r.holder, None);
        assert_eq!(r.duration, Some(D));
        assert_eq!(r.transitions, 0);
    }
}
