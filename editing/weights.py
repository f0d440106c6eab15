"""Protecting down-projection weights around code that changes them in place.

:func:`weights_snapshot` copies the weights of some layers, :func:`restore_weights` puts them
back bit for bit, and :class:`restoring_weights` does both around a ``with`` block (on an
error always, on a normal exit when asked).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from types import TracebackType

import torch
from jaxtyping import Float

from tracing.models import HookedModel, check_layer, down_proj, fingerprint, n_layers


def add_to_weight(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """``weight += delta`` in place, on the weight's own device: the sum is formed in float32
    (or ``delta``'s wider dtype) and rounded once to the weight's dtype, so a bfloat16 weight
    is not rounded twice (delta to bfloat16, then the sum)."""
    work = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
    with torch.no_grad():
        weight.copy_((weight.to(work) + delta.to(weight.device, work)).to(weight.dtype))


def weights_snapshot(
    model: HookedModel, layers: Iterable[int]
) -> dict[int, Float[torch.Tensor, "m d"]]:
    """Clones of ``down_proj(model, L)`` for each layer (the values to restore later)."""
    return {L: down_proj(model, check_layer(model, L)).detach().clone() for L in set(layers)}


def restore_weights(model: HookedModel, snapshot: dict[int, torch.Tensor]) -> None:
    """Copy ``snapshot`` (from :func:`weights_snapshot`) back into the down-projections."""
    with torch.no_grad():
        for L, original in snapshot.items():
            down_proj(model, L).copy_(original)


class restoring_weights:  # noqa: N801  (used like a function: ``with restoring_weights(...)``)
    """Context manager: snapshot the down-projections of ``layers``; if the block raises,
    copy them back (bit-exact) and re-raise. With ``always=True`` they are restored on a
    normal exit too. ``__enter__`` returns the snapshot ``{layer: weights}``."""

    def __init__(self, model: HookedModel, layers: Iterable[int], *, always: bool = False) -> None:
        self.model, self.layers, self.always = model, list(layers), always
        self.snapshot: dict[int, torch.Tensor] = {}

    def __enter__(self) -> dict[int, torch.Tensor]:
        self.snapshot = weights_snapshot(self.model, self.layers)
        return self.snapshot

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None or self.always:
            restore_weights(self.model, self.snapshot)


def weights_checksums(model: HookedModel) -> list[str]:
    """Per layer, a digest of the exact bytes of every tensor of the block (attention, MLP,
    norms: any of them can be edited): equal digests mean bit-identical weights, whatever the
    thread count (float sums are not: their reduction order, and so their last bits, depend
    on it). A tensor reachable under two names is hashed once."""
    out = []
    for layer in range(n_layers(model)):
        h = hashlib.blake2b(digest_size=16)
        seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
        for p in model.blocks[layer].parameters():
            key = (p.data_ptr(), tuple(p.shape), tuple(p.stride()))
            if key in seen:
                continue
            seen.add(key)
            h.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        out.append(h.hexdigest())
    return out


def weights_key(model: HookedModel) -> str:
    """Short key of the model's identity and current block weights."""
    h = hashlib.sha256(fingerprint(model).encode())
    for digest in weights_checksums(model):
        h.update(digest.encode())
    return h.hexdigest()[:16]
