//! The fence of managed egress IPs with real packets in network namespaces (needs root): n1 holds
//! a managed address on its uplink while a heartbeat renews the deadline; once the heartbeat
//! stops (the shim "dies", the node lives on), n1 no longer answers ARP (IPv6: neighbour
//! solicitations) for it nor sends from it, without any help from userspace, while its other
//! addresses work as before. Every "nothing answers" has a control that the same probe answered
//! just before, from the same place. Both families.

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use sluice_shim::datapath::{Capacity, Datapath, Maps, PROG_FENCE};
use sluice_testbed::{
    Testbed, UNDERLAY_IP, UNDERLAY_IP_V6, craft::Listener, in_netns, node_ip, node_ip_v6, wait_for,
};

/// The addresses of one family.
struct Family {
    /// Registered as managed on n1.
    managed: &'static str,
    /// Also on n1's uplink, never registered: the fence must leave it alone.
    unmanaged: &'static str,
    /// `ip addr add` of a host address.
    host_suffix: &'static str,
    /// n1's own address.
    node: &'static str,
    /// The underlay router's.
    router: &'static str,
    /// The counter of fenced neighbour answers.
    neighbour_counter: &'static str,
}

const IPV4: Family = Family {
    managed: "192.0.2.150",
    unmanaged: "192.0.2.151",
    host_suffix: "/32",
    node: "192.0.2.11",
    router: UNDERLAY_IP,
    neighbour_counter: "dropped_fenced_arp",
};

const IPV6: Family = Family {
    managed: "fd00:192:0:2::150",
    unmanaged: "fd00:192:0:2::151",
    host_suffix: "/128",
    node: "fd00:192:0:2::11",
    router: UNDERLAY_IP_V6,
    neighbour_counter: "dropped_fenced_advertisement",
};
/// The deadline each heartbeat sets, and the heartbeat's period (the shim's defaults).
const GRACE: Duration = Duration::from_secs(1);
const HEARTBEAT: Duration = Duration::from_millis(250);
/// n1's uplink.
const UPLINK: &str = "eth0";
/// n1 listens on it (TCP), the underlay router too (UDP).
const PORT: u16 = 9898;

fn testbed(name: &str) -> Option<Testbed> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP fence_e2e::{name}: needs root (network namespaces, eBPF); CI runs it as root");
        return None;
    }
    Some(Testbed::new().expect("builds the testbed"))
}

/// Renews the fence every [`HEARTBEAT`], through its own handle on the pinned maps, as a
/// running shim does, until stopped.
struct Heartbeat {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Heartbeat {
    fn start(bpffs: &Path) -> Heartbeat {
        let mut maps = Maps::open_pinned(bpffs).expect("opens the pinned maps");
        maps.renew_fence(GRACE).expect("renews the fence");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                maps.renew_fence(GRACE).expect("renews the fence");
                std::thread::sleep(HEARTBEAT);
            }
        });
        Heartbeat {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops renewing (the shim dies); returns when the last renewal is done.
    fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("heartbeat thread");
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The two ends of the probes: a TCP listener on n1 (every address) and a UDP one on the
/// underlay router.
struct Probes {
    n1: TcpListener,
    ul: Listener,
    router: &'static str,
}

impl Probes {
    fn new(tb: &Testbed, family: &Family) -> Probes {
        let ipv6 = family.router.contains(':');
        let any = if ipv6 { "::" } else { "0.0.0.0" };
        let n1 = in_netns(&tb.ns("n1"), || TcpListener::bind((any, PORT))).expect("listens on n1");
        // Accepted only to keep the backlog empty: the handshake is the probe.
        n1.set_nonblocking(true).unwrap();
        let ul = if ipv6 {
            Listener::bind_v6(&tb.ns("ul"), PORT)
        } else {
            Listener::bind(&tb.ns("ul"), PORT)
        }
        .expect("listens on the underlay router");
        Probes {
            n1,
            ul,
            router: family.router,
        }
    }

    /// Whether the underlay router's TCP connection to `ip` on n1 is answered (1 s at most): its
    /// frames reach n1 by the router's neighbour entry and n1's SYN-ACK comes back from `ip`.
    fn connects(&self, tb: &Testbed, ip: &str) -> bool {
        let to = SocketAddr::new(ip.parse().unwrap(), PORT);
        let answered = in_netns(&tb.ns("ul"), || {
            TcpStream::connect_timeout(&to, Duration::from_secs(1))
        })
        .is_ok();
        while self.n1.accept().is_ok() {}
        answered
    }

    /// What the outside sees of `ip` on n1 once it asks afresh: ARP (or a neighbour
    /// solicitation) resolves it to n1's uplink and a connection to it is answered.
    fn answers(&self, tb: &Testbed, ip: &str) -> bool {
        tb.ip("ul", &["neigh", "flush", "to", ip])
            .expect("flushes the neighbour entry");
        self.connects(tb, ip) && neighbour_mac(tb, ip) == Some(uplink_mac(tb))
    }

    /// Whether a datagram n1 sends from `ip` to the underlay router arrives there (1 s window).
    fn sends_from(&self, tb: &Testbed, ip: &str) -> bool {
        let from: IpAddr = ip.parse().unwrap();
        in_netns(&tb.ns("n1"), || {
            let socket = UdpSocket::bind((from, 0)).expect("binds to the address");
            // A fenced datagram may fail to send or vanish quietly: arrival is what counts.
            let _ = socket.send_to(b"fence", (self.router, PORT));
        });
        self.ul
            .collect(Duration::from_secs(1))
            .iter()
            .any(|(source, payload)| source.ip() == from && payload == b"fence")
    }
}

/// The MAC the underlay router holds for `ip` (`None`: unresolved).
fn neighbour_mac(tb: &Testbed, ip: &str) -> Option<String> {
    let out = tb.ip("ul", &["neigh", "show", "to", ip]).expect("ip neigh show");
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "lladdr")
        .map(|i| words[i + 1].to_owned())
}

/// The MAC of n1's uplink.
fn uplink_mac(tb: &Testbed) -> String {
    let out = tb.ip("n1", &["link", "show", UPLINK]).expect("ip link show");
    let words: Vec<&str> = out.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == "link/ether")
        .expect("an Ethernet uplink");
    words[i + 1].to_owned()
}

/// Outcome counter `name`, as `sluice-shim bpf counters` shows it.
fn counter(bpffs: &Path, name: &str) -> u64 {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-shim"))
        .arg("--bpffs-dir")
        .arg(bpffs)
        .args(["bpf", "counters"])
        .output()
        .expect("runs sluice-shim bpf counters");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = String::from_utf8_lossy(&out.stdout);
    out.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&name)).then(|| f[1].parse().expect("a count"))
        })
        .unwrap_or_else(|| panic!("no counter {name} in\n{out}"))
}

#[test]
fn a_node_whose_shim_stops_renewing_lets_go_of_its_managed_addresses() {
    let Some(tb) = testbed("a_node_whose_shim_stops_renewing_lets_go_of_its_managed_addresses") else {
        return;
    };
    assert_eq!(IPV4.node, node_ip("n1"));
    lets_go(&tb, &IPV4);
}

#[test]
fn a_node_whose_shim_stops_renewing_lets_go_of_its_managed_ipv6_addresses() {
    let Some(tb) = testbed("a_node_whose_shim_stops_renewing_lets_go_of_its_managed_ipv6_addresses") else {
        return;
    };
    assert_eq!(IPV6.node, node_ip_v6("n1"));
    lets_go(&tb, &IPV6);
}

fn lets_go(tb: &Testbed, family: &Family) {
    let Family {
        managed,
        unmanaged,
        neighbour_counter,
        ..
    } = *family;
    for ip in [managed, unmanaged] {
        // nodad: usable at once, as Sluice adds IPv6 addresses (ignored for IPv4).
        let host = format!("{ip}{}", family.host_suffix);
        if family.host_suffix == "/128" {
            tb.ip_on("n1", &["addr", "add", &host, "dev", UPLINK, "nodad"]);
        } else {
            tb.ip_on("n1", &["addr", "add", &host, "dev", UPLINK]);
        }
    }
    let probes = Probes::new(tb, family);
    let bpffs: PathBuf = tb.bpffs().join("n1");
    let mut dp = Datapath::load(&bpffs, Capacity::default()).expect("loads the datapath");
    let ifindex = in_netns(&tb.ns("n1"), || {
        let ifindex = sluice_shim::netdev::ifindex(UPLINK).expect("n1 has its uplink");
        dp.attach_fence(UPLINK, ifindex).expect("attaches the fence");
        ifindex
    });
    assert!(
        dp.pinned_ifindexes(PROG_FENCE).contains(&ifindex),
        "the link is pinned"
    );
    dp.maps
        .set_managed(managed.parse::<IpAddr>().unwrap(), ifindex)
        .unwrap();
    assert_eq!(
        dp.maps.managed().unwrap().into_iter().collect::<Vec<_>>(),
        [(managed.parse::<IpAddr>().unwrap(), ifindex)]
    );

    // Never armed (deadline 0): nothing is fenced, however long ago "0" was.
    assert!(!dp.maps.fence_expired().unwrap());
    assert!(probes.answers(tb, managed), "an unarmed fence passes everything");

    // A live shim: the deadline keeps moving, for longer than one grace period.
    let heartbeat = Heartbeat::start(&bpffs);
    std::thread::sleep(GRACE * 2);
    assert!(!dp.maps.fence_expired().unwrap());
    assert!(
        probes.answers(tb, managed),
        "ARP for the managed address resolves to n1"
    );
    assert!(
        probes.sends_from(tb, managed),
        "n1 sends from the managed address"
    );
    let (arp_before, source_before) = (
        counter(&bpffs, neighbour_counter),
        counter(&bpffs, "dropped_fenced_source"),
    );

    // The shim dies; the node lives on. The datapath lets go within the grace period, alone.
    heartbeat.stop();
    let stopped = Instant::now();
    assert!(!dp.maps.fence_expired().unwrap(), "held until the deadline");
    assert!(
        wait_for(GRACE + Duration::from_secs(2), || dp
            .maps
            .fence_expired()
            .unwrap()),
        "the deadline passes"
    );
    let after = stopped.elapsed();
    assert!(
        after <= GRACE + Duration::from_millis(500),
        "expired {after:?} after the last heartbeat"
    );
    // A client whose neighbour entry still names n1 reaches it, but n1 no longer answers from
    // the address.
    assert_eq!(neighbour_mac(tb, managed), Some(uplink_mac(tb)));
    assert!(
        !probes.connects(tb, managed),
        "no answer from the managed address"
    );
    let source = counter(&bpffs, "dropped_fenced_source") - source_before;
    assert!(
        source >= 1,
        "n1's SYN-ACKs from the managed address are counted: {source}"
    );
    // Asking afresh: no ARP answer.
    assert!(
        !probes.answers(tb, managed),
        "n1 no longer answers ARP for the managed address"
    );
    assert_eq!(neighbour_mac(tb, managed), None, "the outside has no MAC for it");
    let arp = counter(&bpffs, neighbour_counter) - arp_before;
    assert!(
        arp >= 1,
        "n1's ARP replies for the managed address are counted: {arp}"
    );
    assert!(
        !probes.sends_from(tb, managed),
        "nothing n1 sends from the managed address arrives"
    );

    // Only managed addresses are fenced: n1's own and one nobody registered work both ways.
    let source = counter(&bpffs, "dropped_fenced_source");
    for ip in [family.node, unmanaged] {
        assert!(probes.answers(tb, ip), "{ip} still answers while fenced");
        assert!(probes.sends_from(tb, ip), "n1 still sends from {ip} while fenced");
    }
    assert_eq!(
        counter(&bpffs, "dropped_fenced_source"),
        source,
        "nothing of theirs was dropped"
    );

    // The shim comes back and renews first: the address works again.
    dp.maps.renew_fence(GRACE * 10).unwrap();
    assert!(!dp.maps.fence_expired().unwrap());
    assert!(probes.answers(tb, managed), "renewed: ARP resolves to n1 again");
    assert!(probes.sends_from(tb, managed), "renewed: n1 sends from it again");

    // Past the deadline again, an address taken off the managed list is no longer fenced...
    dp.maps.renew_fence(Duration::ZERO).unwrap();
    assert!(wait_for(Duration::from_secs(1), || dp
        .maps
        .fence_expired()
        .unwrap()));
    assert!(!probes.answers(tb, managed), "fenced again");
    dp.maps
        .remove_managed(managed.parse::<IpAddr>().unwrap())
        .unwrap();
    dp.maps
        .remove_managed(managed.parse::<IpAddr>().unwrap())
        .unwrap(); // already gone: fine
    assert!(dp.maps.managed().unwrap().is_empty());
    assert!(
        probes.answers(tb, managed),
        "unregistered: answered while the fence is expired"
    );

    // ...and with the fence detached nothing is, registered or not.
    dp.maps
        .set_managed(managed.parse::<IpAddr>().unwrap(), ifindex)
        .unwrap();
    assert!(!probes.answers(tb, managed), "registered again: fenced");
    dp.detach_fence(ifindex).unwrap();
    assert!(!dp.pinned_ifindexes(PROG_FENCE).contains(&ifindex));
    assert!(probes.answers(tb, managed), "detached: no fence");
    assert!(probes.sends_from(tb, managed), "detached: n1 sends from it");
}

#[test]
fn the_fence_refuses_interfaces_without_ethernet_framing() {
    let Some(tb) = testbed("the_fence_refuses_interfaces_without_ethernet_framing") else {
        return;
    };
    let mut dp = Datapath::load(&tb.bpffs().join("n1"), Capacity::default()).expect("loads the datapath");
    let refused = in_netns(&tb.ns("n1"), || {
        let lo = sluice_shim::netdev::ifindex("lo").expect("n1 has a loopback");
        dp.attach_fence("lo", lo).err().map(|e| format!("{e:?}"))
    });
    let err = refused.expect("loopback has no Ethernet framing: refused");
    assert!(err.contains("not an Ethernet device"), "{err}");
    assert!(dp.pinned_ifindexes(PROG_FENCE).is_empty());
}
