"""Sequential editing drawn (matplotlib): each metric against the number of edits made so far,
one line per run, and one metric followed per cohort of edits (those that arrived between two
checkpoints). Inputs are plain data: checkpoint rows and per-cohort series; nothing runs a
model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from tracing.errors import InvalidInput

#: Panels of :func:`plot_sequential`: (title, where the value is in a checkpoint row).
SEQUENTIAL_PANELS = (
    ("efficacy", ("metrics", "efficacy_success")),
    ("paraphrase", ("metrics", "paraphrase_success")),
    ("neighbourhood", ("metrics", "neighborhood_success")),
    ("strict efficacy", ("metrics", "strict_efficacy")),
    ("held-out perplexity", ("perplexity",)),
    ("known-fact accuracy", ("known_accuracy",)),
)


def _row_value(row: Mapping[str, Any], path: Sequence[str]) -> float | None:
    value: Any = row
    for key in path:
        if not isinstance(value, Mapping) or value.get(key) is None:
            return None
        value = value[key]
    return float(value)


def plot_sequential(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """Each metric against the number of edits made so far, one line per run (method):
    the checkpoint rows of :func:`editing.evaluation.evaluate_sequential` by label. Panels
    with no value in any run are left out."""
    if not runs or not any(runs.values()):
        raise InvalidInput("no sequential checkpoints to plot")
    panels = [
        (title, path)
        for title, path in SEQUENTIAL_PANELS
        if any(_row_value(r, path) is not None for rows in runs.values() for r in rows)
    ]
    cols = min(3, len(panels))
    n_rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.0 * n_rows), layout="constrained")
    grid = fig.subplots(n_rows, cols, squeeze=False).ravel()
    for ax in grid[len(panels) :]:
        ax.set_visible(False)
    axes = list(grid[: len(panels)])
    for ax, (title, path) in zip(axes, panels, strict=True):
        if path[0] == "metrics" or path[0] == "known_accuracy":  # rates
            ax.set_ylim(0, 1.02)
        for j, (label, rows) in enumerate(runs.items()):
            pts = [(int(r["n_edits"]), _row_value(r, path)) for r in rows]
            pts = sorted((n, v) for n, v in pts if v is not None)
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), marker="o", markersize=3, label=label, color=f"C{j}"
                )
        ax.set_xlim(left=0)  # every panel on one axis, from the unedited model on
        ax.set_xlabel("edits so far", fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, frameon=False)
    fig.suptitle("Sequential editing", fontsize=11)
    return fig


def plot_arrival(
    metric: str, series: Mapping[str, Sequence[tuple[int, float]]], overall: str | None = "all"
) -> Figure:
    """One metric of a sequential run followed per cohort: ``series`` maps a cohort's label to
    its (edits so far, mean) points (:meth:`editing.evaluation.ArrivalTable.series`); the
    series named ``overall`` (the mean over every edit so far) is drawn dashed in black."""
    if not series or not any(series.values()):
        raise InvalidInput("no cohorts to plot")
    fig = Figure(figsize=(5.2, 3.4), layout="constrained")
    ax = fig.subplots()
    for j, (label, pts) in enumerate(series.items()):
        if not pts:
            continue
        dashed = label == overall
        ax.plot(
            *zip(*sorted(pts), strict=True),
            marker="o",
            markersize=3,
            label=label,
            color="black" if dashed else f"C{j}",
            linestyle="--" if dashed else "-",
        )
    ax.set_xlim(left=0)
    ax.set_xlabel("edits so far", fontsize=9)
    ax.set_ylabel(metric, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(f"{metric} by when the edits arrived", fontsize=10)
    return fig
