"""Selectors: pure, deterministic choices of a backend per flow key.

Every selector sorts backend names and hashes with mmh3 under fixed seeds, so the same
backends and weights give the same choices in any order, in any process (never Python's
randomised ``hash()``).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["sorted_backends"]


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
