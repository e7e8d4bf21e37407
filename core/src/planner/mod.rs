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
//! - Each gateway entry has `maxGatewayNodes` slots. A slot is filled by rendezvous hashing of
//!   (policy, entry, slot, node) over the ready, eligible, matching nodes: deterministic, spread
//!   across policies, and unmoved by nodes that come and go elsewhere. Gateways listed as
//!   retained keep their slot while usable. Draining nodes are candidates only when an entry
//!   has no other: a drain moves slots away, never leaves an entry without a gateway.
//! - A new pod goes to the occupied (entry, slot) with the highest hash of (pod UID, entry,
//!   slot). From then on it stays with that node while the node serves the policy (in any entry
//!   or slot): gateways that recover or are added, a `maxGatewayNodes` increase or reordered
//!   entries move no pod of a working gateway. A pod whose node stops serving follows its slot
//!   to the node that takes it over (so a node that takes over a slot takes exactly that slot's
//!   pods), else is placed as a new pod. The assignments are state, not inputs: a new planner
//!   takes them from the datapaths ([`Planner::adopt_assignments`]).
//! - When two policies claim the same (source, destination), the older policy wins (earlier
//!   `creationTimestamp`, then smaller name); the loser reports the conflict. Within one policy an
//!   excluded CIDR beats an identical destination CIDR.
//! - When two policies name the same managed address (`egressIPs`), the older policy holds it;
//!   the other's slot for it stays empty (its pods go to its other slots, or by its
//!   `failurePolicy`) until the older policy lets the address go, and it reports the conflict.
//!
//! Parts: `delta`, what a change does to each node's entries; `index`, the pods (with interned
//! strings), the rule index and which keys each pod claims; `gateways`, gateway selection and
//! pod assignment; `resolve`, from a key's claims to the entries on nodes, and conflicts;
//! `outcome`, how each policy fared, as data that [`crate::report`] renders.

mod delta;
mod gateways;
mod index;
mod outcome;
mod resolve;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;

pub use crate::plan::GatewayDuty;

pub use self::{
    delta::{EgressEntry, EntryKey, NodeDelta, PlanDelta},
    gateways::{ActiveGateway, Sticky},
    index::NAMESPACE_NAME_LABEL,
    outcome::{GatewayDiagnosis, PolicyOutcome},
};
use self::{
    index::{Interner, PodState, RuleIndex},
    resolve::{Claim, KeyState, Losses, Resolved, keys_of, unclaim},
};
use crate::{
    api::FailurePolicy,
    model::{GatewaySlot, NamespaceInfo, NodeInfo, PodInfo, PolicyInput},
    policy::{self, PolicyConfig, PolicyError},
    selector::Labels,
};

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
    /// Per managed address, the accepted policies that name it, by rank: the first holds it.
    managed_claims: HashMap<IpAddr, Vec<(i64, Arc<str>)>>,
    /// Policy edits that changed only destinations, taken the short way
    /// ([`Planner::destination_edits`]).
    destination_edits: u64,
}

struct PolicyState {
    input: PolicyInput,
    /// Conflicts go to the earliest created, then the smallest name.
    rank: (i64, Arc<str>),
    config: Result<PolicyConfig, PolicyError>,
    active: Vec<Arc<ActiveGateway>>,
    matched: HashSet<Arc<str>>,
    /// The gateway each matched pod was last assigned (by UID): it stays there while usable.
    sticky: HashMap<Arc<str>, Sticky>,
}

/// The keys a change may have re-resolved.
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
            for uid in members(&self.pods_by_node, name) {
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
        for uid in members(&self.pods_by_namespace, name) {
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
        let before = self.matched_by(&pod.uid);
        let uid = self
            .take_pod(&pod.uid, &mut dirty, &mut delta)
            .unwrap_or_else(|| pod.uid.as_str().into());
        self.insert_pod(uid.clone(), pod, &mut dirty, &mut delta);
        self.forget_unmatched(&uid, before);
        self.resolve(dirty, &mut delta);
        delta
    }

    pub fn remove_pod(&mut self, uid: &str) -> PlanDelta {
        let mut delta = PlanDelta::default();
        let mut dirty = DirtyKeys::new();
        let before = self.matched_by(uid);
        self.take_pod(uid, &mut dirty, &mut delta);
        self.forget_unmatched(uid, before);
        self.resolve(dirty, &mut delta);
        delta
    }

    /// The policies that select pod `uid` now.
    fn matched_by(&self, uid: &str) -> Vec<Arc<str>> {
        self.pods.get(uid).map(|p| p.matched.to_vec()).unwrap_or_default()
    }

    /// Forgets the assignments of pod `uid` to the policies of `before` that no longer select it.
    pub(super) fn forget_unmatched(&mut self, uid: &str, before: Vec<Arc<str>>) {
        let now = self.matched_by(uid);
        for policy in before.iter().filter(|p| !now.contains(p)) {
            if let Some(p) = self.policies.get_mut(policy) {
                p.sticky.remove(uid);
            }
        }
    }

    /// Takes the gateways pods were assigned from what the datapaths hold (after a restart or a
    /// leader change): (policy, pod IP, gateway node). A pod whose gateway node serves the
    /// policy stays there. Unknown policies, pods and nodes are skipped.
    pub fn adopt_assignments(
        &mut self,
        held: impl IntoIterator<Item = (String, IpAddr, String)>,
    ) -> PlanDelta {
        let mut delta = PlanDelta::default();
        let mut dirty = DirtyKeys::new();
        let mut by_policy: HashMap<String, Vec<(IpAddr, String)>> = HashMap::new();
        for (policy, ip, node) in held {
            by_policy.entry(policy).or_default().push((ip, node));
        }
        for (policy, held) in by_policy {
            let Some((name, p)) = self.policies.get_key_value(policy.as_str()) else {
                continue;
            };
            let (name, Ok(config)) = (name.clone(), &p.config) else {
                continue;
            };
            let mut by_ip: HashMap<IpAddr, Vec<Arc<str>>> = HashMap::new();
            for uid in &p.matched {
                for ip in self.pods.get(uid).into_iter().flat_map(|pod| pod.ips.iter()) {
                    by_ip.entry(*ip).or_default().push(uid.clone());
                }
            }
            let mut adopted = Vec::new();
            for (ip, node) in held {
                let Some(g) = p.active.iter().find(|g| *g.node == *node) else {
                    continue;
                };
                for uid in by_ip.get(&ip).into_iter().flatten() {
                    if p.sticky.get(uid).is_none_or(|s| *s.node != *node) {
                        adopted.push((uid.clone(), Sticky::of(g)));
                        if let Some(pod) = self.pods.get(uid) {
                            dirty.extend(keys_of(config, &pod.ips).map(|(k, _)| k));
                        }
                    }
                }
            }
            if let Some(p) = self.policies.get_mut(&name) {
                p.sticky.extend(adopted);
            }
        }
        self.resolve(dirty, &mut delta);
        delta
    }

    /// The entries node `gateway` would hold for the traffic of the pod at `pod` under `policy`
    /// had it kept the pod in `slot` (gateway entry, slot): what a new leader puts back, as
    /// lingering entries, on a gateway the pod was moved away from while the pod's node still
    /// has flows pinned there. With the pod's node. When `gateway` is the pod's own node, its
    /// entries there as they are now (it keeps none of its own for the pod: it only stays
    /// pinnable), and no slot is needed. `None` when there is nothing to keep: the pod's
    /// traffic under the policy goes to `gateway` anyway or to no gateway; or when it cannot be
    /// said: unknown policy, slot or node, the node not offering what the entry names, or a
    /// managed address (it left with its slot, and the flows with it).
    pub fn lingering_entries(
        &self,
        policy: &str,
        pod: IpAddr,
        gateway: &str,
        slot: Option<(usize, usize)>,
    ) -> Option<(Arc<str>, Vec<EgressEntry>)> {
        let p = self.policies.get(policy)?;
        let config = p.config.as_ref().ok()?;
        let mut source_node = None;
        let mut moved = Vec::new();
        for (key, excluded) in keys_of(config, &[pod]) {
            let Some(r) = self.keys.get(&key).and_then(|k| k.resolved.as_ref()) else {
                continue;
            };
            if excluded || **r.policy() != *policy {
                continue;
            }
            match r.gateway_node() {
                Some(n) if **n == *gateway => return None,
                Some(_) => {}
                None => continue,
            }
            source_node = Some(r.source_node.clone());
            moved.push((key, r));
        }
        let source = source_node?;
        if *source == *gateway {
            let own = moved
                .iter()
                .filter_map(|(key, r)| r.placements(*key).into_iter().find(|(n, _)| *n == source))
                .map(|(_, e)| e)
                .collect();
            return Some((source, own));
        }
        let (entry, slot) = slot?;
        let spec = config.gateways.get(entry)?;
        if matches!(spec.egress, crate::policy::EgressSource::Managed { .. }) {
            return None;
        }
        let (name, node) = self.nodes.get_key_value(gateway)?;
        let (egress_v4, egress_v6, interface) = gateways::resolve_egress(node, &spec.egress, slot)?;
        let g = Arc::new(ActiveGateway {
            entry,
            slot,
            node: name.clone(),
            ip: node.tunnel_ip()?,
            egress_v4,
            egress_v6,
            interface,
            managed: false,
        });
        let entries: Vec<EgressEntry> = moved
            .into_iter()
            .filter_map(|(key, r)| r.on_gateway(key, g.clone()))
            .collect();
        Some((source, entries)).filter(|(_, e)| !e.is_empty())
    }

    /// Every pod's gateway node, per policy: (policy, pod IP, node), what a datapath reports
    /// back to a new planner ([`Planner::adopt_assignments`]).
    pub fn assignments(&self) -> Vec<(String, IpAddr, String)> {
        let mut out = Vec::new();
        for (name, p) in &self.policies {
            for (uid, s) in &p.sticky {
                for ip in self.pods.get(uid).into_iter().flat_map(|pod| pod.ips.iter()) {
                    out.push((name.to_string(), *ip, s.node.to_string()));
                }
            }
        }
        out.sort();
        out
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
        if self.change_destinations(&input, &mut delta) {
            return delta;
        }
        let name: Arc<str> = input.name.as_str().into();
        let mut addresses = self.managed_ips_of(&name);
        // An edited policy keeps its pods where they are.
        let mut sticky = self
            .policies
            .get_mut(&*name)
            .map(|p| std::mem::take(&mut p.sticky))
            .unwrap_or_default();
        self.take_policy(&name, &mut dirty, &mut delta);

        let config = policy::parse(&input.spec);
        let rank = (input.created.unwrap_or(i64::MAX), name.clone());
        if let Ok(c) = &config {
            for ip in c.gateways.iter().flat_map(|g| g.managed_ips()) {
                let claims = self.managed_claims.entry(ip).or_default();
                claims.push(rank.clone());
                claims.sort_unstable();
                addresses.push(ip);
            }
        }
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
        sticky.retain(|uid, _| matched.contains(uid));
        self.policies.insert(
            name.clone(),
            PolicyState {
                input,
                rank,
                config,
                active,
                matched,
                sticky,
            },
        );
        self.reselect_claimants(&addresses, &name, &mut dirty, &mut delta);
        delta.policies.insert(name);
        self.resolve(dirty, &mut delta);
        delta
    }

    /// An edit of an accepted policy that changes only its destinations (an allowlist that
    /// gains a CIDR): claims and unclaims the keys of the destinations added and removed, for
    /// the pods the policy matches, instead of taking the policy and placing it again (which
    /// costs what the whole policy costs: seconds for a million pairs). Whether it was such an
    /// edit (else nothing is done).
    fn change_destinations(&mut self, input: &PolicyInput, delta: &mut PlanDelta) -> bool {
        let Some((name, old)) = self.policies.get_key_value(input.name.as_str()) else {
            return false;
        };
        let (Ok(old_config), Ok(new_config)) = (&old.config, policy::parse(&input.spec)) else {
            return false;
        };
        // (A Kubernetes edit of the spec also bumps `metadata.generation`.)
        let same_but_spec = PolicyInput {
            spec: input.spec.clone(),
            generation: input.generation,
            ..old.input.clone()
        } == *input;
        let same_but_destinations = PolicyConfig {
            destinations: new_config.destinations.clone(),
            excluded: new_config.excluded.clone(),
            ..old_config.clone()
        } == new_config;
        if !same_but_spec || !same_but_destinations {
            return false;
        }
        // (destination, excluded) pairs added and removed, whatever the order they are listed in.
        let pairs = |c: &PolicyConfig| -> HashSet<(IpNet, bool)> {
            let dst = c.destinations.iter().map(|d| (*d, false));
            dst.chain(c.excluded.iter().map(|d| (*d, true))).collect()
        };
        let (old_pairs, new_pairs) = (pairs(old_config), pairs(&new_config));
        let added: Vec<(IpNet, bool)> = new_pairs.difference(&old_pairs).copied().collect();
        let removed: Vec<(IpNet, bool)> = old_pairs.difference(&new_pairs).copied().collect();
        let name = name.clone();
        let mut dirty = DirtyKeys::new();
        for uid in &old.matched {
            let Some(pod) = self.pods.get(uid) else {
                continue;
            };
            for &source in &pod.ips {
                let same_family = |(d, _): &&(IpNet, bool)| d.addr().is_ipv4() == source.is_ipv4();
                for &(destination, excluded) in removed.iter().filter(same_family) {
                    let key = EntryKey { source, destination };
                    unclaim(&mut self.keys, key, &name, uid, excluded);
                    dirty.insert(key);
                }
                for &(destination, excluded) in added.iter().filter(same_family) {
                    let key = EntryKey { source, destination };
                    self.keys.entry(key).or_default().claims.push(Claim {
                        policy: name.clone(),
                        pod: uid.clone(),
                        excluded,
                    });
                    dirty.insert(key);
                }
            }
        }
        let p = self.policies.get_mut(&name).expect("looked up above");
        p.input = input.clone();
        p.config = Ok(new_config);
        self.destination_edits += 1;
        // Policies that lost keys to this one may not any more.
        delta.policies.extend(
            self.conflicts
                .keys()
                .filter(|(_, w)| *w == name)
                .map(|(l, _)| l.clone()),
        );
        delta.policies.insert(name);
        self.resolve(dirty, delta);
        true
    }

    /// How many policy edits changed only destinations and so claimed and unclaimed only the
    /// changed destinations' keys (what a test or benchmark checks the short way by).
    pub fn destination_edits(&self) -> u64 {
        self.destination_edits
    }

    pub fn remove_policy(&mut self, name: &str) -> PlanDelta {
        let mut delta = PlanDelta::default();
        let mut dirty = DirtyKeys::new();
        let addresses = self.managed_ips_of(name);
        if self.take_policy(name, &mut dirty, &mut delta) {
            delta.policies.insert(name.into());
        }
        self.reselect_claimants(&addresses, name, &mut dirty, &mut delta);
        self.resolve(dirty, &mut delta);
        delta
    }

    /// The managed addresses policy `name` claims (none unless accepted).
    fn managed_ips_of(&self, name: &str) -> Vec<IpAddr> {
        match self.policies.get(name).map(|p| &p.config) {
            Some(Ok(c)) => c.gateways.iter().flat_map(|g| g.managed_ips()).collect(),
            _ => Vec::new(),
        }
    }

    /// The policy that holds managed address `ip`: the oldest that names it.
    pub(crate) fn managed_owner(&self, ip: IpAddr) -> Option<&Arc<str>> {
        self.managed_claims.get(&ip)?.first().map(|(_, p)| p)
    }

    /// Re-selects the gateways of the policies other than `except` that name one of
    /// `addresses`: which of them holds an address may have changed.
    fn reselect_claimants(
        &mut self,
        addresses: &[IpAddr],
        except: &str,
        dirty: &mut DirtyKeys,
        delta: &mut PlanDelta,
    ) {
        let mut others: Vec<Arc<str>> = addresses
            .iter()
            .filter_map(|ip| self.managed_claims.get(ip))
            .flatten()
            .map(|(_, p)| p.clone())
            .filter(|p| **p != *except)
            .collect();
        others.sort_unstable();
        others.dedup();
        for p in others {
            self.reselect_gateways(&p, dirty, delta);
            // Its status names who holds the address, even when its gateways stay as they are.
            delta.policies.insert(p);
        }
    }

    // === Queries ===

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

    /// `spec.drainTimeout` of an accepted policy, if it sets one.
    pub fn drain_timeout(&self, policy: &str) -> Option<std::time::Duration> {
        self.policies.get(policy)?.config.as_ref().ok()?.drain_timeout
    }

    /// The node of pod `uid`, if the planner has it on one.
    pub fn pod_node(&self, uid: &str) -> Option<Arc<str>> {
        self.pods.get(uid)?.node.clone()
    }

    /// The policies a node serves as a gateway.
    pub fn gateway_duties(&self, node: &str) -> Vec<GatewayDuty> {
        let mut duties = Vec::new();
        for (name, p) in &self.policies {
            for g in p.active.iter().filter(|g| &*g.node == node) {
                duties.push(GatewayDuty {
                    policy: name.clone(),
                    egress_ips: g.egress_v4.into_iter().chain(g.egress_v6).collect(),
                    interface: g.interface.clone(),
                    managed: g.managed,
                    awaiting_release: false,
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
}

/// The pods (UIDs) an index holds under `key`, copied out so that they can be re-evaluated.
fn members(index: &HashMap<Arc<str>, HashSet<Arc<str>>>, key: &str) -> Vec<Arc<str>> {
    index.get(key).into_iter().flatten().cloned().collect()
}
