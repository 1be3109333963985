"""Data planes: consumers of the control plane's :class:`~caplance.forwarding.ForwardingTable`.

A data plane forwards by the latest table it was given and nothing else; the control plane
reaches it only through :meth:`DataPlane.apply`. Built in:

* :class:`caplance.dataplane.python.PythonDataPlane` -- the drain loop, in the balancer's own
  process (the reference model the kernel data plane is tested against);
* :class:`caplance.dataplane.workers.WorkerPool` -- N Python data planes in processes of their
  own, fed by the kernel's fan-out (``workers`` in the config).

Importing this package imports neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import trio

    from caplance.forwarding import ForwardingTable

__all__ = ["DataPlane"]


class DataPlane(Protocol):
    """The contract every data plane meets."""

    #: a short name for ``ctl status`` ("python", "workers", ...)
    name: str

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Forward until cancelled; ``task_status.started()`` once packets flow. On exit
        (cancellation included) every socket, process or program it opened is closed."""
        ...

    def apply(self, table: ForwardingTable) -> None:
        """Forward by ``table`` from now on. Synchronous, never blocks: a swap, or a message
        queued for worker processes (which catch up to the newest table)."""
        ...

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters, plain data that :func:`caplance.dataplane.stats.merge`
        adds to others: ``packets_in``, ``forwarded``/``forwarded_bytes`` by backend name,
        ``dropped`` by reason, ``conntrack`` (or None), ``dataplane`` (its own figures)."""
        ...
