"""Reusing keys and values: run only the positions that can change.

A change made at token position ``t`` (a restored state while tracing, a vector added at the
subject's last token while editing) cannot change positions before ``t`` in any block: the
model is causal. So blocks can run on the positions from ``cut`` on, attending to the keys and
values the prefix had in a run without the change. :class:`KVRecorder` records each block's
keys and values, :class:`PrefixKV` supplies the prefix's, :func:`window_kwargs` cuts the
block's positional arguments (:func:`ragged_kwargs`: for rows that each start at their own
cut), and :func:`record_prefix` / :func:`run_suffix` do the two halves over a range of
blocks. Blocks receive the cache through :func:`tracing.models.run_block`, which hands it to
the attention whatever keyword the architecture reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int

from tracing.models import HookedModel, run_block

#: One block's cached (keys, values), each ``[batch, heads, pos, head_dim]``.
BlockKV = tuple[torch.Tensor, torch.Tensor]


class KVRecorder:
    """The key/value cache given to a block (:func:`tracing.models.run_block`): keeps each
    layer's keys and values (after any rotary embedding) and hands them back unchanged."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by the attention of block ``layer_idx`` with the keys and values it just
        computed (``[batch, heads, pos, d_head]``): keeps them under the block's index and
        hands them back unchanged, so the run itself is what it would be with no cache
        (the Hugging Face cache protocol: further arguments are ignored)."""
        self.kv[layer_idx] = (k, v)
        return k, v


class PrefixKV:
    """The key/value cache given to a block that computes only a suffix of the prompt:
    prepends the cached keys and values of the prefix positions."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by the attention with the keys and values of the suffix positions it
        computes: returns the prefix's cached keys and values followed by them (along the
        position axis), so the suffix's queries attend to the whole prompt. Nothing is
        stored: the same prefix serves every call (``layer_idx`` and further arguments of
        the cache protocol are ignored)."""
        return torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)


def _remap(
    kwargs: dict,
    positions: Callable[[torch.Tensor, int], torch.Tensor],
    mask: Callable[[torch.Tensor], torch.Tensor],
) -> dict:
    """The one walk over a block's keyword arguments that everything here shares:
    ``positions(x, axis)`` re-indexes each tensor that runs over token positions (rotary
    embeddings on axis -2, position ids and cache positions on axis -1) and ``mask`` the
    ``[batch, 1, query, key]`` attention mask; anything else passes unchanged."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "position_embeddings" and isinstance(value, tuple):
            out[key] = tuple(positions(x, -2) for x in value)
        elif key in ("position_ids", "cache_position") and torch.is_tensor(value):
            out[key] = positions(value, -1)
        elif key == "attention_mask" and torch.is_tensor(value) and value.ndim == 4:
            out[key] = mask(value)
        else:
            out[key] = value
    return out


def window_kwargs(kwargs: dict, queries: slice, keys: slice) -> dict:
    """Block keyword arguments for computing the positions ``queries`` of the captured
    sequence while attending to the key positions ``keys`` (the mask's columns)."""

    def positions(x: torch.Tensor, axis: int) -> torch.Tensor:
        return x[(..., queries) + (slice(None),) * (-1 - axis)]

    return _remap(kwargs, positions, lambda m: m[..., queries, keys])


def suffix_kwargs(kwargs: dict, cut: int) -> dict:
    """Block keyword arguments for computing positions ``cut:`` only (attending to every
    key: the prefix's come from a :class:`PrefixKV`)."""
    return kwargs if cut == 0 else window_kwargs(kwargs, slice(cut, None), slice(None))


def truncated_kwargs(kwargs: dict, length: int) -> dict:
    """Block keyword arguments for a sequence cut to its first ``length`` positions (the
    positional tensors and the attention mask, which were captured for the whole sequence).
    Causal attention makes positions ``:length`` of the shorter sequence exactly those of the
    longer one, so rows of a batch can be run only as far as their longest real prompt."""
    return window_kwargs(kwargs, slice(None, length), slice(None, length))


def ragged_kwargs(
    kwargs: dict,
    cuts: Int[torch.Tensor, " rows"],
    length: int,
    prefix: int,
    dtype: torch.dtype,
) -> dict:
    """Block keyword arguments for rows that each run ``length`` positions from their own
    cut: row ``r`` computes absolute positions ``cuts[r] .. cuts[r] + length - 1`` and
    attends to ``prefix`` recorded key/value positions, of which its first ``cuts[r]`` are
    its own prefix (the rest are masked out), then to its suffix causally.

    ``kwargs`` are those captured for one sequence (``[1, width, ...]`` positional tensors
    and, if the architecture passes one, its ``[1, 1, width, width]`` mask). Each row's
    rotary embeddings and position ids are gathered at its absolute positions, and the mask
    is the captured one's values at those (query, key) positions (a sliding window or any
    bias carries over), so every real position sees exactly what it sees in the whole
    sequence. Positions past ``width`` (the padding of rows with shorter suffixes) borrow the
    last position's values; they come after each row's real positions, so causal attention
    keeps them from changing a real one. Architectures that pass no mask (GPT-2) get a
    causal one of ``dtype``.
    """
    rows = len(cuts)
    ar = torch.arange(length, device=cuts.device)
    pos = cuts[:, None] + ar  # [rows, length] absolute positions of the suffix
    width = _width(kwargs)
    at = pos.clamp(max=width - 1) if width else pos
    keys = torch.cat([torch.arange(prefix, device=cuts.device).expand(rows, prefix), at], dim=1)
    # a prefix key is this row's only before its cut; a suffix key only up to the query
    real = torch.cat(
        [
            (torch.arange(prefix, device=cuts.device) < cuts[:, None])[:, None, :].expand(
                rows, length, prefix
            ),
            (ar[None, :] <= ar[:, None])[None].expand(rows, length, length),
        ],
        dim=2,
    )

    def gathered(x: torch.Tensor, axis: int) -> torch.Tensor:  # [1, width..] -> [rows, length..]
        return x[0][at.to(x.device)]

    def masked(value: torch.Tensor) -> torch.Tensor:
        m = value[0, 0].to(cuts.device)[at[:, :, None], keys[:, None, :]]
        fill = False if m.dtype == torch.bool else torch.finfo(m.dtype).min
        return m.masked_fill(~real, fill)[:, None].to(value.device)

    out = _remap({k: v for k, v in kwargs.items() if k != "cache_position"}, gathered, masked)
    if "cache_position" in kwargs:  # one row's positions (no block here reads it per row)
        cp = kwargs["cache_position"]
        out["cache_position"] = pos[0] if torch.is_tensor(cp) else cp
    if out.get("attention_mask") is None:
        causal = torch.zeros(rows, 1, length, prefix + length, dtype=dtype, device=cuts.device)
        out["attention_mask"] = causal.masked_fill(~real[:, None], torch.finfo(dtype).min)
    return out


def _width(kwargs: dict) -> int:
    """Positions the captured positional tensors or mask cover (0 if there are none)."""
    for key, value in kwargs.items():
        if key == "position_embeddings" and isinstance(value, tuple):
            return int(value[0].shape[-2])
        if key in ("position_ids", "cache_position", "attention_mask") and torch.is_tensor(value):
            return int(value.shape[-1])
    return 0


def run_recording(
    model: HookedModel,
    resid: Float[torch.Tensor, "batch pos d_model"],
    block_kwargs: list[dict],
    start: int,
    stop: int,
) -> tuple[list[torch.Tensor], list[BlockKV] | None]:
    """Run blocks ``start..stop-1`` on ``resid`` without gradient. Returns the residual
    stream entering each block and leaving the last (``stop - start + 1`` tensors) and each
    block's keys and values, or ``None`` for the latter if the architecture's blocks do not
    take a key/value cache (then callers run whole sequences)."""
    states = [resid]
    kv: list[BlockKV] | None = []
    h = resid
    with torch.no_grad():
        for layer in range(start, stop):
            rec = KVRecorder()
            h = run_block(model, layer, h, block_kwargs[layer], rec if kv is not None else None)
            states.append(h)
            if kv is not None:
                kv = kv + [next(iter(rec.kv.values()))] if len(rec.kv) == 1 else None
    return states, kv


def record_prefix(
    model: HookedModel,
    resid: Float[torch.Tensor, "batch pos d_model"],
    block_kwargs: list[dict],
    start: int,
    stop: int,
    cut: int,
) -> list[BlockKV] | None:
    """:func:`run_recording`'s keys and values of positions ``:cut`` only (None without a
    key/value cache)."""
    _, kv = run_recording(model, resid, block_kwargs, start, stop)
    return None if kv is None else [(k[..., :cut, :], v[..., :cut, :]) for k, v in kv]


def run_suffix(
    model: HookedModel,
    resid: Float[torch.Tensor, "batch suffix d_model"],
    block_kwargs: list[dict],
    start: int,
    prefix: list[BlockKV],
    cut: int,
    rows: torch.Tensor | None = None,
) -> Float[torch.Tensor, "batch suffix d_model"]:
    """Run blocks ``start..start+len(prefix)-1`` on the positions from ``cut`` on (``resid``
    holds only those), attending to the recorded ``prefix`` keys and values (of batch rows
    ``rows``, default all)."""
    h = resid
    for i, (k, v) in enumerate(prefix):
        layer = start + i
        if rows is not None:
            k, v = k[rows.to(k.device)], v[rows.to(v.device)]
        cache: Any = PrefixKV(k, v)
        h = run_block(model, layer, h, suffix_kwargs(block_kwargs[layer], cut), cache)
    return h
