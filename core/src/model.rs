//! What the planner knows of the cluster: plain data, filled from Kubernetes objects, manifest
//! files or tests alike.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::{api::EgressGatewayPolicySpec, selector::Labels};

/// A node, as far as egress planning cares.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub name: String,
    pub labels: Labels,
    /// Addresses in order of preference for the tunnel underlay (InternalIP before ExternalIP).
    pub addresses: Vec<IpAddr>,
    /// The node's `Ready` condition.
    pub ready: bool,
    /// Whether the node may serve as a gateway beyond being ready: in the live system, whether
    /// its shim is connected and healthy. Not cordoning: a cordoned node still forwards.
    pub eligible: bool,
    /// Being drained (cordoned, labelled or annotated `sluice.dev/drain`, or being deleted): a
    /// gateway slot goes to another candidate whenever there is one, so the node takes no new
    /// pods; the pods it served keep their open flows on it for a while (lingering entries).
    pub draining: bool,
    /// The node's interfaces, when its shim has reported them. `None` means unknown: the
    /// planner then trusts that the named interface or egress IP exists.
    pub interfaces: Option<Vec<InterfaceInfo>>,
    /// The pod CIDRs allocated to the node (`spec.podCIDRs`): destinations in the cluster.
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeInfo {
    /// The address other nodes tunnel to: the first IPv4 address, else the first address.
    pub fn tunnel_ip(&self) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(IpAddr::is_ipv4)
            .or_else(|| self.addresses.first().copied())
    }
}

/// A network interface of a node.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct InterfaceInfo {
    pub name: String,
    /// Addresses in the order the kernel lists them (the first of a family is the primary).
    pub addresses: Vec<IpAddr>,
    /// The subnets of those addresses (what `egressIPs` are placed by).
    pub networks: Vec<IpNet>,
    /// Whether the default route leaves by this interface.
    pub default_route: bool,
}

/// A namespace's labels.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: Labels,
}

/// The lifecycle phase of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PodPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    pub fn parse(phase: Option<&str>) -> Self {
        match phase {
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            Some("Unknown") => PodPhase::Unknown,
            _ => PodPhase::Pending,
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

/// A pod, as far as egress planning cares.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodInfo {
    /// Identity across renames: a StatefulSet pod that is replaced keeps its name but not its UID.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub node_name: Option<String>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub phase: PodPhase,
}

impl PodInfo {
    /// Whether the pod's traffic can be steered at all: it has its own IPs, on a node, and runs.
    pub fn is_source(&self) -> bool {
        !self.host_network && self.node_name.is_some() && !self.ips.is_empty() && !self.phase.is_finished()
    }
}

/// A policy as the planner receives it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PolicyInput {
    pub name: String,
    pub generation: Option<i64>,
    /// `metadata.creationTimestamp` in seconds since the epoch: older policies win conflicts.
    pub created: Option<i64>,
    pub spec: EgressGatewayPolicySpec,
    /// Gateways that served the policy before. While they stay usable they keep their slot, so
    /// that a recovered or newly added node does not take traffic away from a working gateway
    /// and break its connections. The live system feeds the planner's own choice back here.
    pub retained_gateways: Vec<GatewaySlot>,
}

/// A gateway node in one of the slots of a gateway entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewaySlot {
    /// Index of the entry in the policy's gateway list.
    pub entry: usize,
    /// Slot of that entry (below its `maxGatewayNodes`).
    pub slot: usize,
    pub node: String,
}
