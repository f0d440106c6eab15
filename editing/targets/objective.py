"""The one optimisation behind ROME's v* and MEMIT's z: Adam on the loss of
:mod:`editing.targets.target_loss`, requests in groups, results cached, work shared across ranks.

For each request, Adam moves ``delta`` (added at the subject's last token; the loss and its
gradient: :class:`~editing.targets.target_loss.TargetObjective`); after every step
``||delta|| <= clamp_norm_factor * ||init||`` is enforced, and a request stops once its total
loss is below ``early_stop_loss``. That is the reference code (ROME's ``compute_v``, MEMIT's
``compute_z``) and the default; the departures factscope offers here (a scale-free
parametrisation of ``delta``, early stopping on the NLL alone) are named choices of
:class:`~editing.hparams.TargetHparams`, as are those of the loss.

:func:`compute_targets` runs it. Requests are optimised together but are independent (their
losses add, Adam is per coordinate and each request stops on its own), so batching gives the
same result as one request at a time; that is also what lets it optimise them in groups
(bounded memory), keep each final result on disk (:mod:`editing.targets.cache`, resumable) and
give every torchrun rank a share of them.

A float16 model is optimised through with torch's dynamic loss scaling
(:func:`loss_scaler`, :data:`LOSS_SCALING`): the loss is multiplied before every backward
pass so that gradients inside the model stay above float16's underflow, the gradient is
divided back before Adam's step, and a step whose scaled gradient overflowed is skipped
with the scale halved. bfloat16 and float32 need none (the scaler is then a pass-through).

:class:`~editing.targets.target_loss.TargetObjective` and
:class:`~editing.targets.target_loss.LossParts` are importable from here as well.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float

from editing.hparams import TargetHparams
from editing.requests.prepared import PreparedRequest
from editing.targets.cache import CachedTarget, TargetCache
from editing.targets.optimise import TargetHook
from editing.targets.target_loss import LossParts, TargetObjective
from tracing.distributed import Ranks, gather_objects, ranks, together
from tracing.errors import EditFailed, InvalidInput
from tracing.memory import batch_tokens, is_out_of_memory
from tracing.models import HookedModel, layer_device, model_dtype

__all__ = [
    "DEFAULT_GRAD_TOKENS",
    "DEFAULT_GROUP",
    "LossParts",
    "TargetObjective",
    "TargetResult",
    "compute_targets",
]

log = logging.getLogger(__name__)

#: Requests optimised together (one group at a time: memory stays bounded at any batch size).
DEFAULT_GROUP = 64
#: Positions re-run with gradient per forward-and-backward pass on the CPU (each prompt from
#: its subject-last token on). Memory: the autograd graph of a pass through the re-run blocks
#: plus its [reads, vocab] log-probabilities. Measured on the embedded model (one group of 64
#: MEMIT requests, 2026-12-02; benchmarks/edit_speed.py --z 64 --z-budget B): 384 peaks at
#: 3,367 MiB in 196 s, 512 at 3,693 MiB in 195 s, 1,024 at 4,753 MiB in 198 s; counting
#: whole prompts, 1,024 tokens (the former default) peaked at 3,299 MiB in 257 s, as its many
#: small passes each paid the blocks' fixed cost.
DEFAULT_GRAD_TOKENS = 384


@dataclass
class TargetResult:
    """Result of :func:`compute_targets`: per request, the state before (``init``), the
    vector added (``delta``), ``targets = init + delta`` (ROME's v* / MEMIT's z), the target's
    mean NLL before and after, and the steps taken."""

    layer: int
    hook: str
    init: Float[torch.Tensor, "n d_model"]
    delta: Float[torch.Tensor, "n d_model"]
    nll_before: list[float]
    nll_after: list[float]
    steps: list[int]
    history: list[list[float]] = field(default_factory=list)  # mean NLL per step per request

    @property
    def targets(self) -> Float[torch.Tensor, "n d_model"]:
        """``init + delta``."""
        return self.init + self.delta


def _robust_scale(x: torch.Tensor) -> torch.Tensor:
    """Typical coordinate size of each row: 1.4826 x median |x| (RMS if that is zero). With
    ``parametrization="scaled"`` Adam moves every coordinate of ``delta`` by about
    ``lr * scale`` per step whatever the model's activation scale (Gemma's residual is ~100x
    GPT-J's); the median ignores the few massive-activation coordinates (Gemma: two hold
    >90% of the residual norm) that would make an RMS-based scale far too large."""
    med = 1.4826 * x.abs().median(dim=-1).values
    rms = x.pow(2).mean(-1).sqrt()
    return torch.where(med > 0, med, rms).clamp_min(1e-12)


def compute_targets(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    *,
    layer: int,
    hook: TargetHook,
    hp: TargetHparams,
    max_batch_tokens: int | None = None,
    progress: bool = False,
    shard: bool = False,
    cache: TargetCache | None = None,
    group_size: int = DEFAULT_GROUP,
) -> TargetResult:
    """Optimise one vector per prepared request so the model predicts its ``target_new`` in
    every context template it was prepared with (see the module docstring).

    All requests are optimised together in every step; each stops on its own (``hp.early_stop_on``
    below ``hp.early_stop_loss``). Raises :class:`~tracing.errors.EditFailed` on non-finite
    losses or targets. The model's weights are never changed.

    Prompts go through the model in passes that re-run at most ``max_batch_tokens``
    positions (default: the model's budget, :func:`tracing.memory.batch_tokens`; on the CPU
    :data:`DEFAULT_GRAD_TOKENS`); if the device runs out of memory the optimisation starts
    again with half the budget (said in the log).

    Requests are optimised ``group_size`` at a time, so memory does not grow with the
    batch; within a group the requests still running shrink as others converge. With a
    ``cache`` (:class:`~editing.targets.cache.TargetCache`) each request's result is written
    the moment it is final and requests already there are not optimised again: an
    interrupted batch resumes.

    ``shard`` (every torchrun rank calls this with the same requests): each rank optimises
    every world-th request and the results are gathered; as requests are independent, this
    is the one-process result (up to the chunking of the forward passes).
    """
    if group_size < 1:
        raise InvalidInput(f"group_size must be >= 1, got {group_size}")
    here = ranks()
    if shard and here.world > 1:
        return _gathered(model, prepared, layer, hook, hp, max_batch_tokens, here, cache)
    budget = max_batch_tokens or batch_tokens(model, grad=True, cpu_default=DEFAULT_GRAD_TOKENS)
    done: dict[int, CachedTarget] = {}
    if cache is not None:
        for i, p in enumerate(prepared):
            hit = cache.get(p)
            if hit is not None:
                done[i] = hit
        if done:
            log.info(
                "targets at layer %d: %d of %d read from %s",
                layer,
                len(done),
                len(prepared),
                cache.folder,
            )
    todo = [i for i in range(len(prepared)) if i not in done]
    bar = _bar(progress, len(prepared), len(done), layer)
    history: dict[int, list[float]] = {}
    for g in range(0, len(todo), group_size):
        group = todo[g : g + group_size]

        def final(j: int, result: CachedTarget, group: list[int] = group) -> None:
            done[group[j]] = result
            if cache is not None:
                cache.put(prepared[group[j]], result)
            if bar is not None:
                bar.update(1)

        while True:
            try:
                hist = _optimise(
                    model, [prepared[i] for i in group], layer, hook, hp, budget, final
                )
                break
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc) or budget <= 1:
                    raise
                budget //= 2
                log.warning(
                    "targets at layer %d: out of memory; restarting the group with %d-token chunks",
                    layer,
                    budget,
                )
        for j, i in enumerate(group):
            history[i] = [row[j] for row in hist]
    if bar is not None:
        bar.close()
    return _assemble(model, layer, hook, [done[i] for i in range(len(prepared))], history)


def _bar(progress: bool, total: int, initial: int, layer: int) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"targets (layer {layer})", unit="request")


def _assemble(
    model: HookedModel,
    layer: int,
    hook: TargetHook,
    results: Sequence[CachedTarget],
    history: dict[int, list[float]] | None = None,
) -> TargetResult:
    """One :class:`TargetResult` of per-request results, on the edit layer's device."""
    device = layer_device(model, layer)
    steps = max((len(h) for h in (history or {}).values()), default=0)
    return TargetResult(
        layer=layer,
        hook=hook,
        init=torch.stack([r.init.float() for r in results]).to(device),
        delta=torch.stack([r.delta.float() for r in results]).to(device),
        nll_before=[r.nll_before for r in results],
        nll_after=[r.nll_after for r in results],
        steps=[r.steps for r in results],
        history=[
            [
                history[i][s] if s < len(history.get(i, [])) else float("nan")
                for i in range(len(results))
            ]
            for s in range(steps)
        ]
        if history
        else [],
    )


def _optimise(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    layer: int,
    hook: TargetHook,
    hp: TargetHparams,
    max_batch_tokens: int,
    final: Callable[[int, CachedTarget], None],
) -> list[list[float]]:
    """Adam on the objective of ``prepared`` (one group); ``final(j, result)`` is called for
    request ``j`` the moment it stops (converged, or at the last step). Returns the mean NLL
    per step per request."""
    obj = TargetObjective(model, prepared, layer, hook, hp, max_batch_tokens=max_batch_tokens)
    init, n = obj.init, obj.n
    if hp.parametrization == "scaled":
        scale = _robust_scale(init)[:, None]
    else:
        scale = torch.ones(n, 1, device=obj.device)
    max_theta = hp.clamp_norm_factor * init.norm(dim=-1, keepdim=True) / scale
    theta = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=hp.lr)
    scaler = loss_scaler(model, obj.device)
    obj.scaler = scaler if scaler.is_enabled() else None
    active = torch.ones(n, dtype=torch.bool, device=obj.device)
    nll_first = torch.zeros(n, device=obj.device)
    history: list[list[float]] = []
    last = max(1, hp.num_steps) - 1
    # One pass: decide who stops before the backward pass, so a stopping request costs none.
    defer = len(obj.runner.passes) == 1
    for step in range(last + 1):
        opt.zero_grad()
        delta = (theta.detach() * scale).requires_grad_()
        parts = obj.evaluate(delta, active, defer=defer)
        if not torch.isfinite(parts.total).all():
            raise EditFailed(f"non-finite loss while optimising targets at layer {layer}")
        if step == 0:
            nll_first = parts.nll.clone()
        history.append(parts.nll.tolist())
        watched = parts.total if hp.early_stop_on == "total" else parts.nll
        stopping = active & ((watched < hp.early_stop_loss) | (step == last))
        for j in torch.nonzero(stopping).flatten().tolist():
            d = delta[j].detach()
            if not torch.isfinite(d).all():
                raise EditFailed(f"non-finite target vector at layer {layer}")
            final(j, CachedTarget(init[j], d, float(nll_first[j]), float(parts.nll[j]), step))
        active &= ~stopping
        if not active.any():
            break
        if defer:
            obj.backward(active)
        grad = delta.grad
        if grad is None or (obj.scaler is None and not torch.isfinite(grad).all()):
            raise EditFailed(f"non-finite loss while optimising targets at layer {layer}")
        theta.grad = grad * scale  # d loss / d theta, as delta = theta * scale
        with torch.no_grad():
            theta.grad[~active] = 0
        scaler.step(opt)  # float16: unscaled first; skipped (scale halved) on inf or NaN
        scaler.update()
        with torch.no_grad():
            norm = theta.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            theta.mul_(torch.clamp(max_theta / norm, max=1.0))
    return history


#: The loss scaling of float16 models (:func:`loss_scaler`): a first scale of 2**12 takes
#: gradients of 1e-5 well into float16's normal range (from 6e-5) while gradients up to 16
#: stay below its largest value (65,504); it doubles after 8 steps without overflow and
#: halves (the step skipped) on one. torch's defaults (2**16, every 2,000 steps) suit long
#: training; a v*/z optimisation takes 20-50 steps.
LOSS_SCALING = {"init_scale": 2.0**12, "growth_interval": 8}


def loss_scaler(model: HookedModel, device: torch.device) -> torch.amp.GradScaler:
    """torch's dynamic loss scaler for optimising through ``model``: enabled for a float16
    model (gradients would underflow to zero or overflow to inf without it), a pass-through
    otherwise (bfloat16 has float32's range; float32 needs none)."""
    enabled = model_dtype(model) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled, **LOSS_SCALING)  # type: ignore[arg-type]


def _gathered(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    layer: int,
    hook: TargetHook,
    hp: TargetHparams,
    max_batch_tokens: int | None,
    here: Ranks,
    cache: TargetCache | None,
) -> TargetResult:
    """This rank's share of :func:`compute_targets`, then everyone's, in request order."""
    mine = here.shard(list(range(len(prepared))))
    log.info("targets: rank %d optimises %d of %d requests", here.rank, len(mine), len(prepared))

    def share() -> tuple[list[int], list[CachedTarget]]:
        if not mine:
            return mine, []
        res = compute_targets(
            model,
            [prepared[i] for i in mine],
            layer=layer,
            hook=hook,
            hp=hp,
            max_batch_tokens=max_batch_tokens,
            cache=cache,
        )
        return mine, [
            CachedTarget(
                res.init[j].cpu(),
                res.delta[j].cpu(),
                res.nll_before[j],
                res.nll_after[j],
                res.steps[j],
            )
            for j in range(len(mine))
        ]

    results: list[CachedTarget | None] = [None] * len(prepared)
    for idx, part in gather_objects(together(share)):
        for i, r in zip(idx, part, strict=True):
            results[i] = r
    return _assemble(model, layer, hook, results)  # type: ignore[arg-type]
