"""Encapsulation headers, pure: UDP, GUE and GRE encoders and decoders. No sockets.

Each ``*_encapsulate`` returns what follows the outer IP header on the wire; each
``*_decapsulate`` takes the same and returns the inner packet or raises
:class:`~caplance.errors.MalformedPacket`. Overheads, counting the outer IP header:

=========  ======  ======
transport  IPv4    IPv6
=========  ======  ======
udp, gue   28      48
gre        24      44
=========  ======  ======
"""

from __future__ import annotations

import struct
from typing import Final

from caplance.errors import MalformedPacket
from caplance.flowhash import source_port

__all__ = [
    "OUTER_IP",
    "gre_encapsulate",
    "gre_decapsulate",
    "udp_encapsulate",
    "udp_decapsulate",
    "gue_decapsulate",
    "strip_outer_ipv4",
    "flow_source_port",
]

#: bytes of the outer IP header, by IP version
OUTER_IP: Final = {4: 20, 6: 40}

_GRE_PROTOCOL = {4: 0x0800, 6: 0x86DD}
_GRE_VERSION = {0x0800: 4, 0x86DD: 6}
_GRE_CHECKSUM, _GRE_ROUTING, _GRE_KEY, _GRE_SEQUENCE = 0x8000, 0x4000, 0x2000, 0x1000
_UDP = struct.Struct("!HHHH")


def _inner_version(inner: bytes) -> int:
    version = inner[0] >> 4 if inner else 0
    if version not in (4, 6):
        raise MalformedPacket("bad_version", f"inner IP version {version}")
    return version


def gre_encapsulate(inner: bytes) -> bytes:
    """A plain RFC 2784 GRE header (no checksum, key or sequence) + ``inner``."""
    return struct.pack("!HH", 0, _GRE_PROTOCOL[_inner_version(inner)]) + inner


def gre_decapsulate(data: bytes) -> bytes:
    """The inner packet of a GRE payload. Accepts the optional checksum, key and sequence
    fields (RFC 2890); refuses version != 0, source routing and protocols other than
    IPv4/IPv6, and an inner packet whose version does not match the protocol type."""
    if len(data) < 4:
        raise MalformedPacket("truncated", "GRE header cut short")
    flags, protocol = struct.unpack_from("!HH", data)
    if flags & 0x0007:
        raise MalformedPacket("gre_version", f"GRE version {flags & 7}")
    if flags & _GRE_ROUTING:
        raise MalformedPacket("gre_routing", "GRE source routing is not supported")
    if protocol not in _GRE_VERSION:
        raise MalformedPacket("gre_protocol", f"GRE protocol type {protocol:#06x}")
    length = 4 + 4 * sum(bool(flags & bit) for bit in (_GRE_CHECKSUM, _GRE_KEY, _GRE_SEQUENCE))
    inner = data[length:]
    if not inner or inner[0] >> 4 != _GRE_VERSION[protocol]:
        raise MalformedPacket("gre_protocol", "inner packet does not match the protocol type")
    return inner


def flow_source_port(key: bytes) -> int:
    """A source port from the inner flow (49152-65535), so the backend's NIC can spread flows
    over its queues (RSS) while every packet of one flow takes the same queue: see
    :func:`caplance.flowhash.source_port`."""
    return source_port(key)


def udp_encapsulate(inner: bytes, source_port: int, destination_port: int) -> bytes:
    """A UDP header (checksum 0: none, allowed over IPv4) + ``inner``."""
    return _UDP.pack(source_port, destination_port, 8 + len(inner), 0) + inner


def udp_decapsulate(data: bytes) -> bytes:
    """The payload of a UDP header + payload, checked against the header's length."""
    if len(data) < 8:
        raise MalformedPacket("truncated", "UDP header cut short")
    length = _UDP.unpack_from(data)[2]
    if length < 8 or length > len(data):
        raise MalformedPacket("bad_udp_length", f"UDP length {length} for {len(data)} bytes")
    return data[8:length]


def gue_decapsulate(payload: bytes) -> bytes:
    """The inner packet of a GUE UDP payload (draft-ietf-intarea-gue).

    Variant 1 (the first two bits 01) is the IP packet itself. Variant 0 has a GUE header:
    its ``hlen`` 32-bit words of options follow the 4-byte base header; data messages whose
    protocol is IPv4 (4) or IPv6 (41) are accepted, control messages are refused.
    """
    if not payload:
        raise MalformedPacket("truncated", "empty GUE payload")
    variant = payload[0] >> 6
    if variant == 1:
        _inner_version(payload)
        return payload
    if variant != 0:
        raise MalformedPacket("gue_variant", f"GUE variant {variant}")
    if len(payload) < 4:
        raise MalformedPacket("truncated", "GUE header cut short")
    if payload[0] & 0x20:
        raise MalformedPacket("gue_control", "GUE control messages are not for us")
    start = 4 + 4 * (payload[0] & 0x1F)
    protocol = payload[1]
    inner = payload[start:]
    if protocol not in (4, 41) or not inner or _inner_version(inner) != (4 if protocol == 4 else 6):
        raise MalformedPacket("gue_protocol", f"GUE protocol {protocol}")
    return inner


def strip_outer_ipv4(datagram: bytes) -> tuple[bytes, bytes]:
    """``(outer source address, payload)`` of an IPv4 datagram as a raw socket returns it."""
    if len(datagram) < 20 or datagram[0] >> 4 != 4:
        raise MalformedPacket("truncated", "outer IPv4 header cut short")
    start = (datagram[0] & 0x0F) * 4
    end = (datagram[2] << 8) | datagram[3]
    if start < 20 or end < start or end > len(datagram):
        raise MalformedPacket("bad_header_length", "outer IPv4 header lengths do not fit")
    return datagram[12:16], datagram[start:end]
