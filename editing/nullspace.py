"""The null space of the keys a layer must keep mapping as it does (AlphaEdit).

AlphaEdit (Fang et al. 2025) protects what a layer already knows by updating it only along
directions its typical inputs do not use. With ``C = E[k k^T]`` the second moment of the
down-projection's inputs over a corpus (the statistics MEMIT uses,
:mod:`editing.stats`), the eigenvectors of ``C`` whose eigenvalues fall below a threshold
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
from editing.keys import Stats, layer_stats, second_moment
from editing.stats import stats_dir
from tracing.errors import InvalidHparams
from tracing.io import atomic_path
from tracing.models import HookedModel

log = logging.getLogger(__name__)


def null_space_projector(
    mom2: Float[torch.Tensor, "d d"], threshold: float
) -> Float[torch.Tensor, "d d"]:
    """``U_0 U_0^T`` over the eigenvectors of ``mom2`` whose eigenvalues are below
    ``threshold`` (absolute, in the units of ``mom2``; AlphaEdit's code: 2e-2), float64.
    ``mom2`` is symmetric positive semi-definite, so its eigenvalues are its singular values
    (the paper's SVD)."""
    if not threshold > 0:
        raise InvalidHparams(f"nullspace_threshold must be > 0, got {threshold}")
    values, vectors = torch.linalg.eigh(mom2.double())
    kept = vectors[:, values < threshold]
    return kept @ kept.T


def layer_projectors(
    model: HookedModel,
    layers: Sequence[int],
    hp: KeyValueHparams,
    threshold: float,
    *,
    given: Stats | None = None,
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """``P`` for each of ``layers`` (float32): from ``given`` statistics when passed (not
    stored), else from the statistics of ``hp``'s settings, read from or written to the
    statistics cache (``layer_<L>.nullspace-<threshold>.safetensors``)."""
    if given is not None:
        return {
            L: null_space_projector(second_moment(given, L), threshold).float()  # type: ignore[arg-type]
            for L in layers
        }
    folder = stats_dir(model, n_tokens=hp.mom2_n_tokens, corpus=hp.corpus, dtype=hp.mom2_dtype)
    out: dict[int, torch.Tensor] = {}
    missing = []
    for L in layers:
        path = folder / f"layer_{L}.nullspace-{threshold:g}.safetensors"
        if path.is_file():
            out[L] = load_file(str(path))["projector"]
        else:
            missing.append(L)
    if missing:
        moms = layer_stats(model, missing, hp, progress=progress)
        for L in missing:
            P = null_space_projector(moms[L], threshold)
            log.info("layer %d: null space of dimension %d", L, round(float(P.trace())))
            out[L] = P.float().contiguous()
            with atomic_path(folder / f"layer_{L}.nullspace-{threshold:g}.safetensors") as tmp:
                save_file({"projector": out[L].cpu()}, str(tmp))
    return out
