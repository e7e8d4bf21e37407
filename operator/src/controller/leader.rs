//! Leader election on a `coordination.k8s.io/v1` Lease, written with the Lease API.
//!
//! Every replica runs [`LeaderElection`]. Every `retry_period` it reads the Lease:
//! - no Lease: it creates one naming itself (a conflict means another replica was faster);
//! - its own: it renews `renewTime` with a replace guarded by `resourceVersion`;
//! - another holder's: it waits until it has seen the Lease unchanged for `lease_duration`
//!   (measured on its own clock, so clock skew between nodes does not matter), then takes it
//!   over, again guarded by `resourceVersion` so that only one standby wins.
//!
//! A standby that has seen the Lease unchanged wakes up exactly when the lease duration is over
//! rather than at its next retry, so a crashed leader is replaced `lease_duration` after the
//! standby last saw it renew (between `lease_duration - retry_period` and `lease_duration +
//! retry_period` after the crash, as the crash falls between renewals and the renewal between
//! reads). A leader that cannot renew for `renew_deadline` (shorter than `lease_duration`, counted
//! from the start of its last successful renewal) stops leading then, before any standby may take
//! over. [`LeaderElection::step_down`] releases the Lease (empty holder) so that a standby takes
//! over at its next retry instead of after the lease duration: call it on graceful shutdown.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

use crate::metrics::ControllerMetrics;

/// Where the Lease lives and how it is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    /// Lease name, e.g. `sluice-operator`.
    pub name: String,
    /// This replica's identity (its pod name): unique among replicas.
    pub identity: String,
    /// How long a standby waits after the Lease stopped changing before taking it over.
    pub lease_duration: Duration,
    /// How long a leader keeps leading without a successful renewal. Below `lease_duration`.
    pub renew_deadline: Duration,
    /// How often the Lease is read and renewed.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// A Lease held with [`LeaseTimings::default`].
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        let timings = LeaseTimings::default();
        LeaseConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: timings.lease_duration,
            renew_deadline: timings.renew_deadline,
            retry_period: timings.retry_period,
        }
    }

    pub fn with_timings(self, timings: LeaseTimings) -> Self {
        LeaseConfig {
            lease_duration: timings.lease_duration,
            renew_deadline: timings.renew_deadline,
            retry_period: timings.retry_period,
            ..self
        }
    }
}

/// How long a Lease is held, renewed and waited for (`--lease-duration`,
/// `--lease-renew-deadline`, `--lease-retry-period`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTimings {
    /// A crashed leader is replaced about this long after its last renewal. Whole seconds: the
    /// Lease stores seconds, and a standby waits for what the Lease says.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops leading.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby reads the Lease: a released Lease is taken
    /// over within this.
    pub retry_period: Duration,
}

impl Default for LeaseTimings {
    /// 10 s lease, 7 s renew deadline, 1 s retry: a graceful handover within 1 s, a crash
    /// takeover in about 10 s, and a leader that rides out 6 s of API server trouble.
    fn default() -> Self {
        LeaseTimings {
            lease_duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(7),
            retry_period: Duration::from_secs(1),
        }
    }
}

/// Lease timings that would let two replicas lead at once, or spin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseTimingsError {
    #[error(
        "--lease-duration must be a whole number of seconds, at least 1s (the Lease stores seconds), not {0:?}"
    )]
    Duration(Duration),
    #[error(
        "--lease-renew-deadline ({renew_deadline:?}) must be shorter than --lease-duration ({lease_duration:?}): \
         a leader that cannot renew must stop before a standby may take over"
    )]
    RenewDeadline {
        renew_deadline: Duration,
        lease_duration: Duration,
    },
    #[error(
        "--lease-retry-period ({retry_period:?}) must be above zero and shorter than --lease-renew-deadline \
         ({renew_deadline:?}): the leader must get more than one try to renew before it gives up"
    )]
    RetryPeriod {
        retry_period: Duration,
        renew_deadline: Duration,
    },
}

impl LeaseTimings {
    pub fn validate(&self) -> Result<(), LeaseTimingsError> {
        let LeaseTimings {
            lease_duration,
            renew_deadline,
            retry_period,
        } = *self;
        if lease_duration < Duration::from_secs(1) || lease_duration.subsec_nanos() != 0 {
            return Err(LeaseTimingsError::Duration(lease_duration));
        }
        if renew_deadline >= lease_duration {
            return Err(LeaseTimingsError::RenewDeadline {
                renew_deadline,
                lease_duration,
            });
        }
        if retry_period.is_zero() || retry_period >= renew_deadline {
            return Err(LeaseTimingsError::RetryPeriod {
                retry_period,
                renew_deadline,
            });
        }
        Ok(())
    }
}

/// A running election. Dropping it stops the election without releasing the Lease.
pub struct LeaderElection {
    leading: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl LeaderElection {
    /// Starts electing in a background task.
    pub fn start(client: Client, config: LeaseConfig, metrics: Option<ControllerMetrics>) -> Self {
        let (tx, leading) = watch::channel(false);
        let (stop, stopped) = oneshot::channel();
        let elector = Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            last_renewal: None,
            expires: None,
            leading: tx,
            metrics,
        };
        LeaderElection {
            leading,
            stop: Some(stop),
            task: tokio::spawn(elector.run(stopped)),
        }
    }

    /// `true` while this replica leads. The engine waits for `true` before serving shims and
    /// must stop serving when it turns back to `false`.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Stops leading and releases the Lease if this replica holds it.
    pub async fn step_down(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for LeaderElection {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The Lease's last seen resourceVersion, and when this replica first saw it.
    observed: Option<(String, Instant)>,
    /// When this replica started its last successful renewal (or acquisition): the renew
    /// deadline counts from the request, not the answer, so that a slow answer cannot stretch it
    /// past the moment a standby starts counting.
    last_renewal: Option<Instant>,
    /// When the Lease another replica holds will have been unchanged for its duration: a
    /// standby tries again then rather than at its next retry.
    expires: Option<Instant>,
    leading: watch::Sender<bool>,
    metrics: Option<ControllerMetrics>,
}

impl Elector {
    async fn run(mut self, mut stopped: oneshot::Receiver<()>) {
        loop {
            // An API server that hangs must not keep a leader leading past its renew deadline.
            let mut limit = self.config.retry_period.max(Duration::from_secs(1)) * 2;
            if let Some(renewed) = self.last_renewal {
                let left = self.config.renew_deadline.saturating_sub(renewed.elapsed());
                limit = limit.min(left.max(Duration::from_millis(100)));
            }
            let started = Instant::now();
            self.expires = None;
            let attempt = tokio::select! {
                r = tokio::time::timeout(limit, self.try_acquire_or_renew()) => r,
                _ = &mut stopped => break,
            };
            match attempt.unwrap_or_else(|_| Err(kube::Error::Service("lease request timed out".into()))) {
                Ok(true) => {
                    self.last_renewal = Some(started);
                    self.set_leading(true);
                }
                Ok(false) => self.set_leading(false),
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.config.name, "leader election: lease request failed");
                    let expired = self
                        .last_renewal
                        .is_none_or(|t| t.elapsed() >= self.config.renew_deadline);
                    if expired {
                        self.set_leading(false);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.next_attempt_in()) => {}
                _ = &mut stopped => break,
            }
        }
        self.release().await;
    }

    /// The retry period, or less when something is due before it: the Lease expiring for a
    /// standby, the renew deadline for a leader that could not renew. Waiting for the next retry
    /// instead would add up to one retry period to every crash takeover.
    fn next_attempt_in(&self) -> Duration {
        let due = match (*self.leading.borrow(), self.last_renewal) {
            (true, Some(renewed)) => Some(renewed + self.config.renew_deadline),
            (false, _) => self.expires,
            (true, None) => None,
        };
        let wait = self.config.retry_period;
        due.map_or(wait, |at| wait.min(at.saturating_duration_since(Instant::now())))
    }

    fn set_leading(&mut self, now: bool) {
        let was = *self.leading.borrow();
        if was != now {
            if now {
                tracing::info!(identity = %self.config.identity, "leader election: now leading");
            } else {
                tracing::warn!(identity = %self.config.identity, "leader election: not leading");
                self.last_renewal = None;
            }
            if let Some(m) = &self.metrics {
                m.leader.set(i64::from(now));
                if now {
                    m.leader_transitions.inc();
                }
            }
            self.leading.send_replace(now);
        }
    }

    fn now() -> Option<MicroTime> {
        Some(MicroTime(Timestamp::now()))
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One round: `Ok(true)` when this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> kube::Result<bool> {
        let me = self.config.identity.clone();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Self::now(),
                    renew_time: Self::now(),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let version = lease.resource_version().unwrap_or_default();
        if self.observed.as_ref().is_none_or(|(v, _)| *v != version) {
            self.observed = Some((version, Instant::now()));
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() == Some(me.as_str()) {
            spec.renew_time = Self::now();
            spec.lease_duration_seconds = Some(self.duration_secs());
        } else {
            if holder.is_some() {
                if *self.leading.borrow() {
                    // Another replica took the Lease over: this one lost it.
                    return Ok(false);
                }
                let held_for = spec
                    .lease_duration_seconds
                    .map_or(self.config.lease_duration, |s| {
                        Duration::from_secs(u64::try_from(s.max(1)).unwrap_or(1))
                    });
                let unchanged_since = self.observed.as_ref().map_or_else(Instant::now, |(_, t)| *t);
                if unchanged_since.elapsed() < held_for {
                    self.expires = Some(unchanged_since + held_for);
                    return Ok(false);
                }
            }
            tracing::info!(from = ?holder, identity = %me, "leader election: taking over the lease");
            spec.holder_identity = Some(me);
            spec.acquire_time = Self::now();
            spec.renew_time = Self::now();
            spec.lease_duration_seconds = Some(self.duration_secs());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up, if held, so that a standby need not wait for it to expire. Bounded:
    /// a stopping replica does not wait on a hanging API server (the Lease then expires).
    async fn release(&mut self) {
        let held = *self.leading.borrow();
        self.set_leading(false);
        if !held {
            return;
        }
        let limit = self.config.retry_period.max(Duration::from_secs(1)) * 2;
        let release = async {
            let mut lease = self.api.get(&self.config.name).await?;
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Self::now();
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        };
        match tokio::time::timeout(limit, release).await {
            Ok(Ok(())) => tracing::info!(lease = %self.config.name, "leader election: released the lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election: could not release the lease"),
            Err(_) => tracing::warn!(?limit, "leader election: releasing the lease timed out"),
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}
