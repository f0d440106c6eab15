"""Regenerate the README figures on the embedded model (Gemma-3-270M, loaded offline).

    .venv/bin/python scripts/make_figures.py [--out docs] [--samples 10] [--only trace]

Writes two PNGs into ``--out``:

* ``trace_space_needle.png``: the paper-style causal trace (residual stream, MLP, attention)
  of "The Space Needle is located in the city of" with the subject "The Space Needle";
* ``before_after.png``: the MLP trace of the same prompt before and after a ROME edit that
  moves the Space Needle to Paris, with the difference panel.

The "before" trace of the second figure is the trace of the first (same prompt, noise and
seed), so the prompt is traced once with all kinds and once, after the edit, for the MLP only.
Both use :func:`tracing.trace.trace_fact`'s default settings except ``--samples``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from tracing.models import HookedModel, load_model  # noqa: E402
from tracing.results import TraceResult  # noqa: E402
from tracing.trace import trace_fact  # noqa: E402
from viz.heatmap import plot_before_after, plot_trace, save_figure  # noqa: E402

log = logging.getLogger("make_figures")

PROMPT = "The Space Needle is located in the city of"
SUBJECT = "The Space Needle"
TEMPLATE = "{} is located in the city of"
TARGET_NEW = "Paris"
KINDS = ("resid", "mlp", "attn")
BEFORE_AFTER_KIND = "mlp"
FIGURES = ("trace", "before-after")
TRACE_PNG = "trace_space_needle.png"
BEFORE_AFTER_PNG = "before_after.png"


def trace_space_needle(model: HookedModel, samples: int) -> TraceResult:
    """Trace the Space Needle fact for resid, mlp and attn with ``samples`` noisy runs."""
    t0 = time.perf_counter()
    result = trace_fact(model, PROMPT, SUBJECT, kinds=KINDS, samples=samples)
    log.info(
        "traced %r -> %r in %.1f s (p_clean %.3f, p_corrupted %.3f)",
        PROMPT,
        result.answer,
        time.perf_counter() - t0,
        result.p_clean,
        result.p_corrupted,
    )
    return result


def trace_after_edit(
    model: HookedModel, before: TraceResult, samples: int
) -> tuple[TraceResult, list[int]]:
    """Compute the ROME edit "The Space Needle is located in the city of Paris" and trace the
    prompt (MLP only) with the edit applied; the model's weights are restored afterwards.
    Returns the trace and the edited layers."""
    from editing.api import make_edit  # imported here: figure (a) does not need editing
    from editing.requests import EditRequest

    req = EditRequest(template=TEMPLATE, subject=SUBJECT, target_new=TARGET_NEW)
    t0 = time.perf_counter()
    edit = make_edit(model, [req], "rome", progress=False)
    layers = sorted(int(layer) for layer in edit.layers)
    log.info("computed the ROME edit (layers %s) in %.1f s", layers, time.perf_counter() - t0)
    t0 = time.perf_counter()
    with edit.applied(model):
        after = trace_fact(model, PROMPT, SUBJECT, kinds=(BEFORE_AFTER_KIND,), samples=samples)
    log.info(
        "traced the edited model -> %r in %.1f s (p_clean %.3f; before: %r, p_clean %.3f)",
        after.answer,
        time.perf_counter() - t0,
        after.p_clean,
        before.answer,
        before.p_clean,
    )
    return after, layers


def make_figures(out: Path, samples: int, only: Sequence[str] = FIGURES) -> list[Path]:
    """Load the embedded model, trace, edit and write the chosen figures into ``out``;
    returns the paths written."""
    if "before-after" in only:  # fail before the minute-long trace if editing cannot load
        import editing.api  # noqa: F401

    t0 = time.perf_counter()
    model = load_model()
    log.info("loaded the embedded model in %.1f s", time.perf_counter() - t0)
    written: list[Path] = []
    before = trace_space_needle(model, samples)
    if "trace" in only:
        written.append(save_figure(plot_trace(before), out / TRACE_PNG))
        log.info("wrote %s", written[-1])
    if "before-after" in only:
        after, layers = trace_after_edit(model, before, samples)
        where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers}"
        title = (
            f"Causal trace before and after the ROME edit ({where}): "
            f"{TEMPLATE.format(SUBJECT)} {TARGET_NEW}\n{PROMPT!r}"
        )
        fig = plot_before_after(before, after, kind=BEFORE_AFTER_KIND, title=title)
        written.append(save_figure(fig, out / BEFORE_AFTER_PNG))
        log.info("wrote %s", written[-1])
    return written


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options: ``--out``, ``--samples``, ``--only``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for the PNGs")
    parser.add_argument(
        "--samples", type=int, default=10, help="noisy runs per trace (trace_fact's default 10)"
    )
    parser.add_argument(
        "--only",
        choices=FIGURES,
        action="append",
        help="make only this figure (repeatable); default: both",
    )
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    written = make_figures(args.out, args.samples, args.only or FIGURES)
    log.info("done in %.1f s", time.perf_counter() - t0)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
