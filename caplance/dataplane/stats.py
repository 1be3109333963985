"""A data plane's counters, and merging the snapshots of several. Pure: no I/O.

A snapshot is plain data (ints, and dicts of them, nested), so it pickles across processes
and prints as JSON. :func:`merge` adds snapshots key by key: the totals of worker processes
are their sums (flow-table sizes and bounds included: each worker has its own table).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

__all__ = ["DataPlaneStats", "merge"]


@attrs.define
class DataPlaneStats:
    """Counters. ``dropped`` is keyed by reason; ``forwarded*`` by backend name."""

    packets_in: int = 0
    #: oversized packets without DF, sent on in fragmented outer packets
    outer_fragmented: int = 0
    #: ICMP "fragmentation needed" / "packet too big" sent back to clients
    icmp_too_big: int = 0
    #: TCP aggregates (GRO/GSO) cut into segments before sending
    segmented: int = 0
    forwarded: collections.Counter[str] = attrs.field(factory=collections.Counter)
    forwarded_bytes: collections.Counter[str] = attrs.field(factory=collections.Counter)
    dropped: collections.Counter[str] = attrs.field(factory=collections.Counter)

    def snapshot(self) -> dict[str, Any]:
        return {
            "packets_in": self.packets_in,
            "outer_fragmented": self.outer_fragmented,
            "icmp_too_big": self.icmp_too_big,
            "segmented": self.segmented,
            "forwarded": dict(self.forwarded),
            "forwarded_bytes": dict(self.forwarded_bytes),
            "dropped": dict(self.dropped),
        }


def merge(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The key-by-key sum of ``snapshots``: numbers add, dicts merge recursively, None and
    missing keys count as nothing, other values (text) keep the first seen."""
    total: dict[str, Any] = {}
    for snapshot in snapshots:
        _add(total, snapshot)
    return total


def _add(total: dict[str, Any], more: Mapping[str, Any]) -> None:
    for key, value in more.items():
        if value is None:
            total.setdefault(key, None)
            continue
        current = total.get(key)
        if isinstance(value, Mapping):
            if not isinstance(current, dict):
                current = total[key] = {}
            _add(current, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = (current if isinstance(current, (int, float)) else 0) + value
        elif current is None:
            total[key] = value
