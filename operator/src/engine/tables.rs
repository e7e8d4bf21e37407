//! Per-node tables and their publication: the entries each node must hold, the generation that
//! numbers them, the view its session sends from, and the switches held back until a new
//! gateway holds a pod's entry (add before switch).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;

use crate::{
    live::{Behind, Draining},
    plan::{GatewayTarget, Guard},
    planner::{EgressEntry, EntryKey, GatewayDuty, NodeDelta},
};

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

/// What one node's shim must hold, as published to its session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    pub guard: Arc<Guard>,
    /// How often the node's shim must send heartbeats (and its session send them back): fast
    /// on nodes that may be gateways, whose liveness moves traffic, slow on the others
    /// ([`super::EngineConfig::slow_heartbeat_interval`]).
    pub heartbeat_interval: Duration,
    /// Gateways that still hold entries of this node's pods after a planned change moved them
    /// elsewhere: flows may stay pinned to them ([`Tables::linger`]).
    pub pinnable: Arc<Vec<IpAddr>>,
}

/// What a node's view holds besides its entries, as the planner and liveness have it now.
pub(super) struct NodeContent {
    pub duties: Vec<GatewayDuty>,
    /// Gateways this node's pods have entries lingering on ([`Tables::pinnable`]).
    pub pinnable: Vec<IpAddr>,
    /// The node's pods the plan has decided on (before holding back any, see
    /// [`Tables::publish`]).
    pub decided_pods: Vec<IpAddr>,
    pub heartbeat_interval: Duration,
}

/// One node's table as last published (entries folded in since included).
#[derive(Default)]
pub(super) struct Table {
    pub generation: u64,
    pub published_at: Option<Instant>,
    pub entries: Arc<BTreeMap<EntryKey, EgressEntry>>,
    duties: Arc<Vec<GatewayDuty>>,
    cluster_cidrs: Arc<Vec<IpNet>>,
    guard: Arc<Guard>,
    pub heartbeat_interval: Duration,
    pinnable: Arc<Vec<IpAddr>>,
    /// Entries per policy.
    pub policies: HashMap<Arc<str>, usize>,
    /// Per policy, the generation that carries its current entries here: the one a shim must
    /// have acknowledged for the policy to be programmed on this node.
    policy_generation: HashMap<Arc<str>, u64>,
    /// Policies whose entries changed since the last publication.
    touched: BTreeSet<Arc<str>>,
}

impl Table {
    /// The gateway duties as last published.
    pub fn duties(&self) -> &[GatewayDuty] {
        &self.duties
    }
}

/// A change of one node's entry held back until `gateway` acknowledges `generation` (0 until
/// the generation carrying the gateway's entry is published), or until `deadline`.
#[derive(Clone, Debug)]
struct Deferred {
    node: Arc<str>,
    /// The pod's node (for a removal from its previous gateway: whose flows may linger there).
    source: Arc<str>,
    key: EntryKey,
    /// The upsert, or `None` for a removal.
    entry: Option<EgressEntry>,
    gateway: Arc<str>,
    generation: u64,
    deadline: Instant,
}

/// An entry a gateway keeps after a planned change moved its pod to another gateway, so that the
/// pod's open flows (pinned to this gateway on the pod's node) keep working: until `until`, or
/// until the gateway is gone. When the gateway was the pod's own node (`gateway == source`), it
/// keeps no entry (the pod's entry there is the new one): only the node's own address stays
/// pinnable there, and its shim keeps the egresses its pods' flows left by.
#[derive(Clone, Debug)]
struct Lingering {
    gateway: Arc<str>,
    gateway_ip: IpAddr,
    key: EntryKey,
    policy: Arc<str>,
    /// The pod's node.
    source: Arc<str>,
    /// Since when (its flows may end it early only some time after: [`LINGER_AT_LEAST`]).
    since: Instant,
    /// Whether the engine has looked at its flows since [`LINGER_AT_LEAST`] passed (until then,
    /// that moment is a deadline to wake at).
    looked: bool,
    until: Instant,
    /// `until` as seconds since the epoch (for the status).
    until_unix: i64,
}

impl Lingering {
    /// `key`'s entry of `policy`, kept on `gateway` for the pod on node `source`, from `now` for
    /// `linger`.
    fn new(
        (gateway, gateway_ip): (Arc<str>, IpAddr),
        key: EntryKey,
        policy: Arc<str>,
        source: Arc<str>,
        now: Instant,
        linger: Duration,
    ) -> Self {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_secs() as i64);
        Lingering {
            gateway,
            gateway_ip,
            key,
            policy,
            source,
            since: now,
            looked: false,
            until: now + linger,
            until_unix: unix + linger.as_secs() as i64,
        }
    }

    /// For the pod of the switch `d`, on `d.node`.
    fn of_switch(d: &Deferred, gateway_ip: IpAddr, policy: Arc<str>, now: Instant, linger: Duration) -> Self {
        Lingering::new(
            (d.node.clone(), gateway_ip),
            d.key,
            policy,
            d.source.clone(),
            now,
            linger,
        )
    }
}

/// How long a lingering entry stays at least, whatever the pod's node counts: longer than its
/// node takes to count a flow that started just before the switch (a count every 2 s, sent
/// when it changes), so that a count from before cannot end it.
pub const LINGER_AT_LEAST: Duration = Duration::from_secs(10);

/// How a gateway's shim stands, for releasing the switches that wait on it.
pub(super) struct GatewayShim {
    pub acked: u64,
    /// Alive and connected.
    pub up: bool,
}

/// Every node's table, and what all nodes get alike.
pub(super) struct Tables {
    tables: BTreeMap<Arc<str>, Table>,
    generations: Generations,
    /// Changes held back until a gateway has acknowledged an entry ([`Tables::defer_switches`]).
    deferred: Vec<Deferred>,
    /// Entries kept on gateways for the flows of pods moved away from them ([`Tables::linger`]).
    lingering: HashMap<(Arc<str>, EntryKey), Lingering>,
    /// Every table published at least once.
    pub published: bool,
    /// The in-cluster set every node gets.
    cluster_cidrs: Arc<Vec<IpNet>>,
    /// The destinations of the accepted Drop policies (the no-leak guard).
    guarded: Vec<IpNet>,
}

impl Tables {
    pub fn new(generations: Generations) -> Self {
        Tables {
            tables: BTreeMap::new(),
            generations,
            deferred: Vec::new(),
            lingering: HashMap::new(),
            published: false,
            cluster_cidrs: Arc::default(),
            guarded: Vec::new(),
        }
    }

    pub fn get(&self, node: &str) -> Option<&Table> {
        self.tables.get(node)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Arc<str>> {
        self.tables.keys()
    }

    /// The generation last published for `node` (0: none yet).
    pub fn generation(&self, node: &str) -> u64 {
        self.tables.get(node).map_or(0, |t| t.generation)
    }

    /// Gives `node` an empty table if it has none; whether it had none.
    pub fn ensure(&mut self, node: &str) -> bool {
        if self.tables.contains_key(node) {
            return false;
        }
        self.tables.insert(node.into(), Table::default());
        true
    }

    pub fn cluster_cidrs(&self) -> &[IpNet] {
        &self.cluster_cidrs
    }

    /// Replaces the in-cluster set; whether it changed (every node then needs a new view).
    pub fn set_cluster_cidrs(&mut self, cidrs: Vec<IpNet>) -> bool {
        if *self.cluster_cidrs == cidrs {
            return false;
        }
        self.cluster_cidrs = Arc::new(cidrs);
        true
    }

    /// Replaces the guarded destinations; whether they changed (every node then needs a new
    /// view).
    pub fn set_guarded(&mut self, guarded: Vec<IpNet>) -> bool {
        if guarded == self.guarded {
            return false;
        }
        self.guarded = guarded;
        true
    }

    /// Folds `delta` into `node`'s table (published later), noting in `dirty` the policies
    /// whose entries there changed. Returns how many entries the node now holds.
    pub fn fold(&mut self, node: &Arc<str>, delta: &NodeDelta, dirty: &mut BTreeSet<String>) -> usize {
        let table = self.tables.entry(node.clone()).or_default();
        let entries = Arc::make_mut(&mut table.entries);
        for key in &delta.removals {
            if let Some(old) = entries.remove(key) {
                decrement(&mut table.policies, &old.policy);
                dirty.insert(old.policy.to_string());
                table.touched.insert(old.policy);
            }
        }
        for (key, entry) in &delta.upserts {
            if let Some(old) = entries.insert(*key, entry.clone()) {
                decrement(&mut table.policies, &old.policy);
                dirty.insert(old.policy.to_string());
                table.touched.insert(old.policy);
            }
            *table.policies.entry(entry.policy.clone()).or_default() += 1;
            dirty.insert(entry.policy.to_string());
            table.touched.insert(entry.policy.clone());
        }
        entries.len()
    }

    /// Publishes `node`'s table as a new generation, `delta` being what changed since the last
    /// one, unless nothing did (and it was published before). The view to hand its session.
    pub fn publish(
        &mut self,
        node: &Arc<str>,
        delta: NodeDelta,
        content: NodeContent,
        now: Instant,
    ) -> Option<NodeView> {
        // A pod whose entries are held back (add before switch) is not decided here yet: its
        // node would otherwise let it out by the normal path meanwhile.
        let held_back: HashSet<IpAddr> = self
            .deferred
            .iter()
            .filter(|d| d.node == *node && d.entry.is_some())
            .map(|d| d.key.source)
            .collect();
        let guard = Guard {
            destinations: self.guarded.clone(),
            decided_pods: content
                .decided_pods
                .into_iter()
                .filter(|ip| !held_back.contains(ip))
                .collect(),
        };
        let table = self.tables.entry(node.clone()).or_default();
        if table.generation != 0
            && delta.is_empty()
            && *table.duties == content.duties
            && Arc::ptr_eq(&table.cluster_cidrs, &self.cluster_cidrs)
            && *table.guard == guard
            && table.heartbeat_interval == content.heartbeat_interval
            && *table.pinnable == content.pinnable
        {
            return None;
        }
        table.guard = Arc::new(guard);
        // A policy whose gateway duty here changed (a managed address to claim, say) is
        // programmed here only once this generation is acknowledged.
        let duties_changed: Vec<Arc<str>> = table
            .duties
            .iter()
            .filter(|d| !content.duties.contains(d))
            .chain(content.duties.iter().filter(|d| !table.duties.contains(d)))
            .map(|d| d.policy.clone())
            .collect();
        table.touched.extend(duties_changed);
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
        table.duties = Arc::new(content.duties);
        table.cluster_cidrs = self.cluster_cidrs.clone();
        table.heartbeat_interval = content.heartbeat_interval;
        table.pinnable = Arc::new(content.pinnable);
        Some(NodeView {
            generation: table.generation,
            base,
            delta: Arc::new(if base == 0 { NodeDelta::default() } else { delta }),
            entries: table.entries.clone(),
            duties: table.duties.clone(),
            cluster_cidrs: table.cluster_cidrs.clone(),
            guard: table.guard.clone(),
            heartbeat_interval: table.heartbeat_interval,
            pinnable: table.pinnable.clone(),
        })
    }

    /// Takes out of `pending` every change of a pod's entry on its own node that steers it to a
    /// gateway which receives the pod's entry in this same flush, and the removal of that entry
    /// from the pod's previous gateway: they are published once the new gateway has
    /// acknowledged its entry (or at `deadline`), so that no new flow reaches a gateway that
    /// does not know it yet. `tunnel_ip` names nodes' underlay addresses; `gateway_up` says
    /// whether a node's shim is there to acknowledge anything.
    pub fn defer_switches(
        &mut self,
        pending: &mut BTreeMap<Arc<str>, NodeDelta>,
        tunnel_ip: impl Fn(&str) -> Option<IpAddr>,
        gateway_up: impl Fn(&str) -> bool,
        deadline: Instant,
    ) {
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
            .filter_map(|name| Some((tunnel_ip(name)?, name.clone())))
            .collect();
        let gateway_of = |e: &EgressEntry| match e.gateway {
            GatewayTarget::Node(ip) => by_ip.get(&ip).cloned(),
            _ => None,
        };
        let mut held = Vec::new();
        // A pod whose own node becomes its gateway: its previous gateway lets go of its entry
        // once the node holds its new one (and keeps it meanwhile for the pod's pinned flows).
        let mut to_own = Vec::new();
        for (node, delta) in pending.iter() {
            for (key, entry) in &delta.upserts {
                let Some(gateway) = gateway_of(entry).filter(|g| g != node) else {
                    let old = self.tables.get(node).and_then(|t| t.entries.get(key));
                    let previous = old.and_then(gateway_of).filter(|p| p != node);
                    if let Some(previous) = previous
                        && gateway_of(entry).is_some_and(|g| g == *node)
                        && gateway_up(&previous)
                    {
                        to_own.push((node.clone(), *key, previous));
                    }
                    continue;
                };
                let old = self.tables.get(node).and_then(|t| t.entries.get(key));
                let switches = old.is_none_or(|o| o.gateway != entry.gateway);
                let gateway_learns = pending.get(&gateway).is_some_and(|g| g.upserts.contains_key(key));
                if switches && gateway_learns && gateway_up(&gateway) {
                    let previous = old.and_then(gateway_of).filter(|p| *p != gateway && p != node);
                    held.push((node.clone(), *key, entry.clone(), gateway, previous));
                }
            }
        }
        for (node, key, previous) in to_own {
            self.defer_removal(pending, previous, node.clone(), key, node, deadline);
        }
        for (node, key, entry, gateway, previous) in held {
            if let Some(d) = pending.get_mut(&node) {
                d.upserts.remove(&key);
            }
            if let Some(previous) = previous {
                self.defer_removal(pending, previous, node.clone(), key, gateway.clone(), deadline);
            }
            self.deferred.push(Deferred {
                source: node.clone(),
                node,
                key,
                entry: Some(entry),
                gateway,
                generation: 0,
                deadline,
            });
        }
    }

    /// Holds back `previous`'s removal of the entry of `key` (in `pending`), the pod on node
    /// `source`, until `gateway` has acknowledged the pod's new entry.
    fn defer_removal(
        &mut self,
        pending: &mut BTreeMap<Arc<str>, NodeDelta>,
        previous: Arc<str>,
        source: Arc<str>,
        key: EntryKey,
        gateway: Arc<str>,
        deadline: Instant,
    ) {
        if pending
            .get_mut(&previous)
            .is_some_and(|p| p.removals.remove(&key))
        {
            self.deferred.push(Deferred {
                node: previous,
                source,
                key,
                entry: None,
                gateway,
                generation: 0,
                deadline,
            });
        }
    }

    /// Puts back into `pending` the switches whose gateway has acknowledged its entry, has gone,
    /// or has kept them waiting until their deadline. The removal of a pod's entry from its
    /// previous gateway, while that one is up, becomes a lingering entry instead for as long as
    /// `linger` says for the entry's policy: the pod's node may keep its open flows pinned there
    /// ([`Tables::linger`]).
    pub fn release_switches(
        &mut self,
        pending: &mut BTreeMap<Arc<str>, NodeDelta>,
        gateway: impl Fn(&str) -> Option<GatewayShim>,
        linger: impl Fn(&str) -> Option<std::time::Duration>,
        tunnel_ip: impl Fn(&str) -> Option<IpAddr>,
        now: Instant,
    ) {
        if self.deferred.is_empty() {
            return;
        }
        let (ready, waiting): (Vec<Deferred>, Vec<Deferred>) =
            std::mem::take(&mut self.deferred).into_iter().partition(|d| {
                let shim = gateway(&d.gateway);
                let acked = d.generation != 0 && shim.as_ref().is_some_and(|s| s.acked >= d.generation);
                let gone = shim.is_none_or(|s| !s.up);
                acked || gone || now >= d.deadline
            });
        self.deferred = waiting;
        for d in ready {
            let previous_up = gateway(&d.node).is_some_and(|s| s.up);
            let kept = self
                .tables
                .get(&d.node)
                .and_then(|t| t.entries.get(&d.key))
                .and_then(|e| match e.gateway {
                    GatewayTarget::Node(ip) => Some((ip, e.policy.clone())),
                    _ => None,
                });
            let delta = pending.entry(d.node.clone()).or_default();
            match d.entry.clone() {
                Some(entry) => {
                    // A pod leaving its own gateway node: its flows that left from there stay.
                    let own = kept
                        .filter(|(ip, _)| Some(*ip) == tunnel_ip(&d.node) && previous_up)
                        .and_then(|(ip, policy)| Some((linger(&policy)?, ip, policy)));
                    if let Some((linger, gateway_ip, policy)) = own {
                        let l = Lingering::of_switch(&d, gateway_ip, policy, now, linger);
                        self.start_lingering(l);
                    }
                    delta.upserts.entry(d.key).or_insert(entry);
                }
                None if delta.upserts.contains_key(&d.key) => {}
                None => match kept.and_then(|(ip, policy)| Some((linger(&policy)?, ip, policy))) {
                    Some((linger, gateway_ip, policy)) if previous_up => {
                        // The pod's node learns it may pin there (its own change may have gone
                        // out already: a pod whose own node became its gateway).
                        pending.entry(d.source.clone()).or_default();
                        let l = Lingering::of_switch(&d, gateway_ip, policy, now, linger);
                        self.start_lingering(l);
                    }
                    _ => {
                        delta.removals.insert(d.key);
                    }
                },
            }
        }
    }

    /// Starts `l`, instead of any other of its gateway and key.
    fn start_lingering(&mut self, l: Lingering) {
        self.lingering.insert((l.gateway.clone(), l.key), l);
    }

    /// Puts `entries` back on `gateway` (underlay address `gateway_ip`) as lingering entries
    /// of the pod on node `source`, from `now` for `linger`: what a new
    /// leader does for the flows a pod's node reports pinned to a gateway the pod no longer
    /// uses, before its first publication. Keys the gateway holds as its own are left alone.
    /// When the gateway is the pod's own node, `entries` are the node's own (new) entries of
    /// the pod: nothing is put back, the node only stays pinnable for them.
    #[allow(clippy::too_many_arguments)]
    pub fn adopt_lingering(
        &mut self,
        gateway: &Arc<str>,
        gateway_ip: IpAddr,
        source: Arc<str>,
        entries: Vec<EgressEntry>,
        (now, linger): (Instant, Duration),
        dirty: &mut BTreeSet<String>,
    ) {
        let own = *gateway == source;
        let held = self
            .tables
            .get(gateway)
            .map(|t| t.entries.clone())
            .unwrap_or_default();
        let mut delta = NodeDelta::default();
        for entry in entries {
            let key = entry.key;
            if (held.contains_key(&key) && !own) || self.lingering.contains_key(&(gateway.clone(), key)) {
                continue;
            }
            let l = Lingering::new(
                (gateway.clone(), gateway_ip),
                key,
                entry.policy.clone(),
                source.clone(),
                now,
                linger,
            );
            self.start_lingering(l);
            if !own {
                delta.upserts.insert(key, entry);
            }
        }
        if !delta.upserts.is_empty() {
            self.fold(gateway, &delta, dirty);
        }
    }

    /// Ends the lingering entries whose time is up, whose gateway is gone (`up` says no: its
    /// flows are lost anyway, and must follow their entries at once), whose pod has no open
    /// flow left there (`ended(pod's node, pod, policy, gateway)`, once [`LINGER_AT_LEAST`] has
    /// passed), or that are a gateway's own entries again (an upsert in `pending`): their
    /// removals go into `pending`. Returns the pods' nodes whose pinnable gateways changed.
    pub fn linger(
        &mut self,
        pending: &mut BTreeMap<Arc<str>, NodeDelta>,
        up: impl Fn(&str) -> bool,
        (ended, recounted): (impl Fn(&str, IpAddr, &str, IpAddr) -> bool, bool),
        now: Instant,
    ) -> BTreeSet<Arc<str>> {
        let mut changed = BTreeSet::new();
        self.lingering.retain(|_, l| {
            // Its gateway is the pod's gateway again (for a pod on its own gateway node, its
            // entry there leaves from there again).
            let current = pending.get(&l.gateway).is_some_and(|p| {
                p.upserts
                    .get(&l.key)
                    .is_some_and(|e| e.gateway == GatewayTarget::Node(l.gateway_ip))
            });
            if current {
                changed.insert(l.source.clone());
                return false;
            }
            // Asked when it first may end so, and again only when the counts changed (a drain can
            // keep a million entries, and this runs at every flush).
            let old_enough = now >= l.since + LINGER_AT_LEAST;
            let ask = old_enough && (!l.looked || recounted);
            l.looked |= old_enough;
            let flows_ended = ask && ended(&l.source, l.key.source, &l.policy, l.gateway_ip);
            if now < l.until && up(&l.gateway) && !flows_ended {
                return true;
            }
            // A pod's own node kept no entry for it: nothing to remove.
            if l.gateway != l.source {
                pending
                    .entry(l.gateway.clone())
                    .or_default()
                    .removals
                    .insert(l.key);
            }
            changed.insert(l.source.clone());
            false
        });
        changed
    }

    /// The gateways draining `policy`'s open flows, by node, with how many flows are left
    /// (`flows(policy, gateway)`, as the pods' nodes counted them).
    pub fn draining(&self, policy: &str, flows: impl Fn(&str, IpAddr) -> Option<u64>) -> Vec<Draining> {
        let mut by_node: BTreeMap<&str, (i64, BTreeSet<IpAddr>, IpAddr)> = BTreeMap::new();
        for l in self.lingering.values().filter(|l| *l.policy == *policy) {
            let (until, pods, _) = by_node
                .entry(&l.gateway)
                .or_insert((0, BTreeSet::new(), l.gateway_ip));
            *until = (*until).max(l.until_unix);
            pods.insert(l.key.source);
        }
        by_node
            .into_iter()
            .map(|(node, (until, pods, ip))| Draining {
                node: node.to_owned(),
                until,
                pods: pods.len() as u64,
                flows: flows(policy, ip),
            })
            .collect()
    }

    /// The policies with lingering entries.
    pub fn lingering_policies(&self) -> BTreeSet<String> {
        self.lingering.values().map(|l| l.policy.to_string()).collect()
    }

    /// The gateways that carry lingering entries, or will once a switch held back is released.
    pub fn carrying(&self) -> BTreeSet<String> {
        let deferred = self
            .deferred
            .iter()
            .filter(|d| d.entry.is_none())
            .map(|d| &d.node);
        deferred
            .chain(self.lingering.values().map(|l| &l.gateway))
            .map(|n| n.to_string())
            .collect()
    }

    /// Per pod's node, the gateways its pods have entries lingering on (sorted, each once):
    /// one pass over the lingering entries for every node published in a flush.
    pub fn pinnable_by_node(&self) -> HashMap<Arc<str>, Vec<IpAddr>> {
        let mut sets: HashMap<Arc<str>, BTreeSet<IpAddr>> = HashMap::new();
        for l in self.lingering.values() {
            sets.entry(l.source.clone()).or_default().insert(l.gateway_ip);
        }
        sets.into_iter()
            .map(|(node, set)| (node, set.into_iter().collect()))
            .collect()
    }

    /// The gateways `node`'s pods have entries lingering on (sorted, each once).
    #[cfg(test)]
    pub fn pinnable(&self, node: &str) -> Vec<IpAddr> {
        self.pinnable_by_node().remove(node).unwrap_or_default()
    }

    /// The earliest deadline of a switch held back or of a lingering entry, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let deferred = self.deferred.iter().map(|d| d.deadline);
        let lingering = self.lingering.values().map(|l| match l.looked {
            true => l.until,
            false => l.until.min(l.since + LINGER_AT_LEAST),
        });
        deferred.chain(lingering).min()
    }

    /// Switches held back wait for the generation that carries their gateway's entry: the one
    /// just published.
    pub fn await_published(&mut self) {
        for d in &mut self.deferred {
            if d.generation == 0 {
                d.generation = self.tables.get(&d.gateway).map_or(0, |t| t.generation);
            }
        }
    }

    /// Per node that must hold entries of `policy`: `None` when its shim (`shim(node)`: the
    /// generation acknowledged and the entries it could not program) holds them as planned,
    /// else why not.
    pub fn progress<'a>(
        &'a self,
        policy: &'a str,
        shim: impl Fn(&str) -> Option<(u64, &'a BTreeMap<EntryKey, String>)> + 'a,
    ) -> impl Iterator<Item = (&'a Arc<str>, Option<Behind>)> + 'a {
        self.tables
            .iter()
            .filter(move |(_, t)| t.policies.contains_key(policy))
            .map(move |(node, t)| {
                let shim = shim(node);
                let needed = t.policy_generation.get(policy).copied().unwrap_or(t.generation);
                let failed: Vec<(&EntryKey, &String)> = shim
                    .into_iter()
                    .flat_map(|(_, errors)| errors)
                    .filter(|(k, _)| t.entries.get(*k).is_some_and(|e| *e.policy == *policy))
                    .collect();
                let why = if let Some((key, message)) = failed.first() {
                    Some(Behind::Failed {
                        source: key.source.to_string(),
                        destination: key.destination.to_string(),
                        message: (*message).clone(),
                        entries: failed.len(),
                    })
                } else if shim.is_some_and(|(acked, _)| acked >= needed) {
                    None
                } else {
                    Some(Behind::Pending)
                };
                (node, why)
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_millis(250);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn key(pod: u8) -> EntryKey {
        EntryKey {
            source: IpAddr::from([10, 1, 0, pod]),
            destination: "203.0.113.0/24".parse().unwrap(),
        }
    }

    fn ip(node: &str) -> Option<IpAddr> {
        match node {
            "w" => Some(IpAddr::from([192, 168, 0, 1])),
            "g1" => Some(IpAddr::from([192, 168, 0, 11])),
            "g2" => Some(IpAddr::from([192, 168, 0, 12])),
            _ => None,
        }
    }

    /// Pod `pod`'s entry steering it to `gateway` (on its node or on the gateway).
    fn entry(pod: u8, gateway: &str) -> EgressEntry {
        EgressEntry {
            key: key(pod),
            gateway: GatewayTarget::Node(ip(gateway).unwrap()),
            egress_ip: None,
            interface: None,
            source_node_ip: None,
            gateway_slot: None,
            policy: "p".into(),
        }
    }

    fn upserts(entries: impl IntoIterator<Item = EgressEntry>) -> NodeDelta {
        NodeDelta {
            upserts: entries.into_iter().map(|e| (e.key, e)).collect(),
            ..NodeDelta::default()
        }
    }

    fn content(decided_pods: Vec<IpAddr>) -> NodeContent {
        NodeContent {
            duties: vec![],
            pinnable: vec![],
            decided_pods,
            heartbeat_interval: FAST,
        }
    }

    /// Folds `delta` into `node`'s table and publishes it (`w`'s pod 1 decided there).
    fn publish(tables: &mut Tables, node: &str, delta: NodeDelta, at: Instant) -> Option<NodeView> {
        let decided = if node == "w" { vec![key(1).source] } else { vec![] };
        let node: Arc<str> = node.into();
        tables.fold(&node, &delta, &mut BTreeSet::new());
        tables.publish(&node, delta, content(decided), at)
    }

    #[test]
    fn generations_only_grow_and_each_delta_applies_on_the_previous_one() {
        let t0 = Instant::now();
        let mut tables = Tables::new(Generations::new(7));
        let first = publish(&mut tables, "w", upserts([entry(1, "g1")]), t0).unwrap();
        assert_eq!(first.base, 0, "the first view is sent whole");
        let mut held = (*first.entries).clone();
        let mut last = first.generation;
        let mut seen = vec![last];
        for pod in 2..6 {
            // Another node's publication in between takes a generation of the same sequence.
            publish(&mut tables, "g1", upserts([entry(pod, "g1")]), t0).unwrap();
            let mut delta = upserts([entry(pod, "g1")]);
            delta.removals.insert(key(pod - 1));
            let view = publish(&mut tables, "w", delta, t0).unwrap();
            assert_eq!(view.base, last, "a delta's base is the generation before it");
            assert!(view.generation > last);
            view.delta.apply_to(&mut held);
            assert_eq!(held, *view.entries, "base + delta = the table");
            last = view.generation;
            seen.push(last);
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        // Nothing changed: nothing published, no generation spent.
        assert!(publish(&mut tables, "w", NodeDelta::default(), t0).is_none());
        assert_eq!(tables.generation("w"), last);
        let next = publish(&mut tables, "w", upserts([entry(9, "g1")]), t0).unwrap();
        assert_eq!(next.base, last);
        assert_eq!(next.generation, last + 1, "the skipped publication took none");
    }

    #[test]
    fn a_new_heartbeat_interval_alone_is_a_new_view() {
        let t0 = Instant::now();
        let mut tables = Tables::new(Generations::new(1));
        let node: Arc<str> = "w".into();
        let first = tables
            .publish(&node, NodeDelta::default(), content(vec![]), t0)
            .unwrap();
        assert_eq!(first.heartbeat_interval, FAST);
        assert!(
            tables
                .publish(&node, NodeDelta::default(), content(vec![]), t0)
                .is_none()
        );
        let slow = NodeContent {
            heartbeat_interval: Duration::from_secs(10),
            ..content(vec![])
        };
        let view = tables.publish(&node, NodeDelta::default(), slow, t0).unwrap();
        assert_eq!(view.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(view.base, first.generation);
        assert!(view.delta.is_empty());
    }

    /// `w`'s pod 1 goes through g1, which holds its entry; all published. Then the planner moves
    /// it to g2: the pending changes of the three nodes, and the switch held back.
    fn switching(t0: Instant) -> (Tables, BTreeMap<Arc<str>, NodeDelta>) {
        let mut tables = Tables::new(Generations::new(1));
        publish(&mut tables, "w", upserts([entry(1, "g1")]), t0);
        publish(&mut tables, "g1", upserts([entry(1, "g1")]), t0);
        publish(&mut tables, "g2", NodeDelta::default(), t0);
        tables.published = true;
        let mut pending: BTreeMap<Arc<str>, NodeDelta> = BTreeMap::new();
        pending.insert("w".into(), upserts([entry(1, "g2")]));
        pending.insert("g2".into(), upserts([entry(1, "g2")]));
        let mut g1 = NodeDelta::default();
        g1.removals.insert(key(1));
        pending.insert("g1".into(), g1);
        tables.defer_switches(&mut pending, ip, |_| true, t0 + ms(1000));
        (tables, pending)
    }

    /// Publishes what `pending` holds for every node.
    fn publish_all(
        tables: &mut Tables,
        pending: BTreeMap<Arc<str>, NodeDelta>,
        at: Instant,
    ) -> BTreeMap<Arc<str>, NodeView> {
        let views = pending
            .into_iter()
            .filter_map(|(node, delta)| Some((node.clone(), publish(tables, &node, delta, at)?)))
            .collect();
        tables.await_published();
        views
    }

    fn steers(tables: &Tables, node: &str) -> Option<GatewayTarget> {
        tables.get(node)?.entries.get(&key(1)).map(|e| e.gateway)
    }

    #[test]
    fn a_switch_waits_until_the_new_gateway_acknowledges_its_entry() {
        let t0 = Instant::now();
        let (mut tables, pending) = switching(t0);
        assert!(pending["w"].is_empty(), "the pod's node is not told yet");
        assert!(pending["g1"].is_empty(), "nor does the old gateway let go");
        assert!(
            pending["g2"].upserts.contains_key(&key(1)),
            "the new one learns it"
        );
        let views = publish_all(&mut tables, pending, t0);
        assert!(
            views["w"].guard.decided_pods.is_empty(),
            "the pod is not decided on its node while held back"
        );
        assert_eq!(steers(&tables, "w"), ip("g1").map(GatewayTarget::Node));
        let carrying = views["g2"].generation;

        let gateway = |acked| move |node: &str| (node == "g2").then_some(GatewayShim { acked, up: true });
        let mut pending = BTreeMap::new();
        tables.release_switches(&mut pending, gateway(carrying - 1), |_| None, ip, t0 + ms(100));
        assert!(pending.is_empty(), "an older generation is not the one");
        tables.release_switches(&mut pending, gateway(carrying), |_| None, ip, t0 + ms(200));
        assert_eq!(pending["w"].upserts[&key(1)], entry(1, "g2"));
        assert!(pending["g1"].removals.contains(&key(1)));
        let views = publish_all(&mut tables, pending, t0 + ms(200));
        assert_eq!(steers(&tables, "w"), ip("g2").map(GatewayTarget::Node));
        assert_eq!(steers(&tables, "g1"), None);
        assert_eq!(views["w"].guard.decided_pods, [key(1).source]);
    }

    #[test]
    fn a_switch_waits_no_longer_than_its_deadline() {
        let t0 = Instant::now();
        let (mut tables, pending) = switching(t0);
        publish_all(&mut tables, pending, t0);
        let silent = |node: &str| (node == "g2").then_some(GatewayShim { acked: 0, up: true });
        for at in (0..1000).step_by(50).map(ms) {
            let mut pending = BTreeMap::new();
            tables.release_switches(&mut pending, silent, |_| None, ip, t0 + at);
            assert!(pending.is_empty(), "released at {at:?}");
        }
        let mut pending = BTreeMap::new();
        tables.release_switches(&mut pending, silent, |_| None, ip, t0 + ms(1000));
        assert_eq!(pending["w"].upserts[&key(1)], entry(1, "g2"));
    }

    #[test]
    fn a_switch_to_a_gateway_that_went_is_released_at_once() {
        let t0 = Instant::now();
        let (mut tables, pending) = switching(t0);
        publish_all(&mut tables, pending, t0);
        let mut pending = BTreeMap::new();
        tables.release_switches(
            &mut pending,
            |_| Some(GatewayShim { acked: 0, up: false }),
            |_| None,
            ip,
            t0,
        );
        assert_eq!(pending["w"].upserts.len(), 1);
    }

    #[test]
    fn a_newer_change_of_an_entry_replaces_the_switch_held_back() {
        let t0 = Instant::now();
        let (mut tables, pending) = switching(t0);
        publish_all(&mut tables, pending, t0);
        // The pod goes before g2 acknowledges: its removal replaces the switch.
        let mut pending: BTreeMap<Arc<str>, NodeDelta> = BTreeMap::new();
        for node in ["w", "g2"] {
            let mut gone = NodeDelta::default();
            gone.removals.insert(key(1));
            pending.insert(node.into(), gone);
        }
        tables.defer_switches(&mut pending, ip, |_| true, t0 + ms(1000));
        publish_all(&mut tables, pending, t0 + ms(10));
        let mut pending = BTreeMap::new();
        tables.release_switches(
            &mut pending,
            |_| {
                Some(GatewayShim {
                    acked: u64::MAX,
                    up: true,
                })
            },
            |_| None,
            ip,
            t0 + ms(2000),
        );
        assert!(
            pending.get("w").is_none_or(|d| d.upserts.is_empty()),
            "the pod is gone: no switch to release"
        );
        assert_eq!(steers(&tables, "w"), None);
    }

    /// [`switching`] published at `t0`, and the switch released at 100 ms (the new gateway has
    /// acknowledged), the previous gateway keeping the pod's entry for `linger`: the tables and
    /// what the release changed.
    fn released(t0: Instant, linger: Duration) -> (Tables, BTreeMap<Arc<str>, NodeDelta>) {
        let (mut tables, pending) = switching(t0);
        let views = publish_all(&mut tables, pending, t0);
        let carrying = views["g2"].generation;
        let up = |node: &str| {
            (node != "w").then_some(GatewayShim {
                acked: carrying,
                up: true,
            })
        };
        let mut pending = BTreeMap::new();
        tables.release_switches(&mut pending, up, |_| Some(linger), ip, t0 + ms(100));
        (tables, pending)
    }

    /// Once the switch is released, the previous gateway (still up) keeps the pod's entry, and
    /// the pod's node may keep the pod's open flows pinned there: until the pinned flow timeout,
    /// or at once when that gateway goes (its flows are lost; they must follow their entry).
    #[test]
    fn the_previous_gateway_keeps_a_moved_pods_entry_for_a_while_unless_it_goes() {
        for goes in [false, true] {
            let t0 = Instant::now();
            let (mut tables, pending) = released(t0, ms(5000));
            assert_eq!(pending["w"].upserts[&key(1)], entry(1, "g2"));
            assert!(
                pending.get("g1").is_none_or(|d| !d.removals.contains(&key(1))),
                "g1 keeps the entry"
            );
            assert_eq!(tables.pinnable("w"), [ip("g1").unwrap()]);
            assert_eq!(tables.next_deadline(), Some(t0 + ms(5100)));
            publish_all(&mut tables, pending, t0 + ms(100));
            assert_eq!(steers(&tables, "g1"), ip("g1").map(GatewayTarget::Node));

            let mut pending = BTreeMap::new();
            assert!(
                tables
                    .linger(&mut pending, |_| true, (|_, _, _, _| false, true), t0 + ms(4000))
                    .is_empty()
            );
            assert!(pending.is_empty());
            let (at, alive): (Instant, fn(&str) -> bool) = if goes {
                (t0 + ms(200), |n| n != "g1")
            } else {
                (t0 + ms(5100), |_| true)
            };
            let changed = tables.linger(&mut pending, alive, (|_, _, _, _| false, true), at);
            assert_eq!(changed, BTreeSet::from(["w".into()]));
            assert!(pending["g1"].removals.contains(&key(1)));
            assert!(tables.pinnable("w").is_empty());
        }
    }

    /// A pod's node counts no open flow of it left on the gateway it moved away from: the
    /// gateway lets go of the pod's entry, but not before [`LINGER_AT_LEAST`] (a count from
    /// before the switch may not know the newest flow yet), which is a deadline to wake at.
    #[test]
    fn a_lingering_entry_ends_when_its_pods_flows_have_ended() {
        let t0 = Instant::now();
        let (mut tables, pending) = released(t0, Duration::from_secs(600));
        publish_all(&mut tables, pending, t0 + ms(100));
        assert_eq!(tables.pinnable("w"), [ip("g1").unwrap()]);
        assert_eq!(tables.next_deadline(), Some(t0 + ms(100) + LINGER_AT_LEAST));
        let pod_ip = key(1).source;
        let ended = |node: &str, pod: IpAddr, policy: &str, gateway: IpAddr| {
            node == "w" && pod == pod_ip && policy == "p" && Some(gateway) == ip("g1")
        };
        let mut pending = BTreeMap::new();
        assert!(
            tables
                .linger(&mut pending, |_| true, (ended, false), t0 + ms(5000))
                .is_empty(),
            "too soon"
        );
        let changed = tables.linger(
            &mut pending,
            |_| true,
            (ended, false),
            t0 + ms(100) + LINGER_AT_LEAST,
        );
        assert_eq!(changed, BTreeSet::from(["w".into()]));
        assert!(pending["g1"].removals.contains(&key(1)));
        assert_eq!(tables.next_deadline(), None);
    }

    #[test]
    fn changes_between_publications_go_out_as_one_generation() {
        let t0 = Instant::now();
        let mut tables = Tables::new(Generations::new(1));
        let node: Arc<str> = "w".into();
        let first = publish(&mut tables, "w", upserts([entry(1, "g1")]), t0).unwrap();
        let (mut a, mut b) = (upserts([entry(2, "g1")]), upserts([entry(3, "g1")]));
        b.removals.insert(key(1));
        let mut dirty = BTreeSet::new();
        tables.fold(&node, &a, &mut dirty);
        tables.fold(&node, &b, &mut dirty);
        assert_eq!(dirty, BTreeSet::from(["p".to_owned()]));
        a.upserts.append(&mut b.upserts);
        a.removals.append(&mut b.removals);
        let view = tables.publish(&node, a, content(vec![]), t0).unwrap();
        assert_eq!(view.base, first.generation);
        assert_eq!(view.generation, first.generation + 1);
        assert_eq!(view.entries.keys().copied().collect::<Vec<_>>(), [key(2), key(3)]);
        assert_eq!(tables.get("w").unwrap().policies[&Arc::from("p")], 2);
    }
}
