"""Who the backends are and what state each is in. Pure: time is passed in, no trio.

States::

    registering -> active <-> paused -> draining -> gone
                      \\________\\___________\\_____^   (deregister, heartbeat lost, refused)

* ``active``: in the selector with its weight (when healthy).
* ``paused``: weight 0 -- no new flows; its established flows keep going where connection
  tracking allows.
* ``draining``: paused, and ``gone`` at its deadline.
* ``gone``: out of the selector and the flow table; its flows re-hash.

Health is orthogonal: a backend that fails its health checks (the balancer's active checks or
its agent's own report) leaves the selector like a gone one, and comes back when healthy.

**Events.** Every change is a :class:`Transition`, published to each subscriber
(:meth:`Membership.subscribe`) in order, synchronously: the control plane's rebuilder, the
agent-session notifier, the log and the announcers each subscribe. A subscriber must not
raise and must not change the membership from inside its callback.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

import attrs

from caplance.config import PluginConfig
from caplance.packet import IPAddress

__all__ = ["State", "Member", "Transition", "Membership", "MembershipError"]


class State(enum.Enum):
    REGISTERING = "registering"
    ACTIVE = "active"
    PAUSED = "paused"
    DRAINING = "draining"
    GONE = "gone"


_ALLOWED: dict[State, frozenset[State]] = {
    State.REGISTERING: frozenset({State.ACTIVE, State.GONE}),
    State.ACTIVE: frozenset({State.PAUSED, State.DRAINING, State.GONE}),
    State.PAUSED: frozenset({State.ACTIVE, State.DRAINING, State.GONE}),
    State.DRAINING: frozenset({State.ACTIVE, State.GONE}),
    State.GONE: frozenset(),
}


class MembershipError(ValueError):
    """An unknown backend or a transition the state machine does not allow."""


@attrs.define
class Member:
    """One backend. ``static`` ones come from the config and send no heartbeats."""

    name: str
    address: IPAddress
    transport: PluginConfig
    vips: tuple[IPAddress, ...]
    weight: int
    static: bool
    state: State = State.REGISTERING
    since: float = 0.0
    last_heartbeat: float | None = None
    agent_healthy: bool = True
    check_healthy: bool = True
    drain_deadline: float | None = None
    #: an operator asked it to leave (drain or deregister): once gone, it stays gone
    leaving: bool = False
    #: it unwraps encapsulated packets in its kernel, not in its agent
    kernel_decap: bool = False

    @property
    def healthy(self) -> bool:
        return self.agent_healthy and self.check_healthy

    @property
    def in_selector(self) -> bool:
        """Has a place in its VIPs' selectors (with weight 0 unless active)."""
        return self.healthy and self.state in (State.ACTIVE, State.PAUSED, State.DRAINING)

    @property
    def effective_weight(self) -> int:
        return self.weight if self.state is State.ACTIVE and self.healthy else 0


@attrs.frozen
class Transition:
    """A change of one backend. ``old is new`` for a change of health, and for
    ``reason == FORGOTTEN`` (a gone backend is no longer listed)."""

    name: str
    old: State
    new: State
    reason: str
    #: the VIPs the change concerns
    vips: tuple[IPAddress, ...] = ()


#: the reason of the event that removes a long-gone backend from the listing
FORGOTTEN = "forgotten"
#: the reason of the event that adds a backend
REGISTERED = "registered"


class Membership:
    """All backends by name, with the transitions allowed between their states."""

    def __init__(self) -> None:
        self._members: dict[str, Member] = {}
        self._subscribers: list[Callable[[Transition], None]] = []

    def subscribe(self, subscriber: Callable[[Transition], None]) -> None:
        """Call ``subscriber`` with every :class:`Transition` from now on, in order."""
        self._subscribers.append(subscriber)

    def _publish(self, change: Transition | None) -> Transition | None:
        if change is not None:
            for subscriber in self._subscribers:
                subscriber(change)
        return change

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def get(self, name: str) -> Member:
        try:
            return self._members[name]
        except KeyError:
            raise MembershipError(f"no backend named {name!r}") from None

    def members(self) -> list[Member]:
        return sorted(self._members.values(), key=lambda m: m.name)

    def add(self, member: Member, now: float) -> list[Transition]:
        """Add (or replace, for a re-registration) a member. A replaced one goes first."""
        changes = []
        old = self._members.get(member.name)
        if old is not None and old.state is not State.GONE:
            changes.append(Transition(old.name, old.state, State.GONE, "replaced by a new registration",
                                      old.vips))
            old.state = State.GONE
        member.since = now
        member.last_heartbeat = now
        self._members[member.name] = member
        changes.append(Transition(member.name, State.GONE, member.state, REGISTERED, member.vips))
        for change in changes:
            self._publish(change)
        return changes

    def forget_gone(self, now: float, after: float) -> list[str]:
        """Forget members gone for longer than ``after`` seconds; their names."""
        old = [m for m in self._members.values() if m.state is State.GONE and now - m.since > after]
        for member in old:
            del self._members[member.name]
            self._publish(Transition(member.name, State.GONE, State.GONE, FORGOTTEN, member.vips))
        return [member.name for member in old]

    def transition(self, name: str, new: State, now: float, reason: str, *,
                   drain_deadline: float | None = None) -> Transition | None:
        """Move ``name`` to ``new``. Returns the transition, None if already there.

        Raises :class:`MembershipError` for an unknown name or a disallowed move.
        """
        member = self.get(name)
        if member.state is new:
            return None
        if new not in _ALLOWED[member.state]:
            raise MembershipError(f"{name} is {member.state.value}; cannot become {new.value}")
        change = Transition(name, member.state, new, reason, member.vips)
        member.state = new
        member.since = now
        member.drain_deadline = drain_deadline if new is State.DRAINING else None
        return self._publish(change)

    def heartbeat(self, name: str, now: float, healthy: bool) -> Transition | None:
        """Record a heartbeat. Returns a pseudo-transition when the agent's health flips
        (state unchanged, reason says healthy/unhealthy), else None."""
        member = self.get(name)
        member.last_heartbeat = now
        if member.agent_healthy != healthy:
            member.agent_healthy = healthy
            return self._publish(Transition(name, member.state, member.state,
                                            "agent reports healthy" if healthy else "agent reports unhealthy",
                                            member.vips))
        return None

    def set_check_health(self, name: str, healthy: bool) -> Transition | None:
        member = self.get(name)
        if member.check_healthy == healthy:
            return None
        member.check_healthy = healthy
        return self._publish(Transition(name, member.state, member.state,
                                        "health checks pass" if healthy else "health checks fail", member.vips))

    def expire(self, now: float, heartbeat_timeout: float) -> list[Transition]:
        """Members whose heartbeats stopped, or whose drain deadline passed, become gone."""
        changes = []
        for member in self._members.values():
            if member.state is State.GONE:
                continue
            if (not member.static and member.state is not State.REGISTERING
                    and member.last_heartbeat is not None
                    and now - member.last_heartbeat > heartbeat_timeout):
                change = self.transition(member.name, State.GONE, now,
                                         f"no heartbeat for {heartbeat_timeout:g} s")
            elif (member.state is State.DRAINING and member.drain_deadline is not None
                    and now >= member.drain_deadline):
                change = self.transition(member.name, State.GONE, now, "drain deadline passed")
            else:
                continue
            if change is not None:
                changes.append(change)
        return changes

    def weights(self, vip: IPAddress) -> dict[str, int]:
        """Selector input for ``vip``: name -> effective weight, for members in the selector."""
        return {m.name: m.effective_weight for m in self._members.values() if vip in m.vips and m.in_selector}

    def for_vip(self, vip: IPAddress) -> Iterable[Member]:
        return (m for m in self._members.values() if vip in m.vips)
