/* Caplance's kernel data plane: map layouts, shared by name and layout with the Python
 * loader (caplance/dataplane/bpf/layout.py mirrors every struct here; a test compares them).
 *
 * The control plane's ForwardingTable is written into these maps by the BPF data plane:
 *   vips        VIP address -> struct vip_meta (index, table slot, flags, protocol, seed, size)
 *   vip_ports   (index, port) -> 1 for the ports a VIP takes (absent: all ports, VIP_ALL_PORTS)
 *   vip_lookup  slot -> an inner array of backend ids, the VIP's lookup table. Each VIP has
 *               two slots, 2 x index and 2 x index + 1: a new table is filled into the one not
 *               in use and then the VIP's meta (slot, seed, size together, one element update)
 *               points at it -- a table is replaced whole, never edited while packets read it
 *   members     (index, backend id) -> 1 for backends whose established flows keep going
 *   backends    id -> struct backend (where and how to send; 0 = none)
 *   flows       per-CPU LRU: flow key -> struct flow (the backend a flow took; conntrack)
 *   settings    0 -> struct settings (timeouts, the new-flow rate limit)
 *   counters    per-CPU: reason -> packets (drops and packets passed up, by reason)
 *   vip_stats, backend_stats   per-CPU: slot / id -> packets and bytes
 */
#ifndef CAPLANCE_MAPS_H
#define CAPLANCE_MAPS_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#define MAX_VIPS 64
#define MAX_BACKENDS 4096          /* ids 1..4095, as caplance.forwarding.MAX_BACKEND_ID */
#define DEFAULT_FLOWS 65536        /* per CPU; the loader sizes it from [conntrack] max_flows */
#define PLACEHOLDER_TABLE 65537    /* an inner map's size at load; real ones differ (BPF_F_INNER_MAP) */

/* vip_meta.flags */
#define VIP_CLOSED 1               /* admit no new flows (the balancer is stopping) */
#define VIP_ALL_PORTS 2            /* every port is taken (no vip_ports entries) */

/* backend.transport */
#define TRANSPORT_UDP 1            /* udp and gue (variant 1): outer IP + UDP + the inner packet */
#define TRANSPORT_GRE 2            /* outer IP + 4-byte GRE header + the inner packet */

/* flow.state */
#define FLOW_OPEN 0
#define FLOW_CLOSING 1             /* a FIN or RST was seen: the shorter timeout */

struct vip_key {
	__u8 addr[16];             /* IPv4 in the first 4 bytes, the rest 0 */
	__u8 family;               /* 4 or 6 */
	__u8 pad[3];
};

struct vip_meta {
	__u32 index;               /* the VIP's own number: vip_ports, members, vip_stats */
	__u32 slot;                /* its current lookup table in vip_lookup */
	__u32 flags;
	__u32 seed;                /* the lookup table's flow hash seed */
	__u32 size;                /* lookup table slots */
	__u8 protocol;             /* 6 tcp, 17 udp, 0 any (ICMP always) */
	__u8 pad[3];
};

struct port_key {
	__u32 index;
	__u16 port;                /* host order */
	__u16 pad;
};

struct member_key {
	__u32 index;
	__u32 backend;
};

struct backend {
	__u8 addr[16];             /* the backend (outer destination) */
	__u8 source[16];           /* our address toward it (outer source) */
	__u8 nexthop[16];          /* the neighbour to hand the packet to (the backend, or a gateway) */
	__u32 ifindex;             /* the interface toward it */
	__u16 port;                /* UDP destination port, host order (udp, gue) */
	__u16 max_packet;          /* the largest inner packet that fits the path */
	__u8 family;               /* of addr, source, nexthop: 4 or 6 (0: no backend) */
	__u8 transport;
	__u8 flags;                /* BACKEND_KERNEL_DECAP */
	__u8 pad;
};

/* backend.flags */
#define BACKEND_KERNEL_DECAP 1     /* it unwraps in its kernel: a checksum left to offload stays valid */

struct flow_key {
	__u8 bytes[40];            /* the 13- or 37-byte flow key, zero padded */
};

struct flow {
	__u64 seen;                /* bpf_ktime_get_ns() of the last packet */
	__u32 backend;
	__u32 state;
};

struct settings {
	__u64 tcp_timeout_ns;
	__u64 closing_timeout_ns;
	__u64 other_timeout_ns;
	__u64 new_flows_per_second;   /* per CPU; above it new flows are forwarded, not remembered */
	__u32 ready;                  /* 0 until the first table is in: everything is passed up */
	__u32 conntrack;              /* 1: remember flows (the flow table is on) */
};

struct rate {
	__u64 window;                 /* start of the current second, ns */
	__u64 count;
};

struct traffic {
	__u64 packets;
	__u64 bytes;
};

/* counters: what each index counts (layout.py has the same names in the same order) */
enum reason {
	R_PACKETS_IN = 0,             /* packets for a VIP the program looked at */
	R_FORWARDED,                  /* sent on, encapsulated */
	R_NO_BACKEND,                 /* drop: the lookup table has no backend for the flow */
	R_NO_SENDER,                  /* drop: the chosen backend is not in the backend map */
	R_PROTOCOL_NOT_SERVED,        /* drop */
	R_PORT_NOT_SERVED,            /* drop */
	R_DRAINING,                   /* drop: a new flow while the balancer stops */
	R_ENCAP_FAILED,               /* drop: the kernel refused to grow the packet */
	R_PASS_FRAGMENT,              /* passed up: IP fragments */
	R_PASS_OPTIONS,               /* passed up: IPv4 options, IPv6 extension headers */
	R_PASS_ICMP,                  /* passed up: ICMP errors (keyed by the quoted packet) */
	R_PASS_TOO_BIG,               /* passed up: over the path MTU (ICMP too big, fragmentation) */
	R_PASS_NOT_READY,             /* passed up: no table yet */
	R_PASS_TRUNCATED,             /* passed up: headers cut short (the Python plane counts it) */
	R_PASS_TRANSPORT,             /* passed up: a backend the program cannot wrap for (IPv6, a plugin) */
	R_PASS_CHECKSUM,              /* passed up: a checksum left to offload (a local sender, an aggregate)
	                               * for a backend whose agent unwraps in user space */
	R_FLOW_NOT_REMEMBERED,        /* a new flow over the rate limit: forwarded, not in the table */
	R_FLOW_REHASHED,              /* a remembered flow whose backend left: picked afresh */
	R_COUNT
};

#endif
