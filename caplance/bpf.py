"""Classic BPF programs that accept only packets addressed to the VIPs. Pure: builds bytes.

The program runs in the kernel on every packet a raw or ``AF_PACKET`` socket would get, so
the balancer never copies traffic that is not for a VIP to user space. Loads are relative to
the network header (``SKF_NET_OFF``), so one program fits raw IP sockets and packet sockets
whatever the link header is.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from caplance.packet import IPAddress

__all__ = ["vip_filter", "reject_all"]

# Opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_LD_H_ABS = 0x28
_LD_B_ABS = 0x30
_JEQ_K = 0x15
_RET_K = 0x06

_SKF_NET_OFF = -0x100000
_SKF_AD_OFF = -0x1000
_SKF_AD_PROTOCOL = 0
_SKF_AD_PKTTYPE = 4
_PACKET_OUTGOING = 4
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_ACCEPT_BYTES = 0x40000


def vip_filter(vips: Sequence[IPAddress], *, link_level: bool) -> bytes:
    """A program accepting IPv4/IPv6 packets whose destination is one of ``vips``.

    With ``link_level`` (packet sockets) it also checks the EtherType and rejects the host's
    own outgoing packets; without it (IPv4 raw sockets) only IPv4 VIPs are allowed. Raises
    ``ValueError`` on an empty VIP list, IPv6 VIPs without ``link_level``, or too many VIPs.
    """
    if not vips:
        raise ValueError("a VIP filter needs at least one VIP")
    v4 = [vip for vip in vips if vip.version == 4]
    v6 = [vip for vip in vips if vip.version == 6]
    # (opcode, jump-if-true label, jump-if-false label, k); labels resolve to offsets below.
    code: list[tuple[int, str | None, str | None, int] | str] = []
    if link_level:
        code += [
            (_LD_B_ABS, None, None, (_SKF_AD_OFF + _SKF_AD_PKTTYPE) & 0xFFFFFFFF),
            (_JEQ_K, "reject", None, _PACKET_OUTGOING),
            (_LD_H_ABS, None, None, (_SKF_AD_OFF + _SKF_AD_PROTOCOL) & 0xFFFFFFFF),
            (_JEQ_K, "v4" if v4 else "reject", None, _ETH_P_IP),
            (_JEQ_K, "v6" if v6 else "reject", "reject", _ETH_P_IPV6),
        ]
    elif v6:
        raise ValueError("raw IP sockets carry no IPv6 header to filter on; use link_level")
    if v4:
        code.append("v4")
        code.append((_LD_W_ABS, None, None, _SKF_NET_OFF + 16))
        code += [(_JEQ_K, "accept", None, int(address)) for address in v4]
        code.append((_RET_K, None, None, 0))
    if v6:
        code.append("v6")
        for index, address in enumerate(v6):
            words = struct.unpack("!4I", address.packed)
            miss = f"v6_{index + 1}"
            for word_index, word in enumerate(words):
                code.append((_LD_W_ABS, None, None, _SKF_NET_OFF + 24 + 4 * word_index))
                last = word_index == 3
                code.append((_JEQ_K, "accept" if last else None, miss, word))
            code.append(miss)
        code.append((_RET_K, None, None, 0))
    code.append("reject")
    code.append((_RET_K, None, None, 0))
    code.append("accept")
    code.append((_RET_K, None, None, _ACCEPT_BYTES))
    return _assemble(code)


def _assemble(code: list[tuple[int, str | None, str | None, int] | str]) -> bytes:
    labels: dict[str, int] = {}
    position = 0
    for item in code:
        if isinstance(item, str):
            labels[item] = position
        else:
            position += 1
    out = []
    position = 0
    for item in code:
        if isinstance(item, str):
            continue
        opcode, true_label, false_label, k = item
        jt = 0 if true_label is None else labels[true_label] - position - 1
        jf = 0 if false_label is None else labels[false_label] - position - 1
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            raise ValueError("too many VIPs for one classic BPF program")
        out.append(struct.pack("HBBI", opcode, jt, jf, k & 0xFFFFFFFF))
        position += 1
    return b"".join(out)


def reject_all() -> bytes:
    """A program that accepts nothing: for send-only raw sockets, which would otherwise get
    a copy of every packet of their protocol."""
    return _assemble([(_RET_K, None, None, 0)])
