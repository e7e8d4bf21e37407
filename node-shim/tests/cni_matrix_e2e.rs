//! The CNI matrix: one core suite of datapath scenarios, run beside each CNI stand-in of the
//! testbed (`sluice_testbed::CniStandIn`) with real packets in network namespaces (needs root).
//! One test per stand-in; each builds one testbed, applies its stand-in, writes one plan and runs
//! every scenario in it, one after the other (a testbed per scenario would multiply CI time).
//!
//! The plan, for the pods the stand-in gives (see [`Layout`]):
//! - `egress-all`: the remote pod to `0.0.0.0/0` through n1 with `EGRESS_N1`, except
//!   203.0.113.128/25;
//! - `drop-b`: the remote pod to 198.51.100.0/24 with no gateway left (`failurePolicy: Drop`);
//! - `egress-local`: the local pod to `0.0.0.0/0` through its own node;
//! - and for IPv6 (the testbed is dual-stack): the remote pod to `fd00:203:0:113::/64` through n1
//!   with `EGRESS_N1_V6` except `EXT_EXCLUDED_V6`, to `fd00:198:51:100::/64` under `drop-b`, and the
//!   local pod to `fd00:203:0:113::/64` through its own node.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use sluice_testbed::{
    BRIDGED_PODS, CniStandIn, EGRESS_N1, EGRESS_N1_V6, EGRESS_N3, EGRESS_N3_V6, EXT_A, EXT_A_V6, EXT_B,
    EXT_B_V6, EXT_EXCLUDED, EXT_EXCLUDED_V6, FileCluster as Cluster, Gw, NODES, Rule, TcxVerdict,
    craft::{self, Listener},
};

/// Which pods play which part beside a stand-in.
struct Layout {
    /// A pod on a node other than its gateway (n1).
    remote: &'static str,
    /// A pod whose gateway is its own node...
    local: &'static str,
    /// ...that node and its egress IP...
    local_gateway: (&'static str, &'static str),
    /// ...and its IPv6 egress IP.
    local_egress_v6: &'static str,
}

impl Layout {
    fn for_stand_in(stand_in: CniStandIn) -> Layout {
        match stand_in {
            // Both bridged pods are on n3: the remote one leaves through n1, the local one
            // through n3 itself.
            CniStandIn::BridgedPods => Layout {
                remote: BRIDGED_PODS[0].0,
                local: BRIDGED_PODS[1].0,
                local_gateway: ("n3", EGRESS_N3),
                local_egress_v6: EGRESS_N3_V6,
            },
            _ => Layout {
                remote: "p2",
                local: "p1",
                local_gateway: ("n1", EGRESS_N1),
                local_egress_v6: EGRESS_N1_V6,
            },
        }
    }

    fn rules(&self) -> Vec<Rule> {
        let remote = |policy, destination, gateway| Rule {
            policy,
            source: self.remote,
            destination,
            gateway,
        };
        vec![
            remote("egress-all", "0.0.0.0/0", Gw::Node("n1", EGRESS_N1)),
            remote("egress-all", "203.0.113.128/25", Gw::Excluded),
            remote("drop-b", "198.51.100.0/24", Gw::None),
            Rule {
                policy: "egress-local",
                source: self.local,
                destination: "0.0.0.0/0",
                gateway: Gw::Node(self.local_gateway.0, self.local_gateway.1),
            },
            remote("egress-all", "fd00:203:0:113::/64", Gw::Node("n1", EGRESS_N1_V6)),
            remote("egress-all", "fd00:203:0:113::200/128", Gw::Excluded),
            remote("drop-b", "fd00:198:51:100::/64", Gw::None),
            Rule {
                policy: "egress-local",
                source: self.local,
                destination: "fd00:203:0:113::/64",
                gateway: Gw::Node(self.local_gateway.0, self.local_egress_v6),
            },
        ]
    }
}

/// One scenario of the core suite, run in the stand-in's testbed after the plan was applied.
type Scenario = fn(&Cluster, &Layout);

/// Every node's `bpf counters`, for failure messages.
fn all_counters(c: &Cluster) -> String {
    NODES
        .iter()
        .map(|(node, _)| format!("--- {node}\n{}", c.bpf_counters(node)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How much counter `name` of `node` grew while `f` ran.
fn growth<T>(c: &Cluster, node: &str, name: &str, f: impl FnOnce() -> T) -> (u64, T) {
    let before = c.counter(node, name);
    let out = f();
    (c.counter(node, name) - before, out)
}

/// A steered TCP connection: the external host sees the egress IP, replies come back (segments
/// larger than one packet both ways), then a few MB each way with no IP fragment made on the pod's
/// node or the gateway; then 1472-byte UDP datagrams (a full 1500-byte packet) all arrive.
fn steered_tcp_large_transfer_and_udp(c: &Cluster, l: &Layout) {
    let node = c.pod(l.remote).0;
    let (steered, mut conn) = growth(c, node, "steered", || {
        c.connect(l.remote, EXT_A)
            .unwrap_or_else(|e| panic!("connects through the gateway: {e}\n{}", all_counters(c)))
    });
    assert_eq!(conn.greeting, EGRESS_N1, "{}", all_counters(c));
    let (delivered, seen) = growth(c, node, "reply_delivered", || conn.exchange(100_000, 300_000));
    assert_eq!(seen.as_deref(), Ok(EGRESS_N1), "{}", all_counters(c));
    assert!(steered > 0, "the SYN was steered\n{}", all_counters(c));
    assert!(
        delivered > 0,
        "the replies came back through the tunnel\n{}",
        all_counters(c)
    );

    let frags = (c.fragments_created(node), c.fragments_created("n1"));
    assert_eq!(
        conn.exchange(4_000_000, 4_000_000).as_deref(),
        Ok(EGRESS_N1),
        "{}",
        all_counters(c)
    );
    assert_eq!(
        (
            c.fragments_created(node) - frags.0,
            c.fragments_created("n1") - frags.1
        ),
        (0, 0),
        "IP fragments made for TCP on (the pod's node, the gateway)\n{}",
        all_counters(c)
    );

    let got = c.udp_through(l.remote, EXT_A, 1472, 5, 9998);
    assert_eq!(
        got,
        vec![(EGRESS_N1.to_owned(), 1472); 5],
        "every datagram arrives whole, with the egress IP\n{}",
        all_counters(c)
    );
}

/// A destination the policy excludes takes the normal path: the node's address.
fn excluded_cidr_takes_the_normal_path(c: &Cluster, l: &Layout) {
    let node = c.pod(l.remote).0;
    let (excluded, seen) = growth(c, node, "excluded", || c.fetch(l.remote, EXT_EXCLUDED));
    assert_eq!(seen, Ok(c.node_ip(node)), "{}", all_counters(c));
    assert!(excluded > 0, "{}", all_counters(c));
}

/// A `failurePolicy: Drop` policy with no gateway: neither a connection nor a datagram reaches
/// the external host, and the drops are counted.
fn drop_policy_without_gateway_drops(c: &Cluster, l: &Layout) {
    let node = c.pod(l.remote).0;
    let (dropped, (tcp, udp)) = growth(c, node, "dropped_no_gateway", || {
        (
            c.fetch(l.remote, EXT_B),
            c.udp_through(l.remote, EXT_B, 100, 3, 9997),
        )
    });
    assert!(tcp.is_err(), "the connection must fail, got {tcp:?}");
    assert!(udp.is_empty(), "nothing arrives: {udp:?}");
    assert!(
        dropped >= 4,
        "the SYN and the datagrams: {dropped}\n{}",
        all_counters(c)
    );
}

/// Pod-to-pod (same node and others) and pod-to-node traffic is in-cluster: it arrives from the
/// pod or its node, never steered, though the policy covers `0.0.0.0/0`.
fn pod_to_pod_and_pod_to_node_not_steered(c: &Cluster, l: &Layout) {
    const PORT: u16 = 9996;
    let (node, pod_ip) = c.pod(l.remote);
    let targets: Vec<(&str, &str)> = c
        .pods()
        .iter()
        .filter(|(p, _, _)| *p != l.remote)
        .map(|(p, _, ip)| (*p, *ip))
        .chain(NODES)
        .collect();
    let listeners: Vec<Listener> = targets
        .iter()
        .map(|(ns, _)| Listener::bind(&c.ns(ns), PORT).unwrap())
        .collect();
    let (steered_before, in_cluster_before) = (c.counter(node, "steered"), c.counter(node, "in_cluster"));
    for (_, ip) in &targets {
        let to = SocketAddrV4::new(ip.parse().unwrap(), PORT);
        craft::send_udp(&c.ns(l.remote), to, b"in-cluster", 2).unwrap();
    }
    let from = [pod_ip.to_owned(), c.node_ip(node)];
    for ((ns, ip), listener) in targets.iter().zip(&listeners) {
        let got = listener.collect(Duration::from_millis(300));
        assert!(
            !got.is_empty(),
            "{} reaches {ns} ({ip})\n{}",
            l.remote,
            all_counters(c)
        );
        for (source, _) in &got {
            assert!(
                from.contains(&source.ip().to_string()),
                "{ns} ({ip}) heard {source}, not {from:?}"
            );
        }
    }
    assert_eq!(
        c.counter(node, "steered"),
        steered_before,
        "nothing was steered\n{}",
        all_counters(c)
    );
    assert!(
        c.counter(node, "in_cluster") - in_cluster_before >= targets.len() as u64,
        "{}",
        all_counters(c)
    );
}

/// A pod whose gateway is its own node leaves with that node's egress IP, no tunnel involved.
fn local_egress(c: &Cluster, l: &Layout) {
    let (node, egress) = l.local_gateway;
    let (local, mut conn) = growth(c, node, "local_egress", || {
        c.connect(l.local, EXT_A)
            .unwrap_or_else(|e| panic!("connects: {e}\n{}", all_counters(c)))
    });
    assert_eq!(conn.greeting, egress, "{}", all_counters(c));
    assert_eq!(conn.exchange(100_000, 1_000_000).as_deref(), Ok(egress));
    assert!(local > 0, "{}", all_counters(c));
}

/// IPv6 frames this namespace had to fragment (`Ip6FragCreates`).
fn fragments_created_v6(c: &Cluster, ns: &str) -> u64 {
    let snmp = sluice_testbed::in_netns(&c.ns(ns), || {
        std::fs::read_to_string("/proc/thread-self/net/snmp6")
    })
    .expect("reading /proc/net/snmp6");
    snmp.lines()
        .find_map(|l| l.strip_prefix("Ip6FragCreates"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Ip6FragCreates in /proc/net/snmp6")
}

/// [`steered_tcp_large_transfer_and_udp`] for IPv6 (NAT66 on the gateway), with datagrams that
/// fit any pod's MTU.
fn steered_ipv6(c: &Cluster, l: &Layout) {
    let node = c.pod(l.remote).0;
    let (steered, mut conn) = growth(c, node, "steered", || {
        c.connect(l.remote, EXT_A_V6)
            .unwrap_or_else(|e| panic!("connects through the gateway: {e}\n{}", all_counters(c)))
    });
    assert_eq!(conn.greeting, EGRESS_N1_V6, "{}", all_counters(c));
    assert!(steered > 0, "the SYN was steered\n{}", all_counters(c));
    let frags = (fragments_created_v6(c, node), fragments_created_v6(c, "n1"));
    assert_eq!(
        conn.exchange(4_000_000, 4_000_000).as_deref(),
        Ok(EGRESS_N1_V6),
        "{}",
        all_counters(c)
    );
    assert_eq!(
        (
            fragments_created_v6(c, node) - frags.0,
            fragments_created_v6(c, "n1") - frags.1
        ),
        (0, 0),
        "IPv6 fragments made for TCP on (the pod's node, the gateway)\n{}",
        all_counters(c)
    );
    let got = c.udp_through(l.remote, EXT_A_V6, 1200, 5, 9995);
    assert_eq!(
        got,
        vec![(EGRESS_N1_V6.to_owned(), 1200); 5],
        "every datagram arrives, with the IPv6 egress IP\n{}",
        all_counters(c)
    );
}

/// The excluded IPv6 destination takes the normal path (the node's IPv6 address); no gateway
/// under Drop drops IPv6 too; the local pod leaves with its own node's IPv6 egress IP.
fn ipv6_excluded_drop_and_local(c: &Cluster, l: &Layout) {
    let node = c.pod(l.remote).0;
    let (excluded, seen) = growth(c, node, "excluded", || c.fetch(l.remote, EXT_EXCLUDED_V6));
    assert_eq!(seen, Ok(c.node_ip_v6(node)), "{}", all_counters(c));
    assert!(excluded > 0, "{}", all_counters(c));

    let (dropped, (tcp, udp)) = growth(c, node, "dropped_no_gateway", || {
        (
            c.fetch(l.remote, EXT_B_V6),
            c.udp_through(l.remote, EXT_B_V6, 100, 3, 9994),
        )
    });
    assert!(tcp.is_err(), "the IPv6 connection must fail, got {tcp:?}");
    assert!(udp.is_empty(), "nothing arrives: {udp:?}");
    assert!(dropped >= 4, "{dropped}\n{}", all_counters(c));

    let (gateway, _) = l.local_gateway;
    let (local, mut conn) = growth(c, gateway, "local_egress", || {
        c.connect(l.local, EXT_A_V6)
            .unwrap_or_else(|e| panic!("connects: {e}\n{}", all_counters(c)))
    });
    assert_eq!(conn.greeting, l.local_egress_v6, "{}", all_counters(c));
    assert_eq!(
        conn.exchange(100_000, 1_000_000).as_deref(),
        Ok(l.local_egress_v6)
    );
    assert!(local > 0, "{}", all_counters(c));
}

/// Runs the core suite beside `stand_in` (a SKIP line when not root).
fn suite(name: &str, stand_in: CniStandIn) {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP cni_matrix_e2e::{name}: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let mut c = Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &[]).expect("builds the cluster");
    // From here: under `cargo test` the clock would otherwise count the wait for the testbed lock.
    let started = Instant::now();
    c.apply_stand_in(stand_in).expect("applies the stand-in");
    let layout = Layout::for_stand_in(stand_in);
    c.apply(&layout.rules());
    eprintln!("{name}: stand-in and plan in {:?}", started.elapsed());

    let scenarios: [(&str, Scenario); 7] = [
        (
            "steered TCP, large transfer, UDP",
            steered_tcp_large_transfer_and_udp,
        ),
        ("excluded CIDR", excluded_cidr_takes_the_normal_path),
        ("Drop policy without gateway", drop_policy_without_gateway_drops),
        (
            "pod-to-pod and pod-to-node",
            pod_to_pod_and_pod_to_node_not_steered,
        ),
        ("local egress", local_egress),
        ("IPv6 steered TCP, large transfer, UDP", steered_ipv6),
        ("IPv6 excluded, Drop, local egress", ipv6_excluded_drop_and_local),
    ];
    for (scenario, run) in scenarios {
        let t = Instant::now();
        run(&c, &layout);
        eprintln!("{name}: {scenario}: ok in {:?}", t.elapsed());
    }

    if stand_in == CniStandIn::CalicoLikeMarks {
        let kept = c.calico_like_marks_kept_v6("n1").expect("reads the IPv6 counter");
        assert!(
            kept > 0,
            "IPv6 packets left the gateway with the CNI's mark bits intact"
        );
    }
    if let Some(packets) = c
        .stand_in_packets(stand_in)
        .expect("reads the stand-in's evidence")
    {
        eprintln!("{name}: the stand-in acted on {packets} packets");
        assert!(packets > 0, "the stand-in was in the packets' way");
    }
    for (node, _) in NODES {
        let log = c.log(&format!("shim-{node}"));
        assert!(
            !log.contains("pod interface bypassed"),
            "{node}'s shim saw its program bypassed:\n{log}"
        );
    }
    eprintln!(
        "{name}: all in {:?} after the testbed was built",
        started.elapsed()
    );
}

#[test]
fn beside_routed_pods() {
    suite("beside_routed_pods", CniStandIn::RoutedPods);
}

#[test]
fn with_pods_at_the_underlays_mtu() {
    suite("with_pods_at_the_underlays_mtu", CniStandIn::PodMtuOfUnderlay);
}

#[test]
fn beside_calico_like_marks() {
    suite("beside_calico_like_marks", CniStandIn::CalicoLikeMarks);
}

#[test]
fn beside_a_flannel_like_overlay() {
    suite("beside_a_flannel_like_overlay", CniStandIn::FlannelLikeOverlay);
}

#[test]
fn with_bridged_pods() {
    suite("with_bridged_pods", CniStandIn::BridgedPods);
}

#[test]
fn behind_a_cilium_like_program_that_hands_packets_on() {
    suite(
        "behind_a_cilium_like_program_that_hands_packets_on",
        CniStandIn::CiliumLikeProgram(TcxVerdict::Next),
    );
}
