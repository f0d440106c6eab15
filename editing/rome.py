"""ROME (Meng et al. 2022): one fact as a rank-one update of one MLP down-projection.

Orientation (as everywhere in factscope): ``W = down_proj(model, L)`` is ``[d_mlp, d_model]``
and the raw down-projection output is ``k @ W (+ b)``. With ``C = E[k k^T]`` over a corpus,
the key ``k*`` (mean over context templates of the key at the subject's last token) and the
value ``v*`` (from :func:`editing.targets.compute_targets` at the raw down-projection output),

    u = C^-1 k*,   delta W = u (v* - k* W - b)^T / (u^T k*)

so that ``k* (W + delta W) + b = v*`` exactly. That is the consistent-key form of r-ROME
(Gupta et al. 2024, the default): the same averaged ``k*`` in ``u`` and in the residual. The
original ROME (``consistent_key=False``) takes the residual at the un-templated prompt's key
``k``: ``delta W = u (v* - k W - b)^T / (u^T k)``, so ``k (W + delta W) + b = v*``.
The closed form does not depend on the scale of ``C``, so ROME's ``mom2_update_weight`` is
not used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from editing.context import check_templates, context_templates, template_prompt_ids
from editing.edit import Edit, LayerDelta, model_name
from editing.requests import EditRequest, validate_requests
from editing.targets import (
    DEFAULT_BATCH_TOKENS,
    capture_states,
    compute_targets,
    length_chunks,
    padded,
)
from tracing.models import check_layer, down_proj, fingerprint, hook_name

if TYPE_CHECKING:
    from editing.hparams import RomeHparams
    from editing.stats import SecondMoment

log = logging.getLogger(__name__)


def down_proj_bias(model, layer: int) -> Float[torch.Tensor, " d_model"] | None:
    """The down-projection's bias at ``layer`` (GPT-2, GPT-J), or None (Llama, Gemma)."""
    module = model.blocks[check_layer(model, layer)].mlp.out.original_component
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def subject_keys(
    model,
    requests: Sequence[EditRequest],
    layer: int,
    templates: Sequence[str] = ("{}",),
    *,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> Float[torch.Tensor, "n d_mlp"]:
    """Per request, the mean over ``templates`` of the MLP key (down-projection input, hook
    kind ``mlp_key``) at the subject's last token of the template filled with the request's
    prompt. ``templates=("{}",)`` gives the plain prompt's key. Forward passes stop right
    after ``layer``; the model's current weights are used."""
    name = hook_name(model, "mlp_key", layer)
    items = [
        (r, *template_prompt_ids(model, req, t))
        for r, req in enumerate(requests)
        for t in templates
    ]
    sums = torch.zeros(len(requests), int(model.cfg.d_mlp), dtype=torch.float64)
    counts = torch.zeros(len(requests), dtype=torch.float64)
    for chunk in length_chunks([len(ids) for _, ids, _ in items], max_batch_tokens):
        batch = [items[i] for i in chunk]
        keys = capture_states(model, padded([ids for _, ids, _ in batch]), [name], name)[name]
        rows = keys[torch.arange(len(batch)), torch.tensor([lk for _, _, lk in batch])]
        owners = torch.tensor([r for r, _, _ in batch])
        sums.index_add_(0, owners, rows.double())
        counts.index_add_(0, owners, torch.ones(len(batch), dtype=torch.float64))
    keys = (sums / counts[:, None]).to(down_proj(model, layer).dtype)
    if not torch.isfinite(keys).all():
        raise ValueError(f"layer {layer}: non-finite MLP keys for the edit prompts")
    return keys


def second_moment(
    stats: SecondMoment | torch.Tensor | Mapping | None, layer: int
) -> torch.Tensor | None:
    """The ``[d_mlp, d_mlp]`` matrix for ``layer`` out of whatever the caller passed (a
    SecondMoment, a dict of them by layer, or a tensor); None if nothing was passed. Raises a
    ValueError naming the layer if it is missing or holds NaN/inf."""
    if stats is None:
        return None
    if isinstance(stats, Mapping):
        if layer not in stats:
            raise ValueError(f"no second-moment statistics given for layer {layer}")
        stats = stats[layer]
    mom2 = stats if isinstance(stats, torch.Tensor) else stats.mom2
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise ValueError(f"layer {layer}: statistics must be a square matrix")
    if not torch.isfinite(mom2).all():
        raise ValueError(f"layer {layer}: the second-moment statistics contain NaN or inf")
    return mom2


def load_layer_stats(model, layers: Sequence[int], hp, *, progress: bool = False) -> dict:
    """E[k k^T] for ``layers`` with the statistics settings of ``hp`` (one pass, cached)."""
    from editing.stats import layer_second_moments

    return layer_second_moments(
        model,
        list(layers),
        n_tokens=hp.mom2_n_tokens,
        corpus=hp.corpus,
        dtype=hp.mom2_dtype,
        progress=progress,
    )


def rank_one_update(
    weight: Float[torch.Tensor, "d_mlp d_model"],
    mom2: Float[torch.Tensor, "d_mlp d_mlp"],
    key_u: Float[torch.Tensor, " d_mlp"],
    value: Float[torch.Tensor, " d_model"],
    *,
    key_res: Float[torch.Tensor, " d_mlp"] | None = None,
    bias: Float[torch.Tensor, " d_model"] | None = None,
) -> tuple[Float[torch.Tensor, " d_mlp"], Float[torch.Tensor, " d_model"]]:
    """ROME's closed form, computed in float64: ``(left, right)`` with
    ``delta W = outer(left, right)``, ``left = C^-1 k_u / (k_res . C^-1 k_u)`` and
    ``right = v - k_res W - b``, so that ``k_res (W + delta W) + b = v``.

    ``key_res`` defaults to ``key_u`` (the consistent-key form). Raises a ValueError when
    ``C`` is singular in the key's direction or the result is not finite.
    """
    k_res = key_u if key_res is None else key_res
    w, c = weight.double(), mom2.double()
    try:
        u = torch.linalg.solve(c, key_u.double())
    except torch.linalg.LinAlgError as exc:
        raise ValueError(
            "the second-moment matrix is singular: use more tokens for the statistics"
        ) from exc
    denom = torch.dot(u, k_res.double())
    current = k_res.double() @ w + (0 if bias is None else bias.double())
    right = value.double() - current
    if not torch.isfinite(u).all() or not torch.isfinite(denom) or denom.abs() < 1e-30:
        raise ValueError("the second-moment matrix is singular for this key: use more tokens")
    left = u / denom
    if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
        raise ValueError("ROME update is not finite")
    return left, right


def rome_edit(
    model,
    request: EditRequest,
    hp: RomeHparams,
    *,
    stats: SecondMoment | Mapping | torch.Tensor | None = None,
    context_templates: Sequence[str] | None = None,
    progress: bool = False,
) -> Edit:
    """A ROME edit of one request at layer ``hp.layer``. The model is left unchanged (apply
    the returned :class:`~editing.edit.Edit` yourself). ``stats``: the layer's E[k k^T]
    (default: computed or read from the cache with ``hp``'s settings); ``context_templates``:
    your own templates (default: the model's own, generated with ``hp.context_templates``).
    Bad requests, an unknown layer, or NaN in the statistics raise a ValueError before any
    work is done.
    """
    if hp.layer is None:
        raise ValueError("ROME needs a layer: set hp.layer (or pass layers=[L])")
    layer = check_layer(model, hp.layer)
    validate_requests(model, [request])
    mom2 = second_moment(stats, layer)
    templates = _templates(model, hp, context_templates)
    if mom2 is None:
        mom2 = second_moment(load_layer_stats(model, [layer], hp, progress=progress), layer)
    assert mom2 is not None
    t0 = time.perf_counter()
    k_star = subject_keys(model, [request], layer, templates)[0]
    k_res = k_star if hp.consistent_key else subject_keys(model, [request], layer)[0]
    res = compute_targets(
        model,
        [request],
        layer=layer,
        hook="mlp_raw",
        hp=hp.target,
        context_templates=templates,
        progress=progress,
    )
    v_star = res.targets[0]
    weight = down_proj(model, layer).detach()
    left, right = rank_one_update(
        weight, mom2, k_star, v_star, key_res=k_res, bias=down_proj_bias(model, layer)
    )
    delta = LayerDelta(layer, left=left.float(), right=right.float())
    meta = {
        "v_star": v_star.tolist(),
        "v_star_norm": float(v_star.norm()),
        "v_init_norm": float(res.init[0].norm()),
        "delta_norm": float(res.delta[0].norm()),
        "update_norm": float(left.norm() * right.norm()),
        "weight_norm": float(weight.norm()),
        "nll_before": res.nll_before[0],
        "nll_after": res.nll_after[0],
        "steps": res.steps[0],
        "n_templates": len(templates),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("ROME layer %d: target NLL %.3f -> %.3f", layer, meta["nll_before"], meta["nll_after"])
    return Edit(
        deltas=[delta],
        method="rome",
        requests=[request],
        hparams=hp.to_dict(),
        model_fingerprint=fingerprint(model),
        model_name=model_name(model),
        metadata=meta,
    )


def _templates(model, hp, given: Sequence[str] | None) -> list[str]:
    if given is not None:
        return check_templates([t for t in given if t != "{}"])
    return context_templates(model, hp.context_templates)
