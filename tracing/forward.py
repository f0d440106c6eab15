"""Running a hooked model: capture states (stopping as early as possible), re-run a range of
blocks, and read next-token distributions.

* :func:`run_until` runs a forward pass with hooks and ends it right after one named hook
  fires: the one "run the model and stop early" helper that statistics, subject keys, target
  optimisation and fine-tuning share.
* :func:`capture_states` returns the activations at some hooks (built on :func:`run_until`).
* :func:`capture_block_kwargs` and :func:`run_blocks` re-run any range of blocks directly on a
  residual stream, with bridge hooks firing (the tracing engine and the target optimisation
  compute only what an intervention can change).
* :func:`next_token_probs`, :func:`last_token_logits`, :func:`top_k`: next-token
  distributions, computing the vocabulary projection at the last position only.
* :func:`padded` and :func:`length_chunks`: batching prompts of different lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int

from tracing.errors import InvalidInput
from tracing.models import (
    HookedModel,
    cache_keyword,
    context_length,
    decode,
    model_device,
    n_layers,
    run_block,
    tokenize,
)

HookFn = Callable[[torch.Tensor, object], torch.Tensor | None]


class _Stop(Exception):
    """Raised in a hook to end a forward pass early."""


def run_until(
    model: HookedModel,
    tokens: Int[torch.Tensor, "batch pos"],
    hooks: Sequence[tuple[str, HookFn]],
    stop_after: str | None = None,
) -> None:
    """Run ``tokens`` through ``model`` without gradient, with forward ``hooks``; the pass
    ends right after hook ``stop_after`` has fired (default: it runs to the end, reading the
    vocabulary projection at the last position only)."""
    wrapped = list(hooks)
    if stop_after is not None:
        inner = dict(wrapped).get(stop_after)

        def stop(x: torch.Tensor, hook: object) -> None:
            if inner is not None:
                inner(x, hook)
            raise _Stop

        wrapped = [(n, f) for n, f in wrapped if n != stop_after] + [(stop_after, stop)]
    with torch.no_grad(), model.hooks(fwd_hooks=wrapped):
        try:
            model(tokens, use_cache=False, logits_to_keep=1)
        except _Stop:
            pass


def capture_states(
    model: HookedModel,
    tokens: Int[torch.Tensor, "batch pos"],
    names: Sequence[str],
    stop_after: str | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``tokens`` without gradient and return the activations at hook ``names``;
    the forward stops right after hook ``stop_after`` fires (default: runs to the end)."""
    store: dict[str, torch.Tensor] = {}

    def saver(name: str) -> HookFn:
        def save(x: torch.Tensor, hook: object) -> torch.Tensor:
            store[name] = x.detach()
            return x

        return save

    run_until(model, tokens, [(n, saver(n)) for n in dict.fromkeys(names)], stop_after)
    missing = [n for n in names if n not in store]
    if missing:
        raise InvalidInput(f"hooks {missing} did not fire before {stop_after!r}")
    return {n: store[n] for n in names}


def run_blocks(
    model: HookedModel,
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
        h = run_block(model, layer, h, block_kwargs[layer])
    return h


def capture_block_kwargs(
    model: HookedModel,
    tokens: Int[torch.Tensor, "1 pos"],
    names: Callable[[str], bool] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Run ``tokens`` ([1, pos]) once and return (activation cache, per-block keyword
    arguments), so later calls can re-run any range of blocks directly (:func:`run_blocks`).

    ``names`` filters the hook names cached; by default ``hook_embed`` and every block's
    ``resid_pre``. The keyword arguments carry no key/value cache and ``use_cache=False``.
    """
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise InvalidInput("capture_block_kwargs expects one sequence of shape [1, pos]")
    if names is None:

        def names(n: str) -> bool:
            return n == "hook_embed" or n.endswith("hook_resid_pre")

    kwargs: list[dict] = [{} for _ in range(n_layers(model))]
    handles = []
    for layer, block in enumerate(model.blocks):

        def pre(_mod: object, _args: object, kw: dict, layer: int = layer) -> None:
            kwargs[layer] = {k: v for k, v in kw.items() if k != "hidden_states"}

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
        for key in {"past_key_values", "layer_past", cache_keyword(model)}:
            kw.pop(key, None)
        kw["use_cache"] = False
    return dict(cache.items()), kwargs


# --------------------------------------------------------------------------- batching


def padded(
    seqs: Sequence[Sequence[int]], device: torch.device | str | None = None
) -> Int[torch.Tensor, "batch pos"]:
    """Right-pad token sequences to a common length by repeating each one's last token
    (never a pad id, so no attention-mask logic is triggered; only real positions are read),
    as a tensor on ``device`` (the model's: :func:`~tracing.models.model_device`)."""
    width = max(len(s) for s in seqs)
    rows = [list(s) + [s[-1]] * (width - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long, device=device)


def length_chunks(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices into chunks of similar length whose padded size (count x longest) stays
    within ``max_tokens`` (a chunk always holds at least one index)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    chunks: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * max(lengths[i], lengths[cur[-1]]) > max_tokens:
            chunks.append(cur)
            cur = []
        cur.append(i)
    if cur:
        chunks.append(cur)
    return chunks


# --------------------------------------------------------------------------- next tokens


def last_token_logits(
    model: HookedModel, prompts: Sequence[str] | Sequence[list[int]], batch_size: int = 32
) -> Float[torch.Tensor, "batch vocab"]:
    """Next-token logits after each prompt (strings, tokenised with the model's BOS rule, or
    token-id lists). Prompts are grouped by length, so no padding enters any result, and the
    vocabulary projection is computed at the last position only."""
    seqs = [tokenize(model, p) if isinstance(p, str) else list(p) for p in prompts]
    limit = context_length(model)
    for s in seqs:
        if len(s) > limit:
            raise InvalidInput(f"prompt of {len(s)} tokens is longer than the context ({limit})")
    device = model_device(model)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(len(s), []).append(i)
    out: dict[int, torch.Tensor] = {}
    for idx in groups.values():
        for i in range(0, len(idx), batch_size):
            chunk = idx[i : i + batch_size]
            toks = torch.tensor([seqs[j] for j in chunk], dtype=torch.long, device=device)
            with torch.no_grad():
                logits = model(toks, logits_to_keep=1, use_cache=False)[:, -1]
            for row, j in enumerate(chunk):
                out[j] = logits[row]
    return torch.stack([out[j] for j in range(len(seqs))])


def next_token_probs(
    model: HookedModel, prompts: Sequence[str] | Sequence[list[int]], batch_size: int = 32
) -> Float[torch.Tensor, "batch vocab"]:
    """Softmax next-token distribution after each prompt (see :func:`last_token_logits`)."""
    return torch.softmax(last_token_logits(model, prompts, batch_size).float(), dim=-1)


def top_k(model: HookedModel, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``prompt`` with their probabilities."""
    if k < 1:
        raise InvalidInput("k must be at least 1")
    probs = next_token_probs(model, [prompt])[0]
    p, i = probs.topk(k)
    return [(decode(model, int(t)), float(q)) for t, q in zip(i, p, strict=True)]
