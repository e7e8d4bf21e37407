//! Managed egress IPs end to end in network namespaces (needs root): the operator (`dir:`
//! source, in-process, in the underlay's namespace) and a `sluice-shim run --operator` per node.
//! A policy's one managed address (`egressIPs`) is held by one of its two candidate gateways;
//! the external host sees it. The holder's shim is killed (SIGKILL, the node lives on): the
//! other node claims and announces the address, the external host sees the same address again,
//! the underlay router's neighbour entry for it now names the new node, and the dead shim's node
//! stops answering for it by itself (the datapath fence). The killed shim comes back: it gives
//! the address up, and at no time do two nodes answer for it.

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use sluice_shim::egress_ip::{ArpPacket, ArpSocket};
use sluice_testbed::{EXT_A, NODES, Testbed, in_netns, wait_for};

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
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP managed_ip_e2e: needs root (network namespaces, eBPF); CI runs it as root");
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
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP managed_ip_e2e: needs root (network namespaces, eBPF); CI runs it as root");
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
            if p.sender_ip == ip && !macs.contains(&mac) {
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
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP managed_ip_e2e: needs root (network namespaces, eBPF); CI runs it as root");
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
