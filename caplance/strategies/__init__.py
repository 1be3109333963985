"""Selectors: pure, deterministic choices of a backend per flow key.

Every selector sorts backend names and hashes with mmh3 under fixed seeds, so the same
backends and weights give the same choices in any order, in any process (never Python's
randomised ``hash()``).

The built-ins (``maglev``, ``ring``, ``rendezvous``) register through the
``caplance.selectors`` entry-point group like any third-party selector; this package holds
the helpers they share. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import gcd
from typing import Any

import mmh3

from caplance.forwarding import LookupTable

__all__ = ["MAX_TABLE_SIZE", "check_fill", "check_table_size", "export_lookup", "is_prime", "permutation",
           "positive_int_option", "reject_unknown_options", "sorted_backends"]

#: the largest lookup table a selector builds (2**24 slots: 64 MiB of ids; bounded build time)
MAX_TABLE_SIZE = 1 << 24


def sorted_backends(backends: Mapping[str, int]) -> list[tuple[str, int]]:
    """Validate ``backends`` (name -> weight) and return its items sorted by name.

    Raises ``TypeError`` for a non-string name or non-integer weight, ``ValueError`` for an
    empty name or a negative weight.
    """
    if not isinstance(backends, Mapping):
        raise TypeError(f"backends must be a mapping of name -> weight, got {type(backends).__name__}")
    items = []
    for name, weight in backends.items():
        if not isinstance(name, str):
            raise TypeError(f"backend names are strings, got {name!r}")
        if not name:
            raise ValueError("backend names must not be empty")
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise TypeError(f"weight of {name!r} must be an int, got {weight!r}")
        if weight < 0:
            raise ValueError(f"weight of {name!r} must be >= 0, got {weight}")
        items.append((name, weight))
    items.sort()
    return items


def reject_unknown_options(selector: str, options: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` naming ``selector`` and every key left in ``options``.

    Call it after popping the options a selector knows, so a typo is an error, not a default.
    """
    if options:
        raise TypeError(f"{selector}: unknown option(s) {', '.join(sorted(options))}")


def positive_int_option(selector: str, option: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1 (not a bool).

    Raises ``TypeError`` for a non-int and ``ValueError`` for a value below 1, both naming
    ``selector`` and ``option``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{selector}: {option} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{selector}: {option} must be >= 1, got {value}")
    return value


def check_table_size(selector: str, value: object) -> int:
    """``value`` if it is a prime from 2 to :data:`MAX_TABLE_SIZE`. Raises ``TypeError`` for
    a non-int and ``ValueError`` otherwise, both naming ``selector``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{selector}: table_size must be an int, got {value!r}")
    if not 2 <= value <= MAX_TABLE_SIZE:
        raise ValueError(f"{selector}: table_size must be from 2 to {MAX_TABLE_SIZE}, got {value}")
    if not is_prime(value):
        raise ValueError(f"{selector}: table_size must be a prime, got {value}")
    return value


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime, by trial division; table sizes are small enough (well under
    10**10) for it."""
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


def permutation(name: str, size: int, offset_seed: int, skip_seed: int) -> tuple[int, int]:
    """The ``(offset, skip)`` of ``name``'s pseudo-random permutation of ``range(size)``.

    Its j-th element is ``(offset + j * skip) % size``: with ``size`` prime and
    ``1 <= skip < size`` that visits every slot exactly once (Maglev's permutation, NSDI
    2016 section 3.4). Both come from mmh3 of the UTF-8 name under the given fixed seeds.
    ``size`` must be at least 2.
    """
    data = name.encode()
    return (
        mmh3.hash(data, offset_seed, False) % size,
        mmh3.hash(data, skip_seed, False) % (size - 1) + 1,
    )


def check_fill(preferences: Sequence[tuple[int, int]], weights: Sequence[int], size: int) -> None:
    """Validate the input of a table fill (Maglev's or rendezvous's ``populate``).

    ``preferences[i]`` is backend i's ``(offset, skip)`` and ``weights[i]`` its weight.
    Raises ``ValueError`` for mismatched lengths, no backends, a weight below 1, a size
    below 2, or a skip outside ``1..size-1`` or sharing a factor with ``size`` (its walk
    would miss slots).
    """
    if len(preferences) != len(weights):
        raise ValueError("one weight per backend")
    if not preferences:
        raise ValueError("no backends to place")
    if min(weights) <= 0:
        raise ValueError("weights passed to populate must be positive")
    if size < 2:
        raise ValueError(f"table size must be >= 2, got {size}")
    for _, skip in preferences:
        if not 1 <= skip < size or gcd(skip, size) != 1:
            raise ValueError(f"skip {skip} must be in 1..{size - 1} and coprime to {size}")


def export_lookup(table: Sequence[str | None], seed: int, ids: Mapping[str, int]) -> LookupTable:
    """A table of backend names per slot as a :class:`~caplance.forwarding.LookupTable` of
    ids (``ids``: name -> id; None becomes 0). Raises ``ValueError`` naming a backend in the
    table that ``ids`` lacks."""
    translate: dict[str | None, int] = {None: 0}
    for name in set(table):
        if name is None:
            continue
        if name not in ids:
            raise ValueError(f"no backend id given for {name!r}")
        translate[name] = ids[name]
    return LookupTable.from_ids(seed, map(translate.__getitem__, table))
