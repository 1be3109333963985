"""Selector builds, off the forwarding path: what a VIP's backends and weights make of its
selector, as the forwarding table holds it.

A build of 1000 backends is pure Python for tens to hundreds of milliseconds, and a thread
would hold the GIL all along, stalling the data plane that shares the process.
:class:`ProcessBuilder` therefore builds in a child process of its own (started once, kept,
restarted if it dies) and only unpickles the result -- a lookup table is one ``bytes`` --
in the balancer. :class:`InlineBuilder` builds in the caller's thread: for tests on trio's
mock clock, and as the fallback when no child can run.

Run this module (``python -m caplance.control.rebuild``) to be that child: it reads build
requests on stdin and writes results on stdout (:mod:`caplance.ipc` framing).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, Protocol

import trio

from caplance import ipc, plugins
from caplance.config import PluginConfig
from caplance.errors import PluginError
from caplance.forwarding import LookupTable, SelectorChoice

__all__ = ["InlineBuilder", "ProcessBuilder", "TableBuilder", "build_choice"]

log = logging.getLogger(__name__)

Choice = LookupTable | SelectorChoice


class TableBuilder(Protocol):
    """Builds a VIP's choice of backend from its selector spec, weights and backend ids."""

    async def build(self, spec: PluginConfig, weights: Mapping[str, int], ids: Mapping[str, int]) -> Choice:
        """Raises :class:`~caplance.errors.PluginError` for a selector that rejects its input."""
        ...


def build_choice(spec: PluginConfig, weights: Mapping[str, int], ids: Mapping[str, int]) -> Choice:
    """Build selector ``spec`` for ``weights`` (name -> weight) and express it in backend ids
    (``ids``: name -> id): its lookup table when it has ``lookup_table()``, else the selector
    itself. Raises :class:`PluginError`."""
    selector = plugins.build_selector(spec.name, weights, spec.options)
    export = getattr(selector, "lookup_table", None)
    if not callable(export):
        return SelectorChoice(selector=selector, ids={name: ids[name] for name in weights})
    try:
        table = export(ids)
    except (TypeError, ValueError, KeyError) as exc:
        raise PluginError(plugins.SELECTORS, spec.name, f"lookup_table() failed: {exc!r}") from exc
    if not isinstance(table, LookupTable):
        raise PluginError(plugins.SELECTORS, spec.name,
                          f"lookup_table() returned {type(table).__name__}, not a LookupTable")
    return table


class InlineBuilder:
    """Builds in the calling thread (holding the GIL: the data plane waits meanwhile)."""

    async def build(self, spec: PluginConfig, weights: Mapping[str, int], ids: Mapping[str, int]) -> Choice:
        await trio.lowlevel.checkpoint()
        return build_choice(spec, weights, ids)


class ProcessBuilder:
    """Builds in a child Python process. Run it in the caller's nursery
    (``await nursery.start(builder.run)``); :meth:`build` waits for the child and, if the
    child cannot be started or dies, builds inline rather than not at all."""

    def __init__(self) -> None:
        self._channel: ipc.Channel | None = None
        self._process: trio.Process | None = None
        self._lock = trio.Lock()
        self._ready = trio.Event()
        self.restarts = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a child running until cancelled (then it is killed)."""
        started = False
        while True:
            try:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "caplance.control.rebuild"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            except OSError as exc:
                log.warning("cannot start the selector build process; building inline",
                            extra={"error": str(exc)})
                self._ready.set()
                if not started:
                    task_status.started()
                await trio.sleep_forever()
            assert process.stdin is not None and process.stdout is not None
            try:
                self._process = process
                self._channel = ipc.Channel(process.stdout, process.stdin)
                self._ready.set()
                if not started:
                    started = True
                    task_status.started()
                await process.wait()
            finally:
                self._channel = self._process = None
                self._ready = trio.Event()
                with trio.CancelScope(shield=True):
                    process.kill()
                    await process.wait()
            self.restarts += 1
            log.warning("selector build process exited; restarting", extra={"code": process.returncode})
            await trio.sleep(0.5)

    async def build(self, spec: PluginConfig, weights: Mapping[str, int], ids: Mapping[str, int]) -> Choice:
        async with self._lock:
            with trio.move_on_after(10):
                await self._ready.wait()
            channel = self._channel
            if channel is None:
                return build_choice(spec, weights, ids)
            try:
                await channel.send((spec, dict(weights), dict(ids)))
                ok, result = await channel.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, OSError) as exc:
                log.warning("selector build process lost; building inline", extra={"error": str(exc)})
                return build_choice(spec, weights, ids)
            except BaseException:
                # Cancelled mid-request: its answer would reach the next caller. Start afresh.
                self._channel = None
                if self._process is not None:
                    self._process.kill()
                raise
        if not ok:
            raise PluginError(plugins.SELECTORS, spec.name, str(result))
        assert isinstance(result, (LookupTable, SelectorChoice))
        return result


def _serve() -> int:
    """The child: build what stdin asks, answer on stdout, until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            spec, weights, ids = ipc.read_message(stdin)
        except EOFError:
            return 0
        try:
            answer: tuple[bool, Any] = (True, build_choice(spec, weights, ids))
        except PluginError as exc:
            answer = (False, exc.problem)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug travels back as a PluginError
            answer = (False, f"build failed: {exc!r}")
        ipc.write_message(stdout, answer)


if __name__ == "__main__":
    sys.exit(_serve())
