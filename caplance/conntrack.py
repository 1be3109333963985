"""The flow table (connection tracking): flow key -> backend id, bounded, with idle timeouts.

Pure: the caller passes the time in; no trio, no sockets.

Consistent hashing alone moves some flows whenever the backend set changes, and a moved TCP
connection dies. The table remembers which backend took each flow, so packets of an
established flow keep going there (as in Maglev, section 3.3, and Katran); the selector is
only asked on a miss.

**Segments.** A flow is first remembered in the *new* segment. Its second packet (for TCP:
the first one that is not a bare SYN) promotes it to an *established* segment: ``tcp``,
``other`` (UDP and the rest) or ``closing`` (TCP after a FIN or RST). Each segment is an
ordered dict in least-recently-used order with one idle timeout, so the oldest entry is always
the first to expire and expiry is a walk from the front. The new segment holds at most a
quarter of ``max_flows`` and the established ones share the rest, so a SYN flood from random
sources (one packet per flow) churns only the new segment: it never evicts an established
flow. When a segment is full its least recently used entry goes, and a counter says so.

**Memory.** About 180 bytes per established flow on CPython 3.11 (the key's bytes object,
its ordered-dict slot and link, the ``[backend id, last_seen]`` list; measured with
``tracemalloc`` by ``bench/forward.py --conntrack``), so the default bound of 1,000,000
flows costs about 180 MB.
"""

from __future__ import annotations

import collections
from typing import Final

import attrs

__all__ = ["FlowTable", "ConntrackCounters", "NEW", "TCP", "OTHER", "CLOSING"]

NEW: Final = 0
TCP: Final = 1
OTHER: Final = 2
CLOSING: Final = 3
SEGMENT_NAMES: Final = ("new", "tcp", "other", "closing")

_SYN, _RST, _FIN, _ACK = 0x02, 0x04, 0x01, 0x10
_NEW_SHARE: Final = 4  # the new segment holds max_flows // 4


@attrs.define
class ConntrackCounters:
    misses: int = 0
    evictions: collections.Counter[str] = attrs.field(factory=collections.Counter)
    expirations: collections.Counter[str] = attrs.field(factory=collections.Counter)


class FlowTable:
    """Flow key -> backend id (:class:`~caplance.forwarding.BackendEntry` ``id``). Per packet, call :meth:`lookup`; on a miss pick a backend
    and call :meth:`insert`. Call :meth:`expire` now and then (the balancer does every
    second)."""

    def __init__(self, *, max_flows: int, tcp_timeout: float, closing_timeout: float,
                 other_timeout: float) -> None:
        if max_flows < _NEW_SHARE * 2:
            raise ValueError(f"max_flows must be at least {_NEW_SHARE * 2}, got {max_flows}")
        self.max_flows = max_flows
        self._new_capacity = max_flows // _NEW_SHARE
        self._established_capacity = max_flows - self._new_capacity
        #: per segment: key -> [backend, last_seen]
        self.segments: tuple[collections.OrderedDict[bytes, list[object]], ...] = tuple(
            collections.OrderedDict() for _ in SEGMENT_NAMES)
        self.timeouts = (other_timeout, tcp_timeout, other_timeout, closing_timeout)
        self.counters = ConntrackCounters()
        self.hits = 0
        _, tcp, other, _ = self.segments
        self._tcp_get, self._tcp_touch = tcp.get, tcp.move_to_end
        self._other_get, self._other_touch = other.get, other.move_to_end

    def __len__(self) -> int:
        return sum(len(segment) for segment in self.segments)

    def lookup(self, key: bytes, tcp_flags: int | None, now: float) -> int | None:
        """The backend remembered for ``key``, refreshed; None on a miss.

        ``tcp_flags`` is None for non-TCP packets. A FIN or RST moves a TCP flow to the
        closing segment; a packet that is not a bare SYN promotes a new flow. A bare SYN on an
        established or closing flow is a new connection on reused ports (a client only sends
        a SYN before its connection is established, while the flow is still new): a miss.
        """
        # The common case first, with no more work than it needs: an established flow.
        if tcp_flags is None:
            found = self._other_get(key)
            if found is not None:
                found[1] = now
                self._other_touch(key)
                self.hits += 1
                return found[0]  # type: ignore[return-value]
        elif not tcp_flags & (_FIN | _RST | _SYN):
            found = self._tcp_get(key)
            if found is not None:
                found[1] = now
                self._tcp_touch(key)
                self.hits += 1
                return found[0]  # type: ignore[return-value]
        return self._lookup_slowly(key, tcp_flags, now)

    def _lookup_slowly(self, key: bytes, tcp_flags: int | None, now: float) -> int | None:
        new, tcp, other, closing = self.segments
        if tcp_flags is None:
            found, segment = other.get(key), OTHER
        else:
            found, segment = tcp.get(key), TCP
            if found is None:
                found, segment = closing.get(key), CLOSING
        if found is None:
            found, segment = new.get(key), NEW
        if found is None or (segment in (TCP, CLOSING) and tcp_flags is not None
                             and tcp_flags & (_SYN | _ACK) == _SYN):
            if found is not None:  # a new connection on an old one's ports: pick afresh
                del self.segments[segment][key]
                self.counters.expirations["reused"] += 1
            self.counters.misses += 1
            return None
        self.hits += 1
        found[1] = now
        if tcp_flags is not None and tcp_flags & (_FIN | _RST) and segment != CLOSING:
            del self.segments[segment][key]
            self._place(key, found, CLOSING)
        elif segment == NEW and (tcp_flags is None or tcp_flags & (_SYN | _ACK) != _SYN):
            del new[key]
            self._place(key, found, OTHER if tcp_flags is None else TCP)
        else:
            self.segments[segment].move_to_end(key)
        return found[0]  # type: ignore[return-value]

    def insert(self, key: bytes, backend: int, now: float) -> None:
        """Remember a new flow (in the new segment)."""
        self._place(key, [backend, now], NEW)

    def reassign(self, key: bytes, backend: int) -> None:
        """Point an existing flow at another backend (its own left); counted as expired."""
        for segment in self.segments:
            entry = segment.get(key)
            if entry is not None:
                entry[0] = backend
                self.counters.expirations["backend_gone"] += 1
                return

    def _place(self, key: bytes, entry: list[object], segment: int) -> None:
        self.segments[segment][key] = entry
        if segment == NEW:
            if len(self.segments[NEW]) > self._new_capacity:
                self.segments[NEW].popitem(last=False)
                self.counters.evictions["new"] += 1
            return
        _, tcp, other, closing = self.segments
        if len(tcp) + len(other) + len(closing) > self._established_capacity:
            victim = closing if closing else self._older(tcp, other)
            victim.popitem(last=False)
            self.counters.evictions["established"] += 1

    @staticmethod
    def _older(first: collections.OrderedDict[bytes, list[object]],
               second: collections.OrderedDict[bytes, list[object]]) -> collections.OrderedDict[bytes, list[object]]:
        if not first:
            return second
        if not second:
            return first
        first_seen = next(iter(first.values()))[1]
        second_seen = next(iter(second.values()))[1]
        return first if first_seen <= second_seen else second  # type: ignore[operator]

    def expire(self, now: float, budget: int = 100_000) -> int:
        """Drop flows idle past their segment's timeout, oldest first; at most ``budget``.
        Returns how many went."""
        removed = 0
        for index, segment in enumerate(self.segments):
            deadline = now - self.timeouts[index]
            while segment and removed < budget:
                key, entry = next(iter(segment.items()))
                if entry[1] > deadline:  # type: ignore[operator]
                    break
                del segment[key]
                self.counters.expirations[SEGMENT_NAMES[index]] += 1
                removed += 1
        return removed

    def snapshot(self) -> dict[str, object]:
        """Counters for ``caplance ctl status`` and ``--print-stats``."""
        return {
            "size": len(self),
            "max_flows": self.max_flows,
            "segments": {name: len(segment) for name, segment in zip(SEGMENT_NAMES, self.segments)},
            "hits": self.hits,
            "misses": self.counters.misses,
            "evictions": dict(self.counters.evictions),
            "expirations": dict(self.counters.expirations),
        }
