"""The tracing commands: counts and levels out of range refused while parsing (exit 2,
before any model loads), the severed kinds and the measure options end to end on a tiny
model, and the papers' comparison figure."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tracing.models
from factscope.cli import main
from tracing.results import AverageEffects, TraceResult
from viz.severed import SERIES, plot_severed, severed_figure, severed_series


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*_a, **_k):
        pytest.fail("the model was loaded before the arguments were checked")

    monkeypatch.setattr(tracing.models, "load_model", refuse)


TRACE = ["trace", "The Space Needle is in", "--subject", "The Space Needle"]
CASES = {
    "trace --window 0": ([*TRACE, "--window", "0"], "--window"),
    "trace --samples 0": ([*TRACE, "--samples", "0"], "--samples"),
    "trace --noise -1": ([*TRACE, "--noise", "-1"], "--noise"),
    "trace --noise abc": ([*TRACE, "--noise", "abc"], "--noise"),
    "trace --resid-window 0": ([*TRACE, "--resid-window", "0"], "--resid-window"),
    "trace --seed -1": ([*TRACE, "--seed", "-1"], "--seed"),
    "trace --occurrence -1": ([*TRACE, "--occurrence", "-1"], "--occurrence"),
    "trace --exact-top 2": ([*TRACE, "--exact-top", "2"], "--exact-top"),
    "trace-dataset --n 0": (["trace-dataset", "--n", "0"], "--n/--n-facts"),
    "trace-dataset --samples 0": (["trace-dataset", "--samples", "0"], "--samples"),
    "trace-dataset --window -3": (["trace-dataset", "--window", "-3"], "--window"),
    "select-layers --k 0": (["select-layers", "runs", "--k", "0"], "--k"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_counts_out_of_range_are_refused_while_parsing(case, no_model_load, capsys):
    argv, option = CASES[case]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, no usage text
    assert line.startswith(f"error: argument {option}") and "expected " in line, line


def test_bad_measure_options_exit_2_before_the_model_loads(no_model_load, capsys):
    code = main([*TRACE, "--replacement", "The Eiffel Tower"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "corruption 'replace'" in err[0]


def test_trace_draws_severed_kinds_and_the_comparison(toy_dirs, tmp_path, capsys):
    out = tmp_path / "one"
    code = main([*TRACE, "--model", toy_dirs["gpt2"], "--kinds", "resid", "resid/mlp-severed",
                 "resid/attn-severed", "--samples", "2", "--noise", "0.5", "--out", str(out),
                 "--no-progress", "--formats", "png"])  # fmt: skip
    assert code == 0
    assert (out / "severed.png").is_file() and (out / "severed.html").is_file()
    r = TraceResult.load(out / "trace.json")
    assert set(r.scores) == {"resid", "resid/mlp-severed", "resid/attn-severed"}
    assert r.settings.severed_noise == "papers"


def test_trace_dataset_and_select_layers_by_mediation(toy_dirs, tmp_path, capsys):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([
        {"prompt": "The Space Needle is in", "subject": "The Space Needle"},
        {"prompt": "Vinson Massif is located in the continent of", "subject": "Vinson Massif"},
    ]))  # fmt: skip
    runs = tmp_path / "runs"
    base = ["trace-dataset", "--model", toy_dirs["gpt2"], "--facts", str(facts), "--all-facts",
            "--kinds", "resid", "resid/mlp-severed", "--samples", "2", "--noise", "0.5",
            "--method", "fast", "--out", str(runs), "--no-progress"]  # fmt: skip
    assert main(base) == 0
    assert (runs / "average_severed.png").is_file()
    assert main(["select-layers", str(runs), "--by", "mediation", "--k", "2"]) == 0
    sel = json.loads((runs / "layers.json").read_text())
    assert sel["by"] == "mediation" and len(sel["layers"]) == 2
    capsys.readouterr()
    assert main([*base, "--metric", "logprob"]) == 2  # the folder holds prob traces
    assert "metric 'prob'" in capsys.readouterr().err


def _trace(n_layers: int = 4) -> TraceResult:
    from tracing.results import TraceSettings

    rng = np.random.default_rng(0)
    kinds = ("resid", "resid/mlp-severed", "resid/attn-severed")
    settings = TraceSettings(kinds=kinds, window=dict.fromkeys(kinds, 1), noise=1.0,
                             noise_spec="3s", sigma=None, uniform_noise=False, samples=2,
                             seed=1, method="fast")  # fmt: skip
    return TraceResult(
        prompt="a b c d", subject="b c", answer=" x", answer_id=1, tokens=["a", "b", "c", "d"],
        token_ids=[0, 1, 2, 3], subject_span=(1, 3), p_clean=0.9, p_corrupted=0.1,
        scores={k: 0.1 + 0.8 * rng.random((4, n_layers)) for k in kinds}, settings=settings,
    )  # fmt: skip


def test_the_comparison_reads_the_last_subject_token():
    r = _trace()
    rows, title = severed_series(r)
    for kind, _, _ in SERIES:
        assert np.allclose(rows[kind], r.scores[kind][2] - 0.1)  # token 2: last of the subject
    assert "noise 3s corruption · denoise · prob" in title
    fig = plot_severed(r)
    bars = fig.axes[0].containers
    assert len(bars) == 3
    assert np.allclose([b.get_height() for b in bars[2]], rows["resid/mlp-severed"])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [s[1] for s in SERIES]
    assert len(severed_figure(r).data) == 3


def test_the_average_comparison_and_a_missing_kind():
    effects = AverageEffects(
        effects={"resid": {"last_subject": np.arange(4.0)},
                 "resid/mlp-severed": {"last_subject": np.ones(4)}},
        counts={}, n_facts=7, mean_p_clean=0.5, mean_p_corrupted=0.1,
        settings={"metric": "logprob"},
    )  # fmt: skip
    rows, title = severed_series(effects)
    assert set(rows) == {"resid", "resid/mlp-severed"} and "7 facts" in title
    assert "Δ log p" in plot_severed(effects).axes[0].get_ylabel()
    del effects.effects["resid/mlp-severed"]
    with pytest.raises(Exception, match="needs resid and a severed kind"):
        severed_series(effects)
