//! The dual-stack testbed's normal path, with real packets in network namespaces (needs root):
//! what the IPv6 datapath tests (issue 15) take for granted. Every pod, node and the external host
//! has an IPv6 address beside its IPv4 one; with no Sluice entry, a pod's IPv6 traffic to the
//! external host leaves masqueraded to its node's IPv6 address, and pod-to-pod IPv6 traffic arrives
//! with the pod's own, exactly as for IPv4.

use std::{
    net::{Ipv6Addr, SocketAddrV6},
    time::Duration,
};

use sluice_testbed::{
    BRIDGED_PODS, CniStandIn, EGRESS_N1_V6, EXT_A, EXT_A_V6, EXT_B_V6, EXT_EXCLUDED_V6,
    FileCluster as Cluster, Gw, Rule, Testbed, UPLINK2_EXT_V6, UPLINK2_N1_V6,
    craft::{self, Listener},
};

const PORT: u16 = 9996;

fn root(name: &str) -> bool {
    let root = sluice_testbed::is_root();
    if !root {
        println!("SKIP dualstack_e2e::{name}: needs root (network namespaces); CI runs it as root");
    }
    root
}

/// The source addresses that arrived at `to` (IPv6, in namespace `to_ns`) from `from_ns`.
fn udp_v6_sources(tb: &Testbed, from_ns: &str, to_ns: &str, to: &str) -> Vec<String> {
    let listener = Listener::bind_v6(&tb.ns(to_ns), PORT).unwrap();
    let addr = SocketAddrV6::new(to.parse().unwrap(), PORT, 0, 0);
    craft::send_udp(&tb.ns(from_ns), addr, b"pod-to-pod", 2).unwrap();
    listener
        .collect(Duration::from_secs(1))
        .into_iter()
        .map(|(from, _)| from.ip().to_string())
        .collect()
}

/// Pod-to-pod IPv6 from `from` to `to` arrives with `from`'s own address.
fn assert_pod_to_pod(tb: &Testbed, from: &str, to: &str) {
    let seen = udp_v6_sources(tb, from, to, &tb.pod_ip_v6(to));
    assert!(
        !seen.is_empty() && seen.iter().all(|s| *s == tb.pod_ip_v6(from)),
        "{from} -> {to} over IPv6: arrived from {seen:?}, expected {}",
        tb.pod_ip_v6(from)
    );
}

#[test]
fn without_entries_pods_reach_the_external_host_and_each_other_over_ipv6() {
    if !root("without_entries") {
        return;
    }
    let mut tb = Testbed::new().expect("builds the testbed");
    tb.apply_stand_in(CniStandIn::BridgedPods).unwrap();
    tb.add_pod("p6", "n1", "10.244.1.20");

    // Leaving the cluster: masqueraded to the node's IPv6 address (n1 and n3 also hold an IPv6
    // egress IP, which must not be what the masquerade picks), IPv4 unchanged beside it.
    let pods: Vec<(&str, &str)> = tb.pods().iter().map(|(p, n, _)| (*p, *n)).collect();
    assert_eq!(pods.len(), 3 + BRIDGED_PODS.len() + 1);
    for (pod, node) in pods {
        assert_eq!(
            tb.fetch(pod, EXT_A_V6).as_deref(),
            Ok(tb.node_ip_v6(node).as_str()),
            "{pod} over IPv6"
        );
        assert_eq!(
            tb.fetch(pod, EXT_A).as_deref(),
            Ok(tb.node_ip(node).as_str()),
            "{pod} over IPv4"
        );
    }
    for dst in [EXT_EXCLUDED_V6, EXT_B_V6] {
        assert_eq!(tb.fetch("p2", dst).unwrap(), tb.node_ip_v6("n2"), "to {dst}");
    }
    let mut conn = tb.connect("p2", EXT_A_V6).unwrap();
    assert_eq!(conn.greeting, tb.node_ip_v6("n2"));
    assert_eq!(
        conn.exchange(100_000, 300_000).unwrap(),
        tb.node_ip_v6("n2"),
        "segments larger than a packet both ways"
    );

    // UDP, from a socket and hand-made (its checksum right, or the external host drops it).
    let arrived = tb.udp_through("p2", EXT_A_V6, 1000, 3, PORT);
    assert_eq!(arrived, vec![(tb.node_ip_v6("n2"), 1000); 3]);
    let listener = Listener::bind_v6(&tb.ns("ext"), PORT).unwrap();
    let src: Ipv6Addr = tb.pod_ip_v6("p2").parse().unwrap();
    let packet = craft::ipv6_udp(src, EXT_A_V6.parse().unwrap(), 40000, PORT, b"crafted");
    craft::send_raw(&tb.ns("p2"), &packet, 2).unwrap();
    let got = listener.collect(Duration::from_secs(1));
    assert!(!got.is_empty(), "the hand-made IPv6 datagram arrived");
    for (from, payload) in got {
        assert_eq!(
            (from.ip().to_string(), payload),
            (tb.node_ip_v6("n2"), b"crafted".to_vec())
        );
    }

    // Within the cluster: no masquerade, across nodes both ways, on one node, to and from the
    // bridged pods and a pod added later.
    for (from, to) in [
        ("p2", "p1"),
        ("p1", "p2"),
        ("p3", "p2"),
        ("p2", BRIDGED_PODS[0].0),
        (BRIDGED_PODS[1].0, "p1"),
        ("p6", "p3"),
    ] {
        assert_pod_to_pod(&tb, from, to);
    }

    // A second uplink changes nothing for the pods; its IPv6 address leaves by it.
    tb.add_second_uplink().unwrap();
    assert_eq!(tb.fetch("p1", EXT_A_V6).unwrap(), tb.node_ip_v6("n1"));
    assert_eq!(tb.fetch("n1", UPLINK2_EXT_V6).unwrap(), UPLINK2_N1_V6);
}

#[test]
fn with_the_shims_running_and_no_entries_the_ipv6_normal_path_is_unchanged() {
    if !root("with_the_shims_running") {
        return;
    }
    let c = Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &[]).expect("builds the cluster");
    assert_eq!(c.fetch("p2", EXT_A_V6).unwrap(), c.node_ip_v6("n2"));
    assert_eq!(c.fetch("p1", EXT_A_V6).unwrap(), c.node_ip_v6("n1"));
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), c.node_ip("n2"));
    assert_pod_to_pod(&c, "p2", "p1");
    assert_pod_to_pod(&c, "p3", "p2");

    // A rule to an IPv6 destination names the pod's IPv6 address; the tunnel stays IPv4.
    let plan = c.plan(&[Rule {
        policy: "egress-v6",
        source: "p2",
        destination: "fd00:203:0:113::/64",
        gateway: Gw::Node("n1", EGRESS_N1_V6),
    }]);
    let entries = |node: &str| {
        plan["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == node)
            .unwrap()["entries"]
            .clone()
    };
    assert_eq!(entries("n2")[0]["source"], c.pod_ip_v6("p2").as_str());
    assert_eq!(entries("n2")[0]["gateway"], c.node_ip("n1").as_str());
    assert_eq!(entries("n1")[0]["egressIP"], EGRESS_N1_V6);
    assert_eq!(entries("n1")[0]["sourceNodeIP"], c.node_ip("n2").as_str());
}
