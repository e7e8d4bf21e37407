//! The `EgressGatewayPolicy` custom resource (`sluice.dev/v1alpha1`).
//!
//! The spec is a superset of Cilium's `CiliumEgressGatewayPolicy` (`cilium.io/v2`): a Cilium
//! policy becomes a Sluice policy by changing `apiVersion` and `kind`. Our additions are
//! `maxGatewayNodes` (active-active gateways) and `failurePolicy`.
//!
//! Everything the API server can check at admission is in the schema (including CEL rules);
//! [`crate::policy::parse`] checks the same things again, because the offline planner and older API
//! servers do not run CEL, and reports failures as `Accepted=False`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Sluice resource.
pub const GROUP: &str = "sluice.dev";
/// The only served version.
pub const VERSION: &str = "v1alpha1";

/// Condition type: the spec is valid and the policy takes part in planning.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Condition type: the policy's selectors match at least one pod (False means it steers nothing).
pub const CONDITION_PODS_SELECTED: &str = "PodsSelected";
/// Condition type: at least one usable gateway node serves the policy.
pub const CONDITION_GATEWAY_SELECTED: &str = "GatewaySelected";
/// Condition type: every node that must hold entries of the policy has acknowledged them.
pub const CONDITION_PROGRAMMED: &str = "Programmed";

/// Steers the traffic of selected pods to selected destinations through gateway nodes, where it
/// leaves with a stable egress IP.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "EgressGatewayPolicy",
    plural = "egressgatewaypolicies",
    shortname = "egp",
    category = "sluice",
    status = "EgressGatewayPolicyStatus",
    printcolumn = r#"{"name":"Gateways","type":"string","jsonPath":".status.gateways[*].node"}"#,
    printcolumn = r#"{"name":"Egress IPs","type":"string","jsonPath":".status.gateways[*].egressIP"}"#,
    printcolumn = r#"{"name":"Managed IPs","type":"string","description":"State of each address of egressIPs: Assigned, Moving, Conflict or Unassigned","jsonPath":".status.egressIPs[*].state","priority":1}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","description":"Pods the policy selects: 0 means its selectors match no pod, and it steers nothing","jsonPath":".status.matchedEndpoints"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status","priority":1}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Failure Policy","type":"string","description":"What matched traffic does without a usable gateway; empty means Drop","jsonPath":".spec.failurePolicy","priority":1}"#,
    printcolumn = r#"{"name":"Conflicts","type":"string","description":"Policies that win some of this policy's (source, destination) pairs","jsonPath":".status.conflicts[*].policy","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.egressGateway) || (has(self.egressGateways) && size(self.egressGateways) > 0)",
        "message": "one of egressGateway or egressGateways must be set",
        "reason": "FieldValueRequired"
    }
]))]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewayPolicySpec {
    /// Which pods the policy applies to. A pod is selected when any rule matches it.
    #[schemars(length(min = 1))]
    pub selectors: Vec<EgressRule>,

    /// Destinations (IPv4 or IPv6 CIDRs) whose traffic is steered through the gateway.
    /// Traffic to destinations inside the cluster is never steered, even when it falls inside one
    /// of these.
    #[serde(rename = "destinationCIDRs")]
    #[schemars(length(min = 1, max = 1024), inner(length(max = 43)))]
    #[schemars(extend("items" = {
        "type": "string",
        "maxLength": 43,
        "x-kubernetes-validations": [
            {"rule": "isCIDR(self)", "message": "must be a CIDR such as 203.0.113.0/24 or 2001:db8::/64"}
        ]
    }))]
    pub destination_cidrs: Vec<String>,

    /// Destinations inside `destinationCIDRs` that take the normal path. The longest prefix wins.
    #[serde(rename = "excludedCIDRs", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    #[schemars(extend("items" = {
        "type": "string",
        "maxLength": 43,
        "x-kubernetes-validations": [
            {"rule": "isCIDR(self)", "message": "must be a CIDR such as 203.0.113.7/32 or 2001:db8::7/128"}
        ]
    }))]
    pub excluded_cidrs: Vec<String>,

    /// The gateway (Cilium's single-gateway form). Ignored when `egressGateways` is not empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_gateway: Option<EgressGateway>,

    /// Several gateways. Each selected pod is assigned to one of the active gateway nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub egress_gateways: Vec<EgressGateway>,

    /// What matched traffic does while the policy has no usable gateway node. `Drop` (the
    /// default) never lets it leave with a node IP; `Fallback` lets it take the node's normal path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_policy: Option<FailurePolicy>,

    /// How long a gateway node that stops taking this policy's pods (drained, or left out by an
    /// edit) keeps carrying the open connections of the pods it served, e.g. `10m`, `90s`, `1h`.
    /// Unset: the operator's `--pinned-flow-timeout` (10 minutes by default); `0s`: not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.matches('^[0-9]+(s|m|h)$')", "message": "must be a duration such as 90s, 10m or 1h"}
    ]))]
    pub drain_timeout: Option<String>,
}

/// One pod selection rule. Its selectors are ANDed; rules are ORed.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.podSelector) || has(self.namespaceSelector)",
        "message": "a selector needs a podSelector or a namespaceSelector",
        "reason": "FieldValueRequired"
    }
]))]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Namespaces whose pods are selected. An empty selector selects every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods selected by their labels. The label `io.kubernetes.pod.namespace` selects by
    /// namespace name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Only pods running on nodes with these labels. Applies to this rule only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// Which nodes act as gateways, and which address traffic leaves with.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.interface) && has(self.egressIP))",
        "message": "set at most one of interface and egressIP",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "!(has(self.egressIP) && has(self.egressIPs))",
        "message": "set at most one of egressIP (an address the node already holds) and egressIPs (addresses Sluice assigns)",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "!has(self.egressIP) || self.egressIP == '' || !has(self.maxGatewayNodes) || self.maxGatewayNodes <= 1",
        "message": "egressIP is one address that a node already holds: several gateway nodes would each hold it (an address conflict); use egressIPs, one address per gateway node",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.egressIPs) || !has(self.maxGatewayNodes) || self.maxGatewayNodes <= size(self.egressIPs)",
        "message": "maxGatewayNodes may not exceed the number of egressIPs (each gateway node holds one of them)",
        "reason": "FieldValueInvalid"
    }
]))]
#[serde(rename_all = "camelCase")]
pub struct EgressGateway {
    /// Nodes that may serve as gateways. Among the ready ones, Sluice picks `maxGatewayNodes`.
    pub node_selector: LabelSelector,

    /// Leave by this interface, with its first address of the packet's family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[^/\s:]+$"))]
    pub interface: Option<String>,

    /// Leave with this source address; it must be assigned to an interface of the gateway node.
    /// With neither `interface` nor `egressIP`, the default-route interface is used.
    #[serde(rename = "egressIP", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 45))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "isIP(self)", "message": "must be an IPv4 or IPv6 address"}
    ]))]
    pub egress_ip: Option<String>,

    /// Addresses Sluice assigns to the gateway nodes and moves with them (instead of
    /// `egressIP`): the node filling slot i holds the i-th IPv4 and the i-th IPv6 address listed
    /// (a dual-stack list has as many of both) on `interface` (else the interface whose subnet
    /// contains them, else the default-route interface), announces them (ARP, IPv6 neighbour
    /// advertisements), and gives them up when the slot moves. The outside world always sees
    /// these addresses. `maxGatewayNodes` defaults to the number of slots.
    #[serde(rename = "egressIPs", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    #[schemars(extend("items" = {
        "type": "string",
        "maxLength": 45,
        "x-kubernetes-validations": [
            {"rule": "isIP(self)", "message": "must be an IPv4 or IPv6 address"}
        ]
    }))]
    pub egress_ips: Vec<String>,

    /// How many matching nodes serve at once (active-active). Default 1 (with `egressIPs`: their
    /// count). When one fails, only the pods it served move to another node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_gateway_nodes: Option<u32>,
}

/// What to do with matched traffic while the policy has no usable gateway.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FailurePolicy {
    /// Drop it: traffic never leaves with an unexpected source address.
    #[default]
    Drop,
    /// Let it take the node's normal path (and source address).
    Fallback,
}

/// What Sluice made of the policy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewayPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Accepted`, `PodsSelected`, `GatewaySelected` and `Programmed`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The gateway nodes serving the policy now.
    #[serde(default)]
    pub gateways: Vec<GatewayStatus>,

    /// How many pods the policy selects.
    #[serde(default)]
    pub matched_endpoints: u64,

    /// Other policies that win (source, destination) pairs this one also claims.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<ConflictStatus>,

    /// The managed addresses of `egressIPs`: which node holds each, and how it stands.
    #[serde(rename = "egressIPs", default, skip_serializing_if = "Vec::is_empty")]
    pub egress_ips: Vec<EgressIpStatus>,

    /// Gateway nodes that take no new pods of the policy any more (drained, or moved away from
    /// by an edit) but still carry the open connections of the pods they served, until `until`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<DrainingStatus>,
}

/// A gateway node draining the policy's open connections.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainingStatus {
    pub node: String,
    /// When it lets go of them at the latest (RFC 3339).
    pub until: String,
    /// How many of the policy's pods it still keeps entries for.
    pub pods: u64,
    /// How many of their connections are still open through it, as the pods' nodes count them
    /// (absent until counted). It lets go of a pod once none is left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<u64>,
}

/// One managed egress address (`egressIPs`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressIpStatus {
    pub ip: String,
    /// The node assigned to hold it (none: no usable node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The interface it is (to be) held on, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// `Assigned` (the node holds and announces it), `Moving` (assigned to a node that does not
    /// hold it yet), `Conflict` (another host answers for it: not claimed), `Unassigned` (no
    /// usable node, or another policy holds it).
    pub state: String,
    /// Why, for `Conflict` and `Unassigned`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A gateway node serving a policy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// Node name.
    pub node: String,
    /// The node's IP, which the other nodes tunnel to.
    pub ip: String,
    /// The source address traffic leaves with, when known.
    #[serde(rename = "egressIP", default, skip_serializing_if = "Option::is_none")]
    pub egress_ip: Option<String>,
    /// The interface traffic leaves by, when the policy names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Index of the entry of `egressGateways` (0 for `egressGateway`) that selected the node.
    #[serde(default)]
    pub entry: u32,
    /// Which of that entry's `maxGatewayNodes` slots the node fills. A new leader keeps every
    /// gateway in its slot while it stays usable, so that no connection moves.
    #[serde(default)]
    pub slot: u32,
}

/// Entries lost to another policy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConflictStatus {
    /// The policy that wins them (it was created earlier, or has the smaller name).
    pub policy: String,
    /// How many (source, destination) pairs.
    pub entries: u64,
}

/// The CRD manifest, as committed in `crds/` and the Helm chart.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let body = serde_yaml::to_string(&EgressGatewayPolicy::crd()).expect("a CRD always serializes");
    format!("# Generated by `cargo xtask codegen` from core/src/api.rs. Do not edit.\n---\n{body}")
}
