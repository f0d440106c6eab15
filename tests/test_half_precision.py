"""float16: every editing method through a float16 model, with torch's dynamic loss scaling
(:func:`editing.targets.objective.loss_scaler`) for the v*/z optimisation and FT's float32 masters,
against the same work in float32 on the tiny model of each architecture.

Tolerances come from float16's precision (``eps = 2**-10``; bfloat16's is ``2**-7``, see
tests/test_precision.py): ROME's ``W'k* = v*`` to ``8 eps`` relative (the weights, keys
and outputs are float16: a few roundings of ``eps / 2`` each, summed over ``d_mlp``
products); the deltas within 25 % of float32's (v*/z are optimised through a float16 model,
as in the bfloat16 test); undo is bit-exact. The scaling itself: at a loss small enough that
float16 gradients flush to zero, the scaled gradient matches float32's.
"""

from __future__ import annotations

import pytest
import torch
from test_precision import _rel, model_pairs

from editing.api import make_edit
from editing.hparams import TargetHparams
from editing.methods.alphaedit import AlphaEditHparams
from editing.methods.finetune import FTHparams
from editing.methods.memit import MemitHparams
from editing.methods.rome import RomeHparams
from editing.requests import EditRequest
from editing.requests.prepared import prepare_requests
from editing.statistics.keys import subject_keys
from editing.targets.objective import loss_scaler
from tracing.models import down_proj, down_proj_bias, model_dtype

TEMPLATES = ["{}", "Because of this. {}", "I think that the. {}"]
REQS = [
    EditRequest("{} is located in the city of", "The Space Needle", "Paris"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
]
TARGET = TargetHparams(num_steps=4, lr=0.5)
EPS16 = 2.0**-10
ARCHS = ["gpt2", "gptj", "llama", "gemma3"]


@pytest.fixture(scope="module")
def pairs(toy_dirs, tmp_path_factory):
    """Per architecture: (float32 model, float16 model, their statistics of layers 1-2)."""
    return model_pairs(toy_dirs, tmp_path_factory, "float16")


def test_float16_gradients_flush_to_zero_unless_the_loss_is_scaled(pairs):
    """The gradient of a small loss (1e-6 of the NLL: the size a gradient reaches deep in a
    wide model) through the float16 model: plain backward loses most of it to float16's
    underflow, the scaler's (unscaled afterwards) matches float32's to float16 precision."""
    f32, f16, _ = pairs["llama"]
    ids = f32.tokenizer("The Space Needle is located in the city of", return_tensors="pt")
    ids = ids["input_ids"]

    def grad(model, scaler):
        W = model.blocks[0].mlp.original_component.down_proj.weight
        W.requires_grad_(True)
        try:
            logits = model(ids, use_cache=False).float()
            loss = 1e-6 * torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
            (loss if scaler is None else scaler.scale(loss)).backward()
            g = W.grad.float() / (1.0 if scaler is None else float(scaler.get_scale()))
        finally:
            W.requires_grad_(False)
            W.grad = None
        return g

    scaler = loss_scaler(f16, torch.device("cpu"))
    assert scaler.is_enabled() and not loss_scaler(f32, torch.device("cpu")).is_enabled()
    ref, plain, scaled = grad(f32, None), grad(f16, None), grad(f16, scaler)
    assert _rel(plain, ref) > 0.5  # most of the gradient underflowed
    assert _rel(scaled, ref) < 20 * EPS16


@pytest.mark.parametrize("arch", ARCHS)
def test_rome_in_float16_writes_v_star_at_k_star(pairs, arch):
    f32, f16, stats = pairs[arch]
    assert model_dtype(f16) == torch.float16
    deltas = []
    for m, st in zip((f32, f16), stats, strict=True):
        before = down_proj(m, 1).detach().clone()
        edit = make_edit(
            m,
            REQS[0],
            "rome",
            RomeHparams(layer=1, target=TARGET),
            stats=st,
            context_templates=TEMPLATES,
        )
        (d,) = edit.deltas
        k = subject_keys(m, prepare_requests(m, [REQS[0]], TEMPLATES), 1)[0]
        v = torch.tensor(edit.metadata["v_star"])
        b = down_proj_bias(m, 1)
        with edit.applied(m):
            out = k @ down_proj(m, 1).float() + (0 if b is None else b.float())
            assert _rel(out, v) < (8 * EPS16 if m is f16 else 1e-5)
        assert torch.equal(down_proj(m, 1), before)
        deltas.append(d.matrix())
    assert _rel(deltas[1], deltas[0]) < 0.25


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
@pytest.mark.parametrize("arch", ARCHS)
def test_memit_and_alphaedit_in_float16_match_float32(pairs, arch, method):
    f32, f16, stats = pairs[arch]
    common = dict(layers=[1, 2], target=TARGET, mom2_update_weight=10.0)
    if method == "memit":
        hp = MemitHparams(**common)
    else:  # a null space the tiny models have (their eigenvalues are all above 2e-2)
        hp = AlphaEditHparams(**common, nullspace_energy=0.5)
    edits = [
        make_edit(m, REQS, method, hp, stats=st, context_templates=TEMPLATES)
        for m, st in zip((f32, f16), stats, strict=True)
    ]
    for e in edits:  # the targets were reached as far as the steps go, in both dtypes
        after, before = e.metadata["nll_after"], e.metadata["nll_before"]
        assert all(a < b for a, b in zip(after, before, strict=True))
    for a, b in zip(edits[0].deltas, edits[1].deltas, strict=True):
        assert a.layer == b.layer and torch.isfinite(b.matrix()).all()
        assert _rel(b.matrix(), a.matrix()) < 0.25
    before = {L: down_proj(f16, L).detach().clone() for L in (1, 2)}
    with edits[1].applied(f16):
        assert all(not torch.equal(down_proj(f16, L), before[L]) for L in (1, 2))
    assert all(torch.equal(down_proj(f16, L), before[L]) for L in (1, 2))


@pytest.mark.parametrize("arch", ARCHS)
def test_ft_in_float16_learns_the_target_and_keeps_its_bound(pairs, arch):
    """FT-L's float32 masters through a float16 model: the loss falls as in float32, the
    weights stay within epsilon plus half a float16 ulp of the largest weight, undo exact."""
    f32, f16, _ = pairs[arch]
    eps = 1e-3
    hp = FTHparams(layers=[1, 2], lr=1e-2, num_steps=8, norm_constraint=eps)
    losses = []
    for m in (f32, f16):
        before = {L: down_proj(m, L).detach().clone() for L in (1, 2)}
        edit = make_edit(m, REQS[:1], "ft-l", hp)
        with edit.applied(m):
            moved = max(
                float((down_proj(m, L).float() - before[L].float()).abs().max()) for L in (1, 2)
            )
        half_ulp = max(float(w.abs().max()) for w in before.values()) * EPS16 / 2
        assert 0.5 * eps < moved <= eps + half_ulp
        assert all(torch.equal(down_proj(m, L), before[L]) for L in (1, 2))
        losses.append(edit.metadata["losses"])
    assert losses[1][-1] < losses[1][0]
    assert abs(losses[1][-1] - losses[0][-1]) < 0.05 * abs(losses[0][0] - losses[0][-1]) + 0.05
