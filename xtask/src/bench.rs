//! `cargo xtask bench-datapath`: pod → external host throughput, its CPU cost and the rate of new
//! connections, on the network-namespace testbed, for six ways of getting there:
//!
//! - `a` the testbed's normal path (no Sluice: the pod's node masquerades to its own IP);
//! - `t` a plain VXLAN tunnel from the pod's node to the gateway with no per-packet policy: the
//!   route to the destination points into the tunnel, the gateway SNATs with one static nftables
//!   rule and routes replies back into the tunnel (the physical limit of any steered path);
//! - `b` Sluice, with the policy of the pod (eBPF steering + VXLAN + conntrack SNAT);
//! - `n` Sluice as b with flow pinning off (`--flow-pinning off`): no flow map lookup a packet;
//! - `p` Sluice as b with 100,000 other flows pinned in the flow map (UDP from the pod, filled
//!   before measuring): what a busy node's flow map costs each packet;
//! - `f` the same with full-size pod packets: the pod's MTU is the underlay's (1500), as
//!   native-routing CNIs set it, instead of the testbed's 1450 that leaves room for the tunnel;
//! - `c` Sluice with 1,000,000 (pod, CIDR) pairs: the pod and 999 others, each with the 1,000
//!   destination CIDRs of one allowlist policy, on the pod's node and the gateway;
//! - `d` the iptables way of CNI-agnostic egress gateways: ipset match + fwmark + policy routing
//!   into a VXLAN on the pod's node, connmark + SNAT on the gateway, replies routed back into the
//!   tunnel by the restored mark.
//!
//! The pod is `p2` on node n2, the gateway n1 (egress IP 192.0.2.101), the destination the
//! external host 203.0.113.10. With `--ipv6`, the same over IPv6 (the pod's, the egress and the
//! external host's IPv6 addresses, the underlay still IPv4) for a, t, b, n, c (100,000 unrelated
//! IPv6 pairs: 100 pods × 1,000 CIDRs, since IPv6 entries are one (pod, CIDR) trie) and d. Each variant gets a fresh testbed; the path is checked (the source
//! address the external host sees) before measuring. Besides throughput and CPU, the table counts
//! the IP fragments the pod's node creates per GB sent: a steered TCP flow that does not fit the
//! tunnel shows up there.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sluice_testbed::{
    EGRESS_N1, EGRESS_N1_V6, EXT_A, EXT_A_V6, FileCluster, Gw, Rule, Testbed, enter_netns, in_netns, node_ip,
    node_ip_v6,
};

/// The family of the pod's traffic (the underlay is IPv4 either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The external host's address the pod sends to.
    fn destination(self) -> &'static str {
        match self {
            Family::V4 => EXT_A,
            Family::V6 => EXT_A_V6,
        }
    }

    /// The policy's destination CIDR (holding [`Family::destination`]).
    fn prefix(self) -> &'static str {
        match self {
            Family::V4 => "203.0.113.0/24",
            Family::V6 => "fd00:203:0:113::/64",
        }
    }

    /// The gateway n1's egress IP.
    fn egress(self) -> &'static str {
        match self {
            Family::V4 => EGRESS_N1,
            Family::V6 => EGRESS_N1_V6,
        }
    }

    fn node_ip(self, node: &str) -> &'static str {
        match self {
            Family::V4 => node_ip(node),
            Family::V6 => node_ip_v6(node),
        }
    }

    /// Where `record` puts the table in docs/benchmarks.md.
    fn marker(self) -> &'static str {
        match self {
            Family::V4 => "bench-datapath",
            Family::V6 => "bench-datapath-ipv6",
        }
    }
}

/// How long each measurement runs.
const THROUGHPUT_SECS: u32 = 2;
const CONNECT_MILLIS: u64 = 1500;
const IPERF_PORT: &str = "5201";
const RATE_PORT: u16 = 9000;
/// Variant c: pods x destination CIDRs of one policy (a SaaS allowlist), the bench pod among them.
const ALLOWLIST_PODS: u32 = 1_000;
const ALLOWLIST_CIDRS: u32 = 1_000;
/// The testbed's underlay MTU, which variant f gives the pod.
const UNDERLAY_MTU: u32 = 1500;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    A,
    T,
    B,
    N,
    P,
    F,
    C,
    D,
}

impl Variant {
    /// In the order they run: n, p and f right after b, so that they are measured close
    /// together.
    const ALL: [Variant; 8] = [
        Variant::A,
        Variant::T,
        Variant::B,
        Variant::N,
        Variant::P,
        Variant::F,
        Variant::C,
        Variant::D,
    ];

    fn key(self) -> &'static str {
        match self {
            Variant::A => "a",
            Variant::T => "t",
            Variant::B => "b",
            Variant::N => "n",
            Variant::P => "p",
            Variant::F => "f",
            Variant::C => "c",
            Variant::D => "d",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Variant::A => "no Sluice: normal path, masquerade to the node IP",
            Variant::T => "plain VXLAN to the gateway, no per-packet policy, SNAT there",
            Variant::B => "Sluice (eBPF steering, its VXLAN, conntrack SNAT)",
            Variant::N => "Sluice as b, flow pinning off",
            Variant::P => "Sluice as b, 100,000 other flows pinned",
            Variant::F => "Sluice as b, pod MTU = underlay MTU (1500 instead of 1450)",
            Variant::C => "Sluice with 1,000,000 (pod, CIDR) pairs in the maps (IPv6: 100,000)",
            Variant::D => "iptables: ipset + fwmark + policy routing into VXLAN, SNAT",
        }
    }

    /// The source address the external host must see.
    fn expected_source(self, family: Family) -> &'static str {
        match self {
            Variant::A => family.node_ip("n2"),
            _ => family.egress(),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Measure {
    /// iperf3's receiver throughput (median of [`REPEAT`] runs).
    gbit_s: f64,
    /// Softirq CPU time per GB received (median), in CPU-milliseconds: where the kernel forwards,
    /// filters, NATs, encapsulates and runs the TC programs. Machine-wide, from /proc/stat.
    softirq_ms_per_gb: f64,
    /// Busy share of the whole machine during the transfers (100 % = every core busy; includes
    /// whatever else runs on the machine).
    busy_pct: f64,
    /// Completed connections (connect, read the answer, close) per second, one client thread
    /// (median).
    conns_s: f64,
    conn_failures: u64,
    /// IP fragments the pod's node (n2) created during the throughput runs, all runs together.
    fragments: u64,
    /// Bytes received by iperf3 in those runs, all together.
    bytes: u64,
    /// The segment size of the pod's iperf3 socket (`TCP_MAXSEG` once connected, as iperf3 reports
    /// it; the last run's): what the handshake, with the MSS clamp when steered, left it.
    mss: u64,
    /// Variant f only: (datagrams sent, fragments created on the pod's node) for UDP datagrams
    /// that fill the pod's MTU, which do not fit the tunnel and are fragmented outside it by
    /// design (docs/datapath.md, "MTU"). Shows that the fragment count sees fragmentation.
    udp: Option<(u64, u64)>,
}

impl Measure {
    fn fragments_per_gb(&self) -> f64 {
        if self.bytes == 0 {
            return 0.0;
        }
        self.fragments as f64 / (self.bytes as f64 / 1e9)
    }
}

/// Each measurement runs this many times; the table shows the median.
const REPEAT: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The aggregate `cpu` line of /proc/stat: (busy, softirq, total) in clock ticks (USER_HZ).
fn cpu_ticks() -> Result<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    if v.len() < 8 {
        bail!("unexpected /proc/stat: {line}");
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v[..8].iter().sum();
    let idle = v[3] + v[4];
    Ok((total - idle, v[6], total))
}

/// The variants named by the letters of `variants`, in the order they run.
fn choose(variants: &str, family: Family) -> Result<Vec<Variant>> {
    // IPv6 flows are not pinned (p), and IPv6 routers never fragment (f measures fragments).
    if family == Family::V6
        && let Some(v) = variants.chars().find(|c| matches!(c, 'p' | 'f'))
    {
        bail!("variant {v:?} has no IPv6 counterpart (IPv6: a, t, b, n, c, d)");
    }
    if let Some(unknown) = variants
        .chars()
        .find(|c| !Variant::ALL.iter().any(|v| v.key().starts_with(*c)))
    {
        let known: String = Variant::ALL.iter().map(|v| v.key()).collect();
        bail!("unknown variant {unknown:?} (known: {known})");
    }
    Ok(Variant::ALL
        .into_iter()
        .filter(|v| variants.contains(v.key()))
        .collect())
}

pub fn run(shim: &Path, variants: &str, family: Family) -> Result<String> {
    let chosen = choose(variants, family)?;
    let mut results: Vec<(Variant, Measure)> = Vec::new();
    for v in chosen {
        eprintln!("==> ({}) {}", v.key(), v.describe());
        let started = Instant::now();
        let m = measure_variant(v, shim, family).with_context(|| format!("variant ({})", v.key()))?;
        eprintln!(
            "    {:.2} Gbit/s, MSS {}, {:.0} softirq CPU-ms/GB, {} fragments in {:.2} GB, {:.0} conn/s \
             ({} failed) [{:.0?}]",
            m.gbit_s,
            m.mss,
            m.softirq_ms_per_gb,
            m.fragments,
            m.bytes as f64 / 1e9,
            m.conns_s,
            m.conn_failures,
            started.elapsed()
        );
        results.push((v, m));
    }
    Ok(table(&results))
}

fn measure_variant(v: Variant, shim: &Path, family: Family) -> Result<Measure> {
    match v {
        Variant::A => {
            let mut t = Testbed::new()?;
            measure(&mut t, v, family)
        }
        Variant::T => {
            let mut t = Testbed::new()?;
            plain_tunnel(&t, family)?;
            measure(&mut t, v, family)
        }
        Variant::D => {
            let mut t = Testbed::new()?;
            iptables_way(&t, family)?;
            measure(&mut t, v, family)
        }
        Variant::B | Variant::N | Variant::P | Variant::F | Variant::C => {
            let args: &[&str] = if v == Variant::N {
                &["--flow-pinning", "off"]
            } else {
                &[]
            };
            let mut c = FileCluster::start(shim, args)?;
            let policy = Rule {
                policy: "bench",
                source: "p2",
                destination: family.prefix(),
                gateway: Gw::Node("n1", family.egress()),
            };
            let mut plan = c.plan(&[policy]);
            if v == Variant::C {
                match family {
                    Family::V4 => add_allowlist(&mut plan, ALLOWLIST_PODS, ALLOWLIST_CIDRS),
                    Family::V6 => add_unrelated_v6(&mut plan, UNRELATED_V6_PODS, ALLOWLIST_CIDRS),
                }
            }
            let bytes = serde_json::to_vec(&plan)?;
            c.try_apply_plan(&bytes, Duration::from_secs(180))?;
            if v == Variant::C {
                let s = c.status("n2");
                eprintln!(
                    "    n2's shim holds {} entries as {} sources and {} destinations, and {} IPv6 entries",
                    s["entries"], s["sources"], s["destinations"], s["entriesV6"]
                );
            }
            // The datapath runs without its shims (by design); stopping them keeps their
            // housekeeping out of the CPU measurement.
            for node in ["n1", "n2", "n3"] {
                c.kill_shim(node);
            }
            if v == Variant::F {
                c.set_pod_mtu("p2", UNDERLAY_MTU)?;
            }
            if v == Variant::P {
                pin_flows(&c, PINNED_FLOWS)?;
            }
            measure(&mut c, v, family)
        }
    }
}

/// Variant c over IPv6: pods of the unrelated IPv6 pairs (× [`ALLOWLIST_CIDRS`]).
const UNRELATED_V6_PODS: u32 = 100;

/// On the source node (n2) and the gateway (n1): `pods` IPv6 sources that are no pods of the
/// testbed, each with `cidrs` destination CIDRs of one policy through n1, none of them the bench
/// destination (the bench pod's own entry is in the plan already).
fn add_unrelated_v6(plan: &mut serde_json::Value, pods: u32, cidrs: u32) {
    for (gateway, entries) in pair_nodes(plan) {
        for pod in 1..=pods {
            let source = format!("fd00:10:100::{pod:x}");
            for cidr in 0..cidrs {
                let destination = format!("2001:db8:{cidr:x}::/48");
                entries.push(pair_entry(&source, &destination, gateway.then_some(EGRESS_N1_V6)));
            }
        }
    }
}

/// The entries of the pod's node n2 and the gateway n1 in `plan`, each with whether it is the
/// gateway's.
fn pair_nodes(plan: &mut serde_json::Value) -> Vec<(bool, &mut Vec<serde_json::Value>)> {
    let Some(nodes) = plan["nodes"].as_array_mut() else {
        return Vec::new();
    };
    nodes
        .iter_mut()
        .filter_map(|node| {
            let gateway = match node["name"].as_str() {
                Some("n1") => true,
                Some("n2") => false,
                _ => return None,
            };
            Some((gateway, node["entries"].as_array_mut()?))
        })
        .collect()
}

/// An entry of one (pod, CIDR) pair of policy `bench` through n1: the gateway's (with `egress`,
/// from n2) or the pod's node's.
fn pair_entry(source: &str, destination: &str, egress: Option<&str>) -> serde_json::Value {
    let from = egress.map(|_| node_ip("n2"));
    serde_json::json!({"source": source, "destination": destination, "gateway": node_ip("n1"),
        "egressIP": egress, "interface": null, "sourceNodeIP": from, "policy": "bench"})
}

/// Variant p: flows pinned in the pod's node's flow map besides the measured ones.
const PINNED_FLOWS: u32 = 100_000;

/// Fills n2's flow map with `count` UDP flows of p2 to the external host (distinct source and
/// destination ports), each steered, pinned and sent once.
fn pin_flows(t: &Testbed, count: u32) -> Result<()> {
    let sent = in_netns(&t.ns("p2"), move || -> Result<u32> {
        let mut sent = 0;
        'ports: for sport in 20_000u16..=60_000 {
            let socket = std::net::UdpSocket::bind(("0.0.0.0", sport))?;
            for dport in [9u16, 10, 11] {
                if sent == count {
                    break 'ports;
                }
                socket.send_to(b"pin", (EXT_A, dport))?;
                sent += 1;
            }
        }
        Ok(sent)
    })?;
    if sent < count {
        bail!("pinned only {sent} flows");
    }
    eprintln!("    {sent} flows pinned on n2");
    Ok(())
}

/// On the source node (n2) and the gateway (n1): `pods` sources (the bench pod p2 and others
/// that are no pods of the testbed) each with `cidrs` destination CIDRs of one policy, the bench
/// destination among them, all to the gateway n1.
fn add_allowlist(plan: &mut serde_json::Value, pods: u32, cidrs: u32) {
    let bench_pod = sluice_testbed::PODS
        .iter()
        .find(|(name, _, _)| *name == "p2")
        .map(|(_, _, ip)| *ip)
        .unwrap_or("10.244.2.10");
    for (gateway, entries) in pair_nodes(plan) {
        let egress = gateway.then_some(EGRESS_N1);
        for pod in 0..pods {
            // 10.100.0.0 + pod; the first is the bench pod, whose own entry is in the plan already.
            let source = if pod == 0 {
                bench_pod.to_owned()
            } else {
                std::net::Ipv4Addr::from(0x0a64_0000 + pod).to_string()
            };
            for cidr in 1..cidrs {
                // 11.0.0.0/24 + cidr: none of them the bench destination, which the plan has.
                let destination = format!("{}/24", std::net::Ipv4Addr::from(0x0b00_0000 + (cidr << 8)));
                entries.push(pair_entry(&source, &destination, egress));
            }
            if pod != 0 {
                entries.push(pair_entry(&source, "203.0.113.0/24", egress));
            }
        }
    }
}

/// The VXLAN device of variants t and d between n2 (10.99.0.12) and the gateway n1 (10.99.0.11):
/// a classic point-to-point VXLAN with a fixed remote, on its own port.
fn vxlan_pair(t: &Testbed) -> Result<()> {
    for (node, peer, addr) in [("n1", "n2", "10.99.0.11/24"), ("n2", "n1", "10.99.0.12/24")] {
        t.ip(
            node,
            &[
                "link",
                "add",
                "vxb",
                "type",
                "vxlan",
                "id",
                "77",
                "remote",
                node_ip(peer),
                "local",
                node_ip(node),
                "dstport",
                "4790",
                "dev",
                "eth0",
            ],
        )?;
        t.ip(node, &["addr", "add", addr, "dev", "vxb"])?;
        let addr_v6 = format!("fd00:99::{}/64", &addr[8..10]);
        t.ip(node, &["-6", "addr", "add", &addr_v6, "dev", "vxb", "nodad"])?;
        t.ip(node, &["link", "set", "vxb", "up"])?;
        // Decapsulated packets come from pod IPs the main table may route elsewhere.
        t.sysctl(node, "net.ipv4.conf.all.rp_filter=0")?;
        t.sysctl(node, "net.ipv4.conf.vxb.rp_filter=0")?;
    }
    Ok(())
}

/// Variant t: every packet to the destination goes into the tunnel, every packet to the pod subnet
/// comes back through it, and the gateway SNATs with one static rule (priority 50, before the
/// CNI's masquerade at 100, as Sluice's chain).
fn plain_tunnel(t: &Testbed, family: Family) -> Result<()> {
    vxlan_pair(t)?;
    if family == Family::V6 {
        t.ip(
            "n2",
            &[
                "-6",
                "route",
                "add",
                family.prefix(),
                "via",
                "fd00:99::11",
                "dev",
                "vxb",
            ],
        )?;
        t.ip(
            "n1",
            &[
                "-6",
                "route",
                "replace",
                "fd00:10:244:2::/64",
                "via",
                "fd00:99::12",
                "dev",
                "vxb",
            ],
        )?;
        return t.nft(
            "n1",
            &format!(
                "table ip6 tunnel {{\n chain post {{\n  type nat hook postrouting priority 50; policy accept;\n  \
                 ip6 saddr fd00:10:244::/48 ip6 daddr {} oifname \"eth0\" snat to {EGRESS_N1_V6}\n }}\n}}\n",
                family.prefix()
            ),
        );
    }
    t.ip(
        "n2",
        &[
            "route",
            "add",
            "203.0.113.0/24",
            "via",
            "10.99.0.11",
            "dev",
            "vxb",
        ],
    )?;
    t.ip(
        "n1",
        &[
            "route",
            "replace",
            "10.244.2.0/24",
            "via",
            "10.99.0.12",
            "dev",
            "vxb",
        ],
    )?;
    t.nft(
        "n1",
        &format!(
            "table ip tunnel {{\n chain post {{\n  type nat hook postrouting priority 50; policy accept;\n  \
             ip saddr 10.244.0.0/16 ip daddr 203.0.113.0/24 oifname \"eth0\" snat to {EGRESS_N1}\n }}\n}}\n"
        ),
    )
}

/// Variant d, the way iptables-based egress gateways do it; for IPv6 ip6tables, ipsets of family
/// inet6 and IPv6 policy routing, the same way (the tunnel's outer packets stay IPv4, routed by
/// the IPv4 rules, which match no IPv6 mark).
fn iptables_way(t: &Testbed, family: Family) -> Result<()> {
    vxlan_pair(t)?;
    let run = |node: &str, program: &str, args: &str| -> Result<()> {
        let args: Vec<&str> = args.split_whitespace().collect();
        t.run(node, program, &args).map(drop)
    };
    let (iptables, ip, ipset_family, pod, peer) = match family {
        Family::V4 => ("iptables", "-4", "inet", t.pod("p2").1.to_owned(), "10.99.0."),
        Family::V6 => ("ip6tables", "-6", "inet6", t.pod_ip_v6("p2"), "fd00:99::"),
    };
    // The pod's node: match (source pod, destination) with ipsets, mark, route the mark into the
    // tunnel.
    run(
        "n2",
        "ipset",
        &format!("create egw-src hash:ip family {ipset_family}"),
    )?;
    run("n2", "ipset", &format!("add egw-src {pod}"))?;
    run(
        "n2",
        "ipset",
        &format!("create egw-dst hash:net family {ipset_family}"),
    )?;
    run("n2", "ipset", &format!("add egw-dst {}", family.prefix()))?;
    run(
        "n2",
        iptables,
        "-t mangle -A PREROUTING -m set --match-set egw-src src -m set --match-set egw-dst dst \
         -j MARK --set-mark 0x77",
    )?;
    // The gateway: remember tunnelled connections in the conntrack mark, SNAT them (inserted first
    // in POSTROUTING, as those gateways do), and send their replies back into the tunnel.
    run(
        "n1",
        iptables,
        "-t mangle -A PREROUTING -i vxb -j CONNMARK --set-mark 0x77",
    )?;
    run(
        "n1",
        iptables,
        "-t mangle -A PREROUTING -m conntrack --ctdir REPLY -m connmark --mark 0x77 -j MARK --set-mark 0x77",
    )?;
    run(
        "n1",
        iptables,
        &format!(
            "-t nat -I POSTROUTING -m connmark --mark 0x77 -j SNAT --to-source {}",
            family.egress()
        ),
    )?;
    for (node, other) in [("n2", "11"), ("n1", "12")] {
        run(
            node,
            "ip",
            &format!("{ip} rule add fwmark 0x77 lookup 77 pref 100"),
        )?;
        run(
            node,
            "ip",
            &format!("{ip} route add default via {peer}{other} dev vxb table 77"),
        )?;
        // The VXLAN device routes the outer (IPv4) packet with the inner packet's mark: let the
        // underlay fall through to the main table (without it, the tunnel would route into
        // itself).
        if family == Family::V4 {
            run(node, "ip", "route add throw 192.0.2.0/24 table 77")?;
        }
    }
    Ok(())
}

fn measure(t: &mut Testbed, v: Variant, family: Family) -> Result<Measure> {
    let seen = t
        .fetch("p2", family.destination())
        .map_err(|e| anyhow::anyhow!("checking the path: {e}"))?;
    if seen != v.expected_source(family) {
        bail!(
            "the external host saw {seen}, expected {}: the variant is not set up right",
            v.expected_source(family)
        );
    }
    let mut m = Measure::default();
    throughput(t, &mut m, family)?;
    if v == Variant::F {
        m.udp = Some(udp_fragments(t)?);
    }
    connection_rate(t, v, family, &mut m)?;
    Ok(m)
}

fn throughput(t: &mut Testbed, m: &mut Measure, family: Family) -> Result<()> {
    let mut server = t.command("ext", "iperf3");
    server.args(["-s", "-p", IPERF_PORT]);
    t.spawn("iperf3-server", server)?;
    let listening = sluice_testbed::wait_for(Duration::from_secs(5), || {
        t.run("ext", "ss", &["-Hltn", &format!("sport = :{IPERF_PORT}")])
            .is_ok_and(|o| !o.trim().is_empty())
    });
    if !listening {
        bail!("iperf3 server did not start: {}", t.log("iperf3-server"));
    }
    let (mut gbit_s, mut softirq, mut busy) = (vec![], vec![], vec![]);
    for _ in 0..REPEAT {
        let fragments_before = t.fragments_created("n2");
        let before = cpu_ticks()?;
        let secs = THROUGHPUT_SECS.to_string();
        let out = t
            .run(
                "p2",
                "timeout",
                &[
                    "30",
                    "iperf3",
                    "-c",
                    family.destination(),
                    "-p",
                    IPERF_PORT,
                    "-t",
                    &secs,
                    "-J",
                ],
            )
            .context("iperf3 client")?;
        let after = cpu_ticks()?;
        // Nothing but iperf3's two connections crosses n2 meanwhile, so the delta is theirs.
        m.fragments += t.fragments_created("n2") - fragments_before;
        let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
        m.mss = json["start"]["tcp_mss_default"].as_u64().unwrap_or(0);
        let received = &json["end"]["sum_received"];
        let bits = received["bits_per_second"]
            .as_f64()
            .context("no throughput in iperf3's output")?;
        // A float in some iperf3 versions.
        let bytes = received["bytes"].as_f64().unwrap_or(0.0) as u64;
        m.bytes += bytes;
        let gb = bytes as f64 / 1e9;
        // USER_HZ: /proc/stat counts in 1/100 s.
        let (b, s, total) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
        gbit_s.push(bits / 1e9);
        softirq.push(if gb > 0.0 { s as f64 * 10.0 / gb } else { 0.0 });
        busy.push(100.0 * b as f64 / total.max(1) as f64);
    }
    t.kill("iperf3-server");
    m.gbit_s = median(gbit_s);
    m.softirq_ms_per_gb = median(softirq);
    m.busy_pct = median(busy);
    Ok(())
}

/// One second of 1472-byte UDP datagrams (a full 1500-byte packet each) from the pod at 200 Mbit/s:
/// (datagrams sent, fragments n2 created).
fn udp_fragments(t: &mut Testbed) -> Result<(u64, u64)> {
    let mut server = t.command("ext", "iperf3");
    server.args(["-s", "-1", "-p", IPERF_PORT]);
    t.spawn("iperf3-udp-server", server)?;
    let listening = sluice_testbed::wait_for(Duration::from_secs(5), || {
        t.run("ext", "ss", &["-Hltn", &format!("sport = :{IPERF_PORT}")])
            .is_ok_and(|o| !o.trim().is_empty())
    });
    if !listening {
        bail!("iperf3 server did not start: {}", t.log("iperf3-udp-server"));
    }
    let before = t.fragments_created("n2");
    let out = t
        .run(
            "p2",
            "timeout",
            &[
                "30", "iperf3", "-c", EXT_A, "-p", IPERF_PORT, "-u", "-l", "1472", "-b", "200M", "-t", "1",
                "-J",
            ],
        )
        .context("iperf3 UDP client")?;
    let fragments = t.fragments_created("n2") - before;
    t.kill("iperf3-udp-server");
    let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    let sent = json["end"]["sum"]["packets"]
        .as_u64()
        .context("no datagram count in iperf3's output")?;
    Ok((sent, fragments))
}

/// One client thread in the pod opens connections to a server on the external host for a few
/// seconds; the server writes the source address it saw and closes (so the TIME_WAIT state stays
/// on its side), the client reads it to the end and checks it.
fn connection_rate(t: &Testbed, v: Variant, family: Family, m: &mut Measure) -> Result<()> {
    let any = match family {
        Family::V4 => "0.0.0.0",
        Family::V6 => "::",
    };
    let listener = in_netns(&t.ns("ext"), || TcpListener::bind((any, RATE_PORT)))
        .context("binding the connection-rate server")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let server = std::thread::spawn(move || {
        for conn in listener.incoming() {
            if flag.load(Ordering::Relaxed) {
                break;
            }
            if let Ok(mut s) = conn {
                let ip = s.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
                let _ = s.write_all(ip.as_bytes());
            }
        }
    });
    let (pod_ns, expected) = (t.ns("p2"), v.expected_source(family));
    let destination: std::net::IpAddr = family.destination().parse().context("the destination")?;
    let client = std::thread::spawn(move || {
        enter_netns(&pod_ns);
        let addr = SocketAddr::new(destination, RATE_PORT);
        let one = || -> std::io::Result<bool> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut seen = String::new();
            s.read_to_string(&mut seen)?;
            Ok(seen == expected)
        };
        let mut rates = Vec::new();
        let mut failed = 0u64;
        for _ in 0..REPEAT {
            let mut ok = 0u64;
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(CONNECT_MILLIS) {
                match one() {
                    Ok(true) => ok += 1,
                    _ => failed += 1,
                }
            }
            rates.push(ok as f64 / started.elapsed().as_secs_f64());
        }
        (rates, failed)
    });
    let (rates, failed) = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
    stop.store(true, Ordering::Relaxed);
    // Wake the server up so that it sees the flag.
    let _ = in_netns(&t.ns("ext"), || {
        TcpStream::connect_timeout(&SocketAddr::new(destination, RATE_PORT), Duration::from_secs(1))
    });
    let _ = server.join();
    m.conns_s = median(rates);
    m.conn_failures = failed;
    Ok(())
}

fn ratio(results: &[(Variant, Measure)], num: Variant, den: Variant, f: fn(&Measure) -> f64) -> String {
    let get = |v| results.iter().find(|(w, _)| *w == v).map(|(_, m)| f(m));
    match (get(num), get(den)) {
        (Some(n), Some(d)) if d > 0.0 => format!("{:.2}", n / d),
        _ => "-".into(),
    }
}

fn table(results: &[(Variant, Measure)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| variant | what | throughput (Gbit/s) | pod's TCP MSS | softirq CPU-ms per GB | \
         machine busy (%) | IP fragments on the pod's node per GB (count / GB) | \
         new connections/s (failed) |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
    for (v, m) in results {
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {} | {:.0} | {:.0} | {:.0} ({} / {:.2}) | {:.0} ({}) |",
            v.key(),
            v.describe(),
            m.gbit_s,
            m.mss,
            m.softirq_ms_per_gb,
            m.busy_pct,
            m.fragments_per_gb(),
            m.fragments,
            m.bytes as f64 / 1e9,
            m.conns_s,
            m.conn_failures
        );
    }
    for (v, m) in results {
        if let Some((sent, fragments)) = m.udp {
            let _ = writeln!(
                s,
                "\n({}) 1472-byte UDP datagrams from the pod, 1 s: {fragments} fragments on the \
                 pod's node for {sent} datagrams (outer fragmentation, by design).",
                v.key()
            );
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| ratio | throughput | softirq CPU per GB | new connections/s |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for (name, num, den) in [
        ("b/t (target ≥ 0.95)", Variant::B, Variant::T),
        ("b/n (cost of flow pinning)", Variant::B, Variant::N),
        ("p/b (100,000 pinned flows)", Variant::P, Variant::B),
        ("f/b (target ≥ 0.9)", Variant::F, Variant::B),
        ("c/b (target ≥ 0.95)", Variant::C, Variant::B),
        ("b/d (target ≥ 1)", Variant::B, Variant::D),
        ("t/a (cost of the tunnel hop)", Variant::T, Variant::A),
    ] {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} |",
            ratio(results, num, den, |m| m.gbit_s),
            ratio(results, num, den, |m| m.softirq_ms_per_gb),
            ratio(results, num, den, |m| m.conns_s),
        );
    }
    s
}

/// A one-line description of this machine.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{cores} × {cpu}, kernel {}, load average before the run {}",
        kernel.trim(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )
}

/// Replaces the generated block of the `## Datapath` section of `docs/benchmarks.md` (creating the
/// file or the section when missing); text outside the block is left alone.
pub fn record(doc: &Path, block: &str, family: Family) -> Result<()> {
    let marker = family.marker();
    let command = match family {
        Family::V4 => "cargo xtask bench-datapath",
        Family::V6 => "cargo xtask bench-datapath --ipv6",
    };
    let start = format!("<!-- {marker}:start (generated by `{command}`) -->");
    let end = format!("<!-- {marker}:end -->");
    let text = std::fs::read_to_string(doc).unwrap_or_else(|_| "# Benchmarks\n".into());
    let generated = format!("{start}\n{block}{end}\n");
    let new = match (text.find(&start), text.find(&end)) {
        (Some(a), Some(b)) if a < b => {
            format!(
                "{}{generated}{}",
                &text[..a],
                text[b + end.len()..].trim_start_matches('\n')
            )
        }
        _ => match text.find("\n## Datapath\n") {
            Some(at) => {
                let body = at + "\n## Datapath\n".len();
                format!("{}\n{generated}{}", &text[..body], &text[body..])
            }
            None => format!(
                "{}\n## Datapath\n\n{generated}",
                text.trim_end_matches('\n').to_owned() + "\n"
            ),
        },
    };
    std::fs::write(doc, new).with_context(|| format!("writing {}", doc.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_are_chosen_by_letter_in_running_order() {
        assert_eq!(choose("fb", Family::V4).unwrap(), [Variant::B, Variant::F]);
        assert_eq!(choose("atbnpfcd", Family::V4).unwrap(), Variant::ALL);
        let err = choose("bx", Family::V4).unwrap_err().to_string();
        assert!(err.contains("'x'"), "{err}");
    }

    #[test]
    fn the_table_shows_fragments_per_gb_and_the_full_mtu_ratio() {
        let b = Measure {
            gbit_s: 6.0,
            bytes: 4_000_000_000,
            ..Measure::default()
        };
        let f = Measure {
            gbit_s: 5.7,
            fragments: 1_000_000,
            bytes: 2_000_000_000,
            udp: Some((16_970, 33_940)),
            ..Measure::default()
        };
        let table = table(&[(Variant::B, b), (Variant::F, f)]);
        assert!(table.contains("| 0 (0 / 4.00) |"), "{table}");
        assert!(table.contains("| 500000 (1000000 / 2.00) |"), "{table}");
        assert!(table.contains("| f/b (target ≥ 0.9) | 0.95 |"), "{table}");
        assert!(
            table.contains("(f) 1472-byte UDP datagrams from the pod, 1 s: 33940 fragments"),
            "{table}"
        );
    }
}
