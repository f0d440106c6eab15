"""The vocabulary projection, a slice of the vocabulary at a time on the CPU.

Scoring a prompt and optimising an edit's target both end in ``logits = x @ W_U`` for a few
final states ``x`` and an unembedding of the whole vocabulary (the embedded Gemma's is
262,144 x 640: 671 MB in float32, most of the model). On a CPU that one product is slower
than the same product taken :data:`VOCAB_SLICE` vocabulary rows at a time, each slice's
logits written into their columns of the output. Measured on this project's 2-core machine
(``benchmarks/edit_speed.py --vocab``, 2026-12-02, forward only): 12 states 0.32 -> 0.15 s,
100 states 0.69 -> 0.46 s, 300 states 1.66 -> 1.41 s, 1,000 states 5.1 s either way (a ROME
edit reads 12 states per step). Every logit is the same dot product either way (equal up to
the kernels' rounding).

The backward pass (the gradient with respect to the states; factscope never trains the
unembedding) is one product ``grad @ W_U``, which is already fast. Where slicing was not
measured to pay (another device) or cannot be done exactly (an unembedding that is not a
plain linear layer, or whose weights take gradients), the bridge's own module runs.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

#: Vocabulary rows per product on the CPU (1,024 was fastest of 1,024 / 2,048 / 4,096 for
#: 12 to 1,000 states on the embedded model's unembedding).
VOCAB_SLICE = 1024


def sliced(model: Any, x: torch.Tensor) -> bool:
    """Whether :func:`project` takes the sliced CPU path for ``x`` on ``model``."""
    lm = model.unembed.original_component
    return (
        type(lm) is torch.nn.Linear
        and x.device.type == "cpu"
        and lm.weight.device.type == "cpu"
        and not lm.weight.requires_grad
        and (lm.bias is None or not lm.bias.requires_grad)
    )


def project(
    model: Any, x: Float[torch.Tensor, "*batch d_model"], *, rows: int = VOCAB_SLICE
) -> Float[torch.Tensor, "*batch vocab"]:
    """``model.unembed(x)``: the logits of final-normed states, the unembedding's hooks
    firing as they do there; on the CPU ``rows`` vocabulary rows per product (see the
    module docstring)."""
    if not sliced(model, x):
        return model.unembed(x)
    lm = model.unembed.original_component
    x = model.unembed.hook_in(x)
    out = _SlicedLinear.apply(x, lm.weight, lm.bias, rows)
    return model.unembed.hook_out(out)


class _SlicedLinear(torch.autograd.Function):
    """``x @ W^T + b`` a slice of ``W``'s rows at a time; gradient for ``x`` only."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(flat.shape[0], weight.shape[0])
        for i in range(0, weight.shape[0], rows):
            w = weight[i : i + rows]
            if bias is None:
                out[:, i : i + rows] = flat @ w.T
            else:
                out[:, i : i + rows] = torch.addmm(bias[i : i + rows], flat, w.T)
        ctx.save_for_backward(weight)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (weight,) = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0]) @ weight
        return g.view(*grad.shape[:-1], weight.shape[1]), None, None, None
