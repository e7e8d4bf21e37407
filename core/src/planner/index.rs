//! Pods as the planner keeps them (interned, because large clusters have many pods and the
//! planner keeps them all), the rule index that finds the policies a pod may match, and the
//! bookkeeping of which keys each pod claims for which policy.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use smallvec::SmallVec;

use super::{
    DirtyKeys, Planner,
    delta::PlanDelta,
    resolve::{Claim, keys_of, unclaim},
};
use crate::{
    model::{NodeInfo, PodInfo},
    policy::PolicyConfig,
    selector::{LabelSource, Labels, PodLabels},
};

/// The label Kubernetes puts on every namespace with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A pod as the planner keeps it: only what planning reads, with interned strings.
pub(super) struct PodState {
    uid: Arc<str>,
    namespace: Arc<str>,
    /// Sorted by key.
    labels: Box<[(Arc<str>, Arc<str>)]>,
    pub(super) node: Option<Arc<str>>,
    pub(super) ips: SmallVec<[IpAddr; 2]>,
    /// [`PodInfo::is_source`].
    source: bool,
    /// Accepted policies that select the pod.
    pub(super) matched: SmallVec<[Arc<str>; 2]>,
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
    pub(super) fn plans_like(&self, info: &PodInfo) -> bool {
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
pub(super) struct Interner {
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

/// Policies indexed by a label their rules require, so a pod is only tested against policies
/// that can select it.
type LabelIndex = HashMap<String, HashMap<String, Vec<Arc<str>>>>;

#[derive(Default)]
pub(super) struct RuleIndex {
    by_pod_label: LabelIndex,
    by_namespace_label: LabelIndex,
    unanchored: BTreeSet<Arc<str>>,
}

impl RuleIndex {
    pub(super) fn insert(&mut self, name: &Arc<str>, config: &PolicyConfig) {
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

fn remove_from_index(index: &mut HashMap<Arc<str>, HashSet<Arc<str>>>, key: &str, uid: &str) {
    if let Some(set) = index.get_mut(key) {
        set.remove(uid);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

impl Planner {
    /// Removes a pod and its claims; returns its interned UID for reuse.
    pub(super) fn take_pod(
        &mut self,
        uid: &str,
        dirty: &mut DirtyKeys,
        delta: &mut PlanDelta,
    ) -> Option<Arc<str>> {
        let state = self.pods.remove(uid)?;
        self.unclaim_pod(&state, dirty, delta);
        if let Some(node) = &state.node {
            remove_from_index(&mut self.pods_by_node, node, uid);
        }
        remove_from_index(&mut self.pods_by_namespace, &state.namespace, uid);
        Some(state.uid)
    }

    pub(super) fn insert_pod(
        &mut self,
        uid: Arc<str>,
        info: PodInfo,
        dirty: &mut DirtyKeys,
        delta: &mut PlanDelta,
    ) {
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
    pub(super) fn rematch_pod(&mut self, uid: &str, dirty: &mut DirtyKeys, delta: &mut PlanDelta) {
        let Some(mut state) = self.pods.remove(uid) else {
            return;
        };
        self.unclaim_pod(&state, dirty, delta);
        let before = std::mem::take(&mut state.matched);
        self.claim_pod(&mut state, dirty, delta);
        self.pods.insert(state.uid.clone(), state);
        self.forget_unmatched(uid, before.to_vec());
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
    pub(super) fn take_policy(&mut self, name: &str, dirty: &mut DirtyKeys, delta: &mut PlanDelta) -> bool {
        let Some(old) = self.policies.remove(name) else {
            return false;
        };
        self.index.remove(name);
        let Ok(config) = &old.config else { return true };
        for ip in config.gateways.iter().flat_map(|g| g.managed_ips()) {
            if let Some(claims) = self.managed_claims.get_mut(&ip) {
                claims.retain(|(_, p)| &**p != name);
                if claims.is_empty() {
                    self.managed_claims.remove(&ip);
                }
            }
        }
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

    pub(super) fn pod_matches(
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
}
