"""AlphaEdit: the null-space projector, the update against the paper's objective (its
stationarity, by autograd in float64), protection of preserved and earlier-edit keys, the
projector cache and the published hyper-parameters."""

from __future__ import annotations

import pytest
import torch

import editing.statistics.nullspace as nullspace_mod
from editing.api import make_edit
from editing.hparams import TargetHparams
from editing.methods import load_hparams
from editing.methods.alphaedit import AlphaEditHparams, alphaedit_solver
from editing.requests import EditRequest
from editing.statistics.nullspace import layer_projectors, null_space_projector
from editing.statistics.stats import layer_second_moments
from tracing.errors import InvalidHparams, InvalidInput
from tracing.models import down_proj

TEMPLATES = ["{}", "Because of this. {}"]
FIRST = [
    EditRequest("{} is located in the city of", "The Space Needle", "Paris"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
]
SECOND = [EditRequest("{} plays the sport of", "Michael Jordan", "hockey")]
LAYERS = [1, 2]


def _hp(threshold: float, l2: float = 1.0) -> AlphaEditHparams:
    return AlphaEditHparams(
        layers=LAYERS,
        target=TargetHparams(num_steps=3, lr=0.5, clamp_norm_factor=0.5),
        nullspace_threshold=threshold,
        l2_weight=l2,
    )


@pytest.fixture
def stats(toy_model, tmp_path):
    return layer_second_moments(
        toy_model, LAYERS, n_tokens=2000, seq_len=64, cache_dir=tmp_path, progress=False
    )


def _threshold(stats, layer: int, keep: int) -> float:
    """A threshold leaving the ``keep`` smallest eigen-directions of C as the null space."""
    values = torch.linalg.eigvalsh(stats[layer].mom2.double())
    return float((values[keep - 1] + values[keep]) / 2)


def test_projector_is_the_orthogonal_projection_onto_small_eigenvectors():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    values = torch.tensor([5.0, 3.0, 1.0, 0.01, 0.001, 0.0], dtype=torch.float64)
    C = basis @ torch.diag(values) @ basis.T
    P = null_space_projector(C, threshold=0.02)
    small = basis[:, 3:]
    torch.testing.assert_close(P, small @ small.T)
    torch.testing.assert_close(P @ P, P)
    assert round(float(P.trace())) == 3
    # every direction C uses (eigenvalue >= threshold) is annihilated
    torch.testing.assert_close(P @ basis[:, :3], torch.zeros(6, 3, dtype=torch.float64))
    with pytest.raises(InvalidHparams, match="nullspace_threshold"):
        null_space_projector(C, threshold=0.0)


def test_energy_rule_keeps_the_smallest_directions_under_the_energy_share():
    """``nullspace_energy``: the null space is the longest run of smallest eigenvalues whose
    sum stays within the share of the trace, whatever the keys' scale."""
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    values = torch.tensor([50.0, 30.0, 10.0, 6.0, 3.0, 1.0], dtype=torch.float64)  # sum 100
    for scale in (1.0, 1e-4):
        C = basis @ torch.diag(values * scale) @ basis.T
        for energy, keep in ((0.005, 0), (0.02, 1), (0.05, 2), (0.15, 3), (0.19, 3)):
            P = null_space_projector(C, threshold=1.0, energy=energy)
            small = basis[:, 6 - keep :]
            torch.testing.assert_close(P, small @ small.T)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(InvalidHparams, match="nullspace_energy"):
            null_space_projector(C, threshold=1.0, energy=bad)
    with pytest.raises(InvalidHparams, match="nullspace_energy"):
        AlphaEditHparams(layers=[1], nullspace_energy=1.5)


def test_update_is_stationary_for_the_papers_objective(toy_model, stats):
    """Delta = P Y minimises ||K P Y - T||^2 + ||K_p P Y||^2 + alpha ||P Y||^2 (the paper's
    Eq. 13 with the projection written out): its gradient at Y = Delta is zero (autograd,
    float64), and Delta lies in the null space's range."""
    L = 2
    d_mlp = down_proj(toy_model, L).shape[0]
    g = torch.Generator().manual_seed(1)
    K = torch.randn(3, d_mlp, generator=g, dtype=torch.float64)
    Kp = torch.randn(4, d_mlp, generator=g, dtype=torch.float64)
    T = torch.randn(3, down_proj(toy_model, L).shape[1], generator=g, dtype=torch.float64)
    hp = _hp(_threshold(stats, L, keep=d_mlp // 2), l2=0.7)
    P = layer_projectors(toy_model, [L], hp, hp.nullspace_threshold, given=stats)[L].double()
    delta = alphaedit_solver(hp, {L: P}, {L: Kp.T @ Kp})(L, K) @ T
    torch.testing.assert_close(P @ delta, delta, atol=1e-5, rtol=0)
    Y = delta.clone().requires_grad_()
    PY = P @ Y
    loss = (K @ PY - T).pow(2).sum() + (Kp @ PY).pow(2).sum() + hp.l2_weight * PY.pow(2).sum()
    loss.backward()
    assert Y.grad.norm() < 1e-6 * (K.T @ T).norm()


def test_preserved_directions_and_earlier_edits_stay_put(toy_model, stats):
    """Preserved keys (C's large-eigenvalue directions) see no change at all; the keys of an
    earlier batch passed as preserved_keys change far less than without them."""
    L = 2
    d_mlp = down_proj(toy_model, L).shape[0]
    hp = _hp(min(_threshold(stats, layer, keep=d_mlp // 2) for layer in LAYERS), l2=0.1)
    first = make_edit(
        toy_model,
        FIRST,
        "alphaedit",
        hp,
        stats=stats,
        context_templates=TEMPLATES,
        progress=False,
    )
    assert set(first.keys) == set(LAYERS) and first.keys[L].shape == (2, d_mlp)
    P = layer_projectors(toy_model, [L], hp, hp.nullspace_threshold, given=stats)[L].double()
    values, vectors = torch.linalg.eigh(stats[L].mom2.double())
    used = vectors[:, values >= hp.nullspace_threshold]
    (d1,) = [d for d in first.deltas if d.layer == L]
    M = d1.matrix(torch.float64)
    assert (used.T @ M).norm() < 1e-5 * M.norm()
    torch.testing.assert_close(P @ M, M, atol=1e-5 * float(M.norm()), rtol=0)
    with first.applied(toy_model):
        preserved = {k: v.double().T @ v.double() for k, v in first.keys.items()}
        common = dict(stats=stats, context_templates=TEMPLATES, progress=False)
        free = make_edit(toy_model, SECOND, "alphaedit", hp, **common)
        kept = make_edit(toy_model, SECOND, "alphaedit", hp, preserved_keys=preserved, **common)
    k1 = first.keys[L].double()
    moved_free = (k1 @ next(d for d in free.deltas if d.layer == L).matrix(torch.float64)).norm()
    moved_kept = (k1 @ next(d for d in kept.deltas if d.layer == L).matrix(torch.float64)).norm()
    assert moved_kept < 0.2 * moved_free


def test_projectors_are_cached_with_the_statistics(toy_models, tmp_path, monkeypatch):
    model = toy_models["gpt2"]
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    hp = _hp(0.02)
    hp.mom2_n_tokens = 1000
    first = layer_projectors(model, [1], hp, 0.02)
    assert list(tmp_path.rglob("layer_1.nullspace-0.02.safetensors"))

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed a cached projector")

    monkeypatch.setattr(nullspace_mod, "null_space_projector", refuse)
    again = layer_projectors(model, [1], hp, 0.02)
    assert torch.equal(first[1], again[1])
    monkeypatch.undo()
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path))
    by_energy = layer_projectors(model, [1], hp, 0.02, energy=0.01)
    assert list(tmp_path.rglob("layer_1.nullspace-energy-0.01.safetensors"))
    assert not torch.equal(by_energy[1], first[1])


def test_bad_preserved_keys_are_refused_before_any_work(toy_model, stats):
    weights = down_proj(toy_model, 2).detach().clone()
    with pytest.raises(InvalidInput, match="preserved_keys"):
        make_edit(
            toy_model,
            FIRST,
            "alphaedit",
            _hp(0.02),
            stats=stats,
            context_templates=TEMPLATES,
            preserved_keys={2: torch.full((3, 3), float("nan"))},
            progress=False,
        )
    assert torch.equal(down_proj(toy_model, 2), weights)


def test_published_alphaedit_numbers():
    for model, layers, lr, steps, loss in (
        ("gpt2-xl", [13, 14, 15, 16, 17], 0.5, 20, 47),
        ("EleutherAI/gpt-j-6B", [3, 4, 5, 6, 7, 8], 0.5, 25, 27),
        ("meta-llama/Meta-Llama-3-8B", [4, 5, 6, 7, 8], 0.1, 25, 31),
    ):
        hp = load_hparams("alphaedit", model)
        assert isinstance(hp, AlphaEditHparams)
        assert hp.layers == layers and (hp.nullspace_threshold, hp.l2_weight) == (0.02, 10.0)
        t = hp.target
        assert (t.lr, t.num_steps, t.loss_layer, t.clamp_norm_factor) == (lr, steps, loss, 0.75)
        assert (t.weight_decay, t.kl_factor, t.kl_direction) == (0.5, 0.0625, "new_orig")
