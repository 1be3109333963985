"""Packet builders for tests: plain struct packing, independent of caplance.packet."""

from __future__ import annotations

import ipaddress
import struct


def checksum(data: bytes) -> int:
    """RFC 1071, the slow obvious way (an independent check of caplance's fast one)."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for index in range(0, len(data), 2):
        total += (data[index] << 8) | data[index + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, options: bytes = b"",
         ident: int = 1, more_fragments: bool = False, offset: int = 0, ttl: int = 64) -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    flags = (0x2000 if more_fragments else 0) | (offset // 8)
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(payload), ident,
                         flags, ttl, proto, 0, ipaddress.IPv4Address(src).packed,
                         ipaddress.IPv4Address(dst).packed) + options
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def ipv6(src: str, dst: str, proto: int, payload: bytes, *,
         extensions: list[tuple[int, bytes]] = ()) -> bytes:  # type: ignore[assignment]
    """``extensions``: (header type, body after the next-header byte), in order."""
    chain = b""
    types = [kind for kind, _ in extensions] + [proto]
    for (kind, body), following in zip(extensions, types[1:]):
        chain += bytes([following]) + body
    first = types[0]
    return struct.pack("!IHBB16s16s", 0x60000000, len(chain) + len(payload), first, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + chain + payload


def ext8(length_units: int = 0) -> bytes:
    """Body of an 8-octet-unit extension header (hop-by-hop, routing, dest options)."""
    return bytes([length_units]) + b"\x00" * (6 + 8 * length_units)


def tcp(sport: int, dport: int, *, flags: int = 0x02, seq: int = 1000, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(kind: int, code: int, rest: bytes = b"\x00" * 4, payload: bytes = b"") -> bytes:
    return struct.pack("!BBH", kind, code, 0) + rest + payload


def l4_checksum_ok(packet: bytes) -> bool:
    """Verify the TCP/UDP checksum of a plain IPv4/IPv6 packet, independently."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0xF) * 4
        segment = packet[ihl:struct.unpack_from("!H", packet, 2)[0]]
        pseudo = packet[12:20] + struct.pack("!BBH", 0, packet[9], len(segment))
    else:
        segment = packet[40:]
        pseudo = packet[8:40] + struct.pack("!IxxxB", len(segment), packet[6])
    return checksum(pseudo + segment) == 0
