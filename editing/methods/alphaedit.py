"""AlphaEdit (Fang et al. 2025): MEMIT's updates projected onto the null space of what the
layer must preserve, so that a batch edited after others disturbs neither the model's
knowledge nor the earlier edits.

The targets ``z`` and each layer's keys ``K`` and wanted changes ``T`` are MEMIT's
(:mod:`editing.methods.memit`, norm-aware spreading included). Only the solve differs: with
``P`` the projector onto the null space of the preserved keys' second moment
(:mod:`editing.statistics.nullspace`) and ``K_p^T K_p`` the keys of the edits already made in a
sequence (``EditInputs.preserved_keys``; zero for the first batch), the update of layer ``l``
(in factscope's ``[d_mlp, d_model]`` orientation, keys as rows) is

    Delta_l = (P (K^T K + K_p^T K_p) + alpha I)^-1 P K^T T_l          (float64)

which is the paper's ``Delta P`` (its Eq. 14, written for the update itself: every column
of the solution lies in the range of ``P``, so ``k0 Delta ~ 0`` for preserved keys ``k0``).
``alpha`` is ``l2_weight`` (the code's ``L2``). MEMIT's ``lambda C`` term is not used: the
projection takes its place (``mom2_update_weight`` is ignored, as in AlphaEdit's code).

At real widths (``d_mlp`` 14,336-16,384) that ``[d_mlp, d_mlp]`` system is never formed
(:func:`alphaedit_solver`): exact identities reduce it to an ``[n, n]`` one, with one
``[d_mlp, d_mlp]`` float64 matrix for the earlier edits' term and none without them, and
``P`` is applied a block of rows at a time. ``P`` stays float32, as cached: against a
float64 ``P`` (tiny Llama, layer 1, ``d_mlp`` 128) the update differs by 3e-8 relative and
leaks 2e-8 of its norm outside the null space, below float32 weights' own rounding.

RECT (``rect_keep``, MEMIT's option, off by default) applies as in MEMIT: each layer's
projected update is sparsified by :func:`editing.methods.stabilisers.rect_filter` before it
is added (the sparse update is no longer exactly inside the null space).

Knowledge-aware preservation (``knowledge_share``, off by default): ``P`` is instead the
null-space projector of ``C_mix = (1 - s) C_wiki + s C_known``, ``C_known`` the mean outer
product of the subject keys of facts the model knows, none about a subject being edited
(:mod:`editing.statistics.known_keys`); ``Edit.metadata["knowledge_preservation"]`` then says
how many facts were used (None when the projectors came from the cache) and how many
subjects were left out.

The returned :class:`~editing.edits.edit.Edit` carries the keys each layer was solved for, so the
caller of a sequence adds their ``K^T K`` to what the next batch must preserve (the
sequential runner, :mod:`editing.evaluation.sequential`, does).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import no_type_check

import torch
from jaxtyping import Float

from editing.edits.edit import Edit
from editing.hparams import check_number
from editing.methods.memit import (
    MemitHparams,
    Solver,
    batch_targets,
    check_memit,
    layer_updates,
    lu_solve_in_place,
)
from editing.methods.registry import EditInputs, EditMethod
from editing.requests.prepared import PreparedRequest
from editing.statistics.known_keys import check_knowledge_share, knowledge_projectors
from editing.statistics.nullspace import DTYPES as NULLSPACE_DTYPES
from editing.statistics.nullspace import layer_projectors
from tracing.errors import InvalidHparams, InvalidInput
from tracing.models import HookedModel, check_layer, fingerprint, model_name


@no_type_check
@dataclass
class AlphaEditHparams(MemitHparams):
    """MEMIT's hyper-parameters plus ``nullspace_threshold`` (eigenvalues of ``C`` below it
    span the protected null space; absolute, in the units of the statistics),
    ``nullspace_energy`` (factscope's option, default None = the paper's rule: when set, the
    null space is instead the smallest eigen-directions holding at most this fraction of
    ``trace(C)``, see :func:`editing.statistics.nullspace.null_space_projector`),
    ``nullspace_dtype`` (factscope's option: ``"float64"``, the default, or ``"float32"``, the
    precision of AlphaEdit's own code, which decomposes in about half the memory: 2.6 GB
    instead of 6.8 GB at d_mlp 14,336) and ``l2_weight`` (``alpha``, the ridge term of the
    solve; the paper's code: ``L2``).

    Knowledge-aware preservation (factscope's option, off by default): ``knowledge_share``
    ``s`` (None: off, the paper's WikiText-only preserved set exactly; else ``0 < s < 1``)
    takes the null space of

        C_mix = (1 - s) C_wiki + s C_known,   C_known = (1/N) sum_i k_i k_i^T

    instead of ``C_wiki``'s (same threshold or energy rule), where ``k_i`` are the subject
    keys (subject's last token, averaged over the edit's context templates) of the first
    ``N = knowledge_facts`` facts of known_1000 the model answers at top-1, leaving out any
    whose subject (case-insensitive, stripped) is one being edited
    (:mod:`editing.statistics.known_keys`). Both terms are second moments on the same
    scale. Both fields are absent from :meth:`to_dict` while ``knowledge_share`` is None."""

    family = "alphaedit"

    nullspace_threshold: float = 2e-2
    nullspace_energy: float | None = None
    nullspace_dtype: str = "float64"
    l2_weight: float = 10.0
    knowledge_share: float | None = None
    knowledge_facts: int = 500

    def to_dict(self) -> dict:
        """As :meth:`MemitHparams.to_dict`, without ``knowledge_share`` and
        ``knowledge_facts`` while the option is off (records and caches of configurations
        without it stay what they were)."""
        d = super().to_dict()
        if self.knowledge_share is None:
            d.pop("knowledge_share")
            d.pop("knowledge_facts")
        return d

    def __post_init__(self) -> None:
        super().__post_init__()
        check_knowledge_share(self.knowledge_share, self.knowledge_facts)
        check_number("nullspace_threshold", self.nullspace_threshold)
        if self.nullspace_energy is not None:
            check_number("nullspace_energy", self.nullspace_energy)
            if not self.nullspace_energy < 1:
                raise InvalidHparams(
                    f"nullspace_energy must be below 1, got {self.nullspace_energy}"
                )
        check_number("l2_weight", self.l2_weight, allow_zero=True)
        if self.nullspace_dtype not in NULLSPACE_DTYPES:
            raise InvalidHparams(
                f"nullspace_dtype must be one of {sorted(NULLSPACE_DTYPES)}, "
                f"got {self.nullspace_dtype!r}"
            )


#: Elements of a float32 projector cast to float64 at a time (2**24: 128 MiB of float64).
CAST_BLOCK = 2**24


def _rows(d: int) -> int:
    """Rows of a ``[d, d]`` matrix taken at a time when one is cast to float64."""
    return max(1, CAST_BLOCK // max(1, d))


def project(
    P: Float[torch.Tensor, "d d"], X: Float[torch.Tensor, "d n"]
) -> Float[torch.Tensor, "d n"]:
    """``P @ X`` in float64 for a projector kept in float32 (or float64): ``P`` is cast a
    block of rows at a time, so no float64 ``[d, d]`` copy of it is made."""
    out = torch.empty(P.shape[0], X.shape[1], dtype=torch.float64, device=X.device)
    step = _rows(P.shape[1])
    for i in range(0, P.shape[0], step):
        out[i : i + step] = P[i : i + step].to(X.device, torch.float64) @ X
    return out


def alphaedit_solver(
    hp: AlphaEditHparams,
    projectors: Mapping[int, torch.Tensor],
    preserved: Mapping[int, torch.Tensor] | None,
) -> Solver:
    """``left = (P (K^T K + K_p^T K_p) + alpha I)^-1 P K^T`` (so the update is
    ``left @ T``), computed without forming that ``[d_mlp, d_mlp]`` system (float64, on the
    keys' device):

    * no earlier edits: the push-through identity ``(P K^T K + a I)^-1 P K^T =
      P K^T (K P K^T + a I)^-1`` leaves an ``[n, n]`` system; nothing of size ``d_mlp^2``
      beyond the projector is made;
    * with ``M = K_p^T K_p``: ``A = P M + a I`` is the one ``[d_mlp, d_mlp]`` float64 matrix
      (filled a block of rows at a time, LU-factored in place), and Woodbury's form
      ``(A + P K^T K)^-1 P K^T = Y (I + K Y)^-1`` with ``Y = A^-1 P K^T`` leaves an
      ``[n, n]`` system.

    Both are exact identities (for any ``P``), so the result is that of the formula to
    float64 rounding. ``alpha = 0`` without earlier edits gives the limit ``alpha -> 0``
    (the least-norm exact solution inside the null space) where the formula is singular."""

    def solve(layer: int, keys: torch.Tensor) -> torch.Tensor:
        P = projectors[layer]
        dev = keys.device
        pk = project(P, keys.T)  # [d, n]: P K^T
        d = keys.shape[1]
        M = None if preserved is None else preserved.get(layer)
        if M is None:
            inner = keys @ pk  # K P K^T
            inner.diagonal().add_(hp.l2_weight)
            return torch.linalg.solve(inner.T, pk.T).T
        M = M.to(dev, torch.float64)
        A = torch.empty(d, d, dtype=torch.float64, device=dev).mT  # column-major: LU in place
        step = _rows(d)
        for i in range(0, d, step):
            A[i : i + step] = P[i : i + step].to(dev, torch.float64) @ M
        A.diagonal().add_(hp.l2_weight)
        Y = lu_solve_in_place(A, pk, f"layer {layer}: P (K_p^T K_p) + alpha I")  # A^-1 P K^T
        del A
        small = keys @ Y
        small.diagonal().add_(1.0)
        return torch.linalg.solve(small.T, Y.T).T

    return solve


def edit_alphaedit(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    hp: AlphaEditHparams,
    inputs: EditInputs,
) -> Edit:
    """An AlphaEdit batch of all ``prepared`` requests over ``hp.layers`` (see the module
    docstring); the weights change while the layers are processed and the caller restores
    them (:func:`editing.api.make_edit` does)."""
    if not hp.layers:
        raise InvalidHparams("AlphaEdit needs layers: set hp.layers (or pass layers=[...])")
    layers = sorted(check_layer(model, int(L)) for L in hp.layers)
    preserved = inputs.preserved_keys
    for L, m in (preserved or {}).items():
        d_mlp = tuple(m.shape)
        if len(d_mlp) != 2 or d_mlp[0] != d_mlp[1] or not torch.isfinite(m).all():
            raise InvalidInput(f"preserved_keys[{L}] must be a finite square matrix")
    knowledge: dict | None = None
    if hp.knowledge_share is None:
        projectors = layer_projectors(
            model,
            layers,
            hp,
            hp.nullspace_threshold,
            energy=hp.nullspace_energy,
            dtype=hp.nullspace_dtype,
            given=inputs.stats,
            progress=inputs.progress,
        )
    else:
        found = knowledge_projectors(
            model,
            layers,
            hp,
            prepared,
            share=hp.knowledge_share,
            n_facts=hp.knowledge_facts,
            threshold=hp.nullspace_threshold,
            energy=hp.nullspace_energy,
            dtype=hp.nullspace_dtype,
            weighting=hp.key_weighting,
            given=inputs.stats,
            also_exclude=inputs.exclude_subjects,
            progress=inputs.progress,
        )
        projectors = found.projectors
        knowledge = {
            "share": hp.knowledge_share,
            "facts": None if found.facts is None else len(found.facts),
            "excluded_subjects": len(found.excluded),
            "cached": found.facts is None,
        }
    t0 = time.perf_counter()
    res = batch_targets(model, prepared, hp, inputs)
    t1 = time.perf_counter()
    solver = alphaedit_solver(hp, projectors, preserved)
    deltas, diag, keys = layer_updates(model, prepared, hp, res.targets, solver)
    meta = {
        "layers": diag,
        "null_space_dims": {str(L): round(float(projectors[L].trace())) for L in layers},
        "preserved_edits": bool(preserved),
        "nll_before": res.nll_before,
        "nll_after": res.nll_after,
        "steps": res.steps,
        "seconds_targets": round(t1 - t0, 3),
        "seconds_layers": round(time.perf_counter() - t1, 3),
    }
    if knowledge is not None:
        meta["knowledge_preservation"] = knowledge
    return Edit(
        deltas=deltas,
        method="alphaedit",
        requests=[p.request for p in prepared],
        hparams=hp.to_dict(),
        model_fingerprint=fingerprint(model),
        model_name=model_name(model),
        metadata=meta,
        keys=keys,
    )


METHOD = EditMethod(
    name="alphaedit",
    hparams=AlphaEditHparams,
    edit=edit_alphaedit,
    batched=True,
    uses_templates=True,
    summary="MEMIT's updates projected onto the null space of preserved and earlier-edit keys",
    check=check_memit,
    protects_edits=True,
)
