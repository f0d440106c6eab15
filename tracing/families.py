"""The model families factscope supports, and what differs between them.

:mod:`tracing.models` reads every architecture through the TransformerLens bridge in one
generic way (hook names, the down-projection view, its bias, the post-MLP norm, the BOS
rule); this table says what that generic reading finds in each family, so that a reader (and
``factscope models``) can see it, and the tests check each loaded tiny model against its row
(``tests/test_families.py``). A family is recognised by the Hugging Face architecture class
in the model's config (:func:`family_of`).

What the rows mean for tracing and editing:

* ``down_proj``: the Hugging Face module whose input is the MLP key (ROME's ``k``) and whose
  output is the raw MLP value (ROME's ``v``, hook kind ``mlp_raw``). Phi-3 computes gate and
  up in one fused ``gate_up_proj``; its key is still the input of ``down_proj``
  (``act(gate) * up``), so nothing changes for ROME or MEMIT.
* ``down_bias``: the down-projection adds a bias (GPT-2, GPT-J, GPT-NeoX): ROME solves
  ``k* W' + b = v*``.
* ``post_mlp_norm``: an RMSNorm between the down-projection and the residual add (OLMo-2,
  Gemma 2 and 3). The MLP's contribution is then ``m = g * y / rms(y)``, not ``y``: MEMIT's
  norm-aware spreading maps the residual it wants added through that norm
  (:mod:`editing.methods.memit`), and tracing's ``mlp`` state is the normed ``m``. OLMo-2 has
  no norms before attention or the MLP, only after them; Gemma has both.
* ``parallel``: attention and MLP read the same block input (GPT-J, and GPT-NeoX with
  ``use_parallel_residual``, as every Pythia model): ``x' = x + attn(ln1 x) + mlp(ln2 x)``.
* ``adds_bos``: the family's own tokenizer starts every prompt with BOS (factscope follows
  the loaded tokenizer itself; this column records what the family's released tokenizers do).
"""

from __future__ import annotations

from dataclasses import dataclass

#: ``status`` of families tested on tiny random models only.
TINY_ONLY = "tiny-model tested; real weights not shipped"


@dataclass(frozen=True)
class Family:
    """One supported model family (see the module docstring for the columns' meaning)."""

    key: str
    label: str
    architectures: tuple[str, ...]
    down_proj: str
    down_bias: bool
    post_mlp_norm: str | None
    parallel: bool
    adds_bos: bool
    status: str
    published: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        Family(
            "gpt2", "GPT-2", ("GPT2LMHeadModel",), "c_proj (Conv1D)", True, None, False, False,
            "tiny-model tested; published ROME/MEMIT/AlphaEdit numbers for GPT-2 XL",
            ("gpt2-xl",),
        ),
        Family(
            "gptj", "GPT-J", ("GPTJForCausalLM",), "fc_out", True, None, True, False,
            "tiny-model tested; published ROME/MEMIT/AlphaEdit numbers for GPT-J 6B",
            ("gpt-j-6b",),
        ),
        Family(
            "llama", "Llama (Llama 3, SmolLM2)", ("LlamaForCausalLM",), "down_proj", False,
            None, False, True,
            "tiny-model tested; embedded smollm2-135m; published numbers for Llama-3-8B",
            ("meta-llama-3-8b", "meta-llama-3-8b-instruct"),
        ),
        Family(
            "gemma3", "Gemma 3", ("Gemma3ForCausalLM",), "down_proj",
            False, "post_feedforward_layernorm", False, True,
            "tiny-model tested; embedded gemma-3-270m (default)", ("gemma-3-270m",),
        ),
        Family(
            "qwen2", "Qwen2 (Qwen2.5)", ("Qwen2ForCausalLM",), "down_proj", False, None,
            False, False, TINY_ONLY + "; published numbers for Qwen2.5-7B",
            ("qwen2.5-7b", "qwen2.5-7b-instruct"),
        ),
        Family(
            "qwen3", "Qwen3", ("Qwen3ForCausalLM",), "down_proj", False, None, False, False,
            TINY_ONLY,
        ),
        Family(
            "mistral", "Mistral", ("MistralForCausalLM",), "down_proj", False, None, False,
            True, TINY_ONLY + "; published numbers for Mistral-7B", ("mistral-7b-v0.3",),
        ),
        Family(
            "phi3", "Phi-3", ("Phi3ForCausalLM",), "down_proj (fused gate_up_proj before it)",
            False, None, False, False, TINY_ONLY,
        ),
        Family(
            "gptneox", "GPT-NeoX (Pythia)", ("GPTNeoXForCausalLM",), "dense_4h_to_h", True,
            None, True, False, TINY_ONLY,
        ),
        Family(
            "olmo2", "OLMo-2", ("Olmo2ForCausalLM",), "down_proj", False,
            "post_feedforward_layernorm", False, False,
            TINY_ONLY + "; float32 only (TransformerLens 4.3 fails it in bfloat16)",
        ),
        Family(
            "gemma2", "Gemma 2", ("Gemma2ForCausalLM",), "down_proj", False,
            "post_feedforward_layernorm", False, True, TINY_ONLY,
        ),
    )
}  # fmt: skip


def family_of(architecture: str) -> Family | None:
    """The family of a Hugging Face architecture class name (``config.architectures[0]``,
    e.g. ``"Qwen2ForCausalLM"``), or None for an architecture factscope has not tested."""
    for fam in FAMILIES.values():
        if architecture in fam.architectures:
            return fam
    return None
