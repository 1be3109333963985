"""The selector contract: built-ins and the example plugin, through the entry-point group.

Property tests (hypothesis) for determinism, order independence, weight 0 and minimal
disruption; the public conformance check on every selector, and on broken selectors to show
it fails; rendezvous's fast build against a plain per-row argmax.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caplance import plugins
from caplance.config import MAX_WEIGHT
from caplance.errors import PluginError
from caplance.strategies import is_prime, sorted_backends
from caplance.strategies import ring as ring_module
from caplance.strategies.maglev import Maglev
from caplance.strategies.rendezvous import Rendezvous, populate, row_score
from caplance.strategies.ring import MAX_POINTS, Ring, point_counts
from caplance.testing import SelectorConformanceError, check_selector, flow_keys

from .test_layout import FORBIDDEN, closure

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom_selector"
BUILT_INS = {"maglev": Maglev, "ring": Ring, "rendezvous": Rendezvous}
# Small tables keep the property tests quick; the defaults are covered by check_selector.
FAST = {"maglev": {"table_size": 2003}, "ring": {"vnodes": 16}, "rendezvous": {"table_size": 2003}}
KEYS = flow_keys(300, ipv6=True)


def _modulo_registered() -> bool:
    return any(ep.name == "modulo" for ep in entry_points(group=plugins.SELECTORS))


@pytest.fixture(scope="session")
def example_plugin() -> Any:
    """The example plugin's selector, pip-installed into this venv first if missing."""
    if not _modulo_registered():
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(EXAMPLE)]
        if all(importlib.util.find_spec(tool) for tool in ("setuptools", "wheel")):
            # The venv can build it itself: no download, so this works offline. Otherwise
            # pip fetches setuptools into an isolated build environment.
            command[4:4] = ["--no-build-isolation", "--no-index"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            pytest.fail(f"cannot install {EXAMPLE}: {' '.join(command)}\n{done.stderr}")
        importlib.invalidate_caches()
    assert _modulo_registered(), "the example plugin installed but registers no 'modulo'"
    return plugins.load(plugins.SELECTORS, "modulo")


# --- registration -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_built_ins_register_through_the_entry_point_group(name: str) -> None:
    assert name in plugins.available(plugins.SELECTORS)
    assert plugins.load(plugins.SELECTORS, name) is BUILT_INS[name]


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_bad_options_become_plugin_errors(name: str) -> None:
    with pytest.raises(PluginError, match=f"{name}.*unknown option.*colour"):
        plugins.build_selector(name, {"a": 1}, {"colour": "blue"})


@pytest.mark.parametrize("module", ["caplance.strategies.ring", "caplance.strategies.rendezvous"])
def test_selectors_are_pure(module: str) -> None:
    for found, imported in closure(module).items():
        bad = {m for m in imported if m.split(".")[0] in FORBIDDEN}
        assert not bad, f"{module} reaches {found}, which imports {sorted(bad)}"


def test_testing_module_imports_no_trio_itself() -> None:
    tree = ast.parse((ROOT / "caplance" / "testing.py").read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert top_level, "no imports found: the check would pass vacuously"
    assert not top_level & {"trio", "socket", "subprocess"}


# --- the conformance check ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_built_ins_conform(name: str) -> None:
    check_selector(BUILT_INS[name])


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_built_ins_conform_with_options(name: str) -> None:
    check_selector(BUILT_INS[name], options=FAST[name], subprocess=False)


def test_example_plugin_conforms(example_plugin: Any) -> None:
    assert example_plugin.__name__ == "Modulo"
    check_selector(example_plugin)
    check_selector(example_plugin, options={"seed": 12345})
    selector = plugins.build_selector("modulo", {"a": 1, "b": 0}, {})
    assert {selector.select(key) for key in KEYS} == {"a"}


class _Base:
    """A correct selector (hash modulo the number of backends), for broken variants."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    @classmethod
    def build(cls, backends: Mapping[str, int], /, **options: Any) -> Any:
        if options:
            raise TypeError(f"unknown option(s) {sorted(options)}")
        return cls([name for name, weight in sorted_backends(backends) if weight > 0])

    def select(self, key: bytes, /) -> str | None:
        return self.names[mmh3.hash(key, 1, False) % len(self.names)] if self.names else None


class UsesHash(_Base):
    def select(self, key: bytes, /) -> str | None:
        return self.names[hash(key) % len(self.names)] if self.names else None


class UsesRandom(_Base):
    def select(self, key: bytes, /) -> str | None:
        return random.choice(self.names) if self.names else None


class OrderDependent(_Base):
    @classmethod
    def build(cls, backends: Mapping[str, int], /, **options: Any) -> Any:
        sorted_backends(backends)
        return cls([name for name, weight in backends.items() if weight > 0])


class KeepsTheMapping(_Base):
    @classmethod
    def build(cls, backends: Mapping[str, int], /, **options: Any) -> Any:
        sorted_backends(backends)
        selector = cls([])
        selector.source = backends  # type: ignore[attr-defined]
        return selector

    def select(self, key: bytes, /) -> str | None:
        names = sorted(n for n, w in self.source.items() if w > 0)  # type: ignore[attr-defined]
        return names[mmh3.hash(key, 1, False) % len(names)] if names else None


class IgnoresWeightZero(_Base):
    @classmethod
    def build(cls, backends: Mapping[str, int], /, **options: Any) -> Any:
        return cls([name for name, _ in sorted_backends(backends)])


class NeverNone(_Base):
    def select(self, key: bytes, /) -> str | None:
        return super().select(key) or "backend-a"


class CrashesWhenEmpty(_Base):
    def select(self, key: bytes, /) -> str | None:
        return self.names[mmh3.hash(key, 1, False) % len(self.names)]


class TakesAnyWeight(_Base):
    @classmethod
    def build(cls, backends: Mapping[str, int], /, **options: Any) -> Any:
        if options:
            raise TypeError("unknown option")
        return cls(sorted(name for name, weight in backends.items() if weight))


class TakesAnyOption(_Base):
    @classmethod
    def build(cls, backends: Mapping[str, int], /, **options: Any) -> Any:
        return super().build(backends)


class NoSelect:
    @classmethod
    def build(cls, backends: Mapping[str, int], /, **options: Any) -> Any:
        return object()


@pytest.mark.parametrize(
    ("broken", "check"),
    [
        (UsesHash, "same in every process"),
        (UsesRandom, "deterministic"),
        (OrderDependent, "order independent"),
        (KeepsTheMapping, "immutable"),
        (IgnoresWeightZero, "weight 0 gets nothing"),
        (NeverNone, "none -> None"),
        (CrashesWhenEmpty, "none -> None"),
        (TakesAnyWeight, "refuses bad input"),
        (TakesAnyOption, "refuses bad input"),
        (NoSelect, "valid result"),
    ],
)
def test_the_check_catches_broken_selectors(broken: type, check: str) -> None:
    with pytest.raises(SelectorConformanceError) as caught:
        check_selector(broken)
    assert caught.value.check == check, str(caught.value)
    assert broken.__qualname__ in str(caught.value)
    assert isinstance(caught.value, AssertionError)


def test_the_correct_base_passes() -> None:
    check_selector(_Base)


def test_the_check_explains_a_local_class() -> None:
    class Local(_Base):
        pass

    check_selector(Local, subprocess=False)
    with pytest.raises(SelectorConformanceError, match="cannot re-import"):
        check_selector(Local)


# --- properties -----------------------------------------------------------------------------

names = st.text(alphabet="abcdefghij-\u00e9", min_size=1, max_size=6)


def backend_sets(min_size: int = 0, min_weight: int = 0) -> st.SearchStrategy[dict[str, int]]:
    return st.dictionaries(names, st.integers(min_weight, 4), min_size=min_size, max_size=12)


@pytest.mark.parametrize("name", sorted(BUILT_INS))
@settings(max_examples=40, deadline=None)
@given(backends=backend_sets(), seed=st.integers(0, 2**32 - 1))
def test_order_never_matters(name: str, backends: dict[str, int], seed: int) -> None:
    factory = BUILT_INS[name]
    shuffled = list(backends.items())
    random.Random(seed).shuffle(shuffled)
    one = factory.build(backends, **FAST[name])
    other = factory.build(dict(shuffled), **FAST[name])
    assert [one.select(k) for k in KEYS] == [other.select(k) for k in KEYS]


@pytest.mark.parametrize("name", sorted(BUILT_INS))
@settings(max_examples=40, deadline=None)
@given(backends=backend_sets())
def test_choices_are_backends_with_weight(name: str, backends: dict[str, int]) -> None:
    selector = BUILT_INS[name].build(backends, **FAST[name])
    chosen = {selector.select(k) for k in KEYS}
    live = {n for n, w in backends.items() if w > 0}
    if live:
        assert chosen <= live
        assert None not in chosen
    else:
        assert chosen == {None}


@pytest.mark.parametrize("name", ["ring", "rendezvous"])
@settings(max_examples=40, deadline=None)
@given(backends=backend_sets(min_size=2, min_weight=1), data=st.data())
def test_removing_a_backend_moves_only_its_keys(name: str, backends: dict[str, int],
                                                data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(sorted(backends)))
    rest = {n: w for n, w in backends.items() if n != gone}
    drained = {**backends, gone: 0}
    before = BUILT_INS[name].build(backends, **FAST[name])
    for survivors in (rest, drained):
        after = BUILT_INS[name].build(survivors, **FAST[name])
        for key in KEYS:
            old, new = before.select(key), after.select(key)
            assert new != gone
            if old != gone:
                assert new == old, f"{key.hex()} moved from {old} to {new} without {gone}"


@pytest.mark.parametrize("name", ["ring", "rendezvous"])
@settings(max_examples=40, deadline=None)
@given(backends=backend_sets(min_size=1, min_weight=1), newcomer=names,
       weight=st.integers(1, 4))
def test_adding_a_backend_moves_keys_only_to_it(name: str, backends: dict[str, int],
                                                newcomer: str, weight: int) -> None:
    if newcomer in backends:
        return
    before = BUILT_INS[name].build(backends, **FAST[name])
    after = BUILT_INS[name].build({**backends, newcomer: weight}, **FAST[name])
    for key in KEYS:
        assert after.select(key) in (before.select(key), newcomer)


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_weight_two_gets_twice_the_share(name: str) -> None:
    backends = {f"backend-{i:02d}": 1 + i % 2 for i in range(20)}
    selector = BUILT_INS[name].build(backends)
    counts = Counter(selector.select(k) for k in flow_keys(40_000))
    heavy = sum(counts[n] for n, w in backends.items() if w == 2)
    light = sum(counts[n] for n, w in backends.items() if w == 1)
    assert 1.8 < heavy / light < 2.2


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_equal_backends_share_evenly(name: str) -> None:
    backends = {f"backend-{i:02d}": 1 for i in range(20)}
    selector = BUILT_INS[name].build(backends)
    counts = Counter(selector.select(k) for k in flow_keys(40_000))
    assert set(counts) == set(backends)
    assert max(counts.values()) / (40_000 / 20) < (1.35 if name == "ring" else 1.1)


# --- ring -------------------------------------------------------------------------------


def test_ring_places_vnodes_per_unit_of_weight() -> None:
    assert len(Ring.build({"a": 1, "b": 2, "c": 0}, vnodes=10)) == 30
    assert Ring.build({"a": 1}).vnodes == 256


def reference_ring(backends: dict[str, int], vnodes: int) -> list[tuple[int, str]]:
    """The ring's points by its definition: (mmh3(name + j, seed), name), sorted."""
    return sorted(
        (mmh3.hash(name.encode() + j.to_bytes(4, "big"), ring_module._POINT_SEED, False), name)
        for name, weight in backends.items()
        for j in range(vnodes * weight)
    )


@settings(max_examples=60, deadline=None)
@given(backends=backend_sets(min_size=1, min_weight=1), vnodes=st.integers(1, 40))
def test_ring_owner_is_the_next_point(backends: dict[str, int], vnodes: int) -> None:
    ring = Ring.build(backends, vnodes=vnodes)
    points = reference_ring(backends, vnodes)
    # Every point, its neighbours and the edges of its stretch: where shortcuts could slip.
    probes = {0, 2**32 - 1}
    for point, _ in points:
        edge = point >> 14 << 14
        probes |= {point - 1, point, point + 1, edge, edge - 1, edge + (1 << 14) - 1}
    for probe in sorted(p for p in probes if 0 <= p < 2**32):
        expected = next((name for point, name in points if point >= probe), points[0][1])
        assert ring.owner_at(probe) == expected, hex(probe)
    for key in KEYS:
        assert ring.select(key) == ring.owner_at(mmh3.hash(key, ring_module._KEY_SEED, False))


@pytest.mark.parametrize(
    ("options", "error"),
    [({"vnodes": 0}, ValueError), ({"vnodes": "8"}, TypeError), ({"vnodes": True}, TypeError),
     ({"v_nodes": 8}, TypeError)],
)
def test_ring_refuses_bad_options(options: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error, match="ring"):
        Ring.build({"a": 1}, **options)


# --- rendezvous -------------------------------------------------------------------------


def naive_rendezvous(preferences: list[tuple[int, int]], weights: list[int],
                     size: int) -> list[int]:
    """Score every (row, backend) pair: the definition, with no shortcuts."""
    owners = []
    for row in range(size):
        scores = [row_score(w, (row - offset) * pow(skip, -1, size) % size, size)
                  for (offset, skip), w in zip(preferences, weights)]
        owners.append(scores.index(max(scores)))
    return owners


PRIMES = [p for p in range(2, 1200) if is_prime(p)]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), size=st.sampled_from(PRIMES), count=st.integers(1, 10),
       equal=st.booleans())
def test_rendezvous_table_is_the_per_row_argmax(data: st.DataObject, size: int, count: int,
                                                equal: bool) -> None:
    preferences = [(data.draw(st.integers(0, size - 1)), data.draw(st.integers(1, size - 1)))
                   for _ in range(count)]
    weight = st.just(3) if equal else st.integers(1, 6)
    weights = [data.draw(weight) for _ in range(count)]
    assert populate(preferences, weights, size) == naive_rendezvous(preferences, weights, size)


def test_rendezvous_skewed_weights() -> None:
    backends = {"heavy": 1000, **{f"light-{i}": 1 for i in range(9)}}
    table = Counter(Rendezvous.build(backends, table_size=10007)._table)
    assert 0.985 < table["heavy"] / 10007 < 0.995  # 1000 / 1009 = 0.991
    assert set(table) == set(backends)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [({"table_size": 1000}, ValueError, "prime"), ({"table_size": 1.5}, TypeError, "int"),
     ({"size": 1009}, TypeError, "unknown option")],
)
def test_rendezvous_refuses_bad_options(options: dict[str, object], error: type[Exception],
                                        match: str) -> None:
    with pytest.raises(error, match=f"rendezvous.*{match}"):
        Rendezvous.build({"a": 1}, **options)


# -- any allowed weights build in bounded work and memory ------------------------------------

SKEWED = {**{f"backend-{i:04d}": 1 for i in range(1000)}, "backend-0000": MAX_WEIGHT}


@pytest.mark.parametrize(("name", "options"), [("maglev", {"table_size": 100003}), ("rendezvous", {}),
                                               ("ring", {})])
def test_a_thousand_backends_with_extreme_weights_build_in_bounded_memory(name: str, options: dict) -> None:
    import tracemalloc

    tracemalloc.start()
    try:
        selector = plugins.build_selector(name, SKEWED, options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 150 * 2**20, f"{name} peaked at {peak / 2**20:.0f} MiB"
    shares = Counter(map(selector.select, flow_keys(20_000, seed=5)))
    heavy = shares["backend-0000"] / 20_000
    expected = MAX_WEIGHT / (MAX_WEIGHT + 999)
    assert abs(heavy - expected) < 0.02, (name, heavy, expected)  # the weights still count


def test_the_ring_places_at_most_max_points_whatever_the_weights() -> None:
    ring = Ring.build(dict.fromkeys((f"b{i}" for i in range(1000)), MAX_WEIGHT))
    assert len(ring) <= MAX_POINTS
    assert sum(point_counts([MAX_WEIGHT] * 1000, 256)) <= MAX_POINTS
    assert point_counts([1, 2, 0], 256) == [256, 512, 0]  # within the bound: exactly vnodes x weight
    assert min(point_counts([1] + [MAX_WEIGHT] * 10, 256)) == 1  # every weighted backend keeps a point


@settings(deadline=None, max_examples=15)
@given(weights=st.lists(st.integers(0, MAX_WEIGHT), min_size=1, max_size=60))
@pytest.mark.parametrize("name", ["maglev", "rendezvous", "ring"])
def test_any_allowed_weights_build(name: str, weights: list[int]) -> None:
    backends = {f"b{i}": weight for i, weight in enumerate(weights)}
    selector = plugins.build_selector(name, backends, {"table_size": 10007} if name == "maglev" else {})
    chosen = {selector.select(key) for key in flow_keys(200, seed=9)}
    assert chosen <= {n for n, w in backends.items() if w > 0} | ({None} if not any(weights) else set())
