"""How fast does Caplance forward, next to the kernel routing the same load? (root, Linux)

    python bench/forward.py [--seconds 5] [--payload 18] [--listener tun] [--conntrack] [--workers 1,2]
                            [--planes python,tc,xdp] [--upload]

One lab of network namespaces, one UDP load (a C sendmmsg generator in the client namespace,
many source ports, small packets), offered twice in the same run:

* ``kernel`` -- the balancer namespace only routes: an ECMP route (L4 hash) spreads the VIP's
  packets over the three backends. This is the ceiling.
* ``caplance`` -- a Caplance balancer (listener ``--listener``, Maglev, UDP encapsulation,
  connection tracking off) forwards the same load to the same backends.
* ``conntrack`` (with ``--conntrack``) -- the same with the flow table on; the bench then
  prints its rate relative to ``caplance`` (the bound: it may cost at most 15%) and the flow
  table's memory per entry (``tracemalloc``, 200,000 flows).
* ``python``, ``tc``, ``xdp`` (with ``--planes``, default ``python,tc``) -- Caplance with the
  kernel data plane off, on tc, or on XDP (the ``packet`` listener behind it, and a
  pass-everything XDP program on the switch's end of the balancer's veth, which native XDP on a
  veth needs to send). The backends are listed with ``decap = "kernel"`` (they only count, so
  nothing is unwrapped). The client sends complete checksums (``tx`` offload off), as packets
  from a NIC have them.
* ``upload`` (with ``--upload``) -- one TCP stream (iperf3, 4 s) from the client to the VIP,
  served by iperf3 on one backend (one: iperf3's control and data connections must reach the
  same server; the VIP on its ``lo``, agents unwrapping in the kernel
  for the ``tc`` row, in user space for ``python``), against the kernel routing the VIP to the
  backends; with the client's offloads on (TSO, GSO), as a local sender has them.
* ``workers=N`` (with ``--workers 1,2,...``) -- the same with ``workers = N`` data-plane
  processes (in place of the ``caplance`` row); CPU per packet counts the balancer and all its
  worker processes. The bench prints each count's rate relative to ``workers=1``.

Printed per row: packets offered per second (what the generator got out), packets per second
delivered to the backends (their eth0 receive counters), and for Caplance its CPU time per
packet -- for ``python``, the balancer process's user + system time per forwarded packet; for
``tc`` and ``xdp``, the kernel's time in the program per run (``kernel.bpf_stats_enabled``,
read with ``bpftool``, in an extra one-second run: timing every run slows it) -- and the ratio
of each row to kernel routing.
Absolute numbers mean little on a shared 2-core machine; the ratio is measured in one run.

With ``--record FILE`` (``docs/figures.toml``) it writes what the docs quote from it: per row
its ratio to kernel routing and CPU per packet (median and the rounds' range), the upload
ratios, the workers' ratios -- and with ``--conntrack`` only the flow table's own figures.

Set-up follows what it takes for the kernel row not to be limited by the generator here:
TSO off and GRO on on the veths, threaded NAPI, and a C generator rather than Python.
"""

from __future__ import annotations

import sys

# bench/selectors.py (a name the issue tracker fixed) would shadow the standard library's
# selectors module, which subprocess imports: take this folder off the import path first.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from caplance.lab import Lab
from caplance.lab.netns import VIP4

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # last: the standard library's selectors wins
from record import record  # bench/record.py

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
    """User + system time of ``pid`` and every living descendant (worker processes)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo += children.get(current, [])
    return total


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


def caplance_row(lab: Lab, generator: Path, args: argparse.Namespace, *,
                 conntrack: bool, workers: int = 1, plane: str = "python") -> tuple[float, float, float, dict]:
    kind = "packet" if plane == "xdp" else args.listener
    listener = {"kind": kind}
    if kind == "packet":
        listener["interface"] = "eth0"
    config: dict = {
        "listener": listener,
        "drain_idle": 0.2,
        "control_socket": str(lab.workdir / "balancer.sock"),
        "fastpath": {"mode": "off" if plane == "python" else plane},
        "vips": [{"address": str(VIP4), "protocol": "udp", "backends": [
            {"name": host.role, "address": str(host.ipv4), "decap": "kernel"} for host in lab.backends]}],
    }
    config["conntrack"] = {"enabled": conntrack}
    config["workers"] = workers
    path = lab.write_config("bench-balancer", config)
    balancer = lab.start("lb", sys.executable, "-m", "caplance.cli", "--log-level", "warning",
                         "balancer", "--print-stats", "--config", path)
    time.sleep(0.5)  # worker processes settle
    cpu_before = cpu_seconds(balancer.pid)
    offered, delivered = offer(lab, generator, args.seconds, args.payload, args.ports)
    cpu = cpu_seconds(balancer.pid) - cpu_before
    if plane != "python":  # the kernel's time in the program per run, in a second run of its own
        timing = Path("/proc/sys/kernel/bpf_stats_enabled")
        were = timing.read_text().strip()
        timing.write_text("1")  # (timing every run costs: not during the throughput run)
        try:
            program = program_time(f"caplance_{plane}")
            offer(lab, generator, 1.0, args.payload, args.ports)
            spent, runs = (now - then for now, then in zip(program_time(f"caplance_{plane}"), program))
        finally:
            timing.write_text(were)
        stats_cpu = spent / 1e9 / runs if runs else float("nan")
    stats = lab.stop(balancer)
    forwarded = sum(stats.get("forwarded", {}).values())
    if plane != "python":
        return offered, delivered, stats_cpu, stats
    return offered, delivered, cpu / forwarded if forwarded else float("nan"), stats


def program_time(name: str) -> tuple[int, int]:
    """(ns spent, runs) of the loaded BPF program ``name`` (kernel.bpf_stats_enabled on)."""
    import json as json_module

    done = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, check=False)
    for prog in json_module.loads(done.stdout or "[]"):
        if prog.get("name") == name[:15]:
            return int(prog.get("run_time_ns", 0)), int(prog.get("run_cnt", 0))
    return 0, 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--payload", type=int, default=18, help="UDP payload bytes")
    parser.add_argument("--ports", type=int, default=4096, help="distinct source ports (flows)")
    parser.add_argument("--listener", default="tun", choices=["tun", "raw", "packet"])
    parser.add_argument("--conntrack", action="store_true", help="also measure with connection tracking on")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are printed)")
    parser.add_argument("--workers", default="", help="comma-separated worker counts to measure (say 1,2)")
    parser.add_argument("--planes", default="python,tc", help="data planes to measure: python, tc, xdp")
    parser.add_argument("--upload", action="store_true", help="also one TCP upload through the VIP (iperf3)")
    parser.add_argument("--record", metavar="FILE", help="write the figures into FILE (docs/figures.toml)")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",") if n]
    planes = [plane for plane in args.planes.split(",") if plane]
    if os.geteuid() != 0 or not shutil.which("gcc"):
        print("bench/forward.py needs root and gcc", file=sys.stderr)
        return 2
    if not counts and {"tc", "xdp"} & set(planes) and not shutil.which("bpftool"):
        print("bench/forward.py: the tc and xdp rows read the programs' run time with bpftool "
              "(apt-get install bpftool)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, Lab(backends=3) as lab:
        generator = build_generator(Path(tmp))
        tune(lab)
        lab.run("client", "ethtool", "-K", "eth0", "tx", "off", check=False)  # complete checksums, as from a NIC
        if "xdp" in planes:
            lab.xdp_peer("lb")
        for host in lab.backends:  # the backends drop what they get: we count, not serve
            lab.run(host.role, "nft", "-f", "-", input=(
                "table inet sink {\n chain in {\n type filter hook input priority 0;\n udp dport 7001 drop\n }\n}\n"))
        rounds: list[dict[str, tuple[float, float, float, dict[str, Any]]]] = []
        for _ in range(args.rounds):  # interleaved, so drift on a noisy machine hits every row
            offered, delivered = kernel_row(lab, generator, args)
            row = {"kernel": (offered, delivered, float("nan"), {})}
            if counts:
                for count in counts:
                    row[f"workers={count}"] = caplance_row(lab, generator, args, conntrack=False, workers=count)
            else:
                for plane in planes:
                    row[plane] = caplance_row(lab, generator, args, conntrack=False, plane=plane)
            if args.conntrack:
                row["conntrack"] = caplance_row(lab, generator, args, conntrack=True)
            rounds.append(row)
    names = list(rounds[0])
    median = {name: tuple(statistics.median(r[name][i] for r in rounds) for i in range(3)) for name in names}
    print(f"{args.rounds} rounds, median of each; per round delivered pps: "
          + "; ".join(" ".join(f"{n}={r[n][1]:.0f}" for n in names) for r in rounds))
    print(f"{'row':10} {'offered pps':>12} {'delivered pps':>14} {'CPU us/pkt':>11}")
    for name in names:
        offered, delivered, cpu = median[name]
        print(f"{name:10} {offered:12.0f} {delivered:14.0f} {cpu * 1e6 if cpu == cpu else 0:11.2f}")
    if args.conntrack and "caplance" not in median:
        median["caplance"] = median[f"workers={counts[0]}" if counts else planes[0]]
    figures: dict[str, float] = {}
    for name in names[1:]:
        print(f"ratio {name}/kernel (delivered): {median[name][1] / median['kernel'][1]:.3f}")
        key = name.replace("=", "_")
        figures[f"{key}_delivered"] = median[name][1] / median["kernel"][1]
        figures[f"{key}_cpu_us"] = median[name][2] * 1e6
        cpus = [r[name][2] * 1e6 for r in rounds]
        figures[f"{key}_cpu_us_min"], figures[f"{key}_cpu_us_max"] = min(cpus), max(cpus)
        figures[f"{key}_per_core_kpps"] = 1e-3 / median[name][2]  # thousands one core could do, at most
        last = rounds[-1][name][3]
        print(f"{name} drops (last round): {last.get('dropped', {})}; passed up: "
              f"{(last.get('fastpath') or {}).get('passed_up', {})}")
    if args.upload:
        figures.update(upload(args))
    if len(counts) > 1:
        first = f"workers={counts[0]}"
        for count in counts[1:]:
            ratio = median[f"workers={count}"][1] / median[first][1]
            print(f"ratio workers={count}/{first} (delivered): {ratio:.3f}")
            figures[f"workers_{count}_over_{counts[0]}"] = ratio
    if args.conntrack:
        ratio = median["conntrack"][1] / median["caplance"][1]
        cpu_ratio = median["conntrack"][2] / median["caplance"][2]
        print(f"ratio conntrack/off (delivered pps):  {ratio:.3f}   bound >= 0.85   "
              f"{'PASS' if ratio >= 0.85 else 'FAIL'}")
        print(f"ratio conntrack/off (CPU per packet): {cpu_ratio:.3f}   bound <= 1/0.85 = 1.176   "
              f"{'PASS' if cpu_ratio <= 1 / 0.85 else 'FAIL'}")
        print(f"flow table (last round): {rounds[-1]['conntrack'][3].get('conntrack')}")
        per_flow = flow_table_bytes_per_entry()
        print(f"flow table memory: {per_flow:.0f} bytes per flow")
        # the rows of this run are the flow table's reference: only its own figures are recorded,
        # so the planes' figures stay those of one run without the table
        figures = {"conntrack_over_off": ratio, "conntrack_cpu_over_off": cpu_ratio, "flow_bytes": per_flow}
    if args.record:
        record(args.record, "forward", figures)
    return 0


def iperf(lab: Lab, seconds: float) -> float:
    """One TCP stream from the client to the VIP; Gbit/s received."""
    import json as json_module

    done = lab.run("client", "iperf3", "-c", str(VIP4), "-t", str(seconds), "-J", check=False)
    try:
        return float(json_module.loads(done.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError):
        return float("nan")


def upload(args: argparse.Namespace) -> dict[str, float]:
    """Upload rows: kernel routing, then Caplance per plane, one TCP stream each, in one lab
    with the client's offloads on. The figures: Gbit/s of kernel routing, ratios of the planes."""
    if not shutil.which("iperf3"):
        print("upload: needs iperf3 (apt-get install iperf3)", file=sys.stderr)
        return {}
    results: dict[str, list[float]] = {}
    with Lab(backends=1) as lab:  # one backend: iperf3's control and data connections must meet
        servers = []
        for host in lab.backends:
            lab.run(host.role, "ip", "addr", "add", f"{VIP4}/32", "dev", "lo")
            lab.sysctl(host.role, "net.ipv4.conf.all.arp_ignore", "1")
            lab.sysctl(host.role, "net.ipv4.conf.all.arp_announce", "2")
            servers.append(lab.spawn(host.role, "iperf3", "-s", "-B", str(VIP4), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        for _ in range(args.rounds):
            lab.sysctl("lb", "net.ipv4.ip_forward", "1")
            hops = [part for host in lab.backends for part in ("nexthop", "via", str(host.ipv4))]
            lab.run("lb", "ip", "route", "add", f"{VIP4}/32", *hops)
            results.setdefault("kernel", []).append(iperf(lab, 4))
            lab.run("lb", "ip", "route", "del", f"{VIP4}/32")
            lab.sysctl("lb", "net.ipv4.ip_forward", "0")
            for plane in [p for p in args.planes.split(",") if p in ("python", "tc")]:
                results.setdefault(plane, []).append(upload_through(lab, plane))
    print("upload, one TCP stream (Gbit/s, median):")
    kernel = statistics.median(results["kernel"])
    figures = {"kernel_upload_gbits": kernel}
    for name, values in results.items():
        value = statistics.median(values)
        print(f"  {name:8} {value:8.2f}" + ("" if name == "kernel" else f"   ratio {name}/kernel (upload): "
                                                                     f"{value / kernel:.3f}"))
        if name != "kernel":
            figures[f"{name}_upload"] = value / kernel
    return figures


def upload_through(lab: Lab, plane: str) -> float:
    agents = []
    for host in lab.backends:
        config = {"name": host.role, "vips": [str(VIP4)], "balancers": [str(lab.hosts["lb"].ipv4)],
                  "fastpath": {"mode": "tc" if plane == "tc" else "off"}}
        agents.append(lab.start(host.role, sys.executable, "-m", "caplance.cli", "--log-level", "warning", "agent",
                                "--config", lab.write_config(f"upload-{host.role}", config)))
    config: dict = {
        "listener": {"kind": "tun"}, "drain_idle": 0.2, "control_socket": str(lab.workdir / "upload.sock"),
        "fastpath": {"mode": "off" if plane == "python" else plane},
        "vips": [{"address": str(VIP4), "protocol": "tcp", "backends": [
            {"name": host.role, "address": str(host.ipv4), "decap": "kernel" if plane == "tc" else "agent"}
            for host in lab.backends]}],
    }
    balancer = lab.start("lb", sys.executable, "-m", "caplance.cli", "--log-level", "warning", "balancer",
                         "--config", lab.write_config("upload-balancer", config))
    try:
        return iperf(lab, 4)
    finally:
        for process in (balancer, *agents):
            lab.stop(process)


def flow_table_bytes_per_entry(flows: int = 200_000) -> float:
    """Memory the flow table takes per established flow, from tracemalloc."""
    import random
    import tracemalloc

    from caplance.conntrack import FlowTable

    rng = random.Random(1)
    keys = [rng.randbytes(13) for _ in range(flows)]
    names = [f"be{n}" for n in range(3)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table = FlowTable(max_flows=flows * 2, tcp_timeout=900, closing_timeout=10, other_timeout=30)
    for index, key in enumerate(keys):
        table.insert(key, names[index % 3], 0.0)
        table.lookup(key, 0x10, 0.0)  # promote to the established segment
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(table) == flows
    return used / flows


if __name__ == "__main__":
    sys.exit(main())
