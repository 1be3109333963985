"""Fuzz target: the packet parser and the decapsulators (bytes from the network).

Contract (``caplance.packet``'s docstring, STYLE.md): a function that reads bytes from the
network raises only ``MalformedPacket``; ``is_new_tcp_flow`` and ``tcp_flags`` never raise;
a key that comes out is 13 or 37 bytes and decodes back to itself. The first input byte
picks the function, the rest is the packet. Functions with a caller-side precondition get
inputs that meet it (said at each call).

    python fuzz/fuzz_packet.py [libFuzzer options] [corpus dir]
"""

from __future__ import annotations

import struct
import sys

import atheris

with atheris.instrument_imports(include=["caplance"]):
    from caplance import encapsulation, packet
    from caplance.control_codec import probe_token
    from caplance.errors import MalformedPacket

from findings import Broken, record

TARGET = "packet"


def _check_key(data: bytes, key: bytes) -> None:
    if len(key) not in (13, 37):
        raise Broken(f"flow key of {len(key)} bytes")
    if packet.Flow.from_key(key).key() != key:
        raise Broken("flow key does not round-trip through Flow")


def _flow(data: bytes) -> None:
    try:
        key = packet.flow_key(data)
    except MalformedPacket:
        packet.is_new_tcp_flow(data)  # never raise, parsed or not
        packet.tcp_flags(data)
        return
    _check_key(data, key)
    if packet.parse_flow(data).key() != key:
        raise Broken("parse_flow disagrees with flow_key")
    packet.is_new_tcp_flow(data)
    packet.tcp_flags(data)
    # What the data plane asks of a packet it keyed: its destination, DF, its length, and
    # (on the agent) whether it is a probe.
    packet.destination(key)
    packet.dont_fragment(data)
    packet.ip_length(data)
    token = probe_token(data, key)
    if token is not None and not token.isalnum():
        raise Broken(f"probe token {token!r}")


def _decapsulated(inner: bytes) -> None:
    try:
        packet.flow_key(inner)
    except MalformedPacket:
        pass


def _decap(kind: int, data: bytes) -> None:
    decoders = (encapsulation.gre_decapsulate, encapsulation.udp_decapsulate,
                encapsulation.gue_decapsulate)
    if kind < len(decoders):
        inner = decoders[kind](data)
    else:
        _, inner = encapsulation.strip_outer_ipv4(data)
    _decapsulated(inner)


def _offloads(data: bytes) -> None:
    """The listeners' offload work. ``segment_tcp`` gets any bytes and a positive MSS (its
    callers check the MSS); ``complete_checksum`` any offsets (they come from the kernel's
    virtio-net header); ``has_partial_checksum`` a whole IP header's worth at least (a raw
    IPv4 socket never returns less); ``icmp_too_big`` any bytes."""
    if len(data) < 4:
        return
    mss, start, offset = data[0] * 8 + 1, data[1] - 14, data[2]
    body = data[3:]
    try:
        for segment in packet.segment_tcp(body, mss):
            _decapsulated(segment)
    except MalformedPacket:
        pass
    try:
        packet.complete_checksum(bytearray(body), start, offset)
    except MalformedPacket:
        pass
    if len(body) >= 20:
        packet.has_partial_checksum(body)
    try:
        packet.icmp_too_big(body, struct.unpack("!H", data[1:3])[0])
    except MalformedPacket:
        pass


def test_one_input(data: bytes) -> None:
    if not data:
        return
    choice, rest = data[0] % 9, data[1:]
    try:
        if choice <= 2:
            _flow(rest)
        elif choice == 3:
            try:
                packet.Flow.from_key(rest)
            except MalformedPacket:
                pass
        elif choice <= 7:
            try:
                _decap(choice - 4, rest)
            except MalformedPacket:
                pass
        else:
            _offloads(rest)
    except Exception as exc:  # noqa: BLE001 - anything else is a finding
        record(TARGET, data, exc)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
