//! What the planner hands out: per node, what a change did to its datapath entries.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

pub use crate::plan::{EgressEntry, EntryKey};

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

    pub(super) fn upsert(&mut self, entry: EgressEntry) {
        self.removals.remove(&entry.key);
        self.upserts.insert(entry.key, entry);
    }

    pub(super) fn remove(&mut self, key: EntryKey) {
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

    pub(super) fn node(&mut self, name: &Arc<str>) -> &mut NodeDelta {
        self.nodes.entry(name.clone()).or_default()
    }
}
