//! IPv6 pods leave through their gateway with its IPv6 egress IP (issue 15), with real packets
//! in the dual-stack testbed (needs root), over the testbed's IPv4 underlay: steered from the
//! pod's node through the tunnel, NAT66 on the gateway, replies back; a pod on its own gateway
//! node; one policy for both families; excluded CIDRs, `Fallback`, a policy with no gateway under
//! `Drop`, undecided pods and in-cluster IPv6 as for IPv4; and the normal path again once the
//! entries are gone.

use std::{net::SocketAddrV6, time::Duration};

use sluice_testbed::{
    EGRESS_N1, EGRESS_N1_V6, EXT_A, EXT_A_V6, EXT_B_V6, EXT_EXCLUDED_V6, FileCluster as Cluster, Gw,
    POD_CIDR_V6, Rule, UPLINK2_DEVICE, UPLINK2_EXT_V6, UPLINK2_N1_V6, craft,
};

fn root(name: &str) -> bool {
    let root = sluice_testbed::is_root();
    if !root {
        println!("SKIP ipv6_e2e::{name}: needs root (network namespaces, eBPF); CI runs it as root");
    }
    root
}

const EXT_PREFIX_V6: &str = "fd00:203:0:113::/64";
const EXCLUDED_V6: &str = "fd00:203:0:113::200/128";
const OTHER_PREFIX_V6: &str = "fd00:198:51:100::/64";

/// Sets the guard (the Drop policies' destinations, and which pods each node decided on) and
/// the in-cluster IPv6 CIDRs on every node of `plan`.
fn guard(c: &Cluster, plan: &mut serde_json::Value, destinations: &[&str], decided: &[&str]) {
    for node in plan["nodes"].as_array_mut().unwrap() {
        let name = node["name"].as_str().unwrap().to_owned();
        let pods: Vec<String> = decided
            .iter()
            .filter(|p| c.pod(p).0 == name)
            .flat_map(|p| [c.pod(p).1.to_owned(), c.pod_ip_v6(p)])
            .collect();
        node["guard"] = serde_json::json!({"destinations": destinations, "decidedPods": pods});
        node["clusterCIDRs"] = serde_json::json!([POD_CIDR_V6]);
    }
}

#[test]
fn ipv6_pods_leave_through_their_gateway_with_its_ipv6_egress_ip() {
    if !root("steered") {
        return;
    }
    let mut c = Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &[]).expect("builds the cluster");
    let rules = [
        // One policy for both families of p2 (on n2), through n1.
        Rule {
            policy: "both",
            source: "p2",
            destination: "203.0.113.0/24",
            gateway: Gw::Node("n1", EGRESS_N1),
        },
        Rule {
            policy: "both",
            source: "p2",
            destination: EXT_PREFIX_V6,
            gateway: Gw::Node("n1", EGRESS_N1_V6),
        },
        Rule {
            policy: "both",
            source: "p2",
            destination: EXCLUDED_V6,
            gateway: Gw::Excluded,
        },
        // A policy without a gateway under Drop, over both families.
        Rule {
            policy: "no-gateway",
            source: "p2",
            destination: OTHER_PREFIX_V6,
            gateway: Gw::None,
        },
        Rule {
            policy: "no-gateway",
            source: "p2",
            destination: "198.51.100.0/24",
            gateway: Gw::None,
        },
        // p1 on its own gateway node.
        Rule {
            policy: "own-node",
            source: "p1",
            destination: EXT_PREFIX_V6,
            gateway: Gw::Node("n1", EGRESS_N1_V6),
        },
        Rule {
            policy: "fallback",
            source: "p1",
            destination: OTHER_PREFIX_V6,
            gateway: Gw::Fallback,
        },
    ];
    let mut plan = c.plan(&rules);
    // p3 (on n2) is left undecided.
    guard(
        &c,
        &mut plan,
        &[
            "203.0.113.0/24",
            "198.51.100.0/24",
            EXT_PREFIX_V6,
            OTHER_PREFIX_V6,
        ],
        &["p1", "p2"],
    );
    c.try_apply_plan(&serde_json::to_vec(&plan).unwrap(), Duration::from_secs(20))
        .expect("the plan is applied");

    let (steered, egressed) = (c.counter("n2", "steered"), c.counter("n1", "egressed"));
    // Each family leaves with the egress IP of its own family.
    assert_eq!(c.fetch("p2", EXT_A_V6).unwrap(), EGRESS_N1_V6);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
    assert!(c.counter("n2", "steered") > steered, "through the tunnel");
    assert!(c.counter("n1", "egressed") > egressed, "taken by the gateway");
    // A pod on its gateway node leaves from there, with the egress IP.
    let local = c.counter("n1", "local_egress");
    assert_eq!(c.fetch("p1", EXT_A_V6).unwrap(), EGRESS_N1_V6);
    assert!(c.counter("n1", "local_egress") > local);
    // The excluded address and the Fallback policy: the normal path.
    let (n1_v6, n2_v6) = (c.node_ip_v6("n1"), c.node_ip_v6("n2"));
    assert_eq!(c.fetch("p2", EXT_EXCLUDED_V6).unwrap(), n2_v6);
    assert_eq!(c.fetch("p1", EXT_B_V6).unwrap(), n1_v6);
    // No gateway under Drop: dropped, never masqueraded to the node's address, either family.
    let dropped = c.counter("n2", "dropped_no_gateway");
    let leaked = c.fetch("p2", EXT_B_V6);
    assert!(leaked.is_err(), "p2's IPv6 left the cluster as {leaked:?}");
    let dropped_v6 = c.counter("n2", "dropped_no_gateway");
    assert!(dropped_v6 > dropped);
    let leaked = c.fetch("p2", sluice_testbed::EXT_B);
    assert!(leaked.is_err(), "p2's IPv4 left the cluster as {leaked:?}");
    assert!(c.counter("n2", "dropped_no_gateway") > dropped_v6);
    // A pod the plan has not decided on cannot reach a guarded IPv6 destination.
    let undecided = c.counter("n2", "dropped_undecided_pod");
    let leaked = c.fetch("p3", EXT_A_V6);
    assert!(
        leaked.is_err(),
        "an undecided pod reached a guarded destination as {leaked:?}"
    );
    assert!(c.counter("n2", "dropped_undecided_pod") > undecided);
    // In-cluster IPv6 (pod to pod) is never steered.
    let listener = craft::Listener::bind_v6(&c.ns("p1"), 9995).unwrap();
    let to = SocketAddrV6::new(c.pod_ip_v6("p1").parse().unwrap(), 9995, 0, 0);
    craft::send_udp(&c.ns("p2"), to, b"pod-to-pod", 2).unwrap();
    let seen: Vec<String> = listener
        .collect(Duration::from_secs(1))
        .into_iter()
        .map(|(from, _)| from.ip().to_string())
        .collect();
    let p2 = c.pod_ip_v6("p2");
    assert!(
        !seen.is_empty() && seen.iter().all(|s| *s == p2),
        "p2 -> p1 over IPv6 arrived from {seen:?}"
    );
    // `bpf list` shows the IPv6 entries beside the IPv4 ones.
    let list = c.shim_cli("n2", &["bpf", "list"]).expect("bpf list");
    let line = list
        .lines()
        .find(|l| l.contains(&p2) && l.contains(EXT_PREFIX_V6))
        .unwrap_or_else(|| panic!("no IPv6 entry of p2 in:\n{list}"));
    assert!(line.contains(&c.node_ip("n1")) && line.contains("both"), "{line}");

    // The entries gone, p2's IPv6 takes the normal path again.
    let mut plain = c.plan(&[]);
    guard(&c, &mut plain, &[], &[]);
    c.try_apply_plan(&serde_json::to_vec(&plain).unwrap(), Duration::from_secs(20))
        .expect("the empty plan is applied");
    assert_eq!(c.fetch("p2", EXT_A_V6).unwrap(), n2_v6);
}

#[test]
fn an_open_ipv6_connection_survives_its_shims_sigkill_and_new_ones_follow_a_new_gateway() {
    if !root("sigkill_and_failover") {
        return;
    }
    let mut c = Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &[]).expect("builds the cluster");
    let through = |gateway: &'static str, egress: &'static str| {
        [Rule {
            policy: "v6",
            source: "p2",
            destination: EXT_PREFIX_V6,
            gateway: Gw::Node(gateway, egress),
        }]
    };
    let mut plan = c.plan(&through("n1", EGRESS_N1_V6));
    guard(&c, &mut plan, &[EXT_PREFIX_V6], &["p1", "p2", "p3"]);
    c.try_apply_plan(&serde_json::to_vec(&plan).unwrap(), Duration::from_secs(20))
        .expect("the plan is applied");
    let mut open = c
        .open_connections("p2", EXT_A_V6, 2, EGRESS_N1_V6)
        .expect("connections through n1");

    // Both shims of the path die: the datapath stays (pinned maps, programs, rules), and so do
    // the open connection and new ones.
    c.kill_shim("n2");
    c.kill_shim("n1");
    for conn in &mut open {
        assert_eq!(conn.exchange(5000, 5000).unwrap(), EGRESS_N1_V6);
    }
    assert_eq!(c.fetch("p2", EXT_A_V6).unwrap(), EGRESS_N1_V6);

    // Back, and the gateway moves to n3: new connections leave with n3's IPv6 egress IP (IPv6
    // flows are not pinned: the open ones follow their entry too, and n3 has no conntrack
    // entry for them).
    c.start_shim("n1");
    c.start_shim("n2");
    let n3_v6 = sluice_testbed::EGRESS_N3_V6;
    let mut plan = c.plan(&through("n3", n3_v6));
    guard(&c, &mut plan, &[EXT_PREFIX_V6], &["p1", "p2", "p3"]);
    c.try_apply_plan(&serde_json::to_vec(&plan).unwrap(), Duration::from_secs(20))
        .expect("the plan is applied");
    assert_eq!(c.fetch("p2", EXT_A_V6).unwrap(), n3_v6);
    assert!(c.counter("n3", "egressed") > 0);

    // The gateway's entry gone from the plan while the pod's remains: nothing leaks.
    let mut plan = c.plan(&through("n3", n3_v6));
    for node in plan["nodes"].as_array_mut().unwrap() {
        if node["name"] == "n3" {
            node["entries"] = serde_json::json!([]);
        }
    }
    guard(&c, &mut plan, &[EXT_PREFIX_V6], &["p1", "p2", "p3"]);
    c.try_apply_plan(&serde_json::to_vec(&plan).unwrap(), Duration::from_secs(20))
        .expect("the plan is applied");
    // n3 no longer knows n2 as a tunnel peer: a foreign tunnel packet to it.
    let dropped =
        |c: &Cluster| c.counter("n3", "dropped_foreign_tunnel") + c.counter("n3", "dropped_unknown_tunnel");
    let before = dropped(&c);
    let leaked = c.fetch("p2", EXT_A_V6);
    assert!(
        leaked.is_err(),
        "steered to a gateway that does not serve it, left as {leaked:?}"
    );
    assert!(dropped(&c) > before);
}

#[test]
fn ipv6_pods_with_the_underlays_mtu_are_clamped_and_learn_the_path_mtu_behind_the_gateway() {
    if !root("path_mtu") {
        return;
    }
    let mut c = Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &[]).expect("builds the cluster");
    c.set_pod_mtu("p2", 1500).unwrap();
    c.set_router_mtu(1400).unwrap();
    c.apply(&[Rule {
        policy: "v6",
        source: "p2",
        destination: EXT_PREFIX_V6,
        gateway: Gw::Node("n1", EGRESS_N1_V6),
    }]);
    let mut conn = c.connect("p2", EXT_A_V6).expect("connects through the gateway");
    // The SYN and SYN-ACK are clamped to what fits the tunnel (the pod's 1500 would not); the
    // pod's segments then meet the 1400-byte hop behind the gateway: the router's "packet too
    // big" goes to the egress IP, the gateway's conntrack turns it back to the pod, the tunnel
    // carries it home, and the pod sends smaller segments (IPv6 routers never fragment: without
    // it the connection stalls).
    assert_eq!(conn.exchange(2_000_000, 1000).unwrap(), EGRESS_N1_V6);
    assert!(c.counter("n2", "mss_clamped") >= 2);
    assert!(c.counter("n2", "icmp_error_delivered") > 0);
    let route = c.ip("p2", &["-6", "route", "get", EXT_A_V6]).unwrap();
    assert!(
        route.contains("mtu 1400"),
        "the pod learned the path MTU: {route}"
    );
}

#[test]
fn over_an_ipv6_underlay_ipv6_pods_are_steered_and_ipv4_pods_fail_closed() {
    if !root("ipv6_underlay") {
        return;
    }
    // Every shim's node IP is its IPv6 address: the tunnel runs over IPv6 (as on an IPv6-only
    // node network), plans name gateways and source nodes by their IPv6 addresses.
    let mut c = Cluster::start_over_ipv6_underlay(env!("CARGO_BIN_EXE_sluice-shim"), &[])
        .expect("builds the cluster");
    let rules = [
        Rule {
            policy: "v6",
            source: "p2",
            destination: EXT_PREFIX_V6,
            gateway: Gw::Node("n1", EGRESS_N1_V6),
        },
        Rule {
            policy: "v6",
            source: "p1",
            destination: EXT_PREFIX_V6,
            gateway: Gw::Node("n1", EGRESS_N1_V6),
        },
        // An IPv4 pod over an IPv6 underlay is not steered: Drop drops it.
        Rule {
            policy: "v4",
            source: "p2",
            destination: "203.0.113.0/24",
            gateway: Gw::Node("n1", EGRESS_N1),
        },
    ];
    let mut plan = c.plan(&rules);
    guard(
        &c,
        &mut plan,
        &["203.0.113.0/24", EXT_PREFIX_V6],
        &["p1", "p2", "p3"],
    );
    c.try_apply_plan(&serde_json::to_vec(&plan).unwrap(), Duration::from_secs(20))
        .expect("the plan is applied");

    let (steered, egressed) = (c.counter("n2", "steered"), c.counter("n1", "egressed"));
    let mut conn = c.connect("p2", EXT_A_V6).expect("connects through the gateway");
    assert_eq!(conn.greeting, EGRESS_N1_V6);
    // Bulk both ways: segments clamped to what fits an IPv6 outer header.
    assert_eq!(conn.exchange(2_000_000, 2_000_000).unwrap(), EGRESS_N1_V6);
    assert!(c.counter("n2", "steered") > steered, "through the tunnel");
    assert!(c.counter("n1", "egressed") > egressed, "taken by the gateway");
    assert_eq!(
        c.fetch("p1", EXT_A_V6).unwrap(),
        EGRESS_N1_V6,
        "a pod on its gateway node"
    );
    // The tunnel's outer packets are IPv6: n1 knows n2 as a peer by its IPv6 address.
    let maps = sluice_shim::datapath::Maps::open_pinned(&c.bpffs().join("n1")).expect("pinned maps");
    let peers: Vec<String> = maps
        .peers_v6
        .iter()
        .map(|item| format!("{:?}", item.expect("a peer").0.to_underlay()))
        .collect();
    assert!(
        peers.iter().any(|p| p.contains(&c.node_ip_v6("n2"))),
        "n1's IPv6 peers: {peers:?}"
    );
    // IPv4 over an IPv6 underlay: not steered, dropped under Drop, never leaked.
    let leaked = c.fetch("p2", EXT_A);
    assert!(leaked.is_err(), "p2's IPv4 left as {leaked:?}");
    // A forged IPv6 VXLAN packet from a node that is no peer is dropped before anything else.
    let before = c.counter("n1", "dropped_foreign_tunnel");
    let inner = craft::ipv6_udp(
        c.pod_ip_v6("p2").parse().unwrap(),
        EXT_A_V6.parse().unwrap(),
        40001,
        9999,
        b"forged",
    );
    let forged = craft::vxlan(8473, &inner);
    let gateway = SocketAddrV6::new(c.node_ip_v6("n1").parse().unwrap(), 8473, 0, 0);
    craft::send_udp(&c.ns("n3"), gateway, &forged, 5).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while c.counter("n1", "dropped_foreign_tunnel") - before < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(c.counter("n1", "dropped_foreign_tunnel") - before >= 5);
}

#[test]
fn a_policy_for_all_ipv6_destinations_leaves_neighbour_discovery_alone() {
    if !root("all_destinations") {
        return;
    }
    let mut c = Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &[]).expect("builds the cluster");
    // ::/0: every IPv6 destination of p2 and p3 (p3 left undecided, under the guard).
    let mut plan = c.plan(&[Rule {
        policy: "everything",
        source: "p2",
        destination: "::/0",
        gateway: Gw::Node("n1", EGRESS_N1_V6),
    }]);
    guard(&c, &mut plan, &["::/0"], &["p1", "p2"]);
    c.try_apply_plan(&serde_json::to_vec(&plan).unwrap(), Duration::from_secs(20))
        .expect("the plan is applied");
    // Forgotten neighbours: the pods must resolve their gateway (fe80::1) again, with
    // neighbour solicitations to a multicast and then a link-local address.
    for pod in ["p2", "p3"] {
        c.ip(pod, &["-6", "neigh", "flush", "all"]).unwrap();
    }
    assert_eq!(c.fetch("p2", EXT_A_V6).unwrap(), EGRESS_N1_V6);
    // The undecided pod is held back by the guard, but still resolves its neighbours: the
    // in-cluster set lets it reach another pod.
    let leaked = c.fetch("p3", EXT_A_V6);
    assert!(
        leaked.is_err(),
        "an undecided pod reached a guarded destination as {leaked:?}"
    );
    let listener = craft::Listener::bind_v6(&c.ns("p1"), 9995).unwrap();
    let to = SocketAddrV6::new(c.pod_ip_v6("p1").parse().unwrap(), 9995, 0, 0);
    craft::send_udp(&c.ns("p3"), to, b"pod-to-pod", 2).unwrap();
    let seen = listener.collect(Duration::from_secs(1));
    assert!(!seen.is_empty(), "p3 -> p1 over IPv6 (in-cluster) arrives");
}

/// Many clusters turn IPv6 off on their nodes (`net.ipv6.conf.all.disable_ipv6=1`). Sluice's
/// IPv6 parts must then stay out of the way: IPv4 is steered as before, the shims report no
/// error, and Sluice turns IPv6 back on nowhere, not even on its own tunnel device.
#[test]
fn nodes_with_ipv6_turned_off_steer_ipv4_as_before_and_keep_ipv6_off() {
    if !root("nodes_with_ipv6_turned_off") {
        return;
    }
    let off = |tb: &sluice_testbed::Testbed| {
        for (node, _) in sluice_testbed::NODES {
            sluice_testbed::in_netns(&tb.ns(node), || {
                for conf in ["all", "default"] {
                    std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")
                        .expect("turns IPv6 off");
                }
            });
        }
    };
    let mut c =
        Cluster::start_after(env!("CARGO_BIN_EXE_sluice-shim"), &[], off).expect("builds the cluster");
    c.apply(&[Rule {
        policy: "v4",
        source: "p2",
        destination: "203.0.113.0/24",
        gateway: Gw::Node("n1", EGRESS_N1),
    }]);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1, "steered through n1");
    assert!(c.counter("n1", "egressed") > 0);
    for (node, _) in sluice_testbed::NODES {
        let log = c.log(&sluice_testbed::shim_name(node));
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
            .collect();
        assert!(bad.is_empty(), "{node}: {bad:#?}");
        let ipv6_on = c.ip(node, &["-6", "-o", "addr", "show"]).expect("ip -6 addr");
        assert!(
            ipv6_on.trim().is_empty(),
            "{node} has IPv6 addresses again: {ipv6_on}"
        );
        let tunnel = sluice_testbed::in_netns(&c.ns(node), || {
            std::fs::read_to_string("/proc/sys/net/ipv6/conf/sluice-vx0/disable_ipv6")
        })
        .expect("the tunnel device's setting");
        assert_eq!(tunnel.trim(), "1", "{node}: Sluice turned IPv6 on for its tunnel");
    }
}

/// Packets of the named counter `name` of the external host's `ip6 probe` table.
fn probe_v6(c: &Cluster, name: &str) -> u64 {
    c.nft_counter("ext", "ip6 probe", name)
}

/// A policy's `interface` holds for IPv6 too: SNATed IPv6 traffic leaves by that interface (the
/// main table would send it by the first uplink, with the second one's address), by one rule
/// per egress and a table copying the main table's IPv6 routes through the interface.
#[test]
fn ipv6_snated_traffic_leaves_by_the_policys_egress_interface() {
    if !root("ipv6_egress_interface") {
        return;
    }
    let mut c = Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &[]).expect("builds the cluster");
    c.add_second_uplink().expect("second uplink on n1");
    c.nft(
        "ext",
        "table ip6 probe {\n counter uplink2 {}\n counter uplink1 {}\n chain input {\n  \
         type filter hook input priority 0; policy accept;\n  \
         tcp dport 8080 tcp flags syn iifname \"up-n1\" counter name uplink2\n  \
         tcp dport 8080 tcp flags syn iifname \"eth0\" counter name uplink1\n }\n}\n",
    )
    .unwrap();
    let via = |source| Rule {
        policy: "egress-uplink2",
        source,
        destination: EXT_PREFIX_V6,
        gateway: Gw::NodeVia("n1", UPLINK2_N1_V6, UPLINK2_DEVICE),
    };
    c.apply(&[via("p2"), via("p1")]);
    let rules = c.ip("n1", &["-6", "rule", "show", "pref", "8474"]).unwrap();
    assert_eq!(rules.lines().count(), 1, "one rule per egress: {rules}");
    let table = rules.split_whitespace().last().unwrap().to_owned();
    let routes = c.ip("n1", &["-6", "route", "show", "table", &table]).unwrap();
    assert!(
        routes.contains(&format!("default via {UPLINK2_EXT_V6} dev {UPLINK2_DEVICE}")),
        "the main table's IPv6 routes through the interface: {routes}"
    );

    // From another node (tunnelled) and from the gateway node itself.
    for pod in ["p2", "p1"] {
        let (before2, before1) = (probe_v6(&c, "uplink2"), probe_v6(&c, "uplink1"));
        let mut conn = c
            .connect(pod, EXT_A_V6)
            .expect("connects through the second uplink");
        assert_eq!(conn.greeting, UPLINK2_N1_V6, "{pod}");
        assert_eq!(conn.exchange(100_000, 300_000).unwrap(), UPLINK2_N1_V6, "{pod}");
        assert_eq!(
            probe_v6(&c, "uplink2"),
            before2 + 1,
            "{pod}: arrived on the second uplink"
        );
        assert_eq!(probe_v6(&c, "uplink1"), before1, "{pod}: nothing on the first");
    }
    // Other traffic keeps the main table's path.
    let before1 = probe_v6(&c, "uplink1");
    assert_eq!(c.fetch("p3", EXT_A_V6).unwrap(), c.node_ip_v6("n2"));
    assert_eq!(probe_v6(&c, "uplink1"), before1 + 1);

    // The IPv6 rule deleted by hand comes back within a few ticks, as the IPv4 one does.
    c.ip_on("n1", &["-6", "rule", "del", "pref", "8474"]);
    assert!(
        sluice_testbed::wait_for(Duration::from_secs(5), || {
            c.ip("n1", &["-6", "rule", "show", "pref", "8474"]).unwrap() == rules
        }),
        "the IPv6 egress rule was not restored"
    );
    assert_eq!(c.fetch("p2", EXT_A_V6).unwrap(), UPLINK2_N1_V6);

    // Removing the policy restores the normal path, and its rule and table go.
    c.apply(&[]);
    assert_eq!(c.fetch("p2", EXT_A_V6).unwrap(), c.node_ip_v6("n2"));
    assert_eq!(c.ip("n1", &["-6", "rule", "show", "pref", "8474"]).unwrap(), "");
    assert_eq!(c.ip("n1", &["-6", "route", "show", "table", &table]).unwrap(), "");

    // Back again, then uninstalled: rule and table removed.
    c.apply(&[via("p1")]);
    assert_eq!(c.fetch("p1", EXT_A_V6).unwrap(), UPLINK2_N1_V6);
    c.kill_shim("n1");
    c.uninstall("n1");
    assert_eq!(c.ip("n1", &["-6", "rule", "show", "pref", "8474"]).unwrap(), "");
    assert_eq!(c.ip("n1", &["-6", "route", "show", "table", &table]).unwrap(), "");
    assert_eq!(c.fetch("p1", EXT_A_V6).unwrap(), c.node_ip_v6("n1"));
}
