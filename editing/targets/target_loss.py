"""The loss behind ROME's v* and MEMIT's z, at any ``delta``, with its gradient.

For each request, with ``delta`` added at the subject's last token of every rewriting prompt
and of the KL prompt (:mod:`editing.targets.optimise`), the loss is

    NLL(target_new | rewriting prompts)                   (mean over prompts of the mean
                                                            NLL of the target's tokens)
    + kl_factor * KL(p_new || p_orig) at the KL prompt "{subject} is a"
    + weight_decay * ||delta|| / ||init||^2

where ``init`` is the changed state at the bare prompt's subject-last token before any
change. That is the reference code (ROME's ``compute_v``, MEMIT's ``compute_z``) and the
default; the departures factscope offers (the squared weight decay, the other KL direction,
the KL read at the last position, the neighbour KL term) are named choices of
:class:`~editing.hparams.TargetHparams`.

:class:`TargetObjective` computes the loss and its gradient at any ``delta`` (the parity tests
compare both with an independent implementation); each read's term (the NLL of one target
token, the KL at one distribution read) comes from :mod:`editing.targets.vocab_loss`, in one
sweep over the unembedding where that applies; :mod:`editing.targets.objective` runs Adam on it
(the clamp of ``||delta||``, early stopping, the scale-free parametrisation of ``delta``).
Requests are independent: their losses add, so the gradient of one request's loss does not
depend on which other requests are evaluated with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float

from editing.hparams import TargetHparams
from editing.requests.prepared import PreparedRequest, neighbour_prompts
from editing.targets.optimise import (
    KL_READ,
    NEIGHBOUR_READ,
    DeltaRunner,
    TargetHook,
    rewrite_prompts,
)
from editing.targets.vocab_loss import DistRefs, read_losses
from tracing.errors import EditFailed, InvalidInput
from tracing.models import HookedModel, final_logprobs


@dataclass
class LossParts:
    """Per request: the target NLL, the KL term (before ``kl_factor``), the mean KL over the
    neighbour prompts (before ``neighbour_kl_factor``; zero when that is off), the weight
    decay (with its factor) and the total loss, all detached."""

    nll: Float[torch.Tensor, " n"]
    kl: Float[torch.Tensor, " n"]
    neighbour_kl: Float[torch.Tensor, " n"]
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
        self.model, self.hp, self.n = model, hp, len(prepared)
        neighbours = None
        if hp.neighbour_kl_factor > 0:
            neighbours = [
                neighbour_prompts(model, p.request, hp.neighbour_prompts) for p in prepared
            ]
        prompts = rewrite_prompts(
            prepared, "last" if hp.kl_position == "last" else "subject_last", neighbours
        )
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
        # per pass: p_orig at its distribution reads (editing.targets.vocab_loss.DistRefs); taken
        # from the first evaluation when that is at delta = 0 with every request active (the
        # optimiser's first step: the same forward pass, not a second one), else computed then
        self.kl_ref: list[DistRefs] | None = None
        self._pending: list[torch.Tensor] = []  # per pass: per-request losses with their graphs
        # float16 models: the optimiser's loss scaler (torch.amp.GradScaler); every backward
        # pass then runs on the scaled loss, so that small gradients inside the model do not
        # flush to zero (float16 keeps nothing below 6e-8), and delta.grad holds scale * grad
        self.scaler: torch.amp.GradScaler | None = None

    def evaluate(
        self,
        delta: Float[torch.Tensor, "n d_model"],
        active: Bool[torch.Tensor, " n"] | None = None,
        *,
        defer: bool = False,
    ) -> LossParts:
        """Loss parts of every request at ``delta`` (inactive requests: zeros); when ``delta``
        requires a gradient, that of the active requests' summed total loss is accumulated
        into ``delta.grad`` pass by pass (the graph of one pass at a time is kept).

        ``defer``: keep every pass's graph instead and accumulate nothing yet; the caller
        then decides which requests still need a gradient (:meth:`backward`). The optimiser
        uses it when the requests fit in one pass, so a request that stops at this step
        costs no backward pass."""
        hp = self.hp
        dev = self.device
        # a copy: the caller's mask may change before a deferred backward reads this one
        active = (
            torch.ones(self.n, dtype=torch.bool, device=dev) if active is None else active.clone()
        )
        nll = torch.zeros(self.n, device=dev)
        kl = torch.zeros(self.n, device=dev)
        neighbour_kl = torch.zeros(self.n, device=dev)
        self._pending = []
        reuse = self.kl_ref is None and bool(active.all()) and not bool(delta.detach().any())
        if self.kl_ref is None and not reuse:
            zero = torch.zeros_like(self.init)
            with torch.no_grad():
                self.kl_ref = [
                    self._dist_refs(self.runner.pass_states(p, zero)[0], p.read_target)
                    for p in self.runner.passes
                ]
        refs_now: list[DistRefs] = []
        for pi, p in enumerate(self.runner.passes):
            if not active[p.read_owner].any():
                continue
            states, keep = self.runner.pass_states(p, delta, active)
            tgt = p.read_target[keep].to(states.device)
            if reuse:  # every read of the pass is computed, at delta = 0: the q's are these
                refs_now.append(self._dist_refs(states.detach(), tgt))
                refs = refs_now[-1]
            else:
                assert self.kl_ref is not None
                refs = self.kl_ref[pi][keep[p.read_target < 0]]
            losses = read_losses(self.model, states, tgt, refs, hp.kl_direction)
            at = losses.device  # the unembedding's (another one under a device map)
            tgt, w = tgt.to(at), p.read_weight[keep].to(at)
            own = p.read_owner[keep].to(at)
            losses = losses * w  # each read's share of its request's mean over its kind
            is_nll = tgt >= 0
            by_request = torch.zeros(self.n, device=at, dtype=losses.dtype)
            by_request = by_request.index_add(0, own[is_nll], losses[is_nll])
            nll.index_add_(0, own[is_nll].to(dev), losses[is_nll].detach().to(dev))
            for code, factor, into in (
                (KL_READ, hp.kl_factor, kl),
                (NEIGHBOUR_READ, hp.neighbour_kl_factor, neighbour_kl),
            ):
                mine = tgt == code
                if not mine.any() or factor <= 0:
                    continue
                by_request = by_request.index_add(0, own[mine], factor * losses[mine])
                into.index_add_(0, own[mine].to(dev), losses[mine].detach().to(dev))
            if by_request.requires_grad:
                if defer:
                    self._pending.append(by_request)
                else:
                    self._backward(by_request.sum())
        if reuse:
            self.kl_ref = refs_now
        norm = delta.norm(dim=-1)
        size = norm if hp.weight_decay_form == "norm" else norm.pow(2)
        wd = hp.weight_decay * size / self.init_norm2 * active
        if wd.requires_grad:
            if defer:
                self._pending.append(wd)
            else:
                self._backward(wd.sum())
        wd = wd.detach()
        total = nll + hp.kl_factor * kl + hp.neighbour_kl_factor * neighbour_kl + wd
        return LossParts(nll=nll, kl=kl, neighbour_kl=neighbour_kl, weight_decay=wd, total=total)

    def _dist_refs(self, states: torch.Tensor, target: torch.Tensor) -> DistRefs:
        """The original distributions at the distribution reads among some reads' final
        states (taken at delta = 0)."""
        with torch.no_grad():
            dist = states[(target < 0).to(states.device)]
            logq = final_logprobs(self.model, dist[None])[0]
        return DistRefs.from_logq(self.model, logq)

    def backward(self, keep: Bool[torch.Tensor, " n"]) -> None:
        """After ``evaluate(..., defer=True)``: accumulate into ``delta.grad`` the gradient
        of the summed total loss of the requests in ``keep`` only (the same gradient those
        requests get without deferring: requests are independent), and free the graphs."""
        pending, self._pending = self._pending, []
        sums = [x[keep.to(x.device)].sum() for x in pending]
        if sums and bool(keep.any()):
            at = sums[0].device
            self._backward(torch.stack([x.to(at) for x in sums]).sum())

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, on the loss times the scaler's scale when there is one."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
