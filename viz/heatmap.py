"""Paper-style causal-trace heatmaps with matplotlib: one fact (Meng et al. 2022, Fig. 1) and
the average over many facts by token class (Fig. 2).

Everything here renders :class:`tracing.results.TraceResult` and
:class:`tracing.results.AverageEffects` values; nothing runs a model.
Figures are built without pyplot (no global figure registry), so they can be made in loops
and returned to Jupyter, which displays them once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from tracing.errors import InvalidInput
from tracing.results import TOKEN_CLASSES, AverageEffects, TraceResult
from viz.labels import (
    SHORT,
    answer_label,
    base_style,
    panel_title,
    resolve_kinds,
    score_label,
    short_prompt,
    token_labels,
    window_text,
    xlabel,
)
from viz.plots import (
    CLASS_LABELS,
    KIND_NAMES,
    average_kinds,
    average_title,
    measure_caption,
)
from viz.style import DIFF_CMAP, kind_style, root_figure

SAVE_FORMATS = (".png", ".svg", ".pdf")


def _color_limits(data: np.ndarray, floor: float, vmax: float | None) -> tuple[float, float]:
    top = float(np.nanmax(data)) if vmax is None else float(vmax)
    if not top > floor:
        top = floor + max(1e-6, abs(floor) * 1e-3)
    return floor, top


def _layer_ticks(ax: Axes, n_layers: int) -> None:
    step = 1 if n_layers <= 12 else 2 if n_layers <= 24 else 4 if n_layers <= 48 else 8
    ax.set_xticks(np.arange(0, n_layers, step))


def draw_panel(
    ax: Axes,
    data: np.ndarray,
    labels: Sequence[str],
    *,
    cmap: str,
    vmin: float,
    vmax: float,
    title: str,
    cbar_label: str,
    x_label: str,
    show_labels: bool = True,
) -> AxesImage:
    """Draw one [tokens x layers] panel into ``ax`` with its own colour bar; returns the image.

    Tokens run top to bottom, layers left to right; values outside [vmin, vmax] are clipped."""
    data = np.asarray(data, dtype=np.float64)
    n_tok, n_layers = data.shape
    im = ax.imshow(
        data,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        aspect="auto",
        interpolation="nearest",
        origin="upper",
    )
    ax.set_yticks(np.arange(n_tok))
    ax.set_yticklabels(list(labels) if show_labels else [""] * n_tok, fontsize=9)
    _layer_ticks(ax, n_layers)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel(x_label, fontsize=9)
    ax.set_title(title, fontsize=10)
    cbar = ax.figure.colorbar(im, ax=ax, fraction=0.06, pad=0.03)
    cbar.ax.tick_params(labelsize=8)
    cbar.set_label(cbar_label, fontsize=9)
    return im


def _new_figure(n_panels: int, n_tokens: int, panel_width: float = 4.0) -> tuple[Figure, list]:
    height = max(2.8, 0.3 * n_tokens + 1.6)
    width = max(5.5, panel_width * n_panels)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def plot_trace(
    result: TraceResult,
    kinds: Sequence[str] | str | None = None,
    axes: Sequence[Axes] | None = None,
    *,
    vmax: float | None = None,
    title: str | None = None,
) -> Figure:
    """A causal-trace heatmap figure, one panel per kind (resid purple, mlp green, attn red).

    Each panel shows, per (token, layer), the probability of ``result.answer`` when that state is
    restored in the corrupted run. Tokens run down the side (subject tokens marked ``*``), layers
    across; each colour bar starts at ``p_corrupted`` and ends at the panel's maximum (or
    ``vmax``). The figure title names the answer, ``p_clean`` and ``p_corrupted``. Pass ``axes``
    (one per kind) to draw into an existing figure.
    """
    chosen = resolve_kinds(result, kinds)
    if axes is None:
        fig, axes = _new_figure(len(chosen), len(result.tokens))
    else:
        axes = list(axes)
        if len(axes) != len(chosen):
            raise InvalidInput(f"got {len(axes)} axes for {len(chosen)} kinds {chosen}")
        fig = root_figure(axes[0])
    labels = token_labels(result)
    ans = answer_label(result.answer)
    floor = float(result.corrupted_score)
    for i, (ax, kind) in enumerate(zip(axes, chosen, strict=True)):
        data = np.asarray(result.scores[kind], dtype=np.float64)
        lo, hi = _color_limits(data, floor, vmax)
        win = window_text(result, kind)
        draw_panel(
            ax,
            data,
            labels,
            cmap=kind_style(base_style(kind)).cmap,
            vmin=lo,
            vmax=hi,
            title=panel_title(result, kind) + (f"\n({win})" if win else ""),
            cbar_label=score_label(result),
            x_label=xlabel(result, kind),
            show_labels=i == 0,
        )
    if title is None:
        title = (
            f"Causal trace of {ans!r}: p_clean = {result.p_clean:.3f}, "
            f"p_corrupted = {result.p_corrupted:.3f}\n{short_prompt(result.prompt)}"
        )
        title += f"\n{measure_caption(result.settings)}"
        if result.approximate:
            title += f"\n{result.exactness_caption()}"
    fig.suptitle(title, fontsize=11)
    return fig


def plot_average_heatmap(effects: AverageEffects, kinds: Sequence[str] | None = None) -> Figure:
    """The average indirect effect as heatmaps, one panel per kind: rows are the token classes
    of Meng et al. 2022, Fig. 2 (first / middle / last subject token, first subsequent token,
    further tokens, last token), columns are layers, the colour is the mean effect
    ``p_restored - p_corrupted`` over the facts that have that class.

    Classes no fact has (``counts == 0``; one-token subjects have no middle tokens) are left
    out. Each colour bar runs from ``min(0, smallest value)`` to the panel's largest value.
    The line-plot form of the same numbers is :func:`viz.plots.plot_average_effects`.
    """
    chosen = average_kinds(effects, kinds)
    rows = {
        kind: [
            c
            for c in TOKEN_CLASSES
            if c in effects.effects[kind] and effects.counts.get(kind, {}).get(c, 0) > 0
        ]
        for kind in chosen
    }
    empty = [kind for kind, classes in rows.items() if not classes]
    if empty:
        raise InvalidInput(f"no facts contributed to any token class of {empty}")
    same_rows = all(r == rows[chosen[0]] for r in rows.values())
    fig, axes = _new_figure(len(chosen), max(len(r) for r in rows.values()), panel_width=4.6)
    for i, (ax, kind) in enumerate(zip(axes, chosen, strict=True)):
        classes = rows[kind]
        data = np.stack([np.asarray(effects.effects[kind][c], np.float64) for c in classes])
        counts = effects.counts[kind]
        lo, hi = _color_limits(data, min(0.0, float(np.nanmin(data))), None)
        window = (effects.settings.get("window") or {}).get(kind)
        draw_panel(
            ax,
            data,
            [f"{CLASS_LABELS.get(c, c)} ({counts[c]})" for c in classes],
            cmap=kind_style(base_style(kind)).cmap,
            vmin=lo,
            vmax=hi,
            title=f"Average indirect effect of {KIND_NAMES.get(kind, kind)}",
            cbar_label="average indirect effect (Δp)",
            x_label="layer" + (f" (window {window})" if window and window > 1 else ""),
            show_labels=i == 0 or not same_rows,
        )
    fig.suptitle(average_title(effects), fontsize=11)
    return fig


def check_comparable(before: TraceResult, after: TraceResult, kind: str) -> None:
    """Raise ``ValueError`` unless the two traces are of the same tokens, have the same layer
    count and both hold ``kind`` (so a cell-by-cell difference means something)."""
    for name, res in (("before", before), ("after", after)):
        if kind not in res.scores:
            raise InvalidInput(f"the {name} trace holds no {kind!r} scores ({sorted(res.scores)})")
    if list(before.tokens) != list(after.tokens):
        raise InvalidInput(
            "before and after traces are of different prompts/tokens: "
            f"{list(before.tokens)!r} vs {list(after.tokens)!r}"
        )
    b, a = np.shape(before.scores[kind]), np.shape(after.scores[kind])
    if b != a:
        raise InvalidInput(f"before and after {kind!r} scores differ in shape (layers): {b} vs {a}")


def difference(before: TraceResult, after: TraceResult, kind: str = "mlp") -> np.ndarray:
    """``after.scores[kind] - before.scores[kind]`` (checked with :func:`check_comparable`)."""
    check_comparable(before, after, kind)
    return np.asarray(after.scores[kind], np.float64) - np.asarray(before.scores[kind], np.float64)


def plot_before_after(
    before: TraceResult,
    after: TraceResult,
    kind: str = "mlp",
    *,
    title: str | None = None,
) -> Figure:
    """The same prompt traced before and after an edit, side by side, plus a difference panel.

    Panels: before, after (each in the kind's colours, floor at its own ``p_corrupted``, its own
    answer in the title: the answers may differ after an edit) and ``after - before`` on a
    diverging colour map centred on 0. Raises ``ValueError`` when the tokens, layer counts or
    kinds do not match.
    """
    diff = difference(before, after, kind)
    labels = token_labels(before)
    fig, axes = _new_figure(3, len(before.tokens))
    for i, (ax, res, name) in enumerate(
        zip(axes[:2], (before, after), ("Before edit", "After edit"), strict=True)
    ):
        data = np.asarray(res.scores[kind], dtype=np.float64)
        lo, hi = _color_limits(data, float(res.p_corrupted), None)
        ans = answer_label(res.answer)
        draw_panel(
            ax,
            data,
            labels,
            cmap=kind_style(base_style(kind)).cmap,
            vmin=lo,
            vmax=hi,
            title=(
                f"{name}: restoring {SHORT.get(kind, kind)}, p({ans})\n"
                f"p_clean {res.p_clean:.3f}, p_corrupted {res.p_corrupted:.3f}"
            ),
            cbar_label=f"p({ans})",
            x_label=xlabel(res, kind),
            show_labels=i == 0,
        )
    lim = float(np.nanmax(np.abs(diff))) if diff.size else 0.0
    lim = lim if lim > 0 else 1e-6
    same = before.answer == after.answer
    diff_label = (
        f"Δp({answer_label(after.answer)})"
        if same
        else f"p({answer_label(after.answer)}) − p({answer_label(before.answer)})"
    )
    draw_panel(
        axes[2],
        diff,
        labels,
        cmap=DIFF_CMAP,
        vmin=-lim,
        vmax=lim,
        title=f"After − before\n{diff_label}",
        cbar_label=diff_label,
        x_label=xlabel(after, kind),
        show_labels=False,
    )
    if title is None:
        title = f"Causal trace before and after the edit\n{short_prompt(before.prompt)}"
    fig.suptitle(title, fontsize=11)
    return fig


def figure_path(path: str | Path) -> Path:
    """``path`` as a figure file :func:`save_figure` can write (its suffix one of
    ``SAVE_FORMATS``), so that callers can refuse it before any work."""
    path = Path(path)
    if path.suffix.lower() not in SAVE_FORMATS:
        raise InvalidInput(
            f"cannot save a figure as {path.suffix.lower()!r}: use one of {SAVE_FORMATS}"
        )
    return path


def save_figure(fig: Figure, path: str | Path, dpi: int = 200) -> Path:
    """Write ``fig`` to ``path`` as PNG (at ``dpi``), SVG or PDF, chosen by the suffix; creates
    the parent folder and returns the path."""
    path = figure_path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(
        path, format=suffix[1:], bbox_inches="tight", dpi=dpi if suffix == ".png" else "figure"
    )
    return path
