"""The key side of ROME-like edits: subject keys ``k*`` and the second moment ``C = E[k k^T]``
they are weighed by.

* :func:`subject_keys`: per request, the MLP key (down-projection input, hook kind
  ``mlp_key``) at the subject's last token, averaged over the context templates the request
  was prepared with;
* :func:`layer_stats`: ``C`` for some layers with a method's statistics settings (one pass,
  cached on disk; :mod:`editing.statistics.stats`);
* :func:`second_moment`: the checked ``[d_mlp, d_mlp]`` matrix of one layer out of whatever a
  caller passed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from jaxtyping import Float

from editing.hparams import KeyValueHparams
from editing.requests.prepared import PreparedRequest
from editing.statistics.stats import SecondMoment, layer_second_moments
from tracing.errors import EditFailed, InvalidInput
from tracing.forward import capture_states, length_chunks, padded
from tracing.memory import batch_tokens
from tracing.models import (
    HookedModel,
    hook_name,
    layer_device,
    mlp_width,
)

#: Statistics as callers may pass them: per layer, or one layer's matrix.
Stats = Mapping[int, SecondMoment | torch.Tensor] | SecondMoment | torch.Tensor

DEFAULT_BATCH_TOKENS = 4096

#: How a request's key averages its prompts (see :func:`subject_keys`).
KeyWeighting = Literal["uniform", "group_mean"]


def subject_keys(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    layer: int,
    *,
    templated: bool = True,
    weighting: KeyWeighting = "uniform",
    max_batch_tokens: int | None = None,
) -> Float[torch.Tensor, "n d_mlp"]:
    """Per request, the mean over its prepared prompts of the MLP key at the subject's last
    token (``templated=False``: the bare prompt's key only). ``weighting="uniform"``: every
    prompt weighs the same (ROME's ``compute_u``); ``"group_mean"``: the mean of each
    context-template group first, then the mean of the groups (MEMIT's ``compute_ks``: the bare
    prompt, a group of its own, weighs 1/groups). Forward passes stop right after ``layer``;
    the model's current weights are used. Means are taken in float64."""
    name = hook_name(model, "mlp_key", layer)
    items = [
        (r, t.ids, t.subject_last)
        for r, p in enumerate(prepared)
        for t in (p.prompts if templated else p.prompts[:1])
    ]
    weights = [
        w
        for p in prepared
        for w in _prompt_weights(p, weighting if templated else "uniform", templated)
    ]
    # Accumulated in float64 on the layer's device, returned in float32 whatever the model's
    # dtype (the ROME and MEMIT solves use them in float64).
    dev = layer_device(model, layer)
    sums = torch.zeros(len(prepared), mlp_width(model), dtype=torch.float64, device=dev)
    budget = max_batch_tokens or batch_tokens(model, cpu_default=DEFAULT_BATCH_TOKENS)
    for chunk in length_chunks([len(ids) for _, ids, _ in items], budget):
        batch = [items[i] for i in chunk]
        keys = capture_states(model, padded([ids for _, ids, _ in batch]), [name], name)[name]
        at = keys.device
        rows = keys[
            torch.arange(len(batch), device=at), torch.tensor([lk for _, _, lk in batch], device=at)
        ]
        owners = torch.tensor([r for r, _, _ in batch], device=dev)
        w = torch.tensor([weights[i] for i in chunk], dtype=torch.float64, device=dev)
        sums.index_add_(0, owners, rows.to(dev, torch.float64) * w[:, None])
    keys = sums.float()
    if not torch.isfinite(keys).all():
        raise EditFailed(f"layer {layer}: non-finite MLP keys for the edit prompts")
    return keys


def _prompt_weights(p: PreparedRequest, weighting: KeyWeighting, templated: bool) -> list[float]:
    """The weight of each of a request's prompts in its key (they sum to 1)."""
    prompts = p.prompts if templated else p.prompts[:1]
    if weighting == "uniform":
        return [1.0 / len(prompts)] * len(prompts)
    sizes = Counter(t.group for t in prompts)
    return [1.0 / (len(sizes) * sizes[t.group]) for t in prompts]


def second_moment(stats: Stats | None, layer: int) -> torch.Tensor | None:
    """The ``[d_mlp, d_mlp]`` matrix for ``layer`` out of whatever the caller passed (a
    SecondMoment, a dict of them or of tensors by layer, or a tensor); None if nothing was
    passed. Refuses a missing layer, a non-square matrix, or NaN/inf."""
    if stats is None:
        return None
    if isinstance(stats, Mapping):
        if layer not in stats:
            raise InvalidInput(f"no second-moment statistics given for layer {layer}")
        stats = stats[layer]
    mom2 = stats if isinstance(stats, torch.Tensor) else stats.mom2
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise InvalidInput(f"layer {layer}: statistics must be a square matrix")
    if not torch.isfinite(mom2).all():
        raise InvalidInput(f"layer {layer}: the second-moment statistics contain NaN or inf")
    return mom2


def layer_stats(
    model: HookedModel,
    layers: Sequence[int],
    hp: KeyValueHparams,
    *,
    given: Stats | None = None,
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """``C`` for each of ``layers``: from ``given`` where the caller passed it, else computed
    (or read from the cache) with ``hp``'s statistics settings, all missing layers in one
    pass."""
    if given is not None:
        return {L: second_moment(given, L) for L in layers}  # type: ignore[misc]
    stats = layer_second_moments(
        model,
        list(layers),
        n_tokens=hp.mom2_n_tokens,
        corpus=hp.corpus,
        dtype=hp.mom2_dtype,
        progress=progress,
    )
    return {L: stats[L].mom2 for L in layers}
