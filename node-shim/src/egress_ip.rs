//! Managed egress IPs on this node (issues 13 and 15): probe for a duplicate, claim, announce,
//! release.
//!
//! The node that fills a policy's slot holds that slot's address: [`AddressManager::claim`] probes
//! the link for another holder, adds the address as a host address (/32, /128) over netlink with
//! Sluice's mark, and announces it so that neighbours (the router above all) send to this node
//! from now on; [`AddressManager::release`] stops the announcements and removes the address.
//! [`held_addresses`] lists what carries the mark: what a restarted shim holds, what uninstalling
//! removes. IPv4 speaks ARP ([RFC 5227] probes, gratuitous ARP); IPv6 speaks neighbour discovery
//! (duplicate address detection probes, [RFC 4862] §5.4, and unsolicited neighbour
//! advertisements, [RFC 4861] §7.2.6), both over a packet socket of the interface.
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
//! Before adding an address the node does not hold yet, it sends [`ProbeTiming::probes`] probes,
//! for IPv4 ARP probes (sender IP 0.0.0.0, so that no neighbour learns anything from them) and listens on the
//! same packet socket: any ARP packet whose sender IP is the address (a reply, or a request from
//! a holder), or another node's probe for the same address (two claimants at once), is a
//! conflict, and the address is not added. IPv6 works the same way with neighbour discovery: the
//! probes are solicitations for the address from the unspecified address to its solicited-node
//! group, with no link-layer option ([`NdpPacket::probe`]); a conflict is an advertisement of the
//! address (a holder answering, or announcing), a solicitation from it (a holder resolving a
//! neighbour), or another node's probe for it. The socket joins the address's solicited-node
//! multicast group for the probe, so that a NIC filtering multicast still hears the other
//! claimants, and a socket filter keeps everything but solicitations and advertisements out. RFC 5227 waits a random 0–1 s, sends 3 probes 1–2 s
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
//! IPv6 rounds are one unsolicited neighbour advertisement each ([`NdpPacket::announcement`]):
//! from the address to all nodes (ff02::1), override flag set, solicited flag clear, with the
//! interface's MAC as target link-layer address ([`Announcement::advertisements`] switches them
//! off). A Linux neighbour (net/ipv6/ndisc.c, `ndisc_recv_na`) takes one into an **existing**
//! entry at once (override: the new MAC, state `STALE`, confirmed by a unicast probe on the next
//! packet) and creates **no** entry from it unless `accept_untracked_na` says so; the first packet
//! then resolves the address with a solicitation, which the new holder's kernel answers. Checked
//! by `node-shim/tests/egress_ip_e2e.rs` too.
//!
//! # The IPv6 address itself
//!
//! It is added with `IFA_F_NODAD` (the probe above was the detection; the kernel's own would hold
//! the address tentative, unusable, for a second or more) and with a preferred lifetime of 0,
//! i.e. deprecated: source address selection (RFC 6724, rule 3) then never picks it for the
//! node's own connections, which would break when the address moves, while it still takes
//! packets to it and serves as the explicit source the SNAT rules name. (An IPv4 /32 needs no such
//! care: the kernel picks the source of a route's own subnet.)
//!
//! What a Linux neighbour does with gratuitous ARP (net/ipv4/arp.c, `arp_process`; checked by
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
//! [RFC 4861]: https://www.rfc-editor.org/rfc/rfc4861
//! [RFC 4862]: https://www.rfc-editor.org/rfc/rfc4862

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
    address::{
        AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol, AddressScope,
        CacheInfo,
    },
};
use socket2::{Domain, Protocol, SockFilter, Socket, Type};

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
         addresses on it with ARP or neighbour discovery"
    )]
    NoEthernetInterface { ifindex: u32 },

    #[error(
        "IPv6 is turned off on interface {ifindex} (disable_ipv6), so {ip} cannot be put on it; \
         turn IPv6 on there or give the policy IPv4 addresses"
    )]
    Ipv6Off { ip: Ipv6Addr, ifindex: u32 },

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
    #[error("a frame of {0} bytes is too short for its IPv6 neighbour discovery message")]
    ShortNdp(usize),
    #[error("EtherType {0:#06x} is not IPv6")]
    NotIpv6(u16),
    #[error("not a neighbour solicitation or advertisement: {0}")]
    NotNeighbourDiscovery(&'static str),
    #[error("ICMPv6 checksum {found:#06x} where {expected:#06x} was due")]
    Checksum { found: u16, expected: u16 },
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
// Neighbour discovery frames (pure)

const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPV6_HEADER: usize = 40;
const NEXT_HEADER_ICMPV6: u8 = 58;
/// RFC 4861 §7.1.1: a neighbour discovery message that crossed a router is not one.
const NDP_HOP_LIMIT: u8 = 255;
const NEIGHBOR_SOLICITATION: u8 = 135;
const NEIGHBOR_ADVERTISEMENT: u8 = 136;
const OPTION_SOURCE_LINK_LAYER: u8 = 1;
const OPTION_TARGET_LINK_LAYER: u8 = 2;
/// Type, code, checksum, flags (or reserved), target: the message before its options.
const NDP_MESSAGE: usize = 24;
/// Where the message starts in an Ethernet frame.
const NDP_AT: usize = ETHERNET_HEADER + IPV6_HEADER;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// A neighbour solicitation or advertisement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NdpMessage {
    Solicitation,
    Advertisement {
        router: bool,
        solicited: bool,
        /// Neighbours replace the MAC of an entry they have (RFC 4861 §7.2.5).
        override_entry: bool,
    },
}

/// A neighbour discovery packet as it travels over Ethernet: the frame's and the IPv6 header's
/// addresses, the target, and the one link-layer address option Sluice reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NdpPacket {
    pub message: NdpMessage,
    /// The frame's source.
    pub source_mac: MacAddr,
    /// The frame's destination.
    pub destination_mac: MacAddr,
    pub source_ip: Ipv6Addr,
    pub destination_ip: Ipv6Addr,
    pub target: Ipv6Addr,
    /// The source link-layer address option of a solicitation, the target link-layer address
    /// option of an advertisement.
    pub link_layer: Option<MacAddr>,
}

/// The solicited-node multicast address of `ip` (RFC 4291 §2.7.1): where probes for it go, and
/// the group its holder listens on.
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The Ethernet address a packet to IPv6 multicast address `ip` goes to (RFC 2464 §7).
pub fn multicast_mac(ip: Ipv6Addr) -> MacAddr {
    let o = ip.octets();
    MacAddr([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// The ICMPv6 checksum of `message` (its checksum field taken as zero) between `source` and
/// `destination` (RFC 8200 §8.1).
fn icmpv6_checksum(source: Ipv6Addr, destination: Ipv6Addr, message: &[u8]) -> u16 {
    fn add(sum: u64, bytes: &[u8]) -> u64 {
        bytes
            .chunks(2)
            .map(|c| u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
            .fold(sum, |a, w| a + w)
    }
    let length = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut sum = add(0, &source.octets());
    sum = add(sum, &destination.octets());
    sum = add(sum, &length.to_be_bytes());
    sum = add(sum, &[0, 0, 0, NEXT_HEADER_ICMPV6]);
    sum = add(sum, &message[..2]);
    sum = add(sum, message.get(4..).unwrap_or_default());
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded to 16 bits")
}

impl NdpPacket {
    /// A duplicate address detection probe for `ip` (RFC 4862 §5.4.2): a solicitation from the
    /// unspecified address to `ip`'s solicited-node group, without a link-layer option, so that
    /// no neighbour learns anything from it.
    pub fn probe(mac: MacAddr, ip: Ipv6Addr) -> Self {
        let group = solicited_node(ip);
        NdpPacket {
            message: NdpMessage::Solicitation,
            source_mac: mac,
            destination_mac: multicast_mac(group),
            source_ip: Ipv6Addr::UNSPECIFIED,
            destination_ip: group,
            target: ip,
            link_layer: None,
        }
    }

    /// An unsolicited advertisement (RFC 4861 §7.2.6): `ip` is at `mac`, to all nodes, with the
    /// override flag, so that neighbours holding an entry for `ip` take the new MAC.
    pub fn announcement(mac: MacAddr, ip: Ipv6Addr) -> Self {
        NdpPacket {
            message: NdpMessage::Advertisement {
                router: false,
                solicited: false,
                override_entry: true,
            },
            source_mac: mac,
            destination_mac: multicast_mac(ALL_NODES),
            source_ip: ip,
            destination_ip: ALL_NODES,
            target: ip,
            link_layer: Some(mac),
        }
    }

    /// The Ethernet frame carrying this packet, checksummed.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut message = vec![0; NDP_MESSAGE];
        let (kind, option) = match self.message {
            NdpMessage::Solicitation => (NEIGHBOR_SOLICITATION, OPTION_SOURCE_LINK_LAYER),
            NdpMessage::Advertisement {
                router,
                solicited,
                override_entry,
            } => {
                message[4] = u8::from(router) << 7 | u8::from(solicited) << 6 | u8::from(override_entry) << 5;
                (NEIGHBOR_ADVERTISEMENT, OPTION_TARGET_LINK_LAYER)
            }
        };
        message[0] = kind;
        message[8..24].copy_from_slice(&self.target.octets());
        if let Some(mac) = self.link_layer {
            // Length in units of 8 bytes: type, length and a 6-byte address.
            message.extend_from_slice(&[option, 1]);
            message.extend_from_slice(&mac.0);
        }
        let checksum = icmpv6_checksum(self.source_ip, self.destination_ip, &message);
        message[2..4].copy_from_slice(&checksum.to_be_bytes());

        let mut f = Vec::with_capacity(NDP_AT + message.len());
        f.extend_from_slice(&self.destination_mac.0);
        f.extend_from_slice(&self.source_mac.0);
        f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        let length = u16::try_from(message.len()).expect("a short message");
        f.extend_from_slice(&length.to_be_bytes());
        f.extend_from_slice(&[NEXT_HEADER_ICMPV6, NDP_HOP_LIMIT]);
        f.extend_from_slice(&self.source_ip.octets());
        f.extend_from_slice(&self.destination_ip.octets());
        f.extend_from_slice(&message);
        f
    }

    /// The neighbour solicitation or advertisement of an Ethernet frame (trailing padding
    /// allowed), validated as RFC 4861 §7.1 asks of a receiver: hop limit 255, a good checksum,
    /// code 0, options of non-zero length. Messages behind extension headers are not read.
    pub fn parse(frame: &[u8]) -> Result<Self, FrameError> {
        if frame.len() < NDP_AT + NDP_MESSAGE {
            return Err(FrameError::ShortNdp(frame.len()));
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        if ethertype != ETHERTYPE_IPV6 {
            return Err(FrameError::NotIpv6(ethertype));
        }
        let mac_at = |i: usize| MacAddr(frame[i..i + 6].try_into().expect("6 bytes"));
        let ip_at = |i: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&frame[i..i + 16]).expect("16 bytes"));
        let not = FrameError::NotNeighbourDiscovery;
        let ip6 = &frame[ETHERNET_HEADER..];
        if ip6[0] >> 4 != 6 {
            return Err(not("not IPv6 inside"));
        }
        if ip6[6] != NEXT_HEADER_ICMPV6 {
            return Err(not("the next header is not ICMPv6"));
        }
        if ip6[7] != NDP_HOP_LIMIT {
            return Err(not("its hop limit is not 255 (it may come from beyond the link)"));
        }
        let length = usize::from(u16::from_be_bytes([ip6[4], ip6[5]]));
        if length < NDP_MESSAGE || frame.len() < NDP_AT + length {
            return Err(FrameError::ShortNdp(frame.len()));
        }
        let (source_ip, destination_ip) = (ip_at(ETHERNET_HEADER + 8), ip_at(ETHERNET_HEADER + 24));
        let message = &frame[NDP_AT..NDP_AT + length];
        let (kind, option) = match message[0] {
            NEIGHBOR_SOLICITATION => (NdpMessage::Solicitation, OPTION_SOURCE_LINK_LAYER),
            NEIGHBOR_ADVERTISEMENT => (
                NdpMessage::Advertisement {
                    router: message[4] & 0x80 != 0,
                    solicited: message[4] & 0x40 != 0,
                    override_entry: message[4] & 0x20 != 0,
                },
                OPTION_TARGET_LINK_LAYER,
            ),
            _ => return Err(not("another ICMPv6 type")),
        };
        if message[1] != 0 {
            return Err(not("its ICMPv6 code is not 0"));
        }
        let found = u16::from_be_bytes([message[2], message[3]]);
        let expected = icmpv6_checksum(source_ip, destination_ip, message);
        if found != expected {
            return Err(FrameError::Checksum { found, expected });
        }
        let mut link_layer = None;
        let mut options = &message[NDP_MESSAGE..];
        while options.len() >= 2 {
            let len = usize::from(options[1]) * 8;
            if len == 0 || len > options.len() {
                return Err(not("an option of length 0 or past the end"));
            }
            if options[0] == option && len == 8 {
                link_layer = Some(MacAddr(options[2..8].try_into().expect("6 bytes")));
            }
            options = &options[len..];
        }
        Ok(NdpPacket {
            message: kind,
            source_mac: mac_at(6),
            destination_mac: mac_at(0),
            source_ip,
            destination_ip,
            target: ip_at(NDP_AT + 8),
            link_layer,
        })
    }

    /// The MAC of another holder of `ip` (or another claimant) that this packet reveals to a
    /// node probing for `ip` from `own` (RFC 4862 §5.4.3, 5.4.4, widened as for ARP): an
    /// advertisement of `ip`, a solicitation from `ip`, or someone else's probe for `ip`. Our
    /// own frames, and solicitations for `ip` from another address (a router resolving it),
    /// reveal nothing.
    pub fn conflict(&self, ip: Ipv6Addr, own: MacAddr) -> Option<MacAddr> {
        if self.source_mac == own {
            return None;
        }
        let revealed = match self.message {
            NdpMessage::Advertisement { .. } => self.target == ip,
            NdpMessage::Solicitation => {
                self.source_ip == ip || (self.source_ip.is_unspecified() && self.target == ip)
            }
        };
        revealed.then(|| self.link_layer.unwrap_or(self.source_mac))
    }
}

// ---------------------------------------------------------------------------------------------
// The packet sockets

/// An `AF_PACKET` socket bound to one Ethernet interface, for one EtherType.
struct LinkSocket {
    socket: Socket,
    ifindex: u32,
    mac: MacAddr,
}

/// Large enough for any ARP frame and any neighbour discovery message Sluice reads (the rest of
/// a longer frame is cut, and then fails the length check).
const RECEIVE_BUFFER: usize = 256;

impl LinkSocket {
    /// Opens the socket on interface `ifindex` (in the calling thread's network namespace),
    /// with `filter` (if any) applied before it is bound, so that nothing else ever queues.
    fn open(ifindex: u32, ethertype: u16, what: &str, filter: &[SockFilter]) -> Result<Self, AddressError> {
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
            |e: io::Error| AddressError::io(format!("opening an {what} socket on interface {ifindex}"), e);
        let protocol = Protocol::from(i32::from(ethertype.to_be()));
        let socket = Socket::new(Domain::PACKET, Type::RAW, Some(protocol)).map_err(context)?;
        if !filter.is_empty() {
            socket.attach_filter(filter).map_err(context)?;
        }
        // getifaddrs leaves the link address's protocol 0: binding keeps the socket's.
        nix::sys::socket::bind(socket.as_raw_fd(), &link).map_err(|e| context(e.into()))?;
        let opened = LinkSocket { socket, ifindex, mac };
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

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        self.socket.send(frame).map(drop)
    }

    /// The first frame received before `deadline` that `parse` takes, or `None` once it has
    /// passed.
    fn receive<T>(&self, deadline: Instant, parse: impl Fn(&[u8]) -> Option<T>) -> io::Result<Option<T>> {
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
                    if let Some(packet) = parse(&buffer[..n]) {
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

/// An `AF_PACKET` socket bound to one Ethernet interface, carrying ARP only.
pub struct ArpSocket(LinkSocket);

impl ArpSocket {
    /// Opens the socket on interface `ifindex` (in the calling thread's network namespace).
    pub fn open(ifindex: u32) -> Result<Self, AddressError> {
        LinkSocket::open(ifindex, ETHERTYPE_ARP, "ARP", &[]).map(ArpSocket)
    }

    pub fn ifindex(&self) -> u32 {
        self.0.ifindex
    }

    /// The interface's MAC.
    pub fn mac(&self) -> MacAddr {
        self.0.mac
    }

    /// Sends `packet` in a broadcast frame.
    pub fn send(&self, packet: &ArpPacket) -> io::Result<()> {
        self.0.send(&packet.to_frame())
    }

    /// The next ARP packet received before `deadline`, or `None` once it has passed. Frames that
    /// are not IPv4-over-Ethernet ARP are skipped.
    pub fn receive(&self, deadline: Instant) -> io::Result<Option<ArpPacket>> {
        self.0.receive(deadline, |f| ArpPacket::parse(f).ok())
    }
}

const BPF_LOAD_BYTE: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const BPF_JUMP_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_RETURN: u16 = 0x06; // BPF_RET | BPF_K

/// Classic BPF (code, jump if true, jump if false, k): IPv6 frames whose next header is ICMPv6
/// and whose type is a neighbour solicitation or advertisement (offsets from the start of the
/// Ethernet frame); a busy uplink's other IPv6 traffic never reaches the socket.
#[allow(
    clippy::cast_possible_truncation,
    reason = "offsets and sizes well below 2^32"
)]
const NDP_FILTER: [(u16, u8, u8, u32); 7] = [
    (BPF_LOAD_BYTE, 0, 0, (ETHERNET_HEADER + 6) as u32),
    (BPF_JUMP_EQUAL, 0, 4, NEXT_HEADER_ICMPV6 as u32),
    (BPF_LOAD_BYTE, 0, 0, NDP_AT as u32),
    (BPF_JUMP_EQUAL, 1, 0, NEIGHBOR_SOLICITATION as u32),
    (BPF_JUMP_EQUAL, 0, 1, NEIGHBOR_ADVERTISEMENT as u32),
    (BPF_RETURN, 0, 0, RECEIVE_BUFFER as u32),
    (BPF_RETURN, 0, 0, 0),
];

fn ndp_filter() -> [SockFilter; 7] {
    NDP_FILTER.map(|(code, jt, jf, k)| SockFilter::new(code, jt, jf, k))
}

/// An `AF_PACKET` socket bound to one Ethernet interface, carrying neighbour solicitations and
/// advertisements only, and a member of one address's solicited-node group.
pub struct NdpSocket(LinkSocket);

impl NdpSocket {
    /// Opens the socket on interface `ifindex` (in the calling thread's network namespace) and
    /// joins the link-layer group of `ip`'s solicited-node address, where other claimants' probes
    /// go (a NIC filtering multicast would otherwise drop them; the membership ends with the
    /// socket).
    pub fn open(ifindex: u32, ip: Ipv6Addr) -> Result<Self, AddressError> {
        let socket = LinkSocket::open(ifindex, ETHERTYPE_IPV6, "IPv6 neighbour discovery", &ndp_filter())?;
        let group = multicast_mac(solicited_node(ip));
        let mut address = [0; 8];
        address[..6].copy_from_slice(&group.0);
        let membership = libc::packet_mreq {
            mr_ifindex: i32::try_from(ifindex).unwrap_or(i32::MAX),
            mr_type: libc::PACKET_MR_MULTICAST as u16,
            mr_alen: 6,
            mr_address: address,
        };
        // SAFETY: a valid socket, and an option value of the size the kernel reads.
        #[allow(
            unsafe_code,
            reason = "PACKET_ADD_MEMBERSHIP has no safe wrapper in nix or socket2"
        )]
        let joined = unsafe {
            libc::setsockopt(
                socket.socket.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                std::ptr::from_ref(&membership).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::packet_mreq>()).expect("small"),
            )
        };
        if joined != 0 {
            return Err(AddressError::io(
                format!("joining {group} on interface {ifindex}"),
                io::Error::last_os_error(),
            ));
        }
        Ok(NdpSocket(socket))
    }

    pub fn ifindex(&self) -> u32 {
        self.0.ifindex
    }

    /// The interface's MAC.
    pub fn mac(&self) -> MacAddr {
        self.0.mac
    }

    pub fn send(&self, packet: &NdpPacket) -> io::Result<()> {
        self.0.send(&packet.to_frame())
    }

    /// The next valid solicitation or advertisement received before `deadline`, or `None` once
    /// it has passed.
    pub fn receive(&self, deadline: Instant) -> io::Result<Option<NdpPacket>> {
        self.0.receive(deadline, |f| NdpPacket::parse(f).ok())
    }
}

/// One address's neighbour protocol on one link: ARP for IPv4, neighbour discovery for IPv6.
enum Wire {
    Arp(ArpSocket, Ipv4Addr),
    Ndp(NdpSocket, Ipv6Addr),
}

impl Wire {
    fn open(ifindex: u32, ip: IpAddr) -> Result<Self, AddressError> {
        Ok(match ip {
            IpAddr::V4(ip) => Wire::Arp(ArpSocket::open(ifindex)?, ip),
            IpAddr::V6(ip) => Wire::Ndp(NdpSocket::open(ifindex, ip)?, ip),
        })
    }

    fn ifindex(&self) -> u32 {
        match self {
            Wire::Arp(s, _) => s.ifindex(),
            Wire::Ndp(s, _) => s.ifindex(),
        }
    }

    fn ip(&self) -> IpAddr {
        match self {
            Wire::Arp(_, ip) => IpAddr::V4(*ip),
            Wire::Ndp(_, ip) => IpAddr::V6(*ip),
        }
    }

    fn send_probe(&self) -> io::Result<()> {
        match self {
            Wire::Arp(s, ip) => s.send(&ArpPacket::probe(s.mac(), *ip)),
            Wire::Ndp(s, ip) => s.send(&NdpPacket::probe(s.mac(), *ip)),
        }
    }

    /// The MAC of the first packet before `deadline` that shows another holder or claimant.
    fn conflict_before(&self, deadline: Instant) -> io::Result<Option<MacAddr>> {
        match self {
            Wire::Arp(s, ip) => {
                while let Some(packet) = s.receive(deadline)? {
                    if let Some(mac) = packet.conflict(*ip, s.mac()) {
                        return Ok(Some(mac));
                    }
                }
            }
            Wire::Ndp(s, ip) => {
                while let Some(packet) = s.receive(deadline)? {
                    if let Some(mac) = packet.conflict(*ip, s.mac()) {
                        return Ok(Some(mac));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Whether a round of `announcement` sends anything for this address.
    fn announces(&self, announcement: &Announcement) -> bool {
        match self {
            Wire::Arp(..) => announcement.requests || announcement.replies,
            Wire::Ndp(..) => announcement.advertisements,
        }
    }

    fn send_round(&self, announcement: &Announcement) -> io::Result<()> {
        match self {
            Wire::Arp(s, ip) => announcement
                .packets(s.mac(), *ip)
                .iter()
                .try_for_each(|p| s.send(p)),
            Wire::Ndp(s, ip) if announcement.advertisements => s.send(&NdpPacket::announcement(s.mac(), *ip)),
            Wire::Ndp(..) => Ok(()),
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

/// Probes for another holder of the wire's address; returns at the first conflict, or `Free`
/// when [`ProbeTiming::listen`] has passed.
fn probe(wire: &Wire, timing: &ProbeTiming) -> io::Result<ProbeOutcome> {
    let start = Instant::now();
    let sends: Vec<Instant> = (0..timing.probes.max(1))
        .map(|i| start + timing.interval * i)
        .collect();
    let verdict = (start + timing.listen).max(*sends.last().expect("at least one probe"));
    for (i, at) in sends.iter().enumerate() {
        // Listening until this probe is due (nothing before the first).
        if let Some(mac) = wire.conflict_before(*at)? {
            return Ok(ProbeOutcome::Conflict { mac });
        }
        wire.send_probe().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("sending probe {} for {}: {e}", i + 1, wire.ip()),
            )
        })?;
    }
    Ok(match wire.conflict_before(verdict)? {
        Some(mac) => ProbeOutcome::Conflict { mac },
        None => ProbeOutcome::Free,
    })
}

// ---------------------------------------------------------------------------------------------
// Announcing

/// When and how a claimed address is announced (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// When each round goes out, from the moment of the claim; rounds at zero go out before the
    /// claim returns, the others from a thread of their own.
    pub schedule: Vec<Duration>,
    /// IPv4: send a gratuitous request in each round.
    pub requests: bool,
    /// IPv4: send a gratuitous reply in each round.
    pub replies: bool,
    /// IPv6: send an unsolicited neighbour advertisement in each round.
    pub advertisements: bool,
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
            advertisements: true,
        }
    }
}

impl Announcement {
    /// No announcement at all (a network that must not see gratuitous ARP or unsolicited
    /// advertisements, or a test showing what happens without).
    pub fn none() -> Self {
        Announcement {
            schedule: Vec::new(),
            requests: false,
            replies: false,
            advertisements: false,
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

/// Sends the rounds of `announcement` due at once, and starts a thread for the others (`None`
/// when there are none).
fn announce(wire: Wire, announcement: &Announcement) -> Result<Option<Announcer>, AddressError> {
    let start = Instant::now();
    let ip = wire.ip();
    if !wire.announces(announcement) {
        return Ok(None);
    }
    let (now, later): (Vec<Duration>, Vec<Duration>) =
        announcement.schedule.iter().partition(|d| d.is_zero());
    for _ in now {
        wire.send_round(announcement)
            .map_err(|e| AddressError::io(format!("announcing {ip} on interface {}", wire.ifindex()), e))?;
    }
    if later.is_empty() {
        return Ok(None);
    }
    let (stop, stopped) = mpsc::channel::<()>();
    let mut later = later;
    later.sort();
    let announcement = announcement.clone();
    let thread = std::thread::Builder::new()
        .name(format!("announce-{ip}"))
        .spawn(move || {
            for offset in later {
                let wait = (start + offset).saturating_duration_since(Instant::now());
                match stopped.recv_timeout(wait) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                if let Err(e) = wire.send_round(&announcement) {
                    tracing::warn!(%ip, ifindex = wire.ifindex(), error = %e, "announcing a managed egress IP");
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

/// The `RTM_NEWADDR` request adding `ip` as a host address of global scope, with Sluice's mark;
/// an IPv6 one without the kernel's duplicate address detection and deprecated (see the module
/// docs).
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
    if ip.is_ipv6() {
        m.header.flags = AddressHeaderFlags::Nodad;
        m.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        let mut lifetimes = CacheInfo::default();
        // Infinite: the address stays until Sluice removes it.
        lifetimes.ifa_valid = u32::MAX;
        m.attributes.push(AddressAttribute::CacheInfo(lifetimes));
    }
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
    announcers: HashMap<(u32, IpAddr), Announcer>,
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
        let wire = Wire::open(ifindex, ip)?;
        probe(&wire, &self.probing)
            .map_err(|e| AddressError::io(format!("probing for {ip} on interface {ifindex}"), e))
    }

    /// Makes `ip` this node's on interface `ifindex`: probes (a conflict is
    /// [`AddressError::Conflict`], and nothing is added), adds `ip`/32 (or /128) with Sluice's
    /// mark and announces it; returns after the first round. Claiming an address Sluice already
    /// holds announces it again.
    pub fn claim(&mut self, ifindex: u32, ip: IpAddr) -> Result<Claimed, AddressError> {
        let mut nl = route_socket()?;
        let held = addresses_of(&mut nl, ifindex, ip)?;
        if held.iter().any(|a| a.marked) {
            self.announce(ifindex, ip)?;
            return Ok(Claimed::AlreadyHeld);
        }
        if !held.is_empty() {
            return Ok(Claimed::HeldUnmarked);
        }
        if let IpAddr::V6(ip) = ip
            && !crate::netdev::ipv6_enabled(ifindex)
        {
            return Err(AddressError::Ipv6Off { ip, ifindex });
        }
        let wire = Wire::open(ifindex, ip)?;
        match probe(&wire, &self.probing)
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
                r.map_err(|e| AddressError::io(format!("adding {ip} to interface {ifindex}"), e))?;
            }
        }
        self.start_announcing(wire)?;
        Ok(Claimed::Added)
    }

    /// Announces `ip` on interface `ifindex` again, from the start of the schedule (replacing
    /// the rounds still pending for it).
    pub fn announce(&mut self, ifindex: u32, ip: IpAddr) -> Result<(), AddressError> {
        self.announcers.remove(&(ifindex, ip));
        let wire = Wire::open(ifindex, ip)?;
        self.start_announcing(wire)
    }

    fn start_announcing(&mut self, wire: Wire) -> Result<(), AddressError> {
        let key = (wire.ifindex(), wire.ip());
        self.announcers.remove(&key);
        if let Some(announcer) = announce(wire, &self.announcement)? {
            self.announcers.insert(key, announcer);
        }
        Ok(())
    }

    /// Whether rounds of announcements of `ip` on `ifindex` may still be pending.
    pub fn announcing(&self, ifindex: u32, ip: IpAddr) -> bool {
        self.announcers
            .get(&(ifindex, ip))
            .is_some_and(|a| a.thread.as_ref().is_some_and(|t| !t.is_finished()))
    }

    /// Stops announcing `ip` on interface `ifindex` and removes it if it carries Sluice's mark
    /// (every prefix of it that does); an address without the mark stays. Releasing what is not
    /// held is fine.
    pub fn release(&mut self, ifindex: u32, ip: IpAddr) -> Result<Released, AddressError> {
        // First: no round may go out once the address has gone.
        self.announcers.remove(&(ifindex, ip));
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
        assert!(
            NodeAddress::of(&claim_message(7, IpAddr::V6(IP6)))
                .unwrap()
                .marked,
            "IPv6 too"
        );
    }

    const IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0, 2, 0, 0, 0, 0x150);

    /// The one's complement sum of the pseudo-header and the message, checksum included: 0xffff
    /// for a good checksum (RFC 1071), computed apart from the code under test.
    fn folded_sum(frame: &[u8]) -> u16 {
        let ip6 = &frame[ETHERNET_HEADER..];
        let length = usize::from(u16::from_be_bytes([ip6[4], ip6[5]]));
        let mut bytes = ip6[8..40].to_vec();
        bytes.extend_from_slice(&u32::try_from(length).unwrap().to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 58]);
        bytes.extend_from_slice(&ip6[40..40 + length]);
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        u16::try_from(sum).unwrap()
    }

    #[test]
    fn solicited_node_groups_and_their_macs_are_the_rfcs() {
        let ip: Ipv6Addr = "2001:db8::1:2a02:3".parse().unwrap();
        assert_eq!(solicited_node(ip), "ff02::1:ff02:3".parse::<Ipv6Addr>().unwrap());
        assert_eq!(multicast_mac(solicited_node(ip)).to_string(), "33:33:ff:02:00:03");
        assert_eq!(multicast_mac(ALL_NODES).to_string(), "33:33:00:00:00:01");
    }

    #[test]
    fn a_dad_probe_is_a_solicitation_from_nowhere_to_the_solicited_node_group() {
        let f = NdpPacket::probe(MAC, IP6).to_frame();
        let mut want = vec![
            0x33, 0x33, 0xff, 0, 0x01, 0x50, // to the solicited-node group's MAC
            0x02, 0x5c, 0, 0, 0, 0x11, // from the interface
            0x86, 0xdd, // IPv6
            0x60, 0, 0, 0, 0, 24, 58, 255, // 24 bytes of ICMPv6, hop limit 255
        ];
        want.extend_from_slice(&[0; 16]); // from ::
        want.extend_from_slice(&"ff02::1:ff00:150".parse::<Ipv6Addr>().unwrap().octets());
        want.extend_from_slice(&[135, 0]); // a solicitation
        want.extend_from_slice(&f[NDP_AT + 2..NDP_AT + 4]); // the checksum, checked below
        want.extend_from_slice(&[0; 4]);
        want.extend_from_slice(&IP6.octets()); // for the address; no option
        assert_eq!(f, want);
        assert_eq!(folded_sum(&f), 0xffff, "a good checksum");
    }

    #[test]
    fn an_announcement_is_an_unsolicited_overriding_advertisement_to_all_nodes() {
        let f = NdpPacket::announcement(MAC, IP6).to_frame();
        assert_eq!(&f[0..6], &[0x33, 0x33, 0, 0, 0, 1], "to all nodes");
        assert_eq!(f[NDP_AT], 136, "an advertisement");
        assert_eq!(f[NDP_AT + 4], 0x20, "override, neither solicited nor a router");
        assert_eq!(
            &f[NDP_AT + 24..],
            &[2, 1, 0x02, 0x5c, 0, 0, 0, 0x11],
            "the target link-layer address: ours"
        );
        assert_eq!(folded_sum(&f), 0xffff, "a good checksum");
        let p = NdpPacket::parse(&f).unwrap();
        assert_eq!((p.source_ip, p.destination_ip, p.target), (IP6, ALL_NODES, IP6));
        assert_eq!(p.link_layer, Some(MAC));
    }

    #[test]
    fn ndp_frames_survive_the_trip_and_padding_is_ignored() {
        let with_source_option = NdpPacket {
            source_ip: "fd00:192:0:2::1".parse().unwrap(),
            link_layer: Some(OTHER),
            ..NdpPacket::probe(OTHER, IP6)
        };
        for packet in [
            NdpPacket::probe(MAC, IP6),
            NdpPacket::announcement(MAC, IP6),
            with_source_option,
        ] {
            let mut padded = packet.to_frame();
            assert_eq!(NdpPacket::parse(&padded), Ok(packet));
            padded.resize(padded.len() + 10, 0);
            assert_eq!(NdpPacket::parse(&padded), Ok(packet), "padding after the message");
        }
    }

    #[test]
    fn frames_that_are_not_valid_neighbour_discovery_are_rejected() {
        let good = NdpPacket::announcement(MAC, IP6).to_frame();
        for n in 0..NDP_AT + NDP_MESSAGE {
            assert_eq!(NdpPacket::parse(&good[..n]), Err(FrameError::ShortNdp(n)));
        }
        assert_eq!(
            NdpPacket::parse(&good[..good.len() - 1]),
            Err(FrameError::ShortNdp(good.len() - 1)),
            "cut inside the option"
        );
        let with = |i: usize, bytes: &[u8]| {
            let mut f = good.clone();
            f[i..i + bytes.len()].copy_from_slice(bytes);
            NdpPacket::parse(&f)
        };
        let not = |e: Result<NdpPacket, FrameError>| matches!(e, Err(FrameError::NotNeighbourDiscovery(_)));
        assert_eq!(with(12, &[0x08, 0x00]), Err(FrameError::NotIpv6(0x0800)));
        assert!(not(with(14, &[0x40])), "IPv4 inside");
        assert!(not(with(20, &[17])), "UDP");
        assert!(not(with(21, &[254])), "routed: hop limit 254");
        assert!(not(with(NDP_AT, &[128])), "an echo request");
        assert!(not(with(NDP_AT + 1, &[1])), "code 1");
        let mut zero_option = good.clone();
        zero_option[NDP_AT + 25] = 0;
        let sum = icmpv6_checksum(IP6, ALL_NODES, &zero_option[NDP_AT..]);
        zero_option[NDP_AT + 2..NDP_AT + 4].copy_from_slice(&sum.to_be_bytes());
        assert!(not(NdpPacket::parse(&zero_option)), "an option of length 0");
        assert!(matches!(
            with(NDP_AT + 2, &[0, 0]),
            Err(FrameError::Checksum { found: 0, .. })
        ));
        assert!(
            matches!(with(NDP_AT + 8, &[0xfe]), Err(FrameError::Checksum { .. })),
            "another target under the same checksum"
        );
    }

    #[test]
    fn ndp_conflicts_are_other_holders_and_other_claimants_of_the_address() {
        let answer = NdpPacket {
            message: NdpMessage::Advertisement {
                router: false,
                solicited: true,
                override_entry: true,
            },
            destination_ip: ALL_NODES,
            ..NdpPacket::announcement(OTHER, IP6)
        };
        assert_eq!(
            answer.conflict(IP6, MAC),
            Some(OTHER),
            "a holder answering our probe"
        );
        assert_eq!(
            NdpPacket::announcement(OTHER, IP6).conflict(IP6, MAC),
            Some(OTHER),
            "a holder announcing it"
        );
        assert_eq!(
            NdpPacket::probe(OTHER, IP6).conflict(IP6, MAC),
            Some(OTHER),
            "someone probing for it at the same time"
        );
        let router: Ipv6Addr = "fd00:192:0:2::1".parse().unwrap();
        let from_holder = NdpPacket {
            source_ip: IP6,
            target: router,
            link_layer: Some(OTHER),
            ..NdpPacket::probe(OTHER, router)
        };
        assert_eq!(
            from_holder.conflict(IP6, MAC),
            Some(OTHER),
            "a holder resolving a neighbour"
        );
        let relayed = NdpPacket {
            link_layer: Some(MacAddr([0x02, 0, 0, 0, 0, 0x99])),
            ..NdpPacket::announcement(OTHER, IP6)
        };
        assert_eq!(
            relayed.conflict(IP6, MAC),
            Some(MacAddr([0x02, 0, 0, 0, 0, 0x99])),
            "the holder is the link-layer address the message names"
        );

        assert_eq!(
            NdpPacket::probe(MAC, IP6).conflict(IP6, MAC),
            None,
            "our own probe"
        );
        assert_eq!(NdpPacket::announcement(MAC, IP6).conflict(IP6, MAC), None);
        let other_ip: Ipv6Addr = "fd00:192:0:2::151".parse().unwrap();
        for packet in [
            NdpPacket::probe(OTHER, other_ip),
            NdpPacket::announcement(OTHER, other_ip),
        ] {
            assert_eq!(packet.conflict(IP6, MAC), None, "another address: {packet:?}");
        }
        let router_asking = NdpPacket {
            source_ip: router,
            link_layer: Some(OTHER),
            ..NdpPacket::probe(OTHER, IP6)
        };
        assert_eq!(
            router_asking.conflict(IP6, MAC),
            None,
            "resolving the address is not holding it"
        );
    }

    #[test]
    fn the_socket_filter_takes_solicitations_and_advertisements_only() {
        // A small interpreter of the three instructions the filter uses.
        let run = |frame: &[u8]| -> u32 {
            let mut pc = 0usize;
            let mut a = 0u32;
            for _ in 0..NDP_FILTER.len() {
                let (code, jt, jf, k) = NDP_FILTER[pc];
                match code {
                    BPF_LOAD_BYTE => a = frame.get(k as usize).copied().map_or(0, u32::from),
                    BPF_JUMP_EQUAL => pc += usize::from(if a == k { jt } else { jf }),
                    BPF_RETURN => return k,
                    other => panic!("instruction {other:#x}"),
                }
                pc += 1;
            }
            panic!("ran off the end")
        };
        let take = RECEIVE_BUFFER as u32;
        assert_eq!(run(&NdpPacket::probe(MAC, IP6).to_frame()), take);
        assert_eq!(run(&NdpPacket::announcement(MAC, IP6).to_frame()), take);
        let mut echo = NdpPacket::announcement(MAC, IP6).to_frame();
        echo[NDP_AT] = 128;
        assert_eq!(run(&echo), 0, "an echo request");
        let mut udp = NdpPacket::announcement(MAC, IP6).to_frame();
        udp[20] = 17;
        assert_eq!(run(&udp), 0, "UDP");
    }

    #[test]
    fn ipv6_addresses_are_added_without_the_kernels_dad_and_deprecated() {
        let v6 = IpAddr::V6(IP6);
        let m = claim_message(7, v6);
        assert_eq!(
            (m.header.prefix_len, m.header.family),
            (128, AddressFamily::Inet6)
        );
        assert!(
            m.attributes
                .contains(&AddressAttribute::Flags(AddressFlags::Nodad))
        );
        let lifetimes = m
            .attributes
            .iter()
            .find_map(|a| match a {
                AddressAttribute::CacheInfo(c) => Some((c.ifa_preferred, c.ifa_valid)),
                _ => None,
            })
            .expect("lifetimes");
        assert_eq!(lifetimes, (0, u32::MAX), "deprecated at once, valid for ever");
        let v4 = claim_message(7, IpAddr::V4(IP));
        assert!(
            !v4.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Flags(_) | AddressAttribute::CacheInfo(_))),
            "IPv4 as before"
        );
    }
}
