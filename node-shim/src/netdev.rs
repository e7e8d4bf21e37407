//! This node's interfaces: discovery, pod-interface patterns, Sluice's tunnel device, sysctls.
//!
//! Everything is read and written over netlink ([`crate::netlink`]): one link dump and one IPv4
//! address dump make a [`Scan`] (names, indexes, addresses, MTUs, bridge masters, received
//! packets), taken on every netlink link/address/route/rule notification ([`LinkEvents`]) and on
//! every tick as a backstop. The tunnel device is created, checked and deleted with link
//! requests; only the sysctls go through `/proc/sys`.

use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::Duration,
};

use ipnet::{Ipv4Net, Ipv6Net};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
};
use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket, protocols};

use crate::{
    desired::Interface,
    error::{Error, Result},
    netlink::{self, Netlink},
};

/// Default pod-interface patterns, covering common CNIs.
pub const DEFAULT_POD_INTERFACES: &[&str] =
    &["veth*", "cali*", "lxc*", "cni*", "eni*", "gke*", "azv*", "vnet*"];

fn route_socket() -> Result<Netlink> {
    Netlink::route().map_err(|e| Error::io("opening a route netlink socket", e))
}

/// What a link dump says of one link, beyond its addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: Option<u32>,
    /// The device it is enslaved to (a bridge, for bridged pod interfaces).
    pub master: Option<u32>,
    /// Packets received (for a pod's host-side veth: what the pod sent).
    pub rx_packets: Option<u64>,
    /// Up and running (carrier): a link that is not cannot reach its neighbours.
    pub running: bool,
}

impl Link {
    /// The link of a `RTM_NEWLINK` message (a dump's or a notification's); `None` without a name.
    fn from_message(message: &LinkMessage) -> Option<Self> {
        let (mut name, mut mtu, mut master, mut stats64, mut stats) = (None, None, None, None, None);
        for a in &message.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Mtu(m) => mtu = Some(*m),
                LinkAttribute::Controller(m) if *m != 0 => master = Some(*m),
                LinkAttribute::Stats64(s) => stats64 = Some(s.rx_packets),
                // The 32-bit counters wrap; they only stand in when the 64-bit ones are missing.
                LinkAttribute::Stats(s) => stats = Some(u64::from(s.rx_packets)),
                _ => {}
            }
        }
        Some(Link {
            index: message.header.index,
            name: name?,
            mtu,
            master,
            rx_packets: stats64.or(stats),
            running: message.header.flags.contains(LinkFlags::Up)
                && message.header.flags.contains(LinkFlags::Running),
        })
    }
}

/// The link and global IPv6 address of an `RTM_NEWADDR` message, with whether it is deprecated
/// (preferred lifetime over: kept, but not picked when any address will do). Link-local
/// addresses are left out: nothing leaves the link with them.
fn ipv6_of(message: &AddressMessage) -> Option<(u32, Ipv6Net, bool)> {
    if message.header.family != AddressFamily::Inet6 {
        return None;
    }
    let mut ip = None;
    // The header holds the first eight flags; the attribute, when there, all of them.
    let mut deprecated = message.header.flags.contains(AddressHeaderFlags::Deprecated);
    for a in &message.attributes {
        match a {
            AddressAttribute::Address(IpAddr::V6(v6)) => ip = Some(*v6),
            AddressAttribute::Flags(f) => deprecated = f.contains(AddressFlags::Deprecated),
            _ => {}
        }
    }
    let ip = ip?;
    if ip.is_unicast_link_local() || ip.is_loopback() {
        return None;
    }
    Some((
        message.header.index,
        Ipv6Net::new(ip, message.header.prefix_len).ok()?,
        deprecated,
    ))
}

/// The link and IPv4 address of an `RTM_NEWADDR` message, as getifaddrs(3) reports it: the local
/// address (on a point-to-point link `IFA_ADDRESS` is the peer's), else the address.
fn ipv4_of(message: &AddressMessage) -> Option<(u32, Ipv4Net)> {
    if message.header.family != AddressFamily::Inet {
        return None;
    }
    let (mut local, mut address) = (None, None);
    for a in &message.attributes {
        match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => local = Some(*ip),
            AddressAttribute::Address(IpAddr::V4(ip)) => address = Some(*ip),
            _ => {}
        }
    }
    let ip = local.or(address)?;
    // The prefix length says the subnet (of the local address, also on point-to-point links).
    Some((
        message.header.index,
        Ipv4Net::new(ip, message.header.prefix_len).ok()?,
    ))
}

/// The node's links and IPv4 addresses at one moment.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Every interface with its IPv4 addresses (in the kernel's order), by name.
    pub interfaces: Vec<Interface>,
    links: BTreeMap<u32, Link>,
}

impl Scan {
    /// A scan of these links and `(ifindex, address)` pairs; addresses of unknown links are left
    /// out (the link went between the two dumps).
    fn of(
        links: impl IntoIterator<Item = Link>,
        addresses: impl IntoIterator<Item = (u32, Ipv4Net)>,
        addresses_v6: impl IntoIterator<Item = (u32, Ipv6Net, bool)>,
    ) -> Self {
        let links: BTreeMap<u32, Link> = links.into_iter().map(|l| (l.index, l)).collect();
        let mut by_index: BTreeMap<u32, Interface> = links
            .values()
            .map(|l| {
                (
                    l.index,
                    Interface {
                        name: l.name.clone(),
                        index: l.index,
                        ipv4: Vec::new(),
                        ipv4_networks: Vec::new(),
                        ipv6: Vec::new(),
                        ipv6_networks: Vec::new(),
                    },
                )
            })
            .collect();
        for (index, net) in addresses {
            if let Some(i) = by_index.get_mut(&index) {
                i.ipv4.push(net.addr());
                i.ipv4_networks.push(net.trunc());
            }
        }
        // Deprecated addresses last: "the interface's first IPv6 address" is a preferred one.
        let mut v6: Vec<(u32, Ipv6Net, bool)> = addresses_v6.into_iter().collect();
        v6.sort_by_key(|(_, _, deprecated)| *deprecated);
        for (index, net, _) in v6 {
            if let Some(i) = by_index.get_mut(&index) {
                i.ipv6.push(net.addr());
                i.ipv6_networks.push(net.trunc());
            }
        }
        let mut interfaces: Vec<Interface> = by_index.into_values().collect();
        interfaces.sort_by(|a, b| a.name.cmp(&b.name));
        Scan { interfaces, links }
    }

    /// The link of index `ifindex`, if it was there.
    pub fn link(&self, ifindex: u32) -> Option<&Link> {
        self.links.get(&ifindex)
    }

    /// The index of interface `name`, if it was there.
    pub fn ifindex(&self, name: &str) -> Option<u32> {
        self.links.values().find(|l| l.name == name).map(|l| l.index)
    }

    /// The MTU of the interface holding `address` (the underlay interface, for the node IP).
    pub fn mtu_of_address(&self, address: IpAddr) -> Option<u32> {
        let interface = self.interfaces.iter().find(|i| match address {
            IpAddr::V4(v4) => i.ipv4.contains(&v4),
            IpAddr::V6(v6) => i.ipv6.contains(&v6),
        })?;
        self.links.get(&interface.index)?.mtu
    }
}

/// Reads the node's links and IPv4 addresses: one link dump (statistics included) and one
/// address dump.
pub fn scan() -> Result<Scan> {
    let mut nl = route_socket()?;
    let links = nl
        .request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)
        .map_err(|e| Error::io("listing links", e))?;
    let addresses = nl
        .request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )
        .map_err(|e| Error::io("listing addresses", e))?;
    Ok(Scan::of(
        links.iter().filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Link::from_message(l),
            _ => None,
        }),
        addresses.iter().filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => ipv4_of(a),
            _ => None,
        }),
        addresses.iter().filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => ipv6_of(a),
            _ => None,
        }),
    ))
}

/// Every interface with its IPv4 addresses.
pub fn interfaces() -> Result<Vec<Interface>> {
    scan().map(|s| s.interfaces)
}

/// The link message of interface `name`, if it exists.
fn link_named(nl: &mut Netlink, name: &str) -> io::Result<Option<LinkMessage>> {
    let mut request = LinkMessage::default();
    request.attributes.push(LinkAttribute::IfName(name.to_owned()));
    match nl.request(RouteNetlinkMessage::GetLink(request), 0) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
        Ok(answers) => Ok(answers.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(l),
            _ => None,
        })),
    }
}

/// The index of interface `name`, if it exists (and netlink answers).
pub fn ifindex(name: &str) -> Option<u32> {
    let mut nl = route_socket().ok()?;
    link_named(&mut nl, name).ok()?.map(|l| l.header.index)
}

/// Deletes interface `name`; one already gone is fine.
pub fn delete_link(name: &str) -> Result<()> {
    let mut nl = route_socket()?;
    let mut request = LinkMessage::default();
    request.attributes.push(LinkAttribute::IfName(name.to_owned()));
    match nl.request(RouteNetlinkMessage::DelLink(request), 0) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        r => r
            .map(drop)
            .map_err(|e| Error::io(format!("deleting interface {name}"), e)),
    }
}

/// The interface of the IPv4 default route of the main table (the lowest metric's), if any.
pub fn default_route_interface() -> Option<String> {
    let mut nl = route_socket().ok()?;
    let oif = netlink::default_route_oif(&mut nl).ok()??;
    let mut request = LinkMessage::default();
    request.header.index = oif;
    let answers = nl.request(RouteNetlinkMessage::GetLink(request), 0).ok()?;
    answers.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(l) => Link::from_message(l).map(|l| l.name),
        _ => None,
    })
}

/// Netlink notifications of link, IPv4 address, IPv4 route and IPv4 rule changes; their content is
/// not parsed, any message just means "rescan now" (a new pod interface, an egress IP added, a
/// route or a rule of Sluice's removed by someone else).
pub struct LinkEvents {
    socket: TokioSocket,
}

/// How long a burst of notifications (a pod being wired up) may take to settle into one rescan.
const SETTLE: Duration = Duration::from_millis(10);

/// The notifications are not parsed: a datagram larger than this is cut, which is fine.
const EVENT_BUFFER: usize = 8192;

impl LinkEvents {
    /// Subscribes to the link group and the address, route and rule groups of both families.
    /// Needs a Tokio runtime.
    pub fn open() -> Result<Self> {
        let subscribe = || -> io::Result<TokioSocket> {
            let mut socket = TokioSocket::new(protocols::NETLINK_ROUTE)?;
            socket.socket_mut().bind_auto()?;
            for group in [
                libc::RTNLGRP_LINK,
                libc::RTNLGRP_IPV4_IFADDR,
                libc::RTNLGRP_IPV4_ROUTE,
                libc::RTNLGRP_IPV4_RULE,
                libc::RTNLGRP_IPV6_IFADDR,
                libc::RTNLGRP_IPV6_ROUTE,
                libc::RTNLGRP_IPV6_RULE,
            ] {
                socket.socket_mut().add_membership(group)?;
            }
            Ok(socket)
        };
        subscribe()
            .map(|socket| LinkEvents { socket })
            .map_err(|e| Error::io("subscribing to netlink link, address, route and rule events", e))
    }

    /// Waits for a notification, lets the burst it may start settle, and reads every pending one.
    pub async fn changed(&mut self) -> Result<()> {
        let mut buffer = Vec::with_capacity(EVENT_BUFFER);
        match self.socket.recv(&mut buffer).await {
            // Notifications were lost: that too means "rescan".
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            r => r.map_err(|e| Error::io("reading netlink events", e))?,
        }
        tokio::time::sleep(SETTLE).await;
        // Bounded: a flood must not hold the loop here (what is left wakes the next wait at once).
        for _ in 0..1024 {
            buffer.clear();
            match self.socket.socket_ref().recv(&mut buffer, libc::MSG_DONTWAIT) {
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Ok(())
    }
}

/// Shell-style glob with `*` and `?`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether `name` is a pod-facing interface by `patterns`.
pub fn is_pod_interface(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, name))
}

/// Settings of Sluice's own tunnel device.
#[derive(Clone, Debug)]
pub struct Tunnel {
    pub device: String,
    pub port: u16,
    pub vni: u32,
    /// Underlay source address of the outer packets (either family); the kernel picks one
    /// when `None`.
    pub local: Option<IpAddr>,
}

/// What the kernel holds of a device, as far as the tunnel's settings go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelHeld {
    pub index: u32,
    pub vxlan: bool,
    /// Collect metadata (`external`): the datapath sets the VNI and the remote of every packet.
    pub external: bool,
    pub port: Option<u16>,
    pub learning: Option<bool>,
    pub local: Option<IpAddr>,
    pub up: bool,
    pub arp: bool,
}

impl TunnelHeld {
    fn of(message: &LinkMessage) -> Self {
        let flags = message.header.flags;
        let mut held = TunnelHeld {
            index: message.header.index,
            up: flags.contains(LinkFlags::Up),
            arp: !flags.contains(LinkFlags::Noarp),
            ..Default::default()
        };
        let info = message.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(info) => Some(info),
            _ => None,
        });
        for i in info.into_iter().flatten() {
            match i {
                LinkInfo::Kind(kind) => held.vxlan = *kind == InfoKind::Vxlan,
                LinkInfo::Data(InfoData::Vxlan(data)) => {
                    for d in data {
                        match d {
                            InfoVxlan::CollectMetadata(on) => held.external = *on,
                            InfoVxlan::Port(p) => held.port = Some(*p),
                            InfoVxlan::Learning(on) => held.learning = Some(*on),
                            InfoVxlan::Local(ip) => held.local = Some(IpAddr::V4(*ip)),
                            InfoVxlan::Local6(ip) => held.local = Some(IpAddr::V6(*ip)),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        held
    }
}

impl Tunnel {
    /// The `RTM_NEWLINK` request creating the device: a collect_md VXLAN on our port, without
    /// learning (`ip link add DEV type vxlan external dstport PORT [local IP]`). The VNI is not
    /// the device's: the datapath sets it per packet. Its MTU is the kernel's default.
    fn new_link(&self) -> LinkMessage {
        let mut data = vec![
            InfoVxlan::CollectMetadata(true),
            InfoVxlan::Port(self.port),
            InfoVxlan::Learning(false),
        ];
        data.extend(self.local.map(|ip| match ip {
            IpAddr::V4(v4) => InfoVxlan::Local(v4),
            IpAddr::V6(v6) => InfoVxlan::Local6(v6),
        }));
        let mut m = LinkMessage::default();
        m.attributes = vec![
            LinkAttribute::IfName(self.device.clone()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vxlan),
                LinkInfo::Data(InfoData::Vxlan(data)),
            ]),
        ];
        m
    }

    /// Whether `held` is this tunnel's device (up or not: that is set every time).
    pub fn is_held_by(&self, held: &TunnelHeld) -> bool {
        held.vxlan
            && held.external
            && held.port == Some(self.port)
            && held.learning == Some(false)
            && self.local.is_none_or(|l| held.local == Some(l))
    }
}

/// The `RTM_SETLINK` request setting the device up with ARP off: the datapath addresses every
/// packet itself.
fn up_without_arp(index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags = LinkFlags::Up | LinkFlags::Noarp;
    m.header.change_mask = LinkFlags::Up | LinkFlags::Noarp;
    m
}

/// What the kernel holds of device `name`, if it exists.
pub fn tunnel_held(name: &str) -> Result<Option<TunnelHeld>> {
    let mut nl = route_socket()?;
    link_named(&mut nl, name)
        .map(|m| m.as_ref().map(TunnelHeld::of))
        .map_err(|e| Error::io(format!("reading interface {name}"), e))
}

/// Makes sure the collect_md VXLAN device exists as configured and is up, with reverse-path
/// filtering relaxed (what it changes goes into `rp_filter`); returns its ifindex. A device of
/// that name with other settings is replaced (it is Sluice's own).
pub fn ensure_tunnel(t: &Tunnel, rp_filter: &crate::rp_filter::Record) -> Result<u32> {
    let device = &t.device;
    let mut nl = route_socket()?;
    let read = |nl: &mut Netlink| {
        link_named(nl, device)
            .map(|m| m.as_ref().map(TunnelHeld::of))
            .map_err(|e| Error::io(format!("reading tunnel device {device}"), e))
    };
    let mut held = read(&mut nl)?;
    if let Some(h) = &held
        && !t.is_held_by(h)
    {
        tracing::warn!(%device, held = ?h, "tunnel device has other settings; recreating it");
        let mut request = LinkMessage::default();
        request.header.index = h.index;
        match nl.request(RouteNetlinkMessage::DelLink(request), 0) {
            Err(e) if e.raw_os_error() != Some(libc::ENODEV) => {
                return Err(Error::io(format!("deleting tunnel device {device}"), e));
            }
            _ => held = None,
        }
    }
    if held.is_none() {
        nl.request(
            RouteNetlinkMessage::NewLink(t.new_link()),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map_err(|e| Error::io(format!("creating tunnel device {device}"), e))?;
        held = read(&mut nl)?;
        // A kernel that ignored a setting would leave a device that looks right and is not.
        if let Some(h) = held.as_ref().filter(|h| !t.is_held_by(h)) {
            return Err(Error::io(
                format!("creating tunnel device {device}"),
                io::Error::other(format!("the kernel made it with other settings: {h:?}")),
            ));
        }
    }
    let Some(held) = held else {
        return Err(Error::io(
            format!("creating tunnel device {device}"),
            io::Error::other("the device is not there after creating it"),
        ));
    };
    nl.request(RouteNetlinkMessage::SetLink(up_without_arp(held.index)), 0)
        .map_err(|e| Error::io(format!("setting tunnel device {device} up, ARP off"), e))?;
    // IPv6 pods' packets arrive through the device (a gateway's stack must take them), but the
    // device itself speaks no IPv6: no link-local address (so no duplicate address detection,
    // router solicitations or multicast reports into the tunnel), no router advertisements.
    // A device that got a link-local address when it came up loses it with IPv6 off and on
    // again, once (a restarted shim finds the mode set and leaves the device alone).
    // A node whose IPv6 is turned off (`all` or `default` disable_ipv6=1, as many clusters set
    // it) has no IPv6 pods to carry: the device stays off too, as the node's settings made it.
    let key = |name: &str| format!("net/ipv6/conf/{device}/{name}");
    let mode = fs::read_to_string(proc_sys().join(key("addr_gen_mode"))).unwrap_or_default();
    if mode.trim() != "1" {
        sysctl(&key("addr_gen_mode"), "1").ok();
        sysctl(&key("disable_ipv6"), "1").ok();
    }
    sysctl(&key("accept_ra"), "0").ok();
    let off = |conf: &str| {
        fs::read_to_string(proc_sys().join(format!("net/ipv6/conf/{conf}/disable_ipv6")))
            .is_ok_and(|v| v.trim() == "1")
    };
    let node_ipv6 = if off("all") || off("default") { "1" } else { "0" };
    sysctl(&key("disable_ipv6"), node_ipv6).ok();
    crate::rp_filter::relax(device, rp_filter)?;
    Ok(held.index)
}

/// Whether interface `ifindex` has IPv6 on (false on a kernel without IPv6, or for a device
/// that is gone).
pub fn ipv6_enabled(ifindex: u32) -> bool {
    let Ok(name) = nix::net::if_::if_indextoname(ifindex) else {
        return false;
    };
    let key = format!("net/ipv6/conf/{}/disable_ipv6", name.to_string_lossy());
    fs::read_to_string(proc_sys().join(key)).is_ok_and(|v| v.trim() == "0")
}

/// Where the network sysctls are read and written: `/proc/sys`, or `$SLUICE_PROC_SYS_DIR` when set.
/// A container that is not privileged sees `/proc/sys` read-only and cannot have a writable mount
/// on top of it, so the Helm chart mounts the host's `/proc/sys/net` at `/host/proc/sys/net` and
/// sets `SLUICE_PROC_SYS_DIR=/host/proc/sys` (with host networking it is the same network namespace).
pub fn proc_sys() -> std::path::PathBuf {
    std::env::var_os("SLUICE_PROC_SYS_DIR").map_or_else(|| "/proc/sys".into(), Into::into)
}

/// Writes `<proc_sys()>/<key>`.
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = proc_sys().join(key);
    fs::write(&path, value).map_err(|e| Error::io(format!("writing {} = {value}", path.display()), e))
}

/// Runs a command, feeding it `stdin`, returning stdout or an error with its stderr.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("running `{command}` (is {program} installed?)"), e))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| Error::io(format!("writing to `{command}`"), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("running `{command}`"), e))?;
    if !out.status.success() {
        return Err(Error::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An IPv4 address of `ip`, if it is one.
pub fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::link::{Stats, Stats64};

    use super::*;

    /// `message` as the kernel would read it, and parsed back as a dump would be.
    fn through_bytes(message: RouteNetlinkMessage) -> (Vec<u8>, RouteNetlinkMessage) {
        let mut m = NetlinkMessage::from(message);
        m.finalize();
        let mut bytes = vec![0; m.buffer_len()];
        m.serialize(&mut bytes);
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes).expect("parses");
        match back.payload {
            NetlinkPayload::InnerMessage(m) => (bytes, m),
            other => panic!("not a route message: {other:?}"),
        }
    }

    fn tunnel() -> Tunnel {
        Tunnel {
            device: "sluice-vx0".into(),
            port: 8473,
            vni: 8473,
            local: Some(Ipv4Addr::new(192, 168, 50, 11).into()),
        }
    }

    #[test]
    fn globs_match_like_the_shell() {
        let patterns: Vec<String> = DEFAULT_POD_INTERFACES.iter().map(|s| s.to_string()).collect();
        for name in ["veth1234", "cali0a1b", "lxc_health", "cni0", "eni3f", "gke12"] {
            assert!(is_pod_interface(&patterns, name), "{name}");
        }
        for name in ["eth0", "lo", "sluice-vx0", "flannel.1", "vxlan.calico"] {
            assert!(!is_pod_interface(&patterns, name), "{name}");
        }
        assert!(glob_match("a*b?c", "aXXbYc"));
        assert!(!glob_match("a*b?c", "aXXbc"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn the_tunnel_request_asks_for_what_the_tunnel_is() {
        let t = tunnel();
        let (bytes, back) = through_bytes(RouteNetlinkMessage::NewLink(t.new_link()));
        let RouteNetlinkMessage::NewLink(back) = back else {
            panic!("{back:?}")
        };
        let held = TunnelHeld::of(&back);
        assert_eq!(
            held,
            TunnelHeld {
                index: 0,
                vxlan: true,
                external: true,
                port: Some(8473),
                learning: Some(false),
                local: Some(Ipv4Addr::new(192, 168, 50, 11).into()),
                up: false,
                arp: true,
            }
        );
        assert!(t.is_held_by(&held));
        // IFLA_VXLAN_PORT (15) is in network order on the wire (8473 = 0x2119), and
        // IFLA_VXLAN_COLLECT_METADATA (25) is one byte set to 1.
        let has = |nla: &[u8]| bytes.windows(nla.len()).any(|w| w == nla);
        assert!(has(&[6, 0, 15, 0, 0x21, 0x19]), "{bytes:02x?}");
        assert!(has(&[5, 0, 25, 0, 1]), "{bytes:02x?}");
        assert!(has(b"vxlan"), "the kind names the driver");
        assert!(
            !back.attributes.iter().any(|a| matches!(a, LinkAttribute::Mtu(_))),
            "the MTU is left to the kernel, as `ip link add` leaves it"
        );

        let mut any_local = t.clone();
        any_local.local = None;
        let (_, back) = through_bytes(RouteNetlinkMessage::NewLink(any_local.new_link()));
        let RouteNetlinkMessage::NewLink(back) = back else {
            panic!("{back:?}")
        };
        assert_eq!(TunnelHeld::of(&back).local, None);
    }

    #[test]
    fn a_device_with_other_settings_is_not_the_tunnel() {
        let t = tunnel();
        let ours = TunnelHeld {
            index: 9,
            vxlan: true,
            external: true,
            port: Some(8473),
            learning: Some(false),
            local: Some(Ipv4Addr::new(192, 168, 50, 11).into()),
            up: false,
            arp: true,
        };
        assert!(
            t.is_held_by(&ours),
            "down or with ARP it is still ours: both are set anyway"
        );
        let others = [
            TunnelHeld {
                vxlan: false,
                ..ours.clone()
            },
            TunnelHeld {
                external: false,
                ..ours.clone()
            },
            TunnelHeld {
                port: Some(4789),
                ..ours.clone()
            },
            TunnelHeld {
                port: None,
                ..ours.clone()
            },
            TunnelHeld {
                learning: Some(true),
                ..ours.clone()
            },
            TunnelHeld {
                learning: None,
                ..ours.clone()
            },
            TunnelHeld {
                local: Some(Ipv4Addr::new(192, 168, 50, 12).into()),
                ..ours.clone()
            },
            TunnelHeld {
                local: None,
                ..ours.clone()
            },
        ];
        for other in &others {
            assert!(!t.is_held_by(other), "{other:?}");
        }
        let any_local = Tunnel { local: None, ..t };
        assert!(any_local.is_held_by(&TunnelHeld {
            local: None,
            ..ours.clone()
        }));
        assert!(any_local.is_held_by(&ours));
    }

    #[test]
    fn up_without_arp_changes_those_two_flags_only() {
        let (_, back) = through_bytes(RouteNetlinkMessage::SetLink(up_without_arp(7)));
        let RouteNetlinkMessage::SetLink(m) = back else {
            panic!("{back:?}")
        };
        assert_eq!(m.header.index, 7);
        assert_eq!(m.header.flags, LinkFlags::Up | LinkFlags::Noarp);
        assert_eq!(m.header.change_mask, LinkFlags::Up | LinkFlags::Noarp);
        let held = TunnelHeld::of(&m);
        assert!(held.up && !held.arp);
    }

    #[test]
    fn links_are_read_from_their_dump_message() {
        let mut m = LinkMessage::default();
        m.header.index = 12;
        m.attributes = vec![
            LinkAttribute::IfName("veth12".into()),
            LinkAttribute::Mtu(1450),
            LinkAttribute::Controller(4),
            LinkAttribute::Stats64({
                let mut s = Stats64::default();
                s.rx_packets = 5_000_000_000;
                s
            }),
            LinkAttribute::Stats({
                let mut s = Stats::default();
                s.rx_packets = 705_032_704;
                s
            }),
        ];
        let (_, back) = through_bytes(RouteNetlinkMessage::NewLink(m.clone()));
        let RouteNetlinkMessage::NewLink(back) = back else {
            panic!("{back:?}")
        };
        assert_eq!(
            Link::from_message(&back),
            Some(Link {
                index: 12,
                name: "veth12".into(),
                mtu: Some(1450),
                master: Some(4),
                rx_packets: Some(5_000_000_000),
                running: false,
            }),
            "the 64-bit counter wins over the wrapped 32-bit one"
        );
        let mut only32 = m.clone();
        only32
            .attributes
            .retain(|a| !matches!(a, LinkAttribute::Stats64(_) | LinkAttribute::Controller(_)));
        only32.attributes.push(LinkAttribute::Controller(0));
        let link = Link::from_message(&only32).unwrap();
        assert_eq!((link.rx_packets, link.master), (Some(705_032_704), None));
        let mut nameless = m;
        nameless
            .attributes
            .retain(|a| !matches!(a, LinkAttribute::IfName(_)));
        assert_eq!(Link::from_message(&nameless), None);
    }

    #[test]
    fn addresses_are_the_local_ones_in_dump_order() {
        let address = |index: u32, attributes: Vec<AddressAttribute>| {
            let mut m = AddressMessage::default();
            m.header.family = AddressFamily::Inet;
            m.header.index = index;
            m.attributes = attributes;
            let (_, back) = through_bytes(RouteNetlinkMessage::NewAddress(m));
            match back {
                RouteNetlinkMessage::NewAddress(a) => a,
                other => panic!("{other:?}"),
            }
        };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        // A point-to-point address: IFA_ADDRESS is the peer.
        let ptp = address(
            3,
            vec![
                AddressAttribute::Address(ip("10.9.0.2")),
                AddressAttribute::Local(ip("10.9.0.1")),
            ],
        );
        let mut ptp = ptp;
        ptp.header.prefix_len = 32;
        assert_eq!(ipv4_of(&ptp), Some((3, "10.9.0.1/32".parse().unwrap())));
        let mut plain = address(2, vec![AddressAttribute::Address(ip("192.0.2.11"))]);
        plain.header.prefix_len = 24;
        assert_eq!(ipv4_of(&plain), Some((2, "192.0.2.11/24".parse().unwrap())));
        let mut v6 = AddressMessage::default();
        v6.header.family = AddressFamily::Inet6;
        v6.attributes = vec![AddressAttribute::Address(ip("2001:db8::1"))];
        assert_eq!(ipv4_of(&v6), None);
        v6.header.index = 2;
        v6.header.prefix_len = 64;
        assert_eq!(ipv6_of(&v6), Some((2, "2001:db8::1/64".parse().unwrap(), false)));
        assert_eq!(ipv6_of(&plain), None);
        v6.attributes
            .push(AddressAttribute::Flags(AddressFlags::Deprecated));
        assert_eq!(ipv6_of(&v6), Some((2, "2001:db8::1/64".parse().unwrap(), true)));
        let mut link_local = v6.clone();
        link_local.attributes = vec![AddressAttribute::Address(ip("fe80::1"))];
        assert_eq!(ipv6_of(&link_local), None, "never an egress address");

        let link = |index: u32, name: &str, mtu: u32| Link {
            index,
            name: name.into(),
            mtu: Some(mtu),
            ..Default::default()
        };
        let scan = Scan::of(
            [link(3, "eth1", 9000), link(1, "lo", 65536), link(2, "eth0", 1500)],
            [
                (2, "192.0.2.12/24".parse().unwrap()),
                (2, "192.0.2.11/24".parse().unwrap()),
                (1, "127.0.0.1/8".parse().unwrap()),
                // A link that went between the two dumps.
                (44, "198.18.0.1/32".parse().unwrap()),
            ],
            [
                (2, "fd00:192:0:2::101/64".parse().unwrap(), true),
                (2, "fd00:192:0:2::11/64".parse().unwrap(), false),
            ],
        );
        // The preferred address first: the one "the interface's IPv6 address" means.
        assert_eq!(
            scan.interfaces[0].ipv6,
            [
                "fd00:192:0:2::11".parse::<std::net::Ipv6Addr>().unwrap(),
                "fd00:192:0:2::101".parse().unwrap()
            ]
        );
        let names: Vec<&str> = scan.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0", "eth1", "lo"]);
        assert_eq!(
            scan.interfaces[0].ipv4,
            [Ipv4Addr::new(192, 0, 2, 12), Ipv4Addr::new(192, 0, 2, 11)]
        );
        assert_eq!(
            scan.interfaces[0].ipv4_networks,
            ["192.0.2.0/24".parse().unwrap(); 2]
        );
        assert!(scan.interfaces[1].ipv4.is_empty());
        assert_eq!(
            scan.mtu_of_address(Ipv4Addr::new(192, 0, 2, 11).into()),
            Some(1500)
        );
        assert_eq!(scan.mtu_of_address(Ipv4Addr::new(198, 18, 0, 1).into()), None);
        assert_eq!(
            scan.mtu_of_address("fd00:192:0:2::101".parse().unwrap()),
            Some(1500)
        );
        assert_eq!(scan.ifindex("eth1"), Some(3));
        assert_eq!(scan.ifindex("eth9"), None);
    }
}
