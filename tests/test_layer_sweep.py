"""The layer sweep (Hase et al. 2023): rows for every (fact, layer), their scores against a
plain forward pass, the analysis against hand computations, resuming, the weights, the CLI
and its bad-input errors. Tiny random GPT-2 (4 layers; ROME can edit 0-2), 2 facts x 2
layers, a few optimisation steps: the numbers mean nothing, the bookkeeping is the test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import editing.evaluation.layer_sweep as sweep_module
import tracing.models
from editing.api import make_edit
from editing.evaluation.cases import case_seed
from editing.evaluation.datasets import load_counterfact
from editing.evaluation.layer_sweep import (
    SweepConfig,
    rewrite_score,
    run_layer_sweep,
    sweep_layers,
)
from editing.evaluation.sweep_analysis import (
    MEAN_COLUMNS,
    correlation,
    layer_means,
    per_fact_correlations,
    per_layer_correlations,
    r_squared_gain,
    summarize,
)
from editing.evaluation.tasks import TASKS, Case
from editing.hparams import TargetHparams
from editing.methods.rome import RomeHparams
from editing.statistics.stats import layer_second_moments
from factscope.cli import main
from tracing.errors import InvalidHparams, InvalidInput
from tracing.models import target_ids, tokenize

LAYERS = [0, 1]
HP = RomeHparams(
    layer=0,
    target=TargetHparams(num_steps=3, lr=0.5),
    mom2_n_tokens=1500,
    context_templates=[[2, 2]],
)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """Statistics, context templates and noise levels of the tiny models go to a fresh cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACTSCOPE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def cache(module_cache):
    """The fresh cache, for one test."""


@pytest.fixture(scope="module")
def cf_path(tmp_path_factory, reduced_record):
    """Three reduced CounterFact records (the toy model knows none: ``only_known=False``)."""
    path = tmp_path_factory.mktemp("data") / "cases.json"
    path.write_text(json.dumps([reduced_record(r) for r in load_counterfact()[:3]]))
    return path


@pytest.fixture(scope="module")
def reference(toy_models, cf_path, tmp_path_factory, module_cache):
    """One uninterrupted sweep (2 facts x layers 0, 1), its folder and summary, and the
    model's weights before it."""
    model = toy_models["gpt2"]
    before = _state(model)
    out = tmp_path_factory.mktemp("reference") / "sweep"
    return out, run_layer_sweep(model, _config(cf_path, out)), before


def _config(cf_path, out, **kw) -> SweepConfig:
    settings = dict(
        dataset=cf_path, n=2, layers=LAYERS, hparams=HP, out_dir=out, split="all",
        only_known=False, samples=2, noise=0.5, progress=False,
    )  # fmt: skip
    return SweepConfig(**{**settings, **kw})


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.original_model.state_dict().items()}


def _p_new(model, prompt: str, target: str) -> float:
    """ROME's P(target | prompt) from one plain forward pass (no scorer, no batching)."""
    p_ids, t_ids = tokenize(model, prompt), target_ids(model, f" {target.strip()}")
    ids = torch.tensor([p_ids + t_ids[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].double(), dim=-1)
    at = range(len(p_ids) - 1, len(p_ids) + len(t_ids) - 1)
    return math.exp(sum(float(logp[i, t]) for i, t in zip(at, t_ids, strict=True)) / len(t_ids))


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.endswith("_seconds")}


def test_sweep_rows_scores_and_weights(toy_models, reference, cache):
    model = toy_models["gpt2"]
    out, summary, before = reference
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert sorted((r["case_id"], r["layer"]) for r in rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not any("failed" in r for r in rows)
    for name in ("sweep.json", "rows.csv", "summary.json", "summary.md", "unedited.jsonl"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "traces").iterdir()) == ["00000.json", "00001.json"]

    # per-layer means: a plain loop over the rows
    for layer in LAYERS:
        mine = [r for r in rows if r["layer"] == layer]
        for key, _ in MEAN_COLUMNS:
            want = sum(r[key] for r in mine) / len(mine)
            assert summary["layer_means"][str(layer)][key] == pytest.approx(want, abs=1e-12)

    # the rewrite score from probabilities recomputed with a plain forward pass, the edit
    # remade independently with the same settings
    cf = {r.case_id: r for r in load_counterfact()[:3]}
    stats = layer_second_moments(model, LAYERS, n_tokens=HP.mom2_n_tokens, progress=False)
    for row in rows:
        rec = cf[row["case_id"]]
        p0 = _p_new(model, rec.prompt, rec.target_new)
        req = TASKS["counterfact"].request(Case(rec.case_id, rec))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(case_seed(0, rec.case_id))
            edit = make_edit(model, [req], "rome", HP, layers=[row["layer"]], stats=stats,
                             progress=False)  # fmt: skip
        with edit.applied(model):
            p1 = _p_new(model, rec.prompt, rec.target_new)
        assert row["pre_rewrite_p_new"] == pytest.approx(p0, rel=1e-4)
        assert row["post_rewrite_p_new"] == pytest.approx(p1, rel=1e-4)
        assert row["rewrite_score"] == pytest.approx((p1 - p0) / (1 - p0), rel=1e-3, abs=1e-6)
        assert p1 != pytest.approx(p0, rel=1e-3)  # the edit did something

        # the tracing effect: the saved trace's cell at the subject's last token, minus
        # p_corrupted; and the largest over the subject's tokens
        trace = json.loads((out / "traces" / f"{rec.case_id:05d}.json").read_text())
        start, end = trace["subject_span"]
        for kind in ("mlp", "resid"):
            col = np.asarray(trace["scores"][kind])[:, row["layer"]] - trace["p_corrupted"]
            assert row[f"trace_{kind}"] == pytest.approx(col[end - 1], abs=1e-12)
            assert row[f"trace_{kind}_max"] == pytest.approx(col[start:end].max(), abs=1e-12)


def test_rewrite_score_formula():
    assert rewrite_score(0.2, 0.6) == pytest.approx(0.5)
    assert rewrite_score(0.2, 1.0) == pytest.approx(1.0)
    assert rewrite_score(0.5, 0.25) == pytest.approx(-0.5)
    assert rewrite_score(1.0, 1.0) is None


def test_resume_after_interruption_recomputes_nothing(toy_models, cf_path, tmp_path, cache,
                                                      reference, monkeypatch):  # fmt: skip
    model = toy_models["gpt2"]
    ref_dir, ref_summary, _ = reference
    ref_rows = [json.loads(x) for x in (ref_dir / "rows.jsonl").read_text().splitlines()]

    traced: list[str] = []
    real_trace = sweep_module.trace_fact

    def counting_trace(model, prompt, *a, **k):
        traced.append(prompt)
        return real_trace(model, prompt, *a, **k)

    monkeypatch.setattr(sweep_module, "trace_fact", counting_trace)
    edits: list[tuple[int, int]] = []

    def edit_fn(model, requests, method, hp, stop_at=None, **kw):
        if stop_at is not None and len(edits) == stop_at:
            raise KeyboardInterrupt
        edits.append((requests[0].case_id, hp.layer))
        return make_edit(model, requests, method, hp, **kw)

    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        run_layer_sweep(model, _config(cf_path, out),
                        edit_fn=lambda *a, **k: edit_fn(*a, stop_at=3, **k))  # fmt: skip
    assert edits == [(0, 0), (0, 1), (1, 0)] and len(traced) == 2
    assert len((out / "rows.jsonl").read_text().splitlines()) == 3
    with open(out / "rows.jsonl", "a") as f:  # a run killed while writing a line
        f.write('{"case_id": 1, "lay')
    edits.clear(), traced.clear()
    summary = run_layer_sweep(model, _config(cf_path, out), edit_fn=edit_fn)
    assert edits == [(1, 1)] and traced == []  # only the missing edit; traces reused
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert [_stable(r) for r in rows] == [_stable(r) for r in ref_rows]
    assert summary["layer_means"] == ref_summary["layer_means"]

    # a rerun with other settings is refused in one line, before any work
    with pytest.raises(InvalidInput, match="other settings.*layers"):
        run_layer_sweep(model, _config(cf_path, out, layers=[0, 2]), edit_fn=edit_fn)
    assert edits == [(1, 1)]


def test_bad_layers_are_refused_before_any_work(toy_models, cf_path, tmp_path, cache):
    model = toy_models["gpt2"]
    before = _state(model)
    with pytest.raises(InvalidHparams, match="no path to the loss"):
        run_layer_sweep(model, _config(cf_path, tmp_path / "a", layers=[1, 3]))
    with pytest.raises(InvalidInput, match="unknown layer 9"):
        run_layer_sweep(model, _config(cf_path, tmp_path / "b", layers=[9]))
    for bad in ("", [], "2-1"):
        with pytest.raises(InvalidInput):
            run_layer_sweep(model, _config(cf_path, tmp_path / "c", layers=bad))
    with pytest.raises(InvalidInput, match="n must be"):
        run_layer_sweep(model, _config(cf_path, tmp_path / "d", n=0))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="not a layer-sweep folder"):
        run_layer_sweep(model, _config(cf_path, tmp_path / "e"))
    assert not any((tmp_path / x).exists() for x in "abcd")
    # no layers given: every layer ROME can edit (not the last: no attention after it)
    assert sorted(sweep_layers(model, _config(cf_path, tmp_path / "f", layers=None))) == [0, 1, 2]
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- analysis


def test_correlations_match_hand_computations():
    x = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert correlation(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert correlation(x, [-v for v in x], "spearman") == pytest.approx(-1.0)
    cubic = [v**3 for v in x]  # monotone, not linear
    assert correlation(x, cubic, "spearman") == pytest.approx(1.0)
    assert correlation(x, cubic) < 0.99
    assert correlation(x, [1.0] * 5) is None and correlation([1.0], [2.0]) is None
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert correlation(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    # ties: Spearman is Pearson of average ranks, here written out by hand
    t = [1.0, 2.0, 2.0, 3.0]
    u = [4.0, 1.0, 3.0, 2.0]
    ranks_t, ranks_u = [1.0, 2.5, 2.5, 4.0], [4.0, 1.0, 3.0, 2.0]
    assert correlation(t, u, "spearman") == pytest.approx(
        np.corrcoef(ranks_t, ranks_u)[0, 1], abs=1e-12
    )
    with pytest.raises(InvalidInput):
        correlation(x, x, "kendall")


def _rows(score, effect) -> list[dict]:
    """Rows of 4 facts x 3 layers from ``[layer][fact]`` arrays."""
    return [
        {"case_id": f, "layer": L, "rewrite_score": float(score[L][f]),
         "trace_mlp": float(effect[L][f])}
        for L in range(3) for f in range(4)
    ]  # fmt: skip


def test_r_squared_gain_on_constructed_data():
    level = np.array([0.9, 0.5, 0.1])[:, None]
    noise = np.array([[0.1, -0.1, 0.05, -0.05]] * 3)
    # an effect whose within-layer part is orthogonal to the score's: it explains nothing
    # the layer does not (the gain is 0); Hase et al.'s finding in its pure form
    unrelated = np.array([[1.0, 1.0, -1.0, -1.0]] * 3) * np.array([[0.3], [0.2], [0.1]])
    y = level + noise
    g = r_squared_gain(_rows(y, unrelated + level))
    sst = ((y - y.mean()) ** 2).sum()
    assert g["r2_layer"] == pytest.approx(1 - (noise**2).sum() / sst, abs=1e-12)
    assert g["gain"] == pytest.approx(0.0, abs=1e-12)
    # an effect that is the score: layer + effect explain everything
    g = r_squared_gain(_rows(y, y))
    assert g["r2_layer_effect"] == pytest.approx(1.0, abs=1e-12)
    assert g["r2_effect"] == pytest.approx(1.0, abs=1e-12)
    assert g["gain"] == pytest.approx(1 - g["r2_layer"], abs=1e-12)
    # R² of the effect alone: the squared Pearson correlation (one regressor)
    e = np.arange(12.0).reshape(3, 4) ** 1.5
    r = correlation(y.ravel(), e.ravel())
    assert r is not None
    assert r_squared_gain(_rows(y, e))["r2_effect"] == pytest.approx(r**2, abs=1e-12)
    assert r_squared_gain(_rows(np.ones((3, 4)), e))["gain"] is None  # constant score


def test_per_fact_and_per_layer_correlations():
    score = np.array([[0.1, 0.2, 0.3, 0.4], [0.2, 0.4, 0.6, 0.8], [0.3, 0.6, 0.9, 1.2]])
    effect = score.copy()
    effect[:, 3] = -score[:, 3]  # fact 3 traces strongest where it edits worst
    rows = _rows(score, effect)
    facts = per_fact_correlations(rows)
    assert [facts[f]["pearson"] for f in range(3)] == [pytest.approx(1.0)] * 3
    assert facts[3]["pearson"] == pytest.approx(-1.0) and facts[3]["n"] == 3
    layers = per_layer_correlations(rows, method="spearman")
    for L in range(3):  # across facts at a layer: ranks 1,2,3 vs 2,3,4,1
        want = np.corrcoef([1, 2, 3, 4], [2, 3, 4, 1])[0, 1]
        assert layers[L]["spearman"] == pytest.approx(want, abs=1e-12)
    s = summarize([{**r, "post_efficacy_success": 1.0} for r in rows])
    assert s["correlations"]["trace_mlp"]["pearson"]["per_fact_mean"] == pytest.approx(0.5)
    means = layer_means(rows, ["rewrite_score"])
    assert means[2]["rewrite_score"] == pytest.approx(score[2].mean(), abs=1e-15)


# --------------------------------------------------------------------------- command line


def test_cli_end_to_end_and_report(toy_dirs, cf_path, tmp_path, cache, monkeypatch, capsys):
    hp_file = tmp_path / "hp.json"
    hp_file.write_text(json.dumps(HP.to_dict()))
    out = tmp_path / "run"
    argv = [
        "layer-sweep", "--model", toy_dirs["gpt2"], "--dataset", str(cf_path), "--n", "2",
        "--layers", "0,1", "--split", "all", "--all-cases", "--hparams", str(hp_file),
        "--samples", "2", "--noise", "0.5", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| layer | n | ES |" in printed and "R² layer" in printed
    assert len((out / "rows.jsonl").read_text().splitlines()) == 4
    for name in ("summary.json", "summary.md", "rows.csv", "layer_sweep.png"):
        assert (out / name).stat().st_size > 0, name
    first = json.loads((out / "summary.json").read_text())
    (out / "layer_sweep.png").unlink()

    def refuse(*_a, **_k):
        pytest.fail("--report loaded a model")

    monkeypatch.setattr(tracing.models, "load_model", refuse)
    assert main(["layer-sweep", "--report", "--out", str(out)]) == 0
    assert (out / "layer_sweep.png").is_file()
    again = json.loads((out / "summary.json").read_text())
    assert again["layer_means"] == first["layer_means"] and again["n_requested"] == 2


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*_a, **_k):
        pytest.fail("the model was loaded before the arguments were checked")

    monkeypatch.setattr(tracing.models, "load_model", refuse)


BAD = {
    "empty layers": (["--layers", ""], "empty layer list"),
    "unreadable layers": (["--layers", "five"], "bad layer spec"),
    "n < 1": (["--n", "0"], "argument --n/--n-cases: expected an integer >= 1"),
    "an existing non-sweep folder": (["--out", "{folder}"], "not a layer-sweep folder"),
    "an existing file as --out": (["--out", "{file}"], "is an existing file"),
    "an unknown dataset": (["--dataset", "{folder}/nope.json"], "unknown dataset"),
    "a missing hparams file": (["--hparams", "{folder}/nope.json"], "does not exist"),
    "--report of a folder that is not a sweep": (
        ["--report", "--out", "{folder}"],
        "not a layer-sweep folder",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_needs_no_model(case, tmp_path, no_model_load, capsys):
    (tmp_path / "a_file.txt").write_text("not a folder")
    where = {"folder": str(tmp_path), "file": str(tmp_path / "a_file.txt")}
    extra, message = BAD[case]
    argv = ["layer-sweep", "--out", str(tmp_path / "new"), *[a.format(**where) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
