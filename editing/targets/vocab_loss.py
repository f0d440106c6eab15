"""The v*/z objective's reads of the vocabulary: each read's loss and its gradient in one
sweep over the unembedding.

Every term of the objective (:mod:`editing.targets.target_loss`) is a function of one read's logits
``l = W x + b`` over the whole vocabulary (``x`` the final-normed state, ``p = softmax(l)``,
``lse = log sum exp l``):

* a target read (the new target's token ``t``): ``-log p_t = lse - l_t``, whose gradient in
  ``x`` is ``sum_v p_v W_v - W_t``;
* a distribution read against the original distribution ``q`` there (the KL prompt, the
  neighbour prompts), ``kl_direction="orig_new"``: ``KL(q || p) = sum q log q - q.l + lse``,
  i.e. ``sum q log q - (W^T q).x - q.b + lse``, gradient ``sum_v p_v W_v - W^T q``;
* the same read, ``kl_direction="new_orig"``: ``KL(p || q) = D - lse`` with
  ``D = sum_v p_v (l_v - log q_v)``, gradient ``sum_v p_v (l_v - log q_v - D) W_v``.

``W^T q``, ``q.b`` and ``sum q log q`` are fixed per read (:class:`DistRefs`), so loss and
gradient need only running sums over the vocabulary: its maximum, ``sum e_v``,
``sum e_v W_v`` (and, for ``new_orig``, ``sum e_v (l_v - log q_v)`` and its ``W``-weighted
sum), with ``e_v = exp(l_v - max)`` rescaled whenever the maximum grows: the online softmax
(Milakov & Gimelshein 2018). :func:`read_losses` computes them a slice of the vocabulary at a
time, both products of a slice while it is in cache, and hands the gradient to autograd. The
generic way (:func:`logp_losses`: the logits' forward product, a log-softmax over
``[reads, vocab]``, and the backward product) reads the unembedding twice and holds several
``[reads, vocab]`` arrays in the autograd graph.

Measured on the embedded Gemma's 262,144 x 640 unembedding, 2 cores, 2026-12-02
(``benchmarks/edit_speed.py --vocab``, loss and gradient): 12 reads (a ROME step) 0.166 ->
0.162 s, 100 reads 0.734 -> 0.603 s, 1,000 reads 7.18 -> 5.74 s; the z optimisation of 64
MEMIT requests (``--z 64``) 115.8 -> 98.1 s with the same steps and final NLLs, its peak
resident memory 3,338 -> 2,797 MiB. At a dozen reads the products run at the same speed
either way (small matrix products are bound by their arithmetic here, not by reading the
unembedding), so ROME gains little.

The sums run in another order than the generic path's, so the two agree up to float32
rounding (the tests compare both with float64). The sweep is taken where the sliced
projection of :mod:`tracing.vocab` is (a plain, frozen CPU unembedding), in float32 (its sums
are kept in float32), with no logit soft-capping and no hook on the unembedding; elsewhere the
generic path runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from tracing.models import HookedModel, final_logprobs
from tracing.vocab import VOCAB_SLICE, sliced


@dataclass
class DistRefs:
    """The original distributions ``q`` at some distribution reads, and what the sweep needs
    of them: ``mean_w = W^T q``, ``mean_b = q.b`` and ``neg_entropy = sum q log q`` (None
    where the sweep is not taken)."""

    logq: Float[torch.Tensor, "k vocab"]
    mean_w: Float[torch.Tensor, "k d_model"] | None = None
    mean_b: Float[torch.Tensor, " k"] | None = None
    neg_entropy: Float[torch.Tensor, " k"] | None = None

    @classmethod
    def from_logq(cls, model: HookedModel, logq: Float[torch.Tensor, "k vocab"]) -> DistRefs:
        """``logq``: log-probabilities at the reads, unedited (detached)."""
        logq = logq.detach()
        if not fused_applies(model, logq):
            return cls(logq)
        lm = model.unembed.original_component
        with torch.no_grad():
            q = logq.exp()
            mean_b = q @ lm.bias if lm.bias is not None else q.new_zeros(len(q))
            return cls(logq, q @ lm.weight, mean_b, (q * logq).sum(-1))

    def __getitem__(self, rows: torch.Tensor) -> DistRefs:
        """The references of some of the reads (a boolean mask or indices)."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows.to(t.device)]

        return DistRefs(
            self.logq[rows.to(self.logq.device)],
            pick(self.mean_w),
            pick(self.mean_b),
            pick(self.neg_entropy),
        )


def fused_applies(model: HookedModel, x: torch.Tensor) -> bool:
    """Whether :func:`read_losses` takes the one-sweep path for states like ``x``."""
    unembed = model.unembed
    hooked = any(
        getattr(h, "_forward_hooks", None) or getattr(h, "_forward_pre_hooks", None)
        for h in (getattr(unembed, "hook_in", None), getattr(unembed, "hook_out", None))
    )
    cap = getattr(model.original_model.config, "final_logit_softcapping", None)
    float32 = unembed.original_component.weight.dtype == torch.float32
    return sliced(model, x) and float32 and not cap and not hooked


def logp_losses(
    logp: Float[torch.Tensor, "reads vocab"],
    target: Int[torch.Tensor, " reads"],
    refs: DistRefs,
    direction: str,
) -> Float[torch.Tensor, " reads"]:
    """Each read's loss from its whole log-probabilities (the generic path): ``-log p`` of
    its target where ``target >= 0``, else the KL against ``refs`` (in the order of those
    reads)."""
    target = target.to(logp.device)  # under a device map the unembedding's device
    tok = torch.nonzero(target >= 0).flatten()
    dist = torch.nonzero(target < 0).flatten()
    out = logp.new_zeros(len(target))
    out = out.index_put((tok,), -logp[tok, target[tok]])
    if len(dist):
        cur, ref = logp[dist], refs.logq.to(logp.device)
        if direction == "new_orig":
            div = (cur.exp() * (cur - ref)).sum(-1)
        else:
            div = (ref.exp() * (ref - cur)).sum(-1)
        out = out.index_put((dist,), div)
    return out


def read_losses(
    model: HookedModel,
    states: Float[torch.Tensor, "reads d_model"],
    target: Int[torch.Tensor, " reads"],
    refs: DistRefs,
    direction: str,
    *,
    fused: bool | None = None,
    rows: int = VOCAB_SLICE,
) -> Float[torch.Tensor, " reads"]:
    """Each read's loss (see the module docstring) from final residual states (before the
    final norm), differentiable in ``states``. ``direction``: the KL of the distribution
    reads, ``"orig_new"`` KL(q || p) or ``"new_orig"`` KL(p || q) (``kl_direction`` of
    :class:`~editing.hparams.TargetHparams`).

    ``fused`` (default: where it applies) runs the one-sweep path, ``rows`` vocabulary rows
    at a time; ``False`` the generic one (:func:`logp_losses`)."""
    if fused is None:
        fused = fused_applies(model, states) and (
            direction == "new_orig" or refs.mean_w is not None or not bool((target < 0).any())
        )
    if not fused:
        logp = final_logprobs(model, states[None])[0]
        return logp_losses(logp, target, refs, direction)
    lm = model.unembed.original_component
    x = model.ln_final(states[None])[0].float()
    return _SweptLosses.apply(x, lm.weight, lm.bias, target, refs, direction, rows)


class _SweptLosses(torch.autograd.Function):
    """Per-read losses from one sweep over the unembedding; gradient for ``x`` only."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        refs: DistRefs,
        direction: str,
        rows: int,
    ) -> torch.Tensor:
        n, vocab = x.shape[0], weight.shape[0]
        dist = torch.nonzero(target < 0).flatten()
        tok = torch.nonzero(target >= 0).flatten()
        log_ratio = direction == "new_orig" and len(dist) > 0
        m = x.new_full((n,), float("-inf"))
        z = x.new_zeros(n)
        acc = x.new_zeros(n, x.shape[1])  # sum_v e_v W_v
        s = x.new_zeros(len(dist))  # new_orig: sum_v e_v (l_v - log q_v)
        acc_r = x.new_zeros(len(dist), x.shape[1])  # new_orig: sum_v e_v (l_v - log q_v) W_v
        for i in range(0, vocab, rows):
            w = weight[i : i + rows]
            logits = x @ w.T if bias is None else torch.addmm(bias[i : i + rows], x, w.T)
            top = torch.maximum(m, logits.amax(-1))
            scale = torch.exp(m - top)
            e = torch.exp(logits - top[:, None])
            z = z * scale + e.sum(-1)
            if log_ratio:
                t = e[dist] * (logits[dist] - refs.logq[:, i : i + rows])
                s = s * scale[dist] + t.sum(-1)
                both = torch.cat([e, t]) @ w
                acc = acc * scale[:, None] + both[:n]
                acc_r = acc_r * scale[dist, None] + both[n:]
            else:
                acc = torch.addmm(acc * scale[:, None], e, w)
            m = top
        lse = m + z.log()
        grad = acc / z[:, None]  # the p-weighted mean of W's rows, per read
        loss = x.new_empty(n)
        wt = weight[target[tok]]
        lt = (x[tok] * wt).sum(-1) + (bias[target[tok]] if bias is not None else 0)
        loss[tok] = lse[tok] - lt
        grad[tok] -= wt
        if len(dist) and direction == "new_orig":
            d = s / z[dist]
            loss[dist] = d - lse[dist]
            grad[dist] = (acc_r - d[:, None] * acc[dist]) / z[dist, None]
        elif len(dist):
            assert refs.mean_w is not None and refs.mean_b is not None
            assert refs.neg_entropy is not None
            cx = (x[dist] * refs.mean_w).sum(-1)
            loss[dist] = refs.neg_entropy - cx - refs.mean_b + lse[dist]
            grad[dist] -= refs.mean_w
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad_loss[:, None] * grad, None, None, None, None, None, None
