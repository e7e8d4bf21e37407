//! The shim's netlink view of the node against the kernel (needs root): the tunnel device it
//! creates, replaces and deletes, the links and addresses it scans, the notifications that wake it.
//!
//! Each test runs on a thread of its own in a fresh network namespace (gone with the thread), and
//! checks what the shim did with `ip` and `nft`, which read the kernel independently.

use std::{net::Ipv4Addr, process::Command, time::Duration};

use sluice_shim::{
    netdev::{self, Tunnel},
    rp_filter,
};

/// Runs `f` on a thread in a new network namespace, or prints a SKIP line when not root.
fn in_fresh_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Option<T> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP netdev_e2e::{name}: needs root (network namespaces); CI runs it as root");
        return None;
    }
    Some(std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare the netns");
            f()
        })
        .join()
        .expect("netns thread")
    }))
}

/// Runs `program ARGS` in the calling thread's namespace; panics when it fails.
fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) {
    sh("ip", args);
}

/// `ip -d -j link show dev NAME`, as JSON.
fn link_json(name: &str) -> serde_json::Value {
    let out = sh("ip", &["-d", "-j", "link", "show", "dev", name]);
    serde_json::from_str::<serde_json::Value>(&out).expect("ip -j")[0].clone()
}

fn exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn read_sysctl(key: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{key}"))
        .expect(key)
        .trim()
        .to_owned()
}

const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);

fn tunnel() -> Tunnel {
    Tunnel {
        device: "sluice-vx0".into(),
        port: 8473,
        vni: 8473,
        local: Some(LOCAL.into()),
    }
}

/// [`netdev::ensure_tunnel`] with [`tunnel`], recording the rp_filter values it changes in a
/// directory that goes when it returns.
fn ensure_tunnel() -> Result<u32, Box<sluice_shim::Error>> {
    let pins = tempfile::tempdir().unwrap();
    netdev::ensure_tunnel(&tunnel(), &rp_filter::Record::in_bpffs(pins.path())).map_err(Box::new)
}

/// An underlay interface holding [`LOCAL`] (a veth: the test kernel may have no dummy driver).
fn underlay() {
    ip(&[
        "link",
        "add",
        "under0",
        "type",
        "veth",
        "peer",
        "name",
        "under0-peer",
    ]);
    ip(&["addr", "add", "192.0.2.11/24", "dev", "under0"]);
    ip(&["link", "set", "under0", "up"]);
}

#[test]
fn the_tunnel_made_over_netlink_has_the_settings_asked_for() {
    in_fresh_netns("the_tunnel_made_over_netlink", || {
        underlay();
        let index = ensure_tunnel().expect("creates the tunnel");
        let link = link_json("sluice-vx0");
        assert_eq!(link["ifindex"], index, "{link:#}");
        let flags: Vec<&str> = link["flags"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f.as_str())
            .collect();
        assert!(flags.contains(&"UP") && flags.contains(&"NOARP"), "{flags:?}");
        assert_eq!(link["linkinfo"]["info_kind"], "vxlan", "{link:#}");
        let data = &link["linkinfo"]["info_data"];
        assert_eq!(data["external"], true, "{data:#}");
        assert_eq!(data["port"], 8473, "{data:#}");
        assert_eq!(data["learning"], false, "{data:#}");
        assert_eq!(data["local"], "192.0.2.11", "{data:#}");
        // IPv6 pods' packets pass through it, but it has no address of its own to speak from.
        assert_eq!(read_sysctl("net/ipv6/conf/sluice-vx0/disable_ipv6"), "0");
        assert_eq!(read_sysctl("net/ipv6/conf/sluice-vx0/addr_gen_mode"), "1");
        let addrs = sh("ip", &["-6", "-j", "addr", "show", "dev", "sluice-vx0"]);
        assert!(!addrs.contains("fe80"), "no link-local address: {addrs}");
        assert_eq!(read_sysctl("net/ipv4/conf/sluice-vx0/rp_filter"), "0");

        // The device `ip link add ... external` made before is the same device but for its port:
        // same settings otherwise, same MTU.
        ip(&[
            "link",
            "add",
            "by-ip",
            "type",
            "vxlan",
            "external",
            "dstport",
            "8474",
            "local",
            "192.0.2.11",
        ]);
        let by_ip = link_json("by-ip");
        let without_port = |v: &serde_json::Value| {
            let mut d = v["linkinfo"]["info_data"].clone();
            d.as_object_mut().unwrap().remove("port");
            d
        };
        assert_eq!(without_port(&link), without_port(&by_ip));
        assert_eq!(link["mtu"], by_ip["mtu"]);

        // In place and as asked: kept.
        assert_eq!(ensure_tunnel().unwrap(), index);
        let held = netdev::tunnel_held("sluice-vx0").unwrap().expect("is there");
        assert!(tunnel().is_held_by(&held), "{held:?}");
        assert!(held.up && !held.arp, "{held:?}");
    });
}

#[test]
fn a_device_with_other_settings_is_replaced() {
    in_fresh_netns("a_device_with_other_settings_is_replaced", || {
        underlay();
        let others: [&[&str]; 6] = [
            &[
                "type",
                "vxlan",
                "external",
                "dstport",
                "4789",
                "local",
                "192.0.2.11",
            ],
            &[
                "type",
                "vxlan",
                "id",
                "42",
                "dstport",
                "8473",
                "local",
                "192.0.2.11",
            ],
            &[
                "type",
                "vxlan",
                "external",
                "dstport",
                "8473",
                "local",
                "192.0.2.11",
                "learning",
            ],
            &[
                "type",
                "vxlan",
                "external",
                "dstport",
                "8473",
                "local",
                "192.0.2.12",
            ],
            &["type", "vxlan", "external", "dstport", "8473"],
            &["type", "veth", "peer", "name", "not-a-tunnel"],
        ];
        for other in others {
            let mut args = vec!["link", "add", "sluice-vx0"];
            args.extend(other);
            ip(&args);
            let before = link_json("sluice-vx0")["ifindex"].as_u64().unwrap();
            let index = ensure_tunnel().expect("replaces it");
            assert_ne!(u64::from(index), before, "{other:?} was kept");
            let data = link_json("sluice-vx0")["linkinfo"]["info_data"].clone();
            assert_eq!(data["port"], 8473, "{other:?}: {data:#}");
            assert_eq!(data["external"], true, "{other:?}: {data:#}");
            assert_eq!(data["learning"], false, "{other:?}: {data:#}");
            assert_eq!(data["local"], "192.0.2.11", "{other:?}: {data:#}");
            netdev::delete_link("sluice-vx0").unwrap();
            assert!(!exists("sluice-vx0"), "{other:?}");
        }

        // What earlier shims made with `ip link add` (down, ARP on) is the tunnel: kept, set up.
        ip(&[
            "link",
            "add",
            "sluice-vx0",
            "type",
            "vxlan",
            "external",
            "dstport",
            "8473",
            "local",
            "192.0.2.11",
        ]);
        let before = link_json("sluice-vx0")["ifindex"].as_u64().unwrap();
        assert_eq!(u64::from(ensure_tunnel().unwrap()), before);
        let held = netdev::tunnel_held("sluice-vx0").unwrap().unwrap();
        assert!(held.up && !held.arp, "{held:?}");

        netdev::delete_link("sluice-vx0").unwrap();
        netdev::delete_link("sluice-vx0").expect("one already gone is fine");
        assert_eq!(netdev::tunnel_held("sluice-vx0").unwrap(), None);
    });
}

#[test]
fn a_scan_reads_links_addresses_bridges_counters_and_the_default_route() {
    in_fresh_netns("a_scan_reads", || {
        underlay();
        ip(&["addr", "add", "192.0.2.12/24", "dev", "under0"]);
        ip(&["link", "set", "under0", "mtu", "1400"]);
        ip(&[
            "link",
            "add",
            "under1",
            "type",
            "veth",
            "peer",
            "name",
            "under1-peer",
        ]);
        ip(&["addr", "add", "198.51.100.11/24", "dev", "under1"]);
        ip(&["link", "set", "under1", "up"]);
        ip(&["route", "add", "default", "dev", "under0", "metric", "100"]);
        ip(&[
            "route",
            "add",
            "default",
            "via",
            "198.51.100.1",
            "dev",
            "under1",
            "metric",
            "50",
        ]);
        ip(&["route", "add", "default", "dev", "under0", "table", "8473"]);
        ip(&["link", "add", "br0", "type", "bridge"]);
        ip(&["link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b"]);
        ip(&["link", "set", "veth-a", "master", "br0"]);
        ip(&["link", "set", "lo", "up"]);
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..20 {
            socket.send_to(b"x", "127.0.0.1:9").unwrap();
        }

        let scan = netdev::scan().expect("scans");
        let lo_rx = sh("ip", &["-s", "-j", "link", "show", "lo"]);
        let lo_rx: serde_json::Value = serde_json::from_str(&lo_rx).unwrap();
        let lo_rx = lo_rx[0]["stats64"]["rx"]["packets"].as_u64().unwrap();

        // Names, indexes and IPv4 addresses as `ip` lists them.
        let listed: serde_json::Value = serde_json::from_str(&sh("ip", &["-j", "addr", "show"])).unwrap();
        let mut want: Vec<(String, u64, Vec<String>)> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let v4 = l["addr_info"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|a| a["family"] == "inet")
                    .map(|a| a["local"].as_str().unwrap().to_owned())
                    .collect();
                (
                    l["ifname"].as_str().unwrap().to_owned(),
                    l["ifindex"].as_u64().unwrap(),
                    v4,
                )
            })
            .collect();
        want.sort();
        let got: Vec<(String, u64, Vec<String>)> = scan
            .interfaces
            .iter()
            .map(|i| {
                (
                    i.name.clone(),
                    u64::from(i.index),
                    i.ipv4.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        assert_eq!(got, want);

        let index = |name: &str| scan.ifindex(name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(scan.link(index("veth-a")).unwrap().master, Some(index("br0")));
        assert_eq!(scan.link(index("veth-b")).unwrap().master, None);
        assert_eq!(
            scan.mtu_of_address(Ipv4Addr::new(192, 0, 2, 12).into()),
            Some(1400)
        );
        let lo = scan.link(index("lo")).unwrap().rx_packets.unwrap();
        assert!((20..=lo_rx).contains(&lo), "lo received {lo}, ip says {lo_rx}");
        assert_eq!(
            netdev::default_route_interface().as_deref(),
            Some("under1"),
            "the main table's default with the lowest metric"
        );
        assert_eq!(netdev::interfaces().unwrap(), scan.interfaces);
        assert_eq!(netdev::ifindex("br0"), Some(index("br0")));
        assert_eq!(netdev::ifindex("nothing0"), None);
    });
}

#[test]
fn notifications_come_for_links_addresses_routes_and_rules() {
    in_fresh_netns("notifications_come", || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut events = netdev::LinkEvents::open().expect("subscribes");
            let changes: [&[&str]; 8] = [
                &[
                    "link",
                    "add",
                    "under0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "under0-peer",
                ],
                &["link", "set", "under0", "up"],
                &["addr", "add", "192.0.2.11/24", "dev", "under0"],
                &["route", "add", "198.18.0.0/24", "dev", "under0", "table", "8480"],
                &["rule", "add", "fwmark", "0x10", "lookup", "8480", "pref", "8474"],
                &[
                    "-6",
                    "addr",
                    "add",
                    "fd00:192:0:2::11/64",
                    "dev",
                    "under0",
                    "nodad",
                ],
                &[
                    "-6",
                    "route",
                    "add",
                    "fd00:198:18::/64",
                    "dev",
                    "under0",
                    "table",
                    "8480",
                ],
                &[
                    "-6", "rule", "add", "fwmark", "0x10", "lookup", "8480", "pref", "8474",
                ],
            ];
            for change in changes {
                ip(change);
                let woke = tokio::time::timeout(Duration::from_secs(10), events.changed()).await;
                assert!(
                    matches!(woke, Ok(Ok(()))),
                    "no notification after ip {change:?}: {woke:?}"
                );
            }
        });
    });
}

#[test]
fn uninstall_removes_the_table_and_the_tunnel_over_netlink() {
    in_fresh_netns("uninstall_removes", || {
        underlay();
        ensure_tunnel().unwrap();
        // This version's table, and an earlier version's IPv4-only one: both go.
        let table = "table inet sluice {\n chain postrouting {\n  type nat hook postrouting priority 50;\n }\n}\n\
                     table ip sluice {\n chain postrouting {\n  type nat hook postrouting priority 50;\n }\n}\n\
                     table ip other {\n chain input {\n  type filter hook input priority 0;\n }\n}\n";
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        nft.stdin.take().unwrap().write_all(table.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success());
        let bpffs = tempfile::tempdir().unwrap();
        let pins = bpffs.path().join("sluice");
        std::fs::create_dir_all(pins.join("links")).unwrap();

        sluice_shim::uninstall::uninstall(&pins, "sluice-vx0", 8473).expect("uninstalls");
        let tables = sh("nft", &["list", "tables"]);
        assert!(!tables.contains(" sluice"), "{tables}");
        assert!(tables.contains("ip other"), "another table stays: {tables}");
        assert!(!exists("sluice-vx0"));
        assert!(!pins.exists());
        sluice_shim::uninstall::uninstall(&pins, "sluice-vx0", 8473).expect("twice is fine");
    });
}

/// Every IPv4 `rp_filter` setting of the namespace but the tunnel's, by name.
fn rp_filters() -> std::collections::BTreeMap<String, String> {
    std::fs::read_dir("/proc/sys/net/ipv4/conf")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "sluice-vx0")
        .map(|name| {
            let value = read_sysctl(&format!("net/ipv4/conf/{name}/rp_filter"));
            (name, value)
        })
        .collect()
}

#[test]
fn uninstall_puts_back_the_rp_filter_settings_the_shim_found() {
    in_fresh_netns("uninstall_puts_back_rp_filter", || {
        let set = |conf: &str, value: &str| {
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{conf}/rp_filter"), value).unwrap();
        };
        underlay();
        for (name, peer) in [("egr0", "egr0-peer"), ("gone0", "gone0-peer")] {
            ip(&["link", "add", name, "type", "veth", "peer", "name", peer]);
        }
        // Strict by default; interfaces below it (raised when `all` is lowered), at it, and
        // above it (left alone).
        for (conf, value) in [
            ("all", "1"),
            ("default", "0"),
            ("lo", "0"),
            ("under0", "0"),
            ("under0-peer", "2"),
            ("egr0", "1"),
            ("egr0-peer", "0"),
            ("gone0", "0"),
            ("gone0-peer", "0"),
        ] {
            set(conf, value);
        }
        let found = rp_filters();
        let bpffs = tempfile::tempdir().unwrap();
        let pins = bpffs.path().join("sluice");
        let record = rp_filter::Record::in_bpffs(&pins);

        netdev::ensure_tunnel(&tunnel(), &record).expect("creates the tunnel");
        rp_filter::loosen("egr0", &record).unwrap();
        rp_filter::loosen("under0", &record).unwrap();
        let relaxed = rp_filters();
        let changed = |conf: &str| (found[conf].as_str(), relaxed[conf].as_str());
        assert_eq!(changed("all"), ("1", "0"));
        assert_eq!(changed("default"), ("0", "1"));
        assert_eq!(changed("under0"), ("0", "2"), "raised to strict, then loosened");
        assert_eq!(changed("egr0"), ("1", "2"));
        assert_eq!(changed("under0-peer"), ("2", "2"));
        assert_eq!(read_sysctl("net/ipv4/conf/sluice-vx0/rp_filter"), "0");

        // A restarted shim finds the relaxed values: they must not replace the recorded ones.
        let recorded = record.entries().unwrap();
        netdev::delete_link("sluice-vx0").unwrap();
        netdev::ensure_tunnel(&tunnel(), &record).unwrap();
        rp_filter::loosen("egr0", &record).unwrap();
        assert_eq!(record.entries().unwrap(), recorded);
        assert!(
            recorded.contains(&("all".to_owned(), 1)) && recorded.contains(&("egr0".to_owned(), 1)),
            "{recorded:?}"
        );

        // An interface gone meanwhile (a pod's) is skipped; every other one is as it was.
        ip(&["link", "del", "gone0"]);
        sluice_shim::uninstall::uninstall(&pins, "sluice-vx0", 8473).expect("uninstalls");
        let mut expected = found.clone();
        expected.retain(|conf, _| !conf.starts_with("gone0"));
        assert_eq!(rp_filters(), expected);
        assert!(!pins.exists(), "the record goes with the pins");
        // Uninstalling again (no record now) changes nothing.
        set("egr0", "2");
        sluice_shim::uninstall::uninstall(&pins, "sluice-vx0", 8473).expect("twice is fine");
        assert_eq!(read_sysctl("net/ipv4/conf/egr0/rp_filter"), "2");
    });
}
