"""UltraEdit: the update against a plain float64 transcription of the paper's equations on
tiny models (keys and value gradients read by PyTorch hooks on the Hugging Face modules,
the lifelong normalisation and the closed form re-derived here), the state carried across
batches, undo / save / load / export, and one-line refusals of bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from editing.api import make_edit
from editing.edits.edit import Edit
from editing.methods import get_method
from editing.methods.ultraedit import STATE_KEY, UltraEditHparams, make_stream_edit
from editing.methods.ultraedit.normaliser import LifelongNormaliser, state_from_dict
from editing.requests import EditRequest
from tracing.errors import InvalidHparams, InvalidInput
from tracing.models import down_proj, target_ids, tokenize

REQS = [
    EditRequest("{} is located in the city of", "The Space Needle", "Paris"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest("{} plays the position of", "Lionel Messi", "goalkeeper in hockey"),
    EditRequest("{} was founded in", "Apple", "Rome"),
    EditRequest("The capital of {} is", "France", "Berlin"),
]
EPS = float(torch.finfo(torch.float32).eps)


def _hf_layers(model):
    hf = model.original_model
    return hf.model.layers


def _rows(model, reqs, layers):
    """Per layer, keys and d(mean CE)/d(down-projection output) at the answer-predicting
    positions, one sequence at a time through the Hugging Face model with torch hooks;
    the mean is over the chunk, so each sequence's gradient is scaled by its share."""
    total = sum(len(target_ids(model, r.target_new)) for r in reqs)
    keys = {L: [] for L in layers}
    grads = {L: [] for L in layers}
    for r in reqs:
        prompt = tokenize(model, r.prompt.format(r.subject))
        tgt = target_ids(model, r.target_new)
        ids = torch.tensor([prompt + tgt[:-1]])
        pos = list(range(len(prompt) - 1, len(prompt) - 1 + len(tgt)))
        store, handles = {}, []
        for L in layers:
            mod = _hf_layers(model)[L].mlp.down_proj

            def hook(m, inp, out, L=L, store=store):  # d loss / d e = d loss / d out
                e = torch.zeros_like(out, requires_grad=True)
                store[L] = (inp[0], e)
                return out + e

            handles.append(mod.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                logits = model.original_model(ids).logits[0]
                loss = F.cross_entropy(logits[pos].double(), torch.tensor(tgt), reduction="sum")
                outs = [store[L][1] for L in layers]
                gs = torch.autograd.grad(loss / total, outs)
        finally:
            for h in handles:
                h.remove()
        for L, g in zip(layers, gs, strict=True):
            keys[L].append(store[L][0][0, pos].double().detach())
            grads[L].append(g[0, pos].double())
    return {L: (torch.cat(keys[L]), torch.cat(grads[L])) for L in layers}


class PlainStats:
    """The official running statistics, one coordinate-vector at a time in float64."""

    def __init__(self, size):
        self.n, self.mean, self.var = 0.0, torch.zeros(size, dtype=torch.float64), None
        self.var = torch.zeros(size, dtype=torch.float64)
        self.std = torch.zeros(size, dtype=torch.float64)

    def update(self, x):
        m = x.shape[0]
        mu = x.sum(0) / m
        # one row: no spread (the official unbiased variance would be NaN)
        unbiased = ((x - mu) ** 2).sum(0) / (m - 1) if m > 1 else torch.zeros_like(mu)
        n = self.n + m
        d = mu - self.mean
        self.mean = self.mean + m * d / n
        self.var = self.var + m * unbiased + self.n * m * d**2 / n
        self.std = torch.sqrt(self.var / (n - 1 + EPS))
        self.n = n


def _plain_batch(model, reqs, layers, stats, lr=1e-6, chunk=10):
    """The paper's update of one batch: chunks longest first, statistics merged chunk by
    chunk and layer by layer, then per layer v = -lr ||k_hat||^2 g_hat and
    Delta = (K^T K + I)^-1 K^T V."""
    lengths = [
        len(tokenize(model, r.prompt.format(r.subject))) + len(target_ids(model, r.target_new)) - 1
        for r in reqs
    ]
    order = sorted(range(len(reqs)), key=lambda i: -lengths[i])
    parts = [order[i : i + chunk] for i in range(0, len(order), chunk)]
    K = {L: [] for L in layers}
    G = {L: [] for L in layers}
    for part in parts:
        got = _rows(model, [reqs[i] for i in part], layers)
        for L in layers:
            stats.update(torch.cat(got[L], dim=1))
            K[L].append(got[L][0])
            G[L].append(got[L][1])
    out = {}
    for L in layers:
        k, g = torch.cat(K[L]), torch.cat(G[L])
        z = (torch.cat([k, g], 1) - stats.mean) / (stats.std + EPS)
        kh, gh = z[:, : k.shape[1]], z[:, k.shape[1] :]
        v = -lr * (kh**2).sum(1, keepdim=True) * gh
        A = k.T @ k + torch.eye(k.shape[1], dtype=torch.float64)
        out[L] = torch.linalg.solve(A, k.T @ v)
    return out


def _close(got, want):
    """Equal up to the float32 rounding of the activations both read (relative to the
    update's size: single entries near zero carry float32 noise of the whole)."""
    assert float(want.norm()) > 0
    assert float((got - want).norm()) <= 1e-5 * float(want.norm())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_two_batches_match_the_papers_equations(toy_models, arch):
    """Two batches of a stream: each layer's update equals the float64 transcription, and
    the second batch (computed on the model with the first applied) starts from the first
    one's normalisation state."""
    model = toy_models[arch]
    layers = [0, 1]
    hp = UltraEditHparams(layers=layers, lr=1e-3, chunk_size=2)
    d = model.cfg.d_mlp + model.cfg.d_model
    plain = PlainStats(d)
    first = make_stream_edit(model, REQS[:3], hp, None)
    want1 = _plain_batch(model, REQS[:3], layers, plain, lr=1e-3, chunk=2)
    for delta in first.deltas:
        _close(delta.matrix(torch.float64), want1[delta.layer])
    with first.applied(model):
        second = make_stream_edit(model, REQS[3:], hp, first.metadata[STATE_KEY])
        want2 = _plain_batch(model, REQS[3:], layers, plain, lr=1e-3, chunk=2)
    for delta in second.deltas:
        _close(delta.matrix(torch.float64), want2[delta.layer])
    (norm,) = state_from_dict(second.metadata[STATE_KEY]).values()
    assert norm.n == plain.n
    torch.testing.assert_close(norm.mean, plain.mean, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(norm.std, plain.std, rtol=1e-4, atol=1e-7)


def test_normaliser_is_the_official_running_rule_and_round_trips_exactly():
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randn(m, 6, generator=gen, dtype=torch.float64) * 3 + 1 for m in (4, 7, 2)]
    mine, plain = LifelongNormaliser.empty(6), PlainStats(6)
    for x in blocks:
        mine.update(x)
        plain.update(x)
    torch.testing.assert_close(mine.mean, plain.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine.var, plain.var, rtol=1e-12, atol=1e-12)
    # with m var_u the pooled spread exceeds the exact sum of squares by sum_b var_u(x_b)
    allx = torch.cat(blocks)
    exact = ((allx - allx.mean(0)) ** 2).sum(0)
    torch.testing.assert_close(mine.var, exact + sum(x.var(0) for x in blocks), rtol=1e-12, atol=0)
    back = LifelongNormaliser.from_dict(json.loads(json.dumps(mine.to_dict())))
    for a, b in [(back.mean, mine.mean), (back.var, mine.var), (back.std, mine.std)]:
        assert torch.equal(a, b)
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(mine(x), (x - plain.mean) / (plain.std + EPS))


def test_undo_save_load_export(toy_models, toy_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    model = toy_models["llama"]
    before = [down_proj(model, L).detach().clone() for L in range(model.cfg.n_layers)]
    edit = make_edit(model, REQS[:2], "ultraedit", {"layers": [0, 1], "lr": 1e-3}, progress=False)
    assert all(
        torch.equal(a, down_proj(model, L)) for L, a in enumerate(before)
    )  # make_edit leaves the model as it was
    edit.apply(model)
    assert not torch.equal(down_proj(model, 1), before[1])
    edit.undo(model)
    assert all(torch.equal(a, down_proj(model, L)) for L, a in enumerate(before))
    edit.save(tmp_path / "e")
    back = Edit.load(tmp_path / "e")
    assert back.method == "ultraedit" and back.metadata[STATE_KEY] == edit.metadata[STATE_KEY]
    for a, b in zip(edit.deltas, back.deltas, strict=True):
        assert torch.equal(a.matrix(), b.matrix())
    folder = edit.export(model, tmp_path / "exported")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    want = before[1] + edit.deltas[1].matrix()
    assert torch.equal(hf.model.layers[1].mlp.down_proj.weight.T, want)
    assert all(torch.equal(a, down_proj(model, L)) for L, a in enumerate(before))


def test_the_given_state_is_not_changed_and_fixes_the_result(toy_models):
    model = toy_models["gpt2"]
    hp = UltraEditHparams(layers=[1], lr=1e-3)
    first = make_stream_edit(model, REQS[:2], hp, None)
    state = first.metadata[STATE_KEY]
    copy = json.loads(json.dumps(state))
    a = make_stream_edit(model, REQS[2:4], hp, state)
    b = make_stream_edit(model, REQS[2:4], hp, copy)
    assert state == copy
    assert torch.equal(a.deltas[0].matrix(), b.deltas[0].matrix())
    fresh = make_stream_edit(model, REQS[2:4], hp, None)
    assert not torch.equal(a.deltas[0].matrix(), fresh.deltas[0].matrix())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lr": -1.0}, "lr must be a finite positive number"),
        ({"ridge": 0.0}, "ridge must be a finite positive number"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"norm_eps": 2.0}, "norm_eps must be below 1"),
        ({"layers": [1, 1]}, "repeated layer"),
        ({"momentum": 1}, "unknown"),
    ],
)
def test_bad_hparams_are_refused_in_one_line(fields, message):
    with pytest.raises(InvalidHparams, match=message) as err:
        UltraEditHparams.from_dict({"layers": [1], **fields})
    assert "\n" not in str(err.value)


def test_bad_state_and_layer_are_refused_with_weights_unchanged(toy_models):
    model = toy_models["gpt2"]
    before = down_proj(model, 1).detach().clone()
    hp = UltraEditHparams(layers=[1])
    with pytest.raises(InvalidInput, match="lifelong normaliser state"):
        make_stream_edit(model, REQS[:2], hp, {"256,64": {"n": 1}})
    with pytest.raises(InvalidInput, match="layer"):
        make_edit(model, REQS[:1], "ultraedit", {"layers": [99]}, progress=False)
    assert torch.equal(down_proj(model, 1), before)


def test_registered_with_published_files():
    spec = get_method("ultraedit")
    assert spec.lifelong and spec.batched and not spec.uses_templates
    gptj = spec.load_hparams("gpt-j-6b")
    assert gptj.layers == list(range(18, 27)) and gptj.lr == 1e-6 and gptj.chunk_size == 10
    assert spec.load_hparams("mistral-7b-v0.3").layers == [29, 30]
