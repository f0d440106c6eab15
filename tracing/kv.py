"""Reusing keys and values: run only the positions that can change.

A change made at token position ``t`` (a restored state while tracing, a vector added at the
subject's last token while editing) cannot change positions before ``t`` in any block: the
model is causal. So blocks can run on the positions from ``cut`` on, attending to the keys and
values the prefix had in a run without the change. :class:`KVRecorder` records each block's
keys and values, :class:`PrefixKV` supplies the prefix's, :func:`suffix_kwargs` cuts the
block's positional arguments, and :func:`record_prefix` / :func:`run_suffix` do the two halves
over a range of blocks. Blocks receive the cache through
:func:`tracing.models.run_block`, which hands it to the attention whatever keyword the
architecture reads.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

from tracing.models import HookedModel, run_block

#: One block's cached (keys, values), each ``[batch, heads, pos, head_dim]``.
BlockKV = tuple[torch.Tensor, torch.Tensor]


class KVRecorder:
    """The key/value cache given to a block (:func:`tracing.models.run_block`): keeps each
    layer's keys and values (after any rotary embedding) and hands them back unchanged."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.kv[layer_idx] = (k, v)
        return k, v


class PrefixKV:
    """The key/value cache given to a block that computes only a suffix of the prompt:
    prepends the cached keys and values of the prefix positions."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        return torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)


def suffix_kwargs(kwargs: dict, cut: int) -> dict:
    """Block keyword arguments for computing positions ``cut:`` only."""
    if cut == 0:
        return kwargs
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "position_embeddings" and isinstance(value, tuple):
            out[key] = tuple(x[..., cut:, :] for x in value)
        elif key in ("position_ids", "cache_position") and torch.is_tensor(value):
            out[key] = value[..., cut:]
        elif key == "attention_mask" and torch.is_tensor(value) and value.ndim == 4:
            out[key] = value[..., cut:, :]
        else:
            out[key] = value
    return out


def truncated_kwargs(kwargs: dict, length: int) -> dict:
    """Block keyword arguments for a sequence cut to its first ``length`` positions (the
    positional tensors and the attention mask, which were captured for the whole sequence).
    Causal attention makes positions ``:length`` of the shorter sequence exactly those of the
    longer one, so rows of a batch can be run only as far as their longest real prompt."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "position_embeddings" and isinstance(value, tuple):
            out[key] = tuple(x[..., :length, :] for x in value)
        elif key in ("position_ids", "cache_position") and torch.is_tensor(value):
            out[key] = value[..., :length]
        elif key == "attention_mask" and torch.is_tensor(value) and value.ndim == 4:
            out[key] = value[..., :length, :length]
        else:
            out[key] = value
    return out


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
