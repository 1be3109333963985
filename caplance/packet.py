"""Pure parsing of whole IP packets into flow keys. No sockets, no trio.

A *flow key* is the bytes ``src + dst + protocol + src_port + dst_port``: 13 bytes for
IPv4 (4 + 4 + 1 + 2 + 2), 37 for IPv6 (16 + 16 + 1 + 2 + 2). Selectors hash these bytes, so
every balancer in every process computes the same key for the same packet.

How packets are keyed:

* TCP, UDP, UDP-Lite, SCTP, DCCP: the 5-tuple.
* ICMP / ICMPv6 echo request and reply: the identifier stands in for the source port
  (destination port 0), so one ``ping`` session sticks to one backend.
* ICMP errors (destination unreachable -- including *fragmentation needed* --, time exceeded,
  parameter problem; ICMPv6 1-4, *packet too big* among them): keyed by the **inner** packet's
  flow, reversed. The inner packet is one the backend sent (from the VIP to the client), so
  reversing it gives the client -> VIP flow, and the error reaches the backend that owns the
  connection.
* IP fragments (IPv4 MF flag or a non-zero offset; IPv6 Fragment header): keyed by
  ``(src, dst, protocol)`` with both ports 0, for the first fragment as well as the others,
  because only the first carries ports. All fragments of a datagram therefore reach the same
  backend, which reassembles them. Maglev (NSDI 2016, section 4.3) does the same. The price: a
  flow whose packets are sometimes fragmented and sometimes not can use two backends.
* Anything else IP: ``(src, dst, protocol)`` with ports 0.

Every function that reads bytes from the network raises only :class:`MalformedPacket`.
"""

from __future__ import annotations

import ipaddress
import struct
import sys

import attrs

from caplance.errors import MalformedPacket

__all__ = [
    "PORT_PROTOCOLS",
    "Flow",
    "IPAddress",
    "MalformedPacket",
    "complete_checksum",
    "destination",
    "flow_key",
    "internet_checksum",
    "is_new_tcp_flow",
    "tcp_flags",
    "udp_packet",
    "icmp_too_big",
    "dont_fragment",
    "ip_length",
    "parse_flow",
    "segment_tcp",
]

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136

#: Protocols whose header starts with a 16-bit source port and a 16-bit destination port.
PORT_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_DCCP, IPPROTO_SCTP, IPPROTO_UDPLITE})

_ICMP4_ERRORS = frozenset({3, 4, 5, 11, 12})  # unreachable, quench, redirect, time exceeded, param
_ICMP4_ECHO = frozenset({0, 8})
_ICMP6_ERRORS = frozenset({1, 2, 3, 4})  # unreachable, packet too big, time exceeded, param
_ICMP6_ECHO = frozenset({128, 129})
_ICMP = {4: (IPPROTO_ICMP, _ICMP4_ERRORS, _ICMP4_ECHO), 6: (IPPROTO_ICMPV6, _ICMP6_ERRORS, _ICMP6_ECHO)}

# IPv6 extension headers we step over: hop-by-hop, routing, destination options, mobility,
# HIP, shim6 (length in 8-octet units, not counting the first 8) and AH (4-octet units, minus 2).
_IPV6_EXT_8 = frozenset({0, 43, 60, 135, 139, 140})
_IPV6_AH = 51
_IPV6_FRAGMENT = 44
_IPV6_MAX_EXT = 8  # more extension headers than this is treated as hostile

#: An IPv4 or IPv6 address.
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NO_PORTS = b"\x00\x00\x00\x00"
_PROTO_BYTES = [bytes((p,)) for p in range(256)]


@attrs.frozen
class Flow:
    """A decoded flow key: addresses, protocol and ports (0 where the protocol has none)."""

    src: IPAddress
    dst: IPAddress
    protocol: int
    src_port: int
    dst_port: int

    @classmethod
    def from_key(cls, key: bytes) -> Flow:
        """Decode a key made by :func:`flow_key`. Raises :class:`MalformedPacket` on a bad key."""
        if len(key) == 13:
            width = 4
        elif len(key) == 37:
            width = 16
        else:
            raise MalformedPacket("bad_key", f"a flow key is 13 or 37 bytes, not {len(key)}")
        sport, dport = struct.unpack_from("!HH", key, 2 * width + 1)
        return cls(
            src=ipaddress.ip_address(key[:width]),
            dst=ipaddress.ip_address(key[width : 2 * width]),
            protocol=key[2 * width],
            src_port=sport,
            dst_port=dport,
        )

    def key(self) -> bytes:
        """The flow key bytes, as :func:`flow_key` makes them."""
        return (
            self.src.packed
            + self.dst.packed
            + _PROTO_BYTES[self.protocol]
            + struct.pack("!HH", self.src_port, self.dst_port)
        )


def flow_key(packet: bytes) -> bytes:
    """Return the flow key of a whole IPv4 or IPv6 packet (see the module docstring).

    Raises :class:`MalformedPacket` for truncated or garbage input, and for nothing else.
    This is the data plane's per-packet call: it allocates only the key.
    """
    if not packet:
        raise MalformedPacket("truncated", "empty packet")
    version = packet[0] >> 4
    if version == 4:
        return _ipv4_key(packet, inner=False)
    if version == 6:
        return _ipv6_key(packet, inner=False)
    raise MalformedPacket("bad_version", f"IP version {version}")


def parse_flow(packet: bytes) -> Flow:
    """The :class:`Flow` of a packet: :func:`flow_key`, decoded."""
    return Flow.from_key(flow_key(packet))


def destination(key: bytes) -> bytes:
    """The packed destination address inside a flow key."""
    return key[4:8] if len(key) == 13 else key[16:32]


def is_new_tcp_flow(packet: bytes) -> bool:
    """True for a TCP SYN without ACK (a connection attempt). Plain IPv4/IPv6 headers only;
    anything it cannot read is not a SYN. Never raises."""
    try:
        version = packet[0] >> 4
        if version == 4:
            if packet[9] != IPPROTO_TCP or packet[6] & 0x1F or packet[7]:
                return False
            flags = packet[(packet[0] & 0x0F) * 4 + 13]
        elif version == 6:
            if packet[6] != IPPROTO_TCP:
                return False
            flags = packet[40 + 13]
        else:
            return False
    except IndexError:
        return False
    return flags & 0x12 == 0x02


def tcp_flags(packet: bytes) -> int:
    """The TCP flags byte of a TCP packet (IPv4, or IPv6 with extension headers stepped
    over); 0x10 (a plain ACK) where it cannot be read, as in non-first fragments. Never raises."""
    try:
        if packet[0] >> 4 == 4:
            if packet[9] != IPPROTO_TCP or packet[6] & 0x1F or packet[7]:
                return 0x10  # not TCP itself (an ICMP error about a TCP flow), or a fragment
            return packet[(packet[0] & 0x0F) * 4 + 13]
        proto, offset = packet[6], 40
        for _ in range(_IPV6_MAX_EXT):
            if proto in _IPV6_EXT_8:
                proto, offset = packet[offset], offset + (packet[offset + 1] + 1) * 8
            elif proto == _IPV6_AH:
                proto, offset = packet[offset], offset + (packet[offset + 1] + 2) * 4
            else:
                break
        return packet[offset + 13] if proto == IPPROTO_TCP else 0x10
    except IndexError:
        return 0x10


def _ipv4_key(packet: bytes, *, inner: bool) -> bytes:
    n = len(packet)
    if n < 20:
        raise MalformedPacket("truncated", f"{n} bytes, an IPv4 header needs 20")
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20:
        raise MalformedPacket("bad_header_length", f"IPv4 IHL {ihl // 4}")
    if inner:
        # An ICMP error quotes the start of a packet: the length field counts bytes not quoted.
        end = n
        if end < ihl:
            raise MalformedPacket("truncated", "quoted IPv4 header cut short")
    else:
        end = (packet[2] << 8) | packet[3]
        if end < ihl:
            raise MalformedPacket("bad_total_length", f"total length {end} < header {ihl}")
        if end > n:
            raise MalformedPacket("truncated", f"total length {end} > {n} bytes received")
    proto = packet[9]
    addresses = packet[12:20]
    if packet[6] & 0x3F or packet[7]:  # MF flag or a fragment offset: key without ports
        return addresses + _PROTO_BYTES[proto] + _NO_PORTS
    return _transport_key(packet, addresses, proto, ihl, end, version=4, inner=inner)


def _ipv6_key(packet: bytes, *, inner: bool) -> bytes:
    n = len(packet)
    if n < 40:
        raise MalformedPacket("truncated", f"{n} bytes, an IPv6 header needs 40")
    if inner:
        end = n
    else:
        end = 40 + ((packet[4] << 8) | packet[5])
        if end > n:
            raise MalformedPacket("truncated", f"payload length says {end} bytes, got {n}")
    addresses = packet[8:40]
    proto = packet[6]
    offset = 40
    for _ in range(_IPV6_MAX_EXT):
        if proto in _IPV6_EXT_8:
            if end < offset + 8:
                raise MalformedPacket("truncated", "IPv6 extension header cut short")
            proto, offset = packet[offset], offset + (packet[offset + 1] + 1) * 8
        elif proto == _IPV6_AH:
            if end < offset + 8:
                raise MalformedPacket("truncated", "IPv6 AH header cut short")
            proto, offset = packet[offset], offset + (packet[offset + 1] + 2) * 4
        elif proto == _IPV6_FRAGMENT:
            if end < offset + 8:
                raise MalformedPacket("truncated", "IPv6 fragment header cut short")
            # The fragment header's next-header is the same in every fragment of a datagram.
            return addresses + _PROTO_BYTES[packet[offset]] + _NO_PORTS
        else:
            break
    else:
        raise MalformedPacket("too_many_extension_headers", f"more than {_IPV6_MAX_EXT}")
    if offset > end:
        raise MalformedPacket("truncated", "IPv6 extension headers run past the packet")
    return _transport_key(packet, addresses, proto, offset, end, version=6, inner=inner)


def _transport_key(packet: bytes, addresses: bytes, proto: int, offset: int, end: int, *,
                   version: int, inner: bool) -> bytes:
    """The key from the transport header at ``offset``: ports, an ICMP echo identifier, or
    an ICMP error's quoted packet (reversed)."""
    if proto in PORT_PROTOCOLS:
        if end < offset + 4:
            raise MalformedPacket("truncated", "no room for the ports")
        return addresses + _PROTO_BYTES[proto] + packet[offset : offset + 4]
    icmp, errors, echo = _ICMP[version]
    if proto == icmp:
        if end < offset + 8:
            raise MalformedPacket("truncated", "ICMP header cut short")
        icmp_type = packet[offset]
        if icmp_type in errors and not inner:
            quoted = packet[offset + 8 : end]
            return _reverse(_ipv4_key(quoted, inner=True) if version == 4 else _ipv6_key(quoted, inner=True))
        if icmp_type in echo:
            return addresses + _PROTO_BYTES[proto] + packet[offset + 4 : offset + 6] + b"\x00\x00"
    return addresses + _PROTO_BYTES[proto] + _NO_PORTS


def _reverse(key: bytes) -> bytes:
    """Swap source and destination (addresses and ports) of a flow key."""
    width = 4 if len(key) == 13 else 16
    a, b, proto = key[:width], key[width : 2 * width], key[2 * width : 2 * width + 1]
    ports = key[2 * width + 1 :]
    return b + a + proto + ports[2:] + ports[:2]


# ---------------------------------------------------------------------------------------------
# Checksums and segmentation: used by listeners that receive packets whose transport checksum
# the sender's NIC offload left unfinished, or that the kernel coalesced (GSO/GRO).


def _ones_complement_sum(data: bytes | bytearray | memoryview) -> int:
    """16-bit ones' complement sum of ``data`` (big-endian words), folded, not inverted."""
    view = memoryview(data)
    if len(view) % 2:
        view = memoryview(bytes(view) + b"\x00")
    total = sum(view.cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    if sys.byteorder == "little":
        # Summing byte-swapped words gives the byte-swapped sum (RFC 1071 section 2(B)).
        total = ((total & 0xFF) << 8) | (total >> 8)
    return total


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """The RFC 1071 Internet checksum of ``data``."""
    return ~_ones_complement_sum(data) & 0xFFFF


def complete_checksum(packet: bytearray, start: int, offset: int) -> None:
    """Finish a partial checksum in place, as a NIC with checksum offload would.

    The sender left the pseudo-header sum at ``start + offset``; the checksum covers
    ``packet[start:]`` (Linux ``csum_start`` / ``csum_offset``). Raises
    :class:`MalformedPacket` if the offsets do not fit or the packet is shorter than an IP header.
    """
    if start + offset + 2 > len(packet) or start < 0:
        raise MalformedPacket("bad_checksum_offset", f"start {start} offset {offset}")
    if len(packet) < 20:  # the protocol byte below must be there (found by fuzz/fuzz_packet.py)
        raise MalformedPacket("truncated", f"{len(packet)} bytes, an IP header needs 20")
    value = internet_checksum(memoryview(packet)[start:])
    if value == 0 and packet[9 if packet[0] >> 4 == 4 else 6] == IPPROTO_UDP:
        value = 0xFFFF  # UDP sends a computed 0 as all ones
    struct.pack_into("!H", packet, start + offset, value)


def _pseudo_header_sum(packet: bytes | bytearray, l4_offset: int, l4_length: int) -> int:
    """Ones' complement sum (folded, not inverted) of the TCP/UDP pseudo-header, read in
    place: the raw listener asks this for every packet, so it allocates nothing."""
    if packet[0] >> 4 == 4:
        start, end, proto = 12, 20, packet[9]
    else:
        start, end, proto = 8, 40, packet[6]
    total = proto + (l4_length >> 16) + (l4_length & 0xFFFF)
    for index in range(start, end, 2):
        total += (packet[index] << 8) | packet[index + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp_packet(src: IPAddress, dst: IPAddress, sport: int, dport: int, payload: bytes) -> bytes:
    """A whole IPv4 or IPv6 UDP packet with correct checksums (TTL/hop limit 64)."""
    length = 8 + len(payload)
    udp = bytearray(struct.pack("!HHHH", sport, dport, length, 0) + payload)
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, IPPROTO_UDP, length)
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, 64,
                                       IPPROTO_UDP, 0, src.packed, dst.packed))
        struct.pack_into("!H", header, 10, internet_checksum(header))
    else:
        pseudo = src.packed + dst.packed + struct.pack("!IxxxB", length, IPPROTO_UDP)
        header = bytearray(struct.pack("!IHBB16s16s", 0x60000000, length, IPPROTO_UDP, 64,
                                       src.packed, dst.packed))
    checksum = internet_checksum(pseudo + udp) or 0xFFFF
    struct.pack_into("!H", udp, 6, checksum)
    return bytes(header + udp)


def ip_length(packet: bytes) -> int:
    """The length an IPv4/IPv6 header says its packet has (link padding not counted); the
    buffer's own length if the header is too short to say."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        return (packet[2] << 8) | packet[3]
    if len(packet) >= 40 and packet[0] >> 4 == 6:
        return 40 + ((packet[4] << 8) | packet[5])
    return len(packet)


def dont_fragment(packet: bytes) -> bool:
    """True if routers may not fragment ``packet``: IPv4 with DF set, or any IPv6 packet."""
    return packet[0] >> 4 == 6 or bool(packet[6] & 0x40)


_IPV4_QUOTE = 548  # ICMP error <= 576 bytes (RFC 1812 4.3.2.3)
_IPV6_QUOTE = 1280 - 48  # ICMPv6 error <= the minimum MTU (RFC 4443 2.4)


def icmp_too_big(packet: bytes, mtu: int) -> bytes:
    """The ICMP "fragmentation needed" (IPv4, type 3 code 4) or ICMPv6 "packet too big"
    (type 2) telling the sender of ``packet`` that ``mtu`` bytes fit. It comes from the
    packet's destination (the VIP) and quotes as much of the packet as the RFCs allow.
    Raises :class:`MalformedPacket` if ``packet`` is not a plain IPv4/IPv6 packet."""
    if len(packet) < 20:
        raise MalformedPacket("truncated", "too short to answer")
    if packet[0] >> 4 == 4:
        src, dst = packet[16:20], packet[12:16]
        body = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, min(mtu, 0xFFFF)) + packet[:_IPV4_QUOTE])
        struct.pack_into("!H", body, 2, internet_checksum(body))
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64,
                                       IPPROTO_ICMP, 0, src, dst))
        struct.pack_into("!H", header, 10, internet_checksum(header))
        return bytes(header + body)
    if packet[0] >> 4 != 6 or len(packet) < 40:
        raise MalformedPacket("bad_version", "not an IPv4 or IPv6 packet")
    src6, dst6 = bytes(packet[24:40]), bytes(packet[8:24])
    body6 = bytearray(struct.pack("!BBHI", 2, 0, 0, max(mtu, 1280)) + packet[:_IPV6_QUOTE])
    pseudo = src6 + dst6 + struct.pack("!IxxxB", len(body6), IPPROTO_ICMPV6)
    struct.pack_into("!H", body6, 2, internet_checksum(pseudo + body6))
    return struct.pack("!IHBB16s16s", 0x60000000, len(body6), IPPROTO_ICMPV6, 64, src6, dst6) + bytes(body6)


def has_partial_checksum(packet: bytes) -> bool:
    """True if a TCP/UDP packet carries only the pseudo-header sum in its checksum field.

    Linux leaves that value there for checksum offload (``CHECKSUM_PARTIAL``); a raw socket
    hands such packets up unchanged when the sender is on the same host or a veth peer.
    Only plain IPv4/IPv6 headers without extension headers are examined; others (and
    anything shorter than an IPv4 header) return False.
    """
    if len(packet) < 20:
        return False
    version = packet[0] >> 4
    if version == 4:
        l4 = (packet[0] & 0x0F) * 4
        end = (packet[2] << 8) | packet[3]
        proto = packet[9]
    elif version == 6:
        l4, end, proto = 40, 40 + ((packet[4] << 8) | packet[5]), packet[6]
    else:
        return False
    field = 16 if proto == IPPROTO_TCP else 6 if proto == IPPROTO_UDP else -1
    if field < 0 or end > len(packet) or l4 + field + 2 > end:
        return False
    stored = (packet[l4 + field] << 8) | packet[l4 + field + 1]
    return stored == _pseudo_header_sum(packet, l4, end - l4)


def segment_tcp(packet: bytes, mss: int) -> list[bytes]:
    """Split one coalesced (GSO/GRO) TCP packet into segments of at most ``mss`` payload bytes.

    Each segment gets its own IP length (and IPv4 identification and header checksum), its
    sequence number, the flags a real sender would give it (FIN and PSH only on the last, CWR
    only on the first) and a full TCP checksum. IPv4 and IPv6 without extension headers.
    Raises :class:`MalformedPacket` if the packet is not such a TCP packet.
    """
    if mss <= 0:
        raise ValueError(f"mss must be positive, got {mss}")
    if not packet:
        raise MalformedPacket("truncated", "empty packet")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            raise MalformedPacket("truncated", "IPv4 header cut short")
        ip_len = (packet[0] & 0x0F) * 4
        proto = packet[9]
    elif version == 6:
        ip_len = 40
        proto = packet[6] if len(packet) >= 40 else -1
    else:
        raise MalformedPacket("bad_version", f"IP version {version}")
    if proto != IPPROTO_TCP or len(packet) < ip_len + 20:
        raise MalformedPacket("not_tcp", "only plain TCP packets can be segmented")
    tcp_len = (packet[ip_len + 12] >> 4) * 4
    head_len = ip_len + tcp_len
    if tcp_len < 20 or len(packet) < head_len:
        raise MalformedPacket("truncated", "TCP header cut short")
    payload = memoryview(packet)[head_len:]
    if len(payload) <= mss:
        return [bytes(packet)]
    (seq,) = struct.unpack_from("!I", packet, ip_len + 4)
    ip_id = struct.unpack_from("!H", packet, 4)[0] if version == 4 else 0
    flags = packet[ip_len + 13]
    segments = []
    count = (len(payload) + mss - 1) // mss
    for index in range(count):
        chunk = payload[index * mss : (index + 1) * mss]
        seg = bytearray(packet[:head_len])
        seg += chunk
        if version == 4:
            struct.pack_into("!HH", seg, 2, len(seg), (ip_id + index) & 0xFFFF)
            struct.pack_into("!H", seg, 10, 0)
            struct.pack_into("!H", seg, 10, internet_checksum(seg[:ip_len]))
        else:
            struct.pack_into("!H", seg, 4, len(seg) - 40)
        struct.pack_into("!I", seg, ip_len + 4, (seq + index * mss) & 0xFFFFFFFF)
        seg_flags = flags
        if index != count - 1:
            seg_flags &= ~0x09  # FIN, PSH
        if index != 0:
            seg_flags &= ~0x80  # CWR
        seg[ip_len + 13] = seg_flags
        struct.pack_into("!H", seg, ip_len + 16, 0)
        l4_length = len(seg) - ip_len
        total = _pseudo_header_sum(seg, ip_len, l4_length) + _ones_complement_sum(seg[ip_len:])
        total = (total & 0xFFFF) + (total >> 16)
        struct.pack_into("!H", seg, ip_len + 16, ~total & 0xFFFF)
        segments.append(bytes(seg))
    return segments
