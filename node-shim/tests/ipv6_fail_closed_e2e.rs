//! IPv6 is not steered yet, so it fails closed (issue 15's first part), with real packets in the
//! dual-stack testbed (needs root): a selected pod's IPv6 traffic to a `failurePolicy: Drop`
//! policy's destination is dropped, never sent with its node's address; excluded CIDRs,
//! `Fallback`, other destinations, other pods and in-cluster IPv6 take the normal path; a pod the
//! plan has not decided on cannot reach a guarded IPv6 destination; IPv4 beside it is steered as
//! before.

use std::{net::SocketAddrV6, time::Duration};

use sluice_testbed::{
    EGRESS_N1, EXT_A, EXT_A_V6, EXT_B_V6, EXT_EXCLUDED_V6, FileCluster as Cluster, Gw, POD_CIDR_V6, Rule,
    craft, node_ip,
};

#[test]
fn a_selected_pods_ipv6_never_leaves_with_its_nodes_address_under_drop() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP ipv6_fail_closed_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let mut c = Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &[]).expect("builds the cluster");
    // p2 (on n2) is selected by a Drop policy for the external host's IPv4 and IPv6 prefixes
    // through n1, excluding one IPv6 address, and by a Fallback policy for another IPv6 prefix.
    let ipv4 = Rule {
        policy: "drop-both",
        source: "p2",
        destination: "203.0.113.0/24",
        gateway: Gw::Node("n1", EGRESS_N1),
    };
    let mut plan = c.plan(&[ipv4]);
    let p2 = c.pod_ip_v6("p2");
    let ext_prefix = "fd00:203:0:113::/64";
    let other_prefix = "fd00:198:51:100::/64";
    let entry = |destination: &str, gateway: &str, policy: &str| {
        serde_json::json!({"source": p2, "destination": destination, "gateway": gateway,
            "egressIP": null, "interface": null, "policy": policy})
    };
    for node in plan["nodes"].as_array_mut().unwrap() {
        let name = node["name"].as_str().unwrap().to_owned();
        if name == "n2" {
            let entries = node["entries"].as_array_mut().unwrap();
            entries.push(entry(ext_prefix, node_ip("n1"), "drop-both"));
            entries.push(entry(&format!("{EXT_EXCLUDED_V6}/128"), "excluded", "drop-both"));
            entries.push(entry(other_prefix, "fallback", "fallback-v6"));
        }
        // The guard: the Drop policy's destinations; each node's decided pods are its own
        // (n1's p1 is left undecided on purpose).
        let decided: Vec<String> = match name.as_str() {
            "n2" => ["p2", "p3"]
                .iter()
                .flat_map(|p| [c.pod(p).1.to_owned(), c.pod_ip_v6(p)])
                .collect(),
            _ => Vec::new(),
        };
        node["guard"] =
            serde_json::json!({"destinations": ["203.0.113.0/24", ext_prefix], "decidedPods": decided});
        node["clusterCIDRs"] = serde_json::json!([POD_CIDR_V6]);
    }
    c.try_apply_plan(&serde_json::to_vec(&plan).unwrap(), Duration::from_secs(20))
        .expect("the plan is applied");

    // IPv4 is steered as before.
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
    // IPv6 to the Drop policy's destination: dropped, not masqueraded to n2's address.
    let before = c.counter("n2", "dropped_ipv6_not_steered");
    let leaked = c.fetch("p2", EXT_A_V6);
    assert!(leaked.is_err(), "p2's IPv6 left the cluster as {leaked:?}");
    assert!(c.counter("n2", "dropped_ipv6_not_steered") > before);
    // The excluded address and the Fallback policy's prefix: the normal path.
    let n2_v6 = c.node_ip_v6("n2");
    assert_eq!(c.fetch("p2", EXT_EXCLUDED_V6).unwrap(), n2_v6);
    assert_eq!(c.fetch("p2", EXT_B_V6).unwrap(), n2_v6);
    // Another pod of the node, decided and not selected: the normal path.
    assert_eq!(c.fetch("p3", EXT_A_V6).unwrap(), n2_v6);
    // In-cluster IPv6 (pod to pod) is never dropped, even inside the guarded prefixes' reach.
    let listener = craft::Listener::bind_v6(&c.ns("p1"), 9995).unwrap();
    let to = SocketAddrV6::new(c.pod_ip_v6("p1").parse().unwrap(), 9995, 0, 0);
    craft::send_udp(&c.ns("p2"), to, b"pod-to-pod", 2).unwrap();
    let seen: Vec<String> = listener
        .collect(Duration::from_secs(1))
        .into_iter()
        .map(|(from, _)| from.ip().to_string())
        .collect();
    assert!(
        !seen.is_empty() && seen.iter().all(|s| *s == p2),
        "p2 -> p1 over IPv6 arrived from {seen:?}"
    );
    // A pod the plan has not decided on (p1 on n1) cannot reach a guarded IPv6 destination.
    let before = c.counter("n1", "dropped_undecided_pod");
    assert!(
        c.fetch("p1", EXT_A_V6).is_err(),
        "an undecided pod reached a guarded destination"
    );
    assert!(c.counter("n1", "dropped_undecided_pod") > before);

    // The entries gone, p2's IPv6 takes the normal path again.
    let mut plain = c.plan(&[]);
    for node in plain["nodes"].as_array_mut().unwrap() {
        node["clusterCIDRs"] = serde_json::json!([POD_CIDR_V6]);
    }
    c.try_apply_plan(&serde_json::to_vec(&plain).unwrap(), Duration::from_secs(20))
        .expect("the empty plan is applied");
    assert_eq!(c.fetch("p2", EXT_A_V6).unwrap(), n2_v6);
}
