"""The Edit value on every tiny architecture: layout, bit-exact undo, save/load, refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from editing.edits.edit import Edit, LayerDelta
from editing.edits.weights import restoring_weights, weights_snapshot
from editing.requests import EditRequest
from tracing.errors import InvalidInput
from tracing.forward import last_token_logits
from tracing.models import down_proj, fingerprint, model_name

REQ = EditRequest("{} is located in the city of", "The Space Needle", "Paris", "Seattle")


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.original_model.named_parameters()}


def _assert_params_equal(model, saved: dict[str, torch.Tensor]) -> None:
    now = dict(model.original_model.named_parameters())
    assert now.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(now[name], value), f"{name} changed"


def _hf_down_proj(model, layer: int) -> torch.nn.Module:
    """The HF down-projection module, found by architecture (independently of down_proj)."""
    hf = model.original_model
    arch = type(hf).__name__
    if arch.startswith("GPT2"):
        module = hf.transformer.h[layer].mlp.c_proj
    elif arch.startswith("GPTJ"):
        module = hf.transformer.h[layer].mlp.fc_out
    else:
        module = hf.model.layers[layer].mlp.down_proj
    return getattr(module, "original_component", module)  # the bridge wraps HF modules


def _edit(model, layers=(1, 2), rank: int = 2, seed: int = 0, scale: float = 0.1) -> Edit:
    g = torch.Generator().manual_seed(seed)
    d_mlp, d_model = model.cfg.d_mlp, model.cfg.d_model
    deltas = []
    for i, L in enumerate(layers):
        if rank and i % 2 == 0:
            left = torch.randn(d_mlp, rank, generator=g) * scale
            deltas.append(LayerDelta(L, left=left, right=torch.randn(rank, d_model, generator=g)))
        else:
            deltas.append(LayerDelta(L, dense=torch.randn(d_mlp, d_model, generator=g) * scale))
    return Edit(
        deltas=deltas,
        method="test",
        requests=[REQ],
        hparams={"layers": list(layers)},
        model_fingerprint=fingerprint(model),
        model_name=model_name(model),
        metadata={"seed": seed},
    )


def test_apply_edits_the_right_weights_in_each_layout(toy_model):
    edit = _edit(toy_model, layers=(1, 2))
    before = weights_snapshot(toy_model, [1, 2])
    params = _params(toy_model)
    with edit.applied(toy_model):
        assert edit.is_applied
        for d in edit.deltas:
            expected = before[d.layer] + d.matrix()
            assert torch.equal(down_proj(toy_model, d.layer), expected)
            module = _hf_down_proj(toy_model, d.layer)
            if type(module).__name__ == "Conv1D":  # GPT-2 stores [d_mlp, d_model]
                assert torch.equal(module.weight, expected)
            else:  # Linear stores [d_model, d_mlp]
                assert torch.equal(module.weight, expected.T)
        changed = {
            n
            for n, p in toy_model.original_model.named_parameters()
            if not torch.equal(p, params[n])
        }
        assert len(changed) == 2 and all("proj" in n or "fc_out" in n for n in changed)
    assert not edit.is_applied
    _assert_params_equal(toy_model, params)


def test_undo_is_bit_exact_after_many_and_in_a_stack(toy_model):
    params = _params(toy_model)
    for seed in range(5):  # one after another
        e = _edit(toy_model, layers=(seed % 4, (seed + 1) % 4), seed=seed, scale=3.0)
        e.apply(toy_model)
        e.undo(toy_model)
        _assert_params_equal(toy_model, params)
    stack = [_edit(toy_model, layers=(1, 2), seed=s, scale=1.7) for s in range(4)]
    for e in stack:
        e.apply(toy_model)
    with pytest.raises(ValueError, match="reverse order"):
        stack[1].undo(toy_model)
    for e in reversed(stack):
        e.undo(toy_model)
    _assert_params_equal(toy_model, params)
    # edits of disjoint layers may be undone in any order
    a, b = _edit(toy_model, layers=(0,)), _edit(toy_model, layers=(3,), seed=1)
    a.apply(toy_model)
    b.apply(toy_model)
    a.undo(toy_model)
    b.undo(toy_model)
    _assert_params_equal(toy_model, params)


def test_save_load_apply_gives_identical_weights(toy_model, tmp_path):
    edit = _edit(toy_model, layers=(0, 1, 3), rank=3)
    with edit.applied(toy_model):
        after = _params(toy_model)
    folder = edit.save(tmp_path / "my_edit")
    loaded = Edit.load(folder)
    assert loaded.method == "test" and loaded.requests == [REQ]
    assert loaded.hparams == {"layers": [0, 1, 3]} and loaded.metadata == {"seed": 0}
    assert [d.rank for d in loaded.deltas] == [3, None, 3]
    with loaded.applied(toy_model):
        _assert_params_equal(toy_model, after)
    stored = load_file(str(folder / "deltas.safetensors"))
    d_mlp, d_model = toy_model.cfg.d_mlp, toy_model.cfg.d_model
    assert stored["0.left"].shape == (d_mlp, 3) and stored["0.right"].shape == (3, d_model)
    assert "0.dense" not in stored and stored["1.dense"].shape == (d_mlp, d_model)


def test_refuses_another_model_and_leaves_weights(toy_models, tmp_path):
    edit = _edit(toy_models["gpt2"])
    target = toy_models["llama"]
    params = _params(target)
    folder = edit.save(tmp_path / "e")
    for e in (edit, Edit.load(folder)):
        with pytest.raises(ValueError, match="made for model .*fingerprint.*refusing"):
            e.apply(target)
        assert not e.is_applied
    _assert_params_equal(target, params)


def test_refuses_nan_and_bad_shapes_before_touching_weights(toy_model):
    params = _params(toy_model)
    for bad_value in (float("nan"), float("inf")):
        edit = _edit(toy_model, layers=(1, 2), rank=0)
        edit.deltas[1].dense[5, 7] = bad_value
        with pytest.raises(ValueError, match=r"delta 1 \(layer 2\) contains NaN or inf"):
            edit.apply(toy_model)
        assert not edit.is_applied
        _assert_params_equal(toy_model, params)
    wrong = _edit(toy_model, layers=(1,))
    wrong.deltas.append(LayerDelta(2, dense=torch.ones(3, 4)))
    with pytest.raises(ValueError, match=r"delta 1 \(layer 2\) has shape \(3, 4\)"):
        wrong.apply(toy_model)
    unknown = _edit(toy_model, layers=(1, 9))
    with pytest.raises(ValueError, match="unknown layer 9"):
        unknown.apply(toy_model)
    _assert_params_equal(toy_model, params)


def test_failure_while_adding_restores_every_layer(toy_model):
    """Layers 1 and 2 are already changed when a later delta overflows: all is put back."""
    params = _params(toy_model)
    edit = _edit(toy_model, layers=(1, 2, 2), rank=0)
    for d in edit.deltas[1:]:  # each finite, but the second addition overflows float32
        d.dense.fill_(3.0e38)
    with pytest.raises(ValueError, match="layer 2: adding the delta made weights NaN or inf"):
        edit.apply(toy_model)
    assert not edit.is_applied
    _assert_params_equal(toy_model, params)


def test_apply_twice_and_undo_errors(toy_model):
    edit = _edit(toy_model)
    with pytest.raises(ValueError, match="not applied"):
        edit.undo(toy_model)
    edit.apply(toy_model)
    try:
        with pytest.raises(ValueError, match="already applied"):
            edit.apply(toy_model)
    finally:
        edit.undo(toy_model)


def test_applied_context_undoes_on_exception(toy_model):
    params = _params(toy_model)
    edit = _edit(toy_model)
    with pytest.raises(KeyError):
        with edit.applied(toy_model):
            raise KeyError("boom")
    assert not edit.is_applied
    _assert_params_equal(toy_model, params)


def test_restoring_weights_and_from_weights(toy_model):
    params = _params(toy_model)
    with pytest.raises(RuntimeError):
        with restoring_weights(toy_model, [0, 2]):
            down_proj(toy_model, 0).add_(1.0)
            down_proj(toy_model, 2).mul_(2.0)
            raise RuntimeError("method failed half-way")
    _assert_params_equal(toy_model, params)
    with restoring_weights(toy_model, [1], always=True) as before:
        down_proj(toy_model, 1).add_(0.25)
        after = down_proj(toy_model, 1).clone()
        edit = Edit.from_weights(toy_model, before, "ft", [REQ], {"lr": 1e-3})
    _assert_params_equal(toy_model, params)
    assert edit.deltas[0].rank is None and edit.layers == [1]
    with edit.applied(toy_model):
        assert torch.allclose(down_proj(toy_model, 1), after, atol=1e-6, rtol=0)
    _assert_params_equal(toy_model, params)
    with restoring_weights(toy_model, [3]) as snap:  # no exception: changes are kept
        down_proj(toy_model, 3).add_(1.0)
    assert torch.equal(down_proj(toy_model, 3), snap[3] + 1.0)
    down_proj(toy_model, 3).copy_(snap[3])
    _assert_params_equal(toy_model, params)


def test_combine_and_low_rank_matrix():
    left, right = torch.randn(6, 1, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    d = LayerDelta(2, left=left[:, 0], right=right[0])  # vectors mean rank one
    assert d.rank == 1 and d.shape == (6, 4)
    assert d.matrix().dtype == torch.float32
    assert torch.equal(d.matrix(), (left @ right).float())
    a = Edit([d], "rome", [REQ], {}, "fp", "m")
    b = Edit([LayerDelta(2, dense=torch.zeros(6, 4))], "rome", [REQ], {}, "fp", "m")
    both = Edit.combine([a, b])
    assert len(both.deltas) == 2 and both.layers == [2] and len(both.requests) == 2
    with pytest.raises(ValueError, match="different models"):
        Edit.combine([a, Edit([d], "rome", [REQ], {}, "other", "m")])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "either both left and right"),
        (dict(left=torch.ones(3, 1)), "either both left and right"),
        (dict(left=torch.ones(3, 1), right=torch.ones(1, 2), dense=torch.ones(3, 2)), "either"),
        (dict(left=torch.ones(3, 2), right=torch.ones(1, 2)), "do not multiply"),
        (dict(dense=torch.ones(3)), "must be a matrix"),
    ],
)
def test_layer_delta_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerDelta(0, **kwargs)


def test_edit_validation_and_load_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        Edit([], "rome", [], {}, "fp", "m")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        Edit([LayerDelta(0, dense=torch.ones(2, 2))], "rome", [], {"x": object()}, "fp", "m")
    with pytest.raises(InvalidInput, match="not a saved edit"):
        Edit.load(tmp_path)


def test_export_loads_without_factscope_and_keeps_the_edit(toy_dirs, toy_models, tmp_path):
    """An exported folder is a plain Hugging Face model: transformers alone loads it, its
    down-projection is the edited one and its next-token logits are the edited bridge's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editing.api import make_edit
    from editing.hparams import TargetHparams
    from editing.methods.rome import RomeHparams

    model = toy_models["llama"]
    req = EditRequest("{} is located in the city of", "The Space Needle", "Paris")
    hp = RomeHparams(layer=1, target=TargetHparams(num_steps=3, lr=0.5))
    d = model.cfg.d_mlp
    edit = make_edit(model, req, "rome", hp, stats={1: torch.eye(d)}, context_templates=["{}"])
    before = down_proj(model, 1).clone()
    folder = edit.export(model, tmp_path / "exported")
    assert torch.equal(down_proj(model, 1), before)  # the model is left as it was
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert torch.equal(hf.model.layers[1].mlp.down_proj.weight.T, before + edit.deltas[0].matrix())
    prompt = req.prompt.format(req.subject)
    with torch.no_grad():
        mine = hf(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
    with edit.applied(model):
        theirs = last_token_logits(model, [prompt])[0]
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInput, match="exists and is not empty"):
        edit.export(model, folder)


@pytest.mark.model
def test_export_of_the_embedded_model_predicts_the_edited_fact(gemma, tmp_path):
    """The embedded model is dequantised from GGUF; its export is an ordinary Hugging Face
    folder in which transformers alone predicts the edited fact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editing.api import make_edit
    from editing.methods.finetune import FTHparams

    req = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
    hp = FTHparams(layers=[3], lr=5e-3, num_steps=10, mode="unconstrained", norm_constraint=None)
    edit = make_edit(gemma, req, "ft", hp, progress=False)
    folder = edit.export(gemma, tmp_path / "gemma_edited")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(req.prompt.format(req.subject), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = int(hf(ids).logits[0, -1].argmax())
    assert tok.decode(top) == " English"
    with edit.applied(gemma):
        assert top == int(last_token_logits(gemma, [ids[0].tolist()])[0].argmax())


def test_parameter_deltas_and_version_1_files(toy_models, tmp_path):
    """Deltas of any block tensor (a norm vector, an attention matrix) apply, undo bit for
    bit and round-trip; a version-1 file (down-projections only) still loads; an unknown
    version or parameter is refused with one line, weights unchanged."""
    import json

    from editing.params import block_parameters

    model = toy_models["gemma3"]
    params = _params(model)
    block = block_parameters(model, 2, "block")
    norm = next(n for n in block if n.endswith("post_feedforward_layernorm.weight"))
    attn = next(n for n in block if n.endswith("q_proj.weight"))
    deltas = [
        LayerDelta(2, dense=torch.full(block[norm].shape, 0.25), param=norm),
        LayerDelta(2, dense=torch.full(block[attn].shape, -0.5), param=attn),
        LayerDelta(1, dense=torch.ones(model.cfg.d_mlp, model.cfg.d_model)),
    ]
    edit = Edit(deltas, "test", [REQ], {}, fingerprint(model), model_name(model))
    assert edit.parameters == [norm, attn, "blocks.1.down_proj"]
    with edit.applied(model):
        assert torch.equal(block[norm].detach(), params_value(params, model, block[norm]) + 0.25)
        assert torch.equal(block[attn].detach(), params_value(params, model, block[attn]) - 0.5)
    _assert_params_equal(model, params)
    loaded = Edit.load(edit.save(tmp_path / "v2"))
    assert [d.param for d in loaded.deltas] == [norm, attn, None]
    assert json.loads((tmp_path / "v2" / "edit.json").read_text())["version"] == 2
    # a version-1 file: the same layout without "param" (down-projection deltas only)
    v1 = Edit(deltas[2:], "test", [REQ], {}, fingerprint(model), model_name(model))
    folder = v1.save(tmp_path / "v1")
    info = json.loads((folder / "edit.json").read_text())
    (folder / "edit.json").write_text(json.dumps({**info, "version": 1}))
    old = Edit.load(folder)
    assert old.deltas[0].param is None and torch.equal(old.deltas[0].dense, deltas[2].dense)
    (folder / "edit.json").write_text(json.dumps({**info, "version": 3}))
    with pytest.raises(InvalidInput, match="readable version"):
        Edit.load(folder)
    # refusals before any change
    wrong = Edit(
        [LayerDelta(2, dense=torch.ones(3), param=norm)], "t", [], {}, fingerprint(model), "m"
    )
    with pytest.raises(InvalidInput, match=r"has shape \(3,\)"):
        wrong.apply(model)
    missing = Edit(
        [LayerDelta(2, dense=torch.ones(3), param="blocks.2.nope.weight")],
        "t",
        [],
        {},
        fingerprint(model),
        "m",
    )
    with pytest.raises(InvalidInput, match="no parameter 'blocks.2.nope.weight'"):
        missing.apply(model)
    _assert_params_equal(model, params)
    with pytest.raises(InvalidInput, match="must have layer 2"):
        LayerDelta(1, dense=torch.ones(3), param=norm)
    with pytest.raises(InvalidInput, match="one dense tensor"):
        LayerDelta(2, left=torch.ones(3), right=torch.ones(3), param=norm)
    with pytest.raises(InvalidInput, match="not a block parameter name"):
        LayerDelta(2, dense=torch.ones(3), param="model.norm.weight")


def params_value(params: dict[str, torch.Tensor], model, tensor: torch.Tensor) -> torch.Tensor:
    """The saved value of ``tensor`` in a named-parameter snapshot (matched by identity)."""
    for name, p in model.original_model.named_parameters():
        if p is tensor:
            return params[name]
    raise AssertionError("tensor not found")
