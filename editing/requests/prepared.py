"""Requests prepared once: validated, put into every context template and tokenised.

:func:`prepare_requests` checks a batch of :class:`~editing.requests.EditRequest` against the
model (:func:`~editing.requests.validate_requests`) and tokenises, once, everything any method
reads: for each context template the prompt's token ids and the index of the subject's last
token, the KL prompt ``"{subject} is a"``, and the new target's token ids. Methods take the
resulting :class:`PreparedRequest` values and never tokenise again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from editing.requests.context import check_templates, fill_template
from editing.requests.request import EditRequest, validate_requests
from tracing.errors import InvalidInput, InvalidRequest
from tracing.facts import Fact, load_known_facts, tokenize_fact
from tracing.models import HookedModel, target_ids

KL_TEMPLATE = "{} is a"


@dataclass(frozen=True)
class TemplatedPrompt:
    """One tokenised prompt: ``template`` filled with the request's prompt (or, for the KL
    prompt, with its subject), its token ids (model's BOS rule) and the index of the subject's
    last token."""

    template: str
    ids: tuple[int, ...]
    subject_last: int
    group: int = 0  # context-template group (0: the bare prompt)


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request with every tokenisation a method needs. ``prompts[0]`` is the
    bare edit prompt (template ``"{}"``); the others follow the context templates in order."""

    request: EditRequest
    target: tuple[int, ...]  # token ids of target_new (no BOS)
    prompts: tuple[TemplatedPrompt, ...]
    kl: TemplatedPrompt  # "{subject} is a"

    @property
    def plain(self) -> TemplatedPrompt:
        """The bare edit prompt."""
        return self.prompts[0]


def _subject_ids(
    model: HookedModel, text: str, subject: str, char_start: int
) -> tuple[tuple[int, ...], int]:
    starts = [m.start() for m in re.finditer(re.escape(subject), text)]
    occurrence = starts.index(char_start) if char_start in starts else 0
    fact = tokenize_fact(model, text, subject, occurrence)
    return tuple(fact.ids), fact.subject_last


def templated_prompt(
    model: HookedModel, request: EditRequest, template: str, group: int = 0
) -> TemplatedPrompt:
    """``template`` filled with ``request``'s prompt, tokenised, with the subject-last index
    of the subject occurrence that the request's ``{}`` stands for."""
    text = fill_template(template, request.prompt)
    char_start = template.find("{}") + request.template.find("{}")
    ids, last = _subject_ids(model, text, request.subject, char_start)
    return TemplatedPrompt(template, ids, last, group)


def template_groups(templates: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """Context templates as groups, the bare ``"{}"`` alone first: a flat list of templates
    is one group after it (what a user passes); a list of lists is taken as the groups (what
    :func:`editing.requests.context.context_template_groups` makes). Repeats are dropped."""
    if isinstance(templates, str):
        raise InvalidInput("context templates must be a list of strings, not one string")
    items = list(templates)
    nested: list[list[str]]
    if items and not isinstance(items[0], str):
        nested = [[str(t) for t in g] for g in items]
    else:
        nested = [[str(t) for t in items]]
    seen = {"{}"}
    groups: list[list[str]] = [["{}"]]
    for group in nested:
        kept = [t for t in check_templates(group) if t not in seen]
        seen.update(kept)
        if kept:
            groups.append(kept)
    return groups


def prepare_requests(
    model: HookedModel,
    requests: Sequence[EditRequest],
    templates: Sequence[str] | Sequence[Sequence[str]] = ("{}",),
) -> list[PreparedRequest]:
    """Validate ``requests`` against ``model`` (an :class:`~tracing.errors.InvalidRequest`
    names the first bad one) and tokenise each in every context template (the bare ``"{}"``
    is always first; ``templates`` flat or by group, see :func:`template_groups`)."""
    requests = list(requests)
    validate_requests(model, requests)
    groups = template_groups(templates)
    out = []
    for req in requests:
        kl_ids, kl_last = _subject_ids(model, KL_TEMPLATE.format(req.subject), req.subject, 0)
        out.append(
            PreparedRequest(
                request=req,
                target=tuple(target_ids(model, req.target_new)),
                prompts=tuple(
                    templated_prompt(model, req, t, g)
                    for g, group in enumerate(groups)
                    for t in group
                ),
                kl=TemplatedPrompt(KL_TEMPLATE, kl_ids, kl_last),
            )
        )
    return out


def neighbour_prompts(
    model: HookedModel,
    request: EditRequest,
    n: int,
    facts: Sequence[Fact] | None = None,
) -> tuple[TemplatedPrompt, ...]:
    """Up to ``n`` neighbour-like prompts of ``request``: its template filled with *other*
    subjects of the same relation, tokenised, each with its subject's last token.

    The subjects come from ``facts`` (default: the shipped known_1000 facts,
    :func:`tracing.facts.load_known_facts`): those with the request's ``relation_id`` or,
    when the request has none, those whose template is the request's; the first ``n``
    distinct subjects in file order that differ from the request's (deterministic). These
    are the prompts CounterFact's neighbourhood measures (Meng et al. 2022: other subjects,
    same relation), built without its answers. Raises
    :class:`~tracing.errors.InvalidRequest` when no such subject exists.
    """
    pool = load_known_facts() if facts is None else facts
    if request.relation_id is not None:
        same = [f for f in pool if f.relation_id == request.relation_id]
    else:
        same = [f for f in pool if f.template == request.template]
    seen = {request.subject.strip().lower()}
    out: list[TemplatedPrompt] = []
    for f in same:
        key = f.subject.strip().lower()
        if key in seen or "{" in f.subject or "}" in f.subject:
            continue
        seen.add(key)
        ids, last = _subject_ids(
            model,
            request.template.replace("{}", f.subject, 1),
            f.subject,
            request.template.find("{}"),
        )
        out.append(TemplatedPrompt(request.template, ids, last))
        if len(out) == n:
            break
    if not out:
        raise InvalidRequest(
            f"{request.describe()}: no other subject of its relation for neighbour prompts "
            "(it has no relation_id and its template matches no known fact)"
        )
    return tuple(out)
