//! The map keys and values of `ebpf/sluice.h` in Rust, the header's constants, and the names of
//! the maps.
//!
//! The header is the one source of both:
//!
//! - Constants are generated: `build.rs` reads every numeric `#define SLUICE_*` and every value of
//!   `enum sluice_counter_index` from the header (clang confirms each value it read) and writes
//!   them as Rust, included below under the C name without `SLUICE_` (`KIND_GATEWAY`,
//!   `CTR_ERROR`, ...), with [`COUNTER_NAMES`]. A value cannot drift; a constant renamed or
//!   removed in C fails the build wherever Rust uses it.
//! - Structs are written here by hand (`#[repr(C)]`, fixed-width fields, explicit padding) and
//!   checked against the BTF that the compiled object carries (it is built with `-g`):
//!   `tests::layouts_match_the_object` checks that every map's key and value are the types the
//!   shim uses for it, and `tests::structs_match_the_object_field_by_field` compares every such
//!   struct field by field (name, order, offset, size and type). Not bindgen: it would need
//!   libclang on every build machine and image for a large build dependency, and its output
//!   (C names, raw `c_char`, no `aya::Pod`, our derives and helpers) would be wrapped by hand
//!   anyway. The BTF is the object the kernel loads, compiled for the bpf target rather than the
//!   header parsed for the host, so checking against it is the stronger guarantee, for less
//!   machinery.
#![allow(
    unsafe_code,
    reason = "aya::Pod is an unsafe marker trait; every type here is plain data without padding"
)]

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Pod IP -> its source group and targets (hash).
pub const SOURCES_V4: &str = "sluice_sources_v4";
/// (source group, destination prefix) -> which target (LPM trie).
pub const DESTINATIONS_V4: &str = "sluice_destinations_v4";
/// (policy id, gateway slot) -> the gateway filling it, for the entries held (not read by the
/// programs: what the shim reports to a new operator leader).
pub const HELD_SLOTS_V4: &str = "sluice_held_slots_v4";
/// The LPM trie of in-cluster CIDRs, never steered.
pub const CLUSTER_V4: &str = "sluice_cluster_v4";
/// The one-entry configuration array.
pub const CONFIG: &str = "sluice_config";
/// Per-CPU counters by outcome.
pub const COUNTERS: &str = "sluice_counters";
/// Per-CPU counters by policy id.
pub const POLICY_STATS: &str = "sluice_policy_stats";
/// Gateway: pod IP -> the node it lives on (learned from tunnelled requests).
pub const REPLY_V4: &str = "sluice_reply_v4";
/// Policy id -> policy name, for `sluice-shim bpf list`.
pub const POLICY_NAMES: &str = "sluice_policy_names";
/// Underlay IP -> `PEER_*` flags: the nodes this node exchanges tunnel traffic with.
pub const TUNNEL_PEERS_V4: &str = "sluice_tunnel_peers_v4";
/// Pod interface ifindex -> ifindex of the bridge it is a port of.
pub const BRIDGE_PORTS: &str = "sluice_bridge_ports";

/// LPM trie of the destinations `failurePolicy: Drop` policies guard (the no-leak guard).
pub const GUARDED_V4: &str = "sluice_guarded_v4";
/// This node's pod IPs the plan has decided on, selected or not.
pub const DECIDED_PODS_V4: &str = "sluice_decided_pods_v4";

/// IPv6: (pod, destination prefix) -> what to do ([`EntryV6`], the whole target).
pub const ENTRIES_V6: &str = "sluice_entries_v6";
/// Gateway: pod IPv6 -> the underlay address of the node it lives on (learned from tunnelled
/// requests).
pub const REPLY_V6: &str = "sluice_reply_v6";
/// [`TUNNEL_PEERS_V4`] for peers reached over an IPv6 underlay.
pub const TUNNEL_PEERS_V6: &str = "sluice_tunnel_peers_v6";
/// IPv6 in-cluster CIDRs, never dropped.
pub const CLUSTER_V6: &str = "sluice_cluster_v6";
/// IPv6 destinations `failurePolicy: Drop` policies guard.
pub const GUARDED_V6: &str = "sluice_guarded_v6";
/// This node's pod IPv6 addresses the plan has decided on.
pub const DECIDED_PODS_V6: &str = "sluice_decided_pods_v6";

/// Per-CPU packets seen by `sluice_from_pod`, by pod interface ifindex modulo [`SEEN_SLOTS`].
pub const SEEN: &str = "sluice_seen";

/// Managed egress IP (network byte order) -> [`Managed`]: what `sluice_fence` drops once the
/// deadline has passed.
pub const MANAGED_V4: &str = "sluice_managed_v4";
/// [`MANAGED_V4`] for IPv6 ([`AddrV6`] -> [`Managed`]).
pub const MANAGED_V6: &str = "sluice_managed_v6";
/// The one-entry array holding the fence's deadline (ns of CLOCK_MONOTONIC; 0 = never armed).
pub const FENCE_DEADLINE: &str = "sluice_fence_deadline";
/// Pinned flows: [`FlowKeyV4`] -> [`FlowV4`] (LRU), written by the datapath.
pub const FLOWS_V4: &str = "sluice_flows_v4";
/// Pinned IPv6 flows: [`FlowKeyV6`] -> [`FlowV4`] (LRU; pinned over an IPv4 underlay only).
pub const FLOWS_V6: &str = "sluice_flows_v6";
/// The gateways a flow may stay pinned to (underlay IP, network byte order -> 1).
pub const PINNABLE_V4: &str = "sluice_pinnable_v4";

// Every `SLUICE_*` constant of `ebpf/sluice.h` (`SOURCE_TARGETS`, `DEST_*`, `KIND_*`,
// `F_LOCAL_GATEWAY`, `CFG_*`, `PEER_*`, `SEEN_SLOTS`, `POLICY_NAME_LEN`, the `CTR_*` counter
// indexes) and `COUNTER_NAMES`, written by build.rs.
include!(concat!(env!("OUT_DIR"), "/sluice_h.rs"));

/// Every map of the object, in the order `bpf` subcommands open them.
pub const ALL_MAPS: [&str; 26] = [
    SOURCES_V4,
    DESTINATIONS_V4,
    HELD_SLOTS_V4,
    CLUSTER_V4,
    CONFIG,
    COUNTERS,
    POLICY_STATS,
    REPLY_V4,
    POLICY_NAMES,
    TUNNEL_PEERS_V4,
    BRIDGE_PORTS,
    SEEN,
    GUARDED_V4,
    DECIDED_PODS_V4,
    ENTRIES_V6,
    CLUSTER_V6,
    GUARDED_V6,
    DECIDED_PODS_V6,
    REPLY_V6,
    TUNNEL_PEERS_V6,
    MANAGED_V4,
    MANAGED_V6,
    FENCE_DEADLINE,
    FLOWS_V4,
    FLOWS_V6,
    PINNABLE_V4,
];

/// Default capacity of the pinned flows map (`--flow-map-max`): an LRU, the least recently
/// used flow goes when it is full.
pub const DEFAULT_FLOW_MAP_MAX: u32 = 131_072;

/// Default capacity of the destinations map (no memory is taken until used).
pub const DEFAULT_POLICY_MAP_MAX: u32 = 1_048_576;
/// Default capacity of the sources map.
pub const DEFAULT_SOURCE_MAP_MAX: u32 = 65_536;

/// Largest policy id (16 bits: counters, names, status).
pub const MAX_POLICY_ID: u32 = 0xffff;

/// The bits of `skb->mark` (and the conntrack mark) Sluice uses; every other bit is left to
/// the CNI, kube-proxy and whoever else marks packets on the node.
///
/// The defaults avoid the bits in use by default elsewhere: Calico's mark mask (`0xffff0000`),
/// kube-proxy's masquerade and drop bits (`0x4000`, `0x8000`), Cilium's magic nibble
/// (`0x0f00`) and identity bits (`0xffff0000`), Flannel (none of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkLayout {
    /// Contiguous bits holding the egress id (non-zero on packets to SNAT on this node).
    pub egress: u32,
    /// One bit: arrived through the Sluice tunnel (its replies go back into it).
    pub tunnel: u32,
    /// One bit: a reply to steer back into the tunnel (set by nftables from the ct mark).
    pub reply: u32,
}

impl Default for MarkLayout {
    fn default() -> Self {
        MarkLayout {
            egress: 0x0000_00ff,
            tunnel: 0x0000_1000,
            reply: 0x0000_2000,
        }
    }
}

impl MarkLayout {
    /// A layout, if it can work: a contiguous, non-empty egress field, single bits for the
    /// tunnel and the reply, nothing shared.
    pub fn new(egress: u32, tunnel: u32, reply: u32) -> Result<Self, String> {
        let shift = egress.trailing_zeros();
        if egress == 0 || !(egress >> shift).wrapping_add(1).is_power_of_two() {
            return Err(format!(
                "the egress mark bits {egress:#x} must be one contiguous run of bits"
            ));
        }
        for (name, bit) in [("tunnel", tunnel), ("reply", reply)] {
            if bit.count_ones() != 1 {
                return Err(format!("the {name} mark {bit:#x} must be exactly one bit"));
            }
        }
        if egress & (tunnel | reply) != 0 || tunnel == reply {
            return Err(format!(
                "the mark bits overlap: egress {egress:#x}, tunnel {tunnel:#x}, reply {reply:#x}"
            ));
        }
        Ok(MarkLayout {
            egress,
            tunnel,
            reply,
        })
    }

    /// Position of the egress field's lowest bit.
    pub fn shift(&self) -> u32 {
        self.egress.trailing_zeros()
    }

    /// The largest egress id the field holds.
    pub fn max_egress_id(&self) -> u32 {
        self.egress >> self.shift()
    }

    /// The mark bits of egress `id`.
    pub fn egress_mark(&self, id: u32) -> u32 {
        (id << self.shift()) & self.egress
    }

    /// Every bit Sluice owns.
    pub fn ours(&self) -> u32 {
        self.egress | self.tunnel | self.reply
    }
}

/// One entry as users think of it, (exact source, destination prefix): what the datapath's
/// sources and destinations maps hold together, expanded (see [`crate::layout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKeyV4 {
    /// 32 + destination prefix length (the order an LPM trie sorts by).
    pub prefixlen: u32,
    /// Network byte order.
    pub saddr: u32,
    /// Network byte order.
    pub daddr: u32,
}

/// The value of an entry, (source, destination) -> what to do, as the shim computes it from the
/// plan and `bpf list` shows it; the maps hold it split ([`crate::layout`]). Kind
/// [`KIND_EXCLUDED`] stands for an excluded destination, kind 0 for one that drops for want of
/// room in its source entry. (Also the value layout of the single entries trie of older shims,
/// read once when upgrading.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct EntryValueV4 {
    pub kind: u32,
    pub flags: u32,
    /// Network byte order; 0 = unset.
    pub gateway_ip: u32,
    /// Network byte order; 0 = unset.
    pub egress_ip: u32,
    /// Local gateway entries: the egress (address, interface) id the packet mark carries.
    pub egress_id: u32,
    pub policy_id: u32,
    /// Network byte order; the only outer source accepted for this entry through the tunnel
    /// (local-gateway entries of other nodes' pods); 0 = none.
    pub peer_ip: u32,
    /// `GATEWAY` entries: [`encode_slot`] of the policy slot the gateway fills; 0 = unknown.
    pub gateway_slot: u32,
}

/// `struct sluice_target_v4`: where a pod's traffic to the destinations of one or more of its
/// policies goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct TargetV4 {
    pub kind: u32,
    pub flags: u32,
    /// Network byte order; 0 = unset.
    pub gateway_ip: u32,
    /// Network byte order; 0 = unset.
    pub egress_ip: u32,
    pub egress_id: u32,
    /// Network byte order; 0 = none.
    pub peer_ip: u32,
}

impl TargetV4 {
    /// The target part of an entry's value.
    pub fn of(entry: &EntryValueV4) -> Self {
        TargetV4 {
            kind: entry.kind,
            flags: entry.flags,
            gateway_ip: entry.gateway_ip,
            egress_ip: entry.egress_ip,
            egress_id: entry.egress_id,
            peer_ip: entry.peer_ip,
        }
    }

    /// The entry value of this target for `policy_id` (slot unknown).
    pub fn entry(&self, policy_id: u32) -> EntryValueV4 {
        EntryValueV4 {
            kind: self.kind,
            flags: self.flags,
            gateway_ip: self.gateway_ip,
            egress_ip: self.egress_ip,
            egress_id: self.egress_id,
            policy_id,
            peer_ip: self.peer_ip,
            gateway_slot: 0,
        }
    }
}

/// Key of `sluice_held_slots_v4` (`struct sluice_slot_key_v4`); the value is the gateway's
/// underlay IP (network byte order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct SlotKeyV4 {
    pub policy_id: u32,
    /// [`encode_slot`].
    pub gateway_slot: u32,
}

/// Value of `sluice_sources_v4` (`struct sluice_source_v4`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct SourceV4 {
    /// The source group (never 0).
    pub group: u32,
    pub _pad: u32,
    /// By position, as the group's destinations name them; kind 0 = unused.
    pub targets: [TargetV4; SOURCE_TARGETS],
}

/// The data part of `struct sluice_destination_key_v4`, as aya's `lpm_trie::Key<K>` wants it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct DestinationAddrsV4 {
    pub group: u32,
    /// Network byte order.
    pub daddr: u32,
}

/// Full key of `sluice_destinations_v4` (`struct sluice_destination_key_v4`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct DestinationKeyV4 {
    /// 32 + destination prefix length: the group matches exactly.
    pub prefixlen: u32,
    pub group: u32,
    /// Network byte order.
    pub daddr: u32,
}

/// Value of `sluice_destinations_v4` (`struct sluice_destination_v4`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct DestinationV4 {
    /// `DEST_*`.
    pub kind: u32,
    pub policy_id: u32,
    /// Index into [`SourceV4::targets`] (kind [`DEST_TARGET`]).
    pub target: u32,
}

/// `(entry << 16 | slot) + 1`, or 0 when either does not fit.
pub fn encode_slot(entry: u32, slot: u32) -> u32 {
    if entry < 0x8000 && slot <= 0xffff {
        ((entry << 16) | slot) + 1
    } else {
        0
    }
}

/// The inverse of [`encode_slot`]: `(entry, slot)`, or `None` for 0.
pub fn decode_slot(raw: u32) -> Option<(u32, u32)> {
    let v = raw.checked_sub(1)?;
    Some((v >> 16, v & 0xffff))
}

/// Key of `sluice_cluster_v4` (`struct sluice_cidr_key_v4`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct CidrKeyV4 {
    pub prefixlen: u32,
    /// Network byte order.
    pub addr: u32,
}

/// `struct sluice_addr_v6`: an IPv6 address as map keys hold it, or an underlay address of
/// either family (an IPv4 one as `::ffff:a.b.c.d`, [`AddrV6::underlay`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct AddrV6 {
    pub bytes: [u8; 16],
}

impl AddrV6 {
    /// The map form of an underlay address: IPv6 as is, IPv4 as `::ffff:a.b.c.d`.
    pub fn underlay(ip: std::net::IpAddr) -> Self {
        let v6 = match ip {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        };
        AddrV6 { bytes: v6.octets() }
    }

    /// Back from [`AddrV6::underlay`] (all zero: none).
    pub fn to_underlay(self) -> Option<std::net::IpAddr> {
        let v6 = std::net::Ipv6Addr::from(self.bytes);
        if v6.is_unspecified() {
            return None;
        }
        Some(match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(v6),
        })
    }
}

impl From<std::net::Ipv6Addr> for AddrV6 {
    fn from(ip: std::net::Ipv6Addr) -> Self {
        AddrV6 { bytes: ip.octets() }
    }
}

/// Data of `struct sluice_entry_key_v6` after `prefixlen` (aya's `lpm_trie::Key<K>` adds it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct EntryAddrsV6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// Full key of `sluice_entries_v6` (`struct sluice_entry_key_v6`): prefixlen = 128 +
/// destination prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct EntryKeyV6 {
    pub prefixlen: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl EntryKeyV6 {
    /// The key of (exact `source`, `destination` prefix).
    pub fn new(source: std::net::Ipv6Addr, destination: ipnet::Ipv6Net) -> Self {
        let destination = destination.trunc();
        EntryKeyV6 {
            prefixlen: 128 + u32::from(destination.prefix_len()),
            saddr: source.octets(),
            daddr: destination.network().octets(),
        }
    }

    /// The aya LPM key.
    pub fn lpm(&self) -> aya::maps::lpm_trie::Key<EntryAddrsV6> {
        aya::maps::lpm_trie::Key::new(
            self.prefixlen,
            EntryAddrsV6 {
                saddr: self.saddr,
                daddr: self.daddr,
            },
        )
    }

    /// Back from the aya LPM key.
    pub fn from_lpm(key: &aya::maps::lpm_trie::Key<EntryAddrsV6>) -> Self {
        let data = key.data();
        EntryKeyV6 {
            prefixlen: key.prefix_len(),
            saddr: data.saddr,
            daddr: data.daddr,
        }
    }
}

/// Value of `sluice_entries_v6` (`struct sluice_entry_v6`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct EntryV6 {
    /// `KIND_*` (excluded included).
    pub kind: u32,
    /// `F_*`.
    pub flags: u32,
    pub policy_id: u32,
    /// Local gateway: the egress id the mark carries.
    pub egress_id: u32,
    /// Underlay address of the gateway ([`AddrV6::underlay`]).
    pub gateway: AddrV6,
    /// Local gateway: the IPv6 address to SNAT to (zero: none, the datapath drops).
    pub egress_ip: AddrV6,
    /// Local gateway, pods of other nodes: their node's underlay address (zero: none).
    pub peer: AddrV6,
}

/// Value of `sluice_reply_v6` (`struct sluice_reply_v6`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ReplyV6 {
    pub node: AddrV6,
}

/// Key of `sluice_cluster_v6` and `sluice_guarded_v6` (`struct sluice_cidr_key_v6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct CidrKeyV6 {
    pub prefixlen: u32,
    pub addr: [u8; 16],
}

/// Value of `sluice_config` (`struct sluice_config`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Config {
    pub tunnel_ifindex: u32,
    pub vni: u32,
    pub tunnel_ttl: u32,
    /// Host order.
    pub tunnel_port: u32,
    /// `CFG_*`.
    pub flags: u32,
    /// Largest TCP MSS that fits the tunnel unfragmented ([`tunnel_mss`]); 0 = no clamp.
    pub tcp_mss_max: u32,
    /// [`MarkLayout`].
    pub mark_egress: u32,
    pub mark_egress_shift: u32,
    pub mark_tunnel: u32,
    pub mark_reply: u32,
}

/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
pub const TUNNEL_OVERHEAD: u32 = 50;
/// The same over an IPv6 underlay: its header is 20 bytes longer.
pub const TUNNEL_OVERHEAD_V6: u32 = TUNNEL_OVERHEAD + 20;

/// The largest MSS of a TCP segment over IPv4 that crosses the tunnel unfragmented on an
/// underlay of `mtu` bytes (minus the inner IPv4 and TCP headers, 40 bytes), over an IPv4 or
/// (`v6_underlay`) an IPv6 underlay. An IPv6 segment's is 20 bytes less (the datapath takes
/// them off).
pub fn tunnel_mss(mtu: u32, v6_underlay: bool) -> u32 {
    let overhead = if v6_underlay {
        TUNNEL_OVERHEAD_V6
    } else {
        TUNNEL_OVERHEAD
    };
    mtu.saturating_sub(overhead + 40)
}

/// Capacity of `sluice_counters`.
pub const COUNTERS_MAX: u32 = CTR_MAX;

/// Value of `sluice_counters` and `sluice_policy_stats` (`struct sluice_counter`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Value of `sluice_reply_v4` (`struct sluice_reply_v4`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ReplyV4 {
    /// Network byte order.
    pub node_ip: u32,
    pub _pad: u32,
}

/// Value of `sluice_managed_v4` and `sluice_managed_v6` (`struct sluice_managed`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Managed {
    /// The interface the address was put on: what a restarted shim reads to find it again.
    pub ifindex: u32,
    pub _pad: u32,
}

/// Key of `sluice_flows_v4` (`struct sluice_flow_key_v4`): a flow as the pod sends it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct FlowKeyV4 {
    /// Network byte order.
    pub saddr: u32,
    /// Network byte order.
    pub daddr: u32,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Key of `sluice_flows_v6` (`struct sluice_flow_key_v6`): an IPv6 flow as the pod sends it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct FlowKeyV6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Value of `sluice_flows_v4` and `sluice_flows_v6` (`struct sluice_flow_v4`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FlowV4 {
    /// The gateway the flow started on (network byte order).
    pub gateway_ip: u32,
    pub policy_id: u32,
    pub last_seen_ns: u64,
    /// `FLOW_*`.
    pub flags: u32,
    /// Non-zero: the flow left from this node (a pod on its own gateway node), by this egress.
    pub egress_id: u32,
}

/// Value of `sluice_policy_names` (`struct sluice_policy_name`): NUL-padded UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct PolicyName {
    pub name: [u8; POLICY_NAME_LEN],
}

unsafe impl aya::Pod for EntryValueV4 {}
unsafe impl aya::Pod for TargetV4 {}
unsafe impl aya::Pod for SlotKeyV4 {}
unsafe impl aya::Pod for SourceV4 {}
unsafe impl aya::Pod for DestinationAddrsV4 {}
unsafe impl aya::Pod for DestinationKeyV4 {}
unsafe impl aya::Pod for DestinationV4 {}
unsafe impl aya::Pod for CidrKeyV4 {}
unsafe impl aya::Pod for AddrV6 {}
unsafe impl aya::Pod for EntryAddrsV6 {}
unsafe impl aya::Pod for EntryKeyV6 {}
unsafe impl aya::Pod for EntryV6 {}
unsafe impl aya::Pod for ReplyV6 {}
unsafe impl aya::Pod for CidrKeyV6 {}
unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for Counter {}
unsafe impl aya::Pod for ReplyV4 {}
unsafe impl aya::Pod for PolicyName {}
unsafe impl aya::Pod for Managed {}
unsafe impl aya::Pod for FlowKeyV4 {}
unsafe impl aya::Pod for FlowKeyV6 {}
unsafe impl aya::Pod for FlowV4 {}

/// A map's key or value type as this build has it.
#[derive(Clone, Copy)]
struct TypeLayout {
    size: usize,
    /// What the tests compare with the object's BTF.
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the tests"))]
    type_name: fn() -> &'static str,
}

impl TypeLayout {
    const fn of<T>() -> Self {
        TypeLayout {
            size: std::mem::size_of::<T>(),
            type_name: std::any::type_name::<T>,
        }
    }
}

/// Every map with its key and value types (`tests::layouts_match_the_object` checks them against
/// the object, sizes and BTF types).
const MAP_TYPES: [(&str, TypeLayout, TypeLayout); 26] = [
    (SOURCES_V4, TypeLayout::of::<u32>(), TypeLayout::of::<SourceV4>()),
    (
        DESTINATIONS_V4,
        TypeLayout::of::<DestinationKeyV4>(),
        TypeLayout::of::<DestinationV4>(),
    ),
    (
        HELD_SLOTS_V4,
        TypeLayout::of::<SlotKeyV4>(),
        TypeLayout::of::<u32>(),
    ),
    (CLUSTER_V4, TypeLayout::of::<CidrKeyV4>(), TypeLayout::of::<u32>()),
    (CONFIG, TypeLayout::of::<u32>(), TypeLayout::of::<Config>()),
    (COUNTERS, TypeLayout::of::<u32>(), TypeLayout::of::<Counter>()),
    (POLICY_STATS, TypeLayout::of::<u32>(), TypeLayout::of::<Counter>()),
    (REPLY_V4, TypeLayout::of::<u32>(), TypeLayout::of::<ReplyV4>()),
    (
        POLICY_NAMES,
        TypeLayout::of::<u32>(),
        TypeLayout::of::<PolicyName>(),
    ),
    (TUNNEL_PEERS_V4, TypeLayout::of::<u32>(), TypeLayout::of::<u32>()),
    (BRIDGE_PORTS, TypeLayout::of::<u32>(), TypeLayout::of::<u32>()),
    (SEEN, TypeLayout::of::<u32>(), TypeLayout::of::<u64>()),
    (GUARDED_V4, TypeLayout::of::<CidrKeyV4>(), TypeLayout::of::<u32>()),
    (DECIDED_PODS_V4, TypeLayout::of::<u32>(), TypeLayout::of::<u32>()),
    (
        ENTRIES_V6,
        TypeLayout::of::<EntryKeyV6>(),
        TypeLayout::of::<EntryV6>(),
    ),
    (CLUSTER_V6, TypeLayout::of::<CidrKeyV6>(), TypeLayout::of::<u32>()),
    (GUARDED_V6, TypeLayout::of::<CidrKeyV6>(), TypeLayout::of::<u32>()),
    (
        DECIDED_PODS_V6,
        TypeLayout::of::<AddrV6>(),
        TypeLayout::of::<u32>(),
    ),
    (REPLY_V6, TypeLayout::of::<AddrV6>(), TypeLayout::of::<ReplyV6>()),
    (
        TUNNEL_PEERS_V6,
        TypeLayout::of::<AddrV6>(),
        TypeLayout::of::<u32>(),
    ),
    (MANAGED_V4, TypeLayout::of::<u32>(), TypeLayout::of::<Managed>()),
    (
        MANAGED_V6,
        TypeLayout::of::<AddrV6>(),
        TypeLayout::of::<Managed>(),
    ),
    (FENCE_DEADLINE, TypeLayout::of::<u32>(), TypeLayout::of::<u64>()),
    (
        FLOWS_V4,
        TypeLayout::of::<FlowKeyV4>(),
        TypeLayout::of::<FlowV4>(),
    ),
    (
        FLOWS_V6,
        TypeLayout::of::<FlowKeyV6>(),
        TypeLayout::of::<FlowV4>(),
    ),
    (PINNABLE_V4, TypeLayout::of::<u32>(), TypeLayout::of::<u32>()),
];

/// Every map with the key and value sizes this build's types have: what a pinned map must match
/// to be adopted.
pub fn layouts() -> [(&'static str, usize, usize); 26] {
    MAP_TYPES.map(|(name, key, value)| (name, key.size, value.size))
}

/// An IPv4 address in the network byte order the maps hold, as a native `u32`.
pub fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The inverse of [`be`].
pub fn from_be(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

impl PolicyKeyV4 {
    /// The key of (exact `source`, `destination` prefix).
    pub fn new(source: Ipv4Addr, destination: Ipv4Net) -> Self {
        let destination = destination.trunc();
        PolicyKeyV4 {
            prefixlen: 32 + u32::from(destination.prefix_len()),
            saddr: be(source),
            daddr: be(destination.network()),
        }
    }

    /// The source address.
    pub fn source(&self) -> Ipv4Addr {
        from_be(self.saddr)
    }

    /// The destination prefix.
    pub fn destination(&self) -> Ipv4Net {
        let len = self.prefixlen.saturating_sub(32).min(32) as u8;
        Ipv4Net::new(from_be(self.daddr), len).expect("prefix length clamped to 32")
    }
}

impl DestinationKeyV4 {
    /// The key of `destination` in `group`.
    pub fn new(group: u32, destination: Ipv4Net) -> Self {
        let destination = destination.trunc();
        DestinationKeyV4 {
            prefixlen: 32 + u32::from(destination.prefix_len()),
            group,
            daddr: be(destination.network()),
        }
    }

    /// The destination prefix.
    pub fn destination(&self) -> Ipv4Net {
        let len = self.prefixlen.saturating_sub(32).min(32) as u8;
        Ipv4Net::new(from_be(self.daddr), len).expect("prefix length clamped to 32")
    }

    /// The aya LPM key.
    pub fn lpm(&self) -> aya::maps::lpm_trie::Key<DestinationAddrsV4> {
        aya::maps::lpm_trie::Key::new(
            self.prefixlen,
            DestinationAddrsV4 {
                group: self.group,
                daddr: self.daddr,
            },
        )
    }

    /// Back from the aya LPM key.
    pub fn from_lpm(key: &aya::maps::lpm_trie::Key<DestinationAddrsV4>) -> Self {
        let data = key.data();
        DestinationKeyV4 {
            prefixlen: key.prefix_len(),
            group: data.group,
            daddr: data.daddr,
        }
    }
}

impl PolicyName {
    /// `name`, truncated to fit (on a character boundary).
    pub fn new(name: &str) -> Self {
        let mut out = [0u8; POLICY_NAME_LEN];
        let mut end = name.len().min(POLICY_NAME_LEN);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        out[..end].copy_from_slice(&name.as_bytes()[..end]);
        PolicyName { name: out }
    }

    /// The name as text.
    pub fn as_str(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(POLICY_NAME_LEN);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, mem::size_of};

    use aya::maps::lpm_trie::Key;

    use super::*;

    /// A struct as the compiler lays it out.
    struct RustLayout {
        name: String,
        size: usize,
        fields: Vec<FieldLayout>,
    }

    /// A field of a struct, in Rust or in C: its Rust type name is how the two are compared
    /// (BTF `unsigned int` is `u32`, `char` is `u8`, a struct is its Rust twin).
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct FieldLayout {
        name: String,
        offset: usize,
        size: usize,
        ty: String,
    }

    /// `rust_layout!(Type { every, field, in, order })`: a field left out or misnamed fails the
    /// comparison with the object (or does not compile).
    macro_rules! rust_layout {
        ($ty:ident { $($field:ident),* $(,)? }) => {
            RustLayout {
                name: stringify!($ty).to_owned(),
                size: size_of::<$ty>(),
                fields: vec![$(
                    field_layout(stringify!($field), std::mem::offset_of!($ty, $field), |s: &$ty| &s.$field)
                ),*],
            }
        };
    }

    fn field_layout<S, F>(name: &str, offset: usize, _field: fn(&S) -> &F) -> FieldLayout {
        FieldLayout {
            name: name.to_owned(),
            offset,
            size: size_of::<F>(),
            ty: short_type_name(std::any::type_name::<F>()),
        }
    }

    /// `[sluice_shim::maps::TargetV4; 8]` -> `[TargetV4; 8]`.
    fn short_type_name(full: &str) -> String {
        let mut name = full.to_owned();
        while let Some(at) = name.find("::") {
            let start = name[..at]
                .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                .map_or(0, |i| i + 1);
            name.replace_range(start..at + 2, "");
        }
        name
    }

    /// The object's BTF, read just far enough to compare map keys and values with the types here
    /// (aya-obj parses BTF but keeps its types to itself). Format: the kernel's
    /// Documentation/bpf/btf.rst.
    mod btf {
        use std::collections::HashMap;

        use super::FieldLayout;

        enum Type {
            Int {
                name: String,
                bits: u32,
                signed: bool,
            },
            Array {
                element: u32,
                len: u32,
            },
            Struct {
                name: String,
                size: u32,
                members: Vec<Member>,
            },
            /// typedef, const, volatile, restrict, type tag: the type it stands for.
            Alias(u32),
            /// What no map key or value of Sluice's is made of.
            Other {
                kind: u32,
            },
        }

        struct Member {
            name: String,
            ty: u32,
            bit_offset: u32,
            bitfield_bits: u32,
        }

        pub struct Btf {
            /// `types[id - 1]`; id 0 is void.
            types: Vec<Type>,
        }

        impl Btf {
            pub fn parse(bytes: &[u8]) -> Btf {
                let u16_at = |at: usize| u16::from_ne_bytes(bytes[at..at + 2].try_into().unwrap());
                let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
                let usize_at = |at: usize| u32_at(at) as usize;
                assert_eq!(u16_at(0), 0xeb9f, "BTF magic, in this machine's byte order");
                let header_len = usize_at(4);
                let types_start = header_len + usize_at(8);
                let types_end = types_start + usize_at(12);
                let strings = header_len + usize_at(16);
                let string = |offset: u32| {
                    let start = strings + offset as usize;
                    let len = bytes[start..].iter().position(|&b| b == 0).unwrap();
                    String::from_utf8(bytes[start..start + len].to_vec()).unwrap()
                };
                let mut types = Vec::new();
                let mut at = types_start;
                while at < types_end {
                    let (name, info, size_or_type) = (u32_at(at), u32_at(at + 4), u32_at(at + 8));
                    at += 12;
                    let vlen = (info & 0xffff) as usize;
                    let kind = (info >> 24) & 0x1f;
                    let kind_flag = info >> 31 == 1;
                    let (ty, extra) = match kind {
                        1 => {
                            let data = u32_at(at);
                            let int = Type::Int {
                                name: string(name),
                                bits: data & 0xff,
                                signed: (data >> 24) & 1 == 1,
                            };
                            (int, 4)
                        }
                        3 => (
                            Type::Array {
                                element: u32_at(at),
                                len: u32_at(at + 8),
                            },
                            12,
                        ),
                        4 => {
                            let members = (0..vlen)
                                .map(|i| {
                                    let m = at + 12 * i;
                                    let offset = u32_at(m + 8);
                                    Member {
                                        name: string(u32_at(m)),
                                        ty: u32_at(m + 4),
                                        bit_offset: if kind_flag { offset & 0xff_ffff } else { offset },
                                        bitfield_bits: if kind_flag { offset >> 24 } else { 0 },
                                    }
                                })
                                .collect();
                            let st = Type::Struct {
                                name: string(name),
                                size: size_or_type,
                                members,
                            };
                            (st, 12 * vlen)
                        }
                        8 | 9 | 10 | 11 | 18 => (Type::Alias(size_or_type), 0),
                        // Unions and the rest, skipped by their trailing data.
                        5 | 15 | 19 => (Type::Other { kind }, 12 * vlen),
                        6 | 13 => (Type::Other { kind }, 8 * vlen),
                        14 | 17 => (Type::Other { kind }, 4),
                        2 | 7 | 12 | 16 => (Type::Other { kind }, 0),
                        _ => panic!("BTF kind {kind} is unknown to this reader"),
                    };
                    at += extra;
                    types.push(ty);
                }
                assert_eq!(at, types_end, "BTF types end where the header says");
                Btf { types }
            }

            fn get(&self, mut id: u32) -> &Type {
                loop {
                    let ty = &self.types[id as usize - 1];
                    match ty {
                        Type::Alias(of) => id = *of,
                        _ => return ty,
                    }
                }
            }

            fn size(&self, id: u32) -> usize {
                match self.get(id) {
                    Type::Int { bits, .. } => *bits as usize / 8,
                    Type::Array { element, len } => self.size(*element) * *len as usize,
                    Type::Struct { size, .. } => *size as usize,
                    Type::Other { kind } => panic!("no size for BTF type {id} of kind {kind}"),
                    Type::Alias(_) => unreachable!("get resolves aliases"),
                }
            }

            /// The Rust type that stands for BTF type `id`; a struct is named by `twins`.
            pub fn rust_name(&self, id: u32, twins: &HashMap<String, String>) -> String {
                match self.get(id) {
                    // Text: bytes in Rust, whatever the sign of C's `char`.
                    Type::Int { name, bits: 8, .. } if name == "char" => "u8".to_owned(),
                    Type::Int { bits, signed, .. } => format!("{}{bits}", if *signed { 'i' } else { 'u' }),
                    Type::Array { element, len } => format!("[{}; {len}]", self.rust_name(*element, twins)),
                    Type::Struct { name, .. } => twins
                        .get(name)
                        .cloned()
                        .unwrap_or_else(|| format!("struct {name} (no Rust twin in c_twins)")),
                    Type::Other { kind } => format!("BTF type {id} of kind {kind}"),
                    Type::Alias(_) => unreachable!("get resolves aliases"),
                }
            }

            /// Size and members of `struct name`.
            pub fn struct_layout(
                &self,
                name: &str,
                twins: &HashMap<String, String>,
            ) -> (usize, Vec<FieldLayout>) {
                let found = self.types.iter().find_map(|t| match t {
                    Type::Struct {
                        name: n,
                        size,
                        members,
                    } if n == name => Some((*size, members)),
                    _ => None,
                });
                let (size, members) = found.unwrap_or_else(|| panic!("struct {name} is in the object's BTF"));
                let fields = members
                    .iter()
                    .map(|m| {
                        assert_eq!(
                            m.bitfield_bits, 0,
                            "{name}.{} is a bitfield: no Rust twin",
                            m.name
                        );
                        assert_eq!(m.bit_offset % 8, 0, "{name}.{} starts mid-byte", m.name);
                        FieldLayout {
                            name: m.name.clone(),
                            offset: m.bit_offset as usize / 8,
                            size: self.size(m.ty),
                            ty: self.rust_name(m.ty, twins),
                        }
                    })
                    .collect();
                (size as usize, fields)
            }
        }
    }

    fn object() -> aya_obj::Object {
        aya_obj::Object::parse(crate::datapath::OBJECT).expect("the compiled object parses")
    }

    fn object_btf(object: &aya_obj::Object) -> btf::Btf {
        let btf = object
            .btf
            .as_ref()
            .expect("the object is built with -g: it carries BTF");
        btf::Btf::parse(&btf.to_bytes())
    }

    /// Every struct a map holds, with its Rust twin as the compiler lays it out.
    fn c_twins() -> Vec<(&'static str, RustLayout)> {
        vec![
            (
                "sluice_target_v4",
                rust_layout!(TargetV4 {
                    kind,
                    flags,
                    gateway_ip,
                    egress_ip,
                    egress_id,
                    peer_ip
                }),
            ),
            (
                "sluice_source_v4",
                rust_layout!(SourceV4 { group, _pad, targets }),
            ),
            (
                "sluice_destination_key_v4",
                rust_layout!(DestinationKeyV4 {
                    prefixlen,
                    group,
                    daddr
                }),
            ),
            (
                "sluice_destination_v4",
                rust_layout!(DestinationV4 {
                    kind,
                    policy_id,
                    target
                }),
            ),
            (
                "sluice_slot_key_v4",
                rust_layout!(SlotKeyV4 {
                    policy_id,
                    gateway_slot
                }),
            ),
            ("sluice_cidr_key_v4", rust_layout!(CidrKeyV4 { prefixlen, addr })),
            ("sluice_addr_v6", rust_layout!(AddrV6 { bytes })),
            (
                "sluice_entry_key_v6",
                rust_layout!(EntryKeyV6 {
                    prefixlen,
                    saddr,
                    daddr
                }),
            ),
            (
                "sluice_entry_v6",
                rust_layout!(EntryV6 {
                    kind,
                    flags,
                    policy_id,
                    egress_id,
                    gateway,
                    egress_ip,
                    peer
                }),
            ),
            ("sluice_reply_v6", rust_layout!(ReplyV6 { node })),
            ("sluice_cidr_key_v6", rust_layout!(CidrKeyV6 { prefixlen, addr })),
            (
                "sluice_config",
                rust_layout!(Config {
                    tunnel_ifindex,
                    vni,
                    tunnel_ttl,
                    tunnel_port,
                    flags,
                    tcp_mss_max,
                    mark_egress,
                    mark_egress_shift,
                    mark_tunnel,
                    mark_reply
                }),
            ),
            ("sluice_counter", rust_layout!(Counter { packets, bytes })),
            ("sluice_reply_v4", rust_layout!(ReplyV4 { node_ip, _pad })),
            ("sluice_policy_name", rust_layout!(PolicyName { name })),
            ("sluice_managed", rust_layout!(Managed { ifindex, _pad })),
            (
                "sluice_flow_key_v4",
                rust_layout!(FlowKeyV4 {
                    saddr,
                    daddr,
                    sport,
                    dport,
                    protocol,
                    _pad
                }),
            ),
            (
                "sluice_flow_key_v6",
                rust_layout!(FlowKeyV6 {
                    saddr,
                    daddr,
                    sport,
                    dport,
                    protocol,
                    _pad
                }),
            ),
            (
                "sluice_flow_v4",
                rust_layout!(FlowV4 {
                    gateway_ip,
                    policy_id,
                    last_seen_ns,
                    flags,
                    egress_id
                }),
            ),
        ]
    }

    fn rust_names() -> HashMap<String, String> {
        c_twins()
            .into_iter()
            .map(|(c, rust)| (c.to_owned(), rust.name))
            .collect()
    }

    #[test]
    fn layouts_match_the_object() {
        let object = object();
        let btf = object_btf(&object);
        let rust_names = rust_names();
        assert_eq!(
            object.maps.len(),
            MAP_TYPES.len(),
            "every map of the object is checked"
        );
        for (name, key, value) in MAP_TYPES {
            let map = object
                .maps
                .get(name)
                .unwrap_or_else(|| panic!("map {name} is in the object"));
            assert_eq!(map.key_size() as usize, key.size, "key size of {name}");
            assert_eq!(map.value_size() as usize, value.size, "value size of {name}");
            let aya_obj::Map::Btf(map) = map else {
                panic!("{name} is declared with BTF (in SEC(\".maps\"))");
            };
            assert_eq!(
                btf.rust_name(map.def.btf_key_type_id, &rust_names),
                short_type_name((key.type_name)()),
                "key type of {name}"
            );
            assert_eq!(
                btf.rust_name(map.def.btf_value_type_id, &rust_names),
                short_type_name((value.type_name)()),
                "value type of {name}"
            );
        }
        // aya's LPM key wrapper must produce the same bytes as the C key.
        assert_eq!(
            size_of::<Key<DestinationAddrsV4>>(),
            size_of::<DestinationKeyV4>()
        );
        assert_eq!(size_of::<Key<u32>>(), size_of::<CidrKeyV4>());
    }

    /// Every struct a map holds, member by member: what `layouts_match_the_object` cannot see
    /// (two fields swapped, a field resized with its neighbour's padding, a signedness change).
    #[test]
    fn structs_match_the_object_field_by_field() {
        let btf = object_btf(&object());
        let rust_names = rust_names();
        for (c_name, rust) in c_twins() {
            let (size, fields) = btf.struct_layout(c_name, &rust_names);
            assert_eq!(fields, rust.fields, "fields of struct {c_name} and {}", rust.name);
            assert_eq!(size, rust.size, "size of struct {c_name} and {}", rust.name);
            // The header promises explicit padding: nothing the compiler adds behind our back.
            let mut end = 0;
            for field in &fields {
                assert_eq!(
                    field.offset, end,
                    "implicit padding before {c_name}.{}",
                    field.name
                );
                end += field.size;
            }
            assert_eq!(end, size, "implicit padding at the end of {c_name}");
        }
        // aya's LPM key is `prefixlen` followed by the data: the C key without its first field.
        let (_, key) = btf.struct_layout("sluice_destination_key_v4", &rust_names);
        assert_eq!(key[0].name, "prefixlen");
        let data: Vec<FieldLayout> = key[1..]
            .iter()
            .map(|f| FieldLayout {
                offset: f.offset - size_of::<u32>(),
                ..f.clone()
            })
            .collect();
        assert_eq!(data, rust_layout!(DestinationAddrsV4 { group, daddr }).fields);
    }

    /// The names follow the C enum (see build.rs) and are metric labels and CLI output users
    /// depend on: renaming a counter in C must be a visible decision, not a silent one.
    #[test]
    fn counter_names_are_the_documented_ones() {
        let doc = include_str!("../../docs/datapath.md");
        let listed = doc
            .split_once("packets/bytes by outcome (")
            .and_then(|(_, rest)| rest.split_once(')'))
            .expect("docs/datapath.md lists the counters of `bpf counters`")
            .0;
        let documented: Vec<&str> = listed.split(',').map(str::trim).collect();
        let ours: Vec<&str> = COUNTER_NAMES.iter().map(|(_, name)| *name).collect();
        assert_eq!(ours, documented);
        assert_eq!(
            COUNTER_NAMES[usize::try_from(CTR_ERROR).unwrap()],
            (CTR_ERROR, "errors")
        );
    }

    #[test]
    fn counters_have_room_for_every_outcome() {
        assert_eq!(object().maps[COUNTERS].max_entries(), COUNTERS_MAX);
        let mut indexes: Vec<u32> = COUNTER_NAMES.iter().map(|(i, _)| *i).collect();
        assert!(indexes.iter().all(|i| *i < COUNTERS_MAX));
        indexes.dedup();
        assert_eq!(indexes.len(), COUNTER_NAMES.len(), "each index once, in order");
        assert!(indexes.is_sorted());
    }

    #[test]
    fn entry_maps_are_sized_and_unpreallocated() {
        let object = aya_obj::Object::parse(crate::datapath::OBJECT).unwrap();
        for (name, max) in [
            (DESTINATIONS_V4, DEFAULT_POLICY_MAP_MAX),
            (SOURCES_V4, DEFAULT_SOURCE_MAP_MAX),
        ] {
            let map = &object.maps[name];
            assert_eq!(map.max_entries(), max, "{name}");
            assert_eq!(map.map_flags() & 1, 1, "{name}: BPF_F_NO_PREALLOC");
        }
    }

    #[test]
    fn flow_maps_are_sized_by_the_defaults_and_the_header() {
        let object = object();
        assert_eq!(object.maps[FLOWS_V4].max_entries(), DEFAULT_FLOW_MAP_MAX);
        assert_eq!(object.maps[FLOWS_V6].max_entries(), DEFAULT_FLOW_MAP_MAX);
        assert_eq!(object.maps[PINNABLE_V4].max_entries(), PINNABLE_V4_MAX);
    }

    #[test]
    fn fence_maps_are_sized_by_the_header() {
        let object = object();
        assert_eq!(object.maps[MANAGED_V4].max_entries(), MANAGED_V4_MAX);
        assert_eq!(object.maps[MANAGED_V6].max_entries(), MANAGED_V6_MAX);
        assert_eq!(object.maps[FENCE_DEADLINE].max_entries(), 1, "one deadline");
    }

    #[test]
    fn destination_key_round_trips() {
        let key = DestinationKeyV4::new(7, "203.0.113.7/24".parse().unwrap());
        assert_eq!(key.prefixlen, 56);
        assert_eq!(key.destination().to_string(), "203.0.113.0/24");
        assert_eq!(DestinationKeyV4::from_lpm(&key.lpm()), key);
        let entry = PolicyKeyV4::new("10.0.0.1".parse().unwrap(), "203.0.113.7/24".parse().unwrap());
        assert_eq!(entry.source().to_string(), "10.0.0.1");
        assert_eq!(entry.destination().to_string(), "203.0.113.0/24");
        assert_eq!(be("1.2.3.4".parse().unwrap()).to_ne_bytes(), [1, 2, 3, 4]);
    }

    #[test]
    fn mark_layouts_are_checked() {
        let d = MarkLayout::default();
        assert_eq!(MarkLayout::new(d.egress, d.tunnel, d.reply), Ok(d));
        assert_eq!(d.max_egress_id(), 255);
        let shifted = MarkLayout::new(0x00ff_0000, 0x1, 0x2).unwrap();
        assert_eq!((shifted.shift(), shifted.egress_mark(3)), (16, 0x0003_0000));
        assert!(MarkLayout::new(0, 1, 2).unwrap_err().contains("contiguous"));
        assert!(
            MarkLayout::new(0x0f0f, 0x1000, 0x2000)
                .unwrap_err()
                .contains("contiguous")
        );
        assert!(
            MarkLayout::new(0xff, 0x3000, 0x4000)
                .unwrap_err()
                .contains("one bit")
        );
        assert!(
            MarkLayout::new(0xff, 0x80, 0x4000)
                .unwrap_err()
                .contains("overlap")
        );
        // None of the defaults' bits are Calico's, kube-proxy's or Cilium's defaults.
        for theirs in [0xffff_0000u32, 0x4000, 0x8000, 0x0f00] {
            assert_eq!(d.ours() & theirs, 0, "{theirs:#x}");
        }
    }

    #[test]
    fn slots_round_trip_and_zero_means_unknown() {
        for (entry, slot) in [(0, 0), (3, 7), (0x7fff, 0xffff)] {
            assert_eq!(decode_slot(encode_slot(entry, slot)), Some((entry, slot)));
        }
        assert_eq!(encode_slot(0x8000, 0), 0);
        assert_eq!(decode_slot(0), None);
    }

    #[test]
    fn policy_names_truncate_on_char_boundaries() {
        assert_eq!(PolicyName::new("egress-a").as_str(), "egress-a");
        let long = "é".repeat(200);
        let name = PolicyName::new(&long).as_str();
        assert!(long.starts_with(&name) && name.len() <= POLICY_NAME_LEN);
    }
}
