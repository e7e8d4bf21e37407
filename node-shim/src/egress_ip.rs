//! Managed egress IPs on this node (issue 13): probe for a duplicate, claim, announce, release.
//!
//! The node that fills a policy's slot holds that slot's address: [`AddressManager::claim`] probes
//! the link for another holder ([RFC 5227] ARP probes), adds the address as a /32 over netlink
//! with Sluice's mark, and announces it with gratuitous ARP so that neighbours (the router above
//! all) send to this node from now on; [`AddressManager::release`] stops the announcements and
//! removes the address. [`held_addresses`] lists what carries the mark: what a restarted shim
//! holds, what uninstalling removes. IPv4 only for now: IPv6 needs duplicate address detection
//! and unsolicited neighbour advertisements instead of ARP; the types ([`IpAddr`] in the API,
//! [`AddressError::Ipv6Unsupported`]) leave room for them.
//!
//! # Sluice's mark
//!
//! Every address Sluice adds carries `IFA_PROTO` = [`ADDRESS_PROTOCOL`] (the address's
//! "protocol", Linux 5.18 and later, well below the 6.6 the datapath needs; iproute2 6.1 does not
//! print it, [`held_addresses`] lists what carries it). The kernel stores it and reports it in
//! every dump, so Sluice finds exactly its own addresses after a restart without a state file. An address with the same IP but without
//! the mark (added by hand, or by keepalived) is someone else's: Sluice neither marks, announces
//! nor removes it ([`Claimed::HeldUnmarked`], [`Released::HeldUnmarked`]). No registry hands out
//! these numbers; other software picking the same value would be taken for Sluice.
//!
//! # Probing, and how long
//!
//! Before adding an address the node does not hold yet, it sends [`ProbeTiming::probes`] ARP
//! probes (sender IP 0.0.0.0, so that no neighbour learns anything from them) and listens on the
//! same packet socket: any ARP packet whose sender IP is the address (a reply, or a request from
//! a holder), or another node's probe for the same address (two claimants at once), is a
//! conflict, and the address is not added. RFC 5227 waits a random 0–1 s, sends 3 probes 1–2 s
//! apart and waits 2 s more: seconds, meant for hosts booting together on a LAN with nobody to
//! coordinate them. Here the operator assigns each address to one node at a time and the whole
//! failover budget is about 0.5 s after detection, so the default is 2 probes 20 ms apart and
//! 60 ms of listening in all. The trade-off: a live holder on the segment answers within a
//! millisecond or two and is caught; one that answers later than 60 ms (an overloaded host, a
//! switch rate-limiting ARP) or whose answer is lost twice is not, and the conflict then shows
//! as two nodes answering, which the operator's status has to catch. The timing is a parameter.
//!
//! # Announcing, and what neighbours need to take it
//!
//! Each announcement round sends a gratuitous ARP request (RFC 5227's "ARP announcement": sender
//! IP = target IP = the address, target hardware address zero) and a gratuitous ARP reply (sender
//! IP = target IP, target hardware address = sender's), both broadcast from the interface's MAC.
//! Implementations differ in which of the two they take (RFC 5944 §4.6 allows either), and the
//! second frame is cheap; [`Announcement::requests`] and [`Announcement::replies`] switch each
//! off. Rounds follow [`Announcement::schedule`] (default at 0, 50 ms, 250 ms, 1 s and 2 s after
//! the claim, as keepalived repeats its burst): the first goes out before the claim returns, the
//! others from a thread of their own that stops when the address is released.
//!
//! What a Linux neighbour does with them (net/ipv4/arp.c, `arp_process`; checked by
//! `node-shim/tests/egress_ip_e2e.rs` against the running kernel):
//! - An **existing** neighbour entry (the router already sent to the old holder) is overwritten by
//!   a gratuitous request, and by a gratuitous reply whose target hardware address equals its
//!   sender's, whatever `arp_accept` says, at once (the `locktime` that otherwise keeps the first
//!   of several answers for 1 s does not apply to gratuitous ARP; Linux 4.12 and later; before,
//!   only with `arp_accept=1`). The entry becomes `STALE`, so the next packet confirms it with a
//!   unicast probe to the new MAC. The sender IP must be a unicast address on that side (not a
//!   local or broadcast one).
//! - **No entry** yet: nothing is created unless `arp_accept` is 1 (or 2 and the address is in
//!   one of the interface's subnets); with the default 0, the first packet to the address
//!   resolves it with an ordinary ARP request, which the new holder answers. No harm either way.
//! - `drop_gratuitous_arp=1` drops all of it: such a neighbour keeps sending to the old MAC until
//!   its entry expires (`base_reachable_time` 30 s ± half, then a `delay_first_probe_time` of 5 s
//!   and unicast probes), which is what a move costs on any network that ignores gratuitous ARP.
//!
//! Other routers vary (in which form they take, whether they rate-limit ARP, whether they learn
//! from unsolicited ARP at all): sending both forms several times is the portable choice, and a
//! network that takes neither needs another way to move the address (BGP, cloud secondary IPs).
//!
//! [RFC 5227]: https://www.rfc-editor.org/rfc/rfc5227

use std::{
    collections::HashMap,
    fmt,
    io::{self, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressProtocol, AddressScope},
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netlink::Netlink;

/// The `IFA_PROTO` value that marks an address as Sluice's (0–3 are the kernel's own).
pub const ADDRESS_PROTOCOL: u8 = 0x5c;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    pub const ZERO: MacAddr = MacAddr([0; 6]);
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Everything that can go wrong while probing, claiming, announcing or releasing an address.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error(
        "{ip} is already in use on the link of interface {ifindex}: {mac} answers for it, so it \
         was not claimed; remove it there or pick another address"
    )]
    Conflict { ip: IpAddr, ifindex: u32, mac: MacAddr },

    #[error(
        "interface {ifindex} does not exist or has no Ethernet address, so Sluice cannot claim \
         addresses on it with ARP"
    )]
    NoEthernetInterface { ifindex: u32 },

    #[error(
        "managed IPv6 egress addresses ({ip}) are not supported yet: they need duplicate address \
         detection and unsolicited neighbour advertisements, not ARP"
    )]
    Ipv6Unsupported { ip: Ipv6Addr },

    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
}

impl AddressError {
    fn io(action: impl Into<String>, source: io::Error) -> Self {
        AddressError::Io {
            action: action.into(),
            source,
        }
    }
}

fn ipv4(ip: IpAddr) -> Result<Ipv4Addr, AddressError> {
    match ip {
        IpAddr::V4(ip) => Ok(ip),
        IpAddr::V6(ip) => Err(AddressError::Ipv6Unsupported { ip }),
    }
}

// ---------------------------------------------------------------------------------------------
// ARP frames (pure)

const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
const HARDWARE_ETHERNET: u16 = 1;
const ETHERNET_HEADER: usize = 14;
/// An Ethernet frame carrying IPv4-over-Ethernet ARP, without padding or FCS.
pub const ARP_FRAME_LEN: usize = ETHERNET_HEADER + 28;

/// What an ARP packet asks or says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArpOperation {
    Request,
    Reply,
}

impl ArpOperation {
    fn code(self) -> u16 {
        match self {
            ArpOperation::Request => 1,
            ArpOperation::Reply => 2,
        }
    }
}

/// An IPv4-over-Ethernet ARP packet. Frames built from it go to the broadcast address from
/// `sender_mac`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpPacket {
    pub operation: ArpOperation,
    pub sender_mac: MacAddr,
    pub sender_ip: Ipv4Addr,
    pub target_mac: MacAddr,
    pub target_ip: Ipv4Addr,
}

/// Why a received frame is not an ARP packet Sluice reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {0} bytes is too short for IPv4 ARP over Ethernet")]
    Short(usize),
    #[error("EtherType {0:#06x} is not ARP")]
    NotArp(u16),
    #[error("not IPv4 over Ethernet (hardware {hardware}, protocol {protocol:#06x}, lengths {lengths:?})")]
    NotIpv4OverEthernet {
        hardware: u16,
        protocol: u16,
        lengths: (u8, u8),
    },
    #[error("ARP operation {0} is neither a request nor a reply")]
    Operation(u16),
}

impl ArpPacket {
    /// An RFC 5227 probe for `ip`: who holds it? Sender IP 0.0.0.0, so that no neighbour's cache
    /// learns anything from it.
    pub fn probe(mac: MacAddr, ip: Ipv4Addr) -> Self {
        ArpPacket {
            operation: ArpOperation::Request,
            sender_mac: mac,
            sender_ip: Ipv4Addr::UNSPECIFIED,
            target_mac: MacAddr::ZERO,
            target_ip: ip,
        }
    }

    /// A gratuitous request (RFC 5227's announcement): `ip` is at `mac`.
    pub fn announcement(mac: MacAddr, ip: Ipv4Addr) -> Self {
        ArpPacket {
            operation: ArpOperation::Request,
            sender_mac: mac,
            sender_ip: ip,
            target_mac: MacAddr::ZERO,
            target_ip: ip,
        }
    }

    /// A gratuitous reply: `ip` is at `mac`. Linux takes a reply as gratuitous only when its
    /// target hardware address equals its sender's.
    pub fn gratuitous_reply(mac: MacAddr, ip: Ipv4Addr) -> Self {
        ArpPacket {
            operation: ArpOperation::Reply,
            sender_mac: mac,
            sender_ip: ip,
            target_mac: mac,
            target_ip: ip,
        }
    }

    /// The broadcast Ethernet frame carrying this packet.
    pub fn to_frame(&self) -> [u8; ARP_FRAME_LEN] {
        let mut f = [0; ARP_FRAME_LEN];
        f[0..6].copy_from_slice(&MacAddr::BROADCAST.0);
        f[6..12].copy_from_slice(&self.sender_mac.0);
        f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        let arp = &mut f[ETHERNET_HEADER..];
        arp[0..2].copy_from_slice(&HARDWARE_ETHERNET.to_be_bytes());
        arp[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        arp[4] = 6;
        arp[5] = 4;
        arp[6..8].copy_from_slice(&self.operation.code().to_be_bytes());
        arp[8..14].copy_from_slice(&self.sender_mac.0);
        arp[14..18].copy_from_slice(&self.sender_ip.octets());
        arp[18..24].copy_from_slice(&self.target_mac.0);
        arp[24..28].copy_from_slice(&self.target_ip.octets());
        f
    }

    /// The ARP packet of an Ethernet frame (trailing padding allowed).
    pub fn parse(frame: &[u8]) -> Result<Self, FrameError> {
        if frame.len() < ARP_FRAME_LEN {
            return Err(FrameError::Short(frame.len()));
        }
        let u16_at = |i: usize| u16::from_be_bytes([frame[i], frame[i + 1]]);
        let mac_at = |i: usize| MacAddr(frame[i..i + 6].try_into().expect("6 bytes"));
        let ip_at = |i: usize| Ipv4Addr::new(frame[i], frame[i + 1], frame[i + 2], frame[i + 3]);
        let ethertype = u16_at(12);
        if ethertype != ETHERTYPE_ARP {
            return Err(FrameError::NotArp(ethertype));
        }
        let a = ETHERNET_HEADER;
        let (hardware, protocol, lengths) = (u16_at(a), u16_at(a + 2), (frame[a + 4], frame[a + 5]));
        if hardware != HARDWARE_ETHERNET || protocol != ETHERTYPE_IPV4 || lengths != (6, 4) {
            return Err(FrameError::NotIpv4OverEthernet {
                hardware,
                protocol,
                lengths,
            });
        }
        let operation = match u16_at(a + 6) {
            1 => ArpOperation::Request,
            2 => ArpOperation::Reply,
            other => return Err(FrameError::Operation(other)),
        };
        Ok(ArpPacket {
            operation,
            sender_mac: mac_at(a + 8),
            sender_ip: ip_at(a + 14),
            target_mac: mac_at(a + 18),
            target_ip: ip_at(a + 24),
        })
    }

    /// The MAC of another holder of `ip` (or another claimant) that this packet reveals to a
    /// node probing for `ip` from `own` (RFC 5227 §2.1.1): a packet whose sender IP is `ip`, or
    /// someone else's probe for `ip`. Our own frames, and packets merely asking for `ip` from
    /// another address (a router resolving it), reveal nothing.
    pub fn conflict(&self, ip: Ipv4Addr, own: MacAddr) -> Option<MacAddr> {
        if self.sender_mac == own {
            return None;
        }
        let holder = self.sender_ip == ip;
        let claimant = self.operation == ArpOperation::Request
            && self.sender_ip.is_unspecified()
            && self.target_ip == ip;
        (holder || claimant).then_some(self.sender_mac)
    }
}

// ---------------------------------------------------------------------------------------------
// The packet socket

/// An `AF_PACKET` socket bound to one Ethernet interface, carrying ARP only.
pub struct ArpSocket {
    socket: Socket,
    ifindex: u32,
    mac: MacAddr,
}

/// Large enough for any ARP frame (the rest of a longer frame is cut, which is fine).
const RECEIVE_BUFFER: usize = 256;

impl ArpSocket {
    /// Opens the socket on interface `ifindex` (in the calling thread's network namespace).
    pub fn open(ifindex: u32) -> Result<Self, AddressError> {
        // getifaddrs(3) hands out each link's AF_PACKET address (index and MAC) ready to bind
        // to, which spares building a sockaddr_ll by hand.
        let link = nix::ifaddrs::getifaddrs()
            .map_err(|e| AddressError::io("listing the interfaces' link addresses", e.into()))?
            .filter_map(|i| i.address.and_then(|a| a.as_link_addr().copied()))
            .find(|l| l.ifindex() == ifindex as usize)
            .filter(|l| l.hatype() == libc::ARPHRD_ETHER && l.halen() == 6)
            .ok_or(AddressError::NoEthernetInterface { ifindex })?;
        let mac = MacAddr(link.addr().ok_or(AddressError::NoEthernetInterface { ifindex })?);
        let context =
            |e: io::Error| AddressError::io(format!("opening an ARP socket on interface {ifindex}"), e);
        let arp = Protocol::from(i32::from((libc::ETH_P_ARP as u16).to_be()));
        let socket = Socket::new(Domain::PACKET, Type::RAW, Some(arp)).map_err(context)?;
        nix::sys::socket::bind(socket.as_raw_fd(), &link).map_err(|e| context(e.into()))?;
        let opened = ArpSocket { socket, ifindex, mac };
        opened.drain();
        Ok(opened)
    }

    /// Drops what arrived from any interface before the socket was bound to one.
    fn drain(&self) {
        let mut buffer = [0; RECEIVE_BUFFER];
        let fd = self.socket.as_raw_fd();
        // Bounded: a flood must not hold the caller here.
        for _ in 0..1024 {
            if nix::sys::socket::recv(fd, &mut buffer, nix::sys::socket::MsgFlags::MSG_DONTWAIT).is_err() {
                break;
            }
        }
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The interface's MAC.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Sends `packet` in a broadcast frame.
    pub fn send(&self, packet: &ArpPacket) -> io::Result<()> {
        self.socket.send(&packet.to_frame()).map(drop)
    }

    /// The next ARP packet received before `deadline`, or `None` once it has passed. Frames that
    /// are not IPv4-over-Ethernet ARP are skipped.
    pub fn receive(&self, deadline: Instant) -> io::Result<Option<ArpPacket>> {
        let mut buffer = [0; RECEIVE_BUFFER];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // A zero timeout would mean "wait forever".
            if left < Duration::from_micros(1) {
                return Ok(None);
            }
            self.socket.set_read_timeout(Some(left))?;
            match (&self.socket).read(&mut buffer) {
                Ok(n) => {
                    if let Ok(packet) = ArpPacket::parse(&buffer[..n]) {
                        return Ok(Some(packet));
                    }
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Probing

/// How a node probes for another holder before claiming an address (see the module docs for
/// the trade-off against RFC 5227's seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTiming {
    /// Probes sent (at least one is).
    pub probes: u32,
    /// Between two probes.
    pub interval: Duration,
    /// From the first probe to the verdict; never shorter than it takes to send every probe.
    pub listen: Duration,
}

impl Default for ProbeTiming {
    fn default() -> Self {
        ProbeTiming {
            probes: 2,
            interval: Duration::from_millis(20),
            listen: Duration::from_millis(60),
        }
    }
}

/// What a probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Nobody answered for the address within the listening time.
    Free,
    /// `mac` holds the address (or probes for it at the same time).
    Conflict { mac: MacAddr },
}

/// Probes for another holder of `ip` on `socket`'s link; returns at the first conflict, or
/// `Free` when [`ProbeTiming::listen`] has passed.
pub fn probe(socket: &ArpSocket, ip: Ipv4Addr, timing: &ProbeTiming) -> io::Result<ProbeOutcome> {
    let start = Instant::now();
    let sends: Vec<Instant> = (0..timing.probes.max(1))
        .map(|i| start + timing.interval * i)
        .collect();
    let verdict = (start + timing.listen).max(*sends.last().expect("at least one probe"));
    let probe = ArpPacket::probe(socket.mac(), ip);
    for (i, at) in sends.iter().enumerate() {
        // Listening until this probe is due (nothing before the first).
        while let Some(packet) = socket.receive(*at)? {
            if let Some(mac) = packet.conflict(ip, socket.mac()) {
                return Ok(ProbeOutcome::Conflict { mac });
            }
        }
        socket
            .send(&probe)
            .map_err(|e| io::Error::new(e.kind(), format!("sending ARP probe {} for {ip}: {e}", i + 1)))?;
    }
    while let Some(packet) = socket.receive(verdict)? {
        if let Some(mac) = packet.conflict(ip, socket.mac()) {
            return Ok(ProbeOutcome::Conflict { mac });
        }
    }
    Ok(ProbeOutcome::Free)
}

// ---------------------------------------------------------------------------------------------
// Announcing

/// When and how a claimed address is announced (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// When each round goes out, from the moment of the claim; rounds at zero go out before the
    /// claim returns, the others from a thread of their own.
    pub schedule: Vec<Duration>,
    /// Send a gratuitous request in each round.
    pub requests: bool,
    /// Send a gratuitous reply in each round.
    pub replies: bool,
}

impl Default for Announcement {
    fn default() -> Self {
        Announcement {
            schedule: [0, 50, 250, 1000, 2000]
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            requests: true,
            replies: true,
        }
    }
}

impl Announcement {
    /// No announcement at all (a network that must not see gratuitous ARP, or a test showing
    /// what happens without).
    pub fn none() -> Self {
        Announcement {
            schedule: Vec::new(),
            requests: false,
            replies: false,
        }
    }

    fn packets(&self, mac: MacAddr, ip: Ipv4Addr) -> Vec<ArpPacket> {
        let request = self.requests.then(|| ArpPacket::announcement(mac, ip));
        let reply = self.replies.then(|| ArpPacket::gratuitous_reply(mac, ip));
        request.into_iter().chain(reply).collect()
    }
}

/// The rounds of one address still to come, on a thread that stops when this is dropped.
struct Announcer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Announcer {
    fn drop(&mut self) {
        // Disconnecting wakes the thread at once; joining makes sure no round goes out after.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn send_round(socket: &ArpSocket, packets: &[ArpPacket]) -> io::Result<()> {
    packets.iter().try_for_each(|p| socket.send(p))
}

/// Sends the rounds of `announcement` due at once, and starts a thread for the others (`None`
/// when there are none).
fn announce(
    socket: ArpSocket,
    ip: Ipv4Addr,
    announcement: &Announcement,
) -> Result<Option<Announcer>, AddressError> {
    let start = Instant::now();
    let packets = announcement.packets(socket.mac(), ip);
    if packets.is_empty() {
        return Ok(None);
    }
    let (now, later): (Vec<Duration>, Vec<Duration>) =
        announcement.schedule.iter().partition(|d| d.is_zero());
    for _ in now {
        send_round(&socket, &packets)
            .map_err(|e| AddressError::io(format!("announcing {ip} on interface {}", socket.ifindex()), e))?;
    }
    if later.is_empty() {
        return Ok(None);
    }
    let (stop, stopped) = mpsc::channel::<()>();
    let mut later = later;
    later.sort();
    let thread = std::thread::Builder::new()
        .name(format!("announce-{ip}"))
        .spawn(move || {
            for offset in later {
                let wait = (start + offset).saturating_duration_since(Instant::now());
                match stopped.recv_timeout(wait) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                if let Err(e) = send_round(&socket, &packets) {
                    tracing::warn!(%ip, ifindex = socket.ifindex(), error = %e, "announcing a managed egress IP");
                }
            }
        })
        .map_err(|e| AddressError::io(format!("starting the announcements of {ip}"), e))?;
    Ok(Some(Announcer {
        stop: Some(stop),
        thread: Some(thread),
    }))
}

// ---------------------------------------------------------------------------------------------
// Addresses over netlink

/// An address of the node, as an address dump reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeAddress {
    ifindex: u32,
    ip: IpAddr,
    prefix_len: u8,
    marked: bool,
}

impl NodeAddress {
    /// The address of an `RTM_NEWADDR` message: its local address (on a point-to-point link
    /// `IFA_ADDRESS` is the peer's), else its address.
    fn of(message: &AddressMessage) -> Option<Self> {
        let (mut local, mut address, mut marked) = (None, None, false);
        for a in &message.attributes {
            match a {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                AddressAttribute::Protocol(p) => marked = u8::from(*p) == ADDRESS_PROTOCOL,
                _ => {}
            }
        }
        Some(NodeAddress {
            ifindex: message.header.index,
            ip: local.or(address)?,
            prefix_len: message.header.prefix_len,
            marked,
        })
    }

    /// The message naming exactly this address (to delete it).
    fn to_message(&self) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = family(self.ip);
        m.header.prefix_len = self.prefix_len;
        m.header.index = self.ifindex;
        m.attributes = vec![AddressAttribute::Local(self.ip)];
        m
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// The `RTM_NEWADDR` request adding `ip` as a host address of global scope, with Sluice's mark.
fn claim_message(ifindex: u32, ip: IpAddr) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(ip);
    m.header.prefix_len = if ip.is_ipv4() { 32 } else { 128 };
    m.header.scope = AddressScope::Universe;
    m.header.index = ifindex;
    m.attributes = vec![
        AddressAttribute::Local(ip),
        AddressAttribute::Address(ip),
        AddressAttribute::Protocol(AddressProtocol::from(ADDRESS_PROTOCOL)),
    ];
    m
}

fn route_socket() -> Result<Netlink, AddressError> {
    Netlink::route().map_err(|e| AddressError::io("opening a route netlink socket", e))
}

/// Every address of the node (both families).
fn node_addresses(nl: &mut Netlink) -> Result<Vec<NodeAddress>, AddressError> {
    let answers = nl
        .request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )
        .map_err(|e| AddressError::io("listing the node's addresses", e))?;
    Ok(answers
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => NodeAddress::of(a),
            _ => None,
        })
        .collect())
}

/// The addresses of IP `ip` on interface `ifindex`, whatever their prefix.
fn addresses_of(nl: &mut Netlink, ifindex: u32, ip: IpAddr) -> Result<Vec<NodeAddress>, AddressError> {
    let mut all = node_addresses(nl)?;
    all.retain(|a| a.ifindex == ifindex && a.ip == ip);
    Ok(all)
}

/// An address of the node that carries Sluice's mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeldAddress {
    pub ifindex: u32,
    pub ip: IpAddr,
}

/// The addresses of the node that carry Sluice's mark: what it holds for managed egress IPs (a
/// restarted shim's starting point).
pub fn held_addresses() -> Result<Vec<HeldAddress>, AddressError> {
    let mut nl = route_socket()?;
    let mut held: Vec<HeldAddress> = node_addresses(&mut nl)?
        .into_iter()
        .filter(|a| a.marked)
        .map(|a| HeldAddress {
            ifindex: a.ifindex,
            ip: a.ip,
        })
        .collect();
    held.sort();
    held.dedup();
    Ok(held)
}

/// Gives up every address with Sluice's mark (a node that must not answer for any managed
/// egress IP: after uninstall, or a shim back past its fence's deadline); what it released.
pub fn release_held() -> Result<Vec<HeldAddress>, AddressError> {
    let held = held_addresses()?;
    let mut addresses = AddressManager::default();
    for a in &held {
        addresses.release(a.ifindex, a.ip)?;
    }
    Ok(held)
}

// ---------------------------------------------------------------------------------------------
// The manager

/// What [`AddressManager::claim`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// Probed free, added with Sluice's mark, announced.
    Added,
    /// It was already Sluice's (a restarted shim, a repeated claim): announced again.
    AlreadyHeld,
    /// The interface already holds it without Sluice's mark (someone else manages it): left as
    /// it is, not announced.
    HeldUnmarked,
}

/// What [`AddressManager::release`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// Sluice's address was removed.
    Removed,
    /// The interface did not hold it.
    NotHeld,
    /// The interface holds it, but not with Sluice's mark: left as it is.
    HeldUnmarked,
}

/// Claims, announces and releases managed egress IPs, keeping each claim's pending
/// announcements. Blocking (netlink and packet socket), quick: a claim takes about
/// [`ProbeTiming::listen`]. Dropping it stops the announcements and leaves the addresses.
#[derive(Default)]
pub struct AddressManager {
    probing: ProbeTiming,
    announcement: Announcement,
    announcers: HashMap<(u32, Ipv4Addr), Announcer>,
}

impl AddressManager {
    pub fn new(probing: ProbeTiming, announcement: Announcement) -> Self {
        AddressManager {
            probing,
            announcement,
            announcers: HashMap::new(),
        }
    }

    /// Probes for another holder of `ip` on interface `ifindex`'s link.
    pub fn probe(&self, ifindex: u32, ip: IpAddr) -> Result<ProbeOutcome, AddressError> {
        let ip = ipv4(ip)?;
        let socket = ArpSocket::open(ifindex)?;
        probe(&socket, ip, &self.probing)
            .map_err(|e| AddressError::io(format!("probing for {ip} on interface {ifindex}"), e))
    }

    /// Makes `ip` this node's on interface `ifindex`: probes (a conflict is
    /// [`AddressError::Conflict`], and nothing is added), adds `ip`/32 with Sluice's mark and
    /// announces it; returns after the first round. Claiming an address Sluice already holds
    /// announces it again.
    pub fn claim(&mut self, ifindex: u32, ip: IpAddr) -> Result<Claimed, AddressError> {
        let v4 = ipv4(ip)?;
        let mut nl = route_socket()?;
        let held = addresses_of(&mut nl, ifindex, ip)?;
        if held.iter().any(|a| a.marked) {
            self.announce(ifindex, ip)?;
            return Ok(Claimed::AlreadyHeld);
        }
        if !held.is_empty() {
            return Ok(Claimed::HeldUnmarked);
        }
        let socket = ArpSocket::open(ifindex)?;
        match probe(&socket, v4, &self.probing)
            .map_err(|e| AddressError::io(format!("probing for {ip} on interface {ifindex}"), e))?
        {
            ProbeOutcome::Conflict { mac } => return Err(AddressError::Conflict { ip, ifindex, mac }),
            ProbeOutcome::Free => {}
        }
        let added = nl.request(
            RouteNetlinkMessage::NewAddress(claim_message(ifindex, ip)),
            NLM_F_CREATE | NLM_F_EXCL,
        );
        match added {
            // Added by someone else since the dump: theirs unless it carries the mark.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                if !addresses_of(&mut nl, ifindex, ip)?.iter().any(|a| a.marked) {
                    return Ok(Claimed::HeldUnmarked);
                }
            }
            r => {
                r.map_err(|e| AddressError::io(format!("adding {ip}/32 to interface {ifindex}"), e))?;
            }
        }
        self.start_announcing(socket, v4)?;
        Ok(Claimed::Added)
    }

    /// Announces `ip` on interface `ifindex` again, from the start of the schedule (replacing
    /// the rounds still pending for it).
    pub fn announce(&mut self, ifindex: u32, ip: IpAddr) -> Result<(), AddressError> {
        let ip = ipv4(ip)?;
        self.announcers.remove(&(ifindex, ip));
        let socket = ArpSocket::open(ifindex)?;
        self.start_announcing(socket, ip)
    }

    fn start_announcing(&mut self, socket: ArpSocket, ip: Ipv4Addr) -> Result<(), AddressError> {
        let key = (socket.ifindex(), ip);
        self.announcers.remove(&key);
        if let Some(announcer) = announce(socket, ip, &self.announcement)? {
            self.announcers.insert(key, announcer);
        }
        Ok(())
    }

    /// Whether rounds of announcements of `ip` on `ifindex` may still be pending.
    pub fn announcing(&self, ifindex: u32, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self
                .announcers
                .get(&(ifindex, ip))
                .is_some_and(|a| a.thread.as_ref().is_some_and(|t| !t.is_finished())),
            IpAddr::V6(_) => false,
        }
    }

    /// Stops announcing `ip` on interface `ifindex` and removes it if it carries Sluice's mark
    /// (every prefix of it that does); an address without the mark stays. Releasing what is not
    /// held is fine.
    pub fn release(&mut self, ifindex: u32, ip: IpAddr) -> Result<Released, AddressError> {
        if let IpAddr::V4(v4) = ip {
            // First: no round may go out once the address has gone.
            self.announcers.remove(&(ifindex, v4));
        }
        let mut nl = route_socket()?;
        let held = addresses_of(&mut nl, ifindex, ip)?;
        let (ours, theirs): (Vec<_>, Vec<_>) = held.into_iter().partition(|a| a.marked);
        for a in &ours {
            match nl.request(RouteNetlinkMessage::DelAddress(a.to_message()), 0) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::ENOENT)) => {}
                r => {
                    r.map_err(|e| {
                        AddressError::io(
                            format!("removing {ip}/{} from interface {ifindex}", a.prefix_len),
                            e,
                        )
                    })?;
                }
            }
        }
        Ok(match (ours.is_empty(), theirs.is_empty()) {
            (false, _) => Released::Removed,
            (true, true) => Released::NotHeld,
            (true, false) => Released::HeldUnmarked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x02, 0x5c, 0, 0, 0, 0x11]);
    const OTHER: MacAddr = MacAddr([0x02, 0x5c, 0, 0, 0, 0x12]);
    const IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 150);

    #[test]
    fn a_probe_is_a_broadcast_request_from_nowhere_for_the_address() {
        let f = ArpPacket::probe(MAC, IP).to_frame();
        let want: [u8; ARP_FRAME_LEN] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // to everyone
            0x02, 0x5c, 0, 0, 0, 0x11, // from the interface
            0x08, 0x06, // ARP
            0, 1, 0x08, 0x00, 6, 4, // Ethernet, IPv4
            0, 1, // request
            0x02, 0x5c, 0, 0, 0, 0x11, 0, 0, 0, 0, // sender: our MAC, 0.0.0.0
            0, 0, 0, 0, 0, 0, 192, 0, 2, 150, // target: unknown MAC, the address
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn announcements_say_the_address_is_at_our_mac_both_ways() {
        let request = ArpPacket::parse(&ArpPacket::announcement(MAC, IP).to_frame()).unwrap();
        assert_eq!(request.operation, ArpOperation::Request);
        assert_eq!((request.sender_ip, request.target_ip), (IP, IP));
        assert_eq!((request.sender_mac, request.target_mac), (MAC, MacAddr::ZERO));

        let f = ArpPacket::gratuitous_reply(MAC, IP).to_frame();
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast, so that every neighbour sees it");
        assert_eq!(&f[20..22], &[0, 2], "a reply");
        let reply = ArpPacket::parse(&f).unwrap();
        assert_eq!((reply.sender_ip, reply.target_ip), (IP, IP));
        assert_eq!(
            (reply.sender_mac, reply.target_mac),
            (MAC, MAC),
            "Linux takes a gratuitous reply only with both hardware addresses equal"
        );

        let announcement = Announcement::default();
        assert_eq!(announcement.packets(MAC, IP), vec![request, reply]);
        let replies_only = Announcement {
            requests: false,
            ..Announcement::default()
        };
        assert_eq!(replies_only.packets(MAC, IP), vec![reply]);
        assert!(Announcement::none().packets(MAC, IP).is_empty());
    }

    #[test]
    fn frames_survive_the_trip_and_padding_is_ignored() {
        for packet in [
            ArpPacket::probe(MAC, IP),
            ArpPacket::announcement(MAC, IP),
            ArpPacket::gratuitous_reply(MAC, IP),
        ] {
            let mut padded = packet.to_frame().to_vec();
            assert_eq!(ArpPacket::parse(&padded), Ok(packet));
            padded.resize(60, 0);
            assert_eq!(
                ArpPacket::parse(&padded),
                Ok(packet),
                "a minimum-size Ethernet frame"
            );
        }
    }

    #[test]
    fn short_and_malformed_frames_are_rejected() {
        let good = ArpPacket::announcement(MAC, IP).to_frame();
        for n in 0..ARP_FRAME_LEN {
            assert_eq!(ArpPacket::parse(&good[..n]), Err(FrameError::Short(n)));
        }
        let with = |i: usize, bytes: &[u8]| {
            let mut f = good;
            f[i..i + bytes.len()].copy_from_slice(bytes);
            ArpPacket::parse(&f)
        };
        assert_eq!(with(12, &[0x08, 0x00]), Err(FrameError::NotArp(0x0800)));
        assert!(matches!(
            with(14, &[0, 6]),
            Err(FrameError::NotIpv4OverEthernet { hardware: 6, .. })
        ));
        assert!(matches!(
            with(16, &[0x86, 0xdd]),
            Err(FrameError::NotIpv4OverEthernet { protocol: 0x86dd, .. })
        ));
        assert!(matches!(
            with(18, &[6, 16]),
            Err(FrameError::NotIpv4OverEthernet { lengths: (6, 16), .. })
        ));
        assert_eq!(with(20, &[0, 3]), Err(FrameError::Operation(3)), "RARP");
    }

    #[test]
    fn conflicts_are_other_holders_and_other_claimants_of_the_address() {
        let reply = ArpPacket {
            operation: ArpOperation::Reply,
            sender_mac: OTHER,
            sender_ip: IP,
            target_mac: MAC,
            target_ip: Ipv4Addr::UNSPECIFIED,
        };
        assert_eq!(
            reply.conflict(IP, MAC),
            Some(OTHER),
            "a holder answering our probe"
        );
        assert_eq!(
            ArpPacket::announcement(OTHER, IP).conflict(IP, MAC),
            Some(OTHER),
            "a holder announcing it"
        );
        assert_eq!(
            ArpPacket::probe(OTHER, IP).conflict(IP, MAC),
            Some(OTHER),
            "someone probing for it at the same time"
        );

        assert_eq!(ArpPacket::probe(MAC, IP).conflict(IP, MAC), None, "our own probe");
        assert_eq!(ArpPacket::announcement(MAC, IP).conflict(IP, MAC), None);
        let other_ip = Ipv4Addr::new(192, 0, 2, 151);
        for packet in [
            ArpPacket::probe(OTHER, other_ip),
            ArpPacket::announcement(OTHER, other_ip),
            ArpPacket::gratuitous_reply(OTHER, other_ip),
        ] {
            assert_eq!(packet.conflict(IP, MAC), None, "another address: {packet:?}");
        }
        let router_asking = ArpPacket {
            operation: ArpOperation::Request,
            sender_mac: OTHER,
            sender_ip: Ipv4Addr::new(192, 0, 2, 1),
            target_mac: MacAddr::ZERO,
            target_ip: IP,
        };
        assert_eq!(
            router_asking.conflict(IP, MAC),
            None,
            "resolving the address is not holding it"
        );
    }

    #[test]
    fn defaults_fit_a_half_second_failover() {
        let t = ProbeTiming::default();
        assert_eq!(t.interval * (t.probes - 1), Duration::from_millis(20));
        assert!(t.listen <= Duration::from_millis(100), "{t:?}");
        let a = Announcement::default();
        assert_eq!(
            a.schedule.first(),
            Some(&Duration::ZERO),
            "the first round at once"
        );
        assert!(a.schedule.len() >= 5 && a.schedule.is_sorted(), "{a:?}");
    }

    #[test]
    fn macs_print_as_ip_prints_them() {
        assert_eq!(MAC.to_string(), "02:5c:00:00:00:11");
        assert_eq!(MacAddr::BROADCAST.to_string(), "ff:ff:ff:ff:ff:ff");
    }

    #[test]
    fn sluices_addresses_are_told_apart_by_their_mark() {
        let ip = IpAddr::V4(IP);
        let claim = claim_message(7, ip);
        assert_eq!(claim.header.prefix_len, 32);
        assert_eq!(claim.header.scope, AddressScope::Universe);
        let ours = NodeAddress::of(&claim).unwrap();
        assert_eq!(
            ours,
            NodeAddress {
                ifindex: 7,
                ip,
                prefix_len: 32,
                marked: true
            }
        );
        let mut by_hand = claim.clone();
        by_hand
            .attributes
            .retain(|a| !matches!(a, AddressAttribute::Protocol(_)));
        assert!(!NodeAddress::of(&by_hand).unwrap().marked);
        let mut by_other = by_hand.clone();
        by_other
            .attributes
            .push(AddressAttribute::Protocol(AddressProtocol::Other(
                ADDRESS_PROTOCOL + 1,
            )));
        assert!(!NodeAddress::of(&by_other).unwrap().marked, "another program's");

        let delete = ours.to_message();
        assert_eq!(
            NodeAddress::of(&delete).map(|a| (a.ifindex, a.ip, a.prefix_len)),
            Some((7, ip, 32))
        );
        let v6: IpAddr = "fd00:192:0:2::150".parse().unwrap();
        assert_eq!(claim_message(7, v6).header.prefix_len, 128);
        assert_eq!(claim_message(7, v6).header.family, AddressFamily::Inet6);
    }

    #[test]
    fn ipv6_is_refused_for_now() {
        let mut m = AddressManager::default();
        let v6: IpAddr = "fd00:192:0:2::150".parse().unwrap();
        assert!(matches!(
            m.claim(1, v6),
            Err(AddressError::Ipv6Unsupported { .. })
        ));
        assert!(matches!(
            m.probe(1, v6),
            Err(AddressError::Ipv6Unsupported { .. })
        ));
    }
}
