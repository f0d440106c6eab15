"""The MEMIT paper's scaling curve: metrics against the number of edits made at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from editing.evaluation.config import EvalConfig
from editing.evaluation.results import scaling_point
from editing.evaluation.runner import EditFn, evaluate
from tracing.io import write_json_atomic
from tracing.models import HookedModel


def scaling(
    model: HookedModel,
    methods: Sequence[str] = ("memit", "ft-l"),
    sizes: Sequence[int] = (1, 10, 100),
    config: EvalConfig | None = None,
    *,
    edit_fn: EditFn | None = None,
    **settings: Any,
) -> list[dict]:
    """Metric against number of edits (the MEMIT paper's scaling curve): for each method and
    size N, edit N cases at once (``joint``; ROME: N sequential edits combined) and score
    them. Returns plain points for :func:`viz.plots.plot_scaling` (one ``"unedited"`` point
    per size too) and writes them to ``out_dir/scaling/points.json``. ``config`` and
    ``settings`` give the other :class:`EvalConfig` fields (default: no fluency); ``edit_fn`` as
    in :func:`~editing.evaluation.runner.evaluate`."""
    base = replace(config or EvalConfig(generation=None), **settings)
    points: list[dict] = []
    root = Path(base.out_dir) / "scaling"
    for size in sizes:
        s = None
        for method in methods:
            s = evaluate(
                model,
                replace(
                    base,
                    method=method,
                    n=size,
                    batch=size,
                    joint=True,
                    out_dir=root,
                    name=f"{method}_x{size}",
                ),
                edit_fn=edit_fn,
            )
            points.append(scaling_point(s))
        if s is not None:
            points.append(scaling_point(s, edited=False))
    write_json_atomic(root / "points.json", points)
    return points
