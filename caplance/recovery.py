"""Undo what a run that died left behind, from its journal (:mod:`caplance.journal`).

A balancer or an agent killed with SIGKILL (or by the OOM killer) cannot undo its changes:
its addresses, routes, sysctls, nftables tables and attached programs stay. It wrote each
one to a journal before making it, so the next start in the same network namespace calls
:func:`undo_dead_runs` first, which undoes them, newest first, with the same functions a
clean stop uses (:mod:`caplance.netundo`), and says so in the log.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from pyroute2 import IPRoute

from caplance import journal
from caplance.netundo import describe, undo_entry

__all__ = ["undo_dead_runs"]

log = logging.getLogger(__name__)


def undo_dead_runs() -> list[str]:
    """Undo the changes journaled by every process of this network namespace that died
    without undoing them, newest first, and delete their journals. Returns what was undone
    (in words); each dead run gets a warning in the log. A step that fails is logged and
    skipped (the others still run); never raises for one. Synchronous and bounded (netlink,
    and ``nft``/``iptables`` with a timeout)."""
    runs: dict[int, list[tuple[journal.DeadRun, Any]]] = defaultdict(list)
    for run in journal.dead_journals():
        claimed = run.claim()
        if claimed is not None:
            runs[run.pid].append((run, claimed))
    done: list[str] = []
    if not runs:
        return done
    with IPRoute() as ipr:
        for pid, claims in runs.items():
            entries = [entry for run, _ in claims for entry in run.entries]
            entries.sort(key=lambda entry: (entry.get("t", 0), entry["n"]), reverse=True)
            undone, problems = [], []
            for entry in entries:
                what = describe(entry)
                try:
                    undo_entry(ipr, entry)
                except Exception as exc:  # noqa: BLE001 - keep undoing, report every failure
                    problems.append(f"{what}: {exc}")
                else:
                    undone.append(what)
            for _, claimed in claims:
                claimed.unlink(missing_ok=True)
            log.warning(f"undid {len(undone)} changes left by a run that died (pid {pid}): "
                        + ("; ".join(undone) or "nothing was left"),
                        extra={"pid": pid, "undone": undone, "problems": problems})
            done += undone
    return done
