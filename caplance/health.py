"""Health checks: the balancer's active checks of backends, and the agent's local check.

Active checks follow keepalived and HAProxy: every ``interval`` a TCP connect (or an HTTP
GET) to the backend's real address and service port, each bounded by ``timeout``; ``fall``
consecutive failures mark the backend unhealthy (it leaves the selector, its flows re-hash),
``rise`` consecutive passes bring it back. Backends start healthy: they just proved their
data path.
"""

from __future__ import annotations

import logging
import subprocess
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import attrs
import trio

from caplance.config import HealthCheckConfig, LocalCheckConfig
from caplance.packet import IPAddress

if TYPE_CHECKING:
    from caplance.agent import Agent
    from caplance.balancer import Balancer

__all__ = ["Tracker", "check_once", "run_health_checks", "run_local_check"]

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


async def probe_service(host: str, port: int, *, http_path: str | None) -> bool:
    """TCP connect to ``host:port`` (and GET ``http_path`` if given, wanting a 2xx status).
    True if it passed. No timeout of its own: callers bound it."""
    try:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            if http_path is None:
                return True
            name = f"[{host}]" if ":" in host else host
            await stream.send_all(
                f"GET {http_path} HTTP/1.0\r\nHost: {name}\r\nUser-Agent: caplance-health\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
    except (OSError, trio.BrokenResourceError):
        return False
    parts = head.split(b" ", 2)
    return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1][:1] == b"2"


async def check_once(address: IPAddress, config: HealthCheckConfig) -> bool:
    """One TCP connect or HTTP GET, within ``config.timeout``. True if it passed."""
    with trio.move_on_after(config.timeout):
        return await probe_service(str(address), config.port,
                                   http_path=config.path if config.kind == "http" else None)
    return False


async def run_health_checks(balancer: Balancer, vip: IPAddress, config: HealthCheckConfig) -> None:
    """Check every backend of ``vip`` every ``config.interval`` until cancelled."""
    trackers: dict[int, Tracker] = {}  # by member identity: a re-registration starts afresh
    while True:
        members = {id(member): member for member in balancer.vip_members(vip)}
        results: dict[int, bool] = {}
        async with trio.open_nursery() as nursery:
            for key, member in members.items():
                async def one(key: int = key, address: IPAddress = member.address) -> None:
                    results[key] = await check_once(address, config)
                nursery.start_soon(one)
        for key, passed in results.items():
            tracker = trackers.setdefault(key, Tracker(config.rise, config.fall))
            flipped = tracker.record(passed)
            still_there = any(m is members[key] for m in balancer.vip_members(vip))
            if flipped is not None and still_there:
                balancer.set_check_health(members[key].name, flipped)
        for key in set(trackers) - set(members):
            del trackers[key]
        await trio.sleep(config.interval)


async def run_local_check(agent: Agent, config: LocalCheckConfig) -> None:
    """Run the agent's own check every ``config.interval``; set ``agent.healthy``."""
    while True:
        passed = False
        with trio.move_on_after(config.timeout):
            try:
                if config.command:
                    done = await trio.run_process(list(config.command), check=False,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    passed = done.returncode == 0
                else:
                    passed = await _url_ok(config.url or "")
            except (OSError, ValueError) as exc:
                log.warning("local health check cannot run", extra={"error": str(exc)})
        if passed != agent.healthy:
            log.info("local health check changed", extra={"agent": agent.config.name, "healthy": passed})
            agent.healthy = passed
        await trio.sleep(config.interval)


async def _url_ok(url: str) -> bool:
    """GET an ``http://host[:port]/path`` URL; True on a 2xx status."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    return await probe_service(parts.hostname, parts.port or 80, http_path=parts.path or "/")
