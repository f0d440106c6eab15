"""UltraEdit's lifelong normalisation: running per-coordinate mean and spread of the
concatenated ``[key, value gradient]`` rows of every batch seen so far in a stream.

Gu et al. 2025 normalise each batch's keys and value gradients with statistics carried over
the whole stream, so that one fixed step size fits every batch however the activations drift
as edits pile up. The official code keeps, per edited weight shape, a count ``n``, a mean and
an accumulated spread ``var``, merged with each new block ``x`` of ``m`` rows as

    n'    = n + m
    d     = mean(x) - mean
    mean' = mean + m d / n'
    var'  = var + m var_u(x) + n m d^2 / n'          (var_u: the unbiased variance of x)
    std'  = sqrt(var' / (n' - 1 + eps))

and normalises ``(x - mean) / (std + eps)`` with ``eps`` float32's machine epsilon. (Chan et
al.'s exact pooled sum of squares would add ``(m - 1) var_u(x)``; the code's ``m var_u(x)``
is kept, it is the published rule; a block of one row, whose unbiased variance is undefined
and NaN there, adds no spread here.) The state is plain float64 tensors and round-trips
through JSON exactly (:meth:`LifelongNormaliser.to_dict`), so a stream saved with it resumes
to the bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from tracing.errors import InvalidInput

#: float32's machine epsilon, the official code's ``torch.finfo(x.dtype).eps`` for its
#: float32 statistics.
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


@dataclass
class LifelongNormaliser:
    """Running statistics of rows of width ``size`` (see the module docstring); ``n`` rows
    seen so far (0: nothing yet, every statistic zero)."""

    n: float
    mean: Float[torch.Tensor, " size"]
    var: Float[torch.Tensor, " size"]
    std: Float[torch.Tensor, " size"]
    eps: float = FLOAT32_EPS

    @classmethod
    def empty(cls, size: int, eps: float = FLOAT32_EPS) -> LifelongNormaliser:
        """A normaliser that has seen nothing (the state at the start of a stream)."""
        if size < 1:
            raise InvalidInput(f"a normaliser needs a positive width, got {size}")
        z = torch.zeros(size, dtype=torch.float64)
        return cls(0.0, z.clone(), z.clone(), z.clone(), eps)

    @property
    def size(self) -> int:
        """The width of the rows it normalises."""
        return int(self.mean.shape[0])

    def update(self, x: Float[torch.Tensor, "m size"]) -> None:
        """Merge the rows of ``x`` into the statistics (in place, float64)."""
        if x.ndim != 2 or x.shape[1] != self.size:
            raise InvalidInput(f"normaliser rows must be [m, {self.size}], got {tuple(x.shape)}")
        x = x.detach().to("cpu", torch.float64)
        m = x.shape[0]
        if m < 1:
            raise InvalidInput("a normaliser update needs at least one row")
        # One row has no spread: 0 here where the official code's unbiased variance is NaN.
        spread = x.var(0) if m > 1 else torch.zeros_like(self.mean)
        n = self.n + m
        delta = x.mean(0) - self.mean
        self.mean = self.mean + m * delta / n
        self.var = self.var + m * spread + self.n * m * delta.pow(2) / n
        self.std = (self.var / (n - 1 + self.eps)).sqrt()
        self.n = n

    def __call__(self, x: Float[torch.Tensor, "m size"]) -> Float[torch.Tensor, "m size"]:
        """``(x - mean) / (std + eps)`` in float64."""
        return (x.double() - self.mean.to(x.device)) / (self.std.to(x.device) + self.eps)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (floats written exactly); :meth:`from_dict` reads it back."""
        return {
            "n": self.n,
            "eps": self.eps,
            "mean": self.mean.tolist(),
            "var": self.var.tolist(),
            "std": self.std.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LifelongNormaliser:
        """The normaliser :meth:`to_dict` wrote; a one-line error for anything else."""
        try:
            vals = {k: torch.tensor(d[k], dtype=torch.float64) for k in ("mean", "var", "std")}
            n, eps = float(d["n"]), float(d["eps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"not a lifelong normaliser state: {exc}") from exc
        shapes = {tuple(v.shape) for v in vals.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1 or n < 0:
            raise InvalidInput("a lifelong normaliser state needs n >= 0 and equal 1-D vectors")
        return cls(n, vals["mean"], vals["var"], vals["std"], eps)


#: The state of a stream: one normaliser per edited weight shape, keyed ``"d_in,d_out"``
#: (the official code shares one normaliser among all edited modules of the same shape).
LifelongState = dict[str, LifelongNormaliser]


def state_to_dict(state: Mapping[str, LifelongNormaliser]) -> dict[str, Any]:
    """A stream state as JSON data."""
    return {k: v.to_dict() for k, v in state.items()}


def state_from_dict(d: Mapping[str, Any] | None) -> LifelongState:
    """A stream state from :func:`state_to_dict`'s data (None: a fresh stream)."""
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise InvalidInput("a lifelong state must be an object keyed by weight shape")
    return {str(k): LifelongNormaliser.from_dict(v) for k, v in d.items()}
