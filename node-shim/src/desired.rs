//! From the node's plan entries to the exact map contents and SNAT rules the node must hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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
    /// Global IPv6 addresses, deprecated ones last.
    pub ipv6: Vec<Ipv6Addr>,
    /// The subnet of each address of `ipv6`, in the same order.
    pub ipv6_networks: Vec<ipnet::Ipv6Net>,
}

/// What the desired state depends on besides the plan.
#[derive(Clone, Debug)]
pub struct Host {
    /// This node's underlay IP (IPv6 on an IPv6-only node network): entries whose gateway is
    /// this IP egress here.
    pub node_ip: IpAddr,
    pub interfaces: Vec<Interface>,
    /// The interface of the IPv4 default route, if any.
    pub default_route_interface: Option<String>,
    /// Managed egress IPs of this node's duties that it does not hold (yet), with why: their
    /// entries drop, and say so.
    pub managed_not_held: BTreeMap<IpAddr, String>,
}

/// The desired contents of the maps and the SNAT rules.
#[derive(Debug, Default)]
pub struct Desired {
    pub policy: BTreeMap<PolicyKeyV4, EntryValueV4>,
    pub names: BTreeMap<u32, PolicyName>,
    /// Egress IP -> the egress ids that SNAT (IPv6: NAT66) to it here.
    pub snat: crate::nat::Snat,
    /// Interfaces replies to egress IPs arrive on (their rp_filter is relaxed).
    pub egress_interfaces: BTreeSet<String>,
    /// Egress id -> (name, ifindex) of the interface its SNATed traffic must leave by.
    pub egress_routes: BTreeMap<u32, (String, u32)>,
    /// Underlay IP (network byte order) of every node this node exchanges tunnel traffic with
    /// -> `maps::PEER_*`: the nodes whose pods it serves, and the gateways of its own pods.
    pub peers: BTreeMap<u32, u32>,
    /// The same for nodes reached over an IPv6 underlay.
    pub peers_v6: BTreeMap<maps::AddrV6, u32>,
    /// Entries that could not be honoured; they are programmed to drop (fail closed).
    pub problems: Vec<Error>,
    /// IPv4 entries the datapath cannot steer: their gateway has only an IPv6 underlay address.
    pub over_ipv6_underlay: usize,
    /// The IPv6 entries.
    pub v6: BTreeMap<maps::EntryKeyV6, maps::EntryV6>,
    /// Every entry that is not programmed as planned, with why: reported to the operator.
    pub entry_errors: Vec<EntryProblem>,
}

impl Desired {
    /// Adds `flags` to the tunnel peer `node` (an underlay address of either family).
    fn add_peer(&mut self, node: IpAddr, flags: u32) {
        match node {
            IpAddr::V4(v4) => *self.peers.entry(maps::be(v4)).or_default() |= flags,
            IpAddr::V6(_) => *self.peers_v6.entry(maps::AddrV6::underlay(node)).or_default() |= flags,
        }
    }
}

/// One plan entry the datapath does not hold as planned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryProblem {
    pub key: EntryKey,
    pub message: String,
}

/// Why IPv4 entries whose gateway has only an IPv6 underlay address are not programmed.
pub const OVER_IPV6_UNDERLAY: &str = "IPv4 traffic is not steered to a gateway reached over an IPv6 underlay: \
     this entry's traffic is dropped under failurePolicy Drop, and takes the normal path under Fallback";

/// Stable numbering of policies (the id is in counters and policy names) and of the egresses,
/// (address, interface) pairs, this node SNATs to (the egress id is in packet and conntrack
/// marks: it picks the SNAT rule and the egress route).
#[derive(Clone, Debug)]
pub struct PolicyIds {
    by_name: BTreeMap<String, u32>,
    egresses: BTreeMap<(IpAddr, u32), u32>,
    /// Ids a previous run gave egress addresses (interface unknown), preferred for them.
    adopted_egresses: BTreeMap<IpAddr, u32>,
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
    pub fn with_egresses(mut self, adopted: BTreeMap<IpAddr, u32>, max_egress: u32) -> Self {
        self.adopted_egresses = adopted
            .into_iter()
            .filter(|(_, id)| (1..=max_egress).contains(id))
            .collect();
        self.max_egress = max_egress;
        self
    }

    /// The egress id of (`ip`, `ifindex`): kept while used, else the adopted one, else the
    /// lowest free one.
    fn egress_id(&mut self, ip: IpAddr, ifindex: u32, policy: &str) -> Result<u32, Error> {
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
    fn retain_egresses(&mut self, keep: &BTreeSet<(IpAddr, u32)>) {
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
    let used_egresses: BTreeSet<(IpAddr, u32)> = entries
        .clone()
        .filter(|e| e.gateway == GatewayTarget::Node(host.node_ip))
        .filter_map(|e| match (e.key.source, e.key.destination) {
            (IpAddr::V4(_), IpNet::V4(_)) => egress(e, host).ok().map(|(ip, i)| (IpAddr::V4(ip), i.index)),
            (IpAddr::V6(_), IpNet::V6(_)) => egress_v6(e, host).ok().map(|(ip, i)| (IpAddr::V6(ip), i.index)),
            _ => None,
        })
        .collect();
    ids.retain_egresses(&used_egresses);

    for entry in entries {
        let problem = |message: String| EntryProblem {
            key: entry.key,
            message,
        };
        let EntryKey { source, destination } = entry.key;
        let (IpAddr::V4(source), IpNet::V4(destination)) = (source, destination) else {
            if let (IpAddr::V6(source), IpNet::V6(destination)) = (source, destination) {
                let value = entry_v6(entry, host, ids, &mut out)?;
                out.v6.insert(maps::EntryKeyV6::new(source, destination), value);
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
                out.over_ipv6_underlay += 1;
                out.entry_errors.push(problem(OVER_IPV6_UNDERLAY.to_owned()));
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
                if IpAddr::V4(gateway) != host.node_ip {
                    *out.peers.entry(value.gateway_ip).or_default() |= maps::PEER_GATEWAY;
                }
                if IpAddr::V4(gateway) == host.node_ip {
                    value.flags |= maps::F_LOCAL_GATEWAY;
                    // Without an IPv4 source node (a local pod, or an IPv6 underlay, not
                    // supported yet) the tunnel accepts this entry from nobody.
                    if let Some(IpAddr::V4(peer)) = entry.source_node_ip
                        && IpAddr::V4(peer) != host.node_ip
                    {
                        value.peer_ip = maps::be(peer);
                        *out.peers.entry(value.peer_ip).or_default() |= maps::PEER_SOURCE;
                    }
                    let egress = egress(entry, host).and_then(|(ip, interface)| {
                        let id = ids.egress_id(IpAddr::V4(ip), interface.index, &entry.policy)?;
                        Ok((ip, interface, id))
                    });
                    match egress {
                        Ok((ip, interface, id)) => {
                            value.egress_ip = maps::be(ip);
                            value.egress_id = id;
                            out.snat.v4.entry(ip).or_default().insert(id);
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

/// The egress interface an entry names, if it names one (an error when the node has none of
/// that name).
fn named_interface<'h>(entry: &EgressEntry, host: &'h Host) -> Result<Option<&'h Interface>, Error> {
    let Some(name) = entry.interface.as_deref() else {
        return Ok(None);
    };
    host.interfaces
        .iter()
        .find(|i| i.name == name)
        .map(Some)
        .ok_or_else(|| Error::EgressInterfaceMissing {
            interface: name.to_owned(),
            policy: entry.policy.to_string(),
        })
}

fn default_route_interface(host: &Host) -> Option<&Interface> {
    let name = host.default_route_interface.as_ref()?;
    host.interfaces.iter().find(|i| &i.name == name)
}

/// What an IPv6 entry does (the same rules as IPv4's, with the whole target in the value).
fn entry_v6(
    entry: &EgressEntry,
    host: &Host,
    ids: &mut PolicyIds,
    out: &mut Desired,
) -> Result<maps::EntryV6, Error> {
    let problem = |message: String| EntryProblem {
        key: entry.key,
        message,
    };
    let policy_id = ids.id(&entry.policy)?;
    out.names.insert(policy_id, PolicyName::new(&entry.policy));
    let mut value = maps::EntryV6 {
        policy_id,
        ..Default::default()
    };
    match entry.gateway {
        GatewayTarget::None => value.kind = maps::KIND_NONE,
        GatewayTarget::Fallback => value.kind = maps::KIND_FALLBACK,
        GatewayTarget::Excluded => value.kind = maps::KIND_EXCLUDED,
        // The gateway over an underlay of either family.
        GatewayTarget::Node(gateway) => {
            value.kind = maps::KIND_GATEWAY;
            value.gateway = maps::AddrV6::underlay(gateway);
            if gateway != host.node_ip {
                out.add_peer(gateway, maps::PEER_GATEWAY);
                return Ok(value);
            }
            value.flags |= maps::F_LOCAL_GATEWAY;
            if let Some(peer) = entry.source_node_ip
                && peer != host.node_ip
            {
                value.peer = maps::AddrV6::underlay(peer);
                out.add_peer(peer, maps::PEER_SOURCE);
            }
            let egress = egress_v6(entry, host).and_then(|(ip, interface)| {
                let id = ids.egress_id(IpAddr::V6(ip), interface.index, &entry.policy)?;
                Ok((ip, interface, id))
            });
            match egress {
                Ok((ip, interface, id)) => {
                    value.egress_ip = ip.into();
                    value.egress_id = id;
                    out.snat.v6.entry(ip).or_default().insert(id);
                    out.egress_interfaces.insert(interface.name.clone());
                    out.egress_routes
                        .insert(id, (interface.name.clone(), interface.index));
                }
                // egress_ip stays zero: the datapath drops (counted), never leaks.
                Err(e) => {
                    out.entry_errors.push(problem(e.to_string()));
                    if !out.problems.iter().any(|p| p.to_string() == e.to_string()) {
                        out.problems.push(e);
                    }
                }
            }
        }
    }
    Ok(value)
}

/// The IPv6 egress IP and interface of an IPv6 entry whose gateway is this node: the entry's
/// IPv6 egress IP, else the first (preferred) global IPv6 address of its interface or of the
/// default-route interface.
fn egress_v6<'h>(entry: &EgressEntry, host: &'h Host) -> Result<(Ipv6Addr, &'h Interface), Error> {
    let policy = || entry.policy.to_string();
    let wanted = match entry.egress_ip {
        Some(IpAddr::V6(ip)) => Some(ip),
        Some(ip @ IpAddr::V4(_)) => return Err(Error::EgressIpWrongFamily { ip, policy: policy() }),
        None => None,
    };
    egress_among(
        entry,
        host,
        wanted,
        |i| &i.ipv6,
        |ip| not_held(host, IpAddr::V6(ip), policy()),
        || Error::NoDefaultEgressIpV6 { policy: policy() },
    )
}

/// The egress IP and interface of an entry whose gateway is this node.
fn egress<'h>(entry: &EgressEntry, host: &'h Host) -> Result<(Ipv4Addr, &'h Interface), Error> {
    let policy = || entry.policy.to_string();
    let wanted = match entry.egress_ip {
        Some(IpAddr::V4(ip)) => Some(ip),
        Some(ip @ IpAddr::V6(_)) => return Err(Error::EgressIpWrongFamily { ip, policy: policy() }),
        None => None,
    };
    egress_among(
        entry,
        host,
        wanted,
        |i| &i.ipv4,
        |ip| not_held(host, IpAddr::V4(ip), policy()),
        || Error::NoDefaultEgressIp { policy: policy() },
    )
}

/// Why egress IP `ip`, which no interface holds, cannot be used: a managed one's reason, else
/// that it is not local.
fn not_held(host: &Host, ip: IpAddr, policy: String) -> Error {
    match host.managed_not_held.get(&ip) {
        Some(why) => Error::ManagedEgressIpNotHeld {
            ip,
            policy,
            why: why.clone(),
        },
        None => Error::EgressIpNotLocal { ip, policy },
    }
}

/// The egress of one family: `wanted` on the interface holding it (or the one the entry names),
/// else the first address (`addresses`) of the entry's interface or the default-route one.
fn egress_among<'h, A: Copy + PartialEq>(
    entry: &EgressEntry,
    host: &'h Host,
    wanted: Option<A>,
    addresses: impl Fn(&Interface) -> &Vec<A>,
    not_held: impl FnOnce(A) -> Error,
    no_default: impl Fn() -> Error,
) -> Result<(A, &'h Interface), Error> {
    let named = named_interface(entry, host)?;
    match wanted {
        Some(ip) => {
            let holder = host
                .interfaces
                .iter()
                .find(|i| addresses(i).contains(&ip))
                .ok_or_else(|| not_held(ip))?;
            Ok((ip, named.unwrap_or(holder)))
        }
        None => {
            let interface = named
                .or_else(|| default_route_interface(host))
                .ok_or_else(&no_default)?;
            let ip = *addresses(interface).first().ok_or_else(no_default)?;
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

    fn value_of(d: &Desired, source: &str, destination: &str) -> maps::EntryV6 {
        d.v6[&maps::EntryKeyV6::new(source.parse().unwrap(), destination.parse().unwrap())]
    }

    fn host() -> Host {
        Host {
            node_ip: "192.0.2.11".parse().unwrap(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                index: 2,
                ipv4: vec!["192.0.2.11".parse().unwrap(), "192.0.2.101".parse().unwrap()],
                ipv4_networks: vec!["192.0.2.0/24".parse().unwrap(); 2],
                ipv6: vec![
                    "fd00:192:0:2::11".parse().unwrap(),
                    "fd00:192:0:2::101".parse().unwrap(),
                ],
                ipv6_networks: vec!["fd00:192:0:2::/64".parse().unwrap(); 2],
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
        assert_eq!(d.over_ipv6_underlay, 0);
        assert_eq!(d.v6.len(), 1, "IPv6 in its own map");
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
        assert_eq!(d.snat.v4.len(), 1);
        assert_eq!(
            d.snat.v4[&"192.0.2.101".parse::<Ipv4Addr>().unwrap()],
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
        let id = |d: &Desired, ip: &str| d.snat.v4.get(&ip.parse::<Ipv4Addr>().unwrap()).cloned();
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
        let id = |d: &Desired, ip: &str| d.snat.v4[&ip.parse::<Ipv4Addr>().unwrap()].clone();
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
    fn ipv6_entries_steer_like_ipv4_with_the_whole_target_in_the_value() {
        let guarded: Vec<IpNet> = vec!["2001:db8::/32".parse().unwrap()];
        let with_peer = |mut e: EgressEntry, peer: &str| {
            e.source_node_ip = Some(peer.parse().unwrap());
            e
        };
        let entries = [
            // A pod of this node to a remote gateway (IPv4 underlay).
            entry("fd00::10", "2001:db8::/32", "192.0.2.12", None, "drop"),
            entry("fd00::10", "2001:db8:1::/48", "excluded", None, "drop"),
            entry("fd00::11", "2001:db8::/32", "none", None, "drop"),
            entry("fd00::12", "2001:db9::/32", "fallback", None, "fallback"),
            // A pod of another node through this node, with its IPv6 egress IP.
            with_peer(
                entry(
                    "fd00:2::10",
                    "2001:db8::/32",
                    "192.0.2.11",
                    Some("fd00:192:0:2::101"),
                    "drop",
                ),
                "192.0.2.12",
            ),
            // No egress IP named: the default-route interface's first IPv6 address.
            entry("fd00::13", "2001:dba::/32", "192.0.2.11", None, "local"),
        ];
        let d = desired(&entries, &guarded, &host(), &mut PolicyIds::default()).unwrap();
        let value =
            |s: &str, dst: &str| d.v6[&maps::EntryKeyV6::new(s.parse().unwrap(), dst.parse().unwrap())];
        let underlay = |ip: &str| maps::AddrV6::underlay(ip.parse().unwrap());
        let remote = value("fd00::10", "2001:db8::/32");
        assert_eq!((remote.kind, remote.flags), (maps::KIND_GATEWAY, 0));
        assert_eq!(remote.gateway, underlay("192.0.2.12"));
        assert_eq!(remote.gateway.to_underlay(), Some("192.0.2.12".parse().unwrap()));
        assert_eq!(value("fd00::10", "2001:db8:1::/48").kind, maps::KIND_EXCLUDED);
        assert_eq!(value("fd00::11", "2001:db8::/32").kind, maps::KIND_NONE);
        assert_eq!(value("fd00::12", "2001:db9::/32").kind, maps::KIND_FALLBACK);
        let served = value("fd00:2::10", "2001:db8::/32");
        assert_eq!(served.flags, maps::F_LOCAL_GATEWAY);
        assert_eq!(served.egress_ip, underlay("fd00:192:0:2::101"));
        assert_eq!(served.peer, underlay("192.0.2.12"));
        assert_ne!(served.egress_id, 0);
        let own = value("fd00::13", "2001:dba::/32");
        assert_eq!(own.egress_ip, underlay("fd00:192:0:2::11"));
        assert_eq!(own.peer, maps::AddrV6::default(), "a local pod: no tunnel peer");
        // NAT66 rules per egress IP, ids of their own (beside IPv4's, in one numbering).
        assert_eq!(
            d.snat.v6.keys().map(ToString::to_string).collect::<Vec<_>>(),
            ["fd00:192:0:2::11", "fd00:192:0:2::101"]
        );
        assert_ne!(own.egress_id, served.egress_id);
        assert!(d.snat.v4.is_empty());
        // Tunnel peers as for IPv4: the gateway of this node's pods, the node of the pods served.
        assert_eq!(
            d.peers[&maps::be("192.0.2.12".parse().unwrap())],
            maps::PEER_GATEWAY | maps::PEER_SOURCE
        );
        assert!(d.entry_errors.is_empty(), "{:?}", d.entry_errors);
        assert!(d.policy.is_empty(), "nothing IPv6 in the IPv4 maps");
        let drop_id = value("fd00::10", "2001:db8::/32").policy_id;
        assert_eq!(d.names[&drop_id].as_str(), "drop");

        // An IPv6 egress IP this node does not hold, or one of the wrong family: the entry is
        // programmed without one (the datapath drops, counted) and reported.
        let entries = [
            entry(
                "fd00::14",
                "2001:db8::/32",
                "192.0.2.11",
                Some("fd00:192:0:2::99"),
                "drop",
            ),
            entry(
                "fd00::15",
                "2001:db8::/32",
                "192.0.2.11",
                Some("192.0.2.101"),
                "drop",
            ),
            entry(
                "10.244.1.15",
                "203.0.113.0/24",
                "192.0.2.11",
                Some("fd00:192:0:2::101"),
                "drop",
            ),
        ];
        let d = desired(&entries, &guarded, &host(), &mut PolicyIds::default()).unwrap();
        assert_eq!(d.entry_errors.len(), 3, "{:?}", d.entry_errors);
        assert!(
            d.entry_errors
                .iter()
                .any(|e| e.message.contains("fd00:192:0:2::101") && e.message.contains("other family")),
            "an IPv4 entry given an IPv6 egress IP says so: {:?}",
            d.entry_errors
        );
        assert!(
            d.entry_errors[0].message.contains("is not assigned"),
            "{:?}",
            d.entry_errors
        );
        assert!(
            d.entry_errors[1].message.contains("other family"),
            "{:?}",
            d.entry_errors
        );
        assert!(
            d.v6.values()
                .all(|v| v.egress_ip == maps::AddrV6::default() && v.kind == maps::KIND_GATEWAY)
        );
        assert!(d.snat.v6.is_empty());

        // An IPv6 underlay: the gateway's address as it is, its node a tunnel peer of the other
        // map; an IPv4 pod's entry to such a gateway is not steered (fail closed, reported).
        let entries = [
            entry("fd00::16", "2001:db8::/32", "fd00:192:0:2::12", None, "drop"),
            entry("10.244.1.16", "203.0.113.0/24", "fd00:192:0:2::12", None, "drop"),
        ];
        let guarded_both: Vec<IpNet> = vec![
            "2001:db8::/32".parse().unwrap(),
            "203.0.113.0/24".parse().unwrap(),
        ];
        let d = desired(&entries, &guarded_both, &host(), &mut PolicyIds::default()).unwrap();
        let over_v6 = value_of(&d, "fd00::16", "2001:db8::/32");
        assert_eq!(over_v6.kind, maps::KIND_GATEWAY);
        assert_eq!(over_v6.gateway, underlay("fd00:192:0:2::12"));
        assert_eq!(d.peers_v6[&underlay("fd00:192:0:2::12")], maps::PEER_GATEWAY);
        assert!(d.peers.is_empty());
        let key = PolicyKeyV4::new("10.244.1.16".parse().unwrap(), "203.0.113.0/24".parse().unwrap());
        assert_eq!(d.policy[&key].kind, maps::KIND_NONE);
        assert_eq!(d.entry_errors.len(), 1);
        assert!(d.entry_errors[0].message.contains("IPv6 underlay"));

        // This node on an IPv6 underlay, the gateway of a pod of another such node.
        let v6_host = Host {
            node_ip: "fd00:192:0:2::11".parse().unwrap(),
            ..host()
        };
        let mut served = entry(
            "fd00:2::10",
            "2001:db8::/32",
            "fd00:192:0:2::11",
            Some("fd00:192:0:2::101"),
            "drop",
        );
        served.source_node_ip = Some("fd00:192:0:2::12".parse().unwrap());
        let d = desired(&[served], &guarded, &v6_host, &mut PolicyIds::default()).unwrap();
        let here = value_of(&d, "fd00:2::10", "2001:db8::/32");
        assert_eq!(here.flags, maps::F_LOCAL_GATEWAY);
        assert_eq!(here.peer, underlay("fd00:192:0:2::12"));
        assert_eq!(d.peers_v6[&underlay("fd00:192:0:2::12")], maps::PEER_SOURCE);
        assert!(d.entry_errors.is_empty(), "{:?}", d.entry_errors);

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
