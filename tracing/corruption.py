"""How the subject is corrupted: Gaussian noise (the papers') or symmetric token replacement.

* ``noise`` (default, Meng et al. 2022): Gaussian noise added to the subject's embeddings in
  ``samples`` corrupted runs (:mod:`tracing.noise`).
* ``replace`` (symmetric token replacement, STR: Zhang and Nanda 2024; Heimersheim and Nanda
  2024): the subject's tokens are replaced by another subject's, of the same token length, in
  one corrupted run: the prompt stays in-distribution, and the competitor of a ``logit-diff``
  is the replacement subject's own answer. By default the replacement is one of the shipped
  known facts (known_1000) with the same relation as the traced prompt (the known fact with
  this prompt and subject, or whose template gives this prompt) and a different answer,
  chosen deterministically by ``seed`` among those whose tokens line up with the subject's;
  or the user names it (``replacement``). A prompt of no known relation draws from every
  known fact (noted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracing.errors import InvalidInput
from tracing.facts import Fact, TokenizedFact, find_subject, load_known_facts, tokenize_fact
from tracing.models import HookedModel, target_ids

CORRUPTIONS = ("noise", "replace")
DEFAULT_CORRUPTION = "noise"


@dataclass(frozen=True)
class Replacement:
    """The corrupted prompt of token replacement: its token ids (aligned with the clean
    prompt's), the replacement subject and, when it comes from a known fact, that fact's
    answer token (the competitor of ``logit-diff``)."""

    subject: str
    ids: tuple[int, ...]
    competitor_id: int | None
    note: str | None = None


def replaced_prompt(prompt: str, subject: str, replacement: str, occurrence: int = 0) -> str:
    """``prompt`` with the ``occurrence``-th ``subject`` replaced by ``replacement``."""
    start, end = find_subject(prompt, subject, occurrence)
    return prompt[:start] + replacement + prompt[end:]


def aligned(
    model: HookedModel, clean: TokenizedFact, prompt: str, subject: str, other: str, occurrence: int
) -> tuple[tuple[int, ...] | None, int]:
    """The replaced prompt's ids when they line up with the clean prompt's (same length, the
    subject on the same span, every other token equal), else None; and the replacement's
    token length in that prompt."""
    new = tokenize_fact(
        model, replaced_prompt(prompt, subject, other, occurrence), other, occurrence
    )
    width = new.subject_span[1] - new.subject_span[0]
    start, end = clean.subject_span
    ok = (
        len(new.ids) == len(clean.ids)
        and new.subject_span == clean.subject_span
        and new.ids[:start] == clean.ids[:start]
        and new.ids[end:] == clean.ids[end:]
    )
    return (new.ids if ok else None), width


def _relation(prompt: str, subject: str, facts: list[Fact]) -> str | None:
    for f in facts:
        if f.relation_id and (
            (f.prompt == prompt and f.subject == subject)
            or (f.template and "{}" in f.template and f.template.format(subject) == prompt)
        ):
            return f.relation_id
    return None


def choose_replacement(
    model: HookedModel,
    clean: TokenizedFact,
    prompt: str,
    subject: str,
    answer_id: int,
    seed: int,
    occurrence: int = 0,
    replacement: str | None = None,
) -> Replacement:
    """The subject replacement of a ``replace`` trace (see the module doc). Refused: a
    replacement equal to the subject, one whose tokens do not line up with the subject's,
    and a relation with no known subject of the subject's token length (the error lists the
    lengths there are)."""
    n_tok = clean.subject_span[1] - clean.subject_span[0]
    if replacement is not None:
        if replacement.strip() == subject.strip():
            raise InvalidInput(f"the replacement subject {replacement!r} is the subject itself")
        ids, width = aligned(model, clean, prompt, subject, replacement, occurrence)
        if ids is None:
            raise InvalidInput(
                f"replacement {replacement!r} is {width} token(s) in this prompt where the subject "
                f"{subject!r} is {n_tok}: token replacement needs a subject of the same length"
            )
        return Replacement(replacement, ids, None)
    facts = load_known_facts()
    relation = _relation(prompt, subject, facts)
    note = None
    if relation is None:
        note = "no known fact has this prompt's relation: the replacement is drawn from all of them"
    pool = [
        f
        for f in facts
        if (relation is None or f.relation_id == relation)
        and f.answer
        and f.subject.strip() != subject.strip()
        and target_ids(model, f.answer)[0] != answer_id
    ]
    order = np.random.RandomState(seed).permutation(len(pool))
    widths: set[int] = set()
    for i in order:
        f = pool[int(i)]
        ids, width = aligned(model, clean, prompt, subject, f.subject, occurrence)
        if ids is not None:
            assert f.answer is not None
            return Replacement(f.subject, ids, target_ids(model, f.answer)[0], note)
        widths.add(width)
    where = f"relation {relation}" if relation else "the known facts"
    raise InvalidInput(
        f"no subject of {where} with a different answer lines up with the subject's "
        f"{n_tok} token(s) (their lengths here: {sorted(widths) or 'none'}); pass --replacement"
    )
