"""Transport codecs (pure) and the transport conformance check."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caplance import plugins
from caplance.encapsulation import (
    flow_source_port,
    gre_decapsulate,
    gre_encapsulate,
    gue_decapsulate,
    strip_outer_ipv4,
    udp_decapsulate,
)
from caplance.errors import MalformedPacket
from caplance.packet import udp_packet
from caplance.testing import TransportConformanceError, check_transport
from caplance.transports.udp import UdpTransport

INNER4 = udp_packet(ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("10.99.0.1"), 1, 2, b"hi")
INNER6 = udp_packet(ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("fd99::1"), 1, 2, b"hi")


@pytest.mark.parametrize("name", ["udp", "gue", "gre", "gre-raw"])
def test_builtin_transports_pass_the_conformance_check(name: str) -> None:
    check_transport(plugins.load(plugins.TRANSPORTS, name))


def test_the_conformance_check_catches_a_wrong_overhead() -> None:
    class Liar(UdpTransport):
        def overhead(self, outer_version: int) -> int:
            return 8

    with pytest.raises(TransportConformanceError, match="overhead"):
        check_transport(Liar)


def test_the_conformance_check_catches_crashes_on_junk() -> None:
    class Fragile(UdpTransport):
        def decapsulate(self, data: bytes) -> bytes:
            return udp_decapsulate(data) if len(data) > 8 else data[: data[8]]  # IndexError

    with pytest.raises(TransportConformanceError, match="junk"):
        check_transport(Fragile)


def test_the_conformance_check_catches_a_lossy_round_trip() -> None:
    class Lossy(UdpTransport):
        def decapsulate(self, data: bytes) -> bytes:
            return udp_decapsulate(data)[:1400]

    with pytest.raises(TransportConformanceError, match="round trip"):
        check_transport(Lossy)


def test_gre_header_carries_the_inner_protocol() -> None:
    assert gre_encapsulate(INNER4)[:4] == b"\x00\x00\x08\x00"
    assert gre_encapsulate(INNER6)[:4] == b"\x00\x00\x86\xdd"


def test_gre_optional_fields_are_skipped_and_bad_headers_refused() -> None:
    with_key_and_seq = struct.pack("!HHII", 0x3000, 0x0800, 7, 9) + INNER4
    assert gre_decapsulate(with_key_and_seq) == INNER4
    for bad, reason in ((struct.pack("!HH", 1, 0x0800) + INNER4, "gre_version"),
                        (struct.pack("!HH", 0x4000, 0x0800) + INNER4, "gre_routing"),
                        (struct.pack("!HH", 0, 0x6558) + INNER4, "gre_protocol"),
                        (struct.pack("!HH", 0, 0x86DD) + INNER4, "gre_protocol")):
        with pytest.raises(MalformedPacket) as caught:
            gre_decapsulate(bad)
        assert caught.value.reason == reason


def test_gue_variants() -> None:
    assert gue_decapsulate(INNER4) == INNER4  # variant 1: the IP packet itself
    variant0 = bytes([0x01, 4, 0, 0]) + b"\x00" * 4 + INNER4  # hlen 1 word, protocol 4
    assert gue_decapsulate(variant0) == INNER4
    with pytest.raises(MalformedPacket, match="gue_control"):
        gue_decapsulate(bytes([0x20, 0, 0, 0]) + INNER4)
    with pytest.raises(MalformedPacket, match="gue_variant"):
        gue_decapsulate(b"\xc0" + INNER4[1:])


def test_flow_source_ports_are_stable_and_spread() -> None:
    keys = [bytes([i]) * 13 for i in range(200)]
    ports = [flow_source_port(k) for k in keys]
    assert ports == [flow_source_port(k) for k in keys]
    assert all(49152 <= p <= 65535 for p in ports)
    assert len(set(ports)) > 150


def test_outer_ipv4_is_stripped_by_its_header_length() -> None:
    outer = udp_packet(ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2"), 5, 6, INNER4)
    source, payload = strip_outer_ipv4(outer)
    assert source == ipaddress.ip_address("10.0.0.1").packed
    assert udp_decapsulate(payload) == INNER4


@given(st.binary(max_size=120))
def test_decoders_raise_only_malformed(data: bytes) -> None:
    for decode in (gre_decapsulate, gue_decapsulate, udp_decapsulate, strip_outer_ipv4):
        try:
            decode(data)
        except MalformedPacket:
            pass
