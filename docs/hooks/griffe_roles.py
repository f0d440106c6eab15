"""A griffe extension for the docs build: the reStructuredText roles factscope's docstrings use
(``:func:`~tracing.trace.trace_fact```, ``:class:`Edit```, ...) become Markdown code spans
(``trace_fact``, ``Edit``): the text the reader sees in the source, without the role."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const|ref):`(~?)([^`]+)`")


def plain(text: str) -> str:
    """``text`` with every role replaced by a code span of its target (``~`` keeps the last
    dotted part, as Sphinx shows it)."""

    def code(match: re.Match[str]) -> str:
        target = match.group(2)
        return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"

    return ROLE.sub(code, text)


class PlainRoles(griffe.Extension):
    """Rewrites every object's docstring with :func:`plain` as griffe loads it."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s own docstring (its members get their own call)."""
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
