"""Naming, choosing and protecting any parameter tensor of a block, on every architecture.

Fine-tuning (Zhu et al. 2020) tunes whole parts of Transformer blocks, not only the MLP
down-projection that ROME-like methods edit. This module gives every tunable tensor of a
block one architecture-neutral name, ``blocks.{L}.{path}``, where ``path`` is the tensor's
path inside the bridge block with TransformerLens' ``_original_component`` hops removed
(GPT-2: ``blocks.3.attn.q.weight``, ``blocks.3.mlp.c_fc.bias``; Llama / Gemma:
``blocks.3.self_attn.q_proj.weight``, ``blocks.3.post_feedforward_layernorm.weight``).

* :func:`block_parameters`: the tensors of block ``L`` in one *part*: ``mlp`` (every
  feed-forward tensor), ``attn`` (every attention tensor, Gemma's q/k norms included), or
  ``block`` (both plus the block's own norms);
* :func:`named_parameter`: the live tensor behind a name (an in-place change edits the model);
* :func:`snapshot_targets` / :func:`restore_targets`: bit-exact copies of any mix of
  down-projections (by layer, :func:`tracing.models.down_proj`'s ``[d_mlp, d_model]`` view) and
  named tensors, and putting them back.

The tensors are the ones the forward pass reads. TransformerLens' GPT-2 bridge splits the
joint ``c_attn`` weight into ``q``, ``k``, ``v`` views that share its storage; gradients reach
the views, never the joint tensor, so a tensor whose storage holds several other tensors of
the block (the joint one) is left out and its views are tuned instead. Embeddings and the
final norm are never chosen (no part names them; :func:`tracing.models.fingerprint` hashes the
embedding, which an edit must not change).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch

from tracing.errors import InvalidInput
from tracing.models import HookedModel, check_layer, down_proj

Part = Literal["mlp", "attn", "block"]
#: The parts of a block :func:`block_parameters` chooses from.
PARTS: tuple[str, ...] = ("mlp", "attn", "block")
#: What a snapshot is keyed by: a layer (its down-projection view) or a parameter name.
TargetKey = int | str

_HOP = "._original_component"


def _strip(path: str) -> str:
    return path.replace(_HOP, "").replace("_original_component.", "")


def _unique(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``{stripped name: parameter}`` of a module, each parameter once (first name wins)."""
    out: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out[_strip(name)] = p
    return out


def _span(p: torch.Tensor) -> tuple[int, int, int]:
    """(storage, first byte, last byte + 1) of the memory a tensor can reach."""
    size = p.element_size()
    last = sum((n - 1) * s for n, s in zip(p.shape, p.stride(), strict=True)) if p.numel() else 0
    start = p.data_ptr()
    return p.untyped_storage().data_ptr(), start, start + (last + 1) * size


def _drop_joint(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """Leave out every tensor whose memory holds another tensor of ``params`` (a joint
    weight split into views by the bridge: only the views are read by the forward pass)."""
    spans = {n: _span(p) for n, p in params.items()}

    def holds(a: str, b: str) -> bool:
        sa, sb = spans[a], spans[b]
        return a != b and sa[0] == sb[0] and sa[1] <= sb[1] and sb[2] <= sa[2] and (sa != sb)

    return {n: p for n, p in params.items() if not any(holds(n, m) for m in params)}


def _block_tensors(model: HookedModel, layer: int) -> dict[str, torch.nn.Parameter]:
    block = model.blocks[check_layer(model, layer)]
    return {f"blocks.{layer}.{n}": p for n, p in _drop_joint(_unique(block)).items()}


def block_parameters(
    model: HookedModel, layer: int, part: Part | str = "block"
) -> dict[str, torch.nn.Parameter]:
    """The tensors of block ``layer`` in ``part`` (``mlp``, ``attn`` or ``block``), by name
    (see the module docstring), in the block's own order. ``block`` is the union of the MLP,
    the attention and the block's norms (GPT-2's ``ln_1``/``ln_2``, Llama's input and
    post-attention norms, Gemma's four sandwich norms)."""
    if part not in PARTS:
        raise InvalidInput(f"unknown block part {part!r}; expected one of {PARTS}")
    every = _block_tensors(model, layer)
    if part == "block":
        return every
    sub = model.blocks[layer].mlp if part == "mlp" else model.blocks[layer].attn
    wanted = {id(p) for p in sub.parameters()}
    return {n: p for n, p in every.items() if id(p) in wanted}


def parse_name(name: str) -> int:
    """The layer of a parameter name ``blocks.{L}.…`` (InvalidInput for any other form)."""
    head, _, rest = str(name).partition(".")
    index, _, _ = rest.partition(".")
    if head != "blocks" or not index.isdigit() or not rest.partition(".")[2]:
        raise InvalidInput(f"{name!r} is not a block parameter name (blocks.<layer>.<path>)")
    return int(index)


def named_parameter(model: HookedModel, name: str) -> torch.nn.Parameter:
    """The live tensor called ``name`` (``blocks.{L}.{path}``) in ``model``; an unknown name
    raises :class:`~tracing.errors.InvalidInput` naming it."""
    layer = parse_name(name)
    check_layer(model, layer)
    found = _block_tensors(model, layer)
    if name not in found:
        # alias paths (the bridge names some tensors twice) resolve too
        aliases = {
            f"blocks.{layer}.{_strip(n)}": p
            for n, p in model.blocks[layer].named_parameters(remove_duplicate=False)
        }
        if name not in aliases:
            raise InvalidInput(
                f"this model has no parameter {name!r}; block {layer} has {sorted(found)}"
            )
        return aliases[name]
    return found[name]


def target_tensor(model: HookedModel, key: TargetKey) -> torch.Tensor:
    """The live tensor a snapshot key names: ``down_proj(model, L)`` for a layer, else the
    named parameter."""
    if isinstance(key, int) and not isinstance(key, bool):
        return down_proj(model, check_layer(model, key))
    return named_parameter(model, str(key))


def snapshot_targets(
    model: HookedModel, keys: Iterable[TargetKey]
) -> dict[TargetKey, torch.Tensor]:
    """Clones of the tensors ``keys`` name (layers and/or parameter names)."""
    return {k: target_tensor(model, k).detach().clone() for k in dict.fromkeys(keys)}


def restore_targets(model: HookedModel, snapshot: dict[TargetKey, torch.Tensor]) -> None:
    """Copy a :func:`snapshot_targets` snapshot back, bit for bit."""
    with torch.no_grad():
        for key, original in snapshot.items():
            target_tensor(model, key).copy_(original)


@contextmanager
def grad_only(model: HookedModel, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Within the block only ``params`` require gradients (every other parameter of the
    bridge and of the Hugging Face model is frozen); afterwards every flag is restored and
    the gradients of ``params`` are dropped."""
    everything = {id(p): p for p in model.parameters()}
    everything.update({id(p): p for p in model.original_model.parameters()})
    flags = [(p, p.requires_grad) for p in everything.values()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for t in params:
            t.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for t in params:
            t.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)
