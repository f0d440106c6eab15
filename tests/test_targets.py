"""The shared v*/z optimisation (editing.targets.optimise, editing.targets.objective) and
the neighbour prompts it reads; the context templates are tests/test_context.py's."""

from __future__ import annotations

import pytest
import torch

from editing.hparams import TargetHparams
from editing.requests import EditRequest
from editing.requests.prepared import neighbour_prompts, prepare_requests
from editing.targets.objective import TargetObjective, compute_targets
from editing.targets.optimise import DeltaRunner, RewritePrompt, rewrite_prompts
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


#: Rows long enough to pass the tiny Gemma's 16-token sliding window (its local layers' mask
#: must carry over to rows cut at different places).
LONG_TEMPLATES = [*TEMPLATES, "It was written down a long time ago by somebody who knew it. {}"]


def _cut_at_subject(runner, prompts) -> bool:
    """Every row of every pass re-runs only from its own subject-last token on."""
    return all(
        p.prefix is not None
        and p.cuts is not None
        and p.cuts.tolist() == [prompts[g].lookup for g in p.prompts]
        and bool((p.cuts > 0).all())
        for p in runner.passes
    )


@pytest.mark.parametrize("hook", ["mlp_raw", "resid"])
def test_layer_skipping_path_matches_full_forward(toy_model, hook):
    layer = 1
    prompts = rewrite_prompts(prepare_requests(toy_model, REQUESTS, LONG_TEMPLATES))
    runner = DeltaRunner(toy_model, prompts, layer, hook, max_tokens=64)
    assert len(runner.passes) > 1
    # the prefix-reuse path is taken on every architecture (a silent fallback fails here),
    # each row cut at its own subject-last token, rows of one pass at different places
    assert _cut_at_subject(runner, prompts)
    assert any(len(set(p.cuts.tolist())) > 1 for p in runner.passes)
    assert max(len(prompts[g].ids) for p in runner.passes for g in p.prompts) > 16
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(len(REQUESTS), toy_model.cfg.d_model, generator=g) * 3
    active = torch.tensor([True, False, True])  # a subset of requests, as when some stop
    checked = 0
    for p in runner.passes:
        with torch.no_grad():
            logp, keep = runner.pass_logprobs(p, delta, active)
        got_prompts = p.read_prompt[keep].tolist()
        assert all(active[prompts[gi].request] for gi in got_prompts)
        for gi in dict.fromkeys(got_prompts):
            pr = prompts[gi]
            ref = _reference_logprobs(toy_model, pr, layer, hook, delta[pr.request])
            mine = logp[[i for i, x in enumerate(got_prompts) if x == gi]]
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == sum(bool(active[pr.request]) for pr in prompts)


@pytest.mark.parametrize("hook", ["mlp_raw", "resid"])
def test_prefix_reuse_gives_the_same_loss_gradient(toy_model, hook):
    """Re-running only the positions from each row's subject-last token on, against whole
    sequences: the same log-probabilities and the same gradient with respect to delta."""
    prompts = rewrite_prompts(prepare_requests(toy_model, REQUESTS, LONG_TEMPLATES))
    runners = [DeltaRunner(toy_model, prompts, 1, hook, reuse_prefix=r) for r in (True, False)]
    g = torch.Generator().manual_seed(1)
    base = torch.randn(len(REQUESTS), toy_model.cfg.d_model, generator=g)
    grads, logps = [], []
    for runner in runners:
        delta = base.clone().requires_grad_()
        outs = [runner.pass_logprobs(p, delta)[0] for p in runner.passes]
        torch.cat(outs)[:, :7].sum().backward()
        grads.append(delta.grad)
        logps.append(torch.cat(outs).detach())
    assert _cut_at_subject(runners[0], prompts)
    assert all(p.prefix is None and p.cuts is None for p in runners[1].passes)
    # the same reads in the same order (one pass each: the default budget)
    assert len(runners[0].passes) == len(runners[1].passes) == 1
    p0, p1 = runners[0].passes[0], runners[1].passes[0]
    order0, order1 = p0.read_prompt.tolist(), p1.read_prompt.tolist()
    assert sorted(order0) == sorted(order1)  # rows sorted by what each pass re-runs
    where: dict[int, list[int]] = {}
    for i, x in enumerate(order0):
        where.setdefault(x, []).append(i)
    idx = [where[x].pop(0) for x in order1]  # a prompt's reads keep their order
    # far less work: positions re-run per block
    assert int(p0.suffix.sum()) * 2 < int(p1.suffix.sum())
    torch.testing.assert_close(logps[0][idx], logps[1], rtol=1e-4, atol=1e-4)
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
    real = DeltaRunner.pass_states

    def broken(self, p, delta, active=None):
        states, keep = real(self, p, delta, active)
        return states * float("nan"), keep

    DeltaRunner.pass_states = broken  # type: ignore[method-assign]
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
        DeltaRunner.pass_states = real  # type: ignore[method-assign]


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
    from editing.targets.cache import TargetCache

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


# --------------------------------------------------------------------------- fast path details


def test_deferred_backward_gives_the_immediate_gradient(toy_models):
    """evaluate(defer=True) then backward(keep): the kept requests get exactly the gradient
    they get without deferring; the others none (requests are independent)."""
    model = toy_models["gemma3"]
    hp = TargetHparams(kl_factor=0.5, weight_decay=0.3)
    obj = TargetObjective(model, prepare_requests(model, REQUESTS, TEMPLATES), 1, "resid", hp)
    base = torch.randn(len(REQUESTS), model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    now = base.clone().requires_grad_()
    parts_now = obj.evaluate(now)
    later = base.clone().requires_grad_()
    parts_later = obj.evaluate(later, defer=True)
    assert later.grad is None  # nothing accumulated yet
    torch.testing.assert_close(parts_later.total, parts_now.total, rtol=0, atol=0)
    keep = torch.tensor([True, False, True])
    obj.backward(keep)
    assert later.grad is not None
    torch.testing.assert_close(later.grad[keep], now.grad[keep], rtol=1e-6, atol=1e-7)
    assert float(later.grad[~keep].abs().max()) == 0.0
    assert float(now.grad[~keep].abs().max()) > 0


@pytest.mark.model
def test_prefix_reuse_is_taken_on_the_embedded_model(gemma):
    """The ROME setting on the embedded model: every row re-runs only its own suffix,
    attending to recorded keys and values (a silent fallback to whole sequences fails)."""
    req = EditRequest("{} is located in the city of", "The Space Needle", "Paris")
    prompts = rewrite_prompts(prepare_requests(gemma, [req], TEMPLATES), "last")
    runner = DeltaRunner(gemma, prompts, 2, "mlp_raw")
    assert _cut_at_subject(runner, prompts)
    assert len(runner.passes) == 1


# --------------------------------------------------------------------------- neighbour term

NB_REQ = EditRequest(
    "{} is located in the continent of", "Vinson Massif", "Europe", relation_id="P30"
)


def test_neighbour_prompts_are_other_subjects_of_the_relation(toy_models):
    from tracing.facts import load_known_facts

    model = toy_models["gpt2"]
    p30 = {f.subject for f in load_known_facts() if f.relation_id == "P30"}
    got = neighbour_prompts(model, NB_REQ, 5)
    assert len(got) == 5
    texts = [model.tokenizer.decode(t.ids).replace("<|endoftext|>", "") for t in got]
    subjects = [t.removesuffix(" is located in the continent of") for t in texts]
    assert NB_REQ.subject not in subjects and len(set(subjects)) == 5
    assert set(subjects) <= p30
    for t, s in zip(got, subjects, strict=True):
        assert tokenize_fact(model, s + NB_REQ.template[2:], s).subject_last == t.subject_last
    with pytest.raises(ValueError, match="no other subject"):
        neighbour_prompts(model, EditRequest("{} likes the colour", "Bob", "red"), 3)


def test_neighbour_hparams_are_checked():
    with pytest.raises(ValueError, match="neighbour_kl_factor"):
        TargetHparams(neighbour_kl_factor=-1.0)
    with pytest.raises(ValueError, match="neighbour_prompts"):
        TargetHparams(neighbour_prompts=0)
    assert TargetHparams().neighbour_kl_factor == 0.0  # off by default
    # off: records and cache keys as before the term existed; on: kept and read back
    assert "neighbour_kl_factor" not in TargetHparams(neighbour_prompts=3).to_dict()
    on = TargetHparams(neighbour_kl_factor=0.5, neighbour_prompts=3)
    assert TargetHparams.from_dict(on.to_dict()) == on


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_neighbour_term_is_the_kl_on_neighbour_prompts(toy_models, arch):
    """The term equals the mean KL(p_new || p_orig) of full forwards of the neighbour
    prompts with delta at their subject's last token (read at their last token), and it
    has a gradient."""
    model = toy_models[arch]
    prepared = prepare_requests(model, [NB_REQ], TEMPLATES)
    hp = TargetHparams(
        kl_factor=0.0, weight_decay=0.0, neighbour_kl_factor=2.0, neighbour_prompts=3
    )
    off = TargetHparams(kl_factor=0.0, weight_decay=0.0)
    delta = torch.randn(1, model.cfg.d_model, generator=torch.Generator().manual_seed(3)) * 3
    grads, parts = [], []
    for h in (hp, off):
        d = delta.clone().requires_grad_()
        parts.append(TargetObjective(model, prepared, 1, "resid", h).evaluate(d))
        grads.append(d.grad)
    expected = []
    for t in neighbour_prompts(model, NB_REQ, 3):
        p = RewritePrompt(0, t.ids, t.subject_last, (len(t.ids) - 1,), (), "neighbour")
        new = _reference_logprobs(model, p, 1, "resid", delta[0])[0].double()
        orig = _reference_logprobs(model, p, 1, "resid", 0 * delta[0])[0].double()
        expected.append(float((new.exp() * (new - orig)).sum()))
    mean = sum(expected) / len(expected)
    assert mean > 1e-6
    assert float(parts[0].neighbour_kl[0]) == pytest.approx(mean, rel=1e-3, abs=1e-6)
    assert float(parts[0].total[0]) == pytest.approx(float(parts[0].nll[0]) + 2.0 * mean, rel=1e-4)
    assert float(parts[1].neighbour_kl[0]) == 0.0
    assert float((grads[0] - grads[1]).abs().max()) > 0  # the term's own gradient


def test_neighbour_weight_zero_is_the_current_result(toy_models):
    """Off (weight 0, whatever the prompt count) gives the plain objective's result bit for
    bit; on, the optimised vector differs."""
    model = toy_models["llama"]
    prepared = prepare_requests(model, [NB_REQ], TEMPLATES)
    base = dict(num_steps=4, lr=0.5, early_stop_loss=0.0)
    kw = dict(layer=1, hook="resid")
    plain = compute_targets(model, prepared, hp=TargetHparams(**base), **kw)
    zero = compute_targets(model, prepared, hp=TargetHparams(**base, neighbour_prompts=7), **kw)
    on = compute_targets(model, prepared, hp=TargetHparams(**base, neighbour_kl_factor=5.0), **kw)
    assert torch.equal(plain.delta, zero.delta) and plain.nll_after == zero.nll_after
    assert not torch.allclose(plain.delta, on.delta)
