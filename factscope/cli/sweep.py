"""Command ``layer-sweep``: ROME at every layer for N CounterFact facts beside each fact's
causal trace (Hase et al. 2023), resumable; ``--report`` redraws a finished folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from factscope.cli.common import (
    UNSET,
    add_case_selection,
    add_model,
    add_progress,
    given,
    input_file,
    load,
    nonnegative_int,
    positive_int,
)

FIGURE = "layer_sweep.png"


def _draw(folder: Path, summary: dict[str, Any]) -> Path:
    """The figure of a sweep folder, from its summary and rows."""
    from editing.evaluation.layer_sweep import read_sweep_rows
    from viz.heatmap import save_figure
    from viz.layer_sweep import plot_layer_sweep

    keep = set(summary["case_ids"])
    rows = [r for r in read_sweep_rows(folder) if int(r["case_id"]) in keep]
    fig = plot_layer_sweep(
        summary["layer_means"], rows, title=f"Layer sweep: {len(keep)} facts, ROME"
    )
    return save_figure(fig, folder / FIGURE)


def cmd_layer_sweep(args: argparse.Namespace) -> None:
    """Run (or resume) a sweep, or with ``--report`` redo a finished one's summary and
    figure; print the table."""
    from editing.evaluation.layer_sweep import (
        SweepConfig,
        check_sweep_folder,
        rewrite_report,
        run_layer_sweep,
    )
    from editing.evaluation.tasks import load_cases

    out = check_sweep_folder(args.out)
    if args.report:
        summary = rewrite_report(out)
    else:
        settings = given(args, "dataset", "n", "layers", "split", "seed", "samples", "noise")
        settings.update(given(args, "known_rule", trace_seed="trace_seed"))
        if args.hparams:
            settings["hparams"] = input_file(args.hparams, "--hparams")
        config = SweepConfig(
            out_dir=out, only_known=not args.all_cases, progress=not args.no_progress, **settings
        )
        config.check()  # every setting, and the dataset, before the model loads
        load_cases(config.dataset)
        summary = run_layer_sweep(load(args), config)
    figure = _draw(out, summary)
    print((out / "summary.md").read_text(encoding="utf-8"), end="")
    print(f"# rows: {out / 'rows.jsonl'}  summary: {out / 'summary.json'}  figure: {figure}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``layer-sweep``."""
    p = sub.add_parser(
        "layer-sweep",
        help="ROME at every layer beside each fact's causal trace (Hase et al. 2023)",
    )
    p.add_argument("--out", required=True, help="the run folder (new, empty, or a sweep's)")
    p.add_argument(
        "--n",
        "--n-cases",
        dest="n",
        type=positive_int,
        default=UNSET,
        help="number of CounterFact facts (default 10)",
    )
    p.add_argument(
        "--layers",
        default=UNSET,
        help="layers to edit: 0-17, 2,4,6 or a select-layers JSON (default: every layer ROME "
        "can edit)",
    )
    p.add_argument(
        "--dataset",
        default=UNSET,
        help="counterfact (default) | counterfact-1 | counterfact-full | PATH.json",
    )
    add_case_selection(p)
    p.add_argument("--hparams", help="ROME hyper-parameter JSON (default: the model's)")
    p.add_argument("--seed", type=nonnegative_int, default=UNSET, help="edit seed (default 0)")
    p.add_argument(
        "--samples", type=positive_int, default=UNSET, help="noisy runs per trace (default 10)"
    )
    p.add_argument("--noise", default=UNSET, help="trace noise: 3s (default) or a number")
    p.add_argument(
        "--trace-seed", type=nonnegative_int, default=UNSET, help="trace noise seed (default 1)"
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="no model: redo the summary, table and figure of a finished --out folder",
    )
    add_model(p)
    add_progress(p)
    p.set_defaults(func=cmd_layer_sweep)
