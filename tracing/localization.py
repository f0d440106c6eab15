"""Localisation over many facts: resumable batch traces, average indirect effects
per ROME Fig. 2 token class, and selecting the MLP layers to edit."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tracing.distributed import gather_objects, ranks, together
from tracing.errors import InvalidInput
from tracing.facts import Fact, known_facts, load_known_facts
from tracing.io import write_json_atomic
from tracing.models import HookedModel, target_ids
from tracing.noise import DEFAULT_NOISE
from tracing.results import (
    ALL_KINDS,
    KINDS,
    TOKEN_CLASSES,
    AverageEffects,
    LayerSelection,
    TraceResult,
)
from tracing.trace import DEFAULT_EXACT_TOP, DEFAULT_SPACE, METHODS, trace_fact, trace_settings

log = logging.getLogger(__name__)

#: ``trace_dataset(method="auto")`` traces exactly (``fast``) up to this many facts and with
#: ``atp+exact`` above. An exact three-kind trace costs ~50 s per fact of the embedded model on
#: 2 CPU cores, so 20 facts are ~15-20 minutes: still a coffee break, and small runs are where
#: users look at single traces. Above that, the exact cost grows to hours (all of known_1000)
#: while atp+exact keeps every peak, its row and column and the top cells exact.
AUTO_ATP_ABOVE = 20


def _same_fact(model: HookedModel, trace: TraceResult, fact: Fact) -> bool:
    """Whether a stored trace is of ``fact`` (same prompt and subject; same answer token,
    unless the fact leaves the answer to the model)."""
    if trace.prompt != fact.prompt or trace.subject != fact.subject:
        return False
    return fact.answer is None or target_ids(model, fact.answer)[0] == trace.answer_id


#: trace_dataset's options beyond the noise ones (see trace_fact).
MEASURE_OPTIONS = ("corruption", "replacement", "direction", "metric", "normalise", "severed_noise")


def _atp_can_estimate(kinds: Sequence[str], measure: dict[str, Any]) -> bool:
    """Whether AtP can estimate these traces (``method="auto"`` falls back to the exact
    engine where it cannot): the answer's probability, denoising, and no severed kind under
    the papers' two-draw noise (:mod:`tracing.severing`)."""
    if measure.get("metric", "prob") != "prob" or measure.get("direction", "denoise") != "denoise":
        return False
    papers = measure.get("severed_noise", "papers") == "papers"
    replace = measure.get("corruption", "noise") == "replace"
    return not (papers and not replace and any("/" in k for k in kinds))


def _fact_key(fact: Fact, index: int) -> str:
    return f"{fact.known_id if fact.known_id is not None else index:05d}"


def trace_dataset(
    model: HookedModel,
    facts: Sequence[Fact] | None = None,
    *,
    n: int | None = None,
    out_dir: str | Path | None = None,
    only_known: bool = True,
    kinds: Sequence[str] = KINDS,
    window: int | dict[str, int] | None = None,
    noise: str | float = DEFAULT_NOISE,
    uniform_noise: bool = False,
    samples: int = 10,
    seed: int = 1,
    method: str = "auto",
    exact_top: float = DEFAULT_EXACT_TOP,
    atp_space: str = DEFAULT_SPACE,
    tokens: str = "all",
    progress: bool = True,
    **measure: Any,
) -> list[TraceResult]:
    """Trace many facts (default: the shipped known_1000), keeping only facts the model gets
    right (``only_known``), the first ``n`` of them.

    With ``out_dir``, each trace is written to ``out_dir/traces/<id>.json`` as soon as it is
    done and traces already there are loaded instead of recomputed, so an interrupted run
    resumes where it stopped; a stored trace is reused only when it is of the same fact
    (prompt, subject, answer) and its settings cover every one that changes a score (model,
    noise level and kind, samples, seed, engine, kinds and their windows: see
    :meth:`~tracing.results.TraceSettings.covers`): an ``atp`` trace never stands in for an
    exact one, nor the reverse.

    ``method``: any of :func:`~tracing.trace.trace_fact`'s, or ``"auto"`` (default): exact
    (``fast``) for up to :data:`AUTO_ATP_ABOVE` facts, ``atp+exact`` above (exact whatever the
    count where AtP cannot estimate the traces: another metric or direction, or severed kinds
    under the papers' noise). A fact list of
    which the model knows none (with ``only_known``) is refused before any tracing.

    ``measure``: :func:`~tracing.trace.trace_fact`'s ``corruption``, ``replacement``,
    ``direction``, ``metric``, ``normalise`` and ``severed_noise`` (kinds may include the
    severed ones). A stored trace made with another corruption, direction, metric or
    normalisation is refused, naming the setting (a folder never mixes what its scores are).

    ``tokens="subject-last"`` traces only the subject's last token of each fact (exact,
    one row per kind: what the averages at that token and layer selection read, at a
    fraction of the cost; ``method="auto"`` is then ``fast`` whatever the count). A stored
    trace of every token serves it; one of the last subject token never stands in for a
    trace of every token.

    ``n`` must be at least 1 (None: every fact). Under torchrun the facts are sharded across
    ranks (every rank writes its traces into the
    one ``out_dir``) and every rank returns all the traces, in the order of ``facts``.
    """
    if method != "auto" and method not in METHODS:
        raise InvalidInput(f"unknown method {method!r}; expected auto or one of {METHODS}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InvalidInput(f"n must be an integer >= 1 (or None: every fact), got {n!r}")
    unknown = sorted(set(measure) - set(MEASURE_OPTIONS))
    if unknown:
        raise InvalidInput(f"unknown trace options {unknown}; expected {MEASURE_OPTIONS}")
    options: dict[str, Any] = dict(
        kinds=kinds,
        window=window,
        noise=noise,
        uniform_noise=uniform_noise,
        samples=samples,
        seed=seed,
        method="fast" if method == "auto" else method,
        exact_top=exact_top,
        atp_space=atp_space,
        tokens=tokens,
        **measure,
    )
    trace_settings(model, **options)  # every argument checked before any work
    facts = list(load_known_facts() if facts is None else facts)
    if only_known:
        given_facts = len(facts)
        facts = known_facts(model, facts)
        log.info("%d facts known to the model", len(facts))
        if given_facts and not facts:
            raise InvalidInput(
                f"the model knows none of the {given_facts} facts (its top-1 next token is "
                "never the answer's first token): nothing to trace; pass --all-facts "
                "(only_known=False) to trace them anyway"
            )
    if n is not None:
        facts = facts[:n]
    if method == "auto":
        estimable = _atp_can_estimate(kinds, measure) and tokens == "all"
        options["method"] = "atp+exact" if len(facts) > AUTO_ATP_ABOVE and estimable else "fast"
        log.info("method auto: %s for %d facts", options["method"], len(facts))
    wanted, _ = trace_settings(model, **options)
    folder = Path(out_dir) / "traces" if out_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    here = ranks()  # under torchrun each rank traces every world-th fact

    def trace_share() -> list[tuple[int, TraceResult]]:
        done = []
        mine = here.shard(list(enumerate(facts)))
        bar = tqdm(mine, desc="tracing facts", disable=not progress or not here.is_main)
        for i, fact in bar:
            path = folder / f"{_fact_key(fact, i)}.json" if folder is not None else None
            if path is not None and path.is_file():
                cached = TraceResult.load(path)
                clash = (
                    cached.settings.conflict(wanted) if _same_fact(model, cached, fact) else None
                )
                if clash:
                    raise InvalidInput(
                        f"{path} was traced with {clash}: resume with the same settings or "
                        "write to another --out folder"
                    )
                if cached.settings.covers(wanted) and _same_fact(model, cached, fact):
                    done.append((i, cached))
                    continue
            r = trace_fact(model, fact.prompt, fact.subject, fact.answer, **options)
            if path is not None:
                r.save(path)
            done.append((i, r))
        return done

    shares = gather_objects(together(trace_share))
    return [r for _, r in sorted(pair for share in shares for pair in share)]


def load_traces(folder: str | Path) -> list[TraceResult]:
    """All traces saved by :func:`trace_dataset` under ``folder`` (or ``folder/traces``)."""
    folder = Path(folder)
    if (folder / "traces").is_dir():
        folder = folder / "traces"
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise InvalidInput(f"no traces (*.json) in {folder}")
    return [TraceResult.load(p) for p in paths]


def class_tokens(span: tuple[int, int], n_tokens: int) -> dict[str, list[int]]:
    """Token indices of each ROME Fig. 2 class. A one-token subject is both the first and the
    last subject token, as in the paper's averages; the last token of the prompt is only
    ``last``."""
    start, end = span
    last = n_tokens - 1
    classes = {
        "first_subject": [start],
        "middle_subject": list(range(start + 1, end - 1)),
        "last_subject": [end - 1],
        "first_subsequent": [end] if end < last else [],
        "further": list(range(end + 1, last)),
        "last": [last],
    }
    return {c: [t for t in ts if t != last or c == "last"] for c, ts in classes.items()}


def average_effects(results: Sequence[TraceResult]) -> AverageEffects:
    """Average indirect effect (restored minus corrupted probability, or the trace's metric:
    :meth:`~tracing.results.TraceResult.indirect_effect`) per layer, per kind (severed
    kinds included) and token class. Within a fact, tokens of one class are averaged first,
    then facts. Traces of different corruptions, directions or metrics are refused. A class
    whose rows a trace did not measure (``tokens="subject-last"``: every class but
    ``last_subject``) gets nothing from that trace."""
    if not results:
        raise InvalidInput("no traces to average")
    layers = {r.n_layers for r in results}
    if len(layers) != 1:
        raise InvalidInput(f"traces come from models with different layer counts: {layers}")
    kinds = [k for k in ALL_KINDS if all(k in r.scores for r in results)]
    first = results[0].settings
    for r in results[1:]:
        clash = r.settings.conflict(first)
        if clash and not clash.startswith("replacement"):
            raise InvalidInput(f"traces differ in their settings: {r.subject!r} has {clash}")
    n = layers.pop()
    sums = {k: {c: np.zeros(n) for c in TOKEN_CLASSES} for k in kinds}
    counts = {k: dict.fromkeys(TOKEN_CLASSES, 0) for k in kinds}
    for r in results:
        groups = class_tokens(r.subject_span, len(r.tokens))
        for k in kinds:
            effect = r.indirect_effect(k)
            for c, toks in groups.items():
                if toks and not np.isnan(effect[toks]).any():
                    sums[k][c] += effect[toks].mean(0)
                    counts[k][c] += 1
    effects: dict[str, dict[str, np.ndarray]] = {
        k: {c: sums[k][c] / counts[k][c] for c in TOKEN_CLASSES if counts[k][c]} for k in kinds
    }
    return AverageEffects(
        effects=effects,
        counts={k: {c: n for c, n in counts[k].items() if n} for k in kinds},
        n_facts=len(results),
        mean_p_clean=float(np.mean([r.p_clean for r in results])),
        mean_p_corrupted=float(np.mean([r.p_corrupted for r in results])),
        settings={
            "model": first.model,
            "model_fingerprint": first.model_fingerprint,
            "noise": first.noise,
            "noise_spec": first.noise_spec,
            "samples": first.samples,
            "window": first.window,
            "corruption": first.corruption,
            "direction": first.direction,
            "metric": first.metric,
            "normalise": first.normalise,
            "severed_noise": first.severed_noise,
            "tokens": sorted({getattr(r.settings, "tokens", "all") for r in results}),
        },
    )


#: How :func:`select_layers` reads the effects.
SELECT_BY = ("restoration", "mediation")


def select_layers(
    effects: AverageEffects,
    k: int = 5,
    kind: str = "mlp",
    token_class: str = "last_subject",
    by: str = "restoration",
) -> LayerSelection:
    """The contiguous window of ``k`` layers with the largest summed per-layer score.

    ``by="restoration"`` (default): the average effect of restoring ``kind`` at
    ``token_class`` (default: MLP at the last subject token, where ROME and MEMIT edit).
    ``by="mediation"`` (MEMIT's reading of the severed traces, Meng et al. 2023 §3): per
    layer, ``effect(resid) - effect(resid/mlp-severed)`` at ``token_class``, how much of the
    hidden state's effect is lost when the MLPs at that token are severed; the window of MLPs
    where severing removes the most (needs traces with both kinds; ``kind`` must be mlp).
    """
    if by not in SELECT_BY:
        raise InvalidInput(f"unknown selection rule {by!r}; expected one of {SELECT_BY}")
    if by == "mediation":
        if kind != "mlp":
            raise InvalidInput(f"mediation selects MLP layers (kind 'mlp'), not {kind!r}")
        needed = ("resid", "resid/mlp-severed")
        missing = [x for x in needed if x not in effects.effects]
        if missing:
            raise InvalidInput(
                f"mediation needs traces of {list(needed)}; these lack {missing} (trace them "
                "with --kinds resid resid/mlp-severed)"
            )
        per_layer = _class_effect(effects, "resid", token_class) - _class_effect(
            effects, "resid/mlp-severed", token_class
        )
    else:
        if kind not in effects.effects:
            raise InvalidInput(
                f"no {kind!r} effects in these traces (have {list(effects.effects)})"
            )
        per_layer = _class_effect(effects, kind, token_class)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(per_layer):
        raise InvalidInput(f"k must be between 1 and {len(per_layer)} (the layer count), got {k}")
    window_sums = np.convolve(per_layer, np.ones(k), mode="valid")
    start = int(np.argmax(window_sums))
    return LayerSelection(
        layers=list(range(start, start + k)),
        k=k,
        kind=kind,
        token_class=token_class,
        window_score=float(window_sums[start] / k),
        per_layer_effect=per_layer.tolist(),
        n_facts=effects.n_facts,
        model=str(effects.settings.get("model", "")),
        by=by,
    )


def _class_effect(effects: AverageEffects, kind: str, token_class: str) -> np.ndarray:
    if token_class not in effects.effects[kind]:
        raise InvalidInput(f"no facts with a {token_class!r} token in these traces")
    return np.asarray(effects.effects[kind][token_class], dtype=float)


def save_effects(effects: AverageEffects, path: str | Path) -> Path:
    """Write average effects as JSON."""
    return write_json_atomic(path, effects.to_dict())
