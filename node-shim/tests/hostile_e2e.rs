//! Hostile input against the datapath, with real packets in network namespaces (needs root):
//! crafted VXLAN from outside the plan's peers, pods speaking the tunnel, pods spoofing another
//! pod's address (IPv4, and IPv6 for the last two). Every case has a control that sends the same packet from where it is allowed
//! and sees it arrive, so "nothing arrived" means "refused", not "never sent".

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use sluice_shim::datapath::Maps;
use sluice_testbed::{
    EGRESS_N1, EGRESS_N1_V6, EXT_A, EXT_A_V6, FileCluster as Cluster, Gw, Rule,
    craft::{self, Listener},
};

/// The tunnel's defaults (`sluice-shim run --tunnel-port/--tunnel-vni`).
const TUNNEL_PORT: u16 = 8473;
const VNI: u32 = 8473;
/// Where the external host and pods listen for crafted datagrams.
const PROBE_PORT: u16 = 9999;

fn cluster(name: &str) -> Option<Cluster> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP hostile_e2e::{name}: needs root (network namespaces, eBPF); CI runs it as root");
        return None;
    }
    Some(Cluster::start(env!("CARGO_BIN_EXE_sluice-shim"), &[]).expect("builds the cluster"))
}

/// p2 (on n2) leaves through n1 with EGRESS_N1.
fn policy_p2_via_n1() -> Rule {
    Rule {
        policy: "egress-a",
        source: "p2",
        destination: "203.0.113.0/24",
        gateway: Gw::Node("n1", EGRESS_N1),
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// The gateway's reply map: pod IP -> the node its replies go to.
fn reply_map(c: &Cluster, node: &str) -> BTreeMap<Ipv4Addr, Ipv4Addr> {
    let maps = Maps::open_pinned(&c.bpffs().join(node)).expect("pinned maps");
    maps.reply
        .iter()
        .map(|item| {
            let (pod, r) = item.expect("a reply entry");
            (
                sluice_shim::maps::from_be(pod),
                sluice_shim::maps::from_be(r.node_ip),
            )
        })
        .collect()
}

fn sources(got: &[(std::net::SocketAddr, Vec<u8>)]) -> Vec<String> {
    got.iter().map(|(from, _)| from.ip().to_string()).collect()
}

/// `packet(payload)`, a raw packet with `owner`'s address as its source, to `listener`: sent by
/// `owner` it leaves with `egress` (the control), sent by `thief` it is dropped by the source
/// check on `node`.
fn only_the_owner_uses_its_address(
    c: &Cluster,
    listener: &Listener,
    packet: impl Fn(&[u8]) -> Vec<u8>,
    (owner, thief, node): (&str, &str, &str),
    egress: &str,
) {
    craft::send_raw(&c.ns(owner), &packet(b"mine"), 3).unwrap();
    let got = listener.collect(Duration::from_secs(2));
    assert!(
        got.iter()
            .any(|(from, p)| from.ip().to_string() == egress && p == b"mine"),
        "{owner}'s own packet leaves with the egress IP: {:?}",
        sources(&got)
    );
    let before = c.counter(node, "dropped_spoofed_source");
    craft::send_raw(&c.ns(thief), &packet(b"borrowed"), 5).unwrap();
    let got = listener.collect(Duration::from_secs(2));
    assert!(got.is_empty(), "nothing arrives: {:?}", sources(&got));
    assert!(c.counter(node, "dropped_spoofed_source") - before >= 5);
}

#[test]
fn the_tunnel_accepts_only_the_planned_peers() {
    let Some(mut c) = cluster("the_tunnel_accepts_only_the_planned_peers") else {
        return;
    };
    c.apply(&[policy_p2_via_n1()]);
    // p2 keeps a connection open through n1 the whole time.
    let mut conn = c.connect("p2", EXT_A).expect("connects through the gateway");
    assert_eq!(conn.greeting, EGRESS_N1);
    let (_, p2_ip) = c.pod("p2");
    let gateway = SocketAddrV4::new(ip(&c.node_ip("n1")), TUNNEL_PORT);
    let listener = Listener::bind(&c.ns("ext"), PROBE_PORT).unwrap();
    let inner = |payload: &[u8]| craft::ipv4_udp(ip(p2_ip), ip(EXT_A), 40000, PROBE_PORT, payload);

    // Control: from p2's own node, with the right VNI, the crafted packet is taken as p2's.
    craft::send_udp(&c.ns("n2"), gateway, &craft::vxlan(VNI, &inner(b"control")), 3).unwrap();
    let got = listener.collect(Duration::from_secs(2));
    assert!(
        got.iter()
            .any(|(from, p)| from.ip().to_string() == EGRESS_N1 && p == b"control"),
        "the control packet leaves with the egress IP: {:?}",
        sources(&got)
    );
    let replies_before = reply_map(&c, "n1");
    assert_eq!(replies_before.get(&ip(p2_ip)), Some(&ip(&c.node_ip("n2"))));
    let foreign_before = c.counter("n1", "dropped_foreign_tunnel");
    let pod_before = c.counter("n2", "dropped_pod_to_tunnel_port");

    // The same inner packet (p2's address as source) from everyone else.
    let hostile = craft::vxlan(VNI, &inner(b"hostile"));
    craft::send_udp(&c.ns("ext"), gateway, &hostile, 5).unwrap(); // the external host
    craft::send_udp(&c.ns("n3"), gateway, &hostile, 5).unwrap(); // a node that is no source of n1
    craft::send_udp(&c.ns("p3"), gateway, &hostile, 5).unwrap(); // a pod on p2's own node
    craft::send_udp(&c.ns("p1"), gateway, &hostile, 5).unwrap(); // a pod on the gateway itself
    // p2's node, with a foreign VNI.
    craft::send_udp(
        &c.ns("n2"),
        gateway,
        &craft::vxlan(VNI + 1, &inner(b"hostile")),
        5,
    )
    .unwrap();

    let got = listener.collect(Duration::from_secs(2));
    assert!(got.is_empty(), "nothing may leave: {:?}", sources(&got));
    assert_eq!(
        reply_map(&c, "n1"),
        replies_before,
        "the replies still go to p2's node"
    );
    assert_eq!(
        conn.exchange(50_000, 100_000).unwrap(),
        EGRESS_N1,
        "p2's connection still works"
    );
    let foreign = c.counter("n1", "dropped_foreign_tunnel") - foreign_before;
    assert!(
        foreign >= 15,
        "the external host's, n3's and the foreign VNI's packets are counted at the gateway: {foreign}"
    );
    assert!(
        c.counter("n2", "dropped_pod_to_tunnel_port") - pod_before >= 5,
        "p3's are dropped at its own interface"
    );
    assert!(
        c.counter("n1", "dropped_pod_to_tunnel_port") >= 5,
        "and p1's at its own"
    );
}

#[test]
fn a_pods_node_takes_replies_only_from_its_gateways() {
    let Some(mut c) = cluster("a_pods_node_takes_replies_only_from_its_gateways") else {
        return;
    };
    c.apply(&[policy_p2_via_n1()]);
    let (_, p2_ip) = c.pod("p2");
    let pod_node = SocketAddrV4::new(ip(&c.node_ip("n2")), TUNNEL_PORT);
    let listener = Listener::bind(&c.ns("p2"), PROBE_PORT).unwrap();
    // A "reply" from the external destination to p2.
    let reply = craft::vxlan(
        VNI,
        &craft::ipv4_udp(ip(EXT_A), ip(p2_ip), 80, PROBE_PORT, b"reply"),
    );

    // Control: from p2's gateway it is delivered.
    craft::send_udp(&c.ns("n1"), pod_node, &reply, 3).unwrap();
    let got = listener.collect(Duration::from_secs(2));
    assert!(
        got.iter().any(|(_, p)| p == b"reply"),
        "the gateway's reply reaches p2"
    );
    let before = c.counter("n2", "dropped_foreign_tunnel");
    craft::send_udp(&c.ns("n3"), pod_node, &reply, 5).unwrap();
    craft::send_udp(&c.ns("ext"), pod_node, &reply, 5).unwrap();
    let got = listener.collect(Duration::from_secs(2));
    assert!(got.is_empty(), "nothing from others: {:?}", sources(&got));
    assert!(c.counter("n2", "dropped_foreign_tunnel") - before >= 10);
}

#[test]
fn a_pod_cannot_borrow_another_pods_address() {
    let Some(mut c) = cluster("a_pod_cannot_borrow_another_pods_address") else {
        return;
    };
    // p2 is selected, p3 (same node) is not.
    c.apply(&[policy_p2_via_n1()]);
    let (_, p2_ip) = c.pod("p2");
    let listener = Listener::bind(&c.ns("ext"), PROBE_PORT).unwrap();
    let packet = |payload: &[u8]| craft::ipv4_udp(ip(p2_ip), ip(EXT_A), 40001, PROBE_PORT, payload);
    // Control: p2 itself, through the same raw socket path.
    only_the_owner_uses_its_address(&c, &listener, packet, ("p2", "p3", "n2"), EGRESS_N1);
}

#[test]
fn an_ipv6_pod_cannot_borrow_another_pods_address_or_speak_the_tunnel() {
    let Some(mut c) = cluster("an_ipv6_pod_cannot_borrow_another_pods_address_or_speak_the_tunnel") else {
        return;
    };
    // p2 is selected for IPv6, p3 (same node) is not.
    c.apply(&[Rule {
        destination: "fd00:203:0:113::/64",
        gateway: Gw::Node("n1", EGRESS_N1_V6),
        ..policy_p2_via_n1()
    }]);
    let p2: std::net::Ipv6Addr = c.pod_ip_v6("p2").parse().unwrap();
    let listener = Listener::bind_v6(&c.ns("ext"), PROBE_PORT).unwrap();
    let packet = |payload: &[u8]| craft::ipv6_udp(p2, EXT_A_V6.parse().unwrap(), 40001, PROBE_PORT, payload);
    only_the_owner_uses_its_address(&c, &listener, packet, ("p2", "p3", "n2"), EGRESS_N1_V6);

    // A pod never speaks the tunnel over IPv6 either, also behind an extension header (a
    // hop-by-hop header of padding only, which the receiving stack skips).
    let to_tunnel = craft::ipv6_udp(
        p2,
        c.node_ip_v6("n1").parse().unwrap(),
        40002,
        TUNNEL_PORT,
        &craft::vxlan(VNI, b"not a frame"),
    );
    let mut behind_hop_by_hop = to_tunnel.clone();
    behind_hop_by_hop[6] = 0;
    let length = u16::from_be_bytes([to_tunnel[4], to_tunnel[5]]) + 8;
    behind_hop_by_hop[4..6].copy_from_slice(&length.to_be_bytes());
    behind_hop_by_hop.splice(40..40, [17, 0, 1, 4, 0, 0, 0, 0]);
    let before = c.counter("n2", "dropped_pod_to_tunnel_port");
    craft::send_raw(&c.ns("p2"), &to_tunnel, 3).unwrap();
    craft::send_raw(&c.ns("p2"), &behind_hop_by_hop, 3).unwrap();
    assert!(
        c.counter("n2", "dropped_pod_to_tunnel_port") - before >= 6,
        "both kinds dropped"
    );
}

#[test]
fn a_bridged_pod_cannot_borrow_its_neighbours_address() {
    let Some(mut c) = cluster("a_bridged_pod_cannot_borrow_its_neighbours_address") else {
        return;
    };
    // Bridge CNIs route the pod subnet to the bridge: the route alone cannot tell the pods apart.
    c.add_bridged_pods("n3", "10.244.3", &[("p4", "10.244.3.10"), ("p5", "10.244.3.11")]);
    c.apply(&[Rule {
        source: "p4",
        ..policy_p2_via_n1()
    }]);
    let mut conn = c
        .connect("p4", EXT_A)
        .expect("a bridged pod connects through the gateway");
    assert_eq!(conn.greeting, EGRESS_N1);
    let listener = Listener::bind(&c.ns("ext"), PROBE_PORT).unwrap();
    let packet = |payload: &[u8]| craft::ipv4_udp(ip("10.244.3.10"), ip(EXT_A), 40003, PROBE_PORT, payload);
    only_the_owner_uses_its_address(&c, &listener, packet, ("p4", "p5", "n3"), EGRESS_N1);
    assert_eq!(
        conn.exchange(10_000, 10_000).unwrap(),
        EGRESS_N1,
        "p4 is unharmed"
    );
}

#[test]
fn a_pinned_map_of_another_layout_is_replaced_not_misread() {
    let Some(mut c) = cluster("a_pinned_map_of_another_layout_is_replaced_not_misread") else {
        return;
    };
    c.apply(&[policy_p2_via_n1()]);
    c.kill_shim("n1");
    // What an upgrade that changed a map's value size leaves behind: a pin of that name holding
    // a map of other sizes (here the 256-byte names map, renamed over the 4-byte peers map).
    let dir = c.bpffs().join("n1");
    std::fs::rename(
        dir.join(sluice_shim::maps::POLICY_NAMES),
        dir.join(sluice_shim::maps::TUNNEL_PEERS_V4),
    )
    .unwrap();
    c.start_shim("n1");
    c.apply(&[policy_p2_via_n1()]);
    assert_eq!(
        c.fetch("p2", EXT_A).unwrap(),
        EGRESS_N1,
        "the gateway works again"
    );
    // aya would adopt the pin as it is and write 4-byte values into a map of 256-byte ones.
    let info = aya::maps::MapData::from_pin(dir.join(sluice_shim::maps::TUNNEL_PEERS_V4))
        .and_then(|m| m.info())
        .unwrap();
    assert_eq!(
        (info.key_size(), info.value_size()),
        (4, 4),
        "the map has this build's layout"
    );
    assert!(
        c.log("shim-n1").contains("older layout"),
        "the replacement is logged"
    );
}
