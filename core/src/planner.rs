//! The planner: for every selected pod and destination, which gateway node its traffic leaves
//! from and with which egress IP, and therefore which entries each node's datapath must hold.
//!
//! It is incremental: every change (one pod, node, namespace or policy) touches only the
//! (source, destination) keys it can affect and returns the per-node [`PlanDelta`]. A full plan is
//! the same planner fed everything; the property tests check that both agree after any sequence
//! of changes.
//!
//! Decisions, each documented in `docs/architecture.md`:
//! - A node holds the entries of the pods running on it, and the entries it is the gateway for.
//! - Gateway nodes are picked per gateway entry by rendezvous hashing of (policy, entry, node)
//!   over the ready, eligible, matching nodes: deterministic, spread across policies, and
//!   unmoved by nodes that come and go elsewhere. Gateways listed as retained keep serving while
//!   usable.
//! - With several active gateways, each pod goes to the gateway with the highest hash of
//!   (pod UID, gateway): losing a gateway moves only the pods it served.
//! - When two policies claim the same (source, destination), the older policy wins (earlier
//!   `creationTimestamp`, then smaller name); the loser reports the conflict. Within one policy an
//!   excluded CIDR beats an identical destination CIDR.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use crate::plan::GatewayTarget;
use ipnet::IpNet;
use smallvec::SmallVec;
use xxhash_rust::xxh3::Xxh3;

use crate::{
    api::FailurePolicy,
    model::{GatewaySlot, NamespaceInfo, NodeInfo, PodInfo, PolicyInput},
    policy::{self, EgressSource, PolicyConfig, PolicyError},
    selector::{LabelSource, Labels, PodLabels},
};

/// The label Kubernetes puts on every namespace with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The key of a datapath entry: source IP (exact) and destination prefix (longest match).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryKey {
    pub source: IpAddr,
    pub destination: IpNet,
}

/// One entry of one node's datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressEntry {
    pub key: EntryKey,
    pub gateway: GatewayTarget,
    /// Set on the gateway node's own entries, when the address is known.
    pub egress_ip: Option<IpAddr>,
    /// Set on the gateway node's own entries, when the interface is known.
    pub interface: Option<Arc<str>>,
    /// Set on the gateway node's entries for pods of other nodes: the underlay address of the
    /// pod's node, the only outer source the gateway accepts this (source, destination) from.
    pub source_node_ip: Option<IpAddr>,
    /// For entries steering to a gateway: the policy's gateway entry and slot it fills. Both
    /// nodes keep it in their datapath, so that after an operator restart what the datapath
    /// holds tells the new leader who fills which slot.
    pub gateway_slot: Option<(usize, usize)>,
    pub policy: Arc<str>,
}

/// What changed for one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeDelta {
    pub upserts: BTreeMap<EntryKey, EgressEntry>,
    pub removals: BTreeSet<EntryKey>,
}

impl NodeDelta {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }

    fn upsert(&mut self, entry: EgressEntry) {
        self.removals.remove(&entry.key);
        self.upserts.insert(entry.key, entry);
    }

    fn remove(&mut self, key: EntryKey) {
        self.upserts.remove(&key);
        self.removals.insert(key);
    }

    /// Applies this delta to a node's entry table.
    pub fn apply_to(&self, table: &mut BTreeMap<EntryKey, EgressEntry>) {
        for key in &self.removals {
            table.remove(key);
        }
        for (key, entry) in &self.upserts {
            table.insert(*key, entry.clone());
        }
    }
}

/// What one change did to the plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanDelta {
    /// Per node, the entries to write and to delete. Nodes without changes are absent.
    pub nodes: BTreeMap<Arc<str>, NodeDelta>,
    /// Policies whose status may have changed.
    pub policies: BTreeSet<Arc<str>>,
}

impl PlanDelta {
    pub fn is_empty(&self) -> bool {
        self.nodes.values().all(NodeDelta::is_empty) && self.policies.is_empty()
    }

    /// Folds a later delta into this one, so that applying the result equals applying both.
    pub fn merge(&mut self, later: PlanDelta) {
        for (node, delta) in later.nodes {
            let mine = self.nodes.entry(node).or_default();
            for key in delta.removals {
                mine.remove(key);
            }
            for (_, entry) in delta.upserts {
                mine.upsert(entry);
            }
        }
        self.policies.extend(later.policies);
        self.nodes.retain(|_, d| !d.is_empty());
    }

    fn node(&mut self, name: &Arc<str>) -> &mut NodeDelta {
        self.nodes.entry(name.clone()).or_default()
    }
}

/// A gateway node serving a policy now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveGateway {
    /// Index of the gateway entry in the policy that selected this node.
    pub entry: usize,
    /// The slot of the entry this node fills (below the entry's `maxGatewayNodes`).
    pub slot: usize,
    pub node: Arc<str>,
    /// The node's tunnel address.
    pub ip: IpAddr,
    pub egress_v4: Option<IpAddr>,
    pub egress_v6: Option<IpAddr>,
    pub interface: Option<Arc<str>>,
}

impl ActiveGateway {
    fn egress_for(&self, source: IpAddr) -> Option<IpAddr> {
        if source.is_ipv4() {
            self.egress_v4
        } else {
            self.egress_v6
        }
    }
}

/// A change to the planner's inputs.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    UpsertNode(NodeInfo),
    RemoveNode(String),
    UpsertNamespace(NamespaceInfo),
    RemoveNamespace(String),
    UpsertPod(PodInfo),
    /// By UID.
    RemovePod(String),
    UpsertPolicy(PolicyInput),
    RemovePolicy(String),
}

/// One policy's claim on a key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Claim {
    policy: Arc<str>,
    pod: Arc<str>,
    excluded: bool,
}

/// The claims on one key, and how they resolve.
#[derive(Default)]
struct KeyState {
    claims: SmallVec<[Claim; 1]>,
    resolved: Option<Resolved>,
}

/// The winning claim of a key, resolved to where its entries go.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Resolved {
    policy: Arc<str>,
    source_node: Arc<str>,
    /// The source node's tunnel address (what its tunnelled packets carry as outer source).
    source_node_ip: Option<IpAddr>,
    target: Target,
}

/// Where a resolved key's traffic goes; the gateway is shared with the policy's active list.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Gateway(Arc<ActiveGateway>),
    None,
    Fallback,
    Excluded,
}

impl Resolved {
    fn gateway_node(&self) -> Option<&Arc<str>> {
        match &self.target {
            Target::Gateway(g) => Some(&g.node),
            _ => None,
        }
    }

    /// The entries this resolution puts on nodes: one on the source node, and one on the
    /// gateway node when that is another node.
    fn placements(&self, key: EntryKey) -> SmallVec<[(Arc<str>, EgressEntry); 2]> {
        let (gateway, egress_ip, interface, gateway_slot) = match &self.target {
            Target::Gateway(g) => (
                GatewayTarget::Node(g.ip),
                g.egress_for(key.source),
                g.interface.clone(),
                Some((g.entry, g.slot)),
            ),
            Target::None => (GatewayTarget::None, None, None, None),
            Target::Fallback => (GatewayTarget::Fallback, None, None, None),
            Target::Excluded => (GatewayTarget::Excluded, None, None, None),
        };
        let entry = |with_egress: bool, source_node_ip: Option<IpAddr>| EgressEntry {
            key,
            gateway,
            egress_ip: if with_egress { egress_ip } else { None },
            interface: if with_egress { interface.clone() } else { None },
            source_node_ip,
            gateway_slot,
            policy: self.policy.clone(),
        };
        let mut out = SmallVec::new();
        match self.gateway_node() {
            // A local pod never arrives through the tunnel: no outer source is accepted for it.
            Some(gw) if *gw == self.source_node => out.push((gw.clone(), entry(true, None))),
            Some(gw) => {
                out.push((self.source_node.clone(), entry(false, None)));
                out.push((gw.clone(), entry(true, self.source_node_ip)));
            }
            None => out.push((self.source_node.clone(), entry(false, None))),
        }
        out
    }
}

/// A pod as the planner keeps it: only what planning reads, with interned strings, because
/// large clusters have many pods and the planner keeps them all.
struct PodState {
    uid: Arc<str>,
    namespace: Arc<str>,
    /// Sorted by key.
    labels: Box<[(Arc<str>, Arc<str>)]>,
    node: Option<Arc<str>>,
    ips: SmallVec<[IpAddr; 2]>,
    /// [`PodInfo::is_source`].
    source: bool,
    /// Accepted policies that select the pod.
    matched: SmallVec<[Arc<str>; 2]>,
}

impl PodState {
    fn new(uid: Arc<str>, info: &PodInfo, strings: &mut Interner) -> Self {
        PodState {
            uid,
            namespace: strings.get(&info.namespace),
            labels: info
                .labels
                .iter()
                .map(|(k, v)| (strings.get(k), strings.get(v)))
                .collect(),
            node: info.node_name.as_deref().map(|n| strings.get(n)),
            ips: info.ips.iter().copied().collect(),
            source: info.is_source(),
            matched: SmallVec::new(),
        }
    }

    /// Whether `info` plans exactly like this pod.
    fn plans_like(&self, info: &PodInfo) -> bool {
        *self.namespace == *info.namespace
            && self.node.as_deref() == info.node_name.as_deref()
            && self.ips.as_slice() == info.ips.as_slice()
            && self.source == info.is_source()
            && self.labels.len() == info.labels.len()
            && self
                .labels
                .iter()
                .zip(&info.labels)
                .all(|((k, v), (k2, v2))| **k == **k2 && **v == **v2)
    }
}

impl LabelSource for [(Arc<str>, Arc<str>)] {
    fn label(&self, key: &str) -> Option<&str> {
        self.binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self[i].1)
    }
}

/// Shares equal strings (label keys and values, namespaces, node names) between pods.
#[derive(Default)]
struct Interner {
    strings: HashSet<Arc<str>>,
    /// Size after the last sweep: the next sweep waits until the set has doubled.
    swept_at: usize,
}

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return shared.clone();
        }
        if self.strings.len() >= 2 * self.swept_at.max(1024) {
            // Strings only the interner still holds belong to pods that are gone.
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.swept_at = self.strings.len();
        }
        let shared: Arc<str> = s.into();
        self.strings.insert(shared.clone());
        shared
    }
}

struct PolicyState {
    input: PolicyInput,
    /// Conflicts go to the earliest created, then the smallest name.
    rank: (i64, Arc<str>),
    config: Result<PolicyConfig, PolicyError>,
    active: Vec<Arc<ActiveGateway>>,
    matched: HashSet<Arc<str>>,
}

/// Policies indexed by a label their rules require, so a pod is only tested against policies
/// that can select it.
type LabelIndex = HashMap<String, HashMap<String, Vec<Arc<str>>>>;

#[derive(Default)]
struct RuleIndex {
    by_pod_label: LabelIndex,
    by_namespace_label: LabelIndex,
    unanchored: BTreeSet<Arc<str>>,
}

impl RuleIndex {
    fn insert(&mut self, name: &Arc<str>, config: &PolicyConfig) {
        for rule in &config.rules {
            if let Some((k, v)) = rule.pods.as_ref().and_then(|s| s.anchor()) {
                Self::push(&mut self.by_pod_label, k, v, name);
            } else if let Some((k, v)) = rule.namespaces.as_ref().and_then(|s| s.anchor()) {
                Self::push(&mut self.by_namespace_label, k, v, name);
            } else {
                self.unanchored.insert(name.clone());
            }
        }
    }

    fn push(map: &mut LabelIndex, k: &str, v: &str, name: &Arc<str>) {
        let names = map
            .entry(k.to_owned())
            .or_default()
            .entry(v.to_owned())
            .or_default();
        if !names.contains(name) {
            names.push(name.clone());
        }
    }

    fn remove(&mut self, name: &str) {
        for map in [&mut self.by_pod_label, &mut self.by_namespace_label] {
            for values in map.values_mut() {
                for names in values.values_mut() {
                    names.retain(|n| &**n != name);
                }
                values.retain(|_, names| !names.is_empty());
            }
            map.retain(|_, values| !values.is_empty());
        }
        self.unanchored.remove(name);
    }

    fn candidates(&self, pod: &PodState, namespace: &NamespaceLabels<'_>) -> SmallVec<[Arc<str>; 4]> {
        let mut out: SmallVec<[Arc<str>; 4]> = self.unanchored.iter().cloned().collect();
        fn lookup<'m>(map: &'m LabelIndex, k: &str, v: &str) -> impl Iterator<Item = Arc<str>> + 'm {
            map.get(k)
                .and_then(|values| values.get(v))
                .into_iter()
                .flatten()
                .cloned()
        }
        for (k, v) in &pod.labels {
            out.extend(lookup(&self.by_pod_label, k, v));
        }
        out.extend(lookup(
            &self.by_pod_label,
            crate::selector::POD_NAMESPACE_LABEL,
            &pod.namespace,
        ));
        if let Some(labels) = namespace.labels {
            for (k, v) in labels {
                out.extend(lookup(&self.by_namespace_label, k, v));
            }
        }
        out.extend(lookup(
            &self.by_namespace_label,
            NAMESPACE_NAME_LABEL,
            namespace.name,
        ));
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// A namespace's labels, which always include its name label (as the API server adds it).
struct NamespaceLabels<'a> {
    name: &'a str,
    labels: Option<&'a Labels>,
}

impl LabelSource for NamespaceLabels<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        if key == NAMESPACE_NAME_LABEL {
            return Some(self.name);
        }
        self.labels.and_then(|l| l.label(key))
    }
}

/// The incremental planner. See the module documentation.
#[derive(Default)]
pub struct Planner {
    nodes: BTreeMap<Arc<str>, NodeInfo>,
    namespaces: HashMap<String, Labels>,
    pods: HashMap<Arc<str>, Box<PodState>>,
    pods_by_node: HashMap<Arc<str>, HashSet<Arc<str>>>,
    pods_by_namespace: HashMap<Arc<str>, HashSet<Arc<str>>>,
    strings: Interner,
    policies: BTreeMap<Arc<str>, PolicyState>,
    index: RuleIndex,
    /// Every (source, destination) some policy claims: the claims and how they resolve.
    // NB: boxed values keep the tables' empty buckets small (a table is up to half empty).
    keys: HashMap<EntryKey, Box<KeyState>>,
    /// (loser, winner) -> number of keys the loser claims and the winner holds.
    conflicts: HashMap<(Arc<str>, Arc<str>), u64>,
    /// The (loser, winner) pairs of every contested key, as last resolved.
    key_losses: HashMap<EntryKey, Losses>,
}

type Losses = SmallVec<[(Arc<str>, Arc<str>); 1]>;

type DirtyKeys = HashSet<EntryKey>;

impl Planner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a planner from a whole snapshot of the inputs, in the order that is cheapest.
    pub fn from_snapshot(
        namespaces: impl IntoIterator<Item = NamespaceInfo>,
        nodes: impl IntoIterator<Item = NodeInfo>,
        policies: impl IntoIterator<Item = PolicyInput>,
        pods: impl IntoIterator<Item = PodInfo>,
    ) -> Self {
        let mut planner = Planner::new();
        for ns in namespaces {
            planner.upsert_namespace(ns);
        }
        for node in nodes {
            planner.upsert_node(node);
        }
        // Policies before pods: each pod then finds its policies through the rule index.
        for policy in policies {
            planner.upsert_policy(policy);
        }
        for pod in pods {
            planner.upsert_pod(pod);
        }
        planner
    }

    pub fn apply(&mut self, change: Change) -> PlanDelta {
        match change {
            Change::UpsertNode(n) => self.upsert_node(n),
            Change::RemoveNode(n) => self.remove_node(&n),
            Change::UpsertNamespace(ns) => self.upsert_namespace(ns),
            Change::RemoveNamespace(ns) => self.remove_namespace(&ns),
            Change::UpsertPod(p) => self.upsert_pod(p),
            Change::RemovePod(uid) => self.remove_pod(&uid),
            Change::UpsertPolicy(p) => self.upsert_policy(p),
            Change::RemovePolicy(p) => self.remove_policy(&p),
        }
    }

    // === Inputs ===

    pub fn upsert_node(&mut self, node: NodeInfo) -> PlanDelta {
        let old = self.nodes.get(node.name.as_str()).cloned();
        if old.as_ref() == Some(&node) {
            return PlanDelta::default();
        }
        let name: Arc<str> = node.name.as_str().into();
        let labels_changed = old.as_ref().is_none_or(|o| o.labels != node.labels);
        self.nodes.insert(name, node.clone());
        self.node_changed(&node.name, old.as_ref(), Some(&node), labels_changed)
    }

    pub fn remove_node(&mut self, name: &str) -> PlanDelta {
        let Some(old) = self.nodes.remove(name) else {
            return PlanDelta::default();
        };
        self.node_changed(name, Some(&old), None, true)
    }

    fn node_changed(
        &mut self,
        name: &str,
        old: Option<&NodeInfo>,
        new: Option<&NodeInfo>,
        labels_changed: bool,
    ) -> PlanDelta {
        let mut delta = PlanDelta::default();
        let mut dirty = DirtyKeys::new();
        // Gateways first, so that pods re-evaluated below resolve against the new selection.
        let affected: Vec<Arc<str>> = self
            .policies
            .iter()
            .filter(|(_, p)| {
                p.config.as_ref().is_ok_and(|c| {
                    c.gateways.iter().any(|g| {
                        old.is_some_and(|n| g.nodes.matches(&n.labels))
                            || new.is_some_and(|n| g.nodes.matches(&n.labels))
                    })
                })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for policy in affected {
            self.reselect_gateways(&policy, &mut dirty, &mut delta);
        }
        // The pods' entries on their gateways name this node's tunnel address.
        let address_changed = old.map(NodeInfo::tunnel_ip) != new.map(NodeInfo::tunnel_ip);
        if labels_changed || address_changed || old.is_none() || new.is_none() {
            let pods: Vec<Arc<str>> = self
                .pods_by_node
                .get(name)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            for uid in pods {
                self.rematch_pod(&uid, &mut dirty, &mut delta);
            }
        }
        self.resolve(dirty, &mut delta);
        delta
    }

    pub fn upsert_namespace(&mut self, ns: NamespaceInfo) -> PlanDelta {
        if self.namespaces.get(&ns.name) == Some(&ns.labels) {
            return PlanDelta::default();
        }
        let name = ns.name.clone();
        self.namespaces.insert(ns.name, ns.labels);
        self.namespace_changed(&name)
    }

    pub fn remove_namespace(&mut self, name: &str) -> PlanDelta {
        if self.namespaces.remove(name).is_none() {
            return PlanDelta::default();
        }
        self.namespace_changed(name)
    }

    fn namespace_changed(&mut self, name: &str) -> PlanDelta {
        let mut delta = PlanDelta::default();
        let mut dirty = DirtyKeys::new();
        let pods: Vec<Arc<str>> = self
            .pods_by_namespace
            .get(name)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for uid in pods {
            self.rematch_pod(&uid, &mut dirty, &mut delta);
        }
        self.resolve(dirty, &mut delta);
        delta
    }

    pub fn upsert_pod(&mut self, pod: PodInfo) -> PlanDelta {
        let mut delta = PlanDelta::default();
        let mut dirty = DirtyKeys::new();
        if self
            .pods
            .get(pod.uid.as_str())
            .is_some_and(|old| old.plans_like(&pod))
        {
            return delta;
        }
        let uid = self
            .take_pod(&pod.uid, &mut dirty, &mut delta)
            .unwrap_or_else(|| pod.uid.as_str().into());
        self.insert_pod(uid, pod, &mut dirty, &mut delta);
        self.resolve(dirty, &mut delta);
        delta
    }

    pub fn remove_pod(&mut self, uid: &str) -> PlanDelta {
        let mut delta = PlanDelta::default();
        let mut dirty = DirtyKeys::new();
        self.take_pod(uid, &mut dirty, &mut delta);
        self.resolve(dirty, &mut delta);
        delta
    }

    pub fn upsert_policy(&mut self, input: PolicyInput) -> PlanDelta {
        let mut delta = PlanDelta::default();
        let mut dirty = DirtyKeys::new();
        if let Some(old) = self.policies.get_mut(input.name.as_str()) {
            if old.input == input {
                return delta;
            }
            if old.input.retained_gateways != input.retained_gateways
                && (PolicyInput {
                    retained_gateways: input.retained_gateways.clone(),
                    ..old.input.clone()
                }) == input
            {
                // Feedback of the current gateways: re-select, nothing else changed.
                old.input.retained_gateways = input.retained_gateways;
                let name = self
                    .policies
                    .get_key_value(input.name.as_str())
                    .expect("looked up above")
                    .0
                    .clone();
                self.reselect_gateways(&name, &mut dirty, &mut delta);
                self.resolve(dirty, &mut delta);
                return delta;
            }
        }
        let name: Arc<str> = input.name.as_str().into();
        self.take_policy(&name, &mut dirty, &mut delta);

        let config = policy::parse(&input.spec);
        let rank = (input.created.unwrap_or(i64::MAX), name.clone());
        let active = match &config {
            Ok(c) => self.select_gateways(&name, c, &input.retained_gateways),
            Err(_) => Vec::new(),
        };
        let mut matched = HashSet::new();
        if let Ok(c) = &config {
            self.index.insert(&name, c);
            for (uid, pod) in &mut self.pods {
                if Self::pod_matches(&self.nodes, &self.namespaces, c, pod) {
                    matched.insert(uid.clone());
                    pod.matched.push(name.clone());
                    for (key, excluded) in keys_of(c, &pod.ips) {
                        self.keys.entry(key).or_default().claims.push(Claim {
                            policy: name.clone(),
                            pod: uid.clone(),
                            excluded,
                        });
                        dirty.insert(key);
                    }
                }
            }
        }
        self.policies.insert(
            name.clone(),
            PolicyState {
                input,
                rank,
                config,
                active,
                matched,
            },
        );
        delta.policies.insert(name);
        self.resolve(dirty, &mut delta);
        delta
    }

    pub fn remove_policy(&mut self, name: &str) -> PlanDelta {
        let mut delta = PlanDelta::default();
        let mut dirty = DirtyKeys::new();
        if self.take_policy(name, &mut dirty, &mut delta) {
            delta.policies.insert(name.into());
        }
        self.resolve(dirty, &mut delta);
        delta
    }

    // === Bookkeeping ===

    /// Removes a pod and its claims; returns its interned UID for reuse.
    fn take_pod(&mut self, uid: &str, dirty: &mut DirtyKeys, delta: &mut PlanDelta) -> Option<Arc<str>> {
        let state = self.pods.remove(uid)?;
        self.unclaim_pod(&state, dirty, delta);
        if let Some(node) = &state.node {
            remove_from_index(&mut self.pods_by_node, node, uid);
        }
        remove_from_index(&mut self.pods_by_namespace, &state.namespace, uid);
        Some(state.uid)
    }

    fn insert_pod(&mut self, uid: Arc<str>, info: PodInfo, dirty: &mut DirtyKeys, delta: &mut PlanDelta) {
        let mut state = Box::new(PodState::new(uid.clone(), &info, &mut self.strings));
        if let Some(node) = &state.node {
            self.pods_by_node
                .entry(node.clone())
                .or_default()
                .insert(uid.clone());
        }
        self.pods_by_namespace
            .entry(state.namespace.clone())
            .or_default()
            .insert(uid.clone());
        self.claim_pod(&mut state, dirty, delta);
        self.pods.insert(uid, state);
    }

    /// Re-evaluates which policies select a pod after its node or namespace changed.
    fn rematch_pod(&mut self, uid: &str, dirty: &mut DirtyKeys, delta: &mut PlanDelta) {
        let Some(mut state) = self.pods.remove(uid) else {
            return;
        };
        self.unclaim_pod(&state, dirty, delta);
        state.matched.clear();
        self.claim_pod(&mut state, dirty, delta);
        self.pods.insert(state.uid.clone(), state);
    }

    fn unclaim_pod(&mut self, state: &PodState, dirty: &mut DirtyKeys, delta: &mut PlanDelta) {
        for policy in &state.matched {
            let Some(p) = self.policies.get_mut(policy) else {
                continue;
            };
            p.matched.remove(&state.uid);
            delta.policies.insert(policy.clone());
            let Ok(config) = &p.config else { continue };
            for (key, excluded) in keys_of(config, &state.ips) {
                unclaim(&mut self.keys, key, policy, &state.uid, excluded);
                dirty.insert(key);
            }
        }
    }

    fn claim_pod(&mut self, state: &mut PodState, dirty: &mut DirtyKeys, delta: &mut PlanDelta) {
        if !state.source {
            return;
        }
        let namespace = NamespaceLabels {
            name: &state.namespace,
            labels: self.namespaces.get(&*state.namespace),
        };
        for name in self.index.candidates(state, &namespace) {
            let Some(p) = self.policies.get_mut(&name) else {
                continue;
            };
            let Ok(config) = &p.config else { continue };
            if !Self::pod_matches(&self.nodes, &self.namespaces, config, state) {
                continue;
            }
            p.matched.insert(state.uid.clone());
            delta.policies.insert(name.clone());
            for (key, excluded) in keys_of(config, &state.ips) {
                self.keys.entry(key).or_default().claims.push(Claim {
                    policy: name.clone(),
                    pod: state.uid.clone(),
                    excluded,
                });
                dirty.insert(key);
            }
            state.matched.push(name);
        }
    }

    /// Removes a policy and its claims. Returns whether it existed.
    fn take_policy(&mut self, name: &str, dirty: &mut DirtyKeys, delta: &mut PlanDelta) -> bool {
        let Some(old) = self.policies.remove(name) else {
            return false;
        };
        self.index.remove(name);
        let Ok(config) = &old.config else { return true };
        for uid in &old.matched {
            let Some(pod) = self.pods.get_mut(uid) else {
                continue;
            };
            pod.matched.retain(|p| &**p != name);
            for (key, excluded) in keys_of(config, &pod.ips) {
                unclaim(&mut self.keys, key, name, uid, excluded);
                dirty.insert(key);
            }
        }
        // Policies that lost keys to this one no longer do.
        delta.policies.extend(
            self.conflicts
                .keys()
                .filter(|(_, w)| &**w == name)
                .map(|(l, _)| l.clone()),
        );
        true
    }

    fn pod_matches(
        nodes: &BTreeMap<Arc<str>, NodeInfo>,
        namespaces: &HashMap<String, Labels>,
        config: &PolicyConfig,
        pod: &PodState,
    ) -> bool {
        if !pod.source {
            return false;
        }
        let Some(node) = pod.node.as_deref().and_then(|n| nodes.get(n)) else {
            return false;
        };
        let pod_labels = PodLabels {
            labels: &*pod.labels,
            namespace: &pod.namespace,
        };
        let ns_labels = NamespaceLabels {
            name: &pod.namespace,
            labels: namespaces.get(&*pod.namespace),
        };
        config.rules.iter().any(|rule| {
            rule.pods.as_ref().is_none_or(|s| s.matches(&pod_labels))
                && rule.namespaces.as_ref().is_none_or(|s| s.matches(&ns_labels))
                && rule.nodes.as_ref().is_none_or(|s| s.matches(&node.labels))
        })
    }

    // === Gateways ===

    fn reselect_gateways(&mut self, name: &Arc<str>, dirty: &mut DirtyKeys, delta: &mut PlanDelta) {
        let Some(p) = self.policies.get(name) else { return };
        let Ok(config) = &p.config else { return };
        let active = self.select_gateways(name, config, &p.input.retained_gateways);
        if active == p.active {
            return;
        }
        let p = self.policies.get_mut(name).expect("looked up above");
        p.active = active;
        delta.policies.insert(name.clone());
        let Ok(config) = &p.config else { return };
        for uid in &p.matched {
            if let Some(pod) = self.pods.get(uid) {
                dirty.extend(keys_of(config, &pod.ips).map(|(k, _)| k));
            }
        }
    }

    /// Picks the active gateways of every gateway entry. Each entry has `maxGatewayNodes` slots;
    /// pods hash to slots, not to nodes, so a node that replaces another in its slot takes over
    /// exactly the pods the other served. Retained gateways keep their slot while usable; other
    /// slots are filled, in slot order, by the usable node with the highest hash of
    /// (policy, entry, slot, node).
    fn select_gateways(
        &self,
        policy: &str,
        config: &PolicyConfig,
        retained: &[GatewaySlot],
    ) -> Vec<Arc<ActiveGateway>> {
        let mut active = Vec::new();
        for (i, gateway) in config.gateways.iter().enumerate() {
            let mut candidates: Vec<ActiveGateway> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.ready && n.eligible && gateway.nodes.matches(&n.labels))
                .filter_map(|(name, n)| {
                    let ip = n.tunnel_ip()?;
                    let (egress_v4, egress_v6, interface) = resolve_egress(n, &gateway.egress)?;
                    Some(ActiveGateway {
                        entry: i,
                        slot: 0,
                        node: name.clone(),
                        ip,
                        egress_v4,
                        egress_v6,
                        interface,
                    })
                })
                .collect();
            let slots = gateway.max_nodes as usize;
            let mut filled: Vec<Option<ActiveGateway>> = vec![None; slots];
            for r in retained.iter().filter(|r| r.entry == i && r.slot < slots) {
                if filled[r.slot].is_some() {
                    continue;
                }
                if let Some(pos) = candidates.iter().position(|c| *c.node == *r.node) {
                    filled[r.slot] = Some(candidates.swap_remove(pos));
                }
            }
            for (slot, place) in filled.iter_mut().enumerate() {
                if place.is_some() {
                    continue;
                }
                let best = candidates
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, c)| {
                        let score = rendezvous(&[
                            policy.as_bytes(),
                            &i.to_le_bytes(),
                            &slot.to_le_bytes(),
                            c.node.as_bytes(),
                        ]);
                        (score, std::cmp::Reverse(c.node.clone()))
                    })
                    .map(|(pos, _)| pos);
                if let Some(pos) = best {
                    *place = Some(candidates.swap_remove(pos));
                }
            }
            active.extend(
                filled
                    .into_iter()
                    .enumerate()
                    .filter_map(|(slot, g)| g.map(|g| Arc::new(ActiveGateway { slot, ..g }))),
            );
        }
        active
    }

    // === Resolution ===

    fn resolve(&mut self, dirty: DirtyKeys, delta: &mut PlanDelta) {
        for key in dirty {
            self.resolve_key(key, delta);
        }
        delta.nodes.retain(|_, d| !d.is_empty());
    }

    fn resolve_key(&mut self, key: EntryKey, delta: &mut PlanDelta) {
        let state = self.keys.get(&key);
        let claims = state.map(|s| &s.claims);
        let winner = claims.and_then(|claims| {
            claims.iter().min_by(|a, b| {
                let rank = |c: &Claim| self.policies.get(&c.policy).map(|p| &p.rank);
                rank(a)
                    .cmp(&rank(b))
                    .then(b.excluded.cmp(&a.excluded))
                    .then_with(|| a.pod.cmp(&b.pod))
            })
        });
        let new = winner.and_then(|w| self.resolve_claim(w));
        let new_losses: Losses = match (claims, winner) {
            (Some(claims), Some(w)) => {
                let mut l: Losses = claims
                    .iter()
                    .filter(|c| c.policy != w.policy)
                    .map(|c| (c.policy.clone(), w.policy.clone()))
                    .collect();
                l.sort_unstable();
                l.dedup();
                l
            }
            _ => Losses::new(),
        };
        let old = state.and_then(|s| s.resolved.as_ref());
        if old != new.as_ref() {
            let before = old.map(|r| r.placements(key)).unwrap_or_default();
            let after = new.as_ref().map(|r| r.placements(key)).unwrap_or_default();
            for (node, entry) in &before {
                if !after.iter().any(|(n, _)| n == node) {
                    delta.node(node).remove(entry.key);
                }
            }
            for (node, entry) in after {
                if !before.iter().any(|(n, e)| *n == node && *e == entry) {
                    delta.node(&node).upsert(entry);
                }
            }
        }
        self.update_conflicts(key, new_losses, delta);
        match (new, self.keys.get_mut(&key)) {
            (None, Some(state)) if state.claims.is_empty() => {
                self.keys.remove(&key);
            }
            (new, Some(state)) => state.resolved = new,
            (new, None) => debug_assert!(new.is_none(), "a resolution without claims"),
        }
    }

    fn update_conflicts(&mut self, key: EntryKey, new: Losses, delta: &mut PlanDelta) {
        let old = self.key_losses.remove(&key).unwrap_or_default();
        if old == new {
            if !new.is_empty() {
                self.key_losses.insert(key, new);
            }
            return;
        }
        for pair in &old {
            if let Some(n) = self.conflicts.get_mut(pair) {
                *n -= 1;
                if *n == 0 {
                    self.conflicts.remove(pair);
                }
            }
            delta.policies.insert(pair.0.clone());
        }
        for pair in &new {
            *self.conflicts.entry(pair.clone()).or_default() += 1;
            delta.policies.insert(pair.0.clone());
        }
        if !new.is_empty() {
            self.key_losses.insert(key, new);
        }
    }

    fn resolve_claim(&self, claim: &Claim) -> Option<Resolved> {
        let pod = self.pods.get(&claim.pod)?;
        let (source_node, node) = self.nodes.get_key_value(pod.node.as_deref()?)?;
        let (source_node, source_node_ip) = (source_node.clone(), node.tunnel_ip());
        let target = if claim.excluded {
            Target::Excluded
        } else {
            let policy = self.policies.get(&claim.policy)?;
            match assign(&policy.active, &claim.pod) {
                Some(g) => Target::Gateway(g.clone()),
                None => match policy.config.as_ref().ok()?.failure {
                    FailurePolicy::Drop => Target::None,
                    FailurePolicy::Fallback => Target::Fallback,
                },
            }
        };
        Some(Resolved {
            policy: claim.policy.clone(),
            source_node,
            source_node_ip,
            target,
        })
    }
}

fn remove_from_index(index: &mut HashMap<Arc<str>, HashSet<Arc<str>>>, key: &str, uid: &str) {
    if let Some(set) = index.get_mut(key) {
        set.remove(uid);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

fn unclaim(
    keys: &mut HashMap<EntryKey, Box<KeyState>>,
    key: EntryKey,
    policy: &str,
    pod: &str,
    excluded: bool,
) {
    if let Some(state) = keys.get_mut(&key) {
        let claims = &mut state.claims;
        if let Some(i) = claims
            .iter()
            .position(|c| &*c.policy == policy && &*c.pod == pod && c.excluded == excluded)
        {
            claims.swap_remove(i);
        }
    }
}

/// The (source, destination) keys a policy produces for a pod, with whether each is excluded.
fn keys_of<'a>(config: &'a PolicyConfig, ips: &'a [IpAddr]) -> impl Iterator<Item = (EntryKey, bool)> + 'a {
    ips.iter().flat_map(move |&source| {
        let same_family = move |net: &&IpNet| net.addr().is_ipv4() == source.is_ipv4();
        let dst = config.destinations.iter().filter(same_family).map(move |&d| {
            (
                EntryKey {
                    source,
                    destination: d,
                },
                false,
            )
        });
        let exc = config.excluded.iter().filter(same_family).map(move |&d| {
            (
                EntryKey {
                    source,
                    destination: d,
                },
                true,
            )
        });
        dst.chain(exc)
    })
}

/// A stable 64-bit hash of the parts (stable across releases and architectures: it picks
/// gateways, and a different pick after an upgrade would move traffic).
fn rendezvous(parts: &[&[u8]]) -> u64 {
    let mut h = Xxh3::new();
    for part in parts {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.digest()
}

/// The gateway a pod's traffic leaves by: the occupied (entry, slot) with the highest hash of
/// (pod, entry, slot). An emptied slot moves only its own pods; a node that fills a slot takes
/// exactly that slot's pods.
fn assign<'a>(active: &'a [Arc<ActiveGateway>], pod_uid: &str) -> Option<&'a Arc<ActiveGateway>> {
    active.iter().max_by_key(|g| {
        let score = rendezvous(&[pod_uid.as_bytes(), &g.entry.to_le_bytes(), &g.slot.to_le_bytes()]);
        (score, std::cmp::Reverse((g.entry, g.slot)))
    })
}

/// IPv4 egress address, IPv6 egress address, interface.
type Egress = (Option<IpAddr>, Option<IpAddr>, Option<Arc<str>>);

/// The egress addresses and interface a node offers for a gateway entry, or `None` when the node
/// is known not to have what the entry names.
fn resolve_egress(node: &NodeInfo, source: &EgressSource) -> Option<Egress> {
    let first = |addrs: &[IpAddr], v4: bool| addrs.iter().copied().find(|a| a.is_ipv4() == v4);
    let Some(interfaces) = &node.interfaces else {
        return Some(match source {
            EgressSource::Interface(name) => (None, None, Some(name.as_str().into())),
            EgressSource::Ip(ip) if ip.is_ipv4() => (Some(*ip), None, None),
            EgressSource::Ip(ip) => (None, Some(*ip), None),
            EgressSource::DefaultRoute => (None, None, None),
        });
    };
    let iface = match source {
        EgressSource::Interface(name) => interfaces.iter().find(|i| &i.name == name)?,
        EgressSource::Ip(ip) => interfaces.iter().find(|i| i.addresses.contains(ip))?,
        EgressSource::DefaultRoute => interfaces.iter().find(|i| i.default_route)?,
    };
    let (mut v4, mut v6) = (first(&iface.addresses, true), first(&iface.addresses, false));
    if let EgressSource::Ip(ip) = source {
        if ip.is_ipv4() {
            v4 = Some(*ip)
        } else {
            v6 = Some(*ip)
        }
    }
    if v4.is_none() && v6.is_none() {
        return None;
    }
    Some((v4, v6, Some(iface.name.as_str().into())))
}

/// How one policy fared, in the planner's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyOutcome {
    pub name: String,
    pub generation: Option<i64>,
    /// `Err` when the policy is not accepted.
    pub accepted: Result<(), PolicyError>,
    pub gateways: Vec<ActiveGateway>,
    pub matched_endpoints: usize,
    /// (winning policy, keys lost to it), by policy name.
    pub conflicts: Vec<(String, u64)>,
    /// Why the candidate nodes of each gateway entry are not usable (meaningful when there are
    /// no gateways).
    pub gateway_diagnosis: String,
}

impl PolicyOutcome {
    /// The reason and message of whatever keeps the policy from working, if anything does.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        match &self.accepted {
            Err(e) => Some((e.reason, e.message.clone())),
            Ok(()) if self.gateways.is_empty() => Some((
                "NoGatewayAvailable",
                format!("no usable gateway node: {}", self.gateway_diagnosis),
            )),
            Ok(()) => None,
        }
    }
}

/// One policy a node is an active gateway for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayDuty {
    pub policy: Arc<str>,
    pub egress_ips: Vec<IpAddr>,
    pub interface: Option<Arc<str>>,
}

impl Planner {
    fn resolved(&self) -> impl Iterator<Item = (&EntryKey, &Resolved)> {
        self.keys
            .iter()
            .filter_map(|(k, s)| Some((k, s.resolved.as_ref()?)))
    }

    /// Known node names, in order.
    pub fn node_names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.nodes.keys()
    }

    /// A policy's active gateways as slots, to feed back as `retained_gateways` so that they
    /// keep serving while usable.
    pub fn gateway_slots(&self, policy: &str) -> Vec<GatewaySlot> {
        self.policies
            .get(policy)
            .map(|p| {
                p.active
                    .iter()
                    .map(|g| GatewaySlot {
                        entry: g.entry,
                        slot: g.slot,
                        node: g.node.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Policy names, in order.
    pub fn policy_names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.policies.keys()
    }

    /// Every known node's entries (nodes with none included).
    pub fn node_plans(&self) -> BTreeMap<Arc<str>, BTreeMap<EntryKey, EgressEntry>> {
        let mut plans: BTreeMap<Arc<str>, BTreeMap<EntryKey, EgressEntry>> =
            self.nodes.keys().map(|n| (n.clone(), BTreeMap::new())).collect();
        for (key, resolved) in self.resolved() {
            for (node, entry) in resolved.placements(*key) {
                plans.entry(node).or_default().insert(*key, entry);
            }
        }
        plans
    }

    /// One node's entries.
    pub fn node_plan(&self, node: &str) -> BTreeMap<EntryKey, EgressEntry> {
        self.resolved()
            .flat_map(|(key, r)| r.placements(*key))
            .filter(|(n, _)| &**n == node)
            .map(|(_, e)| (e.key, e))
            .collect()
    }

    /// The policies a node serves as a gateway.
    /// The destination CIDRs of the accepted `failurePolicy: Drop` policies, sorted: what the
    /// no-leak guard keeps pods the plan has not decided on away from.
    pub fn guarded_destinations(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self
            .policies
            .values()
            .filter_map(|p| p.config.as_ref().ok())
            .filter(|c| c.failure == FailurePolicy::Drop)
            .flat_map(|c| c.destinations.iter().copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The IPs of the pods on `node` the plan has decided on (selected or not), sorted.
    pub fn decided_pod_ips(&self, node: &str) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .pods_by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|uid| self.pods.get(uid))
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The node of pod `uid`, if the planner has it on one.
    pub fn pod_node(&self, uid: &str) -> Option<Arc<str>> {
        self.pods.get(uid)?.node.clone()
    }

    pub fn gateway_duties(&self, node: &str) -> Vec<GatewayDuty> {
        let mut duties = Vec::new();
        for (name, p) in &self.policies {
            for g in p.active.iter().filter(|g| &*g.node == node) {
                duties.push(GatewayDuty {
                    policy: name.clone(),
                    egress_ips: g.egress_v4.into_iter().chain(g.egress_v6).collect(),
                    interface: g.interface.clone(),
                });
            }
        }
        duties
    }

    /// How many entries all nodes hold together.
    pub fn entry_count(&self) -> usize {
        self.resolved()
            .map(|(_, r)| {
                if r.gateway_node().is_some_and(|g| *g != r.source_node) {
                    2
                } else {
                    1
                }
            })
            .sum()
    }

    pub fn policy_outcome(&self, name: &str) -> Option<PolicyOutcome> {
        let p = self.policies.get(name)?;
        let mut conflicts: Vec<(String, u64)> = self
            .conflicts
            .iter()
            .filter(|((loser, _), _)| &**loser == name)
            .map(|((_, winner), n)| (winner.to_string(), *n))
            .collect();
        conflicts.sort();
        Some(PolicyOutcome {
            name: name.to_owned(),
            generation: p.input.generation,
            accepted: p.config.as_ref().map(|_| ()).map_err(Clone::clone),
            gateways: p.active.iter().map(|g| (**g).clone()).collect(),
            matched_endpoints: p.matched.len(),
            conflicts,
            gateway_diagnosis: match (&p.config, p.active.is_empty()) {
                (Ok(config), true) => self.diagnose_gateways(config),
                _ => String::new(),
            },
        })
    }

    /// Says, per gateway entry, how many nodes match its selector and why they cannot serve.
    fn diagnose_gateways(&self, config: &PolicyConfig) -> String {
        let parts: Vec<String> = config
            .gateways
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let matching: Vec<&NodeInfo> = self
                    .nodes
                    .values()
                    .filter(|n| g.nodes.matches(&n.labels))
                    .collect();
                let not_ready = matching.iter().filter(|n| !n.ready).count();
                let ineligible = matching.iter().filter(|n| n.ready && !n.eligible).count();
                let no_ip = matching
                    .iter()
                    .filter(|n| n.ready && n.eligible && n.tunnel_ip().is_none())
                    .count();
                let lacking = matching
                    .iter()
                    .filter(|n| n.ready && n.eligible && n.tunnel_ip().is_some())
                    .filter(|n| resolve_egress(n, &g.egress).is_none())
                    .count();
                let what = match &g.egress {
                    EgressSource::Interface(name) => format!("interface {name:?}"),
                    EgressSource::Ip(ip) => format!("egress IP {ip}"),
                    EgressSource::DefaultRoute => "a default route".to_owned(),
                };
                let mut why = vec![format!(
                    "{} node(s) match the nodeSelector of gateway {i}",
                    matching.len()
                )];
                for (n, text) in [
                    (not_ready, "not Ready".to_owned()),
                    (ineligible, "without a healthy shim".to_owned()),
                    (no_ip, "without an InternalIP".to_owned()),
                    (lacking, format!("without {what}")),
                ] {
                    if n > 0 {
                        why.push(format!("{n} {text}"));
                    }
                }
                why.join(", ")
            })
            .collect();
        parts.join("; ")
    }
}
