// SPDX-License-Identifier: GPL-2.0
/* Caplance's backend side in the kernel: tc (clsact ingress) on the backend's interface.
 *
 * A packet from one of our balancers, in IPv4, to our UDP port (udp and gue transports) or
 * GRE: the outer headers are removed (bpf_skb_adjust_room with the decap flags, as Katran's
 * tc_decap does) and the inner packet goes on into the stack, to the VIP on lo, exactly as
 * the agent's raw-socket injection would put it there. The agent's data-path probes (UDP to
 * port 0 from port 0 inside) are left wrapped, so the agent still sees and echoes them; so is
 * everything else (other sources, other ports): the agent's own receiver handles or refuses
 * it as without this program. Counters by reason in `counters`.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7) /* kernel 6.3; Debian's headers are 6.1 */
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

char LICENSE[] SEC("license") = "GPL";

struct decap_settings {
	__u16 port;               /* our UDP port, host order (0: none) */
	__u8 gre;                 /* 1: take GRE too */
	__u8 pad;
};

enum decap_reason {
	D_DECAPSULATED = 0,
	D_PROBE,                  /* left for the agent: a data-path probe */
	D_NOT_ALLOWED,            /* left for the agent (which refuses it): not from a balancer */
	D_FAILED,                 /* the kernel refused to shrink the packet: left as it was */
	D_COUNT
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct decap_settings);
} decap_settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);       /* an allowed balancer's IPv4 address */
	__type(value, __u8);
} balancers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, D_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} decap_counters SEC(".maps");

static __always_inline void count(__u32 reason)
{
	__u64 *value = bpf_map_lookup_elem(&decap_counters, &reason);

	if (value)
		*value += 1;
}

SEC("tc")
int caplance_decap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 zero = 0;
	struct decap_settings *cfg = bpf_map_lookup_elem(&decap_settings, &zero);

	if (data + 64 > data_end && skb->len > data_end - data) {
		bpf_skb_pull_data(skb, skb->len < 96 ? skb->len : 96);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	if (!cfg || (void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 ||
	    (ip->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_OK;
	__u32 outer = sizeof(*ip);
	__u8 *inner;
	if (ip->protocol == IPPROTO_UDP && cfg->port) {
		__u16 *udp = (void *)(ip + 1);
		if ((void *)(udp + 4) > data_end || udp[1] != bpf_htons(cfg->port))
			return TC_ACT_OK;
		outer += 8;
		inner = (void *)(udp + 4);
	} else if (ip->protocol == IPPROTO_GRE && cfg->gre) {
		__u16 *gre = (void *)(ip + 1);
		if ((void *)(gre + 2) > data_end || gre[0] != 0)  /* plain GRE only: no key, csum, seq */
			return TC_ACT_OK;
		outer += 4;
		inner = (void *)(gre + 2);
	} else {
		return TC_ACT_OK;
	}
	if (!bpf_map_lookup_elem(&balancers, &ip->saddr)) {
		count(D_NOT_ALLOWED);
		return TC_ACT_OK;
	}
	if ((void *)(inner + 40) > data_end && (void *)(inner + 20) > data_end)
		return TC_ACT_OK;
	__u8 version = inner[0] >> 4;
	__u32 l4 = version == 4 ? 20 : 40;
	if ((void *)(inner + l4 + 4) <= data_end) {
		__u8 protocol = version == 4 ? inner[9] : inner[6];
		__u32 *ports = (void *)(inner + l4);
		if (protocol == IPPROTO_UDP && *ports == 0) { /* both ports 0: a probe, for the agent */
			count(D_PROBE);
			return TC_ACT_OK;
		}
	}
	if (version != 4 && version != 6)
		return TC_ACT_OK;
	/* the Ethernet header moves up to sit before the inner packet, with the inner type */
	struct ethhdr moved;
	__builtin_memcpy(&moved, eth, sizeof(moved));
	moved.h_proto = bpf_htons(version == 4 ? ETH_P_IP : ETH_P_IPV6);
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO |
		      (version == 4 ? BPF_F_ADJ_ROOM_DECAP_L3_IPV4 : BPF_F_ADJ_ROOM_DECAP_L3_IPV6);
	if (bpf_skb_adjust_room(skb, -(__s32)outer, BPF_ADJ_ROOM_MAC, flags)) {
		count(D_FAILED);
		return TC_ACT_OK;
	}
	if (bpf_skb_store_bytes(skb, 0, &moved, sizeof(moved), 0)) {
		count(D_FAILED);
		return TC_ACT_SHOT;
	}
	count(D_DECAPSULATED);
	return TC_ACT_OK;
}
