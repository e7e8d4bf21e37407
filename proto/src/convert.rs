//! The one conversion each way between the plan's types ([`sluice_core::plan`]) and the wire
//! messages of [`crate::v2`]. The operator encodes what the planner made; the shim decodes into
//! the same types, which its map writer takes.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnet::IpNet;

use crate::{
    plan::{EgressEntry, EntryKey, GatewayDuty, GatewaySlotRef, GatewayTarget, Guard},
    v2,
};

/// A wire message that does not hold what its fields promise.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {field}: {problem}")]
pub struct BadField {
    pub field: &'static str,
    pub problem: String,
}

fn bad(field: &'static str, problem: impl Into<String>) -> BadField {
    BadField {
        field,
        problem: problem.into(),
    }
}

/// An address as it goes on the wire: its network-order octets.
pub fn ip_to_wire(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// An address from the wire: 4 or 16 octets, nothing else.
pub fn ip_from_wire(field: &'static str, octets: &[u8]) -> Result<IpAddr, BadField> {
    if let Ok(v4) = <[u8; 4]>::try_from(octets) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(octets) {
        return Ok(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    Err(bad(
        field,
        format!("{} octets (an address has 4 or 16)", octets.len()),
    ))
}

pub fn prefix_to_wire(net: IpNet) -> v2::Prefix {
    v2::Prefix {
        address: ip_to_wire(net.addr()),
        length: u32::from(net.prefix_len()),
    }
}

/// A prefix from the wire: a valid length for its address family, and no host bits set (the
/// operator sends prefixes as the planner normalised them; anything else is a broken peer).
pub fn prefix_from_wire(field: &'static str, prefix: Option<&v2::Prefix>) -> Result<IpNet, BadField> {
    let prefix = prefix.ok_or_else(|| bad(field, "missing"))?;
    let addr = ip_from_wire(field, &prefix.address)?;
    let len = u8::try_from(prefix.length).map_err(|_| bad(field, format!("length {}", prefix.length)))?;
    let net = IpNet::new(addr, len).map_err(|_| bad(field, format!("{addr}/{}", prefix.length)))?;
    if net.trunc() != net {
        return Err(bad(field, format!("{net} has host bits set")));
    }
    Ok(net)
}

pub fn ips_from_wire(field: &'static str, list: &[Vec<u8>]) -> Result<Vec<IpAddr>, BadField> {
    list.iter().map(|ip| ip_from_wire(field, ip)).collect()
}

pub fn prefixes_from_wire(field: &'static str, list: &[v2::Prefix]) -> Result<Vec<IpNet>, BadField> {
    list.iter().map(|p| prefix_from_wire(field, Some(p))).collect()
}

impl From<&EntryKey> for v2::EntryKey {
    fn from(k: &EntryKey) -> Self {
        v2::EntryKey {
            source: ip_to_wire(k.source),
            destination: Some(prefix_to_wire(k.destination)),
        }
    }
}

impl TryFrom<&v2::EntryKey> for EntryKey {
    type Error = BadField;
    fn try_from(k: &v2::EntryKey) -> Result<Self, BadField> {
        Ok(EntryKey {
            source: ip_from_wire("source", &k.source)?,
            destination: prefix_from_wire("destination", k.destination.as_ref())?,
        })
    }
}

impl From<GatewaySlotRef> for v2::GatewaySlot {
    fn from(s: GatewaySlotRef) -> Self {
        v2::GatewaySlot {
            entry: s.entry,
            slot: s.slot,
        }
    }
}

impl From<&v2::GatewaySlot> for GatewaySlotRef {
    fn from(s: &v2::GatewaySlot) -> Self {
        GatewaySlotRef {
            entry: s.entry,
            slot: s.slot,
        }
    }
}

/// The policy names of one plan or delta being encoded, each once: entries carry an index.
#[derive(Debug, Default)]
pub struct PolicyNames {
    names: Vec<String>,
    index: HashMap<Arc<str>, u32>,
}

impl PolicyNames {
    fn index_of(&mut self, name: &Arc<str>) -> u32 {
        if let Some(i) = self.index.get(name) {
            return *i;
        }
        let i = u32::try_from(self.names.len()).expect("fewer than 2^32 policies in one plan");
        self.names.push(name.to_string());
        self.index.insert(name.clone(), i);
        i
    }

    /// The list the entries' indexes refer to.
    pub fn into_wire(self) -> Vec<String> {
        self.names
    }
}

/// Encodes an entry, its policy named through `policies`.
pub fn entry_to_wire(e: &EgressEntry, policies: &mut PolicyNames) -> v2::Entry {
    use v2::entry::Target;
    let target = match e.gateway {
        GatewayTarget::Node(ip) => Target::Gateway(v2::Hop {
            node: ip_to_wire(ip),
            slot: e.gateway_slot.map(v2::GatewaySlot::from),
        }),
        GatewayTarget::None => Target::None(v2::NoGateway {}),
        GatewayTarget::Fallback => Target::Fallback(v2::Fallback {}),
        GatewayTarget::Excluded => Target::Excluded(v2::Excluded {}),
    };
    v2::Entry {
        key: Some(v2::EntryKey::from(&e.key)),
        target: Some(target),
        egress_ip: e.egress_ip.map(ip_to_wire),
        interface: e.interface.as_deref().map(str::to_owned),
        source_node_ip: e.source_node_ip.map(ip_to_wire),
        policy: policies.index_of(&e.policy),
    }
}

/// The policy names of a received plan or delta, shared by all its entries.
pub fn policies_from_wire(names: &[String]) -> Vec<Arc<str>> {
    names.iter().map(|n| Arc::from(n.as_str())).collect()
}

/// Decodes an entry; `policies` is what [`policies_from_wire`] made of its plan's or delta's list.
pub fn entry_from_wire(e: &v2::Entry, policies: &[Arc<str>]) -> Result<EgressEntry, BadField> {
    use v2::entry::Target;
    let key = EntryKey::try_from(e.key.as_ref().ok_or_else(|| bad("entry key", "missing"))?)?;
    let (gateway, gateway_slot) = match e.target.as_ref().ok_or_else(|| bad("target", "missing"))? {
        Target::Gateway(hop) => (
            GatewayTarget::Node(ip_from_wire("gateway", &hop.node)?),
            hop.slot.as_ref().map(GatewaySlotRef::from),
        ),
        Target::None(_) => (GatewayTarget::None, None),
        Target::Fallback(_) => (GatewayTarget::Fallback, None),
        Target::Excluded(_) => (GatewayTarget::Excluded, None),
    };
    let policy = policies
        .get(e.policy as usize)
        .ok_or_else(|| {
            bad(
                "policy",
                format!("index {} of {} policies", e.policy, policies.len()),
            )
        })?
        .clone();
    Ok(EgressEntry {
        key,
        gateway,
        egress_ip: e
            .egress_ip
            .as_deref()
            .map(|ip| ip_from_wire("egress IP", ip))
            .transpose()?,
        interface: e.interface.as_deref().map(Arc::from),
        source_node_ip: e
            .source_node_ip
            .as_deref()
            .map(|ip| ip_from_wire("source node IP", ip))
            .transpose()?,
        gateway_slot,
        policy,
    })
}

impl From<&Guard> for v2::Guard {
    fn from(g: &Guard) -> Self {
        v2::Guard {
            destinations: g.destinations.iter().copied().map(prefix_to_wire).collect(),
            decided_pods: g.decided_pods.iter().copied().map(ip_to_wire).collect(),
        }
    }
}

impl TryFrom<&v2::Guard> for Guard {
    type Error = BadField;
    fn try_from(g: &v2::Guard) -> Result<Self, BadField> {
        Ok(Guard {
            destinations: prefixes_from_wire("guarded destination", &g.destinations)?,
            decided_pods: ips_from_wire("decided pod", &g.decided_pods)?,
        })
    }
}

impl From<&GatewayDuty> for v2::GatewayDuty {
    fn from(d: &GatewayDuty) -> Self {
        v2::GatewayDuty {
            policy: d.policy.to_string(),
            egress_ips: d.egress_ips.iter().copied().map(ip_to_wire).collect(),
            interface: d.interface.as_deref().map(str::to_owned),
            managed: d.managed,
            awaiting_release: d.awaiting_release,
        }
    }
}

impl TryFrom<&v2::GatewayDuty> for GatewayDuty {
    type Error = BadField;
    fn try_from(d: &v2::GatewayDuty) -> Result<Self, BadField> {
        Ok(GatewayDuty {
            policy: d.policy.as_str().into(),
            egress_ips: ips_from_wire("egress IP", &d.egress_ips)?,
            interface: d.interface.as_deref().map(Arc::from),
            managed: d.managed,
            awaiting_release: d.awaiting_release,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(gateway: GatewayTarget) -> EgressEntry {
        EgressEntry {
            key: EntryKey {
                source: "10.0.0.1".parse().unwrap(),
                destination: "1.1.1.0/24".parse().unwrap(),
            },
            gateway,
            egress_ip: Some("192.168.101.1".parse().unwrap()),
            interface: Some("eth1".into()),
            source_node_ip: Some("192.168.1.2".parse().unwrap()),
            gateway_slot: Some(GatewaySlotRef { entry: 1, slot: 2 }),
            policy: "p".into(),
        }
    }

    #[test]
    fn entries_round_trip_through_the_wire_form() {
        let mut names = PolicyNames::default();
        let targets = [
            GatewayTarget::Node("192.168.1.1".parse().unwrap()),
            GatewayTarget::Node("fd00::1".parse().unwrap()),
            GatewayTarget::None,
            GatewayTarget::Fallback,
            GatewayTarget::Excluded,
        ];
        let wire: Vec<v2::Entry> = targets
            .iter()
            .map(|t| entry_to_wire(&entry(*t), &mut names))
            .collect();
        let names = policies_from_wire(&names.into_wire());
        assert_eq!(names.len(), 1, "one name for all entries of one policy");
        for (t, w) in targets.iter().zip(&wire) {
            let mut want = entry(*t);
            if !matches!(t, GatewayTarget::Node(_)) {
                // Only a hop to a gateway has a slot.
                want.gateway_slot = None;
            }
            assert_eq!(entry_from_wire(w, &names).unwrap(), want);
        }
    }

    #[test]
    fn malformed_fields_are_refused_by_name() {
        let mut names = PolicyNames::default();
        let good = entry_to_wire(&entry(GatewayTarget::None), &mut names);
        let names = policies_from_wire(&names.into_wire());
        let check = |e: v2::Entry, field: &str| {
            let err = entry_from_wire(&e, &names).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        };
        check(
            v2::Entry {
                target: None,
                ..good.clone()
            },
            "target",
        );
        check(
            v2::Entry {
                policy: 1,
                ..good.clone()
            },
            "policy",
        );
        check(
            v2::Entry {
                egress_ip: Some(vec![1, 2, 3]),
                ..good.clone()
            },
            "egress IP",
        );
        let mut e = good.clone();
        e.key.as_mut().unwrap().source = vec![10; 5];
        check(e, "source");
        for (address, length) in [
            (vec![1, 1, 1, 1], 24),
            (vec![1, 1, 1, 0], 33),
            (vec![1, 1, 1, 0], 300),
        ] {
            let mut e = good.clone();
            e.key.as_mut().unwrap().destination = Some(v2::Prefix { address, length });
            check(e, "destination");
        }
        let mut e = good;
        e.key = None;
        check(e, "entry key");
    }

    #[test]
    fn guard_and_duties_round_trip() {
        let g = Guard {
            destinations: vec!["1.1.1.0/24".parse().unwrap(), "fd00:1::/64".parse().unwrap()],
            decided_pods: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        };
        assert_eq!(Guard::try_from(&v2::Guard::from(&g)).unwrap(), g);
        let d = GatewayDuty {
            policy: "p".into(),
            egress_ips: vec!["203.0.113.1".parse().unwrap()],
            interface: Some("eth1".into()),
            managed: true,
            awaiting_release: true,
        };
        assert_eq!(GatewayDuty::try_from(&v2::GatewayDuty::from(&d)).unwrap(), d);
    }
}
