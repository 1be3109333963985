"""The ``tun`` listener (the default): the VIPs are routed into a TUN device we read.

The balancer's kernel forwards packets for the VIPs into the device like any router would, so
they arrive with complete checksums and already segmented (no GSO super-packets), IPv4 and
IPv6 alike, and the VIP is not a local address: the local stack never answers it (no RST, no
ICMP), and no firewall rule is needed. It needs IP forwarding on in the balancer's namespace;
clients reach the VIP by a route via the balancer (or proxy ARP).
"""

from __future__ import annotations

from collections.abc import Sequence

from caplance.netops import IPAddress, NetOps
from caplance.sockets import FdSource

__all__ = ["TunListener"]


class TunListener:
    """Listener ``tun``: creates ``device`` (MTU ``mtu``), routes each VIP into it."""

    name = "tun"

    def __init__(self, *, device: str = "caplance0", mtu: int = 65535) -> None:
        self.device = device
        self.mtu = mtu

    def open(self, vips: Sequence[IPAddress], netops: NetOps) -> list[FdSource]:
        fd = netops.create_tun(self.device, mtu=self.mtu)
        for vip in vips:
            netops.add_route(vip, ifname=self.device)
        if any(vip.version == 4 for vip in vips):
            netops.set_sysctl("net.ipv4.ip_forward", "1")
        if any(vip.version == 6 for vip in vips):
            netops.set_sysctl("net.ipv6.conf.all.forwarding", "1")
        return [FdSource(fd)]
