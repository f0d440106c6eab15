"""ROME: the rank-one update maps k* to v*, on every architecture, and edits a real fact."""

from __future__ import annotations

import pytest
import torch

from editing.api import make_edit
from editing.hparams import TargetHparams
from editing.methods import load_hparams
from editing.methods.rome import RomeHparams, rank_one_update
from editing.requests import EditRequest
from editing.requests.context import context_templates
from editing.requests.prepared import prepare_requests, templated_prompt
from editing.statistics.keys import subject_keys
from editing.statistics.stats import layer_second_moments
from tracing.forward import capture_states, top_k
from tracing.models import down_proj, down_proj_bias

TEMPLATES = ["{}", "Because of this. {}", "I think that the. {}"]
REQ = EditRequest("{} is located in the city of", "The Space Needle", "Paris")
LAYER = 1


@pytest.fixture
def stats(toy_model, tmp_path):
    return layer_second_moments(
        toy_model, [LAYER], n_tokens=2000, seq_len=64, cache_dir=tmp_path, progress=False
    )


def _hp(consistent: bool = True) -> RomeHparams:
    return RomeHparams(
        layer=LAYER, target=TargetHparams(num_steps=4, lr=0.5), consistent_key=consistent
    )


def test_rome_update_writes_v_star_at_k_star(toy_model, stats):
    W = down_proj(toy_model, LAYER).detach().clone()
    edit = make_edit(
        toy_model, REQ, "rome", _hp(), stats=stats, context_templates=TEMPLATES, progress=False
    )
    assert torch.equal(down_proj(toy_model, LAYER), W)  # make_edit leaves the model alone
    (delta,) = edit.deltas
    assert delta.layer == LAYER and delta.rank == 1
    M = delta.matrix()
    sv = torch.linalg.svdvals(M.double())
    assert sv[0] > 0 and sv[1] < 1e-5 * sv[0]  # rank one up to float32 rounding
    k_star = subject_keys(toy_model, prepare_requests(toy_model, [REQ], TEMPLATES), LAYER)[0]
    v_star = torch.tensor(edit.metadata["v_star"])
    b = down_proj_bias(toy_model, LAYER)
    out = k_star @ (W + M) + (0 if b is None else b)
    torch.testing.assert_close(out, v_star, rtol=1e-4, atol=1e-4 * float(v_star.abs().max()))
    # the applied edit changes the model's weights by exactly that matrix, and undo is exact
    with edit.applied(toy_model):
        torch.testing.assert_close(down_proj(toy_model, LAYER), W + M, rtol=0, atol=1e-6)
    assert torch.equal(down_proj(toy_model, LAYER), W)


def test_rank_one_update_in_float64(toy_model, stats):
    """In float64 the closed form is exact and equals C^-1 k (v - kW - b)^T / (k^T C^-1 k)
    built with an explicit inverse."""
    W = down_proj(toy_model, LAYER).detach().double()
    C = stats[LAYER].mom2.double()
    g = torch.Generator().manual_seed(0)
    k = subject_keys(toy_model, prepare_requests(toy_model, [REQ], TEMPLATES), LAYER)[0].double()
    v = torch.randn(W.shape[1], generator=g, dtype=torch.float64)
    b = down_proj_bias(toy_model, LAYER)
    left, right = rank_one_update(W, C, k, v, bias=b)
    assert left.dtype == right.dtype == torch.float64
    bias = 0 if b is None else b.double()
    W_new = W + torch.outer(left, right)
    torch.testing.assert_close(k @ W_new + bias, v, rtol=1e-10, atol=1e-10)
    Cinv = torch.linalg.inv(C)
    expected = torch.outer(Cinv @ k, v - k @ W - bias) / (k @ Cinv @ k)
    torch.testing.assert_close(torch.outer(left, right), expected, rtol=1e-7, atol=1e-9)


def test_original_rome_writes_v_star_at_the_plain_prompt(toy_model, stats):
    """consistent_key=False: the residual uses the plain prompt's own key, so after the edit
    the model's raw down-projection output at the subject's last token is v* exactly."""
    edit = make_edit(
        toy_model, REQ, "rome", _hp(False), stats=stats, context_templates=TEMPLATES, progress=False
    )
    v_star = torch.tensor(edit.metadata["v_star"])
    plain = templated_prompt(toy_model, REQ, "{}")
    ids, lookup = list(plain.ids), plain.subject_last
    name = f"blocks.{LAYER}.mlp.out.hook_out"
    with edit.applied(toy_model):
        out = capture_states(toy_model, torch.tensor([ids]), [name], name)[name][0, lookup]
    torch.testing.assert_close(out, v_star, rtol=1e-4, atol=1e-4 * float(v_star.abs().max()))
    consistent = make_edit(
        toy_model, REQ, "rome", _hp(True), stats=stats, context_templates=TEMPLATES, progress=False
    )
    assert not torch.allclose(consistent.deltas[0].matrix(), edit.deltas[0].matrix())


def test_rome_rejects_singular_statistics(toy_models):
    model = toy_models["llama"]
    d = model.cfg.d_mlp
    with pytest.raises(ValueError, match="singular"):
        make_edit(
            model,
            REQ,
            "rome",
            _hp(),
            stats={LAYER: torch.zeros(d, d)},
            context_templates=TEMPLATES,
            progress=False,
        )


@pytest.mark.model
def test_rome_edit_on_gemma_makes_new_target_top1(gemma):
    """A known fact of the embedded model: the Space Needle (Seattle) moved to Paris."""
    prompt = "The Space Needle is located in the city of"
    req = EditRequest("{} is located in the city of", "The Space Needle", "Paris")
    hp = load_hparams("rome", "gemma-3-270m", mom2_n_tokens=20_000)
    stats = layer_second_moments(gemma, [hp.layer], n_tokens=20_000, progress=False)
    W = down_proj(gemma, hp.layer).detach().clone()
    assert top_k(gemma, prompt, 1)[0][0] == " Seattle"
    templates = context_templates(gemma, hp.context_templates)[:4]  # lean: 4 of 11
    edit = make_edit(
        gemma, req, "rome", hp, stats=stats, context_templates=templates, progress=False
    )
    with edit.applied(gemma):
        assert top_k(gemma, prompt, 1)[0][0] == " Paris"
    assert torch.equal(down_proj(gemma, hp.layer), W)
    assert top_k(gemma, prompt, 1)[0][0] == " Seattle"
