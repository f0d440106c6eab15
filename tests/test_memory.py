"""Memory-aware batching: an out-of-memory error halves the chunk and the work goes on with
the same result; an explicit token budget changes only the chunking."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import editing.statistics.stats
import tracing.engine
from editing.hparams import TargetHparams
from editing.requests import EditRequest
from editing.requests.prepared import prepare_requests
from editing.statistics.stats import layer_second_moments
from editing.targets.objective import compute_targets
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

    def small_only(*args):
        chunk = args[-2]  # (model, prep, [base,] chunk, cut)
        if len(chunk) > 2:
            calls["oom"] += 1
            raise _oom()
        return real(*args)

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
    real = editing.statistics.stats.run_until

    def fails_late(model, tokens, hooks, stop_after):
        if tokens.shape[0] > 1:
            real(model, tokens, hooks[:1], stop_after=hooks[0][0])  # layer 0's hook fires
            raise _oom()
        return real(model, tokens, hooks, stop_after=stop_after)

    monkeypatch.setattr(editing.statistics.stats, "run_until", fails_late)
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
    import editing.targets.objective as objective

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


# ------------------------------------------------------------------ reading the GPUs' memory

GiB = 1 << 30


def _fake_gpus(monkeypatch, model, free: dict[int, tuple[int, int, int]], blocks: list[int]):
    """Pretend ``model`` runs on GPUs: block ``L`` on ``cuda:blocks[L]``, the embedding on the
    first block's GPU and the unembedding on the last one's; ``free[i]`` is GPU ``i``'s
    (driver-free, reserved, allocated) bytes as the CUDA queries would report them."""
    import tracing.memory

    cuda = [torch.device("cuda", i) for i in range(max(blocks) + 1)]
    monkeypatch.setattr(tracing.memory, "model_device", lambda m: cuda[blocks[0]])
    monkeypatch.setattr(tracing.memory, "layer_device", lambda m, L: cuda[blocks[L]], raising=False)
    monkeypatch.setattr(
        tracing.memory, "_unembed_device", lambda m: cuda[blocks[-1]], raising=False
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[d.index][0], 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: free[d.index][1])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: free[d.index][2])


def _per_block(model) -> int:
    """Bytes per token of one block's transient states, float32: the residual-sized states
    (8 x d_model) and the MLP-sized ones (3 x d_mlp)."""
    return 4 * (8 * model.cfg.d_model + 3 * model.cfg.d_mlp)


def test_free_memory_counts_what_the_caching_allocator_holds_unused(toy_models, monkeypatch):
    model = toy_models["llama"]
    # the driver sees 1 GiB free; PyTorch reserved 3 GiB of which 1 GiB is in use
    _fake_gpus(monkeypatch, model, {0: (1 * GiB, 3 * GiB, 1 * GiB)}, [0] * 4)
    assert batch_tokens(model) == int(0.4 * (1 + 3 - 1) * GiB / _per_block(model))


def test_a_device_mapped_model_takes_the_tightest_gpu(toy_models, monkeypatch):
    """Blocks 0-1 on a roomy GPU 0, blocks 2-3 and the unembedding on a nearly full GPU 1:
    the budget is GPU 1's, with its two blocks' activations and the vocabulary arrays."""
    model = toy_models["llama"]
    free = {0: (10 * GiB, 0, 0), 1: (GiB // 2, GiB, 3 * GiB // 4)}
    _fake_gpus(monkeypatch, model, free, [0, 0, 1, 1])
    vocab = 4 * 4 * model.cfg.d_vocab  # logits, log-softmax and both gradients, float32
    gpu0 = 0.4 * 10 * GiB / (2 * _per_block(model))
    gpu1 = 0.4 * (GiB // 2 + GiB // 4) / (2 * _per_block(model) + vocab)
    assert gpu1 < gpu0
    assert batch_tokens(model, grad=True) == max(256, int(gpu1))
    assert batch_tokens(model) == int(0.4 * (GiB // 2 + GiB // 4) / _per_block(model))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_grad_estimate_counts_the_vocabulary_arrays(toy_dirs, dtype):
    """Per position with gradient: every block's kept activations, and on the generic
    vocabulary path ([reads, vocab] rows, every position counted as a read) the arrays
    listed here by hand."""
    from tracing.memory import token_bytes
    from tracing.models import load_model

    model = load_model(toy_dirs["llama"], dtype=dtype)
    half = dtype != "float32"
    elem = 2 if half else 4
    rows = {
        "logits (model dtype)": elem,
        "their gradient": elem,
        "log-softmax (float32)": 4,
        "its gradient": 4,
        **({"float32 copy of the logits": 4, "its gradient ": 4} if half else {}),
    }
    blocks = model.cfg.n_layers * elem * (8 * model.cfg.d_model + 3 * model.cfg.d_mlp)
    assert token_bytes(model, grad=True) == blocks + sum(rows.values()) * model.cfg.d_vocab
