//! Connections survive planned changes (needs root): the operator (`dir:` source, in-process)
//! and a shim per node, the demo policy (two `egressGateways` entries, n1 and n3, one node
//! each), checkout-2 (on n2) with long-lived connections and a stream of new ones.
//! - Its gateway fails: it fails over to the other entry's node; the failed gateway comes back,
//!   then the operator restarts. Neither moves the pod back (sticky pods).
//! - Its gateway leaves the policy while it lives on, or is cordoned: the open connections stay
//!   on it (pinned flows, lingering entries), new ones take the other gateway.
//! - A gateway added, `maxGatewayNodes` 1 → 2 → 1, entries rewritten and reordered: nothing moves.
//! - Its gateway really fails: its connections end, new ones fail over in time.
//!
//! Every long-lived connection keeps working byte for byte, and no new connection fails.

use std::{fs, path::PathBuf, time::Duration};

use sluice_testbed::{Conn, EGRESS_N1, EGRESS_N3, EXT_A, EXT_A_V6, NODES, Stream, Testbed, wait_for};

mod support;

use support::{Operator, first_connection_via, live_testbed, options, start_shim};

use support::POLICY;
const GRACE: Duration = Duration::from_secs(1);

fn logs(tb: &Testbed) -> String {
    NODES
        .iter()
        .map(|(n, _)| format!("--- shim-{n}\n{}", tb.log(&format!("shim-{n}"))))
        .collect()
}

/// After a planned change of p2's gateway: its new connections soon leave with `new_ip`, the
/// `open` ones still with `old_ip` (byte for byte), and no connection of `stream` failed.
fn open_connections_stay_and_new_ones_move(
    tb: &Testbed,
    open: &mut [Conn],
    stream: Stream,
    old_ip: &str,
    new_ip: &str,
) {
    open_connections_to_stay(tb, EXT_A, open, stream, old_ip, new_ip);
}

/// [`open_connections_stay_and_new_ones_move`] for connections to `dst`.
fn open_connections_to_stay(
    tb: &Testbed,
    dst: &str,
    open: &mut [Conn],
    stream: Stream,
    old_ip: &str,
    new_ip: &str,
) {
    let moved = wait_for(Duration::from_secs(15), || {
        tb.fetch("p2", dst).is_ok_and(|seen| seen == new_ip)
    });
    assert!(moved, "p2's new connections never moved\n{}", logs(tb));
    std::thread::sleep(Duration::from_secs(2));
    for c in open.iter_mut() {
        let seen = c.exchange(100_000, 100_000);
        assert_eq!(
            seen.as_deref(),
            Ok(old_ip),
            "an open connection moved\n{}",
            logs(tb)
        );
    }
    let outcomes = stream.stop();
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| !matches!(o.as_deref(), Ok(ip) if ip == old_ip || ip == new_ip))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {}: {failed:?}\n{}",
        failed.len(),
        outcomes.len(),
        logs(tb)
    );
    assert_eq!(outcomes.last().unwrap().as_deref(), Ok(new_ip));
}

/// Stops `operator` and starts a new one on the same manifests; returns once every shim has a
/// plan of the new one, and three grace periods later.
fn restart(tb: &Testbed, operator: Operator, dir: &std::path::Path, tokens: &std::path::Path) -> Operator {
    let plans = |n: &str| tb.log(&format!("shim-{n}")).matches("plan received").count();
    let before: Vec<usize> = NODES.iter().map(|(n, _)| plans(n)).collect();
    drop(operator);
    let operator = Operator::start(tb.ns("ul"), options(dir, tokens, GRACE));
    let reconnected = wait_for(Duration::from_secs(20), || {
        NODES.iter().zip(&before).all(|((n, _), b)| plans(n) > *b)
    });
    assert!(
        reconnected,
        "the shims never reached the new operator\n{}",
        logs(tb)
    );
    std::thread::sleep(GRACE * 3);
    operator
}

/// The live testbed with the demo policy, the operator and every shim running, and the egress IP
/// p2's first connection left with; `None` (said out loud) without root.
fn started() -> Option<(Testbed, PathBuf, PathBuf, Operator, String)> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP sticky_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return None;
    }
    let (mut tb, dir, tokens) = live_testbed();
    fs::write(dir.join("policy.yaml"), POLICY).unwrap();
    let operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, GRACE));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }
    let mut first = String::new();
    let steered = wait_for(Duration::from_secs(30), || {
        tb.fetch("p2", EXT_A).is_ok_and(|seen| {
            first = seen;
            first == EGRESS_N1 || first == EGRESS_N3
        })
    });
    assert!(steered, "p2 never left through a gateway\n{}", logs(&tb));
    Some((tb, dir, tokens, operator, first))
}

#[test]
fn a_recovered_gateway_and_an_operator_restart_break_no_connection() {
    let Some((mut tb, dir, tokens, operator, first)) = started() else {
        return;
    };
    let grace = GRACE;
    let (failed, survivor, survivor_ip) = if first == EGRESS_N1 {
        ("n1", "n3", EGRESS_N3)
    } else {
        ("n3", "n1", EGRESS_N1)
    };

    // The pod's gateway fails: it goes to the other entry's node.
    tb.kill(&format!("shim-{failed}"));
    let moved = first_connection_via(
        &tb.ns("p2"),
        survivor_ip,
        std::time::Instant::now(),
        Duration::from_secs(10),
    );
    assert!(
        moved.is_some(),
        "p2 never failed over to {survivor}\n{}",
        logs(&tb)
    );
    let mut long_lived = tb.open_connections("p2", EXT_A, 3, survivor_ip).unwrap();
    let stream = tb.stream("p2", EXT_A);

    // The failed gateway comes back, and some time later the operator restarts.
    let applied = |tb: &Testbed| tb.log(&format!("shim-{failed}")).matches("plan applied").count();
    let applied_before = applied(&tb);
    start_shim(&mut tb, failed, &tokens);
    let back = wait_for(Duration::from_secs(15), || applied(&tb) > applied_before);
    assert!(back, "{failed}'s shim never came back\n{}", logs(&tb));
    std::thread::sleep(grace * 3);
    for c in &mut long_lived {
        assert_eq!(c.exchange(1000, 1000).unwrap(), survivor_ip, "\n{}", logs(&tb));
    }
    let operator = restart(&tb, operator, &dir, &tokens);

    let outcomes = stream.stop();
    assert!(outcomes.len() > 10, "{} connections", outcomes.len());
    let bad: Vec<_> = outcomes
        .iter()
        .filter(|o| o.as_deref() != Ok(survivor_ip))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} new connections: {bad:?}\n{}",
        bad.len(),
        outcomes.len(),
        logs(&tb)
    );
    for c in &mut long_lived {
        assert_eq!(c.exchange(1000, 1000).unwrap(), survivor_ip, "\n{}", logs(&tb));
    }
    assert_eq!(tb.fetch("p2", EXT_A).unwrap(), survivor_ip);
    drop(operator);
}

/// A planned change that moves a pod (its gateway removed from the policy while it lives on):
/// the open connections keep going through the old gateway (pinned on the pod's node; the old
/// gateway keeps the pod's entries), byte for byte, with its egress IP; new connections go
/// through the new gateway; none fails.
#[test]
fn a_gateway_removed_from_the_policy_keeps_its_open_flows_and_new_ones_move() {
    let Some((tb, dir, _tokens, _operator, first)) = started() else {
        return;
    };
    let (old, old_ip, new_ip) = if first == EGRESS_N1 {
        ("n1", EGRESS_N1, EGRESS_N3)
    } else {
        ("n3", EGRESS_N3, EGRESS_N1)
    };
    let mut open = tb.open_connections("p2", EXT_A, 3, old_ip).unwrap();
    let stream = tb.stream("p2", EXT_A);

    // The old gateway's entry goes from the policy.
    let entry = format!(
        "    - nodeSelector:\n        matchLabels: {{kubernetes.io/hostname: {old}}}\n      egressIP: {old_ip}\n"
    );
    assert!(POLICY.contains(&entry), "the demo policy changed");
    fs::write(dir.join("policy.yaml"), POLICY.replace(&entry, "")).unwrap();
    open_connections_stay_and_new_ones_move(&tb, &mut open, stream, old_ip, new_ip);
    let flows = tb
        .shim_cli(env!("CARGO_BIN_EXE_sluice-shim"), "n2", &["bpf", "flows"])
        .unwrap();
    let old_node_ip = sluice_testbed::node_ip(old);
    assert!(
        flows
            .lines()
            .any(|l| l.contains(old_node_ip) && l.contains("yes")),
        "no flow pinned to {old}\n{flows}"
    );
}

/// Draining the pod's gateway (`kubectl cordon`): its slot goes to the other candidate, new
/// connections take it, and the open ones stay on the drained gateway (pinned flows over its
/// lingering entries) byte for byte; none fails. Then the operator restarts in the middle of
/// the drain (a cluster upgrade drains nodes and moves the operator's pod alike): the new one
/// puts the lingering entries back from the flows the pod's node reports pinned, and still
/// none breaks or fails.
#[test]
fn a_cordoned_gateway_keeps_the_open_connections_also_across_an_operator_restart() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP sticky_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let (mut tb, dir, tokens) = live_testbed();
    // One entry over both candidates, leaving with each gateway's own address.
    let policy = "apiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata:\n  name: checkout-to-psp\n\
         spec:\n  selectors:\n    - podSelector:\n        matchLabels: {app: checkout}\n  \
         destinationCIDRs: [203.0.113.0/24]\n  egressGateway:\n    nodeSelector:\n      \
         matchLabels: {sluice.dev/egress: \"true\"}\n  failurePolicy: Drop\n";
    fs::write(dir.join("policy.yaml"), policy).unwrap();
    let operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, GRACE));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }
    let (n1, n3) = (sluice_testbed::node_ip("n1"), sluice_testbed::node_ip("n3"));
    let mut first = String::new();
    let steered = wait_for(Duration::from_secs(30), || {
        tb.fetch("p2", EXT_A).is_ok_and(|seen| {
            first = seen;
            first == n1 || first == n3
        })
    });
    assert!(steered, "p2 never left through a gateway\n{}", logs(&tb));
    let (drained, drained_ip, other_ip) = if first == n1 {
        ("n1", n1, n3)
    } else {
        ("n3", n3, n1)
    };
    let mut open = tb.open_connections("p2", EXT_A, 3, drained_ip).unwrap();
    // checkout-1 lives on n1: on its own gateway node when n1 is drained (its connections
    // leave from there), else moved onto its own node by the drain (they stay on n3).
    let mut open_p1 = tb.open_connections("p1", EXT_A, 2, drained_ip).unwrap();
    let p1_stays = |tb: &Testbed, open_p1: &mut Vec<Conn>, when: &str| {
        for c in open_p1.iter_mut() {
            assert_eq!(
                c.exchange(100_000, 100_000).as_deref(),
                Ok(drained_ip),
                "an open connection of p1 (on n1) broke or moved {when}\n{}",
                logs(tb)
            );
        }
    };
    let stream = tb.stream("p2", EXT_A);

    let cluster = fs::read_to_string(dir.join("cluster.yaml")).unwrap();
    let pod_cidr = if drained == "n1" {
        "10.244.1.0/24"
    } else {
        "10.244.3.0/24"
    };
    let spec = format!("spec:\n  podCIDRs: [{pod_cidr}]\n");
    assert!(cluster.contains(&spec), "the demo cluster changed");
    fs::write(
        dir.join("cluster.yaml"),
        cluster.replace(
            &spec,
            &format!("spec:\n  podCIDRs: [{pod_cidr}]\n  unschedulable: true\n"),
        ),
    )
    .unwrap();
    open_connections_stay_and_new_ones_move(&tb, &mut open, stream, drained_ip, other_ip);
    p1_stays(&tb, &mut open_p1, "at the drain");
    assert_eq!(tb.fetch("p1", EXT_A).unwrap(), other_ip, "p1's new connections");

    let stream = tb.stream("p2", EXT_A);
    let operator = restart(&tb, operator, &dir, &tokens);
    for c in &mut open {
        let seen = c.exchange(100_000, 100_000);
        assert_eq!(
            seen.as_deref(),
            Ok(drained_ip),
            "an open connection broke or moved across the operator restart\n{}",
            logs(&tb)
        );
    }
    let outcomes = stream.stop();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.as_deref() != Ok(other_ip)).collect();
    assert!(
        failed.is_empty(),
        "{} of {} new connections across the restart: {failed:?}\n{}",
        failed.len(),
        outcomes.len(),
        logs(&tb)
    );

    // The drain ends with its connections (not at its 10-minute timeout): once p2's node counts
    // none left, the drained gateway lets go of p2's entries.
    let holds_p2 = |tb: &Testbed| {
        tb.shim_cli(env!("CARGO_BIN_EXE_sluice-shim"), drained, &["bpf", "list"])
            .unwrap()
            .contains("10.244.2.10")
    };
    p1_stays(&tb, &mut open_p1, "across the operator restart");
    assert!(
        holds_p2(&tb),
        "the drained gateway keeps p2's entries while it has connections"
    );
    drop(open);
    drop(open_p1);
    let released = wait_for(Duration::from_secs(30), || !holds_p2(&tb));
    assert!(
        released,
        "the drain outlived its connections by 30 s\n{}",
        logs(&tb)
    );
    drop(operator);
}

/// Policy `checkout-to-psp` over the gateway nodes that `spec` (the YAML of `egressGateway(s)`,
/// indented for `spec:`) names.
fn policy_with(gateways: &str) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata:\n  name: checkout-to-psp\n\
         spec:\n  selectors:\n    - podSelector:\n        matchLabels: {{app: checkout}}\n  \
         destinationCIDRs: [203.0.113.0/24]\n{gateways}  failurePolicy: Drop\n"
    )
}

/// One change after another, none of which takes p2's gateway away: a gateway added (a node
/// labelled), `maxGatewayNodes` 1 → 2 → 1, the policy rewritten with one entry per node, and
/// those entries reordered. Through all of it p2's long-lived connections keep working byte for
/// byte with the same egress IP, and every new connection works and leaves with it too.
#[test]
fn no_planned_change_moves_a_pod_off_a_gateway_that_still_serves() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP sticky_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let (mut tb, dir, tokens) = live_testbed();
    // n3 is no candidate yet.
    let cluster = fs::read_to_string(dir.join("cluster.yaml")).unwrap();
    let n3_labelled = "labels: {kubernetes.io/hostname: n3, sluice.dev/egress: \"true\"}";
    assert!(cluster.contains(n3_labelled), "the demo cluster changed");
    fs::write(
        dir.join("cluster.yaml"),
        cluster.replace(n3_labelled, "labels: {kubernetes.io/hostname: n3}"),
    )
    .unwrap();
    let one_entry = |max: u32| {
        policy_with(&format!(
            "  egressGateway:\n    nodeSelector:\n      matchLabels: {{sluice.dev/egress: \"true\"}}\n    \
             maxGatewayNodes: {max}\n"
        ))
    };
    let entry =
        |n: &str| format!("    - nodeSelector:\n        matchLabels: {{kubernetes.io/hostname: {n}}}\n");
    let two_entries = |first: &str, second: &str| {
        policy_with(&format!("  egressGateways:\n{}{}", entry(first), entry(second)))
    };
    fs::write(dir.join("policy.yaml"), one_entry(1)).unwrap();
    let _operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, GRACE));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }
    let n1 = sluice_testbed::node_ip("n1");
    let steered = wait_for(Duration::from_secs(30), || {
        tb.fetch("p2", EXT_A).is_ok_and(|seen| seen == n1)
    });
    assert!(steered, "p2 never left through n1\n{}", logs(&tb));
    let mut open: Vec<_> = (0..3)
        .map(|_| tb.connect("p2", EXT_A).expect("a long-lived connection"))
        .collect();
    let stream = tb.stream("p2", EXT_A);

    // Each step writes one manifest file.
    let steps = [
        ("a gateway added", "cluster.yaml", cluster.clone()),
        ("maxGatewayNodes 1 -> 2", "policy.yaml", one_entry(2)),
        ("maxGatewayNodes 2 -> 1", "policy.yaml", one_entry(1)),
        ("one entry per node", "policy.yaml", two_entries("n1", "n3")),
        ("entries reordered", "policy.yaml", two_entries("n3", "n1")),
    ];
    for (step, file, content) in &steps {
        fs::write(dir.join(file), content).unwrap();
        // The operator's source polls every 100 ms; a change is planned and pushed well within 2 s.
        std::thread::sleep(Duration::from_secs(2));
        for c in &mut open {
            let seen = c.exchange(100_000, 100_000);
            assert_eq!(
                seen.as_deref(),
                Ok(n1),
                "after {step}: an open connection\n{}",
                logs(&tb)
            );
        }
        assert_eq!(
            tb.fetch("p2", EXT_A).as_deref(),
            Ok(n1),
            "after {step}: a new connection"
        );
    }
    let outcomes = stream.stop();
    let other: Vec<_> = outcomes.iter().filter(|o| o.as_deref() != Ok(n1)).collect();
    assert!(
        other.is_empty(),
        "{} of {} new connections: {other:?}\n{}",
        other.len(),
        outcomes.len(),
        logs(&tb)
    );
}

/// The gateway really fails (its uplink goes down): the connections it carried end (their NAT
/// state was there: documented, unavoidable), and pinning does not hold anything to it: new
/// connections leave through the other gateway within the failover time.
#[test]
fn a_failed_gateway_ends_its_connections_and_new_ones_fail_over_in_time() {
    let Some((tb, _dir, _tokens, _operator, first)) = started() else {
        return;
    };
    let (failed, survivor_ip) = if first == EGRESS_N1 {
        ("n1", EGRESS_N3)
    } else {
        ("n3", EGRESS_N1)
    };
    let mut open = tb.connect("p2", EXT_A).expect("a long-lived connection");
    assert_eq!(open.exchange(1000, 1000).as_deref(), Ok(first.as_str()));
    let down = std::time::Instant::now();
    tb.ip_on(failed, &["link", "set", "eth0", "down"]);
    let took = first_connection_via(&tb.ns("p2"), survivor_ip, down, GRACE * 5)
        .unwrap_or_else(|| panic!("p2 never failed over\n{}", logs(&tb)));
    println!("real failure with pinning on: first new connection through the survivor after {took:?}");
    assert!(took < GRACE * 2, "failover took {took:?}\n{}", logs(&tb));
    assert!(
        open.exchange(1000, 1000).is_err(),
        "a connection outlived its gateway's NAT state"
    );
}

/// The drain of the pod's gateway with IPv6 connections open (dual-stack cluster, IPv4
/// underlay): new IPv6 connections take the other candidate, the open ones stay on the drained
/// gateway byte for byte (pinned IPv6 flows over its lingering entries), also across an
/// operator restart (the new one takes them from the flows p2's node reports), and once they
/// are closed the drained gateway lets go of p2's IPv6 entries.
#[test]
fn open_ipv6_connections_survive_a_drain_and_an_operator_restart() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP sticky_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let (mut tb, dir, tokens) = live_testbed();
    fs::write(dir.join("cluster.yaml"), support::dual_stack_cluster()).unwrap();
    let policy = "apiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata:\n  name: checkout-to-psp\n\
         spec:\n  selectors:\n    - podSelector:\n        matchLabels: {app: checkout}\n  \
         destinationCIDRs: [203.0.113.0/24, \"fd00:203:0:113::/64\"]\n  egressGateway:\n    nodeSelector:\n      \
         matchLabels: {sluice.dev/egress: \"true\"}\n  failurePolicy: Drop\n";
    fs::write(dir.join("policy.yaml"), policy).unwrap();
    let operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, GRACE));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }
    let (n1, n3) = (tb.node_ip_v6("n1"), tb.node_ip_v6("n3"));
    let mut first = String::new();
    let steered = wait_for(Duration::from_secs(30), || {
        tb.fetch("p2", EXT_A_V6).is_ok_and(|seen| {
            first = seen;
            first == n1 || first == n3
        })
    });
    assert!(steered, "p2's IPv6 never left through a gateway\n{}", logs(&tb));
    let (drained, drained_ip, other_ip) = if first == n1 {
        ("n1", n1, n3)
    } else {
        ("n3", n3, n1)
    };
    let mut open = tb.open_connections("p2", EXT_A_V6, 3, &drained_ip).unwrap();
    let stream = tb.stream("p2", EXT_A_V6);

    let cluster = fs::read_to_string(dir.join("cluster.yaml")).unwrap();
    let n = &drained[1..];
    let spec = format!("spec:\n  podCIDRs: [10.244.{n}.0/24, \"fd00:10:244:{n}::/64\"]\n");
    assert!(
        cluster.contains(&spec),
        "the dual-stack cluster changed: {cluster}"
    );
    fs::write(
        dir.join("cluster.yaml"),
        cluster.replace(&spec, &format!("{spec}  unschedulable: true\n")),
    )
    .unwrap();
    open_connections_to_stay(&tb, EXT_A_V6, &mut open, stream, &drained_ip, &other_ip);

    let stream = tb.stream("p2", EXT_A_V6);
    let operator = restart(&tb, operator, &dir, &tokens);
    for c in &mut open {
        assert_eq!(
            c.exchange(100_000, 100_000).as_deref(),
            Ok(drained_ip.as_str()),
            "an open IPv6 connection broke or moved across the operator restart\n{}",
            logs(&tb)
        );
    }
    let outcomes = stream.stop();
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| o.as_deref() != Ok(other_ip.as_str()))
        .collect();
    assert!(failed.is_empty(), "{failed:?}\n{}", logs(&tb));

    let holds_p2 = |tb: &Testbed| {
        tb.shim_cli(env!("CARGO_BIN_EXE_sluice-shim"), drained, &["bpf", "list"])
            .unwrap()
            .contains("fd00:10:244:2::10")
    };
    assert!(
        holds_p2(&tb),
        "the drained gateway keeps p2's IPv6 entries while it has connections"
    );
    drop(open);
    let released = wait_for(Duration::from_secs(30), || !holds_p2(&tb));
    assert!(
        released,
        "the drain outlived its IPv6 connections by 30 s\n{}",
        logs(&tb)
    );
    drop(operator);
}
