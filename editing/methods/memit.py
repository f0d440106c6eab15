"""MEMIT (Meng et al. 2023): many facts spread over a range of MLP down-projections.

1. Targets: for every request a hidden state ``z`` at the residual stream after the last edit
   layer (:func:`editing.targets.compute_targets` with ``hook="resid"``, all requests batched).
2. For each edit layer ``l`` in ascending order, with the updates of earlier layers already
   in the weights: the template-averaged keys ``K`` ([n, d_mlp]), the current residual ``h``
   at the last edit layer, ``R = (z - h) / (layers remaining)``, and the least-squares update

       delta W_l = (lambda C_l + K^T K)^-1 K^T T_l        (solved in float64, in place:
                                                           :func:`memit_solver`)

   where ``T_l`` is the change wanted in layer ``l``'s down-projection output. MEMIT as
   published takes ``T_l = R`` (a change of the down-projection output adds straight onto the
   residual stream). With ``rect_keep`` set (RECT, off by default), ``delta W_l`` is sparsified
   by :func:`editing.methods.stabilisers.rect_filter` before it is added (and kept, dense).

Norm-aware spreading (``norm_aware=True``, the default). Gemma puts an RMSNorm between the
down-projection and the residual add: the MLP's contribution is ``m = g * y / rms(y)`` for the
raw output ``y``, so its size is fixed and only its direction can change; treating ``R`` as a
change of ``y`` makes the update grow without bound (each layer falls short, the residual of
the next grows). Here the wanted contribution ``m* = m + R`` is mapped back through the norm
at the current operating point: ``y* = rms(y) * (m*/g) / rms(m*/g)`` (the pre-image with the
current scale; coordinates where the gain ``g`` is ~0 keep their current value), and
``T_l = y* - y``. For models without a post-MLP norm this is exactly the published form.

The model is changed while the layers are processed (each layer's keys are computed with the
earlier updates in place, as MEMIT does); :func:`editing.api.make_edit` restores it, so the
caller gets an :class:`~editing.edits.edit.Edit` and bit-identical weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import no_type_check

import torch
from jaxtyping import Float

from editing.edits.edit import Edit, LayerDelta
from editing.edits.weights import add_to_weight
from editing.hparams import KeyValueHparams, check_layers
from editing.methods.registry import EditInputs, EditMethod
from editing.methods.stabilisers import check_rect_keep, rect_filter
from editing.requests.prepared import PreparedRequest
from editing.statistics.keys import DEFAULT_BATCH_TOKENS, KeyWeighting, layer_stats, subject_keys
from editing.targets.cache import TargetCache
from editing.targets.objective import TargetResult, compute_targets
from editing.targets.optimise import check_edit_layer
from tracing.devices import module_device
from tracing.errors import EditFailed, InvalidHparams
from tracing.forward import capture_states, length_chunks, padded
from tracing.memory import batch_tokens
from tracing.models import (
    HookedModel,
    check_layer,
    down_proj,
    fingerprint,
    hook_name,
    model_name,
    post_mlp_norm,
)

log = logging.getLogger(__name__)


# Checked by its own __post_init__ (messages name the field), not by run-time type hooks.
@no_type_check
@dataclass
class MemitHparams(KeyValueHparams):
    """MEMIT: least-squares updates of the down-projections of ``layers`` (lambda =
    ``mom2_update_weight`` times the per-token second moment). ``norm_aware``: account for a
    norm between the down-projection and the residual add (Gemma) when spreading the residual.
    ``layers`` None (only in ``_default`` files): the caller must choose the layers.
    ``key_weighting``: ``"group_mean"`` averages each context-template group's keys first and
    then the groups (MEMIT's code: the bare prompt weighs 1/groups); ``"uniform"`` weighs every
    prompt the same (factscope's earlier form). ``rect_keep`` (off, None, by default): RECT
    (Gu et al. 2024), each layer's update keeps only this fraction of its entries, those of
    largest ``|Delta W| / |W|`` (the paper recommends 0.4; :mod:`editing.methods.stabilisers`)."""

    family = "memit"

    layers: list[int] | None = None  # type: ignore[assignment]
    mom2_update_weight: float = 15000.0
    norm_aware: bool = True
    key_weighting: KeyWeighting = "group_mean"
    rect_keep: float | None = None

    def to_dict(self) -> dict:
        """As :meth:`Hparams.to_dict`, without ``rect_keep`` while it is off (records and
        caches of configurations without RECT stay what they were)."""
        d = super().to_dict()
        if self.rect_keep is None:
            d.pop("rect_keep")
        return d

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers("layers", self.layers)
        check_rect_keep(self.rect_keep)
        if self.key_weighting not in ("group_mean", "uniform"):
            raise InvalidHparams(
                f"key_weighting must be 'group_mean' or 'uniform', got {self.key_weighting!r}"
            )


def norm_gain(norm, d_model: int) -> Float[torch.Tensor, " d_model"]:
    """The per-coordinate gain ``g`` of an RMSNorm (``N(y) = g * y / rms(y)``), read off the
    module itself: ``N(c * ones)`` for a large ``c`` (so the epsilon does not matter)."""
    with torch.no_grad():
        probe = torch.full((1, 1, d_model), 1e3, device=module_device(norm), dtype=torch.float32)
        return norm(probe.to(next(norm.parameters()).dtype)).reshape(-1).double()


def norm_aware_targets(
    y: Float[torch.Tensor, "n d_model"],
    m: Float[torch.Tensor, "n d_model"],
    resid: Float[torch.Tensor, "n d_model"],
    gain: Float[torch.Tensor, " d_model"],
) -> Float[torch.Tensor, "n d_model"]:
    """The change of the raw down-projection output that moves the normed MLP output ``m``
    (= ``gain * y / rms(y)``) by ``resid``, within what the norm can reach: the pre-image of
    ``m + resid`` rescaled to ``rms(y)``, minus ``y``. Coordinates whose gain is below 1e-3 of
    the largest keep their current value. Computed in float64."""
    y, m, resid, g = y.double(), m.double(), resid.double(), gain.double()
    ok = g.abs() > 1e-3 * g.abs().max()
    want = m + resid
    rms_y = y.pow(2).mean(-1, keepdim=True).sqrt()
    pre = torch.where(ok, want / torch.where(ok, g, 1.0), y / rms_y)
    pre = pre / pre.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
    return pre * rms_y - y


def _plain_states(
    model: HookedModel, prepared: Sequence[PreparedRequest], names: list[str], stop_after: str
) -> dict[str, torch.Tensor]:
    """States at the subject's last token of each bare edit prompt, by hook name."""
    items = [(p.plain.ids, p.plain.subject_last) for p in prepared]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    order: list[int] = []
    budget = batch_tokens(model, cpu_default=DEFAULT_BATCH_TOKENS)
    for chunk in length_chunks([len(ids) for ids, _ in items], budget):
        got = capture_states(model, padded([items[i][0] for i in chunk]), names, stop_after)
        for n in names:
            dev = got[n].device
            look = torch.tensor([items[i][1] for i in chunk], device=dev)
            rows[n].append(got[n][torch.arange(len(chunk), device=dev), look])
        order.extend(chunk)
    inverse = torch.argsort(torch.tensor(order))
    return {n: torch.cat(rows[n])[inverse.to(rows[n][0].device)] for n in names}


#: ``(layer, keys [n, d_mlp]) -> left [d_mlp, n]`` such that the layer's update is
#: ``left @ targets``; float64 in and out.
Solver = Callable[[int, torch.Tensor], torch.Tensor]


def memit_solver(hp: MemitHparams, moms: Mapping[int, torch.Tensor]) -> Solver:
    """MEMIT's least squares: ``left = (lambda C + K^T K)^-1 K^T``.

    The system is built in one column-major float64 ``[d_mlp, d_mlp]`` matrix (``C`` cast
    into it, scaled, ``K^T K`` accumulated into it by ``addmm_``) and LU-factored in place,
    so one such matrix lives at once (the formula as written holds four, and the solve a
    hidden copy for LAPACK's layout)."""

    def solve(layer: int, keys: torch.Tensor) -> torch.Tensor:
        d = keys.shape[1]
        A = torch.empty(d, d, dtype=torch.float64, device=keys.device).mT
        A.copy_(moms[layer])
        A.mul_(hp.mom2_update_weight)
        A.addmm_(keys.T, keys)
        return lu_solve_in_place(A, keys.T, f"layer {layer}: lambda C + K^T K")

    return solve


def lu_solve_in_place(
    A: Float[torch.Tensor, "d d"], B: Float[torch.Tensor, "d n"], what: str
) -> Float[torch.Tensor, "d n"]:
    """``A^-1 B``, LU-factoring ``A`` in its own memory (``A`` is overwritten; make it
    column-major, ``torch.empty(d, d).mT``, or LAPACK works on a copy). Raises
    ``torch.linalg.LinAlgError`` naming ``what`` when ``A`` is singular."""
    pivots = torch.empty(A.shape[0], dtype=torch.int32, device=A.device)
    info = torch.empty((), dtype=torch.int32, device=A.device)
    torch.linalg.lu_factor_ex(A, out=(A, pivots, info))
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"{what} is singular")
    return torch.linalg.lu_solve(A, pivots, B)


def layer_updates(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    hp: MemitHparams,
    z: Float[torch.Tensor, "n d_model"],
    solver: Solver,
) -> tuple[list[LayerDelta], list[dict], dict[int, torch.Tensor]]:
    """MEMIT's step 2 for targets ``z`` at the residual after the last of ``hp.layers``:
    each layer's update ``solver(layer, K) @ T`` in ascending order, added to the weights as
    it is made (the caller restores them); returns the deltas, per-layer diagnostics and the
    keys each layer was solved for (float32)."""
    layers = sorted(check_layer(model, int(L)) for L in hp.layers or [])
    last = layers[-1]
    z = z.double()
    deltas: list[LayerDelta] = []
    diag: list[dict] = []
    used: dict[int, torch.Tensor] = {}
    resid_name = hook_name(model, "resid", last)
    for i, L in enumerate(layers):
        keys = subject_keys(model, prepared, L, weighting=hp.key_weighting).double()
        norm = post_mlp_norm(model, L) if hp.norm_aware else None
        names = [resid_name]
        if norm is not None:
            names += [hook_name(model, "mlp_raw", L), hook_name(model, "mlp", L)]
        cur = _plain_states(model, prepared, names, resid_name)
        resid = (z.to(cur[resid_name].device) - cur[resid_name].double()) / (len(layers) - i)
        want = resid
        if norm is not None:
            gain = norm_gain(norm, resid.shape[-1])
            y, m = cur[names[1]].double(), cur[names[2]].double()
            check = gain * y / y.pow(2).mean(-1, keepdim=True).sqrt()
            # 1e-3 relative at float32; half precision rounds m itself (4 ulps of bfloat16).
            tol = max(1e-3, 4 * torch.finfo(cur[names[2]].dtype).eps)
            if (check - m).norm() > tol * m.norm():
                raise InvalidHparams(
                    f"layer {L}: the post-MLP norm is not an RMSNorm (m != g*y/rms(y)); "
                    "set norm_aware=False for this model"
                )
            want = norm_aware_targets(y, m, resid, gain)
        weight = down_proj(model, L)
        # The solve runs in float64 on the layer's own device, whatever the model's dtype.
        keys, want = keys.to(weight.device), want.to(weight.device)
        try:
            left = solver(L, keys)  # [d_mlp, n]
        except torch.linalg.LinAlgError as exc:
            raise EditFailed(
                f"layer {L}: the update's linear system is singular (raise the "
                "regularisation, e.g. mom2_update_weight, or use more tokens for the statistics)"
            ) from exc
        if not (torch.isfinite(left).all() and torch.isfinite(want).all()):
            raise EditFailed(f"MEMIT update for layer {L} is not finite")
        n = left.shape[1]
        if n < min(weight.shape):
            delta = LayerDelta(L, left=left.float(), right=want.float())
        else:
            delta = LayerDelta(L, dense=(left @ want).float())
        if hp.rect_keep is not None:  # RECT: a sparse update, stored dense
            delta = LayerDelta(L, dense=rect_filter(delta.matrix(), weight, hp.rect_keep))
        upd = delta.matrix()
        diag.append(
            {
                "layer": L,
                "resid_norm": float(resid.norm(dim=-1).mean()),
                "target_norm": float(want.norm(dim=-1).mean()),
                "update_norm": float(upd.norm()),
                "weight_norm": float(weight.norm()),
            }
        )
        log.info("MEMIT layer %d: %s", L, diag[-1])
        add_to_weight(weight, upd)
        deltas.append(delta)
        used[L] = keys.float()
    return deltas, diag, used


def batch_targets(
    model: HookedModel, prepared: Sequence[PreparedRequest], hp: MemitHparams, inputs: EditInputs
) -> TargetResult:
    """MEMIT's step 1: ``z`` for every request at the residual after the last edit layer
    (written to ``inputs.target_cache`` as each is final, when given)."""
    layer = max(int(L) for L in hp.layers or [])
    cache = None
    if inputs.target_cache is not None:
        cache = TargetCache(inputs.target_cache, model, layer, "resid", hp.target)
    return compute_targets(
        model,
        prepared,
        layer=layer,
        hook="resid",
        hp=hp.target,
        progress=inputs.progress,
        shard=inputs.shard_targets,
        cache=cache,
    )


def edit_memit(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    hp: MemitHparams,
    inputs: EditInputs,
) -> Edit:
    """A MEMIT edit of all ``prepared`` requests over ``hp.layers`` (see the module
    docstring). The weights change while the layers are processed; the caller restores
    them (:func:`editing.api.make_edit` does)."""
    if not hp.layers:
        raise InvalidHparams("MEMIT needs layers: set hp.layers (or pass layers=[...])")
    layers = sorted(check_layer(model, int(L)) for L in hp.layers)
    moms = layer_stats(model, layers, hp, given=inputs.stats, progress=inputs.progress)
    t0 = time.perf_counter()
    res = batch_targets(model, prepared, hp, inputs)
    t1 = time.perf_counter()
    deltas, diag, keys = layer_updates(model, prepared, hp, res.targets, memit_solver(hp, moms))
    meta = {
        "layers": diag,
        "nll_before": res.nll_before,
        "nll_after": res.nll_after,
        "steps": res.steps,
        "z_delta_norm": [float(x) for x in res.delta.norm(dim=-1)],
        "n_templates": len(prepared[0].prompts),
        "seconds_targets": round(t1 - t0, 3),
        "seconds_layers": round(time.perf_counter() - t1, 3),
    }
    return Edit(
        keys=keys,
        deltas=deltas,
        method="memit",
        requests=[p.request for p in prepared],
        hparams=hp.to_dict(),
        model_fingerprint=fingerprint(model),
        model_name=model_name(model),
        metadata=meta,
    )


def check_memit(model: HookedModel, hp: MemitHparams) -> None:
    """z is optimised after the last edit layer: it needs a path to the loss."""
    if hp.layers:
        check_edit_layer(model, max(hp.layers), hp.target.loss_layer)


METHOD = EditMethod(
    name="memit",
    hparams=MemitHparams,
    edit=edit_memit,
    batched=True,
    uses_templates=True,
    summary="least-squares updates spread over a range of MLP layers, many facts at once",
    check=check_memit,
)
