"""Typed loaders for the evaluation data shipped with factscope: CounterFact and zsRE.

CounterFact comes in two shapes and both load into :class:`CounterFactRecord`:

* the full ROME schema (``requested_rewrite`` with a ``{}`` template, ``paraphrase_prompts``,
  ``neighborhood_prompts``, ``attribute_prompts``, ``generation_prompts``): 5 records shipped;
* the reduced EasyEdit form (``prompt``, ``subject``, ``target_new``, ``ground_truth``,
  ``rephrase_prompt``, ``locality_prompt``): all 21,919 cases shipped, with one neighbourhood
  prompt each. ``load_counterfact(neighbourhoods=True)`` gives them up to ten instead, rebuilt
  from the shipped cases by ``scripts/build_neighbourhoods.py`` (other subjects with the same
  relation and the same true object; ``editing/data/counterfact_neighbourhoods.json.gz``).
  The reduced form names no relation; that file holds the relation id the script assigned to
  every case (:func:`load_relations`), and both forms of the shipped cases load with it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from editing.statistics.corpus import data_path
from tracing.errors import InvalidInput


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InvalidInput(f"no data file {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{path}: not a readable JSON file ({exc})") from exc


R = TypeVar("R")


def _parse_all(src: Path, parse: Callable[[Any, int], R], what: str) -> list[R]:
    """Every record of the JSON list in ``src``, parsed; errors name the file and record."""
    raw = _read_json(src)
    if not isinstance(raw, list) or not raw:
        raise InvalidInput(f"{src}: expected a non-empty JSON list of {what} records")
    try:
        return [parse(r, i) for i, r in enumerate(raw)]
    except InvalidInput as exc:
        raise InvalidInput(f"{src}: {exc}") from exc


@dataclass(frozen=True)
class CounterFactRecord:
    """One CounterFact case, whichever form it came in."""

    case_id: int
    subject: str
    template: str  # the edit prompt with "{}" where the subject goes
    target_true: str
    target_new: str
    relation_id: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    form: str = "full"

    @property
    def prompt(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.template.format(self.subject)


def _require(rec: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(rec, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in keys if k not in rec]
    if missing:
        raise InvalidInput(f"{where}: missing field(s) {missing}")


def _target(value: Any, where: str, key: str) -> str:
    text = value.get("str") if isinstance(value, dict) else value
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(f"{where}: empty or malformed {key}")
    return text


def parse_counterfact(rec: Any, index: int = 0) -> CounterFactRecord:
    """Parse one CounterFact record (full or reduced form); errors name the record."""
    where = f"CounterFact record {index}"
    if isinstance(rec, dict) and "case_id" in rec:
        where += f" (case_id {rec['case_id']})"
    if isinstance(rec, dict) and "requested_rewrite" in rec:
        _require(rec, ("case_id", "requested_rewrite"), where)
        rw = rec["requested_rewrite"]
        _require(rw, ("prompt", "subject", "target_new", "target_true"), where)
        if "{}" not in rw["prompt"]:
            raise InvalidInput(f"{where}: requested_rewrite.prompt has no '{{}}' for the subject")
        if not str(rw["subject"]).strip():
            raise InvalidInput(f"{where}: empty subject")
        return CounterFactRecord(
            case_id=int(rec["case_id"]),
            subject=rw["subject"],
            template=rw["prompt"],
            target_true=_target(rw["target_true"], where, "target_true"),
            target_new=_target(rw["target_new"], where, "target_new"),
            relation_id=rw.get("relation_id"),
            paraphrase_prompts=tuple(rec.get("paraphrase_prompts", ())),
            neighborhood_prompts=tuple(rec.get("neighborhood_prompts", ())),
            attribute_prompts=tuple(rec.get("attribute_prompts", ())),
            generation_prompts=tuple(rec.get("generation_prompts", ())),
            form="full",
        )
    _require(rec, ("case_id", "prompt", "subject", "target_new", "ground_truth"), where)
    subject, prompt = rec["subject"], rec["prompt"]
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidInput(f"{where}: empty subject")
    # A subject missing from its prompt is kept (template without "{}"): evaluation skips and
    # counts such cases instead of failing the whole run.
    template = prompt.replace(subject, "{}", 1) if subject in prompt else prompt
    locality = rec.get("locality_prompt")
    return CounterFactRecord(
        case_id=int(rec["case_id"]),
        subject=subject,
        template=template,
        target_true=_target(rec["ground_truth"], where, "ground_truth"),
        target_new=_target(rec["target_new"], where, "target_new"),
        relation_id=rec.get("relation_id"),
        paraphrase_prompts=(rec["rephrase_prompt"],) if rec.get("rephrase_prompt") else (),
        neighborhood_prompts=(locality,) if locality else (),
        form="reduced",
    )


#: The shipped reduced CounterFact cases and their rebuilt ten-prompt neighbourhoods.
REDUCED_FILE = "counterfact_reduced.json.gz"
NEIGHBOURHOODS_FILE = "counterfact_neighbourhoods.json.gz"


def _neighbourhood_tables(
    path: str | Path | None = None,
) -> tuple[dict[int, tuple[str, ...]], dict[int, str]]:
    """(case id -> rebuilt neighbourhood prompts, case id -> relation id) of the rebuilt
    neighbourhood file, after checking that it was built from the shipped reduced cases (its
    recorded SHA-256 of them)."""
    src = Path(path) if path is not None else data_path(NEIGHBOURHOODS_FILE)
    raw = _read_json(src)
    try:
        recorded = raw["source"]["sha256_decompressed"]
        prompts = {int(c["case_id"]): tuple(c["prompts"]) for c in raw["cases"]}
        relations = {int(c["case_id"]): str(c["relation_id"]) for c in raw["cases"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"{src}: not a CounterFact neighbourhood file ({exc!r})") from exc
    with gzip.open(data_path(REDUCED_FILE), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if recorded != digest:
        raise InvalidInput(
            f"{src} was built from other CounterFact cases than the shipped {REDUCED_FILE}; "
            "rebuild it with scripts/build_neighbourhoods.py"
        )
    return prompts, relations


def load_neighbourhoods(path: str | Path | None = None) -> dict[int, tuple[str, ...]]:
    """Case id -> the rebuilt neighbourhood prompts of a shipped reduced CounterFact case (at
    most ten; none for a case without a neighbour). The file must have been built from the
    shipped reduced cases (its recorded SHA-256 of them is checked) and cover every case."""
    return _neighbourhood_tables(path)[0]


def load_relations(path: str | Path | None = None) -> dict[int, str]:
    """Case id -> the relation id of a shipped reduced CounterFact case. The reduced records
    carry none; ``scripts/build_neighbourhoods.py`` assigned one to every case (a Wikidata id
    such as ``P17``; ``P131|P276`` where the case's templates and true object leave two;
    ``unmapped:<template>`` for the few templates no source names) and the neighbourhood file
    holds it. Checked like :func:`load_neighbourhoods`."""
    return _neighbourhood_tables(path)[1]


def load_counterfact(
    path: str | Path | None = None, *, full_sample: bool = False, neighbourhoods: bool = False
) -> list[CounterFactRecord]:
    """Load CounterFact. Default: all 21,919 shipped cases (reduced form), sorted by case_id,
    each with its one shipped neighbourhood prompt and its relation id (:func:`load_relations`:
    the reduced records carry none, so it comes from the rebuilt neighbourhood file).

    ``neighbourhoods=True`` (shipped reduced cases only) replaces the neighbourhood prompt by
    the rebuilt ones of :func:`load_neighbourhoods` (up to ten); a case without a rebuilt
    neighbour keeps its shipped prompt. ``full_sample=True`` loads the 5 shipped records in the
    full ROME schema (their relation ids are their own). ``path`` loads any JSON (or .json.gz)
    list of CounterFact-shaped records, full or reduced, as they are.
    """
    if neighbourhoods and (path is not None or full_sample):
        raise InvalidInput("rebuilt neighbourhoods exist only for the shipped reduced cases")
    if path is not None:
        src = Path(path)
    else:
        src = data_path("counterfact_full_first5.json.gz" if full_sample else REDUCED_FILE)
    records = _parse_all(src, parse_counterfact, "CounterFact")
    if path is not None or full_sample:
        return records
    table, relations = _neighbourhood_tables()
    missing = [r.case_id for r in records if r.case_id not in relations]
    if missing:
        raise InvalidInput(f"no rebuilt neighbourhood for case ids {missing[:10]}")
    out = []
    for r in records:
        prompts = (table[r.case_id] if neighbourhoods else ()) or r.neighborhood_prompts
        out.append(
            dataclasses.replace(
                r, relation_id=r.relation_id or relations[r.case_id], neighborhood_prompts=prompts
            )
        )
    return out


@dataclass(frozen=True)
class ZsreRecord:
    """One zsRE question (MEND's form): edit ``question`` to answer ``target_new``."""

    subject: str
    question: str
    target_new: str
    answers: tuple[str, ...]
    rephrase: str
    loc_question: str
    loc_answer: str
    extra: dict = field(default_factory=dict, compare=False)


#: What a zsRE edit writes: ``answers`` (ROME's and MEMIT's zsRE: the first gold answer) or
#: ``alt`` (MEND's and EasyEdit's alternative answer).
ZSRE_TARGETS = ("answers", "alt")


def parse_zsre(rec: Any, index: int = 0, target: str = "answers") -> ZsreRecord:
    """Parse one zsRE record; ``target_new`` is ``answers[0]`` (ROME and MEMIT) or, with
    ``target="alt"``, MEND's ``alt``. Errors name the record."""
    where = f"zsRE record {index}"
    if target not in ZSRE_TARGETS:
        raise InvalidInput(f"unknown zsRE target {target!r}; expected one of {ZSRE_TARGETS}")
    _require(rec, ("subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans"), where)
    if not rec["answers"] or not str(rec["answers"][0]).strip():
        raise InvalidInput(f"{where}: no answer")
    new = rec["answers"][0] if target == "answers" else rec["alt"]
    if not str(new).strip():
        raise InvalidInput(f"{where}: empty target {target!r}")
    return ZsreRecord(
        subject=rec["subject"],
        question=rec["src"],
        target_new=new,
        answers=tuple(rec["answers"]),
        rephrase=rec["rephrase"],
        loc_question=rec["loc"],
        loc_answer=rec["loc_ans"],
        extra={k: v for k, v in rec.items() if k in ("pred", "cond")},
    )


def load_zsre(
    path: str | Path | None = None, *, eval_sample: bool = False, target: str = "answers"
) -> list[ZsreRecord]:
    """Load zsRE. Default: the 1,000 shipped records (a sample of MEND's *train* split; ROME
    and MEMIT report MEND's *eval* split, of which 5 records ship as ``eval_sample=True``);
    ``path``: any JSON list of that shape. ``target``: see :data:`ZSRE_TARGETS`."""
    if path is not None:
        src = Path(path)
    else:
        src = data_path(
            "zsre_mend_eval_first5.json.gz" if eval_sample else "zsre_mend_train_1k.json.gz"
        )
    return _parse_all(src, lambda r, i: parse_zsre(r, i, target), "zsRE")
