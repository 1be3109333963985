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
from typing import TYPE_CHECKING, Any

import trio

from caplance import plugins
from caplance.config import BalancerConfig
from caplance.errors import CaplanceError
from caplance.forwarding import ForwardingTable
from caplance.control.plane import ControlPlane
from caplance.control.rebuild import TableBuilder
from caplance.dataplane import DataPlane
from caplance.dataplane.python import PythonDataPlane
from caplance.interfaces import Listener, Transport
from caplance.netops import NetOps, default_interface
from caplance.recovery import undo_dead_runs
from caplance.security import require_control_security

if TYPE_CHECKING:
    from caplance.dataplane.bpf.plane import BpfDataPlane

__all__ = ["Balancer", "FastpathOff", "fastpath_for", "worker_count"]

log = logging.getLogger(__name__)


class FastpathOff:
    """Stands where the kernel data plane would: says why it is not there (``ctl status``)."""

    name = "off"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def apply(self, table: ForwardingTable) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"fastpath": {"mode": "off", "reason": self.reason}}


def fastpath_for(config: BalancerConfig, listener: Listener, *, own_listener: bool) -> BpfDataPlane | FastpathOff:
    """The kernel data plane ``config`` asks for, or why not. Raises
    :class:`~caplance.errors.CaplanceError` when ``tc`` or ``xdp`` is asked for explicitly and
    cannot run; ``auto`` falls back to Python, saying why in one log line."""
    from caplance.dataplane.bpf.plane import BpfDataPlane, unavailable

    wanted = config.fastpath.mode
    if wanted == "off":
        return FastpathOff("fastpath mode is off")
    mode = "tc" if wanted == "auto" else wanted
    interface = config.fastpath.interface or getattr(listener, "interface", None)
    if interface in (None, "lo"):
        interface = default_interface()
    if not own_listener and wanted == "auto":
        reason: str | None = f"the listener is a {type(listener).__name__} object, not the kernel's"
    elif mode == "tc" and listener.name == "packet":
        reason = "listener 'packet' sees every packet before tc does"
    else:
        reason = unavailable(mode, interface)
    if reason is None:
        assert interface is not None
        return BpfDataPlane(mode, interface, config.conntrack,
                            new_flows_per_second=config.fastpath.new_flows_per_second)
    if wanted != "auto":
        raise CaplanceError(f"fastpath mode {wanted!r} cannot run: {reason}")
    log.info("kernel data plane off; forwarding in Python", extra={"reason": reason})
    return FastpathOff(reason)


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
        #: the kernel data plane in front of the Python one (or why there is none)
        self.fastpath = fastpath_for(config, self.listener, own_listener=listener is None)
        self.control.add_consumer(self.dataplane)
        self.control.add_consumer(self.fastpath)
        if not isinstance(self.fastpath, FastpathOff):
            self.control.switches["fastpath"] = self.fastpath.set_attached
        self.control.switches["stop"] = self._stop_by_operator
        self._stop = trio.Event()

    def stop(self) -> None:
        """Ask :meth:`run` to stop gracefully -- withdraw, drain, detach -- and return.
        Idempotent; returns at once."""
        self._stop.set()

    def _stop_by_operator(self, _: bool) -> str:
        self.stop()
        return "balancer stopping: VIPs withdrawn, then draining"

    @property
    def draining(self) -> bool:
        return not self.control.admitting

    def snapshot(self) -> dict[str, Any]:
        """The counters (the data planes', added up), the control events, the flow table and
        the kernel data plane's own figures."""
        status = self.control.status()
        return {**status["counters"], "control": status["control"], "conntrack": status["conntrack"],
                "dataplane": status["dataplane"], "fastpath": status["fastpath"]}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Build the first table, attach the VIPs, forward until :meth:`stop`, then stop in
        order: admit no new flows, drain, detach everything.

        Draining: new flows are dropped (with connection tracking: every packet the flow table
        does not know; without it: TCP SYNs), the others still forwarded, until no packet
        arrived for ``drain_idle`` seconds or ``drain_timeout`` passed.
        On cancellation it skips the drain; either way every address, route, rule, device,
        socket and process it made is removed before it returns (cleanup is bounded).
        """
        require_control_security(self.config)  # ConfigError before anything changes
        undo_dead_runs()  # what a run that died here (SIGKILL) left behind
        netops = NetOps()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.control.run, netops)
                vips = [vip.address for vip in self.config.vips]
                self.listener.attach(vips, netops, workers=self.workers)
                await nursery.start(self.dataplane.run)
                if not isinstance(self.fastpath, FastpathOff):  # the slow path first, then the fast one
                    await nursery.start(self.fastpath.run)
                self.control.set_forwarding(True)  # now the VIPs may be announced
                log.info("balancer attached", extra={
                    "vips": [str(v) for v in vips], "listener": self.listener.name,
                    "dataplane": self.dataplane.name, "workers": self.workers, "fastpath": self.fastpath.name})
                task_status.started()
                await self._stop.wait()
                self.control.stop_admitting()  # no new flows, and every VIP withdrawn
                if self.control.announcements.announcer.name != "none":
                    await trio.sleep(self.config.announce.withdraw_grace)  # the routers move the traffic
                await self._drain()
                self.control.set_forwarding(False)
                nursery.cancel_scope.cancel()
        finally:
            problems = netops.undo_all()
            log.info("balancer detached", extra={"cleanup_problems": problems})

    async def _drain(self) -> None:
        with trio.move_on_after(self.config.drain_timeout):
            seen = -1
            while True:
                now = sum(plane.stats().get("packets_in", 0) for plane in (self.dataplane, self.fastpath))
                if now == seen:
                    return
                seen = now
                await trio.sleep(self.config.drain_idle)
