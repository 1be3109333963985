// SPDX-License-Identifier: GPL-2.0
/* For labs of veth pairs only: native XDP on a veth can send a frame out (XDP_TX, a
 * redirect) only if the peer device has an XDP program of its own; this one passes every
 * frame on, unchanged. `python -m caplance.lab xdp-pass --interface DEV` attaches it. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("xdp")
int caplance_xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
