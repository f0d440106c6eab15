"""The rows, table and plot of ``benchmarks/specificity_sweep.py``.

:func:`summary_row` turns a finished run's summary into the sweep's row (the line appended to
``<out>/sweep.jsonl``, rates in percent), :func:`markdown_table` shows rows as a Markdown table
and :func:`plot_sweep` draws neighbourhood-success drop against paraphrase success.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from specificity_configs import SweepConfig

#: (column, summary key in ``edited``) in table order; rates shown in percent.
_COLUMNS = (
    ("ES", "efficacy_success"),
    ("PS", "paraphrase_success"),
    ("NS", "neighborhood_success"),
)


def summary_row(config: SweepConfig, overrides: Mapping[str, Any], summary: Any) -> dict:
    """The sweep's row of one finished run (``summary``: its :class:`EvalSummary`), rates in
    percent. ``ns_drop`` is the unedited model's NS on the same cases minus the edited NS;
    ``nm`` the edited neighbourhood magnitude (mean ``P(true) - P(new)`` over neighbour
    prompts); ``new_gain`` the mean probability the new target gained on them."""
    ed, un = summary.edited, summary.unedited

    def pct(d: Mapping[str, Any], key: str) -> float | None:
        v = d.get(key)
        return None if v is None else 100 * float(v)

    ns, ns0 = pct(ed, "neighborhood_success"), pct(un, "neighborhood_success")
    return {
        "name": config.name,
        "method": config.method,
        "lever": config.lever,
        "note": config.note,
        "overrides": dict(overrides),
        "subject_weight": config.subject_weight,
        "n": summary.n,
        "n_failed": summary.n_failed,
        "es": pct(ed, "efficacy_success"),
        "ps": pct(ed, "paraphrase_success"),
        "ns": ns,
        "ns_unedited": ns0,
        "ns_drop": None if ns is None or ns0 is None else ns0 - ns,
        "nm": pct(ed, "neighborhood_magnitude"),
        "nm_unedited": pct(un, "neighborhood_magnitude"),
        "new_gain": pct(ed, "neighborhood_new_gain"),
        "new_gain_max": pct(ed, "neighborhood_new_gain_max"),
        "strict_es": pct(ed, "strict_efficacy"),
        "strict_ps": pct(ed, "strict_paraphrase"),
        "seconds_per_edit": summary.seconds_per_edit_median,
        "seconds_total": summary.seconds_total,
    }


def _cell(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """The sweep as a Markdown table, one line per configuration (rates in percent)."""
    head = (
        "| config | lever | ES | PS | NS | NS drop | NM | new gain | strict ES | strict PS "
        "| s / edit |"
    )
    lines = [head, "|---|---|" + "---:|" * 9]
    for r in rows:
        secs = r.get("seconds_per_edit")
        cells = [_cell(r.get(k)) for k in ("es", "ps", "ns", "ns_drop", "nm", "new_gain")] + [
            _cell(r.get("strict_es")),
            _cell(r.get("strict_ps")),
            _cell(secs),
        ]
        lines.append(f"| {r['name']} | {r.get('lever', '')} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


_MARKERS = {"rome": ("o", "tab:blue"), "memit": ("s", "tab:orange")}


def plot_sweep(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """NS drop (points, lower is more local) against paraphrase success, one labelled marker
    per configuration: ROME circles, MEMIT squares; the dashed line is issue 12's goal for
    ROME (a drop of at most 3 points)."""
    fig = Figure(figsize=(8.0, 5.6), layout="constrained")
    ax = fig.subplots()
    for method, (marker, color) in _MARKERS.items():
        pts = [r for r in rows if r["method"] == method and r.get("ns_drop") is not None]
        if not pts:
            continue
        ax.scatter(
            [r["ps"] for r in pts],
            [r["ns_drop"] for r in pts],
            marker=marker,
            color=color,
            label=method.upper(),
            zorder=3,
        )
        labels: dict[tuple[float, float], list[str]] = {}  # rows on one point share a label
        for r in pts:
            at = (round(float(r["ps"]), 6), round(float(r["ns_drop"]), 6))
            labels.setdefault(at, []).append(str(r["name"]).removeprefix(f"{method}_"))
        for at, names in labels.items():
            ax.annotate(", ".join(names), at, xytext=(4, 3), textcoords="offset points", fontsize=7)
    ax.axhline(3.0, color="grey", linestyle="--", linewidth=0.8, label="goal: drop ≤ 3")
    ax.set_xlabel("paraphrase success PS (%)")
    ax.set_ylabel("neighbourhood success drop vs unedited (points)")
    sizes = sorted({int(r["n"]) for r in rows if r.get("n")})
    cases = "/".join(map(str, sizes)) or "?"
    ax.set_title(
        f"Specificity sweep, Gemma-3-270M, CounterFact tuning split: {cases} cases, "
        "up to 10 neighbours each",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig
