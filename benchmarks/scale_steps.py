"""The worker side of ``benchmarks/scale.py``: one (model, step) measured in its own process.

:func:`run_cell` builds the random model of real shape (:mod:`gpu_models`), prepares what the
step takes as given (statistics read from the on-disk cache, requests, context templates,
sigma: none of it timed), records the resident size then, resets the process's peak resident
set (``/proc/self/clear_refs``), runs the step under a clock and reads the peak (``VmHWM``).
``transient = peak - resident before the step``: the memory the step itself needs beyond the
weights and the statistics in hand. Each step function returns notes (what was measured,
what was reduced) and extra numbers for the JSON line.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # gpu_models.py next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_models import (  # noqa: E402
    ANSWER,
    MORE_SMALL,
    MORE_SPECS,
    PROMPT,
    SMALL,
    SPECS,
    SUBJECT,
    ModelSpec,
    build_model,
    synthetic_requests,
)

log = logging.getLogger("benchmarks.scale")

ALL_SPECS: dict[str, ModelSpec] = {**SPECS, **MORE_SPECS}
ALL_SMALL: dict[str, dict[str, int | float]] = {**SMALL, **MORE_SMALL}
GB = 1e9


@dataclass(frozen=True)
class Cell:
    """What one worker measures, with every reduction that applies to it."""

    model: str
    step: str
    small: bool
    layers: int  # blocks built
    work: str  # folder for the tokenizer and the factscope cache of this table
    stats_tokens: int = 2048
    trace_samples: int = 2
    trace_kinds: tuple[str, ...] = ("resid", "mlp", "attn")
    vstar_steps: int = 3
    z_requests: int = 2
    ft_steps: int = 3
    fisher_sequences: int = 2


# --------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def resident_gb() -> float:
    """The process's resident set now (VmRSS), GB."""
    return _status_kb("VmRSS") * 1024 / GB


def peak_gb() -> float:
    """The process's peak resident set since start or the last :func:`reset_peak` (VmHWM), GB."""
    return _status_kb("VmHWM") * 1024 / GB


def reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux ``clear_refs`` value 5); False when
    the kernel refuses (then the peak includes the model's build)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- the model


def shape_of(key: str, small: bool, layers: int) -> dict[str, int | float]:
    """The model's shape with ``layers`` blocks (the real one, or the tiny one with ``small``)."""
    base = ALL_SMALL[key] if small else ALL_SPECS[key].real
    return {**base, "layers": min(int(layers), int(base["layers"]))}


def edit_layers(key: str, small: bool, layers: int) -> tuple[int, tuple[int, ...]]:
    """ROME's layer and MEMIT's layers: the papers' ones for a whole real model, else the
    last layers that still have a block above them (the loss reads after the last block)."""
    spec = ALL_SPECS[key]
    if not small and layers >= int(spec.real["layers"]):
        return spec.rome_layer, spec.memit_layers
    rome = layers - 2
    return rome, tuple(range(max(0, layers - 3), layers - 1))


def hf_key(key: str, small: bool) -> str | None:
    """The name whose shipped hyper-parameters apply (None: the ``_default`` files)."""
    return key if not small and key in ("gpt2-xl", "gpt-j-6b") else None


def weights_gb(model: Any) -> float:
    """Bytes of the model's distinct parameter tensors, GB."""
    seen: dict[int, int] = {}
    for p in model.original_model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values()) / GB


# --------------------------------------------------------------------------- helpers


def _hparams(cell: Cell, model: Any, method: str, layers: list[int], **extra: Any) -> Any:
    from editing.methods import load_hparams
    from tracing.models import n_layers

    over: dict[str, Any] = {"layers": layers}
    if method != "ft-l":
        over.update(
            loss_layer=n_layers(model) - 1,
            mom2_n_tokens=cell.stats_tokens,
            num_steps=cell.vstar_steps,
        )
    return load_hparams(method, hf_key(cell.model, cell.small), **over, **extra)


def _moments(cell: Cell, model: Any, layers: list[int]) -> dict[int, torch.Tensor]:
    """E[kk^T] of ``layers`` with the table's settings: read from this table's cache (written
    by the ``stats`` cell, or computed here, untimed, when that cell has not run)."""
    from editing.statistics.stats import layer_second_moments

    got = layer_second_moments(model, layers, n_tokens=cell.stats_tokens, progress=False)
    return {L: got[L].mom2 for L in layers}


def _stats_bytes(model: Any, n_layers_held: int) -> float:
    from tracing.models import mlp_width

    return n_layers_held * mlp_width(model) ** 2 * 4 / GB


class TimedScorer:
    """A scorer that adds up the seconds its wrapped scorer spends scoring."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds = inner, 0.0

    def score(self, pairs: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.inner.score(pairs)
        finally:
            self.seconds += time.perf_counter() - t


# --------------------------------------------------------------------------- the steps
# Each: prepare(cell, model) -> (run, notes); run() -> extra numbers. What prepare holds
# (statistics, requests) is in the resident size measured before the clock starts.

Prepared = tuple[Callable[[], dict[str, Any]], str, float]  # run, notes, stats GB held inside


def prep_stats(cell: Cell, model: Any) -> Prepared:
    from editing.statistics.stats import layer_second_moments, stats_dir

    _, memit = edit_layers(cell.model, cell.small, cell.layers)
    folder = stats_dir(model, n_tokens=cell.stats_tokens, corpus="wikitext", dtype=torch.float32)
    shutil.rmtree(folder, ignore_errors=True)  # measured fresh; the other cells read it

    def run() -> dict[str, Any]:
        layer_second_moments(model, list(memit), n_tokens=cell.stats_tokens, progress=False)
        return {"layers": list(memit), "tokens": cell.stats_tokens}

    notes = f"layers {list(memit)}, {cell.stats_tokens:,} WikiText tokens (seq 128), float32 sums"
    return run, notes, 0.0


def prep_trace(cell: Cell, model: Any) -> Prepared:
    from tracing.noise import embedding_sigma
    from tracing.trace import trace_fact

    embedding_sigma(model)  # cached on disk after a model's first trace

    def run() -> dict[str, Any]:
        res = trace_fact(
            model, PROMPT, SUBJECT, ANSWER, samples=cell.trace_samples, kinds=cell.trace_kinds
        )
        return {"tokens": len(res.tokens)}

    kinds = "/".join(cell.trace_kinds)
    notes = f"{kinds}, {cell.trace_samples} noise samples (paper: 10), 10-token prompt"
    return run, notes, 0.0


def _templates(model: Any, hp: Any) -> list[list[str]]:
    from editing.requests.context import context_template_groups

    return context_template_groups(model, hp.context_templates)  # generated once, cached


def prep_rome(cell: Cell, model: Any) -> Prepared:
    from editing.api import make_edit

    rome, _ = edit_layers(cell.model, cell.small, cell.layers)
    hp = _hparams(cell, model, "rome", [rome])
    groups = _templates(model, hp)
    stats = _moments(cell, model, [rome])
    req = synthetic_requests(1)[0]

    def run() -> dict[str, Any]:
        edit = make_edit(model, req, "rome", hp, stats=stats, context_templates=groups,
                         progress=False)  # fmt: skip
        return {"v_steps": edit.metadata.get("steps")}

    n = sum(len(g) for g in groups)
    notes = f"layer {rome}, v* {cell.vstar_steps} steps (paper: 20-25), {n} prompts"
    return run, notes, 0.0


def prep_memit_z(cell: Cell, model: Any) -> Prepared:
    from editing.api import make_edit

    _, memit = edit_layers(cell.model, cell.small, cell.layers)
    hp = _hparams(cell, model, "memit", list(memit))
    groups = _templates(model, hp)
    stats = _moments(cell, model, list(memit))
    reqs = synthetic_requests(cell.z_requests)

    def run() -> dict[str, Any]:
        edit = make_edit(model, reqs, "memit", hp, stats=stats, context_templates=groups,
                         progress=False)  # fmt: skip
        md = edit.metadata
        return {k: md.get(k) for k in ("seconds_targets", "seconds_layers")}

    notes = (
        f"whole MEMIT edit of {cell.z_requests} requests, layers {list(memit)}, "
        f"z {cell.vstar_steps} steps (paper: 25)"
    )
    return run, notes, 0.0


def _z_given(
    cell: Cell, model: Any, n: int, method: str, nullspace_dtype: str = "float64"
) -> Prepared:
    """Keys and layer updates of ``n`` requests with their targets z given (random), the
    bare prompt only; MEMIT's or AlphaEdit's solve (its null space decomposed in
    ``nullspace_dtype``)."""
    from editing.edits.weights import restoring_weights
    from editing.methods.memit import layer_updates, memit_solver
    from editing.requests.prepared import prepare_requests

    _, memit = edit_layers(cell.model, cell.small, cell.layers)
    layers = list(memit) if n <= 100 and method == "memit" else [memit[-1]]
    hp = _hparams(cell, model, method, layers)
    moms = _moments(cell, model, layers)
    prepared = prepare_requests(model, synthetic_requests(n), ("{}",))
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, int(model.cfg.d_model), generator=gen)

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        if method == "memit":
            solver = memit_solver(hp, moms)
        else:
            from editing.methods.alphaedit import alphaedit_solver
            from editing.statistics.nullspace import layer_projectors

            t = time.perf_counter()
            proj = layer_projectors(
                model, layers, hp, hp.nullspace_threshold, dtype=nullspace_dtype, given=moms
            )
            out["seconds_projection"] = round(time.perf_counter() - t, 2)
            out["null_space_dims"] = [round(float(P.trace())) for P in proj.values()]
            solver = alphaedit_solver(hp, proj, None)
        t = time.perf_counter()
        with restoring_weights(model, layers, always=True):
            layer_updates(model, prepared, hp, z, solver)
        out["seconds_updates"] = round(time.perf_counter() - t, 2)
        return out

    what = (
        "MEMIT"
        if method == "memit"
        else f"AlphaEdit (null space from the statistics in {nullspace_dtype}, then)"
    )
    notes = (
        f"{what} keys + layer update of {n:,} requests with z given (random), layers "
        f"{layers}, bare prompt only (MEMIT: 6 prompts per request)"
    )
    return run, notes, 0.0


def prep_memit100(cell: Cell, model: Any) -> Prepared:
    return _z_given(cell, model, 100, "memit")


def prep_memit1000(cell: Cell, model: Any) -> Prepared:
    return _z_given(cell, model, 1000, "memit")


def prep_alphaedit(cell: Cell, model: Any) -> Prepared:
    return _z_given(cell, model, 100, "alphaedit")


def prep_alphaedit_f32(cell: Cell, model: Any) -> Prepared:
    return _z_given(cell, model, 100, "alphaedit", nullspace_dtype="float32")


def prep_alphaedit_solve(cell: Cell, model: Any) -> Prepared:
    """AlphaEdit's solve alone, its projector given: a random orthogonal projector of the
    statistics' size (rank d_mlp - 512), built before the clock starts (float32, as
    :func:`editing.statistics.nullspace.layer_projectors` returns them)."""
    from editing.edits.weights import restoring_weights
    from editing.methods.alphaedit import alphaedit_solver
    from editing.methods.memit import layer_updates
    from editing.requests.prepared import prepare_requests
    from tracing.models import mlp_width

    _, memit = edit_layers(cell.model, cell.small, cell.layers)
    layers = [memit[-1]]
    hp = _hparams(cell, model, "alphaedit", layers)
    d, n = mlp_width(model), 100
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, min(512, d - 1), generator=gen))
    P = torch.eye(d).addmm_(q, q.T, alpha=-1.0)
    del q
    prepared = prepare_requests(model, synthetic_requests(n), ("{}",))
    z = torch.randn(n, int(model.cfg.d_model), generator=gen)

    def run() -> dict[str, Any]:
        solver = alphaedit_solver(hp, {layers[0]: P}, None)
        with restoring_weights(model, layers, always=True):
            layer_updates(model, prepared, hp, z, solver)
        return {}

    notes = (
        f"AlphaEdit keys + layer update of {n} requests with z and the projector given "
        f"(random, rank d_mlp - 512, 1 x d_mlp^2 float32 in hand), layer {layers[0]}, bare prompt"
    )
    return run, notes, 0.0


def _ft(cell: Cell, model: Any, constraint: str) -> Prepared:
    from editing.api import make_edit
    from tracing.loading import cache_dir

    rome, _ = edit_layers(cell.model, cell.small, cell.layers)
    extra: dict[str, Any] = {"params": "block", "num_steps": cell.ft_steps}
    if constraint == "fisher":
        extra.update(constraint="fisher", fisher_sequences=cell.fisher_sequences, fisher_facts=0)
        shutil.rmtree(cache_dir() / "fisher", ignore_errors=True)  # the Fisher is measured too
    hp = _hparams(cell, model, "ft-l", [rome], **extra)
    req = synthetic_requests(1)[0]

    def run() -> dict[str, Any]:
        make_edit(model, req, "ft-l", hp, progress=False)
        return {}

    notes = f"block {rome} (every tensor), {cell.ft_steps} steps (paper: 25), 1 request"
    if constraint == "fisher":
        notes += f"; Fisher on {cell.fisher_sequences} WikiText sequences of 128, no facts"
    return run, notes, 0.0


def prep_ft_linf(cell: Cell, model: Any) -> Prepared:
    return _ft(cell, model, "linf")


def prep_ft_fisher(cell: Cell, model: Any) -> Prepared:
    return _ft(cell, model, "fisher")


def prep_eval(cell: Cell, model: Any) -> Prepared:
    from editing.evaluation.runner import EvalConfig, evaluate
    from editing.evaluation.scoring import ModelScorer

    rome, _ = edit_layers(cell.model, cell.small, cell.layers)
    hp = _hparams(cell, model, "rome", [rome])
    _templates(model, hp)
    _moments(cell, model, [rome])  # into the cache the runner's edit reads
    gc.collect()
    out = Path(tempfile.mkdtemp(prefix="scale-eval-", dir=cell.work))
    cfg = EvalConfig(
        dataset="counterfact", method="rome", n=1, hparams=hp, out_dir=str(out),
        only_known=False, progress=False, generation=None,
    )  # fmt: skip

    def run() -> dict[str, Any]:
        scorer = TimedScorer(ModelScorer(model))
        t = time.perf_counter()
        try:
            evaluate(model, cfg, scorer=scorer)
            total = time.perf_counter() - t
            rows = [json.loads(x) for f in out.glob("*/cases.jsonl") for x in f.open()]
        finally:
            shutil.rmtree(out, ignore_errors=True)
        edit_s = float(rows[0]["edit_seconds"]) if rows else float("nan")
        overhead = total - edit_s - scorer.seconds
        return {
            "edit_seconds": round(edit_s, 2),
            "scoring_seconds": round(scorer.seconds, 2),
            "overhead_seconds": round(overhead, 2),
            "overhead_pct_of_edit": round(100 * overhead / edit_s, 1),
        }

    notes = (
        "1 CounterFact case through the runner (ROME as in the rome row, unfiltered, "
        "no fluency generation); the runner reads the layer's statistics itself"
    )
    return run, notes, _stats_bytes(model, 1)


def _synthetic_edit(model: Any, layer: int) -> Any:
    from editing.edits.edit import Edit, LayerDelta
    from tracing.models import fingerprint, mlp_width, model_name

    gen = torch.Generator().manual_seed(0)
    left = torch.randn(mlp_width(model), generator=gen) * 1e-3
    right = torch.randn(int(model.cfg.d_model), generator=gen)
    return Edit(
        deltas=[LayerDelta(layer, left=left, right=right)],
        method="rome",
        requests=synthetic_requests(1),
        hparams={},
        model_fingerprint=fingerprint(model),
        model_name=model_name(model),
    )


def prep_save_load(cell: Cell, model: Any) -> Prepared:
    from editing.edits.edit import Edit

    rome, _ = edit_layers(cell.model, cell.small, cell.layers)
    edit = _synthetic_edit(model, rome)

    def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(dir=cell.work) as tmp:
            edit.save(Path(tmp) / "edit")
            back = Edit.load(Path(tmp) / "edit")
            with back.applied(model):
                pass
        return {}

    return run, f"a rank-one edit of layer {rome}: save, load, apply, undo", 0.0


def prep_export(cell: Cell, model: Any) -> Prepared:
    rome, _ = edit_layers(cell.model, cell.small, cell.layers)
    edit = _synthetic_edit(model, rome)

    def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(dir=cell.work) as tmp:
            folder = edit.export(model, Path(tmp) / "hf")
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        return {"folder_gb": round(size / GB, 2)}

    return run, "Edit.export to a Hugging Face folder (temporary, deleted)", 0.0


STEPS: dict[str, Callable[[Cell, Any], Prepared]] = {
    "stats": prep_stats,
    "trace": prep_trace,
    "rome": prep_rome,
    "memit-z": prep_memit_z,
    "memit100": prep_memit100,
    "memit1000": prep_memit1000,
    "alphaedit": prep_alphaedit,
    "alphaedit-f32": prep_alphaedit_f32,
    "alphaedit-solve": prep_alphaedit_solve,
    "ft-linf": prep_ft_linf,
    "ft-fisher": prep_ft_fisher,
    "eval": prep_eval,
    "save-load": prep_save_load,
    "export": prep_export,
}


def run_cell(cell: Cell, partial: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Build the model, prepare and measure ``cell.step``; the JSON line's numbers
    (``partial`` gets what is known before the clock starts, in case the step is stopped)."""
    key = cell.model
    spec = ALL_SPECS[key]
    shape = shape_of(key, cell.small, cell.layers)
    work = Path(cell.work)
    # The tokenizer's folder doubles as the model's name: an export reads its tokenizer there.
    name = str(work / f"tokenizer-{spec.arch}")
    t = time.perf_counter()
    cpu = torch.device("cpu")
    model = build_model(
        spec, shape, cpu, torch.float32, work, name, fast_init=True, reuse_tokenizer=True
    )
    built_s = time.perf_counter() - t
    gc.collect()
    built = resident_gb()
    log.info("%s: built in %.1f s, resident %.2f GB", key, built_s, built)
    run, notes, inside = STEPS[cell.step](cell, model)
    gc.collect()
    before = resident_gb()
    known = {
        "notes": notes,
        "built_gb": round(built, 2),
        "in_hand_gb": round(before + inside, 2),
        "weights_gb": round(weights_gb(model), 2),
    }
    partial({"status": "running", **known})
    exact = reset_peak()
    t = time.perf_counter()
    extra = run()
    seconds = time.perf_counter() - t
    peak = peak_gb()
    return {
        "seconds": round(seconds, 4),  # a few-millisecond step stays above 0
        "peak_gb": round(peak, 2),
        "transient_gb": round(peak - before - inside, 2),
        "build_seconds": round(built_s, 1),
        "peak_reset": exact,
        "extra": extra,
        **known,
    }
