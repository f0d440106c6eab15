"""The shared v*/z optimisation (editing.targets) and context templates (editing.context)."""

from __future__ import annotations

import pytest
import torch

from editing.context import check_templates, context_templates
from editing.hparams import TargetHparams
from editing.objective import compute_targets
from editing.prepared import prepare_requests
from editing.requests import EditRequest
from editing.targets import DeltaRunner, rewrite_prompts
from tracing.facts import tokenize_fact
from tracing.models import down_proj, final_logits, hook_name, target_ids

TEMPLATES = ["{}", "Because of this. {}", "I think that the. {}"]
REQUESTS = [
    EditRequest("{} is located in the city of", "The Space Needle", "Paris"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest("{} plays the sport of", "Michael Jordan", "hockey"),
]


def _weights(model) -> list[torch.Tensor]:
    return [down_proj(model, L).detach().clone() for L in range(model.cfg.n_layers)]


@pytest.mark.parametrize("hook", ["mlp_raw", "resid"])
def test_optimisation_lowers_nll_and_keeps_weights(toy_model, hook):
    before = _weights(toy_model)
    hp = TargetHparams(num_steps=8, lr=0.5, kl_factor=0.0, weight_decay=0.0, early_stop_loss=0.0)
    res = compute_targets(
        toy_model, prepare_requests(toy_model, REQUESTS[:2], TEMPLATES), layer=1, hook=hook, hp=hp
    )
    assert res.delta.shape == res.init.shape == (2, toy_model.cfg.d_model)
    for r in range(2):
        assert res.nll_after[r] < res.nll_before[r] - 1e-3
        assert res.history[0][r] == pytest.approx(res.nll_before[r])
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(toy_model), strict=True))


def test_delta_norm_respects_clamp(toy_model):
    hp = TargetHparams(num_steps=6, lr=2.0, clamp_norm_factor=0.05, early_stop_loss=0.0)
    res = compute_targets(
        toy_model,
        prepare_requests(toy_model, REQUESTS[:2], TEMPLATES),
        layer=2,
        hook="resid",
        hp=hp,
    )
    ratio = res.delta.norm(dim=-1) / res.init.norm(dim=-1)
    assert (ratio <= 0.05 * (1 + 1e-5)).all()
    assert (ratio > 0.049).all()  # lr 2 for 5 steps reaches the bound


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
@pytest.mark.parametrize("hook", ["mlp_raw", "resid"])
def test_batching_does_not_mix_requests(toy_models, arch, hook):
    model = toy_models[arch]
    hp = TargetHparams(num_steps=6, lr=0.3, early_stop_loss=0.0)
    kw = dict(layer=1, hook=hook, hp=hp)
    batched = compute_targets(model, prepare_requests(model, REQUESTS, TEMPLATES), **kw)
    for r, req in enumerate(REQUESTS):
        alone = compute_targets(model, prepare_requests(model, [req], TEMPLATES), **kw)
        torch.testing.assert_close(batched.init[r], alone.init[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched.delta[r], alone.delta[0], rtol=2e-3, atol=2e-4)
        assert batched.nll_after[r] == pytest.approx(alone.nll_after[0], rel=1e-3, abs=1e-4)


def test_each_request_stops_on_its_own(toy_models):
    """Early stopping is per request: a huge threshold stops all after the first step, and
    the per-request step counts are recorded."""
    model = toy_models["llama"]
    hp = TargetHparams(num_steps=5, early_stop_loss=1e6)
    res = compute_targets(
        model, prepare_requests(model, REQUESTS[:2], TEMPLATES), layer=1, hook="resid", hp=hp
    )
    assert res.steps == [0, 0]
    assert torch.count_nonzero(res.delta) == 0


def _reference_logprobs(model, prompt, layer, hook, delta):
    """Full forward of one unpadded prompt with ``delta`` hooked in at its subject-last token:
    log-softmax at the positions the loss reads."""
    name = (
        f"blocks.{layer}.mlp.out.hook_out"
        if hook == "mlp_raw"
        else hook_name(model, "resid", layer)
    )

    def add(x, hook):
        x = x.clone()
        x[0, prompt.lookup] += delta
        return x

    with torch.no_grad():
        logits = model.run_with_hooks(
            torch.tensor([prompt.ids]), fwd_hooks=[(name, add)], use_cache=False
        )
    return torch.log_softmax(logits[0, list(prompt.read)].float(), dim=-1)


@pytest.mark.parametrize("hook", ["mlp_raw", "resid"])
def test_layer_skipping_path_matches_full_forward(toy_model, hook):
    layer = 1
    prompts = rewrite_prompts(prepare_requests(toy_model, REQUESTS, TEMPLATES))
    runner = DeltaRunner(toy_model, prompts, layer, hook, max_tokens=64)  # several chunks
    assert len(runner.chunks) > 1
    # the prefix-reuse path is taken on every architecture (a silent fallback fails here)
    assert all(c.cut > 0 and c.prefix is not None for c in runner.chunks)
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(len(REQUESTS), toy_model.cfg.d_model, generator=g) * 3
    checked = 0
    for c in runner.chunks:
        rows = torch.arange(len(c.prompts))[::2]  # a subset of rows, as when requests stop
        with torch.no_grad():
            logp, keep = runner.chunk_logprobs(c, delta, rows)
        got_prompts = c.read_prompt[keep].tolist()
        for gi in dict.fromkeys(got_prompts):
            p = prompts[gi]
            ref = _reference_logprobs(toy_model, p, layer, hook, delta[p.request])
            mine = logp[[i for i, x in enumerate(got_prompts) if x == gi]]
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked >= len(prompts) // 2


@pytest.mark.parametrize("hook", ["mlp_raw", "resid"])
def test_prefix_reuse_gives_the_same_loss_gradient(toy_model, hook):
    """Re-running only the positions from the subject's last token on, against whole
    sequences: the same log-probabilities and the same gradient with respect to delta."""
    prompts = rewrite_prompts(prepare_requests(toy_model, REQUESTS, TEMPLATES))
    runners = [DeltaRunner(toy_model, prompts, 1, hook, reuse_prefix=r) for r in (True, False)]
    g = torch.Generator().manual_seed(1)
    base = torch.randn(len(REQUESTS), toy_model.cfg.d_model, generator=g)
    grads = []
    for runner in runners:
        delta = base.clone().requires_grad_()
        total = sum(
            runner.chunk_logprobs(c, delta, torch.arange(len(c.prompts)))[0][:, :7].sum()
            for c in runner.chunks
        )
        total.backward()
        grads.append(delta.grad)
    assert any(c.prefix is not None for c in runners[0].chunks)
    assert all(c.prefix is None for c in runners[1].chunks)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    assert float(grads[1].abs().max()) > 0


def test_final_logits_only_at_read_positions(toy_model):
    """The read positions are exactly the positions that predict the target tokens."""
    req = REQUESTS[0]
    (p, *_rest) = rewrite_prompts(prepare_requests(toy_model, [req]))
    fact = tokenize_fact(toy_model, req.prompt, req.subject)
    tgt = target_ids(toy_model, req.target_new)
    assert p.lookup == fact.subject_last
    assert list(p.ids) == list(fact.ids) + tgt[:-1]
    assert list(p.targets) == tgt
    assert p.read[0] == len(fact.ids) - 1 and len(p.read) == len(tgt)
    resid = torch.zeros(1, 1, toy_model.cfg.d_model)
    assert final_logits(toy_model, resid).shape[-1] == toy_model.cfg.d_vocab


def test_nonfinite_loss_raises(toy_models):
    model = toy_models["gpt2"]
    hp = TargetHparams(num_steps=2)
    real = DeltaRunner.chunk_logprobs

    def broken(self, c, delta, rows):
        logp, keep = real(self, c, delta, rows)
        return logp * float("nan"), keep

    DeltaRunner.chunk_logprobs = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(ValueError, match="non-finite"):
            compute_targets(
                model,
                prepare_requests(model, REQUESTS[:1], TEMPLATES),
                layer=1,
                hook="resid",
                hp=hp,
            )
    finally:
        DeltaRunner.chunk_logprobs = real  # type: ignore[method-assign]


# --------------------------------------------------------------------------- context templates


def test_context_templates_are_seeded_and_cached(toy_models, tmp_path):
    model = toy_models["gemma3"]
    a = context_templates(model, [(4, 3), (6, 2)], seed=1, cache_dir=tmp_path)
    assert a[0] == "{}" and len(a) <= 6
    assert all(t.count("{}") == 1 and t.endswith(". {}") for t in a[1:])
    assert len(list(tmp_path.glob("*.json"))) == 1
    b = context_templates(model, [(4, 3), (6, 2)], seed=1, cache=False)
    assert a == b  # same seed, regenerated without the cache: same texts
    c = context_templates(model, [(4, 3), (6, 2)], seed=2, cache=False)
    assert c != a


def test_check_templates():
    assert check_templates(["A. {}", "{}", "A. {}"]) == ["{}", "A. {}"]
    assert check_templates(["{x} and {}"]) == ["{}", "{x} and {}"]
    with pytest.raises(ValueError, match="exactly once"):
        check_templates(["no slot"])
    with pytest.raises(ValueError, match="exactly once"):
        check_templates(["{} {}"])
    with pytest.raises(ValueError, match="list of strings"):
        check_templates("{}")


def _same(a, b, atol=1e-5) -> None:
    torch.testing.assert_close(a.init, b.init, rtol=0, atol=atol)
    torch.testing.assert_close(a.delta, b.delta, rtol=1e-4, atol=atol)
    assert a.steps == b.steps


def test_groups_give_the_one_batch_result(toy_models):
    """Requests are independent: optimising them one group at a time (group_size 1 or 2)
    gives what one group of all three gives, up to the chunking of the forward passes."""
    model = toy_models["llama"]
    hp = TargetHparams(num_steps=6, lr=0.5, early_stop_loss=0.0)
    prepared = prepare_requests(model, REQUESTS, TEMPLATES)
    whole = compute_targets(model, prepared, layer=1, hook="resid", hp=hp)
    for size in (1, 2):
        _same(
            compute_targets(model, prepared, layer=1, hook="resid", hp=hp, group_size=size), whole
        )


def test_cache_resumes_an_interrupted_batch(toy_models, tmp_path, monkeypatch):
    """Each request's target is on disk once final: a batch killed after its first group
    resumes with only the rest, and gives the uninterrupted result; after the weights change
    nothing is reused."""
    from editing import objective
    from editing.target_cache import TargetCache

    model = toy_models["gpt2"]
    hp = TargetHparams(num_steps=5, lr=0.5, early_stop_loss=0.0)
    prepared = prepare_requests(model, REQUESTS, TEMPLATES)
    whole = compute_targets(model, prepared, layer=1, hook="resid", hp=hp, group_size=1)
    cache = TargetCache(tmp_path, model, 1, "resid", hp)
    real, calls = objective._optimise, []

    def dies_on_second_group(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(objective, "_optimise", dies_on_second_group)
    with pytest.raises(KeyboardInterrupt):
        compute_targets(model, prepared, layer=1, hook="resid", hp=hp, group_size=1, cache=cache)
    assert len(list(cache.folder.glob("*.safetensors"))) == 1
    calls.clear()
    monkeypatch.setattr(
        objective, "_optimise", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1]
    )
    resumed = compute_targets(
        model, prepared, layer=1, hook="resid", hp=hp, group_size=1, cache=cache
    )
    assert calls == [1, 1]  # only the two unfinished requests
    _same(resumed, whole)
    calls.clear()
    again = compute_targets(model, prepared, layer=1, hook="resid", hp=hp, cache=cache)
    assert calls == [] and torch.equal(again.delta, resumed.delta)
    original = down_proj(model, 0).detach().clone()
    with torch.no_grad():
        down_proj(model, 0).add_(1e-3)
    try:
        assert TargetCache(tmp_path, model, 1, "resid", hp).folder != cache.folder
    finally:
        with torch.no_grad():
            down_proj(model, 0).copy_(original)
