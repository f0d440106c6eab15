"""Traces restricted to the subject's last token (``tokens="subject-last"``): the row equals
that row of the full trace of the reference engine on every tiny architecture, the fast
engine keeps its key/value reuse, and averages and resumed runs store the choice."""

from __future__ import annotations

import numpy as np
import pytest

import tracing.engine
from tracing.errors import InvalidInput
from tracing.facts import Fact
from tracing.localization import average_effects, trace_dataset
from tracing.results import ALL_KINDS, TraceResult
from tracing.trace import trace_fact

PROMPT = "The Space Needle is in"
SUBJECT = "The Space Needle"
# windows of 2 for mlp/attn: the default 10 covers every layer of a tiny model (a flat row)
OPTIONS = dict(kinds=ALL_KINDS, samples=2, noise=0.5, window=2)


def test_subject_last_row_equals_that_row_of_the_full_trace_on_every_architecture(toy_model):
    one = trace_fact(toy_model, PROMPT, SUBJECT, tokens="subject-last", **OPTIONS)
    full = trace_fact(toy_model, PROMPT, SUBJECT, **OPTIONS)
    t = one.subject_span[1] - 1
    assert one.settings.tokens == "subject-last" and one.measured_tokens() == [t]
    for kind in ALL_KINDS:
        assert np.abs(one.scores[kind][t] - full.scores[kind][t]).max() < 2e-5, kind
        others = np.delete(one.scores[kind], t, axis=0)
        assert np.isnan(others).all(), kind
        # the row is not flat, so the comparison is not vacuous
        assert np.ptp(full.scores[kind][t]) > 1e-5, kind
    assert one.peak("resid")[0] == t


def test_subject_last_row_equals_the_reference_engine(toy_models):
    """The reference engine (one whole-model batch per cell) of the same row, itself
    restricted: the two engines agree cell by cell."""
    kinds = ("resid", "resid/mlp-severed")
    options = dict(OPTIONS, kinds=kinds, tokens="subject-last")
    one = trace_fact(toy_models["gpt2"], PROMPT, SUBJECT, **options)
    ref = trace_fact(toy_models["gpt2"], PROMPT, SUBJECT, method="reference", **options)
    t = one.subject_span[1] - 1
    for kind in kinds:
        assert np.abs(one.scores[kind][t] - ref.scores[kind][t]).max() < 2e-5, kind
        assert np.isnan(np.delete(ref.scores[kind], t, axis=0)).all(), kind


def test_subject_last_under_other_metrics_equals_the_full_fast_trace(toy_models):
    options = dict(OPTIONS, kinds=("resid", "mlp"), metric="logit-diff", normalise=True)
    one = trace_fact(toy_models["llama"], PROMPT, SUBJECT, tokens="subject-last", **options)
    full = trace_fact(toy_models["llama"], PROMPT, SUBJECT, **options)
    t = one.subject_span[1] - 1
    for kind in ("resid", "mlp"):
        assert np.abs(one.scores[kind][t] - full.scores[kind][t]).max() < 1e-6, kind


def test_subject_last_fast_engine_reuses_the_prefix_keys_and_values(toy_model, monkeypatch):
    """Every block the engine runs computes only the positions from the subject's last token
    on (the corrupted run's keys and values stand in for the prefix); recomputing whole
    sequences, or running other rows, fails this."""
    seen: list[int] = []
    real = tracing.engine.run_block

    def spy(model, layer, h, kwargs, cache=None):
        seen.append(int(h.shape[1]))
        assert cache is not None, "no key/value prefix passed"
        return real(model, layer, h, kwargs, cache)

    monkeypatch.setattr(tracing.engine, "run_block", spy)
    r = trace_fact(toy_model, PROMPT, SUBJECT, tokens="subject-last", **OPTIONS)
    assert seen and set(seen) == {len(r.tokens) - (r.subject_span[1] - 1)}


def test_averages_and_resume_keep_the_token_choice(toy_models, tmp_path):
    model = toy_models["gpt2"]
    facts = [
        Fact(prompt=PROMPT, subject=SUBJECT, answer=None),
        Fact(prompt="The Eiffel Tower is located in", subject="The Eiffel Tower", answer=None),
    ]
    options = dict(only_known=False, out_dir=tmp_path, progress=False, **OPTIONS)
    one = trace_dataset(model, facts, tokens="subject-last", **options)
    assert all(r.settings.tokens == "subject-last" for r in one)
    avg = average_effects(one)
    assert avg.settings["tokens"] == ["subject-last"]
    assert all(set(per) == {"last_subject"} for per in avg.effects.values())
    # a trace of one row never stands in for a full trace: resuming with every token retraces
    full = trace_dataset(model, facts, **options)
    assert all(r.settings.tokens == "all" and not np.isnan(r.scores["resid"]).any() for r in full)
    stored = [TraceResult.load(p) for p in sorted((tmp_path / "traces").glob("*.json"))]
    assert [r.settings.tokens for r in stored] == ["all", "all"]
    # and a full trace serves a one-row request (loaded, not retraced: same seconds)
    again = trace_dataset(model, facts, tokens="subject-last", **options)
    assert [r.seconds for r in again] == [r.seconds for r in full]
    ref = average_effects(full)
    for kind, per in average_effects(again).effects.items():
        assert np.allclose(per["last_subject"], ref.effects[kind]["last_subject"])
    # the average of one-row traces is the full traces' last-subject-token average
    for kind, per in avg.effects.items():
        assert np.abs(per["last_subject"] - ref.effects[kind]["last_subject"]).max() < 1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tokens="subject-first"), "unknown tokens"),
        (dict(tokens="subject-last", method="atp"), "use --method fast"),
        (dict(tokens="subject-last", method="atp+exact"), "use --method fast"),
    ],
)
def test_bad_token_choice_is_refused(toy_models, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        trace_fact(toy_models["gpt2"], PROMPT, SUBJECT, **dict(OPTIONS, kinds=("resid",)), **kwargs)
