"""Worker processes: N Python data planes fed by the kernel's fan-out, one control plane.

Python forwards on one core per process. :class:`WorkerPool` runs ``workers`` child processes
(``python -m caplance.dataplane.workers``), each a :class:`~caplance.dataplane.python.PythonDataPlane`
that opens its own share of the listener (a TUN queue, a ``PACKET_FANOUT`` member, a raw
socket with a share filter): the kernel gives every packet of a flow to the same worker, and
every worker forwards by the same tables, so a flow gets the same backend whichever worker
handles it.

The pool is one data plane to the control plane: :meth:`WorkerPool.apply` queues the table
for every worker (each gets only what changed since the version it has, or the whole table
after a restart), :meth:`WorkerPool.stats` merges the workers' counters (with those of
earlier, dead incarnations, so totals never go back). A worker that dies is restarted and
counted; its flows' table state goes with it (as a balancer restart would lose it), their
backends do not change unless the backend set did meanwhile.

Parent and child talk over the child's stdin/stdout (:mod:`caplance.ipc`); a child whose
parent vanishes sees its stdin close and exits. (Not ``PR_SET_PDEATHSIG``: it fires when the
parent *thread* that started the child ends, and trio starts processes from a worker thread
that ends when idle -- the workers would be killed a few seconds in.)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Any

import attrs
import trio

from caplance import ipc
from caplance.config import ConntrackConfig
from caplance.dataplane.stats import merge
from caplance.errors import CaplanceError
from caplance.forwarding import ForwardingTable, TableChanges, TableLog
from caplance.interfaces import Listener

__all__ = ["STATS_INTERVAL", "WorkerPool"]

log = logging.getLogger(__name__)

#: seconds between a worker's counter reports
STATS_INTERVAL = 0.25
RESTART_DELAY = 0.5
_STOP_TIMEOUT = 5.0
#: flow-table figures that are levels, not counts: a dead incarnation's do not add up
_LEVELS = ("size", "max_flows", "segments")


@attrs.define
class _Worker:
    index: int
    wake: trio.Event = attrs.field(factory=trio.Event)
    #: the table version this worker has; -1: none (send it whole)
    version: int = -1
    stats: dict[str, Any] = attrs.field(factory=dict)
    retired: dict[str, Any] = attrs.field(factory=dict)
    up: bool = False
    pid: int | None = None


class WorkerPool:
    """``count`` worker processes forwarding what ``listener`` (attached already) delivers."""

    name = "workers"

    def __init__(self, listener: Listener, conntrack: ConntrackConfig, count: int) -> None:
        if count < 1:
            raise ValueError(f"a pool needs at least one worker, got {count}")
        self.listener = listener
        self.conntrack = conntrack
        self.restarts = 0
        self._log = TableLog()
        self._workers = [_Worker(index) for index in range(count)]

    @property
    def pids(self) -> list[int | None]:
        """The workers' process ids (None while one is down)."""
        return [worker.pid for worker in self._workers]

    def apply(self, table: ForwardingTable) -> None:
        self._log.publish(table)
        for worker in self._workers:
            worker.wake.set()

    def stats(self) -> dict[str, Any]:
        total = merge([part for worker in self._workers for part in (worker.retired, worker.stats)])
        total["dataplane"] = {
            "workers": len(self._workers), "workers_up": sum(w.up for w in self._workers),
            "worker_restarts": self.restarts, "worker_pids": self.pids,
            "worker_packets_in": [w.retired.get("packets_in", 0) + w.stats.get("packets_in", 0)
                                  for w in self._workers],
        }
        return total

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every worker; ready once each forwards. Raises
        :class:`~caplance.errors.CaplanceError` if one cannot start the first time."""
        async with trio.open_nursery() as nursery:
            for worker in self._workers:
                await nursery.start(self._supervise, worker)
            task_status.started()

    async def _supervise(self, worker: _Worker, *, task_status: trio.TaskStatus[None]) -> None:
        started = False
        while True:
            error = await self._incarnation(worker, None if started else task_status)
            if not (started or worker.up):
                raise CaplanceError(f"data-plane worker {worker.index} did not start: {error}")
            started = True
            self.restarts += 1
            worker.retired = _retire(worker.retired, worker.stats)
            worker.stats, worker.version, worker.up, worker.pid = {}, -1, False, None
            log.warning("data-plane worker exited; restarting",
                        extra={"worker": worker.index, "error": error, "restarts": self.restarts})
            await trio.sleep(RESTART_DELAY)

    async def _incarnation(self, worker: _Worker, task_status: trio.TaskStatus[None] | None) -> str:
        """Run one worker process until it exits (``worker.up`` says whether it got ready);
        why it ended."""
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "caplance.dataplane.workers"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert process.stdin is not None and process.stdout is not None
        worker.pid = process.pid
        channel = ipc.Channel(process.stdout, process.stdin)
        error: str | None = "exited before it was ready"
        try:
            await channel.send(("start", self.listener, self.conntrack, worker.index, len(self._workers),
                                logging.getLogger().level))
            worker.wake.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._feed, worker, channel)
                while True:
                    try:
                        kind, body = await channel.receive()
                    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    if kind == "ready":
                        worker.up, error = True, None
                        if task_status is not None:
                            task_status.started()
                            task_status = None
                    elif kind == "stats":
                        worker.stats = body
                    elif kind == "error":
                        error = body
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(_STOP_TIMEOUT, shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    with trio.move_on_after(_STOP_TIMEOUT / 2):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                await process.wait()
        return error or f"exit status {process.returncode}"

    async def _feed(self, worker: _Worker, channel: ipc.Channel) -> None:
        """Send the worker what changed since the table it has, whenever a table is out."""
        while True:
            await worker.wake.wait()
            worker.wake = trio.Event()
            latest = self._log.latest
            if latest.version == worker.version or not latest.vips:
                continue
            changes = self._log.changes_since(worker.version) if worker.version >= 0 else None
            message: tuple[str, ForwardingTable | TableChanges] = (
                ("changes", changes) if changes is not None else ("table", latest))
            try:
                await channel.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            worker.version = latest.version


def _retire(retired: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """Add a dead incarnation's counters to those of the ones before it (levels dropped)."""
    counted = dict(last)
    flows = counted.get("conntrack")
    if isinstance(flows, dict):
        counted["conntrack"] = {k: v for k, v in flows.items() if k not in _LEVELS}
    return merge([retired, counted])


# -- the child -------------------------------------------------------------------------------


async def _child() -> None:
    from caplance.dataplane.python import PythonDataPlane

    receive = trio.lowlevel.FdStream(os.dup(0))
    send = trio.lowlevel.FdStream(os.dup(1))
    os.dup2(2, 1)  # a stray print must not break the pipe's framing
    channel = ipc.Channel(receive, send)
    kind, listener, conntrack, index, count, level = await channel.receive()
    assert kind == "start"
    _log_like_parent(level)
    dataplane = PythonDataPlane(listener, conntrack, worker=index, workers=count)
    table = ForwardingTable()
    while not table.vips:  # the first table, before any packet is read
        kind, body = await channel.receive()
        table = body if kind == "table" else table.apply(body)
    dataplane.apply(table)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dataplane.run)
            await channel.send(("ready", None))

            async def report() -> None:
                while True:
                    await channel.send(("stats", dataplane.stats()))
                    await trio.sleep(STATS_INTERVAL)

            nursery.start_soon(report)
            while True:
                try:
                    kind, body = await channel.receive()
                except (EOFError, trio.BrokenResourceError):
                    break  # the balancer is gone or stopping
                table = body if kind == "table" else table.apply(body)
                dataplane.apply(table)
            nursery.cancel_scope.cancel()
    except CaplanceError as exc:
        with trio.move_on_after(1):
            await channel.send(("error", str(exc)))
        raise


def _log_like_parent(level: int) -> None:
    from caplance.cli import KeyValueFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the balancer stops us; a terminal's Ctrl-C is its
    try:
        trio.run(_child)
    except CaplanceError as exc:
        print(f"caplance worker: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        print(f"caplance worker: {group!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
