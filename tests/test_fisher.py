"""The diagonal Fisher information (editing.statistics.fisher) against a plain per-example loop, its
penalty's gradient against the closed form 2 λ F (θ − θ0), the disk cache (reuse, resume,
refusal of another parameter set) and bad input."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

import editing.statistics.fisher as fisher_mod
from editing.methods.finetune import FTHparams, finetune_edit
from editing.params import block_parameters
from editing.requests import EditRequest
from editing.requests.prepared import prepare_requests
from editing.statistics.fisher import (
    FisherSettings,
    cache_folder,
    fisher_diagonal,
    fisher_penalty,
    fisher_texts,
    sampled_labels,
)
from tracing.errors import InvalidHparams, InvalidInput

REQ = EditRequest("The Space Needle is located in {} of", "the city", " Paris")
FACTS = [("The Eiffel Tower is in", " Paris"), ("Toyota is headquartered in", " Japan")]
SMALL = dict(n_sequences=3, seq_len=12, n_facts=2)


@pytest.fixture
def two_facts(monkeypatch):
    """Random models know no facts: give the estimate two fixed (prompt, answer) pairs."""
    monkeypatch.setattr(fisher_mod, "answered_facts", lambda model, n, **kw: FACTS[:n])


def plain_fisher(model, params, settings) -> dict[str, torch.Tensor]:
    """Reference: per sequence one plain full forward of the whole model (HF logits), the
    gradient of the summed log-probability of its labels, squared, divided by its number
    of scored positions; averaged per source, then over sources (float64 sums)."""
    texts = fisher_texts(model, settings)
    sums: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    tensors = list(params.values())
    for i, t in enumerate(texts):
        for p in tensors:
            p.requires_grad_(True)
        try:
            logits = model(torch.tensor([t.tokens]), use_cache=False)[0]
            logp = logits.float().log_softmax(-1)[list(t.positions)]
            if settings.labels == "sampled":
                labels = sampled_labels(logp, settings.seed, i)
            else:
                labels = torch.tensor(t.observed)
            grads = torch.autograd.grad(logp.gather(1, labels[:, None]).sum(), tensors)
        finally:
            for p in tensors:
                p.requires_grad_(False)
                p.grad = None
        acc = sums.setdefault(
            t.source, {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
        )
        for n, g in zip(params, grads, strict=True):
            acc[n] += g.double() ** 2 / len(t.positions)
        counts[t.source] = counts.get(t.source, 0) + 1
    return {
        n: sum(sums[s][n] / counts[s] for s in sums) / len(sums)  # type: ignore[misc]
        for n in params
    }


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.original_model.state_dict().items()}


def assert_same(model, saved) -> None:
    now = model.original_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in saved.items())


@pytest.mark.parametrize("labels", ["sampled", "empirical"])
def test_fisher_equals_a_plain_per_example_loop(toy_model, two_facts, tmp_path, labels):
    params = {**block_parameters(toy_model, 2, "block"), **block_parameters(toy_model, 3, "mlp")}
    settings = FisherSettings(**SMALL, labels=labels)
    saved = snapshot(toy_model)
    got = fisher_diagonal(toy_model, params, settings, cache_dir=tmp_path, progress=False)
    assert_same(toy_model, saved)
    ref = plain_fisher(toy_model, params, settings)
    assert set(got) == set(params)
    # one scale for all tensors: some (GPT-2's key bias) have a zero Fisher up to rounding
    scale = max(float(r.abs().max()) for r in ref.values())
    for n in params:
        assert got[n].dtype == torch.float32 and got[n].shape == params[n].shape
        torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-4, atol=1e-6 * scale)


def test_sampled_labels_are_the_models_own_not_the_texts(toy_models, two_facts, tmp_path):
    model = toy_models["gpt2"]
    params = block_parameters(model, 1, "attn")
    kw = dict(cache_dir=tmp_path, progress=False)
    true = fisher_diagonal(model, params, FisherSettings(**SMALL), **kw)
    emp = fisher_diagonal(model, params, FisherSettings(**SMALL, labels="empirical"), **kw)
    assert not all(torch.allclose(true[n], emp[n]) for n in params)
    # inverse-CDF sampling: a one-hot distribution always gives its token, and the draws
    # follow the distribution (here 0.25 / 0.75)
    logp = torch.full((4, 5), -1e9).index_fill_(1, torch.tensor([3]), 0.0).log_softmax(-1)
    assert sampled_labels(logp, 0, 0).tolist() == [3, 3, 3, 3]
    two = torch.tensor([[0.25, 0.75]]).log().expand(4000, 2)
    assert abs(float(sampled_labels(two, 7, 1).double().mean()) - 0.75) < 0.03


def test_penalty_gradient_is_two_lambda_f_times_the_change(toy_models, two_facts):
    model = toy_models["llama"]
    params = block_parameters(model, 1, "block")
    fisher = plain_fisher(model, params, FisherSettings(**SMALL))
    gen = torch.Generator().manual_seed(0)
    anchors = [p.detach().float().clone() for p in params.values()]
    deltas = [torch.randn(a.shape, generator=gen) * 1e-2 for a in anchors]
    values = [(a + d).requires_grad_(True) for a, d in zip(anchors, deltas, strict=True)]
    lam = 0.7
    f32 = [f.float() for f in fisher.values()]
    penalty = fisher_penalty(values, anchors, f32, lam)
    grads = torch.autograd.grad(penalty, values)
    # the change as the float32 tensors hold it, exactly (float64 difference)
    change = [v.detach().double() - a.double() for v, a in zip(values, anchors, strict=True)]
    expected = [2 * lam * f * c for f, c in zip(fisher.values(), change, strict=True)]
    value = lam * sum(float((f * c**2).sum()) for f, c in zip(fisher.values(), change, strict=True))
    assert float(penalty.detach()) == pytest.approx(value, rel=1e-5)
    scale = max(float(e.abs().max()) for e in expected)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6 * scale)


def test_fisher_constraint_in_training(toy_models, two_facts, tmp_path):
    """Weight 0 gives exactly the unconstrained run; a large weight keeps the Fisher-weighted
    change far smaller than plain fine-tuning's."""
    model = toy_models["gemma3"]
    saved = snapshot(model)
    prepared = prepare_requests(model, [REQ])
    common = dict(
        layers=[1, 2], params="block", lr=5e-3, num_steps=6, fisher_sequences=3, fisher_facts=2
    )
    params = {**block_parameters(model, 1, "block"), **block_parameters(model, 2, "block")}
    fisher = fisher_diagonal(
        model, params, FisherSettings(**SMALL), cache_dir=tmp_path, progress=False
    )

    def run(**kw):
        hp = FTHparams(**{**common, **kw})
        return finetune_edit(model, prepared, hp, fisher=fisher, progress=False)

    free = run(mode="unconstrained")
    zero = run(constraint="fisher", fisher_weight=0.0)
    assert [d.param for d in zero.deltas] == [d.param for d in free.deltas]
    assert all(torch.equal(a.dense, b.dense) for a, b in zip(zero.deltas, free.deltas, strict=True))
    heavy = run(constraint="fisher", fisher_weight=1e6)
    assert heavy.metadata["constraint"] == "fisher" and heavy.metadata["fisher_penalties"]

    def weighted(edit) -> float:
        return sum(float((fisher[d.param] * d.dense**2).sum()) for d in edit.deltas)

    assert weighted(heavy) < 0.1 * weighted(free)
    assert_same(model, saved)


def test_cache_is_reused_and_an_interrupted_run_resumes(
    toy_models, two_facts, tmp_path, monkeypatch
):
    model = toy_models["gptj"]
    params = block_parameters(model, 2, "mlp")
    settings = FisherSettings(**SMALL)
    whole = fisher_diagonal(model, params, settings, cache_dir=tmp_path / "a", progress=False)
    real, seen, state = fisher_mod._sequence_grads, [], {"fail": True}

    def failing(model, text, tensors, start, settings, index):
        seen.append(index)
        if index == 3 and state["fail"]:
            raise KeyboardInterrupt
        return real(model, text, tensors, start, settings, index)

    monkeypatch.setattr(fisher_mod, "_sequence_grads", failing)
    kw = dict(cache_dir=tmp_path / "b", progress=False, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        fisher_diagonal(model, params, settings, **kw)
    assert seen == [0, 1, 2, 3]
    seen.clear()
    state["fail"] = False
    resumed = fisher_diagonal(model, params, settings, **kw)
    assert seen == [2, 3, 4]  # 3 WikiText sequences + 2 facts; 0-1 came from the checkpoint
    assert all(torch.equal(whole[n], resumed[n]) for n in params)
    seen.clear()
    again = fisher_diagonal(model, params, settings, cache_dir=tmp_path / "b", progress=False)
    assert seen == [] and all(torch.equal(whole[n], again[n]) for n in params)
    assert not (cache_folder(model, params, settings, tmp_path / "b") / "partial.json").exists()


def test_a_cache_of_a_superset_serves_a_subset_without_recomputing(
    toy_models, two_facts, tmp_path, monkeypatch
):
    model = toy_models["llama"]
    settings = FisherSettings(**SMALL)
    both = {**block_parameters(model, 1, "block"), **block_parameters(model, 2, "mlp")}
    wide = fisher_diagonal(model, both, settings, cache_dir=tmp_path, progress=False)
    sub = block_parameters(model, 2, "mlp")
    ref = plain_fisher(model, sub, settings)  # an independent loop over block 2 alone
    real, seen = fisher_mod._sequence_grads, []

    def counting(model, text, tensors, start, settings, index):
        seen.append(index)
        return real(model, text, tensors, start, settings, index)

    monkeypatch.setattr(fisher_mod, "_sequence_grads", counting)
    got = fisher_diagonal(model, sub, settings, cache_dir=tmp_path, progress=False)
    assert seen == [] and set(got) == set(sub)
    assert all(torch.equal(got[n], wide[n]) for n in sub)
    scale = max(float(r.abs().max()) for r in ref.values())
    for n in sub:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-4, atol=1e-6 * scale)
    # other settings, or a tensor the cache does not hold: computed afresh
    fisher_diagonal(
        model, sub, FisherSettings(**{**SMALL, "n_facts": 1}), cache_dir=tmp_path, progress=False
    )
    assert seen
    seen.clear()
    fisher_diagonal(
        model, block_parameters(model, 3, "mlp"), settings, cache_dir=tmp_path, progress=False
    )
    assert seen


def test_a_cache_made_for_another_parameter_set_is_refused_and_recomputed(
    toy_models, two_facts, tmp_path, caplog
):
    model = toy_models["gpt2"]
    settings = FisherSettings(**SMALL)
    a, b = block_parameters(model, 1, "attn"), block_parameters(model, 2, "attn")
    fa = fisher_diagonal(model, a, settings, cache_dir=tmp_path, progress=False)
    folder_a, folder_b = (cache_folder(model, p, settings, tmp_path) for p in (a, b))
    # the cache of set a placed where set b's belongs (renamed tensors so that they would fit)
    folder_b.mkdir(parents=True)
    shutil.copy(folder_a / "fisher.json", folder_b / "fisher.json")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder_a / "fisher.safetensors"))
    save_file(
        {n.replace("blocks.1.", "blocks.2."): t for n, t in tensors.items()},
        str(folder_b / "fisher.safetensors"),
    )
    with caplog.at_level(logging.WARNING, logger="editing.statistics.fisher"):
        fb = fisher_diagonal(model, b, settings, cache_dir=tmp_path, progress=False)
    assert "refusing Fisher cache" in caplog.text and "parameters" in caplog.text
    ref = plain_fisher(model, b, settings)
    scale = max(float(r.abs().max()) for r in ref.values())
    for n in b:
        torch.testing.assert_close(fb[n].double(), ref[n], rtol=1e-4, atol=1e-6 * scale)
    assert not all(torch.equal(fb[n], fa[n.replace("blocks.2.", "blocks.1.")]) for n in b)


def test_no_unmodified_text_is_refused_before_any_change(toy_models, tmp_path, monkeypatch):
    model = toy_models["gemma3"]
    monkeypatch.setattr(fisher_mod, "answered_facts", lambda model, n, **kw: [])
    with pytest.raises(InvalidInput, match="unmodified text"):
        FisherSettings(n_sequences=0, n_facts=0)
    with pytest.raises(InvalidHparams, match="unmodified text"):
        FTHparams(layers=[1], constraint="fisher", fisher_sequences=0, fisher_facts=0)
    with pytest.raises(InvalidHparams, match="fisher_weight"):
        FTHparams(layers=[1], constraint="fisher", fisher_weight=-1.0)
    saved = snapshot(model)
    # a model that answers no known fact, and no WikiText asked for: no text
    hp = FTHparams(
        layers=[1], constraint="fisher", fisher_sequences=0, fisher_facts=4, params="mlp"
    )
    with pytest.raises(InvalidInput, match="unmodified text"):
        finetune_edit(model, prepare_requests(model, [REQ]), hp, progress=False)
    assert_same(model, saved)
    # a Fisher missing a tuned tensor is refused too
    with pytest.raises(InvalidInput, match="no entry"):
        finetune_edit(model, prepare_requests(model, [REQ]), hp, fisher={}, progress=False)
    assert_same(model, saved)
