"""A journal of host changes, written before each change, so that a run that dies (SIGKILL,
a power cut of the process) can be undone by the next one.

One file per :class:`~caplance.netops.NetOps`, in ``/run/caplance/journal/`` (or the
directory in ``CAPLANCE_JOURNAL_DIR``), named ``<netns inode>-<pid>-<token>.jsonl``. The first
line is a header naming the process (its pid and its start time, so that a reused pid is not
taken for the writer) and the network namespace; every further line is one JSON object:

- an *entry* ``{"n": 3, "t": ..., "kind": "sysctl", ...}``: a change about to be made, with
  what its undo needs (see :mod:`caplance.netundo`), written and flushed before the change;
- a *skip* ``{"skip": 3}``: entry 3 was not ours after all (it already existed, or it failed),
  so its undo must not run.

A crash between writing an entry and making the change leaves an entry whose change never
happened; every undo tolerates that ("already gone" is success). A crash in the middle of a
line leaves a truncated last line, which readers ignore: its change had not been made yet.
The file is deleted when its owner undoes everything cleanly (:meth:`Journal.close`).

File I/O only: no sockets, no netlink.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

__all__ = ["DEFAULT_DIRECTORY", "DeadRun", "Journal", "dead_journals", "directory", "forget_netns",
           "netns_inode", "process_start_time"]

log = logging.getLogger(__name__)

DEFAULT_DIRECTORY = "/run/caplance/journal"
_CLAIMED = ".undoing-"  # a journal being replayed: <name>.jsonl.undoing-<pid of the replayer>


def directory() -> Path:
    """Where journals live: ``$CAPLANCE_JOURNAL_DIR``, else ``/run/caplance/journal``."""
    return Path(os.environ.get("CAPLANCE_JOURNAL_DIR") or DEFAULT_DIRECTORY)


def netns_inode() -> int:
    """The inode of this process's network namespace (what ``ip netns identify`` compares)."""
    return os.stat("/proc/self/ns/net").st_ino


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field
    22); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the name in parentheses may hold spaces
    try:
        return int(fields[19])  # field 3 is fields[0]
    except (IndexError, ValueError):
        return None


class Journal:
    """The journal of one :class:`~caplance.netops.NetOps`; the file is made on the first
    :meth:`record`. Writing raises ``OSError`` (the caller translates it)."""

    def __init__(self, path: Path | None = None) -> None:
        inode = netns_inode()
        self.path = path or directory() / f"{inode}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self._inode = inode
        self._handle: Any = None
        self._next = 1

    def _write(self, line: dict[str, Any]) -> None:
        if self._handle is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._handle = open(self.path, "a")  # noqa: SIM115 - open until close()
            pid = os.getpid()
            self._write({"journal": 1, "pid": pid, "start": process_start_time(pid), "netns": self._inode,
                         "created": time.monotonic_ns()})
        self._handle.write(json.dumps(line, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Write an entry for a change about to be made; the entry (its ``n`` for
        :meth:`skip`)."""
        entry = {"n": self._next, "t": time.monotonic_ns(), "kind": kind, **fields}
        self._next += 1
        self._write(entry)
        return entry

    def skip(self, entry: dict[str, Any]) -> None:
        """Mark ``entry`` as not to be undone (it pre-existed, or making it failed)."""
        self._write({"skip": entry["n"]})

    def close(self) -> None:
        """Close and delete the file: everything it recorded was undone."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self._next = 1


def read(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, entries still to undo, oldest first) of the journal at ``path``. A truncated
    or garbled line is ignored; a file with no header gives (None, [])."""
    header: dict[str, Any] | None = None
    entries: dict[int, dict[str, Any]] = {}
    with open(path) as handle:
        for line in handle:
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if not isinstance(value, dict):
                continue
            if header is None:
                if "journal" not in value:
                    return None, []
                header = value
            elif "skip" in value:
                entries.pop(value["skip"], None)
            elif isinstance(value.get("n"), int) and isinstance(value.get("kind"), str):
                entries[value["n"]] = value
    return header, [entries[n] for n in sorted(entries)]


@attrs.frozen
class DeadRun:
    """A journal whose writer is gone: its path, its header and the entries to undo."""

    path: Path
    pid: int
    entries: list[dict[str, Any]]

    def claim(self) -> Path | None:
        """Take the journal for replay (an atomic rename, so two starts never replay it
        both); the new path, or None if another process took it first."""
        base = self.path.name.split(_CLAIMED)[0]
        claimed = self.path.with_name(f"{base}{_CLAIMED}{os.getpid()}")
        try:
            os.rename(self.path, claimed)
        except FileNotFoundError:
            return None
        return claimed


def _alive(pid: int, start: Any) -> bool:
    found = process_start_time(pid)
    return found is not None and (start is None or found == start)


def _journals(inode: int) -> Iterator[Path]:
    try:
        yield from sorted(directory().glob(f"{inode}-*.jsonl*"))
    except OSError:
        return


def dead_journals() -> list[DeadRun]:
    """The journals of this network namespace whose process is gone (no such pid, or the
    pid now names a process that started at another time), also those a replayer that died
    left half done. Unreadable or empty ones are deleted."""
    found = []
    for path in _journals(netns_inode()):
        claimer = path.name.partition(_CLAIMED)[2]
        if claimer and claimer.isdigit() and process_start_time(int(claimer)) is not None:
            continue  # being replayed right now
        try:
            header, entries = read(path)
        except OSError:
            continue
        if header is None or not isinstance(header.get("pid"), int):
            log.warning("removing an unreadable journal", extra={"path": str(path)})
            path.unlink(missing_ok=True)
            continue
        if not claimer and _alive(header["pid"], header.get("start")):
            continue
        found.append(DeadRun(path=path, pid=header["pid"], entries=entries))
    return found


def forget_netns(inode: int) -> int:
    """Delete every journal of the network namespace with ``inode`` (it is being deleted:
    nothing in it needs undoing, and a namespace made later may get the same inode). How
    many were deleted."""
    count = 0
    for path in _journals(inode):
        path.unlink(missing_ok=True)
        count += 1
    return count
