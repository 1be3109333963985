"""The contracts Caplance's parts (and third-party plugins) fulfil, as ``typing.Protocol``s.

Nothing here needs a base class: any object with these methods fits.

Hot-path calls (:meth:`Selector.select`, :meth:`PacketSender.send`,
:meth:`PacketSource.receive_nowait`) are synchronous and never wait: the forwarding loop reads
until ``BlockingIOError`` and only then awaits :meth:`PacketSource.wait_readable`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from caplance.netops import IPAddress, NetOps


@runtime_checkable
class Selector(Protocol):
    """An immutable choice of backend per flow key."""

    def select(self, key: bytes, /) -> str | None:
        """The backend name for ``key``, or None when no backend has weight."""
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

    #: the largest inner packet (bytes) that fits the path MTU once encapsulated
    max_packet: int

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
        """A sender to ``backend``. Raises :class:`caplance.errors.CaplanceError` on failure."""
        ...

    def open_receiver(self, bind: IPAddress, netops: NetOps) -> PacketSource:
        """An agent-side source yielding decapsulated inner packets received on ``bind``;
        its ``receive_nowait`` may raise ``MalformedPacket`` for junk (counted, skipped)."""
        ...


class Listener(Protocol):
    """Gets whole IP packets addressed to the VIPs onto the balancer, without the local
    stack answering them itself."""

    name: str

    def open(self, vips: Sequence[IPAddress], netops: NetOps) -> Sequence[PacketSource]:
        """Attach ``vips`` and return the sources to read. Every change is recorded in
        ``netops`` (so the caller's ``netops.undo_all()`` detaches everything)."""
        ...
