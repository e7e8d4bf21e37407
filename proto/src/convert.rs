//! Between the plan document's types and the wire messages of [`crate::v1`].

use std::net::IpAddr;

use ipnet::IpNet;

use crate::{EntryDoc, GatewayDuty, GatewayTarget, v1};

/// A wire message that does not hold what its fields promise.
#[derive(Debug, thiserror::Error)]
#[error("invalid {field} {value:?}")]
pub struct BadField {
    pub field: &'static str,
    pub value: String,
}

fn parse<T: std::str::FromStr>(field: &'static str, value: &str) -> Result<T, BadField> {
    value.parse().map_err(|_| BadField {
        field,
        value: value.to_owned(),
    })
}

impl From<&EntryDoc> for v1::Entry {
    fn from(e: &EntryDoc) -> Self {
        v1::Entry {
            source: e.source.to_string(),
            destination: e.destination.to_string(),
            gateway: e.gateway.to_string(),
            egress_ip: e.egress_ip.map(|ip| ip.to_string()),
            interface: e.interface.clone(),
            source_node_ip: e.source_node_ip.map(|ip| ip.to_string()),
            gateway_entry: e.gateway_slot.map(|s| s.entry),
            gateway_slot: e.gateway_slot.map(|s| s.slot),
            policy: e.policy.clone(),
        }
    }
}

impl TryFrom<&v1::Entry> for EntryDoc {
    type Error = BadField;
    fn try_from(e: &v1::Entry) -> Result<Self, BadField> {
        Ok(EntryDoc {
            source: parse("source", &e.source)?,
            destination: parse::<IpNet>("destination", &e.destination)?,
            gateway: parse::<GatewayTarget>("gateway", &e.gateway)?,
            egress_ip: e
                .egress_ip
                .as_deref()
                .map(|v| parse("egress IP", v))
                .transpose()?,
            interface: e.interface.clone(),
            source_node_ip: e
                .source_node_ip
                .as_deref()
                .map(|v| parse("source node IP", v))
                .transpose()?,
            // Advisory (nothing forwards by it): half of it is as good as none.
            gateway_slot: e
                .gateway_entry
                .zip(e.gateway_slot)
                .map(|(entry, slot)| crate::GatewaySlotDoc { entry, slot }),
            policy: e.policy.clone(),
        })
    }
}

/// The key of an entry: (source, destination).
pub type EntryKey = (IpAddr, IpNet);

impl TryFrom<&v1::EntryKey> for (IpAddr, IpNet) {
    type Error = BadField;
    fn try_from(k: &v1::EntryKey) -> Result<Self, BadField> {
        Ok((parse("source", &k.source)?, parse("destination", &k.destination)?))
    }
}

impl From<&crate::Guard> for v1::Guard {
    fn from(g: &crate::Guard) -> Self {
        v1::Guard {
            destinations: g.destinations.iter().map(ToString::to_string).collect(),
            decided_pods: g.decided_pods.iter().map(ToString::to_string).collect(),
        }
    }
}

impl TryFrom<&v1::Guard> for crate::Guard {
    type Error = BadField;
    fn try_from(g: &v1::Guard) -> Result<Self, BadField> {
        Ok(crate::Guard {
            destinations: g
                .destinations
                .iter()
                .map(|c| parse("guarded destination", c))
                .collect::<Result<_, _>>()?,
            decided_pods: g
                .decided_pods
                .iter()
                .map(|ip| parse("decided pod", ip))
                .collect::<Result<_, _>>()?,
        })
    }
}

impl From<&GatewayDuty> for v1::GatewayDuty {
    fn from(d: &GatewayDuty) -> Self {
        v1::GatewayDuty {
            policy: d.policy.clone(),
            egress_ips: d.egress_ips.iter().map(ToString::to_string).collect(),
            interface: d.interface.clone(),
        }
    }
}

impl TryFrom<&v1::GatewayDuty> for GatewayDuty {
    type Error = BadField;
    fn try_from(d: &v1::GatewayDuty) -> Result<Self, BadField> {
        Ok(GatewayDuty {
            policy: d.policy.clone(),
            egress_ips: d
                .egress_ips
                .iter()
                .map(|ip| parse("egress IP", ip))
                .collect::<Result<_, _>>()?,
            interface: d.interface.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_the_wire_form() {
        let e = EntryDoc {
            source: "10.0.0.1".parse().unwrap(),
            destination: "1.1.1.0/24".parse().unwrap(),
            gateway: GatewayTarget::Node("192.168.1.1".parse().unwrap()),
            egress_ip: Some("192.168.101.1".parse().unwrap()),
            interface: Some("eth1".into()),
            source_node_ip: Some("192.168.1.2".parse().unwrap()),
            gateway_slot: Some(crate::GatewaySlotDoc { entry: 1, slot: 2 }),
            policy: "p".into(),
        };
        let wire = v1::Entry::from(&e);
        assert_eq!(EntryDoc::try_from(&wire).unwrap(), e);
        let bad = v1::Entry {
            gateway: "nowhere".into(),
            ..wire
        };
        assert!(EntryDoc::try_from(&bad).is_err());
    }
}
