//! Connections survive planned changes (needs root): the operator (`dir:` source, in-process)
//! and a shim per node, the demo policy (two `egressGateways` entries, n1 and n3, one node
//! each). checkout-2 (on n2) loses its gateway (its shim killed), fails over to the other entry's
//! node and opens long-lived connections there; the failed gateway comes back, then the operator
//! restarts. Neither moves the pod back: every long-lived connection keeps working byte for
//! byte, and every new connection works and leaves with the same egress IP.

use std::{fs, time::Duration};

use sluice_testbed::{EGRESS_N1, EGRESS_N3, EXT_A, NODES, wait_for};

mod support;

use support::{Operator, first_connection_via, live_testbed, options, start_shim};

const POLICY: &str = include_str!("../../examples/demo/policy.yaml");

#[test]
fn a_recovered_gateway_and_an_operator_restart_break_no_connection() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP sticky_e2e: needs root (network namespaces, eBPF); CI runs it as root");
        return;
    }
    let (mut tb, dir, tokens) = live_testbed();
    fs::write(dir.join("policy.yaml"), POLICY).unwrap();
    let logs = |tb: &sluice_testbed::Testbed| -> String {
        NODES
            .iter()
            .map(|(n, _)| format!("--- shim-{n}\n{}", tb.log(&format!("shim-{n}"))))
            .collect()
    };
    let grace = Duration::from_secs(1);
    let operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, grace));
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
    let mut long_lived: Vec<_> = (0..3)
        .map(|_| tb.connect("p2", EXT_A).expect("a long-lived connection"))
        .collect();
    for c in &mut long_lived {
        assert_eq!(c.exchange(1000, 1000).unwrap(), survivor_ip);
    }
    let stream = tb.stream("p2", EXT_A);

    // The failed gateway comes back, and some time later the operator restarts.
    start_shim(&mut tb, failed, &tokens);
    let back = wait_for(Duration::from_secs(15), || {
        tb.log(&format!("shim-{failed}")).matches("plan applied").count() >= 2
    });
    assert!(back, "{failed}'s shim never came back\n{}", logs(&tb));
    std::thread::sleep(grace * 3);
    for c in &mut long_lived {
        assert_eq!(c.exchange(1000, 1000).unwrap(), survivor_ip, "\n{}", logs(&tb));
    }
    let plans =
        |tb: &sluice_testbed::Testbed, n: &str| tb.log(&format!("shim-{n}")).matches("plan received").count();
    let before: Vec<usize> = NODES.iter().map(|(n, _)| plans(&tb, n)).collect();
    drop(operator);
    let operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, grace));
    let reconnected = wait_for(Duration::from_secs(20), || {
        NODES.iter().zip(&before).all(|((n, _), b)| plans(&tb, n) > *b)
    });
    assert!(
        reconnected,
        "the shims never reached the new operator\n{}",
        logs(&tb)
    );
    std::thread::sleep(grace * 3);

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
