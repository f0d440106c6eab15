"""Commands ``stats`` (second moments of MLP keys, cached and resumable) and ``edit`` (write
facts into the weights with a registered method, save the edit)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from factscope.cli.common import UNSET, add_model, add_progress, given, input_file, load


def cmd_stats(args: argparse.Namespace) -> None:
    """E[k k^T] of the MLP keys of some layers: computed once, cached, resumable."""
    from editing.stats import layer_second_moments
    from tracing.layers import parse_layers
    from tracing.models import model_name

    layers = parse_layers(args.layers)
    model = load(args)
    settings = given(args, "corpus", "seq_len", n_tokens="tokens", dtype="mom2_dtype")
    if args.cache_dir:
        settings["cache_dir"] = Path(args.cache_dir)
    stats = layer_second_moments(
        model,
        layers,
        progress=not args.no_progress,
        **settings,
        **given(args, "batch_size"),
    )
    first = next(iter(stats.values()))
    print(f"# E[k k^T] of the MLP down-projection input, {model_name(model)}")
    print(f"cache: {first.path.parent if first.path else 'not cached'}")
    print(f"{'layer':>5}  {'tokens':>8}  {'trace':>12}  {'top eig':>12}  {'min eig':>11}")
    for L, s in stats.items():
        info = s.summary()
        print(
            f"{L:>5}  {s.count:>8}  {info['trace']:>12.5g}  {info['top_eigenvalue']:>12.5g}"
            f"  {info['min_eigenvalue']:>11.4g}"
        )


def cmd_edit(args: argparse.Namespace) -> None:
    """Compute an edit of the requests in a JSON file and save it."""
    from editing.api import make_edit
    from editing.methods import get_method
    from editing.requests import load_requests
    from tracing.distributed import ranks
    from tracing.layers import parse_layers

    method = get_method(args.method)
    requests = load_requests(input_file(args.requests, "--requests"))
    layers = None if args.layers == "auto" else parse_layers(args.layers)
    hparams = input_file(args.hparams, "--hparams") if args.hparams else None
    model = load(args)
    t0 = time.perf_counter()
    here = ranks()  # torchrun: every rank makes this edit, MEMIT's z split across them
    edit = make_edit(
        model,
        requests,
        method.name,
        hparams,
        layers=layers,
        progress=not args.no_progress,
        shard_targets=here.world > 1,
    )
    if not here.is_main:
        return
    folder = edit.save(args.out)
    print(f"{edit.method} edit of {len(requests)} request(s), layers {edit.layers}")
    print(f"saved to {folder} ({time.perf_counter() - t0:.1f} s)")
    print(f'see it with: factscope predict --edit {args.out} "{requests[0].prompt}"')


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``stats`` and ``edit``."""
    p = sub.add_parser(
        "stats", help="second-moment statistics E[kk^T] of MLP keys (one pass, cached, resumable)"
    )
    p.add_argument("--layers", required=True, help="layers: 3-8, 3,5,7, 4 or a layers JSON")
    p.add_argument("--tokens", type=int, default=UNSET, help="corpus tokens (default 100000)")
    add_model(p)
    p.add_argument(
        "--mom2-dtype",
        choices=("float32", "float64"),
        default=UNSET,
        help="accumulation dtype of the statistics (default float32, whatever the model's)",
    )
    p.add_argument(
        "--corpus",
        default=UNSET,
        help="wikitext (default), wikitext-test, wikitext-valid or a .txt",
    )
    p.add_argument("--seq-len", type=int, default=UNSET, help="tokens per sequence (default 128)")
    p.add_argument(
        "--batch-size", type=int, default=UNSET, help="sequences per forward (default 8)"
    )
    p.add_argument("--cache-dir", help="statistics cache folder (default: <FACTSCOPE_CACHE>/stats)")
    add_progress(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("edit", help="write facts into the weights (ROME, MEMIT, fine-tuning, ...)")
    p.add_argument("--requests", required=True, help="JSON file of edit requests")
    p.add_argument("--method", required=True, help="a registered method: rome, memit, ft-l, ...")
    p.add_argument(
        "--layers",
        default="auto",
        help="3-8, 3,5,7, auto (the hparams' layers) or a select-layers JSON (default auto)",
    )
    p.add_argument("--out", required=True, help="folder to save the edit in")
    add_model(p)
    p.add_argument("--hparams", help="JSON file of hyper-parameters (default: shipped ones)")
    add_progress(p)
    p.set_defaults(func=cmd_edit)
