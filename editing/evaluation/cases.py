"""Evaluation cases: which are evaluated (usable, known to the unedited model, not in
conflict with one already taken), the seed of each, checks that the weights come back, and
the on-disk cache of the unedited model's scores and generated texts (shared by every
method's run)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from editing.evaluation.generation import GenerationSettings, generate_texts, generation_prompts
from editing.evaluation.results import append_rows
from editing.evaluation.scoring import Scorer
from editing.evaluation.tasks import Case, Task
from editing.requests import ConflictIndex
from tracing.models import HookedModel

log = logging.getLogger(__name__)

_CHUNK = 64  # cases pre-scored per scorer call while selecting


def case_seed(seed: int, case_id: int) -> int:
    """The RNG seed of one case (or of the edit batch it starts): independent of run order,
    so a resumed run draws what an uninterrupted one would."""
    return (int(seed) * 1_000_003 + int(case_id)) % (2**31 - 1)


class UneditedCache:
    """The unedited model's scores and generated texts per case, on disk (JSONL)."""

    def __init__(self, path: Path, task: Task, scorer: Scorer, model: HookedModel) -> None:
        self.path, self.task, self.scorer, self.model = path, task, scorer, model
        self.scores: dict[int, Any] = {}
        self.texts: dict[tuple[int, str], dict] = {}
        if path.exists():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if "scores" in row:
                        self.scores[row["case_id"]] = row["scores"]
                    if "gen_key" in row:
                        self.texts[(row["case_id"], row["gen_key"])] = row

    def get_scores(self, cases: Sequence[Case]) -> list:
        """Unedited scores of ``cases`` (computed in one batch where missing)."""
        missing = [c for c in cases if c.case_id not in self.scores]
        new_rows = []
        scored = self.task.score(self.scorer, missing) if missing else []
        for c, s in zip(missing, scored, strict=True):
            self.scores[c.case_id] = s.to_dict()
            new_rows.append({"case_id": c.case_id, "scores": s.to_dict()})
        append_rows(self.path, new_rows)
        return [self.task.scores_from_dict(self.scores[c.case_id]) for c in cases]

    def get_texts(
        self, cases: Sequence[Case], settings: GenerationSettings, seed: int
    ) -> list[dict]:
        """Unedited generated texts of each case: ``{"texts", "source"}`` (missing ones
        generated in one batch)."""
        key = _gen_key(settings, seed)
        missing = [c for c in cases if (c.case_id, key) not in self.texts]
        rows = [
            {"case_id": c.case_id, "gen_key": key, **g}
            for c, g in zip(
                missing, generate_cases(self.model, missing, settings, seed), strict=True
            )
        ]
        append_rows(self.path, rows)
        self.texts.update({(r["case_id"], key): r for r in rows})
        return [self.texts[(c.case_id, key)] for c in cases]


def _gen_key(settings: GenerationSettings, seed: int) -> str:
    spec = asdict(settings)
    spec.pop("batch_size")  # does not change the texts
    return json.dumps([spec, seed], sort_keys=True)


def generate_cases(
    model: HookedModel, cases: Sequence[Case], settings: GenerationSettings, seed: int
) -> list[dict]:
    """Generated texts of each case's generation prompts (all cases in one batched run;
    prompt j of a case is seeded with ``case_seed(seed, case_id) + j``), with their source."""
    prompts: list[str] = []
    seeds: list[int] = []
    spans: list[tuple[int, int]] = []
    sources: list[str] = []
    for c in cases:
        ps, source = generation_prompts(c.record)
        spans.append((len(prompts), len(ps)))
        sources.append(source)
        prompts += ps
        seeds += [case_seed(seed, c.case_id) + j for j in range(len(ps))]
    texts = generate_texts(model, prompts, settings, seeds=seeds)
    return [
        {"texts": texts[a : a + k], "source": src}
        for (a, k), src in zip(spans, sources, strict=True)
    ]


def select_cases(
    model: HookedModel,
    task: Task,
    cases: Sequence[Case],
    n: int,
    only_known: bool,
    rule: str,
    cache: UneditedCache,
    skip_conflicts: bool = True,
    progress: bool = False,
) -> tuple[list[tuple[Case, Any]], list[dict], int]:
    """The first ``n`` usable (and, with ``only_known``, known) cases with their unedited
    scores; the skipped cases (with reasons) and the number dropped as not known, counted
    among the cases examined before the n-th was found.

    A case whose edit repeats or contradicts the edit of a case already selected (same
    subject and prompt template, or same subject and relation; CounterFact has such pairs)
    is skipped, as MEMIT's multi-edit CounterFact does, so that any number of the selected
    cases can be edited in one batch and every method sees the same cases. With
    ``skip_conflicts=False`` they are kept (a sequential stream meets them as they come).
    ``progress``: a bar of the cases selected so far (scoring the unedited model on a
    thousand cases takes minutes; cached scores are read back at once)."""
    selected: list[tuple[Case, Any]] = []
    skipped: list[dict] = []
    taken = ConflictIndex()
    unknown, pos = 0, 0
    bar = tqdm(total=n, desc="select cases (unedited scores)", disable=not progress)
    while pos < len(cases) and len(selected) < n:
        need = n - len(selected)
        size = min(_CHUNK, max(8, 3 * need)) if only_known else need
        chunk = cases[pos : pos + size]
        pos += len(chunk)
        problems = {c.case_id: task.problem(model, c) for c in chunk}
        valid = [c for c in chunk if problems[c.case_id] is None]
        pres = dict(zip([c.case_id for c in valid], cache.get_scores(valid), strict=True))
        for c in chunk:
            if len(selected) == n:
                break
            if problems[c.case_id] is not None:
                skipped.append({"case_id": c.case_id, "reason": problems[c.case_id]})
            elif only_known and not task.is_known(pres[c.case_id], rule):
                unknown += 1
            else:
                req = task.request(c)
                clash = taken.problem(req) if skip_conflicts else None
                if clash is not None:
                    skipped.append({"case_id": c.case_id, "reason": clash})
                    continue
                taken.add(req)
                selected.append((c, pres[c.case_id]))
                bar.update()
    bar.close()
    return selected, skipped, unknown
