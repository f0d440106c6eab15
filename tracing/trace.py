"""Causal tracing (Meng et al. 2022): which hidden states carry a fact.

One generic function, :func:`restored_probs`, measures the answer's probability in noisy runs
with any set of clean states restored; :func:`trace_fact` builds the paper's [token x layer]
maps on top of it for the residual stream (``resid``), MLP outputs (``mlp``) and attention
outputs (``attn``), the latter two with a window of layers centred on each layer.

Every engine starts from the same prepared fact (tokens, noise, clean and corrupted runs:
:func:`tracing.prepared_fact.prepare_fact`). Two exact engines compute the same numbers with
the same noise:

* ``method="reference"`` (:mod:`tracing.reference`): the plain algorithm of the paper's code:
  for every point, one batch of 1 clean + N noisy runs through the whole model, the clean
  row's states copied into the noisy rows, logits at every position.
* ``method="fast"`` (default, :mod:`tracing.engine`): the clean and corrupted runs are made
  once and cached; each point recomputes only the blocks from its lowest restored layer and
  the positions from its restored token on, batched with the points that share that token;
  the vocabulary projection is computed only at the last position. States before the subject
  are identical in clean and corrupted runs, so restoring them is a no-op and their score is
  ``p_corrupted`` without running anything.

Two methods estimate them instead (:mod:`tracing.attribution`):

* ``method="atp"``: attribution patching, the first-order effect of every restoration from
  one forward and backward pass of the noisy runs; every cell after the subject's start is
  an estimate (``result.exact`` says which are not).
* ``method="atp+exact"``: AtP ranks the cells and the fast engine recomputes the top
  ``exact_top`` share of each kind (default 10 %) plus every cell of the peak's row and
  column, until the peak of the map is exact. Those cells are the fast engine's own values:
  the same interventions, the same batching by restored token, the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from tracing.attribution import (
    DEFAULT_EXACT_TOP,
    DEFAULT_SPACE,
    atp_exact_maps,
    atp_probs,
    before_subject,
)
from tracing.corruption import DEFAULT_CORRUPTION
from tracing.engine import State, fast_probs
from tracing.errors import InvalidInput
from tracing.interventions import STATE_KINDS
from tracing.memory import batch_tokens
from tracing.metrics import DEFAULT_DIRECTION, DEFAULT_METRIC, normalised
from tracing.models import (
    HookedModel,
    check_layer,
    decode,
    n_layers,
)
from tracing.noise import DEFAULT_NOISE
from tracing.prepared_fact import PreparedFact, prepare_fact
from tracing.reference import reference_probs
from tracing.results import KINDS, TraceResult
from tracing.severing import (
    DEFAULT_SEVERED_NOISE,
    check_atp,
    parse_kind,
    severed_grid,
)

__all__ = [
    "DEFAULT_WINDOW",
    "ENGINES",
    "METHODS",
    "PreparedFact",
    "grid_interventions",
    "prepare_fact",
    "restored_probs",
    "trace_fact",
    "trace_settings",
    "window_layers",
]

from tracing.trace_options import DEFAULT_WINDOW, ENGINES, METHODS, trace_settings


def restored_probs(
    model: HookedModel,
    prep: PreparedFact,
    interventions: Sequence[Sequence[State]],
    method: str = "fast",
    max_rows: int | None = None,
    progress: bool = False,
    atp_space: str = DEFAULT_SPACE,
) -> np.ndarray:
    """The answer's mean probability over the noisy runs for each intervention.

    Each intervention is a set of :data:`State` restored together from the clean run. This
    is the one generic routine behind every trace; ``method`` picks the engine (``atp``: the
    first-order estimate, :func:`tracing.attribution.atp_probs`). ``max_rows``
    (noisy runs per forward pass) defaults to the model's token budget
    (:func:`tracing.memory.batch_tokens`; 256 rows on the CPU).
    """
    n_pos = len(prep.tokens)
    rows = max_rows or max(1, batch_tokens(model, cpu_default=256 * n_pos) // n_pos)
    for states in interventions:
        for kind, layer, tok in states:
            if kind not in STATE_KINDS:
                raise InvalidInput(f"unknown kind {kind!r}; expected one of {STATE_KINDS}")
            if not (kind == "resid" and layer == -1):
                check_layer(model, layer)
            if not 0 <= tok < len(prep.tokens):
                raise InvalidInput(
                    f"token index {tok} outside the prompt (0..{len(prep.tokens) - 1})"
                )
    bar = tqdm(total=len(interventions), disable=not progress, desc=f"trace ({method})")
    try:
        if method == "fast":
            return fast_probs(model, prep, interventions, rows, bar)
        if method == "reference":
            return reference_probs(model, prep, interventions, bar)
        if method == "atp":
            out = atp_probs(model, prep, interventions, atp_space)
            bar.update(len(interventions))
            return out
        raise InvalidInput(f"unknown method {method!r}; expected one of {ENGINES}")
    finally:
        bar.close()


def window_layers(layer: int, window: int, n: int) -> range:
    """Layers restored for a window centred on ``layer``: ``[layer - w//2, layer + ceil(w/2))``
    clipped to the model (the paper's convention: window 10 at L is L-5 .. L+4)."""
    return range(max(0, layer - window // 2), min(n, layer - (-window // 2)))


def grid_interventions(kind: str, n_tokens: int, n: int, window: int) -> list[list[State]]:
    """Interventions of a [token x layer] trace of ``kind``, row-major (a severed kind:
    :func:`tracing.severing.severed_grid`)."""
    if parse_kind(kind) is not None:
        return severed_grid(kind, n_tokens, n, window)
    return [
        [(kind, lw, t) for lw in window_layers(layer, window, n)]
        for t in range(n_tokens)
        for layer in range(n)
    ]


def trace_fact(
    model: HookedModel,
    prompt: str,
    subject: str,
    answer: str | None = None,
    *,
    kinds: Sequence[str] = KINDS,
    window: int | dict[str, int] | None = None,
    noise: str | float = DEFAULT_NOISE,
    uniform_noise: bool = False,
    samples: int = 10,
    seed: int = 1,
    occurrence: int = 0,
    method: str = "fast",
    exact_top: float = DEFAULT_EXACT_TOP,
    atp_space: str = DEFAULT_SPACE,
    corruption: str = DEFAULT_CORRUPTION,
    replacement: str | None = None,
    direction: str = DEFAULT_DIRECTION,
    metric: str = DEFAULT_METRIC,
    normalise: bool = False,
    severed_noise: str = DEFAULT_SEVERED_NOISE,
    tokens: str = "all",
    progress: bool = False,
) -> TraceResult:
    """Trace one fact: for each kind, a [tokens x layers] map of the answer's probability when
    that state (a window of layers for mlp/attn) is restored into the corrupted runs.

    ``answer`` defaults to the model's top-1 next token (a multi-token answer is cut to its
    first token, noted in ``result.notes``). ``noise`` is a multiple of sigma (``"3s"``) or a
    number; ``window`` an int for mlp/attn or a per-kind dict (defaults: resid 1, mlp/attn 10).

    ``method``: ``"fast"`` (default) or ``"reference"`` measure every cell; ``"atp"``
    estimates them to first order from one forward and backward pass; ``"atp+exact"``
    estimates them and recomputes with the fast engine the top ``exact_top`` share of each
    kind by estimated effect plus the peak's row and column (see :mod:`tracing.attribution`).
    ``atp_space``: where AtP takes its first-order step (``"logodds"``, default, or the
    papers' ``"prob"``; :data:`tracing.attribution.SPACES`). ``result.exact`` says which cells
    are measured.

    ``kinds`` may include the severed kinds ``resid/mlp-severed`` and ``resid/attn-severed``
    (:mod:`tracing.severing`; ``severed_noise``: ``"papers"``, default, or ``"same"``).
    ``corruption``: ``"noise"`` (default) or ``"replace"`` (symmetric token replacement by
    ``replacement`` or a known subject of the same relation: :mod:`tracing.corruption`).
    ``direction``: ``"denoise"`` (default) or ``"noise"``; ``metric``: ``"prob"`` (default),
    ``"logprob"`` or ``"logit-diff"``; ``normalise``: scores as the normalised effect, 0 at
    the corrupted run and 1 at the clean one (:mod:`tracing.metrics`).

    ``tokens``: ``"all"`` (default) traces every token; ``"subject-last"`` only the
    subject's last token, the row the papers' per-layer figures and layer selection read:
    the same cells, the same batching and key/value reuse, the other rows left NaN (one
    row of ``T``: about ``1/T`` of the work for the token rows after the subject). Exact
    methods only (``fast`` or ``reference``).
    """
    t0 = time.perf_counter()
    settings, spec = trace_settings(
        model,
        kinds=kinds,
        window=window,
        noise=noise,
        uniform_noise=uniform_noise,
        samples=samples,
        seed=seed,
        method=method,
        exact_top=exact_top,
        atp_space=atp_space,
        corruption=corruption,
        replacement=replacement,
        direction=direction,
        metric=metric,
        normalise=normalise,
        severed_noise=severed_noise,
        tokens=tokens,
    )
    if replacement is not None and replacement.strip() == subject.strip():
        raise InvalidInput(f"the replacement subject {replacement!r} is the subject itself")
    # atp alone makes its own corrupted pass (with gradients): no recorded corrupted runs
    prep, notes = prepare_fact(
        model,
        prompt,
        subject,
        answer,
        spec,
        settings.samples,
        seed,
        occurrence,
        corrupted_runs=method != "atp",
        corruption=corruption,
        replacement=replacement,
        direction=direction,
        metric=metric,
        severed_noise=severed_noise,
    )
    if corruption == "replace" and samples != 1:
        notes.append("token replacement makes one corrupted run: samples is 1")
    if method.startswith("atp"):
        check_atp(prep, settings.kinds)
    n, T = n_layers(model), len(prep.tokens)
    notes += [
        f"{k} window {w} is wider than the model's {n} layers: windows are clipped to the "
        "model, so many columns restore the same layers"
        for k, w in settings.window.items()
        if w > n
    ]
    grids: dict[str, list[list[State]]] = {
        k: grid_interventions(k, T, n, settings.window[k]) for k in settings.kinds
    }
    rows = list(range(T))
    if tokens == "subject-last":  # one row of every grid: the subject's last token
        rows = [prep.span[1] - 1]
        grids = {k: g[rows[0] * n : (rows[0] + 1) * n] for k, g in grids.items()}
    scores: dict[str, np.ndarray] = {}
    exact: dict[str, np.ndarray] | None = None
    if method == "atp+exact":

        def measure(interventions: list[Sequence[State]]) -> np.ndarray:
            return restored_probs(model, prep, interventions, progress=progress)

        top = settings.exact_top or 0.0
        scores, exact = atp_exact_maps(model, prep, grids, top, measure, notes, atp_space)
    else:
        for k, grid in grids.items():
            probs = restored_probs(
                model, prep, grid, method=method, progress=progress, atp_space=atp_space
            )
            scores[k] = np.full((T, n), np.nan)
            scores[k][rows] = probs.reshape(len(rows), n)
        if method == "atp":
            exact = {k: before_subject(prep, n) for k in grids}
    p_corrupted, low = prep.p_corrupted, prep.corrupted_value
    if metric == "prob":  # (AtP alone fills p_corrupted in from its own pass)
        low = p_corrupted
    if method == "reference" and direction == "denoise":  # its own corrupted run's numerics
        low = float(restored_probs(model, prep, [[]], method="reference")[0])
        p_corrupted = low if metric == "prob" else p_corrupted
    values: dict = {}
    if metric != "prob" or normalise:
        values = dict(clean_value=prep.clean_value, corrupted_value=low)
    if normalise:
        scores = {k: normalised(v, prep.clean_value, low) for k, v in scores.items()}
        notes.append(
            f"normalised effect: 0 at the corrupted run ({metric} {low:.4g}), 1 at the clean "
            f"one ({prep.clean_value:.4g})"
        )
        values = dict(clean_value=1.0, corrupted_value=0.0)
    settings.replacement = prep.replacement
    competitor = prep.metric_readout.competitor_id
    return TraceResult(
        prompt=prompt,
        subject=subject,
        answer=decode(model, prep.answer_id),
        answer_id=prep.answer_id,
        tokens=prep.tokens,
        token_ids=prep.ids[0].tolist(),
        subject_span=prep.span,
        p_clean=prep.p_clean,
        p_corrupted=p_corrupted,
        scores=scores,
        settings=settings,
        notes=notes,
        seconds=time.perf_counter() - t0,
        exact=exact,
        competitor=None if competitor is None else decode(model, competitor),
        competitor_id=competitor,
        **values,
    )
