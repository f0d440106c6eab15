"""The architecture-neutral model surface that tracing and editing use.

Everything else in factscope talks to a model through the functions here, never through
hook-name strings, architecture-specific module paths or keyword names: a new architecture
touches this module (and :mod:`tracing.blocks`) only. What it holds:

* identity: :class:`ModelInfo` (name, BOS rule, fingerprint; computed once per model) and
  :func:`model_info`, :func:`model_name`, :func:`fingerprint`, :func:`prepends_bos`;
* shape: :func:`n_layers`, :func:`check_layer`, :func:`context_length`;
* hooks: :func:`hook_name` for every kind of state (``resid``, ``mlp``, ``attn``, the MLP key
  ``mlp_key``, the raw down-projection output ``mlp_raw``, ...);
* weights: :func:`down_proj` (the MLP down-projection as a live ``[d_mlp, d_model]`` view),
  :func:`down_proj_bias`, :func:`post_mlp_norm`;
* blocks: :func:`~tracing.blocks.cache_keyword` (the keyword a block takes its key/value cache
  under) and :func:`~tracing.blocks.run_block`, from :mod:`tracing.blocks` (importable here);
* text: :func:`tokenize` / :func:`target_ids` (with the model's own BOS rule), :func:`decode`,
  :func:`final_logits`.

* family: :func:`family` (the row of :data:`tracing.families.FAMILIES` a model belongs to).

The same reading holds in every supported family (:mod:`tracing.families`; each checked on a
tiny model against the Hugging Face modules in ``tests/test_families.py``). ``mlp_key`` is
the input of the down-projection (Phi-3's fused ``gate_up_proj`` sits before it: the key is
still ``act(gate) * up``), ``mlp_raw`` its output with any bias (GPT-2, GPT-J, GPT-NeoX).
Where a norm follows the down-projection (Gemma 2 and 3 before and after each sublayer,
OLMo-2 only after), ``mlp``/``attn`` are the *normed* sublayer outputs added to the residual
and :func:`post_mlp_norm` returns that norm: MEMIT's z is a residual-stream state, so the
change ``R`` it asks of a layer is a change of the normed ``m``, which MEMIT's norm-aware
spreading maps back to the raw ``y`` the weights write (Gemma 3's handling, unchanged for
OLMo-2 and Gemma 2); ROME's v* lives at ``mlp_raw`` and reaches the residual through the norm.
In a parallel block (GPT-J; GPT-NeoX with ``use_parallel_residual``, every Pythia)
``x' = x + attn(ln1 x) + mlp(ln2 x)``: the MLP reads the block input, not ``x + attn``, so
``resid_mid`` does not exist, MEMIT's residual ``z - h`` is added by the down-projection
directly, restoring ``attn`` at layer L leaves that layer's MLP input alone (only later
blocks see it) and restoring ``mlp`` restores that MLP's own term of the sum.

Models come from :func:`load_model` (:mod:`tracing.loading`): a TransformerLens 4.x
``TransformerBridge`` over a Hugging Face model with weight processing off, so an in-place
edit of a bridge weight *is* an edit of the HF weight. Running a model (capture states, stop
early, next-token probabilities) is :mod:`tracing.forward`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from transformer_lens.model_bridge import TransformerBridge

from tracing.blocks import cache_keyword as cache_keyword
from tracing.blocks import run_block as run_block
from tracing.errors import InvalidInput
from tracing.families import Family, family_of
from tracing.loading import (  # noqa: F401  (re-exported: the public entry points)
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ModelLoadError,
    available_models,
    load_bridge,
)
from tracing.vocab import project

#: The hooked model every factscope function takes.
HookedModel = TransformerBridge

HookKind = Literal["resid", "resid_pre", "resid_mid", "mlp", "attn", "mlp_key", "mlp_raw", "embed"]

_INFO_ATTR = "factscope_info"


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class ModelInfo:
    """What factscope knows about a loaded model beyond its weights: the name it was loaded
    under, whether its prompts start with BOS, and a fingerprint of its unedited identity."""

    name: str
    prepend_bos: bool
    fingerprint: str


def _fingerprint(model: HookedModel) -> str:
    cfg = model.cfg
    h = hashlib.sha256()
    for key in ("architecture", "n_layers", "d_model", "d_mlp", "d_vocab", "n_heads"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    emb = model.embed.original_component.weight.detach()
    step = max(1, emb.shape[0] // 4096)
    h.update(emb[::step].contiguous().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: str | dict[str, str | int] | None = None,
    offload_folder: str | None = None,
) -> HookedModel:
    """Load a hooked model by name, from local files only.

    ``name`` is an embedded model (``gemma-3-270m``, the default, or ``smollm2-135m``), a local
    Hugging Face folder, or a hub id already in the local Hugging Face cache (GPT-2 family,
    GPT-J, Llama family, Gemma 3). Returns a ``TransformerBridge`` in eval mode whose parameters
    do not require gradients; its weights are the HF model's own tensors. Its
    :class:`ModelInfo` (name, BOS rule, fingerprint) is recorded once here.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``: CUDA when present), ``dtype``
    (``float32``, ``bfloat16``, ``float16``, ``auto``: float32 on the CPU, half precision on
    CUDA above ~1B parameters) or, for a model larger than one device, ``device_map``
    (accelerate's ``auto``/``balanced``/``sequential`` or ``{module: device}``; blocks mapped
    to ``disk`` go to ``offload_folder``) say where it runs: see :mod:`tracing.devices`. All
    are checked before any weights are read. The weights load straight onto their device in
    their dtype (a bfloat16 GPT-J never exists in float32 in host memory).
    """
    from tracing.loading import Placement, resolve_source

    placement = Placement.resolve(resolve_source(name), device, dtype, device_map, offload_folder)
    bridge, prepend_bos = load_bridge(name, placement)
    attach_info(bridge, name, prepend_bos)
    if placement.device.type == "cpu" and placement.dtype != torch.float32:
        _check_cpu_half(bridge, placement.dtype)
    return bridge


def _check_cpu_half(model: HookedModel, dtype: torch.dtype) -> None:
    """Half precision on the CPU depends on torch having CPU kernels for every operation the
    model uses: one token through the model (with a gradient, as editing needs) finds out
    at load time rather than deep inside a trace or an edit."""
    ids = torch.tensor([[int(model.tokenizer.eos_token_id or 0)]])
    embed = model.embed.original_component.weight
    try:
        with torch.enable_grad():
            embed.requires_grad_(True)
            model(ids, use_cache=False).float().sum().backward()
    except (RuntimeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0]
        other = "float32" if dtype == torch.bfloat16 else "float32 or bfloat16"
        raise InvalidInput(
            f"dtype {str(dtype).removeprefix('torch.')} is not supported on the CPU by this "
            f"torch for this model ({first}); use {other}"
        ) from exc
    finally:
        embed.requires_grad_(False)
        embed.grad = None


def attach_info(model: HookedModel, name: str, prepend_bos: bool) -> ModelInfo:
    """Record ``model``'s :class:`ModelInfo` (done by :func:`load_model`); returns it."""
    info = ModelInfo(name=name, prepend_bos=prepend_bos, fingerprint=_fingerprint(model))
    setattr(model, _INFO_ATTR, info)
    model.cfg.default_prepend_bos = prepend_bos
    return info


def model_info(model: HookedModel) -> ModelInfo:
    """The model's :class:`ModelInfo`; for a bridge not made by :func:`load_model`, derived
    once from its config (name ``cfg.model_name``, TransformerLens' BOS default)."""
    info = getattr(model, _INFO_ATTR, None)
    if info is None:
        name = str(getattr(model.cfg, "model_name", None) or "?")
        info = attach_info(model, name, bool(model.cfg.default_prepend_bos))
    return info


def model_name(model: HookedModel) -> str:
    """The name a model was loaded under (an embedded name, a folder or a hub id)."""
    return model_info(model).name


def fingerprint(model: HookedModel) -> str:
    """A short hash identifying a model's architecture and unedited identity.

    Hashes the config shape and the token-embedding matrix (which no edit in factscope
    touches), so an edited model keeps its fingerprint and a different model gets another.
    Computed once per model (:class:`ModelInfo`).
    """
    return model_info(model).fingerprint


def family(model: HookedModel) -> Family | None:
    """The supported family of ``model`` (by its Hugging Face architecture class), or None
    for an architecture factscope has not tested."""
    return family_of(type(model.original_model).__name__)


def prepends_bos(model: HookedModel) -> bool:
    """Whether prompts for this model start with BOS: what its own Hugging Face tokenizer does
    (Gemma, Llama: yes; GPT-2, GPT-J, SmolLM2: no, as in ROME's code). TransformerLens' own
    default (always prepend) is not used."""
    return model_info(model).prepend_bos


# --------------------------------------------------------------------------- shape and hooks


def model_device(model: HookedModel) -> torch.device:
    """The device of the token embedding: where inputs go and where factscope creates the
    tensors it feeds the model. (With a device map, blocks may live elsewhere; per-layer
    work uses :func:`layer_device`.)"""
    return model.embed.original_component.weight.device


def layer_device(model: HookedModel, layer: int) -> torch.device:
    """The device block ``layer``'s MLP down-projection lives on (its own device under a
    device map)."""
    return down_proj(model, layer).device


def model_dtype(model: HookedModel) -> torch.dtype:
    """The floating dtype the model computes in (its embedding's)."""
    return model.embed.original_component.weight.dtype


def n_layers(model: HookedModel) -> int:
    """Number of transformer blocks."""
    return int(model.cfg.n_layers)


def mlp_width(model: HookedModel) -> int:
    """Width of the MLP hidden layer (the length of an MLP key, ``d_mlp``)."""
    return int(model.cfg.d_mlp or 0)


def context_length(model: HookedModel) -> int:
    """Longest sequence the model accepts."""
    return int(model.cfg.n_ctx)


def check_layer(model: HookedModel, layer: int) -> int:
    """Return ``layer`` if it exists in ``model``; otherwise raise an error naming it."""
    n = n_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise InvalidInput(f"unknown layer {layer!r}: this model has layers 0..{n - 1}")
    return layer


_HOOKS: dict[str, str] = {
    "resid": "blocks.{L}.hook_resid_post",
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "mlp": "blocks.{L}.hook_mlp_out",
    "attn": "blocks.{L}.hook_attn_out",
    "mlp_key": "blocks.{L}.mlp.hook_post",
    "mlp_raw": "blocks.{L}.mlp.out.hook_out",
}


def hook_name(model: HookedModel, kind: HookKind | str, layer: int | None = None) -> str:
    """The bridge hook name for a kind of state at ``layer``, checked to exist on ``model``.

    Kinds: ``resid`` (block output, ROME's "hidden state"), ``resid_pre``, ``resid_mid``,
    ``mlp`` (MLP output as added to the residual stream), ``attn`` (attention output),
    ``mlp_key`` (input of the MLP down-projection: ROME's key), ``mlp_raw`` (output of the
    down-projection itself, before any post-MLP norm: where ROME's value lives), ``embed``
    (embedding output, where causal-tracing noise is added; includes Gemma's sqrt(d_model)
    scaling).
    """
    if kind == "embed":
        name = "hook_embed"
    elif kind in _HOOKS:
        if layer is None:
            raise InvalidInput(f"hook kind {kind!r} needs a layer")
        name = _HOOKS[kind].format(L=check_layer(model, layer))
    else:
        raise InvalidInput(f"unknown hook kind {kind!r}; expected one of {['embed', *_HOOKS]}")
    if name not in model.hook_dict:
        raise InvalidInput(f"this model has no hook {name!r} (kind {kind!r})")
    return name


# --------------------------------------------------------------------------- weights


def _down_module(model: HookedModel, layer: int) -> torch.nn.Module:
    mlp = model.blocks[check_layer(model, layer)].mlp
    out = getattr(mlp, "out", None)
    module = getattr(out, "original_component", None) if out is not None else None
    if module is None or not hasattr(module, "weight"):
        raise InvalidInput(f"layer {layer}: cannot find the MLP down-projection of this model")
    return module


def down_proj(model: HookedModel, layer: int) -> Float[torch.Tensor, "d_mlp d_model"]:
    """The MLP down-projection weight of ``layer`` as a live ``[d_mlp, d_model]`` view.

    Whatever the architecture stores (GPT-2's Conv1D ``[d_mlp, d_model]``, or a Linear
    ``[d_model, d_mlp]`` in GPT-J, Llama and Gemma), the returned tensor shares storage with the
    HF parameter, so ``down_proj(m, L).add_(delta)`` edits the model in place.
    """
    module = _down_module(model, layer)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    d_mlp, d_model = mlp_width(model), int(model.cfg.d_model)
    if weight.device.type == "meta":
        raise InvalidInput(
            f"layer {layer}: the down-projection is offloaded (device map: disk), so it cannot "
            "be edited in place; map that block to a device (cpu or cuda:N) to edit it"
        )
    view = weight if type(module).__name__ == "Conv1D" else weight.T  # Conv1D: [in, out]
    if tuple(view.shape) != (d_mlp, d_model):
        raise InvalidInput(
            f"layer {layer}: down-projection has shape {tuple(weight.shape)}, "
            f"expected [d_mlp={d_mlp}, d_model={d_model}] in some orientation"
        )
    return view


def down_proj_bias(model: HookedModel, layer: int) -> Float[torch.Tensor, " d_model"] | None:
    """The down-projection's bias at ``layer`` (GPT-2, GPT-J), or None (Llama, Gemma)."""
    bias = getattr(_down_module(model, layer), "bias", None)
    return None if bias is None else bias.detach()


def post_mlp_norm(model: HookedModel, layer: int) -> torch.nn.Module | None:
    """The norm between the MLP down-projection and the residual add at ``layer`` (Gemma's
    ``post_feedforward_layernorm``), or None for architectures without one."""
    return getattr(model.blocks[check_layer(model, layer)], "ln2_post", None)


def final_logits(
    model: HookedModel, resid: Float[torch.Tensor, "batch pos d_model"]
) -> Float[torch.Tensor, "batch pos vocab"]:
    """Logits from final residual states: final norm, unembedding and any logit soft-capping.

    Pass only the positions you need (e.g. ``resid[:, -1:]``): the vocabulary projection is
    the dominant cost for a 262k-word vocabulary (on the CPU it runs a slice of the
    vocabulary at a time: :mod:`tracing.vocab`).
    """
    logits = project(model, model.ln_final(resid))
    cap = getattr(model.original_model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


def final_logprobs(
    model: HookedModel, resid: Float[torch.Tensor, "batch pos d_model"]
) -> Float[torch.Tensor, "batch pos vocab"]:
    """Float32 log-probabilities over the vocabulary from final residual states
    (:func:`final_logits`, then a log-softmax); pass only the positions you need."""
    return torch.log_softmax(final_logits(model, resid).float(), dim=-1)


# --------------------------------------------------------------------------- text


def tokenize(model: HookedModel, text: str) -> list[int]:
    """Token ids of a prompt, with the model's BOS rule (see :func:`prepends_bos`)."""
    if not isinstance(text, str) or not text:
        raise InvalidInput("cannot tokenise an empty prompt")
    ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    return [model.tokenizer.bos_token_id, *ids] if prepends_bos(model) else ids


def target_ids(model: HookedModel, text: str) -> list[int]:
    """Token ids of a continuation (an answer or target), with no BOS or other special tokens."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(f"empty target {text!r}")
    ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InvalidInput(f"target {text!r} tokenises to nothing")
    return ids


def decode(model: HookedModel, ids: Sequence[int] | int) -> str:
    """Decode token ids (or one id) to text."""
    if isinstance(ids, int):
        ids = [ids]
    return str(model.tokenizer.decode(list(ids)))
