"""``bench/forward.py --record``, run short: it records every ``forward`` figure the docs
quote (the planes, the upload, the workers, the flow table), and leaves no namespace behind."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.component.test_bench_record import quoted_figures

ROOT = Path(__file__).resolve().parents[2]


def namespaces() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def test_forward_records_every_figure_the_docs_quote(tmp_path: Path) -> None:
    out = tmp_path / "figures.toml"
    before = namespaces()
    runs = [("--planes", "python,tc,xdp", "--upload"), ("--planes", "python", "--conntrack"), ("--workers", "1,2")]
    for options in runs:
        done = subprocess.run([sys.executable, "bench/forward.py", "--seconds", "0.5", "--rounds", "1", *options,
                               "--record", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                              check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "ratio python/kernel" in done.stdout or "ratio workers=2/workers=1" in done.stdout
    recorded = tomllib.loads(out.read_text())["forward"]
    missing = quoted_figures()["forward"] - set(recorded)
    assert not missing, f"the docs quote {sorted(missing)}, which bench/forward.py does not record"
    assert recorded["tc_delivered"]["value"] > 0 and recorded["flow_bytes"]["value"] > 50
    assert "--workers 1,2" in recorded["workers_2_over_1"]["command"]
    assert "--upload" in recorded["tc_upload"]["command"]
    assert "--conntrack" not in recorded["python_delivered"]["command"]  # that run records only the table's
    assert namespaces() == before
