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
from safetensors.torch import load_file

from editing.hparams import KeyValueHparams
from editing.statistics.keys import Stats, layer_stats, second_moment
from editing.statistics.stats import stats_dir
from editing.statistics.tensor_file import write_safetensors
from tracing.errors import InvalidHparams
from tracing.io import atomic_path
from tracing.models import HookedModel

log = logging.getLogger(__name__)


#: the working precisions of the eigendecomposition (``nullspace_dtype``)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _working_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise InvalidHparams(f"nullspace_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def null_space_projector(
    mom2: Float[torch.Tensor, "d d"],
    threshold: float,
    *,
    energy: float | None = None,
    dtype: str = "float64",
) -> Float[torch.Tensor, "d d"]:
    """``U_0 U_0^T`` over the eigenvectors of ``mom2`` that span its (near) null space, in
    ``dtype``. ``mom2`` is symmetric positive semi-definite, so its eigenvalues are its
    singular values (the paper's SVD).

    * ``energy=None`` (the paper): the eigenvalues below ``threshold`` (absolute, in the
      units of ``mom2``; AlphaEdit's code: 2e-2).
    * ``energy=e`` (factscope's option ``nullspace_energy``): the smallest eigenvalues whose
      sum is at most ``e * trace(mom2)``, i.e. the preserved keys keep at least ``1 - e`` of
      their energy outside the updated directions whatever the scale of the keys. An
      absolute threshold tuned on one model's keys can leave a large part of another's
      energy unprotected (Gemma-3-270M at 2e-2: 4-29 % per layer).

    ``dtype`` (factscope's option ``nullspace_dtype``): ``"float64"`` (default) or
    ``"float32"``, the precision AlphaEdit's code decomposes its float32 statistics in
    (``torch.linalg.svd`` of the float32 covariance). Memory, ``d = d_mlp``: the symmetric
    eigensolver holds its copy of the matrix (which becomes the eigenvectors) and LAPACK's
    divide-and-conquer workspace of about two more, ~3.2 d^2 in ``dtype`` (measured), plus a
    float64 copy of float32 statistics when ``dtype`` is float64: at d = 14,336, 2.6 GB in
    float32 and 6.8 GB in float64. The kept eigenvectors are a prefix of the ascending
    eigendecomposition, used as a view (no gathered copy); the projector is one more d^2
    once the workspace is gone.
    """
    work = _working_dtype(dtype)
    if energy is None:
        if not threshold > 0:
            raise InvalidHparams(f"nullspace_threshold must be > 0, got {threshold}")
    elif not 0 < energy < 1:
        raise InvalidHparams(f"nullspace_energy must be in (0, 1), got {energy}")
    values, vectors = torch.linalg.eigh(mom2.to(work))  # ascending; float32 input: not copied
    if energy is None:
        m = int((values < threshold).sum())
    else:
        share = values.clamp(min=0).cumsum(0) / values.clamp(min=0).sum()
        m = int((share <= energy).sum())
    kept = vectors[:, :m]  # ascending eigenvalues: the kept ones are the first m
    del values
    projector = kept @ kept.T
    del kept, vectors
    return projector


def projector_name(
    layer: int, threshold: float, energy: float | None, dtype: str = "float64"
) -> str:
    """The statistics-cache file name of a layer's projector under one null-space rule
    (and working precision, named when it is not the default float64)."""
    rule = f"energy-{energy:g}" if energy is not None else f"{threshold:g}"
    precision = "" if dtype == "float64" else f"-{dtype}"
    return f"layer_{layer}.nullspace-{rule}{precision}.safetensors"


def _as_float32(P: torch.Tensor) -> torch.Tensor:
    """``P`` in float32 (itself if it is), the float64 original released as soon as copied."""
    return P.contiguous() if P.dtype == torch.float32 else P.float()


def layer_projectors(
    model: HookedModel,
    layers: Sequence[int],
    hp: KeyValueHparams,
    threshold: float,
    *,
    energy: float | None = None,
    dtype: str = "float64",
    given: Stats | None = None,
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """``P`` for each of ``layers`` (float32) under the rule of :func:`null_space_projector`:
    from ``given`` statistics when passed (not stored), else from the statistics of ``hp``'s
    settings, read from or written to the statistics cache (:func:`projector_name`).
    ``dtype``: the eigendecomposition's precision (:func:`null_space_projector`)."""
    _working_dtype(dtype)
    if given is not None:
        return {
            L: _as_float32(
                null_space_projector(
                    second_moment(given, L),  # type: ignore[arg-type]
                    threshold,
                    energy=energy,
                    dtype=dtype,
                )
            )
            for L in layers
        }
    folder = stats_dir(model, n_tokens=hp.mom2_n_tokens, corpus=hp.corpus, dtype=hp.mom2_dtype)
    out: dict[int, torch.Tensor] = {}
    missing = []
    for L in layers:
        path = folder / projector_name(L, threshold, energy, dtype)
        if path.is_file():
            out[L] = load_file(str(path))["projector"]
        else:
            missing.append(L)
    if missing:
        moms = layer_stats(model, missing, hp, progress=progress)
        for L in missing:
            P = null_space_projector(moms[L], threshold, energy=energy, dtype=dtype)
            log.info("layer %d: null space of dimension %d", L, round(float(P.trace())))
            out[L] = _as_float32(P)
            del P
            with atomic_path(folder / projector_name(L, threshold, energy, dtype)) as tmp:
                write_safetensors(tmp, {"projector": out[L]})
    return out
