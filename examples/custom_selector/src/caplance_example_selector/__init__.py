"""An example Caplance selector plugin: ``modulo``, hash modulo the total weight.

Each backend owns ``weight`` consecutive points of ``range(total weight)``, in name order;
a flow key hashes (mmh3, fixed seed) to one point. The split is exact and lookups are one
``bisect``, but it is *not* consistent: adding or removing a backend remaps most keys. It
is here to show the plugin contract, not to be used in front of stateful services.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from itertools import accumulate
from typing import Any, Final, final

import mmh3

from caplance.strategies import reject_unknown_options, sorted_backends

__all__ = ["Modulo"]

DEFAULT_SEED: Final = 0x0D0D


@final
class Modulo:
    """An immutable modulo selector. Build with :meth:`build`; look up with :meth:`select`."""

    __slots__ = ("_ends", "_names", "_seed", "_total", "backends")

    def __init__(self, items: list[tuple[str, int]], seed: int) -> None:
        active = [(name, weight) for name, weight in items if weight > 0]
        self._names = [name for name, _ in active]
        self._ends = list(accumulate(weight for _, weight in active))
        self._total = self._ends[-1] if self._ends else 0
        self._seed = seed
        #: name -> weight this selector was built from
        self.backends = dict(items)

    @classmethod
    def build(cls, backends: Mapping[str, int], /, **options: Any) -> Modulo:
        """A selector for ``backends`` (name -> weight >= 0; weight 0 gets no flows).

        Option ``seed``: the mmh3 seed, an int in 0..2**32-1, default 0x0D0D. Raises
        ``TypeError`` for unknown options or wrong types, ``ValueError`` for bad values.
        """
        seed = options.pop("seed", DEFAULT_SEED)
        reject_unknown_options("modulo", options)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"modulo: seed must be an int, got {seed!r}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"modulo: seed must be in 0..2**32-1, got {seed}")
        return cls(sorted_backends(backends), seed)

    def select(self, key: bytes, /) -> str | None:
        """The backend for flow key ``key``; None when no backend has weight."""
        if not self._total:
            return None
        point = mmh3.hash(key, self._seed, False) % self._total
        return self._names[bisect_right(self._ends, point)]

    def __repr__(self) -> str:
        return f"Modulo(seed={self._seed:#x}, backends={self.backends!r})"
