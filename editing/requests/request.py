"""Edit requests: "make ``subject`` in ``template`` continue with ``target_new``".

A request is a plain value (:class:`EditRequest`). Requests come from evaluation tasks
(:meth:`editing.evaluation.tasks.Task.request`) or from JSON files (:func:`load_requests`), and
are checked against a model before any method runs (:func:`validate_requests`): every problem
is reported as an :class:`~tracing.errors.InvalidRequest` naming the request and subject.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tracing.errors import InvalidInput, InvalidRequest
from tracing.facts import tokenize_fact
from tracing.models import HookedModel, context_length, target_ids


def _space(text: str | None) -> str | None:
    """ROME's convention: a target starts with exactly one space (``"Rome"`` -> ``" Rome"``)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"targets must be strings, got {type(text).__name__}")
    stripped = text.lstrip()
    return f" {stripped}" if stripped else text


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``template.format(subject)`` should continue with ``target_new``.

    ``target_new`` and ``target_true`` are normalised to start with one space. Content is
    checked by :func:`validate_requests` (with a model) or :meth:`problems` (without one).
    """

    template: str  # contains exactly one "{}" for the subject
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | None = None
    relation_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("template", "subject", "target_new"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"EditRequest.{name} must be a string")
        object.__setattr__(self, "target_new", _space(self.target_new))
        object.__setattr__(self, "target_true", _space(self.target_true))

    @property
    def prompt(self) -> str:
        """The edit prompt: the template with the subject filled in."""
        return self.template.replace("{}", self.subject, 1)

    @property
    def subject_occurrence(self) -> int:
        """Which occurrence of ``subject`` in :attr:`prompt` is the one filled into ``{}``
        (0 unless the subject also appears earlier in the template's own text); pass it to
        :func:`tracing.facts.tokenize_fact`."""
        start = self.template.find("{}")
        hits = [m.start() for m in re.finditer(re.escape(self.subject), self.prompt)]
        return hits.index(start) if start in hits else 0

    def describe(self, index: int | None = None) -> str:
        """A short name for messages: ``request 3 (subject 'Paris', case_id 17)``."""
        head = "request" if index is None else f"request {index}"
        extra = f", case_id {self.case_id}" if self.case_id is not None else ""
        return f"{head} (subject {self.subject!r}{extra})"

    def problems(self) -> list[str]:
        """What is wrong with this request without looking at a model (empty list: fine)."""
        out = []
        if not self.subject.strip():
            out.append("empty subject")
        n = self.template.count("{}")
        if n == 0:
            out.append(f"the subject is not in the template {self.template!r} (no '{{}}')")
        elif n > 1:
            out.append(f"the template {self.template!r} has {n} '{{}}'; expected exactly one")
        else:
            try:
                ok = self.template.format(self.subject) == self.prompt
            except (IndexError, KeyError, ValueError):
                ok = False
            if not ok:
                out.append(f"the template {self.template!r} has braces other than one '{{}}'")
        if not self.target_new.strip():
            out.append(f"empty target_new {self.target_new!r}")
        if self.target_true is not None and not self.target_true.strip():
            out.append(f"empty target_true {self.target_true!r}")
        return out

    def to_dict(self) -> dict:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> EditRequest:
        """Inverse of :meth:`to_dict`. Unknown keys raise an InvalidRequest naming them."""
        if not isinstance(d, dict):
            raise InvalidRequest(f"expected a dict for an EditRequest, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidRequest(f"unknown EditRequest field(s) {unknown}")
        return cls(**d)


# --------------------------------------------------------------------------- JSON


def _text(value: Any, where: str, key: str) -> str:
    text = value.get("str") if isinstance(value, dict) else value
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}: {key} must be a string or {{'str': ...}}, got {value!r}")
    return text


def _parse_one(rec: Any, index: int) -> EditRequest:
    where = f"request {index}"
    if not isinstance(rec, dict):
        raise InvalidRequest(f"{where}: expected a JSON object, got {type(rec).__name__}")
    case = f", case_id {rec['case_id']}" if "case_id" in rec else ""
    where = f"request {index} ({case[2:]})" if case else where
    body = rec.get("requested_rewrite", rec)
    if not isinstance(body, dict):
        raise InvalidRequest(f"{where}: requested_rewrite must be an object")
    prompt = body.get("prompt", body.get("template"))
    missing = [k for k, v in (("prompt", prompt), ("subject", body.get("subject"))) if v is None]
    if body.get("target_new") is None:
        missing.append("target_new")
    if missing:
        raise InvalidRequest(f"{where}: missing field(s) {missing}")
    subject = _text(body["subject"], where, "subject")
    where = f"request {index} (subject {subject!r}{case})"
    prompt = _text(prompt, where, "prompt")
    if not subject.strip():
        raise InvalidRequest(f"{where}: empty subject")
    if "{}" in prompt:
        template = prompt
    elif subject and subject in prompt:  # a full prompt: the first occurrence is the subject
        template = prompt.replace(subject, "{}", 1)
    else:
        hint = ""
        if subject and subject.strip().lower() in prompt.lower():
            hint = " (it appears only with different case or spacing)"
        raise InvalidRequest(f"{where}: subject {subject!r} is not in the prompt {prompt!r}{hint}")
    true = body.get("target_true", body.get("ground_truth"))
    case_id = rec.get("case_id", body.get("case_id"))
    relation = body.get("relation_id", rec.get("relation_id"))
    return EditRequest(
        template=template,
        subject=subject,
        target_new=_text(body["target_new"], where, "target_new"),
        target_true=None if true is None else _text(true, where, "target_true"),
        case_id=int(case_id) if case_id is not None else None,
        relation_id=relation,
    )


def load_requests(path: str | Path) -> list[EditRequest]:
    """Read edit requests from a JSON (or .json.gz) file: a list of objects or one object.

    Accepted shapes per object: CounterFact's ``{"case_id", "requested_rewrite": {"prompt"
    with "{}", "subject", "target_new": {"str"}, "target_true": {"str"}}}``; a flat
    ``{"prompt" (with "{}" or the full prompt containing the subject), "subject",
    "target_new", ["target_true" | "ground_truth"], ["case_id"], ["relation_id"]}``; or the
    :meth:`EditRequest.to_dict` shape (``"template"``). Errors name the request's index.
    Content checks that need no model run here too (see :meth:`EditRequest.problems`).
    """
    src = Path(path)
    if not src.is_file():
        raise InvalidRequest(f"no requests file {src}")
    opener = gzip.open if src.suffix == ".gz" else open
    try:
        with opener(src, "rt", encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{src}: not valid JSON ({exc})") from exc
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise InvalidRequest(f"{src}: no requests in the file")
    requests = [_parse_one(r, i) for i, r in enumerate(items)]
    for i, req in enumerate(requests):
        bad = req.problems()
        if bad:
            raise InvalidRequest(f"{src}: {req.describe(i)}: {'; '.join(bad)}")
    return requests


# --------------------------------------------------------------------------- validation


class ConflictIndex:
    """Requests taken so far, indexed by (subject, template) and (subject, relation):
    :meth:`problem` says whether another request repeats or contradicts one of them (one
    batch cannot write two values for the same fact)."""

    def __init__(self) -> None:
        self._by_template: dict[tuple[str, str], tuple[int | None, EditRequest]] = {}
        self._by_relation: dict[tuple[str, str], tuple[int | None, EditRequest]] = {}

    def problem(self, req: EditRequest, index: int | None = None) -> str | None:
        """Why ``req`` (numbered ``index`` in messages) cannot join the requests taken, or
        None."""
        hit = self._by_template.get((req.subject, req.template))
        if hit is not None:
            j, other = hit
            if other.target_new == req.target_new:
                return (
                    f"{req.describe(index)} duplicates {other.describe(j)}: same subject, "
                    f"template and target {req.target_new!r}; pass each edit once"
                )
            return (
                f"{req.describe(index)} conflicts with {other.describe(j)}: same subject and "
                f"template {req.template!r}, different targets {other.target_new!r} and "
                f"{req.target_new!r}"
            )
        if req.relation_id is not None:
            hit = self._by_relation.get((req.subject, req.relation_id))
            if hit is not None and hit[1].target_new != req.target_new:
                j, other = hit
                return (
                    f"{req.describe(index)} conflicts with {other.describe(j)}: same subject "
                    f"and relation {req.relation_id!r}, different targets "
                    f"{other.target_new!r} and {req.target_new!r}"
                )
        return None

    def add(self, req: EditRequest, index: int | None = None) -> None:
        """Take ``req`` (the first request for a key stays the one later ones are named
        against)."""
        self._by_template.setdefault((req.subject, req.template), (index, req))
        if req.relation_id is not None:
            self._by_relation.setdefault((req.subject, req.relation_id), (index, req))


def _check_conflicts(requests: Sequence[EditRequest]) -> None:
    index = ConflictIndex()
    for i, req in enumerate(requests):
        problem = index.problem(req, i)
        if problem is not None:
            raise InvalidRequest(problem)
        index.add(req, i)


def validate_requests(model: HookedModel, requests: Sequence[object]) -> None:
    """Check a batch of requests against ``model``; raise an InvalidRequest naming the first bad
    request (index and subject) and what is wrong with it.

    Checks: the template holds the subject (one ``{}``), non-empty subject and targets,
    targets that tokenise to at least one token, the subject covers at least one token of the
    prompt, the prompt plus target fits the model's context, and no two requests are
    duplicates or conflict (same subject and template, or same subject and relation, with
    different new targets). Never touches the model's weights.
    """
    if not requests:
        raise InvalidRequest("no edit requests given")
    for i, req in enumerate(requests):
        if not isinstance(req, EditRequest):
            raise InvalidRequest(f"request {i}: expected an EditRequest, got {type(req).__name__}")
        bad = req.problems()
        if bad:
            raise InvalidRequest(f"{req.describe(i)}: {'; '.join(bad)}")
        for name in ("target_new", "target_true"):
            text = getattr(req, name)
            if text is None:
                continue
            try:
                target_ids(model, text)
            except InvalidInput as exc:
                raise InvalidRequest(f"{req.describe(i)}: {name}: {exc}") from exc
        try:
            fact = tokenize_fact(model, req.prompt, req.subject, req.subject_occurrence)
        except InvalidInput as exc:
            raise InvalidRequest(f"{req.describe(i)}: {exc}") from exc
        n_total = len(fact.ids) + len(target_ids(model, req.target_new))
        if n_total > context_length(model):
            raise InvalidRequest(
                f"{req.describe(i)}: prompt and target take {n_total} tokens, more than the "
                f"model's context ({context_length(model)})"
            )
    _check_conflicts([r for r in requests if isinstance(r, EditRequest)])
