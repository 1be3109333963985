"""The contracts Caplance's parts (and third-party plugins) fulfil, as ``typing.Protocol``s.

Nothing here needs a base class: any object with these methods fits. Pure: importing this
module loads no trio, sockets or netlink.

Hot-path calls (:meth:`Selector.select`, :meth:`PacketSender.send`,
:meth:`PacketSource.receive_nowait`) are synchronous and never wait: the forwarding loop reads
until ``BlockingIOError`` and only then awaits :meth:`PacketSource.wait_readable`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from caplance.packet import IPAddress

if TYPE_CHECKING:
    from caplance.forwarding import LookupTable
    from caplance.netops import NetOps


@runtime_checkable
class Selector(Protocol):
    """An immutable choice of backend per flow key."""

    def select(self, key: bytes, /) -> str | None:
        """The backend name for ``key``, or None when no backend has weight."""
        ...


@runtime_checkable
class TableSelector(Selector, Protocol):
    """A selector that is a lookup table (maglev, rendezvous): data planes that need a table
    (the kernel's) can take it."""

    def lookup_table(self, ids: Mapping[str, int], /) -> LookupTable:
        """The table in backend ids (``ids``: name -> id for every backend of weight > 0):
        ``lookup_table(ids).entry(key) == ids[select(key)]`` for every key (0 for None)."""
        ...


class SelectorFactory(Protocol):
    """What a selector plugin's entry point names: usually the selector class itself."""

    def build(self, backends: Mapping[str, int], /, **options: Any) -> Selector:
        """A selector for ``backends`` (name -> weight >= 0; 0 means no new flows).

        Raises ``ValueError``/``TypeError`` for bad options or weights.
        """
        ...


class PacketSender(Protocol):
    """Sends whole inner IP packets to one backend, encapsulated."""

    def send(self, packet: bytes, key: bytes, /) -> object:
        """Encapsulate and send ``packet`` (``key`` is its flow key, for transports that spread
        flows over source ports). Raises ``BlockingIOError`` when the socket buffer is full
        (the caller counts a drop) or ``OSError`` on a send failure. Never blocks."""
        ...

    def close(self) -> None: ...


class PacketSource(Protocol):
    """A non-blocking stream of whole IP packets."""

    def receive_nowait(self) -> bytes:
        """The next packet, or ``BlockingIOError`` when none is waiting."""
        ...

    async def wait_readable(self) -> None:
        """Return when :meth:`receive_nowait` may have a packet. Cancellable."""
        ...

    def close(self) -> None:
        """Release the socket or device queue (idempotent)."""
        ...


class Transport(Protocol):
    """An encapsulation: the balancer side opens senders, the agent side opens sources."""

    name: str

    def overhead(self, outer_version: int) -> int:
        """Bytes the encapsulation adds to an inner packet, outer IPv4 or IPv6 header included."""
        ...

    def encapsulate(self, packet: bytes, key: bytes, /) -> bytes:
        """What follows the outer IP header on the wire for ``packet`` (pure)."""
        ...

    def decapsulate(self, data: bytes, /) -> bytes:
        """The inner packet of what follows the outer IP header; raises
        :class:`~caplance.errors.MalformedPacket` for anything else (pure)."""
        ...

    def open_sender(self, backend: IPAddress) -> PacketSender:
        """A sender to ``backend``. Raises :class:`caplance.errors.CaplanceError` on failure.

        A transport may also have ``max_packet(backend) -> int``, the largest inner packet
        that fits the path once encapsulated; without it the control plane takes the path
        MTU toward ``backend`` minus :meth:`overhead`."""
        ...

    def open_receiver(self, bind: IPAddress, netops: NetOps) -> PacketSource:
        """An agent-side source yielding decapsulated inner packets received on ``bind``;
        its ``receive_nowait`` may raise ``MalformedPacket`` for junk (counted, skipped)."""
        ...


class Listener(Protocol):
    """Gets whole IP packets addressed to the VIPs onto the balancer, without the local
    stack answering them itself. Plugins register in the ``caplance.listeners`` group.

    Two steps, so several data-plane processes can share one listener: the control plane
    calls :meth:`attach` once (host changes), then each data plane calls :meth:`open` for its
    own sources -- possibly in another process, which gets the listener by pickling, so keep
    only plain values on it (what the host holds goes in ``netops``' undo log).
    """

    name: str
    #: the most data-plane processes it can feed at once (1: no kernel fan-out)
    max_workers: int

    def attach(self, vips: Sequence[IPAddress], netops: NetOps, *, workers: int = 1) -> None:
        """Make the host deliver the VIPs' packets here (addresses, routes, rules, devices),
        for ``workers`` data planes. Every change is recorded in ``netops`` (its
        ``undo_all()`` detaches everything). Raises :class:`~caplance.errors.CaplanceError`."""
        ...

    def open(self, worker: int, workers: int) -> Sequence[PacketSource]:
        """The sources data plane ``worker`` (0 .. ``workers`` - 1) reads: the kernel's fan-out
        gives each its share, every packet of a flow to the same one. The caller closes them."""
        ...
