"""The balancer's active health checks of backends.

Active checks follow keepalived and HAProxy: every ``interval`` a TCP connect (or an HTTP
GET) to the backend's real address and service port, each bounded by ``timeout``; ``fall``
consecutive failures mark the backend unhealthy (it leaves the selector, its flows re-hash),
``rise`` consecutive passes bring it back. Backends start healthy: they just proved their
data path.
"""

from __future__ import annotations

import logging
from typing import Protocol

import attrs
import trio

from caplance.config import HealthCheckConfig
from caplance.control.membership import Member
from caplance.httpcheck import probe_service
from caplance.packet import IPAddress

__all__ = ["HealthTarget", "Tracker", "check_once", "run_health_checks"]

log = logging.getLogger(__name__)


@attrs.define
class Tracker:
    """Rise/fall hysteresis for one backend."""

    rise: int
    fall: int
    healthy: bool = True
    streak: int = 0  # consecutive results that disagree with ``healthy``

    def record(self, passed: bool) -> bool | None:
        """Record one result; returns the new health when it flips, else None."""
        if passed == self.healthy:
            self.streak = 0
            return None
        self.streak += 1
        if self.streak >= (self.rise if passed else self.fall):
            self.healthy, self.streak = passed, 0
            return passed
        return None


async def check_once(address: IPAddress, config: HealthCheckConfig) -> bool:
    """One TCP connect or HTTP GET, within ``config.timeout``. True if it passed."""
    with trio.move_on_after(config.timeout):
        return await probe_service(str(address), config.port,
                                   http_path=config.path if config.kind == "http" else None)
    return False


class HealthTarget(Protocol):
    """What the checks need of the control plane."""

    def vip_members(self, address: IPAddress) -> list[Member]:
        """The backends of VIP ``address`` that are not gone."""
        ...

    def set_check_health(self, name: str, healthy: bool) -> None: ...


async def run_health_checks(target: HealthTarget, vip: IPAddress, config: HealthCheckConfig) -> None:
    """Check every backend of ``vip`` every ``config.interval`` until cancelled."""
    trackers: dict[int, Tracker] = {}  # by member identity: a re-registration starts afresh
    while True:
        members = {id(member): member for member in target.vip_members(vip)}
        results: dict[int, bool] = {}
        async with trio.open_nursery() as nursery:
            for key, member in members.items():
                async def one(key: int = key, address: IPAddress = member.address) -> None:
                    results[key] = await check_once(address, config)
                nursery.start_soon(one)
        for key, passed in results.items():
            tracker = trackers.setdefault(key, Tracker(config.rise, config.fall))
            flipped = tracker.record(passed)
            still_there = any(m is members[key] for m in target.vip_members(vip))
            if flipped is not None and still_there:
                target.set_check_health(members[key].name, flipped)
        for key in set(trackers) - set(members):
            del trackers[key]
        await trio.sleep(config.interval)
