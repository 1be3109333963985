"""A griffe extension for the API reference: Caplance's docstrings use a little reST
(``:class:`~caplance.config.BalancerConfig```, a ``::`` before a literal block), which
Markdown would print as is. This turns the roles into code spans and ``::`` into ``:``.

It also reads Sphinx's attribute comments, which griffe ignores: ``#:`` lines just above an
attribute (``self.control = ...`` in ``__init__``, a module constant) are its docstring when
it has none. An attribute assigned in a method (``self.control = ControlPlane(...)``) shows
no value -- that is code, not a default -- but, when it is unannotated and the value is a
call of a class, that class as its type (``control: ControlPlane``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :class:`~pkg.mod.Name` -> `Name`;  :func:`pkg.f` -> `pkg.f`;  :data:`TEXT <target>` -> `TEXT`
_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj|const):`(~?)([^`<]+?)(?:\s*<[^>]+>)?`")
_LITERAL_BLOCK = re.compile(r"(\S)::$", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def clean(text: str) -> str:
    """The Markdown reading of a docstring written with those reST bits."""
    return _LITERAL_BLOCK.sub(r"\1:", _ROLE.sub(_role, text))


def comment_doc(lines: list[str], lineno: int) -> str | None:
    """The ``#:`` comment block right above line ``lineno`` (1-based) of ``lines``, or None."""
    found: list[str] = []
    index = lineno - 2
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        found.append(lines[index].lstrip()[2:].strip())
        index -= 1
    return "\n".join(reversed(found)) or None


def _attribute_comment(obj: griffe.Object) -> str | None:
    if not isinstance(obj, griffe.Attribute) or obj.lineno is None:
        return None
    try:
        lines = obj.lines_collection[obj.filepath]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    return comment_doc(lines, obj.lineno)


def _in_method(obj: griffe.Attribute) -> bool:
    parent = obj.parent
    if not isinstance(parent, griffe.Class) or obj.lineno is None:
        return False
    return any(isinstance(member, griffe.Function) and member.lineno is not None
               and member.endlineno is not None and member.lineno < obj.lineno <= member.endlineno
               for member in parent.members.values() if not member.is_alias)


def _instance_value_to_type(obj: griffe.Attribute) -> None:
    value = obj.value
    if obj.annotation is None and isinstance(value, griffe.ExprCall):
        try:
            called = obj.modules_collection.get_member(value.function.canonical_path)
        except (KeyError, ValueError, AttributeError):
            called = None
        if called is not None and called.is_class:
            obj.annotation = value.function
    obj.value = None


class ReSTRoles(griffe.Extension):
    """Rewrite every docstring as it is loaded; give ``#:``-commented attributes theirs."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None and (comment := _attribute_comment(obj)) is not None:
            obj.docstring = griffe.Docstring(comment, parent=obj)
        if isinstance(obj, griffe.Attribute) and _in_method(obj):
            _instance_value_to_type(obj)
        if obj.docstring is not None:
            obj.docstring.value = clean(obj.docstring.value)
