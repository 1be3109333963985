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

Removing a backend moves its slots to others and, as the paper says, a few other slots too
(about 1% of the survivors' keys at ``M = 65537`` and 100 backends); use ``ring`` or
``rendezvous`` where no key may move between surviving backends.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping, Sequence
from math import isqrt
from typing import Any, Final, final

import mmh3

from caplance.flowhash import MAGLEV_SEED
from caplance.forwarding import LookupTable
from caplance.strategies import (
    check_fill,
    check_table_size,
    export_lookup,
    is_prime,
    permutation,
    reject_unknown_options,
    sorted_backends,
)

__all__ = ["DEFAULT_TABLE_SIZE", "Maglev", "is_prime", "populate"]

DEFAULT_TABLE_SIZE: Final = 65537
_OFFSET_SEED: Final = 0x0FF5E7
_SKIP_SEED: Final = 0x5C1B


def _turns(weights: Sequence[int]) -> Iterator[list[int]]:
    """Yield, round after round, the indices of the backends that claim a slot (rounds in
    which nobody claims are skipped: they change nothing).

    Each round a backend earns ``weight`` credits and spends ``max(weights)`` of them per
    claim; as a weight never exceeds the maximum, that is at most one claim per round, and
    backend i's k-th claim falls in round ``ceil(k * max / weight_i)``. A heap of the next
    claim of each backend, ordered by (round, index), yields exactly those turns in
    O(log backends) per claim, however skewed the weights (one backend of weight 65535
    among 999 of weight 1 would otherwise walk 65535 rounds of 1000 backends).
    """
    count = len(weights)
    heaviest = max(weights)
    if min(weights) == heaviest:
        everyone = list(range(count))
        while True:
            yield everyone
    pending = [(-(-heaviest // weight), index, 1) for index, weight in enumerate(weights)]
    heapq.heapify(pending)
    while True:
        current = pending[0][0]
        turn = []
        while pending[0][0] == current:
            _, index, claim = pending[0]
            turn.append(index)
            claim += 1
            heapq.heapreplace(pending, (-(-claim * heaviest // weights[index]), index, claim))
        yield turn


def populate(preferences: Sequence[tuple[int, int]], weights: Sequence[int], size: int) -> list[int]:
    """Fill a Maglev lookup table; returns, per slot, the index of the backend owning it.

    ``preferences[i]`` is backend i's ``(offset, skip)``; its j-th preferred slot is
    ``(offset + j * skip) % size``, with ``1 <= skip < size`` coprime to ``size`` (any skip
    when ``size`` is prime). ``weights`` are positive ints. This is the paper's Pseudocode 1
    with weighted turns (see the module docstring), and gives exactly its table.

    Speed (same result): while many slots are free a backend walks its permutation to the
    next free slot; once fewer than about ``sqrt(size / 2)`` are free, each claim instead
    computes how many steps of its walk every free slot is away (``(slot - position) *
    skip**-1 mod size``) and takes the nearest, which is cheaper than long walks.

    Raises ``ValueError`` for mismatched lengths, no backends, a weight below 1, a size
    below 2 or a skip out of range or sharing a factor with ``size``.
    """
    check_fill(preferences, weights, size)
    skips = [skip for _, skip in preferences]
    table = [-1] * size
    position = [offset % size for offset, _ in preferences]
    free = size
    walk_until = max(isqrt(size // 2), 1)
    turns = _turns(weights)
    turn = next(turns)
    # Walking phase: the paper's loop, one whole round at a time.
    while free - len(turn) >= walk_until:
        for index in turn:
            slot = position[index]
            skip = skips[index]
            while table[slot] >= 0:
                slot += skip
                if slot >= size:
                    slot -= size
            table[slot] = index
            slot += skip
            if slot >= size:
                slot -= size
            position[index] = slot
        free -= len(turn)
        turn = next(turns)
    # Few free slots left: jump straight to each claimer's nearest free slot.
    open_slots = {slot for slot in range(size) if table[slot] < 0}
    inverse: dict[int, int] = {}
    while True:
        for index in turn:
            slot = position[index]
            skip = skips[index]
            if table[slot] >= 0:
                back = inverse.get(index)
                if back is None:
                    back = inverse[index] = pow(skip, -1, size)
                steps = min([(free_slot - slot) * back % size for free_slot in open_slots])
                slot = (slot + steps * skip) % size
            table[slot] = index
            open_slots.remove(slot)
            if not open_slots:
                return table
            slot += skip
            if slot >= size:
                slot -= size
            position[index] = slot
        turn = next(turns)


@final
class Maglev:
    """An immutable Maglev lookup table. Build with :meth:`build`; look up with :meth:`select`."""

    __slots__ = ("_size", "_table", "backends", "table_size")

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
        weights and ``TypeError`` for unknown options or wrong types. Takes about 50 ms for
        1000 backends at the default size in CPython.
        """
        table_size = options.pop("table_size", DEFAULT_TABLE_SIZE)
        reject_unknown_options("maglev", options)
        items = sorted_backends(backends)
        table_size = check_table_size("maglev", table_size)
        if table_size < 100 * len(items):
            raise ValueError(
                f"maglev: table_size {table_size} is below 100 x {len(items)} backends;"
                " pick a prime of at least that size for even balance"
            )
        return cls(_table(items, table_size), dict(items))

    def select(self, key: bytes, /) -> str | None:
        """The backend for flow key ``key``; None when no backend has weight.

        ``table[flow_hash(key, MAGLEV_SEED) % table_size]`` (see :mod:`caplance.flowhash`)."""
        return self._table[mmh3.hash(key, MAGLEV_SEED, False) % self._size]

    def lookup_table(self, ids: Mapping[str, int]) -> LookupTable:
        """The table as backend ids (``ids``: name -> id, for every backend of weight > 0),
        so that ``lookup_table(ids).entry(key) == ids[select(key)]`` for every key (0 where
        ``select`` gives None). Raises ``ValueError`` naming a backend ``ids`` lacks."""
        return export_lookup(self._table, MAGLEV_SEED, ids)

    def __repr__(self) -> str:
        return f"Maglev(table_size={self._size}, backends={self.backends!r})"


def _table(items: Sequence[tuple[str, int]], table_size: int) -> list[str | None]:
    """The lookup table (backend name per slot) for sorted, validated ``items``.

    No check of ``table_size`` against the number of backends: :meth:`Maglev.build` does
    that; ``bench/selectors.py`` calls this directly to time 1000 backends at size 65537.
    """
    active = [(name, weight) for name, weight in items if weight > 0]
    if not active:
        return [None] * table_size
    preferences = [permutation(name, table_size, _OFFSET_SEED, _SKIP_SEED) for name, _ in active]
    slots = populate(preferences, [weight for _, weight in active], table_size)
    names = [name for name, _ in active]
    return [names[index] for index in slots]
