"""make_edit: every method through one call, the model left unchanged, bad input refused with
weights bit-identical, and the ``factscope edit`` command."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from editing.api import make_edit, resolve_hparams
from editing.edits.edit import Edit
from editing.hparams import TargetHparams
from editing.methods.finetune import FTHparams
from editing.methods.memit import MemitHparams
from editing.methods.rome import RomeHparams
from editing.requests import EditRequest
from editing.statistics.stats import layer_second_moments
from factscope.cli import main
from tracing.models import down_proj

TEMPLATES = ["{}", "Because of this. {}"]
GOOD = EditRequest("{} is located in the city of", "The Space Needle", "Paris")
OTHER = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
FAST = TargetHparams(num_steps=2)


@pytest.fixture
def stats(toy_model, tmp_path):
    return layer_second_moments(
        toy_model, [1, 2], n_tokens=1500, seq_len=64, cache_dir=tmp_path, progress=False
    )


def _weights(model) -> list[torch.Tensor]:
    return [down_proj(model, L).detach().clone() for L in range(model.cfg.n_layers)]


def _unchanged(model, before) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))


def _hparams(method: str):
    if method == "rome":
        return RomeHparams(layer=1, target=FAST)
    if method == "memit":
        return MemitHparams(layers=[1, 2], target=FAST, mom2_update_weight=10.0)
    return FTHparams(layers=[1], num_steps=2, batch_size=2)


@pytest.mark.parametrize("method", ["rome", "memit", "ft-l"])
def test_make_edit_leaves_model_unchanged(toy_model, stats, method):
    before = _weights(toy_model)
    edit = make_edit(
        toy_model,
        [GOOD, OTHER],
        method,
        _hparams(method),
        stats=stats,
        context_templates=TEMPLATES,
        progress=False,
    )
    assert isinstance(edit, Edit) and edit.method == method
    assert _unchanged(toy_model, before)
    assert len(edit.requests) == 2
    if method == "rome":  # two sequential rank-one edits of the same layer
        assert [d.layer for d in edit.deltas] == [1, 1]
        assert all(d.rank == 1 for d in edit.deltas)
    with edit.applied(toy_model):
        assert not _unchanged(toy_model, before)
    assert _unchanged(toy_model, before)


def _tokenises_to_nothing(model, monkeypatch):
    tok = model.tokenizer
    real_call = type(tok).__call__

    def call(self, text, *args, **kw):
        if self is tok and isinstance(text, str) and text.strip() == "Nowhere":
            return {"input_ids": []}
        return real_call(self, text, *args, **kw)

    monkeypatch.setattr(type(tok), "__call__", call)


BAD = {
    "subject not in template": (
        [EditRequest("The tower is located in the city of", "The Space Needle", "Paris")],
        {},
        "not in the template",
    ),
    "empty target": ([EditRequest("{} is in", "The Space Needle", "")], {}, "empty target"),
    "target tokenising to nothing": (
        [EditRequest("{} is in", "The Space Needle", "Nowhere")],
        {},
        "tokenises to nothing",
    ),
    "unknown layer": ([GOOD], {"layers": [99]}, "unknown layer 99"),
    "duplicate requests": ([GOOD, GOOD], {}, "duplicates"),
    "conflicting requests": (
        [GOOD, EditRequest(GOOD.template, GOOD.subject, "Rome")],
        {},
        "conflicts",
    ),
    "NaN in statistics": ([GOOD], {"nan_stats": True}, "NaN or inf"),
}


@pytest.mark.parametrize("method", ["rome", "memit"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_and_keeps_weights(toy_models, tmp_path, monkeypatch, method, case):
    model = toy_models["gemma3"]
    requests, opts, message = BAD[case]
    if case == "target tokenising to nothing":
        _tokenises_to_nothing(model, monkeypatch)
    d = model.cfg.d_mlp
    stats = {L: torch.eye(d) for L in (1, 2)}
    if opts.get("nan_stats"):
        stats[1] = stats[1].clone()
        stats[1][3, 5] = float("nan")
    before = _weights(model)
    with pytest.raises(ValueError, match=message):
        make_edit(
            model,
            requests,
            method,
            _hparams(method),
            layers=opts.get("layers"),
            stats=stats,
            context_templates=TEMPLATES,
            progress=False,
        )
    assert _unchanged(model, before)


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_edit_layer_without_a_path_to_the_loss_is_refused(toy_models, monkeypatch, method):
    """At the last layer no attention carries v*/z to the target positions (the gradient is
    zero): refused before statistics or any weight is touched, naming the layers that work."""
    import editing.statistics.keys as keys

    model = toy_models["gpt2"]
    last = model.cfg.n_layers - 1
    monkeypatch.setattr(keys, "layer_second_moments", lambda *a, **k: pytest.fail("stats ran"))
    before = _weights(model)
    with pytest.raises(ValueError, match=rf"no path to the loss.*0\.\.{last - 1}"):
        make_edit(model, [GOOD], method, _hparams(method), layers=[last], progress=False)
    assert _unchanged(model, before)
    hp = _hparams(method)  # an earlier loss layer moves the limit down with it
    hp = dataclasses.replace(hp, target=dataclasses.replace(hp.target, loss_layer=1))
    with pytest.raises(ValueError, match="no path to the loss"):
        make_edit(model, [GOOD], method, hp, layers=[1], progress=False)


def test_edit_for_another_model_is_refused(toy_models):
    gpt2, llama = toy_models["gpt2"], toy_models["llama"]
    d = gpt2.cfg.d_mlp
    edit = make_edit(
        gpt2,
        [GOOD],
        "rome",
        _hparams("rome"),
        stats={1: torch.eye(d)},
        context_templates=TEMPLATES,
        progress=False,
    )
    before = _weights(llama)
    with pytest.raises(ValueError, match="another model"):
        edit.apply(llama)
    assert _unchanged(llama, before)


def test_resolve_hparams(toy_models):
    model = toy_models["gpt2"]
    hp = resolve_hparams(model, "rome", {"layer": 2, "num_steps": 3})
    assert isinstance(hp, RomeHparams) and hp.layer == 2 and hp.target.num_steps == 3
    hp = resolve_hparams(model, "memit", _hparams("memit"), layers=[0, 2])
    assert hp.layers == [0, 2]
    hp = resolve_hparams(model, "ft", _hparams("ft-l"))
    assert hp.mode == "unconstrained"
    with pytest.raises(ValueError, match="exactly one layer"):
        resolve_hparams(model, "rome", _hparams("rome"), layers=[1, 2])
    with pytest.raises(ValueError, match="no layers chosen"):
        resolve_hparams(model, "memit")  # a toy model has no default layers
    with pytest.raises(ValueError, match="unknown editing method"):
        resolve_hparams(model, "grace")
    with pytest.raises(ValueError, match="needs RomeHparams"):
        resolve_hparams(model, "rome", _hparams("memit"))


@pytest.mark.parametrize("layers", ["1-2", "select"])
def test_cli_edit(toy_dirs, tmp_path, monkeypatch, layers, capsys):
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    reqs = tmp_path / "edits.json"
    reqs.write_text(
        json.dumps(
            [
                {
                    "prompt": "{} is located in the city of",
                    "subject": "The Space Needle",
                    "target_new": "Paris",
                },
                {
                    "case_id": 0,
                    "requested_rewrite": {
                        "prompt": "The mother tongue of {} is",
                        "subject": "Danielle Darrieux",
                        "target_new": {"str": "English"},
                        "target_true": {"str": "French"},
                    },
                },
            ]
        )
    )
    hp = MemitHparams(layers=None, target=FAST, mom2_n_tokens=1000, context_templates=[(4, 2)])
    hp_file = tmp_path / "hp.json"
    hp_file.write_text(json.dumps(hp.to_dict()))
    spec = layers
    if layers == "select":
        from tracing.results import LayerSelection

        spec = str(
            LayerSelection([1, 2], 2, "mlp", "last_subject", 0.1, [0.0] * 4, 3).save(
                tmp_path / "select.json"
            )
        )
    out = tmp_path / "my_edit"

    def argv(layer_spec):
        return [
            "edit", "--requests", str(reqs), "--method", "memit", "--layers", layer_spec,
            "--out", str(out), "--model", toy_dirs["gpt2"], "--hparams", str(hp_file),
            "--no-progress",
        ]  # fmt: skip

    assert main(argv(spec)) == 0
    assert "memit edit of 2 request(s), layers [1, 2]" in capsys.readouterr().out
    edit = Edit.load(out)
    assert edit.layers == [1, 2] and len(edit.requests) == 2
    assert main(argv("7")) == 2
    assert "unknown layer 7" in capsys.readouterr().err
