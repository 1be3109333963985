"""Entry-point discovery for selectors, transports and listeners.

Built-ins register through the same groups as third-party plugins (see ``pyproject.toml``),
so the library uses its own plugin path. Listing plugins imports nothing; loading one imports
only that one.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any, cast

from caplance.errors import PluginError
from caplance.interfaces import Listener, Selector, SelectorFactory, Transport

__all__ = ["ANNOUNCERS", "LISTENERS", "SELECTORS", "TRANSPORTS", "available", "build_selector", "check_plugins",
           "load", "make_announcer", "make_listener", "make_transport"]

SELECTORS = "caplance.selectors"
TRANSPORTS = "caplance.transports"
LISTENERS = "caplance.listeners"
ANNOUNCERS = "caplance.announcers"


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


def make_transport(name: str, options: Mapping[str, Any]) -> Transport:
    """Load transport plugin ``name`` and instantiate it with ``options``.

    Raises :class:`PluginError` naming the plugin and the problem for bad options.
    """
    factory = load(TRANSPORTS, name)
    try:
        transport: Transport = factory(**dict(options))
    except (TypeError, ValueError) as exc:
        raise PluginError(TRANSPORTS, name, str(exc)) from exc
    return transport


def make_listener(kind: str, *, interface: str | None = None, device: str | None = None,
                  options: Mapping[str, Any] | None = None) -> Listener:
    """Load listener plugin ``kind`` and instantiate it with ``options``, plus ``interface``
    and ``device`` (the listener table's common keys) when given and its constructor takes
    them. Raises :class:`PluginError` naming the plugin and the problem for bad options
    (``packet`` without an interface, say)."""
    factory = load(LISTENERS, kind)
    arguments = dict(options or {})
    try:
        accepted: Mapping[str, inspect.Parameter] = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = {}
    for key, value in (("interface", interface), ("device", device)):
        if value is not None and key in accepted:
            arguments.setdefault(key, value)
    try:
        listener: Listener = factory(**arguments)
    except TypeError as exc:
        missing = [name for name, parameter in accepted.items()
                   if parameter.default is inspect.Parameter.empty and name not in arguments
                   and parameter.kind is inspect.Parameter.KEYWORD_ONLY]
        if missing:
            raise PluginError(LISTENERS, kind, f"needs {' and '.join(missing)}"
                                               " (set it in the [listener] table)") from exc
        raise PluginError(LISTENERS, kind, str(exc)) from exc
    except ValueError as exc:
        raise PluginError(LISTENERS, kind, str(exc)) from exc
    return listener


def make_announcer(kind: str, options: Mapping[str, Any]) -> Any:
    """Load announcer plugin ``kind`` and instantiate it with ``options``. Raises
    :class:`PluginError` naming the plugin and the problem for bad options."""
    factory = load(ANNOUNCERS, kind)
    try:
        return factory(**dict(options))
    except (TypeError, ValueError) as exc:
        raise PluginError(ANNOUNCERS, kind, str(exc)) from exc


def check_plugins(config: Any) -> list[tuple[str, str]]:
    """Build every selector and transport a balancer or agent config names, with its
    options, and return the problems as ``(path, message)`` pairs (empty: all fine)."""
    problems: list[tuple[str, str]] = []

    def attempt(path: str, build: Any, *args: Any) -> None:
        try:
            build(*args)
        except PluginError as exc:
            problems.append((path, str(exc)))

    fastpath = getattr(getattr(config, "fastpath", None), "mode", "off")
    for index, vip in enumerate(getattr(config, "vips", ())):
        if not hasattr(vip, "selector"):
            break  # an agent's VIPs are plain addresses
        backends = {backend.name: backend.weight for backend in vip.backends}
        path = f"$.vips[{index}].selector"
        try:
            selector = build_selector(vip.selector.name, backends, vip.selector.options)
        except PluginError as exc:
            problems.append((path, str(exc)))
        else:
            if fastpath in ("tc", "xdp") and not callable(getattr(selector, "lookup_table", None)):
                problems.append((path, f"selector {vip.selector.name!r} has no lookup table, which the kernel"
                                       f" data plane (fastpath mode {fastpath!r}) needs: use maglev or"
                                       " rendezvous, or fastpath mode 'auto' (its VIP then stays in Python)"))
        for number, backend in enumerate(vip.backends):
            attempt(f"$.vips[{index}].backends[{number}].transport", make_transport,
                    backend.transport.name, backend.transport.options)
    if hasattr(config, "transport"):
        attempt("$.transport", make_transport, config.transport.name, config.transport.options)
    announce = getattr(config, "announce", None)
    if announce is not None:
        attempt("$.announce", make_announcer, announce.kind, announce.options)
    listener = getattr(config, "listener", None)
    if listener is not None:
        try:
            make_listener(listener.kind, interface=listener.interface, device=listener.device,
                          options=listener.options)
        except PluginError as exc:
            problems.append(("$.listener", str(exc)))
    return problems
