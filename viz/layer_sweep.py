"""The layer-sweep figure (Hase et al. 2023): how well ROME edits at each layer, beside how
strongly causal tracing localises the fact there.

Left panel: the mean edit scores per layer (efficacy, paraphrase and neighbourhood success,
the rewrite score) with the mean tracing effect on a second axis. Right panel: every (fact,
layer) as a point, rewrite score against tracing effect, coloured by layer: if localisation
told where to edit, the points would rise to the right. Inputs are the plain values
:mod:`editing.evaluation.sweep_analysis` computes and the sweep's rows; nothing runs a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tracing.errors import InvalidInput
from viz.style import kind_style

#: Edit scores drawn per layer: (row key, legend label, line colour).
SCORE_LINES: tuple[tuple[str, str, str], ...] = (
    ("post_efficacy_success", "efficacy success", "#1f77b4"),
    ("post_paraphrase_success", "paraphrase success", "#ff7f0e"),
    ("post_neighborhood_success", "neighbourhood success", "#7f7f7f"),
    ("rewrite_score", "rewrite score", "#111111"),
)
#: Tracing effects drawn on the second axis: (row key, legend label, kind for the colour).
EFFECT_LINES: tuple[tuple[str, str, str], ...] = (
    ("trace_mlp", "tracing effect, MLP", "mlp"),
    ("trace_resid", "tracing effect, hidden state", "resid"),
)


def _series(
    means: Mapping[int, Mapping[str, float | None]], key: str
) -> tuple[np.ndarray, np.ndarray]:
    pts = [(L, v[key]) for L, v in sorted(means.items()) if v.get(key) is not None]
    x = np.asarray([p[0] for p in pts], dtype=np.float64)
    y = np.asarray([p[1] for p in pts], dtype=np.float64)
    return x, y


def plot_layer_sweep(
    layer_means: Mapping[int | str, Mapping[str, float | None]],
    rows: Sequence[Mapping[str, Any]],
    *,
    score: str = "rewrite_score",
    effect: str = "trace_mlp",
    title: str | None = None,
) -> Figure:
    """Two panels: per-layer mean edit scores with the mean tracing effects on a twin axis,
    and a scatter of ``score`` against ``effect`` over (fact, layer) rows coloured by layer.
    ``layer_means``: by layer (int or its string, as JSON keeps it), the means
    (:func:`editing.evaluation.sweep_analysis.layer_means`)."""
    means = {int(k): v for k, v in layer_means.items()}
    if not means:
        raise InvalidInput("no layers to draw")
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    for key, label, color in SCORE_LINES:
        x, y = _series(means, key)
        if len(x):
            left.plot(x, y, marker="o", markersize=3, color=color, label=label)
    left.set_xlabel("edited layer", fontsize=9)
    left.set_ylabel("mean over facts", fontsize=9)
    left.axhline(0.0, color="0.7", linewidth=0.8, zorder=0)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    twin = left.twinx()
    for key, label, kind in EFFECT_LINES:
        x, y = _series(means, key)
        if len(x):
            twin.plot(
                x, y, linestyle="--", marker="s", markersize=3, color=kind_style(kind).line,
                label=label,
            )  # fmt: skip
    twin.set_ylabel("mean tracing effect (Δp)", fontsize=9)
    handles = left.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    left.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, frameon=False)
    left.set_title("Edit success and tracing effect by layer", fontsize=10)

    pts = [
        (int(r["layer"]), float(r[effect]), float(r[score]))
        for r in rows
        if "failed" not in r and r.get(effect) is not None and r.get(score) is not None
    ]
    layers = sorted(means)
    index = {L: i for i, L in enumerate(layers)}  # one colour per swept layer, gaps skipped
    cmap = colormaps["viridis"].resampled(len(layers))
    norm = BoundaryNorm(np.arange(len(layers) + 1) - 0.5, cmap.N)
    pts = [p for p in pts if p[0] in index]
    if pts:
        arr = np.asarray(pts, dtype=np.float64)
        colour = [index[p[0]] for p in pts]
        sc = right.scatter(arr[:, 1], arr[:, 2], c=colour, cmap=cmap, norm=norm, s=14)
        bar = fig.colorbar(sc, ax=right, ticks=np.arange(len(layers)))
        bar.ax.set_yticklabels([str(L) for L in layers], fontsize=8)
        bar.set_label("edited layer", fontsize=9)
    right.set_xlabel(f"tracing effect ({effect})", fontsize=9)
    right.set_ylabel(score.replace("_", " "), fontsize=9)
    right.set_title(f"{len(pts)} edits: {score} vs tracing effect", fontsize=10)
    right.grid(alpha=0.3)
    for ax in (left, right, twin):
        ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
