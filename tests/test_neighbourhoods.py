"""CounterFact's rebuilt ten-prompt neighbourhoods: the builder's rules on hand-made cases, the
shipped file against the rules and against a rebuild, loading both CounterFact forms under
different labels, and the per-case neighbourhood gain of the new target."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import re

import pytest
from script_loader import load_script

from editing.evaluation import evaluate
from editing.evaluation.datasets import CounterFactRecord, load_counterfact
from editing.evaluation.metrics import TokenScores, counterfact_metrics, score_counterfact
from editing.evaluation.tasks import load_cases, split_cases, tuning_case_ids
from editing.statistics.corpus import data_path
from tracing.errors import InvalidInput

bn = load_script("scripts/build_neighbourhoods.py")


@pytest.fixture(scope="module")
def shipped() -> dict:
    with gzip.open(data_path("counterfact_neighbourhoods.json.gz"), "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reduced() -> dict[int, dict]:
    with gzip.open(data_path("counterfact_reduced.json.gz"), "rt", encoding="utf-8") as f:
        return {c["case_id"]: c for c in json.load(f)}


# --------------------------------------------------------------------------- the rules


def _case(i: int, subject: str, prompt: str, truth: str, locality: str) -> dict:
    return {
        "case_id": i,
        "prompt": prompt,
        "subject": subject,
        "target_new": "Nothing",
        "ground_truth": truth,
        "rephrase_prompt": "",
        "locality_prompt": locality,
    }


KNOWN = [
    {"template": "{} speaks", "relation_id": "P1", "attribute": "French"},
    {"template": "{} is located in", "relation_id": "P2", "attribute": "Paris"},
    {"template": "{} is located in", "relation_id": "P3", "attribute": "Europe"},
    {"template": "{} belongs to the continent of", "relation_id": "P3", "attribute": "Europe"},
]
FULL = [
    {
        "case_id": 99,
        "requested_rewrite": {"prompt": "{} was born in", "relation_id": "P4", "subject": "Q"},
    }
]
CASES = [
    _case(0, "Anna", "Anna speaks", "French", "Bob speaks"),
    _case(1, "Bob", "Bob speaks", "French", "Carl speaks"),
    _case(2, "Dora", "Dora, a native", "French", "Eve speaks"),  # template: no id yet
    _case(3, "Rome", "Rome is located in", "Europe", "Alps belongs to the continent of"),
    _case(4, "Lyon", "Lyon is located in", "Paris", "Louvre is located in"),
    _case(5, "Kyoto", "Kyoto is located in", "Japan", "Osaka is located in"),
    _case(6, "Xan", "Xan label :", "Sony", "Yol is signed to"),
    _case(7, "Zed", "Zed is signed to", "Sony", "Xan label :"),
    _case(8, "anna", "anna speaks", "French", "Bob speaks"),  # Anna's subject, other case
    _case(9, "Anna's friend Bo", "Anna's friend Bo speaks", "French", "Bob speaks"),
    _case(10, "Mia", "Mia was born in", "Oslo", "Ola was born in"),
    _case(11, "Mo", "Mo was born in", "Oslo", "Ola was born in"),
]


def test_relation_rules_on_hand_made_cases():
    relations, templates = bn.assign_relations(CASES, KNOWN, FULL)
    assert relations[0] == ("P1", "template")
    assert relations[2] == ("P1", "template")  # "{}, a native" derived from its neighbour
    assert templates["{}, a native"] == {"relation_ids": ["P1"], "source": "derived"}
    assert relations[3] == ("P3", "template+neighbour")
    assert relations[4] == ("P2", "object")  # Paris is a known P2 object
    assert relations[5] == ("P2|P3", "ambiguous")  # Japan: no candidate has it
    group = "unmapped:{} is signed to"  # "{} label :" and "{} is signed to" linked by case 6
    assert relations[6] == relations[7] == (group, "unmapped")
    assert templates["{} label :"]["source"] == "none"
    assert relations[10] == ("P4", "template")
    assert templates["{} was born in"]["source"] == "counterfact_full"
    assert templates["{} speaks"]["source"] == "known_1000"


def test_neighbour_rules_on_hand_made_cases():
    out = bn.build(CASES, KNOWN, FULL, digest="x")
    by_id = {c["case_id"]: c for c in out["cases"]}
    assert [c["case_id"] for c in out["cases"]] == sorted(by_id)
    # same relation and truth; 8 has Anna's subject (other case), 9's prompt contains "Anna"
    assert by_id[0]["neighbour_ids"] == [1, 2]
    assert by_id[0]["prompts"] == ["Bob speaks", "Dora, a native"]
    assert 0 in by_id[9]["neighbour_ids"]  # "Anna speaks" does not contain "Anna's friend Bo"
    assert 0 not in by_id[8]["neighbour_ids"]
    assert by_id[6]["neighbour_ids"] == [7] and by_id[7]["neighbour_ids"] == [6]
    assert by_id[10]["neighbour_ids"] == [11]
    assert by_id[3]["neighbour_ids"] == by_id[5]["neighbour_ids"] == []
    counts = out["counts"]
    assert counts["cases_with_zero"] == 3 and counts["cases_with_ten"] == 0
    assert sum(counts["templates_by_source"].values()) == counts["templates"]
    assert sum(counts["cases_by_relation_way"].values()) == len(CASES)


def test_at_most_ten_neighbours_distinct_prompts_hash_ranked():
    names = "Ada Ben Cy Dov Eli Fay Gus Hal Ivy Jo Kai Lu Max Ned".split()
    cases = [_case(i, n, f"{n} speaks", "French", "Ada speaks") for i, n in enumerate(names)]
    cases.append(_case(14, "Ben", "Ben speaks", "French", "Ada speaks"))  # case 1's prompt
    chosen = bn.choose_neighbours(cases, {c["case_id"]: ("P1", "template") for c in cases})
    for i, ids in chosen.items():
        assert len(ids) == 10 and i not in ids
        assert not {1, 14} <= set(ids)  # one prompt once
        others = [j for j in range(15) if j != i and not (i in (1, 14) and j in (1, 14))]
        ranked = sorted(others, key=lambda j: bn._rank(i, j))
        dup = [j for j in ranked if j in (1, 14)]
        if len(dup) == 2:
            ranked.remove(dup[1])  # the same prompt ranked later is skipped
        assert ids == sorted(ranked[:10])
    assert any(ids != [j for j in range(15) if j != i][:10] for i, ids in chosen.items())
    assert chosen == bn.choose_neighbours(cases[::-1], {c["case_id"]: ("P1", "") for c in cases})


# --------------------------------------------------------------------------- shipped file


def test_shipped_neighbours_follow_the_rules(shipped, reduced):
    cases = shipped["cases"]
    assert [c["case_id"] for c in cases] == sorted(reduced)
    relation = {c["case_id"]: c["relation_id"] for c in cases}
    for c in cases:
        own = reduced[c["case_id"]]
        ids, prompts = c["neighbour_ids"], c["prompts"]
        assert len(ids) == len(prompts) <= 10 and ids == sorted(ids)
        assert len(set(prompts)) == len(prompts) and c["case_id"] not in ids
        for j, prompt in zip(ids, prompts, strict=True):
            other = reduced[j]
            assert relation[j] == c["relation_id"]
            assert other["ground_truth"] == own["ground_truth"]
            assert other["prompt"] == prompt
            assert other["subject"].lower() != own["subject"].lower()
            assert own["subject"].lower() not in prompt.lower()


def test_shipped_counts_are_the_files_and_the_notices(shipped):
    counts, cases = shipped["counts"], shipped["cases"]
    sizes = [len(c["prompts"]) for c in cases]
    assert counts["cases"] == len(cases) == 21919
    assert counts["cases_with_zero"] == sizes.count(0)
    assert counts["cases_with_ten"] == sizes.count(10)
    assert counts["cases_with_fewer_than_ten"] == len(cases) - sizes.count(10)
    assert counts["neighbour_prompts"] == sum(sizes)
    assert sum(counts["templates_by_source"].values()) == counts["templates"]
    assert sum(counts["cases_by_template_source"].values()) == len(cases)
    assert sum(counts["cases_by_relation_way"].values()) == len(cases)
    notice = data_path("NOTICE.md").read_text(encoding="utf-8")
    row = next(x for x in notice.splitlines() if "counterfact_neighbourhoods.json.gz" in x)
    numbers = {int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", row)}
    assert {counts["cases_with_zero"], counts["cases_with_fewer_than_ten"]} <= numbers
    assert {counts["cases_with_ten"], counts["neighbour_prompts"], counts["templates"]} <= numbers


def test_rebuild_gives_the_shipped_file(shipped):
    rebuilt = bn.build_from_shipped()
    assert rebuilt == shipped
    assert bn.encode(rebuilt) == data_path("counterfact_neighbourhoods.json.gz").read_bytes()


# --------------------------------------------------------------------------- loading


def test_load_cases_gives_both_forms_under_different_labels(shipped, reduced):
    label10, task10, cases10 = load_cases("counterfact")
    label1, task1, cases1 = load_cases("counterfact-1")
    assert (label10, label1) == ("counterfact10", "counterfact")  # old caches: one-prompt form
    assert task10 is task1 and len(cases10) == len(cases1) == 21919
    rebuilt = {c["case_id"]: tuple(c["prompts"]) for c in shipped["cases"]}
    for c10, c1 in zip(cases10, cases1, strict=True):
        own = reduced[c1.case_id]
        assert c1.record.neighborhood_prompts == (own["locality_prompt"],)
        expected = rebuilt[c10.case_id] or (own["locality_prompt"],)  # none rebuilt: shipped
        assert c10.record.neighborhood_prompts == expected
        assert c10.record.prompt == c1.record.prompt
        assert c10.record.paraphrase_prompts == c1.record.paraphrase_prompts
    assert max(len(c.record.neighborhood_prompts) for c in cases10) == 10
    tuning = tuning_case_ids()
    for label, cases in ((label10, cases10), (label1, cases1)):
        assert {c.case_id for c in split_cases(label, cases, "tuning")} == tuning
        assert len(split_cases(label, cases, "eval")) == 21919 - len(tuning)


def test_counterfact_requests_carry_their_relation_id(shipped):
    """Every request the CounterFact task builds from the shipped cases, in both forms, has the
    relation id the neighbourhood builder assigned to its case (the reduced records name none);
    the five full-schema records, which name theirs, agree with it."""
    assigned = {int(c["case_id"]): c["relation_id"] for c in shipped["cases"]}
    assert all(assigned.values())
    for dataset in ("counterfact", "counterfact-1"):
        _, task, cases = load_cases(dataset)
        requests = [task.request(c) for c in cases]
        assert [r.case_id for r in requests if not r.relation_id] == []
        assert {r.case_id: r.relation_id for r in requests} == assigned
    _, task, full = load_cases("counterfact-full")
    own = {c.case_id: task.request(c).relation_id for c in full}
    assert own == {0: "P103", 1: "P140", 2: "P1303", 3: "P17", 4: "P190"}
    assert own == {i: assigned[i] for i in own}
    assert load_counterfact()[3].relation_id == "P17"  # "{}, which is located in" Spain


def test_neighbourhoods_only_for_the_shipped_reduced_cases(tmp_path):
    with pytest.raises(InvalidInput, match="only for the shipped"):
        load_counterfact(full_sample=True, neighbourhoods=True)
    with pytest.raises(InvalidInput, match="only for the shipped"):
        load_counterfact(tmp_path / "x.json", neighbourhoods=True)
    from editing.evaluation.datasets import load_neighbourhoods

    with gzip.open(data_path("counterfact_neighbourhoods.json.gz"), "rt") as f:
        content = json.load(f)
    content["source"]["sha256_decompressed"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(content))
    with pytest.raises(InvalidInput, match="rebuild it"):
        load_neighbourhoods(other)


def test_the_two_forms_never_share_an_unedited_cache(toy_models, tmp_path):
    """The one-prompt form's cache keeps its old name; the ten-prompt run scores afresh (a
    one-prompt cache read as the ten-prompt form would fail on the neighbourhood length)."""
    model = toy_models["gpt2"]
    kw = dict(method="none", n=2, out_dir=tmp_path, only_known=False, generation=None)
    one = evaluate(model, dataset="counterfact-1", progress=False, **kw)
    ten = evaluate(model, dataset="counterfact", progress=False, **kw)
    assert one.dataset == "counterfact" and ten.dataset == "counterfact10"
    caches = sorted(p.name.split("_")[1] for p in tmp_path.glob("unedited_*.jsonl"))
    assert caches == ["counterfact", "counterfact10"]
    cache10 = next(tmp_path.glob("unedited_counterfact10_*.jsonl"))
    lengths = [len(json.loads(x)["scores"]["neighborhood_new"]) for x in open(cache10)]
    assert max(lengths) > 1
    rows = [json.loads(x) for x in open(ten.files["rows"])]
    assert all(r["post_neighborhood_new_gain"] == pytest.approx(0, abs=1e-6) for r in rows)


# --------------------------------------------------------------------------- gain metric


def _ts(logprob: float) -> TokenScores:
    return TokenScores((1,), (logprob,), (1,))


class Stub:
    """Scores set by hand per (prompt, target); anything else scores log p = -9."""

    def __init__(self, table: dict[tuple[str, str], float]) -> None:
        self.table = table

    def score(self, pairs):
        return [_ts(self.table.get(p, -9.0)) for p in pairs]


def test_neighbourhood_gain_of_the_new_target_by_hand():
    nbrs = tuple(f"N{i} lives in" for i in range(10))
    rec = CounterFactRecord(
        case_id=3,
        subject="Ada",
        template="{} lives in",
        target_true="Rome",
        target_new="Oslo",
        neighborhood_prompts=nbrs,
    )
    before = {**{(p, " Oslo"): -4.0 for p in nbrs}, **{(p, " Rome"): -2.0 for p in nbrs}}
    after = {**before, (nbrs[2], " Oslo"): -1.0, (nbrs[7], " Oslo"): -3.0, (nbrs[9], " Oslo"): -5.0}
    pre = score_counterfact(Stub(before), [rec])[0]
    post = score_counterfact(Stub(after), [rec])[0]
    m = counterfact_metrics(post, pre)
    e = math.exp
    gains = [e(-1) - e(-4), e(-3) - e(-4), e(-5) - e(-4)]
    assert m["neighborhood_new_gain"] == pytest.approx(sum(gains) / 10)
    assert m["neighborhood_new_gain_max"] == pytest.approx(e(-1) - e(-4))
    assert m["neighborhood_success"] == pytest.approx(0.9)  # N2: the new target got ahead
    assert counterfact_metrics(pre, pre)["neighborhood_new_gain"] == 0.0
    assert counterfact_metrics(post)["neighborhood_new_gain"] is None
    one_prompt = dataclasses.replace(rec, neighborhood_prompts=nbrs[:1])
    stale = score_counterfact(Stub(before), [one_prompt])[0]  # e.g. a one-prompt cache
    with pytest.raises(InvalidInput, match="neighbourhood prompts"):
        counterfact_metrics(post, stale)
