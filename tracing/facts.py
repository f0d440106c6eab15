"""Fact records, locating a subject's tokens in a prompt, and the shipped known_1000 set."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from tracing.chat import wrap_prompt
from tracing.errors import InvalidInput
from tracing.forward import next_token_probs
from tracing.models import HookedModel, target_ids, tokenize


@dataclass(frozen=True)
class Fact:
    """One factual prompt: ``prompt`` contains ``subject``; ``answer`` is what follows
    (``None``: use the model's own top-1 prediction)."""

    prompt: str
    subject: str
    answer: str | None = None
    relation_id: str | None = None
    known_id: int | None = None
    template: str | None = None


@dataclass(frozen=True)
class TokenizedFact:
    """A prompt's token ids and the half-open token span ``[start, end)`` of its subject."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    subject_span: tuple[int, int]

    @property
    def subject_last(self) -> int:
        """Index of the subject's last token."""
        return self.subject_span[1] - 1


def find_subject(prompt: str, subject: str, occurrence: int = 0) -> tuple[int, int]:
    """Character span of the ``occurrence``-th appearance of ``subject`` in ``prompt``.

    Raises an InvalidInput error that says what is wrong: empty input, a subject that only
    appears with different case or spacing, a subject that does not appear, or too few
    occurrences.
    """
    if not prompt or not prompt.strip():
        raise InvalidInput("empty prompt")
    if not subject or not subject.strip():
        raise InvalidInput("empty subject")
    starts = [m.start() for m in re.finditer(re.escape(subject), prompt)]
    if not starts:
        squash = re.compile(r"\s+")
        norm_p, norm_s = squash.sub(" ", prompt).lower(), squash.sub(" ", subject.strip()).lower()
        if norm_s in norm_p:
            raise InvalidInput(
                f"subject {subject!r} is not in the prompt {prompt!r} as written; it appears "
                f"only with different case or spacing: pass it exactly as in the prompt"
            )
        raise InvalidInput(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    if not 0 <= occurrence < len(starts):
        raise InvalidInput(
            f"subject {subject!r} occurs {len(starts)} time(s) in the prompt; "
            f"occurrence {occurrence} does not exist"
        )
    start = starts[occurrence]
    return start, start + len(subject)


def tokenize_fact(
    model: HookedModel, prompt: str, subject: str, occurrence: int = 0
) -> TokenizedFact:
    """Tokenise ``prompt`` with the model's BOS rule and find the subject's token span.

    The span holds every token whose characters overlap the subject's characters (a leading
    space merged into a subject token is fine). With the model's chat template on, the
    prompt is tokenised in its chat form and the span is the subject's inside it.
    """
    start, end = find_subject(prompt, subject, occurrence)
    prompt, shift = wrap_prompt(model, prompt)  # the chat template, when on (tracing.chat)
    start, end = start + shift, end + shift
    tok = model.tokenizer
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = tokenize(model, prompt)
    shift = len(ids) - len(enc["input_ids"])  # 1 when a BOS was prepended
    hits = [i + shift for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    if not hits:
        raise InvalidInput(f"subject {subject!r} covers no token of the prompt {prompt!r}")
    tokens = tuple(tok.decode([i]) for i in ids)
    return TokenizedFact(tuple(ids), tokens, (hits[0], hits[-1] + 1))


def known_facts(model: HookedModel, facts: Sequence[Fact], batch_size: int = 32) -> list[Fact]:
    """The facts whose answer's first token is the model's top-1 next token (facts without an
    answer are kept: their answer will be the model's own prediction)."""
    with_answer = [f for f in facts if f.answer]
    keep_ids: set[int] = set()
    for i in range(0, len(with_answer), 256):
        chunk = with_answer[i : i + 256]
        top = next_token_probs(model, [f.prompt for f in chunk], batch_size).argmax(-1)
        for f, t in zip(chunk, top.tolist(), strict=True):
            if f.answer and target_ids(model, f.answer)[0] == t:
                keep_ids.add(id(f))
    return [f for f in facts if not f.answer or id(f) in keep_ids]


def _data_file(name: str) -> Path:
    return Path(str(files("tracing").joinpath("data").joinpath(name)))


def load_known_facts(path: str | Path | None = None) -> list[Fact]:
    """The ROME tracing set ``known_1000.json`` (1,209 facts GPT-2 XL knows), shipped with
    factscope; or any JSON list of records with ``prompt`` and ``subject`` (optional
    ``attribute``/``answer``, ``relation_id``, ``known_id``, ``template``)."""
    src = Path(path) if path else _data_file("known_1000.json.gz")
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rt", encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, list):
        raise InvalidInput(f"{src}: expected a JSON list of facts")
    facts = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or not r.get("prompt") or not r.get("subject"):
            raise InvalidInput(f"{src}: record {i} lacks a non-empty 'prompt' and 'subject'")
        answer = r.get("answer", r.get("attribute"))
        facts.append(
            Fact(
                prompt=r["prompt"],
                subject=r["subject"],
                answer=f" {answer.strip()}" if answer else None,
                relation_id=r.get("relation_id"),
                known_id=r.get("known_id", i),
                template=r.get("template"),
            )
        )
    return facts
