"""Memory-aware batching: an out-of-memory error halves the chunk and the work goes on with
the same result; an explicit token budget changes only the chunking."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import editing.stats
import tracing.engine
from editing.hparams import TargetHparams
from editing.objective import compute_targets
from editing.prepared import prepare_requests
from editing.requests import EditRequest
from editing.stats import layer_second_moments
from tracing.errors import InvalidInput
from tracing.memory import batch_tokens, halving, set_batch_tokens
from tracing.trace import trace_fact

PROMPT, SUBJECT = "The Space Needle is in", "The Space Needle"


def _oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_halving_retries_a_chunk_that_does_not_fit(caplog):
    seen: list[list[int]] = []

    def run(chunk):
        if len(chunk) > 3:
            raise _oom()
        seen.append(list(chunk))

    with caplog.at_level(logging.WARNING):
        size = halving(list(range(10)), 8, run, "test work")
    assert size == 2 and [i for c in seen for i in c] == list(range(10))
    assert "test work: out of memory; chunk halved to 4" in caplog.text
    with pytest.raises(torch.OutOfMemoryError):
        halving([1], 1, lambda c: (_ for _ in ()).throw(_oom()), "one row")
    with pytest.raises(RuntimeError, match="not memory"):  # other errors are not swallowed
        halving([1, 2], 2, lambda c: (_ for _ in ()).throw(RuntimeError("not memory")), "x")


def test_trace_survives_out_of_memory_with_the_same_scores(toy_models, monkeypatch):
    model = toy_models["llama"]
    whole = trace_fact(model, PROMPT, SUBJECT, samples=3, noise=0.5)
    real = tracing.engine._run_chunk
    calls = {"oom": 0}

    def small_only(model, prep, chunk, cut):
        if len(chunk) > 2:
            calls["oom"] += 1
            raise _oom()
        return real(model, prep, chunk, cut)

    monkeypatch.setattr(tracing.engine, "_run_chunk", small_only)
    halved = trace_fact(model, PROMPT, SUBJECT, samples=3, noise=0.5)
    assert calls["oom"] >= 1
    for kind in whole.scores:
        np.testing.assert_allclose(halved.scores[kind], whole.scores[kind], rtol=0, atol=1e-6)


def test_statistics_survive_out_of_memory(toy_models, monkeypatch, tmp_path):
    """Keys of a batch are added only once all its layers ran, so a batch that fails half-way
    and is split is not counted twice."""
    model = toy_models["gpt2"]
    kw = dict(n_tokens=1500, seq_len=64, batch_size=4, progress=False)
    whole = layer_second_moments(model, [0, 2], cache_dir=tmp_path / "a", **kw)
    real = editing.stats.run_until

    def fails_late(model, tokens, hooks, stop_after):
        if tokens.shape[0] > 1:
            real(model, tokens, hooks[:1], stop_after=hooks[0][0])  # layer 0's hook fires
            raise _oom()
        return real(model, tokens, hooks, stop_after=stop_after)

    monkeypatch.setattr(editing.stats, "run_until", fails_late)
    split = layer_second_moments(model, [0, 2], cache_dir=tmp_path / "b", **kw)
    for L in (0, 2):
        assert split[L].count == whole[L].count
        torch.testing.assert_close(split[L].mom2, whole[L].mom2, rtol=1e-5, atol=1e-6)


def test_targets_restart_with_half_the_chunk(toy_models, monkeypatch):
    model = toy_models["gpt2"]
    reqs = [
        EditRequest("{} is located in the city of", "The Space Needle", "Paris"),
        EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ]
    prepared = prepare_requests(model, reqs, ["{}", "Because of this. {}"])
    hp = TargetHparams(num_steps=3, lr=0.5)
    ref = compute_targets(model, prepared, layer=1, hook="mlp_raw", hp=hp, max_batch_tokens=64)
    import editing.objective as objective

    real = objective._optimise
    budgets = []

    def small_only(model, prepared, layer, hook, hp, budget, progress):
        budgets.append(budget)
        if budget > 64:
            raise _oom()
        return real(model, prepared, layer, hook, hp, budget, progress)

    monkeypatch.setattr(objective, "_optimise", small_only)
    got = compute_targets(model, prepared, layer=1, hook="mlp_raw", hp=hp, max_batch_tokens=256)
    assert budgets == [256, 128, 64]
    torch.testing.assert_close(got.targets, ref.targets)


def test_an_explicit_budget_only_changes_the_chunking(toy_models):
    model = toy_models["gemma3"]
    default = batch_tokens(model)
    before = trace_fact(model, PROMPT, SUBJECT, samples=3, noise=0.5)
    try:
        set_batch_tokens(model, 20)
        assert batch_tokens(model) == 20
        after = trace_fact(model, PROMPT, SUBJECT, samples=3, noise=0.5)
    finally:
        set_batch_tokens(model, None)
    assert batch_tokens(model) == default
    for kind in before.scores:
        np.testing.assert_allclose(after.scores[kind], before.scores[kind], rtol=0, atol=1e-6)
    with pytest.raises(InvalidInput, match="positive integer"):
        set_batch_tokens(model, 0)
