"""The ``packet`` listener: an ``AF_PACKET`` socket with a BPF filter; the VIP is not local.

Packet sockets see frames before the IP layer, so the kernel need not own the VIP. We add a
blackhole route for each VIP, so the balancer's stack drops those packets silently whether or
not IP forwarding is on (no RST, no ICMP, no forwarding them elsewhere). Clients reach the VIP
by a route via the balancer (a router's static or BGP route, in production).

Several data-plane workers each open a socket of their own in one ``PACKET_FANOUT`` group
(``PACKET_FANOUT_HASH``): the kernel gives each packet to one member by flow hash, so every
packet of a flow reaches the same worker.

It reads Ethernet frames (``SOCK_RAW``: the kernel offers the virtio-net header only there),
so it needs an Ethernet interface named in the config. Packets come with a ``virtio_net_hdr`` (``PACKET_VNET_HDR``) that says what the sender's
offloads left undone: a partial TCP/UDP checksum is completed, and a GSO/GRO super-packet of
up to 64 KB is cut into MSS-sized segments, before forwarding.
"""

from __future__ import annotations

import collections
import secrets
import socket
import struct
from collections.abc import Sequence

from caplance.bpf import vip_filter
from caplance.errors import CaplanceError, MalformedPacket
from caplance.netops import IPAddress, NetOps, read_link_type
from caplance.packet import complete_checksum, ip_length, segment_tcp
from caplance.sockets import SocketSource, attach_filter, open_socket

__all__ = ["PacketListener"]

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_VNET_HDR = 15
_PACKET_IGNORE_OUTGOING = 23
_PACKET_FANOUT = 18
_PACKET_FANOUT_HASH = 0
_VNET_HEADER = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start/offset
_NEEDS_CSUM = 1
_GSO_TCP = (1, 4)
_VLAN_TAGS = (b"\x81\x00", b"\x88\xa8")
_MIN_PAYLOAD = 46  # an Ethernet frame carries at least this much: shorter packets are padded
_ARPHRD_ETHER = 1
_ARPHRD_LOOPBACK = 772  # VIRTIO_NET_HDR_GSO_TCPV4, _TCPV6 (the ECN bit 0x80 masked off)


class VnetSource(SocketSource):
    """Ethernet frames from a packet socket with virtio-net headers, returned as IP packets
    with the offload work finished."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        recv = sock.recv
        pending: collections.deque[bytes] = collections.deque()
        size = 65535 + _VNET_HEADER.size + 18
        fast_start = _VNET_HEADER.size + 14

        def receive_nowait() -> bytes:
            if pending:
                return pending.popleft()
            data = recv(size)
            # Fast path: nothing left undone, untagged IPv4 (0x0800) or IPv6 (0x86DD) frame.
            if not data[0] & _NEEDS_CSUM and not data[1] and data[fast_start - 2] in (0x08, 0x86):
                if len(data) < fast_start + _MIN_PAYLOAD:  # maybe Ethernet padding: cut it off
                    return _unpadded(data[fast_start:])
                return data[fast_start:]
            return _finish_offloads(data, pending)

        self.receive_nowait = receive_nowait


def _finish_offloads(data: bytes, pending: collections.deque[bytes]) -> bytes:
    """The slow path: strip a VLAN tag, complete a partial checksum, split a GSO packet
    (the first segment is returned, the others queued in ``pending``)."""
    flags, gso_type, _, gso_size, csum_start, csum_offset = _VNET_HEADER.unpack_from(data)
    link = 14
    while data[_VNET_HEADER.size + link - 2 : _VNET_HEADER.size + link] in _VLAN_TAGS:
        link += 4
    start = _VNET_HEADER.size + link
    packet = bytearray(data[start:])
    try:
        if flags & _NEEDS_CSUM:
            complete_checksum(packet, csum_start - link, csum_offset)
        if gso_type & 0x7F in _GSO_TCP and gso_size:
            segments = segment_tcp(bytes(packet), gso_size)
            pending.extend(segments[1:])
            return segments[0]
    except MalformedPacket:
        pass  # forward as received; the flow parser downstream counts it if it is garbage
    return _unpadded(bytes(packet))


def _unpadded(packet: bytes) -> bytes:
    """Drop Ethernet padding (frames are at least 60 bytes): the backend's raw socket would
    take a padded packet's length as its own and break the TCP checksum."""
    length = ip_length(packet)
    return packet[:length] if length < len(packet) else packet


class PacketListener:
    """Listener ``packet``: ``AF_PACKET`` sockets on Ethernet ``interface``, one per worker."""

    name = "packet"
    max_workers = 256

    def __init__(self, *, interface: str) -> None:
        self.interface = interface
        self.vips: tuple[IPAddress, ...] = ()
        #: the fan-out group of this balancer's sockets (picked at attach)
        self.group = 0

    def attach(self, vips: Sequence[IPAddress], netops: NetOps, *, workers: int = 1) -> None:
        link_type = read_link_type(self.interface)
        if link_type not in (_ARPHRD_ETHER, _ARPHRD_LOOPBACK):
            raise CaplanceError(
                f"the packet listener needs an Ethernet interface; {self.interface} has link"
                f" type {link_type}. Use listener 'tun' or 'raw'."
            )
        self.vips = tuple(vips)
        self.group = secrets.randbelow(0xFFFF) + 1
        for vip in vips:
            netops.add_route(vip, ifname=None)

    def open(self, worker: int, workers: int) -> list[VnetSource]:
        sock = open_socket(
            socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL),
            what="AF_PACKET listener socket",
        )
        try:
            sock.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
            try:
                sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
            except OSError:
                pass  # kernels before 4.20: the BPF filter rejects outgoing packets anyway
            attach_filter(sock, vip_filter(self.vips, link_level=True))
            sock.bind((self.interface, _ETH_P_ALL))
            if workers > 1:
                sock.setsockopt(_SOL_PACKET, _PACKET_FANOUT, self.group | _PACKET_FANOUT_HASH << 16)
        except OSError as exc:
            sock.close()
            raise CaplanceError(f"cannot set up the packet listener on {self.interface}:"
                                f" {exc.strerror or exc}") from exc
        except BaseException:
            sock.close()
            raise
        return [VnetSource(sock)]
