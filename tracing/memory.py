"""How much work goes into one forward pass: batch sizes from the device's free memory, an
explicit budget per model, and halving on an out-of-memory error.

Every chunked loop in factscope (the tracing engine's rows, the v*/z optimisation's and the
key computations' token chunks, the statistics' sequences per pass) asks
:func:`batch_tokens` for its budget in tokens:

* a budget set with :func:`set_batch_tokens` (the CLI's ``--max-batch-tokens``) wins;
* on CUDA it comes from the free memory of every GPU the model occupies and the model's
  shape, so a 6B model on one GPU gets chunks that fit and the 270M model on a big GPU gets
  big ones. A GPU's free memory (:func:`free_bytes`) is what the driver reports free
  (``torch.cuda.mem_get_info``) plus what PyTorch's caching allocator holds unused
  (``memory_reserved - memory_allocated``): after a first pass that memory is free for the
  next one, though the driver counts it as used. Under a device map each GPU's cost per token
  (:func:`token_bytes`) counts the blocks it holds, and the budget is the tightest GPU's;
* on the CPU each loop keeps its measured default (bigger chunks do not make 2 cores faster).

:func:`halving` runs work in chunks and, on ``torch.OutOfMemoryError``, frees the cache,
halves the chunk, says so in the log and goes on; a chunk of one that still does not fit
re-raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from tracing.errors import InvalidInput
from tracing.models import HookedModel, layer_device, model_device, model_dtype, n_layers

log = logging.getLogger(__name__)

T = TypeVar("T")
_BUDGET_ATTR = "factscope_batch_tokens"
#: Share of the free device memory a chunk may plan to use (the rest: fragmentation,
#: the allocator's own cache, what other layers hold).
FREE_FRACTION = 0.4
MIN_TOKENS, MAX_TOKENS = 256, 1 << 20


def check_batch_tokens(tokens: int, what: str = "max batch tokens") -> int:
    """``tokens`` is a positive integer (``what`` names it in the error)."""
    if isinstance(tokens, bool) or tokens < 1:
        raise InvalidInput(f"{what} must be a positive integer, got {tokens!r}")
    return tokens


def set_batch_tokens(model: HookedModel, tokens: int | None) -> None:
    """Fix the tokens per forward pass for this model (None: back to automatic)."""
    setattr(model, _BUDGET_ATTR, None if tokens is None else check_batch_tokens(tokens))


@dataclass(frozen=True)
class DeviceShare:
    """What part of a model one device holds: how many transformer blocks, and whether the
    unembedding (where the vocabulary reads' ``[reads, vocab]`` arrays are made)."""

    blocks: int
    unembed: bool


def device_shares(model: HookedModel) -> dict[torch.device, DeviceShare]:
    """The CUDA devices ``model`` occupies (one, or several under a device map) and each one's
    share of the work; empty for a model on the CPU."""
    blocks: dict[torch.device, int] = {}
    for layer in range(n_layers(model)):
        try:
            dev = layer_device(model, layer)
        except InvalidInput:  # an offloaded block: its weights visit a device per pass
            continue
        blocks[dev] = blocks.get(dev, 0) + 1
    unembed = _unembed_device(model)
    touched = {*blocks, model_device(model), unembed}
    return {d: DeviceShare(blocks.get(d, 0), d == unembed) for d in touched if d.type == "cuda"}


def _unembed_device(model: HookedModel) -> torch.device:
    return model.unembed.original_component.weight.device


def vocab_read_bytes(model: HookedModel) -> int:
    """Bytes one vocabulary read holds on the generic path (:func:`editing.targets.vocab_loss.
    logp_losses`, the only one on a GPU) until its backward pass: its logits (model dtype),
    their float32 copy when the model is in half precision, the float32 log-softmax, and the
    gradient of each, every one a ``[vocab]`` row."""
    elem = torch.finfo(model_dtype(model)).bits // 8
    per_entry = 2 * elem + 2 * 4 + (2 * 4 if elem != 4 else 0)
    return per_entry * int(model.cfg.d_vocab)


def token_bytes(model: HookedModel, *, grad: bool = False, share: DeviceShare | None = None) -> int:
    """Rough bytes one token costs on a device holding ``share`` of the model (default: the
    whole model on one device): the residual and a block's transient attention and MLP states;
    with ``grad`` (the v*/z optimisation) the activations kept for the backward pass of each
    block the device holds, and on the unembedding's device the vocabulary read's arrays
    (:func:`vocab_read_bytes`, every position counted as a read: an upper bound)."""
    cfg = model.cfg
    share = share or DeviceShare(n_layers(model), True)
    elem = torch.finfo(model_dtype(model)).bits // 8
    per_block = elem * (8 * int(cfg.d_model) + 3 * int(cfg.d_mlp or 4 * cfg.d_model))
    if not grad:
        return per_block
    return per_block * max(1, share.blocks) + (vocab_read_bytes(model) if share.unembed else 0)


def free_bytes(device: torch.device) -> int:
    """Bytes a CUDA device can still give: free to the driver plus reserved by PyTorch's
    caching allocator but not allocated."""
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(0, int(cached))


def batch_tokens(model: HookedModel, *, grad: bool = False, cpu_default: int = 4096) -> int:
    """Tokens per forward pass for ``model``: the explicit budget if one was set, else what
    the tightest of the CUDA devices it occupies can take (:func:`free_bytes` over
    :func:`token_bytes` of its share), else ``cpu_default``."""
    explicit = getattr(model, _BUDGET_ATTR, None)
    if explicit is not None:
        return int(explicit)
    shares = device_shares(model)
    if not shares:
        return cpu_default
    tokens = min(
        int(FREE_FRACTION * free_bytes(d) / token_bytes(model, grad=grad, share=share))
        for d, share in shares.items()
    )
    return max(MIN_TOKENS, min(MAX_TOKENS, tokens))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory (CUDA's, or a backend's message)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def halving(items: Sequence[T], size: int, run: Callable[[Sequence[T]], None], what: str) -> int:
    """Call ``run`` on consecutive chunks of ``items`` of ``size`` items; when a chunk runs out
    of memory, halve ``size`` (logged), retry that chunk and keep the smaller size for the
    rest. ``run`` must not have kept any result of a chunk that failed. Returns the size the
    work finished with."""
    size = max(1, size)
    i = 0
    while i < len(items):
        chunk = items[i : i + size]
        try:
            run(chunk)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc) or size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = max(1, len(chunk) // 2)
            log.warning("%s: out of memory; chunk halved to %d and retried", what, size)
            continue
        i += len(chunk)
    return size
