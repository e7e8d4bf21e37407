//! Managed egress IPs against real kernels (needs root): nodes of the testbed claim, announce,
//! move and release 192.0.2.150 on their uplink, and the underlay router (`ul`, a Linux bridge
//! with 192.0.2.1) is the neighbour whose ARP cache must follow.
//!
//! What the nodes hold is read back with `ip`; what the router believes, from its neighbour
//! table; what goes over the wire, with a packet socket on the router's bridge. Everything lives
//! in the testbed's namespaces, which go with it, also when a test fails.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    sync::{Barrier, mpsc},
    time::{Duration, Instant},
};

use sluice_shim::{
    egress_ip::{
        AddressError, AddressManager, Announcement, ArpOperation, ArpPacket, ArpSocket, Claimed, HeldAddress,
        ProbeOutcome, ProbeTiming, Released, held_addresses,
    },
    netdev,
};
use sluice_testbed::{Testbed, enter_netns, in_netns, wait_for};

/// An address nothing in the testbed uses.
const MANAGED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 150);

fn managed() -> IpAddr {
    IpAddr::V4(MANAGED)
}

/// The testbed, or `None` (after printing a SKIP line) when not root. The router takes the
/// kernel's defaults for unsolicited ARP whatever the machine's are (new namespaces copy the
/// host's IPv4 settings): no entries from gratuitous ARP (`arp_accept=0`), gratuitous ARP not
/// dropped.
fn testbed(name: &str) -> Option<Testbed> {
    if !sluice_testbed::is_root() {
        println!(
            "SKIP egress_ip_e2e::{name}: needs root (network namespaces, packet sockets); CI runs it as root"
        );
        return None;
    }
    let t = Testbed::new().expect("builds the testbed");
    in_netns(&t.ns("ul"), || {
        for conf in ["all", "br0"] {
            for (key, value) in [("arp_accept", "0"), ("drop_gratuitous_arp", "0")] {
                std::fs::write(format!("/proc/sys/net/ipv4/conf/{conf}/{key}"), value).expect(key);
            }
        }
    });
    Some(t)
}

/// Runs `f` inside `ns` of `t`.
fn on<T: Send>(t: &Testbed, ns: &str, f: impl FnOnce() -> T + Send) -> T {
    in_netns(&t.ns(ns), f)
}

/// `ip -d -j ARGS` in `ns`, as JSON.
fn ip_json(t: &Testbed, ns: &str, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["-d", "-j"];
    full.extend_from_slice(args);
    let out = t.ip(ns, &full).expect("ip");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip {args:?} in {ns}: {e}: {out}"))
}

/// The index and MAC of `device` in `ns`.
fn link(t: &Testbed, ns: &str, device: &str) -> (u32, String) {
    let index = on(t, ns, || netdev::ifindex(device)).unwrap_or_else(|| panic!("{device} in {ns}"));
    let mac = ip_json(t, ns, &["link", "show", "dev", device])[0]["address"]
        .as_str()
        .expect("a MAC")
        .to_owned();
    (index, mac)
}

/// The node's uplink: index and MAC.
fn uplink(t: &Testbed, node: &str) -> (u32, String) {
    link(t, node, "eth0")
}

/// The addresses `MANAGED` has on `node`'s uplink, as `ip` shows them.
fn managed_on(t: &Testbed, node: &str) -> Vec<serde_json::Value> {
    let shown = ip_json(t, node, &["addr", "show", "dev", "eth0"]);
    shown[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a["local"] == MANAGED.to_string())
        .cloned()
        .collect()
}

/// The prefix lengths `MANAGED` has on `node`'s uplink.
fn managed_prefixes(t: &Testbed, node: &str) -> Vec<u64> {
    let mut prefixes: Vec<u64> = managed_on(t, node)
        .iter()
        .map(|a| a["prefixlen"].as_u64().expect("prefixlen"))
        .collect();
    prefixes.sort();
    prefixes
}

/// The MAC in the router's neighbour entry for `MANAGED`, if it has one with an address.
fn router_entry(t: &Testbed) -> Option<String> {
    let shown = ip_json(
        t,
        "ul",
        &["neigh", "show", "to", &MANAGED.to_string(), "dev", "br0"],
    );
    shown
        .as_array()
        .and_then(|entries| entries.first())
        .and_then(|e| e["lladdr"].as_str())
        .map(str::to_owned)
}

/// Whether a TCP connection from the router to `MANAGED` is answered (refused: nothing listens,
/// but some holder's kernel answered).
fn answers_from_router(t: &Testbed) -> bool {
    let to = SocketAddr::new(managed(), 9);
    let outcome = on(t, "ul", || {
        TcpStream::connect_timeout(&to, Duration::from_secs(3))
    });
    matches!(outcome, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// The MAC a probe found answering, as `ip` prints it.
fn conflict_mac(outcome: ProbeOutcome) -> Option<String> {
    match outcome {
        ProbeOutcome::Conflict { mac } => Some(mac.to_string()),
        ProbeOutcome::Free => None,
    }
}

/// The addresses `node` holds with Sluice's mark.
fn held_on(t: &Testbed, node: &str) -> Vec<HeldAddress> {
    on(t, node, held_addresses).expect("lists held addresses")
}

/// One announcement round at once, with gratuitous requests and/or replies.
fn once(requests: bool, replies: bool) -> AddressManager {
    AddressManager::new(
        ProbeTiming::default(),
        Announcement {
            schedule: vec![Duration::ZERO],
            requests,
            replies,
            advertisements: false,
        },
    )
}

#[test]
fn a_claimed_address_answers_from_the_claiming_node_and_carries_sluices_mark() {
    let Some(t) = testbed("a_claimed_address_answers") else {
        return;
    };
    let (n1, n1_mac) = uplink(&t, "n1");
    let mut m = AddressManager::default();
    assert_eq!(managed_prefixes(&t, "n1"), Vec::<u64>::new());
    assert_eq!(
        on(&t, "n1", || m.claim(n1, managed())).expect("claims"),
        Claimed::Added
    );
    assert_eq!(managed_prefixes(&t, "n1"), vec![32]);
    let shown = managed_on(&t, "n1");
    assert_eq!(shown[0]["scope"], "global", "{shown:?}");
    // The router had no entry, and with arp_accept=0 an announcement does not make one.
    assert_eq!(router_entry(&t), None);

    assert!(answers_from_router(&t), "the router reaches {MANAGED}");
    assert_eq!(router_entry(&t).as_deref(), Some(n1_mac.as_str()), "at n1");
    assert_eq!(
        held_on(&t, "n1"),
        vec![HeldAddress {
            ifindex: n1,
            ip: managed()
        }],
        "the node's own addresses are not Sluice's"
    );
    assert_eq!(held_on(&t, "n2"), Vec::<HeldAddress>::new());

    assert_eq!(
        on(&t, "n1", || m.claim(n1, managed())).unwrap(),
        Claimed::AlreadyHeld,
        "claiming again is fine"
    );
    assert_eq!(managed_prefixes(&t, "n1"), vec![32], "and adds nothing");
    let restarted = on(&t, "n1", || AddressManager::default().claim(n1, managed())).unwrap();
    assert_eq!(
        restarted,
        Claimed::AlreadyHeld,
        "a restarted shim finds it its own"
    );

    assert_eq!(
        on(&t, "n1", || m.release(n1, managed())).unwrap(),
        Released::Removed
    );
    assert_eq!(managed_prefixes(&t, "n1"), Vec::<u64>::new());
    assert_eq!(held_on(&t, "n1"), Vec::<HeldAddress>::new());
    assert!(!m.announcing(n1, managed()));
    assert_eq!(
        on(&t, "n1", || m.release(n1, managed())).unwrap(),
        Released::NotHeld,
        "releasing again is fine"
    );
}

#[test]
fn a_moved_address_takes_the_routers_entry_with_it_by_announcement_only() {
    let Some(t) = testbed("a_moved_address") else {
        return;
    };
    let ((n1, n1_mac), (n2, n2_mac)) = (uplink(&t, "n1"), uplink(&t, "n2"));
    let mut m1 = AddressManager::default();
    assert_eq!(on(&t, "n1", || m1.claim(n1, managed())).unwrap(), Claimed::Added);
    assert!(answers_from_router(&t));
    assert_eq!(router_entry(&t).as_deref(), Some(n1_mac.as_str()));

    // Moved without a word: the router keeps sending to n1 (its entry stays valid for 15-45 s,
    // then it takes 5 s more before it checks).
    assert_eq!(
        on(&t, "n1", || m1.release(n1, managed())).unwrap(),
        Released::Removed
    );
    let mut quiet = AddressManager::new(ProbeTiming::default(), Announcement::none());
    assert_eq!(
        on(&t, "n2", || quiet.claim(n2, managed())).unwrap(),
        Claimed::Added
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        router_entry(&t).as_deref(),
        Some(n1_mac.as_str()),
        "without an announcement the router's entry stays stale"
    );

    // One gratuitous request (a restarted shim announcing what it holds): taken at once.
    let announced = on(&t, "n2", || once(true, false).claim(n2, managed())).unwrap();
    assert_eq!(announced, Claimed::AlreadyHeld);
    assert!(
        wait_for(Duration::from_secs(3), || router_entry(&t).as_deref()
            == Some(n2_mac.as_str())),
        "a gratuitous ARP request updates the router's existing entry: {:?}",
        router_entry(&t)
    );
    assert!(answers_from_router(&t), "n2 answers for {MANAGED}");

    // Back to n1, announced with one gratuitous reply only: taken too.
    assert_eq!(
        on(&t, "n2", || quiet.release(n2, managed())).unwrap(),
        Released::Removed
    );
    assert_eq!(
        on(&t, "n1", || once(false, true).claim(n1, managed())).unwrap(),
        Claimed::Added
    );
    assert!(
        wait_for(Duration::from_secs(3), || router_entry(&t).as_deref()
            == Some(n1_mac.as_str())),
        "a gratuitous ARP reply updates the router's existing entry: {:?}",
        router_entry(&t)
    );
    assert!(answers_from_router(&t), "n1 answers for {MANAGED} again");
    assert_eq!(held_on(&t, "n2"), Vec::<HeldAddress>::new());
}

#[test]
fn a_duplicate_is_found_by_the_probe_and_never_claimed() {
    let Some(t) = testbed("a_duplicate_is_found") else {
        return;
    };
    let (n1, _) = uplink(&t, "n1");
    let (_, router_mac) = link(&t, "ul", "br0");
    let (_, n3_mac) = uplink(&t, "n3");
    let mut m = AddressManager::default();
    let prefix = format!("{MANAGED}/32");

    assert_eq!(
        on(&t, "n1", || m.probe(n1, managed())).unwrap(),
        ProbeOutcome::Free
    );

    // On the router (an external host holding it).
    t.ip("ul", &["addr", "add", &prefix, "dev", "br0"]).unwrap();
    let probed = on(&t, "n1", || m.probe(n1, managed())).unwrap();
    assert_eq!(
        conflict_mac(probed).as_deref(),
        Some(router_mac.as_str()),
        "{probed:?}"
    );
    match on(&t, "n1", || m.claim(n1, managed())) {
        Err(AddressError::Conflict { ip, ifindex, mac }) => {
            assert_eq!(
                (ip, ifindex, mac.to_string()),
                (managed(), n1, router_mac.clone())
            );
        }
        other => panic!("claimed a duplicate: {other:?}"),
    }
    assert_eq!(managed_prefixes(&t, "n1"), Vec::<u64>::new(), "not added");
    assert_eq!(held_on(&t, "n1"), Vec::<HeldAddress>::new());
    assert!(!m.announcing(n1, managed()));
    t.ip("ul", &["addr", "del", &prefix, "dev", "br0"]).unwrap();

    // On another node, added by hand.
    t.ip("n3", &["addr", "add", &prefix, "dev", "eth0"]).unwrap();
    let probed = on(&t, "n1", || m.probe(n1, managed())).unwrap();
    assert_eq!(
        conflict_mac(probed).as_deref(),
        Some(n3_mac.as_str()),
        "{probed:?}"
    );
    assert!(matches!(
        on(&t, "n1", || m.claim(n1, managed())),
        Err(AddressError::Conflict { .. })
    ));
    assert_eq!(managed_prefixes(&t, "n1"), Vec::<u64>::new(), "not added");
    t.ip("n3", &["addr", "del", &prefix, "dev", "eth0"]).unwrap();
    assert_eq!(
        on(&t, "n1", || m.probe(n1, managed())).unwrap(),
        ProbeOutcome::Free
    );
}

/// Two nodes told to claim the same address at once (two policies, a split-brain operator):
/// whichever hears the other's probe first backs off, naming the other; at most one goes ahead.
#[test]
fn two_nodes_probing_at_once_do_not_both_go_ahead() {
    let Some(t) = testbed("two_nodes_probing_at_once") else {
        return;
    };
    at_most_one_goes_ahead(&t, managed());
}

/// Probes for `ip` from n1 and n2 at once.
fn at_most_one_goes_ahead(t: &Testbed, ip: IpAddr) {
    let ((n1, n1_mac), (n2, n2_mac)) = (uplink(t, "n1"), uplink(t, "n2"));
    // Long enough that both windows overlap on a busy machine.
    let slow = ProbeTiming {
        probes: 5,
        interval: Duration::from_millis(100),
        listen: Duration::from_millis(1500),
    };
    let start = Barrier::new(2);
    let probe_from = |node: &str, ifindex: u32| {
        let ns = t.ns(node);
        let (slow, start) = (slow.clone(), &start);
        move || {
            enter_netns(&ns);
            let m = AddressManager::new(slow, Announcement::none());
            start.wait();
            m.probe(ifindex, ip).expect("probes")
        }
    };
    let (from_n1, from_n2) = std::thread::scope(|s| {
        let a = s.spawn(probe_from("n1", n1));
        let b = s.spawn(probe_from("n2", n2));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(
        from_n1 != ProbeOutcome::Free || from_n2 != ProbeOutcome::Free,
        "both went ahead for {ip}: {from_n1:?} {from_n2:?}"
    );
    for (outcome, other) in [(from_n1, &n2_mac), (from_n2, &n1_mac)] {
        if let Some(mac) = conflict_mac(outcome) {
            assert_eq!(&mac, other, "the conflict names the other claimant");
        }
    }
}

#[test]
fn release_leaves_an_address_without_sluices_mark() {
    let Some(t) = testbed("release_leaves_an_address_without_sluices_mark") else {
        return;
    };
    let (n1, _) = uplink(&t, "n1");
    let mut m = AddressManager::default();
    let host = format!("{MANAGED}/32");

    // Added by hand (someone else manages it): neither taken over nor removed.
    t.ip("n1", &["addr", "add", &host, "dev", "eth0"]).unwrap();
    assert_eq!(
        on(&t, "n1", || m.claim(n1, managed())).unwrap(),
        Claimed::HeldUnmarked
    );
    assert!(!m.announcing(n1, managed()));
    assert_eq!(held_on(&t, "n1"), Vec::<HeldAddress>::new());
    assert_eq!(
        on(&t, "n1", || m.release(n1, managed())).unwrap(),
        Released::HeldUnmarked
    );
    assert_eq!(managed_prefixes(&t, "n1"), vec![32], "left alone");
    t.ip("n1", &["addr", "del", &host, "dev", "eth0"]).unwrap();

    // Sluice's /32 beside a hand-made /24 of the same IP: only Sluice's goes.
    assert_eq!(on(&t, "n1", || m.claim(n1, managed())).unwrap(), Claimed::Added);
    t.ip("n1", &["addr", "add", &format!("{MANAGED}/24"), "dev", "eth0"])
        .unwrap();
    assert_eq!(managed_prefixes(&t, "n1"), vec![24, 32]);
    assert_eq!(held_on(&t, "n1").len(), 1);
    assert_eq!(
        on(&t, "n1", || m.release(n1, managed())).unwrap(),
        Released::Removed
    );
    assert_eq!(managed_prefixes(&t, "n1"), vec![24], "the hand-made one stays");
    assert_eq!(
        on(&t, "n1", || m.release(n1, managed())).unwrap(),
        Released::HeldUnmarked
    );
    assert_eq!(managed_prefixes(&t, "n1"), vec![24]);
}

/// Listens on the router's bridge for `window` and returns when each gratuitous request for
/// `MANAGED` from `mac` arrived; returns once the socket is open.
fn router_hears(t: &Testbed, mac: &str, window: Duration) -> std::thread::JoinHandle<Vec<Instant>> {
    let ns = t.ns("ul");
    let (bridge, _) = link(t, "ul", "br0");
    let mac = mac.to_owned();
    let (ready, opened) = mpsc::channel();
    let listener = std::thread::spawn(move || {
        enter_netns(&ns);
        let socket = ArpSocket::open(bridge).expect("opens a packet socket on the bridge");
        ready.send(()).unwrap();
        let deadline = Instant::now() + window;
        let mut heard = Vec::new();
        while let Some(p) = socket.receive(deadline).expect("receives") {
            if p.operation == ArpOperation::Request
                && p.sender_mac.to_string() == mac
                && p == ArpPacket::announcement(p.sender_mac, MANAGED)
            {
                heard.push(Instant::now());
            }
        }
        heard
    });
    opened
        .recv_timeout(Duration::from_secs(10))
        .expect("the listener starts");
    listener
}

#[test]
fn announcements_follow_their_schedule_and_stop_on_release() {
    let Some(t) = testbed("announcements_follow_their_schedule") else {
        return;
    };
    let (n1, n1_mac) = uplink(&t, "n1");
    let schedule: Vec<Duration> = [0, 500, 1000, 1500, 2000]
        .into_iter()
        .map(Duration::from_millis)
        .collect();
    let mut m = AddressManager::new(
        ProbeTiming::default(),
        Announcement {
            schedule,
            requests: true,
            replies: false,
            advertisements: false,
        },
    );

    let listener = router_hears(&t, &n1_mac, Duration::from_secs(4));
    let start = Instant::now();
    assert_eq!(on(&t, "n1", || m.claim(n1, managed())).unwrap(), Claimed::Added);
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "the claim returns before its announcements are done ({took:?})"
    );
    assert!(m.announcing(n1, managed()));
    let heard = listener.join().unwrap();
    assert_eq!(heard.len(), 5, "one request per round: {heard:?}");
    let spread = *heard.last().unwrap() - heard[0];
    assert!(
        spread >= Duration::from_millis(1500),
        "spaced as scheduled (2 s from first to last), not in a burst: {spread:?}"
    );
    assert!(!m.announcing(n1, managed()), "done");
    assert_eq!(
        on(&t, "n1", || m.release(n1, managed())).unwrap(),
        Released::Removed
    );

    // Released right after the claim: only the first round goes out.
    let listener = router_hears(&t, &n1_mac, Duration::from_secs(3));
    assert_eq!(on(&t, "n1", || m.claim(n1, managed())).unwrap(), Claimed::Added);
    assert_eq!(
        on(&t, "n1", || m.release(n1, managed())).unwrap(),
        Released::Removed
    );
    assert!(!m.announcing(n1, managed()));
    let heard = listener.join().unwrap();
    assert_eq!(heard.len(), 1, "no round after the release: {heard:?}");
}

// ---------------------------------------------------------------------------------------------
// IPv6: duplicate address detection and unsolicited neighbour advertisements

/// An IPv6 address nothing in the testbed uses, in the node subnet fd00:192:0:2::/64.
const MANAGED_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0, 2, 0, 0, 0, 0x150);

fn managed_v6() -> IpAddr {
    IpAddr::V6(MANAGED_V6)
}

/// How `MANAGED_V6` sits on `node`'s uplink, as `ip -6` shows it (one JSON object per address).
fn managed_v6_on(t: &Testbed, node: &str) -> Vec<serde_json::Value> {
    let shown = ip_json(t, node, &["-6", "addr", "show", "dev", "eth0"]);
    shown[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a["local"] == MANAGED_V6.to_string())
        .cloned()
        .collect()
}

/// The MAC in the router's neighbour entry for `MANAGED_V6`, if it has one with an address.
fn router_entry_v6(t: &Testbed) -> Option<String> {
    let shown = ip_json(
        t,
        "ul",
        &["-6", "neigh", "show", "to", &MANAGED_V6.to_string(), "dev", "br0"],
    );
    shown
        .as_array()
        .and_then(|entries| entries.first())
        .and_then(|e| e["lladdr"].as_str())
        .map(str::to_owned)
}

/// Whether a TCP connection from the router to `MANAGED_V6` is answered (refused: some holder's
/// kernel answered).
fn answers_from_router_v6(t: &Testbed) -> bool {
    let to = SocketAddr::new(managed_v6(), 9);
    let outcome = on(t, "ul", || {
        TcpStream::connect_timeout(&to, Duration::from_secs(3))
    });
    matches!(outcome, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// The source address `node` picks for its own packets to `to`.
fn source_towards(t: &Testbed, node: &str, to: &str) -> String {
    let route = ip_json(t, node, &["-6", "route", "get", to]);
    route[0]["prefsrc"].as_str().expect("a source").to_owned()
}

#[test]
fn an_ipv6_address_is_claimed_at_once_deprecated_and_answers_from_the_claiming_node() {
    let Some(t) = testbed("an_ipv6_address_is_claimed_at_once") else {
        return;
    };
    let (n1, n1_mac) = uplink(&t, "n1");
    let neighbour = "fd00:192:0:2::151";
    let own = sluice_testbed::node_ip_v6("n1");
    assert_eq!(source_towards(&t, "n1", neighbour), own);
    let mut m = AddressManager::default();
    assert_eq!(
        on(&t, "n1", || m.claim(n1, managed_v6())).expect("claims"),
        Claimed::Added
    );
    let shown = managed_v6_on(&t, "n1");
    assert_eq!(shown.len(), 1, "{shown:?}");
    let a = &shown[0];
    assert_eq!(
        (a["prefixlen"].as_u64(), a["scope"].as_str()),
        (Some(128), Some("global")),
        "{a}"
    );
    // Longest match would pick it for a neighbour next to it (RFC 6724 rule 8); deprecated, it
    // is never the node's own source (rule 3), so the node's connections do not move with it.
    assert_eq!(
        source_towards(&t, "n1", neighbour),
        own,
        "the node's own source stays"
    );
    assert_eq!(a["nodad"], true, "{a}");
    assert_eq!(a["deprecated"], true, "{a}");
    assert!(a.get("tentative").is_none(), "usable at once, not tentative: {a}");

    assert!(answers_from_router_v6(&t), "the router reaches {MANAGED_V6}");
    assert_eq!(router_entry_v6(&t).as_deref(), Some(n1_mac.as_str()), "at n1");
    assert_eq!(
        held_on(&t, "n1"),
        vec![HeldAddress {
            ifindex: n1,
            ip: managed_v6()
        }]
    );
    assert_eq!(
        on(&t, "n1", || AddressManager::default().claim(n1, managed_v6())).unwrap(),
        Claimed::AlreadyHeld,
        "a restarted shim finds it its own"
    );
    assert_eq!(managed_v6_on(&t, "n1").len(), 1, "and adds nothing");

    assert_eq!(
        on(&t, "n1", || m.release(n1, managed_v6())).unwrap(),
        Released::Removed
    );
    assert!(managed_v6_on(&t, "n1").is_empty());
    assert!(!m.announcing(n1, managed_v6()));
    assert_eq!(
        on(&t, "n1", || m.release(n1, managed_v6())).unwrap(),
        Released::NotHeld
    );
}

#[test]
fn a_moved_ipv6_address_takes_the_routers_entry_with_it_by_advertisement_only() {
    let Some(t) = testbed("a_moved_ipv6_address") else {
        return;
    };
    let ((n1, n1_mac), (n2, n2_mac)) = (uplink(&t, "n1"), uplink(&t, "n2"));
    let mut m1 = AddressManager::default();
    assert_eq!(
        on(&t, "n1", || m1.claim(n1, managed_v6())).unwrap(),
        Claimed::Added
    );
    assert!(answers_from_router_v6(&t));
    assert_eq!(router_entry_v6(&t).as_deref(), Some(n1_mac.as_str()));

    // Moved without a word: the router keeps its entry naming n1.
    assert_eq!(
        on(&t, "n1", || m1.release(n1, managed_v6())).unwrap(),
        Released::Removed
    );
    let mut quiet = AddressManager::new(ProbeTiming::default(), Announcement::none());
    assert_eq!(
        on(&t, "n2", || quiet.claim(n2, managed_v6())).unwrap(),
        Claimed::Added
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        router_entry_v6(&t).as_deref(),
        Some(n1_mac.as_str()),
        "without an advertisement the router's entry stays stale"
    );

    // One unsolicited advertisement (a restarted shim announcing what it holds): taken at once.
    let once_v6 = || {
        AddressManager::new(
            ProbeTiming::default(),
            Announcement {
                schedule: vec![Duration::ZERO],
                requests: false,
                replies: false,
                advertisements: true,
            },
        )
    };
    assert_eq!(
        on(&t, "n2", || once_v6().claim(n2, managed_v6())).unwrap(),
        Claimed::AlreadyHeld
    );
    assert!(
        wait_for(Duration::from_secs(3), || router_entry_v6(&t).as_deref()
            == Some(n2_mac.as_str())),
        "an unsolicited advertisement with the override flag updates the router's entry: {:?}",
        router_entry_v6(&t)
    );
    assert!(answers_from_router_v6(&t), "n2 answers for {MANAGED_V6}");
    assert_eq!(held_on(&t, "n1"), Vec::<HeldAddress>::new());
    assert_eq!(
        on(&t, "n2", || quiet.release(n2, managed_v6())).unwrap(),
        Released::Removed
    );
}

#[test]
fn an_ipv6_duplicate_is_found_by_the_probe_and_never_claimed() {
    let Some(t) = testbed("an_ipv6_duplicate_is_found") else {
        return;
    };
    let (n1, _) = uplink(&t, "n1");
    let (_, router_mac) = link(&t, "ul", "br0");
    let (_, n3_mac) = uplink(&t, "n3");
    let mut m = AddressManager::default();
    let host = format!("{MANAGED_V6}/128");

    assert_eq!(
        on(&t, "n1", || m.probe(n1, managed_v6())).unwrap(),
        ProbeOutcome::Free
    );
    for (ns, device, mac) in [("ul", "br0", &router_mac), ("n3", "eth0", &n3_mac)] {
        t.ip(ns, &["-6", "addr", "add", &host, "dev", device, "nodad"])
            .unwrap();
        let probed = on(&t, "n1", || m.probe(n1, managed_v6())).unwrap();
        assert_eq!(
            conflict_mac(probed).as_deref(),
            Some(mac.as_str()),
            "{ns} holds it: {probed:?}"
        );
        match on(&t, "n1", || m.claim(n1, managed_v6())) {
            Err(AddressError::Conflict {
                ip,
                ifindex,
                mac: found,
            }) => {
                assert_eq!((ip, ifindex, found.to_string()), (managed_v6(), n1, mac.clone()));
            }
            other => panic!("claimed a duplicate: {other:?}"),
        }
        assert!(managed_v6_on(&t, "n1").is_empty(), "not added");
        assert!(!m.announcing(n1, managed_v6()));
        t.ip(ns, &["-6", "addr", "del", &host, "dev", device]).unwrap();
    }
    assert_eq!(
        on(&t, "n1", || m.probe(n1, managed_v6())).unwrap(),
        ProbeOutcome::Free
    );

    // An interface with IPv6 turned off: refused, saying so, before anything goes out.
    t.sysctl("n1", "net.ipv6.conf.eth0.disable_ipv6=1").unwrap();
    match on(&t, "n1", || m.claim(n1, managed_v6())) {
        Err(e @ AddressError::Ipv6Off { .. }) => {
            assert!(e.to_string().contains("IPv6 is turned off"), "{e}");
        }
        other => panic!("claimed on an interface without IPv6: {other:?}"),
    }
    t.sysctl("n1", "net.ipv6.conf.eth0.disable_ipv6=0").unwrap();

    // Added by hand on n1 itself: someone else's, left alone.
    t.ip("n1", &["-6", "addr", "add", &host, "dev", "eth0", "nodad"])
        .unwrap();
    assert_eq!(
        on(&t, "n1", || m.claim(n1, managed_v6())).unwrap(),
        Claimed::HeldUnmarked
    );
    assert_eq!(
        on(&t, "n1", || m.release(n1, managed_v6())).unwrap(),
        Released::HeldUnmarked
    );
    assert_eq!(managed_v6_on(&t, "n1").len(), 1, "left alone");
}

/// As [`two_nodes_probing_at_once_do_not_both_go_ahead`], with duplicate address detection.
#[test]
fn two_nodes_probing_for_an_ipv6_address_at_once_do_not_both_go_ahead() {
    let Some(t) = testbed("two_nodes_probing_for_an_ipv6_address_at_once") else {
        return;
    };
    at_most_one_goes_ahead(&t, managed_v6());
}
