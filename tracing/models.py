"""The small architecture-neutral surface that tracing and editing use.

Everything else in factscope talks to a model through the functions here, never through
hook-name strings or architecture-specific module paths: :func:`n_layers`, :func:`hook_name`,
:func:`down_proj` (the MLP down-projection as a live ``[d_mlp, d_model]`` view),
:func:`tokenize` / :func:`target_ids` (with the model's own BOS rule),
:func:`next_token_probs` and :func:`fingerprint`. Models come from :func:`load_model`
(re-exported from :mod:`tracing.loading`): a TransformerLens 4.x ``TransformerBridge`` over a
Hugging Face model with weight processing off, so an in-place edit of a bridge weight *is* an
edit of the HF weight.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from jaxtyping import Float

from tracing.loading import (  # noqa: F401  (re-exported: the public entry points)
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ModelLoadError,
    available_models,
    load_model,
)

HookKind = Literal["resid", "resid_pre", "resid_mid", "mlp", "attn", "mlp_key", "embed"]


# --------------------------------------------------------------------------- surface


def n_layers(model) -> int:
    """Number of transformer blocks."""
    return int(model.cfg.n_layers)


_HOOKS: dict[str, str] = {
    "resid": "blocks.{L}.hook_resid_post",
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "mlp": "blocks.{L}.hook_mlp_out",
    "attn": "blocks.{L}.hook_attn_out",
    "mlp_key": "blocks.{L}.mlp.hook_post",
}


def check_layer(model, layer: int) -> int:
    """Return ``layer`` if it exists in ``model``; otherwise raise a ValueError naming it."""
    n = n_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"unknown layer {layer!r}: this model has layers 0..{n - 1}")
    return layer


def hook_name(model, kind: HookKind, layer: int | None = None) -> str:
    """The bridge hook name for a kind of state at ``layer``, checked to exist on ``model``.

    Kinds: ``resid`` (block output, ROME's "hidden state"), ``resid_pre``, ``resid_mid``,
    ``mlp`` (MLP output as added to the residual stream), ``attn`` (attention output),
    ``mlp_key`` (input of the MLP down-projection: ROME's key), ``embed`` (embedding output,
    where causal-tracing noise is added; includes Gemma's sqrt(d_model) scaling).
    """
    if kind == "embed":
        name = "hook_embed"
    elif kind in _HOOKS:
        if layer is None:
            raise ValueError(f"hook kind {kind!r} needs a layer")
        name = _HOOKS[kind].format(L=check_layer(model, layer))
    else:
        raise ValueError(f"unknown hook kind {kind!r}; expected one of {['embed', *_HOOKS]}")
    if name not in model.hook_dict:
        raise ValueError(f"this model has no hook {name!r} (kind {kind!r})")
    return name


def down_proj(model, layer: int) -> Float[torch.Tensor, "d_mlp d_model"]:
    """The MLP down-projection weight of ``layer`` as a live ``[d_mlp, d_model]`` view.

    Whatever the architecture stores (GPT-2's Conv1D ``[d_mlp, d_model]``, or a Linear
    ``[d_model, d_mlp]`` in GPT-J, Llama and Gemma), the returned tensor shares storage with the
    HF parameter, so ``down_proj(m, L).add_(delta)`` edits the model in place.
    """
    check_layer(model, layer)
    mlp = model.blocks[layer].mlp
    out = getattr(mlp, "out", None)
    module = getattr(out, "original_component", None) if out is not None else None
    if module is None or not hasattr(module, "weight"):
        raise ValueError(f"layer {layer}: cannot find the MLP down-projection of this model")
    weight = module.weight
    d_mlp, d_model = int(model.cfg.d_mlp), int(model.cfg.d_model)
    if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        view = weight
    else:  # torch.nn.Linear stores [out, in]
        view = weight.T
    if tuple(view.shape) != (d_mlp, d_model):
        raise ValueError(
            f"layer {layer}: down-projection has shape {tuple(weight.shape)}, "
            f"expected [d_mlp={d_mlp}, d_model={d_model}] in some orientation"
        )
    return view


def prepends_bos(model) -> bool:
    """Whether prompts for this model start with BOS: what its own Hugging Face tokenizer does
    (Gemma, Llama: yes; GPT-2, GPT-J, SmolLM2: no, as in ROME's code). TransformerLens' own
    default (always prepend) is not used."""
    flag = getattr(model, "factscope_prepend_bos", None)
    return bool(model.cfg.default_prepend_bos) if flag is None else bool(flag)


def tokenize(model, text: str) -> list[int]:
    """Token ids of a prompt, with the model's BOS rule (see :func:`prepends_bos`)."""
    if not isinstance(text, str) or not text:
        raise ValueError("cannot tokenise an empty prompt")
    ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    return [model.tokenizer.bos_token_id, *ids] if prepends_bos(model) else ids


def target_ids(model, text: str) -> list[int]:
    """Token ids of a continuation (an answer or target), with no BOS or other special tokens."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty target {text!r}")
    ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {text!r} tokenises to nothing")
    return ids


def decode(model, ids: Sequence[int] | int) -> str:
    """Decode token ids (or one id) to text."""
    if isinstance(ids, int):
        ids = [ids]
    return model.tokenizer.decode(list(ids))


def context_length(model) -> int:
    """Longest sequence the model accepts."""
    return int(model.cfg.n_ctx)


def final_logits(model, resid: Float[torch.Tensor, "batch pos d_model"]) -> torch.Tensor:
    """Logits from final residual states: final norm, unembedding and any logit soft-capping.

    Pass only the positions you need (e.g. ``resid[:, -1:]``): the vocabulary projection is
    the dominant cost for a 262k-word vocabulary.
    """
    logits = model.unembed(model.ln_final(resid))
    cap = getattr(model.original_model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


def run_blocks(
    model,
    resid: Float[torch.Tensor, "batch pos d_model"],
    block_kwargs: list[dict],
    start: int,
    stop: int | None = None,
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Run blocks ``start..stop-1`` on a residual stream, with bridge hooks firing.

    ``block_kwargs`` are the keyword arguments each block received in a batch-1 forward of the
    same token sequence (see :func:`capture_block_kwargs`); their batch-1 masks and position
    embeddings broadcast over any batch size.
    """
    stop = n_layers(model) if stop is None else stop
    h = resid
    for layer in range(start, stop):
        out = model.blocks[layer](h, **block_kwargs[layer])
        h = out[0] if isinstance(out, tuple) else out
    return h


def capture_block_kwargs(
    model, tokens: torch.Tensor, names: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Run ``tokens`` ([1, pos]) once and return (activation cache, per-block keyword
    arguments), so later calls can re-run any range of blocks directly (:func:`run_blocks`).

    ``names`` filters the hook names cached; by default ``hook_embed`` and every block's
    ``resid_pre``. The keyword arguments have no key/value cache and ``use_cache=False``.
    """
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError("capture_block_kwargs expects one sequence of shape [1, pos]")
    if names is None:

        def names(n: str) -> bool:
            return n == "hook_embed" or n.endswith("hook_resid_pre")

    kwargs: list[dict] = [{} for _ in range(n_layers(model))]
    handles = []
    for layer, block in enumerate(model.blocks):

        def pre(_mod, _args, kw, layer=layer):
            kwargs[layer] = {k: v for k, v in kw.items() if k not in ("hidden_states",)}

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(
                tokens, names_filter=names, use_cache=False, logits_to_keep=1
            )
    finally:
        for h in handles:
            h.remove()
    for kw in kwargs:
        kw.pop("past_key_values", None)
        kw.pop("layer_past", None)
        kw["use_cache"] = False
    return {k: v for k, v in cache.items()}, kwargs


def _length_groups(seqs: list[list[int]]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(len(s), []).append(i)
    return groups


def last_token_logits(
    model, prompts: Sequence[str] | Sequence[list[int]], batch_size: int = 32
) -> Float[torch.Tensor, "batch vocab"]:
    """Next-token logits after each prompt (strings, tokenised with the model's BOS rule, or
    token-id lists). Prompts are grouped by length, so no padding enters any result, and the
    vocabulary projection is computed at the last position only."""
    seqs = [tokenize(model, p) if isinstance(p, str) else list(p) for p in prompts]
    limit = context_length(model)
    for s in seqs:
        if len(s) > limit:
            raise ValueError(f"prompt of {len(s)} tokens is longer than the context ({limit})")
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for idx in _length_groups(seqs).values():
        for i in range(0, len(idx), batch_size):
            chunk = idx[i : i + batch_size]
            toks = torch.tensor([seqs[j] for j in chunk], dtype=torch.long)
            with torch.no_grad():
                logits = model(toks, logits_to_keep=1, use_cache=False)[:, -1]
            for row, j in enumerate(chunk):
                out[j] = logits[row]
    return torch.stack(out)  # type: ignore[arg-type]


def next_token_probs(
    model, prompts: Sequence[str] | Sequence[list[int]], batch_size: int = 32
) -> Float[torch.Tensor, "batch vocab"]:
    """Softmax next-token distribution after each prompt (see :func:`last_token_logits`)."""
    return torch.softmax(last_token_logits(model, prompts, batch_size).float(), dim=-1)


def top_k(model, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``prompt`` with their probabilities."""
    if k < 1:
        raise ValueError("k must be at least 1")
    probs = next_token_probs(model, [prompt])[0]
    p, i = probs.topk(k)
    return [(decode(model, int(t)), float(q)) for t, q in zip(i, p, strict=True)]


def fingerprint(model) -> str:
    """A short hash identifying a model's architecture and unedited identity.

    Hashes the config shape and the token-embedding matrix (which no edit in factscope
    touches), so an edited model keeps its fingerprint and a different model gets another.
    """
    cfg = model.cfg
    h = hashlib.sha256()
    for key in ("architecture", "n_layers", "d_model", "d_mlp", "d_vocab", "n_heads"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    emb = model.embed.original_component.weight.detach()
    step = max(1, emb.shape[0] // 4096)
    h.update(emb[::step].contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]
