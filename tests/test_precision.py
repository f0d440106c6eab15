"""Half precision: the bfloat16 path of tracing and of every editing method on the tiny model
of each architecture, against the same work in float32.

Tolerances (measured on these models, then given headroom): trace probabilities within 0.02
of float32 (seen: <= 0.006); ROME's W'k* = v* to 5e-3 relative, the precision of bfloat16
weights (float32: ~1e-7); ROME's and MEMIT's delta W within 25 % of float32's (seen: <= 11 %:
v*/z are optimised through a bfloat16 model); FT-L's bound holds up to half an ulp of the
largest weight; undo is bit-exact in any dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editing.api import make_edit
from editing.hparams import TargetHparams
from editing.methods.finetune import FTHparams
from editing.methods.memit import MemitHparams
from editing.methods.rome import RomeHparams
from editing.requests import EditRequest
from editing.requests.prepared import prepare_requests
from editing.statistics.keys import subject_keys
from editing.statistics.stats import layer_second_moments
from tracing.errors import InvalidInput
from tracing.models import down_proj, down_proj_bias, load_model, model_dtype
from tracing.trace import trace_fact

TEMPLATES = ["{}", "Because of this. {}", "I think that the. {}"]
REQS = [
    EditRequest("{} is located in the city of", "The Space Needle", "Paris"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
]
TARGET = TargetHparams(num_steps=4, lr=0.5)


def model_pairs(toy_dirs, tmp_path_factory, dtype: str) -> dict:
    """Per architecture: (float32 model, ``dtype`` model, their statistics of layers 1-2)."""
    out = {}
    for arch, folder in toy_dirs.items():
        models = [load_model(folder, dtype=d) for d in ("float32", dtype)]
        stats = [
            layer_second_moments(
                m,
                [1, 2],
                n_tokens=2000,
                seq_len=64,
                cache_dir=tmp_path_factory.mktemp(f"{arch}_stats_{dtype}"),
                progress=False,
            )
            for m in models
        ]
        out[arch] = (*models, stats)
    return out


@pytest.fixture(scope="module")
def pairs(toy_dirs, tmp_path_factory):
    """Per architecture: (float32 model, bfloat16 model, their statistics of layers 1-2)."""
    return model_pairs(toy_dirs, tmp_path_factory, "bfloat16")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_bfloat16_loads_in_bfloat16_and_refuses_unknown_dtypes(pairs, toy_dirs):
    f32, bf16, _ = pairs["gpt2"]
    assert model_dtype(f32) == torch.float32 and model_dtype(bf16) == torch.bfloat16
    assert down_proj(bf16, 0).dtype == torch.bfloat16
    with pytest.raises(InvalidInput, match="unknown dtype 'float8'"):
        load_model(toy_dirs["gpt2"], dtype="float8")


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama", "gemma3"])
def test_trace_in_bfloat16_matches_float32(pairs, arch):
    f32, bf16, _ = pairs[arch]
    a, b = (
        trace_fact(m, "The Space Needle is in", "The Space Needle", samples=3, window=3, noise=0.5)
        for m in (f32, bf16)
    )
    assert a.answer_id == b.answer_id
    assert abs(a.p_clean - b.p_clean) < 0.02 and abs(a.p_corrupted - b.p_corrupted) < 0.02
    for kind in a.scores:
        assert np.abs(a.scores[kind] - b.scores[kind]).max() < 0.02, kind
    assert abs(a.p_clean - a.p_corrupted) > 1e-3  # the comparison is not vacuous


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama", "gemma3"])
def test_rome_in_bfloat16_writes_v_star_at_k_star(pairs, arch):
    f32, bf16, stats = pairs[arch]
    deltas = []
    for m, st in zip((f32, bf16), stats, strict=True):
        before = down_proj(m, 1).detach().clone()
        hp = RomeHparams(layer=1, target=TARGET)
        edit = make_edit(m, REQS[0], "rome", hp, stats=st, context_templates=TEMPLATES)
        (d,) = edit.deltas
        assert d.left is not None and d.left.dtype == torch.float32  # computed in float32+
        k = subject_keys(m, prepare_requests(m, [REQS[0]], TEMPLATES), 1)[0]
        v = torch.tensor(edit.metadata["v_star"])
        b = down_proj_bias(m, 1)
        with edit.applied(m):
            out = k @ down_proj(m, 1).float() + (0 if b is None else b.float())
            # at the weights' own precision: bfloat16 keeps 8 bits of mantissa
            assert _rel(out, v) < (5e-3 if m is bf16 else 1e-5)
        assert torch.equal(down_proj(m, 1), before)  # undo is bit-exact in any dtype
        deltas.append(d.matrix())
    assert _rel(deltas[1], deltas[0]) < 0.25


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama", "gemma3"])
def test_memit_in_bfloat16_matches_float32(pairs, arch):
    f32, bf16, stats = pairs[arch]
    hp = MemitHparams(layers=[1, 2], target=TARGET, mom2_update_weight=10.0)
    edits = [
        make_edit(m, REQS, "memit", hp, stats=st, context_templates=TEMPLATES)
        for m, st in zip((f32, bf16), stats, strict=True)
    ]
    for a, b in zip(edits[0].deltas, edits[1].deltas, strict=True):
        assert a.layer == b.layer
        assert _rel(b.matrix(), a.matrix()) < 0.25
    before = {L: down_proj(bf16, L).detach().clone() for L in (1, 2)}
    with edits[1].applied(bf16):
        assert all(not torch.equal(down_proj(bf16, L), before[L]) for L in (1, 2))
    assert all(torch.equal(down_proj(bf16, L), before[L]) for L in (1, 2))


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama", "gemma3"])
def test_ftl_in_bfloat16_keeps_its_bound(pairs, arch):
    """The l-infinity projection runs on float32 master weights; the bfloat16 weights are
    within epsilon plus half an ulp of the largest weight of the original, and they do move
    (a bfloat16 Adam step of 1e-2 * lr would round away)."""
    _, bf16, _ = pairs[arch]
    eps = 1e-3
    before = {L: down_proj(bf16, L).detach().clone() for L in (1, 2)}
    hp = FTHparams(layers=[1, 2], lr=1e-2, num_steps=8, norm_constraint=eps)
    edit = make_edit(bf16, REQS[:1], "ft-l", hp)
    with edit.applied(bf16):
        moved = max(
            float((down_proj(bf16, L).float() - before[L].float()).abs().max()) for L in (1, 2)
        )
    half_ulp = max(float(w.abs().max()) for w in before.values()) * 2.0**-8
    assert 0.5 * eps < moved <= eps + half_ulp
    assert all(torch.equal(down_proj(bf16, L), before[L]) for L in (1, 2))
