"""Hyper-parameters: shipped defaults, published numbers, overrides, round trips, errors."""

from __future__ import annotations

import json
import logging

import pytest

from editing.hparams import TargetHparams, defaults_dir
from editing.methods import load_hparams
from editing.methods.finetune import FTHparams
from editing.methods.memit import MemitHparams
from editing.methods.rome import RomeHparams
from tracing.errors import InvalidInput


def test_every_default_file_loads_round_trips_and_documents_its_source():
    files = sorted(defaults_dir().glob("*.json"))
    names = {p.stem for p in files}
    for method in ("rome", "memit", "ft", "alphaedit"):
        for model in ("gemma-3-270m", "gpt2-xl", "gpt-j-6b", "default"):
            assert f"{method}_{model}" in names
    assert "alphaedit_meta-llama-3-8b" in names
    for path in files:
        raw = json.loads(path.read_text())
        assert len(raw.get("_source", "")) > 40, f"{path.name} lacks a _source"
        method = path.stem.split("_")[0]
        hp = load_hparams({"ft": "ft-l"}.get(method, method), path=path)
        assert type(hp).from_dict(hp.to_dict()) == hp
        assert json.loads(json.dumps(hp.to_dict())) == hp.to_dict()


def test_published_rome_and_memit_numbers():
    r = load_hparams("rome", "gpt2-xl")
    assert isinstance(r, RomeHparams) and r.layer == 17
    t = r.target
    assert (t.num_steps, t.lr, t.loss_layer, t.weight_decay) == (20, 0.5, 47, 0.5)
    assert (t.clamp_norm_factor, t.kl_factor) == (4.0, 0.0625)
    assert load_hparams("rome", "EleutherAI/gpt-j-6B").layer == 5
    m = load_hparams("memit", "EleutherAI/gpt-j-6B")
    assert isinstance(m, MemitHparams) and m.layers == [3, 4, 5, 6, 7, 8]
    assert (m.target.num_steps, m.target.clamp_norm_factor, m.mom2_update_weight) == (
        25,
        0.75,
        15000.0,
    )
    x = load_hparams("memit", "/models/gpt2-xl/")
    assert x.layers == [13, 14, 15, 16, 17] and x.target.loss_layer == 47
    assert x.mom2_update_weight == 20000.0
    g = load_hparams("rome", "gemma-3-270m")
    assert g.layer == 2 and g.target.loss_layer == -1 and g.target.early_stop_loss == 0.1
    gm = load_hparams("memit", "gemma-3-270m")
    assert gm.layers == [2, 3, 4, 5, 6] and gm.norm_aware and gm.mom2_update_weight == 1500.0


def test_ft_method_names_set_the_mode():
    assert load_hparams("ft-l", "gpt2-xl").mode == "constrained"
    assert load_hparams("ft-l", "gpt2-xl").norm_constraint == 5e-4
    assert load_hparams("ft-l", "gpt-j-6b").norm_constraint == 5e-5
    ft = load_hparams("ft", "gemma-3-270m")
    assert isinstance(ft, FTHparams) and ft.mode == "unconstrained" and ft.norm_constraint is None
    mixed = load_hparams("mixed", "gemma-3-270m", norm_constraint=1e-3)
    assert mixed.mode == "mixed" and mixed.norm_constraint == 1e-3
    assert load_hparams("ft", "gemma-3-270m", mode="constrained", norm_constraint=1e-4).mode == (
        "constrained"
    )


def test_unknown_model_falls_back_with_a_note(caplog):
    with caplog.at_level(logging.INFO, logger="editing.hparams"):
        hp = load_hparams("rome", "some-new-model")
    assert hp.layer is None and hp.layers == []
    assert "no rome defaults" in caplog.text
    assert load_hparams("memit", "nope", layers=[1, 2]).layers == [1, 2]


def test_overrides_top_level_and_target():
    hp = load_hparams("rome", "gemma-3-270m", kl_factor=0.5, layer=6, mom2_dtype="float64")
    assert hp.target.kl_factor == 0.5 and hp.layer == 6 and hp.mom2_dtype == "float64"
    assert hp.target.num_steps == 20  # the rest of target kept
    assert load_hparams("rome", "gemma-3-270m", layers=[7]).layer == 7
    with pytest.raises(ValueError, match="ROME edits one layer"):
        load_hparams("rome", "gemma-3-270m", layers=[3, 4])
    m = load_hparams("memit", "gemma-3-270m", layers=[5, 3, 4], lr=2.0)
    assert m.layers == [3, 4, 5] and m.target.lr == 2.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(colour="red"), r"unknown rome hyper-parameter\(s\) \['colour'\]"),
        (dict(lr=-1.0), "lr must be a finite positive"),
        (dict(mom2_dtype="float16"), "mom2_dtype"),
        (dict(layer=-2), "not a layer index"),
        (dict(num_steps=2.5), "num_steps must be an integer"),
        (dict(context_templates=[[0, 3]]), "context_templates"),
    ],
)
def test_bad_overrides(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_hparams("rome", "gemma-3-270m", **kwargs)


def test_bad_files_and_methods(tmp_path):
    with pytest.raises(ValueError, match="unknown editing method"):
        load_hparams("rome2")
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"layers": [1], "target": {"lr": 1, "momentum": 0.9}}))
    with pytest.raises(ValueError, match=r"x.json: unknown TargetHparams .*\['momentum'\]"):
        load_hparams("memit", path=bad)
    bad.write_text(json.dumps({"layers": [1], "wobble": 1, "_note": "comments are fine"}))
    with pytest.raises(ValueError, match=r"\['wobble'\]"):
        load_hparams("memit", path=bad)
    bad.write_text(json.dumps({"layers": [1], "mode": "constrained", "norm_constraint": None}))
    with pytest.raises(ValueError, match="needs a norm_constraint"):
        load_hparams("ft-l", path=bad)
    with pytest.raises(InvalidInput):
        load_hparams("rome", path=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="repeated layer"):
        MemitHparams(layers=[1, 1])


def test_gemma_whole_block_fine_tuning_takes_the_study_choice():
    plain = load_hparams("ft-l", "gemma-3-270m")
    assert (plain.params, plain.layers, plain.norm_constraint) == ("down_proj", [1], 2e-4)
    block = load_hparams("ft-l", "gemma-3-270m", params="block")
    assert (block.layers, block.norm_constraint, block.lr, block.num_steps) == ([2], 1e-3, 1e-3, 10)
    assert load_hparams("ft-l", "gemma-3-270m", params="block", constraint="fisher").uses_fisher
    assert load_hparams("ft-l", "gemma-3-270m", params="mlp").layers == [1]


def test_variants_hold_only_when_their_field_has_the_value(tmp_path):
    path = tmp_path / "ft.json"
    path.write_text(
        json.dumps(
            {
                "layers": [1],
                "norm_constraint": 2e-4,
                "params": "down_proj",
                "variants": {"params=block": {"layers": [2], "norm_constraint": 1e-3}},
            }
        )
    )
    plain = load_hparams("ft-l", path=path)
    assert plain.layers == [1] and plain.norm_constraint == 2e-4
    block = load_hparams("ft-l", path=path, params="block")
    assert block.layers == [2] and block.norm_constraint == 1e-3
    # the caller's overrides beat the variant; what the name fixes beats it too (ft: no bound)
    assert load_hparams("ft-l", path=path, params="block", layers=[5]).layers == [5]
    assert load_hparams("ft", path=path, params="block").norm_constraint is None
    for variants, message in (
        ({"params": {}}, "must be 'field=value'"),
        ({"colour=red": {}}, "must be 'field=value'"),
        ({"params=block": [2]}, "must be 'field=value'"),
        ([1], "variants must be an object"),
        ({"params=block": {"wobble": 1}}, r"\['wobble'\]"),
    ):
        path.write_text(json.dumps({"layers": [1], "variants": variants}))
        with pytest.raises(ValueError, match=message):
            load_hparams("ft-l", path=path, params="block")


def test_dataclass_round_trip_in_code():
    hp = MemitHparams(layers=[2, 3], target=TargetHparams(lr=0.1), context_templates=[(4, 2)])
    d = hp.to_dict()
    assert d["context_templates"] == [[4, 2]] and d["target"]["lr"] == 0.1
    assert MemitHparams.from_dict(d) == hp


def test_parse_layers():
    from tracing.layers import parse_layers

    assert parse_layers("3-8") == [3, 4, 5, 6, 7, 8]
    assert parse_layers("3,5,7") == [3, 5, 7]
    assert parse_layers("4") == [4]
    assert parse_layers(" 7, 2-4 ,3") == [2, 3, 4, 7]
    for bad in ("", "a", "3-", "5-2", "-1", "1,,2", "2.5"):
        with pytest.raises(ValueError):
            parse_layers(bad)


def _config_folder(tmp_path, name: str, **config) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


LLAMA3 = dict(
    architectures=["LlamaForCausalLM"],
    num_hidden_layers=32,
    hidden_size=4096,
    vocab_size=128256,
    max_position_embeddings=8192,
)
QWEN25 = dict(architectures=["Qwen2ForCausalLM"], num_hidden_layers=28, hidden_size=3584)


def test_published_numbers_of_the_7b_and_8b_models_by_name():
    r = load_hparams("rome", "meta-llama/Meta-Llama-3-8B-Instruct")
    assert r.layer == 5 and not r.mom2_adjustment
    assert (r.target.num_steps, r.target.lr, r.target.loss_layer) == (25, 0.5, 31)
    assert (r.target.weight_decay, r.target.clamp_norm_factor) == (1e-3, 4.0)
    m = load_hparams("memit", "/models/Llama-3-8B/")  # another spelling of the name
    assert m.layers == [4, 5, 6, 7, 8] and m.target.lr == 0.1 and m.mom2_update_weight == 15000
    assert m.target.clamp_norm_factor == 0.75 and m.target.weight_decay == 0.5
    a = load_hparams("alphaedit", "meta-llama/Meta-Llama-3-8B-Instruct")
    assert a.l2_weight == 10.0 and a.nullspace_threshold == 0.02 and a.layers == [4, 5, 6, 7, 8]
    q = load_hparams("memit", "Qwen/Qwen2.5-7B")
    assert q.layers == [4, 5, 6, 7, 8] and q.target.loss_layer == 27
    assert (q.target.lr, q.target.clamp_norm_factor, q.target.weight_decay) == (0.5, 4.0, 1e-3)
    assert load_hparams("alphaedit", "Qwen/Qwen2.5-7B-Instruct").l2_weight == 1.0
    assert load_hparams("rome", "mistralai/Mistral-7B-v0.3").target.loss_layer == 31
    assert load_hparams("memit", "mistralai/Mistral-7B-v0.3").layers == [4, 5, 6, 7, 8]
    assert not load_hparams("alphaedit", "mistralai/Mistral-7B-v0.3").layers  # none published


def test_a_folder_is_recognised_by_its_config(tmp_path, caplog):
    """A folder whose name says nothing gets its model's files from its config.json: the
    base and instruct Llama 3 differ in the eos id, Qwen2.5's in the eos id and context."""
    inst = _config_folder(tmp_path, "ckpt", **LLAMA3, eos_token_id=128009)
    base = _config_folder(tmp_path, "ckpt2", **LLAMA3, eos_token_id=128001)
    with caplog.at_level(logging.INFO, logger="editing.hparams"):
        assert load_hparams("alphaedit", inst).l2_weight == 10.0
        assert load_hparams("rome", base).layer == 5
    assert "alphaedit_meta-llama-3-8b-instruct.json" in caplog.text
    assert "rome_meta-llama-3-8b.json" in caplog.text
    qwen = _config_folder(
        tmp_path, "q", **QWEN25, vocab_size=152064, max_position_embeddings=32768,
        eos_token_id=151645,
    )  # fmt: skip
    assert load_hparams("alphaedit", qwen).l2_weight == 1.0
    llama31 = _config_folder(  # Llama 3.1: a longer context, no published files here
        tmp_path, "l31", **{**LLAMA3, "max_position_embeddings": 131072}, eos_token_id=128001
    )
    assert not load_hparams("memit", llama31).layers
    assert not load_hparams("memit", str(tmp_path / "missing")).layers


def test_rome_without_mom2_adjustment_updates_along_the_key(toy_models):
    """mom2_adjustment false (the published Llama-3, Qwen2.5, Mistral ROME files): C = I, so
    the update's left vector is k* itself, and no statistics are collected."""
    import torch

    from editing.api import make_edit
    from editing.requests import EditRequest
    from editing.requests.prepared import prepare_requests
    from editing.statistics.keys import subject_keys

    model = toy_models["llama"]
    req = EditRequest("{} is located in the city of", "The Space Needle", "Paris")
    hp = RomeHparams(layer=1, target=TargetHparams(num_steps=2), mom2_adjustment=False)
    edit = make_edit(model, req, "rome", hp, context_templates=["{}"], progress=False)
    left = edit.deltas[0].left[:, 0].double()
    k = subject_keys(model, prepare_requests(model, [req], ["{}"]), 1)[0].double()
    assert float(torch.dot(left, k) / (left.norm() * k.norm())) > 1 - 1e-6
