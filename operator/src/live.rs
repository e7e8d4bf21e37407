//! The seams of the live system: what a source of truth (Kubernetes, or a directory of manifests)
//! feeds the planning engine, and what the engine reports back for status and events.
//!
//! Sources turn watch events into [`SourceEvent`]s; the engine owns the [`Planner`](crate::planner::Planner),
//! merges in shim liveness, pushes per-node deltas to the shims, and emits [`StatusUpdate`]s and
//! [`Notice`]s that the Kubernetes layer writes as status and Events (the directory source only
//! logs them).
//!
//! # Leadership (`--source kubernetes`)
//!
//! Two replicas run; [`LeaderElection`](crate::controller::leader::LeaderElection) holds a
//! `coordination.k8s.io/v1` Lease and exposes "am I leading" as a
//! `tokio::sync::watch::Receiver<bool>` ([`leading()`](crate::controller::leader::LeaderElection::leading)):
//! - the engine waits for `true` (`leading.wait_for(|l| *l).await`) before it serves shims, and
//!   stops serving when it turns `false` (a leader that could not renew for the renew deadline,
//!   or whose Lease was taken over); exiting is the simplest way;
//! - the controller ([`crate::controller::run`], given the same receiver in its `Config`) writes
//!   status and Events only while `true`, and rewrites every policy's latest status on becoming
//!   leader; its watchers run either way, so a standby's [`SourceEvent`]s are ready;
//! - the leader publishes its pod IP as the only endpoint of the shims' selector-less Service
//!   ([`crate::controller::endpoint`]); without that, `/readyz` ([`crate::metrics::serve`])
//!   answers 503 while `false` so that a selector-based Service routes to the leader;
//! - on graceful shutdown, [`step_down`](crate::controller::leader::LeaderElection::step_down)
//!   releases the Lease so that the standby takes over at its next retry (2 s) instead of after
//!   the lease duration (15 s).
//!
//! Policies arrive with `retained_gateways` filled from their `status.gateways` (the previous
//! leader's choice, with entry and slot), so a new leader keeps the same gateways.

use std::{net::IpAddr, time::Duration};

use crate::planner::{ActiveGateway, Change, PolicyOutcome};

/// What a source of truth tells the engine.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceEvent {
    /// One change to the planner's inputs.
    Change(Box<Change>),
    /// The Service CIDRs the source found (`ServiceCIDR` objects), replacing what it said
    /// before: part of the in-cluster set ([`crate::in_cluster`]).
    ServiceCidrs(Vec<ipnet::IpNet>),
    /// The source has delivered its whole initial state: the engine may now push plans (before
    /// this, a partial view would make shims delete entries of objects not yet seen).
    Synced,
}

/// A policy's status as the engine sees it, for the status writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    pub outcome: PolicyOutcome,
    /// Nodes that must hold entries of this policy and have acknowledged the generation that
    /// carries the policy's current entries, with every entry of it programmed, out of all such
    /// nodes.
    pub programmed: usize,
    pub to_program: usize,
    /// The other nodes, by name, with why (at most [`StatusUpdate::MAX_BEHIND`]).
    pub behind: Vec<NodeBehind>,
    /// The policy's gateway nodes among the others (all of them, sorted): their managed
    /// addresses are not held yet.
    pub gateways_behind: Vec<String>,
    /// Gateways draining the policy's open flows.
    pub draining: Vec<Draining>,
    /// Managed addresses the node assigned to hold them did not claim, with who answers instead
    /// (`node: detail`), and those an older policy holds (`held by the older policy …`).
    pub address_conflicts: Vec<(std::net::IpAddr, String)>,
}

/// A gateway draining a policy's open flows: it keeps entries of pods moved away from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draining {
    pub node: String,
    /// When it lets go of them at the latest, as seconds since the epoch.
    pub until: i64,
    /// How many of the policy's pods it keeps entries for.
    pub pods: u64,
    /// How many of those pods' flows are still open through it, as their nodes counted them
    /// (`None`: not counted yet).
    pub flows: Option<u64>,
}

impl StatusUpdate {
    /// How many nodes behind a status names.
    pub const MAX_BEHIND: usize = 5;

    /// Each managed address of the policy, the gateway assigned to hold it, and how it stands:
    /// the one reading of it, for the status and for timing moves alike.
    pub fn managed_ips(&self) -> impl Iterator<Item = (IpAddr, Option<&ActiveGateway>, Holding<'_>)> {
        self.outcome.managed_ips.iter().map(|ip| {
            let holder = self.outcome.gateways.iter().find(|g| g.holds_managed(*ip));
            let conflict = self.address_conflicts.iter().find(|(c, _)| c == ip);
            let holding = match (holder, conflict) {
                (_, Some((_, detail))) => Holding::Conflict(detail),
                (None, None) => Holding::Unassigned,
                (Some(g), None) if self.gateways_behind.iter().any(|n| *n == *g.node) => Holding::Moving,
                (Some(_), None) => Holding::Assigned,
            };
            (*ip, holder, holding)
        })
    }
}

/// How a managed address stands ([`StatusUpdate::managed_ips`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holding<'a> {
    /// Its gateway acknowledged the plan that gives it the address.
    Assigned,
    /// Its gateway has not acknowledged that plan yet.
    Moving,
    /// Its gateway found another host answering for it (`node: who answers`), or an older
    /// policy holds it.
    Conflict(&'a str),
    /// No usable gateway for its slot.
    Unassigned,
}

/// A node that does not hold a policy's entries as planned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeBehind {
    pub node: String,
    pub why: Behind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behind {
    /// Its shim has not acknowledged the plan that carries the policy's entries (yet).
    Pending,
    /// Its shim could not program an entry (`entries` in all, this one's message first).
    Failed {
        source: String,
        destination: String,
        message: String,
        entries: usize,
    },
}

impl std::fmt::Display for NodeBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.why {
            Behind::Pending => write!(f, "{}: not acknowledged yet", self.node),
            Behind::Failed {
                source,
                destination,
                message,
                entries,
            } => {
                write!(f, "{}: {source} -> {destination}: {message}", self.node)?;
                if *entries > 1 {
                    write!(f, " (and {} more entries)", entries - 1)?;
                }
                Ok(())
            }
        }
    }
}

/// Something worth a Kubernetes Event (and a log line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The set of gateway nodes of a policy changed for a reason other than a failure.
    GatewaysChanged {
        policy: String,
        from: Vec<String>,
        to: Vec<String>,
    },
    /// A gateway node stopped being usable and was replaced (or left without replacement).
    Failover {
        policy: String,
        lost: String,
        replacement: Option<String>,
        took: Duration,
    },
    /// A managed egress IP is held by another node than before: `took` from the decision to
    /// the new node's acknowledgement.
    EgressIpMoved {
        policy: String,
        ip: std::net::IpAddr,
        /// `None`: from no node (it had none for a while).
        from: Option<String>,
        to: String,
        took: Duration,
    },
    /// A managed egress IP was not claimed: another host answers for it.
    AddressConflict {
        policy: String,
        ip: std::net::IpAddr,
        /// `node: who answers`.
        detail: String,
    },
    /// A gateway node takes no new pods of the policy but keeps carrying the open flows of the
    /// pods it served, until `until` (seconds since the epoch) at the latest.
    DrainStarted {
        policy: String,
        node: String,
        until: i64,
        pods: u64,
    },
    /// A draining gateway node let go of the policy's last open flows.
    DrainEnded { policy: String, node: String },
    /// The policy is not accepted.
    Rejected {
        policy: String,
        reason: String,
        message: String,
    },
}
