"""Scale-out in one file: a VIP announced by BGP from two balancers, spread by a router's ECMP.

    sudo .venv/bin/python examples/ecmp.py [--announcer exabgp|bird] [--streams 40]

It builds a routed lab of network namespaces -- a client behind a BIRD router, two balancers,
three backends -- and starts one process per host: the router's BIRD, a Caplance balancer on
each balancer host (announcing the VIP through ExaBGP, or through a BIRD of its own), an agent
and the echo and HTTP services on each backend, the agents registered with both balancers.

Then, with long-lived connections open and short requests going: it stops balancer ``lb``
gracefully (``caplance ctl drain-balancer``: the VIP is withdrawn first, the router moves its
flows to ``lb2``, which picks the same backends), starts it again, and then kills ``lb2``'s BGP
speaker outright (the route goes at once: the session closes, or BFD sees it). It ends with one
line: how many packets each balancer forwarded, and how many long-lived connections broke::

    ecmp: lb1=N lb2=N broken=B

Everything is removed on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from caplance.lab import Lab, routing
from caplance.lab.netns import LAB_NETWORK4, VIP4

CAPLANCE = [sys.executable, "-m", "caplance.cli", "--log-level", "warning"]
LAB = [sys.executable, "-m", "caplance.lab"]
SECRET = {"CAPLANCE_SECRET": "ecmp demo secret, long enough"}
BACKENDS = ("be1", "be2", "be3")


def ctl(lab: Lab, role: str, *args: str) -> Any:
    done = lab.run(role, *CAPLANCE, "ctl", "--socket", str(lab.workdir / f"{role}.sock"), "--json", *args)
    return json.loads(done.stdout)


def wait(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"ecmp: timed out waiting for {what}")
        time.sleep(0.1)


def start_balancer(lab: Lab, role: str, announcer: str, speakers: dict[str, str]) -> subprocess.Popen[bytes]:
    host = lab.hosts[role]
    config = {
        "control": f"{host.ipv4}:7000", "control_socket": str(lab.workdir / f"{role}.sock"),
        "allowed_networks": [str(LAB_NETWORK4)],
        "drain_idle": 0.5, "drain_timeout": 5.0, "heartbeat_timeout": 2.0,
        "vips": [{"address": str(VIP4), "protocol": "tcp", "ports": [80, 8080]}],
        "announce": routing.announce_options(lab, role, announcer, socket=speakers.get(role)),
    }
    return lab.start(role, *CAPLANCE, "balancer", "--print-stats", "--config", lab.write_config(role, config),
                     env={**os.environ, **SECRET})


def speaker_pid(lab: Lab, role: str, announcer: str) -> int:
    wanted = "exabgp" if announcer == "exabgp" else "bird"
    for pid in lab.run(role, "ip", "netns", "pids", lab.hosts[role].netns).stdout.split():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(os.path.basename(part.decode()) == wanted for part in command[:2]):
            return int(pid)
    raise SystemExit(f"ecmp: no {wanted} running in {role}")


def demo(lab: Lab, announcer: str, streams: int) -> str:
    routing.start_router(lab, bfd=announcer == "bird")
    speakers = {host.role: routing.start_balancer_bird(lab, host.role) for host in lab.balancers} \
        if announcer == "bird" else {}
    balancers = {host.role: start_balancer(lab, host.role, announcer, speakers) for host in lab.balancers}
    for name in BACKENDS:
        lab.start(name, *LAB, "echo", "--name", name)
        lab.start(name, *LAB, "http", "--name", name)
        agent = {"name": name, "vips": [str(VIP4)], "balancer": f"{lab.hosts['lb'].ipv4}:7000",
                 "register_with": [f"{lab.hosts['lb2'].ipv4}:7000"], "heartbeat_interval": 0.3}
        lab.start(name, *CAPLANCE, "agent", "--config", lab.write_config(name, agent), env={**os.environ, **SECRET})

    def active(role: str) -> set[str]:
        return {row["backend"] for row in ctl(lab, role, "status")["backends"] if row["state"] == "active"}

    wait(lambda: all(active(role) == set(BACKENDS) for role in balancers), "the backends on both balancers")
    wait(lambda: len(routing.router_nexthops(lab)) == 2, "both balancers announcing")
    print(f"router: the VIP via {sorted(routing.router_nexthops(lab))} (ECMP)", flush=True)
    forwarded = {"lb": 0, "lb2": 0}
    long_lived = lab.spawn("client", *LAB, "streams", "--host", str(VIP4), "--count", str(streams),
                           "--seconds", "16", "--interval", "0.1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    short = lab.spawn("client", *LAB, "fetch", "--host", str(VIP4), "--count", "600", "--rate", "40",
                      "--timeout", "3", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(3)
    print("lb: stopping gracefully (withdraw, grace, drain)", flush=True)
    ctl(lab, "lb", "drain-balancer")
    wait(lambda: routing.router_nexthops(lab) == {str(lab.hosts["lb2"].ipv4)}, "lb withdrawn", 10)
    forwarded["lb"] += sum(lab.stop(balancers["lb"], timeout=30).get("forwarded", {}).values())
    print("lb: stopped; starting it again", flush=True)
    balancers["lb"] = start_balancer(lab, "lb", announcer, speakers)
    wait(lambda: active("lb") == set(BACKENDS), "the backends back on lb")
    wait(lambda: len(routing.router_nexthops(lab)) == 2, "lb announcing again")
    time.sleep(2)
    print(f"lb2: killing its BGP speaker ({'ExaBGP' if announcer == 'exabgp' else 'BIRD'})", flush=True)
    os.kill(speaker_pid(lab, "lb2", announcer), signal.SIGKILL)
    killed = time.monotonic()
    wait(lambda: str(lab.hosts["lb2"].ipv4) not in routing.router_nexthops(lab), "lb2's route gone", 10)
    print(f"router: lb2's route gone after {time.monotonic() - killed:.2f} s", flush=True)
    out, _ = long_lived.communicate(timeout=60)
    results = json.loads(out.decode().splitlines()[-1])
    short_out, _ = short.communicate(timeout=60)
    failed = json.loads(short_out.decode().splitlines()[-1])["failed"]
    broken = sum(1 for stream in results if stream["error"] is not None)
    for role in ("lb", "lb2"):
        forwarded[role] += sum(lab.stop(balancers[role], timeout=30).get("forwarded", {}).values())
    print(f"long-lived connections: {len(results)}, broken {broken}; short requests failed: {failed} of 600")
    return f"ecmp: lb1={forwarded['lb']} lb2={forwarded['lb2']} broken={broken}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--announcer", choices=["exabgp", "bird"], default="exabgp")
    parser.add_argument("--streams", type=int, default=40, help="long-lived connections (40)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("ecmp: run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    try:  # the lab turns SIGTERM into Ctrl-C: its exit removes everything either way
        with Lab(backends=3, balancers=2, router=True) as lab:
            print(demo(lab, args.announcer, args.streams))
    except KeyboardInterrupt:
        print("ecmp: interrupted; the lab is removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
