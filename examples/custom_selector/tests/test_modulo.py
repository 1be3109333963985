"""What a plugin author's own test looks like: the public conformance check, plus the
plugin's own promises."""

from __future__ import annotations

from importlib.metadata import entry_points

from caplance_example_selector import Modulo

from caplance.testing import check_selector, flow_keys


def test_meets_the_selector_contract() -> None:
    check_selector(Modulo)
    check_selector(Modulo, options={"seed": 7})


def test_is_registered_as_modulo() -> None:
    (entry,) = [ep for ep in entry_points(group="caplance.selectors") if ep.name == "modulo"]
    assert entry.load() is Modulo


def test_splits_by_weight() -> None:
    selector = Modulo.build({"a": 1, "b": 3})
    keys = flow_keys(20_000)
    share = sum(selector.select(key) == "b" for key in keys) / len(keys)
    assert 0.72 < share < 0.78
