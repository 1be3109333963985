"""How fast does Caplance forward, next to the kernel routing the same load? (root, Linux)

    python bench/forward.py [--seconds 5] [--payload 18] [--listener tun] [--conntrack]

One lab of network namespaces, one UDP load (a C sendmmsg generator in the client namespace,
many source ports, small packets), offered twice in the same run:

* ``kernel`` -- the balancer namespace only routes: an ECMP route (L4 hash) spreads the VIP's
  packets over the three backends. This is the ceiling.
* ``caplance`` -- a Caplance balancer (listener ``--listener``, Maglev, UDP encapsulation)
  forwards the same load to the same backends.

Printed per row: packets offered per second (what the generator got out), packets per second
delivered to the backends (their eth0 receive counters), and for Caplance its CPU time per
forwarded packet (the balancer process's user + system time) and the ratio Caplance/kernel.
Absolute numbers mean little on a shared 2-core machine; the ratio is measured in one run.

Set-up follows what it takes for the kernel row not to be limited by the generator here:
TSO off and GRO on on the veths, threaded NAPI, and a C generator rather than Python.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from caplance.lab import Lab
from caplance.lab.netns import VIP4

HERE = Path(__file__).resolve().parent
PORT = 9000


def build_generator(workdir: Path) -> Path:
    binary = workdir / "udpgen"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "udpgen.c")], check=True)
    return binary


def tune(lab: Lab) -> None:
    """TSO off, GRO on, threaded NAPI on every veth (both ends), as the kernel row needs."""
    for role in lab.hosts:
        lab.run(role, "ethtool", "-K", "eth0", "tso", "off", "gro", "on", check=False)
        lab.run(role, "sh", "-c", "echo 1 > /sys/class/net/eth0/threaded", check=False)
    for role in lab.hosts:
        lab.run_switch("ethtool", "-K", role, "tso", "off", "gro", "on", check=False)
        lab.run_switch("sh", "-c", f"echo 1 > /sys/class/net/{role}/threaded", check=False)


def rx_packets(lab: Lab) -> int:
    total = 0
    for host in lab.backends:
        total += int(lab.run(host.role, "cat", "/sys/class/net/eth0/statistics/rx_packets").stdout)
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def offer(lab: Lab, generator: Path, seconds: float, payload: int, ports: int) -> tuple[float, float]:
    """Run the generator; return (offered pps, delivered pps)."""
    client = lab.hosts["client"]
    before = rx_packets(lab)
    done = lab.run("client", str(generator), str(client.ipv4), str(VIP4), str(PORT), str(seconds),
                   str(payload), str(ports))
    time.sleep(0.3)  # let queues empty
    delivered = rx_packets(lab) - before
    return int(done.stdout) / seconds, delivered / seconds


def kernel_row(lab: Lab, generator: Path, args: argparse.Namespace) -> tuple[float, float]:
    lab.sysctl("lb", "net.ipv4.ip_forward", "1")
    lab.sysctl("lb", "net.ipv4.fib_multipath_hash_policy", "1")
    hops = []
    for host in lab.backends:
        hops += ["nexthop", "via", str(host.ipv4)]
    lab.run("lb", "ip", "route", "add", f"{VIP4}/32", *hops)
    try:
        return offer(lab, generator, args.seconds, args.payload, args.ports)
    finally:
        lab.run("lb", "ip", "route", "del", f"{VIP4}/32")
        lab.sysctl("lb", "net.ipv4.ip_forward", "0")


def caplance_row(lab: Lab, generator: Path, args: argparse.Namespace) -> tuple[float, float, float, dict]:
    listener = {"kind": args.listener}
    if args.listener == "packet":
        listener["interface"] = "eth0"
    config: dict = {
        "listener": listener,
        "drain_idle": 0.2,
        "control_socket": str(lab.workdir / "balancer.sock"),
        "vips": [{"address": str(VIP4), "protocol": "udp", "backends": [
            {"name": host.role, "address": str(host.ipv4)} for host in lab.backends]}],
    }
    if args.conntrack:
        config["conntrack"] = {"enabled": True}
    path = lab.write_config("bench-balancer", config)
    balancer = lab.start("lb", sys.executable, "-m", "caplance.cli", "--log-level", "warning",
                         "balancer", "--print-stats", "--config", path)
    cpu_before = cpu_seconds(balancer.pid)
    offered, delivered = offer(lab, generator, args.seconds, args.payload, args.ports)
    cpu = cpu_seconds(balancer.pid) - cpu_before
    stats = lab.stop(balancer)
    forwarded = sum(stats.get("forwarded", {}).values())
    return offered, delivered, cpu / forwarded if forwarded else float("nan"), stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--payload", type=int, default=18, help="UDP payload bytes")
    parser.add_argument("--ports", type=int, default=4096, help="distinct source ports (flows)")
    parser.add_argument("--listener", default="tun", choices=["tun", "raw", "packet"])
    parser.add_argument("--conntrack", action="store_true", help="also measure with connection tracking on")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("gcc"):
        print("bench/forward.py needs root and gcc", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, Lab(backends=3) as lab:
        generator = build_generator(Path(tmp))
        tune(lab)
        for host in lab.backends:  # the backends drop what they get: we count, not serve
            lab.run(host.role, "nft", "-f", "-", input=(
                "table inet sink {\n chain in {\n type filter hook input priority 0;\n udp dport 7001 drop\n }\n}\n"))
        k_offered, k_delivered = kernel_row(lab, generator, args)
        c_offered, c_delivered, c_cpu, stats = caplance_row(lab, generator, args)
    print(f"{'row':10} {'offered pps':>12} {'delivered pps':>14} {'CPU us/pkt':>11}")
    print(f"{'kernel':10} {k_offered:12.0f} {k_delivered:14.0f} {'':>11}")
    print(f"{'caplance':10} {c_offered:12.0f} {c_delivered:14.0f} {c_cpu * 1e6:11.2f}")
    print(f"ratio caplance/kernel (delivered): {c_delivered / k_delivered:.3f}")
    print(f"caplance drops: {stats.get('dropped', {})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
