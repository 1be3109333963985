"""Announcing the VIPs: which ones this balancer should announce, and telling the announcer.

A VIP is announced only while this balancer can serve it: it is attached and forwarding,
still admitting new flows (not stopping), and the VIP has at least ``min_backends`` active,
healthy backends -- and, after a start, only once the backend set has **settled** (no backend
joined for ``settle`` seconds): a balancer that announced with half its backends back would
send the flows it takes over from the other balancers to other backends than theirs.
The :class:`AnnouncementGate` works that out on every membership event and on every change
of the balancer's own state, and asks the announcer (a ``caplance.announcers`` plugin:
``exabgp``, ``bird``, ``none``) to announce or withdraw; the announcer does the BGP, through
a real speaker.

Graceful stop, the scale-out part: stop admitting, **withdraw every VIP**, wait
``withdraw_grace`` seconds while the routers move the traffic to the other balancers (which
pick the same backends: the selectors are deterministic), then drain and detach.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

import attrs
import trio

from caplance.control.membership import Membership, State
from caplance.packet import IPAddress

__all__ = ["AnnouncementGate", "Announcer", "NoAnnouncer"]

log = logging.getLogger(__name__)


class Announcer(Protocol):
    """What an announcer plugin provides (``caplance.announcers`` entry points). Built with the
    ``[announce] options`` as keyword arguments."""

    name: str

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Start the BGP speaker (or connect to it) and keep it going until cancelled; ready once
        it takes announcements. On exit every announcement it made is gone."""
        ...

    def announce(self, vip: IPAddress) -> None:
        """Announce ``vip`` (idempotent, never blocks: the speaker catches up)."""
        ...

    def withdraw(self, vip: IPAddress) -> None:
        """Withdraw ``vip`` (idempotent, never blocks)."""
        ...

    def status(self) -> dict[str, Any]:
        """The speaker's state for ``ctl status``: sessions, what it has announced."""
        ...


class NoAnnouncer:
    """Announcer ``none`` (the default): routes to the VIPs are someone else's business."""

    name = "none"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def announce(self, vip: IPAddress) -> None:
        pass

    def withdraw(self, vip: IPAddress) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {}


@attrs.define
class _Vip:
    announced: bool = False
    reason: str = "not started"
    since: float = attrs.field(factory=time.time)


class AnnouncementGate:
    """Announces each VIP exactly while this balancer can serve it (see the module docstring)."""

    def __init__(self, announcer: Announcer, vips: Iterable[IPAddress], membership: Membership, *,
                 min_backends: int, settle: float = 0.0) -> None:
        self.announcer = announcer
        self.membership = membership
        self.min_backends = min_backends
        self.settle = settle
        #: until when (trio time) the backend set is still settling; None: settled
        self.settling_until: float | None = None
        self._vips = {vip: _Vip() for vip in vips}
        self.forwarding = False  # attached and forwarding
        self.admitting = True
        self.counters = {"announcements": 0, "withdrawals": 0}

    def active(self, vip: IPAddress) -> int:
        """Backends of ``vip`` that take new flows: active, healthy, weight above 0."""
        return sum(1 for m in self.membership.for_vip(vip)
                   if m.state is State.ACTIVE and m.healthy and m.weight > 0)

    def update(self) -> None:
        """Announce or withdraw each VIP as its conditions now say."""
        for vip, state in self._vips.items():
            active = self.active(vip)
            if not self.forwarding:
                wanted, reason = False, "not forwarding"
            elif self.settling_until is not None and not state.announced:
                wanted, reason = False, "backend set settling after the start"
            elif not self.admitting:
                wanted, reason = False, "balancer stopping"
            elif active < self.min_backends:
                wanted, reason = False, f"{active} active backend(s), fewer than {self.min_backends}"
            else:
                wanted, reason = True, f"{active} active backend(s)"
            if wanted != state.announced:
                (self.announcer.announce if wanted else self.announcer.withdraw)(vip)
                self.counters["announcements" if wanted else "withdrawals"] += 1
                log.info("VIP announced" if wanted else "VIP withdrawn",
                         extra={"vip": str(vip), "reason": reason, "announcer": self.announcer.name})
                state.announced, state.since = wanted, time.time()
            state.reason = reason

    def joined(self, now: float) -> None:
        """A backend joined: while settling, the backend set is not settled yet."""
        if self.settling_until is not None:
            self.settling_until = max(self.settling_until, now + self.settle)

    async def run_settling(self) -> None:
        """From the start of forwarding: wait until ``settle`` seconds pass without a backend
        joining (at most four times that), then announce what should be."""
        start = trio.current_time()
        self.settling_until = start + self.settle
        while trio.current_time() < min(self.settling_until, start + 4 * self.settle):
            await trio.sleep_until(min(self.settling_until, start + 4 * self.settle))
        self.settling_until = None
        self.update()

    @property
    def announced(self) -> list[IPAddress]:
        return [vip for vip, state in self._vips.items() if state.announced]

    def status(self) -> dict[str, Any]:
        return {
            "announcer": self.announcer.name,
            "vips": {str(vip): {"announced": state.announced, "reason": state.reason,
                                "since": round(state.since, 1)} for vip, state in self._vips.items()},
            "speaker": self.announcer.status(),
            **self.counters,
        }
