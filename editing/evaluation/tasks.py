"""Evaluation tasks behind one small protocol: CounterFact and zsRE.

A :class:`Task` knows, for its kind of record: which cases cannot be evaluated
(:meth:`~Task.problem`), the edit request of a case (:meth:`~Task.request`), how to score
cases on a model (:meth:`~Task.score`, all cases in one scorer call), the per-case metrics from
scores after and before an edit (:meth:`~Task.metrics`), whether the unedited model knows a
case (:meth:`~Task.is_known`), and the fields that identify a case in result rows. The runner
(:mod:`editing.evaluation.runner`) only talks to this protocol; :func:`load_cases` returns a
dataset's task with its cases.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from editing.evaluation.datasets import (
    CounterFactRecord,
    ZsreRecord,
    load_counterfact,
    load_zsre,
    parse_zsre,
)
from editing.evaluation.metrics import (
    CounterFactScores,
    Scorer,
    ZsreScores,
    counterfact_metrics,
    score_counterfact,
    score_zsre,
    space_target,
    zsre_metrics,
)
from editing.requests import EditRequest
from editing.statistics.corpus import data_path
from tracing.errors import InvalidInput
from tracing.models import HookedModel, target_ids

log = logging.getLogger(__name__)

KNOWN_RULES = ("prefers", "top1")
#: Which shipped CounterFact cases a run uses: ``eval`` leaves out the tuning split (the
#: default: reported results), ``tuning`` uses only it (choosing hyper-parameters), ``all``.
SPLITS = ("eval", "tuning", "all")
DATASETS = ("counterfact", "counterfact-1", "counterfact-full", "zsre", "zsre-alt")
#: The label (name of cached and written results) of each shipped CounterFact form. The
#: ten-prompt default has a label of its own: caches of the one-prompt form, which was called
#: ``counterfact`` before the neighbourhoods were rebuilt, keep that label and cannot be read
#: as the ten-prompt form.
COUNTERFACT_LABELS = {
    "counterfact": "counterfact10",
    "counterfact-1": "counterfact",
    "counterfact-full": "counterfact-full",
}


@dataclass(frozen=True)
class Case:
    """One evaluation case: a CounterFact or zsRE record with its id."""

    case_id: int
    record: Any


@runtime_checkable
class Task(Protocol):
    """What the runner needs to know about a kind of evaluation record."""

    kind: str

    def problem(self, model: HookedModel, case: Case) -> str | None:
        """Why a case cannot be evaluated (it is skipped and counted), or None."""
        ...

    def request(self, case: Case) -> EditRequest:
        """The edit request of a case."""
        ...

    def score(self, scorer: Scorer, cases: Sequence[Case]) -> list[Any]:
        """Teacher-forced scores of every case (one scorer call)."""
        ...

    def metrics(self, post: Any, pre: Any) -> dict[str, float | None]:
        """Per-case metrics from the scores after (``post``) and before (``pre``) an edit."""
        ...

    def is_known(self, pre: Any, rule: str) -> bool:
        """Whether the unedited model knows the case (rules: :data:`KNOWN_RULES`)."""
        ...

    def fields(self, case: Case) -> dict[str, Any]:
        """Identifying columns of a result row."""
        ...

    def scores_from_dict(self, d: Mapping[str, Any]) -> Any:
        """Scores read back from their JSON form."""
        ...


def _targets_problem(model: HookedModel, targets: Sequence[str]) -> str | None:
    for t in targets:
        try:
            target_ids(model, space_target(t))
        except InvalidInput as exc:
            return str(exc)
    return None


class CounterFactTask:
    """CounterFact (ROME's metrics; EasyEdit's token accuracies beside them)."""

    kind = "counterfact"

    def problem(self, model: HookedModel, case: Case) -> str | None:
        """Why the case cannot be edited (no subject slot, targets equal or empty), or None."""
        rec: CounterFactRecord = case.record
        if "{}" not in rec.template:
            return "subject missing from the prompt"
        if space_target(rec.target_new) == space_target(rec.target_true):
            return "target_new equals target_true"
        return _targets_problem(model, [rec.target_new, rec.target_true])

    def request(self, case: Case) -> EditRequest:
        """The case's rewrite (template, subject, new and true target, relation id)."""
        rec: CounterFactRecord = case.record
        return EditRequest(
            template=rec.template,
            subject=rec.subject,
            target_new=rec.target_new,
            target_true=rec.target_true,
            case_id=rec.case_id,
            relation_id=rec.relation_id,
        )

    def score(self, scorer: Scorer, cases: Sequence[Case]) -> list[Any]:
        """Teacher-forced scores of every case's rewrite, paraphrase and neighbourhood prompts."""
        return list(score_counterfact(scorer, [c.record for c in cases]))

    def metrics(self, post: Any, pre: Any) -> dict[str, float | None]:
        """Efficacy, paraphrase and neighbourhood success and magnitudes, strict forms too."""
        return counterfact_metrics(post, pre)

    def is_known(self, pre: Any, rule: str) -> bool:
        """``prefers``: ROME's P(true) > P(new) on the edit prompt; ``top1``: the first token of
        the true target is the top-1 prediction."""
        if rule == "prefers":
            return bool(pre.rewrite_true.mean_logprob > pre.rewrite_new.mean_logprob)
        if rule == "top1":
            return bool(pre.rewrite_true.argmax[0] == pre.rewrite_true.target[0])
        raise InvalidInput(f"unknown known_rule {rule!r}; expected one of {KNOWN_RULES}")

    def fields(self, case: Case) -> dict[str, Any]:
        """Case id, subject, prompt and both targets, the columns that name a row."""
        rec: CounterFactRecord = case.record
        return {
            "case_id": case.case_id,
            "subject": rec.subject,
            "prompt": rec.prompt,
            "target_true": rec.target_true,
            "target_new": rec.target_new,
        }

    def scores_from_dict(self, d: Mapping[str, Any]) -> Any:
        """:class:`CounterFactScores` read back from :meth:`CounterFactScores.to_dict`."""
        return CounterFactScores.from_dict(d)


class ZsreTask:
    """zsRE (token accuracy of the new answer, its rephrase, and an unrelated NQ question)."""

    kind = "zsre"

    def problem(self, model: HookedModel, case: Case) -> str | None:
        """Why the record cannot be edited (subject not in the question, empty target), or None."""
        rec: ZsreRecord = case.record
        if rec.subject not in rec.question:
            return "subject missing from the question"
        return _targets_problem(model, [rec.target_new, rec.loc_answer])

    def request(self, case: Case) -> EditRequest:
        """The question with its subject as the slot, edited toward the record's new answer."""
        rec: ZsreRecord = case.record
        return EditRequest(
            template=rec.question.replace(rec.subject, "{}", 1),
            subject=rec.subject,
            target_new=rec.target_new,
            target_true=rec.answers[0] if rec.answers else None,
            case_id=case.case_id,
        )

    def score(self, scorer: Scorer, cases: Sequence[Case]) -> list[Any]:
        """Teacher-forced scores of the question, its rephrase and the NQ question."""
        return list(score_zsre(scorer, [c.record for c in cases]))

    def metrics(self, post: Any, pre: Any) -> dict[str, float | None]:
        """Token accuracy of the edit, the rephrase and the NQ answer (``pre`` is not needed)."""
        return dict(zsre_metrics(post))

    def is_known(self, pre: Any, rule: str) -> bool:
        """zsRE cases are always kept."""
        return True

    def fields(self, case: Case) -> dict[str, Any]:
        """Case id, subject, question and both answers, the columns that name a row."""
        rec: ZsreRecord = case.record
        return {
            "case_id": case.case_id,
            "subject": rec.subject,
            "prompt": rec.question,
            "target_true": rec.answers[0] if rec.answers else None,
            "target_new": rec.target_new,
        }

    def scores_from_dict(self, d: Mapping[str, Any]) -> Any:
        """:class:`ZsreScores` read back from their JSON form."""
        return ZsreScores.from_dict(d)


TASKS: dict[str, Task] = {"counterfact": CounterFactTask(), "zsre": ZsreTask()}


def _shipped_zsre(target: str) -> list[Case]:
    """The shipped zsRE sample (case ids are file indices) editing toward ``target``
    (``answers``: ROME's and MEMIT's; ``alt``: MEND's, where records 534 and 723 have an empty
    ``alt`` and are left out)."""
    with gzip.open(data_path("zsre_mend_train_1k.json.gz"), "rt", encoding="utf-8") as f:
        raw = json.load(f)
    key = "alt" if target == "alt" else None
    empty = [i for i, r in enumerate(raw) if key and not str(r.get(key)).strip()]
    if empty:
        log.info("shipped zsRE: records %s have an empty %s and are left out", empty, key)
    return [Case(i, parse_zsre(r, i, target)) for i, r in enumerate(raw) if i not in empty]


def tuning_case_ids() -> frozenset[int]:
    """The CounterFact case ids of the tuning split (``editing/data``; every case id divisible
    by 20, plus the ten cases the first Gemma defaults were tuned on)."""
    with gzip.open(data_path("counterfact_tuning_split.json.gz"), "rt", encoding="utf-8") as f:
        return frozenset(int(i) for i in json.load(f)["case_ids"])


def split_cases(label: str, cases: Sequence[Case], split: str) -> list[Case]:
    """The cases of ``split`` (see :data:`SPLITS`): the tuning split is defined on the
    shipped CounterFact cases; other datasets have only ``all`` (``eval`` keeps them all)."""
    if split not in SPLITS:
        raise InvalidInput(f"unknown split {split!r}; expected one of {SPLITS}")
    if label not in COUNTERFACT_LABELS.values():
        if split == "tuning":
            raise InvalidInput(f"dataset {label!r} has no tuning split (only counterfact has)")
        return list(cases)
    if split == "all":
        return list(cases)
    tuning = tuning_case_ids()
    keep = split == "tuning"
    return [c for c in cases if (c.case_id in tuning) == keep]


def load_cases(dataset: str | Path) -> tuple[str, Task, list[Case]]:
    """(label, task, cases) for ``"counterfact"`` (the 21,919 shipped cases with up to ten
    rebuilt neighbourhood prompts each; label ``counterfact10``), ``"counterfact-1"`` (the
    same cases with their one shipped neighbourhood prompt; label ``counterfact``, the label
    this form had before), ``"counterfact-full"`` (5 full-form records), ``"zsre"`` (1,000
    shipped records, editing toward ``answers[0]`` as ROME and MEMIT do), ``"zsre-alt"`` (the
    998 with a non-empty ``alt``, editing toward it as MEND and EasyEdit do) or a JSON path (a
    list of CounterFact-shaped records, full or reduced; zsRE-shaped lists work too; label:
    the file name before its first dot). Empty or malformed data raise an
    :class:`~tracing.errors.InvalidInput` naming the file and record."""
    name = str(dataset)
    cf = TASKS["counterfact"]
    if name in COUNTERFACT_LABELS:
        records = load_counterfact(
            full_sample=name == "counterfact-full", neighbourhoods=name == "counterfact"
        )
        return COUNTERFACT_LABELS[name], cf, [Case(r.case_id, r) for r in records]
    if name in ("zsre", "zsre-alt"):
        return name, TASKS["zsre"], _shipped_zsre("alt" if name == "zsre-alt" else "answers")
    path = Path(dataset)
    if not path.is_file():
        raise InvalidInput(f"unknown dataset {name!r}: expected one of {list(DATASETS)} or a file")
    label = path.name.split(".")[0]
    try:
        return label, cf, [Case(r.case_id, r) for r in load_counterfact(path)]
    except InvalidInput as cf_error:
        try:
            return label, TASKS["zsre"], [Case(i, r) for i, r in enumerate(load_zsre(path))]
        except InvalidInput:
            raise cf_error from None
