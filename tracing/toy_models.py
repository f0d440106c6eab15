"""Randomly initialised models of the supported architectures, built locally (no hub).

Tests and benchmarks use them to exercise every architecture path (GPT-2's Conv1D, GPT-J's
parallel block, Llama, Gemma 3's sandwich norms) exactly as a real checkpoint would be
loaded: each model is saved as a Hugging Face folder with its tokenizer and then loaded by
:func:`tracing.models.load_model` like any local folder.

:data:`FAMILIES` are the further families factscope supports with tiny models only (no real
weights ship): Qwen2 (Qwen2.5: biased q/k/v), Qwen3 (q/k norms), Mistral, Phi-3 (fused qkv
and gate/up projections), GPT-NeoX (Pythia: parallel attention and MLP, biased Linear
down-projection), OLMo-2 (norms after attention and MLP, none before) and Gemma 2 (norms
before and after both, logit soft-capping). Each tokenizer follows its family's BOS rule
(``adds_bos`` of :data:`tracing.families.FAMILIES`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from tracing.errors import InvalidInput
from tracing.families import FAMILIES as FAMILY_TABLE

Arch = Literal[
    "gpt2", "gptj", "llama", "gemma3", "qwen2", "qwen3", "mistral", "phi3", "gptneox", "olmo2",
    "gemma2",
]  # fmt: skip
#: The architectures the shared test fixtures build for every test.
ARCHS: tuple[Arch, ...] = ("gpt2", "gptj", "llama", "gemma3")
#: The further families, tested on their own tiny models (tests/test_families.py).
FAMILIES: tuple[Arch, ...] = ("qwen2", "qwen3", "mistral", "phi3", "gptneox", "olmo2", "gemma2")


def build_tokenizer(folder: Path, vocab_size: int = 512, add_bos: bool = False):
    """Train a small byte-level BPE tokenizer on the shipped known facts and save it to
    ``folder``. With ``add_bos`` the tokenizer puts ``<bos>`` before every text (as Gemma's
    and Llama's do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tracing.facts import load_known_facts

    texts = [f"{f.prompt}{f.answer or ''}." for f in load_known_facts()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)
    return fast


def tiny_config(arch: Arch, vocab_size: int, size: Literal["tiny", "small"] = "tiny"):
    """A config of ``arch``: ``tiny`` (4 layers, width 64) or ``small`` (GPT-2-small sized:
    12 layers, width 768)."""
    from transformers import GPT2Config, GPTJConfig, LlamaConfig

    n_layer, d, heads = (4, 64, 4) if size == "tiny" else (12, 768, 12)
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # Larger than the usual 0.02 so that random models give peaked, traceable outputs.
        initializer_range=0.2 if size == "tiny" else 0.05,
    )
    if arch == "gpt2":
        return GPT2Config(n_layer=n_layer, n_embd=d, n_head=heads, n_positions=256, **common)
    if arch == "gptj":
        return GPTJConfig(
            n_layer=n_layer, n_embd=d, n_head=heads, rotary_dim=8, n_positions=256, **common
        )
    if arch == "llama":
        return LlamaConfig(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=n_layer,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256,
            **common,
        )
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=n_layer,
            num_attention_heads=heads,
            num_key_value_heads=1,
            head_dim=d // heads,
            max_position_embeddings=256,
            sliding_window=16,
            **common,
        )
    if arch in FAMILIES:
        return _family_config(arch, d, n_layer, heads, common)
    raise InvalidInput(f"unknown architecture {arch!r}; expected one of {ARCHS + FAMILIES}")


def _family_config(arch: Arch, d: int, n_layer: int, heads: int, common: dict[str, Any]):
    """The config of one of :data:`FAMILIES` (width ``d``, ``n_layer`` blocks)."""
    import transformers as tf

    shape: dict[str, Any] = dict(
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=n_layer,
        num_attention_heads=heads,
        max_position_embeddings=256,
    )
    if arch == "gptneox":  # Pythia: parallel residual, rotary on a quarter of each head (default)
        return tf.GPTNeoXConfig(**shape, use_parallel_residual=True, **common)
    shape["num_key_value_heads"] = max(1, heads // 2)
    if arch == "qwen2":
        return tf.Qwen2Config(**shape, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(**shape, head_dim=d // heads, **common)
    if arch == "mistral":
        return tf.MistralConfig(**shape, sliding_window=None, **common)
    if arch == "phi3":
        return tf.Phi3Config(**shape, original_max_position_embeddings=256, **common)
    if arch == "olmo2":
        return tf.Olmo2Config(**shape, **common)
    return tf.Gemma2Config(**shape, head_dim=d // heads, sliding_window=16, **common)


def build_toy_model(
    arch: Arch, folder: str | Path, *, size: Literal["tiny", "small"] = "tiny", seed: int = 0
) -> Path:
    """Build a randomly initialised ``arch`` model with its tokenizer and save both as a
    Hugging Face folder. Returns the folder (load it with ``load_model(str(folder))``)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, add_bos=FAMILY_TABLE[arch].adds_bos)
    config = tiny_config(arch, len(tok), size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    return folder
