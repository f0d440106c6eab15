"""The constraints of a fine-tuning step, applied in place on the tuned tensors: the
l-infinity projection into ``θ0 ± ε`` and the Fisher penalty's gradient.

Both read the anchor ``θ0`` from the run's snapshot of the tuned tensors (taken once before
the first step, in the model's dtype) instead of a float32 copy of it: for a float32 model
the snapshot is the anchor, for a half-precision model each tensor's anchor is widened to
float32 only while that tensor is processed. Their transient memory is therefore one or
two tensors of the largest tuned shape, not copies of the block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _anchor(master: torch.Tensor, snapshot: torch.Tensor) -> torch.Tensor:
    """The snapshot in the master's dtype (itself when the dtypes agree)."""
    return snapshot if snapshot.dtype == master.dtype else snapshot.to(master.dtype)


@torch.no_grad()
def project_linf_(master: torch.Tensor, snapshot: torch.Tensor, eps: float) -> None:
    """Clamp ``master`` into ``[θ0 − eps, θ0 + eps]`` in place, ``θ0`` = ``snapshot``.

    Computed as ``max(min(θ, θ0 + eps), θ0 − eps)`` with the two bounds formed exactly as
    ``θ0 + eps`` and ``θ0 − eps`` would be, so the result is bit for bit the out-of-place
    formula's; one temporary of the tensor's shape holds each bound in turn."""
    a = _anchor(master, snapshot)
    bound = torch.add(a, eps)
    torch.minimum(master, bound, out=master)
    torch.sub(a, eps, out=bound)
    torch.maximum(master, bound, out=master)


@torch.no_grad()
def add_penalty_grads(
    masters: Sequence[torch.Tensor],
    snapshot: Sequence[torch.Tensor],
    fisher: Sequence[torch.Tensor],
    weight: float,
    scale: float | None = None,
) -> float:
    """Add the gradient of the Fisher penalty ``weight * Σ F (θ − θ0)²`` to each master's
    ``.grad`` in place and return the penalty's value.

    The gradient ``2 * weight * F * (θ − θ0)`` is formed in the order autograd forms it for
    :func:`editing.statistics.fisher.fisher_penalty` (``(weight F) (2 (θ − θ0))``), one tensor
    at a time, without keeping the penalty's graph (which would hold two block-sized
    temporaries until its backward). ``scale``: the loss scaler's current scale (float16
    models), by which the gradient is multiplied as a scaled penalty's backward would; None
    for no scaling. Every master must already have a ``.grad``."""
    total = torch.zeros((), dtype=torch.float32, device=masters[0].device)
    coef = weight if scale is None else weight * scale
    for m, s, f in zip(masters, snapshot, fisher, strict=True):
        if m.grad is None:
            raise ValueError("add_penalty_grads: a master has no gradient to add to")
        diff = m.detach() - _anchor(m, s)
        total = total + (f * diff**2).sum()
        grad = torch.mul(f, coef)
        grad.mul_(diff.mul_(2))
        m.grad.add_(grad)
    return float((weight * total).item())
