"""The reference engine of causal tracing: the plain algorithm of the paper's code.

For every intervention, one batch of 1 clean + N noisy runs through the whole model: the
subject's embeddings of the noisy rows get the prepared noise (or, under token replacement,
the noisy row is the replaced prompt), the clean row's states are copied into the noisy rows
at the restored states, and logits are computed at every position. Slow, and simple enough to
check the fast engine (:mod:`tracing.engine`) against.

A severed intervention (frozen states, :mod:`tracing.severing`) is the papers'
``trace_with_repatch``: a first pass of the same batch with nothing patched records the
frozen modules' outputs; the second pass (noise: the generator's next draw under the papers'
``severed_noise``, the same draw under ``"same"``) restores and freezes. Under
``direction="noise"`` the batch is N corrupted rows then N clean rows, and each clean row
gets its corrupted row's states.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from tracing.interventions import State, frozen_module, state_hook
from tracing.models import hook_name
from tracing.prepared_fact import PreparedFact


def _corrupt_hook(prep: PreparedFact, noise: torch.Tensor, rows: slice):
    start, end = prep.span

    def corrupt(x, hook):
        x = x.clone()
        x[rows, start:end] = (x[rows, start:end].double() + noise.to(x.device)).to(x.dtype)
        return x

    return corrupt


def reference_probs(
    model, prep: PreparedFact, interventions: Sequence[Sequence[State]], bar
) -> np.ndarray:
    """The mean metric over the noisy runs of ``prep`` for each intervention (a set of states
    patched together); ``bar`` is advanced by one per intervention."""
    S = prep.samples
    noise_dir = prep.direction == "noise"
    if prep.corrupt_ids is not None:  # token replacement: the corrupted prompt is a row
        clean_rows = prep.ids.repeat(S, 1) if noise_dir else prep.ids
        ids = torch.cat(
            [prep.corrupt_ids, clean_rows] if noise_dir else [clean_rows, prep.corrupt_ids]
        )
    else:
        ids = prep.ids.repeat(2 * S if noise_dir else S + 1, 1)
    noisy = slice(0, S) if noise_dir else slice(1, None)  # the corrupted rows
    scored = slice(S, None) if noise_dir else slice(1, None)  # the rows read out
    embed = hook_name(model, "embed")

    def embed_hooks(noise: torch.Tensor) -> list:
        return [] if prep.corrupt_ids is not None else [(embed, _corrupt_hook(prep, noise, noisy))]

    out = np.empty(len(interventions))
    for i, states in enumerate(interventions):
        restore: dict[str, list[int]] = defaultdict(list)
        freeze: dict[str, list[int]] = defaultdict(list)
        for kind, layer, tok in states:
            target = freeze if frozen_module(kind) else restore
            target[state_hook(model, kind, layer)].append(tok)
        noise = prep.noise
        first: dict[str, torch.Tensor] = {}
        if freeze:  # first pass: the corrupted batch as it is, recording the frozen outputs

            def record(name: str, first: dict = first):
                def keep(x, hook):
                    first[name] = x.detach().clone()
                    return x

                return keep

            hooks = embed_hooks(noise) + [(name, record(name)) for name in freeze]
            with torch.no_grad():
                model.run_with_hooks(ids, fwd_hooks=hooks, use_cache=False)
            if prep.severed_noise == "papers" and prep.corrupt_ids is None:
                noise = prep.second_noise()
        hooks = embed_hooks(noise)
        for name, toks in restore.items():

            def patch(x, hook, toks=toks):
                x = x.clone()
                if noise_dir:
                    x[S:, toks] = x[:S, toks]
                else:
                    x[1:, toks] = x[0, toks]
                return x

            hooks.append((name, patch))
        for name, toks in freeze.items():

            def hold(x, hook, toks=toks, held=first[name]):
                x = x.clone()
                x[1:, toks] = held[1:, toks]
                return x

            hooks.append((name, hold))
        with torch.no_grad():
            logits = model.run_with_hooks(ids, fwd_hooks=hooks, use_cache=False)
        out[i] = prep.metric_readout(logits[scored, -1].float()).mean().item()
        bar.update(1)
    return out
