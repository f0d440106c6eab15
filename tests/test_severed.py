"""Severed-path traces (resid/mlp-severed, resid/attn-severed) against a plain loop written
from the definition on every tiny architecture, the fast engine's key/value reuse, AtP of a
severed state against a finite difference, and the papers' own numbers on the embedded
model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tracing.engine
from tracing.errors import InvalidInput
from tracing.facts import tokenize_fact
from tracing.models import hook_name, load_model, n_layers
from tracing.noise import noise_draws, resolve_noise
from tracing.toy_models import ARCHS, FAMILIES, build_toy_model
from tracing.trace import prepare_fact, restored_probs, trace_fact

PROMPT = "The Space Needle is in"
SUBJECT = "The Space Needle"
ANCHORS = Path(__file__).resolve().parent / "anchors"
SEVERED = ("resid/mlp-severed", "resid/attn-severed")


@pytest.fixture(scope="module", params=ARCHS + FAMILIES)
def arch_model(request, tmp_path_factory):
    """Every tiny architecture factscope builds (the shared four and the further families,
    GPT-NeoX's parallel block among them)."""
    folder = build_toy_model(request.param, tmp_path_factory.mktemp(request.param))
    return load_model(str(folder))


def plain_severed(model, module: str, samples: int, level: float, two_draws: bool) -> np.ndarray:
    """The definition, one (token, layer) at a time with hooks on the whole model: a clean run
    gives the restored hidden state; a corrupted run (noise on the subject's embeddings)
    gives the frozen module outputs; the scored run (the generator's next draw when
    ``two_draws``, as the papers' code) restores the hidden state at (t, L) and holds the
    module's output at t in every layer."""
    fact = tokenize_fact(model, PROMPT, SUBJECT)
    ids = torch.tensor([fact.ids])
    T, n, d = len(fact.ids), n_layers(model), int(model.cfg.d_model)
    b, e = fact.subject_span
    spec = resolve_noise(model, level)
    draws = [noise_draws(samples, e - b, d, spec, 1, draw=k) for k in (1, 2)]
    mods = [hook_name(model, module, layer) for layer in range(n)]
    resid = [hook_name(model, "resid", layer) for layer in range(n)]
    clean = record(model, ids, resid)
    batch = ids.repeat(samples, 1)

    def noisy(z):
        def hook(x, hook):
            x = x.clone()
            x[:, b:e] = (x[:, b:e].double() + z).to(x.dtype)
            return x

        return hook

    first = record(model, batch, mods, [(hook_name(model, "embed"), noisy(draws[0]))])
    scored = draws[1] if two_draws else draws[0]
    answer = int(torch.softmax(model(ids, use_cache=False)[0, -1], -1).argmax())
    out = np.zeros((T, n))
    for t in range(T):
        for L in range(n):

            def put(src, t=t):
                def hook(x, hook):
                    x = x.clone()
                    x[:, t] = src[:, t]
                    return x

                return hook

            hooks = [(hook_name(model, "embed"), noisy(scored))]
            hooks += [(m, put(first[m])) for m in mods]
            hooks.append((resid[L], put(clean[resid[L]].expand(samples, -1, -1))))
            with torch.no_grad():
                logits = model.run_with_hooks(batch, fwd_hooks=hooks, use_cache=False)
            out[t, L] = torch.softmax(logits[:, -1].float(), -1)[:, answer].mean().item()
    return out


def record(model, ids, names, hooks=()) -> dict[str, torch.Tensor]:
    """The states at hook ``names`` of one run of ``ids`` (with ``hooks``)."""
    store: dict[str, torch.Tensor] = {}

    def saver(name):
        def save(x, hook):
            store[name] = x.detach().clone()
            return x

        return save

    with torch.no_grad():
        model.run_with_hooks(
            ids, fwd_hooks=[*hooks, *((nm, saver(nm)) for nm in names)], use_cache=False
        )
    return store


@pytest.mark.parametrize("severed_noise", ["papers", "same"])
def test_severed_traces_equal_the_plain_definition_on_every_architecture(arch_model, severed_noise):
    result = trace_fact(
        arch_model, PROMPT, SUBJECT, kinds=("resid", *SEVERED), samples=2, noise=0.5,
        severed_noise=severed_noise,
    )  # fmt: skip
    assert result.settings.severed_noise == severed_noise
    for kind in SEVERED:
        module = kind.split("/")[1].removesuffix("-severed")
        want = plain_severed(arch_model, module, 2, 0.5, severed_noise == "papers")
        assert np.abs(result.scores[kind] - want).max() < 2e-5, kind
        # severing changes something, so the comparison is not vacuous
        assert np.abs(result.scores[kind] - result.scores["resid"]).max() > 1e-4, kind
    ref = trace_fact(
        arch_model, PROMPT, SUBJECT, kinds=SEVERED, samples=2, noise=0.5, method="reference",
        severed_noise=severed_noise,
    )  # fmt: skip
    for kind in SEVERED:
        assert np.abs(result.scores[kind] - ref.scores[kind]).max() < 2e-5, kind


def test_same_noise_severing_is_a_no_op_before_the_subject(toy_models):
    r = trace_fact(toy_models["gpt2"], PROMPT, SUBJECT, kinds=SEVERED, samples=2, noise=0.5,
                   severed_noise="same")  # fmt: skip
    for kind in SEVERED:
        assert np.all(r.scores[kind][: r.subject_span[0]] == r.p_corrupted)
    # and at the last layer nothing is left to sever: the hidden state's own trace
    plain = trace_fact(toy_models["gpt2"], PROMPT, SUBJECT, kinds=("resid",), samples=2,
                       noise=0.5)  # fmt: skip
    for kind in SEVERED:
        assert np.abs(r.scores[kind][:, -1] - plain.scores["resid"][:, -1]).max() < 1e-6


def test_severed_fast_engine_reuses_the_prefix_keys_and_values(toy_model, monkeypatch):
    """Severed cells at token t compute only positions t.. (the corrupted run's keys and
    values stand in for the prefix); recomputing whole sequences fails this."""
    spec = resolve_noise(toy_model, 0.5)
    prep, _ = prepare_fact(toy_model, PROMPT, SUBJECT, None, spec, 2, 1)
    T, n = len(prep.tokens), toy_model.cfg.n_layers
    assert prep.corrupt_kv is not None
    seen: list[int] = []
    real = tracing.engine.run_block

    def spy(model, layer, h, kwargs, cache=None):
        seen.append(int(h.shape[1]))
        return real(model, layer, h, kwargs, cache)

    monkeypatch.setattr(tracing.engine, "run_block", spy)
    t = T - 2
    cells = [[("resid", L, t)] + [("mlp-frozen", lf, t) for lf in range(n)] for L in range(n)]
    restored_probs(toy_model, prep, cells, method="fast")
    assert seen and set(seen) == {T - t}


def test_atp_of_a_severed_state_is_its_first_order_term(toy_models):
    """The AtP estimate (prob space) of a severed cell against a finite difference of the
    same restoration scaled by eps, with the MLP outputs at that token held."""
    model = toy_models["llama"]
    spec = resolve_noise(model, 0.5)
    prep, _ = prepare_fact(model, PROMPT, SUBJECT, None, spec, 2, 1, severed_noise="same")
    n, t, L = n_layers(model), prep.span[1] - 1, 1
    cell = [("resid", L, t)] + [("mlp-frozen", lf, t) for lf in range(n)]
    est = restored_probs(model, prep, [cell], method="atp", atp_space="prob")[0]
    name = hook_name(model, "resid", L)
    mlps = [hook_name(model, "mlp", lf) for lf in range(n)]
    cache = record(
        model,
        prep.ids.repeat(2, 1),
        [*mlps, name],
        [(hook_name(model, "embed"), _noise_hook(prep))],
    )
    held = {m: cache[m] for m in mlps}
    eps = 1e-2

    def probability(scale: float) -> float:
        def restore(x, hook):
            x = x.clone()
            x[:, t] = x[:, t] + scale * (prep.clean[name][0, t] - cache[name][:, t])
            return x

        def hold(m):
            def hook(x, hook):
                x = x.clone()
                x[:, t] = held[m][:, t]
                return x

            return hook

        hooks = [(hook_name(model, "embed"), _noise_hook(prep)), (name, restore)]
        hooks += [(m, hold(m)) for m in mlps]
        with torch.no_grad():
            logits = model.run_with_hooks(prep.ids.repeat(2, 1), fwd_hooks=hooks, use_cache=False)
        return torch.softmax(logits[:, -1].double(), -1)[:, prep.answer_id].mean().item()

    slope = (probability(eps) - probability(-eps)) / (2 * eps)
    assert est - prep.p_corrupted == pytest.approx(slope, rel=2e-2, abs=1e-7)
    assert abs(slope) > 1e-5


def _noise_hook(prep):
    b, e = prep.span

    def hook(x, hook):
        x = x.clone()
        x[:, b:e] = (x[:, b:e].double() + prep.noise).to(x.dtype)
        return x

    return hook


def test_atp_refuses_severing_under_the_papers_two_draws(toy_models):
    with pytest.raises(InvalidInput, match="two-draw"):
        trace_fact(toy_models["gpt2"], PROMPT, SUBJECT, kinds=SEVERED, samples=2, noise=0.5,
                   method="atp")  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kinds=["mlp/mlp-severed"]), "applies to restored hidden states"),
        (dict(kinds=["resid/ln-severed"]), "unknown kind"),
        (dict(kinds=SEVERED, window={"resid/mlp-severed": 7}), "nothing is left to sever"),
        (dict(kinds=SEVERED, direction="noise"), "direction 'denoise'"),
        (dict(kinds=SEVERED, severed_noise="other"), "severed_noise"),
    ],
)
def test_bad_severing_is_refused(toy_models, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        trace_fact(toy_models["gpt2"], PROMPT, SUBJECT, samples=2, noise=0.5, **kwargs)


@pytest.mark.model
@pytest.mark.parametrize("severed_noise, suffix", [("papers", ""), ("same", "_same_noise")])
def test_embedded_model_matches_the_papers_severed_code_in_every_cell(gemma, severed_noise, suffix):
    """The anchors hold the papers' ``trace_with_repatch`` (every token and layer) on this
    model with the same noise recipe; the fast engine reproduces every cell."""
    ref = json.loads((ANCHORS / "reference_trace_gemma.json").read_text())
    result = trace_fact(
        gemma, ref["prompt"], ref["subject"], ref["answer"], kinds=SEVERED, samples=10, seed=1,
        severed_noise=severed_noise,
    )  # fmt: skip
    for kind in SEVERED:
        module = kind.split("/")[1].removesuffix("-severed")
        anchor = np.load(ANCHORS / f"gemma_scores_hidden_severed_{module}{suffix}.npy")
        assert result.scores[kind].shape == anchor.shape
        assert np.abs(result.scores[kind] - anchor).max() <= 1e-5, kind
