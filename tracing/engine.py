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

The run patched into is the intervention's base run (:func:`tracing.interventions.base_key`:
the corrupted runs; the clean run under ``direction="noise"``; the papers' second noise
draw for a severed trace), and each patched value comes from its state's source
(:func:`tracing.interventions.state_source`); interventions are batched per base run and
restored token, so every batch shares one key/value prefix.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float

from tracing.interventions import State, base_key, base_run, state_hook, state_source
from tracing.kv import PrefixKV, run_recording, suffix_kwargs
from tracing.memory import halving
from tracing.models import HookedModel, final_logits, n_layers, run_block

__all__ = ["State", "fast_probs", "run_corrupted", "start_layer", "state_hook"]


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
    """Mean metric over the noisy runs for each intervention (see module doc).

    ``prep`` is a :class:`tracing.prepared_fact.PreparedFact`.
    """
    S = prep.samples
    out = np.full(len(interventions), np.nan)
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, states in enumerate(interventions):
        key = base_key(prep, states)
        if not states or all(t < prep.span[0] for _, _, t in states):
            out[i] = base_run(model, prep, key).value  # nothing differs from the base run
            bar.update(1)
        else:
            groups[(key, min(t for _, _, t in states))].append(i)
    if any(base_run(model, prep, key).kv is None for key, _ in groups):
        merged: dict[tuple[str, int], list[int]] = defaultdict(list)
        for (key, _), members in groups.items():  # no key/value cache: whole sequences
            merged[(key, 0)].extend(members)
        groups = merged
    per_chunk = max(1, max_rows // S)

    for (key, cut), members in sorted(groups.items()):
        members.sort(key=lambda i: start_layer(interventions[i]))
        base = base_run(model, prep, key)

        def run(chunk: Sequence[int], cut: int = cut, base=base) -> None:
            out[list(chunk)] = _run_chunk(model, prep, base, [interventions[i] for i in chunk], cut)
            bar.update(len(chunk))

        per_chunk = halving(members, per_chunk, run, "trace")
    return out


def _run_chunk(
    model: HookedModel, prep, base, chunk: list[Sequence[State]], cut: int
) -> np.ndarray:
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
                    x = base.resid[layer][:, cut:].clone()
                    for state in chunk[j]:
                        kind, lay, tok = state
                        if kind == "resid" and lay == layer - 1:
                            src = state_source(model, prep, state)
                            x[:, tok - cut] = src[:, tok]
                    parts.append(x)
                new = torch.cat(parts)
                h = new if h is None else torch.cat([h, new])
                active.extend(entering)
            if layer == n:
                break
            kwargs = suffix_kwargs(prep.block_kwargs[layer], cut)
            prefix = None
            if cut > 0:
                k, v = base.kv[layer]
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
        probs = prep.metric_readout(logits).view(len(active), S).mean(1)
    result = np.empty(len(chunk))
    result[active] = probs.double().cpu().numpy()
    return result


def _restore_hooks(
    model: HookedModel, prep, chunk, active: list[int], layer: int, cut: int
) -> list:
    """Bridge hooks patching, inside block ``layer``, the states of the active rows (each
    from its source: the clean run, or per row a corrupted run)."""
    S = prep.samples
    patches: dict[tuple[str, str], tuple[list[int], list[int], torch.Tensor]] = {}
    for row, j in enumerate(active):
        for state in chunk[j]:
            kind, lay, tok = state
            if lay != layer or (kind == "resid" and lay == -1):
                continue
            name = state_hook(model, kind, lay)
            src = state_source(model, prep, state)
            rows, toks, _ = patches.setdefault((name, kind), ([], [], src))
            rows.extend(range(row * S, (row + 1) * S))
            toks.extend([tok] * S)
    hooks = []
    for (name, _), (rows, toks, source) in patches.items():
        at = source.device
        rows_t, toks_t = torch.tensor(rows, device=at), torch.tensor(toks, device=at)
        per_row = rows_t % S if source.shape[0] > 1 else torch.zeros_like(rows_t)
        src = source[per_row, toks_t]

        def patch(x, hook, rows_t=rows_t, toks_t=toks_t - cut, src=src):
            x = x.clone()
            x[rows_t, toks_t] = src
            return x

        hooks.append((name, patch))
    return hooks
