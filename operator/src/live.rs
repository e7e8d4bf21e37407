//! The seams of the live system: what a source of truth (Kubernetes, or a directory of manifests)
//! feeds the planning engine, and what the engine reports back for status and events.
//!
//! Sources turn watch events into [`SourceEvent`]s; the engine owns the [`Planner`](crate::planner::Planner),
//! merges in shim liveness, pushes per-node deltas to the shims, and emits [`StatusUpdate`]s and
//! [`Notice`]s that the Kubernetes layer writes as status and Events (the directory source only
//! logs them).

use std::time::Duration;

use crate::planner::{Change, PolicyOutcome};

/// What a source of truth tells the engine.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceEvent {
    /// One change to the planner's inputs.
    Change(Box<Change>),
    /// The source has delivered its whole initial state: the engine may now push plans (before
    /// this, a partial view would make shims delete entries of objects not yet seen).
    Synced,
}

/// A policy's status as the engine sees it, for the status writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    pub outcome: PolicyOutcome,
    /// Nodes that must hold entries of this policy and have acknowledged the generation that
    /// holds them, out of all such nodes.
    pub programmed: usize,
    pub to_program: usize,
}

/// Something worth a Kubernetes Event (and a log line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The set of gateway nodes of a policy changed for a reason other than a failure.
    GatewaysChanged { policy: String, from: Vec<String>, to: Vec<String> },
    /// A gateway node stopped being usable and was replaced (or left without replacement).
    Failover { policy: String, lost: String, replacement: Option<String>, took: Duration },
    /// The policy is not accepted.
    Rejected { policy: String, reason: String, message: String },
}
