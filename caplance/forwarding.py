"""The forwarding table: the one value the control plane publishes and every data plane reads.

Pure: no trio, sockets or netlink; it pickles, so worker processes get it over a pipe.

A :class:`ForwardingTable` is immutable and versioned. The control plane builds a new one on
every change of the backend set (or of admission, when stopping) and hands it to each data
plane's ``apply``; a data plane swaps it in whole. It holds, as Katran's maps do:

* **VIPs** (:class:`VipEntry`): address, protocol, ports, flags, and the VIP's selector as a
  :class:`LookupTable` -- ``entry = ids[flow_hash(key, seed) % size]`` -- for table selectors
  (maglev, rendezvous), or the selector value itself for those that have no table (ring);
  plus the ids of the backends whose established flows may keep going (``members``).
* **Backends** (:class:`BackendEntry`) by small integer id (0 = none, as Katran's reals):
  name, address, transport and its options, and the largest inner packet that fits the path
  to it once encapsulated. An id is stable while its backend exists (:class:`BackendIds`).

A data plane that holds version N asks what changed (:meth:`ForwardingTable.changes_since`,
or :meth:`TableLog.changes_since` by version number) and applies only that
(:meth:`ForwardingTable.apply`): a worker process gets a few changed entries, not the whole
table, per change.
"""

from __future__ import annotations

import array
import collections
import enum
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal, Protocol

import attrs

from caplance.config import PluginConfig
from caplance.flowhash import flow_hash
from caplance.packet import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPAddress

__all__ = [
    "HASH_FUNCTION",
    "MAX_BACKEND_ID",
    "BackendEntry",
    "BackendIds",
    "ForwardingTable",
    "LookupTable",
    "SelectorChoice",
    "TableChanges",
    "TableLog",
    "VipEntry",
    "VipFlags",
]

#: the hash every lookup table uses (defined in :mod:`caplance.flowhash`)
HASH_FUNCTION: Final = "murmur3_x86_32"
#: the largest backend id (ids are 1..MAX_BACKEND_ID; the kernel's backend array has this many)
MAX_BACKEND_ID: Final = 4095
_ID_TYPE: Final = "I"  # a lookup table entry: native unsigned 32-bit, as a BPF array map holds it
if array.array(_ID_TYPE).itemsize != 4:  # pragma: no cover - every platform CPython runs on
    raise ImportError("caplance needs a 4-byte unsigned int array type")


class _Chooser(Protocol):
    def select(self, key: bytes, /) -> str | None: ...


def _dict(value: Mapping[Any, Any]) -> dict[Any, Any]:
    return dict(value)


def _ints(values: Iterable[int]) -> frozenset[int]:
    return frozenset(values)


@attrs.frozen
class LookupTable:
    """A table selector's choice for every flow: ``ids[flow_hash(key, seed) % size]``.

    ``ids`` holds one backend id per slot as native-endian unsigned 32-bit integers (the
    layout of a BPF array map's values); 0 means no backend. Build with :meth:`from_ids`.
    """

    seed: int
    ids: bytes = attrs.field(repr=lambda ids: f"<{len(ids) // 4} slots>")
    function: str = HASH_FUNCTION

    def __attrs_post_init__(self) -> None:
        if not self.ids or len(self.ids) % 4:
            raise ValueError("a lookup table needs at least one 4-byte slot")
        if self.function != HASH_FUNCTION:
            raise ValueError(f"unknown hash function {self.function!r}")

    @classmethod
    def from_ids(cls, seed: int, ids: Iterable[int]) -> LookupTable:
        return cls(seed=seed, ids=array.array(_ID_TYPE, ids).tobytes())

    @property
    def size(self) -> int:
        return len(self.ids) // 4

    def slots(self) -> memoryview:
        """The ids as a read-only sequence of ints (a ``memoryview`` cast to ``I``)."""
        return memoryview(self.ids).cast(_ID_TYPE)

    def entry(self, key: bytes) -> int:
        """The backend id for flow key ``key`` (0: none)."""
        return int(self.slots()[flow_hash(key, self.seed) % self.size])


@attrs.frozen
class SelectorChoice:
    """A selector without a lookup table (``ring``): asked per new flow, by backend name."""

    selector: _Chooser = attrs.field(eq=False)
    #: backend name -> id
    ids: Mapping[str, int] = attrs.field(converter=_dict)

    def entry(self, key: bytes) -> int:
        name = self.selector.select(key)
        return 0 if name is None else self.ids.get(name, 0)


class VipFlags(enum.IntFlag):
    """Per-VIP switches a data plane obeys."""

    NONE = 0
    #: admit no new flows (the balancer is stopping): only known flows are forwarded
    CLOSED = 1


_PROTOCOLS: Final[dict[str, frozenset[int] | None]] = {
    "tcp": frozenset({IPPROTO_TCP, IPPROTO_ICMP, IPPROTO_ICMPV6}),
    "udp": frozenset({IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6}),
    "any": None,
}


@attrs.frozen
class VipEntry:
    """One VIP as a data plane sees it."""

    address: IPAddress
    protocol: Literal["tcp", "udp", "any"]
    #: ports taken; empty: every port
    ports: frozenset[int] = attrs.field(converter=_ints)
    #: the selector plugin's name (for messages: "selector 'ring' has no lookup table")
    selector: str
    #: how a new flow picks its backend
    choice: LookupTable | SelectorChoice
    #: backend ids whose established flows keep going (paused and draining ones included)
    members: frozenset[int] = attrs.field(converter=_ints)
    flags: VipFlags = VipFlags.NONE

    @property
    def protocols(self) -> frozenset[int] | None:
        """IP protocol numbers taken (ICMP always, for errors and pings); None: all."""
        return _PROTOCOLS[self.protocol]

    @property
    def lookup(self) -> LookupTable | None:
        """The lookup table, for data planes that need one; None for table-less selectors."""
        return self.choice if isinstance(self.choice, LookupTable) else None


@attrs.frozen
class BackendEntry:
    """One backend as a data plane sees it."""

    id: int
    name: str
    address: IPAddress
    #: transport plugin name and options
    transport: PluginConfig
    #: the largest inner packet (bytes) that fits the path MTU once encapsulated
    max_packet: int
    #: it unwraps in its kernel (a checksum left to offload stays valid there)
    kernel_decap: bool = False


@attrs.frozen
class TableChanges:
    """What turns table ``base`` into table ``version``: entries added or replaced, and None
    for removed ones."""

    base: int
    version: int
    vips: Mapping[IPAddress, VipEntry | None] = attrs.field(factory=dict, converter=_dict)
    backends: Mapping[int, BackendEntry | None] = attrs.field(factory=dict, converter=_dict)


def _changed(new: Mapping[Any, Any], old: Mapping[Any, Any]) -> dict[Any, Any]:
    found: dict[Any, Any] = {key: value for key, value in new.items()
                             if key not in old or (old[key] is not value and old[key] != value)}
    found.update({key: None for key in old if key not in new})
    return found


@attrs.frozen
class ForwardingTable:
    """An immutable, versioned forwarding table (see the module docstring)."""

    version: int = 0
    vips: Mapping[IPAddress, VipEntry] = attrs.field(factory=dict, converter=_dict)
    backends: Mapping[int, BackendEntry] = attrs.field(factory=dict, converter=_dict)

    def __attrs_post_init__(self) -> None:
        for key, backend in self.backends.items():
            if key != backend.id or not 0 < key <= MAX_BACKEND_ID:
                raise ValueError(f"backend {backend.name!r} has id {backend.id} under key {key}")

    def changes_since(self, older: ForwardingTable) -> TableChanges:
        """What changed from ``older`` to this table."""
        return TableChanges(base=older.version, version=self.version,
                            vips=_changed(self.vips, older.vips),
                            backends=_changed(self.backends, older.backends))

    def apply(self, changes: TableChanges) -> ForwardingTable:
        """The table ``changes`` make of this one. Raises ``ValueError`` if they were made
        for another version."""
        if changes.base != self.version:
            raise ValueError(f"changes for version {changes.base} applied to version {self.version}")
        vips = dict(self.vips)
        backends = dict(self.backends)
        for address, vip in changes.vips.items():
            if vip is None:
                vips.pop(address, None)
            else:
                vips[address] = vip
        for number, backend in changes.backends.items():
            if backend is None:
                backends.pop(number, None)
            else:
                backends[number] = backend
        return ForwardingTable(version=changes.version, vips=vips, backends=backends)

    def with_flags(self, flags: VipFlags, version: int) -> ForwardingTable:
        """This table with every VIP's flags set to ``flags``, as ``version``."""
        return ForwardingTable(version=version, backends=self.backends,
                               vips={a: attrs.evolve(v, flags=flags) for a, v in self.vips.items()})

    def backend_named(self, name: str) -> BackendEntry | None:
        return next((b for b in self.backends.values() if b.name == name), None)


class TableLog:
    """The last ``keep`` published tables, to answer "what changed since version N"."""

    def __init__(self, keep: int = 16) -> None:
        self._tables: collections.OrderedDict[int, ForwardingTable] = collections.OrderedDict()
        self._keep = keep

    def publish(self, table: ForwardingTable) -> None:
        if self._tables and table.version <= next(reversed(self._tables)):
            raise ValueError(f"version {table.version} is not newer than the last published")
        self._tables[table.version] = table
        while len(self._tables) > self._keep:
            self._tables.popitem(last=False)

    @property
    def latest(self) -> ForwardingTable:
        if not self._tables:
            return ForwardingTable()
        return next(reversed(self._tables.values()))

    def changes_since(self, version: int) -> TableChanges | None:
        """The changes from ``version`` to the latest table; None if ``version`` is no longer
        (or never was) kept: then take :attr:`latest` whole."""
        older = self._tables.get(version)
        return None if older is None else self.latest.changes_since(older)


class BackendIds:
    """Backend name -> small integer id (1..``limit``), stable while the name is held.

    A new name takes the next free id after the last one given out (wrapping), so an id
    freed by a backend that left is reused as late as possible: a flow table entry that still
    names it is unlikely to meet a newcomer under that id. Raises ``ValueError`` when every
    id is held.
    """

    def __init__(self, limit: int = MAX_BACKEND_ID) -> None:
        self._limit = limit
        self._ids: dict[str, int] = {}
        self._taken: set[int] = set()
        self._last = 0

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    def get(self, name: str) -> int | None:
        return self._ids.get(name)

    def hold(self, name: str) -> int:
        """The id of ``name``, given out now if it had none."""
        found = self._ids.get(name)
        if found is not None:
            return found
        if len(self._taken) >= self._limit:
            raise ValueError(f"all {self._limit} backend ids are in use")
        candidate = self._last
        while True:
            candidate = candidate % self._limit + 1
            if candidate not in self._taken:
                break
        self._ids[name] = self._last = candidate
        self._taken.add(candidate)
        return candidate

    def release(self, name: str) -> None:
        found = self._ids.pop(name, None)
        if found is not None:
            self._taken.discard(found)

    def names(self) -> list[str]:
        return sorted(self._ids)
