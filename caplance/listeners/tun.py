"""The ``tun`` listener (the default): the VIPs are routed into a TUN device we read.

The balancer's kernel forwards packets for the VIPs into the device like any router would, so
they arrive with complete checksums and already segmented (no GSO super-packets), IPv4 and
IPv6 alike, and the VIP is not a local address: the local stack never answers it (no RST, no
ICMP), and no firewall rule is needed. It needs IP forwarding on in the balancer's namespace;
clients reach the VIP by a route via the balancer (or proxy ARP).

The device is multi-queue (``IFF_MULTI_QUEUE``): each data-plane worker attaches a queue of
its own, and the kernel spreads packets over the queues by flow hash, so every packet of a
flow reaches the same worker. The control plane keeps one queue of its own, detached (it
gets no packets), so the device lives exactly as long as the balancer: it goes when the last
queue is closed, also after a crash.
"""

from __future__ import annotations

from collections.abc import Sequence

from caplance.netops import IPAddress, NetOps, open_tun_queue
from caplance.sockets import FdSource

__all__ = ["TunListener"]


class TunListener:
    """Listener ``tun``: creates ``device`` (MTU ``mtu``), routes each VIP into it."""

    name = "tun"
    max_workers = 256

    def __init__(self, *, device: str = "caplance0", mtu: int = 65535) -> None:
        self.device = device
        self.mtu = mtu

    def attach(self, vips: Sequence[IPAddress], netops: NetOps, *, workers: int = 1) -> None:
        netops.create_tun(self.device, mtu=self.mtu, multi_queue=True, detached=True)
        for vip in vips:
            netops.add_route(vip, ifname=self.device)
        if any(vip.version == 4 for vip in vips):
            netops.set_sysctl("net.ipv4.ip_forward", "1")
        if any(vip.version == 6 for vip in vips):
            netops.set_sysctl("net.ipv6.conf.all.forwarding", "1")

    def open(self, worker: int, workers: int) -> list[FdSource]:
        return [FdSource(open_tun_queue(self.device))]
