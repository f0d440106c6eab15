"""Parity with the papers' algorithms, against implementations written here from the
equations: plain loops over prompts, float64, a Hugging Face model loaded from the tiny
model's folder, no factscope code.

* v* (ROME's compute_v, at the raw down-projection output) and z (MEMIT's compute_z, at the
  residual stream): the same loss and the same gradient at the same delta;
* MEMIT's per-layer update for the same z: the same delta W (MEMIT's compute_ks averages keys
  per context-template group, then the residual is spread over the remaining layers and
  solved against lambda C + K^T K);
* ROME's rank-one update (in test_rome.py): W' k* = v* and the explicit closed form.

Every architecture is checked: the four shared tiny models and the seven further families
(Qwen2, Qwen3, Mistral, Phi-3, GPT-NeoX, OLMo-2, Gemma 2), each built once for this module.
For the families with a norm between the down-projection and the residual add (OLMo-2,
Gemma 2, Gemma 3) the norm-aware spreading is checked too: the reference maps the residual
back through the Hugging Face norm module's own gain in float64.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from editing.edits.weights import restoring_weights
from editing.hparams import TargetHparams
from editing.methods.memit import MemitHparams, layer_updates, memit_solver
from editing.requests import EditRequest
from editing.requests.prepared import prepare_requests
from editing.targets.objective import TargetObjective
from tracing.models import load_model
from tracing.toy_models import ARCHS, FAMILIES, build_toy_model

TEMPLATES = ["{}", "Because of this. {}", "I think that the. {}"]
REQ = EditRequest("{} is located in the city of", "The Space Needle", "Paris")
HP = TargetHparams(weight_decay=0.5, kl_factor=0.0625)  # the reference objective's defaults


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, tuple[str, object]]:
    """Folder and loaded bridge of each further family's tiny model (built once here)."""
    root = tmp_path_factory.mktemp("parity_families")
    folders = {arch: str(build_toy_model(arch, root / arch)) for arch in FAMILIES}
    return {arch: (folder, load_model(folder)) for arch, folder in folders.items()}


#: The architectures with an RMSNorm between the down-projection and the residual add.
POST_NORM = ("gemma3", "olmo2", "gemma2")


@pytest.fixture
def arch_model(request, toy_dirs, toy_models) -> tuple[str, str, object]:
    """(architecture, folder, bridge) of the tiny model named by the test's ``arch``."""
    arch = request.node.callspec.params["arch"]
    if arch in FAMILIES:
        folder, model = request.getfixturevalue("family_models")[arch]
        return arch, folder, model
    return arch, toy_dirs[arch], toy_models[arch]


# --------------------------------------------------------------------------- reference


def _hf(folder: str) -> tuple[torch.nn.Module, object]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(folder)


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "transformer", None) or getattr(model, "gpt_neox", None) or model.model
    return inner.h if hasattr(inner, "h") else inner.layers


def _down(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    mlp = _blocks(model)[layer].mlp
    for name in ("c_proj", "fc_out", "down_proj", "dense_4h_to_h"):
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


def _post_norm_gain(model, layer: int) -> torch.Tensor | None:
    """The per-coordinate gain of the RMSNorm after the down-projection (OLMo-2: ``w``;
    Gemma 2 and 3 store ``w - 1``: ``1 + w``), or None where the MLP output is added as is."""
    block = _blocks(model)[layer]
    norm = getattr(block, "post_feedforward_layernorm", None)
    if norm is None:
        return None
    w = norm.weight.detach().double()
    return 1 + w if "Gemma" in type(norm).__name__ else w


def _norm_aware_target(y, m, resid, gain) -> torch.Tensor:
    """The change of the raw down-projection output ``y`` that turns the normed output
    ``m = g y / rms(y)`` into the direction of ``m + resid`` at ``y``'s own scale."""
    rms = lambda x: x.pow(2).mean(-1, keepdim=True).sqrt()  # noqa: E731
    pre = (m + resid) / gain
    return pre / rms(pre) * rms(y) - y


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


@pytest.mark.parametrize("arch", ARCHS + FAMILIES)
@pytest.mark.parametrize("hook", ["mlp_raw", "resid"])
def test_target_loss_and_gradient_match_the_reference(arch, arch_model, hook):
    _, folder, model = arch_model
    hf, tok = _hf(folder)
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


@pytest.mark.parametrize(
    "arch, norm_aware",
    [(a, False) for a in ARCHS + FAMILIES] + [(a, True) for a in POST_NORM],
)
def test_memit_layer_updates_match_the_reference(arch, arch_model, norm_aware):
    """For the same z and statistics, every layer's delta W equals MEMIT's, computed here in
    float64 with the earlier layers' updates in the weights: norm_aware off is MEMIT as
    published; on, a model with a post-MLP norm gets the residual mapped back through it
    (the others' updates are the published ones)."""
    _, folder, model = arch_model
    hf, tok = _hf(folder)
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
    hp = MemitHparams(layers=layers, mom2_update_weight=lam, norm_aware=norm_aware)
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
        gain = _post_norm_gain(hf, L) if norm_aware else None
        if gain is not None:  # the wanted change of y, through the norm at the bare prompt
            y = _run(hf, bare_ids, L, "mlp_raw", bare_last, torch.zeros(d_model))[1][None]
            m = _blocks(hf)[L].post_feedforward_layernorm(y)
            resid = _norm_aware_target(y, m, resid, gain)
        expected = torch.linalg.solve(lam * moms[L] + k.T @ k, k.T) @ resid  # [d_mlp, d_model]
        got = deltas[i].matrix(torch.float64)
        assert float((got - expected).norm() / expected.norm()) < 1e-5, L
        down = _down(hf, L)  # apply it, in the module's own orientation, before the next layer
        with torch.no_grad():
            down.weight += expected if type(down).__name__ == "Conv1D" else expected.T
