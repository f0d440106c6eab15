"""Evaluation cases: loading CounterFact / zsRE cases, deciding which can be evaluated and
which the unedited model knows, the edit request of each, and the on-disk cache of the
unedited model's scores and generated texts (shared by every method's run)."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from editing.datasets import (
    CounterFactRecord,
    ZsreRecord,
    data_path,
    load_counterfact,
    load_zsre,
    parse_zsre,
)
from editing.eval_results import append_rows
from editing.generation import GenerationSettings, generate_texts, generation_prompts
from editing.metrics import (
    CounterFactScores,
    Scorer,
    ZsreScores,
    counterfact_metrics,
    score_counterfact,
    score_zsre,
    space_target,
    zsre_metrics,
)
from editing.requests import ConflictIndex, EditRequest, request_from_counterfact
from tracing.models import down_proj, fingerprint, n_layers, target_ids

log = logging.getLogger(__name__)

KNOWN_RULES = ("prefers", "top1")
_CHUNK = 64  # cases pre-scored per scorer call while selecting


@dataclass(frozen=True)
class Case:
    """One evaluation case: a CounterFact or zsRE record with its id."""

    case_id: int
    record: CounterFactRecord | ZsreRecord

    @property
    def kind(self) -> str:
        """``"counterfact"`` or ``"zsre"``."""
        return "zsre" if isinstance(self.record, ZsreRecord) else "counterfact"


def load_cases(dataset: str | Path) -> tuple[str, list[Case]]:
    """(label, cases) for ``"counterfact"`` (21,919 shipped cases), ``"counterfact-full"`` (5
    full-form records), ``"zsre"`` (the 998 usable of 1,000 shipped records) or a JSON path
    (a list of CounterFact-shaped records, full or reduced; zsRE-shaped lists work too).
    Empty or malformed data raise a ValueError naming the record."""
    name = str(dataset)
    if name == "counterfact":
        return name, [Case(r.case_id, r) for r in load_counterfact()]
    if name == "counterfact-full":
        return name, [Case(r.case_id, r) for r in load_counterfact(full_sample=True)]
    if name == "zsre":
        return name, _shipped_zsre()
    path = Path(dataset)
    if not path.exists():
        raise FileNotFoundError(
            f"unknown dataset {name!r}: expected counterfact, counterfact-full, zsre or a file"
        )
    label = path.name.split(".")[0]
    try:
        return label, [Case(r.case_id, r) for r in load_counterfact(path)]
    except ValueError as cf_error:
        try:
            return label, [Case(i, r) for i, r in enumerate(load_zsre(path))]
        except (ValueError, TypeError, KeyError):
            raise cf_error from None


def _shipped_zsre() -> list[Case]:
    """The shipped zsRE sample, leaving out its records with an empty new target (records
    534 and 723 of the MEND file have ``alt == ""``); case ids are file indices."""
    with gzip.open(data_path("zsre_mend_train_1k.json.gz"), "rt", encoding="utf-8") as f:
        raw = json.load(f)
    empty = [i for i, r in enumerate(raw) if isinstance(r, dict) and not str(r.get("alt")).strip()]
    if empty:
        log.warning("shipped zsRE: records %s have an empty target and are left out", empty)
    return [Case(i, parse_zsre(r, i)) for i, r in enumerate(raw) if i not in empty]


def case_problem(model, case: Case) -> str | None:
    """Why a case cannot be evaluated (it is then skipped and counted), or ``None``."""
    rec = case.record
    if isinstance(rec, ZsreRecord):
        if rec.subject not in rec.question:
            return "subject missing from the question"
        targets = [rec.target_new, rec.loc_answer]
    else:
        if "{}" not in rec.template:
            return "subject missing from the prompt"
        targets = [rec.target_new, rec.target_true]
        if space_target(rec.target_new) == space_target(rec.target_true):
            return "target_new equals target_true"
    for t in targets:
        try:
            target_ids(model, space_target(t))
        except ValueError as exc:
            return str(exc)
    return None


def request_for(case: Case) -> EditRequest:
    """The edit request of a case (zsRE: the question with the subject as ``{}``)."""
    rec = case.record
    if isinstance(rec, CounterFactRecord):
        return request_from_counterfact(rec)
    return EditRequest(
        template=rec.question.replace(rec.subject, "{}", 1),
        subject=rec.subject,
        target_new=rec.target_new,
        target_true=rec.answers[0] if rec.answers else None,
        case_id=case.case_id,
    )


def score_cases(scorer: Scorer, cases: Sequence[Case]) -> list:
    if not cases:
        return []
    if cases[0].kind == "zsre":
        return score_zsre(scorer, [c.record for c in cases])  # type: ignore[misc]
    return score_counterfact(scorer, [c.record for c in cases])  # type: ignore[misc]


def case_metrics(post, pre) -> dict[str, float | None]:
    if hasattr(post, "rewrite_new"):
        return counterfact_metrics(post, pre)
    return zsre_metrics(post)  # type: ignore[return-value]


def is_known(pre, rule: str = "prefers") -> bool:
    """Whether the unedited model "knows" a CounterFact case: ``prefers`` = ROME's P(true) >
    P(new) on the edit prompt; ``top1`` = the first token of the true target is the top-1
    prediction. zsRE cases always pass."""
    if not hasattr(pre, "rewrite_true"):
        return True
    if rule == "prefers":
        return pre.rewrite_true.mean_logprob > pre.rewrite_new.mean_logprob
    if rule == "top1":
        return pre.rewrite_true.argmax[0] == pre.rewrite_true.target[0]
    raise ValueError(f"unknown known_rule {rule!r}; expected one of {KNOWN_RULES}")


def case_seed(seed: int, case_id: int) -> int:
    """The RNG seed of one case (or of the edit batch it starts): independent of run order,
    so a resumed run draws what an uninterrupted one would."""
    return (int(seed) * 1_000_003 + int(case_id)) % (2**31 - 1)


def weights_key(model) -> str:
    """Short key of the model's identity and current down-projection weights."""
    h = hashlib.sha256(fingerprint(model).encode())
    for layer in range(n_layers(model)):
        w = down_proj(model, layer).detach().double()
        h.update(f"{float(w.sum()):.17g},{float((w * w).sum()):.17g};".encode())
    return h.hexdigest()[:16]


def weights_checksums(model) -> list[tuple[float, float]]:
    out = []
    for layer in range(n_layers(model)):
        w = down_proj(model, layer).detach().double()
        out.append((float(w.sum()), float((w * w).sum())))
    return out


class UneditedCache:
    """The unedited model's scores and generated texts per case, on disk (JSONL)."""

    def __init__(self, path: Path, scorer: Scorer, model) -> None:
        self.path, self.scorer, self.model = path, scorer, model
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
        for c, s in zip(missing, score_cases(self.scorer, missing), strict=True):
            self.scores[c.case_id] = s.to_dict()
            new_rows.append({"case_id": c.case_id, "scores": s.to_dict()})
        append_rows(self.path, new_rows)
        cls = ZsreScores if cases and cases[0].kind == "zsre" else CounterFactScores
        return [cls.from_dict(self.scores[c.case_id]) for c in cases]

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
    model, cases: Sequence[Case], settings: GenerationSettings, seed: int
) -> list[dict]:
    """Generated texts of each case's generation prompts (all cases in one batched run;
    prompt j of a case is seeded with ``case_seed(seed, case_id) + j``), with their source."""
    prompts, seeds, spans, sources = [], [], [], []
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


def select_cases(model, cases, n, only_known, rule, cache) -> tuple[list, list[dict], int]:
    """The first ``n`` usable (and, with ``only_known``, known) cases with their unedited
    scores; the skipped cases (with reasons) and the number dropped as not known, counted
    among the cases examined before the n-th was found.

    A case whose edit repeats or contradicts the edit of a case already selected (same
    subject and prompt template, or same subject and relation; CounterFact has such pairs)
    is skipped, as MEMIT's multi-edit CounterFact does, so that any number of the selected
    cases can be edited in one batch and every method sees the same cases."""
    selected: list[tuple[Case, Any]] = []
    skipped: list[dict] = []
    taken = ConflictIndex()
    unknown, pos = 0, 0
    while pos < len(cases) and len(selected) < n:
        need = n - len(selected)
        size = min(_CHUNK, max(8, 3 * need)) if only_known else need
        chunk = cases[pos : pos + size]
        pos += len(chunk)
        problems = {c.case_id: case_problem(model, c) for c in chunk}
        valid = [c for c in chunk if problems[c.case_id] is None]
        pres = dict(zip([c.case_id for c in valid], cache.get_scores(valid), strict=True))
        for c in chunk:
            if len(selected) == n:
                break
            if problems[c.case_id] is not None:
                skipped.append({"case_id": c.case_id, "reason": problems[c.case_id]})
            elif only_known and not is_known(pres[c.case_id], rule):
                unknown += 1
            else:
                req = request_for(c)
                clash = taken.problem(req)
                if clash is not None:
                    skipped.append({"case_id": c.case_id, "reason": clash})
                    continue
                taken.add(req)
                selected.append((c, pres[c.case_id]))
    return selected, skipped, unknown


def case_fields(case: Case) -> dict:
    rec = case.record
    if isinstance(rec, ZsreRecord):
        return {
            "case_id": case.case_id,
            "subject": rec.subject,
            "prompt": rec.question,
            "target_true": rec.answers[0] if rec.answers else None,
            "target_new": rec.target_new,
        }
    return {
        "case_id": case.case_id,
        "subject": rec.subject,
        "prompt": rec.prompt,
        "target_true": rec.target_true,
        "target_new": rec.target_new,
    }
