"""Who holds a backend name, and who was refused: the control plane's memory of identities.

A name, once an agent proved its data path under it, stays bound to where that agent is --
the address its control connection comes from, its data address and its transport -- until
the agent leaves (deregisters, or is drained or removed by an operator), an operator releases
it (``caplance ctl release NAME``), or it has been gone long enough to be forgotten. A
registration under a held name from anywhere else is refused (``name_held``), so another
host that knows the shared secret cannot take a backend's traffic over; the agent that holds
the name can reconnect as often as it likes.

Refusals are remembered per source address and reason (bounded), counted by reason, and
each logged at most once per :data:`LOG_EVERY` seconds per address and reason, so a hostile
peer cannot flood the log.

Pure: no sockets, no trio; times are passed in.
"""

from __future__ import annotations

import collections
from typing import Any

import attrs

from caplance.config import PluginConfig
from caplance.packet import IPAddress

__all__ = ["LOG_EVERY", "RECENT_REFUSALS", "Holder", "NameBindings", "Refusals"]

#: seconds between two log lines for the same (address, reason)
LOG_EVERY = 10.0
#: how many (address, reason) pairs ``ctl status`` remembers
RECENT_REFUSALS = 64


@attrs.frozen
class Holder:
    """Where the agent holding a name is."""

    peer: str  # the control connection's source address
    data_address: IPAddress
    transport: PluginConfig

    def describe(self) -> str:
        return f"{self.peer} (data {self.data_address}, {self.transport.name})"


class NameBindings:
    """Backend name -> the :class:`Holder` it is bound to."""

    def __init__(self) -> None:
        self._held: dict[str, Holder] = {}

    def conflict(self, name: str, holder: Holder) -> Holder | None:
        """The other holder of ``name`` if it is bound elsewhere, else None."""
        held = self._held.get(name)
        return held if held is not None and held != holder else None

    def bind(self, name: str, holder: Holder) -> None:
        self._held[name] = holder

    def release(self, name: str) -> Holder | None:
        """Unbind ``name``; who held it (None: nobody)."""
        return self._held.pop(name, None)

    def get(self, name: str) -> Holder | None:
        return self._held.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._held

    def __len__(self) -> int:
        return len(self._held)


@attrs.define
class _Refusal:
    count: int
    last_seen: float
    last_logged: float


class Refusals:
    """Refused and failed registrations: by (address, reason), and totals by reason."""

    def __init__(self, *, log_every: float = LOG_EVERY, keep: int = RECENT_REFUSALS) -> None:
        self.totals: collections.Counter[str] = collections.Counter()
        self._recent: dict[tuple[str, str], _Refusal] = {}
        self._log_every = log_every
        self._keep = keep

    def note(self, address: str, reason: str, now: float) -> bool:
        """Count a refusal of ``address`` for ``reason``; whether to log it now (the first
        time, then at most once per ``log_every`` seconds for the same pair)."""
        self.totals[reason] += 1
        key = (address, reason)
        seen = self._recent.pop(key, None)  # re-inserted last: the dict stays in last-seen order
        if seen is None:
            seen = _Refusal(count=0, last_seen=now, last_logged=float("-inf"))
        seen.count += 1
        seen.last_seen = now
        self._recent[key] = seen
        while len(self._recent) > self._keep:
            del self._recent[next(iter(self._recent))]  # the least recently seen
        if now - seen.last_logged >= self._log_every:
            seen.last_logged = now
            return True
        return False

    def count(self, address: str, reason: str) -> int:
        seen = self._recent.get((address, reason))
        return 0 if seen is None else seen.count

    def status(self, now: float) -> dict[str, Any]:
        """``recent`` (newest first: address, reason, count, seconds since last seen) and
        ``total`` by reason."""
        recent = [{"address": address, "reason": reason, "count": seen.count,
                   "last_seen": round(now - seen.last_seen, 1)}
                  for (address, reason), seen in reversed(self._recent.items())]
        return {"recent": recent, "total": dict(sorted(self.totals.items()))}
