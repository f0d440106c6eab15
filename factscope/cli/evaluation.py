"""Commands ``eval`` (edit and score CounterFact / zsRE cases, the scaling curve, or a
sequential stream), ``eval-table`` (one Markdown table from several runs), ``eval-curves``
(sequential runs drawn against the number of edits) and ``eval-arrival`` (a sequential run's
edits grouped by when they arrived)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from factscope.cli.common import (
    UNSET,
    add_case_selection,
    add_model,
    add_progress,
    given,
    input_file,
    load,
    nonnegative_int,
    output_folder,
    positive_int,
)

if TYPE_CHECKING:
    from editing.evaluation import EvalConfig


def _config(args: argparse.Namespace, method: str | None) -> EvalConfig:
    from editing.evaluation import EvalConfig, GenerationSettings
    from tracing.layers import parse_layers

    settings = given(args, "dataset", "n", "batch", "seed", "known_rule", "name", "split")
    if args.layers:
        settings["layers"] = parse_layers(args.layers)
    if args.hparams:
        settings["hparams"] = input_file(args.hparams, "--hparams")
    if hasattr(args, "gen_tokens"):
        settings["generation"] = (
            GenerationSettings(max_new_tokens=args.gen_tokens, sample=not args.greedy)
            if args.gen_tokens > 0
            else None
        )
    elif args.greedy:
        settings["generation"] = GenerationSettings(sample=False)
    if method is not None:
        settings["method"] = method
    config = EvalConfig(
        out_dir=output_folder(args.out),
        progress=not args.no_progress,
        only_known=not args.all_cases,
        joint=True if args.joint else None,
        **settings,
    )
    config.check()
    return config


def _sequential(args: argparse.Namespace) -> None:
    """``eval --sequential``: run or resume the stream, print the checkpoints, draw them."""
    from editing.evaluation import SequentialConfig, evaluate_sequential, load_cases
    from editing.evaluation.sequential import run_folder
    from tracing.layers import parse_layers
    from viz.heatmap import save_figure
    from viz.sequential import plot_sequential

    settings = given(args, "dataset", "n", "batch", "seed", "known_rule", "name", "split")
    settings.update(given(args, "checkpoint_every", "ppl_tokens", method="method"))
    if args.layers:
        settings["layers"] = parse_layers(args.layers)
    if args.hparams:
        settings["hparams"] = input_file(args.hparams, "--hparams")
    config = SequentialConfig(
        out_dir=output_folder(args.out),
        progress=not args.no_progress,
        only_known=not args.all_cases,
        **settings,
    )
    config.check()
    load_cases(config.dataset)
    model = load(args)
    rows = evaluate_sequential(model, config)
    print(
        "| edits | ES | PS | NS | strict ES | NS unedited | perplexity | known-fact acc | finite |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        m = r["metrics"]
        before = r.get("unedited", {}).get("neighborhood_success")
        cells = [
            m.get(k)
            for k in (
                "efficacy_success",
                "paraphrase_success",
                "neighborhood_success",
                "strict_efficacy",
            )
        ]
        pct = ["-" if v is None else f"{100 * v:.1f}" for v in [*cells, before]]
        acc = "-" if r["known_accuracy"] is None else f"{100 * r['known_accuracy']:.1f}"
        print(
            f"| {r['n_edits']} | {' | '.join(pct)} | {r['perplexity']:.2f} | {acc} "
            f"| {r['finite']} |"
        )
    folder = run_folder(config)
    out = save_figure(plot_sequential({config.method: rows}), folder / "curves.png")
    print(f"# checkpoints: {folder / 'checkpoints.jsonl'}  curves: {out}")


def cmd_curves(args: argparse.Namespace) -> None:
    """Draw the checkpoints of several sequential runs in one figure."""
    import json
    from pathlib import Path

    from editing.evaluation.results import read_jsonl
    from tracing.errors import InvalidInput
    from viz.heatmap import save_figure
    from viz.sequential import plot_sequential

    if len({Path(f).resolve() for f in args.runs}) < len(args.runs):
        raise InvalidInput("eval-curves: a run folder is given twice")
    folders, methods, rows = [], [], []
    for folder in args.runs:
        path = Path(input_file(str(Path(folder) / "checkpoints.jsonl"), "a sequential run"))
        rows.append(read_jsonl(path))
        settings = json.loads((path.parent / "run.json").read_text(encoding="utf-8"))
        folders.append(folder)
        methods.append(str(settings.get("method", path.parent.name)))
    labels = curve_labels(folders, methods)
    runs = dict(zip(labels, rows, strict=True))
    print(f"# written {save_figure(plot_sequential(runs), args.out)} ({'; '.join(labels)})")


def cmd_arrival(args: argparse.Namespace) -> None:
    """Print one metric of a sequential run's edits grouped by when they arrived."""
    from pathlib import Path

    from editing.evaluation.arrival import arrival_table
    from viz.heatmap import figure_path, save_figure
    from viz.sequential import plot_arrival

    input_file(str(Path(args.run) / "checkpoints.jsonl"), "a sequential run")
    if args.out:
        figure_path(args.out)
    table = arrival_table(args.run, args.metric)
    print(table.markdown(), end="")
    if args.out:
        print(f"# written {save_figure(plot_arrival(args.metric, table.series()), args.out)}")


def curve_labels(folders: list[str], methods: list[str]) -> list[str]:
    """One legend label per sequential run: its method, with the run folder's name where
    several runs share a method (the full path where the names also repeat), so that no
    run hides another. The folders are distinct (:func:`cmd_curves` checks)."""
    from pathlib import Path

    def label(m: str, tail: str) -> str:
        return m if methods.count(m) == 1 else f"{m} ({tail})"

    labels = [label(m, Path(f).name) for f, m in zip(folders, methods, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [label(m, str(f)) for f, m in zip(folders, methods, strict=True)]
    return labels


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a method (or several, with ``--scaling``) and print the summary."""
    from dataclasses import replace

    from editing.evaluation import evaluate, load_cases, scaling

    if args.sequential:
        _sequential(args)
        return

    given_methods = args.method.split(",") if hasattr(args, "method") else [None]
    methods = [m for m in given_methods if m != ""]
    configs = [_config(args, m) for m in methods]  # every setting checked before loading
    load_cases(configs[0].dataset)  # the dataset too
    model = load(args)
    if args.scaling:
        sizes = args.scaling
        base = configs[0] if hasattr(args, "gen_tokens") else replace(configs[0], generation=None)
        for p in scaling(model, [c.method for c in configs], sizes, base):
            cells = ", ".join(
                f"{k} {v:.3f}"
                for k, v in p.items()
                if isinstance(v, float) and k != "seconds_per_edit"
            )
            print(f"{p['method']:>10} x{p['n_edits']:<5} {cells}")
        print(f"# points written to {args.out}/scaling/points.json")
        return
    summary = evaluate(model, configs[0])
    print(summary.markdown())
    print(f"# rows: {summary.files['rows']}  summary: {summary.files['summary']}")


def _sizes(text: str) -> list[int]:
    """``--scaling``: a comma list of edit counts, each at least 1 (checked while parsing)."""
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected sizes such as 1,10,100, got {text!r}")
    return [positive_int(x) for x in parts]


def cmd_table(args: argparse.Namespace) -> None:
    """One Markdown table from several ``summary.json`` files."""
    from editing.evaluation import EvalSummary, comparison_table

    summaries = [EvalSummary.load(input_file(p, "summary")) for p in args.summaries]
    print(comparison_table(summaries), end="")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``eval``, ``eval-curves``, ``eval-arrival`` and ``eval-table``."""
    p = sub.add_parser("eval", help="evaluate an editing method on CounterFact or zsRE")
    p.add_argument(
        "--method",
        default=UNSET,
        help="a registered method (rome, the default, memit, ft-l, ...) or none; with "
        "--scaling a comma list",
    )
    p.add_argument(
        "--dataset",
        default=UNSET,
        help="counterfact (default: ten rebuilt neighbourhood prompts per case) | counterfact-1 "
        "(the one shipped neighbourhood prompt per case) | counterfact-full | zsre | zsre-alt | "
        "PATH.json (CounterFact-shaped)",
    )
    p.add_argument(
        "--n",
        "--n-cases",
        dest="n",
        type=positive_int,
        default=UNSET,
        help="number of cases (default 200; under torchrun write --n-cases)",
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        default=UNSET,
        help="edits made at once by batched methods (default 100)",
    )
    p.add_argument("--joint", action="store_true", help="edit --batch cases at once, any method")
    p.add_argument("--layers", help="layers to edit: 3-8, 2,4,6 or a select-layers JSON")
    p.add_argument("--hparams", help="hyper-parameter JSON file (default: the method's defaults)")
    p.add_argument("--out", default="results", help="output folder (default results/)")
    p.add_argument("--name", default=UNSET, help="run folder inside --out (default DATASET_METHOD)")
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap prompts in the tokenizer's chat template (instruct models; default: plain)",
    )
    add_model(p)
    add_case_selection(p)
    p.add_argument("--seed", type=nonnegative_int, default=UNSET, help="default 0")
    p.add_argument(
        "--gen-tokens",
        type=nonnegative_int,
        default=UNSET,
        help="tokens per prompt for fluency (0: none; default 40)",
    )
    p.add_argument("--greedy", action="store_true", help="greedy generation (default: top-5)")
    p.add_argument(
        "--scaling",
        type=_sizes,
        help="sizes, e.g. 1,10,100: metric vs number of edits",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="apply --batch edits after another without undo, scoring at checkpoints",
    )
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=UNSET,
        help="with --sequential: score every edit so far after this many (default 500)",
    )
    p.add_argument(
        "--ppl-tokens",
        type=positive_int,
        default=UNSET,
        help="with --sequential: held-out WikiText tokens for perplexity (default 8192)",
    )
    add_progress(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-curves", help="sequential runs against the number of edits (PNG)")
    p.add_argument("runs", nargs="+", help="run folders of eval --sequential")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_curves)

    p = sub.add_parser(
        "eval-arrival", help="a sequential run's edits grouped by when they arrived (table)"
    )
    p.add_argument("run", help="run folder of eval --sequential")
    p.add_argument(
        "--metric", default="efficacy_success", help="per-edit metric (default efficacy_success)"
    )
    p.add_argument("--out", help="also draw the cohorts' curves into this PNG file")
    p.set_defaults(func=cmd_arrival)

    p = sub.add_parser("eval-table", help="one Markdown table from several eval summaries")
    p.add_argument("summaries", nargs="+", help="summary.json files of eval runs")
    p.set_defaults(func=cmd_table)
