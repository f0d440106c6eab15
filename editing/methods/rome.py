"""ROME (Meng et al. 2022): one fact as a rank-one update of one MLP down-projection.

Orientation (as everywhere in factscope): ``W = down_proj(model, L)`` is ``[d_mlp, d_model]``
and the raw down-projection output is ``k @ W (+ b)``. With ``C = E[k k^T]`` over a corpus
(:func:`editing.statistics.keys.layer_stats`), the key ``k*`` (mean over context templates of
the key at the subject's last token, :func:`editing.statistics.keys.subject_keys`) and the
value ``v*`` (:func:`editing.targets.compute_targets` at the raw down-projection output),

    u = C^-1 k*,   delta W = u (v* - k* W - b)^T / (u^T k*)

so that ``k* (W + delta W) + b = v*`` exactly. That is the consistent-key form of r-ROME
(Gupta et al. 2024, the default): the same averaged ``k*`` in ``u`` and in the residual. The
original ROME (``consistent_key=False``) takes the residual at the un-templated prompt's key
``k``: ``delta W = u (v* - k W - b)^T / (u^T k)``, so ``k (W + delta W) + b = v*``.
The closed form does not depend on the scale of ``C``, so ROME's ``mom2_update_weight`` is
not used.

Several requests are edited in sequence (as sequential ROME does): each is computed on the
model with the earlier ones applied, and one combined :class:`~editing.edits.edit.Edit` is returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import no_type_check

import torch
from jaxtyping import Float

from editing.edits.edit import Edit, LayerDelta
from editing.edits.weights import add_to_weight
from editing.hparams import KeyValueHparams, check_layers
from editing.methods.registry import EditInputs, EditMethod
from editing.requests.prepared import PreparedRequest
from editing.statistics.keys import layer_stats, subject_keys
from editing.targets.objective import compute_targets
from editing.targets.optimise import check_edit_layer
from tracing.errors import EditFailed, InvalidHparams
from tracing.models import (
    HookedModel,
    check_layer,
    down_proj,
    down_proj_bias,
    fingerprint,
    model_name,
)

log = logging.getLogger(__name__)


# Checked by its own __post_init__ (messages name the field), not by run-time type hooks.
@no_type_check
@dataclass
class RomeHparams(KeyValueHparams):
    """ROME: one rank-one update of the down-projection of ``layer``.

    ``mom2_update_weight`` (lambda) is kept for methods that add lambda*C to a least-squares
    system; ROME's own closed form does not depend on the scale of C, so it is unused here.
    ``consistent_key``: r-ROME's fix, the same template-averaged key in the update and in v*.
    ``layer`` None (only in ``_default`` files): the caller must choose the layer.
    ``mom2_adjustment``: ROME's own switch (its compute_u); off, ``C = I`` (``u = k*``) and
    no statistics are collected, as the published Llama-3, Qwen2.5 and Mistral files set it.
    """

    family = "rome"

    layer: int | None = None
    consistent_key: bool = True
    mom2_adjustment: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None:
            checked = check_layers("layer", self.layer)
            assert checked is not None
            if len(checked) != 1:
                raise InvalidHparams(f"ROME edits one layer; got {self.layer!r}")
            self.layer = checked[0]


ROW_BLOCK = 2048
"""Rows of the down-projection read per float64 product in :func:`rank_one_update`."""


class MomentSolver:
    """``C`` factored once (LU with partial pivoting, float64, on ``device``), so that each
    edit's ``C^-1 k`` costs a triangular solve instead of a factorisation (the same
    factorisation :func:`torch.linalg.solve` makes each time: the same numbers). Sequential
    ROME (:func:`edit_rome` over many requests) factors once for all of them."""

    def __init__(
        self, mom2: Float[torch.Tensor, "d_mlp d_mlp"] | None, device: torch.device
    ) -> None:
        # float64 whatever the model's dtype: C is ill-conditioned. ``None`` is ``C = I``
        # (ROME's mom2_adjustment off): nothing is built or factored.
        self.lu: torch.Tensor | None = None
        self.singular = False
        if mom2 is None:
            return
        # C is cast into one column-major matrix and factored in its own memory (LAPACK's
        # layout), so one d_mlp^2 float64 matrix lives, not a cast copy and a factor.
        d = mom2.shape[0]
        lu = torch.empty(d, d, dtype=torch.float64, device=device).mT
        lu.copy_(mom2)
        self.pivots = torch.empty(d, dtype=torch.int32, device=device)
        info = torch.empty((), dtype=torch.int32, device=device)
        torch.linalg.lu_factor_ex(lu, out=(lu, self.pivots, info))
        self.lu, self.singular = lu, bool(info.item() != 0)

    def solve(self, key: Float[torch.Tensor, " d_mlp"]) -> Float[torch.Tensor, " d_mlp"]:
        """``C^-1 key`` in float64; :class:`~tracing.errors.EditFailed` when ``C`` is
        singular."""
        if self.singular:
            raise EditFailed(
                "the second-moment matrix is singular: use more tokens for the statistics"
            )
        if self.lu is None:
            return key.to(torch.float64)
        k = key.to(self.lu.device, torch.float64)[:, None]
        return torch.linalg.lu_solve(self.lu, self.pivots, k)[:, 0]


def rank_one_update(
    weight: Float[torch.Tensor, "d_mlp d_model"],
    mom2: Float[torch.Tensor, "d_mlp d_mlp"] | MomentSolver,
    key_u: Float[torch.Tensor, " d_mlp"],
    value: Float[torch.Tensor, " d_model"],
    *,
    key_res: Float[torch.Tensor, " d_mlp"] | None = None,
    bias: Float[torch.Tensor, " d_model"] | None = None,
) -> tuple[Float[torch.Tensor, " d_mlp"], Float[torch.Tensor, " d_model"]]:
    """ROME's closed form, computed in float64: ``(left, right)`` with
    ``delta W = outer(left, right)``, ``left = C^-1 k_u / (k_res . C^-1 k_u)`` and
    ``right = v - k_res W - b``, so that ``k_res (W + delta W) + b = v``.

    ``mom2``: ``C``, or a :class:`MomentSolver` of it (factored once for many edits).
    ``key_res`` defaults to ``key_u`` (the consistent-key form). Raises
    :class:`~tracing.errors.EditFailed` when ``C`` is singular in the key's direction or the
    result is not finite.
    """
    k_res = key_u if key_res is None else key_res
    dev = weight.device
    solver = mom2 if isinstance(mom2, MomentSolver) else MomentSolver(mom2, dev)
    key_u, k_res, value = key_u.to(dev), k_res.to(dev), value.to(dev)
    u = solver.solve(key_u).to(dev)
    denom = torch.dot(u, k_res.double())
    # k_res W in float64, a block of rows at a time (no float64 copy of the whole weight)
    current = torch.zeros(weight.shape[1], dtype=torch.float64, device=dev)
    for i in range(0, weight.shape[0], ROW_BLOCK):
        current += k_res[i : i + ROW_BLOCK].double() @ weight[i : i + ROW_BLOCK].double()
    if bias is not None:
        current = current + bias.double()
    right = value.double() - current
    if not torch.isfinite(u).all() or not torch.isfinite(denom) or denom.abs() < 1e-30:
        raise EditFailed("the second-moment matrix is singular for this key: use more tokens")
    left = u / denom
    if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
        raise EditFailed("ROME update is not finite")
    return left, right


def rome_edit(
    model: HookedModel,
    prepared: PreparedRequest,
    hp: RomeHparams,
    mom2: Float[torch.Tensor, "d_mlp d_mlp"] | MomentSolver,
    *,
    progress: bool = False,
) -> Edit:
    """A ROME edit of one prepared request at ``hp.layer`` with statistics ``mom2`` (or its
    :class:`MomentSolver`), computed on the model's current weights (which are not
    changed)."""
    if hp.layer is None:
        raise InvalidHparams("ROME needs a layer: set hp.layer (or pass layers=[L])")
    layer = check_layer(model, hp.layer)
    t0 = time.perf_counter()
    k_star = subject_keys(model, [prepared], layer)[0]
    k_res = (
        k_star if hp.consistent_key else subject_keys(model, [prepared], layer, templated=False)[0]
    )
    res = compute_targets(
        model, [prepared], layer=layer, hook="mlp_raw", hp=hp.target, progress=progress
    )
    v_star = res.targets[0]
    weight = down_proj(model, layer).detach()
    left, right = rank_one_update(
        weight, mom2, k_star, v_star, key_res=k_res, bias=down_proj_bias(model, layer)
    )
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
        "n_templates": len(prepared.prompts),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("ROME layer %d: target NLL %.3f -> %.3f", layer, meta["nll_before"], meta["nll_after"])
    return Edit(
        deltas=[LayerDelta(layer, left=left.float(), right=right.float())],
        method="rome",
        requests=[prepared.request],
        hparams=hp.to_dict(),
        model_fingerprint=fingerprint(model),
        model_name=model_name(model),
        metadata=meta,
    )


def edit_rome(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    hp: RomeHparams,
    inputs: EditInputs,
) -> Edit:
    """ROME over a list of requests, one after another (sequential ROME): each edit is
    computed with the earlier ones applied to the weights. One request gives its own Edit;
    several give one combined Edit. The caller restores the weights."""
    if hp.layer is None:
        raise InvalidHparams("ROME needs a layer: set hp.layer (or pass layers=[L])")
    if hp.mom2_adjustment:
        mom2 = layer_stats(model, [hp.layer], hp, given=inputs.stats, progress=inputs.progress)
        moment: torch.Tensor | None = mom2[hp.layer]
    else:  # ROME's mom2_adjustment off: C = I
        moment = None
    solver = MomentSolver(moment, down_proj(model, hp.layer).device)  # one for all
    edits = []
    for i, p in enumerate(prepared):
        if len(prepared) > 1:
            log.info("ROME request %d/%d: %s", i + 1, len(prepared), p.request.describe(i))
        edit = rome_edit(model, p, hp, solver, progress=inputs.progress)
        edits.append(edit)
        if i + 1 < len(prepared):  # later requests see the earlier edits
            for d in edit.deltas:
                add_to_weight(down_proj(model, d.layer), d.matrix())
    return edits[0] if len(edits) == 1 else Edit.combine(edits, "rome")


def check_rome(model: HookedModel, hp: RomeHparams) -> None:
    """v* is optimised at ``hp.layer``: it needs a path to the loss."""
    if hp.layer is not None:
        check_edit_layer(model, hp.layer, hp.target.loss_layer)


METHOD = EditMethod(
    name="rome",
    hparams=RomeHparams,
    edit=edit_rome,
    batched=False,
    uses_templates=True,
    summary="rank-one update of one MLP down-projection (r-ROME's consistent key by default)",
    check=check_rome,
)
