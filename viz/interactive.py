"""Interactive (plotly) causal-trace heatmaps and edit bars, for Jupyter and offline HTML.

Every function returns a :class:`plotly.graph_objects.Figure` (Jupyter displays it as the cell's
value); :func:`write_html` saves one as a standalone page with plotly.js embedded, so it opens
without a network. Nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tracing.results import TraceResult
from viz.heatmap import difference
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
from viz.plots import PROMPT_KINDS, TARGETS, EditBar, measure_caption, to_edit_bars
from viz.style import BAR_COLORS, DIFF_CMAP, kind_style

PANEL_WIDTH = 420
ROW_HEIGHT = 28
TITLE_POSITION = {"x": 0.5, "y": 0.97, "yanchor": "top", "yref": "container", "pad": {"t": 12}}


def hover_text(result: TraceResult, kind: str) -> list[list[str]]:
    """Hover text per cell of ``scores[kind]`` (``[tokens][layers]``): token, layer, the score
    (by default the probability of the answer with that state restored), and the indirect
    effect (:meth:`~tracing.results.TraceResult.indirect_effect`)."""
    labels = token_labels(result)
    what = score_label(result)
    scores = np.asarray(result.scores[kind], dtype=np.float64)
    effect = result.indirect_effect(kind)
    return [
        [
            f"token: {labels[t]}<br>layer: {layer}<br>{what}: {scores[t, layer]:.4f}"
            f"<br>indirect effect: {effect[t, layer]:+.4f}"
            for layer in range(scores.shape[1])
        ]
        for t in range(scores.shape[0])
    ]


def _heatmap(
    z: np.ndarray,
    text: list[list[str]],
    *,
    colorscale: str,
    zmin: float,
    zmax: float,
    colorbar_title: str,
    name: str,
    zmid: float | None = None,
) -> go.Heatmap:
    return go.Heatmap(
        z=np.asarray(z, dtype=np.float64),
        x=list(range(z.shape[1])),
        y=list(range(z.shape[0])),
        text=text,
        hovertemplate="%{text}<extra></extra>",
        colorscale=colorscale,
        zmin=zmin,
        zmax=zmax,
        zmid=zmid,
        name=name,
        colorbar={"title": {"text": colorbar_title, "side": "right"}, "thickness": 12},
    )


def _limits(z: np.ndarray, floor: float) -> tuple[float, float]:
    top = float(np.nanmax(z))
    return floor, top if top > floor else floor + max(1e-6, abs(floor) * 1e-3)


def _panel_grid(titles: Sequence[str], n_tokens: int, labels: Sequence[str]) -> go.Figure:
    n = len(titles)
    fig = make_subplots(
        rows=1, cols=n, subplot_titles=list(titles), shared_yaxes=True, horizontal_spacing=0.1
    )
    fig.update_yaxes(
        tickmode="array",
        tickvals=list(range(n_tokens)),
        ticktext=list(labels),
        autorange="reversed",
    )
    fig.update_layout(
        width=max(680, PANEL_WIDTH * n),
        height=max(360, ROW_HEIGHT * n_tokens + 220),
        margin={"t": 150, "l": 90, "r": 100, "b": 60},
        plot_bgcolor="white",
    )
    return fig


def _place_colorbars(fig: go.Figure) -> None:
    """Put each heatmap's colour bar just right of its own subplot."""
    for i, trace in enumerate(fig.data):
        axis = fig.layout["xaxis" if i == 0 else f"xaxis{i + 1}"]
        trace.colorbar.x = axis.domain[1] + 0.005
        trace.colorbar.xanchor = "left"
        trace.colorbar.len = 0.9


def trace_figure(result: TraceResult, kinds: Sequence[str] | str | None = None) -> go.Figure:
    """An interactive causal-trace heatmap, one subplot per kind (resid purple, mlp green,
    attn red), tokens down the side (subject marked ``*``), layers across, colour floor at
    ``p_corrupted``; hovering a cell shows its token, layer, probability and indirect effect."""
    chosen = resolve_kinds(result, kinds)
    labels = token_labels(result)
    ans = answer_label(result.answer)
    titles = []
    for kind in chosen:
        win = window_text(result, kind)
        titles.append(panel_title(result, kind) + (f"<br>({win})" if win else ""))
    fig = _panel_grid(titles, len(labels), labels)
    for col, kind in enumerate(chosen, start=1):
        z = np.asarray(result.scores[kind], dtype=np.float64)
        lo, hi = _limits(z, float(result.corrupted_score))
        fig.add_trace(
            _heatmap(
                z,
                hover_text(result, kind),
                colorscale=kind_style(base_style(kind)).colorscale,
                zmin=lo,
                zmax=hi,
                colorbar_title=score_label(result),
                name=kind,
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text=xlabel(result, kind), row=1, col=col)
    _place_colorbars(fig)
    fig.update_layout(
        title={
            "text": f"Causal trace of {ans!r}: p_clean = {result.p_clean:.3f}, "
            f"p_corrupted = {result.p_corrupted:.3f}<br><sub>{short_prompt(result.prompt)}"
            f"<br>{measure_caption(result.settings)}</sub>",
            **TITLE_POSITION,
        }
    )
    return fig


def before_after_figure(before: TraceResult, after: TraceResult, kind: str = "mlp") -> go.Figure:
    """Interactive twin of :func:`viz.heatmap.plot_before_after`: before, after and
    ``after - before`` panels of one kind; raises ``ValueError`` if the traces do not match."""
    diff = difference(before, after, kind)
    labels = token_labels(before)
    short = SHORT.get(kind, kind)
    b_ans, a_ans = answer_label(before.answer), answer_label(after.answer)
    diff_label = f"Δp({a_ans})" if before.answer == after.answer else f"p({a_ans}) − p({b_ans})"
    fig = _panel_grid(
        [
            f"Before edit: restoring {short}, p({b_ans})",
            f"After edit: restoring {short}, p({a_ans})",
            f"After − before: {diff_label}",
        ],
        len(labels),
        labels,
    )
    for col, res in enumerate((before, after), start=1):
        z = np.asarray(res.scores[kind], dtype=np.float64)
        lo, hi = _limits(z, float(res.p_corrupted))
        fig.add_trace(
            _heatmap(
                z,
                hover_text(res, kind),
                colorscale=kind_style(kind).colorscale,
                zmin=lo,
                zmax=hi,
                colorbar_title=f"p({answer_label(res.answer)})",
                name="before" if col == 1 else "after",
            ),
            row=1,
            col=col,
        )
    lim = float(np.nanmax(np.abs(diff))) if diff.size else 0.0
    lim = lim if lim > 0 else 1e-6
    diff_text = [
        [
            f"token: {labels[t]}<br>layer: {layer}<br>{diff_label}: {diff[t, layer]:+.4f}"
            for layer in range(diff.shape[1])
        ]
        for t in range(diff.shape[0])
    ]
    fig.add_trace(
        _heatmap(
            diff,
            diff_text,
            colorscale=DIFF_CMAP,
            zmin=-lim,
            zmax=lim,
            zmid=0.0,
            colorbar_title=diff_label,
            name="after - before",
        ),
        row=1,
        col=3,
    )
    for col in (1, 2, 3):
        fig.update_xaxes(title_text=xlabel(after, kind), row=1, col=col)
    _place_colorbars(fig)
    fig.update_layout(
        title={
            "text": "Causal trace before and after the edit"
            f"<br><sub>{short_prompt(before.prompt)}</sub>",
            **TITLE_POSITION,
        }
    )
    return fig


def edit_bars_figure(rows: Iterable[Mapping | EditBar], title: str | None = None) -> go.Figure:
    """Interactive twin of :func:`viz.plots.plot_edit_bars` for one edit: grouped bars of the
    true and new targets' probabilities on each prompt kind, before and after."""
    bars = to_edit_bars(rows)
    kinds = [k for k in PROMPT_KINDS if any(b.prompt_kind == k for b in bars)]
    fig = go.Figure()
    for target in TARGETS:
        for when in ("before", "after"):
            ys = []
            for k in kinds:
                match = [b for b in bars if b.prompt_kind == k and b.target == target]
                ys.append(getattr(match[0], when) if match else None)
            fig.add_trace(
                go.Bar(
                    x=kinds,
                    y=ys,
                    name=f"{target} target, {when}",
                    marker={
                        "color": BAR_COLORS[target],
                        "opacity": 0.45 if when == "before" else 1.0,
                        "pattern": {"shape": "/" if when == "before" else ""},
                    },
                    hovertemplate=f"{target} target {when}: %{{y:.4f}}<extra>%{{x}}</extra>",
                )
            )
    fig.update_layout(
        barmode="group",
        yaxis={"title": {"text": "probability"}, "range": [0, 1]},
        title={"text": title or "Target probabilities before and after the edit", "x": 0.5},
        width=720,
        height=420,
        plot_bgcolor="white",
    )
    return fig


def write_html(fig: go.Figure, path: str | Path) -> Path:
    """Save ``fig`` as a standalone HTML page with plotly.js embedded (works offline, no CDN);
    creates the parent folder and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path
