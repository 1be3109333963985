"""What the fuzz targets share: the record of findings.

A *finding* is an exception a target's contract does not allow (anything but
``MalformedPacket`` from the packet parser, ...) or a broken property. The target records it
(once per distinct place it was raised, with the input and the traceback, under
``$FUZZ_ARTIFACTS``) and carries on, so one run reports every distinct finding rather than
stopping at the first; ``fuzz/run.py`` counts them and fails. No atheris import here: the
targets import it, this stays plain Python.
"""

from __future__ import annotations

import hashlib
import os
import sys
import traceback
from pathlib import Path

_seen: set[str] = set()


def _place(exc: BaseException) -> str:
    """Where ``exc`` was raised: the innermost frame in caplance (or the innermost at all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [frame for frame in frames if "/caplance/" in frame.filename] or frames
    frame = ours[-1] if ours else None
    where = f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"
    return f"{type(exc).__name__} at {where}"


def record(target: str, data: bytes, exc: BaseException) -> None:
    """Record ``exc`` raised on input ``data``, once per distinct exception type and place."""
    signature = _place(exc)
    if signature in _seen:
        return
    _seen.add(signature)
    folder = Path(os.environ.get("FUZZ_ARTIFACTS", "build/fuzz")) / target
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(signature.encode()).hexdigest()[:10]
    (folder / f"finding-{digest}.bin").write_bytes(data)
    text = "".join(traceback.format_exception(exc))
    (folder / f"finding-{digest}.txt").write_text(f"{signature}\ninput: {data!r}\n\n{text}")
    print(f"\nFINDING {target}: {signature} (input {data[:80]!r}, saved as finding-{digest}.bin)",
          file=sys.stderr, flush=True)


class Broken(AssertionError):
    """A property the target checks does not hold."""
