"""Fine-tuning edits (Zhu et al. 2020): FT-L's epsilon bound, the fast loss, mixed batches,
restoration on failure, bad input; whole block parts (mlp, attn, block) on every
architecture: the bound after every step, bit-exact undo, save/load/re-apply, export, the
command line; and one lean FT-L edit of the embedded model."""

from __future__ import annotations

import math

import pytest
import torch

import editing.methods.finetune.train as ft
from editing.edits.edit import Edit
from editing.methods.finetune import FTHparams, finetune_edit, mixed_schedule, tuned_parameters
from editing.params import block_parameters
from editing.requests import EditRequest
from editing.requests.prepared import prepare_requests
from tracing.forward import next_token_probs
from tracing.models import decode, down_proj, n_layers, target_ids, tokenize

REQ = EditRequest("The Space Needle is located in {} of", "the city", " Paris")
REQS = [
    REQ,
    EditRequest("{} is the capital of", "Rome", " Germany"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English language"),
]


def mean_logprob(model, prompt: str, target: str) -> float:
    """Reference: teacher-forced mean token log-probability from one plain full forward."""
    ids, tgt = tokenize(model, prompt), target_ids(model, target)
    with torch.no_grad():  # logits at the target positions only (cheap for Gemma's vocabulary)
        logits = model(torch.tensor([ids + tgt[:-1]]), use_cache=False, logits_to_keep=len(tgt))
    logp = logits[0].double().log_softmax(-1)
    return sum(float(logp[j, t]) for j, t in enumerate(tgt)) / len(tgt)


def all_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.original_model.state_dict().items()}


def assert_same(model, saved: dict[str, torch.Tensor]) -> None:
    now = model.original_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in saved.items())


def max_change(model, before: dict[str, torch.Tensor]) -> float:
    now = model.original_model.state_dict()
    return max(float((now[k].double() - v.double()).abs().max()) for k, v in before.items())


def rounding(model) -> float:
    """A few float32 ulps of the largest weight: the rounding of W0 + delta."""
    big = max(float(p.detach().abs().max()) for p in model.original_model.parameters())
    return 4 * big * torch.finfo(torch.float32).eps


def neutral_facts(model, n: int = 6) -> list[tuple[str, str]]:
    """Prompts with the model's own top-1 next token as answer (kept only if that token
    decodes and re-encodes to itself)."""
    prompts = [
        "Paris is the capital of",
        "The Eiffel Tower is in",
        "Michael Jordan plays the sport of",
        "Apple was founded by",
        "Toyota is headquartered in",
        "The official language of Japan is",
        "Barack Obama was born in",
        "The Louvre is located in",
    ]
    top = next_token_probs(model, prompts).argmax(-1).tolist()
    out = []
    for p, t in zip(prompts, top, strict=True):
        text = decode(model, t)
        if text.strip() and target_ids(model, text) == [t]:
            out.append((p, text))
    assert len(out) >= 2, "test setup: too few round-tripping neutral answers"
    return out[:n]


def test_ftl_never_moves_a_weight_by_more_than_epsilon(toy_model):
    eps, lr = 1e-3, 1e-2
    saved = all_weights(toy_model)
    hp = FTHparams(layers=[1, 2], lr=lr, num_steps=8, norm_constraint=eps, mode="constrained")
    edit = finetune_edit(toy_model, prepare_requests(toy_model, REQS[:2]), hp, progress=False)
    assert edit.method == "ft-l"
    assert_same(toy_model, saved)  # making the edit leaves the model as it was
    with edit.applied(toy_model):
        moved = max_change(toy_model, saved)
    assert 0.5 * eps < moved <= eps + rounding(toy_model)
    # the same run without the clamp moves far more: the bound is what binds
    free = finetune_edit(
        toy_model,
        prepare_requests(toy_model, REQS[:2]),
        FTHparams(layers=[1, 2], lr=lr, num_steps=8, mode="unconstrained"),
        progress=False,
    )
    assert free.method == "ft"
    with free.applied(toy_model):
        assert max_change(toy_model, saved) > 5 * eps
    assert_same(toy_model, saved)


def test_finetuning_raises_target_and_touches_only_chosen_layers(toy_model):
    saved = all_weights(toy_model)
    layer = 2
    before = mean_logprob(toy_model, REQ.prompt, REQ.target_new)
    hp = FTHparams(layers=[layer], lr=5e-3, num_steps=20, norm_constraint=0.05)
    edit = finetune_edit(toy_model, prepare_requests(toy_model, [REQ]), hp, progress=False)
    assert [d.layer for d in edit.deltas] == [layer]
    edit.apply(toy_model)
    try:
        assert mean_logprob(toy_model, REQ.prompt, REQ.target_new) > before + 1.0
        now = toy_model.original_model.state_dict()
        # the state dict lists some tensors under several names: compare storages
        changed = {now[k].data_ptr() for k, v in saved.items() if not torch.equal(now[k], v)}
        assert changed == {down_proj(toy_model, layer).data_ptr()}
    finally:
        edit.undo(toy_model)
    assert_same(toy_model, saved)


def test_fast_loss_matches_a_plain_full_forward(toy_model):
    """The first recorded loss (before any update) uses the reused prefix, padded batches and
    logits at target positions only; it must equal the mean over requests of minus the mean
    token log-probability from a plain forward of each request."""
    hp = FTHparams(layers=[1, 3], lr=1e-4, num_steps=1, batch_size=8, mode="unconstrained")
    edit = finetune_edit(toy_model, prepare_requests(toy_model, REQS), hp, progress=False)
    ref = -sum(mean_logprob(toy_model, r.prompt, r.target_new) for r in REQS) / len(REQS)
    assert edit.metadata["losses"][0] == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_mixed_schedule_is_deterministic_and_uses_neutral_facts_evenly():
    kw = dict(batch_size=2, ratio=1.5, num_steps=6, seed=0)
    a = mixed_schedule(5, 4, **kw)
    assert a == mixed_schedule(5, 4, **kw)
    assert a != mixed_schedule(5, 4, **{**kw, "seed": 1})
    assert len(a) == 6
    counts = [0] * 4
    for step in a:
        assert [new for new, _ in step] == [[0, 1], [2, 3], [4]]
        for new, neutral in step:
            assert len(neutral) == max(1, round(1.5 * len(new)))
            for j in neutral:
                counts[j] += 1
    assert max(counts) - min(counts) <= 1  # drawn from successive permutations
    assert all(nb == [] for step in mixed_schedule(5, 0, **{**kw, "ratio": 0.0}) for _, nb in step)
    with pytest.raises(ValueError, match="neutral"):
        mixed_schedule(5, 0, **kw)


def test_mixed_batches_put_neutral_facts_in_the_loss(toy_models, monkeypatch):
    model = toy_models["gpt2"]
    neutral = neutral_facts(model)
    seen: list[list[tuple[int, ...]]] = []
    real = ft.mean_logprob

    def spy(model, h0, examples, block_kwargs, start):
        seen.append([e.inputs for e in examples])
        return real(model, h0, examples, block_kwargs, start)

    monkeypatch.setattr(ft, "mean_logprob", spy)
    hp = FTHparams(layers=[1], num_steps=2, mode="mixed", mixed_ratio=2.0, norm_constraint=None)
    finetune_edit(model, prepare_requests(model, [REQ]), hp, neutral_facts=neutral, progress=False)
    neutral_inputs = {tuple(tokenize(model, p) + target_ids(model, a)[:-1]) for p, a in neutral}
    assert len(seen) == 2
    for batch in seen:
        assert len(batch) == 3
        assert tuple(tokenize(model, REQ.prompt) + target_ids(model, REQ.target_new)[:-1]) in batch
        assert sum(x in neutral_inputs for x in batch) == 2


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_mixed_mode_keeps_neutral_facts_better_than_plain_finetuning(toy_models, arch):
    model = toy_models[arch]
    saved = all_weights(model)
    neutral = neutral_facts(model)
    base = [mean_logprob(model, p, a) for p, a in neutral]
    drops = {}
    for mode in ("unconstrained", "mixed"):
        hp = FTHparams(
            layers=[1, 2],
            lr=1e-2,
            num_steps=15,
            norm_constraint=None,
            mode=mode,
            mixed_ratio=3.0,
        )
        edit = finetune_edit(
            model, prepare_requests(model, REQS[:2]), hp, neutral_facts=neutral, progress=False
        )
        with edit.applied(model):
            after = [mean_logprob(model, p, a) for p, a in neutral]
        drops[mode] = sum(b - a for a, b in zip(after, base, strict=True)) / len(base)
    assert drops["mixed"] < drops["unconstrained"] - 0.5, drops
    assert_same(model, saved)


def test_nan_part_way_restores_weights_bit_exactly(toy_models, monkeypatch):
    model = toy_models["llama"]
    saved = all_weights(model)
    flags = {k: p.requires_grad for k, p in model.original_model.named_parameters()}
    real, calls = ft.mean_logprob, []

    def poisoned(*args):
        calls.append(1)
        value = real(*args)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(ft, "mean_logprob", poisoned)
    hp = FTHparams(layers=[0, 2], lr=1e-2, num_steps=5, mode="unconstrained")
    with pytest.raises(ValueError, match="nan"):
        finetune_edit(model, prepare_requests(model, [REQ]), hp, progress=False)
    assert len(calls) == 3  # two optimiser steps had changed the weights before the NaN
    assert_same(model, saved)
    assert {k: p.requires_grad for k, p in model.original_model.named_parameters()} == flags


def test_requires_grad_flags_are_restored(toy_models):
    model = toy_models["gptj"]
    param = next(model.original_model.parameters())
    param.requires_grad_(True)
    try:
        flags = {k: p.requires_grad for k, p in model.original_model.named_parameters()}
        finetune_edit(
            model,
            prepare_requests(model, [REQ]),
            FTHparams(layers=[1], num_steps=1),
            progress=False,
        )
        assert {k: p.requires_grad for k, p in model.original_model.named_parameters()} == flags
        assert all(p.grad is None for p in model.original_model.parameters())
    finally:
        param.requires_grad_(False)


@pytest.mark.parametrize(
    ("requests", "hp", "match"),
    [
        ([REQ], dict(layers=[99]), "unknown layer 99"),
        ([REQ], dict(layers=None), "layers"),
        ([], dict(layers=[1]), "no edit requests"),
        ([EditRequest("No subject here", "Rome", " Paris")], dict(layers=[1]), "template"),
        ([EditRequest("{} is in", "Rome", "   ")], dict(layers=[1]), "empty"),
        (
            [REQ, EditRequest(REQ.template, REQ.subject, " Berlin")],
            dict(layers=[1]),
            "conflicts",
        ),
        ([REQ], dict(layers=[1], num_steps=0), "num_steps"),
        ([REQ], dict(layers=[1], params="ffn"), "unknown part 'ffn'"),
        ([REQ], dict(layers=[99], params="block"), "unknown layer 99"),
        ([REQ], dict(layers=[1], params="block", norm_constraint=0.0), "epsilon"),
        ([REQ], dict(layers=[1], params="block", norm_constraint=-1e-3), "epsilon"),
        ([REQ], dict(layers=[1], params="block", norm_constraint=float("nan")), "epsilon"),
        ([REQ], dict(layers=[1], params="block", norm_constraint=float("inf")), "epsilon"),
        ([REQ], dict(layers=[1], constraint="l2"), "unknown constraint"),
        ([REQ], dict(layers=[1], constraint="fisher", fisher_weight=-0.5), "fisher_weight"),
        ([REQ], dict(layers=[1], constraint="fisher", fisher_weight=float("inf")), "fisher_w"),
    ],
)
def test_bad_input_raises_before_any_change(toy_models, requests, hp, match):
    model = toy_models["gemma3"]
    saved = all_weights(model)
    with pytest.raises(ValueError, match=match):
        finetune_edit(model, prepare_requests(model, requests), FTHparams(**hp), progress=False)
    assert_same(model, saved)


# --------------------------------------------------------------------------- whole block parts


def storages(model, tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def changed_storages(model, saved: dict[str, torch.Tensor]) -> set[int]:
    now = model.original_model.state_dict()
    return storages(model, [now[k] for k, v in saved.items() if not torch.equal(now[k], v)])


def test_linf_bound_holds_for_every_tuned_tensor_after_every_step(toy_model, monkeypatch):
    eps = 2e-3
    hp = FTHparams(layers=[1, 2], params="block", lr=1e-2, num_steps=4, norm_constraint=eps)
    tuned, _ = tuned_parameters(toy_model, [1, 2], "block")
    start = {n: p.detach().clone() for n, p in tuned.items()}
    moved: list[float] = []
    real = ft.mean_logprob

    def spy(*args):  # runs before every optimiser step: the weights after the previous one
        moved.append(max(float((p.detach() - start[n]).abs().max()) for n, p in tuned.items()))
        per_tensor = [float((p.detach() - start[n]).abs().max()) for n, p in tuned.items()]
        assert max(per_tensor) <= eps + rounding(toy_model)
        return real(*args)

    monkeypatch.setattr(ft, "mean_logprob", spy)
    edit = finetune_edit(toy_model, prepare_requests(toy_model, REQS[:2]), hp, progress=False)
    assert moved[0] == 0.0 and len(moved) == 4 and max(moved) > 0.5 * eps  # the bound binds
    assert {d.param for d in edit.deltas} == set(tuned)  # the last step's change
    assert all(float(d.dense.abs().max()) <= eps + rounding(toy_model) for d in edit.deltas)
    assert all(torch.equal(p, start[n]) for n, p in tuned.items())


def test_parts_name_the_expected_tensors(toy_models):
    """Every tensor of a block is in exactly one of mlp / attn / the block's norms, each
    receives a gradient, and together they cover the block's memory (GPT-2's joint c_attn
    through its q/k/v views)."""
    for arch, model in toy_models.items():
        block = block_parameters(model, 1, "block")
        mlp, attn = block_parameters(model, 1, "mlp"), block_parameters(model, 1, "attn")
        assert not set(mlp) & set(attn) and set(mlp) | set(attn) <= set(block)
        norms = set(block) - set(mlp) - set(attn)
        assert norms and all("norm" in n or ".ln" in n for n in norms), (arch, norms)
        assert all(n.startswith("blocks.1.") for n in block)
        hf_block = model.blocks[1].original_component
        assert storages(model, hf_block.parameters()) == storages(model, block.values()), arch
        # a down_proj-only run tunes exactly the tensor behind down_proj
        (name,), _ = tuned_parameters(model, [1], "down_proj")[0], None
        assert storages(model, [down_proj(model, 1)]) == storages(model, [mlp[name]])


def test_block_edit_undo_is_bit_exact_and_touches_only_the_tuned_tensors(toy_model):
    saved = all_weights(toy_model)
    hp = FTHparams(layers=[1, 3], params="block", lr=1e-2, num_steps=2, mode="unconstrained")
    edit = finetune_edit(toy_model, prepare_requests(toy_model, [REQ]), hp, progress=False)
    assert_same(toy_model, saved)
    tuned, _ = tuned_parameters(toy_model, [1, 3], "block")
    assert edit.layers == [1, 3] and sorted(edit.parameters) == sorted(tuned)
    edit.apply(toy_model)
    try:
        assert changed_storages(toy_model, saved) == storages(toy_model, tuned.values())
        for d in edit.deltas:
            assert torch.equal(tuned[d.param].detach(), saved_value(saved, toy_model, d) + d.dense)
    finally:
        edit.undo(toy_model)
    assert_same(toy_model, saved)


def saved_value(saved, model, delta) -> torch.Tensor:
    """The tensor ``delta`` changes, from a state-dict snapshot (matched by storage)."""
    target = block_parameters(model, delta.layer, "block")[delta.param]
    for k, v in model.original_model.state_dict().items():
        if v.data_ptr() == target.data_ptr() and v.shape == target.shape:
            return saved[k]
    # a view (GPT-2's q/k/v): rebuild it from the joint tensor's snapshot
    base = target._base if target._base is not None else target
    for k, v in model.original_model.state_dict().items():
        if v.untyped_storage().data_ptr() == base.untyped_storage().data_ptr():
            offset = (target.data_ptr() - v.data_ptr()) // v.element_size()
            return saved[k].as_strided(target.shape, target.stride(), offset)
    raise AssertionError(f"no snapshot of {delta.param}")


@pytest.mark.parametrize("part", ["attn", "mlp"])
def test_one_part_changes_only_that_part(toy_models, part):
    model = toy_models["gemma3"]
    saved = all_weights(model)
    hp = FTHparams(layers=[2], params=part, lr=1e-2, num_steps=2, mode="unconstrained")
    edit = finetune_edit(model, prepare_requests(model, [REQ]), hp, progress=False)
    wanted = block_parameters(model, 2, part)
    with edit.applied(model):
        assert changed_storages(model, saved) == storages(model, wanted.values())
    assert_same(model, saved)


def test_block_edits_save_load_reapply_and_combine(toy_model, tmp_path):
    saved = all_weights(toy_model)
    hp = FTHparams(layers=[2], params="block", lr=1e-2, num_steps=2, norm_constraint=0.01)
    edit = finetune_edit(toy_model, prepare_requests(toy_model, [REQ]), hp, progress=False)
    with edit.applied(toy_model):
        after = all_weights(toy_model)
    loaded = Edit.load(edit.save(tmp_path / "e"))
    assert [d.param for d in loaded.deltas] == [d.param for d in edit.deltas]
    assert all(
        torch.equal(a.dense, b.dense) for a, b in zip(loaded.deltas, edit.deltas, strict=True)
    )
    for _ in range(2):  # re-apply after undo
        with loaded.applied(toy_model):
            assert_same(toy_model, after)
        assert_same(toy_model, saved)
    # with a down-projection edit of another layer, in one value
    ftl = finetune_edit(
        toy_model,
        prepare_requests(toy_model, [REQ]),
        FTHparams(layers=[0], num_steps=1),
        progress=False,
    )
    both = Edit.combine([ftl, loaded])
    assert both.layers == [0, 2] and both.deltas[0].param is None
    again = Edit.load(both.save(tmp_path / "both"))
    with again.applied(toy_model):
        now = all_weights(toy_model)
    assert_same(toy_model, saved)
    with ftl.applied(toy_model), loaded.applied(toy_model):
        assert all(torch.equal(now[k], v) for k, v in all_weights(toy_model).items())


def test_block_edit_export_loads_without_factscope(toy_dirs, toy_models, tmp_path):
    """GPT-2's attention is tuned through the bridge's q/k/v views of the joint c_attn: the
    exported Hugging Face folder holds the change and predicts like the edited bridge."""
    from transformers import AutoModelForCausalLM

    from tracing.forward import last_token_logits

    model = toy_models["gpt2"]
    hp = FTHparams(layers=[1], params="block", lr=1e-2, num_steps=3, mode="unconstrained")
    edit = finetune_edit(model, prepare_requests(model, [REQ]), hp, progress=False)
    folder = edit.export(model, tmp_path / "exported")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenize(model, REQ.prompt.format(REQ.subject))
    with torch.no_grad():
        mine = hf(torch.tensor([ids])).logits[0, -1]
    with edit.applied(model):
        theirs = last_token_logits(model, [ids])[0]
        attn = model.original_model.transformer.h[1].attn
        joint = getattr(attn, "original_component", attn).c_attn
        edited = getattr(joint, "original_component", joint).weight.detach().clone()
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(hf.transformer.h[1].attn.c_attn.weight, edited)


def test_cli_edit_with_block_options_end_to_end(toy_dirs, tmp_path, capsys):
    import json

    from factscope.cli import main

    reqs = tmp_path / "reqs.json"
    reqs.write_text(json.dumps([REQ.to_dict()]))
    out = tmp_path / "edit"
    argv = ["edit", "--model", toy_dirs["llama"], "--requests", str(reqs), "--method", "ft-l"]
    code = main([*argv, "--params", "attn", "--blocks", "all", "--epsilon", "1e-3",
                 "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    edit = Edit.load(out)
    assert edit.layers == [0, 1, 2, 3] and edit.hparams["params"] == "attn"
    assert edit.hparams["norm_constraint"] == 1e-3 and edit.hparams["constraint"] == "linf"
    assert all(".self_attn." in n for n in edit.parameters)
    assert max(float(d.dense.abs().max()) for d in edit.deltas) <= 1e-3 + 1e-6
    bad = {
        "--params bogus": (["--params", "bogus"], "unknown part"),
        "--epsilon 0": (["--epsilon", "0"], "epsilon"),
        "--epsilon nan": (["--epsilon", "nan"], "epsilon"),
        "--fisher-weight -1": (
            ["--constraint", "fisher", "--fisher-weight", "-1"],
            "--fisher-weight",
        ),
        "--constraint l2": (["--constraint", "l2"], "unknown constraint"),
        "--blocks and --layers": (["--blocks", "1", "--layers", "2"], "not both"),
        "--blocks x": (["--blocks", "x"], "bad layer spec"),
    }
    for what, (extra, message) in bad.items():
        code = main([*argv, *extra, "--out", str(tmp_path / "no"), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, (what, err)
        assert not (tmp_path / "no").exists()
    rome = ["edit", "--requests", str(reqs), "--method", "rome", "--params", "mlp", "--out", "x"]
    assert main(rome) == 2 and "only for fine-tuning" in capsys.readouterr().err
    # an unknown block is named (after loading the model, before any work)
    code = main([*argv, "--blocks", "7", "--out", str(tmp_path / "no")])
    assert code == 2 and "unknown layer 7" in capsys.readouterr().err


def test_bad_neutral_facts_raise(toy_models):
    model = toy_models["gpt2"]
    hp = FTHparams(layers=[1], mode="mixed", norm_constraint=None)
    with pytest.raises(ValueError, match="neutral fact 0"):
        finetune_edit(
            model,
            prepare_requests(model, [REQ]),
            hp,
            neutral_facts=[("Paris is", "")],
            progress=False,
        )
    with pytest.raises(ValueError, match="pair"):
        finetune_edit(
            model, prepare_requests(model, [REQ]), hp, neutral_facts=[("Paris is",)], progress=False
        )
    with pytest.raises(ValueError, match="at least one neutral"):
        finetune_edit(model, prepare_requests(model, [REQ]), hp, neutral_facts=[], progress=False)


@pytest.mark.model
def test_ftl_edits_a_known_fact_of_the_embedded_model(gemma):
    """FT-L with the shipped Gemma defaults at one layer: the new target's probability on the
    edit prompt rises and no weight moves by more than epsilon."""
    from editing.methods import load_hparams

    hp = load_hparams("ft-l", "gemma-3-270m")
    assert hp.mode == "constrained" and len(hp.layers) == 1
    req = EditRequest(
        "The mother tongue of {} is", "Danielle Darrieux", " English", target_true=" French"
    )
    layer = hp.layers[0]
    w0 = down_proj(gemma, layer).clone()
    before = mean_logprob(gemma, req.prompt, req.target_new)
    edit = finetune_edit(gemma, prepare_requests(gemma, [req]), hp, progress=False)
    assert torch.equal(down_proj(gemma, layer), w0)
    with edit.applied(gemma):
        after = mean_logprob(gemma, req.prompt, req.target_new)
        moved = float((down_proj(gemma, layer).double() - w0.double()).abs().max())
    assert torch.equal(down_proj(gemma, layer), w0)
    assert after > before + 1.0, (before, after)
    assert moved <= hp.norm_constraint + 4 * float(w0.abs().max()) * 1.2e-7
    assert math.isfinite(after) and n_layers(gemma) == 18


def reference_run(model, prepared, hp, fisher=None) -> dict[str, torch.Tensor]:
    """The fine-tuning loop as it was written before its copies were cut: float32 anchors
    and masters cloned from the tensors, the l-infinity projection out of place, the Fisher
    penalty through autograd. Returns ``{name: after - before}`` (the weights restored)."""
    from editing.methods.finetune.batches import Example, mixed_schedule, pad, states_before
    from editing.methods.finetune.batches import mean_logprob as batch_logprob
    from editing.statistics.fisher import fisher_penalty
    from tracing.forward import capture_block_kwargs

    examples = [Example(p.plain.ids + p.target[:-1], len(p.plain.ids), p.target) for p in prepared]
    schedule = mixed_schedule(
        len(examples), 0, batch_size=hp.batch_size, ratio=0.0, num_steps=hp.num_steps
    )
    tuned, _ = tuned_parameters(model, hp.layers, hp.params)
    params = list(tuned.values())
    weights = [fisher[n].float() for n in tuned] if hp.uses_fisher else []
    pad_id = model.tokenizer.pad_token_id
    tokens = pad(examples, 0 if pad_id is None else int(pad_id), params[0].device)
    start = hp.layers[0]
    saved = [p.detach().clone() for p in params]
    for p in model.original_model.parameters():
        p.requires_grad_(False)
    _, block_kwargs = capture_block_kwargs(model, tokens[:1])
    h0 = states_before(model, tokens, start)
    anchors = [p.detach().float().clone() for p in params]
    masters = [a.clone().requires_grad_(True) for a in anchors]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(masters, lr=hp.lr, weight_decay=hp.weight_decay)
    with torch.enable_grad():
        for batches in schedule:
            for new_idx, _ in batches:
                opt.zero_grad(set_to_none=True)
                loss = -batch_logprob(
                    model, h0[new_idx], [examples[i] for i in new_idx], block_kwargs, start
                )
                loss.backward()
                for p, m in zip(params, masters, strict=True):
                    m.grad = torch.zeros_like(m) if p.grad is None else p.grad.float()
                    p.grad = None
                if weights:
                    fisher_penalty(masters, anchors, weights, hp.fisher_weight).backward()
                opt.step()
                with torch.no_grad():
                    for p, m, a in zip(params, masters, anchors, strict=True):
                        if hp.epsilon:
                            m.copy_(torch.maximum(torch.minimum(m, a + hp.epsilon), a - hp.epsilon))
                        p.copy_(m.to(p.dtype))
    out = {n: (p.detach() - s).clone() for (n, p), s in zip(tuned.items(), saved, strict=True)}
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.requires_grad_(False)
            p.copy_(s)
    return out


@pytest.mark.parametrize(
    ("arch", "dtype", "kw"),
    [
        ("gpt2", torch.float32, dict(constraint="linf", norm_constraint=2e-3)),
        ("gemma3", torch.float32, dict(constraint="linf", norm_constraint=2e-3)),
        ("gpt2", torch.float32, dict(constraint="fisher", fisher_weight=50.0)),
        ("gpt2", torch.bfloat16, dict(constraint="linf", norm_constraint=2e-3)),
    ],
)
def test_block_run_equals_the_copying_formulation(toy_models, toy_dirs, arch, dtype, kw):
    """The in-place run (the tensors their own masters, the snapshot the anchor, the
    projection and the Fisher gradient in place) gives the deltas of the copying loop
    above bit for bit: the same float32 operations in the same order. The bfloat16 run loads
    its own model in that dtype (casting the shared bridge would detach the views it holds
    into the Hugging Face weights)."""
    from tracing.models import load_model

    model = toy_models[arch] if dtype == torch.float32 else load_model(toy_dirs[arch], dtype=dtype)
    saved = all_weights(model)
    hp = FTHparams(layers=[1, 2], params="block", lr=5e-3, num_steps=4, **kw)
    prepared = prepare_requests(model, REQS[:2])
    tuned, _ = tuned_parameters(model, hp.layers, hp.params)
    gen = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(p.shape, generator=gen) * 10 for n, p in tuned.items()}
    edit = finetune_edit(model, prepared, hp, fisher=fisher, progress=False)
    assert_same(model, saved)
    ref = reference_run(model, prepared, hp, fisher)
    got = {d.param: d.dense for d in edit.deltas}
    assert set(got) == set(ref)
    for name, delta in ref.items():
        assert torch.equal(got[name], delta), name
    assert any(bool(d.abs().max() > 0) for d in ref.values())
    assert_same(model, saved)
