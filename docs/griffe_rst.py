"""A griffe extension for the API reference: Caplance's docstrings use a little reST
(``:class:`~caplance.config.BalancerConfig```, a ``::`` before a literal block), which
Markdown would print as is. This turns the roles into code spans and ``::`` into ``:``.
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


class ReSTRoles(griffe.Extension):
    """Rewrite every docstring as it is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = clean(obj.docstring.value)
