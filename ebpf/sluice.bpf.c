/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Sluice eBPF datapath (TC programs). See docs/datapath.md for the packet path.
 *
 *   sluice_from_pod     TC ingress, host side of pod interfaces (veth*, cali*, lxc*, ...)
 *   sluice_from_tunnel  TC ingress, Sluice's collect_md VXLAN device (sluice-vx0)
 *   sluice_to_tunnel    TC egress,  Sluice's collect_md VXLAN device (sluice-vx0)
 *   sluice_fence        TC egress,  uplinks holding managed egress IPs
 *
 * Built by node-shim/build.rs: clang -O2 -g -target bpf -D__TARGET_ARCH_x86.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/socket.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "sluice.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* ICMP error types (linux/icmp.h pulls in libc headers a BPF build cannot use). */
#define SLUICE_ICMP_DEST_UNREACH 3
#define SLUICE_ICMP_TIME_EXCEEDED 11
#define SLUICE_ICMP_PARAMETERPROB 12

/* ICMPv6 error types (RFC 4443). */
#define SLUICE_ICMPV6_DEST_UNREACH 1
#define SLUICE_ICMPV6_PACKET_TOO_BIG 2
#define SLUICE_ICMPV6_TIME_EXCEEDED 3
#define SLUICE_ICMPV6_PARAMPROB 4

/* IPv6 extension headers walked to find the transport header (linux/in6.h's names). */
#define SLUICE_IPV6_HOPOPTS 0
#define SLUICE_IPV6_ROUTING 43
#define SLUICE_IPV6_FRAGMENT 44
#define SLUICE_IPV6_DSTOPTS 60

struct sluice_icmp_header {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 rest; /* unused, or the next-hop MTU of "fragmentation needed" */
};

/*
 * Verdict for "not ours / carry on": TC_ACT_UNSPEC is TCX_NEXT, so programs attached after ours
 * on the same hook (a CNI's) still run; with none left the packet passes. TC_ACT_OK would be
 * TCX_PASS and cut that chain short.
 */
#define SLUICE_PASS TC_ACT_UNSPEC

/* Maps are pinned by name under the shim's bpffs directory, so a restarted shim adopts them. */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, struct sluice_source_v4);
	__uint(max_entries, 65536); /* overridden at load time (--source-map-max) */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_sources_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct sluice_destination_key_v4);
	__type(value, struct sluice_destination_v4);
	__uint(max_entries, 1048576); /* overridden at load time (--policy-map-max) */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_destinations_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sluice_slot_key_v4);
	__type(value, __be32);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_held_slots_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct sluice_cidr_key_v4);
	__type(value, __u32);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_cluster_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct sluice_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct sluice_counter);
	__uint(max_entries, SLUICE_CTR_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, __u32);
	__type(value, struct sluice_counter);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_policy_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __be32);
	__type(value, struct sluice_reply_v4);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_reply_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct sluice_policy_name);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_policy_names SEC(".maps");

/*
 * The nodes this node exchanges tunnel traffic with (SLUICE_PEER_*), from its plan. The first
 * check on every tunnel packet: the VXLAN port is open to anyone who can reach the node.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_tunnel_peers_v4 SEC(".maps");

/*
 * Pod interface (ifindex) -> the bridge it is a port of, for CNIs that route pod addresses
 * through a bridge (the source check then also compares the frame's MAC with the neighbour's).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_bridge_ports SEC(".maps");

/*
 * The no-leak guard for new pods: destinations that failurePolicy Drop policies guard (LPM), and
 * the pod IPs of this node the plan has decided on, selected or not (hash). A pod the plan does
 * not know yet may not reach a guarded destination by the normal path.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct sluice_cidr_key_v4);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_guarded_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_decided_pods_v4 SEC(".maps");

/* IPv6 (see sluice.h). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct sluice_entry_key_v6);
	__type(value, struct sluice_entry_v6);
	__uint(max_entries, SLUICE_ENTRIES_V6_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_entries_v6 SEC(".maps");

/* Where IPv6 pods served here live (pod IPv6 -> its node's underlay address). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sluice_addr_v6);
	__type(value, struct sluice_reply_v6);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_reply_v6 SEC(".maps");

/* sluice_tunnel_peers_v4 for nodes reached over an IPv6 underlay. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sluice_addr_v6);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_tunnel_peers_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct sluice_cidr_key_v6);
	__type(value, __u32);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_cluster_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct sluice_cidr_key_v6);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_guarded_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sluice_addr_v6);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_decided_pods_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, SLUICE_SEEN_SLOTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_seen SEC(".maps");

/* Pinned flows (see sluice.h). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sluice_flow_key_v4);
	__type(value, struct sluice_flow_v4);
	__uint(max_entries, 131072); /* overridden at load time (--flow-map-max) */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_flows_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sluice_flow_key_v6);
	__type(value, struct sluice_flow_v4);
	__uint(max_entries, 131072); /* overridden at load time (--flow-map-max) */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_flows_v6 SEC(".maps");

/* The gateways a flow may stay pinned to (underlay IP -> 1), written by the shim. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, __u32);
	__uint(max_entries, SLUICE_PINNABLE_V4_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_pinnable_v4 SEC(".maps");

/* Managed egress IPs, and the deadline past which the node lets go of them (see sluice.h). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, struct sluice_managed);
	__uint(max_entries, SLUICE_MANAGED_V4_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_managed_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sluice_addr_v6);
	__type(value, struct sluice_managed);
	__uint(max_entries, SLUICE_MANAGED_V6_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_managed_v6 SEC(".maps");

/*
 * Its own map rather than a field of sluice_config: renewing every heartbeat is then one 8-byte
 * write that cannot race the shim rewriting the configuration, and the configuration's layout
 * stays as it is.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sluice_fence_deadline SEC(".maps");

static __always_inline void count(__u32 idx, __u32 len)
{
	struct sluice_counter *c = bpf_map_lookup_elem(&sluice_counters, &idx);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

static __always_inline void count_policy(__u32 policy_id, __u32 len)
{
	struct sluice_counter *c = bpf_map_lookup_elem(&sluice_policy_stats, &policy_id);

	if (!c) {
		struct sluice_counter zero = {};

		bpf_map_update_elem(&sluice_policy_stats, &policy_id, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&sluice_policy_stats, &policy_id);
		if (!c)
			return;
	}
	c->packets++;
	c->bytes += len;
}

/* Makes the first `need` bytes of the packet readable (pulling them into the linear part when
 * they are not); returns the start of the packet or NULL. */
static __always_inline void *readable(struct __sk_buff *skb, __u32 need)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + need > data_end) {
		if (skb->len < need || bpf_skb_pull_data(skb, need) < 0)
			return NULL;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + need > data_end)
			return NULL;
	}
	return data;
}

/* Makes the Ethernet + IPv4 headers readable; returns the IPv4 header or NULL. */
static __always_inline struct iphdr *ipv4_header(struct __sk_buff *skb)
{
	struct ethhdr *eth = readable(skb, sizeof(struct ethhdr) + sizeof(struct iphdr));

	if (!eth)
		return NULL;

	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return NULL;
	return (struct iphdr *)(eth + 1);
}

static __always_inline int in_cluster(__be32 daddr)
{
	struct sluice_cidr_key_v4 key = { .prefixlen = 32, .addr = daddr };

	return bpf_map_lookup_elem(&sluice_cluster_v4, &key) != NULL;
}

/* The address as two 64-bit words (no memcmp in BPF; the bytes may be unaligned). */
static __always_inline int addr_eq(const struct sluice_addr_v6 *a, const struct sluice_addr_v6 *b)
{
	__u64 a0, a1, b0, b1;

	__builtin_memcpy(&a0, a->bytes, 8);
	__builtin_memcpy(&a1, a->bytes + 8, 8);
	__builtin_memcpy(&b0, b->bytes, 8);
	__builtin_memcpy(&b1, b->bytes + 8, 8);
	return a0 == b0 && a1 == b1;
}

static __always_inline int addr_is_zero(const struct sluice_addr_v6 *a)
{
	__u64 a0, a1;

	__builtin_memcpy(&a0, a->bytes, 8);
	__builtin_memcpy(&a1, a->bytes + 8, 8);
	return (a0 | a1) == 0;
}

/* An underlay address holding an IPv4 address (::ffff:a.b.c.d): that address, else 0. */
static __always_inline __be32 underlay_v4(const struct sluice_addr_v6 *a)
{
	__u64 a0;
	__u32 a2;
	__be32 v4;

	__builtin_memcpy(&a0, a->bytes, 8);
	__builtin_memcpy(&a2, a->bytes + 8, 4);
	__builtin_memcpy(&v4, a->bytes + 12, 4);
	return (a0 == 0 && a2 == bpf_htonl(0xffff)) ? v4 : 0;
}

/* The underlay address of an IPv4 underlay IP (see sluice.h). */
static __always_inline void underlay_of_v4(struct sluice_addr_v6 *out, __be32 v4)
{
	__builtin_memset(out, 0, sizeof(*out));
	out->bytes[10] = 0xff;
	out->bytes[11] = 0xff;
	__builtin_memcpy(out->bytes + 12, &v4, 4);
}

/* The IPv6 entry of (source, destination), if any. */
static __always_inline struct sluice_entry_v6 *policy_lookup_v6(const struct sluice_addr_v6 *saddr,
								  const struct sluice_addr_v6 *daddr)
{
	struct sluice_entry_key_v6 key = { .prefixlen = 256 };

	__builtin_memcpy(key.saddr, saddr->bytes, 16);
	__builtin_memcpy(key.daddr, daddr->bytes, 16);
	return bpf_map_lookup_elem(&sluice_entries_v6, &key);
}

/* policy_lookup results besides 0 (found: *out filled). */
#define SLUICE_LOOKUP_NONE (-1)     /* no entry: not ours */
#define SLUICE_LOOKUP_DROP (-2)     /* an entry that must drop (no room for its target) */

/* What a lookup finds: the target, and the policy whose destination matched. */
struct sluice_entry {
	__u32 kind; /* SLUICE_KIND_*, EXCLUDED included */
	__u32 flags;
	__be32 gateway_ip;
	__be32 egress_ip;
	__u32 egress_id;
	__be32 peer_ip;
	__u32 policy_id;
};

/*
 * The entry for (saddr, daddr): the source's group, the longest destination prefix of that
 * group, and the source's target it names.
 */
static __always_inline int policy_lookup(__be32 saddr, __be32 daddr, struct sluice_entry *out)
{
	struct sluice_source_v4 *src = bpf_map_lookup_elem(&sluice_sources_v4, &saddr);

	if (!src)
		return SLUICE_LOOKUP_NONE;
	struct sluice_destination_key_v4 key = { .prefixlen = 64, .group = src->group, .daddr = daddr };
	struct sluice_destination_v4 *d = bpf_map_lookup_elem(&sluice_destinations_v4, &key);

	if (!d)
		return SLUICE_LOOKUP_NONE;
	__builtin_memset(out, 0, sizeof(*out));
	out->policy_id = d->policy_id;
	switch (d->kind) {
	case SLUICE_DEST_EXCLUDED:
		out->kind = SLUICE_KIND_EXCLUDED;
		return 0;
	case SLUICE_DEST_TARGET:
		break;
	default:
		return SLUICE_LOOKUP_DROP;
	}
	__u32 i = d->target;

	if (i >= SLUICE_SOURCE_TARGETS)
		return SLUICE_LOOKUP_DROP;
	struct sluice_target_v4 *t = &src->targets[i];

	/* A slot the shim left empty: this node holds nothing for that policy. */
	if (!t->kind)
		return SLUICE_LOOKUP_NONE;
	out->kind = t->kind;
	out->flags = t->flags;
	out->gateway_ip = t->gateway_ip;
	out->egress_ip = t->egress_ip;
	out->egress_id = t->egress_id;
	out->peer_ip = t->peer_ip;
	return 0;
}

/*
 * The flow key of a TCP or UDP packet (ports at the header's end: no IP options assumed beyond
 * ihl, first fragments only), and its TCP flags byte (0 for UDP). 0 when it is neither.
 */
static __always_inline int flow_key(struct __sk_buff *skb, struct iphdr *ip,
				    struct sluice_flow_key_v4 *key, __u8 *tcp_flags)
{
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return 0;
	/* A later fragment carries no ports. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0;
	__u32 off = sizeof(struct ethhdr) + (ip->ihl & 0xf) * 4;
	struct {
		__be16 sport;
		__be16 dport;
		__u8 rest[9];
		__u8 flags; /* TCP: byte 13 of the header */
	} l4;
	__u32 len = ip->protocol == IPPROTO_TCP ? sizeof(l4) : 4;

	if (bpf_skb_load_bytes(skb, off, &l4, len) < 0)
		return 0;
	__builtin_memset(key, 0, sizeof(*key));
	key->saddr = ip->saddr;
	key->daddr = ip->daddr;
	key->sport = l4.sport;
	key->dport = l4.dport;
	key->protocol = ip->protocol;
	*tcp_flags = ip->protocol == IPPROTO_TCP ? l4.flags : 0;
	return 1;
}

#define SLUICE_TCP_FIN 0x01
#define SLUICE_TCP_RST 0x04

static __always_inline int flow_expired(const struct sluice_flow_v4 *f, __u8 protocol, __u64 now)
{
	__u64 idle = protocol == IPPROTO_UDP ? SLUICE_FLOW_IDLE_UDP_S : SLUICE_FLOW_IDLE_TCP_S;

	if (f->flags & SLUICE_FLOW_CLOSING)
		idle = SLUICE_FLOW_IDLE_CLOSING_S;
	return now - f->last_seen_ns > idle * 1000000000ull;
}

/* Where a steered packet goes: a gateway, and the egress id when that is this node. */
struct sluice_way {
	__be32 gateway_ip;
	__u32 egress_id; /* non-zero: leaves from this node (SNAT by this egress) */
};

/* The way of the entry itself: local entries leave here by their egress, others by tunnel. */
static __always_inline struct sluice_way entry_way(const struct sluice_entry *v)
{
	struct sluice_way w = {
		.gateway_ip = v->gateway_ip,
		.egress_id = (v->flags & SLUICE_F_LOCAL_GATEWAY) ? v->egress_id : 0,
	};

	return w;
}

/*
 * The way of the flow `key` in `flows` (sluice_flows_v4 or _v6), whose entry's way is `way`:
 * the one it is pinned to, while that gateway is pinnable and the entry is the same policy's;
 * else `way`, which the flow is pinned to from now on (see sluice.h).
 */
static __always_inline struct sluice_way pin(struct __sk_buff *skb, void *flows, const void *key,
					     __u8 protocol, __u8 tcp_flags, __u32 policy_id,
					     struct sluice_way way)
{
	__u64 now = bpf_ktime_get_ns();
	struct sluice_flow_v4 *f = bpf_map_lookup_elem(flows, key);
	int live = f && f->policy_id == policy_id && !flow_expired(f, protocol, now);

	if (tcp_flags & SLUICE_TCP_RST) {
		/* The last packet of the flow still goes where the flow went. */
		if (live && bpf_map_lookup_elem(&sluice_pinnable_v4, &f->gateway_ip)) {
			way.gateway_ip = f->gateway_ip;
			way.egress_id = f->egress_id;
		}
		if (f)
			bpf_map_delete_elem(flows, key);
		return way;
	}
	if (live) {
		int same = f->gateway_ip == way.gateway_ip && f->egress_id == way.egress_id;

		if (!same && !bpf_map_lookup_elem(&sluice_pinnable_v4, &f->gateway_ip)) {
			/* Its gateway may not take it any more: it follows the entry from now on. */
			f->gateway_ip = way.gateway_ip;
			f->egress_id = way.egress_id;
			same = 1;
		}
		if (tcp_flags & SLUICE_TCP_FIN)
			f->flags |= SLUICE_FLOW_CLOSING;
		if (now - f->last_seen_ns > SLUICE_FLOW_TOUCH_NS)
			f->last_seen_ns = now;
		if (!same) {
			count(SLUICE_CTR_PINNED, skb->len);
			way.gateway_ip = f->gateway_ip;
			way.egress_id = f->egress_id;
		}
		return way;
	}
	struct sluice_flow_v4 nf = {
		.gateway_ip = way.gateway_ip,
		.policy_id = policy_id,
		.last_seen_ns = now,
		.flags = (tcp_flags & SLUICE_TCP_FIN) ? SLUICE_FLOW_CLOSING : 0,
		.egress_id = way.egress_id,
	};

	bpf_map_update_elem(flows, key, &nf, BPF_ANY);
	return way;
}

/*
 * The way a pod's packet goes: the one its flow is pinned to, while that gateway is pinnable
 * and the entry is the same policy's; else the entry's, which the flow is pinned to from now on
 * (see sluice.h).
 */
static __always_inline struct sluice_way pinned_way(struct __sk_buff *skb, struct iphdr *ip,
						    const struct sluice_entry *v,
						    const struct sluice_config *cfg)
{
	struct sluice_way way = entry_way(v);
	struct sluice_flow_key_v4 key;
	__u8 tcp_flags = 0;

	if ((cfg->flags & SLUICE_CFG_NO_FLOW_PINNING) || !flow_key(skb, ip, &key, &tcp_flags))
		return way;
	return pin(skb, &sluice_flows_v4, &key, key.protocol, tcp_flags, v->policy_id, way);
}

/* Whether a reply (`ip`, from the tunnel) belongs to a flow the pod pinned to gateway `remote`. */
static __always_inline int reply_of_pinned_flow(struct __sk_buff *skb, struct iphdr *ip, __be32 remote)
{
	struct sluice_flow_key_v4 reply;
	__u8 tcp_flags = 0;

	if (!flow_key(skb, ip, &reply, &tcp_flags))
		return 0;
	struct sluice_flow_key_v4 key = {
		.saddr = reply.daddr,
		.daddr = reply.saddr,
		.sport = reply.dport,
		.dport = reply.sport,
		.protocol = reply.protocol,
	};
	struct sluice_flow_v4 *f = bpf_map_lookup_elem(&sluice_flows_v4, &key);

	return f && f->gateway_ip == remote && bpf_map_lookup_elem(&sluice_pinnable_v4, &remote);
}

static __always_inline struct sluice_config *config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&sluice_config, &zero);
}

/* Marks a packet for SNAT to egress `id` (and as tunnelled), leaving every bit not ours alone. */
static __always_inline int mark_for_egress(struct __sk_buff *skb, struct sluice_config *cfg,
					   __u32 id, int tunnelled)
{
	__u32 field = (id << cfg->mark_egress_shift) & cfg->mark_egress;

	if (!field)
		return -1; /* no room for the id: never leave unmarked, i.e. un-SNATed */
	skb->mark = (skb->mark & ~(cfg->mark_egress | cfg->mark_tunnel | cfg->mark_reply)) | field |
		    (tunnelled ? cfg->mark_tunnel : 0);
	return 0;
}

static __always_inline int set_tunnel_dst(struct __sk_buff *skb, struct sluice_config *cfg,
					  __be32 remote)
{
	struct bpf_tunnel_key tk = {};

	tk.remote_ipv4 = bpf_ntohl(remote);
	tk.tunnel_id = cfg->vni;
	tk.tunnel_ttl = cfg->tunnel_ttl ? cfg->tunnel_ttl : 64;
	/*
	 * The outer packet is routed with the inner packet's mark: clear it, or a reply marked for
	 * the reply rule would be routed back into the tunnel device itself.
	 */
	skb->mark = 0;
	return bpf_skb_set_tunnel_key(skb, &tk, sizeof(tk), BPF_F_ZERO_CSUM_TX);
}

/* set_tunnel_dst for an underlay address of either family. */
static __always_inline int set_tunnel_dst_addr(struct __sk_buff *skb, struct sluice_config *cfg,
					       const struct sluice_addr_v6 *remote)
{
	__be32 v4 = underlay_v4(remote);

	if (v4)
		return set_tunnel_dst(skb, cfg, v4);
	struct bpf_tunnel_key tk = {};

	__builtin_memcpy(tk.remote_ipv6, remote->bytes, 16);
	tk.tunnel_id = cfg->vni;
	tk.tunnel_ttl = cfg->tunnel_ttl ? cfg->tunnel_ttl : 64;
	skb->mark = 0;
	/* A UDP checksum over IPv6 is mandatory (RFC 8200): not zeroed. */
	return bpf_skb_set_tunnel_key(skb, &tk, sizeof(tk), BPF_F_TUNINFO_IPV6);
}

/*
 * Where the transport header of an IPv6 packet starts and which it is, past up to four
 * extension headers. 0 when it cannot be told (then *proto is the last header read); a
 * non-first fragment reports protocol 0 (it carries no transport header).
 */
static __always_inline int ipv6_transport(struct __sk_buff *skb, __u8 *proto, __u32 *off)
{
	struct ipv6hdr ip6;
	__u32 at = sizeof(struct ethhdr);

	if (bpf_skb_load_bytes(skb, at, &ip6, sizeof(ip6)) < 0)
		return 0;
	__u8 next = ip6.nexthdr;

	at += sizeof(ip6);
#pragma unroll
	for (int i = 0; i < 4; i++) {
		struct {
			__u8 next;
			__u8 len;
			__be16 frag_off; /* fragment header: offset and flags */
		} ext;

		if (next != SLUICE_IPV6_HOPOPTS && next != SLUICE_IPV6_ROUTING &&
		    next != SLUICE_IPV6_DSTOPTS && next != SLUICE_IPV6_FRAGMENT)
			break;
		if (bpf_skb_load_bytes(skb, at, &ext, sizeof(ext)) < 0)
			return 0;
		if (next == SLUICE_IPV6_FRAGMENT) {
			if (ext.frag_off & bpf_htons(0xfff8)) {
				*proto = 0;
				*off = at;
				return 1;
			}
			at += 8;
		} else {
			at += (ext.len + 1) * 8;
		}
		next = ext.next;
	}
	*proto = next;
	*off = at;
	return next != SLUICE_IPV6_HOPOPTS && next != SLUICE_IPV6_ROUTING &&
	       next != SLUICE_IPV6_DSTOPTS && next != SLUICE_IPV6_FRAGMENT;
}

/*
 * Whether a pod's packet is UDP to the tunnel port. Only first fragments carry the port; later
 * fragments alone never reassemble into anything.
 */
static __always_inline int to_tunnel_port(struct __sk_buff *skb, struct iphdr *ip, __u32 port)
{
	if (ip->protocol != IPPROTO_UDP || !port || (ip->frag_off & bpf_htons(0x1fff)))
		return 0;
	__u32 off = sizeof(struct ethhdr) + ip->ihl * 4;
	__be16 dport;

	if (ip->ihl < 5 || bpf_skb_load_bytes(skb, off + __builtin_offsetof(struct udphdr, dest), &dport,
					      sizeof(dport)) < 0)
		return 1; /* a UDP packet we cannot read: treat as hostile */
	return dport == bpf_htons((__u16)port);
}

/*
 * Lowers the MSS option of a TCP SYN (or SYN-ACK) to `max`, so that neither end sends segments
 * that the tunnel would have to fragment: the pod's side may have the underlay's full MTU.
 * Invalidates packet pointers. Options are walked for at most 16 steps (40 bytes of options).
 */
static __always_inline void clamp_mss_at(struct __sk_buff *skb, __u32 l4, __u32 max)
{
	struct tcphdr th;

	if (bpf_skb_load_bytes(skb, l4, &th, sizeof(th)) < 0 || !th.syn)
		return;
	__u32 end = l4 + th.doff * 4;
	__u32 off = l4 + sizeof(struct tcphdr);

#pragma unroll
	for (int i = 0; i < 16; i++) {
		__u8 opt[2];

		if (off + 4 > end || bpf_skb_load_bytes(skb, off, opt, 2) < 0)
			return;
		if (opt[0] == 0) /* end of options */
			return;
		if (opt[0] == 1) { /* no-op */
			off += 1;
			continue;
		}
		if (opt[0] == 2 && opt[1] == 4) {
			__be16 mss;

			if (bpf_skb_load_bytes(skb, off + 2, &mss, sizeof(mss)) < 0)
				return;
			if (bpf_ntohs(mss) <= max)
				return;
			__be16 clamped = bpf_htons((__u16)max);

			if (bpf_l4_csum_replace(skb, l4 + __builtin_offsetof(struct tcphdr, check), mss,
						clamped, sizeof(clamped)) < 0 ||
			    bpf_skb_store_bytes(skb, off + 2, &clamped, sizeof(clamped), 0) < 0) {
				count(SLUICE_CTR_ERROR, skb->len);
				return;
			}
			count(SLUICE_CTR_MSS_CLAMPED, skb->len);
			return;
		}
		if (opt[1] < 2)
			return;
		off += opt[1];
	}
}

/* clamp_mss_at for an IPv4 packet. */
static __always_inline void clamp_mss(struct __sk_buff *skb, __u32 max)
{
	struct iphdr ip;
	const __u32 l3 = sizeof(struct ethhdr);

	if (!max || bpf_skb_load_bytes(skb, l3, &ip, sizeof(ip)) < 0)
		return;
	if (ip.protocol != IPPROTO_TCP || (ip.frag_off & bpf_htons(0x1fff)) || ip.ihl < 5)
		return;
	clamp_mss_at(skb, l3 + ip.ihl * 4, max);
}

/* clamp_mss_at for an IPv6 packet: its header is 20 bytes longer, its MSS 20 bytes smaller. */
static __always_inline void clamp_mss_v6(struct __sk_buff *skb, __u32 max)
{
	__u8 proto = 0;
	__u32 l4 = 0;

	if (max <= 20 || !ipv6_transport(skb, &proto, &l4) || proto != IPPROTO_TCP)
		return;
	clamp_mss_at(skb, l4, max - 20);
}

/*
 * Reverse-path check: does the route back to the packet's source leave by the interface the
 * packet came in on? On routed CNIs (a route per pod to its veth) that ties the address to the
 * pod. On bridged CNIs the route leads to the bridge: then the frame must come from a port of
 * that bridge, with the MAC the node's neighbour table holds for the address.
 */
static __always_inline int route_back_is_interface(struct __sk_buff *skb, struct bpf_fib_lookup *fib_in)
{
	struct bpf_fib_lookup fib = *fib_in;

	fib.ifindex = skb->ifindex;
	/* tot_len 0: no MTU check, only the route matters. */
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);

	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return 0;
	if (fib.ifindex == skb->ifindex)
		return 1;
	__u32 ifindex = skb->ifindex;
	__u32 *bridge = bpf_map_lookup_elem(&sluice_bridge_ports, &ifindex);

	if (!bridge || *bridge != fib.ifindex || rc != BPF_FIB_LKUP_RET_SUCCESS)
		return 0;
	struct ethhdr *eth = (void *)(long)skb->data;

	if ((void *)(eth + 1) > (void *)(long)skb->data_end)
		return 0;
	/* fib.dmac: the neighbour entry's MAC for the source address. (No memcmp in BPF.) */
	__u8 diff = 0;

#pragma unroll
	for (int i = 0; i < ETH_ALEN; i++)
		diff |= eth->h_source[i] ^ fib.dmac[i];
	return diff == 0;
}

static __always_inline int source_belongs_to_interface(struct __sk_buff *skb, struct iphdr *ip)
{
	struct bpf_fib_lookup fib = {};

	fib.family = AF_INET;
	fib.ipv4_dst = ip->saddr;
	return route_back_is_interface(skb, &fib);
}

static __always_inline int source_belongs_to_interface_v6(struct __sk_buff *skb,
							  const struct sluice_addr_v6 *saddr)
{
	struct bpf_fib_lookup fib = {};

	fib.family = AF_INET6;
	__builtin_memcpy(fib.ipv6_dst, saddr->bytes, 16);
	return route_back_is_interface(skb, &fib);
}

/* unsteered() for a gateway entry: the caller steers the packet. */
#define SLUICE_STEER 0x7fff

/*
 * The verdict on a pod's packet whose entry (of kind `kind`, policy `policy_id`) is not steered
 * (counted): excluded and fallback take the normal path, none drops; SLUICE_STEER for a gateway.
 */
static __always_inline int unsteered(struct __sk_buff *skb, __u32 kind, __u32 policy_id)
{
	switch (kind) {
	case SLUICE_KIND_EXCLUDED:
		count(SLUICE_CTR_EXCLUDED, skb->len);
		return SLUICE_PASS;
	case SLUICE_KIND_FALLBACK:
		count(SLUICE_CTR_FALLBACK, skb->len);
		count_policy(policy_id, skb->len);
		return SLUICE_PASS;
	case SLUICE_KIND_NONE:
		count(SLUICE_CTR_DROP_NO_GATEWAY, skb->len);
		count_policy(policy_id, skb->len);
		return TC_ACT_SHOT;
	case SLUICE_KIND_GATEWAY:
		return SLUICE_STEER;
	default:
		count(SLUICE_CTR_ERROR, skb->len);
		return TC_ACT_SHOT;
	}
}

/*
 * The verdict on a pod's packet no entry covers: the no-leak guard drops it when the pod is not
 * decided yet and the destination is guarded (found in the guard's trie: `guarded`).
 */
static __always_inline int uncovered(struct __sk_buff *skb, int guarded, int decided)
{
	if (guarded && !decided) {
		count(SLUICE_CTR_DROP_UNDECIDED_POD, skb->len);
		return TC_ACT_SHOT;
	}
	return SLUICE_PASS;
}

/* Whether a pod's IPv6 packet (next header `first`) is UDP to the tunnel port, past extension headers. */
static __always_inline int to_tunnel_port_v6(struct __sk_buff *skb, __u8 first, __u32 port)
{
	__u8 proto = 0;
	__u32 l4 = 0;
	__be16 dport;

	if (!port)
		return 0;
	/* The common case, a transport header right after the IPv6 header, costs no walk. */
	if (first != IPPROTO_UDP && first != SLUICE_IPV6_HOPOPTS && first != SLUICE_IPV6_ROUTING &&
	    first != SLUICE_IPV6_DSTOPTS && first != SLUICE_IPV6_FRAGMENT)
		return 0;
	if (!ipv6_transport(skb, &proto, &l4))
		return 1; /* a header chain we cannot read: treat as hostile */
	if (proto != IPPROTO_UDP)
		return 0;
	if (bpf_skb_load_bytes(skb, l4 + __builtin_offsetof(struct udphdr, dest), &dport, sizeof(dport)) < 0)
		return 1;
	return dport == bpf_htons((__u16)port);
}

/*
 * The flow key of an IPv6 TCP or UDP packet whose transport header follows the IPv6 header, and
 * its TCP flags byte (0 for UDP). 0 for anything else (extension headers included).
 */
static __always_inline int flow_key_v6(struct __sk_buff *skb, const struct ipv6hdr *ip6,
				       struct sluice_flow_key_v6 *key, __u8 *tcp_flags)
{
	if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
		return 0;
	struct {
		__be16 sport;
		__be16 dport;
		__u8 rest[9];
		__u8 flags; /* TCP: byte 13 of the header */
	} l4;
	__u32 len = ip6->nexthdr == IPPROTO_TCP ? sizeof(l4) : 4;

	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr), &l4, len) < 0)
		return 0;
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(key->saddr, &ip6->saddr, 16);
	__builtin_memcpy(key->daddr, &ip6->daddr, 16);
	key->sport = l4.sport;
	key->dport = l4.dport;
	key->protocol = ip6->nexthdr;
	*tcp_flags = ip6->nexthdr == IPPROTO_TCP ? l4.flags : 0;
	return 1;
}

/*
 * pinned_way for an IPv6 flow whose entry's gateway has an IPv4 underlay address (the way's
 * gateway_ip); an IPv6 underlay's flows follow their entry.
 */
static __always_inline struct sluice_way pinned_way_v6(struct __sk_buff *skb, const struct ipv6hdr *ip6,
						       const struct sluice_entry_v6 *e,
						       const struct sluice_config *cfg)
{
	struct sluice_way way = {
		.gateway_ip = underlay_v4(&e->gateway),
		.egress_id = (e->flags & SLUICE_F_LOCAL_GATEWAY) ? e->egress_id : 0,
	};
	struct sluice_flow_key_v6 key;
	__u8 tcp_flags = 0;

	if (!way.gateway_ip || (cfg->flags & SLUICE_CFG_NO_FLOW_PINNING) ||
	    !flow_key_v6(skb, ip6, &key, &tcp_flags))
		return way;
	return pin(skb, &sluice_flows_v6, &key, key.protocol, tcp_flags, e->policy_id, way);
}

/* Whether an IPv6 reply (from the tunnel) belongs to a flow the pod pinned to gateway `remote`. */
static __always_inline int reply_of_pinned_flow_v6(struct __sk_buff *skb, const struct ipv6hdr *ip6,
						   const struct sluice_addr_v6 *remote)
{
	__be32 gateway = underlay_v4(remote);
	struct sluice_flow_key_v6 reply;
	__u8 tcp_flags = 0;

	if (!gateway || !flow_key_v6(skb, ip6, &reply, &tcp_flags))
		return 0;
	struct sluice_flow_key_v6 key = {
		.sport = reply.dport,
		.dport = reply.sport,
		.protocol = reply.protocol,
	};

	__builtin_memcpy(key.saddr, reply.daddr, 16);
	__builtin_memcpy(key.daddr, reply.saddr, 16);
	struct sluice_flow_v4 *f = bpf_map_lookup_elem(&sluice_flows_v6, &key);

	return f && f->gateway_ip == gateway && bpf_map_lookup_elem(&sluice_pinnable_v4, &gateway);
}

/* A pod's IPv6 packet: as sluice_from_pod for IPv4, with sluice_entries_v6. */
static __always_inline int from_pod_v6(struct __sk_buff *skb)
{
	void *data = readable(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr));

	if (!data)
		return SLUICE_PASS;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	struct sluice_addr_v6 saddr, daddr;

	__builtin_memcpy(saddr.bytes, &ip6->saddr, 16);
	__builtin_memcpy(daddr.bytes, &ip6->daddr, 16);
	struct sluice_config *cfg = config();

	if (cfg && to_tunnel_port_v6(skb, ip6->nexthdr, cfg->tunnel_port)) {
		count(SLUICE_CTR_DROP_POD_TO_TUNNEL, skb->len);
		return TC_ACT_SHOT;
	}
	/*
	 * Link-local and multicast destinations never leave the link: neighbour discovery, router
	 * solicitations and MLD must reach the node even under a policy for ::/0.
	 */
	if (daddr.bytes[0] == 0xff || (daddr.bytes[0] == 0xfe && (daddr.bytes[1] & 0xc0) == 0x80))
		return SLUICE_PASS;
	struct sluice_cidr_key_v6 dst = { .prefixlen = 128 };

	__builtin_memcpy(dst.addr, daddr.bytes, 16);
	if (bpf_map_lookup_elem(&sluice_cluster_v6, &dst)) {
		count(SLUICE_CTR_IN_CLUSTER, skb->len);
		return SLUICE_PASS;
	}
	struct sluice_entry_v6 *e = policy_lookup_v6(&saddr, &daddr);

	if (!e)
		return uncovered(skb, bpf_map_lookup_elem(&sluice_guarded_v6, &dst) != NULL,
				 bpf_map_lookup_elem(&sluice_decided_pods_v6, &saddr) != NULL);
	int verdict = unsteered(skb, e->kind, e->policy_id);

	if (verdict != SLUICE_STEER)
		return verdict;
	if (!(cfg && (cfg->flags & SLUICE_CFG_NO_SOURCE_CHECK)) &&
	    !source_belongs_to_interface_v6(skb, &saddr)) {
		count(SLUICE_CTR_DROP_SPOOFED_SOURCE, skb->len);
		return TC_ACT_SHOT;
	}
	count_policy(e->policy_id, skb->len);
	if (!cfg) {
		count(SLUICE_CTR_ERROR, skb->len);
		return TC_ACT_SHOT;
	}
	if ((e->flags & SLUICE_F_LOCAL_GATEWAY) && addr_is_zero(&e->egress_ip)) {
		count(SLUICE_CTR_DROP_NO_EGRESS_IP, skb->len);
		return TC_ACT_SHOT;
	}
	struct sluice_way way = pinned_way_v6(skb, ip6, e, cfg);

	if (way.egress_id) {
		if (mark_for_egress(skb, cfg, way.egress_id, 0) < 0) {
			count(SLUICE_CTR_ERROR, skb->len);
			return TC_ACT_SHOT;
		}
		count(SLUICE_CTR_LOCAL_EGRESS, skb->len);
		return SLUICE_PASS;
	}
	struct sluice_addr_v6 gateway = e->gateway;

	/* Pinned to another gateway than the entry's (over an IPv4 underlay). */
	if (way.gateway_ip && way.gateway_ip != underlay_v4(&gateway))
		underlay_of_v4(&gateway, way.gateway_ip);

	/* Fail closed: a steered flow must never leave by the normal path. */
	if (!cfg->tunnel_ifindex || addr_is_zero(&gateway)) {
		count(SLUICE_CTR_ERROR, skb->len);
		return TC_ACT_SHOT;
	}
	clamp_mss_v6(skb, cfg->tcp_mss_max);
	if (set_tunnel_dst_addr(skb, cfg, &gateway) < 0) {
		count(SLUICE_CTR_ERROR, skb->len);
		return TC_ACT_SHOT;
	}
	count(SLUICE_CTR_STEERED, skb->len);
	return bpf_redirect(cfg->tunnel_ifindex, 0);
}

SEC("classifier")
int sluice_from_pod(struct __sk_buff *skb)
{
	/* That Sluice runs at all on this interface (see SLUICE_SEEN_SLOTS). */
	__u32 slot = skb->ifindex % SLUICE_SEEN_SLOTS;
	__u64 *seen = bpf_map_lookup_elem(&sluice_seen, &slot);

	if (seen)
		(*seen)++;

	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return from_pod_v6(skb);
	struct iphdr *ip = ipv4_header(skb);

	if (!ip)
		return SLUICE_PASS;
	__be32 saddr = ip->saddr;
	__be32 daddr = ip->daddr;
	struct sluice_config *cfg = config();

	/*
	 * Pods never speak the tunnel: many CNIs masquerade a pod's packets to its node's address,
	 * which would let a pod pass as a tunnel peer.
	 */
	if (cfg && to_tunnel_port(skb, ip, cfg->tunnel_port)) {
		count(SLUICE_CTR_DROP_POD_TO_TUNNEL, skb->len);
		return TC_ACT_SHOT;
	}

	if (in_cluster(daddr)) {
		count(SLUICE_CTR_IN_CLUSTER, skb->len);
		return SLUICE_PASS;
	}
	struct sluice_entry entry;
	struct sluice_entry *v = &entry;
	int found = policy_lookup(saddr, daddr, v);

	if (found == SLUICE_LOOKUP_DROP) {
		count(SLUICE_CTR_DROP_TOO_MANY_POLICIES, skb->len);
		count_policy(v->policy_id, skb->len);
		return TC_ACT_SHOT;
	}
	if (found < 0) {
		struct sluice_cidr_key_v4 guard = { .prefixlen = 32, .addr = daddr };

		return uncovered(skb, bpf_map_lookup_elem(&sluice_guarded_v4, &guard) != NULL,
				 bpf_map_lookup_elem(&sluice_decided_pods_v4, &saddr) != NULL);
	}
	int verdict = unsteered(skb, v->kind, v->policy_id);

	if (verdict != SLUICE_STEER)
		return verdict;
	/* The egress IP is lent to the pod the entry names, not to whoever uses its address. */
	if (!(cfg && (cfg->flags & SLUICE_CFG_NO_SOURCE_CHECK)) &&
	    !source_belongs_to_interface(skb, ip)) {
		count(SLUICE_CTR_DROP_SPOOFED_SOURCE, skb->len);
		return TC_ACT_SHOT;
	}
	count_policy(v->policy_id, skb->len);

	if (!cfg) {
		count(SLUICE_CTR_ERROR, skb->len);
		return TC_ACT_SHOT;
	}
	if ((v->flags & SLUICE_F_LOCAL_GATEWAY) && !v->egress_ip) {
		count(SLUICE_CTR_DROP_NO_EGRESS_IP, skb->len);
		return TC_ACT_SHOT;
	}
	struct sluice_way way = pinned_way(skb, ip, v, cfg);

	if (way.egress_id) {
		/* Egress here: the kernel routes it; nftables SNATs it by this mark. */
		if (mark_for_egress(skb, cfg, way.egress_id, 0) < 0) {
			count(SLUICE_CTR_ERROR, skb->len);
			return TC_ACT_SHOT;
		}
		count(SLUICE_CTR_LOCAL_EGRESS, skb->len);
		return SLUICE_PASS;
	}

	/* Fail closed: a steered flow must never leave by the normal path. */
	if (!cfg->tunnel_ifindex || !way.gateway_ip) {
		count(SLUICE_CTR_ERROR, skb->len);
		return TC_ACT_SHOT;
	}
	clamp_mss(skb, cfg->tcp_mss_max);
	if (set_tunnel_dst(skb, cfg, way.gateway_ip) < 0) {
		count(SLUICE_CTR_ERROR, skb->len);
		return TC_ACT_SHOT;
	}
	count(SLUICE_CTR_STEERED, skb->len);
	return bpf_redirect(cfg->tunnel_ifindex, 0);
}

/* Delivers a reply straight to the pod's interface, skipping this node's netfilter (which never
 * saw the request: it was redirected into the tunnel). Falls back to the stack. */
static __always_inline int deliver_to_pod(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4_header(skb);

	if (!ip)
		return SLUICE_PASS;
	if (ip->ttl <= 1)
		return SLUICE_PASS; /* let the stack send the ICMP */

	struct bpf_fib_lookup fib = {};

	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = skb->ingress_ifindex;

	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);

	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return SLUICE_PASS;

	/* Decrement the TTL with an incremental checksum update (RFC 1624). */
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;

	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);

	struct ethhdr *eth = (void *)(long)skb->data;

	if ((void *)(eth + 1) > (void *)(long)skb->data_end)
		return TC_ACT_SHOT;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	return bpf_redirect(fib.ifindex, 0);
}

/* A tunnelled request of a pod of another node, taken: marked for SNAT by `egress_id`. */
static __always_inline int egress_here(struct __sk_buff *skb, struct sluice_config *cfg, __u32 egress_id,
				       __u32 policy_id)
{
	if (mark_for_egress(skb, cfg, egress_id, 1) < 0) {
		count(SLUICE_CTR_ERROR, skb->len);
		return TC_ACT_SHOT;
	}
	count(SLUICE_CTR_EGRESSED, skb->len);
	count_policy(policy_id, skb->len);
	return SLUICE_PASS;
}

/* deliver_to_pod for an IPv6 reply. */
static __always_inline int deliver_to_pod_v6(struct __sk_buff *skb)
{
	void *data = readable(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr));

	if (!data)
		return SLUICE_PASS;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);

	if (eth->h_proto != bpf_htons(ETH_P_IPV6) || ip6->hop_limit <= 1)
		return SLUICE_PASS; /* let the stack send the ICMPv6 */

	struct bpf_fib_lookup fib = {};

	fib.family = AF_INET6;
	fib.l4_protocol = ip6->nexthdr;
	fib.tot_len = bpf_ntohs(ip6->payload_len) + sizeof(struct ipv6hdr);
	__builtin_memcpy(fib.ipv6_src, &ip6->saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, 16);
	fib.ifindex = skb->ingress_ifindex;

	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);

	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return SLUICE_PASS;
	ip6->hop_limit--; /* no header checksum in IPv6 */
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	return bpf_redirect(fib.ifindex, 0);
}

/*
 * sluice_from_tunnel for an IPv6 inner packet, from the peer at underlay address `remote`: a
 * request of a pod on another node to leave here, a reply to a local pod, or an ICMPv6 error
 * about a local pod's steered flow (as for IPv4).
 */
static __always_inline int from_tunnel_v6(struct __sk_buff *skb, struct sluice_config *cfg,
					  const struct sluice_addr_v6 *remote, __u32 peer_flags)
{
	void *data = readable(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr));

	if (!data) {
		count(SLUICE_CTR_DROP_UNKNOWN_TUNNEL, skb->len);
		return TC_ACT_SHOT;
	}
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	struct sluice_addr_v6 saddr, daddr;

	__builtin_memcpy(saddr.bytes, &ip6->saddr, 16);
	__builtin_memcpy(daddr.bytes, &ip6->daddr, 16);
	__u8 nexthdr = ip6->nexthdr;

	bpf_skb_change_type(skb, PACKET_HOST);

	struct sluice_entry_v6 *e = policy_lookup_v6(&saddr, &daddr);

	if (e && e->kind == SLUICE_KIND_GATEWAY && (e->flags & SLUICE_F_LOCAL_GATEWAY)) {
		/* Only the pod's own node may send its traffic (see sluice_from_tunnel). */
		if (!(peer_flags & SLUICE_PEER_SOURCE) || addr_is_zero(&e->peer) || !addr_eq(&e->peer, remote)) {
			count(SLUICE_CTR_DROP_FOREIGN_TUNNEL, skb->len);
			return TC_ACT_SHOT;
		}
		if (addr_is_zero(&e->egress_ip)) {
			count(SLUICE_CTR_DROP_NO_EGRESS_IP, skb->len);
			return TC_ACT_SHOT;
		}
		struct sluice_reply_v6 *r = bpf_map_lookup_elem(&sluice_reply_v6, &saddr);

		if (!r || !addr_eq(&r->node, remote)) {
			struct sluice_reply_v6 nr = { .node = *remote };

			bpf_map_update_elem(&sluice_reply_v6, &saddr, &nr, BPF_ANY);
		}
		return egress_here(skb, cfg, e->egress_id, e->policy_id);
	}
	e = policy_lookup_v6(&daddr, &saddr);
	if (e && e->kind == SLUICE_KIND_GATEWAY && (peer_flags & SLUICE_PEER_GATEWAY)) {
		/* From the gateway its entry names, or its flow is pinned to (see sluice_from_tunnel). */
		if (!(e->flags & SLUICE_F_LOCAL_GATEWAY) && addr_eq(&e->gateway, remote))
			count(SLUICE_CTR_REPLY_DELIVERED, skb->len);
		else if (reply_of_pinned_flow_v6(skb, ip6, remote))
			count(SLUICE_CTR_PINNED_REPLY_DELIVERED, skb->len);
		else
			goto not_a_reply;
		clamp_mss_v6(skb, cfg->tcp_mss_max);
		return deliver_to_pod_v6(skb);
	}
not_a_reply:
	/*
	 * An ICMPv6 error about a steered flow ("packet too big" above all: IPv6 routers never
	 * fragment), matched by the packet it quotes, which must be steered to the gateway it came
	 * from.
	 */
	if (nexthdr == IPPROTO_ICMPV6 && (peer_flags & SLUICE_PEER_GATEWAY)) {
		struct {
			struct sluice_icmp_header icmp;
			struct ipv6hdr inner;
		} err;

		if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr), &err,
				       sizeof(err)) == 0 &&
		    err.icmp.type >= SLUICE_ICMPV6_DEST_UNREACH && err.icmp.type <= SLUICE_ICMPV6_PARAMPROB) {
			struct sluice_addr_v6 inner_s, inner_d;

			__builtin_memcpy(inner_s.bytes, &err.inner.saddr, 16);
			__builtin_memcpy(inner_d.bytes, &err.inner.daddr, 16);
			if (addr_eq(&inner_s, &daddr)) {
				e = policy_lookup_v6(&inner_s, &inner_d);
				if (e && e->kind == SLUICE_KIND_GATEWAY && !(e->flags & SLUICE_F_LOCAL_GATEWAY) &&
				    addr_eq(&e->gateway, remote)) {
					count(SLUICE_CTR_ICMP_ERROR_DELIVERED, skb->len);
					return deliver_to_pod_v6(skb);
				}
			}
		}
	}
	count(SLUICE_CTR_DROP_UNKNOWN_TUNNEL, skb->len);
	return TC_ACT_SHOT;
}

SEC("classifier")
int sluice_from_tunnel(struct __sk_buff *skb)
{
	struct bpf_tunnel_key tk = {};
	struct sluice_addr_v6 remote_addr;
	__be32 remote = 0; /* an IPv4 underlay's address; 0 over IPv6 */
	__u32 *peer;

	/* Before anything else: our VNI, from a node our plan exchanges tunnel traffic with. */
	if (bpf_skb_get_tunnel_key(skb, &tk, sizeof(tk), 0) == 0) {
		remote = bpf_htonl(tk.remote_ipv4);
		underlay_of_v4(&remote_addr, remote);
		peer = bpf_map_lookup_elem(&sluice_tunnel_peers_v4, &remote);
	} else if (bpf_skb_get_tunnel_key(skb, &tk, sizeof(tk), BPF_F_TUNINFO_IPV6) == 0) {
		__builtin_memcpy(remote_addr.bytes, tk.remote_ipv6, 16);
		peer = bpf_map_lookup_elem(&sluice_tunnel_peers_v6, &remote_addr);
	} else {
		count(SLUICE_CTR_ERROR, skb->len);
		return TC_ACT_SHOT;
	}
	struct sluice_config *cfg = config();

	if (!cfg || tk.tunnel_id != cfg->vni || !peer) {
		count(SLUICE_CTR_DROP_FOREIGN_TUNNEL, skb->len);
		return TC_ACT_SHOT;
	}
	__u32 peer_flags = *peer;

	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return from_tunnel_v6(skb, cfg, &remote_addr, peer_flags);
	if (!remote) {
		/* IPv4 pods are steered over an IPv4 underlay only. */
		count(SLUICE_CTR_DROP_UNSUPPORTED_FAMILY, skb->len);
		return TC_ACT_SHOT;
	}
	struct iphdr *ip = ipv4_header(skb);

	if (!ip) {
		count(SLUICE_CTR_DROP_UNKNOWN_TUNNEL, skb->len);
		return TC_ACT_SHOT;
	}
	__be32 saddr = ip->saddr;
	__be32 daddr = ip->daddr;

	/* The inner frame still carries the pod-side MAC addresses: accept it as ours. */
	bpf_skb_change_type(skb, PACKET_HOST);

	/* A request from a pod on another node, to leave through this gateway? */
	struct sluice_entry entry;
	struct sluice_entry *v = &entry;

	if (policy_lookup(saddr, daddr, v) == 0 && v->kind == SLUICE_KIND_GATEWAY && (v->flags & SLUICE_F_LOCAL_GATEWAY)) {
		/*
		 * Only the pod's own node may send its traffic: anyone else spoofing the inner source
		 * would borrow the egress IP and take over the replies.
		 */
		if (!(peer_flags & SLUICE_PEER_SOURCE) || !v->peer_ip || v->peer_ip != remote) {
			count(SLUICE_CTR_DROP_FOREIGN_TUNNEL, skb->len);
			return TC_ACT_SHOT;
		}
		if (!v->egress_ip) {
			count(SLUICE_CTR_DROP_NO_EGRESS_IP, skb->len);
			return TC_ACT_SHOT;
		}
		/* Remember where the pod lives, for the replies (sluice_to_tunnel). */
		struct sluice_reply_v4 *r = bpf_map_lookup_elem(&sluice_reply_v4, &saddr);

		if (!r || r->node_ip != remote) {
			struct sluice_reply_v4 nr = { .node_ip = remote };

			bpf_map_update_elem(&sluice_reply_v4, &saddr, &nr, BPF_ANY);
		}
		return egress_here(skb, cfg, v->egress_id, v->policy_id);
	}

	/*
	 * A reply to a local pod, from the gateway its entry names, or its flow is pinned to (also
	 * when the pod's entry leaves from this node now)?
	 */
	if (policy_lookup(daddr, saddr, v) == 0 && v->kind == SLUICE_KIND_GATEWAY &&
	    (peer_flags & SLUICE_PEER_GATEWAY)) {
		if (!(v->flags & SLUICE_F_LOCAL_GATEWAY) && v->gateway_ip == remote)
			count(SLUICE_CTR_REPLY_DELIVERED, skb->len);
		else if (reply_of_pinned_flow(skb, ip, remote))
			count(SLUICE_CTR_PINNED_REPLY_DELIVERED, skb->len);
		else
			goto not_a_reply;
		/* The pod's side may have the underlay's full MTU: its segments must fit the tunnel. */
		clamp_mss(skb, cfg->tcp_mss_max);
		return deliver_to_pod(skb);
	}
not_a_reply:

	/*
	 * An ICMP error about a steered flow (from a router on the gateway's way out: "fragmentation
	 * needed", unreachable, time exceeded), de-NATed by the gateway's conntrack: its source is
	 * that router, not the destination, so it is matched by the packet it quotes (pod ->
	 * destination), which must be steered to the gateway it came from. Path MTU discovery needs it.
	 */
	if (ip->protocol == IPPROTO_ICMP && (peer_flags & SLUICE_PEER_GATEWAY) && ip->ihl == 5) {
		struct {
			struct sluice_icmp_header icmp;
			struct iphdr inner;
		} err;

		if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + sizeof(struct iphdr), &err,
				       sizeof(err)) == 0 &&
		    (err.icmp.type == SLUICE_ICMP_DEST_UNREACH ||
		     err.icmp.type == SLUICE_ICMP_TIME_EXCEEDED ||
		     err.icmp.type == SLUICE_ICMP_PARAMETERPROB) &&
		    err.inner.saddr == daddr) {
			if (policy_lookup(err.inner.saddr, err.inner.daddr, v) == 0 && v->kind == SLUICE_KIND_GATEWAY &&
			    !(v->flags & SLUICE_F_LOCAL_GATEWAY) && v->gateway_ip == remote) {
				count(SLUICE_CTR_ICMP_ERROR_DELIVERED, skb->len);
				return deliver_to_pod(skb);
			}
		}
	}

	count(SLUICE_CTR_DROP_UNKNOWN_TUNNEL, skb->len);
	return TC_ACT_SHOT;
}

SEC("classifier")
int sluice_to_tunnel(struct __sk_buff *skb)
{
	struct bpf_tunnel_key tk = {};

	/*
	 * Already given a destination by sluice_from_pod: pass. (Transmit metadata reads back
	 * with the destination in local_ipv4: the helper assumes receive metadata.)
	 */
	if (bpf_skb_get_tunnel_key(skb, &tk, sizeof(tk), 0) == 0 ||
	    bpf_skb_get_tunnel_key(skb, &tk, sizeof(tk), BPF_F_TUNINFO_IPV6) == 0)
		return SLUICE_PASS;

	/* Otherwise a reply routed here by the reply rule: send it to the pod's node. */
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		void *data = readable(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr));

		if (!data)
			return TC_ACT_SHOT;
		struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
		struct sluice_addr_v6 pod;

		__builtin_memcpy(pod.bytes, &ip6->daddr, 16);
		struct sluice_reply_v6 *r6 = bpf_map_lookup_elem(&sluice_reply_v6, &pod);
		struct sluice_config *cfg6 = config();

		if (!r6 || !cfg6) {
			count(SLUICE_CTR_DROP_NO_REPLY_ROUTE, skb->len);
			return TC_ACT_SHOT;
		}
		struct sluice_addr_v6 node = r6->node;

		if (set_tunnel_dst_addr(skb, cfg6, &node) < 0) {
			count(SLUICE_CTR_ERROR, skb->len);
			return TC_ACT_SHOT;
		}
		count(SLUICE_CTR_REPLY_ENCAP, skb->len);
		return SLUICE_PASS;
	}
	struct iphdr *ip = ipv4_header(skb);

	if (!ip)
		return TC_ACT_SHOT;
	__be32 daddr = ip->daddr;
	struct sluice_reply_v4 *r = bpf_map_lookup_elem(&sluice_reply_v4, &daddr);
	struct sluice_config *cfg = config();

	if (!r || !cfg) {
		count(SLUICE_CTR_DROP_NO_REPLY_ROUTE, skb->len);
		return TC_ACT_SHOT;
	}
	if (set_tunnel_dst(skb, cfg, r->node_ip) < 0) {
		count(SLUICE_CTR_ERROR, skb->len);
		return TC_ACT_SHOT;
	}
	count(SLUICE_CTR_REPLY_ENCAP, skb->len);
	return SLUICE_PASS;
}

/* The ARP payload for IPv4 over Ethernet up to the sender's address (linux/if_arp.h pulls in libc
 * headers a BPF build cannot use). */
struct sluice_arp_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 oper;
	__u8 sha[ETH_ALEN];
	__u8 spa[4]; /* unaligned in the packet: copied out, never read as a __be32 in place */
};

#define SLUICE_ARPHRD_ETHER 1

#define SLUICE_ND_NEIGHBOR_ADVERT 136

/*
 * The fence past its deadline, for an IPv6 packet: a neighbour advertisement whose target is a
 * managed address (Linux sends them from the target itself, but a node may answer from another
 * of its addresses), else a packet whose source is one. Advertisements are read only directly
 * after the IPv6 header, where neighbour discovery puts them (RFC 4861 messages carry no
 * extension headers in practice); the source check catches the rest.
 */
static __always_inline int fence_v6(struct __sk_buff *skb)
{
	__u32 need = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
	struct ethhdr *eth = readable(skb, need);

	if (!eth || eth->h_proto != bpf_htons(ETH_P_IPV6))
		return SLUICE_PASS;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct sluice_addr_v6 addr;

	if (ip6->nexthdr == IPPROTO_ICMPV6) {
		/* type, code, checksum, flags, then the target */
		__u8 head[8 + sizeof(addr.bytes)];

		if (bpf_skb_load_bytes(skb, need, head, sizeof(head)) == 0 &&
		    head[0] == SLUICE_ND_NEIGHBOR_ADVERT) {
			__builtin_memcpy(addr.bytes, head + 8, sizeof(addr.bytes));
			if (bpf_map_lookup_elem(&sluice_managed_v6, &addr)) {
				count(SLUICE_CTR_DROP_FENCED_ADVERTISEMENT, skb->len);
				return TC_ACT_SHOT;
			}
		}
	}
	__builtin_memcpy(addr.bytes, &ip6->saddr, sizeof(addr.bytes));
	if (!bpf_map_lookup_elem(&sluice_managed_v6, &addr))
		return SLUICE_PASS;
	count(SLUICE_CTR_DROP_FENCED_SOURCE, skb->len);
	return TC_ACT_SHOT;
}

/*
 * The fence (TC egress on uplinks holding managed egress IPs). The shim attaches it to Ethernet
 * devices only, and frames are parsed as untagged Ethernet: a frame whose EtherType is not
 * skb->protocol (an in-band VLAN tag) passes. Runs on every packet the uplink sends, so the
 * common case, a deadline not armed or not reached, costs one lookup and one clock read.
 */
SEC("classifier")
int sluice_fence(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u64 *deadline = bpf_map_lookup_elem(&sluice_fence_deadline, &zero);

	if (!deadline || !*deadline || bpf_ktime_get_ns() <= *deadline)
		return SLUICE_PASS;
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return fence_v6(skb);

	__be32 source;
	__u32 outcome;

	if (skb->protocol == bpf_htons(ETH_P_ARP)) {
		struct ethhdr *eth = readable(skb, sizeof(struct ethhdr) + sizeof(struct sluice_arp_ipv4));

		if (!eth || eth->h_proto != bpf_htons(ETH_P_ARP))
			return SLUICE_PASS;
		struct sluice_arp_ipv4 *arp = (void *)(eth + 1);

		/* Another hardware or protocol type puts the sender's address elsewhere. */
		if (arp->htype != bpf_htons(SLUICE_ARPHRD_ETHER) || arp->ptype != bpf_htons(ETH_P_IP) ||
		    arp->hlen != ETH_ALEN || arp->plen != sizeof(source))
			return SLUICE_PASS;
		__builtin_memcpy(&source, arp->spa, sizeof(source));
		outcome = SLUICE_CTR_DROP_FENCED_ARP;
	} else if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = ipv4_header(skb);

		if (!ip)
			return SLUICE_PASS;
		source = ip->saddr;
		outcome = SLUICE_CTR_DROP_FENCED_SOURCE;
	} else {
		return SLUICE_PASS;
	}
	if (!bpf_map_lookup_elem(&sluice_managed_v4, &source))
		return SLUICE_PASS;
	count(outcome, skb->len);
	return TC_ACT_SHOT;
}

char _license[] SEC("license") = "GPL";
