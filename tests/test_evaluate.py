"""The evaluation runner: rows, summaries, resumability, isolation of cases, bad input, CLI.

Most tests run a tiny GPT-2 with a stand-in editing function (a fixed weight change applied
and undone through a context manager, like :class:`editing.edits.edit.Edit`), so the runner is
tested apart from the editing methods; one test runs a real ROME edit on the embedded model.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from eval_fakes import FakeMethod, KnownScorer, model_state

from editing.evaluation import evaluate, scaling
from editing.evaluation.datasets import load_counterfact, load_zsre
from editing.evaluation.generation import GenerationSettings
from editing.evaluation.results import EvalSummary, case_bars, comparison_table
from editing.evaluation.tasks import load_cases
from editing.methods import load_hparams
from factscope.cli import main
from tracing.errors import InvalidInput
from tracing.layers import parse_layers
from tracing.models import down_proj

GEN = GenerationSettings(max_new_tokens=3)


@pytest.fixture
def cf_path(tmp_path, reduced_record):
    """Seven reduced CounterFact records; the second has its subject missing from the prompt."""
    recs = [reduced_record(r) for r in load_counterfact()[:7]]
    recs[1]["subject"] = "Somebody Not In The Prompt"
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(recs))
    return path


def test_runner_writes_everything_and_leaves_the_model_unchanged(toy_models, cf_path, tmp_path):
    model = toy_models["gpt2"]
    before = model_state(model)
    fake = FakeMethod()
    s = evaluate(
        model,
        dataset=cf_path,
        method="rome",
        n=4,
        out_dir=tmp_path / "out",
        only_known=False,
        generation=GEN,
        edit_fn=fake,
        progress=False,
    )
    after = model_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert fake.calls == [[0], [2], [3], [4]]  # one edit per case; case 1 skipped
    assert (s.n, s.n_skipped, s.n_failed) == (4, 1, 0)
    assert s.skipped == [{"case_id": 1, "reason": "subject missing from the prompt"}]
    assert s.hparams == {"fake": True} and s.batch == 1 and not s.joint
    for key in ("efficacy_success", "neighborhood_success", "rewrite_acc", "locality", "fluency"):
        assert s.edited[key] is not None and s.unedited[key] is not None
    assert s.unedited["locality"] == 1.0 and "score" in s.edited
    rows = [json.loads(x) for x in open(s.files["rows"])]
    assert [r["case_id"] for r in rows] == [0, 2, 3, 4]
    assert all(r["gen_source"] == "subject" and len(r["post_texts"]) == 2 for r in rows)
    assert any(r["pre_rewrite_p_new"] != r["post_rewrite_p_new"] for r in rows)  # edit seen
    with open(s.files["csv"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and "post_efficacy_success" in table[0]
    assert "post_texts" not in table[0]
    md = open(s.files["table"]).read()
    assert "| metric | unedited | edited |" in md and "tf-idf" in md
    assert EvalSummary.load(s.files["summary"]).edited == s.edited


def test_memit_edits_in_batches(toy_models, cf_path, tmp_path):
    fake = FakeMethod()
    s = evaluate(
        toy_models["gpt2"],
        dataset=cf_path,
        method="memit",
        n=5,
        batch=2,
        out_dir=tmp_path,
        only_known=False,
        generation=None,
        edit_fn=fake,
        progress=False,
    )
    assert fake.calls == [[0, 2], [3, 4], [5]]
    assert s.joint and s.batch == 2 and s.n == 5
    s = evaluate(
        toy_models["gpt2"],
        dataset=cf_path,
        method="memit",
        n=2,
        batch=2,
        out_dir=tmp_path,
        name="with_layers",
        layers=[1],
        only_known=False,
        generation=None,
        edit_fn=FakeMethod(),
        progress=False,
    )
    assert s.layers == [1]


def test_interrupted_run_resumes_without_recomputing(toy_models, cf_path, tmp_path):
    model = toy_models["gpt2"]
    kw = dict(out_dir=tmp_path, only_known=False, generation=GEN, progress=False)
    first = FakeMethod(interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, dataset=cf_path, method="ft-l", n=5, edit_fn=first, **kw)
    assert first.calls == [[0], [2]]
    second = FakeMethod()
    s = evaluate(model, dataset=cf_path, method="ft-l", n=5, edit_fn=second, **kw)
    assert second.calls == [[3], [4], [5]]  # only the cases not yet in the rows
    third = FakeMethod()
    again = evaluate(model, dataset=cf_path, method="ft-l", n=5, edit_fn=third, **kw)
    assert third.calls == [] and again.edited == s.edited
    fresh = evaluate(
        model, dataset=cf_path, method="ft-l", n=5, edit_fn=FakeMethod(), name="fresh", **kw
    )
    assert fresh.edited == s.edited  # resumed == uninterrupted (seeds are per case)
    with pytest.raises(ValueError, match="other settings"):
        evaluate(
            model, dataset=cf_path, method="ft-l", n=5, edit_fn=FakeMethod(), **{**kw, "seed": 1}
        )


def test_a_leaking_edit_is_detected(toy_models, cf_path, tmp_path):
    model = toy_models["gpt2"]
    saved = down_proj(model, 1).detach().clone()
    try:
        with pytest.raises(RuntimeError, match="weights changed"):
            evaluate(
                model,
                dataset=cf_path,
                method="rome",
                n=2,
                out_dir=tmp_path,
                only_known=False,
                generation=None,
                edit_fn=FakeMethod(leak=True),
                progress=False,
            )
    finally:
        with torch.no_grad():
            down_proj(model, 1).copy_(saved)


def test_only_known_filter_counts_what_it_drops(toy_models, cf_path, tmp_path):
    model = toy_models["gpt2"]
    scorer = KnownScorer(model, json.loads(cf_path.read_text()), known={0, 4, 6})
    s = evaluate(
        model,
        dataset=cf_path,
        method="none",
        n=2,
        out_dir=tmp_path,
        generation=None,
        scorer=scorer,
        progress=False,
    )
    rows = [json.loads(x) for x in open(s.files["rows"])]
    assert [r["case_id"] for r in rows] == [0, 4]
    assert (s.n, s.n_skipped, s.n_unknown) == (2, 1, 2)  # case 1 skipped, 2 and 3 unknown
    assert s.unedited["efficacy_success"] == 0.0
    assert s.edited == s.unedited and s.seconds_per_edit is None
    more = evaluate(
        model,
        dataset=cf_path,
        method="none",
        n=5,
        out_dir=tmp_path,
        generation=None,
        scorer=scorer,
        progress=False,
    )
    assert more.n == 3 and any("3 of the 5" in note for note in more.notes)


def test_conflicting_cases_are_skipped_so_a_batch_can_hold_every_case(
    toy_models, tmp_path, reduced_record
):
    recs = [reduced_record(r) for r in load_counterfact()[:4]]
    clash = dict(recs[0], case_id=100, target_new=" Zanzibar")  # same fact, another value
    again = dict(recs[2], case_id=101)  # the same edit twice
    path = tmp_path / "clashes.json"
    path.write_text(json.dumps([recs[0], recs[1], clash, recs[2], again, recs[3]]))
    fake = FakeMethod()
    s = evaluate(
        toy_models["gpt2"],
        dataset=path,
        method="memit",
        n=10,
        batch=10,
        out_dir=tmp_path,
        only_known=False,
        generation=None,
        edit_fn=fake,
        progress=False,
    )
    ids = [r["case_id"] for r in recs]
    assert fake.calls == [ids]  # one batch, every case but the clashing ones
    assert (s.n, s.n_skipped, s.n_failed) == (4, 2, 0)
    reasons = {k["case_id"]: k["reason"] for k in s.skipped}
    assert "conflicts with" in reasons[100] and f"case_id {ids[0]}" in reasons[100]
    assert "duplicates" in reasons[101] and f"case_id {ids[2]}" in reasons[101]


def test_bad_input(toy_models, tmp_path, cf_path):
    model = toy_models["gpt2"]
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="non-empty"):
        evaluate(model, dataset=empty, method="none", n=1, out_dir=tmp_path, generation=None)
    recs = json.loads(cf_path.read_text())
    del recs[1]["target_new"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"record 1 \(case_id 1\).*target_new"):
        evaluate(model, dataset=bad, method="none", n=1, out_dir=tmp_path, generation=None)
    lost = tmp_path / "lost.json"
    lost.write_text(json.dumps([{**recs[0], "subject": "Nobody"}]))
    with pytest.raises(ValueError, match="no usable case.*1 skipped"):
        evaluate(model, dataset=lost, method="none", n=1, out_dir=tmp_path, generation=None)
    with pytest.raises(ValueError, match="unknown editing method"):
        evaluate(model, dataset=cf_path, method="mend", n=1, out_dir=tmp_path)
    with pytest.raises(InvalidInput):
        evaluate(model, dataset=tmp_path / "missing.json", method="none", n=1, out_dir=tmp_path)
    assert parse_layers("3-5") == [3, 4, 5] and parse_layers("2,4") == [2, 4]
    with pytest.raises(ValueError, match="bad layer spec"):
        parse_layers("five")


def test_zsre_cases(toy_models, tmp_path):
    raw = [
        {
            "subject": r.subject,
            "src": r.question,
            "alt": r.target_new,
            "answers": list(r.answers),
            "rephrase": r.rephrase,
            "loc": r.loc_question,
            "loc_ans": r.loc_answer,
        }
        for r in load_zsre(eval_sample=True)[:3]
    ]
    path = tmp_path / "zsre_small.json"
    path.write_text(json.dumps(raw))
    fake = FakeMethod()
    s = evaluate(
        toy_models["gpt2"],
        dataset=path,
        method="rome",
        n=2,
        out_dir=tmp_path,
        generation=None,
        edit_fn=fake,
        progress=False,
    )
    assert s.n == 2 and fake.calls == [[0], [1]] and not s.only_known
    assert set(s.edited) == {
        "efficacy_acc",
        "paraphrase_acc",
        "specificity_acc",
        "strict_efficacy",
        "strict_paraphrase",
    }
    # ROME and MEMIT edit toward the first gold answer; MEND's "alt" is a named option
    label, task, cases = load_cases("zsre")
    assert label == "zsre" and task.kind == "zsre" and len(cases) == 1000
    assert all(c.record.target_new == c.record.answers[0] for c in cases)
    label, task, alt = load_cases("zsre-alt")  # records 534 and 723 have an empty alt
    assert len(alt) == 998 and {534, 723}.isdisjoint(c.case_id for c in alt)
    assert sum(c.record.target_new != c.record.answers[0] for c in alt) > 900


def test_plot_data_and_scaling_points(toy_models, cf_path, tmp_path):
    from viz.plots import plot_edit_bars, plot_scaling

    s = evaluate(
        toy_models["gpt2"],
        dataset=cf_path,
        method="rome",
        n=1,
        out_dir=tmp_path,
        only_known=False,
        generation=None,
        edit_fn=FakeMethod(),
        progress=False,
    )
    row = json.loads(open(s.files["rows"]).readline())
    bars = case_bars(row)
    assert len(bars) == 6 and {b["prompt_kind"] for b in bars} == {
        "edit",
        "paraphrase",
        "neighborhood",
    }
    plot_edit_bars(bars)
    fake = FakeMethod()
    points = scaling(
        toy_models["gpt2"],
        ("memit", "ft-l"),
        (1, 2),
        dataset=cf_path,
        out_dir=tmp_path,
        only_known=False,
        edit_fn=fake,
        progress=False,
    )
    assert [(p["method"], p["n_edits"]) for p in points] == [
        ("memit", 1),
        ("ft-l", 1),
        ("unedited", 1),
        ("memit", 2),
        ("ft-l", 2),
        ("unedited", 2),
    ]
    assert [len(c) for c in fake.calls] == [1, 1, 2, 2]  # every method edits N at once
    plot_scaling(points)
    assert json.loads((tmp_path / "scaling" / "points.json").read_text()) == points


def test_cli_eval_and_table(toy_dirs, cf_path, tmp_path, capsys):
    out = tmp_path / "res"
    args = [
        "eval",
        "--method",
        "none",
        "--dataset",
        str(cf_path),
        "--model",
        toy_dirs["gpt2"],
        "--n",
        "2",
        "--out",
        str(out),
        "--all-cases",
        "--gen-tokens",
        "2",
    ]
    assert main(args) == 0
    assert "| metric | unedited | edited |" in capsys.readouterr().out
    summary = out / f"{cf_path.stem}_none" / "summary.json"
    assert main(["eval-table", str(summary)]) == 0
    assert "| unedited | 2 |" in capsys.readouterr().out
    assert main([*args[:2], "mend", *args[3:]]) == 2
    assert "unknown editing method" in capsys.readouterr().err
    table = comparison_table([EvalSummary.load(summary)])
    assert table.count("\n") == 3  # header, rule, one unedited row


@pytest.mark.model
def test_rome_edit_raises_efficacy_on_a_known_case(gemma, tmp_path, reduced_record):
    pytest.importorskip("editing.api")
    rec = next(r for r in load_counterfact() if r.case_id == 0)  # an anchor case it knows
    path = tmp_path / "case0.json"
    path.write_text(json.dumps([reduced_record(rec)]))
    before = [down_proj(gemma, L).detach().clone() for L in range(18)]
    s = evaluate(
        gemma, dataset=path, method="rome", n=1, out_dir=tmp_path, generation=None, progress=False
    )
    assert s.n == 1 and s.unedited["efficacy_success"] == 0.0
    assert s.edited["efficacy_success"] == 1.0
    assert s.layers == [load_hparams("rome", "gemma-3-270m").layer]  # the layer edited
    assert all(torch.equal(down_proj(gemma, L), before[L]) for L in range(18))  # restored


def test_tuning_split_is_left_out_of_evaluation_and_used_alone_for_tuning():
    from editing.evaluation.tasks import split_cases, tuning_case_ids

    label, _, cases = load_cases("counterfact")
    tuning = tuning_case_ids()
    assert {0, 1, 4, 5, 6, 7, 13, 14, 16, 21} <= tuning  # what the first Gemma defaults saw
    assert all(i % 20 == 0 for i in tuning - {0, 1, 4, 5, 6, 7, 13, 14, 16, 21})
    ev = split_cases(label, cases, "eval")
    tu = split_cases(label, cases, "tuning")
    assert len(ev) + len(tu) == len(cases) == 21919 and len(tu) == len(tuning)
    assert not {c.case_id for c in ev} & tuning and {c.case_id for c in tu} == tuning
    assert split_cases("zsre", cases[:3], "eval") == cases[:3]  # no split outside CounterFact
    with pytest.raises(ValueError, match="no tuning split"):
        split_cases("zsre", cases[:3], "tuning")
    with pytest.raises(ValueError, match="unknown split"):
        split_cases(label, cases, "test")
