"""Many facts: filtering, resumable traces, average effects, layer selection, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from factscope.cli import main
from tracing import localization as D
from tracing.facts import Fact, load_known_facts
from tracing.results import AverageEffects, LayerSelection, TraceResult, TraceSettings


def _result(span, n_tokens, n_layers, fill) -> TraceResult:
    scores = {k: fill(k, n_tokens, n_layers) for k in ("resid", "mlp", "attn")}
    return TraceResult(
        prompt="p",
        subject="s",
        answer=" a",
        answer_id=1,
        tokens=[f"t{i}" for i in range(n_tokens)],
        token_ids=list(range(n_tokens)),
        subject_span=span,
        p_clean=0.5,
        p_corrupted=0.1,
        scores=scores,
        settings=TraceSettings(("resid", "mlp", "attn"), {}, 1.0, "1", None, False, 2, 1, "fast"),
    )


def test_known_1000_ships_all_facts():
    facts = load_known_facts()
    assert len(facts) == 1209
    assert facts[0].subject == "Vinson Massif" and facts[0].answer == " Antarctica"


def test_class_tokens():
    assert D.class_tokens((1, 4), 10) == {
        "first_subject": [1],
        "middle_subject": [2],
        "last_subject": [3],
        "first_subsequent": [4],
        "further": [5, 6, 7, 8],
        "last": [9],
    }
    one = D.class_tokens((2, 3), 5)
    assert one["first_subject"] == one["last_subject"] == [2] and one["middle_subject"] == []
    end = D.class_tokens((1, 4), 5)  # subject right before the last token
    assert end["first_subsequent"] == [] and end["last"] == [4]


def test_average_effects_against_a_hand_computation():
    def fill_a(kind, t, n):
        return np.arange(t * n, dtype=float).reshape(t, n) / 100

    def fill_b(kind, t, n):
        return np.full((t, n), 0.3)

    a = _result((1, 4), 8, 3, fill_a)
    b = _result((2, 3), 6, 3, fill_b)
    eff = D.average_effects([a, b])
    sa = a.scores["mlp"] - 0.1
    # last subject token: a -> token 3, b -> token 2
    expected = (sa[3] + (0.3 - 0.1)) / 2
    assert np.allclose(eff.effects["mlp"]["last_subject"], expected)
    # middle subject only exists in a; "further" averages tokens 5..6 of a and 4 of b
    assert eff.counts["mlp"]["middle_subject"] == 1
    assert np.allclose(eff.effects["mlp"]["middle_subject"], sa[2])
    assert np.allclose(eff.effects["mlp"]["further"], (sa[5:7].mean(0) + 0.2) / 2)
    assert eff.n_facts == 2
    back = AverageEffects.from_dict(json.loads(json.dumps(eff.to_dict())))
    assert np.allclose(back.effects["mlp"]["last"], eff.effects["mlp"]["last"])


def test_select_layers_picks_the_best_contiguous_window():
    per_layer = np.array([0.1, 0.5, 0.6, 0.7, 0.2, 0.9, 0.0, 0.0])
    eff = AverageEffects(
        effects={"mlp": {"last_subject": per_layer}},
        counts={"mlp": {"last_subject": 3}},
        n_facts=3,
        mean_p_clean=0.5,
        mean_p_corrupted=0.1,
    )
    assert D.select_layers(eff, k=3).layers == [1, 2, 3]  # 1.8 beats 2-4 (1.5), 3-5 (1.8 tie)
    assert D.select_layers(eff, k=1).layers == [5]
    assert D.select_layers(eff, k=8).layers == list(range(8))
    with pytest.raises(ValueError, match="k must be"):
        D.select_layers(eff, k=9)
    with pytest.raises(ValueError, match="no 'attn' effects"):
        D.select_layers(eff, kind="attn")


def test_trace_dataset_resumes_from_cache(toy_models, tmp_path, monkeypatch):
    model = toy_models["gpt2"]
    facts = [
        Fact("The Space Needle is located in the city of", "The Space Needle", None, known_id=0),
        Fact("Paris is the capital of", "Paris", None, known_id=1),
        Fact("The Eiffel Tower is in", "The Eiffel Tower", None, known_id=2),
    ]
    kw = dict(out_dir=tmp_path, only_known=False, samples=2, noise=0.5, window=2, progress=False)
    first = D.trace_dataset(model, facts[:2], **kw)
    assert len(list((tmp_path / "traces").glob("*.json"))) == 2
    calls = []
    real = D.trace_fact

    def counting(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(D, "trace_fact", counting)
    again = D.trace_dataset(model, facts, **kw)
    assert calls == [facts[2].prompt]  # only the new fact was traced
    assert np.array_equal(again[0].scores["mlp"], first[0].scores["mlp"])
    assert len(D.load_traces(tmp_path)) == 3


@pytest.mark.parametrize(
    "change",
    [
        {"noise": 0.7},
        {"uniform_noise": True},
        {"window": 3},
        {"samples": 3},
        {"seed": 2},
        {"method": "reference"},
        {"method": "atp"},
        {"method": "atp+exact"},
        {"kinds": ["mlp", "attn"]},
    ],
)
def test_trace_cache_is_keyed_by_every_setting_that_changes_a_score(
    toy_models, tmp_path, monkeypatch, change
):
    """A stored trace is reused only for the settings it was made with: changing any of
    them recomputes (and the unchanged settings reuse it)."""
    model = toy_models["gpt2"]
    facts = [Fact("Paris is the capital of", "Paris", None, known_id=0)]
    kw = dict(out_dir=tmp_path, only_known=False, samples=2, noise=0.5, window=2, kinds=["mlp"])
    kw["progress"] = False
    D.trace_dataset(model, facts, **kw)
    calls = []
    real = D.trace_fact

    def counting(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(D, "trace_fact", counting)
    D.trace_dataset(model, facts, **kw)
    assert calls == []  # same settings: reused
    D.trace_dataset(model, facts, **{**kw, **change})
    assert len(calls) == 1  # any changed setting: recomputed


def test_atp_exact_trace_is_not_reused_for_another_share(toy_models, tmp_path, monkeypatch):
    model = toy_models["gpt2"]
    facts = [Fact("Paris is the capital of", "Paris", None, known_id=0)]
    kw = dict(out_dir=tmp_path, only_known=False, samples=1, noise=0.5, kinds=["mlp"])
    kw.update(progress=False, method="atp+exact")
    D.trace_dataset(model, facts, **kw)
    calls = []
    real = D.trace_fact
    monkeypatch.setattr(D, "trace_fact", lambda *a, **k: calls.append(k) or real(*a, **k))
    D.trace_dataset(model, facts, **kw)
    assert calls == []
    D.trace_dataset(model, facts, **{**kw, "exact_top": 0.5})
    assert len(calls) == 1


def test_method_auto_is_exact_for_small_runs_and_atp_exact_above(toy_models, monkeypatch):
    model = toy_models["gpt2"]
    facts = [Fact("Paris is the capital of", "Paris"), Fact("Rome is the capital of", "Rome")]
    kw = dict(only_known=False, samples=1, noise=0.5, kinds=["resid"], progress=False)
    assert {r.settings.method for r in D.trace_dataset(model, facts, **kw)} == {"fast"}
    monkeypatch.setattr(D, "AUTO_ATP_ABOVE", 1)
    traced = D.trace_dataset(model, facts, **kw)
    assert {r.settings.method for r in traced} == {"atp+exact"}
    assert all(r.exact is not None for r in traced)
    assert D.trace_dataset(model, facts, **{**kw, "method": "fast"})[0].settings.method == "fast"


def test_only_unknown_facts_are_refused_before_tracing(toy_models, monkeypatch):
    model = toy_models["llama"]
    facts = [Fact("Paris is the capital of", "Paris", " zzzzqq")]
    monkeypatch.setattr(D, "trace_fact", lambda *a, **k: pytest.fail("traced an unknown fact"))
    with pytest.raises(ValueError, match="knows none of the 1 facts") as err:
        D.trace_dataset(model, facts, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown method"):
        D.trace_dataset(model, facts, method="atp*")


def test_known_facts_filter_keeps_only_top1_answers(toy_models):
    model = toy_models["llama"]
    from tracing.forward import next_token_probs
    from tracing.models import decode

    prompt = "Paris is the capital of"
    top = decode(model, int(next_token_probs(model, [prompt])[0].argmax()))
    wrong = " zzzz" if top != " zzzz" else " qqqq"
    facts = [Fact(prompt, "Paris", top), Fact(prompt, "Paris", wrong)]
    kept = D.known_facts(model, facts)
    assert kept == [facts[0]]


def test_cli_trace_dataset_and_select_layers(toy_dirs, tmp_path, capsys):
    facts = tmp_path / "facts.json"
    facts.write_text(
        json.dumps(
            [
                {"prompt": "The Space Needle is located in the city of", "subject": "Space Needle"},
                {"prompt": "Paris is the capital of", "subject": "Paris"},
            ]
        )
    )
    runs = tmp_path / "runs"
    args = ["trace-dataset", "--model", toy_dirs["gemma3"], "--facts", str(facts), "--n", "2"]
    args += ["--all-facts", "--samples", "2", "--noise", "0.5", "--out", str(runs)]
    assert main([*args, "--no-progress"]) == 0
    assert "traced 2 facts" in capsys.readouterr().out
    assert (runs / "average_effects.png").stat().st_size > 1000
    assert (runs / "average_heatmap.png").stat().st_size > 1000
    assert main(["select-layers", str(runs), "--k", "2"]) == 0
    sel = LayerSelection.load(runs / "layers.json")
    assert len(sel.layers) == 2 and sel.n_facts == 2
    assert main(["select-layers", str(runs), "--k", "9"]) == 2


def test_cli_trace_writes_files_and_refuses_bad_subject(toy_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["trace", "The Space Needle is located in the city of", "--subject", "Space Needle"]
    args += ["--model", toy_dirs["llama"], "--samples", "2", "--noise", "0.5", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "p_clean" in text and "peak mlp" in text
    for name in ("trace.json", "trace.png", "trace.svg", "trace.html"):
        assert (out / name).stat().st_size > 500
    assert TraceResult.load(out / "trace.json").subject == "Space Needle"
    bad = ["trace", "The Space Needle is", "--subject", "Eiffel", "--model", toy_dirs["llama"]]
    assert main(bad) == 2
    assert "does not occur" in capsys.readouterr().err
