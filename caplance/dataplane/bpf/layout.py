"""The kernel data plane's map layouts, as ``struct`` formats. Pure: no I/O.

Mirrors ``maps.h`` field by field (native byte order and sizes, explicit padding); a test
compares these sizes with the compiled object's maps and :data:`REASONS` with the C enum.
Also the translation of a :class:`~caplance.forwarding.ForwardingTable`'s entries into map
values, so it can be tested without a kernel.
"""

from __future__ import annotations

import struct
from typing import Final

from caplance.forwarding import BackendEntry, VipEntry, VipFlags
from caplance.packet import IPPROTO_TCP, IPPROTO_UDP, IPAddress

__all__ = [
    "BACKEND", "FLOW", "FLOW_KEY_SIZE", "MAX_BACKENDS", "MAX_VIPS", "MEMBER_KEY", "PORT_KEY", "REASONS",
    "SETTINGS", "TRAFFIC", "TRANSPORTS", "VIP_KEY", "VIP_META", "backend_value", "vip_key", "vip_meta",
]

MAX_VIPS: Final = 64
MAX_BACKENDS: Final = 4096
PLACEHOLDER_TABLE: Final = 65537

VIP_KEY: Final = struct.Struct("=16sB3x")
VIP_META: Final = struct.Struct("=IIIIIB3x")  # index, slot, flags, seed, size, protocol
PORT_KEY: Final = struct.Struct("=IH2x")
MEMBER_KEY: Final = struct.Struct("=II")
BACKEND: Final = struct.Struct("=16s16s16sIHHBBBx")  # addr, source, nexthop, ifindex, port, max, family, transport, flags
FLOW_KEY_SIZE: Final = 40
FLOW: Final = struct.Struct("=QII")
SETTINGS: Final = struct.Struct("=QQQQII")
TRAFFIC: Final = struct.Struct("=QQ")
ID: Final = struct.Struct("=I")
COUNTER: Final = struct.Struct("=Q")

VIP_CLOSED: Final = 1
VIP_ALL_PORTS: Final = 2
TRANSPORT_UDP: Final = 1
TRANSPORT_GRE: Final = 2
BACKEND_KERNEL_DECAP: Final = 1
#: transport plugin name -> (kind, default UDP port); others are passed up to the Python plane
TRANSPORTS: Final = {"udp": (TRANSPORT_UDP, 7001), "gue": (TRANSPORT_UDP, 6080), "gre-raw": (TRANSPORT_GRE, 0),
                     "gre": (TRANSPORT_GRE, 0)}

#: counter names in the order of ``enum reason`` in maps.h
REASONS: Final = (
    "packets_in", "forwarded", "no_backend", "no_sender", "protocol_not_served", "port_not_served", "draining",
    "encap_failed", "pass_fragment", "pass_options", "pass_icmp", "pass_too_big", "pass_not_ready",
    "pass_truncated", "pass_transport", "pass_checksum", "flow_not_remembered", "flow_rehashed",
)
#: the counters that are drops (the rest of the pass_* ones are packets handed to the Python plane)
DROPS: Final = frozenset({"no_backend", "no_sender", "protocol_not_served", "port_not_served", "draining",
                          "encap_failed"})

_PROTOCOL: Final = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "any": 0}


def _address(address: IPAddress | None) -> bytes:
    return b"" if address is None else address.packed


def vip_key(address: IPAddress) -> bytes:
    return VIP_KEY.pack(address.packed, address.version)


def vip_meta(vip: VipEntry, index: int, slot: int) -> bytes:
    """The ``struct vip_meta`` of ``vip`` (which must have a lookup table)."""
    lookup = vip.lookup
    if lookup is None:
        raise ValueError(f"selector {vip.selector!r} of VIP {vip.address} has no lookup table")
    flags = (VIP_CLOSED if vip.flags & VipFlags.CLOSED else 0) | (0 if vip.ports else VIP_ALL_PORTS)
    return VIP_META.pack(index, slot, flags, lookup.seed, lookup.size, _PROTOCOL[vip.protocol])


def backend_value(entry: BackendEntry, *, source: IPAddress | None, nexthop: IPAddress | None,
                  ifindex: int) -> bytes:
    """The ``struct backend`` for ``entry``: transport 0 (passed up) for one the program does
    not wrap, or when there is no route (no ``source``)."""
    kind, default_port = TRANSPORTS.get(entry.transport.name, (0, 0))
    port = entry.transport.options.get("port", default_port)
    if not isinstance(port, int) or not 0 <= port <= 65535 or source is None:
        kind, port = 0, 0
    flags = BACKEND_KERNEL_DECAP if entry.kernel_decap else 0
    return BACKEND.pack(entry.address.packed, _address(source), _address(nexthop), ifindex, port,
                        min(entry.max_packet, 65535), entry.address.version, kind, flags)
