"""The one optimisation behind ROME's v* and MEMIT's z.

For each request a vector ``delta`` is added at the subject's last token of every rewriting
prompt (context template + edit prompt + the new target minus its last token) and of the
KL prompt ``"{subject} is a"``; Adam minimises, per request,

    NLL(target_new | rewriting prompts)                      (mean over prompts)
    + kl_factor * KL(p_orig || p_new) of the token after "{subject} is a"  (last position)
    + weight_decay * ||delta||^2 / ||init||^2

with ``||delta|| <= clamp_norm_factor * ||init||`` enforced after every step, where ``init``
is the state being changed at the plain prompt's subject-last token. Where ``delta`` goes:

* ``hook="mlp_raw"`` (ROME): the raw down-projection output of ``layer``
  (hook kind ``mlp_raw``, before Gemma's post-feed-forward norm), so that
  ``v* = init + delta`` lives in the down-projection's output space and ``k* W' = v*``.
* ``hook="resid"`` (MEMIT): the residual stream after ``layer`` (``z = init + delta``).

Step sizes are scale-free: ``delta = scale * theta`` and Adam runs on ``theta``, where
``scale`` is the typical coordinate size of ``init`` (1.4826 x median |init|, the standard
deviation for Gaussian-like vectors). Adam moves every coordinate of ``delta`` by about
``lr * scale`` per step whatever the model's activation scale (Gemma's residual is ~100x
GPT-J's); the median ignores the few massive-activation coordinates (Gemma: two coordinates
hold >90% of the residual norm) that would make an RMS-based scale far too large.

Hot path: the states entering the first re-run block are computed once without gradient;
each step re-runs only the blocks from the edit point up to ``loss_layer``, and the
vocabulary projection is applied only at the positions the loss reads. Prompts are grouped
by length into right-padded chunks (causal attention: right padding never changes a real
position) and every request is optimised in the same steps; requests are independent (their
losses add, Adam is per coordinate and each request stops on its own), so batching gives the
same result as one request at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float

from editing.hparams import TargetHparams
from editing.prepared import PreparedRequest
from tracing.errors import EditFailed, InvalidHparams, InvalidInput
from tracing.forward import (
    capture_block_kwargs,
    capture_states,
    length_chunks,
    padded,
    run_blocks,
)
from tracing.models import HookedModel, check_layer, final_logits, hook_name, n_layers

log = logging.getLogger(__name__)

TargetHook = Literal["mlp_raw", "resid"]
DEFAULT_BATCH_TOKENS = 4096


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class RewritePrompt:
    """One prompt of the optimisation: token ids, the subject-last index where ``delta`` is
    added, and the positions whose next-token logits the loss reads (with their targets;
    the KL prompt reads its last position and has no targets)."""

    request: int
    ids: tuple[int, ...]
    lookup: int
    read: tuple[int, ...]
    targets: tuple[int, ...]
    kind: Literal["rewrite", "kl"]


def rewrite_prompts(prepared: Sequence[PreparedRequest]) -> list[RewritePrompt]:
    """Every rewriting prompt (one per request and context template: the templated prompt
    followed by the new target minus its last token) and one KL prompt per request."""
    out: list[RewritePrompt] = []
    for r, p in enumerate(prepared):
        tgt = p.target
        for t in p.prompts:
            n = len(t.ids)
            read = tuple(range(n - 1, n - 1 + len(tgt)))
            out.append(RewritePrompt(r, t.ids + tgt[:-1], t.subject_last, read, tgt, "rewrite"))
        out.append(RewritePrompt(r, p.kl.ids, p.kl.subject_last, (len(p.kl.ids) - 1,), (), "kl"))
    return out


# --------------------------------------------------------------------------- the runner


def check_edit_layer(model: HookedModel, layer: int, loss_layer: int = -1) -> int:
    """Refuse an edit point with no path to the loss; return the block the loss reads after
    (exclusive ``stop``).

    The vector is added at the subject's last token, while the loss reads the positions that
    predict the target, after the prompt. Only attention in a later block can carry the change
    there, so the edit layer must lie below the loss layer: at the last layer (ROME's v* or
    MEMIT's z there) the gradient would be zero and the update meaningless.
    """
    n = n_layers(model)
    check_layer(model, layer)
    stop = n if loss_layer in (-1, n - 1) else check_layer(model, loss_layer) + 1
    if stop <= layer + 1:
        raise InvalidHparams(
            f"edit layer {layer} has no path to the loss read after layer {stop - 1}: no "
            f"attention lies between the subject and the target positions. Choose a layer "
            f"in 0..{stop - 2}"
        )
    return stop


@dataclass
class _Chunk:
    prompts: list[int]
    tokens: torch.Tensor
    owner: torch.Tensor
    lookup: torch.Tensor
    start_state: torch.Tensor  # input of the first re-run block (or the edited resid)
    init_rows: torch.Tensor  # the edited state at each row's lookup, before any change
    kwargs: list[dict]
    read_row: torch.Tensor  # chunk row of each read position
    read_pos: torch.Tensor
    read_prompt: torch.Tensor  # global prompt index of each read
    read_owner: torch.Tensor  # request of each read
    read_target: torch.Tensor  # target token id (-1: a KL read)
    read_weight: torch.Tensor  # weight of the read's NLL in its request's mean NLL


class DeltaRunner:
    """Logits at the read positions of many prompts with per-request vectors added at the
    subject-last token, re-running only the blocks above the edit point.

    ``hook="mlp_raw"``: ``delta`` is added to the raw down-projection output of ``layer``
    (blocks ``layer..`` are re-run from the cached ``resid_pre``); ``hook="resid"``: it is
    added to the residual stream after ``layer`` (blocks ``layer+1..`` are re-run). The
    states below the edit point are computed once, without gradient, when the runner is
    built.
    """

    def __init__(
        self,
        model: HookedModel,
        prompts: Sequence[RewritePrompt],
        layer: int,
        hook: TargetHook,
        *,
        loss_layer: int = -1,
        max_tokens: int = DEFAULT_BATCH_TOKENS,
    ) -> None:
        check_layer(model, layer)
        if hook not in ("mlp_raw", "resid"):
            raise InvalidInput(f"unknown target hook {hook!r}; expected 'mlp_raw' or 'resid'")
        self.stop = check_edit_layer(model, layer, loss_layer)
        self.model, self.prompts, self.layer, self.hook = model, list(prompts), layer, hook
        self.start = layer if hook == "mlp_raw" else layer + 1
        if hook == "mlp_raw":
            self.edit_hook = hook_name(model, "mlp_raw", layer)
            state = hook_name(model, "resid_pre", layer)
            names = [state, self.edit_hook]
        else:
            state = hook_name(model, "resid", layer)
            names = [state]
        n_rewrite: dict[int, int] = {}
        for p in self.prompts:
            if p.kind == "rewrite":
                n_rewrite[p.request] = n_rewrite.get(p.request, 0) + 1
        self.chunks: list[_Chunk] = []
        for idx in length_chunks([len(p.ids) for p in self.prompts], max_tokens):
            ps = [self.prompts[i] for i in idx]
            tokens = padded([p.ids for p in ps])
            got = capture_states(model, tokens, names, stop_after=names[-1])
            kwargs = capture_block_kwargs(model, tokens[:1])[1] if self.start < self.stop else []
            lookup = torch.tensor([p.lookup for p in ps], dtype=torch.long)
            reads = []
            for r, (g, p) in enumerate(zip(idx, ps, strict=True)):
                for j, pos in enumerate(p.read):
                    if p.kind == "kl":
                        reads.append((r, pos, g, p.request, -1, 0.0))
                    else:
                        w = 1.0 / (len(p.targets) * n_rewrite[p.request])
                        reads.append((r, pos, g, p.request, p.targets[j], w))
            cols = list(zip(*reads, strict=True))
            self.chunks.append(
                _Chunk(
                    prompts=list(idx),
                    tokens=tokens,
                    owner=torch.tensor([p.request for p in ps], dtype=torch.long),
                    lookup=lookup,
                    start_state=got[state],
                    init_rows=got[names[-1]][torch.arange(len(ps)), lookup],
                    kwargs=kwargs,
                    read_row=torch.tensor(cols[0], dtype=torch.long),
                    read_pos=torch.tensor(cols[1], dtype=torch.long),
                    read_prompt=torch.tensor(cols[2], dtype=torch.long),
                    read_owner=torch.tensor(cols[3], dtype=torch.long),
                    read_target=torch.tensor(cols[4], dtype=torch.long),
                    read_weight=torch.tensor(cols[5], dtype=torch.float32),
                )
            )

    def init_values(self, n_requests: int) -> torch.Tensor:
        """The edited state at the subject-last token of each request's first rewriting
        prompt (the bare ``"{}"`` template, i.e. the plain edit prompt), before any change."""
        first: dict[int, int] = {}
        for g, p in enumerate(self.prompts):
            if p.kind == "rewrite":
                first.setdefault(p.request, g)
        out: list[torch.Tensor | None] = [None] * n_requests
        for c in self.chunks:
            for row, g in enumerate(c.prompts):
                r = self.prompts[g].request
                if first.get(r) == g:
                    out[r] = c.init_rows[row]
        if any(o is None for o in out):
            raise InvalidInput("a request has no rewriting prompt")
        return torch.stack(out)  # type: ignore[arg-type]

    def chunk_logprobs(
        self, c: _Chunk, delta: Float[torch.Tensor, "n_requests d_model"], rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-softmax [reads, vocab] at the read positions of the chunk's ``rows`` (indices
        of a subset of its rows) with ``delta[request]`` added at each subject-last token;
        also returns the boolean mask of the chunk's reads that were computed."""
        owner, lookup = c.owner[rows], c.lookup[rows]
        add = delta[owner]
        ar = torch.arange(len(rows))
        h = c.start_state[rows]
        hooks: list[tuple[str, Callable]] = []
        if self.hook == "resid":
            h = h.index_put((ar, lookup), h[ar, lookup] + add)
        else:

            def add_delta(x: torch.Tensor, hook) -> torch.Tensor:
                return x.index_put((ar, lookup), x[ar, lookup] + add)

            hooks = [(self.edit_hook, add_delta)]
        if self.start < self.stop:
            with self.model.hooks(fwd_hooks=hooks):
                h = run_blocks(self.model, h, c.kwargs, self.start, self.stop)
        remap = torch.full((len(c.prompts),), -1, dtype=torch.long)
        remap[rows] = ar
        keep = remap[c.read_row] >= 0
        sel = h[remap[c.read_row[keep]], c.read_pos[keep]]
        logits = final_logits(self.model, sel[None])[0].float()
        return torch.log_softmax(logits, dim=-1), keep


# --------------------------------------------------------------------------- optimisation


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
    """Typical coordinate size of each row: 1.4826 x median |x| (RMS if that is zero)."""
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
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = False,
) -> TargetResult:
    """Optimise one vector per prepared request so the model predicts its ``target_new`` in
    every context template it was prepared with (see the module docstring for the loss and
    where the vector is added).

    All requests are optimised together in every step; each stops on its own once its mean
    target NLL is below ``hp.early_stop_loss``. Raises :class:`~tracing.errors.EditFailed` on
    non-finite losses or targets. The model's weights are never changed.
    """
    if not prepared:
        raise InvalidInput("no requests to compute targets for")
    runner = DeltaRunner(
        model,
        rewrite_prompts(prepared),
        layer,
        hook,
        loss_layer=hp.loss_layer,
        max_tokens=max_batch_tokens,
    )
    n = len(prepared)
    init = runner.init_values(n).detach()
    if not torch.isfinite(init).all():
        raise EditFailed(f"non-finite activations at layer {layer} for the edit prompts")
    scale = _robust_scale(init)[:, None]
    init_norm2 = init.pow(2).sum(-1)
    max_theta = hp.clamp_norm_factor * init.norm(dim=-1, keepdim=True) / scale
    theta = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=hp.lr)
    active = torch.ones(n, dtype=torch.bool)
    kl_ref: dict[int, torch.Tensor] = {}  # chunk index -> log p_orig at its KL reads
    nll_first = torch.zeros(n)
    nll_last = torch.zeros(n)
    steps = [0] * n
    history: list[list[float]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=hp.num_steps, desc=f"targets (layer {layer})", leave=False)
    for step in range(max(1, hp.num_steps)):
        opt.zero_grad()
        nll = torch.zeros(n)
        for ci, c in enumerate(runner.chunks):
            rows = torch.nonzero(active[c.owner]).flatten()
            if len(rows) == 0:
                continue
            logp, keep = runner.chunk_logprobs(c, theta * scale, rows)
            tgt, w, own = c.read_target[keep], c.read_weight[keep], c.read_owner[keep]
            is_kl = tgt < 0
            per = -logp[~is_kl].gather(1, tgt[~is_kl][:, None])[:, 0] * w[~is_kl]
            loss = per.sum()
            nll.index_add_(0, own[~is_kl], per.detach())
            if is_kl.any() and hp.kl_factor > 0:
                if ci not in kl_ref:  # step 0: delta is zero, these are p_orig
                    kl_ref[ci] = logp[is_kl].detach()
                ref = kl_ref[ci][keep[c.read_target < 0]]
                kl = (ref.exp() * (ref - logp[is_kl])).sum(-1)
                loss = loss + hp.kl_factor * kl.sum()
            loss.backward()
        delta = theta * scale
        wd = hp.weight_decay * delta.pow(2).sum(-1) / init_norm2
        (wd * active).sum().backward()
        grad = theta.grad
        assert grad is not None
        if not torch.isfinite(nll).all() or not torch.isfinite(grad).all():
            raise EditFailed(f"non-finite loss while optimising targets at layer {layer}")
        if step == 0:
            nll_first = nll.clone()
        nll_last = torch.where(active, nll, nll_last)
        history.append(nll.tolist())
        for r in torch.nonzero(active).flatten().tolist():
            steps[r] = step
            if nll[r] < hp.early_stop_loss:
                active[r] = False
        if bar is not None:
            bar.update(1)
            bar.set_postfix(nll=f"{float(nll_last.mean()):.3f}", active=int(active.sum()))
        if step >= hp.num_steps - 1 or not active.any():
            break
        with torch.no_grad():
            grad[~active] = 0
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
        steps=steps,
        history=history,
    )
