"""Where one evaluation case's time goes beyond the edit and the scoring: the ``eval`` cell
of :mod:`scale` (one CounterFact case through the runner, ROME with the table's settings) on
a model of the real width, under :mod:`cProfile`; prints the cell's split (edit, scoring,
overhead) and the functions with the most cumulative time, the edit's and the scoring's
own calls among them (a benchmark, not a test).

    .venv/bin/python benchmarks/eval_profile.py --model gpt-j-6b --work results/scale/after_work
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # the helper modules next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    """Profile the eval cell of ``--model`` and print the split and the top functions."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default="gpt-j-6b")
    ap.add_argument("--work", type=Path, default=Path("results/scale/after_work"))
    ap.add_argument("--small", action="store_true", help="tiny shapes of the same architecture")
    ap.add_argument("--top", type=int, default=40, help="functions printed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ["FACTSCOPE_CACHE"] = str(args.work.resolve() / "cache")
    import torch
    from gpu_models import build_model
    from scale import DEFAULT_LAYERS, SMALL_LAYERS
    from scale_steps import ALL_SPECS, Cell, prep_eval, shape_of

    layers = SMALL_LAYERS if args.small else DEFAULT_LAYERS[args.model]
    cell = Cell(args.model, "eval", args.small, layers, str(args.work.resolve()))
    spec = ALL_SPECS[args.model]
    work = args.work.resolve()
    name = str(work / f"tokenizer-{spec.arch}")
    model = build_model(
        spec,
        shape_of(args.model, args.small, layers),
        torch.device("cpu"),
        torch.float32,
        work,
        name,
        fast_init=True,
        reuse_tokenizer=True,
    )
    run, _, _ = prep_eval(cell, model)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    out = run()
    prof.disable()
    out["wall_seconds"] = round(time.perf_counter() - t, 2)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(args.top)
    sys.stdout.write(f"{out}\n{buf.getvalue()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
