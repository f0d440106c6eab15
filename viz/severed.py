"""The severed-path comparison (Meng et al. 2022, Fig. 3c): at the last subject token, by
layer, the effect of restoring the hidden state, with the attention at that token severed,
and with the MLP severed: for one fact (:class:`~tracing.results.TraceResult`) or averaged
over many (:class:`~tracing.results.AverageEffects`).

Three bars per layer in the paper's colours (hidden state purple, Attn severed red, MLP
severed green). A layer where the MLP-severed bar falls far below the hidden state's is one
whose effect the MLPs at the subject's last token carry. Nothing here runs a model.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from tracing.errors import InvalidInput
from tracing.results import AverageEffects, TraceResult
from viz.plots import effect_unit, measure_caption
from viz.style import root_figure

#: The compared kinds, their legend labels and colours (as in the papers' figure).
SERIES = (
    ("resid", "Effect of single state on P", "#7261ab"),
    ("resid/attn-severed", "Effect with Attn severed", "#f3201b"),
    ("resid/mlp-severed", "Effect with MLP severed", "#20b020"),
)


def severed_series(source: TraceResult | AverageEffects) -> tuple[dict[str, np.ndarray], str]:
    """Per compared kind, the ``[layers]`` effect at the last subject token, and a title.

    A trace gives its own row (:meth:`~tracing.results.TraceResult.indirect_effect`, the
    severed rows relative to the ordinary corrupted run, as the papers plot them); averaged
    effects give the ``last_subject`` class. Kinds missing from ``source`` are left out; at
    least ``resid`` and one severed kind are needed."""
    if isinstance(source, TraceResult):
        token = source.subject_span[1] - 1
        rows = {k: source.indirect_effect(k)[token] for k, _, _ in SERIES if k in source.scores}
        title = (
            f"Effect at the last subject token {source.tokens[token].strip()!r}\n"
            f"{measure_caption(source.settings)}"
        )
    else:
        rows = {
            k: np.asarray(source.effects[k]["last_subject"], dtype=np.float64)
            for k, _, _ in SERIES
            if k in source.effects and "last_subject" in source.effects[k]
        }
        title = (
            f"Average effect at the last subject token over {source.n_facts} facts\n"
            f"{measure_caption(source.settings)}"
        )
    if "resid" not in rows or len(rows) < 2:
        raise InvalidInput(
            f"the severed comparison needs resid and a severed kind; these hold {sorted(rows)} "
            "(trace with --kinds resid resid/attn-severed resid/mlp-severed)"
        )
    return rows, title


def _settings(source: TraceResult | AverageEffects) -> dict:
    if isinstance(source, TraceResult):
        s = source.settings
        return {"metric": s.metric, "normalise": s.normalise}
    return dict(source.settings)


def plot_severed(source: TraceResult | AverageEffects, ax: Axes | None = None) -> Figure:
    """The comparison as grouped bars (matplotlib): one group per layer at which the single
    hidden state is restored. Probability effects are shown in percent, as in the paper."""
    rows, title = severed_series(source)
    if ax is None:
        fig = Figure(figsize=(max(6.0, 0.35 * len(rows["resid"]) + 2), 2.8), layout="constrained")
        ax = fig.subplots()
    else:
        fig = root_figure(ax)
    shown = [s for s in SERIES if s[0] in rows]
    width = 0.8 / len(shown)
    for i, (kind, label, color) in enumerate(shown):
        y = rows[kind]
        x = np.arange(len(y)) + (i - (len(shown) - 1) / 2) * width
        ax.bar(x, y, width=width, color=color, label=label)
    settings = _settings(source)
    unit = effect_unit(settings)
    if unit == "Δp":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)
    ax.set_xlabel("layer at which the single hidden state is restored", fontsize=9)
    ax.set_ylabel(f"indirect effect ({unit})", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=10)
    return fig


def severed_figure(source: TraceResult | AverageEffects) -> go.Figure:
    """The comparison as an interactive grouped bar chart (plotly)."""
    rows, title = severed_series(source)
    fig = go.Figure()
    for kind, label, color in SERIES:
        if kind in rows:
            y = rows[kind]
            fig.add_trace(go.Bar(x=list(range(len(y))), y=y, name=label, marker_color=color))
    unit = effect_unit(_settings(source))
    fig.update_layout(
        barmode="group",
        title={"text": title.replace("\n", "<br><sub>") + "</sub>"},
        xaxis_title="layer at which the single hidden state is restored",
        yaxis_title=f"indirect effect ({unit})",
        yaxis_tickformat=".1%" if unit == "Δp" else None,
    )
    return fig
