"""One tensor's change in an edit: :class:`LayerDelta` (see :mod:`editing.edits.edit`).

Either the MLP down-projection's change (``param`` None), as low-rank factors where the
method gives them (ROME, MEMIT) or dense, in the architecture-neutral ``[d_mlp, d_model]``
orientation of :func:`tracing.models.down_proj`; or the dense change of any other tensor of a
block, named as in :mod:`editing.params` (fine-tuning of whole blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float

from editing.params import TargetKey, parse_name
from tracing.errors import InvalidInput


@dataclass(eq=False)
class LayerDelta:
    """The change of one tensor of block ``layer``.

    With ``param`` None: the change of ``down_proj(model, layer)`` ([d_mlp, d_model]), either
    ``left @ right`` (low rank, ``left`` [d_mlp, r], ``right`` [r, d_model]; 1-D vectors mean
    rank one) or ``dense``. With ``param`` a block parameter name (``blocks.{layer}.…``, see
    :mod:`editing.params`): the ``dense`` change of that tensor, in its own shape (any number
    of dimensions)."""

    layer: int
    # Shapes are checked in __post_init__ with messages naming the layer: rank-one factors
    # may come as vectors ([d_mlp] and [d_model]), factors as [d_mlp, r] and [r, d_model].
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    param: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise InvalidInput(f"LayerDelta.layer must be an int, got {self.layer!r}")
        if self.param is not None:
            if parse_name(self.param) != self.layer:
                raise InvalidInput(
                    f"LayerDelta of {self.param!r} must have layer {parse_name(self.param)}, "
                    f"got {self.layer}"
                )
            if self.dense is None or self.left is not None or self.right is not None:
                raise InvalidInput(f"{self.param}: a parameter delta must be one dense tensor")
            self.dense = self.dense.detach()
            if self.dense.ndim < 1:
                raise InvalidInput(f"{self.param}: a dense delta must have at least one dimension")
            return
        low = self.left is not None or self.right is not None
        if low == (self.dense is not None) or (low and (self.left is None or self.right is None)):
            raise InvalidInput(
                f"layer {self.layer}: a LayerDelta needs either both left and right factors "
                "or one dense matrix"
            )
        if low:
            left, right = self.left.detach(), self.right.detach()  # type: ignore[union-attr]
            left = left.unsqueeze(1) if left.ndim == 1 else left
            right = right.unsqueeze(0) if right.ndim == 1 else right
            if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
                raise InvalidInput(
                    f"layer {self.layer}: factors of shapes {tuple(left.shape)} and "
                    f"{tuple(right.shape)} do not multiply to a matrix"
                )
            self.left, self.right = left, right
        else:
            self.dense = self.dense.detach()  # type: ignore[union-attr]
            if self.dense.ndim != 2:
                raise InvalidInput(f"layer {self.layer}: a dense delta must be a matrix")

    @property
    def key(self) -> TargetKey:
        """What it changes: the layer (its down-projection) or the parameter name."""
        return self.layer if self.param is None else self.param

    @property
    def rank(self) -> int | None:
        """Number of factor columns (None for a dense delta)."""
        return None if self.left is None else int(self.left.shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the full delta."""
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (int(self.left.shape[0]), int(self.right.shape[1]))  # type: ignore[union-attr]

    def tensors(self) -> list[torch.Tensor]:
        """The stored tensors (factors or the dense matrix)."""
        return [self.dense] if self.dense is not None else [self.left, self.right]  # type: ignore[list-item]

    def matrix(self, dtype: torch.dtype = torch.float32) -> Float[torch.Tensor, "..."]:
        """The full delta in ``dtype`` (float32 by default); factors are multiplied in the
        wider of their own dtype and ``dtype``, then cast. (A parameter delta may be a vector
        or any other shape: it is returned as stored.)"""
        if self.dense is not None:
            return self.dense.to(dtype)
        work = torch.promote_types(torch.promote_types(self.left.dtype, self.right.dtype), dtype)  # type: ignore[union-attr]
        return (self.left.to(work) @ self.right.to(work)).to(dtype)  # type: ignore[union-attr]
