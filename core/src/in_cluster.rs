//! The in-cluster destinations: what no policy may steer, whatever its destination CIDRs say
//! (a `0.0.0.0/0` policy must not catch pod-to-pod, pod-to-node, Service or DNS traffic).
//!
//! A property of the whole cluster, not of a node: the nodes' pod CIDRs, every address of every
//! node, and the Service CIDRs (from `ServiceCIDR` objects where the source has them, and from
//! `--service-cidr`). Every shim receives the same set and adds its own `--cluster-cidr` and node
//! IP.

use std::collections::BTreeSet;

use ipnet::IpNet;

use crate::model::NodeInfo;

/// The in-cluster set, sorted and without duplicates: every node's pod CIDRs, each of its
/// addresses as a host prefix (/32 or /128), and `service_cidrs`.
pub fn in_cluster_cidrs<'a>(
    nodes: impl IntoIterator<Item = &'a NodeInfo>,
    service_cidrs: impl IntoIterator<Item = &'a IpNet>,
) -> Vec<IpNet> {
    let mut set = BTreeSet::new();
    for node in nodes {
        set.extend(node.pod_cidrs.iter().map(IpNet::trunc));
        set.extend(node.addresses.iter().map(|ip| IpNet::from(*ip)));
    }
    set.extend(service_cidrs.into_iter().map(IpNet::trunc));
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn node(name: &str, addresses: &[&str], pod_cidrs: &[&str]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            pod_cidrs: pod_cidrs.iter().map(|c| net(c)).collect(),
            ..NodeInfo::default()
        }
    }

    fn strings(set: &[IpNet]) -> Vec<String> {
        set.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn pod_cidrs_addresses_and_service_cidrs_make_the_set() {
        let nodes = [
            node(
                "n1",
                &["192.0.2.11", "2001:db8::11"],
                &["10.244.1.0/24", "fd00:1::/64"],
            ),
            node("n2", &["192.0.2.12", "198.51.100.12"], &["10.244.2.0/24"]),
        ];
        let services = [net("10.96.0.0/12")];
        assert_eq!(
            strings(&in_cluster_cidrs(&nodes, &services)),
            [
                "10.96.0.0/12",
                "10.244.1.0/24",
                "10.244.2.0/24",
                "192.0.2.11/32",
                "192.0.2.12/32",
                "198.51.100.12/32",
                "2001:db8::11/128",
                "fd00:1::/64",
            ]
        );
    }

    #[test]
    fn duplicates_and_host_bits_are_folded() {
        // Two nodes reporting the same address (a shared NAT address as ExternalIP), a pod CIDR
        // written with host bits, a Service CIDR given twice.
        let nodes = [
            node("n1", &["192.0.2.11", "203.0.113.1"], &["10.244.1.7/24"]),
            node("n2", &["192.0.2.12", "203.0.113.1"], &["10.244.1.0/24"]),
        ];
        let services = [net("10.96.0.1/12"), net("10.96.0.0/12")];
        assert_eq!(
            strings(&in_cluster_cidrs(&nodes, &services)),
            [
                "10.96.0.0/12",
                "10.244.1.0/24",
                "192.0.2.11/32",
                "192.0.2.12/32",
                "203.0.113.1/32"
            ]
        );
    }

    #[test]
    fn the_set_follows_nodes_and_services() {
        let mut nodes = vec![node("n1", &["192.0.2.11"], &["10.244.1.0/24"])];
        let before = in_cluster_cidrs(&nodes, &[]);
        assert_eq!(strings(&before), ["10.244.1.0/24", "192.0.2.11/32"]);
        nodes.push(node("n2", &["192.0.2.12"], &["10.244.2.0/24"]));
        let added = in_cluster_cidrs(&nodes, &[]);
        assert_eq!(
            strings(&added),
            ["10.244.1.0/24", "10.244.2.0/24", "192.0.2.11/32", "192.0.2.12/32"]
        );
        nodes[0].pod_cidrs = vec![net("10.244.9.0/24")];
        nodes.remove(1);
        assert_eq!(
            strings(&in_cluster_cidrs(&nodes, &[net("10.96.0.0/12")])),
            ["10.96.0.0/12", "10.244.9.0/24", "192.0.2.11/32"]
        );
        assert!(in_cluster_cidrs(&[], &[]).is_empty());
    }
}
