"""Benchmark: attribution patching (``atp``, ``atp+exact``) against exact causal tracing.

Over the first N known facts the model answers correctly (top-1), each fact is traced three
ways with the same noise (exact ``fast`` engine, ``atp``, ``atp+exact``; all three kinds) and
the traces are kept on disk (``--out``/<known_id>/{fast,atp,atp+exact}.json), so an
interrupted run resumes where it stopped. Then, per kind:

* Spearman correlation of AtP and exact scores over the cells AtP estimates (tokens from the
  subject on; median and mean over facts), and the share of facts where it is below 0.5;
* overlap of the 10 highest-scoring cells (AtP vs exact), mean over facts;
* whether ``atp+exact``'s peak is the exact trace's peak, and the largest difference of its
  exact cells from the exact trace;
* whether ``select_layers`` (k = 5, last subject token) picks the same window from the AtP
  and from the atp+exact traces as from the exact ones;
* seconds per fact of each method.

Then the Space Needle fact: three-kind ``atp`` and ``atp+exact`` times against the exact
engine's (and the papers' code's 417 s). Prints markdown tables.

    nice -n 10 .venv/bin/python benchmarks/atp_agreement.py --n 20
    .venv/bin/python benchmarks/atp_agreement.py --n 100 --out runs/atp_agreement
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tracing.facts import Fact, known_facts, load_known_facts
from tracing.localization import average_effects, select_layers
from tracing.models import load_model
from tracing.results import KINDS, TraceResult
from tracing.trace import trace_fact

METHODS = ("fast", "atp", "atp+exact")
PROMPT = "The Space Needle is located in the city of"
SUBJECT = "The Space Needle"
PAPERS_CODE_SECONDS = 417.0  # the papers' causal_trace.py, same trace, this machine (anchors)


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` (0-based), ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    ra, rb = ranks(np.ravel(a)), ranks(np.ravel(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Share of the ``k`` highest cells of ``a`` that are among the ``k`` highest of ``b``."""
    top_a = set(np.argsort(-np.ravel(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.ravel(b), kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def trace_all(model, facts: list[Fact], out: Path, samples: int) -> list[dict[str, TraceResult]]:
    """Each fact traced with every method; traces on disk are loaded instead (resumable)."""
    traces = []
    for i, fact in enumerate(tqdm(facts, desc="facts")):
        folder = out / f"{fact.known_id if fact.known_id is not None else i:05d}"
        per: dict[str, TraceResult] = {}
        for method in METHODS:
            path = folder / f"{method}.json"
            if path.is_file():
                per[method] = TraceResult.load(path)
                continue
            per[method] = trace_fact(
                model, fact.prompt, fact.subject, fact.answer, samples=samples, method=method
            )
            per[method].save(path)
        traces.append(per)
    return traces


def agreement(traces: list[dict[str, TraceResult]]) -> list[dict]:
    """Per-kind agreement rows (see the module doc)."""
    rows = []
    for kind in KINDS:
        rho, overlap, same_peak, worst = [], [], [], 0.0
        for per in traces:
            exact, atp, mixed = per["fast"], per["atp"], per["atp+exact"]
            start = exact.subject_span[0]
            rho.append(spearman(atp.scores[kind][start:], exact.scores[kind][start:]))
            overlap.append(top_overlap(atp.scores[kind], exact.scores[kind]))
            same_peak.append(mixed.peak(kind)[:2] == exact.peak(kind)[:2])
            mask = mixed.exact_mask(kind)
            worst = max(worst, float(np.abs(mixed.scores[kind] - exact.scores[kind])[mask].max()))
        windows = {
            m: select_layers(average_effects([p[m] for p in traces]), kind=kind).layers
            for m in METHODS
        }
        r = np.array(rho)
        rows.append(
            {
                "kind": kind,
                "rho_median": float(np.nanmedian(r)),
                "rho_mean": float(np.nanmean(r)),
                "rho_below_half": float(np.mean(r[~np.isnan(r)] < 0.5)),
                "top10": float(np.mean(overlap)),
                "peak_same": float(np.mean(same_peak)),
                "max_exact_diff": worst,
                "windows": windows,
            }
        )
    return rows


def space_needle(model, samples: int) -> dict[str, float]:
    """Seconds of a three-kind trace of the Space Needle fact with each method."""
    times = {}
    for method in METHODS:
        t0 = time.perf_counter()
        trace_fact(model, PROMPT, SUBJECT, " Seattle", samples=samples, method=method)
        times[method] = time.perf_counter() - t0
        print(f"Space Needle: {method} {times[method]:.1f} s", flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="known facts (default 100)")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/atp_agreement", help="per-fact traces (resumable)")
    ap.add_argument("--skip-space-needle", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    trace_fact(model, PROMPT, SUBJECT, samples=1, kinds=("resid",), method="atp")  # warm up
    times = None if args.skip_space_needle else space_needle(model, args.samples)
    facts = known_facts(model, load_known_facts())[: args.n]
    traces = trace_all(model, facts, Path(args.out), args.samples)
    rows = agreement(traces)
    print(f"\n{len(traces)} known facts, {args.model}, {args.samples} noise samples, 3s noise")
    print(
        "| kind | Spearman median | mean | facts < 0.5 | top-10 overlap | atp+exact peak = "
        "exact peak | max abs diff, exact cells | select_layers exact / atp / atp+exact |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        w = " / ".join(f"{v[0]}-{v[-1]}" for v in r["windows"].values())
        print(
            f"| {r['kind']} | {r['rho_median']:.3f} | {r['rho_mean']:.3f} | "
            f"{r['rho_below_half']:.0%} | {r['top10']:.2f} | {r['peak_same']:.0%} | "
            f"{r['max_exact_diff']:.1e} | {w} |"
        )
    seconds = {m: float(np.mean([p[m].seconds for p in traces])) for m in METHODS}
    print(
        "\nmean seconds per fact (three kinds): "
        + ", ".join(f"{m} {s:.1f}" for m, s in seconds.items())
    )
    low = sorted(traces, key=lambda p: spearman(p["atp"].scores["mlp"], p["fast"].scores["mlp"]))
    print("\nlowest mlp agreement (where AtP fails): p_clean, p_corrupted, Spearman")
    for p in low[:5]:
        rho = spearman(p["atp"].scores["mlp"], p["fast"].scores["mlp"])
        print(
            f"  {p['fast'].prompt!r}: {p['fast'].p_clean:.3f}, {p['fast'].p_corrupted:.3f}, "
            f"{rho:.2f}"
        )
    if times is not None:
        exact = times["fast"]
        print("\n| Space Needle, three kinds | seconds | vs exact engine | vs papers' code |")
        print("|---|---|---|---|")
        for m, s in times.items():
            print(f"| {m} | {s:.2f} | {exact / s:.1f}x | {PAPERS_CODE_SECONDS / s:.0f}x |")


if __name__ == "__main__":
    main()
