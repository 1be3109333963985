"""A routed lab: the client behind a router that learns the VIPs by BGP from the balancers
and spreads them over them by ECMP -- the scale-out of Maglev, Katran and GLB, in namespaces.

The router runs BIRD 2: a BGP session to every balancer (AS 65001 to 65002), BFD on them when
asked (failures seen in a few hundred milliseconds instead of the hold time), and the kernel
protocol with ``merge paths``, so equal routes from several balancers become one multipath
route; ``fib_multipath_hash_policy = 1`` hashes it on the layer-4 flow, so each connection
keeps one balancer. Balancers speak BGP through ExaBGP (the balancer starts it) or through a
BIRD of their own (:func:`start_balancer_bird`, which the ``bird`` announcer then talks to).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caplance.lab.netns import VIP4, _run

if TYPE_CHECKING:
    from caplance.lab.netns import Lab

__all__ = ["ROUTER_AS", "BALANCER_AS", "announce_options", "connect_router", "router_nexthops",
           "start_balancer_bird", "start_router", "wait_established"]

ROUTER_AS = 65001
BALANCER_AS = 65002
ROUTER_CLIENT_SIDE = "10.78.0.1"
_BFD = '''protocol bfd {
    interface "eth0" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };
}
'''


def connect_router(lab: Lab) -> None:
    """Wire the router's second leg to the client's network and route both ways through it."""
    router, client = lab.hosts["router"], lab.hosts["client"]
    sw = ["ip", "-n", lab.switch]
    _run(sw + ["link", "add", "router-c", "mtu", str(client.mtu), "type", "veth", "peer", "name", "eth1",
               "mtu", str(client.mtu), "netns", router.netns])
    _run(sw + ["link", "set", "router-c", "master", "br1", "up"])
    ns = ["ip", "-n", router.netns]
    _run(ns + ["link", "set", "eth1", "up"])
    _run(ns + ["addr", "add", f"{ROUTER_CLIENT_SIDE}/24", "dev", "eth1"])
    lab.sysctl("router", "net.ipv4.conf.eth1.accept_redirects", "0")
    for name, value in (("net.ipv4.ip_forward", "1"), ("net.ipv4.fib_multipath_hash_policy", "1")):
        lab.sysctl("router", name, value)
    _run(["ip", "-n", client.netns, "route", "add", "default", "via", ROUTER_CLIENT_SIDE])
    for host in lab.hosts.values():
        if host.role not in ("client", "router"):
            _run(["ip", "-n", host.netns, "route", "add", "10.78.0.0/24", "via", str(router.ipv4)])


def start_router(lab: Lab, *, bfd: bool = True) -> str:
    """Start the router's BIRD, peering with every balancer; its control socket's path."""
    router = lab.hosts["router"]
    peers = "".join(f"protocol bgp {host.role} from balancer {{ neighbor {host.ipv4} as {BALANCER_AS}; }}\n"
                    for host in lab.balancers)
    config = (f"router id {router.ipv4};\nlog stderr {{ warning, error, fatal }};\n"
              "protocol device { scan time 1; }\n" + (_BFD if bfd else "") +
              "protocol kernel { ipv4 { import none; export all; }; merge paths on limit 16; }\n"
              f"template bgp balancer {{\n    local {router.ipv4} as {ROUTER_AS};\n"
              "    hold time 3; connect retry time 1; error wait time 1, 4;\n"
              f"    bfd {'on' if bfd else 'off'};\n    ipv4 {{ import all; export none; }};\n}}\n" + peers)
    return _start_bird(lab, "router", config)


def start_balancer_bird(lab: Lab, role: str, *, bfd: bool = True, table: int = 97) -> str:
    """Start a BIRD on balancer ``role`` that learns kernel table ``table`` (where the ``bird``
    announcer puts the VIPs' routes) and exports it to the router; its control socket."""
    host, router = lab.hosts[role], lab.hosts["router"]
    config = (f"router id {host.ipv4};\nlog stderr {{ warning, error, fatal }};\n"
              "protocol device { scan time 1; }\n" + (_BFD if bfd else "") +
              f"protocol kernel caplance4 {{\n    kernel table {table}; learn; scan time 1;\n"
              "    ipv4 { import all; export none; };\n}\n"
              f"protocol bgp uplink {{\n    local {host.ipv4} as {BALANCER_AS};\n"
              f"    neighbor {router.ipv4} as {ROUTER_AS};\n    hold time 3; connect retry time 1; error wait time 1, 4;\n"
              f"    bfd {'on' if bfd else 'off'};\n"
              '    ipv4 { import none; export where proto = "caplance4"; next hop self; };\n}\n')
    return _start_bird(lab, role, config)


def _start_bird(lab: Lab, role: str, config: str) -> str:
    path = lab.workdir / f"{role}-bird.conf"
    path.write_text(config)
    socket = str(lab.workdir / f"{role}-bird.ctl")
    lab.spawn(role, "bird", "-f", "-c", str(path), "-s", socket, stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not Path(socket).exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"BIRD did not start in {role}")
        time.sleep(0.1)
    return socket


def announce_options(lab: Lab, role: str, kind: str, *, socket: str | None = None) -> dict[str, Any]:
    """The ``[announce]`` table for balancer ``role`` with announcer ``kind``."""
    host, router = lab.hosts[role], lab.hosts["router"]
    if kind == "exabgp":
        return {"kind": "exabgp", "withdraw_grace": 2.0, "options": {
            "local_as": BALANCER_AS, "router_id": str(host.ipv4), "local_address": str(host.ipv4),
            "peers": [{"address": str(router.ipv4), "as": ROUTER_AS}]}}
    assert socket is not None
    return {"kind": "bird", "withdraw_grace": 2.0, "options": {"socket": socket, "device": "clbgp0"}}


def router_nexthops(lab: Lab, vip: Any = VIP4) -> set[str]:
    """The next hops the router's kernel has for ``vip`` (the balancers announcing it)."""
    done = lab.run("router", "ip", "-j", "route", "show", f"{vip}/32", check=False)
    routes = json.loads(done.stdout or "[]")
    hops: set[str] = set()
    for route in routes:
        if "gateway" in route:
            hops.add(route["gateway"])
        hops.update(nexthop["gateway"] for nexthop in route.get("nexthops", []) if "gateway" in nexthop)
    return hops


def wait_established(lab: Lab, socket: str, role: str = "router", *, timeout: float = 20) -> None:
    """Wait until every BGP protocol of the BIRD on ``role`` is established."""
    deadline = time.monotonic() + timeout
    while True:
        done = lab.run(role, "birdc", "-s", socket, "show", "protocols", check=False)
        states = [line.split() for line in done.stdout.splitlines() if " BGP " in line]
        if states and all("Established" in line for line in states):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"BGP not established on {role}: {done.stdout}")
        time.sleep(0.2)
