"""Where the bench scripts put the figures the docs quote: ``docs/figures.toml``.

Each script takes ``--record FILE`` and, after printing its results, writes the figures it
measured into ``FILE``, one table per figure (``[forward.python_delivered]``) with its value,
the command that measured it and when and where it ran. Figures it did not measure this time
stay as they were. The docs take every figure from that file (``[[figure NAME]]`` in a page,
see ``docs/hooks.py``), so two pages cannot quote one measurement two ways.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import tomli_w

__all__ = ["machine", "record"]

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("# The figures the docs quote. Written by the bench scripts (--record docs/figures.toml),\n"
          "# not by hand: each figure keeps the command that measured it. See bench/record.py.\n\n")


def machine() -> str:
    """Where this runs, as the docs say it."""
    return (f"{os.cpu_count()} CPUs, Linux {platform.release().split('-')[0]}, "
            f"CPython {platform.python_version()}")


def record(path: str | Path, section: str, values: Mapping[str, float], *,
           argv: list[str] | None = None, today: datetime.date | None = None) -> None:
    """Write ``values`` as ``section.NAME`` figures into ``path`` (other figures kept), each
    with the command line (``argv``, default this process's) and the date and machine."""
    path = Path(path)
    figures = tomllib.loads(path.read_text()) if path.exists() else {}
    table = figures.setdefault(section, {})
    script, *options = sys.argv if argv is None else argv
    command = shlex.join(["python", _from_root(script), *options])
    measured = f"{(today or datetime.date.today()).isoformat()}, {machine()}"
    for name, value in values.items():
        if math.isnan(value):  # not measured (a tool was missing)
            continue
        table[name] = {"value": round(float(value), 4), "command": command, "measured": measured}
    partial = path.with_name(path.name + ".partial")  # a run stopped half-way leaves the file whole
    partial.write_text(HEADER + tomli_w.dumps(figures))
    os.replace(partial, path)


def _from_root(script: str) -> str:
    """``script`` as run from the repository's root (``bench/forward.py``), wherever it was run from."""
    try:
        return str(Path(script).resolve().relative_to(ROOT))
    except ValueError:
        return script
