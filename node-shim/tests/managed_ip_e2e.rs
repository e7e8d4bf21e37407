//! Managed egress IPs end to end in network namespaces (needs root): the operator (`dir:`
//! source, in-process, in the underlay's namespace) and a `sluice-shim run --operator` per node.
//! A policy's one managed address (`egressIPs`) is held by one of its two candidate gateways;
//! the external host sees it. The holder's shim is killed (SIGKILL, the node lives on): the
//! other node claims and announces the address, the external host sees the same address again,
//! the underlay router's neighbour entry for it now names the new node, and the dead shim's node
//! stops answering for it by itself (the datapath fence). The killed shim comes back: it gives
//! the address up, and at no time do two nodes answer for it. The same for a dual-stack slot
//! (an IPv4 and an IPv6 address, moved together).

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use sluice_shim::egress_ip::{ArpOperation, ArpPacket, ArpSocket, NdpMessage, NdpPacket, NdpSocket};
use sluice_testbed::{EXT_A, EXT_A_V6, NODES, Testbed, UNDERLAY_IP_V6, in_netns, wait_for};

mod support;

use support::{Operator, first_connection_via, options, start_shim};

/// In the underlay's subnet, used by nothing else in the testbed.
const MANAGED: &str = "192.0.2.150";

/// The checkout pods leave through n1 or n3 (`sluice.dev/egress`), with one managed address.
fn managed_policy() -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: EgressGatewayPolicy\nmetadata:\n  name: checkout-to-psp\n\
         spec:\n  selectors:\n    - podSelector:\n        matchLabels: {{app: checkout}}\n      \
         namespaceSelector:\n        matchLabels: {{team: payments}}\n  destinationCIDRs: [203.0.113.0/24]\n  \
         egressGateway:\n    nodeSelector:\n      matchLabels: {{sluice.dev/egress: \"true\"}}\n    \
         egressIPs: [{MANAGED}]\n  failurePolicy: Drop\n"
    )
}

/// The live testbed with the managed policy.
fn live_testbed() -> (Testbed, PathBuf, PathBuf) {
    let (tb, dir, tokens) = support::live_testbed();
    fs::write(dir.join("policy.yaml"), managed_policy()).unwrap();
    (tb, dir, tokens)
}

/// Whether `node`'s uplink holds the managed address.
fn holds(tb: &Testbed, node: &str) -> bool {
    tb.ip(node, &["-4", "-o", "addr", "show", "dev", "eth0"])
        .is_ok_and(|out| out.contains(&format!("{MANAGED}/32")))
}

/// `node`'s uplink MAC.
fn mac_of(tb: &Testbed, node: &str) -> String {
    let out = tb.ip(node, &["-o", "link", "show", "dev", "eth0"]).unwrap();
    let after = out.split("link/ether ").nth(1).expect("an Ethernet uplink");
    after.split_whitespace().next().unwrap().to_owned()
}

/// The underlay router's neighbour entry for the managed address (its MAC, if it has one).
fn router_entry(tb: &Testbed) -> Option<String> {
    let out = tb.ip("ul", &["neigh", "show", MANAGED]).ok()?;
    let after = out.split("lladdr ").nth(1)?;
    after.split_whitespace().next().map(str::to_owned)
}

/// Who answers an ARP request for the managed address on the underlay, as the router sees it.
fn answerers(tb: &Testbed) -> Vec<String> {
    answerers_of(tb, MANAGED)
}

fn logs(tb: &Testbed) -> String {
    NODES
        .iter()
        .map(|(n, _)| format!("--- shim-{n}\n{}", tb.log(&format!("shim-{n}"))))
        .collect()
}

/// Whether to skip (not root), said out loud.
fn skip_without_root() -> bool {
    let skip = !nix::unistd::geteuid().is_root();
    if skip {
        println!("SKIP managed_ip_e2e: needs root (network namespaces, eBPF); CI runs it as root");
    }
    skip
}

/// The address ends up on `other` only (within `timeout`), p2 leaves with it again, and only
/// `other` answers for it.
fn assert_moved_to(tb: &Testbed, other: &str, from: &str, timeout: Duration) {
    let moved = wait_for(timeout, || holds(tb, other) && !holds(tb, from));
    assert!(moved, "{MANAGED} did not move to {other}\n{}", logs(tb));
    let took = first_connection_via(&tb.ns("p2"), MANAGED, Instant::now(), Duration::from_secs(10));
    assert!(took.is_some(), "p2 never left with {MANAGED} again\n{}", logs(tb));
    assert_eq!(answerers(tb), [mac_of(tb, other)], "\n{}", logs(tb));
}

/// How the holder fails.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// Its shim is killed (SIGKILL); the node lives on, and the datapath fence lets go.
    ShimKilled,
    /// Its uplink goes down (the realistic failure): its shim gives the address up.
    UplinkDown,
}

#[test]
fn a_managed_egress_ip_moves_when_its_gateway_s_shim_is_killed_and_only_one_node_answers_for_it() {
    moves_and_only_one_node_answers(Failure::ShimKilled);
}

#[test]
fn a_managed_egress_ip_moves_when_its_gateway_s_uplink_goes_down_and_only_one_node_answers_for_it() {
    moves_and_only_one_node_answers(Failure::UplinkDown);
}

fn moves_and_only_one_node_answers(failure: Failure) {
    if skip_without_root() {
        return;
    }
    let grace = Duration::from_secs(1);
    let (mut tb, dir, tokens) = live_testbed();
    let _operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, grace));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }

    // p2 (on n2) leaves with the managed address, which exactly one candidate holds.
    let steered = wait_for(Duration::from_secs(30), || {
        tb.fetch("p2", EXT_A).is_ok_and(|seen| seen.contains(MANAGED))
    });
    assert!(steered, "p2 never left with {MANAGED}\n{}", logs(&tb));
    let holders: Vec<&str> = ["n1", "n3"].into_iter().filter(|n| holds(&tb, n)).collect();
    assert_eq!(holders.len(), 1, "{holders:?} hold {MANAGED}\n{}", logs(&tb));
    let (dead, survivor) = if holders[0] == "n1" {
        ("n1", "n3")
    } else {
        ("n3", "n1")
    };
    assert!(!holds(&tb, "n2"), "n2 cannot be a gateway");
    let (dead_mac, survivor_mac) = (mac_of(&tb, dead), mac_of(&tb, survivor));
    assert_eq!(router_entry(&tb), Some(dead_mac.clone()));
    assert_eq!(answerers(&tb), std::slice::from_ref(&dead_mac));

    // Until the operator moves the address, p2's node may still send to the failed node: the
    // move is timed to the first connection after the survivor holds the address.
    let failed = Instant::now();
    match failure {
        Failure::ShimKilled => {
            tb.kill(&format!("shim-{dead}"));
        }
        Failure::UplinkDown => tb.ip_on(dead, &["link", "set", "eth0", "down"]),
    }
    let moved = wait_for(Duration::from_secs(10), || holds(&tb, survivor));
    assert!(moved, "{survivor} never took {MANAGED}\n{}", logs(&tb));
    let took = first_connection_via(&tb.ns("p2"), MANAGED, failed, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("p2 never left with {MANAGED} again\n{}", logs(&tb)));
    println!(
        "MANAGED-IP FAILOVER {failure:?} grace={grace:?} took={took:?} ({dead} failed; first new connection with {MANAGED})"
    );
    assert!(took < grace * 3, "failover took {took:?}\n{}", logs(&tb));
    match failure {
        // The node lives on with the address on its uplink; the fence keeps it quiet.
        Failure::ShimKilled => assert!(holds(&tb, dead), "the dead shim's node kept the address"),
        // Its shim gave it up when the link went.
        Failure::UplinkDown => assert!(!holds(&tb, dead), "{dead} kept {MANAGED}\n{}", logs(&tb)),
    }
    // The router learnt the move from the announcements, and only the survivor answers.
    assert_eq!(router_entry(&tb), Some(survivor_mac.clone()));
    for _ in 0..5 {
        assert_eq!(
            answerers(&tb),
            std::slice::from_ref(&survivor_mac),
            "\n{}",
            logs(&tb)
        );
    }

    // The failed node comes back. It does not hold the address, and at no time do two nodes
    // answer for it.
    match failure {
        Failure::ShimKilled => start_shim(&mut tb, dead, &tokens),
        Failure::UplinkDown => tb.ip_on(dead, &["link", "set", "eth0", "up"]),
    }
    let back = Instant::now();
    while back.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            answerers(&tb),
            std::slice::from_ref(&survivor_mac),
            "\n{}",
            logs(&tb)
        );
    }
    assert!(!holds(&tb, dead), "{dead} holds {MANAGED} again\n{}", logs(&tb));
    assert!(tb.fetch("p2", EXT_A).unwrap().contains(MANAGED));
    assert_eq!(router_entry(&tb), Some(survivor_mac));
}

/// The managed address is already another host's (here the underlay router's): no node claims
/// it, the shims say who answers, and the selected pod's traffic is dropped, never sent with a
/// node's address.
#[test]
fn a_managed_egress_ip_another_host_holds_is_never_claimed() {
    if skip_without_root() {
        return;
    }
    let (mut tb, dir, tokens) = live_testbed();
    tb.ip("ul", &["addr", "add", &format!("{MANAGED}/32"), "dev", "br0"])
        .unwrap();
    let router_mac = {
        let out = tb.ip("ul", &["-o", "link", "show", "dev", "br0"]).unwrap();
        let after = out.split("link/ether ").nth(1).unwrap();
        after.split_whitespace().next().unwrap().to_owned()
    };
    let _operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, Duration::from_secs(1)));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }
    let reported = wait_for(Duration::from_secs(30), || {
        ["n1", "n3"].iter().any(|n| {
            let log = tb.log(&format!("shim-{n}"));
            log.contains("another host answers for the managed egress IP") && log.contains(&router_mac)
        })
    });
    assert!(reported, "no shim reported {router_mac} answering\n{}", logs(&tb));
    // Until a node's shim has applied its first plan, nothing of Sluice is on that node yet: the
    // claim below is about programmed nodes.
    let programmed = wait_for(Duration::from_secs(30), || {
        NODES
            .iter()
            .all(|(n, _)| tb.log(&format!("shim-{n}")).contains("plan applied"))
    });
    assert!(programmed, "not every shim applied its plan\n{}", logs(&tb));
    for _ in 0..5 {
        for node in ["n1", "n2", "n3"] {
            assert!(!holds(&tb, node), "{node} claimed {MANAGED}\n{}", logs(&tb));
        }
        let seen = tb.fetch("p2", EXT_A);
        assert!(seen.is_err(), "p2's traffic left as {seen:?}\n{}", logs(&tb));
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Who answers ARP requests for `ip` on the underlay (every distinct MAC within 300 ms).
fn answerers_of(tb: &Testbed, ip: &str) -> Vec<String> {
    let ul = tb.ns("ul");
    let ip: Ipv4Addr = ip.parse().unwrap();
    in_netns(&ul, move || {
        let ifindex = nix::net::if_::if_nametoindex("br0").expect("br0");
        let socket = ArpSocket::open(ifindex).expect("an ARP socket on br0");
        let request = ArpPacket {
            sender_ip: "192.0.2.1".parse().unwrap(),
            ..ArpPacket::probe(socket.mac(), ip)
        };
        socket.send(&request).expect("sending a request");
        let deadline = Instant::now() + Duration::from_millis(300);
        let mut macs = Vec::new();
        while let Ok(Some(p)) = socket.receive(deadline) {
            let mac = p.sender_mac.to_string();
            // Replies to this request only: announcements (gratuitous, to the address itself)
            // of a node claiming it are no answer, and may follow another node's answer within
            // the window when the address has just moved.
            let answer =
                p.operation == ArpOperation::Reply && p.sender_ip == ip && p.target_ip == request.sender_ip;
            if answer && !macs.contains(&mac) {
                macs.push(mac);
            }
        }
        macs
    })
}

/// Two managed addresses, two candidates: each node holds one. An operator restart moves
/// neither. One node's shim dies: the other holds both, and both addresses still answer, from
/// it alone.
#[test]
fn two_managed_addresses_stay_put_across_an_operator_restart_and_both_survive_a_failure() {
    if skip_without_root() {
        return;
    }
    const SECOND: &str = "192.0.2.151";
    let (mut tb, dir, tokens) = live_testbed();
    fs::write(
        dir.join("policy.yaml"),
        managed_policy().replace(&format!("[{MANAGED}]"), &format!("[{MANAGED}, {SECOND}]")),
    )
    .unwrap();
    let grace = Duration::from_secs(1);
    let operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, grace));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }
    let holder = |tb: &Testbed, ip: &str| -> Vec<&'static str> {
        ["n1", "n2", "n3"]
            .into_iter()
            .filter(|n| {
                tb.ip(n, &["-4", "-o", "addr", "show", "dev", "eth0"])
                    .is_ok_and(|out| out.contains(&format!("{ip}/32")))
            })
            .collect()
    };
    let placed = wait_for(Duration::from_secs(30), || {
        holder(&tb, MANAGED).len() == 1 && holder(&tb, SECOND).len() == 1
    });
    assert!(placed, "both addresses held\n{}", logs(&tb));
    let (first, second) = (holder(&tb, MANAGED)[0], holder(&tb, SECOND)[0]);
    assert_ne!(first, second, "one address per node while nodes suffice");
    assert_eq!(answerers_of(&tb, MANAGED), [mac_of(&tb, first)]);
    assert_eq!(answerers_of(&tb, SECOND), [mac_of(&tb, second)]);

    // A new operator (a restart): no address moves.
    drop(operator);
    let _operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, grace));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        assert_eq!(holder(&tb, MANAGED), [first], "\n{}", logs(&tb));
        assert_eq!(holder(&tb, SECOND), [second], "\n{}", logs(&tb));
        std::thread::sleep(Duration::from_millis(200));
    }

    // The first node's shim dies: the second node holds both, and both answer from it.
    tb.kill(&format!("shim-{first}"));
    let moved = wait_for(Duration::from_secs(10), || holder(&tb, MANAGED).contains(&second));
    assert!(moved, "{second} never took {MANAGED}\n{}", logs(&tb));
    let survivor = mac_of(&tb, second);
    for _ in 0..3 {
        assert_eq!(
            answerers_of(&tb, MANAGED),
            std::slice::from_ref(&survivor),
            "\n{}",
            logs(&tb)
        );
        assert_eq!(
            answerers_of(&tb, SECOND),
            std::slice::from_ref(&survivor),
            "\n{}",
            logs(&tb)
        );
    }
}

/// The live testbed with the operator and every shim (`args` added to each) running, and p2
/// leaving with the managed address; returns the node holding it and the other candidate.
fn started_with(args: &[&str]) -> (Testbed, PathBuf, PathBuf, Operator, &'static str, &'static str) {
    let (mut tb, dir, tokens) = live_testbed();
    let operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, Duration::from_secs(1)));
    for (node, _) in NODES {
        support::start_shim_with(&mut tb, node, &tokens, args);
    }
    let steered = wait_for(Duration::from_secs(30), || {
        tb.fetch("p2", EXT_A).is_ok_and(|seen| seen.contains(MANAGED))
    });
    assert!(steered, "p2 never left with {MANAGED}\n{}", logs(&tb));
    let holder = if holds(&tb, "n1") { "n1" } else { "n3" };
    let other = if holder == "n1" { "n3" } else { "n1" };
    assert!(holds(&tb, holder) && !holds(&tb, other), "\n{}", logs(&tb));
    (tb, dir, tokens, operator, holder, other)
}

/// No selected pod's traffic leaves with a node's address: it leaves with the managed
/// address, or not at all.
fn assert_no_leak(tb: &Testbed) {
    if let Ok(seen) = tb.fetch("p2", EXT_A) {
        assert!(seen.contains(MANAGED), "p2 left as {seen}\n{}", logs(tb));
    }
}

/// A planned move (the holder loses its gateway label): the old node lets the address go before
/// the new one claims it, so the new node's probe finds no one answering (no `Conflict`), and
/// only one node ever answers for it.
#[test]
fn a_planned_move_releases_the_address_before_the_new_node_claims_it() {
    if skip_without_root() {
        return;
    }
    let (tb, dir, _tokens, _operator, holder, other) = started_with(&[]);
    let other_mac = mac_of(&tb, other);
    let cluster = fs::read_to_string(dir.join("cluster.yaml")).unwrap();
    let labelled = format!("labels: {{kubernetes.io/hostname: {holder}, sluice.dev/egress: \"true\"}}");
    assert!(cluster.contains(&labelled), "the demo cluster changed: {cluster}");
    let edited = cluster.replace(
        &labelled,
        &format!("labels: {{kubernetes.io/hostname: {holder}}}"),
    );
    fs::write(dir.join("cluster.yaml"), edited).unwrap();
    let edited_at = Instant::now();
    let mut samples = 0;
    while !holds(&tb, other) {
        assert!(
            edited_at.elapsed() < Duration::from_secs(10),
            "{other} never took it\n{}",
            logs(&tb)
        );
        let answering = answerers(&tb);
        assert!(
            answering.len() <= 1,
            "{answering:?} answer at once\n{}",
            logs(&tb)
        );
        samples += 1;
    }
    println!(
        "planned move: {samples} ARP samples during the move, {:?}",
        edited_at.elapsed()
    );
    assert_moved_to(&tb, other, holder, Duration::from_secs(1));
    let new_log = tb.log(&format!("shim-{other}"));
    assert!(
        !new_log.contains("another host answers"),
        "the new node found the old one still answering\n{}",
        logs(&tb)
    );
    assert_eq!(answerers(&tb), std::slice::from_ref(&other_mac));
    assert_eq!(router_entry(&tb), Some(other_mac));
    assert_no_leak(&tb);
}

/// Cuts `node` off from the operator (its gRPC connection, both ways) but not from the network.
fn cut_from_operator(tb: &Testbed, node: &str) {
    tb.nft(
        node,
        "table inet sluice_test_cut {\n\
         chain o { type filter hook output priority 0; tcp dport 9443 drop; }\n\
         chain i { type filter hook input priority 0; tcp sport 9443 drop; }\n}\n",
    )
    .unwrap();
}

fn heal(tb: &Testbed, node: &str) {
    tb.nft(node, "delete table inet sluice_test_cut\n").unwrap();
}

/// The default (`--release-managed-ips-after never`): a holder cut off from the operator but not
/// from its neighbours keeps answering, so the node the operator moves the address to finds it
/// answering and does not claim it (two nodes never answer); the moved pods' traffic drops
/// meanwhile, never leaks; when the partition heals the old node lets go and the new one claims.
#[test]
fn a_holder_cut_off_from_the_operator_keeps_its_address_and_no_one_else_claims_it() {
    if skip_without_root() {
        return;
    }
    let (tb, _dir, _tokens, _operator, holder, other) = started_with(&[]);
    let holder_mac = mac_of(&tb, holder);
    cut_from_operator(&tb, holder);
    let refused = wait_for(Duration::from_secs(15), || {
        tb.log(&format!("shim-{other}")).contains("another host answers")
    });
    assert!(refused, "{other} never found {holder} answering\n{}", logs(&tb));
    let cut_since = Instant::now();
    while cut_since.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            answerers(&tb),
            std::slice::from_ref(&holder_mac),
            "\n{}",
            logs(&tb)
        );
        assert!(!holds(&tb, other), "{other} claimed it\n{}", logs(&tb));
        assert_no_leak(&tb);
    }
    assert!(holds(&tb, holder));

    heal(&tb, holder);
    assert_moved_to(&tb, other, holder, Duration::from_secs(30));
}

/// `--release-managed-ips-after 10s` (the shortest allowed): the cut-off holder gives the address up by itself, the node
/// the operator moved it to claims it while the partition lasts, and the old node, back, leaves
/// it there.
#[test]
fn a_holder_cut_off_from_the_operator_gives_its_address_up_when_told_to() {
    if skip_without_root() {
        return;
    }
    let (tb, _dir, _tokens, _operator, holder, other) = started_with(&["--release-managed-ips-after", "10s"]);
    let other_mac = mac_of(&tb, other);
    cut_from_operator(&tb, holder);
    let cut = Instant::now();
    assert_moved_to(&tb, other, holder, Duration::from_secs(30));
    println!(
        "partition with release after 10s: moved after {:?}",
        cut.elapsed()
    );
    // Silence counts from the operator's last message, up to one heartbeat (2 s) before the cut.
    assert!(
        cut.elapsed() >= Duration::from_secs(8),
        "given up before 10 s of silence"
    );
    assert!(
        tb.log(&format!("shim-{holder}"))
            .contains("no word from the operator"),
        "\n{}",
        logs(&tb)
    );

    heal(&tb, holder);
    let back = Instant::now();
    while back.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            answerers(&tb),
            std::slice::from_ref(&other_mac),
            "\n{}",
            logs(&tb)
        );
        assert!(!holds(&tb, holder), "{holder} claimed it again\n{}", logs(&tb));
    }
    assert!(
        tb.log(&format!("shim-{holder}")).contains("the operator is back"),
        "the healed shim is not back with the operator\n{}",
        logs(&tb)
    );
}

/// The IPv6 twin of [`MANAGED`], in the node subnet fd00:192:0:2::/64.
const MANAGED_V6: &str = "fd00:192:0:2::150";

/// Whether `node`'s uplink holds the managed IPv6 address.
fn holds_v6(tb: &Testbed, node: &str) -> bool {
    tb.ip(node, &["-6", "-o", "addr", "show", "dev", "eth0"])
        .is_ok_and(|out| out.contains(&format!("{MANAGED_V6}/128")))
}

/// The underlay router's neighbour entry for the managed IPv6 address (its MAC, if it has one).
fn router_entry_v6(tb: &Testbed) -> Option<String> {
    let out = tb.ip("ul", &["-6", "neigh", "show", MANAGED_V6]).ok()?;
    let after = out.split("lladdr ").nth(1)?;
    after.split_whitespace().next().map(str::to_owned)
}

/// Who answers a neighbour solicitation for the managed IPv6 address on the underlay, as the
/// router sees it (every distinct MAC within 300 ms).
fn answerers_v6(tb: &Testbed) -> Vec<String> {
    let target: Ipv6Addr = MANAGED_V6.parse().unwrap();
    let router: Ipv6Addr = UNDERLAY_IP_V6.parse().unwrap();
    in_netns(&tb.ns("ul"), move || {
        let ifindex = nix::net::if_::if_nametoindex("br0").expect("br0");
        let socket = NdpSocket::open(ifindex, router).expect("a neighbour discovery socket on br0");
        let solicitation = NdpPacket {
            source_ip: router,
            link_layer: Some(socket.mac()),
            ..NdpPacket::probe(socket.mac(), target)
        };
        socket.send(&solicitation).expect("sending a solicitation");
        let deadline = Instant::now() + Duration::from_millis(300);
        let mut macs = Vec::new();
        while let Ok(Some(p)) = socket.receive(deadline) {
            let mac = p.source_mac.to_string();
            // Answers to this solicitation only (solicited, to the router), not announcements.
            let answer = matches!(p.message, NdpMessage::Advertisement { solicited: true, .. })
                && p.target == target
                && p.destination_ip == router;
            if answer && !macs.contains(&mac) {
                macs.push(mac);
            }
        }
        macs
    })
}

/// A dual-stack slot: `egressIPs` lists an IPv4 and an IPv6 address, one node holds both, and p2
/// leaves with the address of each family. Its shim is killed: the other candidate claims both
/// (duplicate address detection, unsolicited advertisements), the router's IPv6 entry follows,
/// and the dead shim's node stops answering for either (the fence), also after it comes back.
#[test]
fn a_dual_stack_slot_moves_both_addresses_when_its_gateway_s_shim_is_killed() {
    if skip_without_root() {
        return;
    }
    let grace = Duration::from_secs(1);
    let (mut tb, dir, tokens) = live_testbed();
    fs::write(dir.join("cluster.yaml"), support::dual_stack_cluster()).unwrap();
    let policy = managed_policy()
        .replace(
            "destinationCIDRs: [203.0.113.0/24]",
            "destinationCIDRs: [203.0.113.0/24, \"fd00:203:0:113::/64\"]",
        )
        .replace(
            &format!("egressIPs: [{MANAGED}]"),
            &format!("egressIPs: [{MANAGED}, \"{MANAGED_V6}\"]"),
        );
    assert!(
        policy.contains(MANAGED_V6) && policy.contains("fd00:203"),
        "{policy}"
    );
    fs::write(dir.join("policy.yaml"), policy).unwrap();
    let _operator = Operator::start(tb.ns("ul"), options(&dir, &tokens, grace));
    for (node, _) in NODES {
        start_shim(&mut tb, node, &tokens);
    }

    let both = |tb: &Testbed| {
        tb.fetch("p2", EXT_A).is_ok_and(|seen| seen == MANAGED)
            && tb.fetch("p2", EXT_A_V6).is_ok_and(|seen| seen == MANAGED_V6)
    };
    assert!(
        wait_for(Duration::from_secs(30), || both(&tb)),
        "p2 never left with {MANAGED} and {MANAGED_V6}: {:?} {:?}\n{}",
        tb.fetch("p2", EXT_A),
        tb.fetch("p2", EXT_A_V6),
        logs(&tb)
    );
    let holders: Vec<&str> = ["n1", "n3"].into_iter().filter(|n| holds_v6(&tb, n)).collect();
    assert_eq!(holders.len(), 1, "{holders:?} hold {MANAGED_V6}\n{}", logs(&tb));
    let (dead, survivor) = if holders[0] == "n1" {
        ("n1", "n3")
    } else {
        ("n3", "n1")
    };
    assert!(
        holds(&tb, dead),
        "one node holds the slot's two addresses\n{}",
        logs(&tb)
    );
    let (dead_mac, survivor_mac) = (mac_of(&tb, dead), mac_of(&tb, survivor));
    assert_eq!(router_entry_v6(&tb), Some(dead_mac.clone()));
    assert_eq!(answerers_v6(&tb), std::slice::from_ref(&dead_mac));

    let failed = Instant::now();
    tb.kill(&format!("shim-{dead}"));
    let moved = wait_for(Duration::from_secs(10), || {
        holds(&tb, survivor) && holds_v6(&tb, survivor)
    });
    assert!(moved, "{survivor} never took both addresses\n{}", logs(&tb));
    assert!(
        wait_for(Duration::from_secs(10), || tb
            .fetch("p2", EXT_A_V6)
            .is_ok_and(|seen| seen == MANAGED_V6)),
        "p2's IPv6 never left with {MANAGED_V6} again\n{}",
        logs(&tb)
    );
    println!(
        "MANAGED-IP DUAL-STACK FAILOVER took {:?} until p2 left with {MANAGED_V6} again",
        failed.elapsed()
    );
    assert!(tb.fetch("p2", EXT_A).is_ok_and(|seen| seen == MANAGED));
    // The router had an entry: the override advertisements moved it, without it asking.
    assert_eq!(router_entry_v6(&tb), Some(survivor_mac.clone()));
    assert!(
        holds_v6(&tb, dead),
        "the dead shim's node keeps the address, fenced"
    );
    for _ in 0..5 {
        assert_eq!(
            answerers_v6(&tb),
            std::slice::from_ref(&survivor_mac),
            "\n{}",
            logs(&tb)
        );
    }

    // The shim comes back: it gives both up, and only the survivor ever answers.
    start_shim(&mut tb, dead, &tokens);
    let back = Instant::now();
    while back.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            answerers_v6(&tb),
            std::slice::from_ref(&survivor_mac),
            "\n{}",
            logs(&tb)
        );
        assert_eq!(
            answerers(&tb),
            std::slice::from_ref(&survivor_mac),
            "\n{}",
            logs(&tb)
        );
    }
    assert!(
        !holds_v6(&tb, dead) && !holds(&tb, dead),
        "{dead} gave both up\n{}",
        logs(&tb)
    );
    assert!(tb.fetch("p2", EXT_A_V6).is_ok_and(|seen| seen == MANAGED_V6));
}
