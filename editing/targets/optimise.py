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
vocabulary projection is applied only at the positions the loss reads. Each prompt re-runs
only from its own subject-last token; prompts are grouped by the length they re-run into
right-padded passes (causal attention: right padding never changes a real position). The loss
itself is :mod:`editing.targets.target_loss`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float

from editing.requests.prepared import PreparedRequest, TemplatedPrompt
from tracing.errors import InvalidHparams, InvalidInput
from tracing.forward import (
    capture_block_kwargs,
    capture_states,
    length_chunks,
    padded,
    run_blocks,
)
from tracing.kv import BlockKV, ragged_kwargs, record_prefix, run_suffix, truncated_kwargs
from tracing.memory import batch_tokens
from tracing.models import (
    HookedModel,
    check_layer,
    final_logprobs,
    hook_name,
    model_device,
    n_layers,
)

log = logging.getLogger(__name__)

TargetHook = Literal["mlp_raw", "resid"]
KLPosition = Literal["subject_last", "last"]
DEFAULT_BATCH_TOKENS = 4096
#: ``read_target`` of reads whose whole distribution the loss compares with the original's.
KL_READ, NEIGHBOUR_READ = -1, -2
READ_CODES = {"kl": KL_READ, "neighbour": NEIGHBOUR_READ}


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
    kind: Literal["rewrite", "kl", "neighbour"]


def rewrite_prompts(
    prepared: Sequence[PreparedRequest],
    kl_position: KLPosition = "subject_last",
    neighbours: Sequence[Sequence[TemplatedPrompt]] | None = None,
) -> list[RewritePrompt]:
    """Every rewriting prompt (one per request and context template: the templated prompt
    followed by the new target minus its last token) and one KL prompt per request, read at
    the subject's last token (``kl_position="subject_last"``, ROME's and MEMIT's code) or at
    its last token (``"last"``: the distribution of the word after "{subject} is a").
    ``neighbours`` (per request, optional): neighbour-like prompts, ``delta`` added at their
    subject's last token, read at their last token (see ``neighbour_kl_factor`` in
    :class:`~editing.hparams.TargetHparams`)."""
    out: list[RewritePrompt] = []
    for r, p in enumerate(prepared):
        tgt = p.target
        for t in p.prompts:
            n = len(t.ids)
            read = tuple(range(n - 1, n - 1 + len(tgt)))
            out.append(RewritePrompt(r, t.ids + tgt[:-1], t.subject_last, read, tgt, "rewrite"))
        kl_read = p.kl.subject_last if kl_position == "subject_last" else len(p.kl.ids) - 1
        out.append(RewritePrompt(r, p.kl.ids, p.kl.subject_last, (kl_read,), (), "kl"))
        for t in neighbours[r] if neighbours is not None else ():
            out.append(RewritePrompt(r, t.ids, t.subject_last, (len(t.ids) - 1,), (), "neighbour"))
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
class ReadPass:
    """Prompts re-run together, whose reads share one vocabulary projection (and one
    backward pass): a length chunk within the token budget.

    With prefix reuse each row is re-run from its own cut (its subject-last token) to its
    end (``suffix`` positions), attending to the recorded ``prefix`` keys and values of the
    positions before it (:func:`tracing.kv.ragged_kwargs`); without, every row runs whole
    (``cuts`` None). Positions in ``lookup`` and ``read_pos`` count from each row's cut."""

    prompts: list[int]  # global prompt index of each row
    owner: torch.Tensor  # request of each row
    lookup: torch.Tensor  # where delta is added, from the row's cut
    start_state: torch.Tensor  # [rows, length, d_model] input of the first re-run block
    init_rows: torch.Tensor  # the edited state at each row's lookup, before any change
    kwargs: list[dict]  # block keyword arguments as captured for one whole row
    read_row: torch.Tensor  # row of each read
    read_pos: torch.Tensor  # position of each read, from its row's cut
    read_prompt: torch.Tensor  # global prompt index of each read
    read_owner: torch.Tensor  # request of each read
    read_target: torch.Tensor  # target token id, or KL_READ / NEIGHBOUR_READ (negative)
    read_weight: torch.Tensor  # weight of the read in its request's mean over its kind
    suffix: torch.Tensor  # positions each row re-runs (from its cut to its end)
    cuts: torch.Tensor | None = None  # each row's first re-run position (None: whole rows)
    prefix: list[BlockKV] | None = None  # keys and values of positions :max(cuts), per block


class DeltaRunner:
    """Logits at the read positions of many prompts with per-request vectors added at the
    subject-last token, re-running only the blocks above the edit point.

    ``hook="mlp_raw"``: ``delta`` is added to the raw down-projection output of ``layer``
    (blocks ``layer..`` are re-run from the cached ``resid_pre``); ``hook="resid"``: it is
    added to the residual stream after ``layer`` (blocks ``layer+1..`` are re-run). The
    states below the edit point are computed once, without gradient, when the runner is
    built.

    Positions before a row's subject-last token cannot change either: with ``reuse_prefix``
    (default) each row re-runs only the positions from its own subject-last token on,
    attending to its prefix's keys and values, recorded once (:mod:`tracing.kv`). That gives
    the same logits (tested) for a fraction of the work: a rewriting prompt behind a
    ten-token context template re-runs its last two or three positions, not the template.
    The rows of a pass share one vocabulary projection (for a 262k-word vocabulary that
    projection streams the whole unembedding). Without ``reuse_prefix`` every row runs whole
    (the plain path the tests compare against).
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
            self._names = [state, self.edit_hook]
        else:
            state = hook_name(model, "resid", layer)
            self._names = [state]
        self._n_kind: dict[tuple[str, int], int] = {}  # prompts per (kind, request)
        for p in self.prompts:
            self._n_kind[p.kind, p.request] = self._n_kind.get((p.kind, p.request), 0) + 1
        budget = max_tokens or batch_tokens(model, grad=True, cpu_default=DEFAULT_BATCH_TOKENS)
        reuse = reuse_prefix and self.start < self.stop
        # the budget counts the positions a pass re-runs with gradient (its memory)
        sizes = [len(p.ids) - (p.lookup if reuse else 0) for p in self.prompts]
        self.passes = [self._make_pass(idx, reuse) for idx in length_chunks(sizes, budget)]

    def _make_pass(self, idx: list[int], reuse: bool) -> ReadPass:
        model, state = self.model, self._names[0]
        ps = [self.prompts[i] for i in idx]
        tokens = padded([p.ids for p in ps], device=model_device(model))
        got = capture_states(model, tokens, self._names, stop_after=self._names[-1])
        kwargs = capture_block_kwargs(model, tokens[:1])[1] if self.start < self.stop else []
        # Index tensors live with the states they index (the edit layer's device).
        dev = got[state].device
        lengths = torch.tensor([len(p.ids) for p in ps], dtype=torch.long, device=dev)
        lookup = torch.tensor([p.lookup for p in ps], dtype=torch.long, device=dev)
        rows = torch.arange(len(ps), device=dev)
        cuts = lookup if reuse and int(lookup.max()) > 0 else None
        prefix = None
        if cuts is not None:  # each row's prefix keys and values, recorded once
            top = int(cuts.max())
            trimmed = [truncated_kwargs(kw, top) for kw in kwargs]
            prefix = record_prefix(model, got[state][:, :top], trimmed, self.start, self.stop, top)
            if prefix is None:  # the blocks take no key/value cache: whole rows
                cuts = None
        start = torch.zeros_like(lookup) if cuts is None else cuts
        suffix = lengths - start
        at = (start[:, None] + torch.arange(int(suffix.max()), device=dev)).clamp(
            max=tokens.shape[1] - 1
        )
        read_row, read_pos, reads = [], [], []
        for r, p in enumerate(ps):
            for k, pos in enumerate(p.read):
                read_row.append(r)
                read_pos.append(pos - int(start[r]))
                if p.kind == "rewrite":
                    w = 1.0 / (len(p.targets) * self._n_kind[p.kind, p.request])
                    reads.append((idx[r], p.request, p.targets[k], w))
                else:  # a distribution read: KL_READ or NEIGHBOUR_READ, no target
                    w = 1.0 / self._n_kind[p.kind, p.request]
                    reads.append((idx[r], p.request, READ_CODES[p.kind], w))
        cols = list(zip(*reads, strict=True))
        return ReadPass(
            prompts=idx,
            owner=torch.tensor([p.request for p in ps], dtype=torch.long, device=dev),
            lookup=lookup - start,
            start_state=got[state][rows[:, None], at],
            init_rows=got[self._names[-1]][rows, lookup],
            kwargs=kwargs,
            read_row=torch.tensor(read_row, dtype=torch.long, device=dev),
            read_pos=torch.tensor(read_pos, dtype=torch.long, device=dev),
            read_prompt=torch.tensor(cols[0], dtype=torch.long, device=dev),
            read_owner=torch.tensor(cols[1], dtype=torch.long, device=dev),
            read_target=torch.tensor(cols[2], dtype=torch.long, device=dev),
            read_weight=torch.tensor(cols[3], dtype=torch.float32, device=dev),
            suffix=suffix,
            cuts=cuts,
            prefix=prefix,
        )

    def init_values(self, n_requests: int) -> torch.Tensor:
        """The edited state at the subject-last token of each request's first rewriting
        prompt (the bare ``"{}"`` template, i.e. the plain edit prompt), before any change."""
        first: dict[int, int] = {}
        for g, p in enumerate(self.prompts):
            if p.kind == "rewrite":
                first.setdefault(p.request, g)
        out: list[torch.Tensor | None] = [None] * n_requests
        for rp in self.passes:
            for row, g in enumerate(rp.prompts):
                r = self.prompts[g].request
                if first.get(r) == g:
                    out[r] = rp.init_rows[row]
        if any(o is None for o in out):
            raise InvalidInput("a request has no rewriting prompt")
        return torch.stack(out)  # type: ignore[arg-type]

    def pass_states(
        self,
        p: ReadPass,
        delta: Float[torch.Tensor, "n_requests d_model"],
        active: Bool[torch.Tensor, " n_requests"] | None = None,
    ) -> tuple[Float[torch.Tensor, "reads d_model"], Bool[torch.Tensor, " pass_reads"]]:
        """Final residual states (before the final norm) at the read positions of the pass's
        rows whose request is ``active`` (default: all), with ``delta[request]`` added at
        each subject-last token; also the boolean mask of the pass's reads they are."""
        dev = p.owner.device
        rows = (
            torch.arange(len(p.prompts), device=dev)
            if active is None
            else torch.nonzero(active.to(dev)[p.owner]).flatten()
        )
        if not len(rows):  # nothing active: nothing run
            keep = torch.zeros(len(p.read_row), dtype=torch.bool, device=dev)
            return p.start_state.new_zeros(0, p.start_state.shape[-1]), keep
        return self._reads(p, delta, rows)

    def pass_logprobs(
        self,
        p: ReadPass,
        delta: Float[torch.Tensor, "n_requests d_model"],
        active: Bool[torch.Tensor, " n_requests"] | None = None,
    ) -> tuple[Float[torch.Tensor, "reads vocab"], Bool[torch.Tensor, " pass_reads"]]:
        """Log-softmax at the reads of :meth:`pass_states` (one vocabulary projection for the
        whole pass), and the same mask."""
        states, keep = self.pass_states(p, delta, active)
        return final_logprobs(self.model, states[None])[0], keep

    def _reads(
        self, p: ReadPass, delta: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final residual states [kept reads, d_model] of the pass's ``rows`` with their
        deltas added, and the mask of the pass's reads they are."""
        owner, lookup = p.owner[rows], p.lookup[rows]
        # delta stays float32 (the optimised parameter); the sum is rounded once to the
        # model's dtype where it enters the model, and the gradient flows back through it.
        add = delta[owner.to(delta.device)].to(rows.device)
        ar = torch.arange(len(rows), device=rows.device)
        length = int(p.suffix[rows].max())  # no row runs past its own end
        h = p.start_state[rows, :length]
        hooks: list[tuple[str, Callable]] = []
        if self.hook == "resid":
            h = h.index_put((ar, lookup), (h[ar, lookup] + add).to(h.dtype))
        else:

            def add_delta(x: torch.Tensor, hook) -> torch.Tensor:
                return x.index_put((ar, lookup), (x[ar, lookup] + add).to(x.dtype))

            hooks = [(self.edit_hook, add_delta)]
        if self.start < self.stop:
            with self.model.hooks(fwd_hooks=hooks):
                if p.prefix is not None and p.cuts is not None:
                    top = p.prefix[0][0].shape[-2]
                    kwargs = [
                        ragged_kwargs(kw, p.cuts[rows], length, top, h.dtype) for kw in p.kwargs
                    ]
                    h = run_suffix(self.model, h, kwargs, self.start, p.prefix, 0, rows)
                else:
                    kwargs = [truncated_kwargs(kw, length) for kw in p.kwargs]
                    h = run_blocks(self.model, h, kwargs, self.start, self.stop)
        remap = torch.full((len(p.prompts),), -1, dtype=torch.long, device=rows.device)
        remap[rows] = ar
        keep = remap[p.read_row] >= 0
        return h[remap[p.read_row[keep]].to(h.device), p.read_pos[keep].to(h.device)], keep
