"""Commands ``trace`` (one fact), ``trace-dataset`` (many facts, resumable) and
``select-layers`` (the MLP layers to edit, from traces)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from factscope.cli.common import (
    UNSET,
    add_model,
    add_progress,
    given,
    input_file,
    load,
    output_folder,
)

KIND_NAMES = ("resid", "mlp", "attn")


def _windows(args: argparse.Namespace) -> dict[str, Any]:
    """``window=`` for the library: only the windows the user set."""
    window: dict[str, int] = {}
    if hasattr(args, "window"):
        window.update(mlp=args.window, attn=args.window)
    if hasattr(args, "resid_window"):
        window["resid"] = args.resid_window
    return {"window": window} if window else {}


def cmd_trace(args: argparse.Namespace) -> None:
    """Trace one fact; write trace.json, heatmaps (PNG/SVG/PDF) and an interactive HTML."""
    from tracing.trace import trace_fact
    from viz.heatmap import plot_trace, save_figure
    from viz.interactive import trace_figure, write_html

    out = output_folder(args.out)
    model = load(args)
    result = trace_fact(
        model,
        args.prompt,
        args.subject,
        args.answer,
        **given(args, "kinds", "noise", "samples", "seed", "occurrence", "method"),
        **given(args, "exact_top", "atp_space"),
        **given(args, uniform_noise="uniform"),
        **_windows(args),
        progress=not args.no_progress,
    )
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
    if result.approximate:
        print(f"method      {result.exactness_caption()}")
    for kind in result.scores:
        t, layer, p = result.peak(kind)
        how = "" if result.exact_mask(kind)[t, layer] else "  (AtP estimate)"
        print(f"peak {kind:<6} token {t} {result.tokens[t]!r} layer {layer}: p = {p:.4f}{how}")
    written = ", ".join(f"trace.{s}" for s in args.formats)
    print(f"{result.seconds:.1f} s; wrote {out}/trace.json, trace.html, {written}")


def cmd_trace_dataset(args: argparse.Namespace) -> None:
    """Trace many facts (resumable), then average their effects and plot them."""
    from tracing.distributed import ranks
    from tracing.facts import load_known_facts
    from tracing.localization import average_effects, save_effects, trace_dataset
    from viz.heatmap import plot_average_heatmap, save_figure
    from viz.plots import plot_average_effects

    out = output_folder(args.out)
    facts = load_known_facts(input_file(args.facts, "--facts")) if args.facts else None
    model = load(args)
    results = trace_dataset(
        model,
        facts,
        out_dir=out,
        only_known=not args.all_facts,
        **given(args, "n", "kinds", "noise", "samples", "seed", "method", "exact_top", "atp_space"),
        **given(args, uniform_noise="uniform"),
        **_windows(args),
        progress=not args.no_progress,
    )
    if not ranks().is_main:  # torchrun: rank 0 writes the shared outputs
        return
    effects = average_effects(results)
    save_effects(effects, out / "average_effects.json")
    save_figure(plot_average_effects(effects), out / "average_effects.png")
    save_figure(plot_average_heatmap(effects), out / "average_heatmap.png")
    methods = ", ".join(sorted({r.settings.method for r in results}))
    print(
        f"traced {effects.n_facts} facts ({methods}); mean p_clean {effects.mean_p_clean:.3f}, "
        f"mean p_corrupted {effects.mean_p_corrupted:.3f}"
    )
    for kind, per in effects.effects.items():
        print(f"{kind}: average indirect effect per layer")
        for cls, values in per.items():
            row = " ".join(f"{v:6.3f}" for v in values)
            print(f"  {cls:<17} (n={effects.counts[kind][cls]:4d}) {row}")
    print(f"wrote {out}/traces/, average_effects.json, average_effects.png, average_heatmap.png")


def cmd_select_layers(args: argparse.Namespace) -> None:
    """Pick the contiguous window of layers with the largest average effect."""
    from tracing.localization import average_effects, load_traces, select_layers

    effects = average_effects(load_traces(args.runs))
    sel = select_layers(effects, **given(args, "k", "kind", "token_class"))
    out = Path(args.out) if args.out else Path(args.runs) / "layers.json"
    sel.save(out)
    effect = " ".join(f"{v:.3f}" for v in sel.per_layer_effect)
    print(f"average {sel.kind} effect at {sel.token_class} over {sel.n_facts} facts: {effect}")
    print(f"selected layers {sel.layers[0]}-{sel.layers[-1]} (mean effect {sel.window_score:.4f})")
    print(f"wrote {out}  (use: factscope edit --layers {out})")


def _trace_options(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--kinds", nargs="+", default=UNSET, choices=KIND_NAMES, help="default: all")
    p.add_argument("--window", type=int, default=UNSET, help="mlp/attn window (default 10)")
    p.add_argument(
        "--noise",
        default=UNSET,
        help="noise std: a multiple of sigma like 3s (default) or a number",
    )
    p.add_argument("--samples", type=int, default=UNSET, help="noisy runs (default 10)")
    p.add_argument("--seed", type=int, default=UNSET, help="noise seed (default 1)")
    p.add_argument("--uniform", action="store_true", default=UNSET, help="uniform noise")
    add_progress(p)


def _method_options(p: argparse.ArgumentParser, methods: list[str], default: str) -> None:
    p.add_argument(
        "--method",
        choices=methods,
        default=UNSET,
        help=f"fast/reference: exact; atp: attribution-patching estimate; atp+exact: AtP "
        f"with the top cells and the peak's row and column recomputed exactly (default {default})",
    )
    p.add_argument(
        "--exact-top",
        type=float,
        default=UNSET,
        help="atp+exact: share of each kind's cells recomputed exactly (default 0.1)",
    )
    p.add_argument(
        "--atp-space",
        choices=["logodds", "prob"],
        default=UNSET,
        help="where AtP takes its first-order step: the answer's log-odds (default) or its "
        "probability (the papers' AtP)",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``trace``, ``trace-dataset`` and ``select-layers``."""
    p = sub.add_parser("trace", help="causal trace of one fact: heatmaps (PNG, HTML) and JSON")
    p.add_argument("prompt")
    p.add_argument("--subject", required=True, help="the subject, exactly as in the prompt")
    p.add_argument("--answer", help="answer to trace (default: the model's top-1 token)")
    p.add_argument("--occurrence", type=int, default=UNSET, help="which occurrence of the subject")
    p.add_argument("--resid-window", type=int, default=UNSET, help="resid window (default 1)")
    p.add_argument("--formats", nargs="+", default=["png", "svg"], choices=["png", "svg", "pdf"])
    p.add_argument("--out", default="out", help="output folder (default out/)")
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap prompts in the tokenizer's chat template (instruct models; default: plain)",
    )
    _trace_options(p)
    _method_options(p, ["fast", "reference", "atp", "atp+exact"], "fast")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("trace-dataset", help="trace many known facts (resumable), average")
    p.add_argument(
        "--n",
        "--n-facts",
        dest="n",
        type=int,
        default=UNSET,
        help="number of facts (default: all; under torchrun write --n-facts)",
    )
    p.add_argument("--facts", help="JSON list of facts (default: shipped known_1000)")
    p.add_argument("--all-facts", action="store_true", help="also facts the model gets wrong")
    p.add_argument("--out", default="runs", help="output folder (default runs/)")
    _trace_options(p)
    _method_options(
        p,
        ["auto", "fast", "reference", "atp", "atp+exact"],
        "auto: fast (exact) up to 20 facts, atp+exact above",
    )
    p.set_defaults(func=cmd_trace_dataset)

    p = sub.add_parser("select-layers", help="pick the contiguous MLP layers to edit")
    p.add_argument("runs", help="folder written by trace-dataset")
    p.add_argument("--k", type=int, default=UNSET, help="window size (default 5)")
    p.add_argument("--kind", default=UNSET, choices=KIND_NAMES, help="default mlp")
    p.add_argument("--token-class", default=UNSET, help="default last_subject")
    p.add_argument("--out", help="output JSON (default RUNS/layers.json)")
    p.set_defaults(func=cmd_select_layers)
