"""The null space of the keys a layer must keep mapping as it does (AlphaEdit).

AlphaEdit (Fang et al. 2025) protects what a layer already knows by updating it only along
directions its typical inputs do not use. With ``C = E[k k^T]`` the second moment of the
down-projection's inputs over a corpus (the statistics MEMIT uses,
:mod:`editing.statistics.stats`), the eigenvectors of ``C`` whose eigenvalues fall below a threshold
span the directions the preserved keys (almost) never take; ``P = U_0 U_0^T`` projects onto
them, and an update ``Delta P`` leaves ``k Delta P ~ 0`` for every preserved key ``k``.

``P`` depends only on the statistics and the threshold, so it is computed once per layer
(eigendecomposition in float64) and stored beside the statistics it came from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file

from editing.hparams import KeyValueHparams
from editing.statistics.keys import Stats, layer_stats, second_moment
from editing.statistics.stats import stats_dir
from tracing.errors import InvalidHparams
from tracing.io import atomic_path
from tracing.models import HookedModel

log = logging.getLogger(__name__)


def null_space_projector(
    mom2: Float[torch.Tensor, "d d"], threshold: float, *, energy: float | None = None
) -> Float[torch.Tensor, "d d"]:
    """``U_0 U_0^T`` over the eigenvectors of ``mom2`` that span its (near) null space,
    float64. ``mom2`` is symmetric positive semi-definite, so its eigenvalues are its
    singular values (the paper's SVD).

    * ``energy=None`` (the paper): the eigenvalues below ``threshold`` (absolute, in the
      units of ``mom2``; AlphaEdit's code: 2e-2).
    * ``energy=e`` (factscope's option ``nullspace_energy``): the smallest eigenvalues whose
      sum is at most ``e * trace(mom2)``, i.e. the preserved keys keep at least ``1 - e`` of
      their energy outside the updated directions whatever the scale of the keys. An
      absolute threshold tuned on one model's keys can leave a large part of another's
      energy unprotected (Gemma-3-270M at 2e-2: 4-29 % per layer)."""
    values, vectors = torch.linalg.eigh(mom2.double())  # ascending
    if energy is None:
        if not threshold > 0:
            raise InvalidHparams(f"nullspace_threshold must be > 0, got {threshold}")
        kept = vectors[:, values < threshold]
    else:
        if not 0 < energy < 1:
            raise InvalidHparams(f"nullspace_energy must be in (0, 1), got {energy}")
        share = values.clamp(min=0).cumsum(0) / values.clamp(min=0).sum()
        kept = vectors[:, share <= energy]
    return kept @ kept.T


def projector_name(layer: int, threshold: float, energy: float | None) -> str:
    """The statistics-cache file name of a layer's projector under one null-space rule."""
    rule = f"energy-{energy:g}" if energy is not None else f"{threshold:g}"
    return f"layer_{layer}.nullspace-{rule}.safetensors"


def layer_projectors(
    model: HookedModel,
    layers: Sequence[int],
    hp: KeyValueHparams,
    threshold: float,
    *,
    energy: float | None = None,
    given: Stats | None = None,
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """``P`` for each of ``layers`` (float32) under the rule of :func:`null_space_projector`:
    from ``given`` statistics when passed (not stored), else from the statistics of ``hp``'s
    settings, read from or written to the statistics cache (:func:`projector_name`)."""
    if given is not None:
        return {
            L: null_space_projector(second_moment(given, L), threshold, energy=energy).float()  # type: ignore[arg-type]
            for L in layers
        }
    folder = stats_dir(model, n_tokens=hp.mom2_n_tokens, corpus=hp.corpus, dtype=hp.mom2_dtype)
    out: dict[int, torch.Tensor] = {}
    missing = []
    for L in layers:
        path = folder / projector_name(L, threshold, energy)
        if path.is_file():
            out[L] = load_file(str(path))["projector"]
        else:
            missing.append(L)
    if missing:
        moms = layer_stats(model, missing, hp, progress=progress)
        for L in missing:
            P = null_space_projector(moms[L], threshold, energy=energy)
            log.info("layer %d: null space of dimension %d", L, round(float(P.trace())))
            out[L] = P.float().contiguous()
            with atomic_path(folder / projector_name(L, threshold, energy)) as tmp:
                save_file({"projector": out[L].cpu()}, str(tmp))
    return out
