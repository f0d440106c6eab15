"""Devices and device maps: choices are checked before any weights are read, and a model
split by an explicit per-block device map (accelerate's dispatch, one block offloaded to
disk) traces, collects statistics and edits exactly as the same model on one device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editing.api import make_edit
from editing.hparams import TargetHparams
from editing.methods.finetune import FTHparams
from editing.methods.memit import MemitHparams
from editing.methods.rome import RomeHparams
from editing.requests import EditRequest
from editing.statistics.stats import layer_second_moments
from tracing.devices import check_dtype, parse_device_map, resolve_device, resolve_dtype
from tracing.errors import InvalidInput
from tracing.models import down_proj, load_model
from tracing.trace import trace_fact

REQ = EditRequest("{} is located in the city of", "The Space Needle", "Paris")
TEMPLATES = ["{}", "Because of this. {}"]
TOP = {
    "gpt2": ("transformer.h", ["transformer.wte", "transformer.wpe", "transformer.ln_f"]),
    "llama": ("model.layers", ["model.embed_tokens", "model.norm", "model.rotary_emb"]),
}
OFFLOADED = 2  # a middle block: the last one has no path to the loss


def _map(arch: str) -> dict[str, str]:
    blocks, rest = TOP[arch]
    out = dict.fromkeys([*rest, "lm_head"], "cpu")
    out.update({f"{blocks}.{i}": "disk" if i == OFFLOADED else "cpu" for i in range(4)})
    return out


def _torchrun(monkeypatch, local_rank: int, local_world: int, world: int) -> None:
    """The environment torchrun gives a rank, and a machine with two GPUs (as far as the
    device checks can tell: no GPU is used)."""
    import tracing.devices

    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(tracing.devices, "_cuda_count", lambda: 2)


@pytest.mark.parametrize("spec", ["cuda", "auto"])
def test_under_torchrun_a_bare_cuda_is_the_ranks_own_gpu(monkeypatch, spec):
    for rank in (0, 1):
        _torchrun(monkeypatch, rank, local_world=2, world=2)
        assert resolve_device(spec) == torch.device("cuda", rank)
    _torchrun(monkeypatch, 2, local_world=3, world=3)  # a third rank on a two-GPU machine
    with pytest.raises(InvalidInput, match=r"cuda:2, LOCAL_RANK.*only 2 CUDA device"):
        resolve_device("cuda")


def test_under_torchrun_an_explicit_gpu_shared_by_ranks_is_refused(monkeypatch):
    _torchrun(monkeypatch, 1, local_world=2, world=2)
    with pytest.raises(InvalidInput, match="all 2 ranks of this machine on one GPU"):
        resolve_device("cuda:0")
    with pytest.raises(InvalidInput, match="would all load onto the same GPUs"):
        parse_device_map('{"model.layers.0": "cuda:0", "model.layers.1": 1}')
    with pytest.raises(InvalidInput, match="would all load onto the same GPUs"):
        parse_device_map("balanced")
    assert parse_device_map({"model": "cpu"}) == {"model": "cpu"}  # no GPU shared
    # one rank per machine (two nodes): its explicit GPU is its own
    _torchrun(monkeypatch, 0, local_world=1, world=2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    # outside torchrun a bare cuda is the first GPU
    for name in ("LOCAL_RANK", "RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    assert resolve_device("cuda") == torch.device("cuda", 0)


def test_auto_choices_on_this_machine():
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu"), 8_000_000_000) == torch.float32
    assert check_dtype("bfloat16") == torch.bfloat16


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: resolve_device("cuda:99"), "cuda:99"),
        (lambda: resolve_device("tpu"), "unknown device 'tpu'"),
        (lambda: check_dtype("int8"), "unknown dtype 'int8'"),
        (lambda: parse_device_map('{"model.layers.0": "cuda:99"}'), "model.layers.0"),
        (lambda: parse_device_map("[1, 2]"), "non-empty JSON object"),
    ],
)
def test_bad_choices_are_one_line_errors(call, message):
    with pytest.raises(InvalidInput, match=message):
        call()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_device_mapped_model_works_as_one_device(toy_dirs, toy_models, arch, tmp_path):
    one = toy_models[arch]
    split = load_model(toy_dirs[arch], device_map=_map(arch), offload_folder=str(tmp_path / "off"))
    assert split.original_model.hf_device_map[f"{TOP[arch][0]}.{OFFLOADED}"] == "disk"
    a, b = (
        trace_fact(m, "The Space Needle is in", "The Space Needle", samples=3, noise=0.5)
        for m in (one, split)
    )
    for kind in a.scores:
        np.testing.assert_allclose(b.scores[kind], a.scores[kind], rtol=0, atol=1e-6)
    stats = [
        layer_second_moments(m, [0, 1], n_tokens=1000, seq_len=64, cache_dir=tmp_path / n)
        for m, n in ((one, "one"), (split, "split"))
    ]
    torch.testing.assert_close(stats[1][1].mom2, stats[0][1].mom2, rtol=1e-6, atol=1e-7)
    rome = RomeHparams(layer=1, target=TargetHparams(num_steps=3, lr=0.5))
    memit = MemitHparams(
        layers=[0, 1], target=TargetHparams(num_steps=3, lr=0.5), mom2_update_weight=10.0
    )
    for method, hp, st in (("rome", rome, True), ("memit", memit, True), ("ft-l", None, False)):
        hp = hp or FTHparams(layers=[1], lr=1e-2, num_steps=3, norm_constraint=1e-3)
        edits = [
            make_edit(m, REQ, method, hp, stats=s if st else None, context_templates=TEMPLATES)
            for m, s in zip((one, split), stats, strict=True)
        ]
        for x, y in zip(edits[0].deltas, edits[1].deltas, strict=True):
            torch.testing.assert_close(y.matrix(), x.matrix(), rtol=1e-4, atol=1e-6)
        before = down_proj(split, 1).clone()
        with edits[1].applied(split):
            assert not torch.equal(down_proj(split, 1), before)
        assert torch.equal(down_proj(split, 1), before)


def test_an_offloaded_layer_is_refused_for_editing(toy_dirs, tmp_path):
    split = load_model(toy_dirs["gpt2"], device_map=_map("gpt2"), offload_folder=str(tmp_path))
    hp = RomeHparams(layer=OFFLOADED, target=TargetHparams(num_steps=2, lr=0.5))
    with pytest.raises(InvalidInput, match=f"layer {OFFLOADED}: the down-projection is offloaded"):
        make_edit(split, REQ, "rome", hp, stats={OFFLOADED: torch.eye(256)})


def test_half_precision_without_cpu_kernels_is_refused_at_load(toy_models, monkeypatch):
    """torch 2.13 has CPU kernels for what these models use in float16; where an operation
    lacks one, loading fails with one line instead of failing inside a trace or an edit."""
    from tracing.models import _check_cpu_half

    model = toy_models["gpt2"]
    _check_cpu_half(model, torch.float16)  # works here

    def missing(*_a, **_k):
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")

    monkeypatch.setattr(type(model), "forward", missing)
    with pytest.raises(InvalidInput, match="dtype float16 is not supported on the CPU"):
        _check_cpu_half(model, torch.float16)
    assert model.embed.original_component.weight.grad is None


def test_the_bridge_leaves_a_device_mapped_model_where_accelerate_put_it(
    toy_dirs, toy_models, tmp_path, monkeypatch
):
    """Two 'devices' on the CPU (the CPU and disk offload): wrapping the model moves no weight,
    even where TransformerLens would guess CUDA, and the bridge traces as the one-device one."""
    from tracing.loading import Placement, bridge_from_hf, load_hf
    from tracing.models import attach_info

    place = Placement(device_map=_map("llama"), offload_folder=tmp_path / "off")
    hf, tok, official = load_hf(toy_dirs["llama"], place)

    def where() -> list[tuple[str, int, tuple[int, ...]]]:  # the bridge renames modules
        return sorted((p.device.type, p.data_ptr(), tuple(p.shape)) for p in hf.parameters())

    before = where()
    assert {d for d, _, _ in before} == {"cpu", "meta"}  # block 2 offloaded
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # TL's guess would be cuda
    bridge = bridge_from_hf(hf, tok, official)
    monkeypatch.undo()
    assert where() == before
    assert str(bridge.cfg.device) == "cpu"
    attach_info(bridge, toy_dirs["llama"], True)
    a, b = (
        trace_fact(m, "The Space Needle is in", "The Space Needle", samples=2, noise=0.5)
        for m in (toy_models["llama"], bridge)
    )
    for kind in a.scores:
        np.testing.assert_allclose(b.scores[kind], a.scores[kind], rtol=0, atol=1e-6)


def test_an_offloaded_input_embedding_is_refused_in_one_line(toy_dirs, tmp_path):
    from tracing.errors import ModelLoadError

    dmap = {**_map("llama"), "model.embed_tokens": "disk"}
    with pytest.raises(ModelLoadError, match="'model.embed_tokens': 'disk'") as caught:
        load_model(toy_dirs["llama"], device_map=dmap, offload_folder=str(tmp_path))
    assert "\n" not in str(caught.value)


def test_a_map_mixing_gpus_and_offload_is_refused_before_loading(monkeypatch):
    """TransformerLens 4.3 refuses a model split between GPUs and CPU/disk offload when it
    wraps it, after the weights were read; the map is refused when it is parsed."""
    import tracing.devices

    monkeypatch.setattr(tracing.devices, "_cuda_count", lambda: 1)
    with pytest.raises(InvalidInput, match="'model.layers.1' on 'disk' beside GPUs"):
        parse_device_map({"model.layers.0": "cuda:0", "model.layers.1": "disk"})
    with pytest.raises(InvalidInput, match="beside GPUs"):
        parse_device_map('{"model.layers.0": 0, "lm_head": "cpu"}')
    assert parse_device_map({"model.layers.0": "cuda:0", "lm_head": 0}) == {
        "model.layers.0": "cuda:0",
        "lm_head": 0,
    }
