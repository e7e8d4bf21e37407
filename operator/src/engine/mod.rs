//! The planning engine of the live system: owns the [`Planner`], applies what the source of truth
//! says, merges in shim liveness, and publishes every node's part of the plan to the shims'
//! sessions (see [`crate::grpc`]).
//!
//! [`Engine`] is synchronous and takes the time as an argument, so that tests drive it without
//! sleeping; [`run`] is the task around it, and the only place that reads the clock.
//!
//! - Nothing is published before [`SourceEvent::Synced`]: a partial view would make shims delete
//!   the entries of objects not seen yet.
//! - Nor before the engine has settled: after a restart or a leader change, the shims reconnect in
//!   any order over a few seconds, while their datapaths keep forwarding as before. Until every
//!   Ready node's shim is back, or [`EngineConfig::settle`] has passed, Ready nodes are presumed
//!   alive, and the gateway duties the shims report holding (`Hello.serves`) are adopted as the
//!   retained gateways: whatever order they come back in, nothing moves and nothing is dropped.
//! - A node may be a gateway only when its source says so *and* its shim is alive: connected, or
//!   heard from within the grace period. A shim that reconnects within the grace period causes no
//!   change at all.
//! - Only the nodes that may be gateways (some accepted policy's gateway `nodeSelector` matches
//!   them) heartbeat at [`EngineConfig::heartbeat_interval`] and are judged by the grace period;
//!   the others, whose liveness moves no traffic, heartbeat at
//!   [`EngineConfig::slow_heartbeat_interval`] ([`NodeView::heartbeat_interval`]).
//! - The planner's own choice of gateways is fed back as `retained_gateways`, so a node that
//!   recovers (or a better-hashed newcomer) does not take traffic from a working gateway.
//! - Per node, the engine keeps the table it published and a generation that only grows; every
//!   publication replaces the node's view in a `watch` channel. Generations never repeat across
//!   operator processes either: the high bits are the engine's epoch (its start time), so a shim
//!   that still holds a generation of an earlier operator never mistakes a new plan for it. A
//!   session sends the delta from what it last sent to the latest view, so a slow shim gets its
//!   changes coalesced and never holds anyone else up.
//! - Add before switch: when a pod moves to another gateway, its node is told only once the new
//!   gateway has acknowledged the pod's entry (bounded by the grace period), and the previous
//!   gateway lets go of it at the same moment, so new flows never reach a gateway that drops them.
//!
//! - Release before claim: when a managed egress IP moves from a live node to another (a planned
//!   move), the new node is told to wait (`awaiting_release`) until the old one has acknowledged
//!   letting it go, bounded by the grace period; after a failure the new node claims at once.
//!
//! Parts: `liveness` (sessions, heartbeats, grace periods and intervals, settling, which nodes
//! may be gateways), `tables` (per-node tables, generations, views, add before switch),
//! `handover` (release before claim), `notices` (status updates and notices), `hub` (what the
//! engine and the sessions share); [`Engine`] coordinates them around the planner.

mod handover;
mod hub;
mod liveness;
mod metrics;
mod notices;
mod tables;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use tokio::sync::mpsc;

use self::{
    handover::Handovers,
    liveness::Liveness,
    notices::Notices,
    tables::{GatewayShim, NodeContent, Tables},
};
pub use self::{
    hub::{Hub, ShimEvent},
    liveness::{HeldDuty, HeldPod, PinnedCounts},
    metrics::EngineMetrics,
    tables::{Generations, NodeView},
};
use crate::{
    live::{self, Notice, SourceEvent, StatusUpdate},
    model::{GatewaySlot, InterfaceInfo, NodeInfo, PolicyInput},
    planner::{Change, GatewayDuty, NodeDelta, PlanDelta, Planner},
    selector::Selector,
};

/// Tunables of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How long a gateway's shim may stay silent before the gateway is replaced.
    pub grace: Duration,
    /// How often the shims of nodes that may be gateways (and their sessions) send heartbeats:
    /// a quarter of the grace period by default.
    pub heartbeat_interval: Duration,
    /// How often the other shims send heartbeats (never more often than
    /// [`EngineConfig::heartbeat_interval`]); they are taken for silent after four of these.
    pub slow_heartbeat_interval: Duration,
    /// The high bits of every generation this engine publishes ([`Generations`]).
    pub epoch: u64,
    /// How long after start Ready nodes whose shim has not reconnected yet are presumed alive
    /// (and nothing is published, unless every Ready node's shim is back sooner): the grace
    /// period plus the shims' longest reconnect backoff by default.
    pub settle: Duration,
    /// Service CIDRs given by flag (`--service-cidr`), for clusters whose API has no
    /// `ServiceCIDR` objects: part of the in-cluster set.
    pub service_cidrs: Vec<IpNet>,
    /// How long a gateway keeps the entries of pods a planned change moved to another gateway,
    /// for their open flows (pinned on the pods' nodes); `None`: not at all.
    pub pinned_flow_timeout: Option<Duration>,
}

impl EngineConfig {
    pub fn with_grace(grace: Duration) -> Self {
        let heartbeat_interval = (grace / 4).max(Duration::from_millis(10));
        EngineConfig {
            grace,
            heartbeat_interval,
            slow_heartbeat_interval: SLOW_HEARTBEAT_INTERVAL.max(heartbeat_interval),
            epoch: Generations::epoch_now(),
            settle: grace + SHIM_BACKOFF_MAX,
            service_cidrs: Vec::new(),
            pinned_flow_timeout: Some(PINNED_FLOW_TIMEOUT),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self::with_grace(Duration::from_secs(1))
    }
}

/// The longest wait between a shim's reconnect attempts (`sluice_proto::client::Config`).
const SHIM_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long a gateway keeps the entries of pods moved away from it by a planned change, by
/// default: the open flows of those pods keep going through it meanwhile.
pub const PINNED_FLOW_TIMEOUT: Duration = Duration::from_secs(600);

/// The default heartbeat interval of nodes that may not be gateways.
const SLOW_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// The longest the engine's clock waits with nothing due ([`Engine::next_tick`]).
pub const IDLE_TICK: Duration = Duration::from_secs(1);

/// The engine. See the module documentation.
pub struct Engine {
    planner: Planner,
    config: EngineConfig,
    hub: Arc<Hub>,
    metrics: EngineMetrics,
    synced: bool,
    source_nodes: BTreeMap<String, NodeInfo>,
    /// The Service CIDRs the source reported (`ServiceCIDR` objects).
    source_service_cidrs: Vec<IpNet>,
    /// The inputs of the in-cluster set changed since it was last computed.
    cluster_stale: bool,
    /// A policy came or went or changed since: the guarded destinations need recomputing.
    guard_stale: bool,
    policy_inputs: HashMap<String, PolicyInput>,
    liveness: Liveness,
    tables: Tables,
    handovers: Handovers,
    notices: Notices,
    pending: PlanDelta,
    /// Nodes whose view may change without a change of their entries (gateway duties, decided
    /// pods, heartbeat interval).
    duty_nodes: BTreeSet<Arc<str>>,
    /// How many policies were handed to the planner (each one a re-selection of its gateways,
    /// and more when not only its retained gateways changed).
    policy_applications: u64,
    /// Per node, the open flows its pods have pinned to gateways, as its shim last counted.
    pinned_counts: HashMap<String, PinnedCounts>,
    /// `pinned_counts` changed since the lingering entries were last looked at.
    counts_changed: bool,
}

impl Engine {
    pub fn new(config: EngineConfig, hub: Arc<Hub>, metrics: EngineMetrics) -> Self {
        let liveness = Liveness::new(
            config.grace,
            config.settle,
            config.heartbeat_interval,
            config.slow_heartbeat_interval,
        );
        let tables = Tables::new(Generations::new(config.epoch));
        Engine {
            planner: Planner::new(),
            config,
            hub,
            metrics,
            synced: false,
            source_nodes: BTreeMap::new(),
            source_service_cidrs: Vec::new(),
            cluster_stale: true,
            guard_stale: false,
            policy_inputs: HashMap::new(),
            liveness,
            tables,
            handovers: Handovers::default(),
            notices: Notices::default(),
            pending: PlanDelta::default(),
            duty_nodes: BTreeSet::new(),
            policy_applications: 0,
            pinned_counts: HashMap::new(),
            counts_changed: false,
        }
    }

    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// The generation a node's shim has acknowledged, if it has a session.
    pub fn acked(&self, node: &str) -> Option<u64> {
        self.liveness.shim(node).map(|s| s.acked)
    }

    /// The generation last published for a node.
    pub fn generation(&self, node: &str) -> Option<u64> {
        self.tables.get(node).map(|t| t.generation)
    }

    /// The in-cluster set every node receives, as of the last flush.
    pub fn cluster_cidrs(&self) -> &[IpNet] {
        self.tables.cluster_cidrs()
    }

    /// Whether the start-up settling period is still on.
    pub fn settling(&self) -> bool {
        self.liveness.settling()
    }

    /// The finest the engine's clock goes: a deadline is acted on at most this late.
    pub fn tick_interval(&self) -> Duration {
        (self.config.grace / 20).clamp(Duration::from_millis(5), Duration::from_millis(100))
    }

    /// When [`tick`](Self::tick) should run next: at the earliest deadline of liveness
    /// (a gateway past its grace period, the end of settling) or of a switch held back, but not
    /// sooner than a [tick interval](Self::tick_interval) from `now` and not later than
    /// [`IDLE_TICK`] (a backstop). At rest, with every shim heartbeating, that is about once a
    /// grace period instead of twenty times: an idle operator's clock is one of its costs.
    pub fn next_tick(&self, now: Instant) -> Instant {
        let due = [
            self.liveness.next_due(now),
            self.tables.next_deadline(),
            self.handovers.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        let (soonest, latest) = (now + self.tick_interval(), now + IDLE_TICK);
        due.map_or(latest, |d| d.clamp(soonest, latest))
    }

    /// How many times the engine handed a policy to the planner (from the source, or with
    /// adopted or fed-back retained gateways). Unless the policy is unchanged, each costs a
    /// re-selection of its gateways, and a recomputation of all its entries unless only its
    /// retained gateways changed.
    pub fn policy_applications(&self) -> u64 {
        self.policy_applications
    }

    /// Status updates collected since the last call.
    pub fn take_status(&mut self) -> Vec<StatusUpdate> {
        self.notices.take_status()
    }

    /// Notices collected since the last call.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        self.notices.take_notices()
    }

    // === Inputs ===

    /// Applies one event of the source of truth.
    pub fn source(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Synced => {
                if !self.synced {
                    tracing::info!("source synced: publishing plans");
                    // Nodes reported as gateways before the source knew them can be named now.
                    if self.liveness.settling() {
                        let policies = self.liveness.held_policies().cloned().collect();
                        self.apply_held(policies);
                    }
                    self.synced = true;
                    self.adopt_held_pods();
                }
                self.synced = true;
            }
            SourceEvent::Change(change) => match *change {
                Change::UpsertNode(node) => {
                    let effective = self.liveness.effective(&node);
                    let old = self.source_nodes.insert(node.name.clone(), node);
                    let new = &self.source_nodes[&effective.name];
                    self.cluster_stale |= old
                        .as_ref()
                        .is_none_or(|o| o.addresses != new.addresses || o.pod_cidrs != new.pod_cidrs);
                    if old.is_none_or(|o| o.labels != new.labels) {
                        self.liveness.relabeled(&effective.name);
                    }
                    self.apply(Change::UpsertNode(effective));
                }
                Change::RemoveNode(name) => {
                    self.cluster_stale |= self.source_nodes.remove(&name).is_some();
                    self.liveness.relabeled(&name);
                    self.apply(Change::RemoveNode(name));
                }
                Change::UpsertPolicy(mut input) => {
                    self.guard_stale = true;
                    let old = self.policy_inputs.get(&input.name);
                    if old.is_none_or(|o| o.spec != input.spec) {
                        self.liveness
                            .set_gateway_selectors(&input.name, gateway_selectors(&input));
                    }
                    // A known policy keeps the gateways the planner chose; a new one starts from
                    // what the source remembers (the last leader's choice, from its status).
                    if old.is_some() {
                        input.retained_gateways = self.planner.gateway_slots(&input.name);
                    } else if self.liveness.holds(&input.name) {
                        let held = self.liveness.held_slots(&input.name, &self.source_nodes);
                        liveness::retain_held(&mut input.retained_gateways, &held);
                    }
                    self.policy_inputs.insert(input.name.clone(), input.clone());
                    self.apply(Change::UpsertPolicy(input));
                }
                Change::RemovePolicy(name) => {
                    self.guard_stale = true;
                    self.policy_inputs.remove(&name);
                    self.liveness.set_gateway_selectors(&name, None);
                    self.apply(Change::RemovePolicy(name));
                }
                Change::UpsertPod(pod) => {
                    // The node's decided pods change (and the old node's, if it moved).
                    self.duty_nodes.extend(self.planner.pod_node(&pod.uid));
                    if let Some(node) = &pod.node_name {
                        self.duty_nodes.insert(node.as_str().into());
                    }
                    self.apply(Change::UpsertPod(pod));
                }
                Change::RemovePod(uid) => {
                    self.duty_nodes.extend(self.planner.pod_node(&uid));
                    self.apply(Change::RemovePod(uid));
                }
                other => self.apply(other),
            },
            SourceEvent::ServiceCidrs(cidrs) => {
                self.cluster_stale |= cidrs != self.source_service_cidrs;
                self.source_service_cidrs = cidrs;
            }
        }
    }

    /// Applies one event of a shim session.
    pub fn shim(&mut self, event: ShimEvent, now: Instant) {
        match event {
            ShimEvent::Connected {
                node,
                session,
                version,
                interfaces,
                held,
                pods,
                pinned,
            } => {
                tracing::info!(%node, session, %version, held = held.len(), pods = pods.len(),
                    pinned = pinned.len(), "shim connected");
                self.liveness.adopt_held_pods(pods);
                self.liveness.adopt_pinned(pinned);
                self.shim_connected(&node, session, interfaces, held, now);
                self.adopt_held_pods();
            }
            ShimEvent::Heartbeat { node, session } => {
                if self.liveness.heartbeat(&node, session, now) {
                    self.refresh_node(&node);
                }
            }
            ShimEvent::Ack {
                node,
                session,
                generation,
                errors,
                conflicts,
            } => {
                if let Some(s) = self.liveness.shim_mut(&node, session) {
                    s.address_conflicts = conflicts.into_iter().collect();
                }
                self.shim_acked(&node, session, generation, errors, now)
            }
            ShimEvent::PinnedFlows {
                node,
                session,
                counts,
            } => {
                if self.liveness.shim_mut(&node, session).is_none()
                    || self.pinned_counts.get(&node) == Some(&counts)
                {
                    return;
                }
                // The drains these flows are of show their counts, and may be over.
                self.notices.dirty_mut().extend(self.tables.lingering_policies());
                self.counts_changed = true;
                if counts == PinnedCounts::default() {
                    self.pinned_counts.remove(&node);
                } else {
                    self.pinned_counts.insert(node, counts);
                }
            }
            ShimEvent::Disconnected { node, session } => {
                // Its counts would go stale: without them its pods' drains wait for their time.
                if self.liveness.shim(&node).is_some_and(|s| s.session == session) {
                    self.counts_changed |= self.pinned_counts.remove(&node).is_some();
                }
                self.liveness.disconnected(&node, session)
            }
        }
        self.metrics
            .connected_shims
            .set(self.liveness.connected_shims() as i64);
    }

    fn shim_connected(
        &mut self,
        node: &str,
        session: u64,
        interfaces: Vec<InterfaceInfo>,
        held: Vec<HeldDuty>,
        now: Instant,
    ) {
        self.liveness.start_clock(now);
        // A shim that lists no interfaces could not read them: unknown, not none.
        let interfaces = (!interfaces.is_empty()).then_some(interfaces);
        // The session sends the view last published, if any: its interval is the shim's.
        let view = self
            .tables
            .get(node)
            .filter(|t| t.generation != 0)
            .map(|t| (t.generation, t.heartbeat_interval));
        let changed = self.liveness.connected(node, session, interfaces, view, now);
        if self.liveness.settling() && !held.is_empty() {
            let policies = self.liveness.adopt_held(node, held);
            self.apply_held(policies);
        }
        if changed {
            self.refresh_node(node);
        }
        if self.tables.ensure(node) {
            // A node the source does not know: it must hold nothing.
            self.pending.nodes.entry(node.into()).or_default();
        }
        if self.tables.published && self.tables.generation(node) == 0 {
            let node: Arc<str> = node.into();
            let duties = self.planner.gateway_duties(&node);
            let pinnable = self.tables.pinnable_by_node().remove(&node).unwrap_or_default();
            self.publish(&node, NodeDelta::default(), duties, pinnable, now);
        }
    }

    fn shim_acked(
        &mut self,
        node: &str,
        session: u64,
        generation: u64,
        errors: Vec<(crate::planner::EntryKey, String)>,
        now: Instant,
    ) {
        let published = self.tables.generation(node);
        let Some(changed) = self
            .liveness
            .ack(node, session, generation, errors, published, now)
        else {
            return;
        };
        if let Some(t) = self.tables.get(node) {
            if t.generation == generation
                && let Some(at) = t.published_at
            {
                self.metrics
                    .push_seconds
                    .observe(now.saturating_duration_since(at).as_secs_f64());
            }
            self.notices.touch_all(t.policies.keys());
        }
        if changed {
            // On the fast interval now (an overdue shim): it may serve as a gateway again.
            self.refresh_node(node);
        }
    }

    /// Notices shims silent for longer than their grace period (taking in the heartbeats the
    /// sessions stamped first, see [`Hub::heard`]).
    pub fn tick(&mut self, now: Instant) {
        self.liveness.start_clock(now);
        let heard = self.hub.take_heard();
        for node in self.liveness.tick(heard, now) {
            self.refresh_node(&node);
        }
    }

    // === The planner ===

    fn apply(&mut self, change: Change) {
        if matches!(change, Change::UpsertPolicy(_)) {
            self.policy_applications += 1;
        }
        let delta = self.planner.apply(change);
        self.pending.merge(delta);
    }

    /// Tells the planner what liveness says of node `name`.
    fn refresh_node(&mut self, name: &str) {
        if let Some(source) = self.source_nodes.get(name) {
            let node = self.liveness.effective(source);
            self.apply(Change::UpsertNode(node));
        }
    }

    /// Keeps the pods the shims reported on the gateways they are steered to (while settling,
    /// once the source is synced: the planner knows the pods then), after the held slots.
    fn adopt_held_pods(&mut self) {
        if !self.synced || !self.liveness.settling() {
            return;
        }
        let held = self.liveness.held_pods(&self.source_nodes);
        if held.is_empty() {
            return;
        }
        let delta = self.planner.adopt_assignments(held);
        self.pending.merge(delta);
    }

    /// How long `policy`'s pods' entries linger on a gateway they were moved away from (for
    /// their pinned flows), if at all.
    fn linger_for(planner: &Planner, config: &EngineConfig, policy: &str) -> Option<Duration> {
        let timeout = planner.drain_timeout(policy).or(config.pinned_flow_timeout);
        timeout.filter(|t| !t.is_zero())
    }

    /// Before the first publication of a new leader: the flows the pods' nodes reported pinned
    /// to gateways their pods no longer use get those gateways' lingering entries back (the
    /// leader before kept them; they are not in the plan), so that a restart in the middle of
    /// a drain or a planned move breaks none of them. Their time starts again: the leader
    /// before did not say how much was left.
    fn adopt_lingering(&mut self, now: Instant) {
        let pinned = self.liveness.take_pinned(&self.source_nodes);
        if pinned.is_empty() {
            return;
        }
        let mut adopted = 0;
        for (policy, pod, gateway, slot) in pinned {
            let alive = self.liveness.shim(&gateway).is_some_and(|s| s.alive);
            let (Some(linger), Some(gateway_ip)) = (
                Self::linger_for(&self.planner, &self.config, &policy),
                self.source_nodes.get(&gateway).and_then(NodeInfo::tunnel_ip),
            ) else {
                continue;
            };
            if !alive {
                continue;
            }
            let Some((source, entries)) = self.planner.lingering_entries(&policy, pod, &gateway, slot) else {
                continue;
            };
            adopted += entries.len();
            self.tables.adopt_lingering(
                &Arc::from(gateway.as_str()),
                gateway_ip,
                source,
                entries,
                (now, linger),
                self.notices.dirty_mut(),
            );
        }
        if adopted > 0 {
            tracing::info!(
                entries = adopted,
                "pinned flows reported: their gateways keep the pods' entries"
            );
        }
    }

    /// Makes the held slots of `policies` their retained gateways, where that changes them.
    fn apply_held(&mut self, policies: BTreeSet<String>) {
        for policy in policies {
            let Some(input) = self.policy_inputs.get(&policy) else {
                continue;
            };
            let mut retained = input.retained_gateways.clone();
            liveness::retain_held(
                &mut retained,
                &self.liveness.held_slots(&policy, &self.source_nodes),
            );
            if same_slots(&retained, &input.retained_gateways) {
                continue;
            }
            let input = PolicyInput {
                retained_gateways: retained,
                ..input.clone()
            };
            self.policy_inputs.insert(policy, input.clone());
            self.apply(Change::UpsertPolicy(input));
        }
    }

    // === Flush ===

    /// Feeds back gateways, publishes what changed, and collects status and notices.
    pub fn flush(&mut self, now: Instant) {
        self.liveness.start_clock(now);
        self.settle(now);
        self.feed_back_gateways();
        let pending = std::mem::take(&mut self.pending);
        self.notice_policy_changes(&pending.policies, now);
        self.refresh_guard();
        self.settle_handovers(now);
        let mut changed = self.fold_into_tables(pending.nodes, now);
        if self.synced && !self.liveness.settling() && !self.tables.published {
            self.adopt_lingering(now);
        }
        // After the tables: gateways carrying lingering entries keep the fast interval.
        self.liveness.set_carrying(self.tables.carrying());
        for node in self.liveness.refresh_capable(&self.source_nodes) {
            changed.entry(node.as_str().into()).or_default();
        }
        if !self.synced || self.liveness.settling() {
            // Kept for later: the first publication sends every table whole anyway.
            self.duty_nodes.extend(changed.into_keys());
            return;
        }
        self.publish_changed(changed, now);
        self.report_status(now);
    }

    /// Ends the settling period when it is time: the Ready nodes whose shim is not back are no
    /// longer presumed alive.
    fn settle(&mut self, now: Instant) {
        for node in self.liveness.settle(now, self.synced, &self.source_nodes) {
            self.refresh_node(&node);
        }
    }

    /// Makes the planner's choice of gateways the retained ones of every policy that changed,
    /// so that it is kept; where that re-selects anything, again (at most three rounds).
    fn feed_back_gateways(&mut self) {
        for _ in 0..3 {
            let mut again = false;
            let policies: Vec<Arc<str>> = self.pending.policies.iter().cloned().collect();
            for p in policies {
                let Some(input) = self.policy_inputs.get_mut(&*p) else {
                    continue;
                };
                let slots = self.planner.gateway_slots(&p);
                if same_slots(&input.retained_gateways, &slots) {
                    continue;
                }
                input.retained_gateways = slots;
                let input = input.clone();
                self.policy_applications += 1;
                let delta = self.planner.apply(Change::UpsertPolicy(input));
                again |= !delta.nodes.is_empty();
                self.pending.merge(delta);
            }
            if !again {
                break;
            }
        }
    }

    /// Notices rejections, gateway changes and failovers of the policies that changed; the
    /// nodes whose duties changed get a new view.
    fn notice_policy_changes(&mut self, policies: &BTreeSet<Arc<str>>, now: Instant) {
        let lost = self.liveness.take_lost();
        for p in policies {
            let outcome = self.planner.policy_outcome(p);
            let nodes = self
                .notices
                .policy_changed(p, outcome.as_ref(), &lost, now, &self.metrics);
            self.duty_nodes
                .extend(nodes.iter().map(|n| Arc::from(n.as_str())));
        }
    }

    /// The guarded destinations are every node's: a change republishes all. Only policies
    /// decide them: pod churn (which also marks policies) leaves them alone.
    fn refresh_guard(&mut self) {
        if std::mem::take(&mut self.guard_stale)
            && self.tables.set_guarded(self.planner.guarded_destinations())
        {
            self.duty_nodes.extend(self.tables.nodes().cloned());
        }
    }

    /// Nodes waiting for a managed address whose release is done get a view without the wait.
    fn settle_handovers(&mut self, now: Instant) {
        let liveness = &self.liveness;
        let waited = self.handovers.settle(
            |node| liveness.shim(node).filter(|s| s.alive).map(|s| s.acked),
            now,
        );
        self.duty_nodes.extend(waited);
    }

    /// Folds the entry changes into the tables, a pod's switch to a new gateway only once that
    /// gateway holds the pod's entry. Returns what changed per node (views to publish).
    fn fold_into_tables(
        &mut self,
        mut pending: BTreeMap<Arc<str>, NodeDelta>,
        now: Instant,
    ) -> BTreeMap<Arc<str>, NodeDelta> {
        let liveness = &self.liveness;
        let up = |node: &str| liveness.shim(node).is_some_and(|s| s.alive && s.connected);
        if self.tables.published && !liveness.settling() {
            let nodes = &self.source_nodes;
            self.tables.defer_switches(
                &mut pending,
                |node| nodes.get(node)?.tunnel_ip(),
                up,
                now + self.config.grace,
            );
        }
        self.tables.release_switches(
            &mut pending,
            |node| {
                liveness.shim(node).map(|s| GatewayShim {
                    acked: s.acked,
                    up: up(node),
                })
            },
            |policy| Self::linger_for(&self.planner, &self.config, policy),
            |node| self.source_nodes.get(node)?.tunnel_ip(),
            now,
        );
        // A gateway that went takes its pinned flows with it: their nodes learn it at once.
        let alive = |node: &str| liveness.shim(node).is_some_and(|s| s.alive);
        let counts = &self.pinned_counts;
        let ended = |node: &str, pod: IpAddr, policy: &str, gateway: IpAddr| {
            counts
                .get(node)
                .is_some_and(|c| c.none_left(pod, policy, gateway))
        };
        let recounted = std::mem::take(&mut self.counts_changed);
        let pinnable_changed = self.tables.linger(&mut pending, alive, (ended, recounted), now);
        self.duty_nodes.extend(pinnable_changed);
        let mut changed: BTreeMap<Arc<str>, NodeDelta> = BTreeMap::new();
        for (node, delta) in pending {
            let entries = self.tables.fold(&node, &delta, self.notices.dirty_mut());
            self.metrics
                .entries
                .get_or_create(&vec![("node".to_owned(), node.to_string())])
                .set(entries as i64);
            changed.insert(node, delta);
        }
        for node in std::mem::take(&mut self.duty_nodes) {
            changed.entry(node).or_default();
        }
        if std::mem::take(&mut self.cluster_stale) {
            let cidrs = crate::in_cluster::in_cluster_cidrs(
                self.source_nodes.values(),
                self.config.service_cidrs.iter().chain(&self.source_service_cidrs),
            );
            let count = cidrs.len();
            if self.tables.set_cluster_cidrs(cidrs) {
                tracing::info!(cidrs = count, "in-cluster set changed: every node gets it");
                for node in self.tables.nodes() {
                    changed.entry(node.clone()).or_default();
                }
            }
        }
        changed
    }

    /// Publishes the views that changed (every one, the first time).
    fn publish_changed(&mut self, changed: BTreeMap<Arc<str>, NodeDelta>, now: Instant) {
        let mut pinnable = self.tables.pinnable_by_node();
        if !self.tables.published {
            self.tables.published = true;
            let all: Vec<Arc<str>> = self.tables.nodes().cloned().collect();
            for node in all {
                let duties = self.planner.gateway_duties(&node);
                let pinnable = pinnable.remove(&node).unwrap_or_default();
                self.publish(&node, NodeDelta::default(), duties, pinnable, now);
            }
        } else {
            // Each node's duties once, and every release first, so that a node taking an
            // address waits for it whatever the order the nodes are published in.
            let duties: Vec<Vec<GatewayDuty>> = changed
                .keys()
                .map(|node| self.planner.gateway_duties(node))
                .collect();
            for (node, duties) in changed.keys().zip(&duties) {
                let Some(table) = self.tables.get(node) else {
                    continue;
                };
                if self.liveness.shim(node).is_some_and(|s| s.alive) {
                    self.handovers.publishing(
                        node,
                        table.duties(),
                        duties,
                        table.generation,
                        now + self.config.grace,
                    );
                }
            }
            for ((node, delta), duties) in changed.into_iter().zip(duties) {
                let pinnable = pinnable.remove(&node).unwrap_or_default();
                self.publish(&node, delta, duties, pinnable, now);
            }
        }
        self.tables.await_published();
    }

    /// Publishes a node's table if anything of its view changed (or it was never published):
    /// `duties` as the planner has them, `pinnable` as the tables do ([`Tables::pinnable`]).
    fn publish(
        &mut self,
        node: &Arc<str>,
        delta: NodeDelta,
        mut duties: Vec<GatewayDuty>,
        pinnable: Vec<IpAddr>,
        now: Instant,
    ) {
        self.handovers.hold(node, &mut duties);
        let content = NodeContent {
            pinnable,
            duties,
            decided_pods: self.planner.decided_pod_ips(node),
            heartbeat_interval: self.liveness.heartbeat_interval(node),
        };
        let Some(view) = self.tables.publish(node, delta, content, now) else {
            return;
        };
        if let Some(t) = self.tables.get(node) {
            self.notices.touch_all(t.policies.keys());
        }
        if self
            .liveness
            .view_published(node, view.generation, view.heartbeat_interval, now)
        {
            // Told the slow interval: it may no longer serve as a gateway.
            self.refresh_node(node);
        }
        self.hub.publish(node, view);
    }

    /// The status of the policies whose entries, gateways or acknowledgements changed.
    fn report_status(&mut self, now: Instant) {
        for p in self.notices.take_dirty() {
            let Some(outcome) = self.planner.policy_outcome(&p) else {
                continue;
            };
            let liveness = &self.liveness;
            let handovers = &self.handovers;
            // A gateway waiting for its managed address is not done either.
            let progress = self
                .tables
                .progress(&p, |node| liveness.shim(node).map(|s| (s.acked, &s.errors)))
                .map(|(node, why)| {
                    let waits = || handovers.awaits(node).then_some(live::Behind::Pending);
                    (node, why.or_else(waits))
                });
            // What the holders of the policy's managed addresses say they could not claim.
            let conflicts: Vec<(IpAddr, String)> = outcome
                .gateways
                .iter()
                .filter(|g| g.managed)
                .flat_map(|g| {
                    let shim = liveness.shim(&g.node);
                    g.egress_v4.into_iter().chain(g.egress_v6).filter_map(move |ip| {
                        Some((ip, format!("{}: {}", g.node, shim?.address_conflicts.get(&ip)?)))
                    })
                })
                .chain(
                    outcome
                        .managed_taken
                        .iter()
                        .map(|(ip, by)| (*ip, format!("held by the older policy {by}"))),
                )
                .collect();
            let counts = &self.pinned_counts;
            let draining = self.tables.draining(&p, |policy, gateway| {
                counts
                    .values()
                    .filter_map(|c| c.to_gateway(policy, gateway))
                    .reduce(|a, b| a + b)
            });
            self.notices.status(outcome, progress, conflicts, draining, now);
        }
    }
}

/// The node selectors of a policy's gateway entries, if it is accepted.
fn gateway_selectors(input: &PolicyInput) -> Option<Vec<Selector>> {
    let config = crate::policy::parse(&input.spec).ok()?;
    Some(config.gateways.into_iter().map(|g| g.nodes).collect())
}

/// Whether two lists of retained gateways select alike: the same slots, in any order (a list
/// of the planner's has at most one node per slot and one slot per node of an entry, so order
/// cannot decide between two claims).
fn same_slots(a: &[GatewaySlot], b: &[GatewaySlot]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let key = |s: &GatewaySlot| (s.entry, s.slot, s.node.clone());
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// Runs the engine until the source closes its channel.
///
/// Status updates are coalesced per policy when the status writer is behind; notices are dropped
/// (after being logged) when the Event publisher is.
pub async fn run(
    mut engine: Engine,
    mut sources: mpsc::Receiver<SourceEvent>,
    mut shim_events: mpsc::UnboundedReceiver<ShimEvent>,
    updates: mpsc::Sender<StatusUpdate>,
    notices: mpsc::Sender<Notice>,
) -> anyhow::Result<()> {
    // A wait, not an instant: Tokio's clock (paused in tests) runs the timer, the engine's
    // deadlines are in the process's.
    let until_tick = |engine: &Engine| {
        let now = Instant::now();
        engine.next_tick(now).saturating_duration_since(now)
    };
    let mut next_tick = until_tick(&engine);
    let mut unsent: BTreeMap<String, StatusUpdate> = BTreeMap::new();
    loop {
        tokio::select! {
            event = sources.recv() => {
                let Some(event) = event else {
                    tracing::info!("source closed: engine stops");
                    return Ok(());
                };
                engine.source(event);
                // Take what else is queued (bounded, so that acks are not starved).
                for _ in 0..4096 {
                    match sources.try_recv() {
                        Ok(event) => engine.source(event),
                        Err(_) => break,
                    }
                }
            }
            Some(event) = shim_events.recv() => {
                let now = Instant::now();
                engine.shim(event, now);
                while let Ok(event) = shim_events.try_recv() {
                    engine.shim(event, now);
                }
            }
            () = tokio::time::sleep(next_tick) => engine.tick(Instant::now()),
        }
        engine.flush(Instant::now());
        next_tick = until_tick(&engine);
        for update in engine.take_status() {
            unsent.insert(update.outcome.name.clone(), update);
        }
        while let Some((name, update)) = unsent.pop_first() {
            match updates.try_send(update) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(update)) => {
                    unsent.insert(name, update);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    unsent.clear();
                    break;
                }
            }
        }
        for notice in engine.take_notices() {
            if let Err(mpsc::error::TrySendError::Full(n)) = notices.try_send(notice) {
                tracing::warn!(notice = ?n, "event publisher behind: notice dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;
    use crate::{
        api::{EgressGateway, EgressGatewayPolicySpec, EgressRule, FailurePolicy},
        model::{PodInfo, PodPhase},
    };

    const GRACE: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn node(name: &str, last_octet: u8, gateway: bool) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: if gateway {
                labels(&[("egress", "yes")])
            } else {
                BTreeMap::new()
            },
            addresses: vec![std::net::IpAddr::from([192, 168, 0, last_octet])],
            ready: true,
            eligible: true,
            draining: false,
            interfaces: None,
            pod_cidrs: vec![],
        }
    }

    /// Pod `p` on `w` leaves through up to `slots` of the `egress=yes` nodes.
    fn policy(slots: u32) -> PolicyInput {
        let selector = |pairs| LabelSelector {
            match_labels: Some(labels(pairs)),
            match_expressions: None,
        };
        PolicyInput {
            name: "egress".into(),
            spec: EgressGatewayPolicySpec {
                selectors: vec![EgressRule {
                    pod_selector: Some(selector(&[("app", "p")])),
                    ..Default::default()
                }],
                destination_cidrs: vec!["203.0.113.0/24".into()],
                egress_gateway: Some(EgressGateway {
                    node_selector: selector(&[("egress", "yes")]),
                    max_gateway_nodes: Some(slots),
                    ..Default::default()
                }),
                failure_policy: Some(FailurePolicy::Drop),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod() -> PodInfo {
        PodInfo {
            uid: "uid-p".into(),
            namespace: "default".into(),
            name: "p".into(),
            labels: labels(&[("app", "p")]),
            node_name: Some("w".into()),
            ips: vec!["10.1.0.10".parse().unwrap()],
            host_network: false,
            phase: PodPhase::Running,
        }
    }

    /// An engine at `t0` with `w` (not a gateway), `g1` and `g2`, the policy and the pod, synced
    /// and flushed (settling: nothing published).
    fn engine(slots: u32, t0: Instant) -> (Engine, Arc<Hub>) {
        let (mut engine, hub) = bare_engine();
        for n in [node("w", 1, false), node("g1", 11, true), node("g2", 12, true)] {
            engine.source(SourceEvent::Change(Box::new(Change::UpsertNode(n))));
        }
        engine.source(SourceEvent::Change(Box::new(Change::UpsertPolicy(policy(slots)))));
        engine.source(SourceEvent::Change(Box::new(Change::UpsertPod(pod()))));
        engine.source(SourceEvent::Synced);
        engine.flush(t0);
        (engine, hub)
    }

    /// An engine with nothing in it yet.
    fn bare_engine() -> (Engine, Arc<Hub>) {
        let (hub, _events) = Hub::new(GRACE / 4);
        let engine = Engine::new(
            EngineConfig::with_grace(GRACE),
            hub.clone(),
            EngineMetrics::default(),
        );
        (engine, hub)
    }

    fn connect(engine: &mut Engine, node: &str, session: u64, held: Vec<HeldDuty>, at: Instant) {
        engine.shim(
            ShimEvent::Connected {
                node: node.into(),
                session,
                version: "test".into(),
                interfaces: vec![],
                held,
                pods: vec![],
                pinned: vec![],
            },
            at,
        );
    }

    fn ack(engine: &mut Engine, node: &str, session: u64, at: Instant) {
        let generation = engine.generation(node).unwrap();
        engine.shim(
            ShimEvent::Ack {
                node: node.into(),
                session,
                generation,
                errors: vec![],
                conflicts: vec![],
            },
            at,
        );
    }

    fn gateways(engine: &Engine) -> Vec<GatewaySlot> {
        engine.planner().gateway_slots("egress")
    }

    fn view(hub: &Hub, node: &str) -> Arc<NodeView> {
        hub.subscribe(node).borrow().clone().expect("a view")
    }

    #[test]
    fn a_new_policys_pods_spread_over_all_its_gateways_from_the_start() {
        let t0 = Instant::now();
        let (mut engine, hub) = bare_engine();
        // The nodes and pods, no policy yet: every shim is told the slow interval.
        for n in [node("w", 1, false), node("g1", 11, true), node("g2", 12, true)] {
            engine.source(SourceEvent::Change(Box::new(Change::UpsertNode(n))));
        }
        for i in 0..20u8 {
            let p = PodInfo {
                uid: format!("uid-{i}"),
                name: format!("p{i}"),
                ips: vec![std::net::IpAddr::from([10, 1, 0, 10 + i])],
                ..pod()
            };
            engine.source(SourceEvent::Change(Box::new(Change::UpsertPod(p))));
        }
        engine.source(SourceEvent::Synced);
        engine.flush(t0);
        for (session, node) in ["w", "g1", "g2"].into_iter().enumerate() {
            connect(&mut engine, node, session as u64 + 1, vec![], t0);
        }
        engine.flush(t0);
        for (session, node) in ["w", "g1", "g2"].into_iter().enumerate() {
            ack(&mut engine, node, session as u64 + 1, t0);
        }
        engine.flush(t0);
        let config = EngineConfig::with_grace(GRACE);
        assert_eq!(
            view(&hub, "g1").heartbeat_interval,
            config.slow_heartbeat_interval
        );

        // The policy appears; its gateways acknowledge the fast interval one after the other,
        // as they would in a race. Before that acknowledgement counted, every pod went to the
        // first gateway to acknowledge, and stayed there.
        engine.source(SourceEvent::Change(Box::new(Change::UpsertPolicy(policy(2)))));
        engine.flush(t0 + ms(10));
        assert_eq!(view(&hub, "g1").heartbeat_interval, config.heartbeat_interval);
        ack(&mut engine, "g1", 2, t0 + ms(20));
        engine.flush(t0 + ms(20));
        ack(&mut engine, "g2", 3, t0 + ms(30));
        engine.flush(t0 + ms(30));
        let used: BTreeSet<String> = view(&hub, "w")
            .entries
            .values()
            .filter_map(|e| match e.gateway {
                crate::plan::GatewayTarget::Node(ip) => Some(ip.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(used.len(), 2, "the pods use both gateways: {used:?}");
    }

    #[test]
    fn held_slots_the_policy_already_retains_do_not_re_apply_it() {
        let t0 = Instant::now();
        let (mut engine, _hub) = engine(2, t0);
        let chosen = gateways(&engine);
        assert_eq!(chosen.len(), 2);
        let applied = engine.policy_applications();
        // Every shim reports holding the second slot as the planner has it: the policy's
        // retained gateways, only in another order.
        let ip = |name: &str| engine.source_nodes[name].tunnel_ip().unwrap();
        let held = vec![HeldDuty {
            policy: "egress".into(),
            entry: 0,
            slot: chosen[1].slot,
            gateway: ip(&chosen[1].node),
        }];
        for (session, node) in ["w", "g1", "g2"].into_iter().enumerate() {
            connect(&mut engine, node, session as u64 + 1, held.clone(), t0 + ms(100));
        }
        engine.flush(t0 + ms(100));
        assert!(!engine.settling());
        assert_eq!(gateways(&engine), chosen);
        assert_eq!(
            engine.policy_applications(),
            applied,
            "nothing changed: nothing re-applied"
        );
    }

    #[test]
    fn a_gateway_change_re_applies_its_policy_once() {
        let t0 = Instant::now();
        let (mut engine, hub) = engine(1, t0);
        for (session, node) in ["w", "g1", "g2"].into_iter().enumerate() {
            connect(&mut engine, node, session as u64 + 1, vec![], t0);
        }
        engine.flush(t0);
        let gateway = gateways(&engine)[0].node.clone();
        let sessions: Vec<u64> = [("w", 1), ("g1", 2), ("g2", 3)]
            .into_iter()
            .filter(|(n, _)| *n != gateway)
            .map(|(_, s)| s)
            .collect();
        let applied = engine.policy_applications();
        let mut at = ms(0);
        let mut changed_at = None;
        while at < ms(3000) {
            at += ms(50);
            for s in &sessions {
                hub.heard(*s, t0 + at);
            }
            engine.tick(t0 + at);
            engine.flush(t0 + at);
            if changed_at.is_none() && gateways(&engine)[0].node != gateway {
                changed_at = Some(at);
                assert_eq!(
                    engine.policy_applications(),
                    applied + 1,
                    "the new gateway fed back as retained, once"
                );
            }
        }
        assert!(changed_at.is_some(), "no failover");
        // A pod more changes the policy's entries, not its gateways.
        let mut other = pod();
        other.uid = "uid-q".into();
        other.ips = vec!["10.1.0.11".parse().unwrap()];
        engine.source(SourceEvent::Change(Box::new(Change::UpsertPod(other))));
        engine.flush(t0 + at);
        assert!(engine.planner().node_plan("w").len() > 1);
        assert_eq!(engine.policy_applications(), applied + 1, "and never again");
    }

    /// The run loop's clock, driven as it runs: at rest (every shim heartbeating) it wakes about
    /// once per grace period, not every tick interval; a gateway that falls silent is still
    /// found within a tick interval past its grace period.
    #[test]
    fn the_clock_wakes_for_deadlines_only_and_still_finds_a_silent_gateway_in_time() {
        let t0 = Instant::now();
        let (mut engine, hub) = engine(1, t0);
        let sessions = [("w", 1), ("g1", 2), ("g2", 3)];
        for (node, session) in sessions {
            connect(&mut engine, node, session, vec![], t0);
        }
        engine.flush(t0);
        assert!(!engine.settling());
        let gateway = gateways(&engine)[0].node.clone();
        let (beat, last_beat) = (GRACE / 4, ms(10_000));
        let mut now = t0;
        let mut heard = t0;
        let (mut wakeups, mut failover) = (0, None);
        while now < t0 + ms(15_000) && failover.is_none() {
            let next = engine.next_tick(now);
            assert!(next > now && next <= now + IDLE_TICK, "{:?}", next - now);
            // The heartbeats that arrive meanwhile (the gateway's stop at `last_beat`).
            while heard + beat <= next {
                heard += beat;
                for (node, session) in sessions {
                    if node != gateway || heard <= t0 + last_beat {
                        hub.heard(session, heard);
                    }
                }
            }
            now = next;
            engine.tick(now);
            engine.flush(now);
            wakeups += 1;
            if gateways(&engine)[0].node != gateway {
                failover = Some(now - t0);
            }
        }
        let failover = failover.expect("the silent gateway was replaced");
        assert!(
            failover > last_beat + GRACE && failover <= last_beat + GRACE + engine.tick_interval(),
            "found at {failover:?}"
        );
        // About one wakeup per grace period until the gateway stopped (a 50 ms tick: 200).
        assert!(wakeups <= 2 * last_beat.as_secs() + 2 + 2, "{wakeups} wakeups");
    }

    #[test]
    fn a_node_labelled_as_a_gateway_gets_the_fast_interval_in_its_next_view() {
        let t0 = Instant::now();
        let (mut engine, hub) = engine(2, t0);
        for (session, node) in ["w", "g1", "g2"].into_iter().enumerate() {
            connect(&mut engine, node, session as u64 + 1, vec![], t0);
        }
        engine.flush(t0);
        let config = EngineConfig::with_grace(GRACE);
        assert_eq!(view(&hub, "w").heartbeat_interval, config.slow_heartbeat_interval);
        assert_eq!(view(&hub, "g1").heartbeat_interval, config.heartbeat_interval);
        assert!(config.slow_heartbeat_interval > config.heartbeat_interval);
        for (session, node) in ["w", "g1", "g2"].into_iter().enumerate() {
            ack(&mut engine, node, session as u64 + 1, t0);
        }
        engine.flush(t0);

        // g2 leaves the gateways, w joins them.
        let before = view(&hub, "w").generation;
        engine.source(SourceEvent::Change(Box::new(Change::UpsertNode(node(
            "w", 1, true,
        )))));
        engine.source(SourceEvent::Change(Box::new(Change::UpsertNode(node(
            "g2", 12, false,
        )))));
        engine.flush(t0 + ms(10));
        let w = view(&hub, "w");
        assert!(w.generation > before);
        assert_eq!(w.heartbeat_interval, config.heartbeat_interval);
        assert_eq!(
            view(&hub, "g2").heartbeat_interval,
            config.slow_heartbeat_interval
        );
        // w serves from that view on (a live shim acknowledges it within milliseconds; one that
        // does not within the grace period stops being ready, see liveness), and after the
        // acknowledgement.
        let serving = |engine: &Engine| {
            let mut nodes = gateways(engine).into_iter().map(|g| g.node).collect::<Vec<_>>();
            nodes.sort();
            nodes
        };
        assert_eq!(serving(&engine), ["g1", "w"]);
        ack(&mut engine, "w", 1, t0 + ms(20));
        engine.flush(t0 + ms(20));
        assert_eq!(serving(&engine), ["g1", "w"]);
    }
}
