"""Protecting down-projection weights around code that changes them in place.

:func:`weights_snapshot` copies the weights of some layers, :func:`restore_weights` puts them
back bit for bit, and :class:`restoring_weights` does both around a ``with`` block (on an
error always, on a normal exit when asked).

:func:`weights_key` and :func:`weights_checksums` name the exact bytes of the block weights;
a digest is kept per tensor on the model object and only tensors changed since (by torch's
version counter) are read again, so keying a cache on the weights after an edit costs the
edited tensors, not the model. :class:`WeightsGuard` proves that edits applied and undone
one after another restore the weights bit for bit, comparing on the device only what each
edit touched: the model is read on the host once before and once after, not per edit.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
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
        if work == weight.dtype:  # float32 (or wider) weights: the same sum, with no new matrix
            weight.add_(delta.to(weight.device, work))
        else:
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


# ---------------------------------------------------------------------- digests and checks
#
# A digest of every block tensor is computed once per model and kept on the model object
# with a *stamp* of the tensor it was taken of: the tensor itself (weakly), its storage
# address, dtype, device and autograd version counter. Every in-place change through torch
# (``copy_``, ``add_``, ``Edit.apply``/``undo``, ``load_state_dict``) bumps the version
# counter, and a replaced tensor changes the rest, so with ``reuse=True`` a tensor whose stamp
# is unchanged keeps its recorded digest: only changed tensors are read again. Writes that
# bypass the counter (through ``param.data``, a NumPy view or DLPack) are not seen then; the
# default (``reuse=False``) reads everything.

_DIGESTS_ATTR = "_factscope_weight_digests"  # {name: (stamp, digest)} of the block tensors


@dataclass(frozen=True)
class _Stamp:
    ref: weakref.ReferenceType
    ptr: int
    dtype: torch.dtype
    device: torch.device
    version: int

    def matches(self, t: torch.Tensor) -> bool:
        return self.ref() is t and self == _stamp(t, self.ref)


def _stamp(t: torch.Tensor, ref: weakref.ReferenceType | None = None) -> _Stamp:
    return _Stamp(ref or weakref.ref(t), t.data_ptr(), t.dtype, t.device, t._version)


def block_tensors(model: HookedModel) -> list[list[tuple[str, torch.Tensor]]]:
    """Per layer, ``(name, tensor)`` of every tensor of the block (attention, MLP, norms),
    in the block's own order; a tensor reachable under two names is listed once."""
    out = []
    for layer in range(n_layers(model)):
        seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
        mine = []
        for name, p in model.blocks[layer].named_parameters():
            key = (p.data_ptr(), tuple(p.shape), tuple(p.stride()))
            if key not in seen:
                seen.add(key)
                mine.append((f"blocks.{layer}.{name}", p))
        out.append(mine)
    return out


def tensor_digest(t: torch.Tensor) -> str:
    """Digest of the exact bytes of ``t`` (read on the host: the one place that does)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensor_digests(model: HookedModel, *, reuse: bool = False) -> dict[str, str]:
    """``{name: digest}`` of every block tensor, each read on the host; with ``reuse`` only
    those changed since their digest was last taken (see the comment above)."""
    memo: dict[str, tuple[_Stamp, str]] = getattr(model, _DIGESTS_ATTR, None) or {}
    out: dict[str, str] = {}
    for layer in block_tensors(model):
        for name, p in layer:
            known = memo.get(name)
            if not reuse or known is None or not known[0].matches(p):
                known = (_stamp(p), tensor_digest(p))
                memo[name] = known
            out[name] = known[1]
    setattr(model, _DIGESTS_ATTR, memo)
    return out


def weights_checksums(model: HookedModel, *, reuse: bool = False) -> list[str]:
    """Per layer, a digest of the exact bytes of every tensor of the block (attention, MLP,
    norms: any of them can be edited): equal digests mean bit-identical weights, whatever the
    thread count (float sums are not: their reduction order, and so their last bits, depend
    on it). With ``reuse``, cheap when little changed: see :func:`tensor_digests`."""
    digests = tensor_digests(model, reuse=reuse)
    out = []
    for layer in block_tensors(model):
        h = hashlib.blake2b(digest_size=16)
        for name, _ in layer:
            h.update(digests[name].encode())
        out.append(h.hexdigest())
    return out


def weights_key(model: HookedModel, *, reuse: bool = False) -> str:
    """Short key of the model's identity and current block weights (``reuse`` as in
    :func:`tensor_digests`: a cache keyed after an edit reads only the edited tensors)."""
    h = hashlib.sha256(fingerprint(model).encode())
    for digest in weights_checksums(model, reuse=reuse):
        h.update(digest.encode())
    return h.hexdigest()[:16]


class WeightsGuard:
    """Proof that many edits, each applied and undone, leave the block weights bit for bit
    as they were, at a cost that does not grow with the model.

    Made once before the edits (one full read: every block tensor's digest).
    Before each edit is applied, :meth:`protect` copies the tensors it touches on their own
    device; after it is undone, :meth:`check` compares those with ``torch.equal`` on the
    device, and any other block tensor whose version counter moved (changed in place by the
    method, say) with its digest. :meth:`finish` reads everything once more (it also sees
    writes that bypass the version counter). A mismatch raises RuntimeError naming
    the tensors."""

    def __init__(self, model: HookedModel) -> None:
        self.model = model
        self.start = tensor_digests(model)
        self.saved: dict[str, torch.Tensor] = {}  # by name: device copies made by protect

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p for layer in block_tensors(self.model) for n, p in layer}

    def protect(self, tensors: Iterable[torch.Tensor]) -> None:
        """Keep device copies of the block tensors behind ``tensors`` (the tensors or views
        of them, e.g. ``down_proj``) as they are now, for the next :meth:`check`; one changed
        since it was last checked is first verified against its digest."""
        params = self._params()
        wanted = {t.untyped_storage().data_ptr() for t in tensors}
        mine = {
            n: p
            for n, p in params.items()
            if p.untyped_storage().data_ptr() in wanted and n not in self.saved
        }
        self._verify(mine, "before an edit")
        self.saved.update({n: p.detach().clone() for n, p in mine.items()})

    def _verify(self, tensors: dict[str, torch.Tensor], when: str) -> None:
        memo: dict[str, tuple[_Stamp, str]] = getattr(self.model, _DIGESTS_ATTR, None) or {}
        bad = []
        for name, p in tensors.items():
            known = memo.get(name)
            if known is not None and known[0].matches(p):
                continue
            copy = self.saved.get(name)
            if copy is not None:
                same = copy.dtype == p.dtype and torch.equal(copy, p)
            else:
                same = tensor_digest(p) == self.start.get(name)
            if same:  # bit for bit the original: its digest is the start's again
                memo[name] = (_stamp(p), self.start[name])
            else:
                bad.append(name)
        setattr(self.model, _DIGESTS_ATTR, memo)
        if bad:
            more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
            raise RuntimeError(f"model weights changed {when}: {', '.join(bad[:4])}{more}")

    def check(self, what: str) -> None:
        """Raise RuntimeError if a block tensor is not what it was (see the class
        docstring); ``what`` names the work just done. Drops the copies of :meth:`protect`."""
        try:
            self._verify(self._params(), f"after {what}")
        finally:
            self.saved.clear()

    def finish(self, what: str = "the run") -> None:
        """Read every block tensor again (this also sees writes that bypass the version
        counter) and raise RuntimeError if any differs from the start."""
        now = tensor_digests(self.model)
        bad = [n for n, d in self.start.items() if now.get(n) != d]
        if bad:
            raise RuntimeError(f"model weights changed during {what}: {', '.join(bad[:4])}")
