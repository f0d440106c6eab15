"""Speed and memory of factscope on randomly initialised models of real shapes (a benchmark,
not a test): GPT-2 XL, GPT-J-6B and Llama-3-8B, built locally (no hub, no network, no
downloads).

Each model is built on the device in the chosen dtype with the architecture's random
initialisation and the real config (layers, width, heads, vocabulary, rotary settings); its
tokenizer is a small byte-level BPE trained on the spot (:func:`tracing.toy_models.
build_tokenizer`; its ids all lie inside the real vocabulary). Random weights cost the same
arithmetic as trained ones; the one difference is that an edit's target optimisation never
stops early on a random model, so ROME and MEMIT always run their full step count (an upper
bound on a trained model's time).

One row per model, the columns:

* **trace**: seconds for a full three-kind causal trace (resid, mlp, attn; 10 noise samples,
  noise 3 sigma, default windows) of a 10-token prompt (11 with Llama's BOS; sigma is
  measured before the clock starts, as it is cached on disk after a model's first trace);
* **ROME s/edit**: mean seconds per ROME edit over ``--rome-edits`` requests (after one
  warm-up edit), the shipped hyper-parameters (the published ones for GPT-2 XL and GPT-J,
  the ``_default`` files for Llama), 21 context prompts per request;
* **MEMIT n s/request**: wall seconds of one MEMIT batch of ``n`` synthetic requests divided by
  ``n``, for each of ``--memit-sizes``;
* **peak GPU memory**: ``torch.cuda.max_memory_allocated`` over the whole row (weights
  included);
* **statistics tokens/s**: :func:`editing.statistics.stats.layer_second_moments` for layers
  3-8 (clipped to the model's layers) in one pass per batch, over ``--stats-tokens`` WikiText
  tokens (fresh temporary cache, so nothing is read from disk).

ROME and MEMIT get their second moments precomputed (an identity matrix per edited layer,
``stats={layer: C}``): the statistics are timed in their own column and are not inside the
edit times. Context templates are fixed texts of the lengths the hyper-parameters ask for
(generating them is a one-off cost, cached per model). Every measurement is guarded: a failure
puts ``OOM`` or ``error: ...`` in its cell, its full traceback goes to stderr, and the table is
still printed; then the script exits with status 1 naming the failed cells. An out-of-memory
cell counts as a failure too, unless ``--allow-oom`` is given (a real shape that does not fit
a smaller GPU is then a result, not an error).

Anchors from the papers: ROME (Meng et al. 2022) about 2 s per edit for GPT-2 XL on one
A6000; MEMIT (Meng et al. 2023) about 36 h for GPT-J's statistics on one A6000 (44M tokens,
one layer per pass). Aims on one H200: ROME at most 1 s per edit on the GPT-J shape,
statistics at least 50,000 tokens/s for GPT-J's layers 3-8, MEMIT with 10,000 requests in at
most 20 minutes (0.12 s per request).

Real shapes need a GPU (the CPU is refused without ``--small``); ``--small`` builds the same
architectures with 8 layers and width 128 so the script runs on the CPU in well under a
minute.

    .venv/bin/python benchmarks/gpu.py                                   # all three, on CUDA
    .venv/bin/python benchmarks/gpu.py --models gpt-j-6b --memit-sizes 1000 --out gptj.md
    .venv/bin/python benchmarks/gpu.py --small --device cpu              # tiny shapes, CPU
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("benchmarks.gpu")

if str(Path(__file__).resolve().parent) not in sys.path:  # the helper module next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_cells import Row, _free, _sync, failure_cell, fmt_number, guarded  # noqa: E402, F401
from gpu_models import (  # noqa: E402
    ANSWER,
    PROMPT,
    SMALL,
    SMALL_MEMIT_LAYERS,
    SMALL_ROME_LAYER,
    SPECS,
    SUBJECT,
    build_model,
    context_groups,
    describe_shape,
    identity_stats,
    synthetic_requests,
)
from gpu_models import hf_config as hf_config  # noqa: E402  (the tests call it through here)

STATS_LAYERS = range(3, 9)  # layers 3-8: MEMIT's GPT-J layers


# --------------------------------------------------------------------------- measurements


def time_trace(model: Any, samples: int) -> float:
    """Seconds for a three-kind trace of the ~10-token prompt (sigma measured first)."""
    from tracing.models import model_device
    from tracing.noise import embedding_sigma
    from tracing.trace import trace_fact

    device = model_device(model)
    embedding_sigma(model)  # cached on disk after a model's first trace: not timed
    _sync(device)
    t = time.perf_counter()
    result = trace_fact(
        model, PROMPT, SUBJECT, ANSWER, samples=samples, kinds=("resid", "mlp", "attn")
    )
    _sync(device)
    seconds = time.perf_counter() - t
    log.info("trace: %d tokens, %d layers", len(result.tokens), result.scores["resid"].shape[1])
    return seconds


def time_rome(model: Any, hp: Any, n_edits: int) -> float:
    """Mean seconds per ROME edit over ``n_edits`` requests, after one warm-up edit."""
    from editing.api import make_edit
    from tracing.models import model_device

    device = model_device(model)
    stats = identity_stats(model, hp.layers)
    groups = context_groups(hp.context_templates)
    reqs = synthetic_requests(n_edits + 1)
    make_edit(model, reqs[0], "rome", hp, stats=stats, context_templates=groups, progress=False)
    times = []
    for req in reqs[1:]:
        _sync(device)
        t = time.perf_counter()
        make_edit(model, req, "rome", hp, stats=stats, context_templates=groups, progress=False)
        _sync(device)
        times.append(time.perf_counter() - t)
    return sum(times) / len(times)


def time_memit(model: Any, hp: Any, n: int) -> float:
    """Seconds per request of one MEMIT batch of ``n`` synthetic requests."""
    from editing.api import make_edit
    from tracing.models import model_device

    device = model_device(model)
    stats = identity_stats(model, hp.layers)
    groups = context_groups(hp.context_templates)
    reqs = synthetic_requests(n)
    _sync(device)
    t = time.perf_counter()
    edit = make_edit(
        model, reqs, "memit", hp, stats=stats, context_templates=groups, progress=False
    )
    _sync(device)
    seconds = time.perf_counter() - t
    md = edit.metadata
    log.info(
        "MEMIT %d: %.1f s (targets %.1f s, layers %.1f s)",
        n,
        seconds,
        md["seconds_targets"],
        md["seconds_layers"],
    )
    return seconds / n


def time_stats(model: Any, layers: Sequence[int], n_tokens: int) -> float:
    """Tokens/s of the second moments of ``layers`` (one pass per batch, fresh cache)."""
    from editing.statistics.stats import layer_second_moments
    from tracing.models import model_device

    device = model_device(model)
    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        t = time.perf_counter()
        layer_second_moments(
            model, list(layers), n_tokens=n_tokens, cache_dir=Path(tmp), progress=False
        )
        _sync(device)
        seconds = time.perf_counter() - t
    return n_tokens / seconds


# --------------------------------------------------------------------------- the table


def stats_layers(n_layers: int) -> list[int]:
    """Layers 3-8 clipped to the model's layers."""
    return [L for L in STATS_LAYERS if L < n_layers]


def stats_header(small: bool) -> str:
    return "statistics tokens/s, layers 3-8" + (" (clipped)" if small else "")


def columns(sizes: Sequence[int], small: bool) -> list[tuple[str, str]]:
    """(key, header) of every measured column, in table order."""
    cols = [
        ("trace", "trace 10-token prompt, 3 kinds (s)"),
        ("rome", "ROME s/edit"),
    ]
    cols += [(f"memit{n}", f"MEMIT {n:,} s/request") for n in sizes]
    cols += [("peak", "peak GPU memory (GiB)"), ("stats", stats_header(small))]
    return cols


def render(rows: Sequence[Row], sizes: Sequence[int], small: bool) -> str:
    """The markdown table."""
    cols = columns(sizes, small)
    head = ["model", "shape", "dtype", "device"] + [h for _, h in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.model, r.shape, r.dtype, r.device]
        cells += [r.cells.get(k, "-") for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_model(
    key: str,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    sizes: Sequence[int],
    folder: Path,
) -> Row:
    """Build one model and measure its row (each measurement guarded)."""
    from editing.methods import load_hparams

    spec = SPECS[key]
    shape = SMALL[key] if args.small else spec.real
    name = f"random-{key}" + ("-small" if args.small else "")
    dtype_name = str(dtype).removeprefix("torch.")
    row = Row(name, describe_shape(shape), dtype_name, str(device))
    cols = [k for k, _ in columns(sizes, args.small)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log.info("%s: building %s on %s in %s", name, row.shape, device, dtype_name)
    t = time.perf_counter()
    try:
        model = build_model(spec, shape, device, dtype, folder, name)
    except Exception as exc:
        _free(device)
        cell = failure_cell(f"{name} building", exc, row.failures)
        row.cells = dict.fromkeys(cols, cell)
        return row
    log.info("%s: built in %.1f s", name, time.perf_counter() - t)

    n_layers = int(shape["layers"])

    def hparams(method: str) -> Any:
        """The model's shipped defaults (``_default`` files for the rest), with its layers
        and the loss at its last layer."""
        if method == "rome":
            layers = [SMALL_ROME_LAYER if args.small else spec.rome_layer]
        else:
            layers = list(SMALL_MEMIT_LAYERS if args.small else spec.memit_layers)
        hp_key = None if args.small else key
        return load_hparams(method, hp_key, layers=layers, loss_layer=n_layers - 1)

    def memit(n: int) -> float:
        return time_memit(model, hparams("memit"), n)

    fails = row.failures
    row.cells["trace"] = guarded(
        f"{name} trace", lambda: time_trace(model, args.samples), device, fails
    )
    row.cells["stats"] = guarded(
        f"{name} statistics",
        lambda: time_stats(model, stats_layers(n_layers), args.stats_tokens),
        device,
        fails,
    )
    row.cells["rome"] = guarded(
        f"{name} ROME", lambda: time_rome(model, hparams("rome"), args.rome_edits), device, fails
    )
    for n in sizes:
        row.cells[f"memit{n}"] = guarded(
            f"{name} MEMIT {n}", functools.partial(memit, n), device, fails
        )
    if device.type == "cuda":
        row.cells["peak"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
    else:
        row.cells["peak"] = "n/a (CPU)"
    return row


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default)")
    ap.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on the CPU)",
    )
    ap.add_argument("--models", default=",".join(SPECS), help=f"comma list of {', '.join(SPECS)}")
    ap.add_argument("--small", action="store_true", help="tiny shapes (8 layers, width 128)")
    ap.add_argument(
        "--memit-sizes", default=None, help="MEMIT batch sizes (default 1000,10000; --small 10,20)"
    )
    ap.add_argument(
        "--stats-tokens",
        type=int,
        default=None,
        help="tokens for the statistics column (default 100000; --small 2048; the shipped "
        "WikiText holds about 990,000 with the toy tokenizer)",
    )
    ap.add_argument("--rome-edits", type=int, default=3, help="ROME edits averaged (default 3)")
    ap.add_argument("--samples", type=int, default=10, help="noise samples of the trace")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    ap.add_argument(
        "--allow-oom",
        action="store_true",
        help="an out-of-memory cell is a result, not a failure (exit 0 if nothing else failed)",
    )
    args = ap.parse_args(argv)
    if args.memit_sizes is None:
        args.memit_sizes = "10,20" if args.small else "1000,10000"
    if args.stats_tokens is None:
        args.stats_tokens = 2048 if args.small else 100_000
    return args


def resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, list[str], list[int]]:
    """Device, dtype, models and MEMIT sizes from the flags; SystemExit with one line when
    they do not make sense."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu.py: CUDA is not available here; use --device cpu --small")
    if device.type == "cpu" and not args.small:
        raise SystemExit(
            "gpu.py: real shapes (up to 8B parameters) need a GPU; on the CPU run --small"
        )
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in names:
        raise SystemExit(f"gpu.py: unknown dtype {dtype_name!r}; use one of {', '.join(names)}")
    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SPECS]
    if unknown or not models:
        raise SystemExit(f"gpu.py: unknown model(s) {unknown}; choose from {', '.join(SPECS)}")
    try:
        sizes = [int(x) for x in args.memit_sizes.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"gpu.py: bad --memit-sizes {args.memit_sizes!r}") from None
    if any(n < 1 for n in sizes) or args.stats_tokens < 2 or args.rome_edits < 1:
        raise SystemExit("gpu.py: sizes, --stats-tokens and --rome-edits must be positive")
    return device, names[dtype_name], models, sizes


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; prints the table to stdout (and ``--out``) and returns it. When a
    cell failed (out of memory included, unless ``--allow-oom``) it exits with status 1
    after the table, naming the failed cells (their tracebacks are on stderr)."""
    args = parse_args(argv)
    device, dtype, models, sizes = resolve(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    old_cache = os.environ.get("FACTSCOPE_CACHE")
    with tempfile.TemporaryDirectory(prefix="factscope-gpu-bench-") as tmp:
        # sigma and other per-model caches of these throwaway models go to a temporary folder
        os.environ["FACTSCOPE_CACHE"] = str(Path(tmp) / "cache")
        try:
            for key in models:
                rows.append(bench_model(key, args, device, dtype, sizes, Path(tmp)))
                _free(device)  # the model went with bench_model's frame
        finally:
            if old_cache is None:
                os.environ.pop("FACTSCOPE_CACHE", None)
            else:
                os.environ["FACTSCOPE_CACHE"] = old_cache
    table = render(rows, sizes, args.small)
    print(table, flush=True)
    if args.out is not None:
        args.out.write_text(table + "\n")
    failed = [f for r in rows for f in r.failures if not (f.oom and args.allow_oom)]
    if failed:
        names = "; ".join(f"{f.what}: {f.message}" for f in failed)
        raise SystemExit(f"gpu.py: {len(failed)} measurement(s) failed ({names})")
    return table


if __name__ == "__main__":
    main()
