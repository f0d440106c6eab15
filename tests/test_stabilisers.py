"""RECT (Gu et al. 2024, arXiv 2401.04700): the filter against a plain-loop float64
transcription of the paper's rule (zeros, ties), MEMIT's layer updates filtered layer by
layer in the state each layer sees, AlphaEdit and UltraEdit with the option, the option off
leaving MEMIT as it was, and one-line refusals of bad values before any work."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import editing.methods.memit as memit_mod
import editing.methods.ultraedit.update as ultra_mod
from editing.api import make_edit
from editing.edits.weights import add_to_weight, restore_weights, weights_snapshot
from editing.hparams import TargetHparams
from editing.methods.alphaedit import AlphaEditHparams
from editing.methods.memit import MemitHparams, layer_updates, memit_solver
from editing.methods.stabilisers import rect_filter
from editing.methods.ultraedit import UltraEditHparams
from editing.requests import EditRequest
from editing.requests.prepared import prepare_requests
from editing.statistics.keys import layer_stats
from editing.statistics.stats import layer_second_moments
from editing.targets.objective import compute_targets
from tracing.errors import InvalidHparams
from tracing.models import down_proj

TEMPLATES = ["{}", "Because of this. {}"]
REQS = [
    EditRequest("{} is located in the city of", "The Space Needle", "Paris"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
]
LAYERS = [1, 2]
TARGET = TargetHparams(num_steps=3, lr=0.5, clamp_norm_factor=0.5)


def reference_rect(delta: torch.Tensor, weight: torch.Tensor, keep: float) -> torch.Tensor:
    """The paper's rule by plain loops in float64: relative change |dW_ij| / |W_ij| (a
    non-zero change of a zero weight: infinite; no change: 0), the round(keep * n) largest
    kept (ties: first in row-major order), the rest zero."""
    rows, cols = delta.shape
    d, w = delta.double().tolist(), weight.double().tolist()
    order = []
    for i in range(rows):
        for j in range(cols):
            if d[i][j] == 0:
                rel = 0.0
            elif w[i][j] == 0:
                rel = math.inf
            else:
                rel = abs(d[i][j]) / abs(w[i][j])
            order.append((-rel, i * cols + j))
    order.sort()
    n_keep = max(1, int(keep * rows * cols + 0.5))
    kept = {flat for _, flat in order[:n_keep]}
    out = [[d[i][j] if i * cols + j in kept else 0.0 for j in range(cols)] for i in range(rows)]
    return torch.tensor(out, dtype=torch.float64)


def _memit_hp(**kw) -> MemitHparams:
    return MemitHparams(layers=LAYERS, target=TARGET, mom2_update_weight=10.0, **kw)


@pytest.fixture
def stats(toy_model, tmp_path):
    return layer_second_moments(
        toy_model, LAYERS, n_tokens=2000, seq_len=64, cache_dir=tmp_path, progress=False
    )


def _weights(model) -> list[torch.Tensor]:
    return [down_proj(model, L).detach().clone() for L in range(model.cfg.n_layers)]


@pytest.mark.parametrize("keep", [0.2, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_filter_matches_the_papers_rule(kind, keep):
    g = torch.Generator().manual_seed(7)
    if kind == "random":
        delta = torch.randn(40, 30, generator=g)
        weight = torch.randn(40, 30, generator=g)
        weight[3, :5] = 0.0  # a change of a zero weight: infinite, kept
        delta[5, :4] = 0.0  # no change: relative change 0
    else:  # few distinct relative changes, so the threshold falls inside a tie
        delta = torch.randint(1, 4, (40, 30), generator=g).float()
        weight = torch.ones(40, 30)
        delta[0, 0] = 0.0
    before = weight.clone()
    got = rect_filter(delta, weight, keep)
    want = reference_rect(delta, weight, keep)
    assert got.dtype == delta.dtype and got.shape == delta.shape
    assert torch.equal(got.double(), want)
    assert torch.equal(weight, before)
    n_keep = round(keep * delta.numel())
    kept = got != 0
    n_zero_changes = int((delta == 0).sum())
    assert n_keep - n_zero_changes <= int(kept.sum()) <= n_keep
    assert torch.equal(got[kept], delta[kept])
    if kind == "random":
        assert bool(kept[3, :5].all())  # infinite relative changes
    if kind == "ties" and keep < 1:
        # a tie at the threshold: kept and dropped entries with the same relative change
        thr = got[kept].abs().min()
        assert bool(((delta == thr) & ~kept).any())


def _filtered_run(model, stats, hp):
    """MEMIT's step 2 with ``hp`` from fixed targets, the weights restored after."""
    prepared = prepare_requests(model, REQS, TEMPLATES)
    z = compute_targets(model, prepared, layer=max(LAYERS), hook="resid", hp=hp.target).targets
    solver = memit_solver(hp, layer_stats(model, LAYERS, hp, given=stats))
    snap = weights_snapshot(model, LAYERS)
    try:
        deltas, _, _ = layer_updates(model, prepared, hp, z, solver)
    finally:
        restore_weights(model, snap)
    return prepared, z, solver, deltas


def test_memit_layers_are_the_filtered_updates_of_the_state_they_see(toy_model, stats):
    hp = _memit_hp(rect_keep=0.2)
    before = _weights(toy_model)
    prepared, z, solver, deltas = _filtered_run(toy_model, stats, hp)
    assert [d.layer for d in deltas] == LAYERS
    for i, L in enumerate(LAYERS):
        # the state layer L is solved in: the earlier layers' (filtered) updates applied
        snap = weights_snapshot(toy_model, LAYERS)
        try:
            for earlier in deltas[:i]:
                add_to_weight(down_proj(toy_model, earlier.layer), earlier.matrix())
            W = down_proj(toy_model, L).detach().clone()
            plain_hp = dataclasses.replace(hp, layers=LAYERS[i:], rect_keep=None)
            plain, _, _ = layer_updates(toy_model, prepared, plain_hp, z, solver)
        finally:
            restore_weights(toy_model, snap)
        unfiltered = plain[0].matrix()
        got = deltas[i].matrix()
        assert deltas[i].dense is not None  # sparse, stored dense
        assert torch.equal(got.double(), reference_rect(unfiltered, W, 0.2))
        assert int((got != 0).sum()) == round(0.2 * got.numel())
        assert not torch.equal(got, unfiltered)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(toy_model), strict=True))


def test_memit_and_alphaedit_edits_keep_the_fraction(toy_model, stats):
    before = _weights(toy_model)
    memit = make_edit(
        toy_model,
        REQS,
        "memit",
        _memit_hp(rect_keep=0.2),
        stats=stats,
        context_templates=TEMPLATES,
        progress=False,
    )
    assert memit.hparams["rect_keep"] == 0.2
    alpha_hp = AlphaEditHparams(
        layers=LAYERS, target=TARGET, nullspace_energy=0.5, l2_weight=1.0, rect_keep=0.2
    )
    alpha = make_edit(
        toy_model, REQS, "alphaedit", alpha_hp, stats=stats, context_templates=TEMPLATES,
        progress=False,
    )  # fmt: skip
    for edit in (memit, alpha):
        for d in edit.deltas:
            m = d.matrix()
            assert d.dense is not None and int((m != 0).sum()) == round(0.2 * m.numel())
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(toy_model), strict=True))


def test_ultraedit_updates_are_filtered_against_the_weights(toy_models):
    model = toy_models["llama"]
    layers = [0, 1]
    W = {L: down_proj(model, L).detach().clone() for L in layers}
    plain = make_edit(model, REQS, "ultraedit", {"layers": layers, "lr": 1e-3}, progress=False)
    rect = make_edit(
        model, REQS, "ultraedit", {"layers": layers, "lr": 1e-3, "rect_keep": 0.2}, progress=False
    )
    assert "rect_keep" not in plain.hparams and rect.hparams["rect_keep"] == 0.2
    for p, r in zip(plain.deltas, rect.deltas, strict=True):
        want = reference_rect(p.matrix(), W[p.layer], 0.2)
        assert torch.equal(r.matrix().double(), want)
    for L in layers:
        assert torch.equal(down_proj(model, L), W[L])


def test_off_leaves_memit_as_it_was(toy_model, stats, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("RECT ran with rect_keep=None")

    _, _, _, everything = _filtered_run(toy_model, stats, _memit_hp(rect_keep=1.0))
    monkeypatch.setattr(memit_mod, "rect_filter", refuse)
    hp = _memit_hp()
    assert hp.rect_keep is None and "rect_keep" not in hp.to_dict()
    assert MemitHparams.from_dict(hp.to_dict()) == hp
    _, _, _, off = _filtered_run(toy_model, stats, hp)
    for a, b in zip(off, everything, strict=True):
        assert a.left is not None and a.dense is None  # the low-rank form, as before
        assert torch.equal(a.matrix(), b.matrix())  # keep=1: the update itself, bit for bit


@pytest.mark.parametrize("bad", [0, 0.0, -0.2, 1.5, float("nan"), float("inf"), True, "0.2"])
def test_bad_values_are_refused_in_one_line_before_any_work(toy_models, bad, monkeypatch):
    model = toy_models["llama"]

    def refuse(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(memit_mod, "layer_stats", refuse)
    monkeypatch.setattr(ultra_mod, "answer_rows", refuse)
    before = _weights(model)
    for method in ("memit", "alphaedit", "ultraedit"):
        with pytest.raises(InvalidHparams) as exc:
            make_edit(model, REQS, method, {"layers": LAYERS, "rect_keep": bad}, progress=False)
        msg = str(exc.value)
        assert "rect_keep" in msg and "\n" not in msg
    for cls in (MemitHparams, AlphaEditHparams, UltraEditHparams):
        with pytest.raises(InvalidHparams, match="rect_keep"):
            cls(layers=LAYERS, rect_keep=bad)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))
