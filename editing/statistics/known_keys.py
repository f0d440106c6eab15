"""The subject keys of facts a model knows, and AlphaEdit's null space kept clear of them.

AlphaEdit's preserved set is a corpus (WikiText): ``C_wiki = E[k k^T]`` over its keys
(:mod:`editing.statistics.stats`). The keys a model reads its *facts* from, those at a known
subject's last token, are not typical corpus keys: on Gemma-3-270M they put 1.4-6.6x more of
their energy into that corpus's "null" space than corpus keys do, so an update confined to it
still moves facts the model knows. This module holds factscope's knowledge-aware preserved set
(AlphaEdit's ``knowledge_share``, off by default):

* :func:`preserved_facts`: the facts: the first ``n`` (file order) of the shipped known_1000
  set (:func:`tracing.facts.load_known_facts`) that the model answers at top-1
  (:func:`tracing.facts.known_facts`, the tracing code's ``only_known`` rule), leaving out every
  fact whose subject is one being edited (case-insensitive, stripped);
* :func:`fact_requests`: those facts put into the edit's own context templates;
* :func:`known_second_moment`: ``C_known = (1/N) sum_i k_i k_i^T`` over their subject keys
  ``k_i`` (:func:`editing.statistics.keys.subject_keys`, float64), a second moment on the
  scale of ``C_wiki``;
* :func:`mixed_second_moment`: ``C_mix = (1 - s) C_wiki + s C_known``;
* :func:`knowledge_projectors`: per layer, the null-space projector of ``C_mix`` under the
  same rule as today's (:func:`editing.statistics.nullspace.null_space_projector`), cached
  beside the statistics under a name that hashes every setting it depends on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file

from editing.hparams import KeyValueHparams
from editing.requests.prepared import PreparedRequest, TemplatedPrompt, templated_prompt
from editing.requests.request import EditRequest
from editing.statistics.keys import KeyWeighting, Stats, layer_stats, subject_keys
from editing.statistics.nullspace import null_space_projector, projector_name
from editing.statistics.stats import stats_dir
from editing.statistics.tensor_file import write_safetensors
from tracing.errors import InvalidHparams, InvalidInput
from tracing.facts import Fact, known_facts, load_known_facts
from tracing.io import atomic_path
from tracing.models import HookedModel, fingerprint

log = logging.getLogger(__name__)


def check_knowledge_share(share: Any, n_facts: Any) -> None:
    """Refuse a ``knowledge_share`` that is not None or a number in ``(0, 1)``, and a
    ``knowledge_facts`` that is not an integer >= 1 (one-line
    :class:`~tracing.errors.InvalidHparams` naming the field)."""
    if share is not None:
        ok = isinstance(share, int | float) and not isinstance(share, bool)
        if not ok or not 0 < share < 1:  # also refuses nan
            raise InvalidHparams(
                "knowledge_share must be None (off) or a number in (0, 1), the share of the "
                f"known facts' second moment in the preserved one, got {share!r}"
            )
    if isinstance(n_facts, bool) or not isinstance(n_facts, int) or n_facts < 1:
        raise InvalidHparams(f"knowledge_facts must be an integer >= 1, got {n_facts!r}")


def normalised_subject(subject: str) -> str:
    """A subject as compared for exclusion: stripped and case-folded."""
    return subject.strip().casefold()


def excluded_subjects(requests: Iterable[EditRequest]) -> list[str]:
    """The sorted, distinct normalised subjects of ``requests`` (the facts left out)."""
    return sorted({normalised_subject(r.subject) for r in requests})


def preserved_facts(
    model: HookedModel,
    n: int,
    exclude: Iterable[str] = (),
    *,
    facts: Sequence[Fact] | None = None,
) -> list[Fact]:
    """The first ``n`` facts (in order) of ``facts`` (None: the shipped known_1000) that the
    model knows (:func:`tracing.facts.known_facts`: the answer's first token is its top-1
    next token; a fact without an answer counts as known) and whose normalised subject is not
    in ``exclude``. Facts whose prompt does not contain their subject are skipped.
    InvalidInput if none remain."""
    pool = list(load_known_facts() if facts is None else facts)
    banned = {normalised_subject(s) for s in exclude}
    kept = [
        f for f in pool if f.subject in f.prompt and normalised_subject(f.subject) not in banned
    ]
    out: list[Fact] = []
    for i in range(0, len(kept), 256):  # only as many facts are run as it takes to find n
        out.extend(known_facts(model, kept[i : i + 256]))
        if len(out) >= n:
            break
    out = out[:n]
    if not out:
        raise InvalidInput(
            f"knowledge-aware preservation needs known facts: none of the {len(pool)} given "
            f"is known to the model and about a subject not being edited"
        )
    return out


def fact_requests(
    model: HookedModel, facts: Sequence[Fact], like: PreparedRequest
) -> list[PreparedRequest]:
    """``facts`` tokenised in the context templates (and groups) that ``like``, a request of
    the edit, was prepared with, ready for :func:`~editing.statistics.keys.subject_keys`
    (only ``prompts`` are meaningful: ``target`` is empty and ``kl`` is the bare prompt)."""
    templates = [(t.template, t.group) for t in like.prompts]
    out = []
    for f in facts:
        req = EditRequest(f.prompt.replace(f.subject, "{}", 1), f.subject, " -")
        prompts: tuple[TemplatedPrompt, ...] = tuple(
            templated_prompt(model, req, t, g) for t, g in templates
        )
        out.append(PreparedRequest(request=req, target=(), prompts=prompts, kl=prompts[0]))
    return out


def known_second_moment(
    model: HookedModel,
    prepared: Sequence[PreparedRequest],
    layer: int,
    *,
    weighting: KeyWeighting = "group_mean",
) -> Float[torch.Tensor, "d_mlp d_mlp"]:
    """``C_known = (1/N) sum_i k_i k_i^T`` (float64) over the subject keys ``k_i`` of the
    ``N`` prepared facts at ``layer`` (each the mean over its templates, weighed as the edit's
    own keys are: ``weighting``), with the model's current weights."""
    if not prepared:
        raise InvalidInput("knowledge-aware preservation needs known facts: none given")
    keys = subject_keys(model, prepared, layer, weighting=weighting).double()
    return keys.T @ keys / keys.shape[0]


def mixed_second_moment(
    wiki: Float[torch.Tensor, "d d"], known: Float[torch.Tensor, "d d"], share: float
) -> Float[torch.Tensor, "d d"]:
    """``C_mix = (1 - share) C_wiki + share C_known`` in float64."""
    if wiki.shape != known.shape:
        raise InvalidInput(
            f"C_wiki {tuple(wiki.shape)} and C_known {tuple(known.shape)} differ in shape"
        )
    return (1 - share) * wiki.double() + share * known.to(wiki.device, torch.float64)


@dataclass(frozen=True)
class KnowledgeSetting:
    """Everything ``C_mix`` depends on besides the model and the layer: the share ``s``, the
    facts' count ``N`` and source (a content hash of the candidate facts), the normalised
    subjects left out, the context templates ``(template, group)`` and the key weighting."""

    share: float
    n_facts: int
    source: str
    excluded: tuple[str, ...]
    templates: tuple[tuple[str, int], ...]
    weighting: KeyWeighting


@dataclass
class KnowledgeProjectors:
    """:func:`knowledge_projectors`' result: the float32 projectors by layer and the facts
    used (None when every projector came from the cache)."""

    projectors: dict[int, torch.Tensor]
    facts: list[Fact] | None
    excluded: list[str]


def _facts_hash(facts: Sequence[Fact]) -> str:
    rows = [[f.prompt, f.subject, f.answer] for f in facts]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def knowledge_cache_name(
    model: HookedModel,
    layer: int,
    setting: KnowledgeSetting,
    threshold: float,
    energy: float | None,
    dtype: str,
) -> str:
    """The statistics-cache file name of a layer's ``C_mix`` projector: the plain
    projector's name (:func:`~editing.statistics.nullspace.projector_name`) with a hash of
    the model fingerprint, the layer, the facts (content and count), the share, the excluded
    subjects, the templates and the key weighting."""
    key = json.dumps(
        {
            "fingerprint": fingerprint(model),
            "layer": layer,
            "facts": setting.source,
            "n_facts": setting.n_facts,
            "share": setting.share,
            "excluded": hashlib.sha256("\n".join(setting.excluded).encode()).hexdigest(),
            "templates": [list(t) for t in setting.templates],
            "weighting": setting.weighting,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return projector_name(layer, threshold, energy, dtype).replace(
        ".safetensors", f"-known-{digest}.safetensors"
    )


def knowledge_projectors(
    model: HookedModel,
    layers: Sequence[int],
    hp: KeyValueHparams,
    edited: Sequence[PreparedRequest],
    *,
    share: float,
    n_facts: int,
    threshold: float,
    energy: float | None = None,
    dtype: str = "float64",
    weighting: KeyWeighting = "group_mean",
    given: Stats | None = None,
    facts: Sequence[Fact] | None = None,
    also_exclude: Iterable[str] = (),
    progress: bool = False,
) -> KnowledgeProjectors:
    """Per layer, the null-space projector (float32) of ``C_mix = (1 - share) C_wiki + share
    C_known`` under :func:`~editing.statistics.nullspace.null_space_projector`'s rule
    (``threshold``, ``energy``, ``dtype``). ``C_wiki``: ``given`` statistics, else ``hp``'s
    (cached); ``C_known``: :func:`known_second_moment` over :func:`preserved_facts`
    (``n_facts`` of ``facts``, None: known_1000) in the templates ``edited[0]`` was prepared
    with, facts about a subject of ``edited`` or ``also_exclude`` (subjects: a sequential
    stream's) left out. Without ``given``, each
    projector is read from or written to the statistics cache
    (:func:`knowledge_cache_name`), so it is computed once per (layer, setting)."""
    check_knowledge_share(share, n_facts)
    if not edited:
        raise InvalidInput("knowledge-aware preservation needs the edit's prepared requests")
    pool = list(load_known_facts() if facts is None else facts)
    excluded = sorted(
        set(excluded_subjects(p.request for p in edited))
        | set(map(normalised_subject, also_exclude))
    )
    setting = KnowledgeSetting(
        share=float(share),
        n_facts=n_facts,
        source=_facts_hash(pool),
        excluded=tuple(excluded),
        templates=tuple((t.template, t.group) for t in edited[0].prompts),
        weighting=weighting,
    )
    out: dict[int, torch.Tensor] = {}
    folder = None
    if given is None:
        folder = stats_dir(model, n_tokens=hp.mom2_n_tokens, corpus=hp.corpus, dtype=hp.mom2_dtype)
        for L in layers:
            path = folder / knowledge_cache_name(model, L, setting, threshold, energy, dtype)
            if path.is_file():
                out[L] = load_file(str(path))["projector"]
    missing = [L for L in layers if L not in out]
    if not missing:
        return KnowledgeProjectors(out, None, excluded)
    used = preserved_facts(model, n_facts, excluded, facts=pool)
    prepared = fact_requests(model, used, edited[0])
    wiki = layer_stats(model, missing, hp, given=given, progress=progress)
    for L in missing:
        mix = mixed_second_moment(
            wiki[L], known_second_moment(model, prepared, L, weighting=weighting), share
        )
        P = null_space_projector(mix, threshold, energy=energy, dtype=dtype)
        del mix
        out[L] = P.float()
        log.info(
            "layer %d: knowledge-aware null space (%d facts, share %g) of dimension %d",
            L,
            len(used),
            share,
            round(float(P.trace())),
        )
        del P
        if folder is not None:
            path = folder / knowledge_cache_name(model, L, setting, threshold, energy, dtype)
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                write_safetensors(tmp, {"projector": out[L]})
    return KnowledgeProjectors(out, used, excluded)
