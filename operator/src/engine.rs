//! The planning engine of the live system: owns the [`Planner`], applies what the source of truth
//! says, merges in shim liveness, and publishes every node's part of the plan to the shims'
//! sessions (see [`crate::grpc`]).
//!
//! [`Engine`] is synchronous and takes the time as an argument, so that tests drive it without
//! sleeping; [`run`] is the task around it.
//!
//! - Nothing is published before [`SourceEvent::Synced`]: a partial view would make shims delete
//!   the entries of objects not seen yet.
//! - A node may be a gateway only when its source says so *and* its shim is alive: connected, or
//!   heard from within the grace period. A shim that reconnects within the grace period causes no
//!   change at all.
//! - The planner's own choice of gateways is fed back as `retained_gateways`, so a node that
//!   recovers (or a better-hashed newcomer) does not take traffic from a working gateway.
//! - Per node, the engine keeps the table it published and a generation that only grows; every
//!   publication replaces the node's view in a `watch` channel. A session sends the delta from
//!   what it last sent to the latest view, so a slow shim gets its changes coalesced and never
//!   holds anyone else up.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::sync::{mpsc, watch};

use crate::{
    live::{Notice, SourceEvent, StatusUpdate},
    model::{InterfaceInfo, NodeInfo, PolicyInput},
    planner::{Change, EgressEntry, EntryKey, GatewayDuty, NodeDelta, PlanDelta, Planner},
};

/// Tunables of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How long a gateway's shim may stay silent before the gateway is replaced.
    pub grace: Duration,
    /// How often shims (and sessions) send heartbeats: a quarter of the grace period by default.
    pub heartbeat_interval: Duration,
}

impl EngineConfig {
    pub fn with_grace(grace: Duration) -> Self {
        EngineConfig {
            grace,
            heartbeat_interval: (grace / 4).max(Duration::from_millis(10)),
        }
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
}

/// What sessions tell the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShimEvent {
    Connected {
        node: String,
        session: u64,
        version: String,
        interfaces: Vec<InterfaceInfo>,
    },
    Heartbeat {
        node: String,
        session: u64,
    },
    Ack {
        node: String,
        session: u64,
        generation: u64,
        errors: usize,
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
}

#[derive(Default)]
struct Table {
    generation: u64,
    published_at: Option<Instant>,
    entries: Arc<BTreeMap<EntryKey, EgressEntry>>,
    duties: Arc<Vec<GatewayDuty>>,
    /// Entries per policy.
    policies: HashMap<Arc<str>, usize>,
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
    policy_inputs: HashMap<String, PolicyInput>,
    shims: HashMap<String, Shim>,
    tables: BTreeMap<Arc<str>, Table>,
    generation: u64,
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
        Engine {
            planner: Planner::new(),
            config,
            hub,
            metrics,
            synced: false,
            published: false,
            source_nodes: BTreeMap::new(),
            policy_inputs: HashMap::new(),
            shims: HashMap::new(),
            tables: BTreeMap::new(),
            generation: 0,
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

    fn effective(&self, source: &NodeInfo) -> NodeInfo {
        let shim = self.shims.get(&source.name);
        let mut node = source.clone();
        node.eligible = source.eligible && shim.is_some_and(|s| s.alive);
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
                }
                self.synced = true;
            }
            SourceEvent::Change(change) => match *change {
                Change::UpsertNode(node) => {
                    let effective = self.effective(&node);
                    self.source_nodes.insert(node.name.clone(), node);
                    self.apply(Change::UpsertNode(effective));
                }
                Change::RemoveNode(name) => {
                    self.source_nodes.remove(&name);
                    self.apply(Change::RemoveNode(name));
                }
                Change::UpsertPolicy(mut input) => {
                    // A known policy keeps the gateways the planner chose; a new one starts from
                    // what the source remembers (the last leader's choice, from its status).
                    if self.policy_inputs.contains_key(&input.name) {
                        input.retained_gateways = self.planner.gateway_slots(&input.name);
                    }
                    self.policy_inputs.insert(input.name.clone(), input.clone());
                    self.apply(Change::UpsertPolicy(input));
                }
                Change::RemovePolicy(name) => {
                    self.policy_inputs.remove(&name);
                    self.apply(Change::RemovePolicy(name));
                }
                other => self.apply(other),
            },
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
            } => {
                tracing::info!(%node, session, %version, "shim connected");
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
                    },
                );
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
                    self.publish(&name, NodeDelta::default(), Instant::now());
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
                s.acked = s.acked.max(generation);
                if errors > 0 {
                    tracing::warn!(%node, generation, errors, "shim could not program some entries");
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

    /// Notices shims silent for longer than the grace period.
    pub fn tick(&mut self, now: Instant) {
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

        // 3. Fold entry changes into the tables; publish once synced.
        let mut changed: BTreeMap<Arc<str>, NodeDelta> = BTreeMap::new();
        for (node, delta) in pending.nodes {
            let table = self.tables.entry(node.clone()).or_default();
            let entries = Arc::make_mut(&mut table.entries);
            for key in &delta.removals {
                if let Some(old) = entries.remove(key) {
                    decrement(&mut table.policies, &old.policy);
                    self.dirty_status.insert(old.policy.to_string());
                }
            }
            for (key, entry) in &delta.upserts {
                if let Some(old) = entries.insert(*key, entry.clone()) {
                    decrement(&mut table.policies, &old.policy);
                    self.dirty_status.insert(old.policy.to_string());
                }
                *table.policies.entry(entry.policy.clone()).or_default() += 1;
                self.dirty_status.insert(entry.policy.to_string());
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
        if !self.synced {
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

        // 4. Status of the policies whose entries, gateways or acknowledgements changed.
        for p in std::mem::take(&mut self.dirty_status) {
            let Some(outcome) = self.planner.policy_outcome(&p) else {
                continue;
            };
            let mut to_program = 0;
            let mut programmed = 0;
            for (node, t) in &self.tables {
                if t.policies.contains_key(p.as_str()) {
                    to_program += 1;
                    if self.shims.get(&**node).is_some_and(|s| s.acked >= t.generation) {
                        programmed += 1;
                    }
                }
            }
            let update = StatusUpdate {
                outcome,
                programmed,
                to_program,
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
        let table = self.tables.entry(node.clone()).or_default();
        if table.generation != 0 && delta.is_empty() && *table.duties == duties {
            return;
        }
        let base = table.generation;
        self.generation += 1;
        table.generation = self.generation;
        table.published_at = Some(now);
        table.duties = Arc::new(duties);
        let view = NodeView {
            generation: table.generation,
            base,
            delta: Arc::new(if base == 0 { NodeDelta::default() } else { delta }),
            entries: table.entries.clone(),
            duties: table.duties.clone(),
        };
        self.dirty_status
            .extend(table.policies.keys().map(ToString::to_string));
        self.hub.publish(node, view);
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
