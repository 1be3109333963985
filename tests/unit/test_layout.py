"""The layout, checked by parsing imports: pure layers import no I/O, there is no import
circle (even under TYPE_CHECKING), data planes and the control plane meet only at the
forwarding table, and no module grows past about 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "caplance"
PURE = [
    "caplance.packet", "caplance.bpf", "caplance.config", "caplance.errors", "caplance.flowhash",
    "caplance.forwarding", "caplance.interfaces", "caplance.encapsulation", "caplance.conntrack",
    "caplance.control_codec", "caplance.plugins", "caplance.strategies", "caplance.strategies.maglev",
    "caplance.strategies.ring", "caplance.strategies.rendezvous", "caplance.control.membership",
    "caplance.dataplane", "caplance.dataplane.stats", "caplance.listeners", "caplance.security",
    "caplance.control.identity", "caplance.journal",
]
FORBIDDEN = {"trio", "socket", "pyroute2", "pytun", "subprocess", "select", "selectors", "fcntl"}
MAX_LINES = 520


def module_path(name: str) -> Path:
    base = PACKAGE.parent.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def all_modules() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.append(".".join(parts))
    return found


def _lazy_exports() -> dict[str, str]:
    """``caplance/__init__``'s name -> module table."""
    tree = ast.parse(module_path("caplance").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_EXPORTS":
            return dict(ast.literal_eval(node.value))
    return {}


EXPORTS = _lazy_exports()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, *, type_checking: bool) -> set[str]:
    """The modules ``name`` imports at module level (and, with ``type_checking``, under
    ``if TYPE_CHECKING:``). ``from caplance import X`` counts as the module X names, and
    relative imports are resolved. Imports inside functions are deliberate deferrals and
    not counted."""
    path = module_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    if module_path(child).exists():
                        found.add(child)
                    elif base == "caplance" and alias.name in EXPORTS:
                        found.add(EXPORTS[alias.name])
            elif isinstance(node, ast.If):
                if _is_type_checking(node):
                    if type_checking:
                        visit(node.body)
                else:
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(ast.parse(path.read_text()).body)
    found.discard(name)
    return found


def closure(name: str, *, type_checking: bool = False) -> dict[str, set[str]]:
    """Every caplance module reachable from ``name`` with its imports."""
    seen: dict[str, set[str]] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen[current] = imports_of(current, type_checking=type_checking)
        todo += [m for m in seen[current] if m.startswith("caplance") and module_path(m).exists()]
    return seen


@pytest.mark.parametrize("name", PURE)
def test_pure_module_needs_no_io(name: str) -> None:
    for module, imported in closure(name).items():
        bad = {m for m in imported if m.split(".")[0] in FORBIDDEN}
        assert not bad, f"{name} reaches {module}, which imports {sorted(bad)}"


def test_the_purity_check_can_fail() -> None:
    assert any(m.split(".")[0] in FORBIDDEN for m in imports_of("caplance.sockets", type_checking=False))
    # a `from caplance import X` import counts as X's module
    assert "caplance.balancer" in imports_of("caplance.cli", type_checking=True) or \
        "caplance.config" in imports_of("caplance.cli", type_checking=False)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return cycles


def test_no_import_circle_even_under_type_checking() -> None:
    modules = set(all_modules())
    graph = {m: {i for i in imports_of(m, type_checking=True) if i in modules and i != "caplance"}
             for m in modules}
    assert _cycles(graph) == []


def test_the_circle_check_can_fail() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_data_planes_and_the_control_plane_meet_only_at_the_table() -> None:
    for module in all_modules():
        imported = imports_of(module, type_checking=True)
        if module.startswith("caplance.dataplane"):
            assert not {m for m in imported if m.startswith("caplance.control")}, module
        if module.startswith("caplance.control"):
            reached = {m for m in imported if m.startswith("caplance.dataplane")}
            assert reached <= {"caplance.dataplane", "caplance.dataplane.stats"}, module


@pytest.mark.parametrize("name", all_modules())
def test_no_module_over_about_500_lines(name: str) -> None:
    lines = len(module_path(name).read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"
