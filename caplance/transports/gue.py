"""``gue``: Generic UDP Encapsulation (draft-ietf-intarea-gue), variant 1: direct IP-in-UDP.

GitHub's GLB and Facebook's Katran send to backends this way. The UDP source port comes from
the inner flow's hash (49152-65535), so a backend NIC's RSS spreads flows over its queues
while each flow stays on one; the destination port is ``port`` (default 6080, like Katran).
Over IPv4 the UDP checksum is 0 (none); over IPv6 the kernel fills it in.

The balancer writes the UDP header itself on a raw socket (to vary the source port per
flow). The agent receives with a plain UDP socket and accepts variant 1 and data messages of
variant 0. Backends that prefer the kernel can decapsulate with ``fou`` instead of the agent::

    ip fou add port 6080 ipproto 4                       # IPv4 in UDP port 6080
    ip link add name gue0 type ipip remote any local any encap fou encap-sport auto encap-dport 6080
    ip link set gue0 up

(``ipproto 41`` with an ``ip6tnl``/``sit`` device for IPv6 inner packets.) Overhead: 28 bytes
over IPv4, 48 over IPv6.
"""

from __future__ import annotations

import socket
from typing import Final

from caplance.bpf import reject_all
from caplance.encapsulation import gue_decapsulate, udp_decapsulate
from caplance.netops import IPAddress, NetOps
from caplance.sockets import allow_fragmentation, attach_filter, family_of, open_socket
from caplance.transports.udp import DatagramReceiver, SocketSender, UdpTransport

__all__ = ["GueTransport", "DEFAULT_PORT"]

DEFAULT_PORT: Final = 6080
_IPV6_CHECKSUM = 7


class GueTransport(UdpTransport):
    """Transport ``gue``. Option ``port``: the backends' GUE port (default 6080)."""

    name = "gue"

    def __init__(self, *, port: int = DEFAULT_PORT, allowed_sources: frozenset[str] = frozenset()) -> None:
        super().__init__(port=port, allowed_sources=allowed_sources)

    def decapsulate(self, data: bytes) -> bytes:
        return gue_decapsulate(udp_decapsulate(data))

    def open_sender(self, backend: IPAddress) -> SocketSender:
        sock = open_socket(family_of(backend), socket.SOCK_RAW, socket.IPPROTO_UDP,
                           what="GUE transport raw socket", connect=(str(backend), 0))
        attach_filter(sock, reject_all())  # send only: no copies of incoming UDP
        if backend.version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_CHECKSUM, 6)  # the kernel sums UDP
        allow_fragmentation(sock)
        return SocketSender(sock, self.encapsulate)

    def open_receiver(self, bind: IPAddress, netops: NetOps) -> DatagramReceiver:
        sock = open_socket(family_of(bind), socket.SOCK_DGRAM, what="GUE transport receiver",
                           bind=(str(bind), self.port))
        netops.push_undo(f"close GUE receiver {bind}:{self.port}", sock.close)
        return DatagramReceiver(sock, self.allowed_sources, gue_decapsulate)
