"""SIGTERM as Ctrl-C, for the lab and the scripts built on it.

``timeout``, a service manager or ``kill`` stop a process with SIGTERM, whose default action
ends it on the spot: no ``finally``, no ``__exit__``, so a lab's namespaces and the processes
in them stay behind. Inside :func:`sigterm_as_interrupt` SIGTERM does whatever SIGINT does at
that moment -- Python's ``KeyboardInterrupt`` in plain code, trio's delivery of it to the main
task inside ``trio.run`` (so it never lands in trio's own bookkeeping) -- and the same cleanup
runs as on Ctrl-C.

Python runs signal handlers in the main thread only, and only the main thread may install
them: from any other thread both helpers here do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import types
from collections.abc import Iterator
from typing import Any

__all__ = ["ignoring_interrupts", "interrupt", "restore_sigterm", "sigterm_as_interrupt", "take_sigterm"]


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def interrupt(signum: int, frame: types.FrameType | None) -> None:
    """A signal handler: do what SIGINT does now. Calls the current SIGINT handler (trio's
    inside ``trio.run``, Python's ``default_int_handler`` outside, which raise or deliver
    ``KeyboardInterrupt``); nothing if SIGINT is ignored; ``KeyboardInterrupt`` if SIGINT has
    its default action (which would end the process with no cleanup)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif handler != signal.SIG_IGN:
        raise KeyboardInterrupt


def take_sigterm() -> Any:
    """Install :func:`interrupt` for SIGTERM; return the handler it replaced, to give to
    :func:`restore_sigterm` (``None`` outside the main thread, where nothing changes)."""
    if not _main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, interrupt)
    return signal.SIG_DFL if previous is None else previous  # None: set outside Python


def restore_sigterm(previous: Any) -> None:
    """Put back the SIGTERM handler :func:`take_sigterm` returned (nothing for ``None``)."""
    if previous is not None and _main_thread():
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM stops the program as Ctrl-C does (see the module's docstring);
    the previous handler is restored on the way out."""
    previous = take_sigterm()
    try:
        yield
    finally:
        restore_sigterm(previous)


@contextlib.contextmanager
def ignoring_interrupts() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM are ignored (so a second Ctrl-C or SIGTERM cannot
    stop a teardown half-way); the previous handlers are restored on the way out."""
    if not _main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
