"""The bench scripts that need no root, run small with ``--record``: each writes every figure
of its section that the docs quote, with the command that measured it (so a page never quotes
a figure no script produces). ``bench/forward.py`` needs root: tests/integration has its run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def quoted_figures() -> dict[str, set[str]]:
    """Every figure the docs pages quote, by section (through the docs hooks)."""
    spec = importlib.util.spec_from_file_location("caplance_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    quoted: dict[str, set[str]] = hooks.figures_quoted_by_pages()
    return quoted


def run_recording(tmp_path: Path, script: str, *options: str) -> dict[str, dict[str, object]]:
    """Run ``bench/SCRIPT`` with ``options`` and ``--record``; the figures it wrote."""
    out = tmp_path / "figures.toml"
    done = subprocess.run([sys.executable, f"bench/{script}", *options, "--record", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    # selectors.py exits 1 when a bound fails, which the keys' noise makes likely at this size
    ok = (0, 1) if script == "selectors.py" and "Traceback" not in done.stderr else (0,)
    assert done.returncode in ok, done.stderr[-3000:]
    return tomllib.loads(out.read_text())


@pytest.mark.parametrize(("script", "section", "options"), [
    ("http_cost.py", "http", ("--requests", "100", "--rounds", "2")),
    ("rebuild_stall.py", "rebuild", ("--backends", "60", "--table-size", "6007", "--rounds", "1")),
    ("selectors.py", "selectors", ("--keys", "20000", "--backends", "20", "--timing-keys", "5000")),
])
def test_a_bench_script_records_what_the_docs_quote(tmp_path: Path, script: str, section: str,
                                                    options: tuple[str, ...]) -> None:
    if script == "selectors.py":
        pytest.importorskip("uhashring", reason="bench/selectors.py's baseline is in the bench extra")
    recorded = run_recording(tmp_path, script, *options)
    assert set(recorded) == {section}
    missing = quoted_figures()[section] - set(recorded[section])
    assert not missing, f"the docs quote {sorted(missing)}, which {script} does not record"
    for figure in recorded[section].values():
        assert isinstance(figure["value"], float)
        assert figure["command"] == " ".join(["python", f"bench/{script}", *options, "--record",
                                              str(tmp_path / "figures.toml")])
        assert str(figure["measured"]).count(", ") >= 2  # date, CPUs, kernel and Python


def test_recording_again_replaces_only_what_was_measured(tmp_path: Path) -> None:
    out = tmp_path / "figures.toml"
    out.write_text('[forward.tc_delivered]\nvalue = 1.0\ncommand = "python bench/forward.py"\n'
                   'measured = "earlier"\n\n[http.ratio]\nvalue = 9.0\ncommand = "old"\nmeasured = "earlier"\n')
    recorded = run_recording(tmp_path, "http_cost.py", "--requests", "50", "--rounds", "1")
    assert recorded["forward"]["tc_delivered"]["value"] == 1.0  # another script's: kept
    assert recorded["http"]["ratio"]["measured"] != "earlier" and recorded["http"]["ratio"]["command"] != "old"
