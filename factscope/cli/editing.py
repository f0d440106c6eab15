"""Commands ``stats`` (second moments of MLP keys, cached and resumable) and ``edit`` (write
facts into the weights with a registered method, save the edit)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from factscope.cli.common import (
    UNSET,
    add_model,
    add_progress,
    given,
    input_file,
    load,
    nonnegative_float,
    positive_float,
    positive_int,
)

if TYPE_CHECKING:
    from editing.hparams import Hparams
    from editing.methods import EditMethod


def cmd_stats(args: argparse.Namespace) -> None:
    """E[k k^T] of the MLP keys of some layers: computed once, cached, resumable."""
    from editing.statistics.stats import layer_second_moments
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


#: Fine-tuning options of ``edit``: option name -> FTHparams field.
FT_OPTIONS = {
    "params": "params",
    "constraint": "constraint",
    "epsilon": "norm_constraint",
    "fisher_weight": "fisher_weight",
}


def _edit_hparams(args: argparse.Namespace, method: EditMethod) -> Hparams | Path | None:
    """The hyper-parameters ``edit`` passes on: the ``--hparams`` file or the shipped
    defaults, with the fine-tuning options the user gave, resolved and checked here, before
    the model is loaded. Fine-tuning options with another method are refused."""
    from editing.methods.finetune import FTHparams
    from tracing.errors import InvalidInput
    from tracing.models import DEFAULT_MODEL

    overrides = {
        field: getattr(args, opt) for opt, field in FT_OPTIONS.items() if hasattr(args, opt)
    }
    path = input_file(args.hparams, "--hparams") if args.hparams else None
    given_ft = [f"--{o.replace('_', '-')}" for o in FT_OPTIONS if hasattr(args, o)]
    if hasattr(args, "blocks"):
        given_ft.append("--blocks")
    if method.hparams is not FTHparams:
        if given_ft:
            raise InvalidInput(f"{', '.join(given_ft)}: only for fine-tuning (ft-l, ft, mixed)")
        return path
    if method.name == "ft" and hasattr(args, "constraint"):
        raise InvalidInput("--constraint: ft is unconstrained fine-tuning; use ft-l or mixed")
    name = None if path else getattr(args, "model", DEFAULT_MODEL)
    return method.load_hparams(name, path, **overrides)


def _edit_layers(args: argparse.Namespace) -> list[int] | str | None:
    """``--layers`` or ``--blocks`` (one of them): a layer list, ``"all"`` or None (the
    hyper-parameters' own layers)."""
    from tracing.errors import InvalidInput
    from tracing.layers import parse_layers

    blocks = getattr(args, "blocks", None)
    if blocks is not None and args.layers != "auto":
        raise InvalidInput("give --layers or --blocks, not both")
    spec = blocks if blocks is not None else args.layers
    if spec == "auto":
        return None
    return "all" if spec == "all" else parse_layers(spec)


def cmd_edit(args: argparse.Namespace) -> None:
    """Compute an edit of the requests in a JSON file and save it."""
    from editing.api import make_edit
    from editing.methods import get_method
    from editing.requests import load_requests
    from tracing.distributed import ranks
    from tracing.models import n_layers

    method = get_method(args.method)
    requests = load_requests(input_file(args.requests, "--requests"))
    spec = _edit_layers(args)
    hparams = _edit_hparams(args, method)
    model = load(args)
    layers = list(range(n_layers(model))) if isinstance(spec, str) else spec
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
    p.add_argument(
        "--tokens", type=positive_int, default=UNSET, help="corpus tokens (default 100000)"
    )
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
    p.add_argument(
        "--seq-len", type=positive_int, default=UNSET, help="tokens per sequence (default 128)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=UNSET, help="sequences per forward (default 8)"
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
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap prompts in the tokenizer's chat template (instruct models; default: plain)",
    )
    add_model(p)
    p.add_argument("--hparams", help="JSON file of hyper-parameters (default: shipped ones)")
    ft = p.add_argument_group("fine-tuning (ft-l, ft, mixed; Zhu et al. 2020)")
    ft.add_argument(
        "--params",
        default=UNSET,
        help="what to tune in each chosen block: down_proj (FT-L's MLP down-projection), mlp, "
        "attn or block (both plus the block's norms)",
    )
    ft.add_argument(
        "--blocks",
        default=UNSET,
        help="blocks to tune: 3-8, 3,5,7, all (every block) or a layers JSON (as --layers)",
    )
    ft.add_argument(
        "--constraint",
        default=UNSET,
        help="linf (project into theta0 +- epsilon after every step) or fisher (penalty "
        "lambda * sum F (theta - theta0)^2, F the diagonal Fisher on unmodified text)",
    )
    ft.add_argument(
        "--epsilon",
        type=positive_float,
        default=UNSET,
        help="the linf bound (hparams norm_constraint)",
    )
    ft.add_argument(
        "--fisher-weight",
        type=nonnegative_float,
        default=UNSET,
        help="lambda of the fisher constraint",
    )
    add_progress(p)
    p.set_defaults(func=cmd_edit)
