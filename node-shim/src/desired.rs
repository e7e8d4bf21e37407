//! From the node's plan entries to the exact map contents and SNAT rules the node must hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use ipnet::IpNet;
use sluice_proto::{EgressEntry, EntryKey, GatewayTarget};

use crate::{
    error::Error,
    maps::{self, EntryValueV4, PolicyKeyV4, PolicyName},
};

/// One network interface of this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub ipv4: Vec<Ipv4Addr>,
    /// The subnet of each address of `ipv4` (host bits clear), in the same order.
    pub ipv4_networks: Vec<ipnet::Ipv4Net>,
}

/// What the desired state depends on besides the plan.
#[derive(Clone, Debug)]
pub struct Host {
    /// This node's underlay IP: entries whose gateway is this IP egress here.
    pub node_ip: Ipv4Addr,
    pub interfaces: Vec<Interface>,
    /// The interface of the IPv4 default route, if any.
    pub default_route_interface: Option<String>,
    /// Managed egress IPs of this node's duties that it does not hold (yet), with why: their
    /// entries drop, and say so.
    pub managed_not_held: BTreeMap<Ipv4Addr, String>,
}

/// The desired contents of the maps and the SNAT rules.
#[derive(Debug, Default)]
pub struct Desired {
    pub policy: BTreeMap<PolicyKeyV4, EntryValueV4>,
    pub names: BTreeMap<u32, PolicyName>,
    /// Egress IP -> the egress ids that SNAT to it here.
    pub snat: BTreeMap<Ipv4Addr, BTreeSet<u32>>,
    /// Interfaces replies to egress IPs arrive on (their rp_filter is relaxed).
    pub egress_interfaces: BTreeSet<String>,
    /// Egress id -> (name, ifindex) of the interface its SNATed traffic must leave by.
    pub egress_routes: BTreeMap<u32, (String, u32)>,
    /// Underlay IP (network byte order) of every node this node exchanges tunnel traffic with
    /// -> `maps::PEER_*`: the nodes whose pods it serves, and the gateways of its own pods.
    pub peers: BTreeMap<u32, u32>,
    /// Entries that could not be honoured; they are programmed to drop (fail closed).
    pub problems: Vec<Error>,
    /// IPv6 entries, not steered yet by the datapath.
    pub skipped_ipv6: usize,
    /// What each IPv6 entry does until IPv6 is steered: drop (a Drop policy's destination) or
    /// the normal path.
    pub v6: BTreeMap<maps::EntryKeyV6, maps::EntryV6>,
    /// Every entry that is not programmed as planned, with why: reported to the operator.
    pub entry_errors: Vec<EntryProblem>,
}

/// One plan entry the datapath does not hold as planned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryProblem {
    pub key: EntryKey,
    pub message: String,
}

/// Why IPv6 entries are not programmed.
pub const IPV6_UNSUPPORTED: &str = "IPv6 is not steered yet (the datapath steers IPv4): this entry's \
     traffic is dropped under failurePolicy Drop, and takes the normal path under Fallback";

/// Stable numbering of policies (the id is in counters and policy names) and of the egresses,
/// (address, interface) pairs, this node SNATs to (the egress id is in packet and conntrack
/// marks: it picks the SNAT rule and the egress route).
#[derive(Clone, Debug)]
pub struct PolicyIds {
    by_name: BTreeMap<String, u32>,
    egresses: BTreeMap<(Ipv4Addr, u32), u32>,
    /// Ids a previous run gave egress addresses (interface unknown), preferred for them.
    adopted_egresses: BTreeMap<Ipv4Addr, u32>,
    max_egress: u32,
    /// Keep every egress, used or not ([`PolicyIds::hold_egresses`]).
    holding_egresses: bool,
}

impl Default for PolicyIds {
    fn default() -> Self {
        PolicyIds {
            by_name: BTreeMap::new(),
            egresses: BTreeMap::new(),
            adopted_egresses: BTreeMap::new(),
            max_egress: maps::MarkLayout::default().max_egress_id(),
            holding_egresses: false,
        }
    }
}

impl PolicyIds {
    /// Takes over the numbering found in the pinned names map.
    pub fn adopt(names: BTreeMap<u32, String>) -> Self {
        PolicyIds {
            by_name: names.into_iter().map(|(id, name)| (name, id)).collect(),
            ..Default::default()
        }
    }

    /// The policy numbered `id`, by id.
    pub fn names(&self) -> BTreeMap<u32, &str> {
        self.by_name
            .iter()
            .map(|(name, id)| (*id, name.as_str()))
            .collect()
    }

    /// Takes over the egress ids the pinned entries carry (address -> id), and the largest id
    /// the mark layout holds: marks in live conntrack entries keep meaning the same egress.
    pub fn with_egresses(mut self, adopted: BTreeMap<Ipv4Addr, u32>, max_egress: u32) -> Self {
        self.adopted_egresses = adopted
            .into_iter()
            .filter(|(_, id)| (1..=max_egress).contains(id))
            .collect();
        self.max_egress = max_egress;
        self
    }

    /// The egress id of (`ip`, `ifindex`): kept while used, else the adopted one, else the
    /// lowest free one.
    fn egress_id(&mut self, ip: Ipv4Addr, ifindex: u32, policy: &str) -> Result<u32, Error> {
        if let Some(id) = self.egresses.get(&(ip, ifindex)) {
            return Ok(*id);
        }
        let used: BTreeSet<u32> = self.egresses.values().copied().collect();
        let id = self
            .adopted_egresses
            .get(&ip)
            .copied()
            .filter(|id| !used.contains(id))
            .or_else(|| (1..=self.max_egress).find(|id| !used.contains(id)))
            .ok_or_else(|| Error::TooManyEgresses {
                max: self.max_egress,
                policy: policy.to_owned(),
            })?;
        self.egresses.insert((ip, ifindex), id);
        Ok(id)
    }

    /// The id of `name`, allocating the lowest free one.
    fn id(&mut self, name: &str) -> Result<u32, Error> {
        if let Some(id) = self.by_name.get(name) {
            return Ok(*id);
        }
        let used: BTreeSet<u32> = self.by_name.values().copied().collect();
        let id = (1..=maps::MAX_POLICY_ID)
            .find(|id| !used.contains(id))
            .ok_or(Error::TooManyPolicies {
                max: maps::MAX_POLICY_ID,
            })?;
        self.by_name.insert(name.to_owned(), id);
        Ok(id)
    }

    /// Forgets the policies not in `keep`.
    fn retain(&mut self, keep: &BTreeSet<&str>) {
        self.by_name.retain(|name, _| keep.contains(name.as_str()));
    }

    /// Forgets the egresses not in `keep` (unless holding them).
    fn retain_egresses(&mut self, keep: &BTreeSet<(Ipv4Addr, u32)>) {
        if !self.holding_egresses {
            self.egresses.retain(|k, _| keep.contains(k));
        }
    }

    /// While this node's own pods have flows pinned to leaving from here (a pod moved off its
    /// own gateway node), every egress keeps its id, used by an entry or not: such a flow's
    /// packets carry the id of the egress they started on.
    pub fn hold_egresses(&mut self, hold: bool) {
        self.holding_egresses = hold;
    }
}

/// This node's entries in a plan document (`run --entries FILE`, read as `bytes`). A document
/// that does not decode is refused with the path of the field at fault (`nodes[2].entries[7].
/// gateway: ...`), which a line and column in a one-line document of megabytes would not give.
pub fn plan_entries(path: &std::path::Path, bytes: &[u8], node: &str) -> Result<Vec<EgressEntry>, Error> {
    let bad = |source: Box<dyn std::error::Error + Send + Sync>| Error::Plan {
        path: path.to_owned(),
        source,
    };
    let mut document = serde_json::Deserializer::from_slice(bytes);
    let plan: sluice_proto::PlanDocument =
        serde_path_to_error::deserialize(&mut document).map_err(|e| bad(Box::new(e)))?;
    document.end().map_err(|e| bad(Box::new(e)))?;
    let section = plan.node(node).ok_or_else(|| Error::NodeNotInPlan {
        path: path.to_owned(),
        node: node.to_owned(),
    })?;
    Ok(section.entries.clone())
}

/// Computes the desired state of this node from its plan entries. `guarded`: the guard's
/// destinations (the destination CIDRs of `failurePolicy: Drop` policies), which tell what an
/// IPv6 entry steering to a gateway must do until IPv6 is steered.
pub fn desired<'a, I>(
    entries: I,
    guarded: &[IpNet],
    host: &Host,
    ids: &mut PolicyIds,
) -> Result<Desired, Error>
where
    I: IntoIterator<Item = &'a EgressEntry>,
    I::IntoIter: Clone,
{
    let entries = entries.into_iter();
    let mut out = Desired::default();
    let names: BTreeSet<&str> = entries.clone().map(|e| &*e.policy).collect();
    ids.retain(&names);
    // Egresses no entry uses any more give their ids back before new ones take any.
    let used_egresses: BTreeSet<(Ipv4Addr, u32)> = entries
        .clone()
        .filter(|e| e.gateway == GatewayTarget::Node(IpAddr::V4(host.node_ip)))
        .filter(|e| e.key.source.is_ipv4() && e.key.destination.addr().is_ipv4())
        .filter_map(|e| egress(e, host).ok())
        .map(|(ip, interface)| (ip, interface.index))
        .collect();
    ids.retain_egresses(&used_egresses);

    for entry in entries {
        let problem = |message: String| EntryProblem {
            key: entry.key,
            message,
        };
        let EntryKey { source, destination } = entry.key;
        let (IpAddr::V4(source), IpNet::V4(destination)) = (source, destination) else {
            out.skipped_ipv6 += 1;
            out.entry_errors.push(problem(IPV6_UNSUPPORTED.to_owned()));
            if let (IpAddr::V6(source), IpNet::V6(destination)) = (source, destination) {
                // Fail closed: what a Drop policy covers never leaves with the node's address.
                let drop = match entry.gateway {
                    GatewayTarget::None => true,
                    GatewayTarget::Fallback | GatewayTarget::Excluded => false,
                    GatewayTarget::Node(_) => guarded.contains(&entry.key.destination),
                };
                let policy_id = ids.id(&entry.policy)?;
                out.names.insert(policy_id, PolicyName::new(&entry.policy));
                out.v6.insert(
                    maps::EntryKeyV6::new(source, destination),
                    maps::EntryV6 {
                        action: if drop { maps::V6_DROP } else { maps::V6_PASS },
                        policy_id,
                    },
                );
            }
            continue;
        };
        let policy_id = ids.id(&entry.policy)?;
        out.names.insert(policy_id, PolicyName::new(&entry.policy));
        let mut value = EntryValueV4 {
            policy_id,
            ..Default::default()
        };
        match entry.gateway {
            GatewayTarget::None => value.kind = maps::KIND_NONE,
            GatewayTarget::Fallback => value.kind = maps::KIND_FALLBACK,
            GatewayTarget::Excluded => value.kind = maps::KIND_EXCLUDED,
            GatewayTarget::Node(IpAddr::V6(_)) => {
                // A gateway reachable only over IPv6 (an IPv6 underlay, not steered yet): the
                // same fail-closed rule as IPv6 entries, so a Drop policy's traffic never leaves
                // with the node's address.
                out.skipped_ipv6 += 1;
                out.entry_errors.push(problem(IPV6_UNSUPPORTED.to_owned()));
                if !guarded.contains(&entry.key.destination) {
                    continue;
                }
                value.kind = maps::KIND_NONE;
            }
            GatewayTarget::Node(IpAddr::V4(gateway)) => {
                value.kind = maps::KIND_GATEWAY;
                value.gateway_ip = maps::be(gateway);
                value.gateway_slot = entry
                    .gateway_slot
                    .map_or(0, |s| maps::encode_slot(s.entry, s.slot));
                if gateway != host.node_ip {
                    *out.peers.entry(value.gateway_ip).or_default() |= maps::PEER_GATEWAY;
                }
                if gateway == host.node_ip {
                    value.flags |= maps::F_LOCAL_GATEWAY;
                    // Without an IPv4 source node (a local pod, or an IPv6 underlay, not
                    // supported yet) the tunnel accepts this entry from nobody.
                    if let Some(IpAddr::V4(peer)) = entry.source_node_ip
                        && peer != host.node_ip
                    {
                        value.peer_ip = maps::be(peer);
                        *out.peers.entry(value.peer_ip).or_default() |= maps::PEER_SOURCE;
                    }
                    let egress = egress(entry, host).and_then(|(ip, interface)| {
                        let id = ids.egress_id(ip, interface.index, &entry.policy)?;
                        Ok((ip, interface, id))
                    });
                    match egress {
                        Ok((ip, interface, id)) => {
                            value.egress_ip = maps::be(ip);
                            value.egress_id = id;
                            out.snat.entry(ip).or_default().insert(id);
                            out.egress_interfaces.insert(interface.name.clone());
                            out.egress_routes
                                .insert(id, (interface.name.clone(), interface.index));
                        }
                        // egress_ip stays 0: the datapath drops (counted), never leaks.
                        Err(e) => {
                            out.entry_errors.push(problem(e.to_string()));
                            if !out.problems.iter().any(|p| p.to_string() == e.to_string()) {
                                out.problems.push(e);
                            }
                        }
                    }
                }
            }
        }
        out.policy.insert(PolicyKeyV4::new(source, destination), value);
    }
    Ok(out)
}

/// The egress IP and interface of an entry whose gateway is this node.
fn egress<'h>(entry: &EgressEntry, host: &'h Host) -> Result<(Ipv4Addr, &'h Interface), Error> {
    let policy = || entry.policy.to_string();
    let named = match entry.interface.as_deref() {
        Some(name) => Some(host.interfaces.iter().find(|i| i.name == name).ok_or_else(|| {
            Error::EgressInterfaceMissing {
                interface: name.to_owned(),
                policy: policy(),
            }
        })?),
        None => None,
    };
    match entry.egress_ip {
        Some(IpAddr::V4(ip)) => {
            let holder = host
                .interfaces
                .iter()
                .find(|i| i.ipv4.contains(&ip))
                .ok_or_else(|| match host.managed_not_held.get(&ip) {
                    Some(why) => Error::ManagedEgressIpNotHeld {
                        ip,
                        policy: policy(),
                        why: why.clone(),
                    },
                    None => Error::EgressIpNotLocal {
                        ip: IpAddr::V4(ip),
                        policy: policy(),
                    },
                })?;
            Ok((ip, named.unwrap_or(holder)))
        }
        Some(ip @ IpAddr::V6(_)) => Err(Error::EgressIpNotLocal { ip, policy: policy() }),
        None => {
            let interface = named
                .or_else(|| {
                    let name = host.default_route_interface.as_ref()?;
                    host.interfaces.iter().find(|i| &i.name == name)
                })
                .ok_or_else(|| Error::NoDefaultEgressIp { policy: policy() })?;
            let ip = *interface
                .ipv4
                .first()
                .ok_or_else(|| Error::NoDefaultEgressIp { policy: policy() })?;
            Ok((ip, interface))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        source: &str,
        destination: &str,
        gateway: &str,
        egress_ip: Option<&str>,
        policy: &str,
    ) -> EgressEntry {
        EgressEntry {
            key: EntryKey {
                source: source.parse().unwrap(),
                destination: destination.parse().unwrap(),
            },
            gateway: gateway.parse().unwrap(),
            egress_ip: egress_ip.map(|s| s.parse().unwrap()),
            interface: None,
            source_node_ip: None,
            gateway_slot: None,
            policy: policy.into(),
        }
    }

    fn host() -> Host {
        Host {
            node_ip: "192.0.2.11".parse().unwrap(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                index: 2,
                ipv4: vec!["192.0.2.11".parse().unwrap(), "192.0.2.101".parse().unwrap()],
                ipv4_networks: vec!["192.0.2.0/24".parse().unwrap(); 2],
            }],
            default_route_interface: Some("eth0".into()),
            managed_not_held: BTreeMap::new(),
        }
    }

    #[test]
    fn entries_map_to_kinds_flags_and_snat_rules() {
        let entries = [
            entry(
                "10.244.1.10",
                "203.0.113.0/24",
                "192.0.2.11",
                Some("192.0.2.101"),
                "a",
            ),
            entry(
                "10.244.2.10",
                "203.0.113.0/24",
                "192.0.2.11",
                Some("192.0.2.101"),
                "a",
            ),
            entry("10.244.1.10", "203.0.113.128/25", "excluded", None, "a"),
            entry("10.244.1.10", "198.51.100.0/24", "192.0.2.12", None, "b"),
            entry("10.244.1.11", "198.51.100.0/24", "none", None, "c"),
            entry("10.244.1.12", "198.51.100.0/24", "fallback", None, "d"),
            entry("fd00::1", "2001:db8::/32", "none", None, "e"),
        ];
        let mut ids = PolicyIds::default();
        let d = desired(&entries, &[], &host(), &mut ids).unwrap();
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(d.skipped_ipv6, 1);
        assert_eq!(d.policy.len(), 6);
        let local =
            d.policy[&PolicyKeyV4::new("10.244.2.10".parse().unwrap(), "203.0.113.0/24".parse().unwrap())];
        assert_eq!(local.kind, maps::KIND_GATEWAY);
        assert_eq!(local.flags, maps::F_LOCAL_GATEWAY);
        assert_eq!(maps::from_be(local.egress_ip).to_string(), "192.0.2.101");
        assert_eq!(local.egress_id, 1, "the first egress of this node");
        let remote =
            d.policy[&PolicyKeyV4::new("10.244.1.10".parse().unwrap(), "198.51.100.0/24".parse().unwrap())];
        assert_eq!(
            (remote.kind, remote.flags, remote.egress_ip),
            (maps::KIND_GATEWAY, 0, 0)
        );
        assert_eq!(d.snat.len(), 1);
        assert_eq!(
            d.snat[&"192.0.2.101".parse::<Ipv4Addr>().unwrap()],
            BTreeSet::from([local.egress_id])
        );
        assert_eq!(d.names[&local.policy_id].as_str(), "a");
        assert_eq!(d.egress_interfaces, BTreeSet::from(["eth0".to_owned()]));
        assert_eq!(
            d.egress_routes,
            BTreeMap::from([(local.egress_id, ("eth0".to_owned(), 2))])
        );
    }

    /// While the node's own pods have flows pinned to leaving from here, an egress no entry
    /// uses any more keeps its id (the flows' packets carry it), and a new egress takes another.
    #[test]
    fn held_egresses_keep_their_ids_while_unused() {
        let on =
            |ip: &str, policy: &str| entry("10.244.1.10", "203.0.113.0/24", "192.0.2.11", Some(ip), policy);
        let mut h = host();
        h.interfaces[0].ipv4.push("192.0.2.102".parse().unwrap());
        let id = |d: &Desired, ip: &str| d.snat.get(&ip.parse::<Ipv4Addr>().unwrap()).cloned();
        for hold in [false, true] {
            let mut ids = PolicyIds::default();
            let d = desired(&[on("192.0.2.101", "a")], &[], &h, &mut ids).unwrap();
            assert_eq!(id(&d, "192.0.2.101"), Some(BTreeSet::from([1])));
            ids.hold_egresses(hold);
            // The pod's entry now leaves by another egress (say, its gateway moved elsewhere and
            // another pod's came): the first one is unused.
            let d = desired(&[on("192.0.2.102", "a")], &[], &h, &mut ids).unwrap();
            let expected = if hold { 2 } else { 1 };
            assert_eq!(
                id(&d, "192.0.2.102"),
                Some(BTreeSet::from([expected])),
                "holding: {hold}"
            );
        }
    }

    #[test]
    fn egress_ids_are_stable_reused_and_bounded_by_the_mark() {
        let on = |ip: &str, policy: &str| {
            entry(
                &format!("10.244.1.{}", policy.len()),
                "203.0.113.0/24",
                "192.0.2.11",
                Some(ip),
                policy,
            )
        };
        let mut h = host();
        h.interfaces[0].ipv4.push("192.0.2.102".parse().unwrap());
        let mut ids =
            PolicyIds::default().with_egresses(BTreeMap::from([("192.0.2.102".parse().unwrap(), 7)]), 2);
        let d = desired(
            &[on("192.0.2.101", "a"), on("192.0.2.102", "bb")],
            &[],
            &h,
            &mut ids,
        )
        .unwrap();
        let id = |d: &Desired, ip: &str| d.snat[&ip.parse::<Ipv4Addr>().unwrap()].clone();
        assert_eq!(id(&d, "192.0.2.101"), BTreeSet::from([1]));
        // 7 does not fit a mark of two ids: not adopted.
        assert_eq!(id(&d, "192.0.2.102"), BTreeSet::from([2]));
        // Two policies on one egress share its id; a third egress does not fit.
        let mut h3 = h.clone();
        h3.interfaces[0].ipv4.push("192.0.2.103".parse().unwrap());
        let d = desired(
            &[
                on("192.0.2.101", "a"),
                on("192.0.2.101", "ccc"),
                on("192.0.2.102", "bb"),
                on("192.0.2.103", "dddd"),
            ],
            &[],
            &h3,
            &mut ids,
        )
        .unwrap();
        assert_eq!(id(&d, "192.0.2.101"), BTreeSet::from([1]));
        assert!(
            matches!(d.problems[..], [Error::TooManyEgresses { max: 2, .. }]),
            "{:?}",
            d.problems
        );
        // When an egress goes, its id is free again.
        let d = desired(&[on("192.0.2.103", "dddd")], &[], &h3, &mut ids).unwrap();
        assert_eq!(id(&d, "192.0.2.103"), BTreeSet::from([1]));
    }

    #[test]
    fn missing_egress_ip_or_interface_fails_closed_with_a_clear_error() {
        let mut e = entry(
            "10.244.1.10",
            "203.0.113.0/24",
            "192.0.2.11",
            Some("192.0.2.200"),
            "a",
        );
        let d = desired(std::slice::from_ref(&e), &[], &host(), &mut PolicyIds::default()).unwrap();
        assert!(matches!(d.problems[..], [Error::EgressIpNotLocal { .. }]));
        assert!(d.problems[0].to_string().contains("ip addr add 192.0.2.200/32"));
        // The operator hears which entry it is.
        assert_eq!(d.entry_errors.len(), 1);
        assert_eq!(d.entry_errors[0].key.source.to_string(), "10.244.1.10");
        assert_eq!(d.entry_errors[0].key.destination.to_string(), "203.0.113.0/24");
        assert_eq!(d.entry_errors[0].message, d.problems[0].to_string());
        assert_eq!(
            d.policy.values().next().unwrap().egress_ip,
            0,
            "drops instead of leaking"
        );

        e.egress_ip = Some("192.0.2.101".parse().unwrap());
        e.interface = Some("eth9".into());
        let d = desired(&[e], &[], &host(), &mut PolicyIds::default()).unwrap();
        assert!(
            matches!(d.problems[..], [Error::EgressInterfaceMissing { .. }]),
            "{:?}",
            d.problems
        );
    }

    #[test]
    fn no_egress_ip_means_the_default_route_interface_address() {
        let e = entry("10.244.1.10", "203.0.113.0/24", "192.0.2.11", None, "a");
        let d = desired(&[e], &[], &host(), &mut PolicyIds::default()).unwrap();
        assert_eq!(
            maps::from_be(d.policy.values().next().unwrap().egress_ip).to_string(),
            "192.0.2.11"
        );
    }

    #[test]
    fn policy_ids_are_stable_and_reused_after_a_policy_goes() {
        let mut ids = PolicyIds::adopt(BTreeMap::from([(7, "old".to_owned())]));
        let a = [
            entry("10.0.0.1", "1.0.0.0/8", "none", None, "old"),
            entry("10.0.0.1", "2.0.0.0/8", "none", None, "new"),
        ];
        let d = desired(&a, &[], &host(), &mut ids).unwrap();
        let by_name: BTreeMap<String, u32> = d.names.iter().map(|(id, n)| (n.as_str(), *id)).collect();
        assert_eq!(
            by_name,
            BTreeMap::from([("new".to_owned(), 1), ("old".to_owned(), 7)])
        );
        let d = desired(&a[1..], &[], &host(), &mut ids).unwrap();
        assert_eq!(d.names.keys().copied().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn tunnel_peers_are_the_pods_nodes_and_the_gateways_used() {
        let mut served = entry(
            "10.244.2.10",
            "203.0.113.0/24",
            "192.0.2.11",
            Some("192.0.2.101"),
            "a",
        );
        served.source_node_ip = Some("192.0.2.12".parse().unwrap());
        let entries = [
            served,
            // A local pod using this node as its gateway: no outer source is accepted for it.
            entry(
                "10.244.1.11",
                "203.0.113.0/24",
                "192.0.2.11",
                Some("192.0.2.101"),
                "a",
            ),
            // A local pod using another gateway.
            entry("10.244.1.10", "198.51.100.0/24", "192.0.2.13", None, "b"),
            entry("10.244.1.12", "198.51.100.0/24", "none", None, "c"),
        ];
        let d = desired(&entries, &[], &host(), &mut PolicyIds::default()).unwrap();
        let peers: BTreeMap<String, u32> = d
            .peers
            .iter()
            .map(|(ip, f)| (maps::from_be(*ip).to_string(), *f))
            .collect();
        assert_eq!(
            peers,
            BTreeMap::from([
                ("192.0.2.12".to_owned(), maps::PEER_SOURCE),
                ("192.0.2.13".to_owned(), maps::PEER_GATEWAY),
            ])
        );
        let value = |s: &str, d2: &str| d.policy[&PolicyKeyV4::new(s.parse().unwrap(), d2.parse().unwrap())];
        assert_eq!(
            maps::from_be(value("10.244.2.10", "203.0.113.0/24").peer_ip).to_string(),
            "192.0.2.12"
        );
        assert_eq!(value("10.244.1.11", "203.0.113.0/24").peer_ip, 0);
        assert_eq!(value("10.244.1.10", "198.51.100.0/24").peer_ip, 0);
    }

    #[test]
    fn ipv6_entries_fail_closed_under_drop_and_pass_otherwise() {
        let guarded: Vec<IpNet> = vec!["2001:db8::/32".parse().unwrap()];
        let entries = [
            // A Drop policy's destination, steered to a gateway: dropped until IPv6 is steered.
            entry("fd00::10", "2001:db8::/32", "192.0.2.12", None, "drop"),
            entry("fd00::10", "2001:db8:1::/48", "excluded", None, "drop"),
            // No gateway: Drop drops, Fallback passes.
            entry("fd00::11", "2001:db8::/32", "none", None, "drop"),
            entry("fd00::12", "2001:db9::/32", "fallback", None, "fallback"),
            // A Fallback policy with a gateway: its destination is no Drop policy's.
            entry("fd00::13", "2001:dba::/32", "192.0.2.12", None, "fallback"),
        ];
        let d = desired(&entries, &guarded, &host(), &mut PolicyIds::default()).unwrap();
        let action = |s: &str, dst: &str| {
            d.v6[&maps::EntryKeyV6::new(s.parse().unwrap(), dst.parse().unwrap())].action
        };
        assert_eq!(action("fd00::10", "2001:db8::/32"), maps::V6_DROP);
        assert_eq!(action("fd00::10", "2001:db8:1::/48"), maps::V6_PASS);
        assert_eq!(action("fd00::11", "2001:db8::/32"), maps::V6_DROP);
        assert_eq!(action("fd00::12", "2001:db9::/32"), maps::V6_PASS);
        assert_eq!(action("fd00::13", "2001:dba::/32"), maps::V6_PASS);
        // Every IPv6 entry is still reported as not steered, with what happens to its traffic.
        assert_eq!(d.entry_errors.len(), 5);
        assert!(
            d.entry_errors[0]
                .message
                .contains("dropped under failurePolicy Drop")
        );
        // Counted under the policy's name.
        let drop_id = d.v6
            [&maps::EntryKeyV6::new("fd00::10".parse().unwrap(), "2001:db8::/32".parse().unwrap())]
            .policy_id;
        assert_eq!(d.names[&drop_id].as_str(), "drop");
        assert!(d.policy.is_empty(), "nothing IPv6 in the IPv4 maps");

        // An IPv4 entry whose gateway has only an IPv6 address: dropped under Drop, the normal
        // path under Fallback, reported either way.
        let guarded: Vec<IpNet> = vec!["203.0.113.0/24".parse().unwrap()];
        let entries = [
            entry("10.244.1.10", "203.0.113.0/24", "fd00::12", None, "drop"),
            entry("10.244.1.10", "198.51.100.0/24", "fd00::12", None, "fallback"),
        ];
        let d = desired(&entries, &guarded, &host(), &mut PolicyIds::default()).unwrap();
        let key = PolicyKeyV4::new("10.244.1.10".parse().unwrap(), "203.0.113.0/24".parse().unwrap());
        assert_eq!(d.policy[&key].kind, maps::KIND_NONE);
        assert_eq!(d.policy.len(), 1);
        assert_eq!(d.entry_errors.len(), 2);
    }
}
