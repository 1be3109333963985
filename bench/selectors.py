"""Selector figures: balance, disruption, weights, lookup and build speed.

    .venv/bin/python bench/selectors.py [--keys N] [--backends N]

Builds every built-in through the ``caplance.selectors`` entry points at its default options
and throws random 13-byte IPv4 flow keys (random addresses, protocol 6, random ports) at it.
Each figure is printed next to its bound with PASS or FAIL; speeds are ratios against
uhashring (the ``bench`` extra) measured in the same run, so a noisy machine shifts both
sides. Timings take the best of a few interleaved repeats. Exits 1 if any figure fails.

Figures, for ``--backends`` equal backends (default 100) and ``--keys`` keys (default
1,000,000):

* balance: the largest backend's key count / the mean count;
* moved: after removing one backend, the share of the keys that were on surviving backends
  and now sit on another surviving backend;
* weights: half the backends weigh 2, half 1: the mean key count of a weight-2 backend /
  that of a weight-1 backend, against 2;
* select: uhashring ``get_node`` time / ``select`` time over the same keys;
* build: maglev's table for 1000 backends at size 65537 (the fill itself: ``Maglev.build``
  refuses sizes below 100 x backends, so this calls the module's table function), as a
  share of the time uhashring takes to build a ring of the same 1000 nodes; and every
  selector for 1000 backends with extreme weights (one at 65535, the others 1), under a
  second each; and the maglev and rendezvous tables' own balance (rows per backend).
"""

from __future__ import annotations

import os
import sys

# This file shares its name with the standard library's ``selectors`` (which ``socket`` and
# ``subprocess`` import): take its own folder off the module path before anything imports it.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from uhashring import HashRing

from caplance import plugins
from caplance.config import MAX_WEIGHT
from caplance.interfaces import Selector
from caplance.strategies import maglev, sorted_backends
from caplance.testing import flow_keys

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # last: the standard library's selectors wins
from record import record  # bench/record.py

SELECTORS = ("maglev", "ring", "rendezvous")
BALANCE_BOUND = {"maglev": 1.05, "ring": 1.25, "rendezvous": 1.05}
MOVED_BOUND = {"maglev": 0.015, "ring": 0.0, "rendezvous": 0.0}
WEIGHT_TOLERANCE = 0.05
SELECT_SPEEDUP = 5.0
BUILD_SHARE = 0.25
SKEWED_BUILD_BOUND = 1.0
REPEATS = 3

results: list[bool] = []
#: figures by name, for --record (bench/record.py)
measured: dict[str, float] = {}


def report(figure: str, value: str, bound: str, ok: bool) -> None:
    results.append(ok)
    print(f"  {figure:<44} {value:>12}   {bound:<16} {'PASS' if ok else 'FAIL'}", flush=True)


def best_time(run: Callable[[], Any], repeats: int = REPEATS) -> float:
    """The fastest of ``repeats`` runs, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def build(name: str, backends: dict[str, int]) -> Selector:
    return plugins.build_selector(name, backends, {})


def counts(selector: Selector, keys: Sequence[bytes]) -> Counter[str | None]:
    return Counter(map(selector.select, keys))


def figures(name: str, count: int, keys: Sequence[bytes], timing_keys: Sequence[bytes],
            uhashring_select: float) -> None:
    print(f"{name}:", flush=True)
    names = [f"backend-{i:03d}" for i in range(count)]
    equal = dict.fromkeys(names, 1)

    start = time.perf_counter()
    selector = build(name, equal)
    built = time.perf_counter() - start
    per_backend = counts(selector, keys)
    balance = max(per_backend.values()) / (len(keys) / count)
    measured[f"{name}_balance"] = balance
    report(f"balance, max/mean ({count} backends)", f"{balance:.4f}",
           f"<= {BALANCE_BOUND[name]:.2f}", balance <= BALANCE_BOUND[name])

    gone = names[count // 3]
    after = build(name, {n: 1 for n in names if n != gone})
    before_choice = list(map(selector.select, keys))
    after_choice = list(map(after.select, keys))
    surviving = [(old, new) for old, new in zip(before_choice, after_choice, strict=True)
                 if old != gone]
    moved = sum(old != new for old, new in surviving) / len(surviving)
    measured[f"{name}_moved_percent"] = moved * 100
    bound = MOVED_BOUND[name]
    report(f"moved between survivors (remove {gone})", f"{moved:.4%}",
           "== 0" if bound == 0 else f"< {bound:.1%}", moved == 0 if bound == 0 else moved < bound)

    weights = {n: 2 if i % 2 == 0 else 1 for i, n in enumerate(names)}
    weighted = counts(build(name, weights), keys)
    heavy = [weighted[n] for n, w in weights.items() if w == 2]
    light = [weighted[n] for n, w in weights.items() if w == 1]
    ratio = (sum(heavy) / len(heavy)) / (sum(light) / len(light))
    measured[f"{name}_weight_ratio"] = ratio
    report("weight 2 / weight 1 share (mean per backend)", f"{ratio:.4f}",
           f"2 +- {WEIGHT_TOLERANCE:.0%}", abs(ratio / 2 - 1) <= WEIGHT_TOLERANCE)
    each = [c / 2 for c in heavy] + light
    print(f"  {'  (per-backend share / weight: min, max)':<44} "
          f"{min(each) / (sum(each) / len(each)):.3f}, {max(each) / (sum(each) / len(each)):.3f}")

    own = best_time(lambda: deque(map(selector.select, timing_keys), maxlen=0))
    speedup = uhashring_select / own
    measured[f"{name}_select_ns"] = own / len(timing_keys) * 1e9
    measured[f"{name}_select_speedup"] = speedup
    measured[f"{name}_build_ms"] = built * 1e3
    report(f"select speed-up vs uhashring ({own / len(timing_keys) * 1e9:.0f} ns)",
           f"{speedup:.1f}x", f">= {SELECT_SPEEDUP:.0f}x", speedup >= SELECT_SPEEDUP)
    print(f"  {'  (build, ' + str(count) + ' backends)':<44} {built * 1e3:>10.0f} ms")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="flow keys (1,000,000)")
    parser.add_argument("--backends", type=int, default=100, help="equal backends (100)")
    parser.add_argument("--timing-keys", type=int, default=200_000,
                        help="keys per select timing run (200,000)")
    parser.add_argument("--record", metavar="FILE", help="write the figures into FILE (docs/figures.toml)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    keys = flow_keys(args.keys, seed=2016)
    timing_keys = keys[: min(args.timing_keys, len(keys))]
    names = [f"backend-{i:03d}" for i in range(args.backends)]
    ring = HashRing(nodes=names)
    uhashring_select = best_time(lambda: deque(map(ring.get_node, timing_keys), maxlen=0))
    print(f"{len(keys):,} keys, {args.backends} backends; baseline uhashring get_node "
          f"{uhashring_select / len(timing_keys) * 1e9:.0f} ns/key")
    if len(keys) < 1_000_000:
        print("(the balance and weight bounds assume 1,000,000 keys: with fewer, the keys'"
              " own sampling noise can exceed them)")
    for name in SELECTORS:
        figures(name, args.backends, keys, timing_keys, uhashring_select)

    print("build:")
    names = [f"backend-{i:03d}" for i in range(args.backends)]
    thousand = [f"backend-{i:04d}" for i in range(1000)]
    items = sorted_backends(dict.fromkeys(thousand, 1))
    table = maglev._table  # the fill without Maglev.build's 100 x backends size rule
    own = uhashring = float("inf")
    for _ in range(REPEATS):  # interleaved, so both see the same machine
        own = min(own, best_time(lambda: table(items, 65537), 1))
        uhashring = min(uhashring, best_time(lambda: HashRing(nodes=thousand), 1))
    share = own / uhashring
    measured["maglev_1000_fill_share"] = share
    measured["uhashring_select_ns"] = uhashring_select / len(timing_keys) * 1e9
    report(f"maglev 1000 @65537 / uhashring 1000 ({own * 1e3:.0f} ms)", f"{share:.3f}",
           f"<= {BUILD_SHARE:.2f}", share <= BUILD_SHARE)
    legal = best_time(lambda: maglev.Maglev.build(dict.fromkeys(thousand, 1), table_size=100003), 1)
    print(f"  {'  (Maglev.build 1000 @100003, the legal size)':<44} {legal * 1e3:>10.0f} ms")
    measured["maglev_1000_build_ms"] = legal * 1e3
    # Any allowed weights: one backend of the largest weight among 999 of weight 1 (the worst
    # case for weighted turns and for a ring's points), at each selector's default size.
    skewed = {**dict.fromkeys(thousand, 1), thousand[0]: MAX_WEIGHT}
    for name in SELECTORS:
        options = {"table_size": 100003} if name == "maglev" else {}
        took = best_time(lambda: plugins.build_selector(name, skewed, options), 1)
        measured[f"{name}_skewed_build_s"] = took
        report(f"build {name}, 1000 backends, weights 1 and {MAX_WEIGHT} ({took * 1e3:.0f} ms)",
               f"{took:.3f} s", f"< {SKEWED_BUILD_BOUND:.1f} s", took < SKEWED_BUILD_BOUND)
    # The tables' own balance: rows (slots) per backend, no key sampling in it.
    for name in ("maglev", "rendezvous"):
        table = build(name, dict.fromkeys(names, 1))
        rows = Counter(getattr(table, "_table"))
        share = max(rows.values()) / (sum(rows.values()) / len(rows))
        measured[f"{name}_rows_balance"] = share
        print(f"  {'  (' + name + ' table rows per backend, max/mean, ' + str(len(names)) + ')':<44} {share:>12.4f}")

    print(f"{sum(results)}/{len(results)} PASS in {time.perf_counter() - start:.0f} s")
    if args.record:
        record(args.record, "selectors", measured, argv=None if argv is None else [sys.argv[0], *argv])
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
