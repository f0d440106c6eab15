"""The training data of fine-tuning: teacher-forced examples, the unmodified facts of mixed
batches and their schedule, and the fast loss (blocks below the lowest tuned one run once)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float

from editing.statistics.fisher import answered_facts
from tracing.chat import prompt_text
from tracing.errors import InvalidInput
from tracing.forward import capture_states, run_blocks
from tracing.models import (
    HookedModel,
    context_length,
    final_logprobs,
    hook_name,
    target_ids,
    tokenize,
)

NEUTRAL_SEED = 0


@dataclass(frozen=True)
class Example:
    """One teacher-forced training sequence: prompt tokens then all but the last target token;
    the target's tokens are predicted at positions ``n_prompt - 1 ...``."""

    inputs: tuple[int, ...]
    n_prompt: int
    target: tuple[int, ...]


def encode(model: HookedModel, prompt: str, target: str, what: str) -> Example:
    """The teacher-forced example of ``prompt`` followed by ``target``; errors name ``what``."""
    try:
        prompt_ids = tokenize(model, prompt_text(model, prompt))  # chat form when on
        tgt = target_ids(model, target)
    except InvalidInput as err:
        raise InvalidInput(f"{what}: {err}") from err
    inputs = (*prompt_ids, *tgt[:-1])
    if len(inputs) > context_length(model):
        raise InvalidInput(f"{what}: prompt + target ({len(inputs)} tokens) exceed the context")
    return Example(tuple(inputs), len(prompt_ids), tuple(tgt))


def default_neutral_facts(
    model: HookedModel,
    n: int,
    *,
    exclude_subjects: Sequence[str] = (),
    seed: int = NEUTRAL_SEED,
) -> list[tuple[str, str]]:
    """Up to ``n`` (prompt, answer) pairs from the shipped known facts that ``model`` gets
    right at top-1, in a seeded random order, skipping facts about ``exclude_subjects``
    (:func:`editing.statistics.fisher.answered_facts` with fine-tuning's own seed). May return fewer
    than ``n`` (none for a model that knows nothing, e.g. a random one)."""
    return answered_facts(model, n, exclude_subjects=exclude_subjects, seed=seed)


def mixed_schedule(
    n_new: int,
    n_neutral: int,
    *,
    batch_size: int,
    ratio: float,
    num_steps: int,
    seed: int = NEUTRAL_SEED,
) -> list[list[tuple[list[int], list[int]]]]:
    """The batches of a run: per step (one pass over the new facts), a list of
    (new-fact indices, neutral-fact indices). New facts come in order, ``batch_size`` at a
    time; each batch gets ``round(ratio * len(new))`` (at least 1 when ``ratio > 0``) neutral
    facts drawn from successive seeded permutations of all neutral facts, so every neutral
    fact is used equally often. Deterministic for a given seed."""
    if ratio > 0 and n_neutral < 1:
        raise InvalidInput("mixed batches need at least one neutral fact")
    gen = random.Random(seed)
    stream: list[int] = []
    schedule = []
    for _ in range(num_steps):
        step = []
        for start in range(0, n_new, batch_size):
            new = list(range(start, min(start + batch_size, n_new)))
            k = max(1, round(ratio * len(new))) if ratio > 0 else 0
            while len(stream) < k:
                perm = list(range(n_neutral))
                gen.shuffle(perm)
                stream.extend(perm)
            step.append((new, stream[:k]))
            stream = stream[k:]
        schedule.append(step)
    return schedule


def pad(examples: Sequence[Example], pad_id: int, device: torch.device) -> torch.Tensor:
    """The examples' token ids as one ``[examples, width]`` tensor on ``device``, each row
    right-padded with ``pad_id`` to the longest (the model is causal and the loss reads only
    each example's own target positions, so padding never changes a scored position)."""
    width = max(len(e.inputs) for e in examples)
    rows = [list(e.inputs) + [pad_id] * (width - len(e.inputs)) for e in examples]
    return torch.tensor(rows, dtype=torch.long, device=device)


def states_before(
    model: HookedModel, tokens: torch.Tensor, layer: int, chunk: int = 32
) -> Float[torch.Tensor, "batch pos d_model"]:
    """The residual stream entering block ``layer`` for every row of ``tokens`` (no gradient;
    each forward stops there)."""
    name = hook_name(model, "resid_pre", layer)
    parts = [
        capture_states(model, tokens[i : i + chunk], [name], name)[name]
        for i in range(0, tokens.shape[0], chunk)
    ]
    return torch.cat(parts)


def mean_logprob(
    model: HookedModel,
    h0: Float[torch.Tensor, "batch pos d_model"],
    examples: Sequence[Example],
    block_kwargs: list[dict],
    start: int,
) -> torch.Tensor:
    """Mean over examples of each example's mean target-token log-probability, running only
    blocks ``start..`` from the given residual states and projecting to the vocabulary only at
    the target positions."""
    out = run_blocks(model, h0, block_kwargs, start)
    rows, cols, tgts, weights = [], [], [], []
    for b, e in enumerate(examples):
        for j, t in enumerate(e.target):
            rows.append(b)
            cols.append(e.n_prompt - 1 + j)
            tgts.append(t)
            weights.append(1.0 / (len(e.target) * len(examples)))
    at = out.device
    picked = out[torch.tensor(rows, device=at), torch.tensor(cols, device=at)].unsqueeze(0)
    logp = final_logprobs(model, picked)[0]
    token_lp = logp.gather(1, torch.tensor(tgts, device=logp.device).unsqueeze(1))[:, 0]
    return (token_lp * torch.tensor(weights, device=logp.device)).sum()
