"""A griffe extension for the API reference: attrs classes shown as what they are.

Griffe reads ``name: Port = attrs.field(validator=..., metadata=_doc("..."))`` as a class
attribute whose value is that call, with no docstring, and finds no ``__init__`` -- so
mkdocstrings showed each config class as one line. For every class ``attrs.has`` accepts
(imported: the docs build can import Caplance), this

* gives each field the ``doc`` text of its metadata as its docstring (``_doc(...)`` in
  :mod:`caplance.config`), unless the source gave it one;
* shows the field's default as its value (a factory's product; none when it is required),
  not the ``attrs.field(...)`` call, and labels it an instance attribute;
* adds the ``__init__`` attrs generates (keyword-only fields, aliases, defaults), so the
  class's signature (``merge_init_into_class``) lists its parameters.

A class that cannot be imported is left as griffe found it.
"""

from __future__ import annotations

import ast
import enum
import importlib
from typing import Any

import attrs
import griffe


def _runtime(cls: griffe.Class) -> type | None:
    """The live class for ``cls``, when it is a top-level class of an importable module."""
    if not isinstance(cls.parent, griffe.Module):
        return None
    try:
        found = getattr(importlib.import_module(cls.parent.path), cls.name, None)
    except Exception:  # noqa: BLE001 - a module the build cannot import keeps griffe's view
        return None
    return found if isinstance(found, type) and attrs.has(found) else None


def _source(value: Any) -> str | None:
    """``value`` as Python source: an attrs instance as a call naming only the fields that
    differ from their defaults (``PluginConfig(name='maglev')``), an enum member by name,
    anything else by ``repr`` -- or None when that is not valid Python (``<object at ...>``)."""
    if isinstance(value, enum.Enum) and value.name is not None:
        return f"{type(value).__name__}.{value.name}"
    if attrs.has(type(value)):
        arguments = []
        for field in attrs.fields(type(value)):
            current = getattr(value, field.name)
            default: Any = field.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                if default.takes_self:
                    return None
                default = default.factory()
            if field.init and current != default:
                inner = _source(current)
                if inner is None:
                    return None
                arguments.append(f"{field.alias or field.name}={inner}")
        return f"{type(value).__name__}({', '.join(arguments)})"
    text = repr(value)
    try:
        ast.parse(text, mode="eval")
    except SyntaxError:
        return None
    return text


def _default(field: attrs.Attribute[Any], written: str | griffe.Expr | None) -> str | griffe.Expr | None:
    """The field's default as Python source, or None when it is required. ``written`` (the
    ``default=`` argument as the source has it) stands in when the value has no readable form."""
    default: Any = field.default
    if default is attrs.NOTHING:
        return None
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        if default.takes_self:
            return "..."
        default = default.factory()
    found = _source(default)
    return found if found is not None else (written or "...")


def _written_default(attribute: griffe.Attribute | None) -> str | griffe.Expr | None:
    """The ``default=`` argument of ``attrs.field(...)``, or a plain ``= value``."""
    if attribute is None:
        return None
    value = attribute.value
    if isinstance(value, griffe.ExprCall):
        for argument in value.arguments:
            if isinstance(argument, griffe.ExprKeyword) and argument.name == "default":
                return argument.value
        return None
    return value


class AttrsFields(griffe.Extension):
    """Fields, defaults and ``__init__`` for attrs classes."""

    def on_class(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        runtime = _runtime(cls)
        if runtime is None or "__init__" in cls.members:
            return
        parameters = [griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)]
        for field in attrs.fields(runtime):
            member = cls.members.get(field.name)
            attribute = member if isinstance(member, griffe.Attribute) else None
            default = _default(field, _written_default(attribute))
            doc = field.metadata.get("doc")
            if attribute is not None:
                if attribute.docstring is None and doc:
                    attribute.docstring = griffe.Docstring(doc, parent=attribute)
                attribute.value = default
                attribute.labels.discard("class-attribute")
                attribute.labels.add("instance-attribute")
            if not field.init:
                continue
            kind = (griffe.ParameterKind.keyword_only if field.kw_only
                    else griffe.ParameterKind.positional_or_keyword)
            parameters.append(griffe.Parameter(
                field.alias or field.name, kind=kind, default=default,
                annotation=attribute.annotation if attribute is not None else None,
                docstring=attribute.docstring if attribute is not None else None))
        # Python's order: positional parameters first, keyword-only after them.
        parameters.sort(key=lambda parameter: parameter.kind is griffe.ParameterKind.keyword_only)
        init = griffe.Function("__init__", lineno=cls.lineno, endlineno=cls.lineno, parent=cls,
                               parameters=griffe.Parameters(*parameters), returns="None")
        cls.set_member("__init__", init)
