//! Gateway selection (which nodes fill each gateway entry's slots) and pod assignment (which
//! slot each pod's traffic leaves by), both by rendezvous hashing.

use std::{net::IpAddr, sync::Arc};

use xxhash_rust::xxh3::Xxh3;

use super::{DirtyKeys, Planner, delta::PlanDelta, resolve::keys_of};
use crate::{
    model::{GatewaySlot, NodeInfo},
    policy::{EgressSource, PolicyConfig},
};

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
    /// The egress address is Sluice's to hold on `interface` (`egressIPs`), not the node's own.
    pub managed: bool,
}

impl ActiveGateway {
    pub(super) fn egress_for(&self, source: IpAddr) -> Option<IpAddr> {
        if source.is_ipv4() {
            self.egress_v4
        } else {
            self.egress_v6
        }
    }

    /// Whether this gateway holds managed address `ip` (its slot's of `egressIPs`).
    pub fn holds_managed(&self, ip: IpAddr) -> bool {
        self.managed && (self.egress_v4 == Some(ip) || self.egress_v6 == Some(ip))
    }
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

/// The gateway a pod of a policy was last assigned: what keeps it there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sticky {
    pub node: Arc<str>,
    pub entry: usize,
    pub slot: usize,
}

impl Sticky {
    pub(super) fn of(g: &ActiveGateway) -> Self {
        Sticky {
            node: g.node.clone(),
            entry: g.entry,
            slot: g.slot,
        }
    }
}

/// The gateway a pod's traffic leaves by. A pod stays with the node it was assigned (`sticky`)
/// while that node serves the policy, in any entry or slot: a gateway that recovers or is
/// added, a `maxGatewayNodes` increase or a reordered `egressGateways` list takes none of the
/// pods of a working gateway, and so breaks none of their connections. A pod whose node no
/// longer serves follows its slot to the node that took it over (with a managed address, the
/// address goes with the slot), else goes, as a new pod does, to the occupied (entry, slot)
/// with the highest hash of (pod, entry, slot): new pods spread over every gateway.
pub(super) fn assign<'a>(
    active: &'a [Arc<ActiveGateway>],
    pod_uid: &str,
    sticky: Option<&Sticky>,
) -> Option<&'a Arc<ActiveGateway>> {
    let score = |g: &ActiveGateway| {
        let score = rendezvous(&[pod_uid.as_bytes(), &g.entry.to_le_bytes(), &g.slot.to_le_bytes()]);
        (score, std::cmp::Reverse((g.entry, g.slot)))
    };
    if let Some(s) = sticky {
        let same_slot = |g: &&Arc<ActiveGateway>| g.entry == s.entry && g.slot == s.slot;
        let on_node = active
            .iter()
            .filter(|g| g.node == s.node)
            .max_by_key(|g| (same_slot(g), score(g)));
        if let Some(g) = on_node.or_else(|| active.iter().find(same_slot)) {
            return Some(g);
        }
    }
    active.iter().max_by_key(|g| score(g))
}

/// IPv4 egress address, IPv6 egress address, interface.
type Egress = (Option<IpAddr>, Option<IpAddr>, Option<Arc<str>>);

/// The egress addresses and interface a node offers for slot `slot` of a gateway entry, or
/// `None` when the node is known not to have what the entry names.
pub(super) fn resolve_egress(node: &NodeInfo, source: &EgressSource, slot: usize) -> Option<Egress> {
    let first = |addrs: &[IpAddr], v4: bool| addrs.iter().copied().find(|a| a.is_ipv4() == v4);
    let by_family = |ip: IpAddr| {
        if ip.is_ipv4() {
            (Some(ip), None)
        } else {
            (None, Some(ip))
        }
    };
    if let EgressSource::Managed { interface, .. } = source {
        let (v4, v6) = source.managed_ips(slot);
        if v4.is_none() && v6.is_none() {
            return None;
        }
        let Some(interfaces) = &node.interfaces else {
            return Some((v4, v6, interface.as_deref().map(Into::into)));
        };
        // Where the addresses can live: the named interface, else the one on the subnet of
        // either (where the neighbours that must learn them are; IPv4's first), else the
        // default route's. A slot's two addresses live on one interface.
        let on_subnet = |ip: IpAddr| {
            interfaces
                .iter()
                .find(|i| i.networks.iter().any(|n| n.contains(&ip)))
        };
        let iface = match interface {
            Some(name) => interfaces.iter().find(|i| &i.name == name)?,
            None => v4
                .and_then(on_subnet)
                .or_else(|| v6.and_then(on_subnet))
                .or_else(|| interfaces.iter().find(|i| i.default_route))?,
        };
        return Some((v4, v6, Some(iface.name.as_str().into())));
    }
    let Some(interfaces) = &node.interfaces else {
        return Some(match source {
            EgressSource::Interface(name) => (None, None, Some(name.as_str().into())),
            EgressSource::Ip(ip) => {
                let (v4, v6) = by_family(*ip);
                (v4, v6, None)
            }
            EgressSource::DefaultRoute | EgressSource::Managed { .. } => (None, None, None),
        });
    };
    let iface = match source {
        EgressSource::Interface(name) => interfaces.iter().find(|i| &i.name == name)?,
        EgressSource::Ip(ip) => interfaces.iter().find(|i| i.addresses.contains(ip))?,
        EgressSource::DefaultRoute | EgressSource::Managed { .. } => {
            interfaces.iter().find(|i| i.default_route)?
        }
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

impl Planner {
    /// Re-selects a policy's gateways; when they change, marks the keys of its pods dirty.
    pub(super) fn reselect_gateways(
        &mut self,
        name: &Arc<str>,
        dirty: &mut DirtyKeys,
        delta: &mut PlanDelta,
    ) {
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
    /// (policy, entry, slot, node), a node that served the policy before (in another entry, say)
    /// first. A node fills one slot of an entry, except with managed
    /// addresses (`egressIPs`): a slot no other node can fill rides on a node that fills another
    /// (the highest hash again), so that every address stays held and its pods keep leaving with
    /// it; and such a doubled slot stays where it is while that node is usable.
    pub(super) fn select_gateways(
        &self,
        policy: &str,
        config: &PolicyConfig,
        retained: &[GatewaySlot],
    ) -> Vec<Arc<ActiveGateway>> {
        let mut active = Vec::new();
        for (i, gateway) in config.gateways.iter().enumerate() {
            let managed = matches!(gateway.egress, EgressSource::Managed { .. });
            let mut nodes: Vec<(&Arc<str>, &NodeInfo, IpAddr)> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.ready && n.eligible && gateway.nodes.matches(&n.labels))
                .filter_map(|(name, n)| Some((name, n, n.tunnel_ip()?)))
                .collect();
            // Draining nodes are candidates of last resort: a drain moves the entry's slots to
            // other nodes, but never leaves it without a gateway.
            if nodes.iter().any(|(_, n, _)| !n.draining) {
                nodes.retain(|(_, n, _)| !n.draining);
            }
            // A managed address an older policy names is that policy's to hold.
            let ours = |slot: usize| {
                let (v4, v6) = gateway.egress.managed_ips(slot);
                v4.into_iter()
                    .chain(v6)
                    .all(|ip| self.managed_owner(ip).is_none_or(|p| **p == *policy))
            };
            let offer = |(name, node, ip): &(&Arc<str>, &NodeInfo, IpAddr), slot: usize| {
                if !ours(slot) {
                    return None;
                }
                let (egress_v4, egress_v6, interface) = resolve_egress(node, &gateway.egress, slot)?;
                Some(ActiveGateway {
                    entry: i,
                    slot,
                    node: (*name).clone(),
                    ip: *ip,
                    egress_v4,
                    egress_v6,
                    interface,
                    managed,
                })
            };
            let score = |slot: usize, g: &ActiveGateway| {
                let score = rendezvous(&[
                    policy.as_bytes(),
                    &i.to_le_bytes(),
                    &slot.to_le_bytes(),
                    g.node.as_bytes(),
                ]);
                (score, std::cmp::Reverse(g.node.clone()))
            };
            // A node that served the policy before (in any entry: entries may be reordered) is
            // preferred for a slot that has none retained, so that an edit moves no gateway
            // that could stay.
            let served = |g: &ActiveGateway| retained.iter().any(|r| *r.node == *g.node);
            let slots = gateway.max_nodes as usize;
            let mut filled: Vec<Option<ActiveGateway>> = vec![None; slots];
            let mut used: Vec<Arc<str>> = Vec::new();
            for r in retained.iter().filter(|r| r.entry == i && r.slot < slots) {
                if filled[r.slot].is_some() || (!managed && used.iter().any(|u| **u == *r.node)) {
                    continue;
                }
                if let Some(g) = nodes
                    .iter()
                    .find(|n| **n.0 == *r.node)
                    .and_then(|n| offer(n, r.slot))
                {
                    used.push(g.node.clone());
                    filled[r.slot] = Some(g);
                }
            }
            for (slot, place) in filled.iter_mut().enumerate() {
                if place.is_some() {
                    continue;
                }
                *place = nodes
                    .iter()
                    .filter(|n| !used.contains(n.0))
                    .filter_map(|n| offer(n, slot))
                    .max_by_key(|g| (served(g), score(slot, g)));
                if let Some(g) = place {
                    used.push(g.node.clone());
                }
            }
            if managed {
                for (slot, place) in filled.iter_mut().enumerate() {
                    if place.is_none() {
                        *place = nodes
                            .iter()
                            .filter(|n| used.contains(n.0))
                            .filter_map(|n| offer(n, slot))
                            .max_by_key(|g| score(slot, g));
                    }
                }
            }
            active.extend(filled.into_iter().flatten().map(Arc::new));
        }
        active
    }
}
