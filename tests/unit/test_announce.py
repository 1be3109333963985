"""The announcement gate: which VIPs a balancer announces, and when (no network, no BGP)."""

from __future__ import annotations

import ipaddress
from typing import Any

import trio
import trio.testing

from caplance.config import PluginConfig
from caplance.control.announce import AnnouncementGate
from caplance.control.membership import Member, Membership, State
from caplance.packet import IPAddress

VIP: IPAddress = ipaddress.ip_address("10.99.0.1")


class Recorder:
    """An announcer that remembers what it was told."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def announce(self, vip: IPAddress) -> None:
        self.calls.append(("announce", str(vip)))

    def withdraw(self, vip: IPAddress) -> None:
        self.calls.append(("withdraw", str(vip)))

    def status(self) -> dict[str, Any]:
        return {}


def member(name: str, state: State = State.ACTIVE) -> Member:
    return Member(name=name, address=ipaddress.ip_address("10.98.0.1"), transport=PluginConfig(name="udp"),
                  vips=(VIP,), weight=1, static=True, state=state)


def gate(min_backends: int = 1, settle: float = 0.0) -> tuple[AnnouncementGate, Recorder, Membership]:
    recorder, membership = Recorder(), Membership()
    return AnnouncementGate(recorder, [VIP], membership, min_backends=min_backends, settle=settle), recorder, membership


def test_announced_only_while_forwarding_admitting_and_backed() -> None:
    announcements, recorder, membership = gate(min_backends=2)
    membership.add(member("a"), 0.0)
    announcements.forwarding = True
    announcements.update()
    assert recorder.calls == [] and "fewer than 2" in announcements.status()["vips"][str(VIP)]["reason"]
    membership.add(member("b"), 0.0)
    announcements.update()
    assert recorder.calls == [("announce", str(VIP))] and announcements.announced == [VIP]
    announcements.update()  # idempotent: nothing new said
    assert len(recorder.calls) == 1
    membership.get("b").agent_healthy = False
    announcements.update()
    assert recorder.calls[-1] == ("withdraw", str(VIP))
    membership.get("b").agent_healthy = True
    announcements.update()
    announcements.admitting = False
    announcements.update()
    assert recorder.calls[-2:] == [("announce", str(VIP)), ("withdraw", str(VIP))]
    assert announcements.status()["vips"][str(VIP)]["reason"] == "balancer stopping"
    assert announcements.counters == {"announcements": 2, "withdrawals": 2}


def test_a_paused_or_weightless_backend_does_not_count() -> None:
    announcements, recorder, membership = gate()
    membership.add(member("a", State.PAUSED), 0.0)
    weightless = member("b")
    weightless.weight = 0
    membership.add(weightless, 0.0)
    announcements.forwarding = True
    announcements.update()
    assert recorder.calls == [] and announcements.active(VIP) == 0


async def test_announced_once_no_backend_joined_for_settle_seconds(autojump_clock: trio.testing.MockClock) -> None:
    announcements, recorder, membership = gate(settle=3.0)
    membership.add(member("a"), 0.0)
    announcements.forwarding = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcements.run_settling)
        await trio.sleep(2.0)
        announcements.update()
        assert recorder.calls == []
        assert "settling" in announcements.status()["vips"][str(VIP)]["reason"]
        announcements.joined(trio.current_time())  # a second backend at 2 s: settled at 5 s
        await trio.sleep(2.5)
        assert recorder.calls == []
        await trio.sleep(1.0)
    assert recorder.calls == [("announce", str(VIP))] and announcements.settling_until is None


async def test_settling_ends_after_four_times_settle_however_often_backends_join(
        autojump_clock: trio.testing.MockClock) -> None:
    announcements, recorder, membership = gate(settle=1.0)
    membership.add(member("a"), 0.0)
    announcements.forwarding = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcements.run_settling)
        start = trio.current_time()
        while not recorder.calls:
            announcements.joined(trio.current_time())
            await trio.sleep(0.5)
    assert 4.0 <= trio.current_time() - start <= 4.5
