"""The fast causal-tracing engine: restored runs that reuse the corrupted run.

A state restored at (token t, layer L) can only change positions >= t in blocks >= L (the
model is causal and blocks run in order). So each intervention

* starts at its lowest restored block, from the corrupted residual stream cached there;
* computes only the positions from its earliest restored token on, attending to the
  corrupted run's cached keys and values for the positions before it;
* joins a batch with every other intervention that starts at the same position: the batch
  grows block by block as interventions reach their start layer;
* reads the vocabulary projection at the last position only.

Everything runs through the TransformerLens bridge blocks, so restorations are bridge hooks
and every architecture the bridge supports is handled the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float

from tracing.kv import PrefixKV, run_recording, suffix_kwargs
from tracing.memory import halving
from tracing.models import HookedModel, HookKind, final_logits, hook_name, n_layers, run_block

#: (kind, layer, token); kind "resid" at layer -1 is the input of block 0.
State = tuple[HookKind, int, int]


def state_hook(model: HookedModel, kind: HookKind, layer: int) -> str:
    """Hook name where state (kind, layer) lives."""
    if kind == "resid" and layer == -1:
        return hook_name(model, "resid_pre", 0)
    return hook_name(model, kind, layer)


def start_layer(states: Sequence[State]) -> int:
    """First block an intervention has to run: a restored block output at L means L + 1."""
    return min(layer + 1 if kind == "resid" else layer for kind, layer, _ in states)


def run_corrupted(
    model, h: Float[torch.Tensor, "samples pos d"], block_kwargs: list[dict]
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """Run the corrupted batch through every block. Returns the residual stream entering each
    block (and the final one: ``n_layers + 1`` tensors) and each block's keys and values, or
    ``None`` for the latter if the architecture's blocks do not take a key/value cache (then
    the engine recomputes whole sequences)."""
    return run_recording(model, h, block_kwargs, 0, n_layers(model))


def fast_probs(
    model, prep, interventions: Sequence[Sequence[State]], max_rows: int, bar
) -> np.ndarray:
    """Mean answer probability over the noisy runs for each intervention (see module doc).

    ``prep`` is a :class:`tracing.prepared_fact.PreparedFact`.
    """
    S = prep.samples
    out = np.full(len(interventions), np.nan)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, states in enumerate(interventions):
        if not states or all(t < prep.span[0] for _, _, t in states):
            out[i] = prep.p_corrupted  # nothing differs from the corrupted run
            bar.update(1)
        else:
            groups[min(t for _, _, t in states)].append(i)
    if prep.corrupt_kv is None:  # no key/value cache: recompute whole sequences
        groups = {0: [i for members in groups.values() for i in members]}
    per_chunk = max(1, max_rows // S)

    for cut, members in sorted(groups.items()):
        members.sort(key=lambda i: start_layer(interventions[i]))

        def run(chunk: Sequence[int], cut: int = cut) -> None:
            out[list(chunk)] = _run_chunk(model, prep, [interventions[i] for i in chunk], cut)
            bar.update(len(chunk))

        per_chunk = halving(members, per_chunk, run, "trace")
    return out


def _run_chunk(model: HookedModel, prep, chunk: list[Sequence[State]], cut: int) -> np.ndarray:
    """Staggered batch: interventions join at their start block; only positions >= cut."""
    S, n = prep.samples, n_layers(model)
    starts = [start_layer(states) for states in chunk]
    active: list[int] = []
    h = None
    with torch.no_grad():
        for layer in range(min(starts), n + 1):
            entering = [j for j, s in enumerate(starts) if s == layer]
            if entering:
                parts = []
                for j in entering:
                    x = prep.corrupt_resid[layer][:, cut:].clone()
                    for kind, lay, tok in chunk[j]:
                        if kind == "resid" and lay == layer - 1:
                            x[:, tok - cut] = prep.clean[state_hook(model, kind, lay)][0, tok]
                    parts.append(x)
                new = torch.cat(parts)
                h = new if h is None else torch.cat([h, new])
                active.extend(entering)
            if layer == n:
                break
            kwargs = suffix_kwargs(prep.block_kwargs[layer], cut)
            prefix = None
            if cut > 0:
                k, v = prep.corrupt_kv[layer]
                reps = len(active)
                prefix = PrefixKV(
                    k[..., :cut, :].repeat(reps, *[1] * (k.ndim - 1)),
                    v[..., :cut, :].repeat(reps, *[1] * (v.ndim - 1)),
                )
            hooks = _restore_hooks(model, prep, chunk, active, layer, cut)
            assert h is not None
            with model.hooks(fwd_hooks=hooks):
                h = run_block(model, layer, h, kwargs, prefix)
        assert h is not None
        logits = final_logits(model, h[:, -1:])[:, 0].float()
        probs = torch.softmax(logits, -1)[:, prep.answer_id].view(len(active), S).mean(1)
    result = np.empty(len(chunk))
    result[active] = probs.double().cpu().numpy()
    return result


def _restore_hooks(
    model: HookedModel, prep, chunk, active: list[int], layer: int, cut: int
) -> list:
    """Bridge hooks restoring, inside block ``layer``, the clean states of active rows."""
    S = prep.samples
    patches: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for row, j in enumerate(active):
        for kind, lay, tok in chunk[j]:
            if lay != layer or (kind == "resid" and lay == -1):
                continue
            rows, toks = patches[state_hook(model, kind, lay)]
            rows.extend(range(row * S, (row + 1) * S))
            toks.extend([tok] * S)
    hooks = []
    for name, (rows, toks) in patches.items():
        at = prep.clean[name].device
        rows_t, toks_t = torch.tensor(rows, device=at), torch.tensor(toks, device=at)
        src = prep.clean[name][0, toks_t]

        def patch(x, hook, rows_t=rows_t, toks_t=toks_t - cut, src=src):
            x = x.clone()
            x[rows_t, toks_t] = src
            return x

        hooks.append((name, patch))
    return hooks
