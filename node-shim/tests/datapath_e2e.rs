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

use ipnet::Ipv4Net;
use sluice_shim::{
    datapath::{Capacity, Datapath, DestinationStore, LEGACY_POLICY_V4, LegacyAddrsV4},
    layout::Layout,
    maps::{self, EntryValueV4, PolicyKeyV4},
    sync,
};
use sluice_testbed::{
    CniStandIn, EGRESS_N1, EGRESS_N1_V6, EGRESS_N3, EGRESS_N3_V6, EXT_A, EXT_A_V6, EXT_B, EXT_EXCLUDED,
    FileCluster as Cluster, Gw, Rule, TcxVerdict, UPLINK2_DEVICE, UPLINK2_N1,
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

/// What is pinned for `node`: its maps and programs, and its links (one per attached interface).
fn pins(c: &Cluster, node: &str) -> Vec<String> {
    let dir = c.bpffs().join(node);
    let mut names = Vec::new();
    for sub in ["", "links", "progs"] {
        for entry in std::fs::read_dir(dir.join(sub)).unwrap() {
            names.push(format!("{sub}/{}", entry.unwrap().file_name().to_string_lossy()));
        }
    }
    names.sort();
    names
}

#[test]
fn a_shim_stops_at_once_on_sigterm_or_sigint_and_leaves_the_datapath_steering() {
    use nix::sys::signal::Signal;
    let Some(mut c) = cluster("shim_stop") else {
        return;
    };
    c.apply(&[policy_a("p2")]);
    let mut open = c.connect("p2", EXT_A).unwrap();
    assert_eq!(open.greeting, EGRESS_N1);
    let before: Vec<_> = ["n1", "n2"]
        .into_iter()
        .map(|n| (pins(&c, n), c.bpf_list(n)))
        .collect();
    assert!(before[1].0.iter().any(|p| p.starts_with("links/")), "{before:?}");

    // The pod's node on SIGTERM (what the kubelet sends), the gateway on SIGINT. As PID 1 in a
    // container the shim gets no default action: without its handlers it would not stop at all
    // (here, not PID 1, it would die by the signal and not exit 0).
    for (node, signal) in [("n2", Signal::SIGTERM), ("n1", Signal::SIGINT)] {
        let status = c.stop_shim(node, signal, Duration::from_secs(5));
        assert!(
            status.is_some_and(|s| s.success()),
            "{node}'s shim on {signal}: {status:?}\n{}",
            c.log(&format!("shim-{node}"))
        );
    }

    // Everything stays pinned and attached, with the same entries, and keeps steering: the open
    // connection and new ones.
    for ((pinned, entries), node) in before.iter().zip(["n1", "n2"]) {
        assert_eq!(&pins(&c, node), pinned, "{node}");
        assert_eq!(&c.bpf_list(node), entries, "{node}");
    }
    assert_eq!(open.exchange(10_000, 10_000).unwrap(), EGRESS_N1);
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
fn a_million_pod_cidr_pairs_take_pods_plus_cidrs_entries() {
    let Some(c) = cluster("a_million_pairs") else {
        return;
    };
    // 1,000 pods x 1,000 CIDRs of one policy, the pods spread over two gateways.
    let target = |pod: u32| EntryValueV4 {
        kind: maps::KIND_GATEWAY,
        gateway_ip: maps::be(Ipv4Addr::new(192, 0, 2, 11 + (pod % 2) as u8)),
        policy_id: 1,
        ..Default::default()
    };
    let mut entries = BTreeMap::new();
    for pod in 0..1_000u32 {
        for cidr in 0..1_000u32 {
            let destination = Ipv4Net::new(Ipv4Addr::from(0x0b00_0000 + (cidr << 8)), 24).unwrap();
            entries.insert(
                PolicyKeyV4::new(Ipv4Addr::from(0x0af4_0000 + pod), destination),
                target(pod),
            );
        }
    }
    let (layout, overflow) = Layout::of(&entries, &Layout::default());
    assert!(overflow.is_empty());
    assert_eq!((layout.sources.len(), layout.destinations.len()), (1_000, 1_000));

    let mut dp = Datapath::load(&c.bpffs().join("million"), Capacity::default()).expect("loads the datapath");
    let started = Instant::now();
    let mut destinations = BTreeMap::new();
    let t = sync::reconcile(
        &mut DestinationStore(&mut dp.maps.destinations),
        &mut destinations,
        &layout.destinations,
    )
    .unwrap();
    for (ip, source) in &layout.sources {
        dp.maps.sources.insert(ip, source, 0).unwrap();
    }
    eprintln!(
        "{} pairs written as {} map entries in {:?}",
        entries.len(),
        t.upserted + 1_000,
        started.elapsed()
    );
    let held = dp.maps.layout().unwrap();
    assert_eq!(held, layout);
    assert_eq!(held.expand(), entries, "the maps hold every pair");
    let t = sync::reconcile(
        &mut DestinationStore(&mut dp.maps.destinations),
        &mut destinations,
        &layout.destinations,
    )
    .unwrap();
    assert_eq!(t.writes(), 0, "a resync with no change writes nothing");
}

#[test]
fn a_plan_that_does_not_fit_the_maps_is_refused_whole_and_the_node_keeps_its_entries() {
    if !nix::unistd::geteuid().is_root() {
        println!(
            "SKIP datapath_e2e::plan_too_big: needs root (network namespaces, eBPF); CI runs it as root"
        );
        return;
    }
    let mut c = Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &["--policy-map-max", "3"])
        .expect("builds the cluster");
    c.apply(&[policy_a("p2")]);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
    assert_eq!(c.status("n2")["destinations"], 1);

    // Five destinations for one pod: more than the destinations map of 3 holds.
    let wide: Vec<Rule> = [
        "203.0.113.0/24",
        "198.18.0.0/24",
        "198.18.1.0/24",
        "198.18.2.0/24",
        "198.18.3.0/24",
    ]
    .into_iter()
    .map(|destination| Rule {
        destination,
        ..policy_a("p2")
    })
    .collect();
    c.apply(&wide);
    let status = c.status("n2");
    let problems = status["problems"].to_string();
    assert!(problems.contains("map full"), "{problems}");
    assert!(problems.contains("sluice_destinations_v4"), "{problems}");
    assert_eq!(status["plansRefused"], 1);
    assert_eq!(
        status["destinations"], 1,
        "nothing of the refused plan was written"
    );
    // The previous entries still steer.
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);

    // A plan that fits is applied, counting the moment the old group and the new one are both
    // held (1 + 2 entries).
    c.apply(&wide[..2]);
    assert_eq!(c.status("n2")["destinations"], 2);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
}

#[test]
fn entries_of_an_older_shim_are_moved_into_the_new_maps_before_any_program_changes() {
    let Some(c) = cluster("legacy_entries") else {
        return;
    };
    let dir = c.bpffs().join("legacy");
    std::fs::create_dir_all(&dir).unwrap();
    // What an older shim pinned: one LPM trie keyed by (source, destination prefix).
    let obj = aya_obj::Map::new_from_params(
        11, // BPF_MAP_TYPE_LPM_TRIE
        12,
        std::mem::size_of::<EntryValueV4>() as u32,
        1024,
        1, // BPF_F_NO_PREALLOC
    );
    let data = aya::maps::MapData::create(obj, LEGACY_POLICY_V4, None).expect("creates the legacy map");
    data.pin(dir.join(LEGACY_POLICY_V4)).unwrap();
    let mut trie: aya::maps::LpmTrie<_, LegacyAddrsV4, EntryValueV4> =
        aya::maps::Map::from_map_data(data).unwrap().try_into().unwrap();
    let mut entries = BTreeMap::new();
    for (source, destination, gateway) in [
        ("10.244.2.10", "203.0.113.0/24", 11),
        ("10.244.2.10", "198.51.100.0/24", 13),
        ("10.244.2.11", "203.0.113.0/24", 11),
    ] {
        let key = PolicyKeyV4::new(source.parse().unwrap(), destination.parse().unwrap());
        let value = EntryValueV4 {
            kind: maps::KIND_GATEWAY,
            gateway_ip: maps::be(Ipv4Addr::new(192, 0, 2, gateway)),
            policy_id: u32::from(gateway),
            ..Default::default()
        };
        let lpm = aya::maps::lpm_trie::Key::new(
            key.prefixlen,
            LegacyAddrsV4 {
                saddr: key.saddr,
                daddr: key.daddr,
            },
        );
        trie.insert(&lpm, value, 0).unwrap();
        entries.insert(key, value);
    }
    drop(trie);

    let dp = Datapath::load(&dir, Capacity::default()).expect("loads over the older shim's maps");
    assert_eq!(dp.maps.layout().unwrap().expand(), entries);
    assert!(
        !dir.join(LEGACY_POLICY_V4).exists(),
        "the legacy map is unpinned once moved"
    );
    drop(dp);
    // A second start finds nothing left to move and keeps what the new maps hold.
    let dp = Datapath::load(&dir, Capacity::default()).unwrap();
    assert_eq!(dp.maps.layout().unwrap().expand(), entries);
}

#[test]
fn a_new_pod_the_datapath_is_not_attached_to_yet_cannot_leak() {
    let Some(mut c) = cluster("not_attached_yet") else {
        return;
    };
    // p2 is selected (Drop); the guard covers the policy's destinations (an IPv6 one too), and
    // n2's decided pods are p2 and p3 (both families).
    let mut plan = c.plan(&[policy_a("p2")]);
    for node in plan["nodes"].as_array_mut().unwrap() {
        let decided: Vec<String> = if node["name"] == "n2" {
            ["p2", "p3"]
                .iter()
                .flat_map(|p| [c.pod(p).1.to_owned(), c.pod_ip_v6(p)])
                .collect()
        } else {
            vec![]
        };
        node["guard"] = serde_json::json!({"destinations": ["203.0.113.0/24", "fd00:203:0:113::/64"],
            "decidedPods": decided});
    }
    c.try_apply_plan(&serde_json::to_vec(&plan).unwrap(), Duration::from_secs(20))
        .unwrap();
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);

    // The shim of n2 frozen: a pod created now has no program on its interface, as in the
    // milliseconds between a CNI creating a veth and the shim attaching to it.
    let pid = nix::unistd::Pid::from_raw(c.pid("shim-n2").unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    c.add_pod("p4", "n2", "10.244.2.12");
    let leaked = c.fetch("p4", EXT_A);
    let leaked_v6 = c.fetch("p4", sluice_testbed::EXT_A_V6);
    // Other destinations are not guarded: the normal path.
    let unguarded = c.fetch("p4", EXT_B);
    let unguarded_v6 = c.fetch("p4", sluice_testbed::EXT_B_V6);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        leaked.is_err(),
        "a pod the datapath is not attached to left as {leaked:?}"
    );
    assert!(
        leaked_v6.is_err(),
        "a pod the datapath is not attached to left over IPv6 as {leaked_v6:?}"
    );
    assert_eq!(unguarded.unwrap(), c.node_ip("n2"));
    assert_eq!(unguarded_v6.unwrap(), c.node_ip_v6("n2"));

    // Decided (not selected), it takes the normal path to the guarded destination too.
    for node in plan["nodes"].as_array_mut().unwrap() {
        if node["name"] == "n2" {
            node["guard"]["decidedPods"]
                .as_array_mut()
                .unwrap()
                .push("10.244.2.12".into());
        }
    }
    c.try_apply_plan(&serde_json::to_vec(&plan).unwrap(), Duration::from_secs(20))
        .unwrap();
    assert_eq!(c.fetch("p4", EXT_A).unwrap(), c.node_ip("n2"));
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
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
    let rp_filter = |c: &Cluster| -> Vec<String> {
        [("n2", "all"), ("n2", "eth0"), ("n1", "eth0")]
            .iter()
            .map(|(node, conf)| {
                let key = format!("/proc/sys/net/ipv4/conf/{conf}/rp_filter");
                c.run(node, "cat", &[&key]).unwrap().trim().to_owned()
            })
            .collect()
    };
    // Reverse-path filtering as a node may have it: strict on the pod's node, where the shim
    // relaxes it when it starts, and on the gateway's egress interface, which it loosens when
    // the gateway takes a policy.
    c.kill_shim("n2");
    c.sysctl("n2", "net.ipv4.conf.all.rp_filter=1").unwrap();
    c.sysctl("n2", "net.ipv4.conf.eth0.rp_filter=0").unwrap();
    c.sysctl("n1", "net.ipv4.conf.eth0.rp_filter=1").unwrap();
    c.start_shim("n2");
    c.apply(&[policy_a("p2")]);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
    assert_eq!(rp_filter(&c), ["0", "1", "2"], "n2 all, n2 eth0, n1 eth0");
    for node in ["n1", "n2", "n3"] {
        c.kill_shim(node);
        c.uninstall(node);
    }
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), c.node_ip("n2"));
    assert!(!c.bpffs().join("n2").exists());
    assert_eq!(
        rp_filter(&c),
        ["1", "0", "1"],
        "uninstall puts back what the shims found (n2 all, n2 eth0, n1 eth0)"
    );
}

/// Packets of the named counter `name` of the external host's `ip probe` table.
fn probe(c: &Cluster, name: &str) -> u64 {
    c.nft_counter("ext", "ip probe", name)
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
    let got = c.udp_through("p2", EXT_A, 1472, 5, 9998);
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

#[test]
fn beside_calico_like_marks() {
    let Some(mut c) = cluster("beside_calico_like_marks") else {
        return;
    };
    // What Calico's iptables chains do with the mark: bits of its mask (0xffff0000) set on every
    // packet early, expected to be there further down.
    c.apply_stand_in(CniStandIn::CalicoLikeMarks).unwrap();
    c.apply(&[policy_a("p2"), policy_a("p1")]);
    // A pod on another node and one on the gateway: steered, SNATed, replies delivered.
    let mut conn = c.connect("p2", EXT_A).expect("connects through the gateway");
    assert_eq!(conn.exchange(100_000, 100_000).unwrap(), EGRESS_N1);
    assert_eq!(c.fetch("p1", EXT_A).unwrap(), EGRESS_N1);
    assert!(
        c.calico_like_marks_kept("n1").unwrap() > 0,
        "the other agent's bits are still on the packets Sluice marked"
    );
}

/// `sluice_bypassed_interfaces` of `node`'s shim (serving metrics on 127.0.0.1:9473 in its node).
fn bypassed(c: &Cluster, node: &str) -> u64 {
    sluice_testbed::scrape_metric(&c.ns(node), "127.0.0.1:9473", "sluice_bypassed_interfaces")
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

    // A CNI's program ahead of Sluice's (as Cilium attaches its own with TCX) that passes every
    // packet on: Sluice's never runs there.
    c.attach_ahead_of_sluice("n2", "veth-p2", TcxVerdict::Pass)
        .unwrap();
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
    c.apply_stand_in(CniStandIn::FlannelLikeOverlay).unwrap();
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

/// Applies the plan of p2 leaving through n1; returns it, and the rule of p2 through n3 (the
/// planned change the pinned-flow tests make).
fn p2_through_n1_then_n3(c: &mut Cluster) -> (serde_json::Value, Rule) {
    let before = c.plan(&[policy_a("p2")]);
    c.try_apply_plan(&serde_json::to_vec(&before).unwrap(), Duration::from_secs(20))
        .unwrap();
    let via_n3 = Rule {
        gateway: Gw::Node("n3", EGRESS_N3),
        ..policy_a("p2")
    };
    (before, via_n3)
}

/// A hostile pod fills the flow map (an LRU of 64 here) with flows of its own, in the middle of a
/// planned change: the pins it evicts (its own open connections' among them) let those flows
/// follow their entry to the new gateway and end there, as after a gateway failure. Nothing
/// worse: every datagram of the flood reaches the external host with the new gateway's egress IP
/// (none with a node's or the pod's own address), the map never holds more than its size, an
/// open connection goes through the old gateway or the new one and no other way, and new
/// connections work.
#[test]
fn a_pod_that_floods_the_flow_map_loses_only_its_own_pins_and_nothing_leaks() {
    use sluice_testbed::craft::{Listener, send_udp_from};
    const PORT: u16 = 9_995;
    if !nix::unistd::geteuid().is_root() {
        println!(
            "SKIP datapath_e2e::flow_map_flood: needs root (network namespaces, eBPF); CI runs it as root"
        );
        return;
    }
    let mut c = Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &["--flow-map-max", "64"])
        .expect("builds the cluster");
    let (before, via_n3) = p2_through_n1_then_n3(&mut c);
    let mut open = c.open_connections("p2", EXT_A, 3, EGRESS_N1).unwrap();
    let moved = c.with_lingering(c.plan(std::slice::from_ref(&via_n3)), &before, "n2", "n1");
    c.try_apply_plan(&serde_json::to_vec(&moved).unwrap(), Duration::from_secs(20))
        .unwrap();
    assert_eq!(
        open[0].exchange(1000, 1000).unwrap(),
        EGRESS_N1,
        "pinned before the flood"
    );

    // The flood: 1,000 flows (source ports) of one datagram each.
    let listener = Listener::bind(&c.ns("ext"), PORT).unwrap();
    let to: std::net::SocketAddr = (EXT_A.parse::<std::net::Ipv4Addr>().unwrap(), PORT).into();
    let p2 = c.ns("p2");
    for port in 20_000..21_000u16 {
        send_udp_from(&p2, port, to, b"flood", 1).unwrap();
    }
    let seen: std::collections::BTreeSet<String> = listener
        .collect(Duration::from_secs(1))
        .into_iter()
        .map(|(from, _)| from.ip().to_string())
        .collect();
    assert_eq!(
        seen,
        std::collections::BTreeSet::from([EGRESS_N3.to_owned()]),
        "sources of the flood"
    );
    let flows = c.shim_cli("n2", &["bpf", "flows"]).unwrap();
    let rows = flows.lines().skip(1).count();
    assert!(rows <= 64, "{rows} flows in a map of 64");

    // An open connection whose pin the LRU kept goes on through n1; one whose pin went follows
    // its entry to n3, whose NAT does not know it, and ends (or, were n3's conntrack to take it
    // up, leaves with n3's address). No other way.
    for conn in &mut open {
        if let Ok(seen) = conn.exchange(1000, 1000) {
            assert!(
                seen == EGRESS_N1 || seen == EGRESS_N3,
                "an open connection left with {seen}"
            );
        }
    }
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N3, "new connections");
}

/// One family's part in the pinned-flow scenarios: the policy's destination prefix, the
/// external address, and n1's and n3's egress IPs. Both over the testbed's IPv4 underlay (flows
/// are pinned over an IPv4 underlay only).
#[derive(Clone, Copy)]
struct Family {
    prefix: &'static str,
    ext: &'static str,
    egress_n1: &'static str,
    egress_n3: &'static str,
}

const IPV4: Family = Family {
    prefix: "203.0.113.0/24",
    ext: EXT_A,
    egress_n1: EGRESS_N1,
    egress_n3: EGRESS_N3,
};

const IPV6: Family = Family {
    prefix: "fd00:203:0:113::/64",
    ext: EXT_A_V6,
    egress_n1: EGRESS_N1_V6,
    egress_n3: EGRESS_N3_V6,
};

impl Family {
    /// `source`'s rule of policy `egress-a` through `gateway` (n1 or n3), with its egress IP.
    fn via(&self, source: &'static str, gateway: &'static str) -> Rule {
        let egress = if gateway == "n1" {
            self.egress_n1
        } else {
            self.egress_n3
        };
        Rule {
            policy: "egress-a",
            source,
            destination: self.prefix,
            gateway: Gw::Node(gateway, egress),
        }
    }
}

/// Both families: a pod on its own gateway node (p1 on n1, leaving from n1): a planned change sends it through
/// n3, while n1 stays pinnable for its own pods' flows. The connections open from n1 keep leaving
/// from n1 with its egress IP (SNAT rules and egress kept although no entry uses them), new ones go
/// through n3; once n1 is no longer pinnable, they follow the entry. And the other way round: p1
/// through n3, then from its own node with n3 pinnable (and keeping p1's entries): the open
/// connections stay on n3, their replies taken from the tunnel though p1's entry is local now.
#[test]
fn a_pod_on_its_own_gateway_node_keeps_its_open_flows_across_a_planned_change_both_ways() {
    let Some(mut c) = cluster("pinned_own") else {
        return;
    };
    own_node_flows_stay(&mut c, IPV4);
}

#[test]
fn an_ipv6_pod_on_its_own_gateway_node_keeps_its_open_flows_across_a_planned_change_both_ways() {
    let Some(mut c) = cluster("pinned_own_ipv6") else {
        return;
    };
    own_node_flows_stay(&mut c, IPV6);
}

fn own_node_flows_stay(c: &mut Cluster, f: Family) {
    let via_n3 = f.via("p1", "n3");
    let local = c.plan(&[f.via("p1", "n1")]);
    c.try_apply_plan(&serde_json::to_vec(&local).unwrap(), Duration::from_secs(20))
        .unwrap();
    let mut open = c.open_connections("p1", f.ext, 2, f.egress_n1).unwrap();
    let moved = c.with_pinnable(c.plan(std::slice::from_ref(&via_n3)), "n1", "n1");
    c.try_apply_plan(&serde_json::to_vec(&moved).unwrap(), Duration::from_secs(20))
        .unwrap();
    for conn in &mut open {
        assert_eq!(
            conn.exchange(100_000, 100_000).unwrap(),
            f.egress_n1,
            "an open flow of a pod on its own gateway node moved"
        );
    }
    assert_eq!(c.fetch("p1", f.ext).unwrap(), f.egress_n3, "a new flow stayed");
    let flows = c.shim_cli("n1", &["bpf", "flows"]).unwrap();
    assert!(flows.contains("(this node)"), "{flows}");
    // No longer pinnable: the flows follow their entry (n3's NAT does not know them: they end).
    c.apply(std::slice::from_ref(&via_n3));
    for conn in &mut open {
        let _ = conn.exchange(1000, 1000);
    }
    assert_eq!(c.fetch("p1", f.ext).unwrap(), f.egress_n3);

    // The other way round.
    let remote = c.plan(std::slice::from_ref(&via_n3));
    c.try_apply_plan(&serde_json::to_vec(&remote).unwrap(), Duration::from_secs(20))
        .unwrap();
    let mut open = c.open_connections("p1", f.ext, 2, f.egress_n3).unwrap();
    let back = c.with_lingering(c.plan(&[f.via("p1", "n1")]), &remote, "n1", "n3");
    c.try_apply_plan(&serde_json::to_vec(&back).unwrap(), Duration::from_secs(20))
        .unwrap();
    let delivered = c.counter("n1", "pinned_reply_delivered");
    for conn in &mut open {
        assert_eq!(
            conn.exchange(100_000, 100_000).unwrap(),
            f.egress_n3,
            "an open flow moved off its remote gateway when the pod's own node took over"
        );
    }
    assert!(c.counter("n1", "pinned_reply_delivered") > delivered);
    assert_eq!(
        c.fetch("p1", f.ext).unwrap(),
        f.egress_n1,
        "a new flow stayed on n3"
    );
}

/// Pinned UDP: a datagram flow (one source port) through n1 keeps n1 after a planned change to
/// n3 while n1 is pinnable (the external host sees n1's egress IP), datagrams of another source
/// port take n3, and once n1 is no longer pinnable the flow follows its entry to n3.
#[test]
fn a_udp_flow_keeps_its_gateway_across_a_planned_change() {
    use sluice_testbed::craft::{Listener, send_udp_from};
    const PORT: u16 = 9_996;
    const FLOW_PORT: u16 = 40_123;
    let Some(mut c) = cluster("pinned_udp") else {
        return;
    };
    let (before, via_n3) = p2_through_n1_then_n3(&mut c);
    let listener = Listener::bind(&c.ns("ext"), PORT).unwrap();
    let to: std::net::SocketAddr = (EXT_A.parse::<std::net::Ipv4Addr>().unwrap(), PORT).into();
    let p2 = c.ns("p2");
    // The sources the external host saw for datagrams sent from `port`.
    let seen_from = |port: u16| -> Vec<String> {
        send_udp_from(&p2, port, to, b"pinned?", 3).unwrap();
        let mut seen: Vec<String> = listener
            .collect(Duration::from_millis(500))
            .into_iter()
            .map(|(from, _)| from.ip().to_string())
            .collect();
        seen.dedup();
        seen
    };
    assert_eq!(seen_from(FLOW_PORT), [EGRESS_N1]);

    let moved = c.with_lingering(c.plan(std::slice::from_ref(&via_n3)), &before, "n2", "n1");
    c.try_apply_plan(&serde_json::to_vec(&moved).unwrap(), Duration::from_secs(20))
        .unwrap();
    let pinned_before = c.counter("n2", "pinned");
    assert_eq!(seen_from(FLOW_PORT), [EGRESS_N1], "the open UDP flow moved");
    assert!(c.counter("n2", "pinned") > pinned_before);
    assert_eq!(
        seen_from(FLOW_PORT + 1),
        [EGRESS_N3],
        "a new UDP flow took the old gateway"
    );
    let flows = c.shim_cli("n2", &["bpf", "flows"]).unwrap();
    assert!(
        flows
            .lines()
            .any(|l| l.starts_with("udp") && l.contains(&format!(":{FLOW_PORT}")) && l.contains("yes")),
        "{flows}"
    );

    // n1 is no longer pinnable: the flow follows its entry.
    c.apply(&[via_n3]);
    assert_eq!(
        seen_from(FLOW_PORT),
        [EGRESS_N3],
        "sent to a gateway no longer pinnable"
    );
}

/// Both families: pinned flows: the pod's gateway changes from n1 to n3 by a planned change while n1 keeps the
/// pod's entries and stays pinnable. The connections open through n1 keep going through it (same
/// egress IP, every byte), new ones go through n3, and n1's replies are taken. Once n1 is no
/// longer pinnable (failed, or drained), a flow pinned to it follows the entry at once.
#[test]
fn open_flows_keep_their_gateway_across_a_planned_change_and_new_ones_take_the_new_one() {
    let Some(mut c) = cluster("pinned_flows") else {
        return;
    };
    open_flows_stay(&mut c, IPV4);
}

#[test]
fn open_ipv6_flows_keep_their_gateway_across_a_planned_change_and_new_ones_take_the_new_one() {
    let Some(mut c) = cluster("pinned_flows_ipv6") else {
        return;
    };
    open_flows_stay(&mut c, IPV6);
}

fn open_flows_stay(c: &mut Cluster, f: Family) {
    let before = c.plan(&[f.via("p2", "n1")]);
    c.try_apply_plan(&serde_json::to_vec(&before).unwrap(), Duration::from_secs(20))
        .unwrap();
    let via_n3 = f.via("p2", "n3");
    let mut open = c.open_connections("p2", f.ext, 3, f.egress_n1).unwrap();
    let flows = c.shim_cli("n2", &["bpf", "flows"]).unwrap();
    assert!(
        flows.lines().filter(|l| l.contains("192.0.2.11")).count() >= 3,
        "{flows}"
    );

    // The planned change: p2's entry now names n3; n1 keeps p2's entries and is pinnable.
    let moved = c.with_lingering(c.plan(std::slice::from_ref(&via_n3)), &before, "n2", "n1");
    c.try_apply_plan(&serde_json::to_vec(&moved).unwrap(), Duration::from_secs(20))
        .unwrap();
    let pinned_before = c.counter("n2", "pinned");
    for conn in &mut open {
        assert_eq!(
            conn.exchange(100_000, 100_000).unwrap(),
            f.egress_n1,
            "an open flow moved"
        );
    }
    assert!(c.counter("n2", "pinned") > pinned_before);
    assert!(c.counter("n2", "pinned_reply_delivered") > 0);
    for _ in 0..3 {
        assert_eq!(
            c.fetch("p2", f.ext).unwrap(),
            f.egress_n3,
            "a new flow took the old gateway"
        );
    }
    // A closed flow is unpinned soon (FIN: closing), an open one stays as it was.
    drop(open.pop());
    assert_eq!(open[0].exchange(1000, 1000).unwrap(), f.egress_n1);
    let flows = c.shim_cli("n2", &["bpf", "flows"]).unwrap();
    assert!(flows.contains("(closing)"), "{flows}");

    // n1 is no longer pinnable: the flows pinned to it follow the entry (to n3, whose NAT
    // does not know them: they end, as a gateway failure ends them), new ones go to n3.
    c.apply(&[via_n3]);
    let pinned = c.counter("n2", "pinned");
    for conn in &mut open {
        let _ = conn.exchange(1000, 1000);
    }
    assert_eq!(
        c.counter("n2", "pinned"),
        pinned,
        "sent to a gateway no longer pinnable"
    );
    assert_eq!(c.fetch("p2", f.ext).unwrap(), f.egress_n3);
    let flows = c.shim_cli("n2", &["bpf", "flows"]).unwrap();
    assert!(
        !flows
            .lines()
            .skip(1)
            .any(|l| l.contains("192.0.2.11 ") && l.contains("yes")),
        "{flows}"
    );
}
