//! Rust mirrors of the map keys and values in `ebpf/sluice.h`, and the names of the maps.
//!
//! Every type is `#[repr(C)]` with fixed-width fields and explicit padding, exactly like its C
//! twin; `tests::layouts_match_the_object` parses the compiled object and checks every map's key
//! and value size against these types.
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

/// Per-CPU packets seen by `sluice_from_pod`, by pod interface ifindex modulo [`SEEN_SLOTS`].
pub const SEEN: &str = "sluice_seen";
/// `SLUICE_SEEN_SLOTS`.
pub const SEEN_SLOTS: u32 = 4096;

/// Every map of the object, in the order `bpf` subcommands open them.
pub const ALL_MAPS: [&str; 14] = [
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
];

/// Default capacity of the destinations map (no memory is taken until used).
pub const DEFAULT_POLICY_MAP_MAX: u32 = 1_048_576;
/// Default capacity of the sources map.
pub const DEFAULT_SOURCE_MAP_MAX: u32 = 65_536;
/// `SLUICE_SOURCE_TARGETS`: targets per source entry.
pub const SOURCE_TARGETS: usize = 8;

/// `sluice_destination_v4.kind`: do what the source's target says.
pub const DEST_TARGET: u32 = 1;
/// `sluice_destination_v4.kind`: excluded CIDR, normal path.
pub const DEST_EXCLUDED: u32 = 2;
/// `sluice_destination_v4.kind`: no room for the target in the source entry: drop.
pub const DEST_DROP: u32 = 3;

/// `kind`: steer to `gateway_ip`.
pub const KIND_GATEWAY: u32 = 1;
/// `kind`: no usable gateway, `failurePolicy: Drop`.
pub const KIND_NONE: u32 = 2;
/// `kind`: no usable gateway, `failurePolicy: Fallback`.
pub const KIND_FALLBACK: u32 = 3;
/// `kind`: excluded CIDR.
pub const KIND_EXCLUDED: u32 = 4;

/// `flags`: the gateway is this node.
pub const F_LOCAL_GATEWAY: u32 = 1;

/// `Config::flags`: skip the check that a pod's source address belongs to its interface.
pub const CFG_NO_SOURCE_CHECK: u32 = 1;

/// Tunnel peer flag: the node sends requests of its pods to this gateway.
pub const PEER_SOURCE: u32 = 1;
/// Tunnel peer flag: the node is a gateway of this node's pods (sends their replies).
pub const PEER_GATEWAY: u32 = 2;

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

/// Counter indexes of `sluice_counters`, with their metric/CLI names (`enum sluice_counter_index`).
pub const COUNTER_NAMES: [(u32, &str); 20] = [
    (0, "steered"),
    (1, "local_egress"),
    (2, "egressed"),
    (3, "excluded"),
    (4, "fallback"),
    (5, "dropped_no_gateway"),
    (6, "dropped_no_egress_ip"),
    (7, "reply_encapsulated"),
    (8, "reply_delivered"),
    (9, "in_cluster"),
    (10, "dropped_unknown_tunnel"),
    (11, "dropped_no_reply_route"),
    (12, "errors"),
    (13, "dropped_foreign_tunnel"),
    (14, "dropped_spoofed_source"),
    (15, "dropped_pod_to_tunnel_port"),
    (16, "mss_clamped"),
    (17, "icmp_error_delivered"),
    (18, "dropped_undecided_pod"),
    (19, "dropped_too_many_policies"),
];

/// Index of the drop counter for `failurePolicy: Drop`.
pub const CTR_DROP_NO_GATEWAY: u32 = 5;

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

/// The largest MSS of a TCP segment over IPv4 that crosses the tunnel unfragmented on an
/// underlay of `mtu` bytes (minus the inner IPv4 and TCP headers, 40 bytes).
pub fn tunnel_mss(mtu: u32) -> u32 {
    mtu.saturating_sub(TUNNEL_OVERHEAD + 40)
}

/// Capacity of `sluice_counters` (`SLUICE_CTR_MAX`).
pub const COUNTERS_MAX: u32 = 32;

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

/// Length of [`PolicyName::name`] (`SLUICE_POLICY_NAME_LEN`).
pub const POLICY_NAME_LEN: usize = 256;

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
unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for Counter {}
unsafe impl aya::Pod for ReplyV4 {}
unsafe impl aya::Pod for PolicyName {}

/// Every map with the key and value sizes this build's types have: what a pinned map must match
/// to be adopted.
pub fn layouts() -> [(&'static str, usize, usize); 14] {
    use std::mem::size_of;
    [
        (SOURCES_V4, size_of::<u32>(), size_of::<SourceV4>()),
        (
            DESTINATIONS_V4,
            size_of::<DestinationKeyV4>(),
            size_of::<DestinationV4>(),
        ),
        (HELD_SLOTS_V4, size_of::<SlotKeyV4>(), size_of::<u32>()),
        (CLUSTER_V4, size_of::<CidrKeyV4>(), size_of::<u32>()),
        (CONFIG, size_of::<u32>(), size_of::<Config>()),
        (COUNTERS, size_of::<u32>(), size_of::<Counter>()),
        (POLICY_STATS, size_of::<u32>(), size_of::<Counter>()),
        (REPLY_V4, size_of::<u32>(), size_of::<ReplyV4>()),
        (POLICY_NAMES, size_of::<u32>(), size_of::<PolicyName>()),
        (TUNNEL_PEERS_V4, size_of::<u32>(), size_of::<u32>()),
        (BRIDGE_PORTS, size_of::<u32>(), size_of::<u32>()),
        (SEEN, size_of::<u32>(), size_of::<u64>()),
        (GUARDED_V4, size_of::<CidrKeyV4>(), size_of::<u32>()),
        (DECIDED_PODS_V4, size_of::<u32>(), size_of::<u32>()),
    ]
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
    use std::mem::size_of;

    use aya::maps::lpm_trie::Key;

    use super::*;

    #[test]
    fn layouts_match_the_object() {
        let object = aya_obj::Object::parse(crate::datapath::OBJECT).expect("the compiled object parses");
        let expected = layouts();
        assert_eq!(
            object.maps.len(),
            expected.len(),
            "every map of the object is checked"
        );
        for (name, key, value) in expected {
            let map = object
                .maps
                .get(name)
                .unwrap_or_else(|| panic!("map {name} is in the object"));
            assert_eq!(map.key_size() as usize, key, "key size of {name}");
            assert_eq!(map.value_size() as usize, value, "value size of {name}");
        }
        // aya's LPM key wrapper must produce the same bytes as the C key.
        assert_eq!(
            size_of::<Key<DestinationAddrsV4>>(),
            size_of::<DestinationKeyV4>()
        );
        assert_eq!(size_of::<Key<u32>>(), size_of::<CidrKeyV4>());
    }

    #[test]
    fn counters_have_room_for_every_outcome() {
        let object = aya_obj::Object::parse(crate::datapath::OBJECT).unwrap();
        assert_eq!(object.maps[COUNTERS].max_entries(), COUNTERS_MAX);
        assert!(COUNTER_NAMES.iter().all(|(i, _)| *i < COUNTERS_MAX));
        // The header's enum and the names agree (each index once, in order).
        let header = include_str!("../../ebpf/sluice.h");
        let indexes: Vec<u32> = header
            .lines()
            .filter_map(|l| l.trim().strip_prefix("SLUICE_CTR_"))
            .filter(|l| !l.starts_with("MAX"))
            .filter_map(|l| l.split('=').nth(1)?.trim().trim_end_matches(',').parse().ok())
            .collect();
        let named: Vec<u32> = COUNTER_NAMES.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, named);
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

    /// The values of the header's constants, not only the sizes of its structs.
    #[test]
    fn constants_match_the_header() {
        let header = include_str!("../../ebpf/sluice.h");
        let define = |name: &str| -> u32 {
            let line = header
                .lines()
                .find_map(|l| l.strip_prefix("#define ")?.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{name} is defined in sluice.h"));
            let value = line.split("/*").next().unwrap().trim();
            let value = value.trim_start_matches('(').trim_end_matches(')');
            match value.split_once("<<") {
                Some((a, b)) => {
                    a.trim().trim_end_matches('u').parse::<u32>().unwrap() << b.trim().parse::<u32>().unwrap()
                }
                None => value.parse().unwrap_or_else(|_| panic!("{name} = {value}")),
            }
        };
        for (name, ours) in [
            ("SLUICE_KIND_GATEWAY", KIND_GATEWAY),
            ("SLUICE_KIND_NONE", KIND_NONE),
            ("SLUICE_KIND_FALLBACK", KIND_FALLBACK),
            ("SLUICE_KIND_EXCLUDED", KIND_EXCLUDED),
            ("SLUICE_F_LOCAL_GATEWAY", F_LOCAL_GATEWAY),
            ("SLUICE_CFG_NO_SOURCE_CHECK", CFG_NO_SOURCE_CHECK),
            ("SLUICE_PEER_SOURCE", PEER_SOURCE),
            ("SLUICE_PEER_GATEWAY", PEER_GATEWAY),
            ("SLUICE_DEST_TARGET", DEST_TARGET),
            ("SLUICE_DEST_EXCLUDED", DEST_EXCLUDED),
            ("SLUICE_DEST_DROP", DEST_DROP),
            ("SLUICE_SOURCE_TARGETS", SOURCE_TARGETS as u32),
            ("SLUICE_SEEN_SLOTS", SEEN_SLOTS),
            ("SLUICE_POLICY_NAME_LEN", POLICY_NAME_LEN as u32),
        ] {
            assert_eq!(define(name), ours, "{name}");
        }
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
