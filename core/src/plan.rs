//! The plan document: what every node's datapath must hold, and how every policy fared.
//!
//! The JSON form is a stable interface (documented in `docs/plan-format.md`): fields are only
//! ever added, never renamed or removed, within `v1alpha1`.

use std::{fmt, net::IpAddr, str::FromStr, sync::Arc};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The whole plan: one section per node, one report per policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanDocument {
    /// Nodes in name order; a node with nothing to hold is listed with no entries.
    pub nodes: Vec<NodePlanDoc>,
    /// Policies in name order.
    pub policies: Vec<PolicyReport>,
}

impl PlanDocument {
    /// The section of one node, if the plan names it.
    pub fn node(&self, name: &str) -> Option<&NodePlanDoc> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// The entries one node's datapath must hold, sorted by (source, destination).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlanDoc {
    pub name: String,
    pub entries: Vec<EgressEntry>,
    /// What this node serves as a gateway (empty when it is no policy's gateway), so that its
    /// shim can prepare egress addresses and interfaces before the first packet arrives.
    #[serde(default)]
    pub serves: Vec<GatewayDuty>,
    /// The in-cluster destinations the operator found (pod CIDRs, node addresses, Service
    /// CIDRs): no entry steers traffic to them. The same for every node; the shim adds its own
    /// `--cluster-cidr` and node IP.
    #[serde(rename = "clusterCIDRs", default)]
    pub cluster_cidrs: Vec<IpNet>,
    /// The no-leak guard for new pods: absent, none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<Guard>,
    /// Gateways this node's pods' flows may stay pinned to although their entries now name
    /// another gateway: gateways that still hold those pods' entries after a planned change
    /// (see docs/datapath.md, "Pinned flows"). Empty: a flow follows its entry.
    #[serde(rename = "pinnableGateways", default, skip_serializing_if = "Vec::is_empty")]
    pub pinnable_gateways: Vec<IpAddr>,
}

/// Until the plan decides on a pod, its traffic to what a `failurePolicy: Drop` policy guards is
/// dropped rather than sent by the normal path: the pod may turn out to be selected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Guard {
    /// The destination CIDRs of the accepted Drop policies.
    pub destinations: Vec<IpNet>,
    /// This node's pod IPs the plan has decided on, selected or not.
    pub decided_pods: Vec<IpAddr>,
}

/// One policy this node is an active gateway for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayDuty {
    pub policy: Arc<str>,
    /// The IPv4 and IPv6 source addresses to leave with, when known.
    #[serde(rename = "egressIPs", default)]
    pub egress_ips: Vec<IpAddr>,
    /// The interface to leave by; `null` means the default-route interface (or the one holding
    /// the egress IP).
    pub interface: Option<Arc<str>>,
    /// The egress IPs are Sluice's (`egressIPs`): the node holds them on `interface` and
    /// announces them while it has this duty, and gives them up when it loses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub managed: bool,
    /// A planned move: another node still holds the managed addresses and has been told to give
    /// them up. The node claims them only once a plan without this flag comes (the operator
    /// clears it when that node has acknowledged the release, or is gone).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awaiting_release: bool,
}

/// The key of a datapath entry: source IP (exact) and destination prefix (longest match).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntryKey {
    /// The pod IP (exact match).
    pub source: IpAddr,
    /// The destination prefix (longest prefix wins).
    pub destination: IpNet,
}

/// One datapath entry: traffic from `source` to `destination` goes to `gateway`. The one entry
/// type from the planner to the map writer: the planner makes it, the plan document and the
/// wire carry it, the shim turns it into map keys and values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressEntry {
    #[serde(flatten)]
    pub key: EntryKey,
    pub gateway: GatewayTarget,
    /// Set only on the gateway node's own entries: the address to SNAT to, when known.
    #[serde(rename = "egressIP")]
    pub egress_ip: Option<IpAddr>,
    /// Set only on the gateway node's own entries: the interface to leave by, when the policy
    /// names one (or the shim must find the default-route interface: `null` with no egress IP).
    pub interface: Option<Arc<str>>,
    /// Set only on the gateway node's entries for pods of other nodes: the underlay address of
    /// the pod's node. The gateway accepts tunnelled packets of this (source, destination) from
    /// that address only; absent, it accepts them from nowhere.
    #[serde(rename = "sourceNodeIP", default, skip_serializing_if = "Option::is_none")]
    pub source_node_ip: Option<IpAddr>,
    /// For entries steering to a gateway: the policy's gateway entry and the slot of it the
    /// gateway fills. Both nodes keep it in their datapath, so that after an operator restart
    /// what the datapath holds tells the new leader who fills which slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_slot: Option<GatewaySlotRef>,
    /// The policy this entry comes from.
    pub policy: Arc<str>,
}

/// A gateway entry of a policy (index in its list) and one of its slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GatewaySlotRef {
    pub entry: u32,
    pub slot: u32,
}

/// Where matching traffic goes. Serialized as the gateway node's IP, or one of the markers
/// `"none"`, `"fallback"`, `"excluded"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GatewayTarget {
    /// Steer to this gateway node (its underlay IP).
    Node(IpAddr),
    /// The policy has no usable gateway and `failurePolicy: Drop`: drop the traffic.
    None,
    /// The policy has no usable gateway and `failurePolicy: Fallback`: take the normal path.
    Fallback,
    /// An excluded CIDR: take the normal path.
    Excluded,
}

impl fmt::Display for GatewayTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GatewayTarget::Node(ip) => ip.fmt(f),
            GatewayTarget::None => f.write_str("none"),
            GatewayTarget::Fallback => f.write_str("fallback"),
            GatewayTarget::Excluded => f.write_str("excluded"),
        }
    }
}

/// A gateway value that is neither an IP address nor a known marker.
#[derive(Debug, thiserror::Error)]
#[error("gateway must be an IP address, \"none\", \"fallback\" or \"excluded\", not {0:?}")]
pub struct BadGatewayTarget(String);

impl FromStr for GatewayTarget {
    type Err = BadGatewayTarget;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(GatewayTarget::None),
            "fallback" => Ok(GatewayTarget::Fallback),
            "excluded" => Ok(GatewayTarget::Excluded),
            other => other
                .parse()
                .map(GatewayTarget::Node)
                .map_err(|_| BadGatewayTarget(other.to_owned())),
        }
    }
}

impl Serialize for GatewayTarget {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GatewayTarget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How one policy fared.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    pub name: String,
    pub accepted: bool,
    /// Why the policy is not accepted, or why it has no gateway; `null` when all is well.
    pub reason: Option<String>,
    /// A sentence a user can act on, to go with `reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub gateways: Vec<GatewayReport>,
    pub matched_endpoints: u64,
    /// Other policies that won (source, destination) pairs this one also claims.
    #[serde(default)]
    pub conflicts: Vec<PolicyConflict>,
}

/// A gateway node serving a policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayReport {
    pub node: String,
    pub ip: IpAddr,
    #[serde(rename = "egressIP")]
    pub egress_ip: Option<IpAddr>,
    pub interface: Option<String>,
}

/// This policy lost `entries` (source, destination) pairs to `policy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyConflict {
    pub policy: String,
    pub entries: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_target_round_trips_through_its_string_form() {
        for s in ["10.0.0.1", "fd00::1", "none", "fallback", "excluded"] {
            let t: GatewayTarget = s.parse().unwrap();
            assert_eq!(t.to_string(), s);
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<GatewayTarget>(&json).unwrap(), t);
        }
        assert!("nowhere".parse::<GatewayTarget>().is_err());
    }

    #[test]
    fn entry_uses_the_documented_field_names() {
        let e = EgressEntry {
            key: EntryKey {
                source: "10.0.0.1".parse().unwrap(),
                destination: "1.1.1.0/24".parse().unwrap(),
            },
            gateway: GatewayTarget::Node("192.168.1.1".parse().unwrap()),
            egress_ip: Some("192.168.101.1".parse().unwrap()),
            interface: None,
            source_node_ip: None,
            gateway_slot: None,
            policy: "p".into(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"source": "10.0.0.1", "destination": "1.1.1.0/24",
                "gateway": "192.168.1.1", "egressIP": "192.168.101.1", "interface": null, "policy": "p"})
        );
        let e = EgressEntry {
            source_node_ip: Some("192.168.1.2".parse().unwrap()),
            ..e
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap()["sourceNodeIP"],
            serde_json::json!("192.168.1.2")
        );
    }
}
