"""SIGTERM as Ctrl-C for the lab and its scripts: a KeyboardInterrupt in plain code and inside
trio.run, the previous handlers back afterwards, nothing at all off the main thread."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import trio

from caplance.lab.signals import ignoring_interrupts, interrupt, sigterm_as_interrupt


def test_sigterm_raises_keyboard_interrupt_and_the_handler_comes_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    reached_finally = False
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between two bytecodes, soon
                pass
        finally:
            reached_finally = True
    assert reached_finally
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_inside_trio_is_delivered_as_ctrl_c() -> None:
    """Inside trio.run, trio's SIGINT handler gets it: a KeyboardInterrupt out of trio.run,
    after the main task's ``finally`` ran (awaiting in it still works)."""
    cleaned = []

    async def main() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            with trio.fail_after(10):
                await trio.sleep_forever()
        finally:
            await trio.lowlevel.checkpoint()
            cleaned.append(True)

    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        trio.run(main)
    assert cleaned == [True]


def test_ignoring_interrupts_ignores_both_then_restores() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt(), ignoring_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_interrupt_does_nothing_while_sigint_is_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        interrupt(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_off_the_main_thread_nothing_changes() -> None:
    before = signal.getsignal(signal.SIGTERM)
    errors: list[ValueError] = []

    def other() -> None:
        try:
            with sigterm_as_interrupt(), ignoring_interrupts():
                pass
        except ValueError as exc:  # what signal.signal raises off the main thread
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert errors == []
    assert signal.getsignal(signal.SIGTERM) is before
