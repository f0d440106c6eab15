"""Parity with the papers' algorithms, against implementations written here from the
equations: plain loops over prompts, float64, a Hugging Face model loaded from the tiny
model's folder, no factscope code.

* v* (ROME's compute_v, at the raw down-projection output) and z (MEMIT's compute_z, at the
  residual stream): the same loss and the same gradient at the same delta;
* MEMIT's per-layer update for the same z: the same delta W (MEMIT's compute_ks averages keys
  per context-template group, then the residual is spread over the remaining layers and
  solved against lambda C + K^T K);
* ROME's rank-one update (in test_rome.py): W' k* = v* and the explicit closed form.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from editing.hparams import TargetHparams
from editing.methods.memit import MemitHparams, layer_updates, memit_solver
from editing.objective import TargetObjective
from editing.prepared import prepare_requests
from editing.requests import EditRequest
from editing.weights import restoring_weights

TEMPLATES = ["{}", "Because of this. {}", "I think that the. {}"]
REQ = EditRequest("{} is located in the city of", "The Space Needle", "Paris")
HP = TargetHparams(weight_decay=0.5, kl_factor=0.0625)  # the reference objective's defaults


# --------------------------------------------------------------------------- reference


def _hf(folder: str) -> tuple[torch.nn.Module, object]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(folder)


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "transformer", None) or model.model
    return inner.h if hasattr(inner, "h") else inner.layers


def _down(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    mlp = _blocks(model)[layer].mlp
    for name in ("c_proj", "fc_out", "down_proj"):
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise AssertionError("no down-projection found")


def _ids_and_last(tok, text: str, subject: str, after: int) -> tuple[list[int], int]:
    """Token ids of ``text`` (the tokenizer's own special tokens) and the index of the last
    token of the first occurrence of ``subject`` at or after character ``after``."""
    enc = tok(text, return_offsets_mapping=True)
    start = text.index(subject, after)
    end = start + len(subject)
    last = max(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start)
    return list(enc["input_ids"]), last


def _run(model, ids, layer, hook, pos, delta):
    """Logits of one sequence with ``delta`` added at ``pos`` to the down-projection output
    (``mlp_raw``) or the block output (``resid``) of ``layer``; also that state before."""
    seen = {}

    def add(_mod, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        seen["state"] = h[0, pos].detach().clone()
        h = h.clone()
        h[0, pos] = h[0, pos] + delta
        return (h, *out[1:]) if isinstance(out, tuple) else h

    module = _down(model, layer) if hook == "mlp_raw" else _blocks(model)[layer]
    handle = module.register_forward_hook(add)
    try:
        logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        handle.remove()
    return logits, seen["state"]


def _reference_loss(model, tok, layer, hook, delta):
    """ROME's compute_v / MEMIT's compute_z loss at ``delta``, one prompt at a time."""
    target = tok(" " + REQ.target_new.strip(), add_special_tokens=False)["input_ids"]
    nll = []
    init = None
    for template in TEMPLATES:
        prefix = template.split("{}")[0]
        text = prefix + REQ.prompt
        ids, last = _ids_and_last(tok, text, REQ.subject, len(prefix))
        logits, state = _run(model, ids + target[:-1], layer, hook, last, delta)
        if init is None:
            init = state  # the bare prompt's state before any change
        logp = torch.log_softmax(logits, -1)
        n = len(ids)
        nll.append(-sum(logp[n - 1 + j, t] for j, t in enumerate(target)) / len(target))
    kl_text = f"{REQ.subject} is a"
    kl_ids, kl_last = _ids_and_last(tok, kl_text, REQ.subject, 0)
    new = torch.log_softmax(_run(model, kl_ids, layer, hook, kl_last, delta)[0][kl_last], -1)
    orig = torch.log_softmax(_run(model, kl_ids, layer, hook, kl_last, 0 * delta)[0][kl_last], -1)
    kl = (new.exp() * (new - orig)).sum()  # KL(p_new || p_orig), as kl_div(p_orig, p_new)
    wd = HP.weight_decay * delta.norm() / init.norm() ** 2
    return sum(nll) / len(nll) + HP.kl_factor * kl + wd, init


def _key(model, layer: int, ids: list[int]) -> torch.Tensor:
    """The down-projection's input (the MLP key) at every position of one sequence."""
    seen = []

    def keep(_mod, inp, _out) -> None:
        seen.append(inp[0][0].detach().clone())

    handle = _down(model, layer).register_forward_hook(keep)
    try:
        model(torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    return seen[0]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("hook", ["mlp_raw", "resid"])
def test_target_loss_and_gradient_match_the_reference(toy_dirs, toy_models, toy_arch, hook):
    model = toy_models[toy_arch]
    hf, tok = _hf(toy_dirs[toy_arch])
    layer = 1
    obj = TargetObjective(model, prepare_requests(model, [REQ], TEMPLATES), layer, hook, HP)
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(obj.init.shape[-1], generator=g, dtype=torch.float64)
    delta64 = (0.5 * obj.init[0].double().norm() * direction / direction.norm()).requires_grad_()
    expected, init = _reference_loss(hf, tok, layer, hook, delta64)
    expected.backward()
    torch.testing.assert_close(obj.init[0].double(), init, rtol=1e-5, atol=1e-5 * init.norm())
    delta = delta64.detach().float()[None].requires_grad_()
    parts = obj.evaluate(delta)
    assert float(parts.total[0]) == pytest.approx(float(expected.detach()), rel=1e-5)
    grad, ref = delta.grad[0].double(), delta64.grad
    assert float((grad - ref).norm() / ref.norm()) < 1e-5


def test_memit_layer_updates_match_the_reference(toy_dirs, toy_models, toy_arch):
    """For the same z and statistics, every layer's delta W equals MEMIT's, computed here in
    float64 with the earlier layers' updates in the weights (norm_aware off: MEMIT as
    published)."""
    model = toy_models[toy_arch]
    hf, tok = _hf(toy_dirs[toy_arch])
    layers, lam = [1, 2], 10.0
    prepared = prepare_requests(model, [REQ], TEMPLATES)
    d_mlp, d_model = int(model.cfg.d_mlp), int(model.cfg.d_model)
    g = torch.Generator().manual_seed(1)
    moms = {}
    for L in layers:
        a = torch.randn(d_mlp, 2 * d_mlp, generator=g, dtype=torch.float64)
        moms[L] = a @ a.T / (2 * d_mlp) + 0.1 * torch.eye(d_mlp, dtype=torch.float64)
    bare_ids, bare_last = _ids_and_last(tok, REQ.prompt, REQ.subject, 0)
    h = _run(hf, bare_ids, layers[-1], "resid", bare_last, torch.zeros(d_model))[1]
    z = h + 0.3 * h.norm() * torch.randn(d_model, generator=g, dtype=torch.float64) / d_model**0.5
    hp = MemitHparams(layers=layers, mom2_update_weight=lam, norm_aware=False)
    with restoring_weights(model, layers, always=True):
        deltas, _, _ = layer_updates(model, prepared, hp, z[None].float(), memit_solver(hp, moms))
    for i, L in enumerate(layers):
        groups = [[TEMPLATES[0]], TEMPLATES[1:]]  # the bare prompt is a group of its own
        group_means = []
        for group in groups:
            ks = []
            for template in group:
                prefix = template.split("{}")[0]
                ids, last = _ids_and_last(tok, prefix + REQ.prompt, REQ.subject, len(prefix))
                ks.append(_key(hf, L, ids)[last])
            group_means.append(torch.stack(ks).mean(0))
        k = torch.stack(group_means).mean(0)[None]  # [1, d_mlp]
        cur = _run(hf, bare_ids, layers[-1], "resid", bare_last, torch.zeros(d_model))[1]
        resid = (z - cur)[None] / (len(layers) - i)
        expected = torch.linalg.solve(lam * moms[L] + k.T @ k, k.T) @ resid  # [d_mlp, d_model]
        got = deltas[i].matrix(torch.float64)
        assert float((got - expected).norm() / expected.norm()) < 1e-5, L
        down = _down(hf, L)  # apply it, in the module's own orientation, before the next layer
        with torch.no_grad():
            down.weight += expected if type(down).__name__ == "Conv1D" else expected.T
