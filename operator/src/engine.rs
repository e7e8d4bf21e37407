//! The planning engine of the live system: owns the [`Planner`], applies what the source of truth
//! says, merges in shim liveness, and publishes every node's part of the plan to the shims'
//! sessions (see [`crate::grpc`]).
//!
//! [`Engine`] is synchronous and takes the time as an argument, so that tests drive it without
//! sleeping; [`run`] is the task around it.
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

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use sluice_proto::GatewayTarget;
use tokio::sync::{mpsc, watch};

use crate::{
    live::{Behind, NodeBehind, Notice, SourceEvent, StatusUpdate},
    model::{GatewaySlot, InterfaceInfo, NodeInfo, PolicyInput},
    planner::{Change, EgressEntry, EntryKey, GatewayDuty, NodeDelta, PlanDelta, Planner},
};

/// Tunables of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How long a gateway's shim may stay silent before the gateway is replaced.
    pub grace: Duration,
    /// How often shims (and sessions) send heartbeats: a quarter of the grace period by default.
    pub heartbeat_interval: Duration,
    /// The high bits of every generation this engine publishes ([`Generations`]).
    pub epoch: u64,
    /// How long after start Ready nodes whose shim has not reconnected yet are presumed alive
    /// (and nothing is published, unless every Ready node's shim is back sooner): the grace
    /// period plus the shims' longest reconnect backoff by default.
    pub settle: Duration,
    /// Service CIDRs given by flag (`--service-cidr`), for clusters whose API has no
    /// `ServiceCIDR` objects: part of the in-cluster set.
    pub service_cidrs: Vec<IpNet>,
}

impl EngineConfig {
    pub fn with_grace(grace: Duration) -> Self {
        EngineConfig {
            grace,
            heartbeat_interval: (grace / 4).max(Duration::from_millis(10)),
            epoch: Generations::epoch_now(),
            settle: grace + SHIM_BACKOFF_MAX,
            service_cidrs: Vec::new(),
        }
    }
}

/// The longest wait between a shim's reconnect attempts (`sluice_proto::client::Config`).
const SHIM_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What a shim reports its datapath holding: the node with underlay address `gateway` fills
/// `slot` of gateway entry `entry` of `policy` (the shim's own pods are steered to it, or the
/// shim's node is that gateway).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldDuty {
    pub policy: String,
    pub entry: usize,
    pub slot: usize,
    pub gateway: IpAddr,
}

/// A change of one node's entry held back until `gateway` acknowledges `generation` (0 until
/// the generation carrying the gateway's entry is published), or until `deadline`.
#[derive(Clone, Debug)]
struct Deferred {
    node: Arc<str>,
    key: EntryKey,
    /// The upsert, or `None` for a removal.
    entry: Option<EgressEntry>,
    gateway: Arc<str>,
    generation: u64,
    deadline: Instant,
}

/// The start-up settling period (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settling {
    /// The engine has not seen the time yet.
    NotStarted,
    Until(Instant),
    Done,
}

/// Plan generations unique across operator processes and leaders: an epoch in the high
/// [`Generations::EPOCH_BITS`] bits (milliseconds since 2025-01-01 at the engine's start: two
/// processes that start in different milliseconds never share one), a counter in the low bits.
/// When the counter runs out the epoch moves on by one, so numbers still only grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generations {
    epoch: u64,
    counter: u64,
}

impl Generations {
    pub const EPOCH_BITS: u32 = 40;
    const COUNTER_BITS: u32 = 64 - Self::EPOCH_BITS;
    /// 2025-01-01T00:00:00Z in milliseconds since the Unix epoch.
    const BASE_UNIX_MS: u64 = 1_735_689_600_000;

    /// The epoch of an engine starting now (lasts until 2059).
    pub fn epoch_now() -> u64 {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        unix_ms.saturating_sub(Self::BASE_UNIX_MS) & ((1 << Self::EPOCH_BITS) - 1)
    }

    pub fn new(epoch: u64) -> Self {
        Generations { epoch, counter: 0 }
    }

    /// The next generation (never 0, which means "nothing published").
    pub fn advance(&mut self) -> u64 {
        self.counter += 1;
        if self.counter >= 1 << Self::COUNTER_BITS {
            self.epoch += 1;
            self.counter = 1;
        }
        (self.epoch << Self::COUNTER_BITS) | self.counter
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self::with_grace(Duration::from_secs(1))
    }
}

/// What one node's shim must hold, as published to its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub generation: u64,
    /// The generation `delta` applies on top of (0: none, send the whole table).
    pub base: u64,
    pub delta: Arc<NodeDelta>,
    pub entries: Arc<BTreeMap<EntryKey, EgressEntry>>,
    pub duties: Arc<Vec<GatewayDuty>>,
    /// The in-cluster set ([`crate::in_cluster`]): the same for every node.
    pub cluster_cidrs: Arc<Vec<IpNet>>,
    /// The no-leak guard: what Drop policies guard, and this node's pods the plan decided on.
    pub guard: Arc<sluice_proto::Guard>,
}

/// What sessions tell the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShimEvent {
    Connected {
        node: String,
        session: u64,
        version: String,
        interfaces: Vec<InterfaceInfo>,
        /// The gateway duties the shim's datapath holds.
        held: Vec<HeldDuty>,
    },
    /// A heartbeat, taken in at once. The node channel's sessions stamp [`Hub::heard`] instead,
    /// which the engine reads at its next tick.
    Heartbeat {
        node: String,
        session: u64,
    },
    Ack {
        node: String,
        session: u64,
        generation: u64,
        /// The entries the shim could not program as planned, with why.
        errors: Vec<(EntryKey, String)>,
    },
    Disconnected {
        node: String,
        session: u64,
    },
}

/// Where the engine publishes views and sessions report: shared by the engine and the server.
pub struct Hub {
    views: Mutex<HashMap<String, watch::Sender<Option<Arc<NodeView>>>>>,
    events: mpsc::UnboundedSender<ShimEvent>,
    /// When each session last had a heartbeat from its shim, stamped by the session itself and
    /// read at the engine's next tick ([`Hub::heard`]).
    heard: Mutex<HashMap<u64, Instant>>,
    pub heartbeat_interval: Duration,
}

impl Hub {
    /// A hub and the receiver of its sessions' events (for [`run`]).
    pub fn new(heartbeat_interval: Duration) -> (Arc<Hub>, mpsc::UnboundedReceiver<ShimEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Hub {
                views: Mutex::default(),
                events,
                heard: Mutex::default(),
                heartbeat_interval,
            }),
            rx,
        )
    }

    /// The views of one node (`None` until the engine has published one).
    pub fn subscribe(&self, node: &str) -> watch::Receiver<Option<Arc<NodeView>>> {
        let mut views = self.views.lock().expect("hub lock");
        views
            .entry(node.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    fn publish(&self, node: &str, view: NodeView) {
        let mut views = self.views.lock().expect("hub lock");
        let tx = views
            .entry(node.to_owned())
            .or_insert_with(|| watch::channel(None).0);
        tx.send_replace(Some(Arc::new(view)));
    }

    /// Reports a session event (ignored once the engine is gone).
    pub fn report(&self, event: ShimEvent) {
        let _ = self.events.send(event);
    }

    /// Session `session` had a heartbeat from its shim at `at`. Unlike a
    /// [`ShimEvent::Heartbeat`], this does not wake the engine (at rest, heartbeats are all that
    /// happens, a few per second per node), and the time is the session's, not the engine's: a
    /// shim is never taken for silent because its heartbeats waited behind a long flush.
    pub fn heard(&self, session: u64, at: Instant) {
        let mut heard = self.heard.lock().expect("hub lock");
        let last = heard.entry(session).or_insert(at);
        *last = (*last).max(at);
    }

    /// The heartbeats stamped since the last call: session -> when last.
    fn take_heard(&self) -> HashMap<u64, Instant> {
        std::mem::take(&mut *self.heard.lock().expect("hub lock"))
    }
}

/// The engine's metrics.
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    /// From publishing a node's generation to its shim's acknowledgement of it.
    pub push_seconds: Histogram,
    /// Entries each node must hold, by `node`.
    pub entries: Family<Vec<(String, String)>, Gauge>,
    pub connected_shims: Gauge,
    pub failovers: Counter,
    /// From the last heartbeat of a lost gateway to the delta that replaces it.
    pub failover_seconds: Histogram,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        EngineMetrics {
            push_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            entries: Family::default(),
            connected_shims: Gauge::default(),
            failovers: Counter::default(),
            failover_seconds: Histogram::new(exponential_buckets(0.05, 1.5, 14)),
        }
    }
}

impl EngineMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = EngineMetrics::default();
        registry.register(
            "push_seconds",
            "From publishing a node's plan generation to its shim's acknowledgement",
            m.push_seconds.clone(),
        );
        registry.register("node_entries", "Entries each node must hold", m.entries.clone());
        registry.register(
            "connected_shims",
            "Shims with an open session",
            m.connected_shims.clone(),
        );
        registry.register(
            "failovers",
            "Gateways replaced after their shim went silent",
            m.failovers.clone(),
        );
        registry.register(
            "failover_seconds",
            "From the last heartbeat of a lost gateway to the plan change that replaces it",
            m.failover_seconds.clone(),
        );
        m
    }
}

struct Shim {
    session: u64,
    connected: bool,
    last_seen: Instant,
    alive: bool,
    interfaces: Option<Vec<InterfaceInfo>>,
    acked: u64,
    /// The entries of the acknowledged generation that the shim could not program.
    errors: BTreeMap<EntryKey, String>,
}

#[derive(Default)]
struct Table {
    generation: u64,
    published_at: Option<Instant>,
    entries: Arc<BTreeMap<EntryKey, EgressEntry>>,
    duties: Arc<Vec<GatewayDuty>>,
    cluster_cidrs: Arc<Vec<IpNet>>,
    guard: Arc<sluice_proto::Guard>,
    /// Entries per policy.
    policies: HashMap<Arc<str>, usize>,
    /// Per policy, the generation that carries its current entries here: the one a shim must
    /// have acknowledged for the policy to be programmed on this node.
    policy_generation: HashMap<Arc<str>, u64>,
    /// Policies whose entries changed since the last publication.
    touched: BTreeSet<Arc<str>>,
}

/// The engine. See the module documentation.
pub struct Engine {
    planner: Planner,
    config: EngineConfig,
    hub: Arc<Hub>,
    metrics: EngineMetrics,
    synced: bool,
    /// Published everything at least once (after `Synced`).
    published: bool,
    source_nodes: BTreeMap<String, NodeInfo>,
    /// The Service CIDRs the source reported (`ServiceCIDR` objects).
    source_service_cidrs: Vec<IpNet>,
    /// The in-cluster set as last computed, and whether its inputs changed since.
    cluster_cidrs: Arc<Vec<IpNet>>,
    cluster_stale: bool,
    /// The destinations of the accepted Drop policies, as last published (the no-leak guard).
    guarded: Vec<IpNet>,
    /// A policy came or went or changed since: the guarded destinations need recomputing.
    guard_stale: bool,
    policy_inputs: HashMap<String, PolicyInput>,
    shims: HashMap<String, Shim>,
    tables: BTreeMap<Arc<str>, Table>,
    generations: Generations,
    settling: Settling,
    /// While settling: per policy, the slots shims reported holding, by gateway address.
    held: HashMap<String, Vec<HeldDuty>>,
    /// Changes held back until a gateway has acknowledged an entry ([`Engine::defer_switches`]).
    deferred: Vec<Deferred>,
    pending: PlanDelta,
    /// Nodes whose gateway duties may have changed.
    duty_nodes: BTreeSet<Arc<str>>,
    gateways: BTreeMap<String, Vec<String>>,
    rejected: HashMap<String, (String, String)>,
    /// Gateways lost since the last flush: node -> last heard from.
    lost: HashMap<String, Instant>,
    dirty_status: BTreeSet<String>,
    last_status: HashMap<String, StatusUpdate>,
    status_out: Vec<StatusUpdate>,
    notices_out: Vec<Notice>,
}

impl Engine {
    pub fn new(config: EngineConfig, hub: Arc<Hub>, metrics: EngineMetrics) -> Self {
        let generations = Generations::new(config.epoch);
        Engine {
            planner: Planner::new(),
            config,
            hub,
            metrics,
            synced: false,
            published: false,
            source_nodes: BTreeMap::new(),
            source_service_cidrs: Vec::new(),
            cluster_cidrs: Arc::default(),
            guarded: Vec::new(),
            guard_stale: false,
            cluster_stale: true,
            policy_inputs: HashMap::new(),
            shims: HashMap::new(),
            tables: BTreeMap::new(),
            generations,
            settling: Settling::NotStarted,
            held: HashMap::new(),
            deferred: Vec::new(),
            pending: PlanDelta::default(),
            duty_nodes: BTreeSet::new(),
            gateways: BTreeMap::new(),
            rejected: HashMap::new(),
            lost: HashMap::new(),
            dirty_status: BTreeSet::new(),
            last_status: HashMap::new(),
            status_out: Vec::new(),
            notices_out: Vec::new(),
        }
    }

    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// The generation a node's shim has acknowledged, if it has a session.
    pub fn acked(&self, node: &str) -> Option<u64> {
        self.shims.get(node).map(|s| s.acked)
    }

    /// The generation last published for a node.
    pub fn generation(&self, node: &str) -> Option<u64> {
        self.tables.get(node).map(|t| t.generation)
    }

    /// The in-cluster set every node receives, as of the last flush.
    pub fn cluster_cidrs(&self) -> &[IpNet] {
        &self.cluster_cidrs
    }

    /// Whether the start-up settling period is still on.
    pub fn settling(&self) -> bool {
        self.settling != Settling::Done
    }

    fn start_clock(&mut self, now: Instant) {
        if self.settling == Settling::NotStarted {
            self.settling = Settling::Until(now + self.config.settle);
        }
    }

    /// Ends the settling period once it has run out, or every Ready node's shim is back.
    fn maybe_settle(&mut self, now: Instant) {
        let Settling::Until(until) = self.settling else {
            return;
        };
        let all_back = self.synced
            && self
                .source_nodes
                .values()
                .filter(|n| n.ready)
                .all(|n| self.shims.get(&n.name).is_some_and(|s| s.alive));
        if !all_back && now < until {
            return;
        }
        let missing: Vec<String> = self
            .source_nodes
            .values()
            .filter(|n| n.ready && !self.shims.contains_key(&n.name))
            .map(|n| n.name.clone())
            .collect();
        tracing::info!(
            ?missing,
            "settled: shims not back by now are no longer presumed alive"
        );
        self.settling = Settling::Done;
        self.held.clear();
        let settle_started = until.checked_sub(self.config.settle).unwrap_or(now);
        for node in missing {
            self.lost.insert(node.clone(), settle_started);
            self.refresh_node(&node);
        }
    }

    /// Adopts the slots a shim reports holding as retained gateways (while settling).
    fn adopt_held(&mut self, held: Vec<HeldDuty>) {
        let mut policies = BTreeSet::new();
        for d in held {
            let slots = self.held.entry(d.policy.clone()).or_default();
            slots.retain(|s| !(s.entry == d.entry && (s.slot == d.slot || s.gateway == d.gateway)));
            policies.insert(d.policy.clone());
            slots.push(d);
        }
        self.apply_held(policies);
    }

    /// Makes the held slots of `policies` their retained gateways.
    fn apply_held(&mut self, policies: BTreeSet<String>) {
        for policy in policies {
            if let Some(input) = self.policy_inputs.get(&policy) {
                let mut input = input.clone();
                let held = self.held_slots(&policy);
                retain_held(&mut input.retained_gateways, &held);
                self.policy_inputs.insert(policy, input.clone());
                self.apply(Change::UpsertPolicy(input));
            }
        }
    }

    /// The slots reported held for `policy`, with the gateways' node names (addresses the source
    /// does not know are left out).
    fn held_slots(&self, policy: &str) -> Vec<GatewaySlot> {
        let Some(held) = self.held.get(policy) else {
            return Vec::new();
        };
        let by_ip: HashMap<IpAddr, &str> = self
            .source_nodes
            .values()
            .filter_map(|n| Some((n.tunnel_ip()?, n.name.as_str())))
            .collect();
        held.iter()
            .filter_map(|d| {
                Some(GatewaySlot {
                    entry: d.entry,
                    slot: d.slot,
                    node: (*by_ip.get(&d.gateway)?).to_owned(),
                })
            })
            .collect()
    }

    fn effective(&self, source: &NodeInfo) -> NodeInfo {
        let shim = self.shims.get(&source.name);
        let mut node = source.clone();
        // While settling, a Ready node whose shim is not back yet keeps serving: its datapath
        // still forwards, and its shim is on its way.
        let presumed = self.settling() && source.ready && shim.is_none();
        node.eligible = source.eligible && (presumed || shim.is_some_and(|s| s.alive));
        if let Some(interfaces) = shim.and_then(|s| s.interfaces.clone()) {
            node.interfaces = Some(interfaces);
        }
        node
    }

    fn apply(&mut self, change: Change) {
        let delta = self.planner.apply(change);
        self.pending.merge(delta);
    }

    fn refresh_node(&mut self, name: &str) {
        if let Some(source) = self.source_nodes.get(name) {
            let node = self.effective(source);
            self.apply(Change::UpsertNode(node));
        }
    }

    /// Applies one event of the source of truth.
    pub fn source(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Synced => {
                if !self.synced {
                    tracing::info!("source synced: publishing plans");
                    // Nodes reported as gateways before the source knew them can be named now.
                    if self.settling() {
                        let policies = self.held.keys().cloned().collect();
                        self.apply_held(policies);
                    }
                }
                self.synced = true;
            }
            SourceEvent::Change(change) => match *change {
                Change::UpsertNode(node) => {
                    let effective = self.effective(&node);
                    let old = self.source_nodes.insert(node.name.clone(), node);
                    let new = &self.source_nodes[&effective.name];
                    self.cluster_stale |=
                        old.is_none_or(|o| o.addresses != new.addresses || o.pod_cidrs != new.pod_cidrs);
                    self.apply(Change::UpsertNode(effective));
                }
                Change::RemoveNode(name) => {
                    self.cluster_stale |= self.source_nodes.remove(&name).is_some();
                    self.apply(Change::RemoveNode(name));
                }
                Change::UpsertPolicy(mut input) => {
                    self.guard_stale = true;
                    // A known policy keeps the gateways the planner chose; a new one starts from
                    // what the source remembers (the last leader's choice, from its status).
                    if self.policy_inputs.contains_key(&input.name) {
                        input.retained_gateways = self.planner.gateway_slots(&input.name);
                    } else if self.held.contains_key(&input.name) {
                        retain_held(&mut input.retained_gateways, &self.held_slots(&input.name));
                    }
                    self.policy_inputs.insert(input.name.clone(), input.clone());
                    self.apply(Change::UpsertPolicy(input));
                }
                Change::RemovePolicy(name) => {
                    self.guard_stale = true;
                    self.policy_inputs.remove(&name);
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
            } => {
                tracing::info!(%node, session, %version, held = held.len(), "shim connected");
                self.start_clock(now);
                // A shim that lists no interfaces could not read them: unknown, not none.
                let interfaces = (!interfaces.is_empty()).then_some(interfaces);
                let old = self.shims.insert(
                    node.clone(),
                    Shim {
                        session,
                        connected: true,
                        last_seen: now,
                        alive: true,
                        interfaces: interfaces.clone(),
                        acked: 0,
                        errors: BTreeMap::new(),
                    },
                );
                if self.settling() && !held.is_empty() {
                    self.adopt_held(held);
                }
                if old.is_none_or(|o| !o.alive || o.interfaces != interfaces) {
                    self.refresh_node(&node);
                }
                if !self.tables.contains_key(node.as_str()) {
                    // A node the source does not know: it must hold nothing.
                    self.tables.insert(node.as_str().into(), Table::default());
                    self.pending.nodes.entry(node.as_str().into()).or_default();
                }
                if self.published && self.tables.get(node.as_str()).is_some_and(|t| t.generation == 0) {
                    let name: Arc<str> = node.as_str().into();
                    self.publish(&name, NodeDelta::default(), now);
                }
            }
            ShimEvent::Heartbeat { node, session } => {
                if let Some(s) = self.shims.get_mut(&node)
                    && s.session == session
                {
                    s.last_seen = now;
                    if !s.alive {
                        // Silent past the grace period, but back on the same session.
                        s.alive = true;
                        self.refresh_node(&node);
                    }
                }
            }
            ShimEvent::Ack {
                node,
                session,
                generation,
                errors,
            } => {
                let Some(s) = self.shims.get_mut(&node).filter(|s| s.session == session) else {
                    return;
                };
                s.last_seen = now;
                let published = self.tables.get(node.as_str()).map_or(0, |t| t.generation);
                if generation > published {
                    // Nothing this engine sent: a confused (or lying) shim proves nothing.
                    tracing::warn!(%node, generation, published, "ack of a generation never published");
                } else if generation >= s.acked {
                    s.acked = generation;
                    if !errors.is_empty() {
                        tracing::warn!(%node, generation, errors = errors.len(), "shim could not program some entries");
                    }
                    s.errors = errors.into_iter().collect();
                }
                if let Some(t) = self.tables.get(node.as_str()) {
                    if t.generation == generation
                        && let Some(at) = t.published_at
                    {
                        self.metrics
                            .push_seconds
                            .observe(now.saturating_duration_since(at).as_secs_f64());
                    }
                    self.dirty_status
                        .extend(t.policies.keys().map(ToString::to_string));
                }
            }
            ShimEvent::Disconnected { node, session } => {
                if let Some(s) = self.shims.get_mut(&node)
                    && s.session == session
                {
                    tracing::info!(%node, session, "shim disconnected");
                    s.connected = false;
                }
            }
        }
        let connected = self.shims.values().filter(|s| s.connected).count();
        self.metrics.connected_shims.set(connected as i64);
    }

    /// Notices shims silent for longer than the grace period (taking in the heartbeats the
    /// sessions stamped first, see [`Hub::heard`]).
    pub fn tick(&mut self, now: Instant) {
        self.start_clock(now);
        let heard = self.hub.take_heard();
        if !heard.is_empty() {
            let mut back = Vec::new();
            for (node, s) in &mut self.shims {
                let Some(&at) = heard.get(&s.session) else {
                    continue;
                };
                if at > s.last_seen {
                    s.last_seen = at;
                }
                if !s.alive && now.saturating_duration_since(s.last_seen) <= self.config.grace {
                    // Silent past the grace period, but back on the same session.
                    s.alive = true;
                    back.push(node.clone());
                }
            }
            for node in back {
                self.refresh_node(&node);
            }
        }
        let dead: Vec<(String, Instant)> = self
            .shims
            .iter()
            .filter(|(_, s)| s.alive && now.saturating_duration_since(s.last_seen) > self.config.grace)
            .map(|(n, s)| (n.clone(), s.last_seen))
            .collect();
        for (node, last_seen) in dead {
            tracing::warn!(%node, silent = ?now.saturating_duration_since(last_seen), "shim silent past the grace period");
            if let Some(s) = self.shims.get_mut(&node) {
                s.alive = false;
            }
            self.lost.insert(node.clone(), last_seen);
            self.refresh_node(&node);
        }
    }

    /// When [`tick`](Self::tick) should run next.
    pub fn tick_interval(&self) -> Duration {
        (self.config.grace / 20).clamp(Duration::from_millis(5), Duration::from_millis(100))
    }

    /// Feeds back gateways, publishes what changed, and collects status and notices.
    pub fn flush(&mut self, now: Instant) {
        self.start_clock(now);
        self.maybe_settle(now);
        // 1. Feed the planner's choice back, so that it is retained.
        for _ in 0..3 {
            let mut again = false;
            let policies: Vec<Arc<str>> = self.pending.policies.iter().cloned().collect();
            for p in policies {
                let Some(input) = self.policy_inputs.get_mut(&*p) else {
                    continue;
                };
                let slots = self.planner.gateway_slots(&p);
                if input.retained_gateways != slots {
                    input.retained_gateways = slots;
                    let input = input.clone();
                    let delta = self.planner.apply(Change::UpsertPolicy(input));
                    again |= !delta.nodes.is_empty();
                    self.pending.merge(delta);
                }
            }
            if !again {
                break;
            }
        }

        // 2. Gateway changes, failovers and rejections.
        let pending = std::mem::take(&mut self.pending);
        for p in &pending.policies {
            self.dirty_status.insert(p.to_string());
            let Some(outcome) = self.planner.policy_outcome(p) else {
                if let Some(old) = self.gateways.remove(&**p) {
                    self.duty_nodes.extend(old.iter().map(|n| Arc::from(n.as_str())));
                }
                self.rejected.remove(&**p);
                self.last_status.remove(&**p);
                continue;
            };
            match &outcome.accepted {
                Err(e) => {
                    let now_rejected = (e.reason.to_owned(), e.message.clone());
                    if self.rejected.get(&**p) != Some(&now_rejected) {
                        self.notices_out.push(Notice::Rejected {
                            policy: p.to_string(),
                            reason: now_rejected.0.clone(),
                            message: now_rejected.1.clone(),
                        });
                        self.rejected.insert(p.to_string(), now_rejected);
                    }
                }
                Ok(()) => {
                    self.rejected.remove(&**p);
                }
            }
            let new: Vec<String> = outcome.gateways.iter().map(|g| g.node.to_string()).collect();
            let old = self.gateways.get(&**p).cloned().unwrap_or_default();
            if new == old {
                continue;
            }
            self.duty_nodes
                .extend(old.iter().chain(&new).map(|n| Arc::from(n.as_str())));
            let mut failed_over = false;
            for lost in old.iter().filter(|n| !new.contains(n)) {
                if let Some(last_seen) = self.lost.get(lost) {
                    let took = now.saturating_duration_since(*last_seen);
                    let replacement = new.iter().find(|n| !old.contains(n)).cloned();
                    tracing::warn!(policy = %p, %lost, ?replacement, ?took, "gateway failover");
                    self.metrics.failovers.inc();
                    self.metrics.failover_seconds.observe(took.as_secs_f64());
                    self.notices_out.push(Notice::Failover {
                        policy: p.to_string(),
                        lost: lost.clone(),
                        replacement,
                        took,
                    });
                    failed_over = true;
                }
            }
            if !failed_over {
                tracing::info!(policy = %p, ?old, ?new, "gateways changed");
                self.notices_out.push(Notice::GatewaysChanged {
                    policy: p.to_string(),
                    from: old,
                    to: new.clone(),
                });
            }
            self.gateways.insert(p.to_string(), new);
        }
        self.lost.clear();

        // The guarded destinations are every node's: a change republishes all.
        // Only policies decide it: pod churn (which also marks policies) leaves it alone.
        if std::mem::take(&mut self.guard_stale) {
            let guarded = self.planner.guarded_destinations();
            if guarded != self.guarded {
                self.guarded = guarded;
                self.duty_nodes.extend(self.tables.keys().cloned());
            }
        }

        // 3. Fold entry changes into the tables (a pod's switch to a new gateway only once that
        //    gateway holds the pod's entry); publish once synced.
        let mut pending_nodes = pending.nodes;
        if self.published && !self.settling() {
            self.defer_switches(&mut pending_nodes, now);
        }
        self.release_switches(&mut pending_nodes, now);
        let mut changed: BTreeMap<Arc<str>, NodeDelta> = BTreeMap::new();
        for (node, delta) in pending_nodes {
            let table = self.tables.entry(node.clone()).or_default();
            let entries = Arc::make_mut(&mut table.entries);
            for key in &delta.removals {
                if let Some(old) = entries.remove(key) {
                    decrement(&mut table.policies, &old.policy);
                    self.dirty_status.insert(old.policy.to_string());
                    table.touched.insert(old.policy);
                }
            }
            for (key, entry) in &delta.upserts {
                if let Some(old) = entries.insert(*key, entry.clone()) {
                    decrement(&mut table.policies, &old.policy);
                    self.dirty_status.insert(old.policy.to_string());
                    table.touched.insert(old.policy);
                }
                *table.policies.entry(entry.policy.clone()).or_default() += 1;
                self.dirty_status.insert(entry.policy.to_string());
                table.touched.insert(entry.policy.clone());
            }
            self.metrics
                .entries
                .get_or_create(&vec![("node".to_owned(), node.to_string())])
                .set(entries.len() as i64);
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
            if *self.cluster_cidrs != cidrs {
                tracing::info!(cidrs = cidrs.len(), "in-cluster set changed: every node gets it");
                self.cluster_cidrs = Arc::new(cidrs);
                for node in self.tables.keys() {
                    changed.entry(node.clone()).or_default();
                }
            }
        }
        if !self.synced || self.settling() {
            self.duty_nodes.extend(changed.into_keys());
            return;
        }
        if !self.published {
            self.published = true;
            let all: Vec<Arc<str>> = self.tables.keys().cloned().collect();
            for node in all {
                self.publish(&node, NodeDelta::default(), now);
            }
        } else {
            for (node, delta) in changed {
                self.publish(&node, delta, now);
            }
        }
        // Switches held back wait for the generation that carries their gateway's entry.
        for d in &mut self.deferred {
            if d.generation == 0 {
                d.generation = self.tables.get(&d.gateway).map_or(0, |t| t.generation);
            }
        }

        // 4. Status of the policies whose entries, gateways or acknowledgements changed.
        for p in std::mem::take(&mut self.dirty_status) {
            let Some(outcome) = self.planner.policy_outcome(&p) else {
                continue;
            };
            let mut to_program = 0;
            let mut programmed = 0;
            let mut behind = Vec::new();
            for (node, t) in &self.tables {
                if !t.policies.contains_key(p.as_str()) {
                    continue;
                }
                to_program += 1;
                let shim = self.shims.get(&**node);
                let needed = t
                    .policy_generation
                    .get(p.as_str())
                    .copied()
                    .unwrap_or(t.generation);
                let failed: Vec<(&EntryKey, &String)> = shim
                    .into_iter()
                    .flat_map(|s| &s.errors)
                    .filter(|(k, _)| t.entries.get(*k).is_some_and(|e| *e.policy == *p))
                    .collect();
                let why = if let Some((key, message)) = failed.first() {
                    Behind::Failed {
                        source: key.source.to_string(),
                        destination: key.destination.to_string(),
                        message: (*message).clone(),
                        entries: failed.len(),
                    }
                } else if shim.is_some_and(|s| s.acked >= needed) {
                    programmed += 1;
                    continue;
                } else {
                    Behind::Pending
                };
                if behind.len() < StatusUpdate::MAX_BEHIND {
                    behind.push(NodeBehind {
                        node: node.to_string(),
                        why,
                    });
                }
            }
            let update = StatusUpdate {
                outcome,
                programmed,
                to_program,
                behind,
            };
            if self.last_status.get(&p) != Some(&update) {
                self.last_status.insert(p, update.clone());
                self.status_out.push(update);
            }
        }
    }

    /// Publishes a node's table if its entries or duties changed (or it was never published).
    fn publish(&mut self, node: &Arc<str>, delta: NodeDelta, now: Instant) {
        let duties = self.planner.gateway_duties(node);
        // A pod whose entries are held back (add before switch) is not decided here yet: its
        // node would otherwise let it out by the normal path meanwhile.
        let held_back: std::collections::HashSet<IpAddr> = self
            .deferred
            .iter()
            .filter(|d| d.node == *node && d.entry.is_some())
            .map(|d| d.key.source)
            .collect();
        let guard = sluice_proto::Guard {
            destinations: self.guarded.clone(),
            decided_pods: self
                .planner
                .decided_pod_ips(node)
                .into_iter()
                .filter(|ip| !held_back.contains(ip))
                .collect(),
        };
        let table = self.tables.entry(node.clone()).or_default();
        if table.generation != 0
            && delta.is_empty()
            && *table.duties == duties
            && Arc::ptr_eq(&table.cluster_cidrs, &self.cluster_cidrs)
            && *table.guard == guard
        {
            return;
        }
        table.guard = Arc::new(guard);
        let base = table.generation;
        table.generation = self.generations.advance();
        let touched = if base == 0 {
            table.policies.keys().cloned().collect()
        } else {
            std::mem::take(&mut table.touched)
        };
        table.touched.clear();
        for p in touched {
            table.policy_generation.insert(p, table.generation);
        }
        let policies = &table.policies;
        table.policy_generation.retain(|p, _| policies.contains_key(p));
        table.published_at = Some(now);
        table.duties = Arc::new(duties);
        table.cluster_cidrs = self.cluster_cidrs.clone();
        let view = NodeView {
            generation: table.generation,
            base,
            delta: Arc::new(if base == 0 { NodeDelta::default() } else { delta }),
            entries: table.entries.clone(),
            duties: table.duties.clone(),
            cluster_cidrs: table.cluster_cidrs.clone(),
            guard: table.guard.clone(),
        };
        self.dirty_status
            .extend(table.policies.keys().map(ToString::to_string));
        self.hub.publish(node, view);
    }

    /// Takes out of `pending` every change of a pod's entry on its own node that steers it to a
    /// gateway which receives the pod's entry in this same flush, and the removal of that entry
    /// from the pod's previous gateway: they are published once the new gateway has
    /// acknowledged its entry (or after [`EngineConfig::grace`]), so that no new flow reaches a
    /// gateway that does not know it yet.
    fn defer_switches(&mut self, pending: &mut BTreeMap<Arc<str>, NodeDelta>, now: Instant) {
        // A newer change of the same entry replaces one still held back.
        self.deferred.retain(|d| {
            pending
                .get(&d.node)
                .is_none_or(|p| !p.upserts.contains_key(&d.key) && !p.removals.contains(&d.key))
        });
        // Both the new gateway (learning the entry) and the previous one (losing it) have a
        // change in this flush: only the nodes in `pending` need naming, not the whole cluster
        // (this runs on every flush, heartbeats included).
        let by_ip: HashMap<IpAddr, Arc<str>> = pending
            .keys()
            .filter_map(|name| {
                let ip = self.source_nodes.get(&**name)?.tunnel_ip()?;
                Some((ip, name.clone()))
            })
            .collect();
        let gateway_of = |e: &EgressEntry| match e.gateway {
            GatewayTarget::Node(ip) => by_ip.get(&ip).cloned(),
            _ => None,
        };
        let mut held = Vec::new();
        for (node, delta) in pending.iter() {
            for (key, entry) in &delta.upserts {
                let Some(gateway) = gateway_of(entry).filter(|g| g != node) else {
                    continue;
                };
                let old = self.tables.get(node).and_then(|t| t.entries.get(key));
                let switches = old.is_none_or(|o| o.gateway != entry.gateway);
                let gateway_learns = pending.get(&gateway).is_some_and(|g| g.upserts.contains_key(key));
                let gateway_up = self.shims.get(&*gateway).is_some_and(|s| s.alive && s.connected);
                if switches && gateway_learns && gateway_up {
                    let previous = old.and_then(gateway_of).filter(|p| *p != gateway && p != node);
                    held.push((node.clone(), *key, entry.clone(), gateway, previous));
                }
            }
        }
        for (node, key, entry, gateway, previous) in held {
            let deadline = now + self.config.grace;
            if let Some(d) = pending.get_mut(&node) {
                d.upserts.remove(&key);
            }
            if let Some(previous) = previous
                && pending
                    .get_mut(&previous)
                    .is_some_and(|p| p.removals.remove(&key))
            {
                self.deferred.push(Deferred {
                    node: previous,
                    key,
                    entry: None,
                    gateway: gateway.clone(),
                    generation: 0,
                    deadline,
                });
            }
            self.deferred.push(Deferred {
                node,
                key,
                entry: Some(entry),
                gateway,
                generation: 0,
                deadline,
            });
        }
    }

    /// Puts back into `pending` the switches whose gateway has acknowledged its entry, has gone,
    /// or has kept them waiting too long.
    fn release_switches(&mut self, pending: &mut BTreeMap<Arc<str>, NodeDelta>, now: Instant) {
        if self.deferred.is_empty() {
            return;
        }
        let shims = &self.shims;
        let (ready, waiting): (Vec<Deferred>, Vec<Deferred>) =
            std::mem::take(&mut self.deferred).into_iter().partition(|d| {
                let shim = shims.get(&*d.gateway);
                let acked = d.generation != 0 && shim.is_some_and(|s| s.acked >= d.generation);
                let gone = shim.is_none_or(|s| !s.alive || !s.connected);
                acked || gone || now >= d.deadline
            });
        self.deferred = waiting;
        for d in ready {
            let delta = pending.entry(d.node).or_default();
            match d.entry {
                Some(entry) => delta.upserts.entry(d.key).or_insert(entry),
                None => {
                    if !delta.upserts.contains_key(&d.key) {
                        delta.removals.insert(d.key);
                    }
                    continue;
                }
            };
        }
    }

    /// Status updates collected since the last call.
    pub fn take_status(&mut self) -> Vec<StatusUpdate> {
        std::mem::take(&mut self.status_out)
    }

    /// Notices collected since the last call.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices_out)
    }
}

/// Puts the slots shims hold ahead of (and instead of) what `retained` says for the same slots.
fn retain_held(retained: &mut Vec<GatewaySlot>, held: &[GatewaySlot]) {
    retained.retain(|r| {
        !held
            .iter()
            .any(|h| h.entry == r.entry && (h.slot == r.slot || h.node == r.node))
    });
    let mut merged = held.to_vec();
    merged.append(retained);
    *retained = merged;
}

fn decrement(counts: &mut HashMap<Arc<str>, usize>, policy: &Arc<str>) {
    if let Some(n) = counts.get_mut(policy) {
        *n -= 1;
        if *n == 0 {
            counts.remove(policy);
        }
    }
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
    let mut ticker = tokio::time::interval(engine.tick_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            _ = ticker.tick() => engine.tick(Instant::now()),
        }
        engine.flush(Instant::now());
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
