"""MkDocs hooks: pages generated from the code at build time, so they cannot drift from it.

A page asks for a generated block with an HTML comment on a line of its own:

* ``<!-- generated: config balancer -->`` / ``<!-- generated: config agent -->`` -- every
  key of :class:`~caplance.config.BalancerConfig` / :class:`~caplance.config.AgentConfig`
  and the tables below them, from ``attrs.fields``: key, type, default and the ``doc``
  metadata each field carries (``secret`` is shown as no file key: the loader refuses it in a
  file), in a ``<div class="file-reference">`` the stylesheet keeps from breaking keys;
* ``<!-- generated: env balancer -->`` / ``<!-- generated: env agent -->`` -- the
  ``CAPLANCE_*`` variable for every key;
* ``<!-- generated: cli -->`` -- the help of every ``caplance`` command, from
  :func:`caplance.cli.build_parser`.

Figures come from ``docs/figures.toml``, which the bench scripts write (``--record``): in a
page, ``[[figure forward.tc_delivered .2f]]`` is that figure's value (formatted with the
optional format spec) and ``[[measured forward.tc_delivered]]`` when, where and by which
command it was measured. So a figure is quoted the same way on every page.

An unknown marker or figure fails the build. The hooks also put Mermaid's browser build, installed by
``make setup`` from the npm registry into ``build/npm``, into the site (``MERMAID_SCRIPT``),
so diagrams render with no network. ``tests/unit/test_docs.py`` imports this module too.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import tomllib
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from caplance import config as cfg
from caplance.cli import build_parser

if TYPE_CHECKING:  # the tests import this module without the docs extra
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files

#: Where ``make setup`` installs Mermaid from the npm registry (``npm install --prefix``).
NPM_DIR = Path(__file__).resolve().parents[1] / "build" / "npm"
#: Where the site gets Mermaid's browser build (it defines ``window.mermaid``, so Material
#: does not fetch one from unpkg.com); mkdocs.yml's ``extra_javascript`` loads it.
MERMAID_SCRIPT = "javascripts/mermaid.min.js"

MARKER = re.compile(r"^([ \t]*)<!-- generated: ([a-z]+)(?: ([a-z]+))? -->$", re.MULTILINE)
ROOTS: dict[str, type] = {"balancer": cfg.BalancerConfig, "agent": cfg.AgentConfig}
_NONE = type(None)
_LITERAL: Any = typing.Literal

#: How a checked value type reads in the reference.
_NAMED_TYPES: dict[Any, str] = {
    cfg.Port: "port (int 1-65535)",
    cfg.Seconds: "seconds (number > 0)",
    cfg.Weight: "weight (int 0-65535)",
    cfg.Count: "count (int >= 1)",
    cfg.Name: "name (1-64 printable characters)",
    cfg.IfName: "interface name (1-15 characters)",
    cfg.IPAddress: "IP address (v4 or v6)",
    cfg.IPNetwork: 'IP network ("10.0.0.0/8")',
    cfg.Endpoint: '"address:port" ("[v6]:port")',
    cfg.WorkerCount: 'int 1-64, or "auto" (one per CPU)',
    cfg.Secret: "secret",
    Mapping[str, Any]: "table (any keys)",
    str: "string",
    bool: "true / false",
    int: "int",
    float: "number",
}


# -- walking the config classes ------------------------------------------------------------


def _optional(kind: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(kind, False)``."""
    args = typing.get_args(kind)
    if _NONE in args:
        rest = [arg for arg in args if arg is not _NONE]
        if len(rest) == 1:
            return rest[0], True
    return kind, False


def _is_table(kind: Any) -> bool:
    return attrs.has(kind) and kind not in (cfg.Endpoint, cfg.Secret)


def _is_list(kind: Any) -> bool:
    origin: Any = typing.get_origin(kind)
    return origin is tuple


@attrs.frozen
class Row:
    """One key of one config table."""

    path: tuple[str, ...]  # TOML path; "[]" marks a list item
    name: str
    kind: Any
    default: Any  # attrs.NOTHING: required
    doc: str


def rows(cls: type, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], type, list[Row]]]:
    """Each table below ``cls`` (``cls`` first) as ``(TOML path, class, its rows)``,
    depth first in field order."""
    hints = typing.get_type_hints(cls)
    table = [Row(path, field.name, hints[field.name], field.default, field.metadata.get("doc", ""))
             for field in attrs.fields(cls)]
    yield path, cls, table
    for row in table:
        inner, _ = _optional(row.kind)
        if _is_list(inner) and _is_table(typing.get_args(inner)[0]):
            yield from rows(typing.get_args(inner)[0], (*path, row.name, "[]"))
        elif _is_table(inner):
            yield from rows(inner, (*path, row.name))


def type_text(kind: Any, root: str = "") -> str:
    """A reader's name for a field's type; tables link to their section of ``root``'s
    reference."""
    inner, optional = _optional(kind)
    if optional:
        return f"{type_text(inner, root)}, optional"
    if kind in _NAMED_TYPES:
        return _NAMED_TYPES[kind]
    if typing.get_origin(kind) is _LITERAL:
        return " / ".join(json.dumps(choice) for choice in typing.get_args(kind))
    if _is_list(kind):
        element = typing.get_args(kind)[0]
        if _is_table(element):
            return f"list of {anchor_link(element, root)} tables"
        return f"list of {type_text(element, root)}"
    if _is_table(kind):
        return f"{anchor_link(kind, root)} table"
    return getattr(kind, "__name__", str(kind))


def anchor(cls: type, root: str) -> str:
    """The id of ``cls``'s section in ``root``'s reference: ``balancer-vipconfig``."""
    return f"{root}-{cls.__name__.lower()}"


def anchor_link(cls: type, root: str) -> str:
    return f"[{cls.__name__}](#{anchor(cls, root)})" if root else cls.__name__


def default_text(row: Row) -> str:
    if row.default is attrs.NOTHING:
        return "**required**"
    default = row.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    if default is None:
        return "none"
    data = cfg.converter.unstructure(default)
    if isinstance(data, tuple):
        data = list(data)
    if isinstance(data, dict):
        data = {key: value for key, value in data.items() if value is not None}
    return f"`{_toml_value(data)}`"


def _toml_value(value: Any) -> str:
    """A TOML inline value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + " }"
    return json.dumps(str(value))


def section_title(path: tuple[str, ...]) -> str:
    if not path:
        return "top level"
    out = ""
    for part in path:
        if part == "[]":
            out += "[]"
        else:
            out += ("." if out else "") + part
    return out


def config_reference(root: str) -> str:
    """The reference tables for one kind of config file."""
    seen: dict[type, list[str]] = {}
    tables: dict[type, list[Row]] = {}
    for path, cls, table in rows(ROOTS[root]):
        seen.setdefault(cls, []).append(section_title(path))
        tables.setdefault(cls, table)
    out = []
    for cls, table in tables.items():
        where = ", ".join(f"`{place}`" if place != "top level" else "the top level" for place in seen[cls])
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        out.append(f"### {cls.__name__} {{#{anchor(cls, root)}}}\n")
        out.append(f"{doc} At {where}.\n")
        out.append("| key | type | default | meaning |")
        out.append("| --- | --- | --- | --- |")
        for row in table:
            meaning = row.doc.replace("|", "\\|")
            if _optional(row.kind)[0] is cfg.Secret:  # the loader refuses it in a file
                out.append(f"| `{row.name}` | **not a file key**: `{cfg.SECRET_ENV}` or `secret_file` | -- "
                           f"| {meaning} |")
                continue
            out.append(f"| `{row.name}` | {type_text(row.kind, root)} | {default_text(row)} | {meaning} |")
        out.append("")
    # The key column must not break a name mid-word: docs/stylesheets/extra.css styles it.
    return '<div class="file-reference" markdown>\n\n' + "\n".join(out) + "\n</div>\n"


def env_variables(root: str) -> list[tuple[str, str, str]]:
    """``(variable, TOML path, type)`` for every key of one kind of config file; ``<N>`` is a
    list item number, ``<KEY>`` a plugin option's name."""
    found = []

    def walk(cls: type, variable: str, path: str) -> None:
        hints = typing.get_type_hints(cls)
        for field in attrs.fields(cls):
            kind, _ = _optional(hints[field.name])
            name = f"{variable}{'__' if variable != cfg.ENV_PREFIX else ''}{field.name.upper()}"
            dotted = f"{path}.{field.name}" if path else field.name
            if field.name == "secret":
                found.append((cfg.SECRET_ENV, dotted, "the shared secret (read as is, never shown)"))
                continue
            if _is_list(kind) and _is_table(typing.get_args(kind)[0]):
                walk(typing.get_args(kind)[0], f"{name}__<N>", f"{dotted}[<N>]")
                continue
            if _is_table(kind):
                walk(kind, name, dotted)
                continue
            if kind == Mapping[str, Any]:
                found.append((name, dotted, "TOML inline table"))
                found.append((f"{name}__<KEY>", f"{dotted}.<key>", "one option (TOML value)"))
                continue
            found.append((name, dotted, type_text(kind)))
            if _is_list(kind):
                element = typing.get_args(kind)[0]
                found.append((f"{name}__<N>", f"{dotted}[<N>]", type_text(element)))

    walk(ROOTS[root], cfg.ENV_PREFIX, "")
    return found


def env_table(root: str) -> str:
    out = ["| variable | key | value |", "| --- | --- | --- |"]
    for variable, path, kind in env_variables(root):
        out.append(f"| `{variable}` | `{path}` | {kind} |")
    return "\n".join(out) + "\n"


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def cli_reference() -> str:
    """``--help`` of ``caplance`` and every subcommand, at 100 columns."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        out: list[str] = []

        def walk(parser: argparse.ArgumentParser, depth: int) -> None:
            out.append(f"{'#' * min(depth, 4)} `{parser.prog}`\n")
            out.append("```text\n" + parser.format_help().rstrip() + "\n```\n")
            for _, sub in _subcommands(parser):
                walk(sub, depth + 1)

        walk(build_parser(), 2)
        return "\n".join(out)
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def generate(kind: str, argument: str | None) -> str:
    if kind == "config" and argument in ROOTS:
        return config_reference(argument)
    if kind == "env" and argument in ROOTS:
        return env_table(argument)
    if kind == "cli" and argument is None:
        return cli_reference()
    raise ValueError(f"unknown generated block: {kind} {argument or ''}".rstrip())


def expand(markdown: str, figures: Mapping[str, Any] | None = None) -> str:
    """Replace every marker in ``markdown`` with its generated block, indented like the
    marker (so a block can sit inside an admonition), and every figure reference with its
    figure from ``figures`` (default: :data:`FIGURES`)."""
    def replace(match: re.Match[str]) -> str:
        indent = match.group(1)
        block = generate(match.group(2), match.group(3))
        return "\n".join(indent + line if line else line for line in block.splitlines())

    return quote_figures(MARKER.sub(replace, markdown), load_figures() if figures is None else figures)


# -- figures from the bench output ---------------------------------------------------------

#: What the bench scripts measured (``--record docs/figures.toml``, see ``bench/record.py``).
FIGURES = Path(__file__).resolve().parent / "figures.toml"
#: ``[[figure forward.tc_delivered .2f]]`` (the value, formatted), ``[[measured forward.tc_delivered]]``
#: (when, where and by which command)
FIGURE = re.compile(r"\[\[(figure|measured) ([a-z0-9_]+)\.([a-z0-9_]+)(?: ([^\]]+))?\]\]")


def load_figures(path: Path = FIGURES) -> dict[str, Any]:
    """The recorded figures: section -> name -> {value, command, measured}."""
    return tomllib.loads(path.read_text())


def quoted_figures(markdown: str) -> set[tuple[str, str]]:
    """The (section, name) of every figure ``markdown`` quotes."""
    return {(section, name) for _, section, name, _ in FIGURE.findall(markdown)}


def figures_quoted_by_pages(docs: Path = FIGURES.parent) -> dict[str, set[str]]:
    """Every figure the pages under ``docs`` quote: section -> names."""
    quoted: dict[str, set[str]] = {}
    for page in docs.rglob("*.md"):
        for section, name in quoted_figures(page.read_text()):
            quoted.setdefault(section, set()).add(name)
    return quoted


def quote_figures(markdown: str, figures: Mapping[str, Any]) -> str:
    """Every ``[[figure ...]]`` and ``[[measured ...]]`` in ``markdown`` replaced; an unknown
    figure or a bad format is a :class:`ValueError` (the build fails)."""
    def replace(match: re.Match[str]) -> str:
        what, section, name, spec = match.groups()
        figure = figures.get(section, {}).get(name)
        if figure is None:
            raise ValueError(f"unknown figure {section}.{name}: not in {FIGURES.name} "
                             "(run the bench script with --record)")
        if what == "measured":
            return f"{figure['measured']}: `{figure['command']}`"
        value = figure["value"]
        return format(value, spec) if spec else f"{value:g}"

    return FIGURE.sub(replace, markdown)


# -- the MkDocs hook -----------------------------------------------------------------------


def on_page_markdown(markdown: str, **_: Any) -> str:
    return expand(markdown)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Mermaid's browser build into the site, where ``extra_javascript`` loads it."""
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    source = NPM_DIR / "node_modules" / "mermaid" / "dist" / "mermaid.min.js"
    if not source.is_file():
        raise PluginError(f"{source} is missing: `make npm` (part of `make setup`) installs "
                          "Mermaid from the npm registry for the site's diagrams")
    files.append(File.generated(config, MERMAID_SCRIPT, abs_src_path=str(source)))
    return files
