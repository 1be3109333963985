// SPDX-License-Identifier: GPL-2.0
/* Caplance's kernel data plane: the balancer's program, for tc (clsact ingress on the
 * interface clients' packets arrive on) and XDP.
 *
 * For a packet to a VIP: key the flow exactly as caplance.packet.flow_key does, find its
 * backend (the flow table, else the VIP's lookup table under the flow hash of
 * caplance/flowhash.py), wrap it as the backend's transport does (udp/gue: outer IPv4 + UDP
 * from a port hashed from the flow; gre: outer IPv4 + GRE) and send it on. What it does not
 * handle -- fragments, IPv4 options, IPv6 extension headers, ICMP errors, packets over the
 * path MTU, anything before the first table -- it passes up, unchanged, to the kernel and so
 * to the Python data plane behind it, which handles it exactly as without this program.
 * Every drop and every pass is counted by reason (maps.h). Packets for other addresses are
 * not ours: passed on, not counted.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "flowhash.h"
#include "maps.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VIPS);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* an updated element is freed after readers are done */
	__type(key, struct vip_key);
	__type(value, struct vip_meta);
} vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VIPS * 64);
	__type(key, struct port_key);
	__type(value, __u8);
} vip_ports SEC(".maps");

struct lookup_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PLACEHOLDER_TABLE);
	__uint(map_flags, BPF_F_INNER_MAP | BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 2 * MAX_VIPS);
	__type(key, __u32);
	__array(values, struct lookup_table);
} vip_lookup SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct member_key);
	__type(value, __u8);
} members SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend);
} backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DEFAULT_FLOWS);
	__uint(map_flags, BPF_F_NO_COMMON_LRU); /* an LRU list per CPU, as Katran's per-CPU tables */
	__type(key, struct flow_key);
	__type(value, struct flow);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
} settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rate);
} rates SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, R_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_VIPS);
	__type(key, __u32);
	__type(value, struct traffic);
} vip_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct traffic);
} backend_stats SEC(".maps");

#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_DCCP 33
#define PROTO_GRE 47
#define PROTO_ICMPV6 58
#define PROTO_SCTP 132
#define PROTO_UDPLITE 136
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
#define NS 1000000000ULL

/* what to do with a packet, once looked at */
enum action { FORWARD, PASS, DROP, NOT_OURS };

struct packet {
	__u8 key[40];           /* the flow key (13 or 37 bytes used) */
	__u32 pseudo;           /* the TCP/UDP pseudo-header sum, folded (0 for other protocols) */
	__u16 checksum;         /* the TCP/UDP checksum field as it is, network order */
	__u32 key_length;
	__u32 ip_length;        /* from the IP header: Ethernet padding not counted */
	__u32 l4;               /* offset of the transport header from the start of the frame */
	__u8 version;
	__u8 protocol;
	__u8 tcp_flags;         /* 0 unless TCP */
	__u16 dport;            /* host order; 0 where the protocol has none */
};

static __always_inline void count(__u32 reason)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &reason);

	if (value)
		*value += 1;
}

static __always_inline void add_traffic(void *map, __u32 index, __u64 bytes)
{
	struct traffic *value = bpf_map_lookup_elem(map, &index);

	if (value) {
		value->packets += 1;
		value->bytes += bytes;
	}
}

static __always_inline int has_ports(__u8 protocol)
{
	return protocol == PROTO_TCP || protocol == PROTO_UDP || protocol == PROTO_DCCP ||
	       protocol == PROTO_SCTP || protocol == PROTO_UDPLITE;
}

/* The TCP/UDP pseudo-header sum over ``words`` 16-bit words of addresses (both), folded, as
 * a sender that leaves the checksum to offload writes it into the checksum field. */
static __always_inline __u32 pseudo_sum(__u16 *addresses, int words, __u8 protocol, __u32 length)
{
	__u32 sum = bpf_htons(protocol) + bpf_htons((__u16)length);

#pragma unroll
	for (int i = 0; i < 16; i++) {
		if (i >= words)
			break;
		sum += addresses[i];
	}
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum;
}

/* Whether the packet's TCP/UDP checksum was left to offload (only the pseudo-header sum is
 * in it): its bytes are not valid until a NIC -- or a kernel that unwraps it -- finishes it. */
static __always_inline int checksum_pending(struct packet *p)
{
	return (p->protocol == PROTO_TCP || p->protocol == PROTO_UDP) && p->checksum == p->pseudo;
}

/* The transport part of the key (bytes key[at..at+4)): ports, an ICMP echo identifier, or
 * nothing. ICMP errors and headers cut short are passed up (reason in *why). */
static __always_inline enum action key_transport(void *data, void *data_end, struct packet *p, __u32 at,
						 __u8 icmp, __u32 *why)
{
	__u8 *l4 = data + p->l4;

	if (has_ports(p->protocol)) {
		if ((void *)(l4 + 4) > data_end) {
			*why = R_PASS_TRUNCATED;
			return PASS;
		}
		__builtin_memcpy(&p->key[at], l4, 4);
		p->dport = ((__u16)l4[2] << 8) | l4[3];
		if (p->protocol == PROTO_TCP) {
			if ((void *)(l4 + 18) > data_end) {
				*why = R_PASS_TRUNCATED;
				return PASS;
			}
			p->tcp_flags = l4[13];
			p->checksum = *(__u16 *)(l4 + 16);
		} else if (p->protocol == PROTO_UDP) {
			if ((void *)(l4 + 8) > data_end) {
				*why = R_PASS_TRUNCATED;
				return PASS;
			}
			p->checksum = *(__u16 *)(l4 + 6);
		}
		return FORWARD;
	}
	if (p->protocol == icmp) {
		if ((void *)(l4 + 8) > data_end) {
			*why = R_PASS_TRUNCATED;
			return PASS;
		}
		__u8 type = l4[0];
		int error = icmp == PROTO_ICMP ? (type == 3 || type == 4 || type == 5 || type == 11 || type == 12)
					       : (type >= 1 && type <= 4);
		int echo = icmp == PROTO_ICMP ? (type == 0 || type == 8) : (type == 128 || type == 129);
		if (error) {
			*why = R_PASS_ICMP;
			return PASS;
		}
		if (echo) {
			p->key[at] = l4[4];
			p->key[at + 1] = l4[5];
		}
	}
	return FORWARD; /* the rest of the key stays 0 */
}

/* Parse the frame up to the flow key (*meta: the VIP's entry). NOT_OURS for anything that is
 * not for a VIP. */
static __always_inline enum action parse(void *data, void *data_end, struct packet *p, struct vip_key *vip,
					 struct vip_meta **meta, __u32 *why)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return NOT_OURS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return NOT_OURS;
		__builtin_memcpy(vip->addr, &ip->daddr, 4);
		vip->family = 4;
		p->version = 4;
		*meta = bpf_map_lookup_elem(&vips, vip);
		if (!*meta)
			return NOT_OURS;
		p->ip_length = bpf_ntohs(ip->tot_len);
		p->protocol = ip->protocol;
		if (ip->ihl != 5) {
			*why = R_PASS_OPTIONS;
			return PASS;
		}
		if (ip->frag_off & bpf_htons(0x3fff)) {
			*why = R_PASS_FRAGMENT;
			return PASS;
		}
		__builtin_memcpy(p->key, &ip->saddr, 4);
		__builtin_memcpy(&p->key[4], &ip->daddr, 4);
		p->key[8] = ip->protocol;
		p->key_length = 13;
		p->l4 = sizeof(*eth) + sizeof(*ip);
		p->pseudo = pseudo_sum((__u16 *)&ip->saddr, 4, p->protocol, p->ip_length - sizeof(*ip));
		return key_transport(data, data_end, p, 9, PROTO_ICMP, why);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return NOT_OURS;
		__builtin_memcpy(vip->addr, &ip6->daddr, 16);
		vip->family = 6;
		p->version = 6;
		*meta = bpf_map_lookup_elem(&vips, vip);
		if (!*meta)
			return NOT_OURS;
		p->ip_length = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
		p->protocol = ip6->nexthdr;
		switch (ip6->nexthdr) {
		case 0: case 43: case 51: case 60: case 135: case 139: case 140:
			*why = R_PASS_OPTIONS;
			return PASS;
		case 44:
			*why = R_PASS_FRAGMENT;
			return PASS;
		}
		__builtin_memcpy(p->key, &ip6->saddr, 16);
		__builtin_memcpy(&p->key[16], &ip6->daddr, 16);
		p->key[32] = ip6->nexthdr;
		p->key_length = 37;
		p->l4 = sizeof(*eth) + sizeof(*ip6);
		p->pseudo = pseudo_sum((__u16 *)&ip6->saddr, 16, p->protocol, p->ip_length - sizeof(*ip6));
		return key_transport(data, data_end, p, 33, PROTO_ICMPV6, why);
	}
	return NOT_OURS;
}

static __always_inline int is_member(__u32 index, __u32 backend)
{
	struct member_key key = {.index = index, .backend = backend};

	return bpf_map_lookup_elem(&members, &key) != 0;
}

/* The VIP's lookup table entry for the flow: ids[flow_hash(key, seed) % size]; -1 when the
 * table is not there (yet). */
static __always_inline __s64 pick(struct vip_meta *meta, struct packet *p)
{
	__u32 slot = meta->slot;
	void *table = bpf_map_lookup_elem(&vip_lookup, &slot);

	if (!table || !meta->size)
		return -1;
	__u32 index = murmur3_32(p->key, p->key_length, meta->seed) % meta->size;
	__u32 *id = bpf_map_lookup_elem(table, &index);

	return id ? *id : -1;
}

static __always_inline int fresh(struct flow *flow, struct packet *p, struct settings *cfg, __u64 now)
{
	__u64 timeout = flow->state == FLOW_CLOSING ? cfg->closing_timeout_ns
			: p->protocol == PROTO_TCP ? cfg->tcp_timeout_ns : cfg->other_timeout_ns;

	return now - flow->seen <= timeout;
}

/* Remember a new flow, unless this CPU has taken more new flows this second than the
 * limit: a flood of new flows then cannot push the real ones out of the table. */
static __always_inline void remember(struct packet *p, __u32 backend, struct settings *cfg, __u64 now)
{
	__u32 zero = 0;
	struct rate *rate = bpf_map_lookup_elem(&rates, &zero);

	if (!rate)
		return;
	if (now - rate->window > NS) {
		rate->window = now;
		rate->count = 0;
	}
	if (cfg->new_flows_per_second && ++rate->count > cfg->new_flows_per_second) {
		count(R_FLOW_NOT_REMEMBERED);
		return;
	}
	struct flow flow = {.seen = now, .backend = backend,
			    .state = (p->tcp_flags & (TCP_FIN | TCP_RST)) ? FLOW_CLOSING : FLOW_OPEN};
	bpf_map_update_elem(&flows, p->key, &flow, BPF_ANY);
}

/* The backend for the packet's flow: 0 (none), -1 (pass up: no table), else an id. Drops
 * a new flow while the VIP is closed (*dropped set). Mirrors PythonDataPlane._drain. */
static __always_inline __s64 choose(struct vip_meta *meta, struct packet *p, struct settings *cfg, int *dropped)
{
	int syn = p->protocol == PROTO_TCP && (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
	__u64 now = bpf_ktime_get_ns();
	__s64 id;

	if (!cfg->conntrack) {
		if ((meta->flags & VIP_CLOSED) && syn) {
			*dropped = R_DRAINING;
			return 0;
		}
		return pick(meta, p);
	}
	if (!syn) { /* a bare SYN is a new connection, even on a remembered flow's ports */
		struct flow *flow = bpf_map_lookup_elem(&flows, p->key);

		if (flow && fresh(flow, p, cfg, now)) {
			if (is_member(meta->index, flow->backend)) {
				flow->seen = now;
				if (p->tcp_flags & (TCP_FIN | TCP_RST))
					flow->state = FLOW_CLOSING;
				return flow->backend;
			}
			id = pick(meta, p); /* its backend failed or left: the flow re-hashes */
			if (id > 0) {
				flow->backend = id;
				flow->seen = now;
				count(R_FLOW_REHASHED);
			}
			return id;
		}
	}
	if (meta->flags & VIP_CLOSED) {
		*dropped = R_DRAINING;
		return 0;
	}
	id = pick(meta, p);
	if (id > 0)
		remember(p, id, cfg, now);
	return id;
}

static __always_inline __u16 ipv4_checksum(struct iphdr *ip)
{
	__u32 sum = 0;
	__u16 *words = (__u16 *)ip;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += words[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

/* The outer headers for the backend, as caplance.encapsulation writes them after the outer
 * IPv4 header: into *outer (28 bytes for UDP, 24 for GRE). Returns their length. */
static __always_inline __u32 outer_headers(struct backend *b, struct packet *p, __u8 *outer)
{
	struct iphdr *ip = (void *)outer;
	__u32 length = b->transport == TRANSPORT_GRE ? 24 : 28;

	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(p->ip_length + length);
	ip->id = 0;
	ip->frag_off = bpf_htons(0x4000); /* DF: what does not fit was passed up */
	ip->ttl = 64;
	ip->protocol = b->transport == TRANSPORT_GRE ? PROTO_GRE : PROTO_UDP;
	ip->check = 0;
	__builtin_memcpy(&ip->saddr, b->source, 4);
	__builtin_memcpy(&ip->daddr, b->addr, 4);
	ip->check = ipv4_checksum(ip);
	if (b->transport == TRANSPORT_GRE) {
		__u16 *gre = (void *)(outer + 20);

		gre[0] = 0;
		gre[1] = bpf_htons(p->version == 4 ? ETH_P_IP : ETH_P_IPV6);
	} else {
		__u16 *udp = (void *)(outer + 20);

		udp[0] = bpf_htons(source_port(p->key, p->key_length));
		udp[1] = bpf_htons(b->port);
		udp[2] = bpf_htons(p->ip_length + 8);
		udp[3] = 0; /* no checksum: allowed over IPv4 */
	}
	return length;
}

/* Everything up to the choice of backend, shared by tc and XDP: FORWARD with *chosen set,
 * or PASS / DROP / NOT_OURS with *why set for PASS and DROP. */
static __always_inline enum action decide(void *data, void *data_end, struct packet *p, __u32 *why,
					  struct backend **chosen, __u32 *backend_id, __u32 *vip_slot)
{
	struct vip_key vip = {};
	struct vip_meta *meta = 0;
	__u32 zero = 0;
	enum action action = parse(data, data_end, p, &vip, &meta, why);

	if (action == NOT_OURS || !meta)
		return NOT_OURS;
	count(R_PACKETS_IN);
	if (action == PASS)
		return PASS;
	struct settings *cfg = bpf_map_lookup_elem(&settings, &zero);
	if (!cfg || !cfg->ready) {
		*why = R_PASS_NOT_READY;
		return PASS;
	}
	if (meta->protocol && p->protocol != meta->protocol && p->protocol != PROTO_ICMP &&
	    p->protocol != PROTO_ICMPV6) {
		*why = R_PROTOCOL_NOT_SERVED;
		return DROP;
	}
	if (!(meta->flags & VIP_ALL_PORTS) && has_ports(p->protocol) && p->dport) {
		struct port_key port = {.index = meta->index, .port = p->dport};

		if (!bpf_map_lookup_elem(&vip_ports, &port)) {
			*why = R_PORT_NOT_SERVED;
			return DROP;
		}
	}
	int dropped = 0;
	__s64 id = choose(meta, p, cfg, &dropped);
	if (dropped) {
		*why = dropped;
		return DROP;
	}
	if (id < 0) {
		*why = R_PASS_NOT_READY;
		return PASS;
	}
	if (id == 0) {
		*why = R_NO_BACKEND;
		return DROP;
	}
	__u32 key = id;
	struct backend *b = bpf_map_lookup_elem(&backends, &key);
	if (!b || !b->family) {
		*why = R_NO_SENDER;
		return DROP;
	}
	if (b->family != 4 || !b->transport) { /* IPv6 backends (their UDP needs a sum) and plugins */
		*why = R_PASS_TRANSPORT;
		return PASS;
	}
	*chosen = b;
	*backend_id = key;
	*vip_slot = meta->index;
	return FORWARD;
}

static __always_inline int finish_counting(struct packet *p, __u32 backend_id, __u32 vip_slot)
{
	count(R_FORWARDED);
	add_traffic(&vip_stats, vip_slot, p->ip_length);
	add_traffic(&backend_stats, backend_id, p->ip_length);
	return 0;
}

SEC("tc")
int caplance_tc(struct __sk_buff *skb)
{
	struct packet p = {};
	struct backend *b = 0;
	__u32 why = 0, backend_id = 0, vip_slot = 0;

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + 128 > data_end && skb->len > data_end - data) { /* headers outside the linear part */
		bpf_skb_pull_data(skb, skb->len < 128 ? skb->len : 128);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	enum action action = decide(data, data_end, &p, &why, &b, &backend_id, &vip_slot);

	if (action == NOT_OURS)
		return TC_ACT_OK;
	if (action != FORWARD) {
		count(why);
		return action == DROP ? TC_ACT_SHOT : TC_ACT_OK;
	}
	if ((skb->gso_segs > 1 || checksum_pending(&p)) && !(b->flags & BACKEND_KERNEL_DECAP)) {
		count(R_PASS_CHECKSUM); /* the Python plane's path finishes the checksum first */
		return TC_ACT_OK;
	}
	if (skb->gso_segs > 1) {
		/* an aggregate: the kernel cuts it after we wrap it (the encap flags keep it a tunnel
		 * aggregate, and it lowers the segment size by our overhead) */
	} else if (p.ip_length > b->max_packet) {
		count(R_PASS_TOO_BIG);
		return TC_ACT_OK;
	} else if (skb->len > p.ip_length + sizeof(struct ethhdr)) {
		if (bpf_skb_change_tail(skb, p.ip_length + sizeof(struct ethhdr), 0)) { /* Ethernet padding */
			count(R_ENCAP_FAILED);
			return TC_ACT_SHOT;
		}
	}
	__u8 outer[28];
	__u32 length = outer_headers(b, &p, outer);
	__u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
		      (b->transport == TRANSPORT_GRE ? BPF_F_ADJ_ROOM_ENCAP_L4_GRE : BPF_F_ADJ_ROOM_ENCAP_L4_UDP);

	if (bpf_skb_adjust_room(skb, length, BPF_ADJ_ROOM_MAC, flags)) {
		count(R_ENCAP_FAILED);
		return TC_ACT_SHOT;
	}
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), outer, length, 0)) {
		count(R_ENCAP_FAILED);
		return TC_ACT_SHOT;
	}
	__u16 ip_type = bpf_htons(ETH_P_IP);
	bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &ip_type, 2, 0);
	finish_counting(&p, backend_id, vip_slot);
	struct bpf_redir_neigh nh = {.nh_family = 2 /* AF_INET */};
	__builtin_memcpy(&nh.ipv4_nh, b->nexthop, 4);
	return bpf_redirect_neigh(b->ifindex, &nh, sizeof(nh), 0);
}

SEC("xdp")
int caplance_xdp(struct xdp_md *ctx)
{
	struct packet p = {};
	struct backend *b = 0;
	__u32 why = 0, backend_id = 0, vip_slot = 0;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	enum action action = decide(data, data_end, &p, &why, &b, &backend_id, &vip_slot);

	if (action == NOT_OURS)
		return XDP_PASS;
	if (action != FORWARD) {
		count(why);
		return action == DROP ? XDP_DROP : XDP_PASS;
	}
	if (p.ip_length > b->max_packet) {
		count(R_PASS_TOO_BIG);
		return XDP_PASS;
	}
	if (checksum_pending(&p)) { /* an XDP frame carries no "finish the checksum" mark: pass it up */
		count(R_PASS_CHECKSUM);
		return XDP_PASS;
	}
	__u32 frame = data_end - data;
	if (frame > p.ip_length + sizeof(struct ethhdr)) /* Ethernet padding */
		bpf_xdp_adjust_tail(ctx, (int)(p.ip_length + sizeof(struct ethhdr)) - (int)frame);
	__u8 outer[28];
	__u32 length = outer_headers(b, &p, outer);
	if (bpf_xdp_adjust_head(ctx, -(int)length)) {
		count(R_ENCAP_FAILED);
		return XDP_DROP;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) + 28 > data_end) {
		count(R_ENCAP_FAILED);
		return XDP_DROP;
	}
	if (length == 28)
		__builtin_memcpy((void *)(eth + 1), outer, 28);
	else
		__builtin_memcpy((void *)(eth + 1), outer, 24);
	struct bpf_fib_lookup fib = {};
	fib.family = 2; /* AF_INET */
	fib.ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(&fib.ipv4_src, b->source, 4);
	__builtin_memcpy(&fib.ipv4_dst, b->addr, 4);
	fib.tot_len = p.ip_length + length;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS) {
		/* no neighbour yet (or no route): we cannot undo the wrapping here, so drop and count;
		 * the kernel resolves the neighbour for the next packets the slow path sends */
		count(R_ENCAP_FAILED);
		return XDP_DROP;
	}
	__builtin_memcpy(eth->h_dest, fib.dmac, 6);
	__builtin_memcpy(eth->h_source, fib.smac, 6);
	eth->h_proto = bpf_htons(ETH_P_IP);
	finish_counting(&p, backend_id, vip_slot);
	if (fib.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib.ifindex, 0);
}
