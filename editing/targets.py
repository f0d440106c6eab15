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
position). The loss itself is :mod:`editing.target_loss`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float

from editing.prepared import PreparedRequest, TemplatedPrompt
from tracing.errors import InvalidHparams, InvalidInput
from tracing.forward import (
    capture_block_kwargs,
    capture_states,
    length_chunks,
    padded,
    run_blocks,
)
from tracing.kv import BlockKV, record_prefix, run_suffix, truncated_kwargs
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


#: What one more chunk costs, in token positions of work per re-run block: each chunk is
#: another call of every re-run block, whose fixed cost (the bridge's modules and hooks, a
#: few hundred small ops) outweighs the positions a finer grouping saves unless they are
#: many. Measured on the embedded model (2 threads, ROME's 11 prompts at layer 2): one chunk
#: of 12 x 16 positions and three chunks of 30 positions in all took the same time per step,
#: twelve one-row chunks three times as long; so a chunk is worth about 128 positions.
BIN_OVERHEAD_TOKENS = 128


@dataclass
class _Chunk:
    """Rows of one pass that share a cut: re-run on positions ``cut:width`` only."""

    prompts: list[int]
    owner: torch.Tensor
    lookup: torch.Tensor
    start_state: torch.Tensor  # positions cut:width of the first re-run block's input
    init_rows: torch.Tensor  # the edited state at each row's lookup, before any change
    kwargs: list[dict]  # block keyword arguments for positions :width
    read_row: torch.Tensor  # chunk row of each read position
    read_pos: torch.Tensor  # absolute position of each read
    cut: int = 0  # positions before it are the same in every step: not re-run
    prefix: list[BlockKV] | None = None  # their keys and values in each re-run block


@dataclass
class ReadPass:
    """Prompts whose reads share one vocabulary projection (and one backward pass): a
    length chunk within the token budget, split into :class:`_Chunk` s by cut. Read
    metadata is that of the chunks' reads concatenated in chunk order."""

    chunks: list[_Chunk]
    read_prompt: torch.Tensor  # global prompt index of each read
    read_owner: torch.Tensor  # request of each read
    read_target: torch.Tensor  # target token id, or KL_READ / NEIGHBOUR_READ (negative)
    read_weight: torch.Tensor  # weight of the read in its request's mean over its kind


def cut_bins(lookups: Sequence[int], lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """Rows grouped so that re-running each group from its earliest lookup to its longest row
    costs least: minimises ``sum(rows * (longest - earliest lookup) + overhead)`` over groups
    contiguous in lookup order (dynamic programming, exact)."""
    order = sorted(range(len(lookups)), key=lambda i: (lookups[i], lengths[i], i))
    n = len(order)
    best = [0.0] + [float("inf")] * n
    back = [0] * (n + 1)
    for j in range(1, n + 1):
        width = 0
        for i in range(j - 1, -1, -1):  # bin order[i:j]
            width = max(width, lengths[order[i]])
            cost = best[i] + (j - i) * (width - lookups[order[i]]) + overhead
            if cost < best[j]:
                best[j], back[j] = cost, i
    bins: list[list[int]] = []
    j = n
    while j > 0:
        bins.append(order[back[j] : j])
        j = back[j]
    return bins[::-1]


class DeltaRunner:
    """Logits at the read positions of many prompts with per-request vectors added at the
    subject-last token, re-running only the blocks above the edit point.

    ``hook="mlp_raw"``: ``delta`` is added to the raw down-projection output of ``layer``
    (blocks ``layer..`` are re-run from the cached ``resid_pre``); ``hook="resid"``: it is
    added to the residual stream after ``layer`` (blocks ``layer+1..`` are re-run). The
    states below the edit point are computed once, without gradient, when the runner is
    built.

    Positions before a row's subject-last token cannot change either: with ``reuse_prefix``
    (default) the re-run blocks compute only the positions from there on, attending to the
    prefix's keys and values recorded once (:mod:`tracing.kv`), which gives the same logits
    (tested) for a fraction of the work. Rows are grouped by where they can be cut
    (:func:`cut_bins`: a chunk per group, so a context template's long prefix is not re-run
    for the sake of the KL prompt's early subject), and each row runs only to its chunk's
    longest real prompt; the chunks of a pass still share one vocabulary projection (for a
    262k-word vocabulary that projection streams the whole unembedding). Without
    ``reuse_prefix`` every row runs whole (the plain path the tests compare against).
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
        bin_overhead: int = BIN_OVERHEAD_TOKENS,
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
        self.passes: list[ReadPass] = []
        budget = max_tokens or batch_tokens(model, grad=True, cpu_default=DEFAULT_BATCH_TOKENS)
        reuse = reuse_prefix and self.start < self.stop
        for idx in length_chunks([len(p.ids) for p in self.prompts], budget):
            self.passes.append(self._make_pass(idx, reuse, bin_overhead))

    @property
    def chunks(self) -> list[_Chunk]:
        """Every chunk of every pass, in order."""
        return [c for p in self.passes for c in p.chunks]

    def _make_pass(self, idx: list[int], reuse: bool, overhead: int) -> ReadPass:
        model, state = self.model, self._names[0]
        ps = [self.prompts[i] for i in idx]
        tokens = padded([p.ids for p in ps], device=model_device(model))
        got = capture_states(model, tokens, self._names, stop_after=self._names[-1])
        kwargs = capture_block_kwargs(model, tokens[:1])[1] if self.start < self.stop else []
        # Index tensors live with the states they index (the edit layer's device).
        dev = got[state].device
        lengths = [len(p.ids) for p in ps]
        if reuse:
            bins = cut_bins([p.lookup for p in ps], lengths, overhead)
        else:
            bins = [list(range(len(ps)))]
        cuts = [min(ps[r].lookup for r in b) if reuse else 0 for b in bins]
        kv = None
        if max(cuts) > 0:  # the prefix's keys and values, recorded once for every bin
            top = max(cuts)
            trimmed = [truncated_kwargs(kw, top) for kw in kwargs]
            kv = record_prefix(model, got[state][:, :top], trimmed, self.start, self.stop, top)
        chunks, reads = [], []
        for b, cut in zip(bins, cuts, strict=True):
            cut = cut if kv is not None else 0
            width = max(lengths[r] for r in b)
            rows_t = torch.tensor(b, dtype=torch.long, device=dev)
            lookup = torch.tensor([ps[r].lookup for r in b], dtype=torch.long, device=dev)
            read_row, read_pos = [], []
            for j, r in enumerate(b):
                p = ps[r]
                for k, pos in enumerate(p.read):
                    read_row.append(j)
                    read_pos.append(pos)
                    if p.kind == "rewrite":
                        w = 1.0 / (len(p.targets) * self._n_kind[p.kind, p.request])
                        reads.append((idx[r], p.request, p.targets[k], w))
                    else:  # a distribution read: KL_READ or NEIGHBOUR_READ, no target
                        w = 1.0 / self._n_kind[p.kind, p.request]
                        reads.append((idx[r], p.request, READ_CODES[p.kind], w))
            prefix = None
            if kv is not None and cut > 0:
                at = kv[0][0].device
                prefix = [
                    (k[rows_t.to(at), ..., :cut, :], v[rows_t.to(at), ..., :cut, :]) for k, v in kv
                ]
            chunks.append(
                _Chunk(
                    prompts=[idx[r] for r in b],
                    owner=torch.tensor([ps[r].request for r in b], dtype=torch.long, device=dev),
                    lookup=lookup,
                    start_state=got[state][rows_t, cut:width],
                    init_rows=got[self._names[-1]][rows_t, lookup],
                    kwargs=[truncated_kwargs(kw, width) for kw in kwargs],
                    read_row=torch.tensor(read_row, dtype=torch.long, device=dev),
                    read_pos=torch.tensor(read_pos, dtype=torch.long, device=dev),
                    cut=cut,
                    prefix=prefix,
                )
            )
        cols = list(zip(*reads, strict=True))
        return ReadPass(
            chunks=chunks,
            read_prompt=torch.tensor(cols[0], dtype=torch.long, device=dev),
            read_owner=torch.tensor(cols[1], dtype=torch.long, device=dev),
            read_target=torch.tensor(cols[2], dtype=torch.long, device=dev),
            read_weight=torch.tensor(cols[3], dtype=torch.float32, device=dev),
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

    def pass_logprobs(
        self,
        p: ReadPass,
        delta: Float[torch.Tensor, "n_requests d_model"],
        active: Bool[torch.Tensor, " n_requests"] | None = None,
    ) -> tuple[Float[torch.Tensor, "reads vocab"], Bool[torch.Tensor, " pass_reads"]]:
        """Log-softmax at the read positions of the pass's rows whose request is ``active``
        (default: all), with ``delta[request]`` added at each subject-last token; also returns
        the boolean mask of the pass's reads that were computed. One vocabulary projection
        for the whole pass."""
        states, keeps = [], []
        for c in p.chunks:
            rows = (
                torch.arange(len(c.prompts), device=c.owner.device)
                if active is None
                else torch.nonzero(active.to(c.owner.device)[c.owner]).flatten()
            )
            keep = torch.zeros(len(c.read_row), dtype=torch.bool, device=c.owner.device)
            if len(rows):
                sel, keep = self._chunk_reads(c, delta, rows)
                states.append(sel)
            keeps.append(keep)
        keep_all = torch.cat(keeps)
        if not states:  # nothing active: nothing projected
            return torch.zeros(0, 0, device=p.read_owner.device), keep_all
        logits = final_logits(self.model, torch.cat(states)[None])[0].float()
        return torch.log_softmax(logits, dim=-1), keep_all

    def _chunk_reads(
        self, c: _Chunk, delta: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final residual states [kept reads, d_model] of the chunk's ``rows`` with their
        deltas added, and the mask of the chunk's reads they are."""
        owner, lookup = c.owner[rows], c.lookup[rows] - c.cut
        # delta stays float32 (the optimised parameter); the sum is rounded once to the
        # model's dtype where it enters the model, and the gradient flows back through it.
        add = delta[owner.to(delta.device)].to(rows.device)
        ar = torch.arange(len(rows), device=rows.device)
        h = c.start_state[rows]
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
        return h[remap[c.read_row[keep]].to(h.device), pos.to(h.device)], keep
