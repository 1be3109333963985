"""Running Caplance processes inside lab hosts: configs, start/stop, the client's fetches."""

from __future__ import annotations

import ipaddress
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tomli_w

from caplance.lab import Lab
from caplance.lab.netns import VIP4
from caplance.strategies.maglev import Maglev
from caplance.packet import Flow

CAPLANCE = [sys.executable, "-m", "caplance.cli"]
LAB = [sys.executable, "-m", "caplance.lab"]


def write_config(data: dict[str, Any]) -> str:
    handle = tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False)
    with handle:
        tomli_w.dump(data, handle)
    return handle.name


def balancer_config(lab: Lab, *, listener: str = "tun", vips: Iterable[ipaddress._BaseAddress] = (VIP4,),
                    backends: Iterable[str] = ("be1", "be2", "be3"), **extra: Any) -> dict[str, Any]:
    listener_table: dict[str, Any] = {"kind": listener}
    if listener == "packet":
        listener_table["interface"] = "eth0"
    return {
        "listener": listener_table,
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


def start(lab: Lab, role: str, argv: list[str], *, timeout: float = 20) -> subprocess.Popen[bytes]:
    """Start ``argv`` in ``role`` and wait until it prints "ready"."""
    process = lab.spawn(role, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    seen = b""
    fd = process.stdout.fileno()
    while b"ready\n" not in seen:
        readable, _, _ = select.select([fd], [], [], timeout)
        chunk = os.read(fd, 4096) if readable else b""
        if not chunk:
            process.kill()
            _, err = process.communicate()
            raise AssertionError(f"{argv} in {role} did not get ready: {err.decode()[-2000:]}")
        seen += chunk
    return process


def start_balancer(lab: Lab, config: dict[str, Any]) -> subprocess.Popen[bytes]:
    return start(lab, "lb", CAPLANCE + ["balancer", "--print-stats", "--config", write_config(config)])


def start_backend(lab: Lab, name: str, **agent: Any) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """The agent and the HTTP server that answers with the backend's name."""
    config = write_config(agent_config(lab, name, **agent))
    return (start(lab, name, CAPLANCE + ["agent", "--print-stats", "--config", config]),
            start(lab, name, LAB + ["http", "--name", name]))


def stop(process: subprocess.Popen[bytes], *, timeout: float = 20) -> dict[str, Any]:
    """SIGTERM, wait, return the JSON counters it printed (empty if none)."""
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err.decode()[-2000:]
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


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
