"""The agent's local health check: a command or an HTTP URL on its own host, every
``interval``; failing it reports the backend unhealthy in the next heartbeat."""

from __future__ import annotations

import logging
import subprocess
from typing import Protocol
from urllib.parse import urlsplit

import trio

from caplance.config import AgentConfig, LocalCheckConfig
from caplance.httpcheck import probe_service

__all__ = ["run_local_check"]

log = logging.getLogger(__name__)


class _Checked(Protocol):
    config: AgentConfig
    healthy: bool


async def run_local_check(agent: _Checked, config: LocalCheckConfig) -> None:
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
