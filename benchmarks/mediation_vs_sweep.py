"""Benchmark: which layer-selection rule agrees with where ROME edits work best?

Two rules read causal traces at the subject's last token (:func:`tracing.localization.
select_layers`): ``restoration`` (today's default: the MLP restoration effect, window 10) and
``mediation`` (MEMIT's reading: per layer, the hidden state's effect minus its effect with the
MLPs at that token severed). Both are set beside the layer sweep (Hase et al. 2023: ROME at
every layer of the same facts, ``docs/evidence/layer_sweep/rows.jsonl``), per layer:

* the Spearman rank correlation, across layers, of each rule's per-layer score with the
  sweep's mean rewrite score and with its mean neighbourhood success;
* the window each rule picks (``--k`` layers, and the single best layer) and the sweep's mean
  rewrite score and neighbourhood success inside it, beside the sweep's own best windows.

Inputs are trace-dataset folders (``--sweep-traces``: the sweep's facts, traced with
``--kinds resid mlp resid/mlp-severed``; optional ``--known-traces``: every known fact, with
``resid resid/mlp-severed``, and ``--known-mlp``: an ``average_effects.json`` holding MLP
restoration over every known fact). Nothing runs a model. Prints markdown.

    .venv/bin/python benchmarks/mediation_vs_sweep.py --sweep-traces runs/severed_sweep \\
        --known-traces runs/severed_known \\
        --known-mlp docs/evidence/known_atp/average_effects.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from tracing.localization import average_effects, load_traces, select_layers
from tracing.results import AverageEffects, LayerSelection

if str(Path(__file__).resolve().parent) not in sys.path:  # the script next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from atp_agreement import spearman  # noqa: E402  (ranks with ties averaged, as there)

SWEEP_ROWS = Path("docs/evidence/layer_sweep/rows.jsonl")


def sweep_means(path: Path) -> dict[str, np.ndarray]:
    """Per layer (0 .. the sweep's last), the mean rewrite score, efficacy and neighbourhood
    success over the sweep's facts."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    layers = sorted({r["layer"] for r in rows})
    out: dict[str, np.ndarray] = {}
    for key in ("rewrite_score", "post_efficacy_success", "post_neighborhood_success"):
        out[key] = np.array(
            [np.mean([r[key] for r in rows if r["layer"] == lay and r[key] is not None])
             for lay in layers]
        )  # fmt: skip
    out["layers"] = np.array(layers)
    return out


def best_window(score: np.ndarray, k: int) -> int:
    """Start of the ``k``-layer window with the largest summed ``score``."""
    return int(np.argmax(np.convolve(score, np.ones(k), mode="valid")))


def window_row(name: str, sel: LayerSelection, sweep: dict[str, np.ndarray]) -> str:
    """A table row: the rule, its window and the sweep's means inside it."""
    inside = [lay for lay in sel.layers if lay < len(sweep["layers"])]
    rw = np.mean(sweep["rewrite_score"][inside]) if inside else float("nan")
    ns = np.mean(sweep["post_neighborhood_success"][inside]) if inside else float("nan")
    rho_rw = spearman(np.asarray(sel.per_layer_effect)[: len(sweep["layers"])],
                      sweep["rewrite_score"])  # fmt: skip
    rho_ns = spearman(np.asarray(sel.per_layer_effect)[: len(sweep["layers"])],
                      sweep["post_neighborhood_success"])  # fmt: skip
    span = f"{sel.layers[0]}" if sel.k == 1 else f"{sel.layers[0]}-{sel.layers[-1]}"
    return (
        f"| {name} | {sel.n_facts} | {span} | {rw:.3f} | {ns:.3f} | {rho_rw:.2f} | {rho_ns:.2f} |"
    )


def rules(effects: AverageEffects, mlp: AverageEffects | None, k: int) -> dict:
    """The two rules' selections (window ``k`` and single layer) from these averages."""
    out = {}
    source = mlp if mlp is not None else effects
    for kk in (k, 1):
        out[("restoration", kk)] = select_layers(source, k=kk, by="restoration")
        out[("mediation", kk)] = select_layers(effects, k=kk, by="mediation")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweep-traces", required=True, help="trace-dataset folder of the sweep facts")
    p.add_argument("--known-traces", help="trace-dataset folder of every known fact")
    p.add_argument("--known-mlp", help="average_effects.json with MLP restoration (known facts)")
    p.add_argument("--sweep-rows", default=str(SWEEP_ROWS))
    p.add_argument("--k", type=int, default=5, help="window size (default 5, as MEMIT's)")
    args = p.parse_args()
    sweep = sweep_means(Path(args.sweep_rows))
    print("| rule | facts | layers | sweep rewrite in window | sweep NS in window "
          "| ρ(rule, rewrite) across layers | ρ(rule, NS) |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|")
    sweep_effects = average_effects(load_traces(args.sweep_traces))
    sets: list[tuple[str, AverageEffects, AverageEffects | None]] = [
        ("layer-sweep facts", sweep_effects, None)
    ]
    if args.known_traces:
        known = average_effects(load_traces(args.known_traces))
        mlp = None
        if args.known_mlp:
            mlp = AverageEffects.from_dict(json.loads(Path(args.known_mlp).read_text()))
        sets.append(("every known fact", known, mlp))
    for label, effects, mlp in sets:
        for (rule, kk), sel in rules(effects, mlp, args.k).items():
            print(window_row(f"{rule}, {label}, k={kk}", sel, sweep))
    for kk in (args.k, 1):
        for key, name in (("rewrite_score", "rewrite"), ("post_neighborhood_success", "NS")):
            start = best_window(sweep[key], kk)
            sel = LayerSelection(
                layers=list(range(start, start + kk)), k=kk, kind="sweep", token_class="",
                window_score=0.0, per_layer_effect=sweep[key].tolist(), n_facts=30,
            )  # fmt: skip
            print(window_row(f"sweep's best {name}, k={kk}", sel, sweep))
    print()
    for label, effects, mlp in sets:
        sel = rules(effects, mlp, args.k)
        print(f"**{label}**, per layer at the last subject token:\n")
        n = len(sel[("mediation", 1)].per_layer_effect)
        print("| | " + " | ".join(str(i) for i in range(n)) + " |")
        print("|---|" + "---|" * n)
        for rule in ("restoration", "mediation"):
            row = sel[(rule, 1)].per_layer_effect
            print(f"| {rule} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        print()


if __name__ == "__main__":
    main()
