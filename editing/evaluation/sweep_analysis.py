"""What a layer sweep says: does the causal-tracing effect at a layer tell how well an edit
at that layer works? (Hase et al. 2023, "Does Localization Inform Editing?")

The rows come from :func:`editing.evaluation.layer_sweep.run_layer_sweep`: one per (fact,
layer), holding the edit's scores at that layer (``post_*`` metrics, ``rewrite_score``) and
the fact's tracing effect there (``trace_mlp``, ``trace_resid`` at the subject's last
token, ``..._max`` over the subject's tokens). Everything here is plain float64 numpy on
those numbers; nothing runs a model.

* :func:`layer_means`: per layer, the mean of each score and effect over facts.
* :func:`correlation`: Pearson's r or Spearman's ρ (Pearson's r of average ranks, ties
  shared) of two series; ``None`` where it is undefined (fewer than two points, or a series
  that does not vary).
* :func:`per_fact_correlations`: for each fact, the correlation *across layers* of its
  rewrite score with its tracing effect: does the fact edit best where it traces strongest?
* :func:`per_layer_correlations`: at each layer, the correlation *across facts*: do facts
  with a larger effect at this layer edit better here? Hase et al. find both near zero.
* :func:`r_squared_gain`: Hase et al.'s main table's idea: the R² of explaining the rewrite
  score by the edited layer alone (one indicator per layer: each layer its own mean) against
  by the layer plus the tracing effect (one more linear term); the gain is what tracing adds.
* :func:`summarize` collects them; :func:`markdown_table` prints them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jaxtyping import Float

from tracing.errors import InvalidInput

#: Per-layer means shown in the table: (row key, column label).
MEAN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("post_efficacy_success", "ES"),
    ("post_paraphrase_success", "PS"),
    ("post_neighborhood_success", "NS"),
    ("post_efficacy_magnitude", "EM"),
    ("post_paraphrase_magnitude", "PM"),
    ("post_neighborhood_magnitude", "NM"),
    ("rewrite_score", "rewrite"),
    ("trace_mlp", "trace mlp"),
    ("trace_resid", "trace resid"),
    ("trace_mlp_max", "trace mlp (max)"),
    ("trace_resid_max", "trace resid (max)"),
)
#: The tracing effects a sweep row holds (kind at the subject's last token; max over its tokens).
EFFECTS = ("trace_mlp", "trace_resid", "trace_mlp_max", "trace_resid_max")
METHODS = ("pearson", "spearman")


def _usable(rows: Sequence[Mapping[str, Any]], *keys: str) -> list[Mapping[str, Any]]:
    """Rows that did not fail and hold a number under every key."""
    return [r for r in rows if "failed" not in r and all(r.get(k) is not None for k in keys)]


def layer_means(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None
) -> dict[int, dict[str, float | None]]:
    """Per layer (ascending), the mean over facts of each of ``keys`` (default: the
    :data:`MEAN_COLUMNS`), failed rows and missing values skipped (``None`` if none), and
    ``n``: the rows that did not fail."""
    wanted = [k for k, _ in MEAN_COLUMNS] if keys is None else list(keys)
    by_layer: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by_layer[int(r["layer"])].append(r)
    out: dict[int, dict[str, float | None]] = {}
    for layer in sorted(by_layer):
        ok = _usable(by_layer[layer])
        means: dict[str, float | None] = {"n": float(len(ok))}
        for k in wanted:
            vals = [float(r[k]) for r in ok if r.get(k) is not None]
            means[k] = float(np.mean(np.asarray(vals, dtype=np.float64))) if vals else None
        out[layer] = means
    return out


def _ranks(x: Float[np.ndarray, " n"]) -> Float[np.ndarray, " n"]:
    """Ranks 1..n; tied values share the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1, dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


#: A series of numbers: a list or a 1-d float array.
Series = Sequence[float] | Float[np.ndarray, " n"]


def correlation(x: Series, y: Series, method: str = "pearson") -> float | None:
    """Pearson's r (``method="pearson"``) or Spearman's ρ (``"spearman"``: Pearson's r of
    the average ranks) of two equally long series, in float64; ``None`` with fewer than two
    points or when either series is constant (the correlation is undefined there)."""
    if method not in METHODS:
        raise InvalidInput(f"unknown correlation {method!r}; expected one of {METHODS}")
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InvalidInput(f"correlation needs two equally long series, got {a.shape}, {b.shape}")
    if len(a) < 2:
        return None
    if method == "spearman":
        a, b = _ranks(a), _ranks(b)
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a @ a) * (b @ b)))
    if denom == 0.0:
        return None
    return float(np.clip((a @ b) / denom, -1.0, 1.0))


def _grouped(
    rows: Sequence[Mapping[str, Any]], by: str, score: str, effect: str, method: str
) -> dict[int, dict[str, float | int | None]]:
    groups: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in _usable(rows, score, effect):
        groups[int(r[by])].append(r)
    return {
        key: {
            "n": len(g),
            method: correlation([r[score] for r in g], [r[effect] for r in g], method),
        }
        for key, g in sorted(groups.items())
    }


def per_fact_correlations(
    rows: Sequence[Mapping[str, Any]],
    score: str = "rewrite_score",
    effect: str = "trace_mlp",
    method: str = "pearson",
) -> dict[int, dict[str, float | int | None]]:
    """By case id: ``{"n": layers, method: r}``, the correlation across the edited layers of
    the fact's ``score`` with its tracing ``effect`` at each layer."""
    return _grouped(rows, "case_id", score, effect, method)


def per_layer_correlations(
    rows: Sequence[Mapping[str, Any]],
    score: str = "rewrite_score",
    effect: str = "trace_mlp",
    method: str = "pearson",
) -> dict[int, dict[str, float | int | None]]:
    """By layer: ``{"n": facts, method: r}``, the correlation across facts of the score of
    the edit at that layer with the facts' tracing ``effect`` at that layer."""
    return _grouped(rows, "layer", score, effect, method)


def _r2(y: Float[np.ndarray, " n"], design: Float[np.ndarray, "n k"]) -> float:
    """R² = 1 − SSR/SST of the least-squares fit of ``y`` on the columns of ``design``."""
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    sst = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(resid @ resid) / sst if sst > 0 else float("nan")


def r_squared_gain(
    rows: Sequence[Mapping[str, Any]], score: str = "rewrite_score", effect: str = "trace_mlp"
) -> dict[str, float | int | None]:
    """How much of the variance of ``score`` over (fact, layer) rows the edited layer
    explains, and how much the tracing ``effect`` adds (ordinary least squares, float64):

    * ``r2_layer``: ``score ~ layer`` with one indicator per layer (each layer's mean);
    * ``r2_layer_effect``: ``score ~ layer + effect`` (the indicators and one slope);
    * ``r2_effect``: ``score ~ 1 + effect``;
    * ``gain``: ``r2_layer_effect − r2_layer``, what knowing the effect adds to the layer.

    ``None`` for all where the score does not vary (R² undefined) or there are no rows."""
    ok = _usable(rows, score, effect)
    y = np.asarray([r[score] for r in ok], dtype=np.float64)
    out: dict[str, float | int | None] = {"n": len(ok)}
    if len(ok) < 2 or float(y.var()) == 0.0:
        return {**out, "r2_layer": None, "r2_layer_effect": None, "r2_effect": None, "gain": None}
    layers = sorted({int(r["layer"]) for r in ok})
    onehot = np.asarray(
        [[float(int(r["layer"]) == L) for L in layers] for r in ok], dtype=np.float64
    )
    t = np.asarray([r[effect] for r in ok], dtype=np.float64)[:, None]
    r2_layer = _r2(y, onehot)
    r2_both = _r2(y, np.hstack([onehot, t]))
    r2_effect = _r2(y, np.hstack([np.ones_like(t), t]))
    return {
        **out,
        "r2_layer": r2_layer,
        "r2_layer_effect": r2_both,
        "r2_effect": r2_effect,
        "gain": r2_both - r2_layer,
    }


def _mean_of(values: Sequence[float | int | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(np.asarray(vals, dtype=np.float64))) if vals else None


def summarize(rows: Sequence[Mapping[str, Any]], score: str = "rewrite_score") -> dict[str, Any]:
    """Everything :func:`markdown_table` prints, as JSON-ready values: per-layer means, the
    per-fact and per-layer correlations of ``score`` with each tracing effect (Pearson and
    Spearman), their means, and the R² comparison for each effect."""
    if not rows:
        raise InvalidInput("no sweep rows to summarise")
    out: dict[str, Any] = {
        "score": score,
        "n_rows": len(rows),
        "n_failed": sum("failed" in r for r in rows),
        "case_ids": sorted({int(r["case_id"]) for r in rows}),
        "layers": sorted({int(r["layer"]) for r in rows}),
        "layer_means": {str(k): v for k, v in layer_means(rows).items()},
        "correlations": {},
        "r2": {},
    }
    for effect in EFFECTS:
        per_effect: dict[str, Any] = {}
        for method in METHODS:
            facts = per_fact_correlations(rows, score, effect, method)
            per_layer = per_layer_correlations(rows, score, effect, method)
            per_effect[method] = {
                "per_fact": {str(k): v for k, v in facts.items()},
                "per_fact_mean": _mean_of([v[method] for v in facts.values()]),
                "per_layer": {str(k): v for k, v in per_layer.items()},
            }
        out["correlations"][effect] = per_effect
        out["r2"][effect] = r_squared_gain(rows, score, effect)
    return out


def _cell(value: float | int | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown: a per-layer table (mean scores and effects, and the
    across-facts correlation of the score with the MLP effect), then the per-fact
    correlations and the R² comparison for each tracing effect."""
    score = summary["score"]
    across = summary["correlations"]["trace_mlp"]
    heads = [label for _, label in MEAN_COLUMNS]
    lines = [
        f"Layer sweep: {len(summary['case_ids'])} facts x {len(summary['layers'])} layers "
        f"({summary['n_failed']} failed edits); score `{score}`.",
        "",
        "| layer | n | " + " | ".join(heads) + " | r across facts (mlp) | ρ across facts (mlp) |",
        "|---:|---:|" + "---:|" * (len(heads) + 2),
    ]
    for layer, means in summary["layer_means"].items():
        cells = [_cell(means.get(k)) for k, _ in MEAN_COLUMNS]
        r = across["pearson"]["per_layer"].get(layer, {}).get("pearson")
        rho = across["spearman"]["per_layer"].get(layer, {}).get("spearman")
        n = int(means.get("n") or 0)
        lines.append(f"| {layer} | {n} | " + " | ".join(cells) + f" | {_cell(r)} | {_cell(rho)} |")
    lines += [
        "",
        "| effect | mean r per fact (across layers) | mean ρ per fact | R² layer | "
        "R² layer + effect | gain | R² effect alone |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for effect in EFFECTS:
        c, r2 = summary["correlations"][effect], summary["r2"][effect]
        lines.append(
            f"| {effect} | {_cell(c['pearson']['per_fact_mean'])} | "
            f"{_cell(c['spearman']['per_fact_mean'])} | {_cell(r2['r2_layer'])} | "
            f"{_cell(r2['r2_layer_effect'])} | {_cell(r2['gain'], 4)} | {_cell(r2['r2_effect'])} |"
        )
    lines += [
        "",
        "trace_X: indirect effect p_restored − p_corrupted of kind X restored at the "
        "subject's last token (mlp: 10-layer window); _max: the largest over subject tokens. "
        "rewrite: (p_new after − p_new before) / (1 − p_new before) on the edit prompt.",
    ]
    return "\n".join(lines) + "\n"
