"""The editing methods, one module each, and the registry every front end reads.

``METHODS`` maps a method's name to its :class:`~editing.methods.registry.EditMethod`. A new
method is one module here plus one line below (and one default hyper-parameter file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from editing.hparams import Hparams
from editing.methods import alphaedit, finetune, memit, rome, ultraedit
from editing.methods.registry import EditInputs, EditMethod, lookup

METHODS: dict[str, EditMethod] = {
    m.name: m
    for m in (
        rome.METHOD,
        memit.METHOD,
        alphaedit.METHOD,
        ultraedit.METHOD,
        *finetune.METHODS,
    )
}


def get_method(name: str) -> EditMethod:
    """The registered method called ``name`` (case-insensitive); an
    :class:`~tracing.errors.InvalidInput` lists the known names otherwise."""
    return lookup(METHODS, name)


def method_names() -> list[str]:
    """Names of every registered method, in registry order."""
    return list(METHODS)


def load_hparams(
    method: str, model_name: str | None = None, path: str | Path | None = None, **overrides: Any
) -> Hparams:
    """Hyper-parameters of ``method`` from the file ``path``, else the shipped defaults for
    ``model_name``; ``overrides`` replace fields (see :func:`editing.hparams.read_hparams`)."""
    return get_method(method).load_hparams(model_name, path, **overrides)


__all__ = ["METHODS", "EditInputs", "EditMethod", "get_method", "load_hparams", "method_names"]
