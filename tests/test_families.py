"""The further model families (Qwen2, Qwen3, Mistral, Phi-3, GPT-NeoX, OLMo-2, Gemma 2) on
tiny random models, each built once for this module.

Per family: the family table describes the loaded model; every hook kind reads the Hugging
Face module it names (the down-projection's input and output, the sublayer outputs as added
to the residual, after any post-norm; the parallel block's sum); the fast tracing engine
equals the reference engine with its key/value reuse taken; ROME writes v* at k*, its edit
undoes bit for bit, saves, loads and exports to a folder transformers loads with the same
logits; bfloat16 tracing, ROME and MEMIT agree with float32. The float64 parity of v*/z and of
MEMIT's delta W for these families is in tests/test_parity.py.

Tolerances: engines within 1e-5 (float32 rounding; measured ~1e-7); W'k* = v* to 1e-5
relative in float32 (bfloat16: 5e-3, its 8-bit mantissa); bfloat16 trace probabilities
within 0.02 of float32 (as tests/test_precision.py) and MEMIT's delta W within 35 % (seen:
up to 25.3 %, Phi-3's layer 1: z is optimised through a bfloat16 model). OLMo-2 does not run
in bfloat16 (TransformerLens 4.3's OLMo-2 attention mixes dtypes): it is refused at load.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editing.api import make_edit
from editing.edits.edit import Edit
from editing.hparams import TargetHparams
from editing.methods.memit import MemitHparams
from editing.methods.rome import RomeHparams
from editing.requests import EditRequest
from editing.requests.prepared import prepare_requests
from editing.statistics.keys import subject_keys
from tracing.errors import InvalidInput
from tracing.families import FAMILIES as TABLE
from tracing.forward import last_token_logits
from tracing.models import (
    down_proj,
    down_proj_bias,
    family,
    hook_name,
    load_model,
    post_mlp_norm,
    prepends_bos,
)
from tracing.noise import resolve_noise
from tracing.toy_models import FAMILIES, build_toy_model
from tracing.trace import prepare_fact, trace_fact

PROMPT, SUBJECT = "The Space Needle is in", "The Space Needle"
TEMPLATES = ["{}", "Because of this. {}"]
REQ = EditRequest("{} is located in the city of", "The Space Needle", "Paris")
TARGET = TargetHparams(num_steps=3, lr=0.5)
LAYER = 1

pytestmark = pytest.mark.parametrize("arch", FAMILIES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {arch: str(build_toy_model(arch, root / arch)) for arch in FAMILIES}


@pytest.fixture(scope="module")
def models(folders) -> dict[str, object]:
    """Float32 bridges, shared by the tests of this module (each must undo its edits)."""
    return {arch: load_model(folder) for arch, folder in folders.items()}


@pytest.fixture(scope="module")
def plain(folders) -> dict[str, torch.nn.Module]:
    """The same folders loaded by transformers alone (no bridge), for independent reads. With
    the eager attention the bridge runs: transformers' default (SDPA) differs from it by float32
    rounding (seen: 3e-5 on activations of size 40), which says nothing about the hooks."""
    from transformers import AutoModelForCausalLM

    return {
        a: AutoModelForCausalLM.from_pretrained(f, attn_implementation="eager").eval()
        for a, f in folders.items()
    }


@pytest.fixture(scope="module")
def moments(models) -> dict[str, dict[int, torch.Tensor]]:
    """A well-conditioned random E[k k^T] per family for layers 1 and 2 (ROME's and MEMIT's
    algebra holds for any such matrix; the corpus statistics are tested elsewhere)."""
    out = {}
    for i, (arch, model) in enumerate(models.items()):
        d = int(model.cfg.d_mlp)
        g = torch.Generator().manual_seed(i)
        a = torch.randn(d, 2 * d, generator=g)
        out[arch] = {L: a @ a.T / (2 * d) + 0.1 * torch.eye(d) for L in (1, 2)}
    return out


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.original_model.named_parameters()}


def _assert_params_equal(model, saved: dict[str, torch.Tensor]) -> None:
    now = dict(model.original_model.named_parameters())
    assert now.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(now[name], value), f"{name} changed"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --------------------------------------------------------------------------- the surface


def test_the_family_table_describes_the_loaded_model(arch, models, plain):
    model = models[arch]
    row = family(model)
    assert row is TABLE[arch]
    hf_block = _hf_blocks(plain[arch])[LAYER]
    down = getattr(hf_block.mlp, row.down_proj.split()[0])
    assert (down.bias is not None) == row.down_bias
    assert (down_proj_bias(model, LAYER) is not None) == row.down_bias
    assert (post_mlp_norm(model, LAYER) is not None) == (row.post_mlp_norm is not None)
    assert hasattr(hf_block, row.post_mlp_norm or "mlp")
    assert ("blocks.1.hook_resid_mid" not in model.hook_dict) == row.parallel
    assert prepends_bos(model) == row.adds_bos
    assert tuple(down_proj(model, LAYER).shape) == (model.cfg.d_mlp, model.cfg.d_model)


def _hf_blocks(hf) -> torch.nn.ModuleList:
    inner = getattr(hf, "gpt_neox", None) or hf.model
    return inner.layers


def test_every_hook_kind_reads_the_hugging_face_module_it_names(arch, models, plain):
    """Captured independently with forward hooks on the Hugging Face modules of block 1: the
    key and value are the down-projection's input and output, ``mlp``/``attn`` are what is
    added to the residual (after OLMo-2's and Gemma 2's post-norms), and the block output is
    their sum with its input (GPT-NeoX: one sum, the parallel block)."""
    model = models[arch]
    row = TABLE[arch]
    hf = plain[arch]
    block = _hf_blocks(hf)[LAYER]
    attn_mod = getattr(block, "self_attn", None) or block.attention
    down = getattr(block.mlp, row.down_proj.split()[0])
    after_mlp = getattr(block, row.post_mlp_norm) if row.post_mlp_norm else block.mlp
    after_attn = block.post_attention_layernorm if row.post_mlp_norm else attn_mod
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, take_input: bool = False):
        def hook(_mod, inp, out):
            value = inp[0] if take_input else (out[0] if isinstance(out, tuple) else out)
            seen[name] = value[0].detach().clone()

        return hook

    handles = [
        down.register_forward_hook(keep("mlp_key", take_input=True)),
        down.register_forward_hook(keep("mlp_raw")),
        after_mlp.register_forward_hook(keep("mlp")),
        after_attn.register_forward_hook(keep("attn")),
        block.register_forward_hook(keep("resid")),
        block.register_forward_hook(keep("resid_pre", take_input=True)),
    ]
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    try:
        with torch.no_grad():
            hf(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    _, cache = model.run_with_cache(ids)
    for kind, expected in seen.items():
        got_k = cache[hook_name(model, kind, LAYER)][0]
        torch.testing.assert_close(got_k, expected, rtol=1e-5, atol=1e-5, msg=kind)
    got = {k: cache[hook_name(model, k, LAYER)][0] for k in ("resid_pre", "attn", "mlp")}
    total = got["resid_pre"] + got["attn"] + got["mlp"]
    torch.testing.assert_close(seen["resid"], total, rtol=1e-5, atol=1e-5)

    # a change of the restored/edited MLP output reaches the residual as it is
    g = torch.Generator().manual_seed(0)
    v = torch.randn(int(model.cfg.d_model), generator=g)

    def add(x, hook):
        x = x.clone()
        x[0, 2] += v
        return x

    with model.hooks(fwd_hooks=[(hook_name(model, "mlp", LAYER), add)]):
        _, moved = model.run_with_cache(ids)
    change = (
        moved[hook_name(model, "resid", LAYER)][0, 2] - cache[hook_name(model, "resid", 1)][0, 2]
    )
    torch.testing.assert_close(change, v, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- tracing


def test_fast_trace_equals_the_reference_and_reuses_keys_and_values(arch, models):
    model = models[arch]
    prep, _ = prepare_fact(model, PROMPT, SUBJECT, None, resolve_noise(model, 0.5), 2, 1)
    assert prep.corrupt_kv is not None  # else the fast engine recomputes whole sequences
    assert len(prep.corrupt_kv) == model.cfg.n_layers
    k, v = prep.corrupt_kv[0]
    assert k.shape[0] == 2 and k.shape[-2] == len(prep.tokens) and v.shape == k.shape
    fast, ref = (
        trace_fact(model, PROMPT, SUBJECT, samples=3, window=3, noise=0.5, method=m)
        for m in ("fast", "reference")
    )
    assert fast.answer_id == ref.answer_id
    assert abs(fast.p_clean - ref.p_clean) < 1e-5
    for kind in ("resid", "mlp", "attn"):
        assert fast.scores[kind].shape == (len(fast.tokens), model.cfg.n_layers)
        assert np.abs(fast.scores[kind] - ref.scores[kind]).max() < 1e-5, kind
    assert abs(fast.p_clean - fast.p_corrupted) > 1e-3  # the noise does something


# --------------------------------------------------------------------------- editing


def test_rome_writes_v_star_undoes_saves_and_exports(arch, models, plain, moments, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = models[arch]
    params = _params(model)
    hp = RomeHparams(layer=LAYER, target=TARGET)
    stats = {LAYER: moments[arch][LAYER]}
    edit = make_edit(model, REQ, "rome", hp, stats=stats, context_templates=TEMPLATES)
    _assert_params_equal(model, params)  # make_edit leaves the model alone
    (delta,) = edit.deltas
    k = subject_keys(model, prepare_requests(model, [REQ], TEMPLATES), LAYER)[0]
    v = torch.tensor(edit.metadata["v_star"])
    b = down_proj_bias(model, LAYER)
    W = down_proj(model, LAYER).detach().clone()
    assert _rel(k @ (W + delta.matrix()) + (0 if b is None else b), v) < 1e-5
    with edit.applied(model):
        after = _params(model)
        edited = last_token_logits(model, [REQ.prompt.format(REQ.subject)])[0]
    _assert_params_equal(model, params)  # undo is bit for bit
    with Edit.load(edit.save(tmp_path / "edit")).applied(model):
        _assert_params_equal(model, after)
    _assert_params_equal(model, params)

    folder = edit.export(model, tmp_path / "exported")
    _assert_params_equal(model, params)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    down_name = TABLE[arch].down_proj.split()[0]
    edited_name = f"{LAYER}.mlp.{down_name}.weight"
    original = dict(plain[arch].named_parameters())
    for name, value in hf.named_parameters():  # the edited matrix, every other one as it was
        if name.endswith(edited_name):
            assert torch.equal(value.T, W + delta.matrix()), name
        else:
            assert torch.equal(value, original[name]), name
    with torch.no_grad():
        theirs = hf(torch.tensor([tok(REQ.prompt.format(REQ.subject))["input_ids"]])).logits
    torch.testing.assert_close(theirs[0, -1], edited, rtol=1e-5, atol=1e-5)


def test_bfloat16_tracing_rome_and_memit_agree_with_float32(arch, folders, models, moments):
    if arch == "olmo2":
        # TransformerLens 4.3's OLMo-2 attention mixes a float32 query with bfloat16 values:
        # the load-time check refuses the dtype in one line instead of failing mid-edit.
        with pytest.raises(InvalidInput, match="dtype bfloat16 is not supported .*use float32$"):
            load_model(folders[arch], dtype="bfloat16")
        return
    f32, bf16 = models[arch], load_model(folders[arch], dtype="bfloat16")
    assert down_proj(bf16, LAYER).dtype == torch.bfloat16
    a, b = (
        trace_fact(m, PROMPT, SUBJECT, samples=2, window=3, noise=0.5, kinds=("mlp",))
        for m in (f32, bf16)
    )
    assert a.answer_id == b.answer_id and abs(a.p_clean - b.p_clean) < 0.02
    for kind in a.scores:
        assert np.abs(a.scores[kind] - b.scores[kind]).max() < 0.02, kind

    hp = RomeHparams(layer=LAYER, target=TARGET)
    stats = {LAYER: moments[arch][LAYER]}
    params = _params(bf16)
    edit = make_edit(bf16, REQ, "rome", hp, stats=stats, context_templates=TEMPLATES)
    k = subject_keys(bf16, prepare_requests(bf16, [REQ], TEMPLATES), LAYER)[0]
    v = torch.tensor(edit.metadata["v_star"])
    b = down_proj_bias(bf16, LAYER)
    with edit.applied(bf16):
        out = k.float() @ down_proj(bf16, LAYER).float() + (0 if b is None else b.float())
        assert _rel(out, v) < 5e-3
    _assert_params_equal(bf16, params)

    mhp = MemitHparams(layers=[1, 2], target=TARGET, mom2_update_weight=10.0)
    edits = [
        make_edit(m, [REQ], "memit", mhp, stats=moments[arch], context_templates=TEMPLATES)
        for m in (f32, bf16)
    ]
    for x, y in zip(edits[0].deltas, edits[1].deltas, strict=True):
        assert x.layer == y.layer and _rel(y.matrix(), x.matrix()) < 0.35
    with edits[1].applied(bf16):
        assert not torch.equal(down_proj(bf16, 2), params_down(params, bf16, 2))
    _assert_params_equal(bf16, params)


def params_down(params: dict[str, torch.Tensor], model, layer: int) -> torch.Tensor:
    """The saved down-projection of ``layer`` as a ``[d_mlp, d_model]`` matrix."""
    live = down_proj(model, layer)
    for name, p in model.original_model.named_parameters():
        if p.data_ptr() == live.data_ptr():
            return params[name].T if params[name].shape != live.shape else params[name]
    raise AssertionError("down-projection not among the parameters")


# --------------------------------------------------------------------------- the CLI


def test_models_command_lists_the_family_with_its_status(arch, capsys):
    from factscope.cli import main

    assert main(["models"]) in (0, None)
    out = capsys.readouterr().out
    listed = out.split("supported families")[1].splitlines()
    row = TABLE[arch]
    line = next(x for x in listed if x.strip().startswith(row.label))
    assert row.architectures[0] in line and line.rstrip().endswith(row.status)
    assert "real weights not shipped" in row.status
