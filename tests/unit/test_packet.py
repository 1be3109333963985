"""caplance.packet: flow keys of known-good packets, errors for garbage, checksums, GSO."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caplance.packet import (
    Flow,
    MalformedPacket,
    complete_checksum,
    flow_key,
    has_partial_checksum,
    internet_checksum,
    ip_length,
    is_new_tcp_flow,
    parse_flow,
    segment_tcp,
    tcp_flags,
)
from tests.builders import checksum, ext8, icmp, ipv4, ipv6, l4_checksum_ok, tcp, udp

CLIENT, VIP = "192.0.2.7", "198.51.100.1"
CLIENT6, VIP6 = "2001:db8::7", "2001:db8:1::1"


def flow(src: str, dst: str, proto: int, sport: int, dport: int) -> Flow:
    return Flow(ipaddress.ip_address(src), ipaddress.ip_address(dst), proto, sport, dport)


def test_ipv4_tcp() -> None:
    packet = ipv4(CLIENT, VIP, 6, tcp(40000, 80))
    assert parse_flow(packet) == flow(CLIENT, VIP, 6, 40000, 80)
    assert len(flow_key(packet)) == 13


def test_ipv4_options_are_skipped_by_ihl() -> None:
    options = b"\x94\x04\x00\x00" + b"\x01" * 8  # router alert + NOPs: IHL 8
    packet = ipv4(CLIENT, VIP, 6, tcp(40001, 443), options=options)
    assert packet[0] & 0xF == 8
    assert parse_flow(packet) == flow(CLIENT, VIP, 6, 40001, 443)


def test_ipv4_trailing_link_padding_is_ignored() -> None:
    packet = ipv4(CLIENT, VIP, 17, udp(5353, 53, b"x"))
    assert parse_flow(packet + b"\x00" * 17) == flow(CLIENT, VIP, 17, 5353, 53)


def test_ipv6_udp() -> None:
    packet = ipv6(CLIENT6, VIP6, 17, udp(1234, 53))
    assert parse_flow(packet) == flow(CLIENT6, VIP6, 17, 1234, 53)
    assert len(flow_key(packet)) == 37


def test_ipv6_extension_headers_are_skipped() -> None:
    ah_body = bytes([2]) + b"\x00" * 14  # AH, payload len 2 -> (2 + 2) * 4 = 16 bytes
    packet = ipv6(CLIENT6, VIP6, 6, tcp(50000, 80),
                  extensions=[(0, ext8()), (43, ext8(1)), (51, ah_body), (60, ext8())])
    assert parse_flow(packet) == flow(CLIENT6, VIP6, 6, 50000, 80)


def test_icmp_echo_keys_by_identifier() -> None:
    ping = ipv4(CLIENT, VIP, 1, icmp(8, 0, struct.pack("!HH", 0x1234, 1)))
    assert parse_flow(ping) == flow(CLIENT, VIP, 1, 0x1234, 0)
    ping6 = ipv6(CLIENT6, VIP6, 58, icmp(128, 0, struct.pack("!HH", 77, 1)))
    assert parse_flow(ping6) == flow(CLIENT6, VIP6, 58, 77, 0)


def test_icmp_fragmentation_needed_is_keyed_by_the_inner_flow_reversed() -> None:
    # The backend sent VIP:80 -> client:40000; a router answers "fragmentation needed" to the VIP.
    inner = ipv4(VIP, CLIENT, 6, tcp(80, 40000, flags=0x18, payload=b"x" * 1400))
    error = ipv4("203.0.113.1", VIP, 1, icmp(3, 4, struct.pack("!HH", 0, 1400), inner[:28]))
    forward = ipv4(CLIENT, VIP, 6, tcp(40000, 80))
    assert flow_key(error) == flow_key(forward)


def test_icmpv6_packet_too_big_is_keyed_by_the_inner_flow_reversed() -> None:
    inner = ipv6(VIP6, CLIENT6, 17, udp(53, 3333, b"y" * 1300))
    error = ipv6("2001:db8:ffff::1", VIP6, 58, icmp(2, 0, struct.pack("!I", 1280), inner[:1232]))
    assert flow_key(error) == flow_key(ipv6(CLIENT6, VIP6, 17, udp(3333, 53)))


def test_ipv4_fragments_share_one_key_without_ports() -> None:
    first = ipv4(CLIENT, VIP, 17, udp(5000, 53, b"a" * 64), more_fragments=True)
    middle = ipv4(CLIENT, VIP, 17, b"b" * 64, more_fragments=True, offset=72)
    last = ipv4(CLIENT, VIP, 17, b"c" * 10, offset=136)
    keys = {flow_key(first), flow_key(middle), flow_key(last)}
    assert keys == {flow(CLIENT, VIP, 17, 0, 0).key()}


def test_ipv6_fragments_share_one_key_without_ports() -> None:
    def frag(offset: int, more: bool, body: bytes) -> bytes:
        header = struct.pack("!BHI", 0, (offset // 8) << 3 | int(more), 0xABCD)
        return ipv6(CLIENT6, VIP6, 17, body, extensions=[(44, header)])

    first = frag(0, True, udp(7000, 53, b"a" * 40))
    second = frag(48, False, b"b" * 40)
    assert flow_key(first) == flow_key(second) == flow(CLIENT6, VIP6, 17, 0, 0).key()


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "truncated"),
        (b"\x45" + b"\x00" * 10, "truncated"),
        (b"\x75" + b"\x00" * 40, "bad_version"),
        (b"\x43" + b"\x00" * 30, "bad_header_length"),
        (ipv4(CLIENT, VIP, 6, tcp(1, 2))[:30], "truncated"),  # total length says 40
        (ipv4(CLIENT, VIP, 6, b"\x00\x01"), "truncated"),  # TCP without room for ports
        (ipv6(CLIENT6, VIP6, 6, tcp(1, 2))[:50], "truncated"),
        (ipv6(CLIENT6, VIP6, 6, b"", extensions=[(0, ext8(4))])[:48], "truncated"),
        (ipv4("1.1.1.1", VIP, 1, icmp(3, 4, payload=b"\x45\x00")), "truncated"),
    ],
)
def test_garbage_raises_the_one_error_type(packet: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket) as caught:
        flow_key(packet)
    assert caught.value.reason == reason


def test_too_many_extension_headers_are_refused() -> None:
    packet = ipv6(CLIENT6, VIP6, 6, tcp(1, 2), extensions=[(60, ext8())] * 9)
    with pytest.raises(MalformedPacket, match="too_many_extension_headers"):
        flow_key(packet)


@settings(max_examples=3000)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_a_key_or_malformed(data: bytes) -> None:
    try:
        key = flow_key(data)
    except MalformedPacket:
        return
    assert len(key) in (13, 37)
    assert Flow.from_key(key).key() == key


@settings(max_examples=1000)
@given(st.sampled_from([
    ipv4(CLIENT, VIP, 6, tcp(1, 2)),
    ipv6(CLIENT6, VIP6, 6, tcp(1, 2), extensions=[(0, ext8()), (60, ext8(1))]),
    ipv4("1.1.1.1", VIP, 1, icmp(3, 4, payload=ipv4(VIP, CLIENT, 6, tcp(80, 9))[:28])),
]), st.integers(0, 120), st.binary(max_size=4), st.integers(0, 119))
def test_damaged_packets_give_a_key_or_malformed(packet: bytes, cut: int, junk: bytes, at: int) -> None:
    damaged = bytearray(packet[:cut])
    damaged[at:at + len(junk)] = junk
    try:
        key = flow_key(bytes(damaged))
    except MalformedPacket:
        return
    assert len(key) in (13, 37)


@given(st.builds(
    Flow,
    st.one_of(st.ip_addresses(v=4)), st.ip_addresses(v=4), st.integers(0, 255),
    st.integers(0, 65535), st.integers(0, 65535),
))
def test_flow_key_round_trips(value: Flow) -> None:
    assert Flow.from_key(value.key()) == value


def test_internet_checksum_matches_rfc1071() -> None:
    data = bytes([0x00, 0x01, 0xF2, 0x03, 0xF4, 0xF5, 0xF6, 0xF7])  # RFC 1071 section 3 example
    assert internet_checksum(data) == ~0xDDF2 & 0xFFFF
    assert internet_checksum(b"\x01\x02\x03") == checksum(b"\x01\x02\x03")


@given(st.binary(max_size=300))
def test_internet_checksum_agrees_with_the_slow_one(data: bytes) -> None:
    assert internet_checksum(data) == checksum(data)


def _with_partial_checksum(packet: bytes, l4: int, field: int) -> bytearray:
    """What a sender with checksum offload puts on the wire: the pseudo-header sum only."""
    raw = bytearray(packet)
    length = len(packet) - l4
    if packet[0] >> 4 == 4:
        pseudo = packet[12:20] + struct.pack("!BBH", 0, packet[9], length)
    else:
        pseudo = packet[8:40] + struct.pack("!IxxxB", length, packet[6])
    struct.pack_into("!H", raw, l4 + field, ~checksum(pseudo) & 0xFFFF)
    return raw


@pytest.mark.parametrize(
    ("packet", "l4", "field"),
    [
        (ipv4(CLIENT, VIP, 6, tcp(40000, 80, payload=b"hello world")), 20, 16),
        (ipv4(CLIENT, VIP, 17, udp(40000, 53, b"odd")), 20, 6),
        (ipv6(CLIENT6, VIP6, 6, tcp(40000, 80, payload=b"v6!")), 40, 16),
    ],
)
def test_partial_checksums_are_detected_and_completed(packet: bytes, l4: int, field: int) -> None:
    partial = _with_partial_checksum(packet, l4, field)
    assert has_partial_checksum(bytes(partial))
    assert not l4_checksum_ok(bytes(partial))
    complete_checksum(partial, l4, field)
    assert l4_checksum_ok(bytes(partial))
    assert not has_partial_checksum(bytes(partial))


@pytest.mark.parametrize("version", [4, 6])
def test_segment_tcp_cuts_a_gso_packet_like_a_nic(version: int) -> None:
    payload = bytes(range(256)) * 12  # 3072 bytes
    segment = tcp(40000, 80, flags=0x19, seq=0xFFFFFF00, payload=payload)  # FIN PSH ACK
    packet = ipv4(CLIENT, VIP, 6, segment, ident=7) if version == 4 else ipv6(CLIENT6, VIP6, 6, segment)
    head = 40 if version == 4 else 60
    segments = segment_tcp(packet, 1000)
    assert [len(s) - head for s in segments] == [1000, 1000, 1000, 72]
    assert b"".join(s[head:] for s in segments) == payload
    for index, seg in enumerate(segments):
        l4 = head - 20
        assert l4_checksum_ok(seg)
        assert struct.unpack_from("!I", seg, l4 + 4)[0] == (0xFFFFFF00 + 1000 * index) & 0xFFFFFFFF
        last = index == len(segments) - 1
        assert seg[l4 + 13] == (0x19 if last else 0x10)
        if version == 4:
            assert checksum(seg[:20]) == 0
            assert struct.unpack_from("!HH", seg, 2) == (len(seg), 7 + index)
        else:
            assert struct.unpack_from("!H", seg, 4)[0] == len(seg) - 40
        assert flow_key(seg) == flow_key(packet)


def test_segment_tcp_refuses_non_tcp() -> None:
    with pytest.raises(MalformedPacket):
        segment_tcp(ipv4(CLIENT, VIP, 17, udp(1, 2, b"x" * 100)), 10)


def test_is_new_tcp_flow() -> None:
    assert is_new_tcp_flow(ipv4(CLIENT, VIP, 6, tcp(1, 80, flags=0x02)))
    assert not is_new_tcp_flow(ipv4(CLIENT, VIP, 6, tcp(1, 80, flags=0x12)))
    assert not is_new_tcp_flow(ipv4(CLIENT, VIP, 6, tcp(1, 80, flags=0x10)))
    assert is_new_tcp_flow(ipv6(CLIENT6, VIP6, 6, tcp(1, 80, flags=0x02)))
    assert not is_new_tcp_flow(ipv4(CLIENT, VIP, 17, udp(1, 80)))
    assert not is_new_tcp_flow(b"\x45")


def test_tcp_flags_of_an_icmp_error_about_a_tcp_flow_are_neutral() -> None:
    inner = ipv4(VIP, CLIENT, 6, tcp(80, 40000, flags=0x18))
    for ident in range(0, 65536, 257):  # the quoted IP ID sits where a TCP flags byte would
        quoted = inner[:4] + struct.pack("!H", ident) + inner[6:28]
        error = ipv4("203.0.113.1", VIP, 1, icmp(3, 4, struct.pack("!HH", 0, 1400), quoted))
        assert tcp_flags(error) == 0x10
    assert tcp_flags(ipv4(CLIENT, VIP, 6, tcp(1, 2, flags=0x11))) == 0x11
    assert tcp_flags(ipv6(CLIENT6, VIP6, 6, tcp(1, 2, flags=0x04), extensions=[(0, ext8())])) == 0x04


def test_ip_length_ignores_link_padding() -> None:
    packet = ipv4(CLIENT, VIP, 6, tcp(1, 2))
    assert ip_length(packet + b"\x00" * 6) == len(packet) == 40
    packet6 = ipv6(CLIENT6, VIP6, 17, udp(1, 2))
    assert ip_length(packet6 + b"\x00" * 3) == len(packet6)
    assert ip_length(b"\x45\x00") == 2


@pytest.mark.parametrize("data", [b"\x00\xff\xff", b"\x45\x00\xff\xff\x00\x00", b"\x60" + b"\xff" * 5])
def test_complete_checksum_refuses_a_packet_shorter_than_an_ip_header(data: bytes) -> None:
    # Found by fuzz/fuzz_packet.py: a checksum that came out 0 made it read the protocol byte
    # past the end (IndexError) instead of raising MalformedPacket.
    with pytest.raises(MalformedPacket, match="truncated"):
        complete_checksum(bytearray(data), 0, 0)


@given(st.binary(max_size=80))
def test_has_partial_checksum_takes_any_bytes(data: bytes) -> None:
    """The raw listener asks it of whatever arrives: never an exception, short input included."""
    assert has_partial_checksum(data) in (True, False)
