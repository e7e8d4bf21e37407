//! From Kubernetes objects to the planner's inputs. No I/O: shared by the controller, the
//! directory source and `plan`.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use serde::Deserialize;

use crate::{
    api::EgressGatewayPolicy,
    model::{InterfaceInfo, NamespaceInfo, NodeInfo, PodInfo, PodPhase, PolicyInput},
};

/// Node annotation listing the node's interfaces as JSON, for planning without shims:
/// `[{"name": "eth1", "addresses": ["192.0.2.10"], "defaultRoute": false}]`.
pub const INTERFACES_ANNOTATION: &str = "sluice.dev/interfaces";
/// Node annotation `"false"` keeps a node from serving as a gateway (as a dead shim would).
pub const ELIGIBLE_ANNOTATION: &str = "sluice.dev/eligible";
/// Node label or annotation (any value but `"false"`) that drains the node as a gateway, as
/// cordoning it or deleting it does: see [`NodeInfo::draining`].
pub const DRAIN_KEY: &str = "sluice.dev/drain";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InterfaceAnnotation {
    name: String,
    #[serde(default)]
    addresses: Vec<IpAddr>,
    /// Subnets of the addresses, as CIDRs (`192.0.2.0/24`).
    #[serde(default)]
    networks: Vec<IpNet>,
    #[serde(default)]
    default_route: bool,
}

/// A node whose annotations do not parse.
#[derive(Debug, thiserror::Error)]
#[error("annotation {INTERFACES_ANNOTATION}: {0}")]
pub struct BadInterfacesAnnotation(#[from] serde_json::Error);

/// The planner's view of a node. A node without a `Ready` condition (a hand-written manifest)
/// counts as ready; the shim's health decides eligibility in the live system.
pub fn node_info(node: &Node) -> Result<NodeInfo, BadInterfacesAnnotation> {
    let meta = &node.metadata;
    let annotations = meta.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key));
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_none_or(|c| c.status == "True");
    let mut addresses = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        for a in status.and_then(|s| s.addresses.as_ref()).into_iter().flatten() {
            if let (true, Ok(ip)) = (a.type_ == kind, a.address.parse()) {
                addresses.push(ip);
            }
        }
    }
    let interfaces = annotation(INTERFACES_ANNOTATION)
        .map(|json| serde_json::from_str::<Vec<InterfaceAnnotation>>(json))
        .transpose()?
        .map(|list| {
            list.into_iter()
                .map(|i| InterfaceInfo {
                    name: i.name,
                    addresses: i.addresses,
                    networks: i.networks.iter().map(IpNet::trunc).collect(),
                    default_route: i.default_route,
                })
                .collect()
        });
    // `podCIDRs` holds `podCIDR` first when set; older objects (and hand-written manifests) may
    // carry only `podCIDR`. The API server validates them: one that does not parse is skipped.
    let spec = node.spec.as_ref();
    let mut pod_cidrs: Vec<IpNet> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .into_iter()
        .flatten()
        .chain(spec.and_then(|s| s.pod_cidr.as_ref()))
        .filter_map(|c| c.parse::<IpNet>().ok().map(|c| c.trunc()))
        .collect();
    pod_cidrs.dedup();
    let label = |key: &str| meta.labels.as_ref().and_then(|l| l.get(key));
    let draining = spec.and_then(|s| s.unschedulable) == Some(true)
        || label(DRAIN_KEY).is_some_and(|v| v != "false")
        || annotation(DRAIN_KEY).is_some_and(|v| v != "false")
        || meta.deletion_timestamp.is_some();
    Ok(NodeInfo {
        name: meta.name.clone().unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        addresses,
        ready,
        eligible: annotation(ELIGIBLE_ANNOTATION).is_none_or(|v| v != "false"),
        draining,
        interfaces,
        pod_cidrs,
    })
}

pub fn namespace_info(ns: &Namespace) -> NamespaceInfo {
    NamespaceInfo {
        name: ns.metadata.name.clone().unwrap_or_default(),
        labels: ns.metadata.labels.clone().unwrap_or_default(),
    }
}

/// The planner's view of a pod. Pods without a UID (hand-written manifests) are identified by
/// namespace and name.
pub fn pod_info(pod: &Pod) -> PodInfo {
    let meta = &pod.metadata;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".to_owned());
    let name = meta.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    PodInfo {
        uid: meta.uid.clone().unwrap_or_else(|| format!("{namespace}/{name}")),
        labels: meta.labels.clone().unwrap_or_default(),
        node_name: spec.and_then(|s| s.node_name.clone()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        phase: PodPhase::parse(status.and_then(|s| s.phase.as_deref())),
        ips,
        namespace,
        name,
    }
}

pub fn policy_input(policy: &EgressGatewayPolicy) -> PolicyInput {
    let meta = &policy.metadata;
    PolicyInput {
        name: meta.name.clone().unwrap_or_default(),
        generation: meta.generation,
        created: meta.creation_timestamp.as_ref().map(|t| t.0.as_second()),
        spec: policy.spec.clone(),
        retained_gateways: Vec::new(),
    }
}
