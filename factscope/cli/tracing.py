"""Commands ``trace`` (one fact), ``trace-dataset`` (many facts, resumable) and
``select-layers`` (the MLP layers to edit, from traces)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from factscope.cli.common import (
    UNSET,
    add_model,
    add_progress,
    given,
    input_file,
    load,
    nonnegative_int,
    output_folder,
    positive_int,
)

KIND_NAMES = ("resid", "mlp", "attn", "resid/mlp-severed", "resid/attn-severed")
#: The options of what a trace measures, passed on as given.
MEASURE = ("corruption", "replacement", "direction", "metric", "normalise", "severed_noise")
_SIGMA_MULTIPLE = re.compile(r"^(?:s[0-9.]+|[0-9.]+s)$")


def noise_level(text: str) -> str:
    """argparse ``type=`` of ``--noise``: a multiple of sigma (``3s``, ``s3``) or a finite
    number >= 0, refused while parsing otherwise (exit 2, before the model loads)."""
    value = text.strip().lower()
    if _SIGMA_MULTIPLE.match(value):
        try:
            float(value.strip("s"))
            return value
        except ValueError:
            pass
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a multiple of sigma like 3s or a number >= 0, got {text!r}"
        ) from None
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a noise level >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse ``type=``: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


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
    from tracing.results import SEVERED_KINDS
    from tracing.trace import trace_fact
    from tracing.trace_options import check_measure
    from viz.heatmap import plot_trace, save_figure
    from viz.interactive import trace_figure, write_html
    from viz.severed import plot_severed, severed_figure

    out = output_folder(args.out)
    check_measure(**given(args, "kinds", "method", "tokens", *MEASURE), subject=args.subject)
    model = load(args)
    result = trace_fact(
        model,
        args.prompt,
        args.subject,
        args.answer,
        **given(args, "kinds", "noise", "samples", "seed", "occurrence", "method"),
        **given(args, "exact_top", "atp_space", "tokens", *MEASURE),
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
    severed = "resid" in result.scores and any(k in result.scores for k in SEVERED_KINDS)
    if severed:  # the papers' comparison at the last subject token
        save_figure(plot_severed(result), out / "severed.png")
        write_html(severed_figure(result), out / "severed.html")
    print(f"prompt      {result.prompt!r}  (subject {result.subject!r})")
    print(f"answer      {result.answer!r}")
    print(f"p_clean     {result.p_clean:.4f}")
    print(f"p_corrupted {result.p_corrupted:.4f}  (noise {result.settings.noise:.4f})")
    s = result.settings
    if (s.corruption, s.direction, s.metric, s.normalise) != ("noise", "denoise", "prob", False):
        print(f"measured    {s.corruption}, {s.direction}, {s.metric}", end="")
        print(" (normalised)" if s.normalise else "", end="")
        print(f"; clean {result.clean_score:.4f}, corrupted {result.corrupted_score:.4f}")
    for note in result.notes:
        print(f"note        {note}")
    if result.approximate:
        print(f"method      {result.exactness_caption()}")
    for kind in result.scores:
        t, layer, p = result.peak(kind)
        how = "" if result.exact_mask(kind)[t, layer] else "  (AtP estimate)"
        print(f"peak {kind:<6} token {t} {result.tokens[t]!r} layer {layer}: p = {p:.4f}{how}")
    written = ", ".join(f"trace.{s}" for s in args.formats) + (", severed.png" if severed else "")
    print(f"{result.seconds:.1f} s; wrote {out}/trace.json, trace.html, {written}")


def cmd_trace_dataset(args: argparse.Namespace) -> None:
    """Trace many facts (resumable), then average their effects and plot them."""
    from tracing.distributed import ranks
    from tracing.facts import load_known_facts
    from tracing.localization import average_effects, save_effects, trace_dataset
    from tracing.results import SEVERED_KINDS
    from tracing.trace_options import check_measure
    from viz.heatmap import plot_average_heatmap, save_figure
    from viz.plots import plot_average_effects
    from viz.severed import plot_severed

    out = output_folder(args.out)
    facts = load_known_facts(input_file(args.facts, "--facts")) if args.facts else None
    method = getattr(args, "method", "auto")
    check_measure(
        **given(args, "kinds", "tokens", *MEASURE), method="fast" if method == "auto" else method
    )
    model = load(args)
    results = trace_dataset(
        model,
        facts,
        out_dir=out,
        only_known=not args.all_facts,
        **given(args, "n", "kinds", "noise", "samples", "seed", "method", "exact_top", "atp_space"),
        **given(args, "tokens", *MEASURE),
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
    wrote = "average_effects.png, average_heatmap.png"
    if "resid" in effects.effects and any(k in effects.effects for k in SEVERED_KINDS):
        save_figure(plot_severed(effects), out / "average_severed.png")
        wrote += ", average_severed.png"
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
    print(f"wrote {out}/traces/, average_effects.json, {wrote}")


def cmd_select_layers(args: argparse.Namespace) -> None:
    """Pick the contiguous window of layers with the largest average effect."""
    from tracing.localization import average_effects, load_traces, select_layers

    effects = average_effects(load_traces(args.runs))
    sel = select_layers(effects, **given(args, "k", "kind", "token_class", "by"))
    out = Path(args.out) if args.out else Path(args.runs) / "layers.json"
    sel.save(out)
    effect = " ".join(f"{v:.3f}" for v in sel.per_layer_effect)
    what = (
        "effect lost by severing the MLPs (resid - resid/mlp-severed)"
        if sel.by == "mediation"
        else f"{sel.kind} effect"
    )
    print(f"average {what} at {sel.token_class} over {sel.n_facts} facts: {effect}")
    print(f"selected layers {sel.layers[0]}-{sel.layers[-1]} (mean effect {sel.window_score:.4f})")
    print(f"wrote {out}  (use: factscope edit --layers {out})")


def _trace_options(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument(
        "--kinds",
        nargs="+",
        default=UNSET,
        choices=KIND_NAMES,
        help="default: resid mlp attn; the severed kinds restore the hidden state with the MLP "
        "(attention) outputs at its token held at their corrupted values",
    )
    p.add_argument(
        "--window", type=positive_int, default=UNSET, help="mlp/attn window (default 10)"
    )
    p.add_argument(
        "--noise",
        type=noise_level,
        default=UNSET,
        help="noise std: a multiple of sigma like 3s (default) or a number >= 0",
    )
    p.add_argument("--samples", type=positive_int, default=UNSET, help="noisy runs (default 10)")
    p.add_argument(
        "--seed",
        type=nonnegative_int,
        default=UNSET,
        help="noise seed, and the draw of a replacement subject (default 1)",
    )
    p.add_argument("--uniform", action="store_true", default=UNSET, help="uniform noise")
    p.add_argument(
        "--corruption",
        choices=["noise", "replace"],
        default=UNSET,
        help="noise: Gaussian noise on the subject (default); replace: the subject replaced by "
        "another of the same token length (symmetric token replacement)",
    )
    p.add_argument(
        "--replacement",
        default=UNSET,
        help="replace: the replacement subject (default: a known subject of the same relation "
        "with another answer, drawn by --seed)",
    )
    p.add_argument(
        "--direction",
        choices=["denoise", "noise"],
        default=UNSET,
        help="denoise: restore clean states into the corrupted run (default); noise: patch "
        "corrupted states into the clean run and measure the loss",
    )
    p.add_argument(
        "--metric",
        choices=["prob", "logprob", "logit-diff"],
        default=UNSET,
        help="prob (default), logprob, or logit-diff (answer minus the competitor: the "
        "corrupted run's top token, or the replacement subject's answer)",
    )
    p.add_argument(
        "--normalise",
        action="store_true",
        default=UNSET,
        help="scores as the normalised effect: 0 at the corrupted run, 1 at the clean one",
    )
    p.add_argument(
        "--severed-noise",
        choices=["papers", "same"],
        default=UNSET,
        help="severed kinds: papers (default: the scored pass draws the next noise, as the "
        "papers' code) or same (the noise of the frozen states)",
    )
    p.add_argument(
        "--tokens",
        choices=["all", "subject-last"],
        default=UNSET,
        help="token rows to trace: all (default) or subject-last (only the subject's last "
        "token: one exact row per kind, what averages and layer selection read)",
    )
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
        type=fraction,
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
    p.add_argument(
        "--occurrence",
        type=nonnegative_int,
        default=UNSET,
        help="which occurrence of the subject",
    )
    p.add_argument(
        "--resid-window", type=positive_int, default=UNSET, help="resid window (default 1)"
    )
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
        type=positive_int,
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
    p.add_argument("--k", type=positive_int, default=UNSET, help="window size (default 5)")
    p.add_argument("--kind", default=UNSET, choices=KIND_NAMES, help="default mlp")
    p.add_argument("--token-class", default=UNSET, help="default last_subject")
    p.add_argument(
        "--by",
        choices=["restoration", "mediation"],
        default=UNSET,
        help="restoration: the window of the largest MLP restoration effect (default); "
        "mediation: the MLP window whose severing removes the most of the hidden state's "
        "effect (needs traces of resid and resid/mlp-severed)",
    )
    p.add_argument("--out", help="output JSON (default RUNS/layers.json)")
    p.set_defaults(func=cmd_select_layers)
