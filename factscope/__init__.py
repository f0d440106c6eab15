"""factscope: locate facts in transformer language models and rewrite them.

The everyday API, in one namespace (``import factscope as fs``):

* models: :func:`load_model`, :func:`top_k`;
* tracing: :func:`trace_fact`, :func:`trace_dataset`, :func:`average_effects`,
  :func:`select_layers`, :class:`TraceResult`;
* editing: :class:`EditRequest`, :func:`load_requests`, :func:`make_edit`, :class:`Edit`,
  :data:`METHODS`;
* evaluation: :func:`evaluate`, :class:`EvalConfig`, :func:`scaling`;
* pictures: :func:`plot_trace`, :func:`plot_before_after`, :func:`trace_figure`,
  :func:`plot_average_effects`, :func:`plot_average_heatmap`, :func:`plot_layer_selection`,
  :func:`plot_edit_bars`, :func:`plot_scaling`, :func:`plot_severed`, :func:`save_figure`;
* errors: :class:`FactscopeError` and its kinds.

Names are imported on first use, so ``factscope --help`` stays fast. The packages behind
them are ``tracing`` (hooked models, traces), ``editing`` (methods, edits, evaluation) and
``viz`` (figures); ``python -m factscope`` runs the command line.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:  # the installed distribution's version (pyproject.toml), never a second copy of it
    __version__ = version("factscope")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_NAMES: dict[str, str] = {
    "load_model": "tracing.models",
    "top_k": "tracing.forward",
    "trace_fact": "tracing.trace",
    "TraceResult": "tracing.results",
    "trace_dataset": "tracing.localization",
    "average_effects": "tracing.localization",
    "select_layers": "tracing.localization",
    "parse_layers": "tracing.layers",
    "EditRequest": "editing.requests.request",
    "load_requests": "editing.requests.request",
    "make_edit": "editing.api",
    "Edit": "editing.edits.edit",
    "METHODS": "editing.methods",
    "evaluate": "editing.evaluation.runner",
    "EvalConfig": "editing.evaluation.config",
    "scaling": "editing.evaluation.scaling",
    "plot_trace": "viz.heatmap",
    "plot_before_after": "viz.heatmap",
    "plot_average_heatmap": "viz.heatmap",
    "save_figure": "viz.heatmap",
    "trace_figure": "viz.interactive",
    "plot_average_effects": "viz.plots",
    "plot_layer_selection": "viz.plots",
    "plot_edit_bars": "viz.plots",
    "plot_scaling": "viz.plots",
    "plot_severed": "viz.severed",
    "FactscopeError": "tracing.errors",
    "InvalidInput": "tracing.errors",
    "InvalidRequest": "tracing.errors",
    "InvalidHparams": "tracing.errors",
    "ModelLoadError": "tracing.errors",
    "EditFailed": "tracing.errors",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'factscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(_NAMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])
