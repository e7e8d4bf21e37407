//! End-to-end tests of the datapath with real packets, in network namespaces (needs root).
//!
//! Each test builds a fresh little cluster (the `sluice-testbed` crate), runs one `sluice-shim` per node as a
//! child process inside the node's namespace, writes the plan file and checks what an external
//! host sees. Tests run one at a time (a global lock): they share the machine's kernel.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use sluice_shim::{
    datapath::{Datapath, PolicyStore},
    maps::{self, PolicyKeyV4, PolicyValueV4},
    sync,
};
use sluice_testbed::{
    EGRESS_N1, EGRESS_N3, EXT_A, EXT_B, EXT_EXCLUDED, FileCluster as Cluster, Gw, Rule, UPLINK2_DEVICE,
    UPLINK2_N1,
};

/// Returns the cluster, or `None` (after printing a SKIP line) when not root.
fn cluster(name: &str) -> Option<Cluster> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP datapath_e2e::{name}: needs root (network namespaces, eBPF); CI runs it as root");
        return None;
    }
    Some(Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &[]).expect("builds the cluster"))
}

fn policy_a(source: &'static str) -> Rule {
    Rule {
        policy: "egress-a",
        source,
        destination: "203.0.113.0/24",
        gateway: Gw::Node("n1", EGRESS_N1),
    }
}

#[test]
fn pod_on_another_node_leaves_through_the_gateway_with_its_egress_ip() {
    let Some(mut c) = cluster("pod_on_another_node") else {
        return;
    };
    c.apply(&[policy_a("p2")]);
    let mut conn = c.connect("p2", EXT_A).expect("connects through the gateway");
    assert_eq!(conn.greeting, EGRESS_N1);
    // A full exchange, with segments in both directions larger than one packet.
    for _ in 0..3 {
        assert_eq!(conn.exchange(100_000, 300_000).unwrap(), EGRESS_N1);
    }
    assert!(c.counter("n2", "steered") > 0);
    assert!(c.counter("n1", "egressed") > 0);
    assert!(c.counter("n1", "reply_encapsulated") > 0);
    assert!(c.counter("n2", "reply_delivered") > 0);
    // Another pod on the same node, outside the policy, keeps the normal path.
    assert_eq!(c.fetch("p3", EXT_A).unwrap(), c.node_ip("n2"));

    // A resync with nothing changed writes nothing.
    let before = c.status("n1");
    c.apply(&[policy_a("p2")]);
    let after = c.status("n1");
    assert!(
        after["planReads"].as_u64() > before["planReads"].as_u64(),
        "the plan was re-read"
    );
    assert_eq!(after["mapWrites"], before["mapWrites"], "and nothing was written");
    assert!(c.bpf_list("n1").contains("192.0.2.101"), "{}", c.bpf_list("n1"));
}

#[test]
fn pod_on_the_gateway_node_leaves_with_the_egress_ip() {
    let Some(mut c) = cluster("pod_on_the_gateway_node") else {
        return;
    };
    c.apply(&[policy_a("p1")]);
    let mut conn = c.connect("p1", EXT_A).expect("connects");
    assert_eq!(conn.greeting, EGRESS_N1);
    assert_eq!(conn.exchange(50_000, 200_000).unwrap(), EGRESS_N1);
    assert!(c.counter("n1", "local_egress") > 0);
}

#[test]
fn other_destinations_and_excluded_cidrs_take_the_normal_path() {
    let Some(mut c) = cluster("other_destinations") else {
        return;
    };
    let excluded = Rule {
        policy: "egress-a",
        source: "p2",
        destination: "203.0.113.128/25",
        gateway: Gw::Excluded,
    };
    c.apply(&[policy_a("p2"), excluded]);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
    assert_eq!(
        c.fetch("p2", EXT_B).unwrap(),
        c.node_ip("n2"),
        "not in the policy"
    );
    assert_eq!(c.fetch("p2", EXT_EXCLUDED).unwrap(), c.node_ip("n2"), "excluded");
    assert!(c.counter("n2", "excluded") > 0);
}

#[test]
fn no_gateway_drops_and_counts_and_fallback_takes_the_normal_path() {
    let Some(mut c) = cluster("no_gateway") else {
        return;
    };
    c.apply(&[Rule {
        policy: "egress-a",
        source: "p2",
        destination: "203.0.113.0/24",
        gateway: Gw::None,
    }]);
    assert!(
        c.fetch("p2", EXT_A).is_err(),
        "no usable gateway: the connection must fail"
    );
    assert!(c.counter("n2", "dropped_no_gateway") > 0);

    c.apply(&[Rule {
        policy: "egress-a",
        source: "p2",
        destination: "203.0.113.0/24",
        gateway: Gw::Fallback,
    }]);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), c.node_ip("n2"));
    assert!(c.counter("n2", "fallback") > 0);
}

#[test]
fn two_policies_with_different_gateways_and_egress_ips() {
    let Some(mut c) = cluster("two_policies") else {
        return;
    };
    let b = |source| Rule {
        policy: "egress-b",
        source,
        destination: "198.51.100.0/24",
        gateway: Gw::Node("n3", EGRESS_N3),
    };
    c.apply(&[policy_a("p2"), policy_a("p1"), b("p2"), b("p1")]);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
    assert_eq!(c.fetch("p2", EXT_B).unwrap(), EGRESS_N3);
    assert_eq!(c.fetch("p1", EXT_A).unwrap(), EGRESS_N1);
    assert_eq!(c.fetch("p1", EXT_B).unwrap(), EGRESS_N3);
    let counters = c.bpf_counters("n3");
    assert!(counters.contains("egress-b"), "{counters}");
}

#[test]
fn removing_the_entries_restores_the_normal_path() {
    let Some(mut c) = cluster("removing_entries") else {
        return;
    };
    c.apply(&[policy_a("p2"), policy_a("p1")]);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
    c.apply(&[]);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), c.node_ip("n2"));
    assert_eq!(c.fetch("p1", EXT_A).unwrap(), c.node_ip("n1"));
    assert_eq!(c.bpf_list("n1").lines().count(), 1, "only the header is left");
}

#[test]
fn an_open_connection_survives_a_shim_sigkill_and_restart() {
    let Some(mut c) = cluster("shim_restart") else {
        return;
    };
    c.apply(&[policy_a("p2"), policy_a("p1")]);
    let mut remote = c.connect("p2", EXT_A).unwrap();
    let mut local = c.connect("p1", EXT_A).unwrap();
    assert_eq!(
        (remote.greeting.as_str(), local.greeting.as_str()),
        (EGRESS_N1, EGRESS_N1)
    );

    for node in ["n1", "n2", "n3"] {
        c.kill_shim(node);
    }
    // The datapath keeps working while the shims are down...
    assert_eq!(remote.exchange(10_000, 10_000).unwrap(), EGRESS_N1);
    assert_eq!(local.exchange(10_000, 10_000).unwrap(), EGRESS_N1);
    for node in ["n1", "n2", "n3"] {
        c.start_shim(node);
    }
    c.wait_applied();
    // ...and after they adopted it, nothing was rewritten and the connections go on.
    assert_eq!(c.status("n1")["mapWrites"], 0, "{}", c.status("n1"));
    assert_eq!(remote.exchange(100_000, 100_000).unwrap(), EGRESS_N1);
    assert_eq!(local.exchange(100_000, 100_000).unwrap(), EGRESS_N1);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
}

#[test]
fn unrelated_changes_never_disturb_a_stream_of_new_connections() {
    let Some(mut c) = cluster("unrelated_changes") else {
        return;
    };
    let base = vec![policy_a("p2")];
    c.apply(&base);
    let stream = c.stream("p2", EXT_A);

    let b = Rule {
        policy: "egress-b",
        source: "p1",
        destination: "198.51.100.0/24",
        gateway: Gw::Node("n3", EGRESS_N3),
    };
    let excluded = Rule {
        policy: "egress-a",
        source: "p2",
        destination: "203.0.113.128/25",
        gateway: Gw::Excluded,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    for round in 0..5 {
        assert!(Instant::now() < deadline, "bounded");
        c.apply(&[base[0].clone(), b.clone()]);
        c.apply(&base);
        c.apply(&[base[0].clone(), excluded.clone()]);
        c.apply(&base);
        eprintln!("round {round} of changes applied");
    }
    let results = stream.stop();
    eprintln!("{} new connections during the changes", results.len());
    assert!(
        results.len() >= 20,
        "the stream ran ({} connections)",
        results.len()
    );
    let bad: Vec<_> = results.iter().filter(|r| r.as_deref() != Ok(EGRESS_N1)).collect();
    assert!(
        bad.is_empty(),
        "{} of {} connections failed or took another path: {:?}",
        bad.len(),
        results.len(),
        bad
    );
}

#[test]
fn users_get_clear_errors() {
    let Some(mut c) = cluster("users_get_clear_errors") else {
        return;
    };
    let shim = env!("CARGO_BIN_EXE_sluice-shim");

    // bpffs not mounted where the maps should be pinned.
    let not_bpffs = c.scratch().join("not-bpffs");
    let out = Command::new(shim)
        .arg("--bpffs-dir")
        .arg(&not_bpffs)
        .args(["bpf", "list"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("mount -t bpf bpf /sys/fs/bpf"),
        "{stderr}"
    );

    // No permission to use bpf(2).
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            shim,
        ])
        .arg("--bpffs-dir")
        .arg(c.bpffs().join("n1"))
        .args(["bpf", "list"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("permission denied using bpf(2)"),
        "{stderr}"
    );

    // An egress IP the gateway does not have: a clear error, and the traffic is dropped, not leaked.
    c.apply(&[Rule {
        policy: "egress-a",
        source: "p2",
        destination: "203.0.113.0/24",
        gateway: Gw::Node("n1", "192.0.2.199"),
    }]);
    let problems = c.status("n1")["problems"].to_string();
    assert!(
        problems
            .contains("egress IP 192.0.2.199 of policy \\\"egress-a\\\" is not assigned to any interface"),
        "{problems}"
    );
    assert!(c.fetch("p2", EXT_A).is_err());
    assert!(c.counter("n1", "dropped_no_egress_ip") > 0);

    // An egress interface the gateway does not have.
    c.apply(&[Rule {
        policy: "egress-a",
        source: "p2",
        destination: "203.0.113.0/24",
        gateway: Gw::NodeVia("n1", EGRESS_N1, "eth9"),
    }]);
    let problems = c.status("n1")["problems"].to_string();
    assert!(problems.contains("egress interface \\\"eth9\\\""), "{problems}");

    // Named correctly, it works.
    c.apply(&[Rule {
        policy: "egress-a",
        source: "p2",
        destination: "203.0.113.0/24",
        gateway: Gw::NodeVia("n1", EGRESS_N1, "eth0"),
    }]);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
}

#[test]
fn the_policy_map_holds_a_million_entries() {
    let Some(c) = cluster("a_million_entries") else {
        return;
    };
    const N: u32 = 1_000_000;
    let mut dp = Datapath::load(&c.bpffs().join("million"), N).expect("loads with a 1M-entry policy map");
    let value = |i: u32| PolicyValueV4 {
        kind: maps::KIND_GATEWAY,
        gateway_ip: maps::be(Ipv4Addr::new(192, 0, 2, 11)),
        policy_id: 1 + i % 100,
        ..Default::default()
    };
    let key = |i: u32| PolicyKeyV4::new(Ipv4Addr::from(0x0a00_0000 + i), "203.0.113.0/24".parse().unwrap());
    let desired: BTreeMap<PolicyKeyV4, PolicyValueV4> = (0..N).map(|i| (key(i), value(i))).collect();
    let mut current = BTreeMap::new();
    let started = Instant::now();
    let t = sync::reconcile(&mut PolicyStore(&mut dp.maps.policy), &mut current, &desired).unwrap();
    eprintln!("{N} entries written in {:?}", started.elapsed());
    assert_eq!(t.upserted, u64::from(N));
    for i in [0, 4_242, N - 1] {
        assert_eq!(dp.maps.policy.get(&key(i).lpm(), 0).unwrap(), value(i));
    }
    let t = sync::reconcile(&mut PolicyStore(&mut dp.maps.policy), &mut current, &desired).unwrap();
    assert_eq!(t.writes(), 0, "a resync with no change writes nothing");
}

#[test]
fn pods_created_and_deleted_later_are_followed() {
    let Some(mut c) = cluster("pods_created_later") else {
        return;
    };
    let before = c.pinned_pod_links("n2");
    c.add_pod("p4", "n2", "10.244.2.12");
    c.apply(&[policy_a("p4")]);
    assert_eq!(c.fetch("p4", EXT_A).unwrap(), EGRESS_N1);

    c.delete_pod("p4");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.pinned_pod_links("n2") != before {
        assert!(
            Instant::now() < deadline,
            "the link of the deleted pod's interface is unpinned"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_deleted_tunnel_device_is_recreated_and_steering_resumes() {
    let Some(mut c) = cluster("tunnel_recreated") else {
        return;
    };
    c.apply(&[policy_a("p2")]);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
    for node in ["n1", "n2"] {
        c.ip_on(node, &["link", "del", "sluice-vx0"]);
    }
    // Until the shims notice, steered traffic is dropped (fail closed), never sent the normal way.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.fetch("p2", EXT_A) {
            Ok(seen) => {
                assert_eq!(seen, EGRESS_N1);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "steering did not resume: {e}"),
        }
    }
}

#[test]
fn uninstall_restores_the_normal_path_and_removes_everything() {
    let Some(mut c) = cluster("uninstall") else { return };
    c.apply(&[policy_a("p2")]);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
    for node in ["n1", "n2", "n3"] {
        c.kill_shim(node);
        c.uninstall(node);
    }
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), c.node_ip("n2"));
    assert!(!c.bpffs().join("n2").exists());
}

/// Packets of the named counter `name` of the external host's `ip probe` table.
fn probe(c: &Cluster, name: &str) -> u64 {
    let out = c
        .run("ext", "nft", &["list", "counter", "ip", "probe", name])
        .unwrap();
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {out}"))
}

#[test]
fn snated_traffic_leaves_by_the_policys_egress_interface() {
    let Some(mut c) = cluster("egress_interface") else {
        return;
    };
    c.add_second_uplink().expect("second uplink on n1");
    // The external host counts connections to its server by the interface they arrive on.
    c.nft(
        "ext",
        "table ip probe {\n counter uplink2 {}\n counter uplink1 {}\n chain input {\n  \
         type filter hook input priority 0; policy accept;\n  \
         tcp dport 8080 tcp flags syn iifname \"up-n1\" counter name uplink2\n  \
         tcp dport 8080 tcp flags syn iifname \"eth0\" counter name uplink1\n }\n}\n",
    )
    .unwrap();
    let via = |source| Rule {
        policy: "egress-uplink2",
        source,
        destination: "203.0.113.0/24",
        gateway: Gw::NodeVia("n1", UPLINK2_N1, UPLINK2_DEVICE),
    };
    c.apply(&[via("p2"), via("p1")]);
    let rules = c.ip("n1", &["-4", "rule", "show", "pref", "8474"]).unwrap();
    assert_eq!(
        rules.lines().count(),
        1,
        "one rule per policy, not per pod: {rules}"
    );

    // From another node (tunnelled) and from the gateway node itself.
    for pod in ["p2", "p1"] {
        let (before2, before1) = (probe(&c, "uplink2"), probe(&c, "uplink1"));
        let mut conn = c.connect(pod, EXT_A).expect("connects through the second uplink");
        assert_eq!(conn.greeting, UPLINK2_N1, "{pod}");
        assert_eq!(conn.exchange(100_000, 300_000).unwrap(), UPLINK2_N1, "{pod}");
        assert_eq!(
            probe(&c, "uplink2"),
            before2 + 1,
            "{pod}: arrived on the second uplink"
        );
        assert_eq!(probe(&c, "uplink1"), before1, "{pod}: nothing on the first");
    }
    // Other traffic keeps the main table's path.
    let before1 = probe(&c, "uplink1");
    assert_eq!(c.fetch("p3", EXT_A).unwrap(), c.node_ip("n2"));
    assert_eq!(probe(&c, "uplink1"), before1 + 1);

    // A resync with nothing changed writes nothing.
    let before = c.status("n1");
    c.apply(&[via("p2"), via("p1")]);
    assert_eq!(c.status("n1")["mapWrites"], before["mapWrites"]);
    assert_eq!(
        c.ip("n1", &["-4", "rule", "show", "pref", "8474"]).unwrap(),
        rules
    );
    // A rule deleted by hand comes back within a few ticks.
    c.ip_on("n1", &["-4", "rule", "del", "pref", "8474"]);
    assert!(
        sluice_testbed::wait_for(Duration::from_secs(5), || {
            c.ip("n1", &["-4", "rule", "show", "pref", "8474"]).unwrap() == rules
        }),
        "the egress rule was not restored"
    );
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), UPLINK2_N1);
    // The interface's table follows the main table's routes through it.
    let table = rules.split_whitespace().last().unwrap().to_owned();
    let extra = ["198.18.99.0/24", "via", "198.18.0.1", "dev", UPLINK2_DEVICE];
    let in_table = |c: &Cluster| {
        c.ip("n1", &["-4", "route", "show", "table", &table])
            .unwrap()
            .contains("198.18.99.0/24")
    };
    c.ip_on("n1", &[&["-4", "route", "add"][..], &extra[..]].concat());
    assert!(sluice_testbed::wait_for(Duration::from_secs(5), || in_table(&c)));
    c.ip_on("n1", &[&["-4", "route", "del"][..], &extra[..]].concat());
    assert!(sluice_testbed::wait_for(Duration::from_secs(5), || !in_table(&c)));

    // Removing the policy restores the normal path, and its rule and table go.
    c.apply(&[]);
    let before1 = probe(&c, "uplink1");
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), c.node_ip("n2"));
    assert_eq!(c.fetch("p1", EXT_A).unwrap(), c.node_ip("n1"));
    assert_eq!(probe(&c, "uplink1"), before1 + 2);
    assert_eq!(c.ip("n1", &["-4", "rule", "show", "pref", "8474"]).unwrap(), "");
    assert_eq!(c.ip("n1", &["-4", "route", "show", "table", &table]).unwrap(), "");

    // Back again, then uninstalled: rule and table removed.
    c.apply(&[via("p1")]);
    assert_eq!(c.fetch("p1", EXT_A).unwrap(), UPLINK2_N1);
    assert!(
        !c.ip("n1", &["-4", "route", "show", "table", &table])
            .unwrap()
            .is_empty()
    );
    c.kill_shim("n1");
    c.uninstall("n1");
    assert_eq!(c.ip("n1", &["-4", "rule", "show", "pref", "8474"]).unwrap(), "");
    assert_eq!(c.ip("n1", &["-4", "route", "show", "table", &table]).unwrap(), "");
    assert_eq!(c.fetch("p1", EXT_A).unwrap(), c.node_ip("n1"));
}

/// Sends `count` UDP datagrams of `size` bytes from pod `pod` to the external host's `port`;
/// returns the (source, size) of those that arrived.
fn udp_through(c: &Cluster, pod: &str, size: usize, count: usize, port: u16) -> Vec<(String, usize)> {
    let listener = sluice_testbed::craft::Listener::bind(&c.ns("ext"), port).unwrap();
    let to = std::net::SocketAddrV4::new(EXT_A.parse().unwrap(), port);
    for i in 0..count {
        sluice_testbed::craft::send_udp(&c.ns(pod), to, &vec![i as u8; size], 1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    listener
        .collect(Duration::from_secs(2))
        .into_iter()
        .map(|(from, bytes)| (from.ip().to_string(), bytes.len()))
        .collect()
}

#[test]
fn pods_with_the_underlays_mtu_are_clamped_not_fragmented() {
    let Some(mut c) = cluster("pods_with_the_underlays_mtu") else {
        return;
    };
    c.set_pod_mtu("p2", 1500).unwrap();
    c.apply(&[policy_a("p2")]);
    let (source_frags, gateway_frags) = (c.fragments_created("n2"), c.fragments_created("n1"));
    let mut conn = c.connect("p2", EXT_A).expect("connects through the gateway");
    assert_eq!(conn.greeting, EGRESS_N1);
    // Bulk both ways: full-size segments from the pod and from the external host.
    assert_eq!(conn.exchange(4_000_000, 4_000_000).unwrap(), EGRESS_N1);
    assert_eq!(
        c.fragments_created("n2") - source_frags,
        0,
        "the pod's node fragments nothing"
    );
    assert_eq!(
        c.fragments_created("n1") - gateway_frags,
        0,
        "the gateway fragments no reply"
    );
    // The SYN on its way out and the SYN-ACK on its way to the pod.
    assert!(c.counter("n2", "mss_clamped") >= 2);

    // Datagrams that fill the pod's MTU arrive whole (the tunnel fragments them outside).
    let got = udp_through(&c, "p2", 1472, 5, 9998);
    assert_eq!(
        got,
        vec![(EGRESS_N1.to_owned(), 1472); 5],
        "every datagram arrives, with the egress IP"
    );
}

#[test]
fn path_mtu_discovery_works_through_a_smaller_hop_behind_the_gateway() {
    let Some(mut c) = cluster("path_mtu_discovery") else {
        return;
    };
    c.set_pod_mtu("p2", 1500).unwrap();
    c.set_router_mtu(1400).unwrap();
    c.apply(&[policy_a("p2")]);
    let mut conn = c.connect("p2", EXT_A).expect("connects through the gateway");
    // The pod's full-size segments meet the 1400-byte hop: the router's "fragmentation needed"
    // goes to the egress IP, the gateway's conntrack turns it back to the pod, the tunnel carries
    // it home, and the pod sends smaller segments.
    assert_eq!(conn.exchange(2_000_000, 1000).unwrap(), EGRESS_N1);
    assert!(c.counter("n2", "icmp_error_delivered") > 0);
    let route = c.ip("p2", &["route", "get", EXT_A]).unwrap();
    assert!(
        route.contains("mtu 1400"),
        "the pod learned the path MTU: {route}"
    );
}

/// Packets counted by the first rule of `chain` in node `node`'s `ip calico` table.
fn calico_counter(c: &Cluster, node: &str, chain: &str) -> u64 {
    let out = c
        .run(node, "nft", &["list", "chain", "ip", "calico", chain])
        .unwrap();
    out.split("packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {out}"))
}

#[test]
fn beside_calico_like_marks() {
    let Some(mut c) = cluster("beside_calico_like_marks") else {
        return;
    };
    // What Calico's iptables chains do with the mark: bits of its mask (0xffff0000) set on every
    // packet early, expected to be there further down.
    for node in ["n1", "n2"] {
        c.nft(
            node,
            "table ip calico {\n chain raw {\n  type filter hook prerouting priority -300; policy accept;\n  \
             meta mark set meta mark | 0xabcd0000\n }\n chain kept {\n  \
             type filter hook postrouting priority 300; policy accept;\n  \
             ip daddr 203.0.113.0/24 meta mark & 0xffff0000 == 0xabcd0000 counter\n }\n}\n",
        )
        .unwrap();
    }
    c.apply(&[policy_a("p2"), policy_a("p1")]);
    // A pod on another node and one on the gateway: steered, SNATed, replies delivered.
    let mut conn = c.connect("p2", EXT_A).expect("connects through the gateway");
    assert_eq!(conn.exchange(100_000, 100_000).unwrap(), EGRESS_N1);
    assert_eq!(c.fetch("p1", EXT_A).unwrap(), EGRESS_N1);
    assert!(
        calico_counter(&c, "n1", "kept") > 0,
        "the other agent's bits are still on the packets Sluice marked"
    );
}

/// A CNI's program ahead of Sluice's on a pod interface (as Cilium attaches its own with TCX):
/// this one passes every packet on, so Sluice's never runs there. Compiled here with the clang
/// the datapath is built with; pinned under the testbed's bpffs, so it goes with the testbed.
fn attach_ahead_of_sluice(c: &Cluster, node: &str, interface: &str) {
    use aya::programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    };
    let dir = c.scratch().join("standin");
    std::fs::create_dir_all(&dir).unwrap();
    let (source, object) = (dir.join("pass.bpf.c"), dir.join("pass.bpf.o"));
    std::fs::write(
        &source,
        "#include <linux/bpf.h>\n#include <linux/pkt_cls.h>\n#include <bpf/bpf_helpers.h>\n\
         SEC(\"classifier\") int cni_pass(struct __sk_buff *skb) { return TC_ACT_OK; }\n\
         char _license[] SEC(\"license\") = \"GPL\";\n",
    )
    .unwrap();
    let status = Command::new(std::env::var("SLUICE_CLANG").unwrap_or_else(|_| "clang".into()))
        .args(["-O2", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", "-c"])
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .status()
        .expect("clang runs");
    assert!(status.success(), "compiling the stand-in");
    let bytes = std::fs::read(&object).unwrap();
    let pin = c.bpffs().join(format!("standin-{node}-{interface}"));
    sluice_testbed::in_netns(&c.ns(node), || {
        let mut ebpf = aya::Ebpf::load(&bytes).expect("loads");
        let prog: &mut SchedClassifier = ebpf.program_mut("cni_pass").unwrap().try_into().unwrap();
        prog.load().expect("verifies");
        let id = prog
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .expect("attaches first");
        let link = FdLink::try_from(prog.take_link(id).unwrap()).unwrap();
        let _: PinnedLink = link.pin(&pin).expect("pins");
    });
}

/// `sluice_bypassed_interfaces` of `node`'s shim (serving metrics on 127.0.0.1:9473 in its node).
fn bypassed(c: &Cluster, node: &str) -> u64 {
    use std::io::{Read, Write};
    let response = sluice_testbed::in_netns(&c.ns(node), || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect("127.0.0.1:9473")?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: shim\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })
    .expect("scrapes the metrics");
    response
        .lines()
        .find_map(|l| l.strip_prefix("sluice_bypassed_interfaces "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sluice_bypassed_interfaces in\n{response}"))
}

#[test]
fn a_program_ahead_of_sluices_that_takes_every_packet_is_noticed() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP datapath_e2e::bypass: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let mut c = Cluster::start(
        env!("CARGO_BIN_EXE_sluice-shim"),
        &["--metrics-addr", "127.0.0.1:9473"],
    )
    .expect("builds the cluster");
    c.apply(&[policy_a("p2")]);
    for _ in 0..5 {
        assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(bypassed(&c, "n2"), 0, "Sluice sees p2's traffic");

    attach_ahead_of_sluice(&c, "n2", "veth-p2");
    // p2's traffic now never reaches Sluice's program: it leaves with the node's address.
    let noticed = sluice_testbed::wait_for(Duration::from_secs(10), || {
        let _ = c.fetch("p2", EXT_A);
        bypassed(&c, "n2") == 1
    });
    assert!(noticed, "the bypass is noticed\n{}", c.log("shim-n2"));
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), c.node_ip("n2"));
    assert!(c.log("shim-n2").contains("pod interface bypassed"));
}

#[test]
fn beside_a_flannel_like_overlay() {
    let Some(mut c) = cluster("beside_a_flannel_like_overlay") else {
        return;
    };
    c.use_flannel_like_overlay().unwrap();
    c.apply(&[policy_a("p2")]);
    // Pod to pod goes over the CNI's overlay, untouched by Sluice (in-cluster).
    let tx = |c: &Cluster| -> u64 {
        c.run("n2", "cat", &["/sys/class/net/flannel.1/statistics/tx_packets"])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = tx(&c);
    let (_, p1_ip) = c.pod("p1");
    let (_, p2_ip) = c.pod("p2");
    let listener = sluice_testbed::craft::Listener::bind(&c.ns("p1"), 9997).unwrap();
    let to = std::net::SocketAddrV4::new(p1_ip.parse().unwrap(), 9997);
    sluice_testbed::craft::send_udp(&c.ns("p2"), to, b"hello", 3).unwrap();
    let got = listener.collect(Duration::from_secs(2));
    assert!(
        got.iter().any(|(from, _)| from.ip().to_string() == p2_ip),
        "p1 hears p2 under its own address: {got:?}"
    );
    assert!(tx(&c) > before, "over the overlay");
    // Steering through Sluice's own tunnel beside it.
    let mut conn = c.connect("p2", EXT_A).expect("connects through the gateway");
    assert_eq!(conn.exchange(100_000, 100_000).unwrap(), EGRESS_N1);
    assert!(
        c.counter("n2", "in_cluster") > 0,
        "the overlay's traffic was left alone"
    );
}
