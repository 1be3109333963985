"""Caplance processes in lab hosts: their configs, starting them, the client's fetches."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from caplance.lab import Lab
from caplance.lab.netns import VIP4
from caplance.packet import Flow
from caplance.strategies.maglev import Maglev

CAPLANCE = [sys.executable, "-m", "caplance.cli"]
LAB = [sys.executable, "-m", "caplance.lab"]


def balancer_config(lab: Lab, *, listener: str = "tun", vips: Iterable[ipaddress._BaseAddress] = (VIP4,),
                    backends: Iterable[str] = ("be1", "be2", "be3"), **extra: Any) -> dict[str, Any]:
    listener_table: dict[str, Any] = {"kind": listener}
    if listener == "packet":
        listener_table["interface"] = "eth0"
    return {
        "listener": listener_table,
        "control_socket": str(lab.workdir / "balancer.sock"),
        "drain_idle": 0.2,
        "vips": [
            {"address": str(vip), "protocol": "tcp", "ports": [80],
             "backends": [{"name": name, "address": str(lab.hosts[name].ipv4)} for name in backends]}
            for vip in vips
        ],
        **extra,
    }


def agent_config(lab: Lab, name: str, *, vips: Iterable[ipaddress._BaseAddress] = (VIP4,),
                 **extra: Any) -> dict[str, Any]:
    return {"name": name, "vips": [str(v) for v in vips],
            "balancers": [str(lab.hosts["lb"].ipv4)], **extra}


def start_balancer(lab: Lab, config: dict[str, Any]) -> subprocess.Popen[bytes]:
    return lab.start("lb", *CAPLANCE, "balancer", "--print-stats", "--config", lab.write_config("balancer", config))


def start_backend(lab: Lab, name: str, **agent: Any) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """The agent and the HTTP server that answers with the backend's name."""
    config = lab.write_config(name, agent_config(lab, name, **agent))
    return (lab.start(name, *CAPLANCE, "agent", "--print-stats", "--config", config),
            lab.start(name, *LAB, "http", "--name", name))


def fetch(lab: Lab, count: int, *, host: str = str(VIP4), timeout: float = 5) -> dict[str, Any]:
    done = lab.run("client", *LAB, "fetch", "--host", host, "--count", str(count),
                   "--timeout", str(timeout))
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def expected_backend(lab: Lab, backends: Iterable[str], source_port: int, *, vip: Any = VIP4) -> str | None:
    """Which backend Maglev picks for the client's connection from ``source_port``."""
    client = lab.hosts["client"].ipv4 if vip.version == 4 else lab.hosts["client"].ipv6
    key = Flow(client, vip, 6, source_port, 80).key()
    return Maglev.build({name: 1 for name in backends}).select(key)
