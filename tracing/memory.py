"""How much work goes into one forward pass: batch sizes from the device's free memory, an
explicit budget per model, and halving on an out-of-memory error.

Every chunked loop in factscope (the tracing engine's rows, the v*/z optimisation's and the
key computations' token chunks, the statistics' sequences per pass) asks
:func:`batch_tokens` for its budget in tokens:

* a budget set with :func:`set_batch_tokens` (the CLI's ``--max-batch-tokens``) wins;
* on CUDA it comes from the device's free memory (``torch.cuda.mem_get_info``) and the
  model's shape, so a 6B model on one GPU gets chunks that fit and the 270M model on a big GPU
  gets big ones;
* on the CPU each loop keeps its measured default (bigger chunks do not make 2 cores faster).

:func:`halving` runs work in chunks and, on ``torch.OutOfMemoryError``, frees the cache,
halves the chunk, says so in the log and goes on; a chunk of one that still does not fit
re-raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from tracing.errors import InvalidInput
from tracing.models import HookedModel, model_device, model_dtype, n_layers

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


def token_bytes(model: HookedModel, *, grad: bool = False) -> int:
    """Rough bytes one token costs in a forward pass: the residual and the block's transient
    attention and MLP states; with ``grad`` the activations kept for the backward pass of
    every block."""
    cfg = model.cfg
    elem = torch.finfo(model_dtype(model)).bits // 8
    per_block = 8 * int(cfg.d_model) + 3 * int(cfg.d_mlp or 4 * cfg.d_model)
    return elem * per_block * (n_layers(model) if grad else 1)


def batch_tokens(model: HookedModel, *, grad: bool = False, cpu_default: int = 4096) -> int:
    """Tokens per forward pass for ``model``: the explicit budget if one was set, else from
    the free memory of a CUDA device, else ``cpu_default``."""
    explicit = getattr(model, _BUDGET_ATTR, None)
    if explicit is not None:
        return int(explicit)
    device = model_device(model)
    if device.type != "cuda":
        return cpu_default
    free, _ = torch.cuda.mem_get_info(device)
    tokens = int(FREE_FRACTION * free / token_bytes(model, grad=grad))
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
