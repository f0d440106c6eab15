"""The ``factscope`` command line: parses arguments, calls the library, prints results.

Every sub-command exits 0 on success and 2 with a one-line ``error: ...`` on bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from factscope import __version__


class CliError(Exception):
    """Bad input detected by the CLI itself (exit code 2)."""


# --------------------------------------------------------------------------- models, predict


def cmd_models(args: argparse.Namespace) -> None:
    from tracing.models import available_models

    rows = available_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        extra = f"  ({r['how']})" if r["how"] else ""
        print(f"{r['name']:<{width}}  {r['status']:<14}  {r['description']}{extra}")


def cmd_predict(args: argparse.Namespace) -> None:
    from tracing.models import load_model, top_k

    model = load_model(args.model)
    if args.edit:
        from editing.edit import Edit

        edit = Edit.load(args.edit)
        edit.apply(model)
        print(f"# with edit {args.edit} ({edit.method}, {len(edit.requests)} request(s))")
    for prompt in args.prompts:
        print(prompt)
        for token, p in top_k(model, prompt, args.k):
            print(f"  {p:8.4f}  {token!r}")


def _add_models_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models that can be loaded here (no network)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("predict", help="top-k next tokens after each prompt")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("-k", type=int, default=5, help="how many tokens to show (default 5)")
    p.add_argument("--model", default="gemma-3-270m", help="model name or local folder")
    p.add_argument("--edit", help="folder of a saved edit to apply first")
    p.set_defaults(func=cmd_predict)


# --------------------------------------------------------------------------- tracing
# (trace, trace-dataset, select-layers)


def cmd_trace(args: argparse.Namespace) -> None:
    from tracing.models import load_model
    from tracing.trace import trace_fact
    from viz.heatmap import plot_trace, save_figure
    from viz.interactive import trace_figure, write_html

    model = load_model(args.model)
    window = {"resid": args.resid_window, "mlp": args.window, "attn": args.window}
    result = trace_fact(
        model,
        args.prompt,
        args.subject,
        args.answer,
        kinds=args.kinds,
        window=window,
        noise=_noise_arg(args.noise),
        uniform_noise=args.uniform,
        samples=args.samples,
        seed=args.seed,
        occurrence=args.occurrence,
        method=args.method,
        progress=not args.no_progress,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "trace.json")
    fig = plot_trace(result)
    for suffix in args.formats:
        save_figure(fig, out / f"trace.{suffix}")
    write_html(trace_figure(result), out / "trace.html")
    print(f"prompt      {result.prompt!r}  (subject {result.subject!r})")
    print(f"answer      {result.answer!r}")
    print(f"p_clean     {result.p_clean:.4f}")
    print(f"p_corrupted {result.p_corrupted:.4f}  (noise {result.settings.noise:.4f})")
    for note in result.notes:
        print(f"note        {note}")
    for kind in result.scores:
        t, layer, p = result.peak(kind)
        print(f"peak {kind:<6} token {t} {result.tokens[t]!r} layer {layer}: p = {p:.4f}")
    print(
        f"{result.seconds:.1f} s; wrote {out}/trace.json, trace.html, "
        + ", ".join(f"trace.{s}" for s in args.formats)
    )


def _noise_arg(text: str) -> str | float:
    try:
        return float(text)
    except ValueError:
        return text


def cmd_trace_dataset(args: argparse.Namespace) -> None:
    from tracing.dataset import average_effects, save_effects, trace_dataset
    from tracing.facts import load_known_facts
    from tracing.models import load_model
    from viz.heatmap import save_figure
    from viz.plots import plot_average_effects

    model = load_model(args.model)
    facts = load_known_facts(args.facts) if args.facts else None
    results = trace_dataset(
        model,
        facts,
        n=args.n,
        out_dir=args.out,
        only_known=not args.all_facts,
        kinds=args.kinds,
        window={"resid": 1, "mlp": args.window, "attn": args.window},
        noise=_noise_arg(args.noise),
        samples=args.samples,
        seed=args.seed,
        progress=not args.no_progress,
    )
    effects = average_effects(results)
    out = Path(args.out)
    save_effects(effects, out / "average_effects.json")
    save_figure(plot_average_effects(effects), out / "average_effects.png")
    print(
        f"traced {effects.n_facts} facts; mean p_clean {effects.mean_p_clean:.3f}, "
        f"mean p_corrupted {effects.mean_p_corrupted:.3f}"
    )
    _print_effects(effects)
    print(f"wrote {out}/traces/, average_effects.json, average_effects.png")


def _print_effects(effects) -> None:
    for kind, per in effects.effects.items():
        print(f"{kind}: average indirect effect per layer")
        for cls, values in per.items():
            row = " ".join(f"{v:6.3f}" for v in values)
            print(f"  {cls:<17} (n={effects.counts[kind][cls]:4d}) {row}")


def cmd_select_layers(args: argparse.Namespace) -> None:
    from tracing.dataset import average_effects, load_traces, select_layers

    effects = average_effects(load_traces(args.runs))
    sel = select_layers(effects, k=args.k, kind=args.kind, token_class=args.token_class)
    out = Path(args.out) if args.out else Path(args.runs) / "layers.json"
    sel.save(out)
    effect = " ".join(f"{v:.3f}" for v in sel.per_layer_effect)
    print(f"average {sel.kind} effect at {sel.token_class} over {sel.n_facts} facts: {effect}")
    print(f"selected layers {sel.layers[0]}-{sel.layers[-1]} (mean effect {sel.window_score:.4f})")
    print(f"wrote {out}  (use: factscope edit --layers {out})")


def _add_tracing_commands(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="gemma-3-270m", help="model name or local folder")
        p.add_argument(
            "--kinds", nargs="+", default=["resid", "mlp", "attn"], choices=["resid", "mlp", "attn"]
        )
        p.add_argument("--window", type=int, default=10, help="mlp/attn window (default 10)")
        p.add_argument(
            "--noise",
            default="3s",
            help="noise std: multiple of sigma like 3s (default) or a number",
        )
        p.add_argument("--samples", type=int, default=10, help="noisy runs (default 10)")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("trace", help="causal trace of one fact: heatmaps (PNG, HTML) and JSON")
    p.add_argument("prompt")
    p.add_argument("--subject", required=True, help="the subject, exactly as in the prompt")
    p.add_argument("--answer", help="answer to trace (default: the model's top-1 token)")
    p.add_argument("--occurrence", type=int, default=0, help="which occurrence of the subject")
    p.add_argument("--resid-window", type=int, default=1)
    p.add_argument("--uniform", action="store_true", help="uniform instead of Gaussian noise")
    p.add_argument("--method", choices=["fast", "reference"], default="fast")
    p.add_argument("--formats", nargs="+", default=["png", "svg"], choices=["png", "svg", "pdf"])
    p.add_argument("--out", default="out", help="output folder (default out/)")
    common(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("trace-dataset", help="trace many known facts (resumable), average")
    p.add_argument("--n", type=int, default=200, help="number of facts (default 200)")
    p.add_argument("--facts", help="JSON list of facts (default: shipped known_1000)")
    p.add_argument("--all-facts", action="store_true", help="also facts the model gets wrong")
    p.add_argument("--out", default="runs", help="output folder (default runs/)")
    common(p)
    p.set_defaults(func=cmd_trace_dataset)

    p = sub.add_parser("select-layers", help="pick the contiguous MLP layers to edit")
    p.add_argument("runs", help="folder written by trace-dataset")
    p.add_argument("--k", type=int, default=5, help="window size (default 5)")
    p.add_argument("--kind", default="mlp", choices=["resid", "mlp", "attn"])
    p.add_argument("--token-class", default="last_subject")
    p.add_argument("--out", help="output JSON (default RUNS/layers.json)")
    p.set_defaults(func=cmd_select_layers)


# --------------------------------------------------------------------------- editing
# (stats, edit)


def _add_editing_commands(sub: argparse._SubParsersAction) -> None:
    def cmd_stats(args: argparse.Namespace) -> None:
        from pathlib import Path

        from editing.hparams import parse_layers
        from editing.stats import layer_second_moments, stats_dir
        from tracing.models import load_model

        layers = parse_layers(args.layers)
        model = load_model(args.model)
        kw = dict(
            n_tokens=args.tokens,
            corpus=args.corpus,
            dtype=args.dtype,
            seq_len=args.seq_len,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        )
        stats = layer_second_moments(
            model, layers, batch_size=args.batch_size, progress=not args.no_progress, **kw
        )
        print(f"# E[k k^T] of the MLP down-projection input, {args.model}, {args.dtype}")
        print(f"cache: {stats_dir(model, **kw)}")
        print(f"{'layer':>5}  {'tokens':>8}  {'trace':>12}  {'top eig':>12}  {'min eig':>11}")
        for L, s in stats.items():
            info = s.summary()
            print(
                f"{L:>5}  {s.count:>8}  {info['trace']:>12.5g}  {info['top_eigenvalue']:>12.5g}"
                f"  {info['min_eigenvalue']:>11.4g}"
            )

    p = sub.add_parser(
        "stats",
        help="second-moment statistics E[kk^T] of MLP keys (one pass, cached, resumable)",
    )
    p.add_argument("--layers", required=True, help="layers: 3-8, 3,5,7 or 4")
    p.add_argument("--tokens", type=int, default=100_000, help="corpus tokens (default 100000)")
    p.add_argument("--model", default="gemma-3-270m", help="model name or local folder")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--corpus", default="wikitext", help="wikitext, wikitext-test, wikitext-valid or a .txt"
    )
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--cache-dir", help="statistics cache folder (default: <FACTSCOPE_CACHE>/stats)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_stats)

    def cmd_edit(args: argparse.Namespace) -> None:
        import time

        from editing.api import make_edit
        from editing.hparams import parse_layers
        from editing.requests import load_requests
        from tracing.models import load_model

        requests = load_requests(args.requests)
        if args.layers in (None, "auto"):
            layers = None
        elif args.layers.endswith(".json"):
            from tracing.results import LayerSelection

            layers = LayerSelection.load(args.layers).layers
        else:
            layers = parse_layers(args.layers)
        model = load_model(args.model)
        t0 = time.perf_counter()
        edit = make_edit(
            model, requests, args.method, args.hparams, layers=layers, progress=not args.no_progress
        )
        folder = edit.save(args.out)
        print(f"{edit.method} edit of {len(requests)} request(s), layers {edit.layers}")
        print(f"saved to {folder} ({time.perf_counter() - t0:.1f} s)")
        print(f'see it with: factscope predict --edit {args.out} "{requests[0].prompt}"')

    p = sub.add_parser("edit", help="write facts into the weights (ROME, MEMIT, fine-tuning)")
    p.add_argument("--requests", required=True, help="JSON file of edit requests")
    p.add_argument(
        "--method",
        required=True,
        choices=("rome", "memit", "ft-l", "ft", "mixed"),
        help="editing method",
    )
    p.add_argument(
        "--layers",
        default="auto",
        help="3-8, 3,5,7, auto (the hparams' layers) or a select-layers JSON (default auto)",
    )
    p.add_argument("--out", required=True, help="folder to save the edit in")
    p.add_argument("--model", default="gemma-3-270m", help="model name or local folder")
    p.add_argument("--hparams", help="JSON file of hyper-parameters (default: shipped ones)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_edit)


# --------------------------------------------------------------------------- evaluation
# (eval)


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    def cmd_eval(args: argparse.Namespace) -> None:
        from editing.evaluate import evaluate, parse_layers, scaling
        from editing.generation import GenerationSettings
        from tracing.models import load_model

        if args.n < 1 or args.batch < 1:
            raise CliError("--n and --batch must be at least 1")
        gen = None
        if args.gen_tokens > 0:
            gen = GenerationSettings(max_new_tokens=args.gen_tokens, sample=not args.greedy)
        model = load_model(args.model)
        common = dict(
            dataset=args.dataset,
            out_dir=args.out,
            layers=parse_layers(args.layers),
            hparams=args.hparams,
            only_known=not args.all_cases,
            known_rule=args.known_rule,
            seed=args.seed,
            generation=gen,
        )
        if args.scaling:
            sizes = [int(x) for x in args.scaling.split(",") if x.strip()]
            methods = [m for m in args.method.split(",") if m]
            points = scaling(model, methods, sizes, **common)
            for p in points:
                cells = ", ".join(
                    f"{k} {v:.3f}"
                    for k, v in p.items()
                    if isinstance(v, float) and k != "seconds_per_edit"
                )
                print(f"{p['method']:>10} x{p['n_edits']:<5} {cells}")
            print(f"# points written to {args.out}/scaling/points.json")
            return
        summary = evaluate(
            model,
            method=args.method,
            n=args.n,
            batch=args.batch,
            joint=True if args.joint else None,
            name=args.name,
            **common,
        )
        print(summary.markdown())
        print(f"# rows: {summary.files['rows']}  summary: {summary.files['summary']}")

    def cmd_table(args: argparse.Namespace) -> None:
        from editing.eval_results import EvalSummary, comparison_table

        print(comparison_table([EvalSummary.load(p) for p in args.summaries]), end="")

    p = sub.add_parser("eval", help="evaluate an editing method on CounterFact or zsRE")
    p.add_argument(
        "--method",
        default="rome",
        help="rome | memit | ft-l | ft | mixed | none (with --scaling: a comma list)",
    )
    p.add_argument(
        "--dataset",
        default="counterfact",
        help="counterfact | counterfact-full | zsre | PATH.json (CounterFact-shaped)",
    )
    p.add_argument("--n", type=int, default=200, help="number of cases (default 200)")
    p.add_argument(
        "--batch",
        type=int,
        default=100,
        help="edits applied at once by MEMIT (or every method with --joint)",
    )
    p.add_argument("--joint", action="store_true", help="edit --batch cases at once, any method")
    p.add_argument("--layers", help="layers to edit: 3-8, 2,4,6 or a select-layers JSON")
    p.add_argument("--hparams", help="hyper-parameter JSON file (default: the method's defaults)")
    p.add_argument("--out", default="results", help="output folder (default results/)")
    p.add_argument("--name", help="run folder name inside --out (default DATASET_METHOD)")
    p.add_argument("--model", default="gemma-3-270m", help="model name or local folder")
    p.add_argument(
        "--all-cases",
        action="store_true",
        help="keep cases the unedited model does not know (no only-known filter)",
    )
    p.add_argument(
        "--known-rule",
        default="prefers",
        choices=("prefers", "top1"),
        help="'known': P(true) > P(new) (prefers) or true target top-1 (top1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gen-tokens",
        type=int,
        default=40,
        help="tokens generated per prompt for fluency (0: no fluency)",
    )
    p.add_argument("--greedy", action="store_true", help="greedy generation (default: top-5)")
    p.add_argument("--scaling", help="sizes, e.g. 1,10,100: metric vs number of edits")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-table", help="one Markdown table from several eval summaries")
    p.add_argument("summaries", nargs="+", help="summary.json files of eval runs")
    p.set_defaults(func=cmd_table)


# --------------------------------------------------------------------------- entry point

_SECTIONS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_models_commands,
    _add_tracing_commands,
    _add_editing_commands,
    _add_eval_commands,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="factscope", description="Locate and edit facts in transformer language models."
    )
    parser.add_argument("--version", action="version", version=f"factscope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SECTIONS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        args.func(args)
    except (CliError, ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a failure we did not foresee: say what it was, non-zero exit
        from tracing.models import ModelLoadError

        if isinstance(exc, ModelLoadError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
