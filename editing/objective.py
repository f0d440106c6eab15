"""The one optimisation behind ROME's v* and MEMIT's z: its loss, and Adam on it.

For each request, with ``delta`` added at the subject's last token of every rewriting prompt
and of the KL prompt (:mod:`editing.targets`), the loss is

    NLL(target_new | rewriting prompts)                   (mean over prompts of the mean
                                                            NLL of the target's tokens)
    + kl_factor * KL(p_new || p_orig) at the KL prompt "{subject} is a"
    + weight_decay * ||delta|| / ||init||^2

where ``init`` is the changed state at the bare prompt's subject-last token before any
change; after every Adam step ``||delta|| <= clamp_norm_factor * ||init||`` is enforced, and
a request stops once its total loss is below ``early_stop_loss``. That is the reference code
(ROME's ``compute_v``, MEMIT's ``compute_z``) and the default; the departures factscope
offers (the squared weight decay, the other KL direction, the KL read at the last position, a
scale-free parametrisation of ``delta``, early stopping on the NLL alone) are named choices
of :class:`~editing.hparams.TargetHparams`.

:class:`TargetObjective` computes the loss and its gradient at any ``delta`` (the parity tests
compare both with an independent implementation); :func:`compute_targets` runs Adam on it.
Requests are optimised together but are independent (their losses add, Adam is per
coordinate and each request stops on its own), so batching gives the same result as one
request at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float

from editing.hparams import TargetHparams
from editing.prepared import PreparedRequest
from editing.targets import DEFAULT_BATCH_TOKENS, DeltaRunner, TargetHook, rewrite_prompts
from tracing.distributed import Ranks, gather_objects, ranks, together
from tracing.errors import EditFailed, InvalidInput
from tracing.memory import batch_tokens, is_out_of_memory
from tracing.models import HookedModel, layer_device

log = logging.getLogger(__name__)


@dataclass
class LossParts:
    """Per request: the target NLL, the KL term (before ``kl_factor``), the weight decay
    (with its factor) and the total loss, all detached."""

    nll: Float[torch.Tensor, " n"]
    kl: Float[torch.Tensor, " n"]
    weight_decay: Float[torch.Tensor, " n"]
    total: Float[torch.Tensor, " n"]


class TargetObjective:
    """The v*/z loss of some prepared requests at one edit point (see the module docstring).

    Built once (the states below the edit point and the original KL distributions are
    computed then); :meth:`evaluate` gives the loss parts at a ``delta`` and accumulates the
    gradient of the summed total loss of the active requests into ``delta.grad``.
    """

    def __init__(
        self,
        model: HookedModel,
        prepared: Sequence[PreparedRequest],
        layer: int,
        hook: TargetHook,
        hp: TargetHparams,
        *,
        max_batch_tokens: int | None = None,
    ) -> None:
        if not prepared:
            raise InvalidInput("no requests to compute targets for")
        self.hp, self.n = hp, len(prepared)
        prompts = rewrite_prompts(prepared, "last" if hp.kl_position == "last" else "subject_last")
        self.runner = DeltaRunner(
            model, prompts, layer, hook, loss_layer=hp.loss_layer, max_tokens=max_batch_tokens
        )
        # The deltas and everything they are measured against are float32 whatever the
        # model's dtype, on the edit layer's device.
        self.init = self.runner.init_values(self.n).detach().float()
        self.device = self.init.device
        if not torch.isfinite(self.init).all():
            raise EditFailed(f"non-finite activations at layer {layer} for the edit prompts")
        self.init_norm2 = self.init.pow(2).sum(-1)
        zero = torch.zeros_like(self.init)
        self.kl_ref: list[torch.Tensor] = []  # per chunk: log p_orig at its KL reads
        with torch.no_grad():
            for c in self.runner.chunks:
                every = torch.arange(len(c.prompts), device=self.device)
                logp, _ = self.runner.chunk_logprobs(c, zero, every)
                self.kl_ref.append(logp[(c.read_target < 0).to(logp.device)])

    def evaluate(
        self,
        delta: Float[torch.Tensor, "n d_model"],
        active: Bool[torch.Tensor, " n"] | None = None,
    ) -> LossParts:
        """Loss parts of every request at ``delta`` (inactive requests: zeros); when ``delta``
        requires a gradient, that of the active requests' summed total loss is accumulated
        into ``delta.grad`` chunk by chunk (the graph of one chunk at a time is kept)."""
        hp = self.hp
        dev = self.device
        active = torch.ones(self.n, dtype=torch.bool, device=dev) if active is None else active
        nll = torch.zeros(self.n, device=dev)
        kl = torch.zeros(self.n, device=dev)
        for ci, c in enumerate(self.runner.chunks):
            rows = torch.nonzero(active[c.owner]).flatten()
            if len(rows) == 0:
                continue
            logp, keep = self.runner.chunk_logprobs(c, delta, rows)
            at = logp.device  # the unembedding's device (another one under a device map)
            tgt, w = c.read_target[keep].to(at), c.read_weight[keep].to(at)
            own = c.read_owner[keep]
            is_kl = tgt < 0
            per = -logp[~is_kl].gather(1, tgt[~is_kl][:, None])[:, 0] * w[~is_kl]
            loss = per.sum()
            nll.index_add_(0, own[~is_kl.to(dev)], per.detach().to(dev))
            if is_kl.any() and hp.kl_factor > 0:
                ref = self.kl_ref[ci][keep[c.read_target < 0].to(at)]
                cur = logp[is_kl]
                if hp.kl_direction == "new_orig":
                    div = (cur.exp() * (cur - ref)).sum(-1)
                else:
                    div = (ref.exp() * (ref - cur)).sum(-1)
                loss = loss + hp.kl_factor * div.sum()
                kl.index_add_(0, own[is_kl.to(dev)], div.detach().to(dev))
            if loss.requires_grad:
                loss.backward()
        norm = delta.norm(dim=-1)
        size = norm if hp.weight_decay_form == "norm" else norm.pow(2)
        wd = hp.weight_decay * size / self.init_norm2 * active
        if wd.requires_grad:
            wd.sum().backward()
        wd = wd.detach()
        return LossParts(nll=nll, kl=kl, weight_decay=wd, total=nll + hp.kl_factor * kl + wd)


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
) -> TargetResult:
    """Optimise one vector per prepared request so the model predicts its ``target_new`` in
    every context template it was prepared with (see the module docstring).

    All requests are optimised together in every step; each stops on its own (``hp.early_stop_on``
    below ``hp.early_stop_loss``). Raises :class:`~tracing.errors.EditFailed` on non-finite
    losses or targets. The model's weights are never changed.

    Prompts go through the model in chunks of ``max_batch_tokens`` (default: the model's
    budget, :func:`tracing.memory.batch_tokens`); if the device runs out of memory the
    optimisation starts again with half the chunk (said in the log).

    ``shard`` (every torchrun rank calls this with the same requests): each rank optimises
    every world-th request and the results are gathered; as requests are independent, this
    is the one-process result (up to the chunking of the forward passes).
    """
    here = ranks()
    if shard and here.world > 1:
        return _gathered(model, prepared, layer, hook, hp, max_batch_tokens, here)
    budget = max_batch_tokens or batch_tokens(model, grad=True, cpu_default=DEFAULT_BATCH_TOKENS)
    while True:
        try:
            return _optimise(model, prepared, layer, hook, hp, budget, progress)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc) or budget <= 1:
                raise
            budget //= 2
            log.warning(
                "targets at layer %d: out of memory; restarting with %d-token chunks", layer, budget
            )


def _optimise(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    layer: int,
    hook: TargetHook,
    hp: TargetHparams,
    max_batch_tokens: int,
    progress: bool,
) -> TargetResult:
    obj = TargetObjective(model, prepared, layer, hook, hp, max_batch_tokens=max_batch_tokens)
    init, n = obj.init, obj.n
    if hp.parametrization == "scaled":
        scale = _robust_scale(init)[:, None]
    else:
        scale = torch.ones(n, 1, device=obj.device)
    max_theta = hp.clamp_norm_factor * init.norm(dim=-1, keepdim=True) / scale
    theta = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=hp.lr)
    active = torch.ones(n, dtype=torch.bool, device=obj.device)
    nll_first = torch.zeros(n, device=obj.device)
    nll_last = torch.zeros(n, device=obj.device)
    steps = torch.zeros(n, dtype=torch.long, device=obj.device)
    history: list[list[float]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=hp.num_steps, desc=f"targets (layer {layer})", leave=False)
    for step in range(max(1, hp.num_steps)):
        opt.zero_grad()
        delta = (theta.detach() * scale).requires_grad_()
        parts = obj.evaluate(delta, active)
        grad = delta.grad
        if grad is None or not torch.isfinite(parts.total).all() or not torch.isfinite(grad).all():
            raise EditFailed(f"non-finite loss while optimising targets at layer {layer}")
        theta.grad = grad * scale  # d loss / d theta, as delta = theta * scale
        if step == 0:
            nll_first = parts.nll.clone()
        nll_last = torch.where(active, parts.nll, nll_last)
        history.append(parts.nll.tolist())
        watched = parts.total if hp.early_stop_on == "total" else parts.nll
        steps[active] = step
        active &= watched >= hp.early_stop_loss
        if bar is not None:
            bar.update(1)
            bar.set_postfix(nll=f"{float(nll_last.mean()):.3f}", active=int(active.sum()))
        if step >= hp.num_steps - 1 or not active.any():
            break
        with torch.no_grad():
            theta.grad[~active] = 0
            frozen = theta.detach().clone()
        opt.step()
        with torch.no_grad():
            theta[~active] = frozen[~active]
            norm = theta.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            theta.mul_(torch.clamp(max_theta / norm, max=1.0))
    if bar is not None:
        bar.close()
    delta = (theta * scale).detach()
    if not torch.isfinite(delta).all():
        raise EditFailed(f"non-finite target vectors at layer {layer}")
    return TargetResult(
        layer=layer,
        hook=hook,
        init=init,
        delta=delta,
        nll_before=nll_first.tolist(),
        nll_after=nll_last.tolist(),
        steps=steps.tolist(),
        history=history,
    )


def _gathered(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    layer: int,
    hook: TargetHook,
    hp: TargetHparams,
    max_batch_tokens: int | None,
    here: Ranks,
) -> TargetResult:
    """This rank's share of :func:`compute_targets`, then everyone's, in request order."""
    mine = here.shard(list(range(len(prepared))))
    log.info("targets: rank %d optimises %d of %d requests", here.rank, len(mine), len(prepared))

    def share() -> tuple[list[int], dict | None]:
        if not mine:
            return mine, None
        res = compute_targets(
            model,
            [prepared[i] for i in mine],
            layer=layer,
            hook=hook,
            hp=hp,
            max_batch_tokens=max_batch_tokens,
        )
        fields = ("init", "delta", "nll_before", "nll_after", "steps")
        out = {f: getattr(res, f) for f in fields}
        out["init"], out["delta"] = res.init.cpu(), res.delta.cpu()
        return mine, out

    n = len(prepared)
    init: list[torch.Tensor | None] = [None] * n
    delta: list[torch.Tensor | None] = [None] * n
    lists: dict[str, list[Any]] = {f: [None] * n for f in ("nll_before", "nll_after", "steps")}
    for idx, part in gather_objects(together(share)):
        for j, i in enumerate(idx):
            assert part is not None
            init[i], delta[i] = part["init"][j], part["delta"][j]
            for f in lists:
                lists[f][i] = part[f][j]
    device = layer_device(model, layer)
    return TargetResult(
        layer=layer,
        hook=hook,
        init=torch.stack(init).to(device),  # type: ignore[arg-type]
        delta=torch.stack(delta).to(device),  # type: ignore[arg-type]
        nll_before=lists["nll_before"],
        nll_after=lists["nll_after"],
        steps=lists["steps"],
    )
