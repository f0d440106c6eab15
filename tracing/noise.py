"""Corruption noise for causal tracing: the embedding scale sigma and seeded noise draws.

Following Meng et al. (2022) and their code, sigma is the standard deviation of the subject
tokens' embeddings over known facts, measured where the noise is added (the embedding output;
for Gemma that already includes the sqrt(d_model) scaling). Each subject is tokenised on its
own with the model's BOS rule and every row (BOS included, as in the reference code) counts.
The default corruption is ``3s``: Gaussian noise of standard deviation 3 sigma.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from tracing.errors import InvalidInput
from tracing.facts import load_known_facts
from tracing.io import write_json_atomic
from tracing.loading import cache_dir
from tracing.models import (
    HookedModel,
    fingerprint,
    hook_name,
    model_device,
    tokenize,
)

DEFAULT_NOISE = "3s"
SIGMA_FACTS = 100  # subjects of the first 100 known facts, as in the reference run


def subject_embedding_std(model: HookedModel, subjects: list[str]) -> float:
    """Unbiased std over all (token, dimension) entries of the embedding output of each
    subject tokenised alone (with the model's BOS rule)."""
    if not subjects:
        raise InvalidInput("need at least one subject to measure sigma")
    name = hook_name(model, "embed")
    rows = []
    with torch.no_grad():
        for s in subjects:
            ids = torch.tensor([tokenize(model, s)], device=model_device(model))
            _, cache = model.run_with_cache(ids, names_filter=name, use_cache=False)
            rows.append(cache[name][0].double())
    return float(torch.cat(rows).std())


def embedding_sigma(
    model: HookedModel, n_facts: int = SIGMA_FACTS, *, use_cache: bool = True
) -> float:
    """Sigma of subject embeddings over the first ``n_facts`` known_1000 subjects, cached on
    disk per model fingerprint (``$FACTSCOPE_CACHE/sigma``)."""
    path = cache_dir() / "sigma" / f"{fingerprint(model)}_{n_facts}.json"
    if use_cache and path.is_file():
        return float(json.loads(path.read_text())["sigma"])
    subjects = [f.subject for f in load_known_facts()[:n_facts]]
    sigma = subject_embedding_std(model, subjects)
    if use_cache:
        write_json_atomic(path, {"sigma": sigma, "n_facts": n_facts})
    return sigma


@dataclass(frozen=True)
class NoiseSpec:
    """A resolved noise setting: the std actually added and how it was specified."""

    level: float  # multiplier of the unit draws (std for Gaussian; half-width for uniform)
    spec: str
    sigma: float | None
    uniform: bool


_MULTIPLE = re.compile(r"^(?:s(?P<a>[0-9.]+)|(?P<b>[0-9.]+)s)$")


def resolve_noise(
    model: HookedModel, noise: str | float = DEFAULT_NOISE, uniform: bool = False
) -> NoiseSpec:
    """Turn a noise setting into a level: ``"3s"`` or ``"s3"`` (3 sigma, ROME's s3), a plain
    number (that standard deviation), optionally ``uniform`` (draws from U(-1, 1) times level,
    ROME's uniform option)."""
    if isinstance(noise, bool):
        raise InvalidInput(f"invalid noise {noise!r}")
    if isinstance(noise, int | float):
        level = float(noise)
        spec, sigma = repr(level), None
    else:
        text = str(noise).strip().lower()
        m = _MULTIPLE.match(text)
        if m:
            sigma = embedding_sigma(model)
            level = float(m.group("a") or m.group("b")) * sigma
            spec = text
        else:
            try:
                level, spec, sigma = float(text), text, None
            except ValueError:
                raise InvalidInput(
                    f"invalid noise {noise!r}: use a multiple of sigma like '3s' or a number"
                ) from None
    if not np.isfinite(level) or level < 0:
        raise InvalidInput(f"noise level must be a finite non-negative number, got {level}")
    return NoiseSpec(level=level, spec=spec, sigma=sigma, uniform=uniform)


def noise_draws(
    samples: int, n_tokens: int, d_model: int, spec: NoiseSpec, seed: int = 1, draw: int = 1
) -> Float[torch.Tensor, "samples tokens d_model"]:
    """The noise added to each corrupted run, in float64: exactly the reference recipe
    (``numpy.random.RandomState(seed)``, draws of shape ``[samples, tokens, d_model]``,
    times the level). ``draw=k`` is the ``k``-th consecutive draw of that generator (the
    papers' severed traces score a second pass that draws again: :mod:`tracing.severing`)."""
    if isinstance(draw, bool) or not isinstance(draw, int) or draw < 1:
        raise InvalidInput(f"draw must be an integer >= 1, got {draw!r}")
    rs = np.random.RandomState(seed)
    shape = (samples, n_tokens, d_model)
    for _ in range(draw):
        z = rs.uniform(-1, 1, shape) if spec.uniform else rs.randn(*shape)
    return spec.level * torch.from_numpy(z)


def add_noise(
    clean: Float[torch.Tensor, "1 pos d_model"],
    noise: Float[torch.Tensor, "samples tokens d_model"],
    span: tuple[int, int],
) -> Float[torch.Tensor, "samples pos d_model"]:
    """Corrupted embeddings: ``clean`` repeated per sample with ``noise`` added (in float64,
    rounded once to the model dtype, on ``clean``'s device) on the subject token span."""
    start, end = span
    out = clean.expand(noise.shape[0], -1, -1).clone()
    out[:, start:end] = (out[:, start:end].double() + noise.to(out.device)).to(clean.dtype)
    return out
