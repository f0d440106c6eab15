"""The objective's vocabulary reads (:mod:`editing.targets.vocab_loss`): the one-sweep path and the
generic one against the losses and gradients written out in float64."""

import pytest
import torch

from editing.targets.vocab_loss import DistRefs, fused_applies, logp_losses, read_losses

N_READS = 7


def _float64_losses(model, states, target, logq, direction):
    """Each read's loss from float64 logits: -log p(target), or the KL against ``logq``."""
    lm = model.unembed.original_component
    x = model.ln_final(states[None])[0].double()
    logits = x @ lm.weight.double().T
    if lm.bias is not None:
        logits = logits + lm.bias.double()
    logp = torch.log_softmax(logits, -1)
    out = []
    k = 0
    for i, t in enumerate(target.tolist()):
        if t >= 0:
            out.append(-logp[i, t])
            continue
        cur, ref = logp[i], logq[k].double()
        k += 1
        if direction == "new_orig":
            out.append((cur.exp() * (cur - ref)).sum())
        else:
            out.append((ref.exp() * (ref - cur)).sum())
    return torch.stack(out)


def _case(model, seed: int):
    """States of ``N_READS`` reads (three of them distribution reads) and the original
    distributions there, from states near them."""
    g = torch.Generator().manual_seed(seed)
    d, vocab = int(model.cfg.d_model), int(model.cfg.d_vocab)
    states = torch.randn(N_READS, d, generator=g) * 2
    target = torch.randint(0, vocab, (N_READS,), generator=g)
    target[[1, 4, 6]] = torch.tensor([-1, -2, -1])
    with torch.no_grad():
        near = states[target < 0] + 0.5 * torch.randn(3, d, generator=g)
        lm = model.unembed.original_component
        logits = model.ln_final(near[None].to(lm.weight.dtype))[0] @ lm.weight.T
        if lm.bias is not None:
            logits = logits + lm.bias
        logq = torch.log_softmax(logits.float(), -1)
    return states, target, logq


@pytest.mark.parametrize("direction", ["orig_new", "new_orig"])
@pytest.mark.parametrize("fused", [True, False])
def test_losses_and_gradients_match_float64(toy_model, direction, fused):
    states, target, logq = _case(toy_model, 0)
    refs = DistRefs.from_logq(toy_model, logq)
    s = states.clone().requires_grad_()
    # rows=64: the 512-word vocabulary of the tiny models in eight slices
    got = read_losses(toy_model, s, target, refs, direction, fused=fused, rows=64)
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(N_READS, generator=g) + 0.5
    (got * weights).sum().backward()
    # the reference: float64 from the final norm's output on (the norm itself in float32)
    s64 = states.double().requires_grad_()
    expected = _float64_losses(toy_model, s64.float(), target, logq, direction)
    (expected * weights.double()).sum().backward()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-5)
    assert float(s.grad.abs().max()) > 0


def test_the_sweep_is_taken_on_every_cpu_architecture(toy_model, monkeypatch):
    """A silent fallback to the generic path fails here: that path is made to raise."""
    states, target, logq = _case(toy_model, 2)
    refs = DistRefs.from_logq(toy_model, logq)
    assert fused_applies(toy_model, states) and refs.mean_w is not None

    def generic(*args, **kwargs):
        raise AssertionError("the generic path ran")

    monkeypatch.setattr("editing.targets.vocab_loss.logp_losses", generic)
    for direction in ("orig_new", "new_orig"):
        assert torch.isfinite(read_losses(toy_model, states, target, refs, direction)).all()


def test_hooks_or_soft_capping_take_the_generic_path(toy_models, monkeypatch):
    model = toy_models["gemma3"]
    states, target, logq = _case(model, 3)
    expected = logp_losses(
        torch.log_softmax(model.unembed(model.ln_final(states[None]))[0].float(), -1),
        target,
        DistRefs(logq),
        "orig_new",
    )
    seen = []
    model.unembed.hook_out.add_hook(lambda x, hook: seen.append(x.shape) or x)
    try:
        assert not fused_applies(model, states)
        refs = DistRefs.from_logq(model, logq)
        assert refs.mean_w is None
        got = read_losses(model, states, target, refs, "orig_new")
    finally:
        model.unembed.hook_out.remove_hooks()
    assert seen  # the hook saw the logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(model.original_model.config, "final_logit_softcapping", 30.0, raising=False)
    assert not fused_applies(model, states)


def test_refs_select_reads_and_losses_select_the_right_refs(toy_models):
    """Indexing references by a mask keeps each read's own q (the objective indexes them by
    the active requests' reads)."""
    model = toy_models["llama"]
    states, target, logq = _case(model, 4)
    refs = DistRefs.from_logq(model, logq)
    keep = torch.tensor([True, False, True])
    sub = refs[keep]
    assert sub.mean_w is not None and refs.mean_w is not None
    torch.testing.assert_close(sub.logq, logq[keep])
    torch.testing.assert_close(sub.mean_w, refs.mean_w[keep])
    rows = torch.tensor([0, 1, 2, 3, 5, 6])  # read 4 (the second distribution read) dropped
    got = read_losses(model, states[rows], target[rows], sub, "orig_new", rows=100)
    full = read_losses(model, states, target, refs, "orig_new", rows=100)
    torch.testing.assert_close(got, full[rows], rtol=1e-6, atol=1e-6)


def test_a_half_precision_unembedding_takes_the_generic_path(toy_dirs):
    """The sweep keeps its sums in float32; a bfloat16 model's reads go the generic way (and
    give finite losses there)."""
    from tracing.models import load_model

    model = load_model(toy_dirs["llama"], dtype="bfloat16")
    states, target, logq = _case(model, 5)
    states = states.to(torch.bfloat16)
    assert not fused_applies(model, states)
    refs = DistRefs.from_logq(model, logq)
    assert refs.mean_w is None
    assert torch.isfinite(read_losses(model, states, target, refs, "orig_new")).all()
