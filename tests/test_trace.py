"""Causal tracing: the fast engine against the reference algorithm, exactness checks, the
paper's own numbers on the embedded model, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tracing.noise import resolve_noise
from tracing.results import TraceResult
from tracing.trace import (
    grid_interventions,
    prepare_fact,
    restored_probs,
    trace_fact,
    window_layers,
)

PROMPT = "The Space Needle is located in the city of"
SUBJECT = "The Space Needle"
ANCHORS = Path(__file__).resolve().parent / "anchors"  # copied from shared/anchors


def test_window_convention():
    assert list(window_layers(0, 10, 18)) == [0, 1, 2, 3, 4]
    assert list(window_layers(7, 10, 18)) == list(range(2, 12))
    assert list(window_layers(17, 10, 18)) == list(range(12, 18))
    assert list(window_layers(3, 1, 18)) == [3]
    assert list(window_layers(3, 3, 18)) == [2, 3, 4]


def test_fast_engine_matches_reference_on_every_architecture(toy_model):
    """Same noise, every kind, windows 1 and 3: the two engines agree."""
    prompt = "The Space Needle is in"  # short: the reference engine is slow by design
    result_fast = trace_fact(
        toy_model, prompt, SUBJECT, samples=3, window=3, noise=0.5, method="fast"
    )
    result_ref = trace_fact(
        toy_model, prompt, SUBJECT, samples=3, window=3, noise=0.5, method="reference"
    )
    assert result_fast.answer_id == result_ref.answer_id
    assert abs(result_fast.p_clean - result_ref.p_clean) < 1e-5
    assert abs(result_fast.p_corrupted - result_ref.p_corrupted) < 1e-5
    for kind in ("resid", "mlp", "attn"):
        a, b = result_fast.scores[kind], result_ref.scores[kind]
        assert a.shape == (len(result_fast.tokens), toy_model.cfg.n_layers)
        assert np.abs(a - b).max() < 1e-5, kind
    # the noise does something on these models, so the comparison is not vacuous
    assert abs(result_fast.p_clean - result_fast.p_corrupted) > 1e-3


def test_restoring_all_subject_embeddings_gives_p_clean(toy_model):
    spec = resolve_noise(toy_model, 1.0)
    prep, _ = prepare_fact(toy_model, PROMPT, SUBJECT, None, spec, samples=4, seed=3)
    subject = [("resid", -1, t) for t in range(*prep.span)]
    for method in ("fast", "reference"):
        p = restored_probs(toy_model, prep, [subject], method=method)[0]
        assert abs(p - prep.p_clean) < 1e-6, method
    # restoring only part of the subject does not
    partial = restored_probs(toy_model, prep, [subject[:1]])[0]
    assert abs(partial - prep.p_clean) > 1e-6


def test_restoring_every_state_of_a_layer_gives_p_clean(toy_model):
    spec = resolve_noise(toy_model, 1.0)
    prep, _ = prepare_fact(toy_model, PROMPT, SUBJECT, None, spec, samples=2, seed=0)
    everything = [("resid", 1, t) for t in range(len(prep.tokens))]
    p = restored_probs(toy_model, prep, [everything])[0]
    assert abs(p - prep.p_clean) < 1e-5


def test_states_before_the_subject_score_p_corrupted(toy_models):
    model = toy_models["gemma3"]  # BOS before the subject
    r = trace_fact(model, PROMPT, "Space Needle", samples=2, noise=1.0, window=1)
    for kind in ("resid", "mlp", "attn"):
        assert np.all(r.scores[kind][: r.subject_span[0]] == r.p_corrupted)


def test_fast_engine_chunking_does_not_change_results(toy_models):
    model = toy_models["llama"]
    spec = resolve_noise(model, 1.0)
    prep, _ = prepare_fact(model, PROMPT, SUBJECT, None, spec, samples=3, seed=1)
    grid = grid_interventions("mlp", len(prep.tokens), model.cfg.n_layers, 2)
    big = restored_probs(model, prep, grid, max_rows=10_000)
    small = restored_probs(model, prep, grid, max_rows=3)
    assert np.abs(big - small).max() < 1e-6


def test_trace_result_json_round_trip(toy_models, tmp_path):
    r = trace_fact(toy_models["gpt2"], PROMPT, SUBJECT, samples=2, noise=1.0, kinds=("mlp",))
    path = r.save(tmp_path / "t.json")
    back = TraceResult.load(path)
    assert back.tokens == r.tokens and back.subject_span == r.subject_span
    assert np.array_equal(back.scores["mlp"], r.scores["mlp"])
    assert back.settings == r.settings


def test_sigma_multiple_noise_uses_subject_embedding_std(toy_models):
    model = toy_models["gpt2"]
    one = resolve_noise(model, "1s")
    three = resolve_noise(model, "s3")
    assert one.sigma is not None and one.sigma > 0
    assert three.level == pytest.approx(3 * one.sigma)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subject": "Eiffel Tower"}, "does not occur"),
        ({"subject": "the space needle"}, "different case or spacing"),
        ({"subject": "The  Space Needle"}, "different case or spacing"),
        ({"subject": ""}, "empty subject"),
        ({"prompt": ""}, "empty prompt"),
        ({"kinds": ("mlp", "heads")}, "unknown kind"),
        ({"window": 0}, "window"),
        ({"samples": 0}, "samples"),
        ({"noise": "lots"}, "invalid noise"),
        ({"answer": "   "}, "empty target"),
    ],
)
def test_bad_input_is_refused(toy_models, kwargs, message):
    args = {"prompt": PROMPT, "subject": SUBJECT, **kwargs}
    with pytest.raises(ValueError, match=message):
        trace_fact(toy_models["gpt2"], **args)


def test_prompt_longer_than_context(toy_models):
    long_prompt = "The Space Needle " + "is located in the city of " * 60
    with pytest.raises(ValueError, match="longer than the context"):
        trace_fact(toy_models["gpt2"], long_prompt, SUBJECT, samples=1)


def test_subject_occurring_twice_traces_the_requested_occurrence(toy_models):
    model = toy_models["gpt2"]
    prompt = "Paris is big. Paris is the capital of"
    first = trace_fact(model, prompt, "Paris", samples=1, kinds=("resid",), noise=1.0)
    second = trace_fact(
        model, prompt, "Paris", samples=1, kinds=("resid",), noise=1.0, occurrence=1
    )
    assert first.subject_span[0] < second.subject_span[0]
    with pytest.raises(ValueError, match="occurs 2 time"):
        trace_fact(model, prompt, "Paris", occurrence=2)


def test_multi_token_answer_is_cut_and_noted(toy_models):
    model = toy_models["gpt2"]
    r = trace_fact(model, PROMPT, SUBJECT, " Seattlexyzzy", samples=1, kinds=("resid",))
    assert r.notes and "first token" in r.notes[0]


# ----------------------------------------------------------------------- the embedded model


def test_prefix_key_value_reuse_is_taken_on_every_architecture(toy_model):
    """The fast engine reuses the corrupted run's keys and values for the positions before a
    restored token; if an architecture's blocks stop taking the cache (a transformers or
    TransformerLens change of keyword), the engine would silently recompute whole sequences:
    this fails instead."""
    spec = resolve_noise(toy_model, 0.5)
    prep, _ = prepare_fact(toy_model, PROMPT, SUBJECT, None, spec, 2, 1)
    assert prep.corrupt_kv is not None
    assert len(prep.corrupt_kv) == toy_model.cfg.n_layers
    k, v = prep.corrupt_kv[0]
    assert k.shape[0] == 2 and k.shape[-2] == len(prep.tokens) and v.shape[-2] == k.shape[-2]


@pytest.mark.model
def test_embedded_model_matches_the_papers_code_in_every_cell(gemma):
    """The anchors hold the paper's code run on this model with the same noise recipe: the
    fast engine (with its key/value reuse) reproduces every cell of all three arrays."""
    ref = json.loads((ANCHORS / "reference_trace_gemma.json").read_text())
    spec = resolve_noise(gemma, "3s")
    assert spec.level == pytest.approx(ref["noise"]["noise_level_used"], rel=1e-6)
    prep, _ = prepare_fact(gemma, ref["prompt"], ref["subject"], ref["answer"], spec, 10, 1)
    assert prep.corrupt_kv is not None  # the fast path is the one being checked
    assert prep.tokens == ref["input_tokens"] and list(prep.span) == ref["subject_range"]
    assert prep.p_clean == pytest.approx(ref["p_clean"], abs=1e-5)
    assert prep.p_corrupted == pytest.approx(ref["p_corrupted"], abs=1e-6)
    result = trace_fact(gemma, ref["prompt"], ref["subject"], ref["answer"], samples=10, seed=1)
    files = {"resid": "hidden", "mlp": "mlp", "attn": "attn"}
    for kind, name in files.items():
        anchor = np.load(ANCHORS / f"gemma_scores_{name}.npy")
        assert result.scores[kind].shape == anchor.shape
        assert np.abs(result.scores[kind] - anchor).max() <= 1e-5, kind
