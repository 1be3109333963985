"""How much does a large selector rebuild stall forwarding? (no root: in-memory listener)

    .venv/bin/python bench/rebuild_stall.py [--backends 1000] [--table-size 100003] [--rounds 3]

A balancer in this process forwards a steady stream of packets (an in-memory listener and a
recording transport: the Python data plane's own work, no sockets) while its control plane
rebuilds a Maglev table of ``--backends`` backends. Three ways of building, each measured in
the same run:

* ``thread`` -- the build in a worker thread (the old way): pure Python holding the GIL, so
  the forwarding loop runs only when the thread lets go of it;
* ``inline`` -- the build in the balancer's own thread (what a mock-clock test does);
* ``process`` -- the build in the child process the control plane keeps (the default now).

Printed per way: the longest gap between two forwarded batches while the build ran (ms), and
the forwarding rate during the build as a share of the rate just before it (the median of ten
0.1 s windows). The objects setup made are frozen (``gc.freeze``) first, so a full collection
of them -- 30 to 50 ms here, whatever builds the table -- does not land in one row by chance. Ratios are
against ``thread``, measured in the same run.
"""

from __future__ import annotations

import sys

sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import gc
import ipaddress
import os
import statistics
import struct
import tempfile
import time
from collections.abc import Mapping

import trio

from caplance.balancer import Balancer
from caplance.config import BalancerConfig, PluginConfig, VipConfig
from caplance.control.membership import Member, State
from caplance.control.rebuild import Choice, InlineBuilder, ProcessBuilder, TableBuilder, build_choice
from caplance.lab.signals import sigterm_as_interrupt
from caplance.testing import MemoryListener, RecordingTransport

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # last: the standard library's selectors wins
from record import record  # bench/record.py

VIP = ipaddress.ip_address("10.99.0.1")
BATCH = 64


class ThreadBuilder:
    """The old way: the build in a trio worker thread."""

    async def build(self, spec: PluginConfig, weights: Mapping[str, int], ids: Mapping[str, int]) -> Choice:
        return await trio.to_thread.run_sync(build_choice, spec, dict(weights), dict(ids))


def packet(sport: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 5 << 4, 0x10, 65535, 0, 0)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                         ipaddress.ip_address("192.0.2.9").packed, VIP.packed)
    return header + tcp


async def measure(builder: TableBuilder, backends: int, table_size: int) -> tuple[float, float]:
    """(longest gap in ms, forwarded during the build / forwarded at rest in as long)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = BalancerConfig(
            vips=(VipConfig(address=VIP, ports=(80,), selector=PluginConfig(
                name="maglev", options={"table_size": table_size})),),
            control_socket=f"{tmp}/ctl.sock", heartbeat_timeout=600.0)
        listener, transport = MemoryListener(), RecordingTransport()
        balancer = Balancer(config, listener=listener, transports={"udp": transport}, builder=builder)
        packets = [packet(1024 + n) for n in range(BATCH)]
        async with trio.open_nursery() as nursery:
            await nursery.start(balancer.run)
            control = balancer.control

            def join(names: list[str]) -> None:
                for number, name in enumerate(names):
                    control.add_member(Member(name=name, address=ipaddress.ip_address(f"10.1.{number // 250}.{number % 250 + 1}"),
                                              transport=PluginConfig(name="udp"), vips=(VIP,), weight=1, static=False))
                    control.set_state(name, State.ACTIVE, "bench")

            async def forward_for(seconds: float | None) -> tuple[int, float, float]:
                """Feed batches until ``seconds`` pass (None: until the rebuild is done);
                (forwarded, longest gap, elapsed)."""
                start = last = time.perf_counter()
                longest, sent = 0.0, len(transport.sent)
                while (time.perf_counter() - start < seconds) if seconds else control.rebuild_pending:
                    for one in packets:
                        listener.source.push(one)
                    await trio.sleep(0)
                    now = time.perf_counter()
                    longest, last = max(longest, now - last), now
                    if len(transport.sent) > 200_000:
                        transport.sent.clear()
                        sent = 0
                return len(transport.sent) - sent, longest, time.perf_counter() - start

            join([f"b{n:04d}" for n in range(backends - 1)])
            while control.rebuild_pending:
                await trio.sleep(0.05)
            gc.collect()
            gc.freeze()  # what setup allocated is no work for the collector: its pauses are not the build's
            await trio.sleep(0.5)
            quiet = []  # the rate with nothing else going on: the median of ten windows
            for _ in range(10):
                count, _, took = await forward_for(0.1)
                quiet.append(count / took)
            join([f"b{backends - 1:04d}"])  # one more backend: a full rebuild
            await trio.sleep(0)
            during, longest, elapsed = await forward_for(None)
            balancer.stop()
            nursery.cancel_scope.cancel()
        gc.unfreeze()
        return longest * 1e3, (during / elapsed) / statistics.median(quiet)


async def main_async(args: argparse.Namespace) -> dict[str, float]:
    ways = {"thread": ThreadBuilder, "inline": InlineBuilder, "process": ProcessBuilder}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(args.rounds):  # interleaved rounds
        for name, make in ways.items():
            results[name].append(await measure(make(), args.backends, args.table_size))
    print(f"maglev rebuild, {args.backends} backends, table {args.table_size}; medians of {args.rounds} rounds")
    print(f"{'builder':8} {'longest gap ms':>15} {'rate during/before':>20}")
    medians = {name: (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
               for name, rows in results.items()}
    for name, (gap, share) in medians.items():
        print(f"{name:8} {gap:15.1f} {share:20.3f}")
    print(f"ratio process/thread (longest gap): {medians['process'][0] / medians['thread'][0]:.3f}")
    print(f"ratio process/thread (rate during the build): {medians['process'][1] / medians['thread'][1]:.3f}")
    figures: dict[str, float] = {}
    for name, rows in results.items():
        gaps, shares = [row[0] for row in rows], [row[1] for row in rows]
        figures.update({f"{name}_gap_ms": medians[name][0], f"{name}_gap_ms_min": min(gaps),
                        f"{name}_gap_ms_max": max(gaps), f"{name}_rate": medians[name][1],
                        f"{name}_rate_min": min(shares), f"{name}_rate_max": max(shares)})
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--table-size", type=int, default=100003)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record", metavar="FILE", help="write the figures into FILE (docs/figures.toml)")
    args = parser.parse_args()
    with sigterm_as_interrupt():  # SIGTERM stops it as Ctrl-C does: temporary folders and the build process go
        figures = trio.run(main_async, args)
    if args.record:
        record(args.record, "rebuild", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
