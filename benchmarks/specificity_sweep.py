"""Specificity sweep (issue 12, part 2): which hyper-parameter keeps an edit local?

Each named configuration is a method plus overrides of the shipped Gemma hyper-parameter files
(``editing/hparams_defaults/{rome,memit}_gemma-3-270m.json``). Every configuration is run
through the evaluation runner (:func:`editing.evaluation.evaluate`) on the same ``--n`` known
cases of CounterFact's *tuning* split with the rebuilt ten-prompt neighbourhoods (dataset
``counterfact``, label ``counterfact10``); ROME edits one case at a time, MEMIT all ``--n`` in one
batch. No fluency texts are generated (``--gen-tokens 0`` in ``factscope eval`` terms).

Overrides name fields as :func:`editing.hparams.read_hparams` takes them: top-level fields
(``layer``, ``layers``, ``mom2_n_tokens``, ``mom2_update_weight``, ``consistent_key``,
``context_templates``) or fields of the target optimisation (``kl_factor``,
``clamp_norm_factor``, ``weight_decay``, ``kl_position``, ...). A value written ``"x4"``
multiplies the shipped value by 4 (``{"kl_factor": "x16"}``).

Resumable: each configuration has its run folder ``<out>/<name>/`` (the runner resumes an
interrupted run case by case) and, once finished, one row in ``<out>/sweep.jsonl``; a rerun
skips the configurations that have a row (with the same method, overrides and n). It prints a
Markdown table (also written to ``<out>/sweep.md``) and draws neighbourhood-success drop against
paraphrase success (``--plot``, default ``docs/specificity_sweep.png``). The configurations
and their parsing are in ``benchmarks/specificity_configs.py`` next to this script, the rows,
table and plot in ``benchmarks/specificity_report.py``.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/specificity_sweep.py --n 30
    .venv/bin/python benchmarks/specificity_sweep.py --list
    .venv/bin/python benchmarks/specificity_sweep.py --only rome_default,rome_kl_x16
    .venv/bin/python benchmarks/specificity_sweep.py --add 'rome_mine:rome:kl_factor=x2;layer=3'
    .venv/bin/python benchmarks/specificity_sweep.py --report   # table and plot from the rows
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from editing.evaluation.results import append_rows, read_jsonl
from tracing.io import write_text_atomic

if str(Path(__file__).resolve().parent) not in sys.path:  # the helper modules next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
# (resolve_overrides: re-exported, the tests call it through this script)
from specificity_configs import (  # noqa: E402
    CONFIGS,
    MODEL,
    SweepConfig,
    available,
    check_configs,
    parse_config,
)
from specificity_configs import resolve_overrides as resolve_overrides  # noqa: E402
from specificity_report import markdown_table, plot_sweep, summary_row  # noqa: E402

log = logging.getLogger("specificity_sweep")

#: Subjects whose keys make ``C_subj`` (see :func:`subject_key_moment`).
N_SUBJECTS = 2000

# --------------------------------------------------------------------------- subject covariance


def subject_pool(n_subjects: int) -> list[Any]:
    """``n_subjects`` CounterFact cases of the evaluation split with distinct subjects, none of
    which is a tuning case's subject or appears in any tuning case's neighbourhood prompt
    (so ``C_subj`` never holds the keys the sweep's neighbourhood scores read)."""
    from editing.evaluation.tasks import load_cases, split_cases

    label, _, cases = load_cases("counterfact")
    tuning = split_cases(label, cases, "tuning")
    held = {c.record.subject for c in tuning}
    prompts = "\n".join(p for c in tuning for p in c.record.neighborhood_prompts)
    pool: list[Any] = []
    for c in split_cases(label, cases, "eval"):
        subject = c.record.subject
        if subject in held or subject in prompts:
            continue
        held.add(subject)
        pool.append(c)
        if len(pool) == n_subjects:
            break
    return pool


def subject_key_moment(
    model: Any, layer: int, cases: Sequence[Any]
) -> Float[torch.Tensor, "d_mlp d_mlp"]:
    """``C_subj = mean_s k_s k_s^T`` over the cases' MLP keys at ``layer`` read at the
    subject's last token of each case's own prompt (float64 sums, float32 result)."""
    from editing.evaluation.tasks import TASKS
    from editing.requests.prepared import prepare_requests
    from editing.statistics.keys import subject_keys

    task = TASKS["counterfact"]
    prepared = prepare_requests(model, [task.request(c) for c in cases])
    keys = subject_keys(model, prepared, layer, templated=False).double()
    return (keys.T @ keys / len(cases)).float()


def weighted_stats(
    model: Any, hp: Any, weight: float, subject_moment: Float[torch.Tensor, "d_mlp d_mlp"]
) -> dict[int, torch.Tensor]:
    """``{layer: (1 - weight) C + weight C_subj}`` for ROME's layer, ``C`` the corpus second
    moment ``hp`` names (read from the statistics cache or computed)."""
    from editing.statistics.stats import layer_second_moments

    layer = hp.layers[0]
    c = layer_second_moments(
        model,
        [layer],
        n_tokens=hp.mom2_n_tokens,
        corpus=hp.corpus,
        dtype=hp.mom2_dtype,
        progress=False,
    )[layer].mom2
    mixed = (1 - weight) * c.double() + weight * subject_moment.to(c.device, torch.float64)
    return {layer: mixed.to(c.dtype)}


def _subject_edit_fn(model: Any, config: SweepConfig, overrides: dict, out: Path) -> Any:
    """``make_edit`` with the subject-weighted statistics of ``config`` (``C_subj`` cached in
    ``out`` per layer)."""
    from safetensors.torch import load_file, save_file

    from editing.api import make_edit, resolve_hparams

    hp = resolve_hparams(model, config.method, overrides or None)
    layer = hp.layers[0]
    path = out / f"subject_keys_layer{layer}_n{N_SUBJECTS}.safetensors"
    if path.exists():
        moment = load_file(str(path))["mom2"]
    else:
        moment = subject_key_moment(model, layer, subject_pool(N_SUBJECTS))
        save_file({"mom2": moment.contiguous()}, str(path))
    return functools.partial(
        make_edit, stats=weighted_stats(model, hp, config.subject_weight, moment)
    )


# --------------------------------------------------------------------------- running


def read_rows(path: Path) -> dict[str, dict]:
    """Finished rows by configuration name (a later line replaces an earlier one)."""
    return {r["name"]: r for r in read_jsonl(path)}


def is_done(row: Mapping[str, Any] | None, config: SweepConfig, overrides: dict, n: int) -> bool:
    """Whether ``row`` is this configuration's finished run on ``n`` requested cases."""
    return (
        row is not None
        and row.get("method") == config.method
        and row.get("overrides") == overrides
        and row.get("subject_weight", 0.0) == config.subject_weight
        and row.get("n_requested", row.get("n")) == n
    )


def run_sweep(
    configs: Sequence[SweepConfig],
    out: Path,
    n: int,
    *,
    model: Any = None,
    model_name: str = MODEL,
    evaluate_fn: Callable[..., Any] | None = None,
) -> list[dict]:
    """Run (or skip, when finished) every configuration; the rows in ``configs`` order. A
    configuration that raises is logged and left without a row (a rerun retries it).

    ``model``: the loaded model (default: load ``model_name`` when something is left to run);
    ``evaluate_fn`` replaces :func:`editing.evaluation.evaluate` (tests)."""
    from tqdm.auto import tqdm

    from editing.evaluation import EvalConfig, evaluate

    resolved = check_configs(configs, model_name)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "sweep.jsonl"
    done = read_rows(rows_path)
    todo = [c for c in configs if not is_done(done.get(c.name), c, resolved[c.name], n)]
    if todo and model is None:
        from tracing.models import load_model

        model = load_model(model_name)
    run = evaluate_fn or evaluate
    for c in tqdm(todo, desc="sweep"):
        t0 = time.perf_counter()
        log.info("configuration %s (%s %s)", c.name, c.method, resolved[c.name])
        cfg = EvalConfig(
            dataset="counterfact",
            method=c.method,
            n=n,
            batch=n,
            hparams=resolved[c.name] or None,
            out_dir=out,
            name=c.name,
            split="tuning",
            generation=None,
        )
        try:
            extra = {}
            if c.subject_weight:
                extra["edit_fn"] = _subject_edit_fn(model, c, resolved[c.name], out)
            summary = run(model, cfg, **extra)
        except Exception:  # one configuration's failure does not stop the sweep
            log.exception("configuration %s failed; its rows so far stay on disk", c.name)
            continue
        row = summary_row(c, resolved[c.name], summary)
        row.update(n_requested=n, wall_seconds=time.perf_counter() - t0)
        append_rows(rows_path, [row])
        done[c.name] = row
    return [done[c.name] for c in configs if c.name in done]


def report(rows: Sequence[Mapping[str, Any]], out: Path, plot: Path | None) -> str:
    """Write ``<out>/sweep.md`` and the plot; return the table."""
    from viz.heatmap import save_figure

    table = markdown_table(rows)
    write_text_atomic(out / "sweep.md", table)
    if plot is not None and any(r.get("ns_drop") is not None for r in rows):
        save_figure(plot_sweep(rows), plot)
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="known tuning cases per configuration")
    parser.add_argument("--out", default="benchmarks/results/specificity")
    parser.add_argument("--only", help="comma list of configuration names to run")
    parser.add_argument("--add", action="append", default=[], help="NAME:METHOD:key=value;...")
    parser.add_argument("--plot", default="docs/specificity_sweep.png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--report", action="store_true", help="table and plot of finished rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    configs = [c for c in CONFIGS if available(c)] + [parse_config(s) for s in args.add]
    if args.only:
        wanted = {x.strip() for x in args.only.split(",") if x.strip()}
        unknown = wanted - {c.name for c in configs}
        if unknown:
            raise SystemExit(f"unknown configuration(s) {sorted(unknown)}")
        configs = [c for c in configs if c.name in wanted]
    resolved = check_configs(configs)
    if args.list:
        for c in configs:
            print(f"{c.name:24} {c.method:6} {json.dumps(resolved[c.name])}  # {c.note}")
        return
    out = Path(args.out)
    if args.report:
        done = read_rows(out / "sweep.jsonl")
        rows = [done[c.name] for c in configs if c.name in done]
    else:
        torch.set_num_threads(args.threads)
        rows = run_sweep(configs, out, args.n)
    print(report(rows, out, Path(args.plot) if args.plot else None), end="")


if __name__ == "__main__":
    main()
