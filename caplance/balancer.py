"""The balancer: one control plane and its data plane, composed in one nursery.

The :class:`~caplance.control.plane.ControlPlane` decides what to forward and publishes it as
:class:`~caplance.forwarding.ForwardingTable` values; the data plane -- a
:class:`~caplance.dataplane.python.PythonDataPlane` in this process, or a
:class:`~caplance.dataplane.workers.WorkerPool` of them in processes of their own -- forwards
by the latest table. The listener (a ``caplance.listeners`` plugin) is attached once by the
balancer and read by the data plane.

Stopping, in this order: stop admitting new flows (a table whose VIPs are closed), withdraw
announcements (once announcers exist), drain (forward the known flows until idle or the
deadline), detach (cancel everything, undo every host change).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import trio

from caplance import plugins
from caplance.config import BalancerConfig
from caplance.control.plane import ControlPlane
from caplance.control.rebuild import TableBuilder
from caplance.dataplane import DataPlane
from caplance.dataplane.python import PythonDataPlane
from caplance.interfaces import Listener, Transport
from caplance.netops import NetOps

__all__ = ["Balancer", "worker_count"]

log = logging.getLogger(__name__)


def worker_count(config: BalancerConfig, listener: Listener) -> int:
    """How many data-plane processes ``config`` asks for (``"auto"``: one per CPU), at most
    what ``listener`` can feed."""
    wanted = (os.cpu_count() or 1) if config.workers == "auto" else config.workers
    return max(1, min(wanted, getattr(listener, "max_workers", 1)))


class Balancer:
    """A Maglev-style balancer for the VIPs of ``config``.

    Run it with ``await nursery.start(balancer.run)``: it returns once the VIPs are attached
    and packets flow. :meth:`stop` drains and detaches. ``listener`` overrides the one the
    config names and ``transports`` (name -> transport) shadow plugins of those names, for
    tests and embedding; ``builder`` builds selectors (default: in a child process).
    """

    def __init__(self, config: BalancerConfig, *, listener: Listener | None = None,
                 transports: Mapping[str, Transport] | None = None,
                 builder: TableBuilder | None = None) -> None:
        self.config = config
        self.listener = listener or plugins.make_listener(
            config.listener.kind, interface=config.listener.interface, device=config.listener.device,
            options=config.listener.options)
        #: membership, sessions, rebuilds, ctl, metrics
        self.control = ControlPlane(config, transports=transports, builder=builder)
        self.workers = worker_count(config, self.listener)
        self.dataplane: DataPlane
        if self.workers > 1:
            from caplance.dataplane.workers import WorkerPool

            self.dataplane = WorkerPool(self.listener, config.conntrack, self.workers)
        else:
            self.dataplane = PythonDataPlane(self.listener, config.conntrack, transports=transports)
        self.control.add_consumer(self.dataplane)
        self._stop = trio.Event()

    def stop(self) -> None:
        """Ask :meth:`run` to drain and return. Idempotent; returns at once."""
        self._stop.set()

    @property
    def draining(self) -> bool:
        return not self.control.admitting

    def snapshot(self) -> dict[str, Any]:
        """The counters (the data plane's, merged), the control events and the flow table."""
        status = self.control.status()
        return {**status["counters"], "control": status["control"], "conntrack": status["conntrack"],
                "dataplane": status["dataplane"]}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Build the first table, attach the VIPs, forward until :meth:`stop`, then stop in
        order: admit no new flows, drain, detach everything.

        Draining: new flows are dropped (with connection tracking: every packet the flow table
        does not know; without it: TCP SYNs), the others still forwarded, until no packet
        arrived for ``drain_idle`` seconds or ``drain_timeout`` passed.
        On cancellation it skips the drain; either way every address, route, rule, device,
        socket and process it made is removed before it returns (cleanup is bounded).
        """
        netops = NetOps()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.control.run, netops)
                vips = [vip.address for vip in self.config.vips]
                self.listener.attach(vips, netops, workers=self.workers)
                await nursery.start(self.dataplane.run)
                log.info("balancer attached", extra={
                    "vips": [str(v) for v in vips], "listener": self.listener.name,
                    "dataplane": self.dataplane.name, "workers": self.workers})
                task_status.started()
                await self._stop.wait()
                self.control.stop_admitting()
                await self._drain()
                nursery.cancel_scope.cancel()
        finally:
            problems = netops.undo_all()
            log.info("balancer detached", extra={"cleanup_problems": problems})

    async def _drain(self) -> None:
        with trio.move_on_after(self.config.drain_timeout):
            seen = -1
            while True:
                now = self.dataplane.stats().get("packets_in", 0)
                if now == seen:
                    return
                seen = now
                await trio.sleep(self.config.drain_idle)
