"""The journal of host changes: what it writes, which journals count as dead, and the order a
replay undoes them in -- with files in a temporary directory, no root and no network."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Self

import pytest

from caplance import journal, netundo, recovery
from caplance.errors import NetOpsError


@pytest.fixture(autouse=True)
def journal_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "journal"
    monkeypatch.setenv("CAPLANCE_JOURNAL_DIR", str(directory))
    return directory


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


_KILLED_WRITER = """
import json, os, signal, sys
from caplance import journal
books = [journal.Journal() for _ in range(int(sys.argv[1]))]
for number, kind, fields, skip in json.loads(sys.argv[2]):
    entry = books[number].record(kind, **fields)
    if skip:
        books[number].skip(entry)
print(json.dumps({"pid": os.getpid(), "paths": [str(book.path) for book in books]}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

Change = tuple[int, str, dict[str, Any], bool]


def killed_writer(changes: list[Change], *, journals: int = 1) -> tuple[int, list[Path]]:
    """Journal ``changes`` (journal number, kind, fields, skipped?) in a process that then
    dies by SIGKILL; (its pid, its journals)."""
    child = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(journals), json.dumps(changes)],
                           capture_output=True, text=True, timeout=30, check=False)
    assert child.returncode == -9, child.stderr
    told = json.loads(child.stdout)
    return told["pid"], [Path(path) for path in told["paths"]]


def link(name: str, *, number: int = 0, skip: bool = False) -> Change:
    return (number, "link", {"ifname": name}, skip)


def rewrite_header(path: Path, **changes: Any) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[0] = json.dumps({**json.loads(lines[0]), **changes}) + "\n"
    path.write_text("".join(lines))


def test_nothing_is_written_until_the_first_change(journal_dir: Path) -> None:
    book = journal.Journal()
    assert not journal_dir.exists()
    book.close()
    assert not journal_dir.exists()


def test_a_journal_has_a_header_then_one_line_per_change(journal_dir: Path) -> None:
    book = journal.Journal()
    first = book.record("sysctl", name="net.ipv4.ip_forward", old="0", value="1", then={})
    second = book.record("address", address="10.99.0.1", prefixlen=32, ifname="lo")
    book.skip(second)
    assert book.path.parent == journal_dir
    assert book.path.name.startswith(f"{journal.netns_inode()}-{os.getpid()}-")
    lines = [json.loads(line) for line in book.path.read_text().splitlines()]
    assert lines[0]["pid"] == os.getpid()
    assert lines[0]["start"] == journal.process_start_time(os.getpid()) is not None
    assert lines[0]["netns"] == journal.netns_inode()
    assert [line.get("n") for line in lines[1:]] == [1, 2, None]
    assert lines[3] == {"skip": 2}
    header, entries = journal.read(book.path)
    assert header is not None and entries == [first]  # the skipped one is not to be undone
    book.close()
    assert not book.path.exists()


def test_the_journal_of_a_live_process_is_not_dead() -> None:
    book = journal.Journal()
    book.record("link", ifname="gre-be1")
    assert journal.dead_journals() == []
    book.close()


def test_the_journal_of_a_killed_process_is_dead() -> None:
    pid, [path] = killed_writer([link("gre-be1"), link("gre-be2", skip=True)])
    [dead] = journal.dead_journals()
    assert (dead.pid, dead.path) == (pid, path)
    assert [entry["ifname"] for entry in dead.entries] == ["gre-be1"]


def test_a_reused_pid_with_another_start_time_counts_as_dead() -> None:
    _, [path] = killed_writer([link("gre-be1")])
    start = journal.process_start_time(os.getpid())
    assert start is not None
    rewrite_header(path, pid=os.getpid(), start=start + 1)  # our pid, but not us: we started at `start`
    assert [dead.pid for dead in journal.dead_journals()] == [os.getpid()]
    rewrite_header(path, start=start)
    assert journal.dead_journals() == []


def test_journals_of_other_namespaces_are_not_ours(journal_dir: Path) -> None:
    _, [path] = killed_writer([link("gre-be1")])
    other = journal.netns_inode() + 1
    path.rename(journal_dir / f"{other}-{path.name.partition('-')[2]}")
    assert journal.dead_journals() == []
    assert journal.forget_netns(other) == 1
    assert list(journal_dir.iterdir()) == []


def test_a_truncated_last_line_is_ignored() -> None:
    _, [path] = killed_writer([link("gre-be1"), link("gre-be2")])
    text = path.read_text()
    path.write_text(text[: len(text) - 10])  # as if killed in the middle of writing the last line
    [dead] = journal.dead_journals()
    assert [entry["ifname"] for entry in dead.entries] == ["gre-be1"]


def test_a_file_without_a_header_is_removed(journal_dir: Path) -> None:
    journal_dir.mkdir()
    path = journal_dir / f"{journal.netns_inode()}-{dead_pid()}-0000.jsonl"
    path.write_text('{"pi')
    assert journal.dead_journals() == []
    assert not path.exists()


def test_a_claim_is_taken_once() -> None:
    _, [path] = killed_writer([link("gre-be1")])
    [dead] = journal.dead_journals()
    claimed = dead.claim()
    assert claimed is not None and claimed.exists() and not path.exists()
    assert dead.claim() is None  # another start got there first
    assert journal.dead_journals() == []  # its replayer (this process) is alive


def test_a_replayer_that_died_leaves_its_claim_to_the_next() -> None:
    _, [path] = killed_writer([link("gre-be1")])
    path.rename(path.with_name(f"{path.name}.undoing-{dead_pid()}"))
    assert [entry["ifname"] for dead in journal.dead_journals() for entry in dead.entries] == ["gre-be1"]


def test_replay_undoes_newest_first_skips_what_was_not_ours_and_says_so(
        journal_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    undone: list[str] = []
    monkeypatch.setattr(recovery, "undo_entry", lambda ipr, entry: undone.append(entry["ifname"]))
    monkeypatch.setattr(recovery, "IPRoute", FakeIPRoute)
    pid, _ = killed_writer([link("a"), link("b", number=1), link("pre-existing", skip=True), link("c")],
                           journals=2)
    with caplog.at_level(logging.WARNING, logger="caplance.recovery"):
        done = recovery.undo_dead_runs()
    assert undone == ["c", "b", "a"]  # newest first, across the two journals
    assert done == ["remove GRE device c", "remove GRE device b", "remove GRE device a"]
    assert f"undid 3 changes left by a run that died (pid {pid}): remove GRE device c;" in caplog.text
    assert list(journal_dir.iterdir()) == []
    assert recovery.undo_dead_runs() == []  # once only


def test_a_failing_step_does_not_stop_the_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    def undo(ipr: object, entry: dict[str, Any]) -> None:
        if entry["ifname"] == "b":
            raise NetOpsError("remove", "b", "busy")

    monkeypatch.setattr(recovery, "undo_entry", undo)
    monkeypatch.setattr(recovery, "IPRoute", FakeIPRoute)
    killed_writer([link("a"), link("b"), link("c")])
    assert recovery.undo_dead_runs() == ["remove GRE device c", "remove GRE device a"]


def test_a_sysctl_changed_since_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.accept_redirects": "0"}
    monkeypatch.setattr(netundo, "read_sysctl", values.__getitem__)
    monkeypatch.setattr(netundo, "write_sysctl", values.__setitem__)
    entry = {"kind": "sysctl", "name": "net.ipv4.ip_forward", "old": "0", "value": "1",
             "then": {"net.ipv4.conf.all.accept_redirects": "1"}}
    netundo.undo_entry(FakeIPRoute(), {**entry, "value": "2"})  # someone set it to 1 since
    assert values == {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.accept_redirects": "0"}
    netundo.undo_entry(FakeIPRoute(), entry)  # the value and its side effects come back
    assert values == {"net.ipv4.ip_forward": "0", "net.ipv4.conf.all.accept_redirects": "1"}


def test_every_kind_has_an_undo_and_a_description() -> None:
    assert "unknown" not in netundo.describe({"kind": "tun", "ifname": "caplance0"})
    with pytest.raises(NetOpsError, match="unknown kind"):
        netundo.undo_entry(FakeIPRoute(), {"kind": "teleporter", "n": 1})


class FakeIPRoute:
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
