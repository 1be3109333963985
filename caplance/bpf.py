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

#: a worker's share of the packets: (worker, workers, key on ports as well as the source)
Share = tuple[int, int, bool]

# Opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_LD_H_ABS = 0x28
_LD_B_ABS = 0x30
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06
_LDX_B_MSH = 0xB1
_LD_W_IND = 0x40
_ST = 0x02
_LDX_MEM = 0x61
_XOR_X = 0xAC
_RSH_K = 0x74
_MOD_K = 0x94
_MUL_K = 0x24
_TAX = 0x07
_GOLDEN = 0x9E3779B1  # Knuth's multiplicative hash: every input bit reaches the top half

_SKF_NET_OFF = -0x100000
_SKF_AD_OFF = -0x1000
_SKF_AD_PROTOCOL = 0
_SKF_AD_PKTTYPE = 4
_PACKET_OUTGOING = 4
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_ACCEPT_BYTES = 0x40000


def vip_filter(vips: Sequence[IPAddress], *, link_level: bool, share: Share | None = None) -> bytes:
    """A program accepting IPv4/IPv6 packets whose destination is one of ``vips``.

    With ``link_level`` (packet sockets) it also checks the EtherType and rejects the host's
    own outgoing packets; without it (IPv4 raw sockets) only IPv4 VIPs are allowed.

    ``share = (worker, workers, ports)`` (raw IPv4 sockets only) keeps one worker's share:
    packets for which ``((source address ^ (source port << 16 | destination port)) *
    0x9E3779B1 mod 2**32) >> 24`` (the ports only with ``ports`` and when the packet is not a
    fragment) is ``worker`` modulo ``workers``: the top byte of a multiplicative hash depends
    on every input bit, so flows spread even when, say, every source port is odd (Linux gives
    odd ports to ``bind`` and even ones to ``connect``). Every packet of a flow has the same value, so
    each flow goes to one worker. Raises ``ValueError`` on an empty VIP list, IPv6 VIPs without ``link_level``, a
    share with ``link_level``, or too many VIPs.
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
    if share is not None:
        if link_level:
            raise ValueError("a share is for raw IPv4 sockets, whose packets start at the IP header")
        code += _share(*share)
    code.append((_RET_K, None, None, _ACCEPT_BYTES))
    return _assemble(code)


def _share(worker: int, workers: int, ports: bool) -> list[tuple[int, str | None, str | None, int] | str]:
    """Accept (fall through) this worker's packets, reject the others (see :func:`vip_filter`).
    Loads are absolute: a raw IPv4 socket's packet starts at the IP header."""
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} of {workers}")
    fold_and_pick: list[tuple[int, str | None, str | None, int] | str] = [
        (_MUL_K, None, None, _GOLDEN), (_RSH_K, None, None, 24), (_MOD_K, None, None, workers),
    ]
    code: list[tuple[int, str | None, str | None, int] | str] = []
    if ports:
        code += [
            (_LD_H_ABS, None, None, 6),  # flags and fragment offset
            (_JSET_K, "whole_source", None, 0x3FFF),
            (_LDX_B_MSH, None, None, 0),  # X = header length
            (_LD_W_IND, None, None, 0),  # the ports
            (_ST, None, None, 0),
            (_LD_W_ABS, None, None, 12),  # the source address
            (_LDX_MEM, None, None, 0),
            (_XOR_X, None, None, 0),
            *fold_and_pick,
            (_JEQ_K, "mine", "theirs", worker),
            "whole_source",
        ]
    code += [(_LD_W_ABS, None, None, 12), *fold_and_pick, (_JEQ_K, "mine", "theirs", worker),
             "theirs", (_RET_K, None, None, 0), "mine"]
    return code


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
