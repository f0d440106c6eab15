"""The models :mod:`gpu` (``benchmarks/gpu.py``) measures: GPT-2 XL, GPT-J-6B and
Llama-3-8B as their real configs describe them (and ``--small`` versions of the same
architectures), built with random weights directly on the device, with a small byte-level BPE
tokenizer trained on the spot. Nothing is downloaded."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TOKENIZER_VOCAB = 4096
SMALL_VOCAB = 8192  # --small: still larger than the tokenizer, as the real vocabularies are


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked architecture: its real config and the layers the papers edit."""

    key: str  # the --models name
    official_name: str  # what TransformerLens picks the architecture adapter from
    arch: str  # gpt2 | gptj | llama
    real: dict[str, int | float]  # real shape: layers, d_model, heads, vocab, ...
    rome_layer: int
    memit_layers: tuple[int, ...]
    prepend_bos: bool


SPECS: dict[str, ModelSpec] = {
    "gpt2-xl": ModelSpec(
        "gpt2-xl",
        "gpt2-xl",
        "gpt2",
        {"layers": 48, "d_model": 1600, "heads": 25, "vocab": 50257, "n_ctx": 1024},
        rome_layer=17,
        memit_layers=(13, 14, 15, 16, 17),
        prepend_bos=False,
    ),
    "gpt-j-6b": ModelSpec(
        "gpt-j-6b",
        "EleutherAI/gpt-j-6B",
        "gptj",
        {
            "layers": 28,
            "d_model": 4096,
            "heads": 16,
            "vocab": 50400,
            "n_ctx": 2048,
            "rotary_dim": 64,
        },
        rome_layer=5,
        memit_layers=(3, 4, 5, 6, 7, 8),
        prepend_bos=False,
    ),
    "llama-3-8b": ModelSpec(
        "llama-3-8b",
        "meta-llama/Meta-Llama-3-8B",
        "llama",
        {
            "layers": 32,
            "d_model": 4096,
            "heads": 32,
            "kv_heads": 8,
            "d_mlp": 14336,
            "vocab": 128256,
            "n_ctx": 8192,
            "rope_theta": 500000.0,
        },
        rome_layer=5,
        memit_layers=(4, 5, 6, 7, 8),
        prepend_bos=True,
    ),
}

#: --small: same architectures, 8 layers of width 128 (rotary and grouped-query settings kept).
SMALL: dict[str, dict[str, int | float]] = {
    "gpt2-xl": {"layers": 8, "d_model": 128, "heads": 4, "vocab": SMALL_VOCAB, "n_ctx": 1024},
    "gpt-j-6b": {
        "layers": 8,
        "d_model": 128,
        "heads": 4,
        "vocab": SMALL_VOCAB,
        "n_ctx": 2048,
        "rotary_dim": 8,
    },
    "llama-3-8b": {
        "layers": 8,
        "d_model": 128,
        "heads": 8,
        "kv_heads": 2,
        "d_mlp": 448,
        "vocab": SMALL_VOCAB,
        "n_ctx": 8192,
        "rope_theta": 500000.0,
    },
}
SMALL_ROME_LAYER = 2
SMALL_MEMIT_LAYERS = (3, 4, 5)

#: Architectures beyond :data:`SPECS` that ``benchmarks/scale.py`` builds (``gpu.py`` keeps its
#: three): Qwen2.5-7B as its config describes it (biased q/k/v, 28 heads over 4 KV heads).
MORE_SPECS: dict[str, ModelSpec] = {
    "qwen2.5-7b": ModelSpec(
        "qwen2.5-7b",
        "Qwen/Qwen2.5-7B",
        "qwen2",
        {
            "layers": 28,
            "d_model": 3584,
            "heads": 28,
            "kv_heads": 4,
            "d_mlp": 18944,
            "vocab": 152064,
            "n_ctx": 32768,
            "rope_theta": 1000000.0,
        },
        rome_layer=5,
        memit_layers=(4, 5, 6, 7, 8),
        prepend_bos=False,
    ),
}
MORE_SMALL: dict[str, dict[str, int | float]] = {
    "qwen2.5-7b": {
        "layers": 8,
        "d_model": 128,
        "heads": 8,
        "kv_heads": 2,
        "d_mlp": 640,
        "vocab": SMALL_VOCAB,
        "n_ctx": 32768,
        "rope_theta": 1000000.0,
    },
}


def hf_config(spec: ModelSpec, shape: dict[str, int | float]) -> Any:
    """The Hugging Face config of ``spec``'s architecture with ``shape`` (the tokenizer's
    special ids: pad 0, bos 1, eos 2)."""
    from transformers import GPT2Config, GPTJConfig, LlamaConfig, Qwen2Config

    ids: dict[str, Any] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    L, d, h, V, ctx = (int(shape[k]) for k in ("layers", "d_model", "heads", "vocab", "n_ctx"))
    if spec.arch == "gpt2":
        return GPT2Config(n_layer=L, n_embd=d, n_head=h, vocab_size=V, n_positions=ctx, **ids)
    if spec.arch == "gptj":
        return GPTJConfig(
            n_layer=L,
            n_embd=d,
            n_head=h,
            vocab_size=V,
            n_positions=ctx,
            rotary_dim=int(shape["rotary_dim"]),
            **ids,
        )
    if spec.arch in ("llama", "qwen2"):  # the same fields; Qwen2 adds biases on q/k/v itself
        config_class, eps = (LlamaConfig, 1e-5) if spec.arch == "llama" else (Qwen2Config, 1e-6)
        return config_class(
            hidden_size=d,
            intermediate_size=int(shape["d_mlp"]),
            num_hidden_layers=L,
            num_attention_heads=h,
            num_key_value_heads=int(shape["kv_heads"]),
            vocab_size=V,
            max_position_embeddings=ctx,
            rope_parameters={"rope_type": "default", "rope_theta": float(shape["rope_theta"])},
            rms_norm_eps=eps,
            tie_word_embeddings=False,
            **ids,
        )
    raise ValueError(f"unknown architecture {spec.arch!r}")


def describe_shape(shape: dict[str, int | float]) -> str:
    """``48L d1600 25h V50257`` (plus kv heads / MLP width where the config sets them)."""
    out = f"{shape['layers']}L d{shape['d_model']} {shape['heads']}h"
    if "kv_heads" in shape:
        out += f"/{shape['kv_heads']}kv"
    if "d_mlp" in shape:
        out += f" mlp{shape['d_mlp']}"
    return out + f" V{shape['vocab']}"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 pointed at stderr for the duration (native code writes there too)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def build_model(
    spec: ModelSpec,
    shape: dict[str, int | float],
    device: torch.device,
    dtype: torch.dtype,
    folder: Path,
    name: str,
    *,
    fast_init: bool = False,
    reuse_tokenizer: bool = False,
) -> Any:
    """A randomly initialised ``spec`` model of ``shape`` made directly on ``device`` in
    ``dtype``, wrapped in a TransformerBridge with its :class:`~tracing.models.ModelInfo`.

    ``fast_init``: skip the architecture's own initialisation (minutes for billions of numbers
    on a CPU) and fill the weights with :func:`fill_fast` instead (seconds).
    ``reuse_tokenizer``: keep a tokenizer an earlier build left in ``folder`` (it is trained
    with fixed settings, so it is the same one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracing.loading import bridge_from_hf
    from tracing.models import attach_info
    from tracing.toy_models import build_tokenizer

    tok_dir = folder / f"tokenizer-{spec.arch}"
    if not (reuse_tokenizer and (tok_dir / "tokenizer_config.json").is_file()):
        with stdout_to_stderr():  # the BPE trainer's progress lines would land in the table
            build_tokenizer(tok_dir, vocab_size=TOKENIZER_VOCAB, add_bos=spec.prepend_bos)
    # Re-read from the folder: TransformerLens reloads the tokenizer by its name_or_path.
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    config = hf_config(spec, shape)
    if len(tok) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} ids, more than the vocabulary")
    torch.manual_seed(0)
    if fast_init:
        from transformers.initialization import no_init_weights

        with torch.device(device), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        fill_fast(model)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config.architectures = [type(model).__name__]
    bridge = bridge_from_hf(model, tok, spec.official_name)
    attach_info(bridge, name, spec.prepend_bos)
    return bridge


#: Period of :func:`fill_fast`'s stream: a prime, so no row of any width repeats another.
FILL_PERIOD = 10_000_019


@torch.no_grad()
def fill_fast(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give every parameter values at memory-copy speed: matrices get windows of one seeded
    N(0, std^2) stream of period :data:`FILL_PERIOD` (each tensor from its own seeded start),
    one-dimensional weights (norm gains) 1 and biases 0. The arithmetic a step costs and the
    memory it takes are those of any other random weights."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(FILL_PERIOD, generator=gen) * std
    stream = torch.cat([base, base])
    for name, p in model.named_parameters():
        if p.ndim < 2:
            p.fill_(0.0 if name.endswith("bias") else 1.0)
            continue
        flat = p.view(-1)
        shift = int(torch.randint(FILL_PERIOD, (1,), generator=gen))
        for off in range(0, flat.numel(), FILL_PERIOD):
            n = min(FILL_PERIOD, flat.numel() - off)
            start = (shift + off) % FILL_PERIOD
            flat[off : off + n].copy_(stream[start : start + n])


# --------------------------------------------------------------------------- the workload

PROMPT = "The Space Needle is in the city"  # 10 tokens (11 with BOS) with the toy tokenizer
SUBJECT = "The Space Needle"
ANSWER = " Seattle"
TEMPLATE_WORDS = (
    "The history of the old city began when the river was first crossed by a stone bridge "
    "and traders settled on both banks of the water"
).split()
TEMPLATES = ("{} is located in", "{} was born in", "{} works for", "The capital of {} is")
TARGETS = (" Paris", " London", " Rome", " Tokyo", " Berlin", " Moscow", " Madrid")


def context_groups(settings: Sequence[tuple[int, int]]) -> list[list[str]]:
    """Fixed context templates by group (``[["{}"], [count texts of length words. {}], ...]``)
    shaped like the model-written ones the hyper-parameters ask for."""
    groups = [["{}"]]
    n = len(TEMPLATE_WORDS)
    for length, count in settings:
        group = []
        for i in range(count):
            words = [TEMPLATE_WORDS[(i + j) % n] for j in range(length)]
            group.append(" ".join(words) + ". {}")
        groups.append(group)
    return groups


def synthetic_requests(n: int, offset: int = 0) -> list[Any]:
    """``n`` distinct requests ``Entity <i>`` in four templates with seven targets."""
    from editing.requests import EditRequest

    return [
        EditRequest(
            template=TEMPLATES[i % len(TEMPLATES)],
            subject=f"Entity {i}",
            target_new=TARGETS[i % len(TARGETS)],
        )
        for i in range(offset, offset + n)
    ]


def identity_stats(model: Any, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """A precomputed E[kk^T] per layer: the identity (ROME's closed form ignores its scale)."""
    from tracing.models import layer_device, mlp_width

    d = mlp_width(model)
    return {L: torch.eye(d, dtype=torch.float32, device=layer_device(model, L)) for L in layers}
