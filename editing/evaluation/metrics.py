"""Edit-evaluation metrics: CounterFact (ROME's definitions and EasyEdit's token accuracies),
zsRE token accuracy, and n-gram-entropy fluency.

Every probability comes from a :class:`~editing.evaluation.scoring.Scorer`: the
teacher-forced log-probability and top-1 prediction at each target token of each
``(prompt, target)`` pair (:class:`~editing.evaluation.scoring.TokenScores`; on a model,
:class:`~editing.evaluation.scoring.ModelScorer`; in tests, stubs with hand-set
probabilities). Those names are importable from here as well.

Definitions (ROME, Meng et al. 2022, App. C; MEMIT, Meng et al. 2023):

* ``P(target | prompt) = exp(mean_i log p(t_i | prompt, t_<i))`` over the tokens of
  ``" target"`` (space-prefixed, no BOS); prompts carry the model's BOS rule.
* efficacy success: ``P(new) > P(true)`` on the edit prompt; paraphrase success: the same,
  averaged over paraphrase prompts; neighbourhood success: ``P(true) > P(new)`` averaged over
  neighbourhood prompts. Magnitudes: ``P(new) - P(true)`` (neighbourhood: ``P(true) - P(new)``).
  Score: harmonic mean of the three success rates (computed on the aggregated rates).
* Neighbourhood bleed (needs the unedited scores): ``neighborhood_new_gain`` = mean over
  neighbourhood prompts of ``P_after(new) - P_before(new)``, ``neighborhood_new_gain_max`` the
  largest of them: how much probability the edit moved onto the new target where it should not.
* EasyEdit's variants (named as such): ``rewrite_acc`` = teacher-forced top-1 accuracy of the
  ``target_new`` tokens on the edit prompt, ``rephrase_acc`` the same on paraphrases,
  ``locality`` = fraction of neighbourhood answer tokens (``target_true`` teacher-forced) whose
  argmax after the edit equals the argmax before it (mean over prompts).
* zsRE: token-level top-1 accuracy under teacher forcing of ``target_new`` after the question
  and after its rephrase, and of the NQ answer after the unrelated NQ question (specificity).
* Strict metrics (named as such; "The Mirage of Model Editing", 2025, shows teacher forcing
  overstates success): ``strict_efficacy`` / ``strict_paraphrase`` = greedy decoding after the
  edit prompt / each paraphrase (question / rephrase for zsRE) produces ``target_new`` token
  for token, i.e. the generated continuation starts with the new target.
* Fluency: n-gram entropy (bigram and trigram, weights 2/3 and 4/3, arithmetic mean of the
  weighted entropies, in bits) of generated text, averaged over texts.

ROME's "reference score" (consistency: tf-idf similarity to Wikipedia text about the new
target) needs ROME's tf-idf vocabulary and per-relation reference texts, which are not shipped
and cannot be downloaded here, so it is not computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from editing.evaluation.datasets import CounterFactRecord, ZsreRecord
from editing.evaluation.scoring import ModelScorer, Scorer, TokenScores, space_target
from tracing.errors import InvalidInput

__all__ = [
    "SCORE_PARTS",
    "CounterFactScores",
    "ModelScorer",
    "Scorer",
    "TokenScores",
    "ZsreScores",
    "aggregate",
    "counterfact_metrics",
    "harmonic_mean",
    "score_counterfact",
    "score_zsre",
    "space_target",
    "zsre_locality_prompt",
    "zsre_metrics",
]

# --------------------------------------------------------------------------- CounterFact


@dataclass
class CounterFactScores:
    """Every teacher-forced score one CounterFact case needs (before or after an edit)."""

    rewrite_new: TokenScores
    rewrite_true: TokenScores
    paraphrase_new: list[TokenScores] = field(default_factory=list)
    paraphrase_true: list[TokenScores] = field(default_factory=list)
    neighborhood_new: list[TokenScores] = field(default_factory=list)
    neighborhood_true: list[TokenScores] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        out: dict = {}
        for key, value in self.__dict__.items():
            if isinstance(value, TokenScores):
                out[key] = value.to_dict()
            else:
                out[key] = [v.to_dict() for v in value]
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> CounterFactScores:
        """Inverse of :meth:`to_dict`."""
        kw: dict[str, Any] = {
            k: TokenScores.from_dict(v)
            if isinstance(v, Mapping)
            else [TokenScores.from_dict(x) for x in v]
            for k, v in d.items()
        }
        return cls(**kw)


def _counterfact_pairs(rec: CounterFactRecord) -> list[tuple[str, str]]:
    new, true = space_target(rec.target_new), space_target(rec.target_true)
    pairs = [(rec.prompt, new), (rec.prompt, true)]
    for prompts in (rec.paraphrase_prompts, rec.neighborhood_prompts):
        pairs += [(p, new) for p in prompts] + [(p, true) for p in prompts]
    return pairs


def score_counterfact(
    scorer: Scorer, records: Sequence[CounterFactRecord]
) -> list[CounterFactScores]:
    """Teacher-forced scores of each case's edit, paraphrase and neighbourhood prompts against
    its new and true targets (all cases' pairs go to the scorer in one call)."""
    all_pairs: list[tuple[str, str]] = []
    spans = []
    for rec in records:
        pairs = _counterfact_pairs(rec)
        spans.append((len(all_pairs), len(rec.paraphrase_prompts), len(rec.neighborhood_prompts)))
        all_pairs += pairs
    scores = scorer.score(all_pairs)
    out = []
    for start, n_para, n_nbr in spans:
        s = scores[start : start + 2 + 2 * (n_para + n_nbr)]
        para, nbr = s[2 : 2 + 2 * n_para], s[2 + 2 * n_para :]
        out.append(
            CounterFactScores(
                rewrite_new=s[0],
                rewrite_true=s[1],
                paraphrase_new=para[:n_para],
                paraphrase_true=para[n_para:],
                neighborhood_new=nbr[:n_nbr],
                neighborhood_true=nbr[n_nbr:],
            )
        )
    return out


def _mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


def _argmax_agreement(post: TokenScores, pre: TokenScores) -> float:
    if post.target != pre.target:
        raise InvalidInput("locality needs the same answer tokens before and after the edit")
    same = sum(int(a == b) for a, b in zip(post.argmax, pre.argmax, strict=True))
    return same / len(post.argmax)


def counterfact_metrics(
    scores: CounterFactScores, reference: CounterFactScores | None = None
) -> dict[str, float | None]:
    """Per-case CounterFact metrics (rates in [0, 1]; ``None`` where a case has no prompts of
    a kind). ``reference`` (the unedited model's scores of the same case) is needed only for
    EasyEdit's ``locality`` and the ``neighborhood_new_gain`` pair, ``None`` without it; its
    neighbourhood must be the one scored (else :class:`InvalidInput`: scores of another form
    of the dataset, e.g. a stale cache)."""
    s = scores
    if reference is not None and len(reference.neighborhood_new) != len(s.neighborhood_new):
        raise InvalidInput(
            f"the reference scores have {len(reference.neighborhood_new)} neighbourhood "
            f"prompts, the scores {len(s.neighborhood_new)}: not the same case and dataset form"
        )
    out: dict[str, float | None] = {
        "efficacy_success": float(s.rewrite_new.mean_logprob > s.rewrite_true.mean_logprob),
        "efficacy_magnitude": s.rewrite_new.prob - s.rewrite_true.prob,
        "paraphrase_success": _mean(
            float(n.mean_logprob > t.mean_logprob)
            for n, t in zip(s.paraphrase_new, s.paraphrase_true, strict=True)
        ),
        "paraphrase_magnitude": _mean(
            n.prob - t.prob for n, t in zip(s.paraphrase_new, s.paraphrase_true, strict=True)
        ),
        "neighborhood_success": _mean(
            float(t.mean_logprob > n.mean_logprob)
            for n, t in zip(s.neighborhood_new, s.neighborhood_true, strict=True)
        ),
        "neighborhood_magnitude": _mean(
            t.prob - n.prob for n, t in zip(s.neighborhood_new, s.neighborhood_true, strict=True)
        ),
        "rewrite_p_new": s.rewrite_new.prob,
        "rewrite_p_true": s.rewrite_true.prob,
        "paraphrase_p_new": _mean(x.prob for x in s.paraphrase_new),
        "paraphrase_p_true": _mean(x.prob for x in s.paraphrase_true),
        "neighborhood_p_new": _mean(x.prob for x in s.neighborhood_new),
        "neighborhood_p_true": _mean(x.prob for x in s.neighborhood_true),
        "rewrite_acc": s.rewrite_new.accuracy,
        "rephrase_acc": _mean(x.accuracy for x in s.paraphrase_new),
        "strict_efficacy": float(s.rewrite_new.exact),
        "strict_paraphrase": _mean(float(x.exact) for x in s.paraphrase_new),
        "locality": None,
        "neighborhood_new_gain": None,
        "neighborhood_new_gain_max": None,
    }
    if reference is not None:
        out["locality"] = _mean(
            _argmax_agreement(post, pre)
            for post, pre in zip(s.neighborhood_true, reference.neighborhood_true, strict=True)
        )
        pairs = zip(s.neighborhood_new, reference.neighborhood_new, strict=True)
        gains = [post.prob - pre.prob for post, pre in pairs]
        out["neighborhood_new_gain"] = _mean(gains)
        out["neighborhood_new_gain_max"] = max(gains) if gains else None
    return out


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean (0 if any value is 0; ``None`` if any value is missing)."""
    present = [v for v in values if v is not None]
    if not values or len(present) < len(values):
        return None
    if any(v <= 0 for v in present):
        return 0.0
    return len(present) / sum(1.0 / v for v in present)


#: Rates whose harmonic mean is ROME's CounterFact score.
SCORE_PARTS = ("efficacy_success", "paraphrase_success", "neighborhood_success")


def aggregate(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over cases (missing values skipped; ``None`` if none) plus, when
    the three CounterFact success rates are present, ``score``: their harmonic mean."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if r.get(k) is not None]  # type: ignore[arg-type]
        out[k] = sum(vals) / len(vals) if vals else None
    if all(k in out for k in SCORE_PARTS):
        out["score"] = harmonic_mean([out[k] for k in SCORE_PARTS])
    return out


# --------------------------------------------------------------------------- zsRE


@dataclass
class ZsreScores:
    """Teacher-forced scores of one zsRE case: question, rephrase (-> target_new) and the
    unrelated NQ question (-> its answer)."""

    edit: TokenScores
    rephrase: TokenScores
    locality: TokenScores

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {k: v.to_dict() for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> ZsreScores:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: TokenScores.from_dict(v) for k, v in d.items()})


def zsre_locality_prompt(rec: ZsreRecord) -> str:
    """The NQ question as ROME's zsRE evaluation poses it (ending with ``?``)."""
    q = rec.loc_question.rstrip()
    return q if q.endswith("?") else f"{q}?"


def score_zsre(scorer: Scorer, records: Sequence[ZsreRecord]) -> list[ZsreScores]:
    """Teacher-forced scores of each zsRE case (all pairs in one scorer call)."""
    pairs = []
    for rec in records:
        new = space_target(rec.target_new)
        pairs += [
            (rec.question, new),
            (rec.rephrase, new),
            (zsre_locality_prompt(rec), space_target(rec.loc_answer)),
        ]
    s = scorer.score(pairs)
    return [ZsreScores(*s[3 * i : 3 * i + 3]) for i in range(len(records))]


def zsre_metrics(scores: ZsreScores) -> dict[str, float]:
    """Token-level top-1 accuracies: ``efficacy_acc`` (question -> new target),
    ``paraphrase_acc`` (rephrase -> new target), ``specificity_acc`` (NQ question -> answer);
    and the strict ``strict_efficacy`` / ``strict_paraphrase`` (greedy decoding gives the whole
    new target)."""
    return {
        "efficacy_acc": scores.edit.accuracy,
        "paraphrase_acc": scores.rephrase.accuracy,
        "specificity_acc": scores.locality.accuracy,
        "strict_efficacy": float(scores.edit.exact),
        "strict_paraphrase": float(scores.rephrase.exact),
    }
