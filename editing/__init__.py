"""Editing facts: requests, the methods (ROME, MEMIT, fine-tuning) behind one registry, the
``Edit`` value, and (in :mod:`editing.evaluation`) CounterFact / zsRE evaluation.

``make_edit(model, requests, method)`` is the entry point; methods live one per module in
:mod:`editing.methods`.
"""

from editing import _moved  # noqa: F401  (first: old module names keep importing, with a warning)
from editing.api import make_edit, resolve_hparams
from editing.edits.edit import Edit, LayerDelta
from editing.methods import METHODS, get_method, method_names
from editing.requests import EditRequest, load_requests

__all__ = [
    "METHODS",
    "Edit",
    "EditRequest",
    "LayerDelta",
    "get_method",
    "load_requests",
    "make_edit",
    "method_names",
    "resolve_hparams",
]
