"""Seconds per evaluated case for each editing method on the embedded model.

Runs :func:`editing.evaluation.evaluate` on the first ``--n`` known CounterFact cases per method
(MEMIT: one batch of all ``--n``) in a fresh temporary folder and prints a table: seconds per
edit (the method's own computation), seconds of scoring + generation on the edited model per
case, seconds per case overall, and the unedited-model costs measured separately (scoring
all cases in one batch; generating their fluency texts in one batch).

    .venv/bin/python benchmarks/eval_speed.py --n 5 --methods none,rome,memit,ft-l

``--scoring N`` prints only the teacher-forced scoring of the first N CounterFact cases (every
prompt of each case against its new and true targets) on the unedited model: seconds,
sequences run and the sum of the log-probabilities read (equal sums: the same scores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from editing.evaluation.cases import UneditedCache, select_cases
from editing.evaluation.generation import GenerationSettings
from editing.evaluation.runner import evaluate
from editing.evaluation.scoring import ModelScorer
from editing.evaluation.tasks import load_cases
from tracing.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--n", type=int, default=5, help="cases per method")
    parser.add_argument("--methods", default="none,rome,memit,ft-l")
    parser.add_argument("--gen-tokens", type=int, default=40)
    parser.add_argument("--out", help="output folder (default: a temporary one)")
    parser.add_argument("--scoring", type=int, help="only time scoring of the first N cases")
    args = parser.parse_args()
    if args.scoring:
        bench_scoring(args.model, args.scoring)
        return
    gen = GenerationSettings(max_new_tokens=args.gen_tokens) if args.gen_tokens > 0 else None
    model = load_model(args.model)
    out = Path(args.out or tempfile.mkdtemp(prefix="eval_speed_"))

    # the unedited model's costs, measured on their own
    _, task, cases = load_cases("counterfact")
    cache = UneditedCache(out / "bench_unedited.jsonl", task, ModelScorer(model), model)
    t = time.perf_counter()
    selected, _, _ = select_cases(model, task, cases, args.n, True, "prefers", cache)
    t_score = (time.perf_counter() - t) / len(selected)
    t = time.perf_counter()
    if gen:
        cache.get_texts([c for c, _ in selected], gen, 0)
    t_gen = (time.perf_counter() - t) / len(selected)
    print(
        f"unedited model, per case: selection + scoring {t_score:.2f} s "
        f"(includes cases dropped as unknown), fluency generation {t_gen:.2f} s "
        f"({args.gen_tokens} tokens x 2 prompts, batched)"
    )

    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        t = time.perf_counter()
        s = evaluate(
            model,
            dataset="counterfact",
            method=method,
            n=args.n,
            batch=args.n,
            out_dir=out,
            generation=gen,
            progress=False,
        )
        wall = time.perf_counter() - t
        rows.append(
            (
                method,
                s.batch,
                s.n,
                s.seconds_per_edit,
                s.seconds_per_case,
                wall / s.n,
                s.edited.get("efficacy_success"),
            )
        )
    print(f"\nmodel {args.model}, {args.n} CounterFact cases per method, output {out}")
    print(
        f"{'method':<8} {'batch':>5} {'n':>3} {'s/edit':>8} {'s/case':>8} "
        f"{'wall/case':>9} {'ES':>6}"
    )
    for method, batch, n, se, sc, wall, es in rows:
        se_txt = f"{se:8.2f}" if se is not None else f"{'-':>8}"
        print(f"{method:<8} {batch:>5} {n:>3} {se_txt} {sc:8.2f} {wall:9.2f} {es:6.2f}")


def bench_scoring(model_name: str, n: int) -> None:
    from editing.evaluation.metrics import score_counterfact

    model = load_model(model_name)
    _, _, cases = load_cases("counterfact")
    records = [c.record for c in cases[:n]]
    scorer = ModelScorer(model)
    score_counterfact(scorer, records[:4])  # warm
    scorer.sequences_run = 0
    t = time.perf_counter()
    scores = score_counterfact(scorer, records)
    seconds = time.perf_counter() - t
    total = sum(
        sum(ts.logprobs)
        for sc in scores
        for ts in (
            sc.rewrite_new,
            sc.rewrite_true,
            *sc.paraphrase_new,
            *sc.paraphrase_true,
            *sc.neighborhood_new,
            *sc.neighborhood_true,
        )
    )
    print("| cases | sequences | seconds | s / case | sum of log-probabilities |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {n} | {scorer.sequences_run} | {seconds:.1f} | {seconds / n:.2f} | {total:.4f} |")


if __name__ == "__main__":
    main()
