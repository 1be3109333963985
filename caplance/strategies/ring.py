"""A consistent-hash ring with virtual nodes (Karger et al., STOC 1997).

Each backend places ``vnodes * weight`` points on a ring of 32-bit values; point j of backend
``name`` is ``mmh3(utf8(name) + j as 4 big-endian bytes)`` under a fixed seed. A flow key
hashes onto the ring and belongs to the first point at or after it, wrapping around.
Lookup is a ``bisect`` on the sorted list of points. To skip most of them, the ring is also
cut into 2**18 equal stretches: a stretch with no point inside maps all its keys to one
point, kept in a list indexed by ``hash >> 14``, so only keys landing in a stretch that
holds a point (about 10% at 100 backends) bisect. Both give the same answer.

Removing a backend removes only its points, so only the keys that were on it move, and they
move to the surviving backends; no key moves between two survivors. Raising a backend's
weight only adds points (and lowering it only removes some), so the same holds for weight
changes. Two backends that hash to the same point share it deterministically: the point
belongs to the smaller name.

At most :data:`MAX_POINTS` points are placed, whatever the weights (:func:`point_counts`);
the guarantees above hold while ``vnodes`` times the total weight stays within that bound.

Balance depends on the number of points: with ``v`` points per backend a backend's share
varies by about ``1 / sqrt(v)`` of the mean. The default of 256 per unit of weight keeps
100 equal backends within about 1.2 x the mean share; use ``maglev`` or ``rendezvous``
for tighter balance.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Any, Final, final

import mmh3

from caplance.flowhash import RING_SEED
from caplance.strategies import positive_int_option, reject_unknown_options, sorted_backends

__all__ = ["DEFAULT_VNODES", "MAX_POINTS", "Ring", "point_counts"]

DEFAULT_VNODES: Final = 256
_POINT_SEED: Final = 0x21A6
_KEY_SEED: Final = RING_SEED
#: the most points a ring places, whatever the weights (1000 backends of weight 1 at the
#: default 256 vnodes fit: 256,000)
MAX_POINTS: Final = 1 << 18
_STRETCH_BITS: Final = 18
_STRETCH_SHIFT: Final = 32 - _STRETCH_BITS


def point_counts(weights: Sequence[int], vnodes: int) -> list[int]:
    """Points per backend: ``vnodes * weight`` while they total at most :data:`MAX_POINTS`;
    beyond that, ``MAX_POINTS`` shared in proportion to the weights (at least one point per
    backend of weight > 0).

    Within the bound, adding, removing or re-weighting a backend moves only keys to or from
    it. Beyond it every backend's count depends on the total weight, so such a change also
    moves some keys between backends that did not change: the price of bounded build time.
    """
    total = vnodes * sum(weights)
    if total <= MAX_POINTS:
        return [vnodes * weight for weight in weights]
    return [max(1, vnodes * weight * MAX_POINTS // total) if weight else 0 for weight in weights]


@final
class Ring:
    """An immutable consistent-hash ring. Build with :meth:`build`; look up with :meth:`select`.

    A ring is searched, not indexed, so it has no ``lookup_table()``: it serves the Python data
    plane, and a data plane that needs a table (the kernel's) refuses a ``ring`` VIP with an
    error naming the selector.
    """

    __slots__ = ("_direct", "_owners", "_points", "backends", "vnodes")

    def __init__(self, points: list[int], owners: list[str | None], backends: Mapping[str, int],
                 vnodes: int) -> None:
        # owners has one more entry than points: the wrap-around, owners[-1] == owners[0].
        self._points = points
        self._owners = owners
        # _direct[s]: the owner of every key in stretch s (hash >> _STRETCH_SHIFT) if no point
        # lies inside it, else None (bisect).
        direct: list[str | None] = []
        for point, owner in zip(points, owners):
            stretch = point >> _STRETCH_SHIFT
            if stretch >= len(direct):
                direct += [owner] * (stretch - len(direct))
                direct.append(None)
        direct += [owners[0]] * ((1 << _STRETCH_BITS) - len(direct))
        self._direct = direct
        #: name -> weight this ring was built from
        self.backends = dict(backends)
        #: points per unit of weight
        self.vnodes = vnodes

    @classmethod
    def build(cls, backends: Mapping[str, int], /, **options: Any) -> Ring:
        """Build the ring for ``backends`` (name -> weight; weight 0 places no points).

        Option ``vnodes``: points per unit of weight, an int >= 1, default 256. At most
        :data:`MAX_POINTS` points are placed in all (see :func:`point_counts`), so any
        allowed weights build in bounded time and memory. Raises ``TypeError`` for unknown
        options or wrong types and ``ValueError`` for bad values.
        """
        vnodes = positive_int_option("ring", "vnodes", options.pop("vnodes", DEFAULT_VNODES))
        reject_unknown_options("ring", options)
        items = sorted_backends(backends)
        names = [name for name, _ in items]
        shift = max(len(items), 1).bit_length()
        placed: list[int] = []  # point << shift | owner index: ints sort fast, ties by name
        for owner, count in enumerate(point_counts([weight for _, weight in items], vnodes)):
            data = names[owner].encode()
            hash32 = mmh3.hash
            placed += [hash32(data + index.to_bytes(4, "big"), _POINT_SEED, False) << shift | owner
                       for index in range(count)]
        placed.sort()
        points: list[int] = []
        owners: list[str | None] = []
        previous = -1
        mask = (1 << shift) - 1
        for value in placed:
            point = value >> shift
            if point == previous:
                continue  # a shared point belongs to the smaller name, sorted first
            previous = point
            points.append(point)
            owners.append(names[value & mask])
        owners.append(owners[0] if owners else None)
        return cls(points, owners, dict(items), vnodes)

    def select(self, key: bytes, /) -> str | None:
        """The backend for flow key ``key``; None when no backend has weight."""
        point = mmh3.hash(key, _KEY_SEED, False)
        return self._direct[point >> _STRETCH_SHIFT] or self._owners[bisect_left(self._points, point)]

    def owner_at(self, point: int, /) -> str | None:
        """The backend owning ring position ``point`` (0 <= point < 2**32): the owner of the
        first point at or after it, wrapping around. :meth:`select` is this, inlined."""
        return self._direct[point >> _STRETCH_SHIFT] or self._owners[bisect_left(self._points, point)]

    def __len__(self) -> int:
        """The number of distinct points on the ring."""
        return len(self._points)

    def __repr__(self) -> str:
        return f"Ring(vnodes={self.vnodes}, points={len(self._points)}, backends={self.backends!r})"
