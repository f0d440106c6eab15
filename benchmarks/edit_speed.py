"""Speed and memory of editing on the embedded model (a benchmark, not a test).

Prints three tables:

1. second-moment statistics: tokens/s collecting every layer in ONE pass vs one pass per layer
   (fresh temporary caches, so nothing is read from disk);
2. ROME: seconds per edit (statistics already cached; their one-off cost is printed apart);
3. MEMIT: wall time and peak memory for batches of 10 and 100 requests (``--with-1000`` adds
   1,000). Each MEMIT size runs in its own child process so its peak resident memory
   (``resource.getrusage``) is its own; the resident memory after loading the model and the
   statistics is printed beside it.

    .venv/bin/python benchmarks/edit_speed.py                 # all three tables
    .venv/bin/python benchmarks/edit_speed.py --skip-stats --memit-sizes 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rss_mib() -> float:
    """Current resident memory of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def counterfact_requests(model, n: int) -> list:
    """The first ``n`` CounterFact cases that pass validation together (no duplicates or
    conflicts)."""
    from editing.evaluation.tasks import load_cases
    from editing.requests import validate_requests

    out, seen = [], set()
    _, task, cases = load_cases("counterfact")
    for case in cases:
        req = task.request(case)
        if (req.subject, req.template) in seen:
            continue
        try:
            validate_requests(model, [req])
        except ValueError:
            continue
        seen.add((req.subject, req.template))
        out.append(req)
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} usable CounterFact requests")


def bench_stats(model, layers: list[int], n_tokens: int) -> None:
    from editing.stats import layer_second_moments

    print(f"\n## Statistics E[kk^T]: {n_tokens} tokens, layers {layers[0]}-{layers[-1]}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        layer_second_moments(
            model, layers, n_tokens=n_tokens, cache_dir=Path(tmp) / "one", progress=False
        )
        one = time.perf_counter() - t
        t = time.perf_counter()
        for L in layers:
            layer_second_moments(
                model, [L], n_tokens=n_tokens, cache_dir=Path(tmp) / f"L{L}", progress=False
            )
        per = time.perf_counter() - t
    print("| how | seconds | tokens/s (all layers) | layer-tokens/s |")
    print("|---|---|---|---|")
    for name, s in (("all layers, one pass", one), ("one pass per layer", per)):
        print(f"| {name} | {s:.1f} | {n_tokens / s:,.0f} | {n_tokens * len(layers) / s:,.0f} |")
    print(f"one pass is {per / one:.1f}x faster")


def bench_rome(model, n_edits: int) -> None:
    from editing.api import make_edit
    from editing.context import context_templates
    from editing.keys import layer_stats
    from editing.methods import load_hparams
    from editing.methods.rome import RomeHparams

    hp = load_hparams("rome", "gemma-3-270m")
    assert isinstance(hp, RomeHparams) and hp.layer is not None
    t = time.perf_counter()
    stats = layer_stats(model, [hp.layer], hp)
    templates = context_templates(model, hp.context_templates)
    setup = time.perf_counter() - t
    print(f"\n## ROME (layer {hp.layer}, {len(templates)} templates, {hp.target.num_steps} steps)")
    print(f"statistics + templates (cached after the first run): {setup:.1f} s")
    print("| request | seconds | steps | target NLL before -> after |")
    print("|---|---|---|---|")
    times = []
    for req in counterfact_requests(model, n_edits):
        t = time.perf_counter()
        edit = make_edit(model, [req], "rome", hp, stats=stats, progress=False)
        times.append(time.perf_counter() - t)
        md = edit.metadata
        print(
            f"| {req.subject} -> {req.target_new.strip()} | {times[-1]:.1f} | {md['steps'] + 1} "
            f"| {md['nll_before']:.2f} -> {md['nll_after']:.3f} |"
        )
    print(f"mean {sum(times) / len(times):.1f} s per ROME edit")


def memit_child(n: int) -> dict:
    """One MEMIT batch of ``n`` requests in this process; returns its measurements."""
    from editing.api import make_edit
    from editing.context import context_templates
    from editing.keys import layer_stats
    from editing.methods import load_hparams
    from editing.methods.memit import MemitHparams
    from tracing.models import load_model

    model = load_model("gemma-3-270m")
    hp = load_hparams("memit", "gemma-3-270m")
    assert isinstance(hp, MemitHparams)
    stats = layer_stats(model, hp.layers or [], hp)
    context_templates(model, hp.context_templates)
    requests = counterfact_requests(model, n)
    base = _rss_mib()
    t = time.perf_counter()
    edit = make_edit(model, requests, "memit", hp, stats=stats, progress=False)
    wall = time.perf_counter() - t
    md = edit.metadata
    return {
        "n": n,
        "seconds": wall,
        "seconds_targets": md["seconds_targets"],
        "seconds_layers": md["seconds_layers"],
        "mean_steps": sum(s + 1 for s in md["steps"]) / n,
        "rss_before_mib": base,
        "peak_mib": _peak_mib(),
        "layers": hp.layers,
    }


def bench_memit(sizes: list[int], threads: int) -> None:
    print("\n## MEMIT (one batch per size, each in a fresh process)")
    print(
        "| requests | wall s | z optimisation s | layer updates s | s / request "
        "| mean steps | RSS before MiB | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        cmd = [sys.executable, __file__, "--memit-child", str(n), "--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"| {n} | {r['seconds']:.1f} | {r['seconds_targets']:.1f} | "
            f"{r['seconds_layers']:.1f} | {r['seconds'] / n:.2f} | {r['mean_steps']:.1f} | "
            f"{r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--stats-tokens", type=int, default=8192, help="tokens for table 1")
    ap.add_argument("--stats-layers", default="0-17", help="layers for table 1 (e.g. 2-6)")
    ap.add_argument("--rome-edits", type=int, default=3, help="ROME edits to time")
    ap.add_argument("--memit-sizes", default="10,100", help="MEMIT batch sizes")
    ap.add_argument("--with-1000", action="store_true", help="also MEMIT with 1,000 requests")
    ap.add_argument("--skip-stats", action="store_true")
    ap.add_argument("--skip-rome", action="store_true")
    ap.add_argument("--skip-memit", action="store_true")
    ap.add_argument("--memit-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memit_child:
        print(json.dumps(memit_child(args.memit_child)))
        return
    from tracing.layers import parse_layers
    from tracing.models import load_model

    model = load_model("gemma-3-270m")
    print(f"# factscope editing speed, gemma-3-270m, {args.threads} thread(s)")
    if not args.skip_stats:
        bench_stats(model, parse_layers(args.stats_layers), args.stats_tokens)
    if not args.skip_rome:
        bench_rome(model, args.rome_edits)
    if not args.skip_memit:
        sizes = [int(x) for x in args.memit_sizes.split(",") if x]
        bench_memit(sizes + ([1000] if args.with_1000 else []), args.threads)


if __name__ == "__main__":
    main()
