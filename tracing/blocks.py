"""One decoder block run on its own, whatever the architecture.

:func:`run_block` runs block ``L`` of a model on a residual stream, optionally with a
key/value cache; :func:`cache_keyword` is the keyword the Hugging Face block of this
architecture takes that cache under. Both are part of the model surface of
:mod:`tracing.models` and importable from there.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from jaxtyping import Float
from transformer_lens.model_bridge import TransformerBridge


def cache_keyword(model: TransformerBridge) -> str:
    """The keyword under which this architecture's decoder blocks take a key/value cache
    (read off the Hugging Face block's signature: ``cache`` in current transformers,
    ``layer_past`` in older GPT-J, ``past_key_values`` elsewhere)."""
    block = model.blocks[0].original_component
    params = inspect.signature(block.forward).parameters
    for name in ("cache", "layer_past", "past_key_values"):
        if name in params:
            return name
    return "past_key_values"


#: Names under which TransformerLens' attention bridges read a key/value cache.
_BRIDGE_CACHE_NAMES = ("past_key_values", "layer_past")


def run_block(
    model: TransformerBridge,
    layer: int,
    resid: Float[torch.Tensor, "batch pos d_model"],
    block_kwargs: dict[str, Any],
    cache: object | None = None,
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Run decoder block ``layer`` on a residual stream (bridge hooks fire).

    ``cache``: an object with a Hugging Face ``Cache``-style ``update(keys, values,
    layer_idx, ...)`` method, handed to the block's attention so that it records this block's
    keys and values or supplies those of earlier positions. Current transformers blocks pass
    the cache on to attention as ``cache=``, while TransformerLens 4.3's attention bridges read
    ``past_key_values`` (GPT-J: ``layer_past``); for the call, a pre-hook on the attention
    module passes it under those names too, so the cache is used whichever side reads it.
    """
    kwargs = dict(block_kwargs)
    handle = None
    if cache is not None:
        kwargs[cache_keyword(model)] = cache

        def route(_mod: object, args: tuple, kw: dict[str, Any]) -> tuple[tuple, dict]:
            return args, {**kw, **{n: cache for n in _BRIDGE_CACHE_NAMES if kw.get(n) is None}}

        handle = model.blocks[layer].attn.register_forward_pre_hook(route, with_kwargs=True)
    try:
        out = model.blocks[layer](resid, **kwargs)
    finally:
        if handle is not None:
            handle.remove()
    return out[0] if isinstance(out, tuple) else out
