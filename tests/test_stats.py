"""Second-moment statistics: one early-stopping pass vs a slow per-layer per-token loop,
the disk cache, resuming after an interruption, and NaN/inf rejection."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from editing.statistics.corpus import wikitext_paragraphs
from editing.statistics.stats import corpus_sequences, layer_second_moments, stats_dir
from tracing.models import hook_name, prepends_bos

N_TOKENS, SEQ_LEN = 150, 32  # 4 full sequences + one of 22 positions


class CallCounter:
    """A forward (pre-)hook on a module that counts calls and can raise on the n-th call."""

    def __init__(self, module, raise_on: int | None = None, pre: bool = False):
        self.calls, self.raise_on = 0, raise_on
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self.handle = register(self)

    def __call__(self, *args):
        self.calls += 1
        if self.raise_on is not None and self.calls == self.raise_on:
            raise RuntimeError("simulated interruption")

    def remove(self):
        self.handle.remove()


def _reference(model, layers, seqs, per_token: bool = True) -> dict[int, torch.Tensor]:
    """The obvious way: a full forward per sequence and layer, then one outer product per
    token in float64 (``per_token=False``: k^T k per sequence, for the large real model)."""
    out = {}
    for L in layers:
        name = hook_name(model, "mlp_key", L)
        acc = torch.zeros(model.cfg.d_mlp, model.cfg.d_mlp, dtype=torch.float64)
        n = 0
        for seq in seqs:
            with torch.no_grad():
                _, cache = model.run_with_cache(
                    torch.tensor([seq]), names_filter=[name], use_cache=False, logits_to_keep=1
                )
            keys = cache[name][0].double()
            if per_token:
                for k in keys:
                    acc += torch.outer(k, k)
            else:
                acc += keys.T @ keys
            n += len(keys)
        out[L] = acc / n
    return out


def test_corpus_sequences_count_and_bos(toy_model):
    seqs = corpus_sequences(toy_model, "wikitext", N_TOKENS, SEQ_LEN)
    assert [len(s) for s in seqs] == [32, 32, 32, 32, 22]
    bos = prepends_bos(toy_model)
    body = [t for s in seqs for t in (s[1:] if bos else s)]
    if bos:
        assert all(s[0] == toy_model.tokenizer.bos_token_id for s in seqs)
    expected: list[int] = []
    for text in wikitext_paragraphs("test"):
        expected += toy_model.tokenizer(text + "\n", add_special_tokens=False)["input_ids"]
        if len(expected) >= len(body):
            break
    assert body == expected[: len(body)]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_one_pass_equals_slow_per_layer_loop(toy_model, tmp_path, dtype, rtol):
    layers = [0, 2]
    got = layer_second_moments(
        toy_model,
        layers,
        n_tokens=N_TOKENS,
        seq_len=SEQ_LEN,
        batch_size=3,
        dtype=dtype,
        cache_dir=tmp_path,
        progress=False,
    )
    ref = _reference(toy_model, layers, corpus_sequences(toy_model, "wikitext", N_TOKENS, SEQ_LEN))
    for L in layers:
        assert got[L].count == N_TOKENS and got[L].mom2.dtype == dtype and got[L].layer == L
        assert torch.allclose(got[L].mom2.double(), ref[L], rtol=rtol, atol=rtol * 1e-2)
        assert torch.equal(got[L].mom2, got[L].mom2.T)


def test_forward_stops_after_the_deepest_layer(toy_model, tmp_path):
    deepest = 1
    first = CallCounter(toy_model.blocks[0])
    deeper = CallCounter(toy_model.blocks[deepest + 1], pre=True)
    own_out = CallCounter(toy_model.blocks[deepest].mlp.out)  # fires only if the MLP finishes
    try:
        layer_second_moments(
            toy_model,
            [0, deepest],
            n_tokens=N_TOKENS,
            seq_len=SEQ_LEN,
            batch_size=2,
            cache_dir=tmp_path,
            progress=False,
        )
    finally:
        for h in (first, deeper, own_out):
            h.remove()
    assert first.calls == 3  # 4 full sequences in 2 batches + the short one
    assert deeper.calls == 0 and own_out.calls == 0


def test_cache_hit_runs_no_model_and_keys_differ(toy_models, tmp_path):
    model = toy_models["gpt2"]
    kw = dict(n_tokens=N_TOKENS, seq_len=SEQ_LEN, cache_dir=tmp_path, progress=False)
    first = layer_second_moments(model, [1], **kw)
    counter = CallCounter(model.blocks[0])
    try:
        again = layer_second_moments(model, [1], **kw)
        assert counter.calls == 0
        assert torch.equal(again[1].mom2, first[1].mom2) and again[1].count == first[1].count
        assert again[1].path == first[1].path and again[1].path.exists()
        # a request adding a layer computes only the missing one, in one pass
        both = layer_second_moments(model, [1, 3], **kw)
        assert counter.calls == 2 and torch.equal(both[1].mom2, first[1].mom2)  # 4+1 seqs
    finally:
        counter.remove()
    meta = json.loads(first[1].path.with_suffix(".json").read_text())
    assert meta["count"] == N_TOKENS and meta["layer"] == 1
    assert both[3].path != both[1].path and both[3].path.parent == both[1].path.parent
    other_n = layer_second_moments(model, [1], **{**kw, "n_tokens": N_TOKENS + 10})
    assert other_n[1].path.parent != first[1].path.parent and other_n[1].count == N_TOKENS + 10
    other_model = layer_second_moments(toy_models["gptj"], [1], **kw)
    assert other_model[1].path.parent.parent != first[1].path.parent.parent
    f64 = stats_dir(model, n_tokens=N_TOKENS, seq_len=SEQ_LEN, dtype="float64", cache_dir=tmp_path)
    assert f64 != first[1].path.parent


def test_interrupted_run_resumes_to_the_same_matrix(toy_models, tmp_path):
    model = toy_models["llama"]
    kw = dict(
        n_tokens=N_TOKENS,
        seq_len=SEQ_LEN,
        batch_size=1,
        dtype=torch.float64,
        progress=False,
        checkpoint_every=2,
    )
    whole = layer_second_moments(model, [0, 2], cache_dir=tmp_path / "a", **kw)
    crash = CallCounter(model.blocks[0], raise_on=4)  # dies in batch 4 (after checkpoint 2)
    try:
        with pytest.raises(RuntimeError, match="simulated interruption"):
            layer_second_moments(model, [0, 2], cache_dir=tmp_path / "b", **kw)
    finally:
        crash.remove()
    folder = stats_dir(
        model, n_tokens=N_TOKENS, seq_len=SEQ_LEN, dtype="float64", cache_dir=tmp_path / "b"
    )
    partial = json.loads((folder / "partial.json").read_text())
    assert partial["batches"] == 2 and partial["count"] == 2 * SEQ_LEN
    assert not (folder / "layer_0.json").exists()
    counter = CallCounter(model.blocks[0])
    try:
        resumed = layer_second_moments(model, [0, 2], cache_dir=tmp_path / "b", **kw)
    finally:
        counter.remove()
    assert counter.calls == 5 - 2  # only the batches after the checkpoint ran
    for L in (0, 2):
        assert torch.equal(resumed[L].mom2, whole[L].mom2) and resumed[L].count == N_TOKENS
    assert not (folder / "partial.json").exists()


def test_nan_keys_and_nan_cache_are_rejected_naming_the_layer(toy_models, tmp_path):
    model = toy_models["gemma3"]
    kw = dict(n_tokens=N_TOKENS, seq_len=SEQ_LEN, cache_dir=tmp_path, progress=False)

    def poison(module, args):
        return (torch.full_like(args[0], float("nan")),)

    handle = model.blocks[1].mlp.out.register_forward_pre_hook(poison)
    try:
        with pytest.raises(ValueError, match="layer 1: NaN or inf"):
            layer_second_moments(model, [0, 1], **kw)
    finally:
        handle.remove()
    good = layer_second_moments(model, [0], **kw)[0]
    bad = good.mom2.clone()
    bad[3, 3] = float("inf")
    save_file({"mom2": bad}, str(good.path))
    with pytest.raises(ValueError, match="layer 0: NaN or inf.*cache file"):
        layer_second_moments(model, [0], **kw)


def test_bad_arguments(toy_model, tmp_path):
    kw = dict(n_tokens=N_TOKENS, seq_len=SEQ_LEN, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown layer 9"):
        layer_second_moments(toy_model, [1, 9], **kw)
    with pytest.raises(ValueError, match="no layers"):
        layer_second_moments(toy_model, [], **kw)
    with pytest.raises(ValueError, match="float32 or float64"):
        layer_second_moments(toy_model, [1], dtype=torch.float16, **kw)
    with pytest.raises(ValueError, match="unknown corpus"):
        layer_second_moments(toy_model, [1], corpus="wikipedia", **kw)
    small = tmp_path / "small.txt"
    small.write_text("A short corpus.\nWith two paragraphs.\n")
    with pytest.raises(ValueError, match=r"has only \d+ tokens"):
        layer_second_moments(toy_model, [1], corpus=str(small), **kw)


@pytest.mark.model
def test_gemma_one_pass_matches_reference(gemma, tmp_path):
    n, seq = 96, 48
    got = layer_second_moments(
        gemma,
        [1, 3],
        n_tokens=n,
        seq_len=seq,
        dtype=torch.float64,
        cache_dir=tmp_path,
        progress=False,
    )
    seqs = corpus_sequences(gemma, "wikitext", n, seq)
    assert all(s[0] == gemma.tokenizer.bos_token_id for s in seqs)
    ref = _reference(gemma, [1, 3], seqs, per_token=False)
    for L in (1, 3):
        scale = ref[L].abs().max()
        assert (got[L].mom2 - ref[L]).abs().max() <= 1e-5 * scale


def test_cli_stats_prints_layers_and_cache(toy_dirs, tmp_path, capsys):
    from factscope.cli import main

    argv = ["stats", "--layers", "1-2", "--tokens", "64", "--seq-len", "32", "--no-progress"]
    argv += ["--model", toy_dirs["gpt2"], "--cache-dir", str(tmp_path), "--mom2-dtype", "float64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"cache: {tmp_path}" in out and "float64" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [r[:2] for r in rows] == [["1", "64"], ["2", "64"]]
    assert main(["stats", "--layers", "1-x", "--model", toy_dirs["gpt2"]]) == 2
    assert "bad layer spec" in capsys.readouterr().err


def test_streamed_safetensors_reads_back_bit_identical(tmp_path):
    """The file write_safetensors streams is a safetensors file: load_file gives every
    tensor back bit for bit (dtypes, shapes, a 0-d and an empty tensor, a transposed view),
    with the metadata, whatever the slice size of the writes."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from editing.statistics.tensor_file import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "mom2": torch.randn(33, 33, generator=g),
        "wide": torch.randn(5, 3, generator=g, dtype=torch.float64),
        "half": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=g).half(),
        "count": torch.tensor(12345, dtype=torch.int64),
        "none": torch.zeros(0, 4),
        "mask": torch.randn(9, generator=g) > 0,
        "view": torch.randn(4, 6, generator=g).T,
    }
    for chunk in (5, 1 << 20):
        path = tmp_path / f"streamed_{chunk}.safetensors"
        write_safetensors(path, tensors, {"count": "12345"}, chunk_bytes=chunk)
        back = load_file(str(path))
        assert set(back) == set(tensors)
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape
            assert torch.equal(back[k], v), k
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"count": "12345"}
    # the same bytes of tensor data as safetensors' own writer
    theirs = tmp_path / "theirs.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(theirs))
    ours = load_file(str(tmp_path / "streamed_5.safetensors"))
    assert all(torch.equal(ours[k], v) for k, v in load_file(str(theirs)).items())
