"""The pure layers import neither trio nor sockets, directly or through other caplance modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "caplance"
PURE = ["caplance.packet", "caplance.bpf", "caplance.config", "caplance.strategies",
        "caplance.strategies.maglev", "caplance.strategies.ring", "caplance.strategies.rendezvous",
        "caplance.errors", "caplance.control_codec", "caplance.membership"]
FORBIDDEN = {"trio", "socket", "pyroute2", "pytun", "subprocess", "select", "selectors"}


def module_path(name: str) -> Path:
    base = PACKAGE.parent.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imports_of(name: str) -> set[str]:
    tree = ast.parse(module_path(name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def closure(name: str) -> dict[str, set[str]]:
    """Every caplance module reachable from ``name`` with its imports."""
    seen: dict[str, set[str]] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen[current] = imports_of(current)
        todo += [m for m in seen[current] if m.startswith("caplance") and module_path(m).exists()]
    return seen


@pytest.mark.parametrize("name", PURE)
def test_pure_module_needs_no_io(name: str) -> None:
    for module, imported in closure(name).items():
        bad = {m for m in imported if m.split(".")[0] in FORBIDDEN}
        assert not bad, f"{name} reaches {module}, which imports {sorted(bad)}"


def test_the_check_can_fail() -> None:
    assert any(m.split(".")[0] in FORBIDDEN for m in imports_of("caplance.sockets"))
