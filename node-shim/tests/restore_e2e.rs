//! Sluice's kernel state that someone else removes comes back, tested with real packets in network
//! namespaces (needs root; see `datapath_e2e.rs` for the harness). Another agent's
//! `nft flush ruleset` or a deleted `ip rule` must not make steered traffic leave with the node IP
//! for longer than a tick.

use std::time::{Duration, Instant};

use sluice_testbed::{EGRESS_N1, EXT_A, FileCluster as Cluster, Gw, Rule, wait_for};

/// The tick of the shims the harness starts (`--interval-ms 100`).
const TICK: Duration = Duration::from_millis(100);

/// Where each node's shim serves its metrics, inside the node's namespace.
const METRICS: &str = "127.0.0.1:9473";

/// Returns the cluster (its shims serving metrics), or `None` (after printing a SKIP line) when
/// not root.
fn cluster(name: &str) -> Option<Cluster> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP restore_e2e::{name}: needs root (network namespaces, eBPF); CI runs it as root");
        return None;
    }
    Some(
        Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &["--metrics-addr", METRICS])
            .expect("builds the cluster"),
    )
}

/// `sluice_state_restored_total{object}` of `node`'s shim.
fn restored(c: &Cluster, node: &str, object: &str) -> u64 {
    let series = format!("sluice_state_restored_total{{object=\"{object}\"}}");
    sluice_testbed::scrape_metric(&c.ns(node), METRICS, &series)
}

/// What the kernel of `node` holds of Sluice's table, rules and routes, as `nft`/`ip` print them.
fn kernel_state(c: &Cluster, node: &str, egress_table: Option<&str>) -> String {
    let mut state = c
        .run(node, "nft", &["list", "table", "inet", "sluice"])
        .unwrap_or_default();
    for family in ["-4", "-6"] {
        for pref in ["8473", "8474"] {
            state += &c.ip(node, &[family, "rule", "show", "pref", pref]).unwrap();
        }
        for table in ["8473"].into_iter().chain(egress_table) {
            state += &c.ip(node, &[family, "route", "show", "table", table]).unwrap();
        }
    }
    state
}

#[test]
fn a_flushed_ruleset_and_deleted_rules_come_back_within_a_tick() {
    let Some(mut c) = cluster("flushed_ruleset_and_deleted_rules") else {
        return;
    };
    let objects = [
        "nft_table",
        "reply_rule",
        "reply_route",
        "egress_rule",
        "egress_route",
    ];
    c.apply(&[Rule {
        policy: "egress-a",
        source: "p2",
        destination: "203.0.113.0/24",
        gateway: Gw::Node("n1", EGRESS_N1),
    }]);
    assert_eq!(c.fetch("p2", EXT_A).unwrap(), EGRESS_N1);
    // The gateway's egress rule (its SNATed traffic leaves by eth0) and the table it looks up.
    let egress_rule = c.ip("n1", &["-4", "rule", "show", "pref", "8474"]).unwrap();
    let egress_table = egress_rule
        .split_whitespace()
        .last()
        .expect("one egress rule on the gateway")
        .to_owned();
    let before = [
        ("n1", kernel_state(&c, "n1", Some(&egress_table))),
        ("n2", kernel_state(&c, "n2", None)),
    ];
    assert!(before[0].1.contains("snat ip to 192.0.2.101"), "{}", before[0].1);
    assert!(before[0].1.contains("default dev sluice-vx0"), "{}", before[0].1);
    // Ticks that find everything in place put nothing back, also when another agent changes
    // something else in the ruleset.
    c.nft(
        "n1",
        "table ip other {\n chain input {\n  type filter hook input priority 0;\n }\n}\n",
    )
    .unwrap();
    std::thread::sleep(5 * TICK);
    for node in ["n1", "n2"] {
        for object in objects {
            assert_eq!(restored(&c, node, object), 0, "{node} {object}");
        }
    }

    let stream = c.stream_with_timeout("p2", EXT_A, Duration::from_secs(1));
    std::thread::sleep(5 * TICK);
    // Another agent wipes the ruleset and Sluice's rules and routes, on the gateway and on the
    // pod's node.
    for node in ["n1", "n2"] {
        c.run(node, "nft", &["flush", "ruleset"]).unwrap();
        for family in ["-4", "-6"] {
            c.ip_on(node, &[family, "rule", "del", "pref", "8473"]);
            c.ip_on(node, &[family, "route", "flush", "table", "8473"]);
        }
    }
    for family in ["-4", "-6"] {
        c.ip_on("n1", &[family, "rule", "del", "pref", "8474"]);
        c.ip_on("n1", &[family, "route", "flush", "table", &egress_table]);
    }
    let damaged = Instant::now();
    // One tick, plus a little for a loaded machine.
    let bound = TICK + Duration::from_millis(900);
    std::thread::sleep(bound + Duration::from_secs(2));
    let results = stream.stop_timed();

    let after: Vec<_> = results.iter().filter(|(t, _)| *t > damaged + bound).collect();
    let last_bad = results
        .iter()
        .filter(|(t, r)| *t > damaged && r.as_deref() != Ok(EGRESS_N1))
        .map(|(t, _)| *t - damaged)
        .max();
    eprintln!(
        "{} connections, {} of them started {bound:?} or more after the damage; the last one \
         that failed or took another path started {last_bad:?} after it",
        results.len(),
        after.len()
    );
    let bad: Vec<_> = after
        .iter()
        .filter(|(_, r)| r.as_deref() != Ok(EGRESS_N1))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} connections started {bound:?} after the damage failed or left with another \
         address: {bad:?}",
        bad.len(),
        after.len()
    );
    assert!(
        after.len() >= 5,
        "the stream ran on after the damage ({} connections)",
        after.len()
    );
    let ok_before = results
        .iter()
        .filter(|(t, r)| *t < damaged && r.as_deref() == Ok(EGRESS_N1))
        .count();
    assert!(
        ok_before > 0,
        "the stream was steered before the damage: {results:?}"
    );

    for (node, state) in &before {
        let table = (*node == "n1").then_some(egress_table.as_str());
        assert!(
            wait_for(Duration::from_secs(5), || kernel_state(&c, node, table) == *state),
            "{node} holds what it held before:\n{state}\nnow:\n{}",
            kernel_state(&c, node, table)
        );
    }
    for (node, objects) in [
        ("n1", &objects[..]),
        ("n2", &["nft_table", "reply_rule", "reply_route"][..]),
    ] {
        for object in objects {
            assert!(
                restored(&c, node, object) >= 1,
                "{node} counted putting back {object}"
            );
        }
    }
    // The source node serves no policy: it has no egress rules to put back.
    assert_eq!(restored(&c, "n2", "egress_rule"), 0);
}
