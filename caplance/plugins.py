"""Entry-point discovery for selectors and transports.

Built-ins register through the same groups as third-party plugins (see ``pyproject.toml``),
so the library uses its own plugin path. Listing plugins imports nothing; loading one imports
only that one.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, cast

from caplance.errors import PluginError
from caplance.interfaces import Selector, SelectorFactory

__all__ = ["SELECTORS", "TRANSPORTS", "available", "build_selector", "load"]

SELECTORS = "caplance.selectors"
TRANSPORTS = "caplance.transports"


def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def available(group: str) -> list[str]:
    """The plugin names registered in ``group``, sorted. Imports nothing."""
    return sorted(_entry_points(group))


def load(group: str, name: str) -> Any:
    """Import and return the object entry point ``name`` of ``group`` names.

    Raises :class:`PluginError` if no such plugin is registered or importing it fails.
    """
    found = _entry_points(group)
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise PluginError(group, name, f"not registered (available: {known})")
    entry = found[name]
    try:
        return entry.load()
    except Exception as exc:
        raise PluginError(group, name, f"cannot import {entry.value}: {exc!r}") from exc


def build_selector(name: str, backends: Mapping[str, int], options: Mapping[str, Any]) -> Selector:
    """Load selector plugin ``name`` and build it for ``backends`` with ``options``.

    Raises :class:`PluginError` naming the plugin and the problem when the options or
    weights are rejected or the built value has no ``select``.
    """
    factory = cast(SelectorFactory, load(SELECTORS, name))
    try:
        selector = factory.build(backends, **dict(options))
    except (TypeError, ValueError) as exc:
        raise PluginError(SELECTORS, name, str(exc)) from exc
    if not callable(getattr(selector, "select", None)):
        raise PluginError(SELECTORS, name, f"build() returned {selector!r}, which has no select()")
    return selector
