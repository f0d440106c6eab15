"""Where the v*/z optimisation runs: prompts and the layer-skipping runner.

For each request a vector ``delta`` is added at the subject's last token of every rewriting
prompt (context template + edit prompt + the new target minus its last token) and of the
KL prompt ``"{subject} is a"``. Where ``delta`` goes:

* ``hook="mlp_raw"`` (ROME): the raw down-projection output of ``layer``
  (hook kind ``mlp_raw``, before Gemma's post-feed-forward norm), so that
  ``v* = init + delta`` lives in the down-projection's output space and ``k* W' = v*``.
* ``hook="resid"`` (MEMIT): the residual stream after ``layer`` (``z = init + delta``).

:class:`DeltaRunner` gives the log-probabilities the loss reads, re-running only what
``delta`` can change: the states entering the first re-run block are computed once without
gradient; each call re-runs only the blocks from the edit point up to ``loss_layer``, and the
vocabulary projection is applied only at the positions the loss reads. Prompts are grouped
by length into right-padded chunks (causal attention: right padding never changes a real
position). The loss itself is :mod:`editing.objective`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float

from editing.prepared import PreparedRequest
from tracing.errors import InvalidHparams, InvalidInput
from tracing.forward import (
    capture_block_kwargs,
    capture_states,
    length_chunks,
    padded,
    run_blocks,
)
from tracing.kv import BlockKV, record_prefix, run_suffix
from tracing.memory import batch_tokens
from tracing.models import (
    HookedModel,
    check_layer,
    final_logits,
    hook_name,
    model_device,
    n_layers,
)

log = logging.getLogger(__name__)

TargetHook = Literal["mlp_raw", "resid"]
KLPosition = Literal["subject_last", "last"]
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


def rewrite_prompts(
    prepared: Sequence[PreparedRequest], kl_position: KLPosition = "subject_last"
) -> list[RewritePrompt]:
    """Every rewriting prompt (one per request and context template: the templated prompt
    followed by the new target minus its last token) and one KL prompt per request, read at
    the subject's last token (``kl_position="subject_last"``, ROME's and MEMIT's code) or at
    its last token (``"last"``: the distribution of the word after "{subject} is a")."""
    out: list[RewritePrompt] = []
    for r, p in enumerate(prepared):
        tgt = p.target
        for t in p.prompts:
            n = len(t.ids)
            read = tuple(range(n - 1, n - 1 + len(tgt)))
            out.append(RewritePrompt(r, t.ids + tgt[:-1], t.subject_last, read, tgt, "rewrite"))
        kl_read = p.kl.subject_last if kl_position == "subject_last" else len(p.kl.ids) - 1
        out.append(RewritePrompt(r, p.kl.ids, p.kl.subject_last, (kl_read,), (), "kl"))
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
    cut: int = 0  # positions before it are the same in every step: not re-run
    prefix: list[BlockKV] | None = None  # their keys and values in each re-run block


class DeltaRunner:
    """Logits at the read positions of many prompts with per-request vectors added at the
    subject-last token, re-running only the blocks above the edit point.

    ``hook="mlp_raw"``: ``delta`` is added to the raw down-projection output of ``layer``
    (blocks ``layer..`` are re-run from the cached ``resid_pre``); ``hook="resid"``: it is
    added to the residual stream after ``layer`` (blocks ``layer+1..`` are re-run). The
    states below the edit point are computed once, without gradient, when the runner is
    built.

    Positions before a chunk's earliest subject-last token cannot change either: with
    ``reuse_prefix`` (default) the re-run blocks compute only the positions from there on,
    attending to the prefix's keys and values recorded once (:mod:`tracing.kv`), which gives
    the same logits (tested) for a fraction of the work.
    """

    def __init__(
        self,
        model: HookedModel,
        prompts: Sequence[RewritePrompt],
        layer: int,
        hook: TargetHook,
        *,
        loss_layer: int = -1,
        max_tokens: int | None = None,
        reuse_prefix: bool = True,
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
        budget = max_tokens or batch_tokens(model, grad=True, cpu_default=DEFAULT_BATCH_TOKENS)
        for idx in length_chunks([len(p.ids) for p in self.prompts], budget):
            ps = [self.prompts[i] for i in idx]
            tokens = padded([p.ids for p in ps], device=model_device(model))
            got = capture_states(model, tokens, names, stop_after=names[-1])
            kwargs = capture_block_kwargs(model, tokens[:1])[1] if self.start < self.stop else []
            # Index tensors live with the states they index (the edit layer's device).
            dev = got[state].device
            lookup = torch.tensor([p.lookup for p in ps], dtype=torch.long, device=dev)
            reads = []
            for r, (g, p) in enumerate(zip(idx, ps, strict=True)):
                for j, pos in enumerate(p.read):
                    if p.kind == "kl":
                        reads.append((r, pos, g, p.request, -1, 0.0))
                    else:
                        w = 1.0 / (len(p.targets) * n_rewrite[p.request])
                        reads.append((r, pos, g, p.request, p.targets[j], w))
            cols = list(zip(*reads, strict=True))
            cut, prefix = 0, None
            if reuse_prefix and self.start < self.stop:
                cut = min(p.lookup for p in ps)
                if cut > 0:
                    prefix = record_prefix(model, got[state], kwargs, self.start, self.stop, cut)
                cut = cut if prefix is not None else 0
            self.chunks.append(
                _Chunk(
                    prompts=list(idx),
                    tokens=tokens,
                    owner=torch.tensor([p.request for p in ps], dtype=torch.long, device=dev),
                    lookup=lookup,
                    start_state=got[state],
                    init_rows=got[names[-1]][torch.arange(len(ps), device=dev), lookup],
                    kwargs=kwargs,
                    read_row=torch.tensor(cols[0], dtype=torch.long, device=dev),
                    read_pos=torch.tensor(cols[1], dtype=torch.long, device=dev),
                    read_prompt=torch.tensor(cols[2], dtype=torch.long, device=dev),
                    read_owner=torch.tensor(cols[3], dtype=torch.long, device=dev),
                    read_target=torch.tensor(cols[4], dtype=torch.long, device=dev),
                    read_weight=torch.tensor(cols[5], dtype=torch.float32, device=dev),
                    cut=cut,
                    prefix=prefix,
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
        owner, lookup = c.owner[rows], c.lookup[rows] - c.cut
        # delta stays float32 (the optimised parameter); the sum is rounded once to the
        # model's dtype where it enters the model, and the gradient flows back through it.
        add = delta[owner]
        ar = torch.arange(len(rows), device=rows.device)
        h = c.start_state[rows][:, c.cut :]
        hooks: list[tuple[str, Callable]] = []
        if self.hook == "resid":
            h = h.index_put((ar, lookup), (h[ar, lookup] + add).to(h.dtype))
        else:

            def add_delta(x: torch.Tensor, hook) -> torch.Tensor:
                return x.index_put((ar, lookup), (x[ar, lookup] + add).to(x.dtype))

            hooks = [(self.edit_hook, add_delta)]
        if self.start < self.stop:
            with self.model.hooks(fwd_hooks=hooks):
                if c.prefix is not None:
                    h = run_suffix(self.model, h, c.kwargs, self.start, c.prefix, c.cut, rows)
                else:
                    h = run_blocks(self.model, h, c.kwargs, self.start, self.stop)
        remap = torch.full((len(c.prompts),), -1, dtype=torch.long, device=rows.device)
        remap[rows] = ar
        keep = remap[c.read_row] >= 0
        pos = c.read_pos[keep] - c.cut
        sel = h[remap[c.read_row[keep]].to(h.device), pos.to(h.device)]
        logits = final_logits(self.model, sel[None])[0].float()
        return torch.log_softmax(logits, dim=-1), keep
