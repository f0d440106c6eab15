"""MEMIT: the least-squares update against an independent float64 closed form, norm-aware
spreading through Gemma's post-feed-forward norm, and exact restoration of the model."""

from __future__ import annotations

import pytest
import torch

import editing.methods.memit as memit_mod
from editing.api import make_edit
from editing.hparams import TargetHparams
from editing.methods.memit import MemitHparams, norm_aware_targets
from editing.requests import EditRequest
from editing.requests.prepared import prepare_requests
from editing.statistics.stats import layer_second_moments
from editing.targets.objective import compute_targets
from tracing.facts import tokenize_fact
from tracing.models import down_proj, hook_name, post_mlp_norm

TEMPLATES = ["{}", "Because of this. {}", "I think that the. {}"]
REQS = [
    EditRequest("{} is located in the city of", "The Space Needle", "Paris"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
]
LAYERS = [1, 2]


@pytest.fixture
def stats(toy_model, tmp_path):
    return layer_second_moments(
        toy_model, LAYERS, n_tokens=2000, seq_len=64, cache_dir=tmp_path, progress=False
    )


def _hp(layers, norm_aware=True, lam=10.0) -> MemitHparams:
    return MemitHparams(
        layers=layers,
        target=TargetHparams(num_steps=3, lr=0.5, clamp_norm_factor=0.5),
        mom2_update_weight=lam,
        norm_aware=norm_aware,
    )


def _weights(model) -> list[torch.Tensor]:
    return [down_proj(model, L).detach().clone() for L in range(model.cfg.n_layers)]


def _state(model, req, names, template="{}"):
    """States at the subject's last token of ``template`` filled with the request's prompt,
    from a plain full forward (no factscope helpers)."""
    text = template.replace("{}", req.prompt)
    fact = tokenize_fact(model, text, req.subject)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([fact.ids]), use_cache=False)
    return [cache[n][0, fact.subject_last].double() for n in names]


def test_one_request_one_layer_matches_closed_form(toy_model, stats):
    L, lam = 2, 10.0
    hp = _hp([L], norm_aware=True, lam=lam)
    before = _weights(toy_model)
    edit = make_edit(
        toy_model, REQS[:1], "memit", hp, stats=stats, context_templates=TEMPLATES, progress=False
    )
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(toy_model), strict=True))
    (delta,) = edit.deltas
    assert delta.layer == L
    # independent float64 closed form from the same statistics and targets
    z = (
        compute_targets(
            toy_model,
            prepare_requests(toy_model, REQS[:1], TEMPLATES),
            layer=L,
            hook="resid",
            hp=hp.target,
        )
        .targets[0]
        .double()
    )
    req = REQS[0]
    key_name = hook_name(toy_model, "mlp_key", L)
    # MEMIT's compute_ks: the mean of each context-template group, then of the groups (the
    # bare prompt is a group of its own)
    keys = [_state(toy_model, req, [key_name], t)[0] for t in TEMPLATES]
    k = (keys[0] + torch.stack(keys[1:]).mean(0)) / 2
    y, m, h = _state(
        toy_model,
        req,
        [
            f"blocks.{L}.mlp.out.hook_out",
            hook_name(toy_model, "mlp", L),
            hook_name(toy_model, "resid", L),
        ],
    )
    R = z - h
    norm = post_mlp_norm(toy_model, L)
    if norm is None:
        T = R
    else:  # Gemma: N(y) = (1 + w) * y / rms(y); invert at the operating point
        g = 1.0 + norm.original_component.weight.detach().double()
        rms = lambda x: x.pow(2).mean().sqrt()  # noqa: E731
        target = (m + R) / g
        T = rms(y) * target / rms(target) - y
    C = stats[L].mom2.double()
    expected = torch.linalg.inv(lam * C + torch.outer(k, k)) @ torch.outer(k, T)
    got = delta.matrix(torch.float64)
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4 * float(expected.abs().max()))


def test_norm_aware_is_a_no_op_without_post_norm(toy_models, tmp_path):
    model = toy_models["gpt2"]
    assert post_mlp_norm(model, 1) is None
    st = layer_second_moments(
        model, LAYERS, n_tokens=2000, seq_len=64, cache_dir=tmp_path, progress=False
    )
    a = make_edit(
        model,
        REQS,
        "memit",
        _hp(LAYERS, True),
        stats=st,
        context_templates=TEMPLATES,
        progress=False,
    )
    b = make_edit(
        model,
        REQS,
        "memit",
        _hp(LAYERS, False),
        stats=st,
        context_templates=TEMPLATES,
        progress=False,
    )
    for da, db in zip(a.deltas, b.deltas, strict=True):
        assert torch.equal(da.matrix(), db.matrix())


def test_norm_aware_targets_invert_the_rms_norm():
    g64 = torch.Generator().manual_seed(0)
    d = 32
    gain = 1.0 + torch.rand(d, generator=g64, dtype=torch.float64) * 4
    y = torch.randn(3, d, generator=g64, dtype=torch.float64)

    def N(x):
        return gain * x / x.pow(2).mean(-1, keepdim=True).sqrt()

    m = N(y)
    for size in (1e-4, 1e-2, 10.0):
        R = torch.randn(3, d, generator=g64, dtype=torch.float64) * size
        T = norm_aware_targets(y, m, R, gain)
        out = N(y + T)
        want = m + R
        scale = (want / gain).pow(2).mean(-1, keepdim=True).sqrt()
        torch.testing.assert_close(out, want / scale)  # exactly the reachable point
        rms = (y + T).pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, y.pow(2).mean(-1).sqrt())  # at the current scale
        if size < 1e-3:  # small changes along the reachable surface are delivered as asked
            a = m / gain**2  # normal of the surface rms(m / g) = 1
            R_t = R - (R * a).sum(-1, keepdim=True) / (a * a).sum(-1, keepdim=True) * a
            T = norm_aware_targets(y, m, R_t, gain)
            torch.testing.assert_close(N(y + T), m + R_t, rtol=0, atol=1e-6)


def test_memit_moves_the_last_layer_state_towards_z(toy_model, stats):
    hp = _hp(LAYERS, lam=1.0)
    edit = make_edit(
        toy_model, REQS, "memit", hp, stats=stats, context_templates=TEMPLATES, progress=False
    )
    assert [d.layer for d in edit.deltas] == LAYERS
    assert all(d.rank == 2 for d in edit.deltas)
    z = compute_targets(
        toy_model,
        prepare_requests(toy_model, REQS, TEMPLATES),
        layer=LAYERS[-1],
        hook="resid",
        hp=hp.target,
    ).targets.double()
    name = hook_name(toy_model, "resid", LAYERS[-1])
    h0 = torch.stack([_state(toy_model, r, [name])[0] for r in REQS])
    with edit.applied(toy_model):
        h1 = torch.stack([_state(toy_model, r, [name])[0] for r in REQS])
    assert ((z - h1).norm(dim=-1) < (z - h0).norm(dim=-1)).all()


def test_failure_part_way_restores_weights(toy_model, stats, monkeypatch):
    before = _weights(toy_model)
    real = memit_mod.subject_keys
    calls = []

    def flaky(model, prepared, layer, **kw):
        calls.append(layer)
        if len(calls) == 2:  # after the first layer's update is in the weights
            raise RuntimeError("simulated failure")
        return real(model, prepared, layer, **kw)

    monkeypatch.setattr(memit_mod, "subject_keys", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        make_edit(
            toy_model,
            REQS,
            "memit",
            _hp(LAYERS),
            stats=stats,
            context_templates=TEMPLATES,
            progress=False,
        )
    assert calls == LAYERS
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(toy_model), strict=True))
