"""Line and bar plots (matplotlib): average effects per layer, layer selection, per-edit target
probabilities and the scaling curve of metric against number of edits (sequential runs:
:mod:`viz.sequential`).

Inputs are result values (:class:`tracing.results.AverageEffects`,
:class:`tracing.results.LayerSelection`) or plain data (lists of dicts); nothing runs a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

from tracing.errors import InvalidInput
from tracing.results import ALL_KINDS, TOKEN_CLASSES, AverageEffects, LayerSelection
from viz.style import BAR_COLORS, CLASS_COLORS, UNCHOSEN_COLOR, kind_style, root_figure

CLASS_LABELS = {
    "first_subject": "first subject token",
    "middle_subject": "middle subject tokens",
    "last_subject": "last subject token",
    "first_subsequent": "first subsequent token",
    "further": "further tokens",
    "last": "last token",
}
KIND_NAMES = {
    "resid": "hidden state",
    "mlp": "MLP",
    "attn": "Attn",
    "resid/mlp-severed": "hidden state, MLP severed",
    "resid/attn-severed": "hidden state, Attn severed",
}
#: Metric names for axis labels (``{a}``: the answer, ``{c}``: the competitor).
METRIC_LABELS = {
    "prob": "p({a})",
    "logprob": "log p({a})",
    "logit-diff": "logit({a}) − logit({c})",
}


def measure_caption(settings: Any) -> str:
    """One line naming what a trace measured: corruption, direction and metric, e.g.
    ``"noise 3s corruption · denoise · prob"`` (``settings``: a
    :class:`~tracing.results.TraceSettings` or an :class:`AverageEffects` settings dict)."""

    def get(name: str, default: Any) -> Any:
        if isinstance(settings, Mapping):
            return settings.get(name, default)
        return getattr(settings, name, default)

    corruption = get("corruption", "noise")
    if corruption == "noise":
        what = f"noise {get('noise_spec', '') or ''}".strip() + " corruption"
    else:
        rep = get("replacement", None)
        what = "token replacement" + (f" by {rep!r}" if rep else "")
    metric = get("metric", "prob") + (", normalised" if get("normalise", False) else "")
    return f"{what} · {get('direction', 'denoise')} · {metric}"


def effect_unit(settings: Mapping[str, Any]) -> str:
    """The unit of an averaged effect: ``Δp`` by default, else the metric's difference."""
    if settings.get("normalise"):
        return "normalised"
    return {"prob": "Δp", "logprob": "Δ log p", "logit-diff": "Δ logit diff"}.get(
        str(settings.get("metric", "prob")), "Δ"
    )


def metric_label(metric: str, answer: str, competitor: str | None, normalise: bool) -> str:
    """Colour-bar / axis label of a trace's scores."""
    if normalise:
        return "normalised effect"
    return METRIC_LABELS.get(metric, metric).format(a=answer, c=(competitor or "?").strip())


#: Prompt kinds of :func:`plot_edit_bars`, in drawing order.
PROMPT_KINDS = ("edit", "paraphrase", "neighborhood")
#: Targets of :func:`plot_edit_bars`: the true (old) object and the new one.
TARGETS = ("true", "new")
#: Metrics of :func:`plot_scaling`, in panel order, with their accepted aliases.
SCALING_METRICS = ("efficacy", "paraphrase", "neighborhood", "score")
_ALIASES = {"neighbourhood": "neighborhood", "neighbor": "neighborhood", "rewrite": "edit"}


def _new_figure(n_panels: int, width: float = 4.6, height: float = 3.6) -> tuple[Figure, list]:
    fig = Figure(figsize=(max(5.0, width * n_panels), height), layout="constrained")
    return fig, list(fig.subplots(1, n_panels, squeeze=False)[0])


def average_kinds(effects: AverageEffects, kinds: Sequence[str] | None) -> list[str]:
    """The kinds to draw from ``effects``: ``kinds`` (each must be there) or all it holds."""
    chosen: list[str] = (
        list(kinds) if kinds is not None else [k for k in ALL_KINDS if k in effects.effects]
    )
    missing = [k for k in chosen if k not in effects.effects]
    if missing or not chosen:
        raise InvalidInput(
            f"kinds {missing or chosen} not in these effects (they hold {sorted(effects.effects)})"
        )
    return chosen


def average_title(effects: AverageEffects) -> str:
    """Figure title of averaged effects: the number of facts and the mean probabilities, and
    on a second line what was measured (:func:`measure_caption`)."""
    title = (
        f"Average indirect effects over {effects.n_facts} facts "
        f"(mean p_clean {effects.mean_p_clean:.3f}, "
        f"mean p_corrupted {effects.mean_p_corrupted:.3f})"
    )
    return f"{title}\n{measure_caption(effects.settings)}"


def plot_average_effects(effects: AverageEffects, kinds: Sequence[str] | None = None) -> Figure:
    """Average indirect effect against layer, one panel per kind and one line per ROME Fig. 2
    token class present (legend gives each class's number of facts)."""
    chosen = average_kinds(effects, kinds)
    fig, axes = _new_figure(len(chosen))
    for ax, kind in zip(axes, chosen, strict=True):
        per = effects.effects[kind]
        counts = effects.counts.get(kind, {})
        classes = [c for c in TOKEN_CLASSES if c in per] + [c for c in per if c not in CLASS_LABELS]
        for cls in classes:
            n = int(counts.get(cls, effects.n_facts))
            if n == 0:
                continue
            y = np.asarray(per[cls], dtype=np.float64)
            ax.plot(
                np.arange(len(y)),
                y,
                marker="o",
                markersize=3,
                linewidth=1.6,
                color=CLASS_COLORS.get(cls),
                label=f"{CLASS_LABELS.get(cls, cls)} (n={n})",
            )
        ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)
        ax.set_title(f"Average indirect effect of {KIND_NAMES.get(kind, kind)}", fontsize=10)
        ax.set_xlabel("layer", fontsize=9)
        ax.set_ylabel(f"average indirect effect ({effect_unit(effects.settings)})", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False, loc="best")
    fig.suptitle(average_title(effects), fontsize=11)
    return fig


def plot_layer_selection(selection: LayerSelection, ax: Axes | None = None) -> Figure:
    """Bars of the per-layer average effect used for layer selection, the chosen contiguous
    window highlighted and shaded."""
    effect = np.asarray(selection.per_layer_effect, dtype=np.float64)
    layers = sorted(int(x) for x in selection.layers)
    if not layers or layers[0] < 0 or layers[-1] >= len(effect):
        raise InvalidInput(
            f"chosen layers {selection.layers} are outside the {len(effect)} layers with effects"
        )
    if ax is None:
        fig, (ax,) = _new_figure(1, width=max(5.5, 0.32 * len(effect) + 1.5), height=3.4)
    else:
        fig = root_figure(ax)
    chosen = set(layers)
    color = kind_style(selection.kind).line
    colors = [color if i in chosen else UNCHOSEN_COLOR for i in range(len(effect))]
    ax.bar(np.arange(len(effect)), effect, color=colors, width=0.8)
    ax.axvspan(
        layers[0] - 0.5,
        layers[-1] + 0.5,
        color=color,
        alpha=0.12,
        zorder=0,
        label=f"chosen layers {layers[0]}–{layers[-1]}",
    )
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xticks(np.arange(len(effect)))
    ax.tick_params(labelsize=8)
    ax.set_xlabel("layer", fontsize=9)
    ax.set_ylabel("average indirect effect (Δp)", fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    where = CLASS_LABELS.get(selection.token_class, selection.token_class)
    ax.set_title(
        f"{KIND_NAMES.get(selection.kind, selection.kind)} effect at the {where}, "
        f"{selection.n_facts} facts\nchosen window of k={selection.k}: layers "
        f"{layers[0]}–{layers[-1]} (window score {selection.window_score:.4f})",
        fontsize=10,
    )
    return fig


@dataclass(frozen=True)
class EditBar:
    """One bar pair of :func:`plot_edit_bars`: the mean probability of the ``target`` ("true"
    or "new") on prompts of ``prompt_kind`` ("edit", "paraphrase", "neighborhood") before and
    after the edit."""

    prompt_kind: str
    target: str
    before: float
    after: float


def to_edit_bars(rows: Iterable[Mapping[str, Any] | EditBar]) -> list[EditBar]:
    """Validate rows for :func:`plot_edit_bars` (dicts with keys prompt_kind, target, before,
    after, or :class:`EditBar`) and return them as :class:`EditBar`; ``ValueError`` naming the
    bad row otherwise. "neighbourhood" is accepted for "neighborhood"."""
    out: list[EditBar] = []
    seen: set[tuple[str, str]] = set()
    for i, row in enumerate(rows):
        if isinstance(row, EditBar):
            row = {
                "prompt_kind": row.prompt_kind,
                "target": row.target,
                "before": row.before,
                "after": row.after,
            }
        if not isinstance(row, Mapping):
            raise InvalidInput(f"edit bar row {i} is a {type(row).__name__}, not a mapping")
        missing = [k for k in ("prompt_kind", "target", "before", "after") if k not in row]
        if missing:
            raise InvalidInput(f"edit bar row {i} lacks {missing}: {dict(row)!r}")
        kind = _ALIASES.get(str(row["prompt_kind"]), str(row["prompt_kind"]))
        if kind not in PROMPT_KINDS:
            raise InvalidInput(f"edit bar row {i}: prompt_kind {kind!r} not in {PROMPT_KINDS}")
        target = str(row["target"])
        if target not in TARGETS:
            raise InvalidInput(f"edit bar row {i}: target {target!r} is not 'true' or 'new'")
        probs = []
        for key in ("before", "after"):
            p = float(row[key])
            if not 0.0 <= p <= 1.0:
                raise InvalidInput(f"edit bar row {i}: {key} = {p} is not a probability")
            probs.append(p)
        if (kind, target) in seen:
            raise InvalidInput(f"edit bar row {i}: a second row for ({kind!r}, {target!r})")
        seen.add((kind, target))
        out.append(EditBar(kind, target, probs[0], probs[1]))
    if not out:
        raise InvalidInput("no edit bar rows to plot")
    return out


BAR_SERIES = (("true", "before"), ("true", "after"), ("new", "before"), ("new", "after"))


def plot_edit_bars(
    rows: Iterable[Mapping[str, Any] | EditBar],
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Bar chart of one edit: the probability of the true and the new target on the edit,
    paraphrase and neighbourhood prompts, before (hatched, pale) and after (solid) the edit.

    ``rows``: e.g. ``{"prompt_kind": "edit", "target": "new", "before": 0.01, "after": 0.93}``
    (see :func:`to_edit_bars`); each bar container is labelled ``"<target> target, <when>"``.
    """
    bars = to_edit_bars(rows)
    kinds = [k for k in PROMPT_KINDS if any(b.prompt_kind == k for b in bars)]
    if ax is None:
        fig, (ax,) = _new_figure(1, width=max(5.5, 2.2 * len(kinds) + 1.5), height=3.6)
    else:
        fig = root_figure(ax)
    width = 0.2
    x = np.arange(len(kinds))
    for j, (target, when) in enumerate(BAR_SERIES):
        heights, positions = [], []
        for i, k in enumerate(kinds):
            match = [b for b in bars if b.prompt_kind == k and b.target == target]
            if match:
                heights.append(getattr(match[0], when))
                positions.append(x[i] + (j - 1.5) * width)
        if not heights:
            continue
        before = when == "before"
        cont = ax.bar(
            positions,
            heights,
            width=width,
            color=BAR_COLORS[target],
            alpha=0.4 if before else 1.0,
            hatch="//" if before else None,
            edgecolor=BAR_COLORS[target],
            label=f"{target} target, {when}",
        )
        ax.bar_label(cont, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{k} prompts" for k in kinds], fontsize=9)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("probability", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=7, frameon=False, ncols=2, loc="upper right")
    ax.set_title(title or "Target probabilities before and after the edit", fontsize=10)
    return fig


def scaling_series(
    points: Iterable[Mapping[str, Any]], metric: str
) -> dict[str, tuple[list[int], list[float]]]:
    """``{method: (n_edits, values)}`` for ``metric`` from plain points, sorted by n_edits;
    points lacking the metric are skipped. ``ValueError`` on a point without method/n_edits."""
    series: dict[str, dict[int, float]] = {}
    for i, p in enumerate(points):
        if "method" not in p or "n_edits" not in p:
            raise InvalidInput(f"scaling point {i} lacks 'method' or 'n_edits': {dict(p)!r}")
        n = int(p["n_edits"])
        if n < 1:
            raise InvalidInput(f"scaling point {i}: n_edits = {n} must be >= 1 (log axis)")
        value = _metric_value(p, metric)
        per = series.setdefault(str(p["method"]), {})
        if value is None:
            continue
        if n in per:
            raise InvalidInput(f"scaling point {i}: a second {metric!r} for {p['method']!r}, n={n}")
        per[n] = value
    return {m: (sorted(v), [v[n] for n in sorted(v)]) for m, v in series.items() if v}


def _metric_value(point: Mapping[str, Any], metric: str) -> float | None:
    for key, value in point.items():
        if _ALIASES.get(key, key) == metric and value is not None:
            return float(value)
    return None


def plot_scaling(
    points: Iterable[Mapping[str, Any]], metrics: Sequence[str] | None = None
) -> Figure:
    """Metric against number of edits (log x), one panel per metric present (efficacy,
    paraphrase, neighborhood, score) and one line per method.

    ``points``: plain dicts like ``{"method": "memit", "n_edits": 100, "efficacy": 0.98, ...}``
    ("neighbourhood" is accepted for "neighborhood")."""
    points = list(points)
    if not points:
        raise InvalidInput("no scaling points to plot")
    if metrics is None:
        metrics = [m for m in SCALING_METRICS if scaling_series(points, m)]
        if not metrics:
            raise InvalidInput(f"no point holds any of the metrics {SCALING_METRICS}")
    else:
        metrics = [_ALIASES.get(m, m) for m in metrics]
    methods = list(dict.fromkeys(str(p["method"]) for p in points if "method" in p))
    all_n = sorted({int(p["n_edits"]) for p in points if "n_edits" in p})
    fig, axes = _new_figure(len(metrics), width=3.6, height=3.4)
    for ax, metric in zip(axes, metrics, strict=True):
        series = scaling_series(points, metric)
        for j, method in enumerate(methods):
            if method not in series:
                continue
            xs, ys = series[method]
            ax.plot(xs, ys, marker="o", markersize=4, label=method, color=f"C{j}")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(all_n))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{n:,}" for n in all_n])
        ax.set_xlabel("number of edits", fontsize=9)
        ax.set_title(metric, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("metric", fontsize=9)
    axes[-1].legend(fontsize=8, frameon=False)
    fig.suptitle("Metrics against number of edits", fontsize=11)
    return fig
