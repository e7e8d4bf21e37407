//! From the claims on a key to the entries nodes hold: the winning claim (older policy first,
//! then excluded before steered), where its traffic goes, and the conflicts of the losers.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use smallvec::SmallVec;

use super::{
    DirtyKeys, Planner,
    delta::{EgressEntry, EntryKey, PlanDelta},
    gateways::{ActiveGateway, Sticky, assign},
};
use crate::{
    api::FailurePolicy,
    plan::{GatewaySlotRef, GatewayTarget},
    policy::PolicyConfig,
};

/// One policy's claim on a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Claim {
    pub(super) policy: Arc<str>,
    pub(super) pod: Arc<str>,
    pub(super) excluded: bool,
}

/// The claims on one key, and how they resolve.
#[derive(Default)]
pub(super) struct KeyState {
    pub(super) claims: SmallVec<[Claim; 1]>,
    pub(super) resolved: Option<Resolved>,
}

/// The (loser, winner) pairs of one contested key.
pub(super) type Losses = SmallVec<[(Arc<str>, Arc<str>); 1]>;

/// The winning claim of a key, resolved to where its entries go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Resolved {
    policy: Arc<str>,
    pub(super) source_node: Arc<str>,
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
    pub(super) fn gateway_node(&self) -> Option<&Arc<str>> {
        match &self.target {
            Target::Gateway(g) => Some(&g.node),
            _ => None,
        }
    }

    pub(super) fn policy(&self) -> &Arc<str> {
        &self.policy
    }

    /// The entry gateway `g` would hold for `key` were the key's traffic sent there (the
    /// entry a gateway keeps for the flows pinned to it after the pod moved on), unless `g` is
    /// the source node itself.
    pub(super) fn on_gateway(&self, key: EntryKey, g: Arc<ActiveGateway>) -> Option<EgressEntry> {
        let node = g.node.clone();
        let there = Resolved {
            target: Target::Gateway(g),
            ..self.clone()
        };
        if node == there.source_node {
            return None;
        }
        there
            .placements(key)
            .into_iter()
            .find(|(n, _)| *n == node)
            .map(|(_, e)| e)
    }

    /// The entries this resolution puts on nodes: one on the source node, and one on the
    /// gateway node when that is another node.
    pub(super) fn placements(&self, key: EntryKey) -> SmallVec<[(Arc<str>, EgressEntry); 2]> {
        let (gateway, egress_ip, interface, gateway_slot) = match &self.target {
            Target::Gateway(g) => (
                GatewayTarget::Node(g.ip),
                g.egress_for(key.source),
                g.interface.clone(),
                Some(GatewaySlotRef {
                    entry: g.entry as u32,
                    slot: g.slot as u32,
                }),
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

/// The (source, destination) keys a policy produces for a pod, with whether each is excluded.
pub(super) fn keys_of<'a>(
    config: &'a PolicyConfig,
    ips: &'a [IpAddr],
) -> impl Iterator<Item = (EntryKey, bool)> + 'a {
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

pub(super) fn unclaim(
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

impl Planner {
    /// Re-resolves the keys a change touched and records what moved in `delta`.
    pub(super) fn resolve(&mut self, dirty: DirtyKeys, delta: &mut PlanDelta) {
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
        // The pod stays with this gateway from now on (see `assign`); a pod the policy has no
        // gateway for has no connections to keep, and is placed afresh when gateways return
        // (spread, not all on the last one standing).
        if let (Some(w), Some(resolved)) = (winner, &new) {
            let (policy, pod) = (w.policy.clone(), w.pod.clone());
            match &resolved.target {
                Target::Gateway(g) => {
                    let sticky = Sticky::of(g);
                    if let Some(p) = self.policies.get_mut(&policy)
                        && p.sticky.get(&pod) != Some(&sticky)
                    {
                        p.sticky.insert(pod, sticky);
                    }
                }
                Target::None | Target::Fallback => {
                    if let Some(p) = self.policies.get_mut(&policy) {
                        p.sticky.remove(&pod);
                    }
                }
                Target::Excluded => {}
            }
        }

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
            match assign(&policy.active, &claim.pod, policy.sticky.get(&claim.pod)) {
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
