"""Filters applied to a method's weight update before it enters the model, to limit the
harm an edit does to the model's general abilities. Each is an option of the methods that
use it, off by default (the published methods unchanged).

RECT (Gu et al. 2024, "Model Editing Harms General Abilities of Large Language Models:
Regularization to the Rescue", arXiv 2401.04700, EMNLP 2024): of a layer's update ``Delta W``
to the weight ``W``, only the entries that change their weight the most *relatively*,

    delta_ij = |Delta W_ij| / |W_ij|,

are kept, the top ``keep`` fraction of them (the paper's top-k%); the others are set to
zero, and this sparse ``Delta W`` is what is added to ``W``. The kept entries keep their
values (no rescaling). The paper has no single default: its results (the authors' project
page, JasonForJoy/Model-Editing-Hurt ``index.html``) call top-40 % the appropriate choice,
keeping over 94 % of the editing performance, and top-20 % too aggressive for editing
(though kinder to general abilities); the commented-out RECT lines of their
``rome_main.py`` zero the smallest 80 % (keep 20 %). Here the option is off unless set.

Exactly as computed here (:func:`rect_filter`):

* ``W`` is the weight as it stands when the update is added (the layer's weight before its
  own update), in float64;
* ``W_ij == 0``: a non-zero change is an infinite relative change (it ranks above every
  finite one; among themselves such entries tie); ``Delta W_ij == 0`` is a relative change
  of 0;
* ``round(keep * numel)`` entries are kept (halves rounded up; at least one), which is the
  official code's count ``numel - int((1 - keep) numel)`` whenever ``keep * numel`` is whole;
* ties at the threshold: of the entries whose relative change equals the smallest kept value,
  those first in row-major order of the ``[d_mlp, d_model]`` matrix are kept, so the count
  is exact and the result does not depend on the device's sort.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float

from tracing.errors import InvalidHparams, InvalidInput


def check_rect_keep(value: Any) -> None:
    """Refuse a ``rect_keep`` that is not None or a number in ``(0, 1]``."""
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not 0 < value <= 1:  # also refuses nan
        raise InvalidHparams(
            f"rect_keep must be None (off) or a fraction in (0, 1] of the update's entries to "
            f"keep (RECT; the paper recommends 0.4), got {value!r}"
        )


def rect_count(numel: int, keep: float) -> int:
    """How many of ``numel`` entries RECT keeps: ``round(keep * numel)``, halves up, at
    least one."""
    return max(1, min(numel, math.floor(keep * numel + 0.5)))


def rect_filter(
    delta: Float[torch.Tensor, "m d"], weight: Float[torch.Tensor, "m d"], keep: float
) -> Float[torch.Tensor, "m d"]:
    """RECT: ``delta`` with all but its :func:`rect_count` entries of largest relative change
    ``|delta| / |weight|`` set to zero (see the module docstring for zeros and ties); same
    dtype and device as ``delta``. ``weight`` is the matrix ``delta`` will be added to."""
    check_rect_keep(keep)
    if tuple(delta.shape) != tuple(weight.shape):
        raise InvalidInput(
            f"RECT: update of shape {tuple(delta.shape)} does not match its weight "
            f"{tuple(weight.shape)}"
        )
    n = delta.numel()
    n_keep = rect_count(n, keep)
    if n_keep == n:
        return delta.clone()
    d = delta.detach().to(torch.float64).reshape(-1)
    w = weight.detach().to(d.device, torch.float64).reshape(-1)
    rel = torch.where(d == 0, 0.0, d.abs() / w.abs())  # w == 0 < |d|: inf (kept)
    threshold = rel.kthvalue(n - n_keep + 1).values  # the n_keep-th largest
    mask = rel > threshold
    ties = rel == threshold
    mask |= ties & (torch.cumsum(ties, 0) <= n_keep - int(mask.sum()))
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    return torch.where(mask.view(delta.shape), delta, zero)
