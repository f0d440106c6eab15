"""Attribution patching (AtP) for causal tracing: first-order exactness against the exact
engine, windows, ``atp+exact``'s exact cells and peaks, bad input, and the command line."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tracing.attribution as A
from factscope.cli import main
from tracing.noise import resolve_noise
from tracing.results import TraceResult
from tracing.trace import grid_interventions, prepare_fact, restored_probs, trace_fact

PROMPT = "The Space Needle is located in the city of"
SUBJECT = "The Space Needle"


def _effects(result: TraceResult) -> np.ndarray:
    return np.stack([result.scores[k] - result.p_corrupted for k in ("resid", "mlp", "attn")])


def test_atp_is_exact_to_first_order_on_every_architecture(toy_model):
    """With noise of 0.001 sigma every restoration's effect is linear in the noise up to a
    relative O(noise) term, so the first-order estimate must match the exact engine's
    single-state restorations (window 1: no double counting, see the module doc) to a few
    per cent, on every architecture. Measured: 0.2-2.7 % here, 3-20 % at 0.01 sigma (the
    error shrinks with the noise, as a second-order remainder does)."""
    kw = dict(samples=3, noise="0.001s", window=1, seed=2)
    exact = trace_fact(toy_model, PROMPT, SUBJECT, **kw)
    atp = trace_fact(toy_model, PROMPT, SUBJECT, method="atp", **kw)
    assert atp.p_corrupted == exact.p_corrupted and atp.answer_id == exact.answer_id
    prob = trace_fact(toy_model, PROMPT, SUBJECT, method="atp", atp_space="prob", **kw)
    e = _effects(exact)
    assert np.abs(e).max() > 1e-6  # restorations do something: not a vacuous comparison
    for estimate in (atp, prob):  # the same first-order term in either space
        assert np.abs(_effects(estimate) - e).max() <= 0.05 * np.abs(e).max()
    # the marking: cells before the subject are exact (restoring them is a no-op), none else
    assert atp.approximate and not exact.approximate
    start = atp.subject_span[0]
    for kind in ("resid", "mlp", "attn"):
        mask = atp.exact_mask(kind)
        assert mask[:start].all() and not mask[start:].any()
        assert np.all(atp.scores[kind][:start] == atp.p_corrupted)


def test_atp_alone_makes_no_recorded_corrupted_run(toy_models, monkeypatch):
    """``atp`` takes the corrupted runs' answer probability from its own pass with gradients,
    so a trace with it alone never runs the recorded corrupted pass the exact engine needs
    (a third of an AtP trace's time on the embedded model), and its ``p_corrupted`` is that
    of the exact trace: the same forward, the same definition, to the bit."""
    import tracing.prepared_fact as P

    model = toy_models["gpt2"]
    kw = dict(samples=3, noise="3s", seed=5)
    exact = trace_fact(model, PROMPT, SUBJECT, **kw)
    calls = []
    real = P.run_corrupted
    monkeypatch.setattr(P, "run_corrupted", lambda *a: calls.append(1) or real(*a))
    atp = trace_fact(model, PROMPT, SUBJECT, method="atp", **kw)
    assert calls == []
    assert atp.p_corrupted == exact.p_corrupted and not math.isnan(atp.p_corrupted)
    trace_fact(model, PROMPT, SUBJECT, method="atp+exact", **kw)  # the exact cells need it
    assert calls == [1]


def test_log_odds_and_prob_steps_in_closed_form(toy_models):
    """Two noise samples with p = 0.01 and 0.5 and log-space effects 3 and -1: the prob step
    is p·e, the log-odds step moves logit(p) by e / (1 - p) and maps back through sigma."""
    attr = A.Attribution(
        effects={"resid": np.array([[[3.0]], [[-1.0]]])},
        embed=np.zeros((2, 1)),
        p=np.array([0.01, 0.5]),
        seconds=0.0,
    )
    prep = SimpleNamespace(attribution=attr, samples=2, p_corrupted=0.255, answer_id=0)
    model = toy_models["gpt2"]  # not run: the attribution is given
    states = [[("resid", 0, 0)]]

    def sigma(x):
        return 1 / (1 + math.exp(-x))

    logit = [math.log(0.01 / 0.99), 0.0]
    moved = [sigma(logit[0] + 3 / 0.99) - 0.01, sigma(logit[1] - 1 / 0.5) - 0.5]
    got = A.atp_probs(model, prep, states, "logodds")[0]
    assert got == pytest.approx(0.255 + sum(moved) / 2, abs=1e-12)
    assert A.atp_probs(model, prep, states, "prob")[0] == pytest.approx(0.255 + (0.03 - 0.5) / 2)
    with pytest.raises(ValueError, match="unknown AtP space"):
        A.atp_probs(model, prep, states, "logit")


def test_atp_window_is_the_sum_of_its_single_layer_estimates(toy_models):
    model = toy_models["llama"]
    prep, _ = prepare_fact(model, PROMPT, SUBJECT, None, resolve_noise(model, 0.5), 2, 1)
    T, n = len(prep.tokens), model.cfg.n_layers
    kw = dict(method="atp", atp_space="prob")  # additive in p (log-odds: inside the sigmoid)
    single = restored_probs(model, prep, grid_interventions("mlp", T, n, 1), **kw)
    window = restored_probs(model, prep, grid_interventions("mlp", T, n, 3), **kw)
    single, window = single.reshape(T, n) - prep.p_corrupted, window.reshape(T, n)
    for layer in range(n):
        lo, hi = max(0, layer - 1), min(n, layer + 2)
        expected = prep.p_corrupted + single[:, lo:hi].sum(1)
        assert np.allclose(window[:, layer], expected, rtol=0, atol=1e-12)


def test_rank_cells_and_verify_top_by_hand():
    """A 4 x 5 map whose estimated peak (3, 4) is an overshoot: the exact value there is low,
    so the loop must move to the true peak and make its row and column exact too."""
    p0 = 0.1
    estimate = np.full((4, 5), p0)
    estimate[3, 4], estimate[1, 2], estimate[2, 0] = 0.9, 0.5, 0.05
    exact = np.zeros((4, 5), dtype=bool)
    exact[0] = True  # tokens before the subject
    cells = A.rank_cells(estimate, exact, p0, top=0.1)  # ceil(2.0) = 2 largest |e - p0|
    cross = {(3, j) for j in range(5)} | {(i, 4) for i in range(1, 4)}
    assert set(cells) == cross | {(1, 2)}  # (3, 4) and (1, 2); (2, 0) is third
    truth = np.full((4, 5), p0)
    truth[1, 2], truth[3, 4] = 0.6, 0.2
    calls: list[list[tuple[int, int]]] = []

    def measure(cells):
        calls.append(list(cells["mlp"]))
        return {"mlp": np.array([truth[c] for c in cells["mlp"]])}

    out, masks = A.verify_top({"mlp": estimate}, {"mlp": exact}, p0, 0.1, measure)
    scores, mask = out["mlp"], masks["mlp"]
    assert np.unravel_index(int(np.argmax(scores)), scores.shape) == (1, 2)
    assert mask[1].all() and mask[:, 2].all() and mask[3].all()
    assert scores[1, 2] == 0.6 and scores[3, 4] == 0.2
    assert len(calls) == 2 and not set(calls[0]) & set(calls[1])  # nothing measured twice
    assert scores[2, 1] == p0 and not mask[2, 1]  # untouched estimates stay estimates


@pytest.mark.parametrize("arch", ["gptj", "gemma3"])
def test_atp_exact_cells_are_the_exact_engines_values(toy_models, arch):
    """Every exact cell of atp+exact is the fast engine's value for that intervention, bit
    for bit (the same call on the same requests), and agrees with a full exact trace to
    float rounding (a full trace batches more interventions together, and matrix kernels
    round by batch shape: up to 1e-7 on the GPT-J toy, bit-equal on the others); the peak a
    user reads, its row and its column are exact and at the full trace's peak."""
    toy_model, prompt = toy_models[arch], "The Space Needle is in the city of"
    kw = dict(samples=2, noise=0.5, window=3)
    prep, _ = prepare_fact(toy_model, prompt, SUBJECT, None, resolve_noise(toy_model, 0.5), 2, 1)
    full = trace_fact(toy_model, prompt, SUBJECT, **kw)
    T, n = len(prep.tokens), toy_model.cfg.n_layers
    grids = {k: grid_interventions(k, T, n, w) for k, w in full.settings.window.items()}
    requests: list[list] = []

    def measure(interventions):
        requests.append(list(interventions))
        return restored_probs(toy_model, prep, interventions)

    scores, masks = A.atp_exact_maps(toy_model, prep, grids, 0.1, measure, [])
    for interventions in requests:  # the engine again, on the same requests: the same bits
        again = restored_probs(toy_model, prep, interventions)
        got = []
        for iv in interventions:
            kind = iv[0][0]  # every state of a grid intervention is of the grid's kind
            t, layer = divmod(grids[kind].index(iv), n)
            assert masks[kind][t, layer]
            got.append(scores[kind][t, layer])
        assert np.array_equal(np.array(got), again)
    for kind in grids:
        mask = masks[kind]
        assert mask.sum() >= math.ceil(0.1 * mask.size)
        assert np.abs(scores[kind][mask] - full.scores[kind][mask]).max() <= 1e-6
        t, layer = np.unravel_index(int(np.argmax(scores[kind])), mask.shape)
        assert mask[t].all() and mask[:, layer].all()
        assert (t, layer) == full.peak(kind)[:2]


# ----------------------------------------------------------------------------- bad input


def test_hooks_without_gradients_are_refused(toy_models):
    model = toy_models["gpt2"]

    def detach(x, hook):
        return x.detach()

    with (
        model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", detach)]),
        pytest.raises(ValueError, match="AtP needs gradients through the model's hooks"),
    ):
        trace_fact(model, PROMPT, SUBJECT, samples=2, noise=0.5, method="atp")
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        trace_fact(model, PROMPT, SUBJECT, samples=2, noise=0.5, method="atp")


def test_vanishing_gradient_is_said_not_printed_as_zeros(toy_models, monkeypatch):
    """Below MIN_GRADIENT_PROB the estimates are zeros for want of a gradient: atp refuses
    with one line; atp+exact measures every cell (equal to the exact trace) and notes why."""
    model = toy_models["gemma3"]
    kw = dict(samples=1, noise=0.5, window=2, kinds=("mlp",))
    monkeypatch.setattr(A, "MIN_GRADIENT_PROB", 1.1)  # every probability is below it
    with pytest.raises(ValueError, match="gradient vanishes") as err:
        trace_fact(model, PROMPT, SUBJECT, method="atp", **kw)
    assert "\n" not in str(err.value)
    result = trace_fact(model, PROMPT, SUBJECT, method="atp+exact", **kw)
    full = trace_fact(model, PROMPT, SUBJECT, **kw)
    assert any("gradient vanishes" in note for note in result.notes)
    assert not result.approximate
    for kind in full.scores:
        assert np.abs(result.scores[kind] - full.scores[kind]).max() <= 1e-6


def test_window_wider_than_the_model_is_noted(toy_models):
    model = toy_models["gpt2"]  # 4 layers
    r = trace_fact(model, PROMPT, SUBJECT, samples=1, noise=0.5, window=9, method="atp")
    assert any("window 9 is wider than the model's 4 layers" in note for note in r.notes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "atp*"}, "unknown method"),
        ({"method": "atp+exact", "exact_top": 1.5}, "exact_top"),
        ({"method": "atp+exact", "exact_top": -0.1}, "exact_top"),
    ],
)
def test_bad_method_arguments(toy_models, kwargs, message):
    with pytest.raises(ValueError, match=message):
        trace_fact(toy_models["gpt2"], PROMPT, SUBJECT, **kwargs)


def test_trace_result_keeps_its_exact_cells_through_json(toy_models, tmp_path):
    r = trace_fact(toy_models["gpt2"], PROMPT, SUBJECT, samples=2, noise=0.5, method="atp")
    back = TraceResult.load(r.save(tmp_path / "t.json"))
    assert back.approximate and back.settings.method == "atp"
    for kind in r.scores:
        assert np.array_equal(back.exact_mask(kind), r.exact_mask(kind))
    assert back.exactness_caption() == r.exactness_caption() != ""


# ----------------------------------------------------------------------------- command line


def test_cli_trace_with_atp(toy_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["trace", PROMPT, "--subject", SUBJECT, "--model", toy_dirs["llama"]]
    args += ["--samples", "2", "--noise", "0.5", "--out", str(out), "--no-progress"]
    assert main([*args, "--method", "atp"]) == 0
    text = capsys.readouterr().out
    assert "AtP estimate" in text and "cells exact" in text
    r = TraceResult.load(out / "trace.json")
    assert r.settings.method == "atp" and r.approximate
    assert (out / "trace.png").stat().st_size > 1000
    assert main([*args, "--method", "atp+exact", "--exact-top", "0.2"]) == 0
    r = TraceResult.load(out / "trace.json")
    assert r.settings.exact_top == 0.2
    for kind in r.scores:
        t, layer, _ = r.peak(kind)
        assert r.exact_mask(kind)[t, layer]
    assert main([*args, "--method", "atp+exact", "--exact-top", "2"]) == 2
    assert "--exact-top" in capsys.readouterr().err
