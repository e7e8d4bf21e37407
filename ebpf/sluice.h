/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Sluice datapath: definitions shared by the eBPF programs and the shim (node-shim/src/maps.rs).
 * This header is the one source: node-shim/build.rs turns every numeric #define SLUICE_* and
 * every enum sluice_counter_index value into a Rust constant (write each on one line, as plain
 * numbers, (1u << n) or earlier SLUICE_* names; clang checks what it read). Every struct here is
 * a map key or value: all fields are fixed-width, naturally aligned, with explicit padding;
 * maps::tests compares each with its Rust twin field by field through the compiled object's BTF.
 */
#ifndef SLUICE_H
#define SLUICE_H

#include <linux/types.h>

/* --- Entry kinds (sluice_target_v4.kind) ------------------------------------------------- */
/* Steer to gateway_ip (this node when SLUICE_F_LOCAL_GATEWAY is set). */
#define SLUICE_KIND_GATEWAY 1
/* The policy has no usable gateway and failurePolicy Drop: drop. */
#define SLUICE_KIND_NONE 2
/* The policy has no usable gateway and failurePolicy Fallback: normal path. */
#define SLUICE_KIND_FALLBACK 3
/* Excluded CIDR: normal path (what a SLUICE_DEST_EXCLUDED destination means; never a target). */
#define SLUICE_KIND_EXCLUDED 4

/* --- Entry flags (sluice_target_v4.flags) ----------------------------------------------- */
/* The gateway is this node: egress here (mark for SNAT) instead of tunnelling. */
#define SLUICE_F_LOCAL_GATEWAY (1u << 0)

/* --- Packet marks ------------------------------------------------------------------------ */
/*
 * skb->mark: Sluice owns only the bits of sluice_config.mark_egress (the egress id, non-zero on
 * packets to SNAT here), .mark_tunnel ("arrived through the Sluice tunnel": its replies go back
 * into it) and .mark_reply (set by nftables from the ct mark: steers the reply into the tunnel
 * by policy routing). The shim chooses them (--mark-*), by default 0x000000ff, 0x1000 and
 * 0x2000: bits no common CNI or kube-proxy uses. Every other bit of the mark is left as it was.
 */

/* --- Counters (index into sluice_counters) ----------------------------------------------- */
enum sluice_counter_index {
	/* Source node: encapsulated to a remote gateway. */
	SLUICE_CTR_STEERED = 0,
	/* Source node: the gateway is this node, marked for SNAT. */
	SLUICE_CTR_LOCAL_EGRESS = 1,
	/* Gateway: decapsulated and marked for SNAT. */
	SLUICE_CTR_EGRESSED = 2,
	/* Excluded CIDR: normal path. */
	SLUICE_CTR_EXCLUDED = 3,
	/* No gateway, failurePolicy Fallback: normal path. */
	SLUICE_CTR_FALLBACK = 4,
	/* No gateway, failurePolicy Drop: dropped. */
	SLUICE_CTR_DROP_NO_GATEWAY = 5,
	/* Gateway entry without an egress IP: dropped. */
	SLUICE_CTR_DROP_NO_EGRESS_IP = 6,
	/* Gateway: reply encapsulated back to the pod's node. */
	SLUICE_CTR_REPLY_ENCAP = 7,
	/* Source node: reply from the tunnel delivered to the pod. */
	SLUICE_CTR_REPLY_DELIVERED = 8,
	/* Destination in a cluster CIDR: never steered. */
	SLUICE_CTR_IN_CLUSTER = 9,
	/* Tunnel traffic that no entry accounts for: dropped. */
	SLUICE_CTR_DROP_UNKNOWN_TUNNEL = 10,
	/* Gateway: a reply whose pod's node is unknown: dropped. */
	SLUICE_CTR_DROP_NO_REPLY_ROUTE = 11,
	/* Helper failures and missing configuration. */
	SLUICE_CTR_ERROR = 12,
	/*
	 * Tunnel packet with a foreign VNI, from an outer source that is no peer of this node, or
	 * for a (source, destination) whose entry names another sending node: dropped.
	 */
	SLUICE_CTR_DROP_FOREIGN_TUNNEL = 13,
	/* A pod's packet whose source address does not belong to the interface it came from. */
	SLUICE_CTR_DROP_SPOOFED_SOURCE = 14,
	/* A pod's UDP packet to the tunnel port (of any host): pods never speak the tunnel. */
	SLUICE_CTR_DROP_POD_TO_TUNNEL = 15,
	/* A steered TCP SYN (pod's node, either direction) whose MSS was lowered to fit the tunnel. */
	SLUICE_CTR_MSS_CLAMPED = 16,
	/* Source node: an ICMP error about a steered flow delivered to the pod. */
	SLUICE_CTR_ICMP_ERROR_DELIVERED = 17,
	/*
	 * A packet from a pod the plan has not decided on yet, to a destination a Drop policy
	 * guards: dropped until the plan covers the pod (it may be selected: never leak).
	 */
	SLUICE_CTR_DROP_UNDECIDED_POD = 18,
	/* A pod selected by more policies than its source entry has targets for: dropped. */
	SLUICE_CTR_DROP_TOO_MANY_POLICIES = 19,
	/*
	 * A tunnel packet whose outer and inner families the datapath does not pair (an IPv4 pod's
	 * packet over an IPv6 underlay): dropped.
	 */
	SLUICE_CTR_DROP_UNSUPPORTED_FAMILY = 20,
	/* Fence expired: an ARP packet whose sender IP is a managed address, dropped. */
	SLUICE_CTR_DROP_FENCED_ARP = 21,
	/* Fence expired: an IPv4 or IPv6 packet whose source is a managed address, dropped. */
	SLUICE_CTR_DROP_FENCED_SOURCE = 22,
	/*
	 * Source node: sent to the gateway its flow started on (pinned) rather than the one its
	 * entry names now (a planned change moves only new flows).
	 */
	SLUICE_CTR_PINNED = 23,
	/* Source node: a reply from the gateway its flow is pinned to, delivered to the pod. */
	SLUICE_CTR_PINNED_REPLY_DELIVERED = 24,
	/* Fence expired: a neighbour advertisement whose target is a managed address, dropped. */
	SLUICE_CTR_DROP_FENCED_ADVERTISEMENT = 25,
	SLUICE_CTR_MAX = 32,
};

/* --- Map layouts ------------------------------------------------------------------------- */

/*
 * The entries a node holds, (source pod, destination prefix) -> what to do, are stored so that
 * their size grows as pods + CIDRs, not pods x CIDRs:
 *
 *   sluice_sources_v4       pod IP -> its source group and its targets (hash)
 *   sluice_destinations_v4  (source group, destination prefix) -> which target (LPM trie)
 *
 * A source group is the set of destination rules a pod's entries share (in practice: the
 * policies selecting it). Pods selected by the same policies share one group, so a policy of
 * 1,000 CIDRs selecting 1,000 pods costs 1,000 trie entries and 1,000 source entries. What
 * differs per pod, the gateway it is assigned to, sits in the pod's own targets: the trie value
 * names the target by its position. One lookup more per packet than a (source, destination)
 * trie: the source hash.
 */

/* Distinct targets per source entry (a pod's policies share one when they send it the same way:
 * 60 policies through one gateway are one target). A pod with more has the destinations of the
 * rest programmed to drop (SLUICE_DEST_DROP), reported as entry errors. */
#define SLUICE_SOURCE_TARGETS 8

/* Where a pod's traffic to the destinations of one or more of its policies goes. Addresses in
 * network byte order; 0 = unset. */
struct sluice_target_v4 {
	__u32 kind;           /* SLUICE_KIND_* (GATEWAY, NONE or FALLBACK; 0 = unused slot) */
	__u32 flags;          /* SLUICE_F_* */
	__be32 gateway_ip;    /* underlay IP of the gateway node (kind GATEWAY) */
	__be32 egress_ip;     /* address to SNAT to (gateway node's own entries) */
	__u32 egress_id;      /* local gateway: the egress (address, interface) id the mark carries */
	/*
	 * LOCAL_GATEWAY entries of pods on other nodes: underlay IP of the pod's node, the only
	 * outer source tunnelled packets of this (source, destination) are accepted from. 0 = none.
	 */
	__be32 peer_ip;
};

/* Value of sluice_sources_v4 (hash keyed by the pod IP). */
struct sluice_source_v4 {
	__u32 group; /* key part of sluice_destinations_v4; never 0 */
	__u32 _pad;
	struct sluice_target_v4 targets[SLUICE_SOURCE_TARGETS];
};

/*
 * Key of sluice_destinations_v4 (LPM trie): prefixlen = 32 + destination prefix bits, so the
 * group is always matched exactly and the destination by longest prefix. Lookups use 64.
 */
struct sluice_destination_key_v4 {
	__u32 prefixlen;
	__u32 group;
	__be32 daddr;
};

/* sluice_destination_v4.kind */
/* Do what targets[target] of the source entry says. */
#define SLUICE_DEST_TARGET 1
/* Excluded CIDR of policy_id: normal path. */
#define SLUICE_DEST_EXCLUDED 2
/* No room for the target in the source entry: drop (fail closed). */
#define SLUICE_DEST_DROP 3

/* Value of sluice_destinations_v4. */
struct sluice_destination_v4 {
	__u32 kind;      /* SLUICE_DEST_* */
	__u32 policy_id;
	__u32 target;    /* index into sluice_source_v4.targets (kind TARGET) */
};

/*
 * Key of sluice_held_slots_v4 (hash; value: be32 underlay IP of the gateway filling the slot).
 * Which gateway fills which slot of which policy, for the entries this node holds: not read by
 * the datapath, kept here so that what the node holds tells a new operator leader who fills
 * which slot, even across a restart of the shim. gateway_slot = (gateway entry << 16 | slot) + 1.
 */
struct sluice_slot_key_v4 {
	__u32 policy_id;
	__u32 gateway_slot;
};

/* Key of sluice_cluster_v4 (LPM trie): in-cluster destinations, never steered. */
struct sluice_cidr_key_v4 {
	__u32 prefixlen;
	__be32 addr;
};

/* The single entry of sluice_config (array). */
struct sluice_config {
	__u32 tunnel_ifindex; /* Sluice's collect_md VXLAN device; 0 = not ready */
	__u32 vni;            /* VXLAN network identifier */
	__u32 tunnel_ttl;     /* outer TTL; 0 = 64 */
	__u32 tunnel_port;    /* UDP port of the tunnel (host order); pods may not send to it */
	__u32 flags;          /* SLUICE_CFG_* */
	__u32 tcp_mss_max;    /* largest TCP MSS that fits the tunnel unfragmented; 0 = no clamp */
	__u32 mark_egress;    /* mark bits of the egress id (contiguous) */
	__u32 mark_egress_shift; /* position of its lowest bit */
	__u32 mark_tunnel;    /* mark bit: arrived through the tunnel */
	__u32 mark_reply;     /* mark bit: a reply to send back into the tunnel (set by nftables) */
};

/* --- Configuration flags (sluice_config.flags) ------------------------------------------ */
/*
 * Do not check that a pod's source address belongs to the interface it arrived on (for CNIs
 * that route pod addresses through one shared device and enforce source addresses themselves).
 */
#define SLUICE_CFG_NO_SOURCE_CHECK (1u << 0)
/* Do not pin flows (sluice_flows_v4): every packet follows its entry (--flow-pinning off). */
#define SLUICE_CFG_NO_FLOW_PINNING (1u << 1)

/* --- Tunnel peer flags (values of sluice_tunnel_peers_v4) ------------------------------- */
/* The node sends requests of its pods to this gateway. */
#define SLUICE_PEER_SOURCE (1u << 0)
/* The node is a gateway of this node's pods: it sends their replies. */
#define SLUICE_PEER_GATEWAY (1u << 1)

/* Value of sluice_counters (per-CPU array) and sluice_policy_stats (per-CPU hash). */
struct sluice_counter {
	__u64 packets;
	__u64 bytes;
};

/*
 * sluice_seen (per-CPU array of __u64): packets sluice_from_pod saw, by pod interface ifindex
 * modulo SLUICE_SEEN_SLOTS. The shim compares it with each interface's received packets: an
 * interface that receives traffic Sluice never sees has a program ahead of Sluice's that
 * takes every packet (a CNI's TCX program returning "pass" or redirecting).
 */
#define SLUICE_SEEN_SLOTS 4096

/* Value of sluice_reply_v4 (LRU hash keyed by pod IP): where the pod lives. */
struct sluice_reply_v4 {
	__be32 node_ip; /* underlay IP of the pod's node (outer source of its tunnelled packets) */
	__u32 _pad;
};

/* Value of sluice_policy_names (hash keyed by policy id): for `sluice-shim bpf list`. */
#define SLUICE_POLICY_NAME_LEN 256
struct sluice_policy_name {
	char name[SLUICE_POLICY_NAME_LEN];
};

/* --- Pinned flows -------------------------------------------------------------------------- */
/*
 * On the pod's node, each TCP and UDP flow steered to a gateway is remembered with that gateway
 * (sluice_flows_v4, an LRU hash sized by the shim's --flow-map-max) at its first packet; a flow
 * of a pod on its own gateway node, which leaves from here, with this node's address and its
 * egress id. When a planned change gives the pod another gateway, the flow keeps going to the
 * one it started on while that gateway is pinnable (sluice_pinnable_v4: the operator still has
 * it hold the pod's entries; this node itself when the flow left from here, whose egress the
 * shim keeps meanwhile), and its replies from there are taken; new flows take the new gateway.
 * A flow whose gateway is no longer pinnable (failed, or its drain is over) follows its entry at
 * once. A pin ends with a TCP RST, a few seconds after a FIN, or idle for long (the timeouts
 * below). IPv6 flows are pinned the same way in sluice_flows_v6, whose values are those of
 * sluice_flows_v4: flows are pinned over an IPv4 underlay only (the gateway an IPv4 address), and
 * only TCP and UDP directly after the IPv6 header (no extension header).
 */
#define SLUICE_FLOW_IDLE_TCP_S 3600
#define SLUICE_FLOW_IDLE_CLOSING_S 10
#define SLUICE_FLOW_IDLE_UDP_S 120
/* A pin's last_seen_ns is refreshed at most this often (one map write per second per flow). */
#define SLUICE_FLOW_TOUCH_NS 1000000000

/* Capacity of sluice_pinnable_v4. */
#define SLUICE_PINNABLE_V4_MAX 4096

/* sluice_flow_v4.flags */
/* The pod sent a FIN: the pin ends SLUICE_FLOW_IDLE_CLOSING_S after the last packet. */
#define SLUICE_FLOW_CLOSING (1u << 0)

/* Key of sluice_flows_v4: the flow as the pod sends it. */
struct sluice_flow_key_v4 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 _pad[3];
};

/* Key of sluice_flows_v6: the flow as the pod sends it. */
struct sluice_flow_key_v6 {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 _pad[3];
};

/* Value of sluice_flows_v4 and sluice_flows_v6. */
struct sluice_flow_v4 {
	__be32 gateway_ip;    /* the gateway the flow started on (underlay IP) */
	__u32 policy_id;      /* of the entry that steered it: another policy's entry unpins it */
	__u64 last_seen_ns;   /* bpf_ktime_get_ns() of a recent packet */
	__u32 flags;          /* SLUICE_FLOW_* */
	__u32 egress_id;      /* a flow that left here (a pod on its own gateway node): its egress */
};

/* --- The fence of managed egress IPs ----------------------------------------------------- */
/*
 * Managed egress IPs are addresses the shim itself adds to an uplink, announces and moves to
 * another node on failover. A node whose shim died while the node lives on still holds them; the
 * datapath fences it on its own: the shim renews a deadline (sluice_fence_deadline, u64 in
 * bpf_ktime_get_ns() time, i.e. CLOCK_MONOTONIC; 0 = never armed) on every heartbeat, and once
 * it has passed sluice_fence, on the uplink's egress, drops this node's ARP packets whose sender
 * IP is a managed address and its IPv4 packets whose source is one (sluice_managed_v4), and its
 * neighbour advertisements whose target is a managed IPv6 address and its IPv6 packets whose
 * source is one (sluice_managed_v6).
 */

/* Capacity of sluice_managed_v4 and of sluice_managed_v6. */
#define SLUICE_MANAGED_V4_MAX 1024
#define SLUICE_MANAGED_V6_MAX 1024

/*
 * Value of sluice_managed_v4 (hash keyed by the managed address, network byte order) and of
 * sluice_managed_v6 (keyed by struct sluice_addr_v6).
 */
struct sluice_managed {
	__u32 ifindex; /* the interface the shim put the address on (the programs do not read it) */
	__u32 _pad;
};

/* --- IPv6 ------------------------------------------------------------------------------- */
/*
 * A pod's IPv6 traffic is steered like its IPv4 traffic, with one (pod, destination prefix)
 * trie, sluice_entries_v6, whose values carry the whole target (IPv6 does not have the additive
 * layout of IPv4 yet: its entries grow as pods x CIDRs). Underlay addresses (the gateway, the
 * pod's node, tunnel peers) are held as 16 bytes whatever their family: an IPv4 underlay address
 * a.b.c.d as ::ffff:a.b.c.d, so that IPv6 pods work over an IPv4 or an IPv6 underlay. The
 * in-cluster IPv6 CIDRs and the no-leak guard for new pods work as for IPv4.
 */

/* An IPv6 address (or an underlay address of either family, see above), as map keys hold it. */
struct sluice_addr_v6 {
	__u8 bytes[16];
};

/* Key of sluice_entries_v6 (LPM trie): prefixlen = 128 + destination prefix bits. */
struct sluice_entry_key_v6 {
	__u32 prefixlen;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* Capacity of sluice_entries_v6 (a plan with more IPv6 entries is refused whole). */
#define SLUICE_ENTRIES_V6_MAX 262144

/* Value of sluice_entries_v6: what the pod's traffic to the prefix does. */
struct sluice_entry_v6 {
	__u32 kind;                   /* SLUICE_KIND_* (EXCLUDED included) */
	__u32 flags;                  /* SLUICE_F_* */
	__u32 policy_id;
	__u32 egress_id;              /* local gateway: the egress id the mark carries */
	struct sluice_addr_v6 gateway; /* underlay address of the gateway node (kind GATEWAY) */
	struct sluice_addr_v6 egress_ip; /* local gateway: the IPv6 address to SNAT to; 0 = none */
	/*
	 * LOCAL_GATEWAY entries of pods on other nodes: underlay address of the pod's node, the only
	 * outer source tunnelled packets of this (source, destination) are accepted from. 0 = none.
	 */
	struct sluice_addr_v6 peer;
};

/* Key of sluice_cluster_v6 and sluice_guarded_v6 (LPM tries). */
struct sluice_cidr_key_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Value of sluice_reply_v6 (LRU hash keyed by the pod's IPv6 address): where the pod lives. */
struct sluice_reply_v6 {
	struct sluice_addr_v6 node; /* underlay address of the pod's node */
};

#endif /* SLUICE_H */
