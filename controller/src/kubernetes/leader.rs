//! The API side of leader election: reads, creates and updates the Lease as
//! [`Election`](super::lease::Election) decides, and publishes whether this replica is the
//! leader. Uses `get`, `create` and `update` on `leases` in the controller's namespace.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

use super::lease::{Action, Election, Record};

/// Timing of the election.
#[derive(Clone, Debug)]
pub struct LeaseTiming {
    /// How long a Lease stays valid without renewal: how soon a standby takes over from a
    /// leader that vanished.
    pub duration: Duration,
    /// How often the leader renews; also the time limit of each API call, so that a hung
    /// call is a failed renewal long before the Lease expires for the others.
    pub renew_every: Duration,
    /// How often a standby reads the Lease.
    pub retry_every: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            retry_every: Duration::from_secs(2),
        }
    }
}

/// Takes part in the election until `stop` is set, publishing on `leader` whether this replica
/// may write status. On stop, a held Lease is released so that a standby takes over at once.
pub async fn run(
    leases: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    leader: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut election = Election::new(identity, timing.duration);
    // The Lease as last read or written: an update must name its resourceVersion.
    let mut current: Option<Lease> = None;
    // After our own successful write we know the Lease's state and skip the read.
    let mut fresh = false;
    let limit = timing.renew_every;
    loop {
        if !fresh {
            match tokio::time::timeout(limit, leases.get_opt(&name)).await {
                Ok(Ok(lease)) => {
                    election.observe(lease.as_ref().map(Record::of), Instant::now());
                    current = lease;
                }
                Ok(Err(e)) => {
                    election.failed();
                    tracing::warn!("cannot read Lease {name}: {e}");
                }
                Err(_) => {
                    election.failed();
                    tracing::warn!("reading Lease {name} timed out");
                }
            }
        }
        fresh = false;
        let now = Instant::now();
        let action = election.next(now);
        let written = match action {
            Action::Wait { .. } => None,
            Action::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    spec: Some(election.spec(action, None, Timestamp::now())),
                };
                Some(
                    tokio::time::timeout(limit, leases.create(&PostParams::default(), &lease))
                        .await,
                )
            }
            Action::Acquire { .. } | Action::Renew => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        resource_version: current
                            .as_ref()
                            .and_then(|l| l.metadata.resource_version.clone()),
                        ..Default::default()
                    },
                    spec: Some(election.spec(action, current.as_ref(), Timestamp::now())),
                };
                Some(
                    tokio::time::timeout(
                        limit,
                        leases.replace(&name, &PostParams::default(), &lease),
                    )
                    .await,
                )
            }
        };
        let mut retry_now = false;
        match written {
            None => {}
            Some(Ok(Ok(lease))) => {
                election.written(Record::of(&lease), Instant::now());
                current = Some(lease);
                fresh = true;
            }
            Some(Ok(Err(e))) => {
                election.failed();
                if is_conflict(&e) {
                    // Someone else wrote it first: read it and decide again, at once.
                    tracing::debug!("Lease {name} changed meanwhile; reading it again");
                    retry_now = true;
                } else {
                    tracing::warn!("cannot write Lease {name}: {e}");
                }
            }
            Some(Err(_)) => {
                election.failed();
                tracing::warn!("writing Lease {name} timed out");
            }
        }
        let leading = election.is_leader(Instant::now());
        let changed = leader.send_if_modified(|l| std::mem::replace(l, leading) != leading);
        if changed && leading {
            tracing::info!("holding Lease {name}: this replica writes route status");
        } else if changed {
            tracing::warn!("lost Lease {name}: this replica stopped writing route status");
        }

        let pause = match (retry_now, leading, action) {
            (true, _, _) => Duration::ZERO,
            (_, true, _) => timing.renew_every,
            (_, false, Action::Wait { expires }) => timing
                .retry_every
                .min(expires.saturating_duration_since(Instant::now())),
            _ => timing.retry_every,
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }

    if election.is_leader(Instant::now()) {
        leader.send_replace(false);
        release(&leases, &name, current, timing.renew_every).await;
    }
}

/// Clears the holder so that a standby need not wait for the Lease to expire.
async fn release(leases: &Api<Lease>, name: &str, current: Option<Lease>, limit: Duration) {
    let Some(mut lease) = current else { return };
    if let Some(spec) = &mut lease.spec {
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
    }
    match tokio::time::timeout(limit, leases.replace(name, &PostParams::default(), &lease)).await {
        Ok(Ok(_)) => tracing::info!("released Lease {name}"),
        Ok(Err(e)) => {
            tracing::warn!("cannot release Lease {name}, a standby takes over when it expires: {e}")
        }
        Err(_) => {
            tracing::warn!("releasing Lease {name} timed out, a standby takes over when it expires")
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists())
}
