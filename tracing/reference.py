"""The reference engine of causal tracing: the plain algorithm of the paper's code.

For every intervention, one batch of 1 clean + N noisy runs through the whole model: the
subject's embeddings of the noisy rows get the prepared noise, the clean row's states are
copied into the noisy rows at the restored states, and logits are computed at every
position. Slow, and simple enough to check the fast engine (:mod:`tracing.engine`) against.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from tracing.engine import State, state_hook
from tracing.models import hook_name
from tracing.prepared_fact import PreparedFact


def reference_probs(
    model, prep: PreparedFact, interventions: Sequence[Sequence[State]], bar
) -> np.ndarray:
    """The answer's mean probability over the noisy runs of ``prep`` for each intervention
    (a set of states restored together from the clean run); ``bar`` is advanced by one per
    intervention."""
    S = prep.samples
    ids = prep.ids.repeat(S + 1, 1)
    start, end = prep.span
    embed = hook_name(model, "embed")

    def corrupt(x, hook):
        x = x.clone()
        x[1:, start:end] = (x[1:, start:end].double() + prep.noise.to(x.device)).to(x.dtype)
        return x

    out = np.empty(len(interventions))
    for i, states in enumerate(interventions):
        by_hook: dict[str, list[int]] = defaultdict(list)
        for kind, layer, tok in states:
            by_hook[state_hook(model, kind, layer)].append(tok)
        hooks = [(embed, corrupt)]
        for name, toks in by_hook.items():

            def restore(x, hook, toks=toks):
                x = x.clone()
                x[1:, toks] = x[0, toks]
                return x

            hooks.append((name, restore))
        with torch.no_grad():
            logits = model.run_with_hooks(ids, fwd_hooks=hooks, use_cache=False)
        out[i] = torch.softmax(logits[1:, -1].float(), -1)[:, prep.answer_id].mean().item()
        bar.update(1)
    return out
