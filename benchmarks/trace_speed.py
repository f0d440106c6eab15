"""Benchmark: a full three-kind causal trace of one fact, fast engine vs the reference
algorithm (same noise), on the embedded model and on a GPT-2-small-sized random model.

Prints seconds for each engine, the speed-up and the largest probability difference. With
``--fast-only`` the reference engine is not run: the embedded model's trace is compared with
the papers' own code instead (417 s here and its arrays: tests/anchors, docs/ANCHORS.md).

    .venv/bin/python benchmarks/trace_speed.py [--skip-gemma] [--skip-gpt2] [--samples 10]
    .venv/bin/python benchmarks/trace_speed.py --fast-only --skip-gpt2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tracing.models import load_model
from tracing.toy_models import build_toy_model
from tracing.trace import trace_fact

PROMPT = "The Space Needle is located in the city of"
SUBJECT = "The Space Needle"
ANCHORS = Path(__file__).resolve().parents[1] / "tests" / "anchors"
PAPERS_CODE_SECONDS = 417.0  # the papers' causal_trace.py, same trace, this machine (anchors)


def bench_against_anchors(model, samples: int) -> dict:
    """The fast engine's trace of the anchor fact, timed, against the papers' code's arrays."""
    t0 = time.perf_counter()
    result = trace_fact(model, PROMPT, SUBJECT, " Seattle", samples=samples, seed=1)
    seconds = time.perf_counter() - t0
    names = {"resid": "hidden", "mlp": "mlp", "attn": "attn"}
    max_dp = max(
        float(np.abs(result.scores[k] - np.load(ANCHORS / f"gemma_scores_{n}.npy")).max())
        for k, n in names.items()
    )
    print(f"gemma-3-270m: fast engine {seconds:.1f} s", flush=True)
    return {
        "model": "gemma-3-270m",
        "tokens": len(result.tokens),
        "fast": seconds,
        "reference": PAPERS_CODE_SECONDS,
        "speedup": PAPERS_CODE_SECONDS / seconds,
        "max_dp": max_dp,
    }


def bench(model, label: str, samples: int, noise) -> dict:
    row: dict[str, Any] = {"model": label}
    results = {}
    for method in ("fast", "reference"):
        t0 = time.perf_counter()
        results[method] = trace_fact(
            model, PROMPT, SUBJECT, samples=samples, noise=noise, method=method
        )
        row[method] = time.perf_counter() - t0
        print(f"{label}: {method} engine {row[method]:.1f} s", flush=True)
    row["speedup"] = row["reference"] / row["fast"]
    row["max_dp"] = max(
        float(np.abs(results["fast"].scores[k] - results["reference"].scores[k]).max())
        for k in ("resid", "mlp", "attn")
    )
    row["tokens"] = len(results["fast"].tokens)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-gemma", action="store_true")
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--fast-only",
        action="store_true",
        help="embedded model: compare with the papers' code (anchors) instead of running the "
        "reference engine",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if not args.skip_gemma:
        model = load_model("gemma-3-270m")
        trace_fact(model, PROMPT, SUBJECT, samples=1, kinds=("resid",))  # warm up, sigma cache
        if args.fast_only:
            rows.append(bench_against_anchors(model, args.samples))
        else:
            rows.append(bench(model, "gemma-3-270m", args.samples, "3s"))
        del model
    if not args.skip_gpt2:
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_toy_model("gpt2", tmp, size="small")
            model = load_model(str(folder))
            trace_fact(model, PROMPT, SUBJECT, samples=1, kinds=("resid",), noise=0.1)
            rows.append(bench(model, "random GPT-2-small (12 layers)", args.samples, 0.1))
    print(
        f"\nfull trace (resid + mlp + attn), {args.samples} noise samples, "
        f"{torch.get_num_threads()} threads"
    )
    reference = "papers' code s (anchor)" if args.fast_only else "reference s"
    print(f"| model | tokens | fast s | {reference} | speed-up | max abs dp |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['tokens']} | {r['fast']:.1f} | {r['reference']:.1f} | "
            f"{r['speedup']:.1f}x | {r['max_dp']:.2e} |"
        )


if __name__ == "__main__":
    main()
