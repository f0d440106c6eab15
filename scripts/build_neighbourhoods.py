"""Rebuild CounterFact's ten-prompt neighbourhoods from the shipped reduced cases.

    .venv/bin/python scripts/build_neighbourhoods.py [--out editing/data/...json.gz] [--check]

The shipped CounterFact (``editing/data/counterfact_reduced.json.gz``, EasyEdit's reduced form)
keeps one neighbourhood prompt per case; ROME's CounterFact has ten: prompts about *other*
subjects with the same relation and the same true object. This script rebuilds them from the
21,919 shipped cases and writes ``editing/data/counterfact_neighbourhoods.json.gz``.

Relations. A case's template is its prompt with the subject replaced by ``{}``; the template
of its (shipped) neighbourhood prompt is the most specific known template the prompt
instantiates (longest literal text, then string order). CounterFact uses some templates for
several relations (``{} is located in``: P17, P30, P131, P276), so a template maps to a *set*
of Wikidata relation ids:

1. direct (source ``known_1000`` and/or ``counterfact_full``): ``tracing/data/known_1000.json.gz``
   (``template`` -> ``relation_id``) and the five full-schema records of
   ``editing/data/counterfact_full_first5.json.gz``;
2. derived (source ``derived``), in rounds until nothing changes: a template without ids gets
   the ids of the cases resolved by rules a-c below whose case template or neighbourhood
   template it is (so after the rounds, rule c has nothing left to resolve). Templates that
   still have no id have source ``none``.

Each case then takes the first rule that gives it one id: (a) its template has one id; (b) its
template and its neighbourhood template share exactly one; (c) its template has none and its
neighbourhood template has one; (d) of the candidates (the ids both templates share, else the
ids of either), exactly one has the case's true object among its objects (known_1000's
attributes and the true objects of the cases that rule a resolved with a directly mapped
template); otherwise the candidates that do (all if none do) joined by ``|`` (an "ambiguous"
id such as ``P131|P276``, a relation of its own). (e) A case whose two templates have no id
belongs to ``unmapped:<template>``: the templates of such cases, in connected components
linked by (case template, neighbourhood template) pairs, each named by its first template in
string order.

Neighbours. The candidates of a case are the other cases with the same relation id and the
same ``ground_truth`` whose subject differs from the case's (compared case-insensitively) and
whose prompt does not contain the case's subject (case-insensitively). They are ranked by the
SHA-256 of ``"<case_id>:<candidate case_id>"`` (a fixed pseudo-random order, independent of
the other candidates), prompts already taken are skipped, and the first ten are kept, listed
by case id. A neighbourhood prompt is the neighbour case's ``prompt`` (its subject filled in).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from editing.statistics.corpus import data_path

OUT_NAME = "counterfact_neighbourhoods.json.gz"
SOURCE_NAME = "counterfact_reduced.json.gz"
N_NEIGHBOURS = 10
WAYS = ("template", "template+neighbour", "neighbour template", "object", "ambiguous", "unmapped")


def _read_gz_json(path: Path) -> Any:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def source_digest(path: Path | None = None) -> str:
    """SHA-256 of the decompressed reduced CounterFact file (what the neighbourhoods were
    built from)."""
    with gzip.open(path or data_path(SOURCE_NAME), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def case_template(case: dict) -> str:
    """The case's prompt with its subject replaced by ``{}`` (the prompt itself if the subject
    is not in it)."""
    prompt, subject = case["prompt"], case["subject"]
    return prompt.replace(subject, "{}", 1) if subject in prompt else prompt


class TemplateMatcher:
    """Finds the most specific template a prompt instantiates (``{}`` stands for any
    non-empty text): the one with the longest literal text, ties in string order."""

    def __init__(self, templates: Iterable[str]) -> None:
        usable = {t for t in templates if t.count("{}") == 1}
        ordered = sorted(usable, key=lambda t: (-len(t.replace("{}", "")), t))
        self._parts = [(t, *t.split("{}")) for t in ordered]

    def match(self, prompt: str) -> str | None:
        """The template, or None if no template fits."""
        for template, head, tail in self._parts:
            if (
                len(prompt) > len(head) + len(tail)
                and prompt.startswith(head)
                and prompt.endswith(tail)
            ):
                return template
        return None


#: Where a template's relation ids come from.
SOURCES = ("known_1000", "counterfact_full", "known_1000+counterfact_full", "derived", "none")


def direct_relations(
    known: Sequence[dict], full: Sequence[dict]
) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Template -> relation ids given by known_1000 records and full-schema CounterFact, and
    template -> which of the two gave them (see :data:`SOURCES`)."""
    table: dict[str, set[str]] = defaultdict(set)
    given: dict[str, set[str]] = defaultdict(set)
    pairs = [("known_1000", r["template"], r["relation_id"]) for r in known]
    for r in full:
        rw = r["requested_rewrite"]
        pairs.append(("counterfact_full", rw["prompt"], rw["relation_id"]))
    for name, template, relation in pairs:
        table[template].add(relation)
        given[template].add(name)
    order = ("known_1000", "counterfact_full")
    return dict(table), {t: "+".join(n for n in order if n in v) for t, v in given.items()}


def _resolve(ids_case: set[str], ids_nbr: set[str]) -> tuple[str, str] | None:
    """Rules a-c: (relation id, way) or None."""
    if len(ids_case) == 1:
        return next(iter(ids_case)), "template"
    shared = ids_case & ids_nbr
    if ids_case and len(shared) == 1:
        return next(iter(shared)), "template+neighbour"
    if not ids_case and len(ids_nbr) == 1:
        return next(iter(ids_nbr)), "neighbour template"
    return None


def _unmapped_groups(pairs: Iterable[tuple[str, str | None]]) -> dict[str, str]:
    """Template -> name of its connected component (``unmapped:<first template>``)."""
    parent: dict[str, str] = {}

    def root(t: str) -> str:
        parent.setdefault(t, t)
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for a, b in pairs:
        ra = root(a)
        if b is not None:
            rb = root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return {t: f"unmapped:{root(t)}" for t in sorted(parent)}


def assign_relations(
    cases: Sequence[dict], known: Sequence[dict], full: Sequence[dict]
) -> tuple[dict[int, tuple[str, str]], dict[str, dict[str, Any]]]:
    """Relation id and way (see :data:`WAYS`) of every case, and the template table
    (template -> ``{"relation_ids", "source"}``, sources: :data:`SOURCES`)."""
    table, source = direct_relations(known, full)
    direct = set(table)
    t_case = {c["case_id"]: case_template(c) for c in cases}
    matcher = TemplateMatcher(set(t_case.values()) | set(table))
    t_nbr = {c["case_id"]: matcher.match(c.get("locality_prompt") or "") for c in cases}

    def ids(template: str | None) -> set[str]:
        return table.get(template, set()) if template is not None else set()

    while True:
        resolved = {i: _resolve(ids(t_case[i]), ids(t_nbr[i])) for i in t_case}
        new: dict[str, set[str]] = defaultdict(set)
        for i, hit in resolved.items():
            for t in (t_case[i], t_nbr[i]):
                if hit is not None and t is not None and t not in table:
                    new[t].add(hit[0])
        if not new:
            break
        for t in sorted(new):
            table[t], source[t] = new[t], "derived"

    objects: dict[str, set[str]] = defaultdict(set)
    for rec in known:
        objects[rec["relation_id"]].add(rec["attribute"])
    truth = {c["case_id"]: c["ground_truth"] for c in cases}
    for i, hit in resolved.items():
        if hit is not None and hit[1] == "template" and t_case[i] in direct:
            objects[hit[0]].add(truth[i])

    out: dict[int, tuple[str, str]] = {}
    either = {i: ids(t_case[i]) | ids(t_nbr[i]) for i in t_case}
    unmapped = [i for i in t_case if not either[i]]
    groups = _unmapped_groups((t_case[i], t_nbr[i]) for i in unmapped)
    for i in t_case:
        hit = resolved[i]
        if hit is not None:
            out[i] = hit
            continue
        candidates = (ids(t_case[i]) & ids(t_nbr[i])) or either[i]
        if not candidates:
            out[i] = (groups[t_case[i]], "unmapped")
            continue
        fits = {r for r in candidates if truth[i] in objects[r]}
        if len(fits) == 1:
            out[i] = (next(iter(fits)), "object")
        else:
            out[i] = ("|".join(sorted(fits or candidates)), "ambiguous")
    used = set(t_case.values())
    templates = {
        t: {
            "relation_ids": sorted(table.get(t, ())),
            "source": source.get(t, "none"),
        }
        for t in sorted(used)
    }
    return out, templates


def _rank(case_id: int, other: int) -> str:
    return hashlib.sha256(f"{case_id}:{other}".encode()).hexdigest()


def choose_neighbours(
    cases: Sequence[dict], relations: dict[int, tuple[str, str]], k: int = N_NEIGHBOURS
) -> dict[int, list[int]]:
    """Case id -> the case ids of its (at most ``k``) neighbours, sorted (see the module
    docstring for the rule)."""
    by_key: dict[tuple[str, str], list[int]] = defaultdict(list)
    lower = {c["case_id"]: (c["subject"].lower(), c["prompt"].lower()) for c in cases}
    prompt = {c["case_id"]: c["prompt"] for c in cases}
    for c in cases:
        by_key[(relations[c["case_id"]][0], c["ground_truth"])].append(c["case_id"])
    out: dict[int, list[int]] = {}
    for c in cases:
        i = c["case_id"]
        subject = lower[i][0]
        pool = [
            j
            for j in by_key[(relations[i][0], c["ground_truth"])]
            if lower[j][0] != subject and subject not in lower[j][1]
        ]
        pool.sort(key=lambda j: _rank(i, j))
        taken: list[int] = []
        seen: set[str] = set()
        for j in pool:
            if prompt[j] not in seen:
                seen.add(prompt[j])
                taken.append(j)
            if len(taken) == k:
                break
        out[i] = sorted(taken)
    return out


def build(
    cases: Sequence[dict], known: Sequence[dict], full: Sequence[dict], digest: str
) -> dict[str, Any]:
    """The neighbourhood file's content: provenance, counts, the template table and, per
    case (sorted by case id), its relation id, how it was assigned, its neighbours' case ids
    and their prompts."""
    cases = sorted(cases, key=lambda c: int(c["case_id"]))
    relations, templates = assign_relations(cases, known, full)
    chosen = choose_neighbours(cases, relations)
    prompt = {c["case_id"]: c["prompt"] for c in cases}
    sizes = Counter(len(v) for v in chosen.values())
    ways = Counter(w for _, w in relations.values())
    t_sources = Counter(t["source"] for t in templates.values())
    per_template = Counter(case_template(c) for c in cases)
    counts = {
        "cases": len(cases),
        "templates": len(templates),
        "templates_by_source": {s: t_sources.get(s, 0) for s in SOURCES},
        "cases_by_template_source": {
            s: sum(n for t, n in per_template.items() if templates[t]["source"] == s)
            for s in SOURCES
        },
        "cases_by_relation_way": {w: ways.get(w, 0) for w in WAYS},
        "relation_ids": len({r for r, _ in relations.values()}),
        "neighbour_prompts": sum(len(v) for v in chosen.values()),
        "cases_with_ten": sizes.get(N_NEIGHBOURS, 0),
        "cases_with_fewer_than_ten": len(cases) - sizes.get(N_NEIGHBOURS, 0),
        "cases_with_zero": sizes.get(0, 0),
        "cases_by_neighbour_count": {str(n): sizes.get(n, 0) for n in range(N_NEIGHBOURS + 1)},
    }
    return {
        "description": "CounterFact neighbourhood prompts (up to ten per case: other subjects, "
        "same relation, same true object), rebuilt from the shipped reduced cases",
        "made_by": "scripts/build_neighbourhoods.py",
        "source": {"file": f"editing/data/{SOURCE_NAME}", "sha256_decompressed": digest},
        "relation_sources": [
            "tracing/data/known_1000.json.gz",
            "editing/data/counterfact_full_first5.json.gz",
        ],
        "rules": (__doc__ or "").split("\n\n", 2)[2].strip(),
        "counts": counts,
        "templates": templates,
        "cases": [
            {
                "case_id": c["case_id"],
                "relation_id": relations[c["case_id"]][0],
                "relation_way": relations[c["case_id"]][1],
                "neighbour_ids": chosen[c["case_id"]],
                "prompts": [prompt[j] for j in chosen[c["case_id"]]],
            }
            for c in cases
        ],
    }


def build_from_shipped() -> dict[str, Any]:
    """:func:`build` on the shipped data files."""
    known_path = Path(str(files("tracing").joinpath("data").joinpath("known_1000.json.gz")))
    return build(
        _read_gz_json(data_path(SOURCE_NAME)),
        _read_gz_json(known_path),
        _read_gz_json(data_path("counterfact_full_first5.json.gz")),
        source_digest(),
    )


def encode(content: dict[str, Any]) -> bytes:
    """The gzip bytes written for ``content`` (no timestamp or file name: reproducible)."""
    text = json.dumps(content, ensure_ascii=False, indent=None, separators=(",", ":"))
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or, with ``--check``, compare against) the neighbourhood file."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=data_path(OUT_NAME))
    ap.add_argument("--check", action="store_true", help="fail if --out differs from a rebuild")
    args = ap.parse_args(argv)
    content = build_from_shipped()
    data = encode(content)
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == data
        print(f"{args.out}: {'up to date' if same else 'differs from a rebuild'}")
        return 0 if same else 1
    args.out.write_bytes(data)
    print(f"written {args.out} ({len(data):,} bytes)")
    print(json.dumps(content["counts"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
