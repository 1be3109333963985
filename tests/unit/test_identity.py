"""Who holds a backend name, and the refusals the balancer remembers (pure: no network)."""

from __future__ import annotations

import ipaddress

from caplance.config import PluginConfig
from caplance.control.identity import Holder, NameBindings, Refusals

UDP = PluginConfig(name="udp")
REAL = Holder(peer="10.77.0.2", data_address=ipaddress.ip_address("10.77.0.2"), transport=UDP)


def test_a_name_is_held_against_any_other_address_or_transport_until_released() -> None:
    names = NameBindings()
    assert names.conflict("be1", REAL) is None  # unbound: anyone may take it
    names.bind("be1", REAL)
    assert names.conflict("be1", REAL) is None  # the holder may come back
    for other in (Holder(peer="10.77.0.3", data_address=REAL.data_address, transport=UDP),
                  Holder(peer=REAL.peer, data_address=ipaddress.ip_address("10.77.0.3"), transport=UDP),
                  Holder(peer=REAL.peer, data_address=REAL.data_address, transport=PluginConfig(name="gue"))):
        assert names.conflict("be1", other) == REAL
    assert names.conflict("be2", Holder(peer="10.77.0.3", data_address=REAL.data_address, transport=UDP)) is None
    assert names.release("be1") and not names.release("be1")
    assert "be1" not in names and len(names) == 0


def test_refusals_are_counted_per_address_and_reason_and_logged_at_most_every_ten_seconds() -> None:
    refusals = Refusals()
    logged = [refusals.note("10.77.0.3", "auth", now) for now in (0.0, 1.0, 9.9, 10.0, 10.5)]
    assert logged == [True, False, False, True, False]
    assert refusals.note("10.77.0.4", "auth", 10.5)  # another address logs at once
    assert refusals.note("10.77.0.3", "name_held", 10.6)  # so does another reason
    assert refusals.count("10.77.0.3", "auth") == 5
    status = refusals.status(now=12.0)
    assert status["total"] == {"auth": 6, "name_held": 1}
    assert [(r["address"], r["reason"], r["count"], r["last_seen"]) for r in status["recent"]] == [
        ("10.77.0.3", "name_held", 1, 1.4), ("10.77.0.4", "auth", 1, 1.5), ("10.77.0.3", "auth", 5, 1.5)]


def test_the_refusals_remembered_are_bounded_and_the_least_recent_go_first() -> None:
    refusals = Refusals(keep=3)
    for number in range(10):
        refusals.note(f"10.77.1.{number}", "auth", float(number))
    refusals.note("10.77.1.7", "auth", 20.0)  # seen again: now the newest
    recent = [r["address"] for r in refusals.status(now=20.0)["recent"]]
    assert recent == ["10.77.1.7", "10.77.1.9", "10.77.1.8"]
    assert refusals.totals["auth"] == 11  # the totals keep counting everything
