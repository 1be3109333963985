"""Caplance processes in lab hosts: their configs, starting them, the client's fetches."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

from caplance.lab import Lab
from caplance.lab.netns import LAB_NETWORK4, VIP4
from caplance.packet import Flow
from caplance.strategies.maglev import Maglev

CAPLANCE = [sys.executable, "-m", "caplance.cli"]
LAB = [sys.executable, "-m", "caplance.lab"]

#: which data planes the helpers below configure: "python" (the kernel's off on both sides)
#: or "kernel" (tc on the balancer, decap in the agents' kernels). Test modules that run both
#: set it from a parametrised fixture (see ``use_plane``).
PLANES = {"python": ({"mode": "off"}, {"mode": "off"}), "kernel": ({"mode": "tc"}, {"mode": "tc"})}
plane = "python"


def use_plane(name: str) -> None:
    """Configure balancers and agents from now on for data plane ``name``."""
    global plane
    plane = name


def balancer_fastpath() -> dict[str, Any]:
    return dict(PLANES[plane][0])


def agent_fastpath() -> dict[str, Any]:
    return dict(PLANES[plane][1])


def balancer_config(lab: Lab, *, listener: str = "tun", vips: Iterable[ipaddress._BaseAddress] = (VIP4,),
                    backends: Iterable[str] = ("be1", "be2", "be3"),
                    transports: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    listener_table: dict[str, Any] = {"kind": listener}
    if listener == "packet":
        listener_table["interface"] = "eth0"
    if listener == "nfqueue":
        listener_table["options"] = {"queue": 5}
    decap = "kernel" if plane == "kernel" else "agent"
    fastpath = balancer_fastpath()
    if plane == "kernel" and listener == "packet":  # tc comes after AF_PACKET's tap; XDP before it
        fastpath["mode"] = "xdp"
    return {
        "listener": listener_table,
        "control_socket": str(lab.workdir / "balancer.sock"),
        "drain_idle": 0.2,
        "fastpath": fastpath,
        "vips": [
            {"address": str(vip), "protocol": "tcp", "ports": [80],
             "backends": [{"name": name, "address": str(lab.hosts[name].ipv4), "decap": decap,
                           "transport": {"name": (transports or {}).get(name, "udp")}} for name in backends]}
            for vip in vips
        ],
        **extra,
    }


def agent_config(lab: Lab, name: str, *, vips: Iterable[ipaddress._BaseAddress] = (VIP4,),
                 **extra: Any) -> dict[str, Any]:
    return {"name": name, "vips": [str(v) for v in vips],
            "balancers": [str(lab.hosts["lb"].ipv4)], "fastpath": agent_fastpath(), **extra}


def start_balancer(lab: Lab, config: dict[str, Any]) -> subprocess.Popen[bytes]:
    if config.get("fastpath", {}).get("mode") == "xdp":
        lab.xdp_peer("lb")
    return lab.start("lb", *CAPLANCE, "balancer", "--print-stats", "--config", lab.write_config("balancer", config))


def start_backend(lab: Lab, name: str, **agent: Any) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """The agent and the HTTP server that answers with the backend's name."""
    return start_backend_agent(lab, name, **agent), lab.start(name, *LAB, "http", "--name", name)


def start_backend_agent(lab: Lab, name: str, **agent: Any) -> subprocess.Popen[bytes]:
    """A backend's agent alone (no registration: the balancer lists it)."""
    config = lab.write_config(name, agent_config(lab, name, **agent))
    return lab.start(name, *CAPLANCE, "agent", "--print-stats", "--config", config)


def fetch(lab: Lab, count: int, *, host: str = str(VIP4), timeout: float = 5, body: int = 0,
          sources: Iterable[str] = ()) -> dict[str, Any]:
    done = lab.run("client", *LAB, "fetch", "--attempts", "--host", host, "--count", str(count),
                   "--timeout", str(timeout), "--body", str(body), "--sources", ",".join(sources))
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def expected_backend(lab: Lab, backends: Iterable[str], source_port: int, *, vip: Any = VIP4,
                     client: str | None = None) -> str | None:
    """Which backend Maglev picks for the client's connection from ``source_port`` (and
    ``client``, when it used another address than its own)."""
    if client is not None:
        address: Any = ipaddress.ip_address(client)
    else:
        address = lab.hosts["client"].ipv4 if vip.version == 4 else lab.hosts["client"].ipv6
    key = Flow(address, vip, 6, source_port, 80).key()
    return Maglev.build({name: 1 for name in backends}).select(key)


SECRET = "correct horse battery staple"


def control_address(lab: Lab) -> str:
    return f"{lab.hosts['lb'].ipv4}:7000"


def secret_env(secret: str = SECRET) -> dict[str, str]:
    return {**os.environ, "CAPLANCE_SECRET": secret}


def start_dynamic_balancer(lab: Lab, **extra: Any) -> subprocess.Popen[bytes]:
    """A balancer with no static backends, taking agents on its control address."""
    config = balancer_config(lab, backends=())
    config.update({"control": control_address(lab), "allowed_networks": [str(LAB_NETWORK4)],
                   "heartbeat_timeout": 2.0, "proof_timeout": 2.0})
    config.update(extra)
    path = lab.write_config("balancer", config)
    return lab.start("lb", *CAPLANCE, "balancer", "--print-stats", "--config", path, env=secret_env())


def start_agent(lab: Lab, name: str, *, secret: str = SECRET, http: bool = True, host: str | None = None,
                **extra: Any) -> subprocess.Popen[bytes]:
    """An agent that registers with the balancer (and, by default, the HTTP server), on the
    lab host ``host`` (default: the one called ``name``)."""
    host = host or name
    config = {"name": name, "vips": [str(VIP4)], "balancer": control_address(lab),
              "heartbeat_interval": 0.3, "drain_timeout": 1.0, "fastpath": agent_fastpath(), **extra}
    path = lab.write_config(f"{name}-on-{host}", config)
    if http:  # the service first: once registered, the backend gets connections
        lab.start(host, *LAB, "http", "--name", f"{name}@{host}" if host != name else name)
    return lab.start(host, *CAPLANCE, "agent", "--print-stats", "--config", path, env=secret_env(secret))


def ctl(lab: Lab, *args: str) -> Any:
    """Run ``caplance ctl --json ARGS`` on the balancer; the parsed result."""
    done = lab.run("lb", *CAPLANCE, "ctl", "--socket", str(lab.workdir / "balancer.sock"), "--json", *args)
    return json.loads(done.stdout)


def states(lab: Lab) -> dict[str, str]:
    """Backend name -> state, from ``caplance ctl status``."""
    return {row["backend"]: row["state"] for row in ctl(lab, "status")["backends"]}


def wait_for(predicate: Any, *, timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def fetch_in_background(lab: Lab, count: int, *, rate: float = 100, concurrency: int = 8,
                        timeout: float = 2) -> subprocess.Popen[bytes]:
    """Start the client's fetches, ``rate`` a second; collect with :func:`fetch_result`."""
    return lab.spawn("client", *LAB, "fetch", "--attempts", "--host", str(VIP4), "--count", str(count),
                     "--concurrency", str(concurrency), "--timeout", str(timeout), "--rate", str(rate),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def fetch_result(process: subprocess.Popen[bytes], *, timeout: float = 120) -> dict[str, Any]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err.decode()[-2000:]
    result: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    return result
