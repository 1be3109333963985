"""The ``raw`` listener: raw IP sockets, the original Go Caplance's ``IPConn`` way.

The VIP is a local address (on ``lo`` by default), so the kernel hands a copy of every TCP,
UDP and ICMP packet for it to our raw sockets (a BPF filter keeps other destinations out of
user space). The kernel also answers those packets itself, with a RST (TCP) or an ICMP port
unreachable (UDP): an nftables OUTPUT chain of our own drops every RST and every ICMP error
or echo reply the balancer's stack would send from a VIP (all but the "fragmentation needed"
the balancer itself sends for oversized packets). Dropping on INPUT would hide the packets from the raw socket
as well. IPv4 only: IPv6 raw sockets do not show the IPv6 header.

Several data-plane workers each open their own three sockets; a worker's filter keeps only its
share of the flows (a hash of the source address and ports, see :func:`caplance.bpf.vip_filter`).

A sender on the same host or behind a veth may leave TCP/UDP checksums partial (offload);
the raw socket shows the bytes as they are, so partial checksums are completed here. It also
shows GRO/GSO aggregates of up to 64 KB; the balancer cuts those into segments that fit.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from caplance.bpf import vip_filter
from caplance.errors import CaplanceError
from caplance.netops import IPAddress, NetOps
from caplance.packet import complete_checksum, has_partial_checksum
from caplance.sockets import SocketSource, attach_filter, open_socket

__all__ = ["RawListener"]

_PROTOCOLS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_ICMP)
_CHECKSUM_FIELD = {socket.IPPROTO_TCP: 16, socket.IPPROTO_UDP: 6}


class RawSource(SocketSource):
    """Packets from one raw IP socket, with offloaded checksums completed."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        recv = sock.recv

        def receive_nowait() -> bytes:
            packet = recv(65535)
            if has_partial_checksum(packet):
                fixed = bytearray(packet)
                l4 = (packet[0] & 0x0F) * 4
                complete_checksum(fixed, l4, _CHECKSUM_FIELD[packet[9]])
                return bytes(fixed)
            return packet

        self.receive_nowait = receive_nowait


class RawListener:
    """Listener ``raw``: VIPs on ``interface`` (default ``lo``), raw TCP/UDP/ICMP sockets."""

    name = "raw"
    max_workers = 64

    def __init__(self, *, interface: str = "lo") -> None:
        self.interface = interface
        self.vips: tuple[IPAddress, ...] = ()

    def attach(self, vips: Sequence[IPAddress], netops: NetOps, *, workers: int = 1) -> None:
        if any(vip.version != 4 for vip in vips):
            raise CaplanceError(
                "the raw listener handles IPv4 VIPs only (IPv6 raw sockets hide the IP header);"
                " use listener 'tun' or 'packet' for IPv6 VIPs"
            )
        vip_set = "{ " + ", ".join(str(vip) for vip in vips) + " }"
        netops.add_nft_chain("output", "output", [
            f"ip saddr {vip_set} tcp flags rst drop",
            # the kernel's port/protocol unreachables and echo replies; not our frag-needed
            f"ip saddr {vip_set} icmp type destination-unreachable icmp code != 4 drop",
            f"ip saddr {vip_set} icmp type {{ echo-reply, time-exceeded, parameter-problem }} drop",
        ])
        self.vips = tuple(vips)
        for vip in vips:
            netops.add_address(vip, self.interface)

    def open(self, worker: int, workers: int) -> list[RawSource]:
        sources = []
        try:
            for proto in _PROTOCOLS:
                share = None if workers == 1 else (worker, workers, proto != socket.IPPROTO_ICMP)
                sock = open_socket(socket.AF_INET, socket.SOCK_RAW, proto, what="raw IP listener socket")
                sources.append(RawSource(sock))
                attach_filter(sock, vip_filter(self.vips, link_level=False, share=share))
        except BaseException:
            for source in sources:
                source.close()
            raise
        return sources
