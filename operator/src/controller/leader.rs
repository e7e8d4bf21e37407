//! Leader election on a `coordination.k8s.io/v1` Lease, written with the Lease API.
//!
//! Every replica runs [`LeaderElection`]. Every `retry_period` it reads the Lease:
//! - no Lease: it creates one naming itself (a conflict means another replica was faster);
//! - its own: it renews `renewTime` with a replace guarded by `resourceVersion`;
//! - another holder's: it waits until it has seen the Lease unchanged for `lease_duration`
//!   (measured on its own clock, so clock skew between nodes does not matter), then takes it
//!   over, again guarded by `resourceVersion` so that only one standby wins.
//!
//! A leader that cannot renew for `renew_deadline` (shorter than `lease_duration`) stops
//! leading before any standby may take over. [`LeaderElection::step_down`] releases the Lease
//! (empty holder) so that a standby takes over at its next retry instead of after the lease
//! duration: call it on graceful shutdown.

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
    /// client-go's defaults, tightened: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
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
    /// When this replica last renewed (or acquired) successfully.
    last_renewal: Option<Instant>,
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
            let attempt = tokio::select! {
                r = tokio::time::timeout(limit, self.try_acquire_or_renew()) => r,
                _ = &mut stopped => break,
            };
            match attempt.unwrap_or_else(|_| Err(kube::Error::Service("lease request timed out".into()))) {
                Ok(true) => {
                    self.last_renewal = Some(Instant::now());
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
                _ = tokio::time::sleep(self.config.retry_period) => {}
                _ = &mut stopped => break,
            }
        }
        self.release().await;
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

    /// Gives the Lease up, if held, so that a standby need not wait for it to expire.
    async fn release(&mut self) {
        let held = *self.leading.borrow();
        self.set_leading(false);
        if !held {
            return;
        }
        let result = async {
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
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "leader election: could not release the lease");
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}
