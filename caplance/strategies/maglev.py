"""Maglev hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
Balancer", NSDI 2016, section 3.4).

Each backend gets a permutation of the lookup table's slots from two hashes of its name,
``offset = h1(name) mod M`` and ``skip = h2(name) mod (M - 1) + 1``; the table is filled by
letting backends, in turn, claim their next preferred slot that is still free. A flow key
hashes to a slot; the slot names the backend. ``M`` (the table size) must be prime so every
``skip`` walks the whole table.

Weights: in each round a backend earns ``weight`` credits and claims one slot per
``max_weight`` credits it holds (the method of Envoy's Maglev load balancer). Backends of the
largest weight claim one slot every round, as in the paper; a backend of half that weight
claims one every other round, so slot shares are proportional to weights. Weight 0 backends
claim no slots: they get no flows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, final

import mmh3

from caplance.strategies import sorted_backends

__all__ = ["Maglev", "populate", "is_prime", "DEFAULT_TABLE_SIZE"]

DEFAULT_TABLE_SIZE: Final = 65537
_OFFSET_SEED: Final = 0x0FF5E7
_SKIP_SEED: Final = 0x5C1B
_KEY_SEED: Final = 0x6A61B


def is_prime(n: int) -> bool:
    """Trial division; table sizes are small enough (well under 10**8) for it."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    factor = 3
    while factor * factor <= n:
        if n % factor == 0:
            return False
        factor += 2
    return True


def populate(preferences: Sequence[tuple[int, int]], weights: Sequence[int], size: int) -> list[int]:
    """Fill a Maglev lookup table; returns, per slot, the index of the backend owning it.

    ``preferences[i]`` is backend i's ``(offset, skip)``; its j-th preferred slot is
    ``(offset + j * skip) % size``. ``weights`` are positive ints. This is the paper's
    Pseudocode 1 with weighted turns (see the module docstring).
    """
    count = len(preferences)
    if count != len(weights):
        raise ValueError("one weight per backend")
    if count == 0:
        raise ValueError("no backends to place")
    if min(weights) <= 0:
        raise ValueError("weights passed to populate must be positive")
    table = [-1] * size
    heaviest = max(weights)
    credit = [0] * count
    position = [offset % size for offset, _ in preferences]
    skips = [skip for _, skip in preferences]
    filled = 0
    while True:
        for i in range(count):
            credit[i] += weights[i]
            while credit[i] >= heaviest:
                credit[i] -= heaviest
                slot, skip = position[i], skips[i]
                while table[slot] >= 0:
                    slot += skip
                    if slot >= size:
                        slot -= size
                table[slot] = i
                slot += skip
                if slot >= size:
                    slot -= size
                position[i] = slot
                filled += 1
                if filled == size:
                    return table


@final
class Maglev:
    """An immutable Maglev lookup table. Build with :meth:`build`; look up with :meth:`select`."""

    __slots__ = ("_table", "_size", "backends", "table_size")

    def __init__(self, table: list[str | None], backends: Mapping[str, int]) -> None:
        self._table = table
        self._size = len(table)
        self.table_size = len(table)
        #: name -> weight this table was built from
        self.backends = dict(backends)

    @classmethod
    def build(cls, backends: Mapping[str, int], /, **options: Any) -> Maglev:
        """Build the table for ``backends`` (name -> weight).

        Option ``table_size``: a prime, at least 100 x the number of backends (the paper's
        bound for even balance), default 65537. Raises ``ValueError`` for a bad size or
        weights and ``TypeError`` for unknown options.
        """
        table_size = options.pop("table_size", DEFAULT_TABLE_SIZE)
        if options:
            raise TypeError(f"maglev: unknown option(s) {', '.join(sorted(options))}")
        items = sorted_backends(backends)
        if isinstance(table_size, bool) or not isinstance(table_size, int):
            raise TypeError(f"maglev: table_size must be an int, got {table_size!r}")
        if not is_prime(table_size):
            raise ValueError(f"maglev: table_size must be a prime, got {table_size}")
        if table_size < 100 * len(items):
            raise ValueError(
                f"maglev: table_size {table_size} is below 100 x {len(items)} backends;"
                " pick a prime of at least that size for even balance"
            )
        active = [(name, weight) for name, weight in items if weight > 0]
        if not active:
            return cls([None] * table_size, dict(items))
        preferences = [
            (
                mmh3.hash(name.encode(), _OFFSET_SEED, False) % table_size,
                mmh3.hash(name.encode(), _SKIP_SEED, False) % (table_size - 1) + 1,
            )
            for name, _ in active
        ]
        slots = populate(preferences, [weight for _, weight in active], table_size)
        names = [name for name, _ in active]
        return cls([names[index] for index in slots], dict(items))

    def select(self, key: bytes, /) -> str | None:
        """The backend for flow key ``key``; None when no backend has weight."""
        return self._table[mmh3.hash(key, _KEY_SEED, False) % self._size]

    def __repr__(self) -> str:
        return f"Maglev(table_size={self._size}, backends={self.backends!r})"
