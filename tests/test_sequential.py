"""The sequential runner: batches applied without undo, checkpoints of every edit so far and
of general ability, resumption from saved batches, conflicts, refused non-finite batches,
and the whole stream undone bit for bit; every registered method runs in it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import editing.evaluation.sequential as seq_mod
from editing.edits.edit import Edit, LayerDelta
from editing.evaluation import EditStream, evaluate_sequential
from editing.evaluation.ability import heldout_sequences, perplexity
from editing.evaluation.arrival import arrival_table
from editing.evaluation.datasets import load_counterfact
from editing.evaluation.results import read_jsonl
from factscope.cli import main
from tracing.errors import InvalidInput
from tracing.facts import load_known_facts
from tracing.models import down_proj, fingerprint, model_name

TARGET = {"num_steps": 2, "lr": 0.5}
HPARAMS = {
    "rome": {"layer": 1, "target": TARGET, "mom2_n_tokens": 2000, "context_templates": [[5, 2]]},
    "memit": {
        "layers": [0, 1],
        "target": TARGET,
        "mom2_n_tokens": 2000,
        "mom2_update_weight": 10.0,
        "context_templates": [[5, 2]],
    },
    "alphaedit": {
        "layers": [0, 1],
        "target": TARGET,
        "mom2_n_tokens": 2000,
        "nullspace_threshold": 0.05,
        "l2_weight": 1.0,
        "context_templates": [[5, 2]],
    },
    "ultraedit": {"layers": [0, 1], "lr": 1e-3, "chunk_size": 1},
    "ft-l": {"layers": [1], "num_steps": 2, "norm_constraint": 1e-3},
    "ft": {"layers": [1], "num_steps": 2},
}


@pytest.fixture
def cases_file(tmp_path, reduced_record):
    """Six CounterFact cases; the fourth contradicts the first (same subject and prompt,
    another target)."""
    recs = [reduced_record(r) for r in load_counterfact()[:5]]
    clash = {**recs[0], "case_id": 99_999, "target_new": "Tokyo"}
    recs.insert(3, clash)
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(recs))
    return path


@pytest.fixture
def run(toy_models, tmp_path, cases_file, monkeypatch):
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    model = toy_models["gpt2"]
    facts = tmp_path / "facts.json"  # a few known_1000 facts (the random model knows none)
    facts.write_text(
        json.dumps(
            [
                {"prompt": f.prompt, "subject": f.subject, "attribute": f.answer}
                for f in load_known_facts()[:8]
            ]
        )
    )

    def go(method="alphaedit", name="run", **kw):
        hp = tmp_path / f"{method}.json"
        hp.write_text(json.dumps(HPARAMS[method]))
        settings = dict(
            dataset=cases_file,
            method=method,
            n=6,
            batch=2,
            checkpoint_every=2,
            hparams=hp,
            out_dir=tmp_path / "out",
            name=name,
            only_known=False,
            split="all",
            ppl_tokens=256,
            progress=False,
        )
        return evaluate_sequential(model, **{**settings, **kw})

    return model, go


def _edited():
    """The case ids the stream of ``cases_file`` edits, in order (all but the clash)."""
    return [r.case_id for r in load_counterfact()[:5]]


def _weights(model):
    return [down_proj(model, L).detach().clone() for L in range(model.cfg.n_layers)]


def test_stream_scores_checkpoints_and_undoes_bit_for_bit(run, tmp_path):
    model, go = run
    before = _weights(model)
    rows = go()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))
    assert [r["n_processed"] for r in rows] == [0, 2, 4, 6]
    # the conflicting case (fourth) is skipped and reported; the others are edited
    assert [r["n_edits"] for r in rows] == [0, 2, 3, 5]
    stream = json.loads((tmp_path / "out" / "run" / "stream.json").read_text())
    assert [b["skipped_conflicts"] for b in stream["batches"]] == [[], [99_999], []]
    assert all(b["status"] == "applied" for b in stream["batches"])
    first, last = rows[0], rows[-1]
    assert first["metrics"] == first["unedited"] == {} and last["finite"]
    assert last["metrics"]["efficacy_success"] is not None
    # the unedited column is the same cases scored before any edit
    assert set(last["unedited"]) == set(last["metrics"])
    assert last["unedited"]["efficacy_magnitude"] != last["metrics"]["efficacy_magnitude"]
    # the unedited perplexity is the one of the held-out text, computed apart
    assert first["perplexity"] == pytest.approx(
        perplexity(model, heldout_sequences(model, 256)), rel=1e-6
    )
    assert last["perplexity"] != first["perplexity"]  # the edits changed the model
    # every checkpoint keeps each edit's own metrics, with the batch it arrived in
    run_dir = tmp_path / "out" / "run"
    for row in rows[1:]:
        cases = read_jsonl(run_dir / "cases" / f"{row['n_processed']:05d}.jsonl")
        assert len(cases) == row["n_edits"]
        for key, value in row["metrics"].items():
            if key == "score":
                continue
            vals = [c[key] for c in cases if c.get(key) is not None]
            mean = sum(vals) / len(vals) if vals else None
            assert mean == pytest.approx(value)
    assert [(c["case_id"], c["batch"], c["arrived"]) for c in cases] == [
        (i, b, a)
        for i, (b, a) in zip(_edited(), [(0, 2), (0, 2), (1, 4), (2, 6), (2, 6)], strict=True)
    ]


def test_arrival_table_follows_each_cohort(run, tmp_path, capsys):
    model, go = run
    rows = go()
    run_dir = tmp_path / "out" / "run"
    table = arrival_table(run_dir, "efficacy_magnitude")
    assert table.checkpoints == [2, 4, 6]
    assert table.cohorts == [(0, 2), (2, 4), (4, 6)]
    by_case = {
        n: {
            c["case_id"]: c["efficacy_magnitude"]
            for c in read_jsonl(run_dir / "cases" / f"{n:05d}.jsonl")
        }
        for n in (2, 4, 6)
    }
    edited = _edited()
    cohort_ids = [edited[:2], edited[2:3], edited[3:]]
    for n in (2, 4, 6):
        for cohort, ids in zip(table.cohorts, cohort_ids, strict=True):
            if cohort[1] > n:  # not arrived yet at this checkpoint
                assert (n, cohort) not in table.cells
                continue
            mean, count = table.cells[n, cohort]
            assert count == len(ids)
            assert mean == pytest.approx(sum(by_case[n][i] for i in ids) / len(ids))
        row = next(r for r in rows if r["n_processed"] == n)
        assert table.overall[n] == pytest.approx(row["metrics"]["efficacy_magnitude"])
    with pytest.raises(InvalidInput, match="unknown metric"):
        arrival_table(run_dir, "no_such_metric")
    with pytest.raises(InvalidInput, match="no per-edit"):
        arrival_table(tmp_path / "nowhere")
    series = table.series()  # against edits made so far (the clash was skipped)
    assert series["all"] == [(2, table.overall[2]), (3, table.overall[4]), (5, table.overall[6])]
    assert [n for n, _ in series["arrived 3-4"]] == [3, 5]
    png = tmp_path / "arrival.png"
    args = ["eval-arrival", str(run_dir), "--metric", "efficacy_magnitude", "--out", str(png)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "| requests | edits | efficacy_magnitude, all | arrived 1-2 | arrived 3-4 | arrived 5-6 |"
        in out
    )
    assert "| 4 | 3 |" in out
    assert len(out.strip().splitlines()) == 2 + 3 + 1 and png.stat().st_size > 0
    assert main([*args[:-1], str(tmp_path / "arrival.jpg")]) == 2  # refused before any work
    assert not (tmp_path / "arrival.jpg").exists()


def test_streams_on_one_model_share_the_unedited_row(run, monkeypatch):
    model, go = run
    first = go(method="ft-l", name="first", n=2, batch=2)
    calls = []
    real = seq_mod.perplexity
    monkeypatch.setattr(seq_mod, "perplexity", lambda *a: (calls.append(1), real(*a))[1])
    second = go(method="ft-l", name="second", n=2, batch=2)
    assert second[0] == first[0] and len(calls) == 1  # only the edited checkpoint measured
    calls.clear()
    other = go(method="ft-l", name="other", n=2, batch=2, ppl_tokens=384)  # other text: measured
    assert len(calls) == 2 and other[0]["perplexity"] != first[0]["perplexity"]


def _cut_after_the_first_batch(model, go, monkeypatch, **settings) -> None:
    """Run a stream that dies (KeyboardInterrupt) as its second batch starts, then undo the
    weights it left applied; ``_edit_batch`` is the real one again afterwards."""
    real, calls = seq_mod._edit_batch, []

    def dies_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(seq_mod, "_edit_batch", dies_on_the_second_batch)
    before = _weights(model)
    with pytest.raises(KeyboardInterrupt):
        go(**settings)
    for L, w in enumerate(before):  # the interrupted stream is still applied: undo it
        down_proj(model, L).data.copy_(w)
    monkeypatch.setattr(seq_mod, "_edit_batch", real)


def test_interrupted_stream_resumes_to_the_same_rows(run, monkeypatch):
    model, go = run
    whole = go(name="whole")
    _cut_after_the_first_batch(model, go, monkeypatch, name="cut")
    real, calls = seq_mod._edit_batch, []
    monkeypatch.setattr(seq_mod, "_edit_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = go(name="cut")
    assert len(calls) == 2  # the first batch was re-applied from disk, not recomputed
    assert [r["n_edits"] for r in resumed] == [r["n_edits"] for r in whole]
    for a, b in zip(resumed, whole, strict=True):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
        for key, value in b["metrics"].items():
            assert a["metrics"][key] == pytest.approx(value, rel=1e-3, abs=1e-4)


def test_non_finite_batch_is_refused_and_the_stream_goes_on(run, monkeypatch):
    model, go = run
    from editing.api import make_edit

    calls = []

    def second_is_broken(model, requests, method, hp, **kw):
        calls.append(1)
        edit = make_edit(model, requests, method, hp, **kw)
        if len(calls) == 2:
            d = edit.deltas[0]
            bad = torch.full(d.shape, float("inf"))
            edit.deltas[0] = LayerDelta(d.layer, dense=bad)
        return edit

    before = _weights(model)
    rows = go(edit_fn=second_is_broken, name="broken")
    assert [r["n_edits"] for r in rows] == [0, 2, 2, 4]
    assert all(r["finite"] for r in rows)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))


def test_interrupted_ultraedit_stream_resumes_its_lifelong_state_exactly(
    run, monkeypatch, tmp_path
):
    """The normalisation statistics travel with the saved batches: a stream stopped after
    its first batch and resumed computes the later batches bit for bit as an unbroken one."""
    from editing.methods.ultraedit import STATE_KEY

    model, go = run
    whole = go(method="ultraedit", name="ue_whole")
    before = _weights(model)
    _cut_after_the_first_batch(model, go, monkeypatch, method="ultraedit", name="ue_cut")
    resumed = go(method="ultraedit", name="ue_cut")
    assert [r["n_edits"] for r in resumed] == [r["n_edits"] for r in whole]

    def batch(name, b):
        return Edit.load(tmp_path / "out" / name / "batches" / f"{b:05d}")

    for b in range(3):
        a, c = batch("ue_whole", b), batch("ue_cut", b)
        assert a.metadata[STATE_KEY] == c.metadata[STATE_KEY]
        for x, y in zip(a.deltas, c.deltas, strict=True):
            assert torch.equal(x.matrix(), y.matrix())
    states = [batch("ue_whole", b).metadata[STATE_KEY] for b in range(3)]
    assert states[0] != states[1] != states[2]  # the state moves with every batch
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))


@pytest.mark.parametrize("method", ["rome", "memit", "ultraedit", "ft-l"])
def test_every_method_runs_in_sequence(run, method):
    model, go = run
    before = _weights(model)
    rows = go(method=method, name=method, n=4, checkpoint_every=4)
    assert [r["n_processed"] for r in rows] == [0, 4]
    assert rows[-1]["n_edits"] == 3 and rows[-1]["finite"]
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))


def test_edit_stream_refuses_an_overflowing_batch(toy_models):
    model = toy_models["gpt2"]
    stream = EditStream(model)
    before = _weights(model)
    huge = torch.full(tuple(down_proj(model, 1).shape), 3e38)
    edit = Edit([LayerDelta(1, dense=huge)], "x", [], {}, fingerprint(model), model_name(model))
    stream.push(
        Edit([LayerDelta(1, dense=huge)], "x", [], {}, fingerprint(model), model_name(model))
    )
    from tracing.errors import EditFailed

    with pytest.raises(EditFailed, match="non-finite|NaN or inf"):
        stream.push(edit)
    assert len(stream.edits) == 1
    stream.undo_all()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))


def test_cli_sequential(toy_dirs, tmp_path, cases_file, monkeypatch, capsys):
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    hp = tmp_path / "memit.json"
    hp.write_text(json.dumps(HPARAMS["memit"]))
    args = [
        "eval",
        "--sequential",
        "--method",
        "memit",
        "--model",
        toy_dirs["gpt2"],
        "--dataset",
        str(cases_file),
        "--n-cases",
        "4",
        "--batch",
        "2",
        "--checkpoint-every",
        "2",
        "--hparams",
        str(hp),
        "--all-cases",
        "--split",
        "all",
        "--ppl-tokens",
        "256",
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| edits |" in out
    assert list((tmp_path / "out").rglob("curves.png"))
    assert main([*args[:-1], "--checkpoint-every", "0"]) == 2
    capsys.readouterr()

    # eval-curves: runs of one method (a threshold sweep, say) each keep their own line
    (first,) = [p.parent for p in (tmp_path / "out").rglob("checkpoints.jsonl")]
    copy = tmp_path / "out" / "copy"
    shutil.copytree(first, copy)
    with open(copy / "checkpoints.jsonl", "a", encoding="utf-8") as f:
        f.write('{"n_processed": 6, "n_ed')  # torn by an interrupted run: read as the runner does
    png = tmp_path / "both.png"
    assert main(["eval-curves", str(first), str(copy), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.stat().st_size > 0
    assert f"(memit ({first.name}); memit (copy))" in out
    assert main(["eval-curves", str(first), "--out", str(png)]) == 0
    assert "(memit)" in capsys.readouterr().out
    assert main(["eval-curves", str(first), f"{first}/", "--out", str(png)]) == 2
    assert "given twice" in capsys.readouterr().err
