"""Reading a configuration: TOML files, ``CAPLANCE_*`` environment variables, the secret.

Pure apart from reading the files it is given (no sockets, no trio). See
:mod:`caplance.config` for the classes and the mapping of variables to keys.
"""

from __future__ import annotations

import functools
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from caplance.config import (
    _LITERAL,
    ENV_PREFIX,
    SECRET_ENV,
    AgentConfig,
    BalancerConfig,
    Endpoint,
    IPAddress,
    IPNetwork,
    Secret,
    _is_list,
    _is_table,
    converter,
    structure,
)
from caplance.configtypes import _got
from caplance.errors import ConfigError
from caplance.security import require_control_security

__all__ = ["apply_environment", "load", "load_agent_config", "load_balancer_config", "read_toml",
           "resolve_secret"]

T = TypeVar("T")


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_FACTORY: Any = attrs.Factory(dict).__class__
#: The schema below a plugin's ``options``: any keys, any values.
_FREE: Any = object()
_NONE = type(None)


def _optional_inner(kind: Any) -> Any:
    """``X`` for ``X | None``; anything else unchanged."""
    args = typing.get_args(kind)
    if _NONE in args:
        rest = [arg for arg in args if arg is not _NONE]
        if len(rest) == 1:
            return rest[0]
    return kind


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_text(kind: Any) -> bool:
    """Whether a value of ``kind`` is written as a TOML string."""
    kind = _optional_inner(kind)
    while hasattr(kind, "__supertype__"):  # a NewType
        kind = kind.__supertype__
    if typing.get_origin(kind) is _LITERAL:
        return all(isinstance(choice, str) for choice in typing.get_args(kind))
    return kind is str or kind is Endpoint or kind == IPAddress or kind == IPNetwork


def _schema_child(kind: Any, part: str, target: Any) -> tuple[Any, int | str]:
    """The type found at ``part`` below a value of ``kind``, and the key to use there.

    Raises ``ValueError`` when ``part`` does not fit ``kind``.
    """
    if kind is _FREE:
        return _FREE, int(part) if part.isdigit() and isinstance(target, list) else part
    kind = _optional_inner(kind)
    if _is_table(kind):
        fields = attrs.fields_dict(kind)
        if part not in fields:
            raise ValueError(f"unknown key {_got(part)} (keys here: {', '.join(fields)})")
        return _hints(kind)[part], part
    if _is_list(kind):
        if not part.isdigit():
            raise ValueError(f"a list takes item numbers (0, 1, ...), not {_got(part)}")
        return typing.get_args(kind)[0], int(part)
    if kind == Mapping[str, Any]:
        return _FREE, part
    raise ValueError("a single value has no keys or items below it")


def _new_container(parent: Any, key: int | str, kind: Any, following: str) -> Any:
    """What a missing table or list at ``key`` starts as: the field's default, as data
    (so ``CAPLANCE_TRANSPORT__OPTIONS__PORT`` keeps the default transport's name)."""
    if kind is _FREE:
        return [] if following.isdigit() else {}
    inner = _optional_inner(kind)
    empty: Any = [] if _is_list(inner) else {}
    parent_kind = _optional_inner(parent)
    if isinstance(key, int) or not _is_table(parent_kind):
        return empty
    default: Any = attrs.fields_dict(parent_kind)[key].default
    if isinstance(default, _FACTORY):
        default = default.factory()
    if default is attrs.NOTHING or default is None:
        return empty
    return json.loads(json.dumps(converter.unstructure(default)))


def apply_environment(data: Mapping[str, Any], environ: Mapping[str, str], *,
                      cls: type | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Overlay ``CAPLANCE_*`` variables on ``data`` (not changed; the result is a copy).

    Returns the new data and, per path a variable set (or a table or list item it had to
    create), the variable. ``CAPLANCE_SECRET`` is left to :func:`resolve_secret`.

    With ``cls`` (the config class ``data`` is for) each path is checked against the
    classes' fields, a table the file lacks starts from the field's default, and a value
    for a string field that is not a TOML string is the variable's text as is
    (``CAPLANCE_LISTENER__DEVICE=1234`` is the name ``"1234"``, not a number). Values are
    otherwise read as TOML values, or taken as text when they are not valid TOML.

    Raises :class:`ConfigError` listing every variable whose path does not fit: an unknown
    key, an item number past the end of a list, a key below a plain value.
    """
    result: dict[str, Any] = json.loads(json.dumps(data, default=str))  # a deep copy
    sources: dict[str, str] = {}
    problems = []
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable == SECRET_ENV:
            continue
        parts = [part.lower() for part in variable[len(ENV_PREFIX):].split("__")]
        if not all(parts):
            problems.append((f"$ (from {variable})", "empty path part: use single words joined by __"))
            continue
        target: Any = result
        kind: Any = cls if cls is not None else _FREE
        path = "$"
        created: list[str] = []
        try:
            for depth, part in enumerate(parts):
                parent = kind
                kind, key = _schema_child(kind, part, target)
                path += f"[{key}]" if isinstance(key, int) else f".{key}"
                if depth == len(parts) - 1:
                    text = environ[variable]
                    value = _parse_env_value(text)
                    _assign(target, key, text if _is_text(kind) and not isinstance(value, str) else value)
                    break
                if isinstance(key, int):
                    if not isinstance(target, list):
                        raise ValueError(f"cannot set item {key} in {_got(target)}, which is not a list")
                    if key > len(target):
                        raise ValueError(f"no list item {key}: the list has {len(target)};"
                                         f" add items in order ({len(target)} next)")
                    if key == len(target):
                        target.append(_new_container(parent, key, kind, parts[depth + 1]))
                        created.append(path)
                elif not isinstance(target, dict):
                    raise ValueError(f"cannot set {_got(key)} in {_got(target)}, which is not a table")
                elif key not in target:
                    target[key] = _new_container(parent, key, kind, parts[depth + 1])
                    created.append(path)
                target = target[key]
        except ValueError as exc:
            problems.append((f"{path} (from {variable})", str(exc)))
            continue
        sources[path] = variable
        for made in created:
            sources.setdefault(made, variable)
    if problems:
        raise ConfigError(problems)
    return result, sources


def _assign(target: Any, key: int | str, value: Any) -> None:
    if isinstance(key, int):
        if not isinstance(target, list):
            raise ValueError(f"cannot set item {key} in {_got(target)}, which is not a list")
        if key > len(target):
            raise ValueError(f"no list item {key}: the list has {len(target)};"
                             f" add items in order ({len(target)} next)")
        if key == len(target):
            target.append(value)
        else:
            target[key] = value
    elif isinstance(target, dict):
        target[key] = value
    else:
        raise ValueError(f"cannot set {_got(key)} in {_got(target)}, which is not a table")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or bad TOML is a :class:`ConfigError`."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([("$", f"cannot read {path}: {exc.strerror or exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("$", f"{path} is not valid TOML: {exc}")]) from exc


def resolve_secret(secret_file: str | None, environ: Mapping[str, str]) -> Secret | None:
    """The secret from ``CAPLANCE_SECRET`` (first) or ``secret_file``; None if neither."""
    if environ.get(SECRET_ENV):
        return Secret(environ[SECRET_ENV].encode())
    if secret_file is None:
        return None
    try:
        value = Path(secret_file).read_bytes().strip()
    except OSError as exc:
        raise ConfigError([("$.secret_file", f"cannot read {secret_file}: {exc.strerror or exc}")]) from exc
    if not value:
        raise ConfigError([("$.secret_file", f"{secret_file} is empty")])
    return Secret(value)


def load(path: str | Path, cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """Read ``path``, overlay the environment, build and validate ``cls``, attach the secret."""
    environ = os.environ if environ is None else environ
    data, sources = apply_environment(read_toml(path), environ, cls=cls)
    config = structure(data, cls, sources=sources)
    if attrs.has(cls) and "secret" in attrs.fields_dict(cls):
        secret = resolve_secret(getattr(config, "secret_file", None), environ)
        config = attrs.evolve(config, secret=secret)  # type: ignore[misc]
    if isinstance(config, (BalancerConfig, AgentConfig)):
        require_control_security(config)
    return config


def load_balancer_config(path: str | Path, environ: Mapping[str, str] | None = None) -> BalancerConfig:
    """A balancer's config from the TOML file ``path`` and ``environ`` (default
    ``os.environ``). Raises :class:`ConfigError` listing every problem."""
    return load(path, BalancerConfig, environ)


def load_agent_config(path: str | Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """An agent's config from the TOML file ``path`` and ``environ`` (default
    ``os.environ``). Raises :class:`ConfigError` listing every problem."""
    return load(path, AgentConfig, environ)
