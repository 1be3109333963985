"""The backend state machine: allowed moves, expiry, and what the selector gets."""

from __future__ import annotations

import ipaddress

import pytest

from caplance.config import PluginConfig
from caplance.control.membership import FORGOTTEN, REGISTERED, Member, Membership, MembershipError, State

VIP = ipaddress.ip_address("10.99.0.1")


def member(name: str, *, static: bool = False, weight: int = 1) -> Member:
    return Member(name=name, address=ipaddress.ip_address("10.0.0.1"), transport=PluginConfig(name="udp"),
                  vips=(VIP,), weight=weight, static=static)


def test_lifecycle_and_selector_weights() -> None:
    members = Membership()
    members.add(member("a", weight=3), now=0)
    assert members.weights(VIP) == {}  # registering: nothing yet
    members.transition("a", State.ACTIVE, 1, "proven")
    assert members.weights(VIP) == {"a": 3}
    members.transition("a", State.PAUSED, 2, "op")
    assert members.weights(VIP) == {"a": 0}  # still there, no new flows
    members.transition("a", State.ACTIVE, 3, "op")
    members.transition("a", State.DRAINING, 4, "op", drain_deadline=10)
    assert members.weights(VIP) == {"a": 0}
    members.transition("a", State.GONE, 5, "op")
    assert members.weights(VIP) == {}


def test_disallowed_moves_and_unknown_names() -> None:
    members = Membership()
    members.add(member("a"), now=0)
    with pytest.raises(MembershipError):
        members.transition("a", State.PAUSED, 1, "too early")
    members.transition("a", State.GONE, 1, "refused")
    with pytest.raises(MembershipError):
        members.transition("a", State.ACTIVE, 2, "gone is final")
    with pytest.raises(MembershipError):
        members.get("nobody")
    assert members.transition("a", State.GONE, 3, "again") is None


def test_expiry_by_heartbeat_and_drain_deadline() -> None:
    members = Membership()
    for name in ("beating", "silent", "draining"):
        members.add(member(name), now=0)
        members.transition(name, State.ACTIVE, 0, "proven")
    members.add(member("static", static=True), now=0)
    members.transition("static", State.ACTIVE, 0, "config")
    members.transition("draining", State.DRAINING, 0, "op", drain_deadline=5)
    members.heartbeat("beating", 2.5, healthy=True)
    members.heartbeat("draining", 2.5, healthy=True)
    assert members.expire(2.9, heartbeat_timeout=3) == []
    gone = {t.name for t in members.expire(3.1, heartbeat_timeout=3)}
    assert gone == {"silent"}
    members.heartbeat("draining", 5.0, healthy=True)
    members.heartbeat("beating", 5.0, healthy=True)
    assert {t.name for t in members.expire(5.0, heartbeat_timeout=3)} == {"draining"}
    assert members.get("static").state is State.ACTIVE  # static backends send no heartbeats


def test_health_takes_a_member_out_and_back() -> None:
    members = Membership()
    members.add(member("a"), now=0)
    members.transition("a", State.ACTIVE, 0, "proven")
    assert members.heartbeat("a", 1, healthy=False) is not None
    assert members.weights(VIP) == {}
    assert members.heartbeat("a", 2, healthy=False) is None  # logged once
    members.heartbeat("a", 3, healthy=True)
    assert members.set_check_health("a", False) is not None
    assert members.weights(VIP) == {}
    members.set_check_health("a", True)
    assert members.weights(VIP) == {"a": 1}


def test_a_new_registration_replaces_the_old_one() -> None:
    members = Membership()
    old = member("a")
    members.add(old, now=0)
    members.transition("a", State.ACTIVE, 0, "proven")
    changes = members.add(member("a"), now=1)
    assert [(c.old, c.new, c.reason) for c in changes] == [
        (State.ACTIVE, State.GONE, "replaced by a new registration"),
        (State.GONE, State.REGISTERING, REGISTERED)]
    assert members.get("a") is not old
    assert old.state is State.GONE  # a session still holding the old one sees it is over


def test_subscribers_see_every_change_in_order() -> None:
    members = Membership()
    seen: list[tuple[str, str, str, str]] = []
    members.subscribe(lambda c: seen.append((c.name, c.old.value, c.new.value, c.reason)))
    members.add(member("a"), now=0)
    members.transition("a", State.ACTIVE, 1, "proven")
    members.heartbeat("a", 2, healthy=False)
    members.heartbeat("a", 3, healthy=False)  # no change: no event
    members.transition("a", State.GONE, 4, "left")
    assert members.forget_gone(10, after=5) == ["a"]
    assert seen == [
        ("a", "gone", "registering", REGISTERED),
        ("a", "registering", "active", "proven"),
        ("a", "active", "active", "agent reports unhealthy"),
        ("a", "active", "gone", "left"),
        ("a", "gone", "gone", FORGOTTEN),
    ]


def test_events_name_the_vips_they_concern() -> None:
    members = Membership()
    seen = []
    members.subscribe(seen.append)
    members.add(member("a"), now=0)
    assert seen[-1].vips == (VIP,)
