"""CUDA: the CPU suite's computations on a GPU, against the same work on the CPU.

Every test here is marked ``cuda`` and skipped ("no CUDA device") where
``torch.cuda.is_available()`` is false; ``scripts/gpu_check.sh`` runs them on a GPU machine
(``pytest -m cuda -rs``). They use the tiny random models of :mod:`tracing.toy_models` (no
downloads). Further CUDA runs (a two-device map, a real out-of-memory error, NCCL ranks, the
embedded model where its package is installed): tests/test_cuda_runs.py.

Tolerances and why:

* float32 on CUDA against float32 on the CPU: the same operations in another reduction order
  (cuBLAS and CPU kernels sum in different orders; TF32 stays off, PyTorch's default), about
  1e-6 relative per matmul. Trace probabilities within 1e-4; the target loss and its gradient
  against the float64 reference within 1e-4 relative (1e-5 on the CPU, test_parity); edit
  deltas within 1e-3 relative (a few Adam steps amplify the rounding difference of the
  gradient; Adam's step is lr * m / sqrt(v), bounded, so it cannot grow past that scale).
* bfloat16 on CUDA against bfloat16 on the CPU: both at bfloat16's precision (8 bits of
  mantissa), but the kernels round their intermediate results at different points. The same
  bounds as bfloat16 against float32 in test_precision: trace probabilities within 0.02,
  delta W within 25 %.
* fine-tuning: Adam's first steps move each weight by about lr * sign(gradient), so weights
  whose gradient is near zero may move either way on two devices; the l-infinity bound holds
  on both and the deltas agree within 10 % (float32) and 35 % (bfloat16) of their norm.
* undo: bit-exact on any device and dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_parity import HP as PARITY_HP
from test_parity import REQ as PARITY_REQ
from test_parity import TEMPLATES as PARITY_TEMPLATES
from test_parity import _hf, _reference_loss
from test_precision import REQS, TARGET, TEMPLATES

from editing.api import make_edit
from editing.edits.export import export_model
from editing.methods.alphaedit import AlphaEditHparams
from editing.methods.finetune import FTHparams
from editing.methods.memit import MemitHparams
from editing.methods.rome import RomeHparams
from editing.requests.prepared import prepare_requests
from editing.statistics.stats import layer_second_moments
from editing.targets.objective import TargetObjective
from tracing.models import down_proj, load_model, model_device, model_dtype
from tracing.trace import trace_fact

pytestmark = pytest.mark.cuda

PROMPT, SUBJECT = "The Space Needle is in", "The Space Needle"
ARCHS = ("gpt2", "gptj", "llama", "gemma3")
DTYPES = ("float32", "bfloat16")
TRACE_ATOL = {"float32": 1e-4, "bfloat16": 0.02}
DELTA_REL = {"float32": 1e-3, "bfloat16": 0.25}
FT_REL = {"float32": 0.10, "bfloat16": 0.35}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def devices_pairs(toy_dirs, tmp_path_factory):
    """Per (architecture, dtype): the CPU model, the CUDA model and one set of statistics of
    layers 1-2 (computed on the CPU model, float32, shared: the edits then differ only by the
    device their own computation ran on)."""
    out = {}
    for arch in ARCHS:
        cpu32 = load_model(toy_dirs[arch], device="cpu", dtype="float32")
        stats = layer_second_moments(
            cpu32,
            [1, 2],
            n_tokens=2000,
            seq_len=64,
            cache_dir=tmp_path_factory.mktemp(f"{arch}_stats"),
            progress=False,
        )
        for dtype in DTYPES:
            cpu = cpu32
            if dtype != "float32":
                cpu = load_model(toy_dirs[arch], device="cpu", dtype=dtype)
            gpu = load_model(toy_dirs[arch], device="cuda", dtype=dtype)
            out[arch, dtype] = (cpu, gpu, stats)
    return out


def test_models_load_onto_cuda_in_their_dtype(devices_pairs):
    for (_, dtype), (_, gpu, _) in devices_pairs.items():
        assert model_device(gpu).type == "cuda"
        assert model_dtype(gpu) == getattr(torch, dtype)
        assert down_proj(gpu, 1).device.type == "cuda"


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("hook", ["mlp_raw", "resid"])
@pytest.mark.parametrize("arch", ARCHS)
def test_target_loss_and_gradient_on_cuda_match_the_reference(toy_dirs, devices_pairs, arch, hook):
    """test_parity's computation with the model on CUDA: the same loss and gradient as the
    float64 reference (written from the papers' equations, on the CPU)."""
    _, model, _ = devices_pairs[arch, "float32"]
    hf, tok = _hf(toy_dirs[arch])
    layer = 1
    prepared = prepare_requests(model, [PARITY_REQ], PARITY_TEMPLATES)
    obj = TargetObjective(model, prepared, layer, hook, PARITY_HP)
    g = torch.Generator().manual_seed(0)
    init = obj.init[0].detach().double().cpu()
    direction = torch.randn(init.shape[-1], generator=g, dtype=torch.float64)
    delta64 = (0.5 * init.norm() * direction / direction.norm()).requires_grad_()
    expected, ref_init = _reference_loss(hf, tok, layer, hook, delta64)
    expected.backward()
    torch.testing.assert_close(init, ref_init, rtol=1e-4, atol=1e-4 * ref_init.norm())
    delta = delta64.detach().float().to(model_device(model))[None].requires_grad_()
    parts = obj.evaluate(delta)
    assert float(parts.total[0]) == pytest.approx(float(expected.detach()), rel=1e-4)
    assert _rel(delta.grad[0], delta64.grad) < 1e-4


# --------------------------------------------------------------------------- tracing


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_trace_on_cuda_matches_the_cpu_and_the_reference_engine(devices_pairs, arch, dtype):
    cpu, gpu, _ = devices_pairs[arch, dtype]
    kw = dict(samples=3, window=3, noise=0.5)
    fast = trace_fact(gpu, PROMPT, SUBJECT, **kw)
    ref = trace_fact(gpu, PROMPT, SUBJECT, method="reference", **kw)
    on_cpu = trace_fact(cpu, PROMPT, SUBJECT, **kw)
    assert fast.answer_id == ref.answer_id == on_cpu.answer_id
    engine_atol = 1e-5 if dtype == "float32" else 0.02  # same device, other batch shapes
    for kind in fast.scores:
        np.testing.assert_allclose(fast.scores[kind], ref.scores[kind], rtol=0, atol=engine_atol)
        np.testing.assert_allclose(
            fast.scores[kind], on_cpu.scores[kind], rtol=0, atol=TRACE_ATOL[dtype]
        )
    assert abs(fast.p_clean - on_cpu.p_clean) < TRACE_ATOL[dtype]
    assert abs(fast.p_clean - fast.p_corrupted) > 1e-3  # the comparison is not vacuous


# --------------------------------------------------------------------------- editing


def _method(name: str, stats):
    if name == "rome":
        return RomeHparams(layer=1, target=TARGET), [1]
    if name == "memit":
        return MemitHparams(layers=[1, 2], target=TARGET, mom2_update_weight=10.0), [1, 2]
    # the null space: the 16 smallest eigen-directions of layer 1's and 2's statistics
    threshold = max(
        float(torch.linalg.eigvalsh(stats[L].mom2.double())[15:17].mean()) for L in (1, 2)
    )
    hp = AlphaEditHparams(layers=[1, 2], target=TARGET, nullspace_threshold=threshold)
    return hp, [1, 2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
@pytest.mark.parametrize("arch", ARCHS)
def test_edits_on_cuda_match_the_cpu_and_undo_bit_for_bit(devices_pairs, arch, method, dtype):
    cpu, gpu, stats = devices_pairs[arch, dtype]
    hp, layers = _method(method, stats)
    reqs = REQS[:1] if method == "rome" else REQS
    edits = [
        make_edit(m, reqs, method, hp, stats=stats, context_templates=TEMPLATES, progress=False)
        for m in (cpu, gpu)
    ]
    for a, b in zip(edits[0].deltas, edits[1].deltas, strict=True):
        assert a.layer == b.layer
        assert _rel(b.matrix(), a.matrix()) < DELTA_REL[dtype], (a.layer, method)
    before = {L: down_proj(gpu, L).detach().clone() for L in layers}
    with edits[1].applied(gpu):
        assert all(not torch.equal(down_proj(gpu, L), before[L]) for L in layers)
    assert all(torch.equal(down_proj(gpu, L), before[L]) for L in layers)  # bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_fine_tuning_on_cuda_matches_the_cpu(devices_pairs, arch, dtype):
    cpu, gpu, _ = devices_pairs[arch, dtype]
    eps = 1e-3
    hp = FTHparams(layers=[1, 2], lr=1e-2, num_steps=8, norm_constraint=eps)
    before = {L: down_proj(gpu, L).detach().clone() for L in (1, 2)}
    edits = [make_edit(m, REQS[:1], "ft-l", hp, progress=False) for m in (cpu, gpu)]
    for a, b in zip(edits[0].deltas, edits[1].deltas, strict=True):
        assert _rel(b.matrix(), a.matrix()) < FT_REL[dtype], a.layer
    # the rounding of W + delta to the weights' dtype: half an ulp (bfloat16), one (float32)
    ulp = max(float(w.abs().max()) for w in before.values()) * (
        2.0**-8 if dtype == "bfloat16" else 2.0**-23
    )
    with edits[1].applied(gpu):
        moved = max(
            float((down_proj(gpu, L).float() - before[L].float()).abs().max()) for L in (1, 2)
        )
    assert 0.5 * eps < moved <= eps + ulp
    assert all(torch.equal(down_proj(gpu, L), before[L]) for L in (1, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_export_from_a_cuda_model(devices_pairs, tmp_path, dtype):
    """An edited CUDA model exports to a folder that loads on the CPU with the edited weights
    (bit for bit, in the model's dtype) and behaves as the CUDA model."""
    cpu, gpu, stats = devices_pairs["llama", dtype]
    hp, _ = _method("rome", stats)
    edit = make_edit(gpu, REQS[:1], "rome", hp, stats=stats, context_templates=TEMPLATES)
    with edit.applied(gpu):
        folder = export_model(gpu, tmp_path / "exported", origin={"method": "rome"})
        edited = down_proj(gpu, 1).detach().cpu().clone()
        on_gpu = trace_fact(gpu, PROMPT, SUBJECT, " Paris", samples=2, noise=0.5)
    back = load_model(str(folder), device="cpu", dtype=dtype)
    assert torch.equal(down_proj(back, 1), edited)
    assert not torch.equal(down_proj(back, 1), down_proj(cpu, 1))
    again = trace_fact(back, PROMPT, SUBJECT, " Paris", samples=2, noise=0.5)
    assert again.answer_id == on_gpu.answer_id
    for kind in again.scores:
        np.testing.assert_allclose(
            again.scores[kind], on_gpu.scores[kind], rtol=0, atol=TRACE_ATOL[dtype]
        )
