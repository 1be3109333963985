"""Weighted rendezvous (highest-random-weight) hashing through a lookup table.

Rendezvous hashing (Thaler and Ravishankar, 1998) gives a key to the backend with the
highest score ``-weight / ln(h)``, where ``h`` in (0, 1) is a hash of the backend and the
key; this weighting gives each backend a share of ``weight / total weight`` (Schindelhauer
and Schomaker, "Weighted distributed hash tables", SPAA 2005). Scoring every backend per
packet costs O(backends), so, as GitHub's GLB Director does, the scores are computed once
per table *row* instead: a table of ``table_size`` rows (a prime, default 262139) holds each
row's winner, and a key is looked up as ``row = mmh3(key) % table_size``: O(1).

The hash of backend i and row r: backend i has Maglev's pseudo-random permutation of the
rows, ``(offset_i + j * skip_i) % table_size`` for j = 0, 1, ... (offset and skip from mmh3
of the name, see :func:`caplance.strategies.permutation`). Row r's position in it,
``rank_i(r) = (r - offset_i) * skip_i**-1 % table_size``, gives
``h_i(r) = 1 - (rank_i(r) + 0.5) / table_size``. Two consequences:

* each backend's ``h`` takes every value on its grid exactly once over the rows (a Latin
  hypercube sample), which evens out the rows' winners a little more than independent
  hashes would;
* a backend's rows can be listed in falling score order, so building the table does not
  score every (row, backend) pair: backends claim their rows in falling score order,
  round by round (in batches of score with unequal weights), each row going to the best
  claim on it, until few rows are free; those are then scored directly.

Every row's owner is exactly the highest score among backends of weight > 0 (ties go to the
smaller name), whatever the build's shortcuts. So removing a backend, or setting its weight
to 0, moves only the rows -- and keys -- it owned: no key moves between two survivors.

Balance: a backend owns about ``table_size / backends`` rows, give or take the square root
of that; at the default size and 100 equal backends the largest owns about 1.03 x the mean.
Building takes about 0.3 to 0.7 s for 100 to 1000 backends in CPython.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import expm1, log
from typing import Any, Final, final

import mmh3

from caplance.flowhash import RENDEZVOUS_SEED
from caplance.forwarding import LookupTable
from caplance.strategies import (
    check_fill,
    check_table_size,
    export_lookup,
    permutation,
    reject_unknown_options,
    sorted_backends,
)

__all__ = ["DEFAULT_TABLE_SIZE", "Rendezvous", "populate", "row_score"]

DEFAULT_TABLE_SIZE: Final = 262139
_OFFSET_SEED: Final = 0x2E0D
_SKIP_SEED: Final = 0x2E5C
_BATCH_RANKS: Final = 16


def row_score(weight: float, rank: int, size: int) -> float:
    """The score ``-weight / ln(h)`` of a backend whose permutation puts the row at ``rank``.

    ``h = 1 - (rank + 0.5) / size`` (computed as ``(2 size - 2 rank - 1) / (2 size)``), so
    rank 0 scores highest. The build uses exactly this float expression, so its result is
    the argmax of these very numbers.
    """
    twice = 2 * size
    return -weight / log((twice - 2 * rank - 1) / twice)


def populate(preferences: Sequence[tuple[int, int]], weights: Sequence[int], size: int) -> list[int]:
    """Each row's rendezvous winner: the index i with the highest
    ``row_score(weights[i], rank_i(row), size)``, ties to the smaller index.

    ``preferences[i]`` is backend i's ``(offset, skip)``: its rank-j row is
    ``(offset + j * skip) % size``; ``1 <= skip < size`` coprime to ``size``. ``weights`` are
    positive ints. Raises ``ValueError`` for mismatched lengths, no backends, a weight
    below 1, a size below 2 or a bad skip.
    """
    check_fill(preferences, weights, size)
    if min(weights) == max(weights):
        return _populate_equal(preferences, size)
    return _populate_weighted(preferences, weights, size)


def _finish_rows(table: list[int], preferences: Sequence[tuple[int, int]],
                 weights: Sequence[int] | None, size: int) -> list[int]:
    """Score the rows still free (-1) in ``table`` directly against every backend.

    ``weights`` None means all equal: then the lowest rank wins, which is the same choice.
    """
    inverse = [(offset, pow(skip, -1, size)) for offset, skip in preferences]
    for row, owner in enumerate(table):
        if owner >= 0:
            continue
        ranks = [(row - offset) * back % size for offset, back in inverse]
        if weights is None:
            table[row] = ranks.index(min(ranks))
        else:
            scores = [row_score(weight, rank, size) for weight, rank in zip(weights, ranks)]
            table[row] = scores.index(max(scores))
    return table


def _populate_equal(preferences: Sequence[tuple[int, int]], size: int) -> list[int]:
    """Equal weights: scores fall with rank alone, so claims go round by round (every
    backend's rank j in round j), in index order within a round."""
    count = len(preferences)
    table = [-1] * size
    position = [offset % size for offset, _ in preferences]
    skips = [skip for _, skip in preferences]
    free = size
    finish_at = max(size // count, 1)
    while free > finish_at:
        for index in range(count):
            row = position[index]
            if table[row] < 0:
                table[row] = index
                free -= 1
            row += skips[index]
            if row >= size:
                row -= size
            position[index] = row
    return _finish_rows(table, preferences, None, size)


def _last_rank_at_or_above(weight: int, floor: float, size: int) -> int:
    """The highest rank whose :func:`row_score` for ``weight`` is >= ``floor`` (-1 if none).

    Estimated in closed form, then corrected with the exact float scores."""
    guess = int(size * -expm1(-weight / floor) - 0.5)
    rank = min(max(guess, -1), size - 1)
    while rank + 1 < size and row_score(weight, rank + 1, size) >= floor:
        rank += 1
    while rank >= 0 and row_score(weight, rank, size) < floor:
        rank -= 1
    return rank


def _populate_weighted(preferences: Sequence[tuple[int, int]], weights: Sequence[int],
                       size: int) -> list[int]:
    """Any weights: claims in batches of falling score.

    Batch k takes, from every backend, the ranks scoring at least the k-th floor (the score
    of rank ``k * _BATCH_RANKS`` for the mean weight), so each batch has about
    ``_BATCH_RANKS`` claims per backend. Every claim of an earlier batch outscores every
    claim of a later one; within a batch, two claims on one row are settled by their scores.
    """
    count = len(preferences)
    table = [-1] * size
    position = [offset % size for offset, _ in preferences]
    rank = [0] * count
    mean = sum(weights) / count
    free = size
    finish_at = max(size // count, 1)
    batch = 0
    while free > finish_at:
        batch += 1
        floor_rank = batch * _BATCH_RANKS
        last_batch = floor_rank >= size
        floor = 0.0 if last_batch else row_score(mean, floor_rank, size)
        fresh: dict[int, int] = {}  # row -> rank of its claim in this batch
        for index in range(count):
            weight = weights[index]
            limit = size - 1 if last_batch else _last_rank_at_or_above(weight, floor, size)
            step = rank[index]
            if step > limit:
                continue
            row = position[index]
            skip = preferences[index][1]
            while step <= limit:
                owner = table[row]
                if owner < 0:
                    table[row] = index
                    fresh[row] = step
                    free -= 1
                elif row in fresh and row_score(weight, step, size) > row_score(
                    weights[owner], fresh[row], size
                ):
                    table[row] = index  # owner has a smaller index: it keeps a tie
                    fresh[row] = step
                step += 1
                row += skip
                if row >= size:
                    row -= size
            position[index] = row
            rank[index] = step
        if last_batch:
            break
    return _finish_rows(table, preferences, weights, size)


@final
class Rendezvous:
    """An immutable weighted-rendezvous lookup table. Build with :meth:`build`; look up with
    :meth:`select`."""

    __slots__ = ("_size", "_table", "backends", "table_size")

    def __init__(self, table: list[str | None], backends: Mapping[str, int]) -> None:
        self._table = table
        self._size = len(table)
        self.table_size = len(table)
        #: name -> weight this table was built from
        self.backends = dict(backends)

    @classmethod
    def build(cls, backends: Mapping[str, int], /, **options: Any) -> Rendezvous:
        """Build the table for ``backends`` (name -> weight; weight 0 gets no rows).

        Option ``table_size``: the number of rows, a prime, default 262139; larger evens out
        the shares (spread about ``sqrt(backends / table_size)``) but builds more slowly.
        Raises ``TypeError`` for unknown options or wrong types and ``ValueError`` for a
        non-prime size or bad weights.
        """
        table_size = options.pop("table_size", DEFAULT_TABLE_SIZE)
        reject_unknown_options("rendezvous", options)
        items = sorted_backends(backends)
        table_size = check_table_size("rendezvous", table_size)
        active = [(name, weight) for name, weight in items if weight > 0]
        if not active:
            return cls([None] * table_size, dict(items))
        preferences = [permutation(name, table_size, _OFFSET_SEED, _SKIP_SEED) for name, _ in active]
        rows = populate(preferences, [weight for _, weight in active], table_size)
        names = [name for name, _ in active]
        return cls([names[index] for index in rows], dict(items))

    def select(self, key: bytes, /) -> str | None:
        """The backend for flow key ``key``; None when no backend has weight.

        ``table[flow_hash(key, RENDEZVOUS_SEED) % table_size]`` (see :mod:`caplance.flowhash`)."""
        return self._table[mmh3.hash(key, RENDEZVOUS_SEED, False) % self._size]

    def lookup_table(self, ids: Mapping[str, int]) -> LookupTable:
        """The table as backend ids (``ids``: name -> id, for every backend of weight > 0),
        so that ``lookup_table(ids).entry(key) == ids[select(key)]`` for every key (0 where
        ``select`` gives None). Raises ``ValueError`` naming a backend ``ids`` lacks."""
        return export_lookup(self._table, RENDEZVOUS_SEED, ids)

    def __repr__(self) -> str:
        return f"Rendezvous(table_size={self._size}, backends={self.backends!r})"
